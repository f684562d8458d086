"""Gated promotion: move a registry alias to a stage artifact only if the recipe's gates pass.

    promote(recipe, project, "long2short@latest", "champion")
      ref -> store artifact -> model version (registered on first use) -> each gate checked on
      the version's recorded metrics -> decision + evidence written as version tags ->
      alias moved (all passed) or PromotionRefused naming every failing gate (alias untouched).

A metric the version never recorded fails its gate (no silent pass). The decision is recorded in
both cases: `moonforge.decision.<alias>` = promoted | refused | set (ungated) and
`moonforge.evidence.<alias>` = JSON of each gate's metric, threshold, observed value and result.
`set_candidate` is the lifecycle's ungated step: `candidate` marks the newest full-lifecycle
output for evaluation; `champion` and every other alias go through `promote`.
"""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moonforge.registry import model_registry as mr
from moonforge.registry.errors import PromotionRefused, RegistryError
from moonforge.registry.refs import resolve_ref
from moonforge.registry.store import ArtifactInfo, ArtifactStore
from moonforge.stages.recipe import Gate, Recipe

CANDIDATE = "candidate"


@dataclass(frozen=True)
class GateResult:
    gate: str
    metric: str
    op: str
    threshold: float
    observed: float | None
    passed: bool
    reason: str


@dataclass
class Decision:
    model: str
    version: int
    alias: str
    artifact: str
    fingerprint: str
    outcome: str
    """promoted | refused | set (ungated, the lifecycle's candidate)."""
    results: list[GateResult] = field(default_factory=list)
    at: float = 0.0
    by: str = ""

    @property
    def failed(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]

    def evidence(self) -> str:
        return json.dumps(
            {
                "outcome": self.outcome,
                "artifact": self.artifact,
                "fingerprint": self.fingerprint,
                "at": self.at,
                "by": self.by,
                "gates": [asdict(r) for r in self.results],
            },
            sort_keys=True,
        )


def check_gates(gates: tuple[Gate, ...], metrics: Mapping[str, float]) -> list[GateResult]:
    """Each gate against the recorded metrics; a missing metric is a failed gate."""
    out = []
    for g in gates:
        if g.metric not in metrics:
            have = ", ".join(sorted(metrics)) or "no metrics at all"
            out.append(
                GateResult(
                    str(g),
                    g.metric,
                    g.op,
                    g.value,
                    None,
                    False,
                    f"{g.metric} was not recorded for this version (recorded: {have})",
                )
            )
            continue
        v = float(metrics[g.metric])
        ok = g.passes(v)
        out.append(
            GateResult(
                str(g),
                g.metric,
                g.op,
                g.value,
                v,
                ok,
                f"{g.metric} = {v:.4g} {'passes' if ok else 'fails'} {g}",
            )
        )
    return out


def _artifact_for(recipe: Recipe, store: ArtifactStore, ref: str, project: str | Path) -> ArtifactInfo:
    info = resolve_ref(ref, store, project)
    allowed = recipe.promoted_stages()
    if info.stage not in allowed:
        raise RegistryError(
            f"{ref} resolves to {info.ref}, a {info.stage} artifact, but recipe {recipe.name!r} "
            f"registers only {', '.join(allowed)} as model {recipe.model_name!r}; promote a "
            f"{allowed[-1]} ref (e.g. {allowed[-1]}@latest) or add {info.stage!r} to "
            f"promotion.stages in the recipe"
        )
    return info


def _record(client: Any, d: Decision) -> None:
    client.set_model_version_tag(d.model, str(d.version), f"{mr.TAG}decision.{d.alias}", d.outcome)
    client.set_model_version_tag(
        d.model, str(d.version), f"{mr.TAG}evidence.{d.alias}", d.evidence()[: mr.MAX_TAG_VALUE]
    )


def promote(
    recipe: Recipe, project: str | Path, store: ArtifactStore, ref: str, alias: str, client: Any = None
) -> Decision:
    """Register `ref` (if new) and move `alias` to it when every recipe gate passes.

    Raises RegistryError (bad alias / model name / stage), ArtifactNotFound (bad ref) before
    touching the registry, and PromotionRefused (alias unchanged, decision recorded) on a gate.
    """
    mr.validate_alias(alias)
    name = mr.validate_model_name(recipe.model_name)
    info = _artifact_for(recipe, store, ref, project)
    client = client or mr.client_for(project)
    mv = mr.register(client, name, info, store, project, recipe.name)
    results = check_gates(recipe.promotion.gates, mr.recorded_metrics(mv))
    ok = all(r.passed for r in results)
    d = Decision(
        name,
        int(mv.version),
        alias,
        info.ref,
        info.fingerprint,
        "promoted" if ok else "refused",
        results,
        time.time(),
        _user(),
    )
    _record(client, d)
    if not ok:
        lines = "\n".join(f"  - {r.reason}" for r in d.failed)
        raise PromotionRefused(
            f"{name} version {d.version} ({info.ref}) was not promoted to {alias!r}: "
            f"{len(d.failed)} of {len(results)} gate(s) failed:\n{lines}\n"
            f"The decision and its evidence are recorded on the version "
            f"(tags moonforge.decision.{alias} / moonforge.evidence.{alias}); the alias did not move.",
            d,
        )
    client.set_registered_model_alias(name, alias, str(d.version))
    return d


def set_candidate(
    recipe: Recipe, project: str | Path, store: ArtifactStore, ref: str, client: Any = None
) -> Decision:
    """Register `ref` and point `candidate` at it without gating (the lifecycle's last step);
    gate results are still recorded as evidence, so `moonforge models` shows how it would fare."""
    name = mr.validate_model_name(recipe.model_name)
    info = _artifact_for(recipe, store, ref, project)
    client = client or mr.client_for(project)
    mv = mr.register(client, name, info, store, project, recipe.name)
    d = Decision(
        name,
        int(mv.version),
        CANDIDATE,
        info.ref,
        info.fingerprint,
        "set",
        check_gates(recipe.promotion.gates, mr.recorded_metrics(mv)),
        time.time(),
        _user(),
    )
    _record(client, d)
    client.set_registered_model_alias(name, CANDIDATE, str(d.version))
    return d


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"

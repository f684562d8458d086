"""`moonforge diff REF1 REF2`: what differs between two versions of one stage.

Three layers, most important first:
- inputs: what made the fingerprints differ (explain_diff: config fields, model shape, upstream
  version, data hashes, code version), by input kind;
- runtime: config fields that differ but are Runtime[...] (they never change a fingerprint, so
  they are shown apart: same version identity, different execution);
- metrics: the recorded summary metrics side by side;
plus provenance (git commit, recipe, MLflow run) when it differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moonforge.registry.errors import ArtifactNotFound
from moonforge.registry.fingerprint import _dict_diff, explain_diff, reason_kind
from moonforge.registry.refs import artifact_kind, resolve_ref
from moonforge.registry.run_stage import fp_namer
from moonforge.registry.store import ArtifactInfo, ArtifactStore


@dataclass
class ArtifactDiff:
    a: ArtifactInfo
    b: ArtifactInfo
    inputs: list[tuple[str, str]] = field(default_factory=list)
    """(input kind, reason) for every fingerprint input that differs."""
    runtime: list[str] = field(default_factory=list)
    """Config differences outside the fingerprint (Runtime[...] fields)."""
    metrics: list[tuple[str, float | None, float | None]] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)

    @property
    def same_fingerprint(self) -> bool:
        return self.a.fingerprint == self.b.fingerprint


def diff_artifacts(store: ArtifactStore, ref_a: str, ref_b: str, project: str | Path = ".") -> ArtifactDiff:
    """Compare two artifacts of the same stage kind; ArtifactNotFound for a missing ref or for
    two different stage kinds (their configs are different schemas, so a field diff is noise)."""
    a, b = resolve_ref(ref_a, store, project), resolve_ref(ref_b, store, project)
    ka, kb = artifact_kind(a), artifact_kind(b)
    if ka != kb:
        raise ArtifactNotFound(
            f"diff compares two versions of one stage: {ref_a} is {a.ref} ({ka}) but {ref_b} is "
            f"{b.ref} ({kb}); pass two refs of the same stage, e.g. {a.stage}@1 {a.stage}@latest"
        )
    d = ArtifactDiff(a, b)
    reasons = (
        explain_diff(a.inputs, b.inputs, fp_namer(store)) if a.inputs else ["no recorded inputs for " + a.ref]
    )
    d.inputs = [(reason_kind(r), r) for r in reasons]
    la, lb = a.lineage(), b.lineage()
    identity_diffs = {r.split(":", 1)[0] for _, r in d.inputs}
    d.runtime = [
        r
        for r in _dict_diff(la.get("config") or {}, lb.get("config") or {}, "config")
        if r.split(":", 1)[0] not in identity_diffs
    ]
    ma, mb = la.get("metrics") or {}, lb.get("metrics") or {}
    d.metrics = [(k, ma.get(k), mb.get(k)) for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
    d.provenance = _provenance(la, lb)
    return d


def _provenance(la: dict[str, Any], lb: dict[str, Any]) -> list[str]:
    out = []
    for label, key in (
        ("git commit", ("git", "commit")),
        ("git dirty", ("git", "dirty")),
        ("recipe", ("recipe", "name")),
        ("recipe digest", ("recipe", "digest")),
        ("mlflow run", ("mlflow_run_id",)),
        ("prefect flow run", ("prefect_flow_run_id",)),
    ):
        va: Any = la
        vb: Any = lb
        for k in key:
            va = (va or {}).get(k) if isinstance(va, dict) else None
            vb = (vb or {}).get(k) if isinstance(vb, dict) else None
        if va != vb:
            out.append(f"{label}: {va} -> {vb}")
    return out

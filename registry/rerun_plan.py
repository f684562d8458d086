"""What `moonforge rerun STAGE [--from REF] [--downstream]` would do, computed without running.

For each stage in order: which upstream artifact it would start from (and why that one), the
fingerprint it would have, and whether that is a cache hit (an artifact with that fingerprint is
committed: it would be reused, nothing trains) or a new version (with the reasons: what differs
from the stage's latest version, by input kind). Downstream stages start from the planned output
of the stage before them, so their fingerprints are the ones a real rerun would produce.
Data versions come from dvc.lock as pinned now (a dataset whose dvc.yaml inputs changed since is
rebuilt by the real run first; `moonforge data status` shows that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moonforge.registry.data_versions import read_lock
from moonforge.registry.errors import DatasetError
from moonforge.registry.fingerprint import code_version, explain_diff, fingerprint, fingerprint_inputs
from moonforge.registry.run_stage import UNBUILT, fp_namer, resolve_upstream
from moonforge.registry.stage_inputs import TOKENIZER, expected_init, expected_tokenizer_digest
from moonforge.registry.store import ArtifactStore
from moonforge.stages.recipe import Recipe


@dataclass(frozen=True)
class PlannedStage:
    stage: str
    action: str
    """"run" (a new version would be trained) or "reuse" (cache hit; nothing trains)."""
    upstream: str
    """The upstream it would start from: a ref, "(planned <stage> output)" or "-"."""
    upstream_how: str
    fingerprint: str
    ref: str
    """The artifact it would end as: the cached ref, or `<stage>@<next version>`."""
    reasons: list[str] = field(default_factory=list)


def _digests(project: str | Path) -> dict[str, str]:
    try:
        return {n: d.digest for n, d in read_lock(project).items()}
    except DatasetError:
        return {}


def plan_rerun(
    recipe: Recipe,
    stage: str,
    project: str | Path,
    store: ArtifactStore,
    from_ref: str | None = None,
    downstream: bool = False,
) -> list[PlannedStage]:
    """The plan for rerunning `stage` (and, with downstream, every later stage that depends on
    it). Raises what a real rerun would raise before training: RecipeError for an unknown stage,
    ArtifactNotFound for a missing / wrong-kind upstream ref."""
    names = [recipe.stage(stage).stage_name] + (recipe.downstream_of(stage) if downstream else [])
    digests = _digests(project)
    planned: dict[str, tuple[str, str]] = {}  # stage -> (fingerprint, ref it would end as)
    out: list[PlannedStage] = []
    for i, name in enumerate(names):
        cfg = recipe.stage(name)
        if i == 0:
            info, how = resolve_upstream(recipe, name, project, store, from_ref)
            up = (info.stage, info.fingerprint) if info else None
            up_ref = info.ref if info else "-"
        else:  # starts from what the rerun just planned for its upstream
            fp_up, ref_up = planned[cfg.upstream]
            up, up_ref, how = (cfg.upstream, fp_up), ref_up, "planned output of this rerun"
        data = {n: digests.get(n, UNBUILT) for n in cfg.data}
        tok = expected_tokenizer_digest(recipe, store, project)
        if tok is not None and TOKENIZER in data:
            data[TOKENIZER] = tok
        inputs = fingerprint_inputs(
            cfg, recipe.model, up, data, code_version(cfg.kind), init=expected_init(cfg, store, project)
        )
        fp = fingerprint(inputs)
        hit = store.lookup(name, fp)
        latest = store.latest(name)
        if hit is not None:
            action, ref = "reuse", hit.ref
            reasons = [f"{hit.ref} already has this fingerprint (cache hit; nothing trains)"]
        else:
            action = "run"
            ref = f"{name}@{(max((a.version for a in store.versions(name)), default=0)) + 1}"
            reasons = (
                ["never built"]
                if latest is None
                else [f"vs {latest.ref}: {r}" for r in explain_diff(latest.inputs, inputs, fp_namer(store))]
            )
        reasons += [
            f"data {n} is not pinned in dvc.lock yet (built first)" for n, d in data.items() if d == UNBUILT
        ]
        planned[name] = (fp, ref)
        out.append(PlannedStage(name, action, up_ref, how, fp, ref, reasons))
    return out

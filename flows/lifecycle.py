"""Prefect flows: the recipe's stage chain as tasks, each one `registry.run_stage`.

Thin wiring, no tensors. Each task is named after its stage and returns the StageOutcome dict
whose "ref" (e.g. "sft@3") is the artifact reference the next stage starts from. Caching is the
store's job (fingerprints), not Prefect's (cache_policy=NONE). Retries happen only for transient
I/O failures, never for a config error or a NaN loss. Each flow first closes what killed earlier
runs left open: their MLflow runs end KILLED, their Prefect flow runs Crashed.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from moonforge.flows.prefect_artifacts import publish_stage
from moonforge.registry.data_versions import ensure_datasets
from moonforge.registry.errors import is_transient
from moonforge.registry.promotion import set_candidate
from moonforge.registry.run_stage import StageProgress, run_stage
from moonforge.registry.store import open_store
from moonforge.registry.tracking import Tracker, mark_flow_runs_crashed, owner_tags, reap_dead_flow_runs
from moonforge.stages import catalog
from moonforge.stages.recipe import Recipe, RecipeError, load_recipe

log = logging.getLogger("moonforge.flows")
RETRIES = 2
RETRY_DELAYS = [5.0, 30.0]
PROGRESS: ContextVar[StageProgress | None] = ContextVar("moonforge_progress", default=None)
"""Set by the CLI to render rich progress bars; flows and tasks run in the caller's context."""


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", s.lower()).strip("-") or "x"


def _retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry StageFailed(transient=True) / OS-level errors only."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return False
    return isinstance(exc, BaseException) and is_transient(exc)


@task(
    name="stage",
    task_run_name="{stage}",
    cache_policy=NONE,
    persist_result=False,
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=_retry_transient,
)
def stage_task(
    recipe_path: str,
    overrides: list[str],
    stage: str,
    project: str,
    upstream_ref: str | None = None,
    parent_run_id: str | None = None,
) -> dict:
    recipe = load_recipe(recipe_path, overrides)
    tracker = Tracker(project, recipe.name, parent_run_id=parent_run_id)
    out = run_stage(
        recipe,
        stage,
        project,
        upstream_ref,
        tracker=tracker,
        progress=PROGRESS.get(),
        flow_run_id=str(flow_run.id or ""),
    )
    publish_stage(recipe.name, out.to_dict(), project)  # metrics table + lineage on the run page
    return out.to_dict()


def _run_chain(
    recipe: Recipe,
    recipe_path: str,
    overrides: list[str],
    names: list[str],
    project: str,
    first_upstream: str | None = None,
) -> dict[str, dict]:
    """Run `names` in order, each from the artifact its upstream produced in this flow."""
    for name in names:  # fail fast: unimplemented stages and unbuildable data, before training
        catalog.stage_function(recipe.stage(name).kind)
    ensure_datasets(project, [d for n in names for d in recipe.stage(n).data])
    tracker = Tracker(project, recipe.name)
    close_dead_runs(tracker)
    tracker.start_lifecycle(recipe, flow_run_id=str(flow_run.id or ""))
    refs: dict[str, str] = {}
    outcomes: dict[str, dict] = {}
    try:
        for i, name in enumerate(names):
            up = recipe.stage(name).upstream
            ref = first_upstream if i == 0 else refs.get(up) if up else None
            out = stage_task.with_options(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS)(
                recipe_path, list(overrides), name, project, ref, tracker.parent_run_id
            )
            refs[name], outcomes[name] = out["ref"], out
    except BaseException:
        tracker.end_lifecycle("FAILED")
        raise
    tracker.end_lifecycle("FINISHED")
    _mark_candidate(recipe, project, outcomes)
    create_table_artifact(
        key=f"{_slug(recipe.name)}-lifecycle-summary",
        description=f"recipe {recipe.name}",
        table=[
            {
                "stage": o["stage"],
                "ref": o["ref"],
                "cache_hit": o["cache_hit"],
                "wall_s": round(o["wall_s"], 1),
                "fingerprint": o["fingerprint"][:12],
                **{k: round(v, 5) for k, v in list(o["metrics"].items())[:4]},
            }
            for o in outcomes.values()
        ],
    )
    return outcomes


DEAD = (
    "its process died (killed, out of memory or preempted) before the flow ended; found "
    "and closed by a later run"
)


def owned():
    """Tag the flow runs started inside with this process (`with owned(): lifecycle_flow(...)`),
    so the next run can end them as Crashed if this process dies first."""
    from prefect import tags

    return tags(*owner_tags())


def close_dead_runs(tracker: Tracker) -> list[dict]:
    """End the MLflow runs of dead processes (kill -9, OOM, preemption) of this recipe as KILLED
    and their Prefect flow runs as Crashed. Logged, never raised: the new run matters more."""
    try:
        dead = tracker.reap_dead_runs()
    except Exception as e:
        log.warning("could not look for runs left RUNNING by dead processes: %s: %s", type(e).__name__, e)
        dead = []
    flows = [
        d["prefect_flow_run_id"]
        for d in dead
        if d["prefect_flow_run_id"] and d["prefect_flow_run_id"] != str(flow_run.id or "")
    ]
    mark_flow_runs_crashed(flows, DEAD)
    reap_dead_flow_runs(DEAD)
    return dead


def _mark_candidate(recipe: Recipe, project: str, outcomes: dict[str, dict]) -> None:
    """Point the registry's `candidate` alias at this run's output of the recipe's promoted
    stage (ungated; `moonforge promote` gates champion). A registry failure is logged, not
    raised: the stage artifacts are committed and a later `moonforge promote` can register."""
    done = [o for name, o in outcomes.items() if name in recipe.promoted_stages()]
    if not done:
        return
    ref = done[-1]["ref"]
    try:
        d = set_candidate(recipe, project, open_store(project), ref)
    except Exception as e:
        log.warning(
            "could not register %s as %s@candidate (%s: %s); the artifact is committed, "
            "register it later with `moonforge promote %s --alias candidate`",
            ref,
            recipe.model_name,
            type(e).__name__,
            e,
            ref,
        )
        return
    create_markdown_artifact(
        key=f"{_slug(recipe.model_name)}-candidate",
        description=f"{d.model}@candidate",
        markdown=f"`{d.model}` version {d.version} ({d.artifact}) is now `candidate`.\n\n"
        + "\n".join(f"- {r.reason}" for r in d.results),
    )


def stages_until(recipe: Recipe, until: str | None) -> list[str]:
    names = recipe.stage_names()
    if until is None:
        return names
    if until not in names:
        raise RecipeError(
            f"--until {until!r}: no such stage in recipe {recipe.name!r}; stages are: {', '.join(names)}"
        )
    return names[: names.index(until) + 1]


@flow(name="lifecycle", persist_result=False)
def lifecycle_flow(
    recipe_path: str = "recipes/tiny.yaml",
    overrides: list[str] | None = None,
    until: str | None = None,
    project: str = ".",
) -> dict[str, dict]:
    """Run the recipe's stages in order (up to `until`); returns {stage: StageOutcome dict}."""
    recipe = load_recipe(recipe_path, overrides or [])
    return _run_chain(recipe, recipe_path, overrides or [], stages_until(recipe, until), project)


@flow(name="rerun", persist_result=False)
def rerun_flow(
    recipe_path: str,
    stage: str,
    from_ref: str | None = None,
    overrides: list[str] | None = None,
    downstream: bool = False,
    project: str = ".",
) -> dict[str, dict]:
    """Rerun `stage` from `from_ref` (default: its recipe-chain upstream), optionally followed
    by every stage downstream of it, each from the artifact just produced."""
    recipe = load_recipe(recipe_path, overrides or [])
    names = [recipe.stage(stage).stage_name] + (recipe.downstream_of(stage) if downstream else [])
    return _run_chain(recipe, recipe_path, overrides or [], names, project, first_upstream=from_ref)

"""Prefect deployments: the lifecycle and every stage rerun, with typed (pydantic) parameters.

The Prefect UI renders each deployment's parameter form from the JSON schema of one pydantic
model (`LifecycleParams` / `RerunParams`), field docstrings included. Prefect validates a run's
parameters in the flow-run process before the flow body starts, so a bad recipe path, an unknown
stage or a malformed `--set` override fails the Prefect run with the pydantic message (the JSON
schema the server enforces can only check types).

The deployed flows are named like the CLI's flows ("lifecycle", "rerun") so the UI shows CLI runs
and deployment runs side by side; they run the same flow bodies (`.fn`) inside one flow run, so
the per-stage tasks and Prefect artifacts land on the deployment run's own page.

    moonforge deploy [--recipe R] [--cron "0 3 * * *"]   -> rerun/<recipe>-<stage>, lifecycle/<recipe>
    moonforge serve  [--recipe R]                         -> the same, served by this process
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moonforge.flows.lifecycle import lifecycle_flow, rerun_flow, stages_until
from moonforge.stages.recipe import Recipe, RecipeError, load_recipe

WORK_POOL = "moonforge-process"
"""The process pool `moonforge deploy` targets by default (same name as infra/prefect.yaml)."""
TAGS = ["moonforge"]
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]-]*=")


class _Params(BaseModel):
    """Shared checks; each subclass declares its fields in the order the UI form shows them."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    if TYPE_CHECKING:  # declared by the subclasses (pydantic orders base-class fields first)
        recipe: str
        overrides: list[str]
        project: str

    def recipe_path(self) -> str:
        return str((Path(self.project) / self.recipe).resolve())

    def _load(self) -> Recipe:
        bad = [o for o in self.overrides if not _OVERRIDE.match(o)]
        if bad:
            raise ValueError(f"overrides {bad}: each must be key=value, e.g. stages.sft.optimizer.lr=1e-4")
        path = Path(self.recipe_path())
        if not path.is_file():
            raise ValueError(
                f"recipe {self.recipe!r}: no such file under project {self.project!r} "
                f"({path}); pass a path relative to the project, e.g. recipes/tiny.yaml"
            )
        try:
            return load_recipe(path, self.overrides)
        except RecipeError as e:
            raise ValueError(str(e)) from None


def default_project() -> str:
    """$MOONFORGE_HOME (the checkout a Slurm or process worker runs flows for), else ".".

    A run whose parameters omit `project` (e.g. `prefect deployment run ... --params` replacing
    the deployment's defaults) may start in a temporary directory Prefect pulled the code into;
    "." there would put the artifacts in a store nobody reads afterwards."""
    return os.environ.get("MOONFORGE_HOME") or "."


class LifecycleParams(_Params):
    """Run the recipe's whole lifecycle (cached stages are reused)."""

    recipe: str = "recipes/tiny.yaml"
    """Recipe YAML, relative to `project` (or absolute)."""
    until: str | None = None
    """Stop after this stage (default: run every stage)."""
    overrides: list[str] = []
    """Recipe overrides, like the CLI's --set: stages.<name>.<field>=value or model.<...>=value."""
    project: str = Field(default_factory=default_project)
    """The moonforge project directory (artifact store, .moonforge/, dvc.yaml) on the worker;
    default $MOONFORGE_HOME, else the flow's working directory."""

    @model_validator(mode="after")
    def _check(self) -> LifecycleParams:
        try:
            stages_until(self._load(), self.until)
        except RecipeError as e:  # worded for the CLI flag; here it is the `until` field
            raise ValueError(str(e).replace("--until ", "until ", 1)) from None
        return self


class RerunParams(_Params):
    """Rerun one stage from any upstream artifact (optionally with everything downstream)."""

    recipe: str = "recipes/tiny.yaml"
    """Recipe YAML, relative to `project` (or absolute)."""
    stage: str
    """The stage to rerun, e.g. sft."""
    from_ref: str | None = None
    """Upstream artifact: stage@latest, stage@N, a fingerprint prefix, runs:/<id>,
    models:/<name>@<alias>, models:/<name>/<n> or a path. Default: the recipe chain's latest."""
    downstream: bool = False
    """Also rerun every later stage, each from the artifact just produced."""
    overrides: list[str] = []
    """Recipe overrides, like the CLI's --set: stages.<name>.<field>=value or model.<...>=value."""
    project: str = Field(default_factory=default_project)
    """The moonforge project directory (artifact store, .moonforge/, dvc.yaml) on the worker;
    default $MOONFORGE_HOME, else the flow's working directory."""

    @model_validator(mode="after")
    def _check(self) -> RerunParams:
        recipe = self._load()
        if self.stage not in recipe.stage_names():
            raise ValueError(
                f"stage {self.stage!r} is not in recipe {recipe.name!r}; "
                f"stages are: {', '.join(recipe.stage_names())}"
            )
        return self


@flow(name="lifecycle", persist_result=False, validate_parameters=True)
def lifecycle_deployment(params: LifecycleParams) -> dict[str, dict]:
    """The whole lifecycle, launched from a deployment (UI form, schedule or API)."""
    return lifecycle_flow.fn(
        recipe_path=params.recipe_path(),
        overrides=list(params.overrides),
        until=params.until,
        project=str(Path(params.project).resolve()),
    )


@flow(name="rerun", persist_result=False, validate_parameters=True)
def rerun_deployment(params: RerunParams) -> dict[str, dict]:
    """One stage rerun, launched from a deployment (UI form or API)."""
    return rerun_flow.fn(
        recipe_path=params.recipe_path(),
        stage=params.stage,
        from_ref=params.from_ref,
        overrides=list(params.overrides),
        downstream=params.downstream,
        project=str(Path(params.project).resolve()),
    )


def deployment_names(recipe: Recipe) -> list[str]:
    """ "flow/deployment" names `build_deployments` creates for a recipe, lifecycle first."""
    return [f"lifecycle/{recipe.name}"] + [f"rerun/{recipe.name}-{s}" for s in recipe.stage_names()]


def build_deployments(
    recipe: Recipe,
    recipe_rel: str,
    project: Path,
    *,
    cron: str | None = None,
    timezone: str = "UTC",
    env: dict[str, str] | None = None,
    pool: str | None = WORK_POOL,
) -> list[Any]:
    """RunnerDeployments for the lifecycle and each stage of `recipe`.

    Entrypoints are module paths (`moonforge.flows.deployments.rerun_deployment`), so any worker
    with moonforge installed can load them, wherever its working directory is. With a pool, runs
    start in `project` (job variable working_dir) with `env` (e.g. the MLflow server's URI).
    """
    from prefect.deployments.runner import EntrypointType

    project = project.resolve()
    base = {"recipe": recipe_rel, "overrides": [], "project": str(project)}
    job = {"working_dir": str(project), "env": dict(env or {})} if pool else None
    common: dict[str, Any] = dict(  # keyword arguments of Flow.to_deployment
        entrypoint_type=EntrypointType.MODULE_PATH, job_variables=job, tags=[*TAGS, f"recipe:{recipe.name}"]
    )
    if pool:
        common["work_pool_name"] = pool
    from prefect.schedules import Cron

    schedule: dict[str, Any] = {"schedules": [Cron(cron, timezone=timezone)]} if cron else {}
    out = [
        lifecycle_deployment.to_deployment(
            name=recipe.name,
            parameters={"params": {**base, "until": None}},
            description=f"The whole {recipe.name} lifecycle: {' -> '.join(recipe.stage_names())}.",
            **schedule,
            **common,
        )
    ]
    for s in recipe.stage_names():
        up = recipe.stage(s).upstream
        out.append(
            rerun_deployment.to_deployment(
                name=f"{recipe.name}-{s}",
                parameters={"params": {**base, "stage": s, "from_ref": None, "downstream": False}},
                description=f"Rerun {s} ({recipe.name}) from any upstream artifact"
                + (f" (default: {up}@latest)." if up else " (first stage: no upstream)."),
                **common,
            )
        )
    return out


def ensure_work_pool(name: str = WORK_POOL) -> str:
    """Create the process work pool `name` if the API has none; returns its type. A pool of
    another type (e.g. infra/prefect.yaml's Kubernetes one) is used as it is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    description="moonforge: flow runs as local processes",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
        except ObjectAlreadyExists:  # a starting worker created it meanwhile
            pass
        return client.read_work_pool(name).type


def apply_deployments(deployments: list[Any]) -> list[str]:
    """Register (create or update) each deployment with the Prefect API; returns their ids.

    A pool deployment also gets one pull step, `set_working_directory` to its project: a worker
    then runs each flow run in the project itself. Without a pull step, Prefect 3.8's workers
    (and `prefect flow-run execute` in a Slurm job) copy the deployment's directory, i.e. the
    whole project with its artifact store, data and virtualenv, into a fresh temp workspace for
    every flow run; besides the time and disk, the copy fails when another run writes a
    checkpoint into the project meanwhile (seen: a Slurm rerun crashed on a `.tmp-step-*`
    directory renamed under the copy). The flows read everything through their `project`
    parameter, so the copy served nothing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    ids = []
    with get_client(sync_client=True) as client:
        for d in deployments:
            dep_id = d.apply()
            workdir = (d.job_variables or {}).get("working_dir")
            if workdir:  # apply() resets pull steps, so this follows every apply
                step = {"prefect.deployments.steps.set_working_directory": {"directory": workdir}}
                client.update_deployment(dep_id, DeploymentUpdate(pull_steps=[step]))
            ids.append(str(dep_id))
    return ids

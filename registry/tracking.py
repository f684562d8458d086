"""MLflow tracking: one experiment per recipe, a parent run per lifecycle, a child run per stage.

Embedded default: `sqlite:///<project>/.moonforge/mlflow.db` with artifacts under
`<project>/.moonforge/mlartifacts` ($MLFLOW_TRACKING_URI wins when set; artifacts go to S3 with
$MOONFORGE_MLFLOW_ARTIFACT_ROOT=s3://bucket/prefix). Everything goes through
`MlflowClient` with explicit run ids (no fluent global state, so Prefect threads are safe), and
metrics go in batches (`log_batch`), never one DB round trip per scalar.
mlflow and matplotlib are imported lazily: importing this module is cheap.

Every run is tagged with the host and pid that opened it, so a later run can tell a RUNNING run
whose process died (kill -9, OOM, preemption) from a live one: `reap_dead_runs` ends the dead
ones as KILLED (and `mark_flow_runs_crashed` ends their Prefect flow runs as Crashed).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moonforge.registry.lease import process_alive, this_process
from moonforge.stages.artifacts import DatasetRef, ListSink

log = logging.getLogger("moonforge.tracking")

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY = 250
TAG = "moonforge."


def tracking_uri(project: str | Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(project).resolve() / '.moonforge' / 'mlflow.db'}"


ARTIFACT_ROOT_ENV = "MOONFORGE_MLFLOW_ARTIFACT_ROOT"
"""Where new experiments keep their artifacts, e.g. s3://bucket/mlflow (MLflow's S3 artifact
repository: endpoint from MLFLOW_S3_ENDPOINT_URL or AWS_ENDPOINT_URL, credentials from the AWS
environment). Unset: `.moonforge/mlartifacts` with the embedded SQLite backend, the server's
--default-artifact-root with a tracking server."""


def artifact_root(project: str | Path) -> str:
    return (
        os.environ.get(ARTIFACT_ROOT_ENV) or (Path(project).resolve() / ".moonforge" / "mlartifacts").as_uri()
    )


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> {"a.b.c": str(value)}; lists stay one JSON value; safe lengths."""
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    val = obj if isinstance(obj, str) else json.dumps(obj, default=str)
    if len(val) > MAX_PARAM_VALUE:
        val = val[: MAX_PARAM_VALUE - 3] + "..."
    out[prefix[:MAX_KEY]] = val
    return out


def _chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class BatchedMlflowSink(ListSink):
    """A MetricSink that buffers metrics and writes them with `MlflowClient.log_batch`.

    Flushes every `every` logged steps and on `flush()`; keeps the rows (ListSink) for the loss
    curve and the CLI summary.
    """

    def __init__(self, client: Any, run_id: str, every: int = 50):
        super().__init__()
        self.client, self.run_id, self.every = client, run_id, every
        self._buffer: list = []
        self._steps = 0
        self.num_batches = 0

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        super().log(step, metrics)
        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, int(step)) for k, v in metrics.items())
        self._steps += 1
        if self._steps >= self.every:
            self.flush()

    def flush(self) -> None:
        for chunk in _chunks(self._buffer, 1000):
            self.client.log_batch(self.run_id, metrics=chunk)
            self.num_batches += 1
        self._buffer, self._steps = [], 0


class StageRun:
    """Handle on one child run: its id and its metric sink."""

    def __init__(self, run_id: str | None, sink: Any):
        self.run_id, self.sink = run_id, sink


class NullTracker:
    """Tracking switched off: same interface, records nothing."""

    parent_run_id: str | None = None

    def start_lifecycle(self, recipe: Any, flow_run_id: str | None = None) -> str | None:
        return None

    def end_lifecycle(self, status: str = "FINISHED") -> None:
        pass

    def start_stage(self, **kw: Any) -> StageRun:
        return StageRun(None, ListSink())

    def finish_stage(self, run: StageRun, **kw: Any) -> None:
        pass

    def fail_stage(self, run: StageRun, exc: BaseException) -> None:
        pass

    def log_cache_hit(self, **kw: Any) -> str | None:
        return None

    def tag(self, run_id: str | None, tags: Mapping[str, str]) -> None:
        pass

    def reap_dead_runs(self) -> list[dict]:
        return []

    def kill_runs(self, run_ids: Iterable[str | None], reason: str) -> list[str]:
        return []


def _owner_tags() -> dict[str, str]:
    me = this_process()
    return {
        TAG + "host": str(me["host"]),
        TAG + "pid": str(me["pid"]),
        TAG + "pid_start": str(me["pid_start"] or ""),
    }


class Tracker:
    """MLflow for one recipe (= experiment); optionally nested under a lifecycle parent run."""

    def __init__(
        self,
        project: str | Path,
        recipe_name: str,
        parent_run_id: str | None = None,
        uri: str | None = None,
        flush_every: int = 50,
    ):
        self.project = Path(project).resolve()
        self.recipe_name = recipe_name
        self.parent_run_id = parent_run_id
        self.uri = uri or tracking_uri(project)
        self.flush_every = flush_every
        self._client = None
        self._experiment_id: str | None = None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(self.uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.recipe_name)
            if exp is not None:
                self._experiment_id = exp.experiment_id
                wanted = os.environ.get(ARTIFACT_ROOT_ENV)
                if wanted and not exp.artifact_location.startswith(wanted.rstrip("/")):
                    # MLflow fixes an experiment's artifact location when it is created
                    warnings.warn(
                        f"{ARTIFACT_ROOT_ENV}={wanted} is ignored for experiment "
                        f"{self.recipe_name!r}, created earlier with artifacts at "
                        f"{exp.artifact_location}; rename or delete that experiment to "
                        "move its new artifacts",
                        stacklevel=2,
                    )
            else:
                from mlflow.exceptions import MlflowException

                loc = (
                    artifact_root(self.project)
                    if self.uri.startswith("sqlite:") or os.environ.get(ARTIFACT_ROOT_ENV)
                    else None
                )
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.recipe_name, artifact_location=loc
                    )
                except MlflowException:  # another process created it first
                    self._experiment_id = self.client.get_experiment_by_name(self.recipe_name).experiment_id
        return self._experiment_id

    # -- the lifecycle parent run ------------------------------------------------------------
    def start_lifecycle(self, recipe: Any, flow_run_id: str | None = None) -> str:
        """Open the parent run; stage runs started afterwards nest under it."""
        from mlflow.entities import Param

        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{recipe.name}-lifecycle",
            tags={
                TAG + "recipe": recipe.name,
                TAG + "recipe_digest": recipe.digest(),
                TAG + "prefect_flow_run_id": str(flow_run_id or ""),
                TAG + "kind": "lifecycle",
                **_owner_tags(),
            },
        )
        self.parent_run_id = run.info.run_id
        params = flatten({"model": recipe.model.model_dump(mode="json")})
        params["stages"] = ",".join(recipe.stage_names())
        for chunk in _chunks([Param(k, v) for k, v in params.items()], 100):
            self.client.log_batch(self.parent_run_id, params=chunk)
        from moonforge.stages.recipe import recipe_to_yaml

        self.client.log_text(self.parent_run_id, recipe_to_yaml(recipe), "recipe.yaml")
        return self.parent_run_id

    def end_lifecycle(self, status: str = "FINISHED") -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status)

    # -- per-stage child runs ------------------------------------------------------------------
    def _create_stage_run(
        self,
        stage: str,
        kind: str,
        cfg: Any,
        fingerprint: str,
        upstream: str | None,
        datasets: Mapping[str, DatasetRef],
        recipe_digest: str,
        flow_run_id: str | None,
        cache_hit: bool,
    ) -> str:
        from mlflow.entities import DatasetInput, InputTag, Param

        from moonforge.registry.lineage import git_info

        tags = {
            TAG + "stage": stage,
            TAG + "kind": kind,
            TAG + "fingerprint": fingerprint,
            TAG + "cache_hit": str(cache_hit).lower(),
            TAG + "git_commit": str(git_info(self.project).get("commit") or ""),
            TAG + "recipe": self.recipe_name,
            TAG + "recipe_digest": recipe_digest,
            TAG + "upstream": upstream or "",
            TAG + "prefect_flow_run_id": str(flow_run_id or ""),
            **_owner_tags(),
        }
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run_id = self.client.create_run(self.experiment_id, run_name=stage, tags=tags).info.run_id
        params = flatten(cfg.model_dump(mode="json"))
        for chunk in _chunks([Param(k, v) for k, v in params.items()], 100):
            self.client.log_batch(run_id, params=chunk)
        if datasets:
            self.client.log_inputs(
                run_id,
                datasets=[
                    DatasetInput(_dataset_entity(d), [InputTag("mlflow.data.context", "train")])
                    for d in datasets.values()
                ],
            )
        return run_id

    def start_stage(
        self,
        *,
        stage: str,
        kind: str,
        cfg: Any,
        fingerprint: str,
        upstream: str | None,
        datasets: Mapping[str, DatasetRef],
        recipe_digest: str,
        flow_run_id: str | None = None,
    ) -> StageRun:
        run_id = self._create_stage_run(
            stage, kind, cfg, fingerprint, upstream, datasets, recipe_digest, flow_run_id, cache_hit=False
        )
        return StageRun(run_id, BatchedMlflowSink(self.client, run_id, self.flush_every))

    def finish_stage(
        self, run: StageRun, *, version: int, metrics: Mapping[str, float], artifact_dir: Path
    ) -> None:
        """Summary metrics, loss curve, lineage.json, version tag; mark the run FINISHED."""
        from mlflow.entities import Metric, RunTag

        try:
            run.sink.flush()
            ts = int(time.time() * 1000)
            step = max((s for s, _ in getattr(run.sink, "rows", [])), default=0)
            self.client.log_batch(
                run.run_id,
                metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()],
                tags=[
                    RunTag(TAG + "version", str(version)),
                    RunTag(TAG + "artifact_path", str(artifact_dir)),
                ],
            )
            with tempfile.TemporaryDirectory(prefix="moonforge-plot-") as tmp:
                png = _loss_curve(getattr(run.sink, "rows", []), Path(tmp))
                if png is not None:
                    self.client.log_artifact(run.run_id, str(png), "plots")
            for plot in sorted(artifact_dir.glob("*.png")):  # the stage's own (rl_curves.png, ...)
                self.client.log_artifact(run.run_id, str(plot), "plots")
            if (artifact_dir / "lineage.json").exists():
                self.client.log_artifact(run.run_id, str(artifact_dir / "lineage.json"))
        except BaseException:
            self.client.set_terminated(run.run_id, "FAILED")
            raise
        self.client.set_terminated(run.run_id, "FINISHED")

    def fail_stage(self, run: StageRun, exc: BaseException) -> None:
        from mlflow.entities import RunTag

        try:
            run.sink.flush()
        except Exception:  # the failure being reported matters more than late metrics
            pass
        self.client.log_batch(run.run_id, tags=[RunTag(TAG + "error", f"{type(exc).__name__}: {exc}"[:5000])])
        self.client.set_terminated(run.run_id, "FAILED")

    def log_cache_hit(
        self,
        *,
        stage: str,
        kind: str,
        cfg: Any,
        fingerprint: str,
        upstream: str | None,
        datasets: Mapping[str, DatasetRef],
        recipe_digest: str,
        version: int,
        metrics: Mapping[str, float],
        artifact_dir: Path,
        flow_run_id: str | None = None,
    ) -> str:
        """A child run tagged cache_hit=true carrying the cached artifact's metrics."""
        run_id = self._create_stage_run(
            stage, kind, cfg, fingerprint, upstream, datasets, recipe_digest, flow_run_id, cache_hit=True
        )
        self.finish_stage(
            StageRun(run_id, ListSink()), version=version, metrics=metrics, artifact_dir=artifact_dir
        )
        return run_id

    # -- runs whose process died ---------------------------------------------------------------
    def tag(self, run_id: str | None, tags: Mapping[str, str]) -> None:
        """Set moonforge.<key> tags on a run."""
        from mlflow.entities import RunTag

        if run_id:
            self.client.log_batch(run_id, tags=[RunTag(TAG + k, str(v)[:5000]) for k, v in tags.items()])

    def reap_dead_runs(self) -> list[dict]:
        """End as KILLED every RUNNING run of this experiment opened by a process of this host
        that is gone. Returns {"run_id", "kind", "prefect_flow_run_id"} of each run ended."""
        runs = self.client.search_runs(
            [self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000
        )
        dead = []
        for r in runs:
            t = r.data.tags
            owner = {
                "host": t.get(TAG + "host"),
                "pid": t.get(TAG + "pid"),
                "pid_start": t.get(TAG + "pid_start") or None,
            }
            if owner["pid"] and process_alive(owner) is False:
                dead.append(r)
        ended = self.kill_runs(
            [r.info.run_id for r in dead],
            "its process (pid {pid} on {host}) died without ending it (killed, out of memory or preempted)",
            {r.info.run_id: r.data.tags for r in dead},
        )
        return [
            {
                "run_id": r.info.run_id,
                "kind": r.data.tags.get(TAG + "kind", ""),
                "prefect_flow_run_id": r.data.tags.get(TAG + "prefect_flow_run_id", ""),
            }
            for r in dead
            if r.info.run_id in ended
        ]

    def kill_runs(
        self, run_ids: Iterable[str | None], reason: str, tags: Mapping[str, Mapping[str, str]] | None = None
    ) -> list[str]:
        """End the given runs as KILLED if they are still RUNNING, recording why
        (`reason` may use {pid} and {host} from each run's tags). Returns the ids ended."""
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        ended = []
        for run_id in dict.fromkeys(r for r in run_ids if r):
            try:
                run = self.client.get_run(run_id)
            except MlflowException:
                continue
            if run.info.status != "RUNNING":
                continue
            t = (tags or {}).get(run_id) or run.data.tags
            why = reason.format(pid=t.get(TAG + "pid", "?"), host=t.get(TAG + "host", "?"))
            self.client.log_batch(run_id, tags=[RunTag(TAG + "end_reason", why[:5000])])
            self.client.set_terminated(run_id, "KILLED")
            ended.append(run_id)
            log.warning(
                "MLflow run %s (%s) marked KILLED: %s", run_id, run.data.tags.get("mlflow.runName", "?"), why
            )
        return ended


OWNED_TAG = "moonforge-owned"
OWNER_TAG = "moonforge-owner:"


def owner_tags() -> list[str]:
    """Prefect flow-run tags naming this process, so a later run can tell its flow run died:
    ["moonforge-owned", "moonforge-owner:<host>:<pid>:<pid start>"]."""
    me = this_process()
    return [OWNED_TAG, f"{OWNER_TAG}{me['host']}:{me['pid']}:{me['pid_start'] or ''}"]


def reap_dead_flow_runs(reason: str) -> list[str]:
    """Crash every pending/running Prefect flow run tagged by `owner_tags` of a process of this
    host that is gone (even one killed before it opened any MLflow run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    flt = FlowRunFilter(
        tags=FlowRunFilterTags(all_=[OWNED_TAG]),
        state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED])
        ),
    )
    dead = []
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=flt, limit=200)
    except Exception as e:
        log.warning("could not list Prefect flow runs to find dead ones: %s", e)
        return []
    for fr in runs:
        owner = next((t[len(OWNER_TAG) :] for t in fr.tags if t.startswith(OWNER_TAG)), None)
        if owner is None:
            continue
        host, pid, start = owner.rsplit(":", 2)
        if process_alive({"host": host, "pid": pid, "pid_start": start or None}) is False:
            dead.append(str(fr.id))
    return mark_flow_runs_crashed(dead, reason)


def mark_flow_runs_crashed(flow_run_ids: Iterable[str | None], reason: str) -> list[str]:
    """Set Prefect flow runs that are still running (their process died) to Crashed, through
    the Prefect API this process uses. Returns the ids changed; errors are logged, not raised."""
    ids = [i for i in dict.fromkeys(flow_run_ids) if i]
    if not ids:
        return []
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    done = []
    try:
        with get_client(sync_client=True) as client:
            for fid in ids:
                try:
                    fr = client.read_flow_run(UUID(fid))
                except Exception:
                    continue
                if fr.state is None or fr.state.is_final():
                    continue
                client.set_flow_run_state(fid, Crashed(message=reason), force=True)
                done.append(fid)
    except Exception as e:  # the stage itself does not depend on this bookkeeping
        log.warning("could not mark dead Prefect flow runs %s as Crashed: %s", ids, e)
    return done


def _dataset_entity(d: DatasetRef):
    """An mlflow.data dataset: name, DVC md5 as digest, the local path as source."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(d.path))
    # mlflow's MetaDataset leaves Dataset.profile abstract but is meant to be built directly
    # (Dataset is no ABC, so nothing is enforced at runtime)
    meta = MetaDataset(source=source, name=d.name, digest=d.digest[:36])  # type: ignore[abstract]
    return meta._to_mlflow_entity()


def _loss_curve(rows: list[tuple[int, dict[str, float]]], out_dir: Path) -> Path | None:
    """A PNG of every *loss* series against step, or None when nothing was logged."""
    names = sorted({k for _, m in rows for k in m if "loss" in k})
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n in names:
        pts = [(s, m[n]) for s, m in rows if n in m]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=n)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = out_dir / "loss_curve.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out

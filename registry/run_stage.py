"""run_stage: everything around a stage function, done once.

upstream artifact -> datasets (DVC) -> fingerprint -> cache lookup (the store is the truth) ->
lease on the fingerprint (a second run of the same inputs waits, then reuses the first's result)
-> stage function into a staging dir -> lineage.json -> atomic commit -> MLflow child run.
On failure nothing becomes visible, the MLflow run is marked FAILED and `StageFailed` (naming the
stage, the original exception as its cause) is raised.

Crashes: the stage's periodic checkpoints go straight to the store's work dir of its fingerprint
(`<stage>/.partial-<fp16>/train_state`, linked into the staging dir), so whatever ends a run
(an exception, kill -9, OOM, preemption) a rerun with the same fingerprint resumes from the last
complete one and says so; on an S3 store the lease's heartbeat also uploads each new one. The
rerun garbage-collects the dead run's staging dir and ends the MLflow runs it left RUNNING as
KILLED (its Prefect flow run as Crashed).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moonforge.registry.data_versions import ensure_datasets, read_lock
from moonforge.registry.errors import ArtifactNotFound, DatasetError, StageFailed
from moonforge.registry.fingerprint import code_version, fingerprint, fingerprint_inputs
from moonforge.registry.launch import stage_runner
from moonforge.registry.lease import Heartbeat, Lease, lease_ttl_s
from moonforge.registry.lineage import build_lineage
from moonforge.registry.stage_inputs import (
    TOKENIZER,
    expected_init,
    expected_tokenizer_digest,
    init_record,
    resolve_init,
    tokenizer_dataset,
)
from moonforge.registry.store import TRAIN_STATE_DIR, ArtifactInfo, ArtifactStore, open_store
from moonforge.stages import catalog
from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.recipe import Recipe
from moonforge.stages.train.host_memory import keep_freed_memory
from moonforge.stages.train.train_record import read_train_record

log = logging.getLogger("moonforge.registry")

StageProgress = Callable[[str, int, int, str], None]
"""progress(stage, done, total, description)."""

UNBUILT = "unbuilt"
"""Digest placeholder for a dataset that dvc.lock does not pin yet (only in expected chains)."""


@dataclass(frozen=True)
class StageOutcome:
    """What one stage execution (or cache hit) produced."""

    stage: str
    ref: str
    version: int
    fingerprint: str
    cache_hit: bool
    metrics: dict[str, float] = field(default_factory=dict)
    path: str = ""
    wall_s: float = 0.0
    mlflow_run_id: str | None = None
    resumed_from: str | None = None
    """The periodic checkpoint an unfinished earlier run left that this one continued from."""
    waited_for: str | None = None
    """Another run building the same fingerprint that this one waited for (then reused)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_chain(
    recipe: Recipe, project: str | Path, digests: Mapping[str, str] | None = None
) -> dict[str, tuple[dict, str]]:
    """stage name -> (inputs, fingerprint) the recipe implies today, for every stage.

    Data digests come from dvc.lock (unpinned datasets count as "unbuilt"); upstream fingerprints
    are the expected ones, so this needs no store and builds nothing.
    """
    if digests is None:
        try:
            digests = {n: d.digest for n, d in read_lock(project).items()}
        except DatasetError:
            digests = {}
    out: dict[str, tuple[dict, str]] = {}
    store = external_store(recipe, project)
    tok = expected_tokenizer_digest(recipe, store, project) if store is not None else None
    digests = {**digests, TOKENIZER: tok} if tok is not None else digests
    for cfg in recipe.stages:
        up = (cfg.upstream, out[cfg.upstream][1]) if cfg.upstream else None
        inputs = fingerprint_inputs(
            cfg,
            recipe.model,
            up,
            {n: digests.get(n, UNBUILT) for n in cfg.data},
            code_version(cfg.kind),
            init=expected_init(cfg, store, project) if store else None,
        )
        out[cfg.stage_name] = (inputs, fingerprint(inputs))
    return out


def external_store(recipe: Recipe, project: str | Path) -> ArtifactStore | None:
    """The store, opened only when the recipe has inputs from outside its chain (init:, an
    imported tokenizer): plain recipes compute expected fingerprints without touching it."""
    if recipe.tokenizer is None and all(getattr(c, "init", None) is None for c in recipe.stages):
        return None
    return open_store(project)


def resolve_upstream(
    recipe: Recipe,
    stage_name: str,
    project: str | Path,
    store: ArtifactStore,
    upstream_ref: str | None = None,
) -> tuple[ArtifactInfo | None, str]:
    """The upstream artifact of `stage_name` and how it was chosen.

    An explicit ref wins. Otherwise: the upstream stage's artifact whose fingerprint matches what
    the recipe implies now, else its @latest (noted, since it may come from other settings).
    """
    cfg = recipe.stage(stage_name)
    if upstream_ref is not None:
        from moonforge.registry.refs import resolve_ref

        if cfg.upstream is None:
            raise ArtifactNotFound(
                f"--from {upstream_ref}: stage {stage_name!r} starts from scratch (upstream: null "
                f"in recipe {recipe.name!r}), so it takes no upstream artifact; drop --from"
            )
        info = resolve_ref(upstream_ref, store, project)
        note = check_upstream_kind(recipe, stage_name, upstream_ref, info, store)
        return info, f"explicit ({upstream_ref}{'; ' + note if note else ''})"
    if cfg.upstream is None:
        return None, "none"
    want = expected_chain(recipe, project)[cfg.upstream][1]
    hit = store.lookup(cfg.upstream, want)
    if hit is not None:
        return hit, "recipe chain"
    latest = store.latest(cfg.upstream)
    if latest is None:
        raise ArtifactNotFound(
            f"stage {stage_name!r} needs an artifact of its upstream {cfg.upstream!r}, and the "
            f"store has none (existing: {store.describe()}); run `moonforge run --until "
            f"{cfg.upstream}` first, or pass --from REF"
        )
    log.warning(
        "%s: no %s artifact matches the recipe's chain; using %s", stage_name, cfg.upstream, latest.ref
    )
    return latest, f"latest ({latest.ref}; no artifact matched the recipe chain)"


def check_upstream_kind(
    recipe: Recipe, stage_name: str, ref: str, info: ArtifactInfo, store: ArtifactStore
) -> str:
    """Refuse an explicit upstream that is not on the stage's upstream chain (e.g. `rerun sft
    --from rl@1`, a later stage, or the stage itself): the stage would start from a checkpoint
    from the wrong point of the lifecycle. An earlier ancestor is allowed (an ablation that
    skips stages, e.g. sft from cooldown): returns a note naming what is skipped, else "".
    """
    from moonforge.registry.refs import artifact_kind

    chain = []  # the upstream, its upstream, ... back to the first stage
    name = recipe.stage(stage_name).upstream
    while name is not None:
        chain.append(recipe.stage(name))
        name = chain[-1].upstream
    got = artifact_kind(info)
    if got == "import":  # external weights: any stage may start from a whole imported VLM
        from moonforge.stages.artifacts import MODEL_CONFIG_FILE

        if not (info.path / MODEL_CONFIG_FILE).is_file():
            raise ArtifactNotFound(
                f"--from {ref}: {info.ref} is an import of only some parts of a model; a stage "
                f"starts from a whole VLM. Use it through the recipe's init: (e.g. init: "
                f"{{lm: {info.ref}}}) on a stage with upstream: null"
            )
        return f"external import {info.ref}"
    for i, st in enumerate(chain):
        if info.stage == st.stage_name or got == st.kind:
            skipped = [c.stage_name for c in chain[:i]]
            return f"skips {', '.join(reversed(skipped))}" if skipped else ""
    up = chain[0]
    have = ", ".join(a.ref for a in store.versions(up.stage_name)[-3:]) or "none yet"
    raise ArtifactNotFound(
        f"--from {ref}: resolves to {info.ref}, a {got} artifact, but stage {stage_name!r} starts "
        f"from its upstream {up.stage_name!r} (kind {up.kind}) or an earlier stage of its chain "
        f"({', '.join(c.stage_name for c in chain[1:]) or 'none'}); pass a {up.stage_name} ref "
        f"(e.g. {up.stage_name}@latest; recent: {have})"
    )


def _no_progress(stage: str, done: int, total: int, desc: str) -> None:
    pass


@dataclass(frozen=True)
class _Job:
    """One stage execution, fully resolved: what goes into the fingerprint and where it came from."""

    recipe: Recipe
    cfg: Any
    project: Path
    store: ArtifactStore
    upstream: ArtifactInfo | None
    how: str
    datasets: dict[str, DatasetRef]
    inputs: dict
    fingerprint: str
    flow_run_id: str | None
    init: dict[str, ArtifactInfo] = field(default_factory=dict)
    """The recipe's init: parts, resolved."""

    @property
    def name(self) -> str:
        return self.cfg.stage_name

    def tracking_fields(self) -> dict[str, Any]:
        return dict(
            stage=self.name,
            kind=self.cfg.kind,
            cfg=self.cfg,
            fingerprint=self.fingerprint,
            upstream=self.upstream.ref if self.upstream else None,
            datasets=self.datasets,
            recipe_digest=self.recipe.digest(),
            flow_run_id=self.flow_run_id,
        )


def run_stage(
    recipe: Recipe,
    stage_name: str,
    project: str | Path,
    upstream_ref: str | None = None,
    *,
    tracker: Any = None,
    progress: StageProgress | None = None,
    store: ArtifactStore | None = None,
    flow_run_id: str | None = None,
) -> StageOutcome:
    """Run (or reuse) one stage of `recipe` and return its committed artifact.

    upstream_ref: any ref the store resolves (default: see `resolve_upstream`). tracker: a
    registry.tracking.Tracker (default: MLflow for this project and recipe, nested under
    tracker.parent_run_id when set) or NullTracker(). Raises RecipeError / ArtifactNotFound /
    DatasetError / StageNotAvailable before anything runs, StageFailed when the stage raises.
    """
    t0 = time.time()
    project = Path(project).resolve()
    cfg = recipe.stage(stage_name)
    store = store or open_store(project)
    if tracker is None:
        from moonforge.registry.tracking import Tracker

        tracker = Tracker(project, recipe.name)
    upstream, how = resolve_upstream(recipe, stage_name, project, store, upstream_ref)
    init = resolve_init(cfg, store, project)
    tok = tokenizer_dataset(recipe, store, project) if TOKENIZER in cfg.data else None
    datasets = ensure_datasets(project, [n for n in cfg.data if tok is None or n != TOKENIZER])
    if tok is not None:
        datasets = {n: (tok if n == TOKENIZER else datasets[n]) for n in cfg.data}
    inputs = fingerprint_inputs(
        cfg,
        recipe.model,
        (upstream.stage, upstream.fingerprint) if upstream else None,
        {n: d.digest for n, d in datasets.items()},
        code_version(cfg.kind),
        init=init_record(init),
    )
    job = _Job(
        recipe, cfg, project, store, upstream, how, datasets, inputs, fingerprint(inputs), flow_run_id, init
    )
    progress = progress or _no_progress
    _collect_garbage(store, job.name)
    hit = store.lookup(job.name, job.fingerprint)
    if hit is not None:
        return _cache_hit(job, hit, tracker, progress, t0)
    waited: list[dict] = []
    lease = store.lease(job.name, job.fingerprint, wait=lambda h: _waiting(job, h, waited, progress))
    try:
        if waited:  # the holder we waited for may have died: clear what it left
            _collect_garbage(store, job.name)
        hit = store.lookup(job.name, job.fingerprint)  # the run we waited for committed it
        who = _who(waited[-1]) if waited else None
        if hit is not None:
            if who:
                log.warning("%s: %s finished building this fingerprint; reusing %s", job.name, who, hit.ref)
            return _cache_hit(job, hit, tracker, progress, t0, waited_for=who)
        _close_dead_holder(job, lease, tracker)
        info, metrics, run_id, resumed = _execute(job, tracker, progress, lease)
    finally:
        lease.release()
    return StageOutcome(
        job.name,
        info.ref,
        info.version,
        job.fingerprint,
        False,
        metrics,
        str(info.path),
        time.time() - t0,
        run_id,
        resumed,
        who,
    )


def _cache_hit(
    job: _Job,
    hit: ArtifactInfo,
    tracker: Any,
    progress: StageProgress,
    t0: float,
    waited_for: str | None = None,
) -> StageOutcome:
    metrics = hit.lineage().get("metrics") or {}
    run_id = tracker.log_cache_hit(
        **job.tracking_fields(), version=hit.version, metrics=metrics, artifact_dir=hit.path
    )
    progress(job.name, 1, 1, "cached")
    return StageOutcome(
        job.name,
        hit.ref,
        hit.version,
        job.fingerprint,
        True,
        metrics,
        str(hit.path),
        time.time() - t0,
        run_id,
        waited_for=waited_for,
    )


def _who(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


def _waiting(job: _Job, holder: dict, waited: list[dict], progress: StageProgress) -> None:
    if not waited:
        log.warning(
            "%s: another run (%s) is building this fingerprint (%s); waiting for it to "
            "finish, then reusing its artifact",
            job.name,
            _who(holder),
            job.fingerprint[:12],
        )
        progress(job.name, 0, 1, f"waiting for {_who(holder)}")
    waited.append(holder)


def _collect_garbage(store: ArtifactStore, stage: str) -> None:
    """Remove what dead runs left in the stage's store dir (never a live run's files)."""
    try:
        removed = store.gc(stage)
    except Exception as e:  # housekeeping must not fail a stage
        log.warning("%s: could not clean up after dead runs (%s: %s)", stage, type(e).__name__, e)
        return
    if removed:
        log.info("%s: removed what dead runs left: %s", stage, ", ".join(p.name for p in removed))


def _close_dead_holder(job: _Job, lease: Lease, tracker: Any) -> None:
    """A holder that died holding the lease: end its MLflow runs as KILLED, its flow run Crashed."""
    prev = lease.previous
    if not prev:
        return
    why = (
        f"its process ({_who(prev)}) died while building {job.name} fingerprint "
        f"{job.fingerprint[:12]}; a later run took over"
    )
    try:
        tracker.kill_runs([prev.get("mlflow_run_id"), prev.get("mlflow_parent_run_id")], why)
        if job.flow_run_id and prev.get("prefect_flow_run_id") not in (None, "", job.flow_run_id):
            from moonforge.registry.tracking import mark_flow_runs_crashed

            mark_flow_runs_crashed([prev["prefect_flow_run_id"]], why)
    except Exception as e:
        log.warning("%s: could not close the dead run's records (%s: %s)", job.name, type(e).__name__, e)


def _execute(
    job: _Job, tracker: Any, progress: StageProgress, lease: Lease
) -> tuple[ArtifactInfo, dict, str | None, str | None]:
    """Call the stage function into a staging dir and commit it; on any failure abort + FAILED.
    Returns (artifact, metrics, MLflow run id, the checkpoint resumed from or None)."""
    fn = stage_runner(catalog.stage_function(job.cfg.kind), job.cfg)  # in process or launched
    keep_freed_memory()  # an in-process stage trains here (launched ranks do it themselves)
    store = job.store
    resume = store.resume_point(job.name, job.fingerprint)
    ckpts = store.work_dir(job.name, job.fingerprint) / TRAIN_STATE_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    staging = store.begin(job.name)
    (staging / TRAIN_STATE_DIR).symlink_to(ckpts, target_is_directory=True)
    try:
        run = tracker.start_stage(**job.tracking_fields())
        lease.update(
            mlflow_run_id=run.run_id,
            mlflow_parent_run_id=tracker.parent_run_id,
            prefect_flow_run_id=job.flow_run_id,
        )
    except BaseException:
        store.abort(staging)
        raise
    total = [job.cfg.steps]

    def report(done: int, of: int, desc: str) -> None:
        total[0] = of
        progress(job.name, done, of, desc)

    resumed = _announce_resume(job, resume, run.run_id, lease, tracker, progress)
    ctx = StageContext(
        out=staging,
        model=job.recipe.model,
        sink=run.sink,
        progress=report,
        resume_from=resume,
        init={p: a.path for p, a in job.init.items()},
    )
    started = time.time()
    beat = Heartbeat(
        lease, min(5.0, lease_ttl_s() / 3), also=lambda: store.sync_partial(job.name, job.fingerprint)
    )
    try:
        with beat:
            result = fn(Checkpoint(job.upstream.path) if job.upstream else None, job.datasets, job.cfg, ctx)
            if not isinstance(result, StageResult):
                raise TypeError(
                    f"stage function for {job.cfg.kind!r} returned {type(result).__name__}, not a StageResult"
                )
            if not Path(result.checkpoint.path).resolve().is_relative_to(staging.resolve()):
                raise ValueError(
                    f"stage {job.name!r} returned a checkpoint at "
                    f"{result.checkpoint.path}, outside its output dir "
                    f"ctx.out={staging}"
                )
            run.sink.flush()
            _unlink_checkpoints(staging)
            fields = _lineage_fields(job, result, ctx, run.run_id, started, time.time())
            info = store.commit(
                staging,
                job.fingerprint,
                job.inputs,
                sidecars=lambda v: {"lineage.json": build_lineage(version=v, **fields)},
            )
    except BaseException as e:
        _unlink_checkpoints(staging)
        kept = _keep_checkpoints(job)
        store.abort(staging, keep=os.environ.get("MOONFORGE_KEEP_FAILED") == "1")
        if kept is not None:
            e.add_note(f"last good checkpoint kept at {kept}; rerunning the same stage resumes from it")
        try:
            tracker.fail_stage(run, e)
        except Exception:  # keep the stage's error, not a tracking one
            log.exception("could not mark the MLflow run of %s as FAILED", job.name)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise StageFailed(job.name, e) from e
    store.drop_partial(job.name, job.fingerprint)
    tracker.finish_stage(run, version=info.version, metrics=result.metrics, artifact_dir=info.path)
    progress(job.name, total[0], total[0], "done")
    return info, dict(result.metrics), run.run_id, resumed


def _announce_resume(
    job: _Job, resume: Path | None, run_id: str | None, lease: Lease, tracker: Any, progress: StageProgress
) -> str | None:
    """Say (log, progress bar, MLflow tags) that this run continues an unfinished one."""
    if resume is None:
        return None
    rec = read_train_record(resume)
    resumed = f"{rec.describe()} at {resume}"
    log.warning(
        "%s: resuming from the last periodic checkpoint an unfinished run left: %s", job.name, resumed
    )
    tags = {"resumed_from": resumed}
    if lease.previous and lease.previous.get("mlflow_run_id"):
        tags["resumed_from_run"] = str(lease.previous["mlflow_run_id"])
    try:
        tracker.tag(run_id, tags)
    except Exception as e:
        log.warning("%s: could not tag the MLflow run with the resume point: %s", job.name, e)
    progress(job.name, rec.global_step, job.cfg.steps, f"resumed at {rec.describe()}")
    return resumed


def _unlink_checkpoints(staging: Path) -> None:
    """Take the link to the work dir out of the staging dir (the artifact is the final weights)."""
    link = staging / TRAIN_STATE_DIR
    if link.is_symlink():
        link.unlink()
    elif link.is_dir():  # a stage replaced the link with a directory of its own
        shutil.rmtree(link, ignore_errors=True)


def _keep_checkpoints(job: _Job) -> Path | None:
    """After a failure: the last complete checkpoint, uploaded if the store is remote."""
    try:
        job.store.sync_partial(job.name, job.fingerprint)
    except Exception as e:  # often the store itself is what failed
        log.warning(
            "%s: could not upload the last checkpoint (%s: %s); it stays in %s",
            job.name,
            type(e).__name__,
            e,
            job.store.work_dir(job.name, job.fingerprint),
        )
    from moonforge.stages.train.train_record import latest_checkpoint

    return latest_checkpoint(job.store.work_dir(job.name, job.fingerprint) / TRAIN_STATE_DIR)


def _lineage_fields(
    job: _Job, result: StageResult, ctx: StageContext, run_id: str | None, started: float, ended: float
) -> dict[str, Any]:
    up = job.upstream
    return dict(
        stage=job.name,
        kind=job.cfg.kind,
        fingerprint=job.fingerprint,
        config=job.cfg.model_dump(mode="json"),
        model=job.recipe.model.model_dump(mode="json"),
        upstream=None
        if up is None
        else {
            "stage": up.stage,
            "version": up.version,
            "ref": up.ref,
            "fingerprint": up.fingerprint,
            "path": str(up.path),
            "resolution": job.how,
        },
        datasets=[
            {"name": d.name, "path": str(d.path), "digest": d.digest, "read": d.name in result.data_used}
            for d in job.datasets.values()
        ],
        project=job.project,
        recipe={"name": job.recipe.name, "digest": job.recipe.digest()},
        metrics=result.metrics,
        started=started,
        ended=ended,
        device=ctx.device,
        world_size=job.cfg.launcher.world_size,
        mlflow_run_id=run_id,
        prefect_flow_run_id=job.flow_run_id,
        code_version=job.inputs["code"],
        init={
            p: {"ref": a.ref, "fingerprint": a.fingerprint, "path": str(a.path)} for p, a in job.init.items()
        },
    )


def stage_status(
    recipe: Recipe, project: str | Path, store: ArtifactStore | None = None
) -> list[dict[str, Any]]:
    """Per stage: {"stage", "state": fresh|stale|missing, "ref", "reasons", "changed", "partial"}
    against the store.

    fresh: an artifact with the fingerprint the recipe implies exists. stale: the stage has
    versions but none matches; reasons = explain_diff(latest version's inputs, expected inputs),
    upstream fingerprints named as versions, changed modules named for code; "changed" = the
    input kinds behind the reasons (config, model, upstream, data, code). missing: no version at
    all. "partial": resumable work of an unfinished run of the expected fingerprint (its last
    checkpoint's phase and step, and "running": the live run building it, if any), else None.
    """
    from moonforge.registry.fingerprint import explain_diff, reason_kind

    store = store or open_store(project)
    name_fp = fp_namer(store)
    rows: list[dict[str, Any]] = []
    for name, (inputs, fp) in expected_chain(recipe, project).items():
        unbuilt = [n for n, d in inputs["data"].items() if d == UNBUILT]
        hit = store.lookup(name, fp)
        latest = store.latest(name)
        if hit is not None:
            assert latest is not None  # the store holds at least `hit`
            rows.append(
                {
                    "stage": name,
                    "state": "fresh",
                    "ref": hit.ref,
                    "fingerprint": fp,
                    "changed": [],
                    "reasons": []
                    if hit.version == latest.version
                    else [f"latest is {latest.ref}, but {hit.ref} matches the recipe"],
                }
            )
            rows[-1]["partial"] = None
            continue
        if latest is None:
            rows.append(
                {
                    "stage": name,
                    "state": "missing",
                    "ref": None,
                    "fingerprint": fp,
                    "changed": [],
                    "reasons": ["never built"] + [f"data {n} not built" for n in unbuilt],
                }
            )
        else:
            reasons = explain_diff(latest.inputs, inputs, name_fp)
            rows.append(
                {
                    "stage": name,
                    "state": "stale",
                    "ref": latest.ref,
                    "fingerprint": fp,
                    "reasons": reasons,
                    "changed": sorted({reason_kind(r) for r in reasons}),
                }
            )
        rows[-1]["partial"] = partial = _partial(store, name, fp)
        if partial is not None:
            rows[-1]["reasons"] = rows[-1]["reasons"] + partial_lines(partial)
    return rows


def _partial(store: ArtifactStore, stage: str, fp: str) -> dict | None:
    try:
        return store.partial_work(stage, fp)
    except Exception as e:  # status must still show the rest
        log.warning("%s: could not read its unfinished work (%s: %s)", stage, type(e).__name__, e)
        return None


def partial_lines(partial: Mapping[str, Any]) -> list[str]:
    """Human lines for a status row's "partial" entry."""
    out = []
    if partial.get("running"):
        out.append(f"running now: {_who(partial['running'])}")
    if partial.get("checkpoint"):
        out.append(
            f"resumable: phase {partial['phase']} step {partial['step']}/"
            f"{partial['num_steps']} (global step {partial['global_step']}); a rerun "
            "continues from there"
        )
    return out


def fp_namer(store: ArtifactStore) -> Callable[[str, str], str | None]:
    """(stage, fingerprint) -> "stage@N" when the store holds it, for readable reasons."""

    def name(stage: str, fp: str) -> str | None:
        hit = store.lookup(stage, fp)
        return hit.ref if hit is not None else None

    return name

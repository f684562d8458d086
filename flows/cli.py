"""The `moonforge` CLI (Typer): run, rerun, status, lineage, diff, promote, models, chat, data.

The project root is the current directory. Heavy imports (torch, mlflow, prefect) happen inside
commands, so `moonforge --help` stays fast. Known errors print one clear paragraph and exit 1;
set MOONFORGE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moonforge.flows.tables import Column, emit, format_option, metric_lines

app = typer.Typer(
    name="moonforge",
    help="Train a Kimi-VL-style VLM through its lifecycle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="The DVC data pipeline (dvc.yaml / dvc.lock) and your own datasets.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)
DEFAULT_RECIPE = "recipes/tiny.yaml"

SET_HELP = "Override a recipe field: stages.<name>.<field>=value or model.<...>=value (repeatable)."


def _project() -> Path:
    return Path.cwd().resolve()


def _recipe_path(recipe: str | None) -> str:
    return str((_project() / (recipe or DEFAULT_RECIPE)).resolve())


@contextmanager
def _errors() -> Iterator[None]:
    """Known failures -> one paragraph on stderr and exit 1 (traceback only with MOONFORGE_DEBUG=1)."""
    from moonforge.registry.errors import (
        ArtifactNotFound,
        DatasetError,
        PromotionRefused,
        RegistryError,
        StageFailed,
    )
    from moonforge.stages.catalog import StageNotAvailable
    from moonforge.stages.recipe import RecipeError

    debug = os.environ.get("MOONFORGE_DEBUG") == "1"
    titles = {
        RecipeError: "recipe error",
        ArtifactNotFound: "artifact not found",
        DatasetError: "data error",
        StageNotAvailable: "stage not available",
        StageFailed: "stage failed",
        RegistryError: "registry error",
        PromotionRefused: "promotion refused",
    }
    try:
        yield
    except typer.Exit:
        raise
    except tuple(titles) as e:  # type: ignore[misc]
        if debug:
            raise
        title = next(t for cls, t in titles.items() if isinstance(e, cls))
        hint = (
            (
                "\nNothing was committed for the failed stage; earlier artifacts are intact. "
                "Set MOONFORGE_DEBUG=1 for the traceback."
            )
            if isinstance(e, StageFailed)
            else ""
        )
        err_console.print(
            f"[bold red]{title}:[/bold red] {escape(str(e))}{hint}",
            markup=True,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None
    except Exception as e:
        if debug:
            raise
        err_console.print(
            f"[bold red]error:[/bold red] {type(e).__name__}: {escape(str(e))}\n"
            "Set MOONFORGE_DEBUG=1 for the traceback.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _embedded_prefect_defaults() -> None:
    """The embedded default: Prefect's temporary local server with its DB under .moonforge/prefect
    and no telemetry (whose heartbeat otherwise races the run for the SQLite lock). Settings are
    read when prefect is imported, so this only acts before that; explicit env vars win."""
    import sys

    if "prefect" in sys.modules:
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        home = _project() / ".moonforge" / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)


def _quiet_prefect_tracebacks() -> None:
    """Prefect's console handler prints a traceback for a failed flow; we print one paragraph
    instead (the traceback still reaches the Prefect API / UI). MOONFORGE_DEBUG=1 keeps it."""
    import logging

    if os.environ.get("MOONFORGE_DEBUG") == "1":
        return
    for lg in (logging.getLogger(), logging.getLogger("prefect")):
        for h in lg.handlers:
            if type(h).__name__ == "PrefectConsoleHandler" and _strip_traceback not in h.filters:
                h.addFilter(_strip_traceback)


def _strip_traceback(record) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


def _load(recipe_path: str, overrides: list[str]):
    from moonforge.stages.recipe import load_recipe

    return load_recipe(recipe_path, overrides)


@contextmanager
def _progress_bars(enabled: bool = True) -> Iterator[None]:
    """Render StageContext.progress callbacks as one rich progress bar per stage (none when
    stdout must hold only the JSON summary)."""
    if not enabled:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from moonforge.flows.lifecycle import PROGRESS

    bars = Progress(
        TextColumn("{task.fields[stage]:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    ids: dict[str, TaskID] = {}

    def report(stage: str, done: int, total: int, desc: str) -> None:
        if stage not in ids:
            ids[stage] = bars.add_task(desc, stage=stage, total=max(total, 1))
        bars.update(ids[stage], completed=done, total=max(total, 1), description=desc)

    token = PROGRESS.set(report)
    try:
        with bars:
            yield
    finally:
        PROGRESS.reset(token)


def _summary(outcomes: dict[str, dict], t0: float, fmt: str = "table") -> None:
    """Each stage's artifact and headline metrics, in full (one a line); then how to look further."""
    if fmt == "json":
        typer.echo(json.dumps({"wall_s": time.time() - t0, "stages": outcomes}, indent=2, default=str))
        return
    shown, notes = [], []
    for o in outcomes.values():
        ms = o["metrics"]
        # the stage's own results, each after its upstream model's ("_before") where there is one
        evals = [k for k in ms if k.startswith("eval/") and not k.endswith("_before")]
        how = "cache hit" if o["cache_hit"] else f"trained {o['wall_s']:.1f} s"
        shown.append(
            {
                "stage": o["stage"],
                "artifact": f"{o['ref']}\n{how}",
                "ref": o["ref"],
                "how": how,
                "metrics": metric_lines(ms, evals[:4] or list(ms)[:4], before=True),
            }
        )
        if o.get("resumed_from"):
            notes.append(f"{o['stage']}: resumed from {o['resumed_from']}")
        if o.get("waited_for"):
            notes.append(f"{o['stage']}: waited for {o['waited_for']}, which built it; reused")
    if outcomes:
        last = list(outcomes.values())[-1]["ref"]
        notes.append("Runs and metrics: mlflow ui --backend-store-uri sqlite:///.moonforge/mlflow.db")
        notes.append(f"Lineage: moonforge lineage {last}")
    cols = [
        Column("stage", "stage", no_wrap=True),
        Column("artifact", "artifact", no_wrap=True),
        Column("metrics", "headline metrics", no_wrap=True),
    ]
    if fmt == "markdown":
        cols[1:2] = [Column("ref", "artifact"), Column("how", "how")]
    emit(
        console,
        fmt,
        shown,
        cols,
        outcomes,
        f"moonforge: {len(outcomes)} stage(s) in {time.time() - t0:.1f}s",
        notes,
    )


@app.command()
def run(
    recipe: str | None = typer.Argument(None, help=f"Recipe YAML (default {DEFAULT_RECIPE})."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    until: str | None = typer.Option(None, "--until", help="Stop after this stage."),
    format_: str = format_option(),
) -> None:
    """Run the whole lifecycle (cached stages are reused)."""
    _embedded_prefect_defaults()
    with _errors():
        path = _recipe_path(recipe)
        from moonforge.flows.lifecycle import stages_until

        stages_until(_load(path, set_), until)  # validate before starting Prefect
        from moonforge.flows.lifecycle import lifecycle_flow, owned

        _quiet_prefect_tracebacks()
        t0 = time.time()
        with _progress_bars(format_ != "json"), owned():
            outcomes = lifecycle_flow(
                recipe_path=path, overrides=list(set_), until=until, project=str(_project())
            )
        _summary(outcomes, t0, format_)


REF_HELP = (
    "stage@latest, stage@N, stage@<fingerprint-prefix>, runs:/<mlflow-run-id>, "
    "models:/<name>@<alias>, models:/<name>/<n> or an artifact path"
)


def _print_plan(plan: list, fmt: str = "table") -> None:
    n = sum(p.action == "run" for p in plan)
    shown = [
        {
            "stage": p.stage,
            "would": (f"run -> {p.ref}" if p.action == "run" else f"reuse {p.ref}")
            if fmt != "table"
            else (f"[yellow]run -> {p.ref}[/]" if p.action == "run" else f"[green]reuse {p.ref}[/]"),
            "from": f"{p.upstream}\n({p.upstream_how})",
            "fingerprint": p.fingerprint[:12],
            "why": "\n".join(p.reasons),
        }
        for p in plan
    ]
    cols = [
        Column("stage", "stage", no_wrap=True),
        Column("would", "would"),
        Column("from", "from upstream"),
        Column("fingerprint", "fingerprint", wide_only=True),
        Column("why", "why"),
    ]
    emit(
        console,
        fmt,
        shown,
        cols,
        [vars(p) for p in plan],
        "moonforge rerun --dry-run: nothing was run",
        [f"{n} stage(s) would train, {len(plan) - n} would be reused from the cache."],
    )


@app.command()
def rerun(
    stage: str = typer.Argument(..., help="Stage name to rerun."),
    from_: str | None = typer.Option(None, "--from", help="Upstream artifact: " + REF_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    downstream: bool = typer.Option(False, "--downstream", help="Also rerun every later stage."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run and why; run nothing."),
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", help="Recipe YAML."),
    format_: str = format_option(),
) -> None:
    """Rerun one stage from any upstream artifact version."""
    _embedded_prefect_defaults()
    with _errors():
        path = _recipe_path(recipe)
        rec = _load(path, set_)
        from moonforge.registry.refs import pinned
        from moonforge.registry.run_stage import resolve_upstream
        from moonforge.registry.store import open_store

        store = open_store(_project())
        if dry_run:
            from moonforge.registry.rerun_plan import plan_rerun

            _print_plan(plan_rerun(rec, stage, _project(), store, from_, downstream), format_)
            return
        # resolve now, so a missing / wrong-kind ref fails before Prefect starts
        info, _ = resolve_upstream(rec, stage, _project(), store, from_)
        if from_ is not None and info is not None:
            # pin @latest, prefixes, runs:/ and models:/ aliases now: the flow must not see an
            # alias move mid-run; paths from outside the store stay paths
            from_ = pinned(info, store)
        from moonforge.flows.lifecycle import owned, rerun_flow

        _quiet_prefect_tracebacks()
        t0 = time.time()
        with _progress_bars(format_ != "json"), owned():
            outcomes = rerun_flow(
                recipe_path=path,
                stage=stage,
                from_ref=from_,
                overrides=list(set_),
                downstream=downstream,
                project=str(_project()),
            )
        _summary(outcomes, t0, format_)


@app.command()
def status(
    recipe: str | None = typer.Argument(None, help=f"Recipe YAML (default {DEFAULT_RECIPE})."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    format_: str = format_option(),
) -> None:
    """Each stage: fresh / stale / missing, and why (resumable work of a killed run included)."""
    with _errors():
        from moonforge.registry.run_stage import stage_status

        rec = _load(_recipe_path(recipe), set_)
        rows = stage_status(rec, _project())
        colors = {"fresh": "green", "stale": "yellow", "missing": "red"}
        plain = format_ != "table"
        shown = [
            {
                "stage": r["stage"],
                "state": r["state"] if plain else f"[{colors[r['state']]}]{r['state']}[/]",
                "artifact": r["ref"] or "-",
                "changed": ", ".join(r.get("changed") or []) or "-",
                "why": "\n".join(r["reasons"]) or "-",
            }
            for r in rows
        ]
        cols = [
            Column("stage", "stage", no_wrap=True),
            Column("state", "state", no_wrap=True),
            Column("artifact", "artifact", no_wrap=True),
            Column("changed", "changed input", wide_only=True),
            Column("why", "why"),
        ]
        emit(console, format_, shown, cols, rows, f"recipe {rec.name}")


@app.command()
def lineage(
    ref: str = typer.Argument(..., help=REF_HELP),
    format: str = typer.Option("tree", "--format", help="tree | mermaid | json"),
) -> None:
    """Walk an artifact's lineage back to its data."""
    with _errors():
        from moonforge.registry import lineage as lin
        from moonforge.registry.store import open_store

        if format not in ("tree", "mermaid", "json"):
            err_console.print(f"--format {format!r}: use tree, mermaid or json")
            raise typer.Exit(2)
        chain = lin.walk(open_store(_project()), ref, _project())
        if format == "tree":
            console.print(lin.render_tree(chain))
        else:
            typer.echo(lin.render_mermaid(chain) if format == "mermaid" else lin.render_json(chain))


@app.command()
def diff(
    ref1: str = typer.Argument(..., help="The older version: " + REF_HELP),
    ref2: str = typer.Argument(..., help="The newer version of the same stage."),
) -> None:
    """Config and input differences between two versions of a stage."""
    with _errors():
        from moonforge.registry.artifact_diff import diff_artifacts
        from moonforge.registry.store import open_store

        d = diff_artifacts(open_store(_project()), ref1, ref2, _project())
        console.print(
            f"[bold]{d.a.ref}[/] (fp {d.a.fingerprint[:12]}) -> [bold]{d.b.ref}[/] "
            f"(fp {d.b.fingerprint[:12]})",
            highlight=False,
        )
        if d.same_fingerprint:
            console.print("same fingerprint: identical inputs", style="green")
        table = Table(title="differences")
        for col in ("kind", "what"):
            table.add_column(col)
        for kind, reason in d.inputs:
            table.add_row(kind, reason)
        for r in d.runtime:
            table.add_row("runtime (not in fingerprint)", r)
        for r in d.provenance:
            table.add_row("provenance", r)
        for k, a, b in d.metrics:
            table.add_row(
                "metric", f"{k}: {'-' if a is None else f'{a:.4g}'} -> {'-' if b is None else f'{b:.4g}'}"
            )
        console.print(table)


@app.command()
def promote(
    ref: str = typer.Argument(..., help="The artifact to promote: " + REF_HELP),
    alias: str = typer.Option("champion", "--alias", help="Registry alias to move."),
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", help="Recipe YAML (model name, gates)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Move a model-registry alias to an artifact if every recipe promotion gate passes."""
    with _errors():
        from moonforge.registry.errors import PromotionRefused
        from moonforge.registry.promotion import promote as do_promote
        from moonforge.registry.store import open_store

        rec = _load(_recipe_path(recipe), set_)
        try:
            d = do_promote(rec, _project(), open_store(_project()), ref, alias)
        except PromotionRefused as e:
            if e.decision is not None:
                _print_gates(e.decision)
            raise
        _print_gates(d)
        console.print(
            f"[green]promoted[/]: {d.model}@{alias} -> version {d.version} ({d.artifact})", highlight=False
        )


def _print_gates(d) -> None:
    table = Table(title=f"{d.model} version {d.version} ({d.artifact}): gates for {d.alias!r}")
    for col in ("gate", "observed", "result"):
        table.add_column(col)
    for r in d.results:
        table.add_row(
            r.gate,
            "missing" if r.observed is None else f"{r.observed:.4g}",
            "[green]pass[/]" if r.passed else "[red]FAIL[/]",
        )
    if not d.results:
        table.add_row("(the recipe declares no gates)", "-", "[green]pass[/]")
    console.print(table)


@app.command()
def models(
    name: str | None = typer.Option(None, "--name", help="Registered model (default: the recipe's)."),
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", help="Recipe YAML."),
    format_: str = format_option(),
) -> None:
    """List a registered model's versions with their aliases, artifacts and gate decisions."""
    with _errors():
        from dataclasses import asdict

        from moonforge.registry import model_registry as mr

        name = name or _load(_recipe_path(recipe), []).model_name
        rows = mr.version_rows(mr.client_for(_project()), name)
        cols = [
            Column("version", "version", "right", no_wrap=True),
            Column("aliases", "aliases", no_wrap=True),
            Column("artifact", "artifact", no_wrap=True),
            Column("fingerprint", "fingerprint", wide_only=True, no_wrap=True),
            Column("metrics", "key metrics", no_wrap=True),
            Column("decisions", "decisions"),
        ]
        shown = []
        for r in rows:
            keys = [k for k in r.metrics if k.startswith("eval/") and not k.endswith("_before")][:4]
            shown.append(
                {
                    "version": str(r.version),
                    "aliases": ", ".join(r.aliases) or "-",
                    "artifact": r.artifact,
                    "fingerprint": r.fingerprint[:12],
                    "metrics": metric_lines(r.metrics, keys) or "-",
                    "decisions": "\n".join(f"{a}: {o}" for a, o in sorted(r.decisions.items())) or "-",
                }
            )
        emit(console, format_, shown, cols, [asdict(r) for r in rows], f"registered model {name}")


def _check_video_flags(frames: int, video_tokens: int | None, fps: float | None) -> None:
    """chat's and eval's --frames / --video-tokens / --fps, refused before anything loads."""
    if frames < 1:
        raise ValueError(f"--frames {frames}: sample at least one frame")
    if fps is not None and fps <= 0:
        raise ValueError(f"--fps {fps:g}: give a positive rate, or leave it out to sample --frames evenly")
    if video_tokens is not None and video_tokens < 1:
        raise ValueError(f"--video-tokens {video_tokens}: give a positive budget, or leave it out")


@app.command()
def chat(
    ref: str = typer.Argument(..., help="The checkpoint: " + REF_HELP),
    question: str = typer.Argument(..., help="What to ask."),
    image: Path | None = typer.Option(None, "--image", help="An image file to ask about."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    video: Path | None = typer.Option(None, "--video", help="A video (MP4, WebM, MKV, GIF, WebP, ...)."),
    frames: int = typer.Option(8, "--frames", help="Frames sampled evenly from the --video clip."),
    fps: float | None = typer.Option(
        None, "--fps", help="Sample the --video at this rate from t=0 instead (at most --frames)."
    ),
    video_tokens: int | None = typer.Option(
        None, "--video-tokens", help="LM tokens the clip may take (frames shrink to fit; default: no cap)."
    ),
) -> None:
    """Ask a checkpoint a question about an image or a video clip (greedy, KV cache)."""
    with _errors():
        from moonforge.registry.hf_tokenizer import load_checkpoint_tokenizer
        from moonforge.registry.refs import resolve_ref
        from moonforge.registry.store import open_store
        from moonforge.stages.artifacts import Checkpoint
        from moonforge.stages.inference import chat as answer

        if image is not None and video is not None:
            raise ValueError("--image and --video: ask about one of them")
        if image is not None and not image.is_file():
            raise FileNotFoundError(f"--image {image}: no such file; pass a PNG/JPEG path")
        if video is not None and not video.is_file():
            raise FileNotFoundError(f"--video {video}: no such file; pass a video (MP4, GIF, ...)")
        _check_video_flags(frames, video_tokens, fps)
        store = open_store(_project())
        info = resolve_ref(ref, store, _project())
        tok = load_checkpoint_tokenizer(info, store, _project())
        out = answer(
            Checkpoint(info.path),
            tok,
            question,
            image,
            max_new_tokens,
            video=video,
            num_frames=frames,
            video_tokens=video_tokens,
            fps=fps,
        )
        console.print(f"[bold]{info.ref}[/]: {escape(out.text)}", highlight=False)
        console.print(f"({out.num_tokens} tokens, {out.finish_reason})", style="dim")


@app.command(name="eval")
def eval_(
    ref: str = typer.Argument(..., help="The checkpoint: " + REF_HELP),
    examples: int = typer.Option(
        128, "--examples", help="Held-out prompts (half text, half image; a --dataset's first N)."
    ),
    max_new_tokens: int | None = typer.Option(
        None,
        "--max-new-tokens",
        help="New tokens per answer (default: 112 on rl_prompts/val; a --dataset's longest "
        "reference answer + 3).",
    ),
    video: bool = typer.Option(
        False,
        "--video",
        help="Also video QA on videoworld/val: accuracy, shuffled frames, majority, uniform chance.",
    ),
    clips: int = typer.Option(16, "--clips", help="videoworld/val clips for --video (all their questions)."),
    frames: int = typer.Option(8, "--frames", help="Frames sampled per clip for --video."),
    fps: float | None = typer.Option(
        None, "--fps", help="Sample each clip at this rate from t=0 instead (at most --frames)."
    ),
    video_tokens: int | None = typer.Option(
        None, "--video-tokens", help="LM tokens a clip may take for --video (frames shrink to fit)."
    ),
    datasets: list[str] = typer.Option(
        [],
        "--dataset",
        help="A dataset the recipe declares (chat, prompt or preference; repeatable): score its "
        "held-out prompts (all, if it holds none out) instead of rl_prompts/val.",
    ),
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", help="Recipe YAML declaring --dataset."),
    format_: str = format_option(),
) -> None:
    """Held-out answer accuracy of a checkpoint on rl_prompts/val (text and image), greedy; with
    --video, video QA accuracy against the same clips with shuffled frames; with --dataset, on
    your own declared sets instead (images and videos asked as the stages ask them)."""
    with _errors():
        from moonforge.registry.data_versions import read_lock
        from moonforge.registry.hf_tokenizer import load_checkpoint_tokenizer
        from moonforge.registry.refs import resolve_ref
        from moonforge.registry.store import open_store
        from moonforge.stages.artifacts import Checkpoint
        from moonforge.stages.inference import evaluate, evaluate_declared

        _check_video_flags(frames, video_tokens, fps)
        store = open_store(_project())
        info = resolve_ref(ref, store, _project())
        tok = load_checkpoint_tokenizer(info, store, _project())
        if datasets:
            from moonforge.registry.user_data import open_declared

            sets = [open_declared(_project(), _recipe_path(recipe), name)[0] for name in datasets]
            metrics: dict[str, float] = {}
            for ds in sets:
                metrics.update(evaluate_declared(Checkpoint(info.path), tok, ds, examples, max_new_tokens))
        else:
            data = read_lock(_project(), ["rl_prompts", "toyworld"])
            metrics = evaluate(
                Checkpoint(info.path),
                tok,
                data["rl_prompts"].path,
                data["toyworld"].path,
                examples,
                max_new_tokens or 112,
            )
        if video:
            from moonforge.stages.video_evals import video_qa

            clips_dir = read_lock(_project(), ["videoworld"])["videoworld"].path
            metrics.update(
                video_qa(
                    Checkpoint(info.path), tok, clips_dir, clips, frames, video_tokens=video_tokens, fps=fps
                )
            )
        sets_shown = ", ".join(datasets) or "rl_prompts/val"
        title = f"{info.ref}: {sets_shown}" + (", videoworld/val" if video else "")
        rows = [{"metric": k, "value": f"{v:.4g}"} for k, v in metrics.items()]
        cols = [Column("metric", "metric", no_wrap=True), Column("value", "value", "right")]
        emit(console, format_, rows, cols, {"ref": info.ref, "metrics": metrics}, title)


@app.command()
def plan(
    recipe: str = typer.Argument(..., help="Recipe YAML, e.g. recipes/kimi-vl-a3b.yaml."),
    gpu: str = typer.Option("h100", "--gpu", help="GPU type: a100, h100, h200, b200."),
    gpus: int = typer.Option(512, "--gpus", help="Total GPUs (data x context parallel)."),
    mfu: float = typer.Option(0.4, "--mfu", help="Model FLOPs utilisation of training."),
    zero: int = typer.Option(2, "--zero", help="ZeRO stage 0-3 for the memory estimate."),
    assume_cp: bool = typer.Option(
        False,
        "--assume-cp",
        help="Plan RL / long2short as if they could split sequences over GPUs (a what-if).",
    ),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    format_: str = format_option(),
) -> None:
    """Token budgets, steps, FLOPs, memory per GPU and GPU-hours per stage."""
    with _errors():
        from moonforge.flows.plan_table import print_plan
        from moonforge.stages.plan import PlanError, make_plan, plan_config

        rec = _load(_recipe_path(recipe), set_)
        try:
            cfg = plan_config(gpu=gpu, num_gpus=gpus, mfu=mfu, zero_stage=zero, context_parallel=assume_cp)
            result = make_plan(rec, cfg)
        except PlanError as e:
            err_console.print(
                f"[bold red]plan error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None
        print_plan(result, rec, format_, console)


@data_app.command("build")
def data_build(names: list[str] = typer.Argument(None, help="Datasets (dvc stages); default all.")) -> None:
    """dvc repro: build the datasets whose inputs changed."""
    with _errors():
        from moonforge.registry.data_versions import dvc_repro, read_lock

        typer.echo(dvc_repro(_project(), names or []))
        for n, d in read_lock(_project()).items():
            console.print(f"{n:<12} {d.digest}  {d.path}", highlight=False)


@data_app.command("status")
def data_status(
    names: list[str] = typer.Argument(None, help="Datasets (dvc stages); default all."),
    format_: str = format_option(),
) -> None:
    """dvc status: which datasets are out of date."""
    with _errors():
        from moonforge.registry.data_versions import dvc_status, read_lock

        changed = dvc_status(_project(), names or [])
        rows: list[dict[str, Any]] = [
            {
                "name": n,
                "state": "changed" if n in changed else "up to date",
                "digest": d.digest,
                "path": str(d.path),
                "changes": changed.get(n),
            }
            for n, d in read_lock(_project()).items()
        ]
        shown = [{**r, "changes": "" if r["changes"] is None else str(r["changes"])} for r in rows]
        cols = [
            Column("name", "dataset", no_wrap=True),
            Column("state", "state", no_wrap=True),
            Column("digest", "DVC digest", no_wrap=True),
            Column("changes", "dvc status"),
        ]
        emit(console, format_, shown, cols, rows)


@data_app.command("add")
def data_add(
    name: str = typer.Argument(..., help="Dataset name (lower case, digits, _)."),
    path: str = typer.Argument(..., help="A file, directory, glob or s3:// URI."),
    format_: str = typer.Option(
        ...,
        "--format",
        help="llava, sharegpt, messages, openai, webdataset, parquet, text, verl, rl_messages, preference.",
    ),
    images_root: str | None = typer.Option(
        None, "--images-root", help="Folder (or s3:// prefix) of the images."
    ),
    heldout: int = typer.Option(0, "--heldout", help="Records kept for the closing eval."),
    recipe: str = typer.Option(
        DEFAULT_RECIPE, "--recipe", help="Recipe whose datasets: gets the declaration."
    ),
) -> None:
    """Track your own dataset with DVC (data/NAME.dvc) and declare it in the recipe."""
    with _errors():
        from moonforge.registry.user_data import add_dataset

        decl = add_dataset(_project(), name, path, format_, images_root, _recipe_path(recipe), heldout)
        console.print(
            f"added {name}: {decl.pop('records')} records ({format_}), tracked as "
            f"data/{name}.dvc, declared in {recipe}:",
            highlight=False,
        )
        for k, v in decl.items():
            console.print(f"  {k}: {v}", highlight=False)
        console.print(f"Mix it into a stage: --set stages.<stage>.mixture.{name}=0.5", highlight=False)


@data_app.command("check")
def data_check(
    name: str = typer.Argument(..., help="A dataset the recipe declares."),
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", help="Recipe YAML."),
    format_: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Validate every record (images decoded); exit 1 above the dataset's max_bad_fraction."""
    with _errors():
        import json

        from moonforge.registry.user_data import open_declared
        from moonforge.stages.data.user_check import check_set

        ds, tok, vision = open_declared(_project(), _recipe_path(recipe), name)
        rep = check_set(ds, tok, vision)
        if format_ == "json":
            typer.echo(json.dumps(rep.to_dict(), indent=2))
        else:
            console.print(rep.render(), highlight=False, soft_wrap=True)
        if not rep.ok:
            raise typer.Exit(1) from None


@data_app.command("show")
def data_show(
    name: str = typer.Argument(..., help="A dataset the recipe declares."),
    n: int = typer.Option(3, "-n", help="How many samples."),
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", help="Recipe YAML."),
    png: Path | None = typer.Option(None, "--png", help="Thumbnail sheet (default NAME-samples.png)."),
) -> None:
    """Print samples as the model sees them (chat template, image placeholders); thumbnails to a PNG."""
    with _errors():
        from moonforge.registry.errors import DatasetError
        from moonforge.registry.user_data import open_declared
        from moonforge.stages.data.user_show import show_samples

        ds, tok, vision = open_declared(_project(), _recipe_path(recipe), name)
        if tok is None:
            raise DatasetError(
                "no tokenizer to render with: build it with `moonforge data build "
                "tokenizer` (or set the recipe's tokenizer:)"
            )
        png = png or Path(f"{name}-samples.png")
        for block in show_samples(ds, tok, vision, n, png):
            console.print(block, highlight=False, soft_wrap=True, markup=False)
        if png.exists():
            console.print(f"thumbnails: {png}", highlight=False)


# Imported last because they register their commands on `app`: deploy, serve and server
# up|down|status (ops_cli), import and export of Hugging Face checkpoints (interop_cli).
from moonforge.flows import interop_cli, ops_cli  # noqa: E402,F401

if __name__ == "__main__":
    app()

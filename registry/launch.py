"""Launchers: run a stage's training in child processes started by `torchrun` or `deepspeed`.

`stage_runner(fn, cfg)` is what registry.run_stage calls instead of the stage function: for
`launcher.kind: inprocess` (the default) it *is* the stage function; otherwise it writes a job file
(stage function, config, datasets, resume point, the generated DeepSpeed config), starts

    torchrun  --nproc_per_node N ... -m moonforge.stages.train.distributed JOB.json
    deepspeed --num_gpus N --no_local_rank --module moonforge.stages.train.distributed JOB.json

waits on it while streaming its output to the `moonforge.launch` logger (progress lines become
progress callbacks), replays rank 0's metrics into the stage's sink, and maps the exit:
0 -> the StageResult rank 0 wrote; a Python error on a rank -> the same error type for the known
ones (NonFiniteLossError stays a never-retried NaN) else `LaunchFailed`; a rank killed by a
signal -> `LaunchFailed` naming the signal. Periodic checkpoints are in the staging dir, so
run_stage keeps them and a rerun resumes (at any world size).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.config import LauncherConfig, StageConfig

log = logging.getLogger("moonforge.launch")

CHILD_MODULE = "moonforge.stages.train.distributed"
PROGRESS_PREFIX = "@@moonforge-progress "


class LaunchFailed(RuntimeError):
    """A launched stage did not finish: a rank raised, was killed, or the launcher failed."""


class LauncherUnavailable(ValueError):
    """The recipe asks for a launcher / ZeRO stage this machine cannot run (a config error)."""


def world_size(cfg: StageConfig) -> int:
    return cfg.launcher.world_size


def stage_runner(fn: Callable, cfg: StageConfig) -> Callable:
    """The callable run_stage invokes as `runner(base, data, cfg, ctx)`."""
    if cfg.launcher.kind == "inprocess":
        return fn
    return functools.partial(launch_stage, f"{fn.__module__}:{fn.__qualname__}")


def check_launcher(launcher: LauncherConfig, device: str) -> None:
    """Refuse what cannot run here, naming the field and the fix (before anything starts)."""
    cuda = device.startswith("cuda")
    if launcher.backend == "nccl" and not cuda:
        raise LauncherUnavailable(
            "launcher.backend=nccl needs CUDA devices and this stage runs on CPU; "
            "set launcher.backend to gloo (or auto)")
    if launcher.kind != "deepspeed":
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise LauncherUnavailable(
            "launcher.kind=deepspeed but DeepSpeed is not installed; run `make install` (it "
            "installs the pinned deepspeed with DS_BUILD_OPS=0) or set launcher.kind: torchrun") from e
    if launcher.zero_stage == 3 and not cuda:
        raise LauncherUnavailable(
            "launcher.zero_stage=3 partitions the parameters themselves, which DeepSpeed runs only "
            "on CUDA devices (NCCL), and the Muon client optimizer supports ZeRO 0-2 only; on this "
            "CPU machine set launcher.zero_stage to 2 (or 0/1), or launcher.kind: torchrun")
    if launcher.zero_stage == 3:
        raise LauncherUnavailable(
            "launcher.zero_stage=3 is not supported with the Muon client optimizer yet "
            "(it needs whole matrices; ZeRO-3 hands out parameter shards); use zero_stage 2")


def deepspeed_config(cfg: StageConfig, device: str) -> dict[str, Any]:
    """The DeepSpeed config for a stage, generated from its recipe fields (never hand-copied).

    Global batch = cfg.batch_size; micro-batch = cfg.micro_batch_size (or the batch); gradient
    accumulation = the per-rank micro-batch count; clipping = optimizer.grad_clip. Parameters stay
    fp32 (the loop autocasts to bf16 on CUDA itself).
    """
    world = cfg.launcher.world_size
    micro = cfg.micro_batch_size or cfg.batch_size
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.grad_accum // world,
        "gradient_clipping": cfg.optimizer.grad_clip or 0.0,
        "zero_optimization": {"stage": cfg.launcher.zero_stage, "overlap_comm": False,
                              "contiguous_gradients": True, "round_robin_gradients": False},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "steps_per_print": 2 ** 31,
        "wall_clock_breakdown": False,
    }


def launch_command(cfg: StageConfig, job: Path) -> list[str]:
    la, py = cfg.launcher, sys.executable
    port = str(_free_port())
    if la.kind == "torchrun":
        return [py, "-m", "torch.distributed.run", "--nnodes", str(la.nnodes),
                "--nproc_per_node", str(la.nproc_per_node), "--master_addr", "127.0.0.1",
                "--master_port", port, "-m", CHILD_MODULE, str(job)]
    return [py, "-m", "deepspeed.launcher.runner", "--num_nodes", str(la.nnodes),
            "--num_gpus", str(la.nproc_per_node), "--master_addr", "127.0.0.1", "--master_port",
            port, "--no_local_rank", "--module", CHILD_MODULE, str(job)]


def launch_stage(function: str, base: Checkpoint | None, data: Mapping[str, DatasetRef],
                 cfg: StageConfig, ctx: StageContext) -> StageResult:
    """Run stage `function` ("module:name") under cfg.launcher and return rank 0's result."""
    check_launcher(cfg.launcher, ctx.device)
    work = Path(tempfile.mkdtemp(prefix=f"moonforge-launch-{cfg.stage_name}-"))
    try:
        job = work / "job.json"
        job.write_text(json.dumps({
            "function": function, "kind": cfg.kind, "cfg": cfg.model_dump(mode="json"),
            "model": ctx.model.model_dump(mode="json"), "out": str(ctx.out), "workdir": str(work),
            "base": str(base.path) if base else None, "device": ctx.device,
            "resume_from": str(ctx.resume_from) if ctx.resume_from else None,
            "init": {k: str(v) for k, v in ctx.init.items()},
            "data": {n: [str(d.path), d.digest] for n, d in data.items()},
            "ds_config": deepspeed_config(cfg, ctx.device) if cfg.launcher.kind == "deepspeed" else None,
        }, indent=1))
        rc, tail = _run(launch_command(cfg, job), cfg, ctx)
        _replay_metrics(work / "metrics.jsonl", ctx)
        if rc != 0:
            raise _failure(cfg, rc, tail, work)
        res = json.loads((work / "result.json").read_text())
        return StageResult(Checkpoint(Path(res["checkpoint"])), res["metrics"],
                           tuple(res["data_used"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(cmd: list[str], cfg: StageConfig, ctx: StageContext) -> tuple[int, list[str]]:
    """Start the launcher in its own session, stream its output, return (exit code, last lines)."""
    env = dict(os.environ)
    # The child imports what this process imports (the package, and e.g. a test's stage module).
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    log.info("%s: launching %s", cfg.stage_name, " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(PROGRESS_PREFIX):
                done, total, desc = line[len(PROGRESS_PREFIX):].split(" ", 2)
                ctx.progress(int(done), int(total), desc)
                continue
            tail.append(line)
            log.info("[%s] %s", cfg.stage_name, line)
        return proc.wait(), list(tail)
    except BaseException:  # cancelled / interrupted: take the whole launched job down with us
        _kill_group(proc)
        raise


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _replay_metrics(path: Path, ctx: StageContext) -> None:
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            ctx.sink.log(row["step"], row["metrics"])
        ctx.sink.flush()


_KNOWN_ERRORS: dict[str, type[BaseException]] = {}


def _known_errors() -> dict[str, type[BaseException]]:
    if not _KNOWN_ERRORS:
        from moonforge.stages.train.loop import NonFiniteLossError

        _KNOWN_ERRORS.update(NonFiniteLossError=NonFiniteLossError, ValueError=ValueError,
                             KeyError=KeyError, FileNotFoundError=FileNotFoundError)
    return _KNOWN_ERRORS


def _failure(cfg: StageConfig, rc: int, tail: list[str], work: Path) -> BaseException:
    """The error a failed launch becomes: a rank's own error type when it raised a known one
    (NaN loss, config errors), else LaunchFailed naming the exit, and the signal when a rank was
    killed (the surviving ranks' "connection closed" errors are only collateral)."""
    la = cfg.launcher
    errs = [json.loads(p.read_text()) for p in sorted(work.glob("error-rank*.json"))]
    for err in errs:
        cls = _known_errors().get(err["type"])
        if cls is not None:
            return cls(f"{err['message']} (rank {err['rank']} of {la.world_size} under {la.kind})")
    text = "\n".join(tail)
    codes = [int(c) for c in re.findall(r"(?:exitcode|return code)\s*[:=]\s*(-?\d+)", text)]
    codes += [rc] if rc < 0 else []
    sig = next((-c for c in codes if c < 0), None)
    last = "\n  ".join(tail[-12:])
    if sig is not None or len(errs) < la.world_size:
        dead = sorted(set(range(la.world_size)) - {e["rank"] for e in errs})
        # The launcher may kill the surviving ranks before they report, so several can show dead.
        who = f"ranks {', '.join(map(str, dead))} were" if len(dead) > 1 else \
            f"rank {dead[0] if dead else '?'} was"
        why = (f"{who} killed"
               + (f" by {signal.Signals(sig).name}" if sig else "")
               + " (out of memory, a cancelled or preempted job)")
        if errs:
            why += f"; the other ranks then failed with {errs[0]['type']}"
    else:
        err = errs[0]
        why = (f"rank {err['rank']} raised {err['type']}: {err['message']}\n"
               f"{err['traceback'][-1500:]}")
    return LaunchFailed(
        f"stage {cfg.stage_name!r}: the {la.kind} launcher ({la.world_size} processes) failed "
        f"with exit code {rc}: {why}. Last output:\n  {last}\nRerunning the stage resumes from "
        f"its last periodic checkpoint (checkpoint_every), at any world size.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

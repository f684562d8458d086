"""Launchers: run a stage's training in child processes started by `torchrun`.

`stage_runner(fn, cfg)` is what registry.run_stage calls instead of the stage function: for
`launcher.kind: inprocess` (the default) it *is* the stage function; otherwise it writes a job file
(stage function, config, datasets, resume point, the generated DeepSpeed config), starts

    torchrun --nproc_per_node N ... -m moonforge.stages.train.distributed JOB.json

(for `launcher.kind: deepspeed` too: the ranks build DeepSpeed's engine from torchrun's
environment, as DeepSpeed supports, without the `deepspeed` CLI's two extra processes)

waits on it while streaming its output to the `moonforge.launch` logger (progress lines become
progress callbacks), replays rank 0's metrics into the stage's sink, and maps the exit:
0 -> the StageResult rank 0 wrote; a Python error on a rank -> the same error type for the known
ones (NonFiniteLossError stays a never-retried NaN) else `LaunchFailed`; a rank killed by a
signal -> `LaunchFailed` naming the signal. Periodic checkpoints are in the staging dir, so
run_stage keeps them and a rerun resumes (at any world size).

Several nodes (`launcher.nnodes` > 1): every node runs one `torchrun` (for DeepSpeed too: its
engine starts from torchrun's environment) and the nodes meet at a c10d rendezvous. `node_plan`
says where this machine sits: node rank from SLURM_NODEID, a Kubernetes indexed Job's
JOB_COMPLETION_INDEX or NODE_RANK (else `launcher.node_rank`), the endpoint from
`launcher.rdzv_endpoint`, else MASTER_ADDR:MASTER_PORT, else the Slurm allocation's first node.
Inside a Slurm batch script the flow's launch goes through `srun` (one task per node, each running
`python -m moonforge.registry.launch node JOB.json`); elsewhere this process starts its own node
and every other node runs that same command on the job file, which then lives on a shared
filesystem (MOONFORGE_LAUNCH_DIR, default: beside the stage's staging directory). Local rank 0 of
node 0 writes the artifact. A node that dies mid-stage fails the stage naming the lost ranks; a
rendezvous that never completes fails after `launcher.rdzv_timeout_s`, naming the endpoint.
"""

from __future__ import annotations

import argparse
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
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.config import LauncherConfig, StageConfig

log = logging.getLogger("moonforge.launch")

CHILD_MODULE = "moonforge.stages.train.distributed"
NODE_MODULE = "moonforge.registry.launch"
PROGRESS_PREFIX = "@@moonforge-progress "
RDZV_PORT = 29400
"""Rendezvous port when only the host is known (torchrun's default)."""
NODE_RANK_VARS = ("SLURM_NODEID", "JOB_COMPLETION_INDEX", "NODE_RANK")
"""Where schedulers put a node's rank: Slurm (per srun task), Kubernetes indexed Jobs, torchrun."""


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
            "set launcher.backend to gloo (or auto)"
        )
    if launcher.kind != "deepspeed":
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise LauncherUnavailable(
            "launcher.kind=deepspeed but DeepSpeed is not installed; run `make install` (it "
            "installs the pinned deepspeed with DS_BUILD_OPS=0) or set launcher.kind: torchrun"
        ) from e
    if launcher.zero_stage == 3 and not cuda:
        raise LauncherUnavailable(
            "launcher.zero_stage=3 partitions the parameters themselves, which DeepSpeed runs only "
            "on CUDA devices (NCCL), and the Muon client optimizer supports ZeRO 0-2 only; on this "
            "CPU machine set launcher.zero_stage to 2 (or 0/1), or launcher.kind: torchrun"
        )
    if launcher.zero_stage == 3:
        raise LauncherUnavailable(
            "launcher.zero_stage=3 is not supported with the Muon client optimizer yet "
            "(it needs whole matrices; ZeRO-3 hands out parameter shards); use zero_stage 2"
        )


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
        "zero_optimization": {
            "stage": cfg.launcher.zero_stage,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "round_robin_gradients": False,
        },
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


@dataclass(frozen=True)
class NodePlan:
    """This machine's place in a multi-node launch."""

    nnodes: int
    node_rank: int
    endpoint: str
    """host:port of the c10d rendezvous (node 0 hosts it)."""
    source: str
    """Where the rank and endpoint came from, for messages."""


def in_slurm_batch(env: Mapping[str, str]) -> bool:
    """True in a Slurm batch script (an allocation, not yet inside a job step)."""
    return "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env and shutil.which("srun") is not None


def _slurm_first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0]


def node_plan(la: LauncherConfig, env: Mapping[str, str], node_rank: int | None = None) -> NodePlan:
    """Node rank and rendezvous endpoint for this machine (see the module docstring for the
    order of sources); LauncherUnavailable naming the fix when one cannot be found or the Slurm
    allocation has fewer nodes than `launcher.nnodes`."""
    n = la.nnodes
    alloc = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if alloc and alloc.isdigit() and int(alloc) < n:
        raise LauncherUnavailable(
            f"launcher.nnodes={n} but Slurm job {env.get('SLURM_JOB_ID', '?')} has {alloc} node(s); "
            f"submit it with --nodes={n} (`nodes:` in infra/slurm/cluster.yaml) or set "
            f"launcher.nnodes to {alloc}"
        )
    src = "--node-rank"
    if node_rank is None:
        var = next((v for v in NODE_RANK_VARS if env.get(v, "").isdigit()), None)
        if var is not None:
            node_rank, src = int(env[var]), var
        elif la.node_rank is not None:
            node_rank, src = la.node_rank, "launcher.node_rank"
        else:
            raise LauncherUnavailable(
                f"launcher.nnodes={n} but this node's rank is unknown: set launcher.node_rank (0 on "
                "the node that runs the flow), or run under Slurm (SLURM_NODEID), a Kubernetes "
                "indexed Job (JOB_COMPLETION_INDEX) or with NODE_RANK set"
            )
    if not 0 <= node_rank < n:
        raise LauncherUnavailable(
            f"node rank {node_rank} (from {src}) is not in 0..{n - 1} for launcher.nnodes={n}"
        )
    if la.rdzv_endpoint:
        endpoint, esrc = la.rdzv_endpoint, "launcher.rdzv_endpoint"
    elif env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        endpoint, esrc = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}", "MASTER_ADDR:MASTER_PORT"
    elif env.get("SLURM_JOB_NODELIST"):
        endpoint = f"{_slurm_first_host(env['SLURM_JOB_NODELIST'])}:{RDZV_PORT}"
        esrc = "the first node of SLURM_JOB_NODELIST"
    else:
        raise LauncherUnavailable(
            f"launcher.nnodes={n} but no rendezvous endpoint: set launcher.rdzv_endpoint to node "
            "0's host:port (e.g. node0:29400), or MASTER_ADDR and MASTER_PORT"
        )
    return NodePlan(n, node_rank, endpoint, f"node rank from {src}, endpoint from {esrc}")


def single_node_command(la: LauncherConfig, job: Path) -> list[str]:
    """The launcher for all of a one-node job's processes (127.0.0.1, a free port): torchrun, for
    DeepSpeed too (its engine starts from torchrun's environment, as on several nodes). The
    `deepspeed` CLI would add two Python processes that each import DeepSpeed before any rank
    starts: tests/test_distributed.py's 2-process ZeRO-2 job took 20.8 s under it, 11.8 s under
    torchrun."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(la.nproc_per_node),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        CHILD_MODULE,
        str(job),
    ]


def node_command(la: LauncherConfig, plan: NodePlan, job: Path, rdzv_id: str) -> list[str]:
    """One node's torchrun in a multi-node job: c10d rendezvous, hosted by node 0, no restarts
    (a lost node fails the stage; the rerun resumes from the last checkpoint)."""
    t = la.rdzv_timeout_s
    conf = f"join_timeout={t},read_timeout={t},is_host={int(plan.node_rank == 0)}"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(plan.nnodes),
        "--nproc_per_node",
        str(la.nproc_per_node),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        plan.endpoint,
        "--rdzv_id",
        rdzv_id,
        "--rdzv_conf",
        conf,
        "--max_restarts",
        "0",
        "-m",
        CHILD_MODULE,
        str(job),
    ]


def srun_command(la: LauncherConfig, stage: str, job: Path, env: Mapping[str, str]) -> list[str]:
    """Inside a Slurm batch script: one job step with one node launcher per node."""
    n = la.nnodes
    cmd = [
        "srun",
        f"--nodes={n}",
        f"--ntasks={n}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--export=ALL",
        f"--job-name=moonforge-{stage}",
    ]
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cmd.append(f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}")
    return cmd + [sys.executable, "-m", NODE_MODULE, "node", str(job)]


def launch_command(
    cfg: StageConfig, job: Path, rdzv_id: str = "", env: Mapping[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command this (the flow's) process runs, and the environment it adds."""
    env = os.environ if env is None else env
    la = cfg.launcher
    if in_slurm_batch(env):
        return srun_command(la, cfg.stage_name, job, env), {}
    if la.nnodes > 1:
        plan = node_plan(la, env)
        log.info(
            "%s: node %d of %d (%s); start every other node with: python -m %s node %s",
            cfg.stage_name,
            plan.node_rank,
            plan.nnodes,
            plan.source,
            NODE_MODULE,
            job,
        )
        return node_command(la, plan, job, rdzv_id), {"MOONFORGE_NODE_RANK": str(plan.node_rank)}
    return single_node_command(la, job), {}


def _workdir(cfg: StageConfig, ctx: StageContext) -> Path:
    """Where the job file, metrics and results live: visible to every node of a multi-node job
    (MOONFORGE_LAUNCH_DIR, else beside the staging dir, which is in the store)."""
    base = os.environ.get("MOONFORGE_LAUNCH_DIR") or (
        str(Path(ctx.out).parent) if cfg.launcher.nnodes > 1 else None
    )
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-launch-{cfg.stage_name}-", dir=base))


def launch_stage(
    function: str,
    base: Checkpoint | None,
    data: Mapping[str, DatasetRef],
    cfg: StageConfig,
    ctx: StageContext,
) -> StageResult:
    """Run stage `function` ("module:name") under cfg.launcher and return rank 0's result."""
    check_launcher(cfg.launcher, ctx.device)
    plan = node_plan(cfg.launcher, os.environ) if cfg.launcher.nnodes > 1 else None
    work = _workdir(cfg, ctx)
    try:
        job = work / "job.json"
        rdzv_id = f"moonforge-{cfg.stage_name}-{uuid.uuid4().hex[:12]}"
        job.write_text(
            json.dumps(
                {
                    "function": function,
                    "kind": cfg.kind,
                    "cfg": cfg.model_dump(mode="json"),
                    "model": ctx.model.model_dump(mode="json"),
                    "out": str(ctx.out),
                    "workdir": str(work),
                    "base": str(base.path) if base else None,
                    "device": ctx.device,
                    "resume_from": str(ctx.resume_from) if ctx.resume_from else None,
                    "init": {k: str(v) for k, v in ctx.init.items()},
                    "data": {n: [str(d.path), d.digest] for n, d in data.items()},
                    "ds_config": deepspeed_config(cfg, ctx.device)
                    if cfg.launcher.kind == "deepspeed"
                    else None,
                    "rdzv_id": rdzv_id,
                    "pythonpath": _pythonpath(),
                },
                indent=1,
            )
        )
        cmd, extra = launch_command(cfg, job, rdzv_id)
        rc, tail = _run(cmd, cfg, ctx, extra)
        _replay_metrics(work / "metrics.jsonl", ctx)
        if rc != 0:
            raise _failure(cfg, rc, tail, work, plan)
        res = json.loads((work / "result.json").read_text())
        return StageResult(Checkpoint(Path(res["checkpoint"])), res["metrics"], tuple(res["data_used"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _pythonpath(extra: str = "") -> str:
    """The child imports what this process imports (the package, and e.g. a test's stage module)."""
    return os.pathsep.join([p for p in sys.path if p] + ([extra] if extra else []))


def _run(
    cmd: list[str], cfg: StageConfig, ctx: StageContext, extra_env: Mapping[str, str] | None = None
) -> tuple[int, list[str]]:
    """Start the launcher in its own session, stream its output, return (exit code, last lines)."""
    env = {**os.environ, **(extra_env or {})}
    env["PYTHONPATH"] = _pythonpath(env.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    log.info("%s: launching %s", cfg.stage_name, " ".join(cmd))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    tail: collections.deque[str] = collections.deque(maxlen=40)
    assert proc.stdout is not None  # stdout=PIPE
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(PROGRESS_PREFIX):
                done, total, desc = line[len(PROGRESS_PREFIX) :].split(" ", 2)
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

        _KNOWN_ERRORS.update(
            NonFiniteLossError=NonFiniteLossError,
            ValueError=ValueError,
            KeyError=KeyError,
            FileNotFoundError=FileNotFoundError,
        )
    return _KNOWN_ERRORS


_RDZV_ERRORS = re.compile(
    r"RendezvousTimeoutError|RendezvousConnectionError|"
    r"connection to the C10d store has failed|RendezvousClosedError"
)


def _failure(
    cfg: StageConfig, rc: int, tail: list[str], work: Path, plan: NodePlan | None = None
) -> BaseException:
    """The error a failed launch becomes: a rank's own error type when it raised a known one
    (NaN loss, config errors), else LaunchFailed naming the exit, and the signal when a rank was
    killed (the surviving ranks' "connection closed" errors are only collateral); on several
    nodes, a rendezvous that never completed (naming the endpoint) or a lost node."""
    la = cfg.launcher
    errs = [json.loads(p.read_text()) for p in sorted(work.glob("error-rank*.json"))]
    for err in errs:
        cls = _known_errors().get(err["type"])
        if cls is not None:
            return cls(f"{err['message']} (rank {err['rank']} of {la.world_size} under {la.kind})")
    text = "\n".join(tail)
    if la.nnodes > 1 and not errs and _RDZV_ERRORS.search(text):
        where = plan.endpoint if plan else "the rendezvous endpoint"
        last = "\n  ".join(tail[-8:])
        return LaunchFailed(
            f"stage {cfg.stage_name!r}: the {la.nnodes} nodes did not meet at the rendezvous "
            f"{where} within {la.rdzv_timeout_s} s (launcher.rdzv_timeout_s); check that it is node "
            f"0's address, that its port is open to every node, and that every node started "
            f"(python -m {NODE_MODULE} node JOB.json). Last output:\n  {last}"
        )
    codes = [int(c) for c in re.findall(r"(?:exitcode|return code)\s*[:=]\s*(-?\d+)", text)]
    codes += [rc] if rc < 0 else []
    sig = next((-c for c in codes if c < 0), None)
    last = "\n  ".join(tail[-12:])
    if sig is not None or len(errs) < la.world_size:
        dead = sorted(set(range(la.world_size)) - {e["rank"] for e in errs})
        # The launcher may kill the surviving ranks before they report, so several can show dead.
        who = (
            f"ranks {', '.join(map(str, dead))} were"
            if len(dead) > 1
            else f"rank {dead[0] if dead else '?'} was"
        )
        why = (
            f"{who} killed"
            + (f" by {signal.Signals(sig).name}" if sig else "")
            + " (out of memory, a cancelled or preempted job)"
        )
        if la.nnodes > 1 and sig is None:
            why = (
                f"{who} lost: with {la.nnodes} nodes this means a node died, was preempted or "
                "dropped off the network"
            )
        if errs:
            why += f"; the other ranks then failed with {errs[0]['type']}"
    else:
        err = errs[0]
        why = f"rank {err['rank']} raised {err['type']}: {err['message']}\n{err['traceback'][-1500:]}"
    return LaunchFailed(
        f"stage {cfg.stage_name!r}: the {la.kind} launcher ({la.world_size} processes) failed "
        f"with exit code {rc}: {why}. Last output:\n  {last}\nRerunning the stage resumes from "
        f"its last periodic checkpoint (checkpoint_every), at any world size."
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- one node of a multi-node launch ------------------------------------------------------------


def node_main(argv: list[str] | None = None) -> int:
    """`python -m moonforge.registry.launch node JOB.json [--node-rank R]`: run this machine's
    launcher for a job file another node wrote (srun runs it on every node under Slurm)."""
    from moonforge.stages.stage_configs import STAGE_CONFIGS

    doc = node_main.__doc__ or ""  # None under python -OO
    ap = argparse.ArgumentParser(prog=f"python -m {NODE_MODULE} node", description=doc.partition("\n")[0])
    ap.add_argument("job", type=Path, help="job.json on a filesystem every node sees")
    ap.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="this node's rank (default: SLURM_NODEID, JOB_COMPLETION_INDEX, NODE_RANK)",
    )
    args = ap.parse_args(argv)
    try:
        job = json.loads(args.job.read_text())
        la = STAGE_CONFIGS[job["kind"]].model_validate(job["cfg"]).launcher
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (job.get("pythonpath", ""), env.get("PYTHONPATH", "")) if p
        )
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        if la.nnodes == 1:
            cmd = single_node_command(la, args.job)
        else:
            plan = node_plan(la, env, args.node_rank)
            env["MOONFORGE_NODE_RANK"] = str(plan.node_rank)
            print(
                f"moonforge node {plan.node_rank} of {plan.nnodes} on {socket.gethostname()}: "
                f"rendezvous {plan.endpoint} ({plan.source})",
                flush=True,
            )
            cmd = node_command(la, plan, args.job, job["rdzv_id"])
    except (OSError, ValueError, KeyError) as e:
        print(f"moonforge node: {args.job}: {e}", file=sys.stderr)
        return 2
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    if sys.argv[1:2] != ["node"]:
        sys.exit(f"usage: python -m {NODE_MODULE} node JOB.json [--node-rank R]")
    sys.exit(node_main(sys.argv[2:]))

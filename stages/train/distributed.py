"""Data parallelism inside a launched training process: torchrun (DDP semantics) or DeepSpeed ZeRO.

The flow process never trains distributed itself: registry/launch.py starts `torchrun` (for
DeepSpeed too) on `python -m moonforge.stages.train.distributed JOB.json`, and `main` below
runs the stage function once per rank with `ctx.parallel` set. The loop (stages/train/loop.py)
then asks `Parallel` for:
- its share of a step: every world_size-th micro-batch (the global batch is fixed, so the mean of
  the per-rank mean gradients is the single-process gradient);
- gradient averaging: torchrun = one coalesced all-reduce after the last micro-batch (what DDP
  does, without the backward overlap; the loop's loss functions call submodules such as
  `model.lm`, which a DDP wrapper would hide); deepspeed = the ZeRO engine (reduce-scatter,
  sharded optimizer state, `ZeroMuonAdamW` as its client optimizer);
- metric means, MoE router-load sums (so the aux-loss-free bias step sees the global load),
  and checkpoints written by rank 0 in the single-process format.
With `launcher.context_parallel` = n > 1, each run of n consecutive ranks is one context-parallel
group (model/context_parallel.py): its ranks build and take the same micro-batches (data
parallelism runs over the world_size / n groups) and each keeps a slice of every sequence. Their
gradients are partial sums, so the all-reduce adds them and divides by the data-parallel size.
Only rank 0 writes into the artifact directory; other ranks get a scratch `ctx.out`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moonforge.model.context_parallel import ContextParallel
from moonforge.stages.config import LauncherConfig, OptimizerConfig
from moonforge.stages.train.host_memory import keep_freed_memory

PROGRESS_PREFIX = "@@moonforge-progress "
"""stdout lines the parent turns into progress callbacks (rank 0 only)."""


@dataclass
class Parallel:
    """This process's place in a data-parallel job; passed explicitly via StageContext.parallel."""

    rank: int
    world_size: int
    engine: str
    """"torchrun" (all-reduce, replicated optimizer) or "deepspeed" (ZeRO)."""
    zero_stage: int = 0
    ds_config: dict | None = None
    """Generated DeepSpeed config (registry/launch.py `deepspeed_config`); deepspeed only."""
    writer_rank: int = 0
    """The rank that writes checkpoints and the artifact: local rank 0 of node 0 (the flow's node;
    a multi-node c10d rendezvous may give global rank 0 to another node)."""
    cp_size: int = 1
    """Ranks per context-parallel group (consecutive ranks); 1 = no context parallelism."""
    cp_group: Any = None
    """This rank's context-parallel process group (cp_size > 1)."""

    @property
    def is_writer(self) -> bool:
        return self.rank == self.writer_rank

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: groups of ranks that read different micro-batches."""
        return self.world_size // self.cp_size

    @property
    def dp_rank(self) -> int:
        """This rank's replica; the ranks of one context-parallel group share it (and its data)."""
        return self.rank // self.cp_size

    @property
    def context(self) -> ContextParallel | None:
        """What the model needs to shard its sequences; None without context parallelism."""
        if self.cp_size == 1:
            return None
        return ContextParallel(self.rank % self.cp_size, self.cp_size, self.cp_group)

    def my_share(self, micro_batches: list[Any]) -> list[Any]:
        """This rank's micro-batches of the step (its replica's, under context parallelism).
        Refused unless every replica gets as many: a rank with fewer (or none) would reach the
        step's collectives out of order and hang the job."""
        if len(micro_batches) % self.dp_size:
            raise ValueError(
                f"{len(micro_batches)} micro-batch(es) per step cannot be shared by "
                f"{self.dp_size} ranks; make the stage's micro-batches per step a multiple of "
                f"{self.dp_size} (a smaller micro_batch_size) or launch fewer processes"
            )
        return micro_batches[self.dp_rank :: self.dp_size]

    def mean_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        keys = sorted(totals)
        t = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def average_gradients(self, params: list[Tensor]) -> None:
        """All-reduce-mean every gradient over the replicas (a context-parallel group's ranks
        hold partial sums: the all-reduce adds them). A parameter keeps grad None only if it has
        none on every rank (e.g. an expert no token of the global step reached), as in one
        process."""
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [p for p, h in zip(params, has.tolist()) if h]
        grads: list[Tensor] = []
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        if not live:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(self.dp_size)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    def sum_router_loads(self, lm: nn.Module) -> None:
        """Sum MoE routers' load counts over ranks before the bias step (the global load)."""
        loads = (getattr(m, "load_counts", None) for m in lm.modules())
        counts = [c for c in loads if isinstance(c, Tensor)]
        if counts:
            flat = _flatten_dense_tensors(counts)
            dist.all_reduce(flat)
            for c, synced in zip(counts, _unflatten_dense_tensors(flat, counts)):
                c.copy_(synced)

    def build_optimizer(
        self,
        model: nn.Module,
        named_params: list[tuple[str, nn.Parameter]],
        cfg: OptimizerConfig,
        grad_accum: int,
    ):
        """The loop's optimizer: MuonAdamW (torchrun) or a DeepSpeed ZeRO engine around ZeroMuonAdamW.
        `grad_accum`: the step's micro-batches over all ranks (each replica runs 1 / dp_size)."""
        from moonforge.stages.train.optim import MuonAdamW

        if self.engine == "torchrun":
            return MuonAdamW(named_params, cfg)
        return DeepSpeedOptimizer(model, named_params, cfg, self, grad_accum)

    def gather_state(self, optimizer) -> dict:
        """Single-process-format optimizer state (collective for ZeRO)."""
        return optimizer.state_dict()

    def gather_objects(self, obj: Any) -> list[Any]:
        """`obj` of every rank in rank order (a collective: every rank calls it), e.g. each
        rank's data position for the checkpoint, or its part of a dataset check."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


class DeepSpeedOptimizer:
    """The loop's optimizer interface (set_lr / zero_grad / step / state_dict) over a ZeRO engine."""

    def __init__(
        self,
        model: nn.Module,
        named_params: list[tuple[str, nn.Parameter]],
        cfg: OptimizerConfig,
        par: Parallel,
        grad_accum: int,
    ) -> None:
        # DeepSpeed's start-up broadcast views every parameter as bytes, which a 0-dim tensor
        # cannot do, and ZeRO re-points parameters at its flat buffer with the shapes it saw at
        # start-up: a scalar passed through as a 1-element vector comes back as one after the
        # first step, and its backward then fails. moonforge's own scalars are 1-element vectors.
        scalars = [n for n, q in model.named_parameters() if q.dim() == 0]
        if scalars:
            raise ValueError(
                f"DeepSpeed ZeRO cannot train 0-dim parameters ({', '.join(scalars)}); make them "
                "1-element vectors, or set launcher.kind: torchrun"
            )
        import deepspeed

        from moonforge.stages.train.zero_muon import ZeroMuonAdamW

        per_rank = grad_accum // par.dp_size
        ds_cfg = dict(par.ds_config or {})
        micro = ds_cfg.get("train_micro_batch_size_per_gpu", 1)
        ds_cfg.update(
            gradient_accumulation_steps=per_rank, train_batch_size=micro * per_rank * par.world_size
        )
        self.client = ZeroMuonAdamW(named_params, cfg)
        if hasattr(model, "reach_media_params"):  # every rank's backward reaches the same params
            setattr(model, "reach_media_params", True)  # noqa: B010 - a VLM's, not every model's
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.client, config=ds_cfg)
        self.optimizers = [self.client]
        self.per_rank = per_rank

    def set_lr(self, lr: float) -> None:
        for g in self.client.param_groups:
            g["lr"] = lr

    def zero_grad(self) -> None:
        pass  # the engine clears its (partitioned) gradients after each step

    def backward(self, loss: Tensor, last: bool) -> None:
        """engine.backward scales by 1/gradient_accumulation_steps itself; step() between
        micro-batches only advances the engine's micro-step counter."""
        self.engine.backward(loss)
        if not last:
            self.engine.step()

    def step(self) -> float:
        """Reduce, clip (engine's global norm), update; returns the pre-clip gradient norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def state_dict(self) -> dict:
        return self.client.full_state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.client.load_full_state_dict(state)


# -- the launched process -------------------------------------------------------------------------


def init_parallel(launcher: LauncherConfig, device: str, ds_config: dict | None) -> Parallel:
    """Join the process group the launcher described in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT): the one place that reads it."""
    backend = (
        launcher.backend if launcher.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    )
    if launcher.kind == "deepspeed":
        import deepspeed
        import deepspeed.ops

        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU *inference* on first init
        # (~80 s on 2 cores); training uses the gloo collectives, so skip the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend=backend)
    rank = dist.get_rank()
    # MOONFORGE_NODE_RANK: set by the node launcher (registry/launch.py) on multi-node runs.
    local = os.environ.get("LOCAL_RANK")
    mine = os.environ.get("MOONFORGE_NODE_RANK", "0") == "0" and (
        local == "0" if local is not None else rank == 0
    )
    writer = torch.tensor([rank if mine else -1], device=device if backend == "nccl" else "cpu")
    dist.all_reduce(writer, op=dist.ReduceOp.MAX)
    world, cp = dist.get_world_size(), launcher.context_parallel
    cp_group = None
    if cp > 1:  # consecutive ranks (one node's GPUs first): the gathers stay on the fast links
        for first in range(0, world, cp):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(first, first + cp)))
            if first <= rank < first + cp:
                cp_group = g
    return Parallel(
        rank,
        world,
        launcher.kind,
        launcher.zero_stage,
        ds_config,
        writer_rank=max(int(writer), 0),
        cp_size=cp,
        cp_group=cp_group,
    )


def _import(ref: str):
    module, name = ref.split(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class JsonlSink:
    """Rank 0's metric sink: rows appended to a file the parent replays into MLflow."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def log(self, step: int, metrics) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "metrics": {k: float(v) for k, v in metrics.items()}}) + "\n")

    def flush(self) -> None:
        pass


def _progress(done: int, total: int, desc: str) -> None:
    print(f"{PROGRESS_PREFIX}{done} {total} {desc}", flush=True)


def main(job_path: str) -> int:
    """Run one rank of a launched stage from the job file registry/launch.py wrote."""
    from moonforge.model.config import VLMConfig
    from moonforge.stages.artifacts import Checkpoint, DatasetRef, ListSink, StageContext
    from moonforge.stages.stage_configs import STAGE_CONFIGS

    keep_freed_memory()
    job = json.loads(Path(job_path).read_text())
    work = Path(job["workdir"])
    cfg = STAGE_CONFIGS[job["kind"]].model_validate(job["cfg"])
    device = job["device"]
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    par = init_parallel(cfg.launcher, device, job.get("ds_config"))
    writer = par.is_writer
    out = Path(job["out"]) if writer else work / f"rank{par.rank}"
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        out=out,
        model=VLMConfig.model_validate(job["model"]),
        sink=JsonlSink(work / "metrics.jsonl") if writer else ListSink(),
        progress=_progress if writer else (lambda *a: None),
        device=device,
        resume_from=Path(job["resume_from"]) if job["resume_from"] else None,
        parallel=par,
        init={k: Path(v) for k, v in job.get("init", {}).items()},
    )
    base = Checkpoint(Path(job["base"])) if job["base"] else None
    data = {n: DatasetRef(n, Path(p), d) for n, (p, d) in job["data"].items()}
    try:
        result = _import(job["function"])(base, data, cfg, ctx)
    except BaseException as e:
        (work / f"error-rank{par.rank}.json").write_text(
            json.dumps(
                {
                    "type": type(e).__name__,
                    "message": str(e),
                    "rank": par.rank,
                    "traceback": traceback.format_exc(),
                }
            )
        )
        raise
    if writer:
        (work / "result.json").write_text(
            json.dumps(
                {
                    "checkpoint": str(result.checkpoint.path),
                    "metrics": result.metrics,
                    "data_used": list(result.data_used),
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

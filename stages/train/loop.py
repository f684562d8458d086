"""The one training loop every stage uses: `train_step` plus a short `train` driver.

A stage supplies a batch iterator and a `loss_fn(model, batch) -> (loss, metrics)`; the loop does
gradient accumulation, bf16 autocast on CUDA (fp32 on CPU: bf16 matmuls are ~50x slower there),
grad clipping, the LR schedule, the MoE router-bias update, NaN checks, periodic checkpoints and
metric/progress reporting through the StageContext. There is no Trainer class.

A stage with several phases (SFT phases, long_context sub-stages) calls `train` once per phase
with `TrainSpec.phase` = its index. Checkpoints record (phase, step), so a resumed run skips the
phases that had finished, continues the interrupted one at its step (weights, optimizer, RNG,
data position) and starts the later ones fresh: the final weights equal an unbroken run's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moonforge.model.config import VLMConfig
from moonforge.stages.artifacts import StageContext
from moonforge.stages.config import OptimizerConfig, ScheduleConfig
from moonforge.stages.train.checkpoint import (
    TrainRecord,
    latest_train_state,
    read_train_record,
    read_train_state,
    restore_rng,
    save_train_state,
)
from moonforge.stages.train.freeze import GROUPS
from moonforge.stages.train.optim import MuonAdamW
from moonforge.stages.train.schedule import lr_multiplier

LossFn = Callable[[nn.Module, Any], tuple[Tensor, dict[str, float]]]


class NonFiniteLossError(RuntimeError):
    """The loss went NaN/inf. Never retried: the run is numerically broken, not unlucky."""


@dataclass(frozen=True)
class TrainSpec:
    """What one training phase needs beyond the model and data."""

    num_steps: int
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    trainable: tuple[str, ...]
    grad_accum: int = 1
    router_bias_update: float = 0.0
    log_every: int = 10
    checkpoint_every: int | None = None
    step_offset: int = 0
    """Global step of this phase's first step (sub-stages share one metric axis)."""
    label: str = "train"
    """Progress-bar label and metric prefix."""
    phase: int = 0
    """Index of this phase within the stage (SFT phase, long_context sub-stage): what resume
    compares with the checkpoint's phase. Each train() call of one stage needs its own."""


@dataclass
class TrainState:
    model: nn.Module
    optimizer: Any
    """MuonAdamW, or what par.build_optimizer returns (a DeepSpeed engine's wrapper, which
    has its own backward); None for a phase skipped on resume (it had finished before the crash)."""
    spec: TrainSpec
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    """Metrics of each step this call ran; when it ran none because the phase had finished before
    a crash, the last step's metrics from the checkpoint (so history[-1] is always there)."""
    earlier: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Finished earlier phases {index: {"steps", "last", "extra"}}, recorded in this phase's
    checkpoints."""


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def train_step(
    state: TrainState,
    micro_batches: list[Any],
    loss_fn: LossFn,
    device: str,
    par=None,
    *,
    weights: Sequence[float] | None = None,
    lr: float | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """One optimizer step over `micro_batches` (gradient accumulation); returns step metrics.

    `par` (a stages.train.distributed.Parallel, None = one process): this rank runs only its
    share of the micro-batches and gradients / metrics / router loads are averaged over ranks.
    `weights`: the step's loss is sum_i weights[i] * loss_i (RL weights its forwards by their
    share of the prompt groups); None = the mean over micro-batches. `lr`: this step's learning
    rate when the caller schedules it (RL: per iteration); None = the spec's schedule at
    state.step.
    """
    spec, model, opt = state.spec, state.model, state.optimizer
    if opt is None:
        raise RuntimeError(f"{spec.label}: no optimizer (this phase was skipped on resume)")
    if lr is None:
        lr = spec.optimizer.lr * lr_multiplier(state.step, spec.num_steps, spec.schedule)
    opt.set_lr(lr)
    opt.zero_grad()
    mine = micro_batches if par is None else par.my_share(micro_batches)
    per_rank = getattr(opt, "per_rank", None)  # a DeepSpeed engine steps every per_rank backwards
    if per_rank is not None and len(mine) != per_rank:
        raise RuntimeError(
            f"{spec.label}: this rank has {len(mine)} micro-batch(es) in the step but the DeepSpeed "
            f"engine was built to accumulate {per_rank}: it would step mid-way with part of the "
            "gradient; build_optimizer takes the step's micro-batches over all ranks"
        )
    # a micro-batch's weight over all ranks; ranks' gradients and metrics are then averaged
    share = None if weights is None else [w * (1 if par is None else par.dp_size) for w in weights]
    mine_share = share if share is None or par is None else par.my_share(share)
    totals: dict[str, float] = {}
    for i, mb in enumerate(mine):
        with _autocast(device):
            loss, metrics = loss_fn(model, mb)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{spec.label}: loss is {loss.item()} at step {spec.step_offset + state.step}; "
                "lower the learning rate or check the data"
            )
        if hasattr(opt, "backward"):  # a DeepSpeed engine accumulates (and divides by len) itself
            ds_loss = loss if mine_share is None else loss * (mine_share[i] * len(mine))
            if par is not None and par.cp_size > 1:  # the engine averages over every rank, but a
                ds_loss = ds_loss * par.cp_size  # context-parallel group's gradients must add up
            opt.backward(ds_loss, last=i == len(mine) - 1)
        else:
            _part(loss, i, len(mine), mine_share).backward()
        totals["loss"] = totals.get("loss", 0.0) + _part(loss.item(), i, len(mine), mine_share)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + _part(float(v), i, len(mine), mine_share)
    if par is not None:
        totals = par.mean_metrics(totals)
    grad_norm = _clip_and_step(state, par)
    # routers count loads in train mode only (RL and long2short keep eval mode: nothing to update)
    lm: Any = getattr(model, "lm", None)
    if "lm" in spec.trainable and model.training and hasattr(lm, "update_router_biases"):
        if par is not None:
            par.sum_router_loads(lm)
        totals.update(lm.update_router_biases(spec.router_bias_update))
    totals.update({"lr": lr, "grad_norm": grad_norm})
    state.step += 1
    return state, totals


def _part(x: Any, i: int, n: int, share: Sequence[float] | None) -> Any:
    """Micro-batch i's part of the step: x / n for equal shares (bit for bit what the loop did
    before weights existed), x * share[i] for weighted ones."""
    return x / n if share is None else x * share[i]


def _clip_and_step(state: TrainState, par) -> float:
    """Average gradients over ranks (torchrun), clip to the global norm, step; returns the norm.
    Under DeepSpeed the engine reduces, clips and checks in its step (norm checked after)."""
    spec, opt = state.spec, state.optimizer
    where = f"{spec.label}: gradient norm is {{}} at step {spec.step_offset + state.step}; "
    if hasattr(opt, "backward"):
        grad_norm = opt.step()
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(where.format(grad_norm) + "lower the learning rate")
        return grad_norm
    params = [p for g in opt.optimizers for pg in g.param_groups for p in pg["params"]]
    if par is not None:
        par.average_gradients(params)
    clip = spec.optimizer.grad_clip or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(where.format(grad_norm) + "lower the learning rate")
    opt.step()
    return grad_norm


def set_train_mode(model: nn.Module, trainable: tuple[str, ...]) -> None:
    """Train mode for trainable groups only: frozen groups keep eval-mode buffers untouched."""
    model.train()
    for g in GROUPS:
        if g not in trainable:
            getattr(model, g).eval()


def train(
    model: nn.Module,
    named_params: list[tuple[str, nn.Parameter]],
    batches: Iterator[Any],
    loss_fn: LossFn,
    spec: TrainSpec,
    ctx: StageContext,
    model_cfg: VLMConfig,
) -> TrainState:
    """Run `spec.num_steps` optimizer steps; log every `log_every`; checkpoint every
    `checkpoint_every` steps and at the end of the phase.

    With ctx.resume_from (a periodic checkpoint of this stage at phase p, step s): a phase before
    p is skipped (its step count and last metrics come from the checkpoint), phase p continues at
    step s, a later phase starts fresh. A batch iterator with state_dict()/load_state_dict() has
    its position saved in the checkpoint; any other is fast-forwarded by drawing s batches.
    """
    par = ctx.parallel
    # A resume point that is gone was rotated out by a newer checkpoint of this very run: we are
    # past it (a later phase), so this phase starts fresh.
    path = ctx.resume_from if ctx.resume_from is not None and ctx.resume_from.exists() else None
    resume = read_train_record(path) if path is not None else None
    if resume is not None and spec.phase < resume.phase:  # finished before the crash
        done = resume.phases.get(spec.phase) or {}
        steps = int(done.get("steps", spec.num_steps))
        _fast_forward(batches, TrainRecord(steps, extra=done.get("extra") or {}), spec)
        return TrainState(model, None, spec, steps, [dict(done.get("last") or {})], dict(resume.phases))
    record = None
    if path is not None and resume is not None and spec.phase == resume.phase:
        # weights before the optimizer: ZeRO copies them at init
        record = read_train_state(model, path, restore_rng=False)
    optimizer = (
        MuonAdamW(named_params, spec.optimizer)
        if par is None
        else par.build_optimizer(model, named_params, spec.optimizer, spec.grad_accum)
    )
    state = TrainState(model, optimizer, spec, earlier=_earlier_phases(spec, ctx, record))
    if path is not None and record is not None:
        state.optimizer.load_state_dict(record.optimizer)
        state.step = record.step
        if record.step >= spec.num_steps:  # finished before the crash: nothing left to run
            state.history.append(dict(record.last))
        _fast_forward(batches, record, spec)
        restore_rng(path)  # after the fast-forward: as if the steps had just run
    set_train_mode(model, spec.trainable)
    with sequence_sharding(model, par):
        _run(state, batches, loss_fn, ctx, model_cfg, par)
    ctx.sink.flush()
    model.eval()
    return state


@contextmanager
def sequence_sharding(model: nn.Module, par) -> Iterator[None]:
    """Under context parallelism (par.cp_size > 1), the model's LM keeps its slice of every
    sequence while the block runs (model/context_parallel.py); evaluation after it sees the
    whole sequence again."""
    cp = par.context if par is not None else None
    lm: Any = getattr(model, "lm", None)
    if cp is None:
        yield
        return
    if not hasattr(lm, "context_parallel"):
        raise ValueError(
            f"launcher.context_parallel={cp.size} needs a model whose LM shards sequences "
            f"(moonforge's MoELM); {type(model).__name__} has none"
        )
    lm.context_parallel = cp
    try:
        yield
    finally:
        lm.context_parallel = None


def _run(
    state: TrainState, batches: Iterator[Any], loss_fn: LossFn, ctx: StageContext, model_cfg, par
) -> None:
    """The step loop of `train`: step, log, checkpoint, report progress until the phase ends."""
    spec = state.spec
    t0 = time.perf_counter()
    while state.step < spec.num_steps:
        micro = [_to(next(batches), ctx.device) for _ in range(spec.grad_accum)]
        state, metrics = train_step(state, micro, loss_fn, ctx.device, par)
        metrics["seconds"] = time.perf_counter() - t0
        state.history.append(metrics)
        gstep = spec.step_offset + state.step
        if state.step % spec.log_every == 0 or state.step == spec.num_steps:
            ctx.sink.log(gstep, {f"{spec.label}/{k}": v for k, v in metrics.items()})
        if spec.checkpoint_every and (
            state.step % spec.checkpoint_every == 0 or state.step == spec.num_steps
        ):
            _checkpoint(state, model_cfg, ctx, batches)
        ctx.progress(state.step, spec.num_steps, spec.label)


def _earlier_phases(spec: TrainSpec, ctx: StageContext, record: TrainRecord | None) -> dict:
    """Summaries of the phases before this one: from the checkpoint resumed, else from the end
    checkpoint the previous phase left in ctx.out (each phase checkpoints when it finishes)."""
    if record is not None:
        return dict(record.phases)
    if spec.phase == 0 or not spec.checkpoint_every:
        return {}
    prev = latest_train_state(ctx.out)
    if prev is None:
        return {}
    rec = read_train_record(prev)
    if rec.phase >= spec.phase:
        return {}
    return {**rec.phases, rec.phase: {"steps": rec.step, "last": rec.last, "extra": rec.extra}}


def _fast_forward(batches: Iterator[Any], record: TrainRecord, spec: TrainSpec) -> None:
    """Put the batch iterator where an unbroken run would be after record.step steps (a skipped
    phase's too, so its data metrics match)."""
    saved = record.extra.get("batches")
    if saved is not None and hasattr(batches, "load_state_dict"):
        batches.load_state_dict(saved)
        return
    for _ in range(record.step * spec.grad_accum):
        next(batches)


def _checkpoint(state: TrainState, model_cfg: VLMConfig, ctx: StageContext, batches: Any) -> None:
    par, spec = ctx.parallel, state.spec
    data = batches.state_dict() if hasattr(batches, "state_dict") else None
    if par is None:
        opt: Any = state.optimizer
    else:
        if data is not None:  # each replica reads its own share of the data: keep every position
            # (collective: every rank calls); a context-parallel group's ranks hold the same one
            data = {"ranks": par.gather_objects(data)[:: par.cp_size]}
        opt = _Saved(par.gather_state(state.optimizer))  # collective under ZeRO: every rank calls
        if not par.is_writer:
            return
    extra = {"batches": data} if data is not None else {}
    save_train_state(
        state.model,
        model_cfg,
        opt,
        state.step,
        ctx.out,
        phase=spec.phase,
        global_step=spec.step_offset + state.step,
        num_steps=spec.num_steps,
        last=state.history[-1] if state.history else {},
        phases=state.earlier,
        extra=extra,
    )


@dataclass
class _Saved:
    """An already-gathered optimizer state, passed where save_train_state wants an optimizer."""

    state: dict

    def state_dict(self) -> dict:
        return self.state


def _to(batch: Any, device: str) -> Any:
    return batch.to(device) if hasattr(batch, "to") and device != "cpu" else batch

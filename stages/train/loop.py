"""The one training loop every stage uses: `train_step` plus a short `train` driver.

A stage supplies a batch iterator and a `loss_fn(model, batch) -> (loss, metrics)`; the loop does
gradient accumulation, bf16 autocast on CUDA (fp32 on CPU: bf16 matmuls are ~50x slower there),
grad clipping, the LR schedule, the MoE router-bias update, NaN checks, periodic checkpoints and
metric/progress reporting through the StageContext. There is no Trainer class.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from moonforge.model.config import VLMConfig
from moonforge.stages.artifacts import StageContext
from moonforge.stages.config import OptimizerConfig, ScheduleConfig
from moonforge.stages.train.checkpoint import read_train_state, save_train_state
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


@dataclass
class TrainState:
    model: nn.Module
    optimizer: MuonAdamW
    spec: TrainSpec
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def train_step(state: TrainState, micro_batches: list[Any], loss_fn: LossFn,
               device: str, par=None) -> tuple[TrainState, dict[str, float]]:
    """One optimizer step over `micro_batches` (gradient accumulation); returns step metrics.

    `par` (a stages.train.distributed.Parallel, None = one process): this rank runs only its
    share of the micro-batches and gradients / metrics / router loads are averaged over ranks.
    """
    spec, model, opt = state.spec, state.model, state.optimizer
    lr = spec.optimizer.lr * lr_multiplier(state.step, spec.num_steps, spec.schedule)
    opt.set_lr(lr)
    opt.zero_grad()
    mine = micro_batches if par is None else par.my_share(micro_batches)
    totals: dict[str, float] = {}
    for i, mb in enumerate(mine):
        with _autocast(device):
            loss, metrics = loss_fn(model, mb)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{spec.label}: loss is {loss.item()} at step {spec.step_offset + state.step}; "
                "lower the learning rate or check the data"
            )
        if hasattr(opt, "backward"):  # a DeepSpeed engine accumulates (and scales) itself
            opt.backward(loss, last=i == len(mine) - 1)
        else:
            (loss / len(mine)).backward()
        totals["loss"] = totals.get("loss", 0.0) + loss.item() / len(mine)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) / len(mine)
    if par is not None:
        totals = par.mean_metrics(totals)
    grad_norm = _clip_and_step(state, par)
    if "lm" in spec.trainable and hasattr(model.lm, "update_router_biases"):
        if par is not None:
            par.sum_router_loads(model.lm)
        totals.update(model.lm.update_router_biases(spec.router_bias_update))
    totals.update({"lr": lr, "grad_norm": grad_norm})
    state.step += 1
    return state, totals


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


def train(model: nn.Module, named_params: list[tuple[str, nn.Parameter]], batches: Iterator[Any],
          loss_fn: LossFn, spec: TrainSpec, ctx: StageContext, model_cfg: VLMConfig) -> TrainState:
    """Run `spec.num_steps` optimizer steps; log every `log_every`; checkpoint periodically."""
    par = ctx.parallel
    opt_state = None
    if ctx.resume_from is not None:  # weights before the optimizer: ZeRO copies them at init
        step, opt_state = read_train_state(model, ctx.resume_from)
    optimizer = (MuonAdamW(named_params, spec.optimizer) if par is None else
                 par.build_optimizer(model, named_params, spec.optimizer, spec.grad_accum))
    state = TrainState(model, optimizer, spec)
    if opt_state is not None:
        state.optimizer.load_state_dict(opt_state)
        state.step = step
        for _ in range(state.step * spec.grad_accum):  # keep the data order of an unbroken run
            next(batches)
    set_train_mode(model, spec.trainable)
    t0 = time.perf_counter()
    while state.step < spec.num_steps:
        micro = [_to(next(batches), ctx.device) for _ in range(spec.grad_accum)]
        state, metrics = train_step(state, micro, loss_fn, ctx.device, par)
        metrics["seconds"] = time.perf_counter() - t0
        state.history.append(metrics)
        gstep = spec.step_offset + state.step
        if state.step % spec.log_every == 0 or state.step == spec.num_steps:
            ctx.sink.log(gstep, {f"{spec.label}/{k}": v for k, v in metrics.items()})
        if spec.checkpoint_every and state.step % spec.checkpoint_every == 0:
            _checkpoint(state, model_cfg, ctx)
        ctx.progress(state.step, spec.num_steps, spec.label)
    ctx.sink.flush()
    model.eval()
    return state


def _checkpoint(state: TrainState, model_cfg: VLMConfig, ctx: StageContext) -> None:
    par = ctx.parallel
    if par is None:
        save_train_state(state.model, model_cfg, state.optimizer, state.step, ctx.out)
        return
    full = _Saved(par.gather_state(state.optimizer))  # collective under ZeRO: every rank calls
    if par.is_writer:
        save_train_state(state.model, model_cfg, full, state.step, ctx.out)


@dataclass
class _Saved:
    """An already-gathered optimizer state, passed where save_train_state wants an optimizer."""

    state: dict

    def state_dict(self) -> dict:
        return self.state


def _to(batch: Any, device: str) -> Any:
    return batch.to(device) if hasattr(batch, "to") and device != "cpu" else batch

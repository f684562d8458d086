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
from moonforge.stages.train.checkpoint import load_train_state, save_train_state
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
               device: str) -> tuple[TrainState, dict[str, float]]:
    """One optimizer step over `micro_batches` (gradient accumulation); returns step metrics."""
    spec, model, opt = state.spec, state.model, state.optimizer
    lr = spec.optimizer.lr * lr_multiplier(state.step, spec.num_steps, spec.schedule)
    opt.set_lr(lr)
    opt.zero_grad()
    totals: dict[str, float] = {}
    for mb in micro_batches:
        with _autocast(device):
            loss, metrics = loss_fn(model, mb)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{spec.label}: loss is {loss.item()} at step {spec.step_offset + state.step}; "
                "lower the learning rate or check the data"
            )
        (loss / len(micro_batches)).backward()
        totals["loss"] = totals.get("loss", 0.0) + loss.item() / len(micro_batches)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) / len(micro_batches)
    params = [p for g in opt.optimizers for pg in g.param_groups for p in pg["params"]]
    clip = spec.optimizer.grad_clip or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(
            f"{spec.label}: gradient norm is {grad_norm} at step {spec.step_offset + state.step}; "
            "lower the learning rate"
        )
    opt.step()
    if "lm" in spec.trainable and hasattr(model.lm, "update_router_biases"):
        totals.update(model.lm.update_router_biases(spec.router_bias_update))
    totals.update({"lr": lr, "grad_norm": grad_norm})
    state.step += 1
    return state, totals


def set_train_mode(model: nn.Module, trainable: tuple[str, ...]) -> None:
    """Train mode for trainable groups only: frozen groups keep eval-mode buffers untouched."""
    model.train()
    for g in GROUPS:
        if g not in trainable:
            getattr(model, g).eval()


def train(model: nn.Module, named_params: list[tuple[str, nn.Parameter]], batches: Iterator[Any],
          loss_fn: LossFn, spec: TrainSpec, ctx: StageContext, model_cfg: VLMConfig) -> TrainState:
    """Run `spec.num_steps` optimizer steps; log every `log_every`; checkpoint periodically."""
    state = TrainState(model, MuonAdamW(named_params, spec.optimizer), spec)
    if ctx.resume_from is not None:
        state.step = load_train_state(model, state.optimizer, ctx.resume_from)
        for _ in range(state.step * spec.grad_accum):  # keep the data order of an unbroken run
            next(batches)
    set_train_mode(model, spec.trainable)
    t0 = time.perf_counter()
    while state.step < spec.num_steps:
        micro = [_to(next(batches), ctx.device) for _ in range(spec.grad_accum)]
        state, metrics = train_step(state, micro, loss_fn, ctx.device)
        metrics["seconds"] = time.perf_counter() - t0
        state.history.append(metrics)
        gstep = spec.step_offset + state.step
        if state.step % spec.log_every == 0 or state.step == spec.num_steps:
            ctx.sink.log(gstep, {f"{spec.label}/{k}": v for k, v in metrics.items()})
        if spec.checkpoint_every and state.step % spec.checkpoint_every == 0:
            save_train_state(model, model_cfg, state.optimizer, state.step, ctx.out)
        ctx.progress(state.step, spec.num_steps, spec.label)
    ctx.sink.flush()
    model.eval()
    return state


def _to(batch: Any, device: str) -> Any:
    return batch.to(device) if hasattr(batch, "to") and device != "cpu" else batch

"""Hardware and parallel layout for `moonforge plan`: GPU types, the plan's what-if knobs, and the
data x context-parallel split of each stage over the GPUs. Pure arithmetic; see stages/plan.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from moonforge.stages.config import Frozen


class PlanError(ValueError):
    """A plan that cannot be made, with a message naming the option or field and the fix."""


@dataclass(frozen=True)
class GPUSpec:
    peak_tflops: float
    """Dense bf16 tensor-core peak (no sparsity), TFLOP/s."""
    memory_gb: float
    """HBM capacity, GB (1e9 bytes)."""


GPUS: dict[str, GPUSpec] = {
    "a100": GPUSpec(312.0, 80.0),  # A100 SXM 80GB
    "h100": GPUSpec(989.0, 80.0),  # H100 SXM
    "h200": GPUSpec(989.0, 141.0),  # same compute as H100, more HBM
    "b200": GPUSpec(2250.0, 180.0),
}
MEMORY_HEADROOM = 0.9
"""Usable share of HBM: the rest goes to the CUDA context, NCCL buffers, allocator fragmentation."""


class PlanConfig(Frozen):
    """Hardware and parallelism assumptions of a plan (what-if knobs, not recipe fields)."""

    gpu: str = "h100"
    """GPU type, one of GPUS."""
    num_gpus: int = Field(default=512, ge=1)
    """Total GPUs; each stage splits them into data x context parallel."""
    mfu: float = Field(default=0.4, gt=0.0, le=1.0)
    """Model FLOPs utilisation of training steps."""
    rollout_mfu: float = Field(default=0.1, gt=0.0, le=1.0)
    """MFU of RL / long2short sampling (decoding is memory-bandwidth-bound, so far below mfu)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters (0 = plain DDP)."""
    activation_checkpointing: bool = True
    """Full per-layer recompute: keep each layer's input, rebuild one layer's activations at a time."""
    context_parallel: bool = False
    """Plan the stages whose loss cannot shard a sequence (ViT pretraining, RL, long2short) as
    if they could (`moonforge plan --assume-cp`, a what-if); by default such a row that would
    need it is flagged with what would make it fit instead. LM-loss stages always may."""
    image_token_share: float = Field(default=0.3, ge=0.0, le=1.0)
    """Share of LM tokens that are image tokens in multimodal stages (k1.5's 30% vision-text)."""

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, v: str) -> str:
        if v.lower() not in GPUS:
            raise ValueError(f"unknown GPU type {v!r}; use one of {', '.join(GPUS)} (--gpu h100)")
        return v.lower()

    @property
    def spec(self) -> GPUSpec:
        return GPUS[self.gpu]


def plan_config(**kw) -> PlanConfig:
    """PlanConfig from CLI options; a bad value raises PlanError naming the option."""
    try:
        return PlanConfig(**kw)
    except ValidationError as e:
        msgs = [
            f"{CLI_OPTIONS.get(str(err['loc'][0]), err['loc'][0]) if err['loc'] else 'plan'}: "
            f"{err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"
            for err in e.errors()
        ]
        raise PlanError("; ".join(msgs)) from None


CLI_OPTIONS = {
    "gpu": "--gpu",
    "num_gpus": "--gpus",
    "mfu": "--mfu",
    "zero_stage": "--zero",
    "context_parallel": "--assume-cp",
}
"""PlanConfig field -> the `moonforge plan` option that sets it (for error messages)."""


# ----------------------------------------------------------------------------------------------
# layout


def choose_layout(
    name: str, rows: int, micro: int | None, seq_len: int, cfg: PlanConfig, fits
) -> tuple[int, int, int]:
    """(dp, cp, micro-batch per GPU): the smallest context-parallel degree cp (dividing num_gpus
    and seq_len) such that dp = num_gpus / cp divides `rows` and the memory check `fits(mb, cp)`
    passes; if none fits, the valid one with the largest cp, which keeps the least (the row is
    then flagged as not fitting)."""
    valid = []
    for cp in (c for c in range(1, cfg.num_gpus + 1) if cfg.num_gpus % c == 0 and seq_len % c == 0):
        dp = cfg.num_gpus // cp
        if rows % dp:
            continue
        per_rank = rows // dp
        mb = min(micro or per_rank, per_rank)
        if per_rank % mb:
            raise PlanError(
                f"stage {name!r}: {per_rank} sequences per GPU are not a multiple of "
                f"micro_batch_size={mb}; set stages.{name}.micro_batch_size to a divisor "
                f"of {per_rank}"
            )
        if fits(mb, cp):
            return dp, cp, mb
        valid.append((dp, cp, mb))
    if valid:
        return valid[-1]
    raise PlanError(
        f"stage {name!r}: a batch of {rows} sequences cannot be split over {cfg.num_gpus} GPUs "
        f"(the data-parallel size must divide the batch, and context parallelism can only split "
        f"each sequence over a divisor of the GPUs); use --gpus {_suggest_gpus(rows, seq_len, cfg.num_gpus)} "
        f"or change stages.{name}.batch_size"
    )


def _layout_exists(n: int, rows: int, seq_len: int) -> bool:
    return any(n % cp == 0 and seq_len % cp == 0 and rows % (n // cp) == 0 for cp in range(1, n + 1))


def _suggest_gpus(rows: int, seq_len: int, gpus: int) -> str:
    """The nearest GPU counts below and above `gpus` with a valid dp x cp layout for the stage."""
    below = next(n for n in range(gpus, 0, -1) if _layout_exists(n, rows, seq_len))  # n=1 always works
    above = next((n for n in range(gpus + 1, 4 * gpus + 1) if _layout_exists(n, rows, seq_len)), None)
    return f"{below}" if above is None else f"{below} or {above}"

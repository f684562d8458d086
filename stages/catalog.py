"""Stage kind -> stage function, imported lazily so that recipes validate without torch.

Every stage function has the contract
    fn(base: Checkpoint | None, data: Mapping[str, DatasetRef], cfg: <Kind>Config,
       ctx: StageContext) -> StageResult
and writes only under ctx.out.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

from moonforge.stages.stage_configs import STAGE_CONFIGS

LIFECYCLE = (
    "vit_pretrain",
    "align",
    "joint_pretrain",
    "cooldown",
    "long_context",
    "sft",
    "long_cot_sft",
    "rl",
    "long2short",
)
"""The nine canonical lifecycle stages, in order (lm_pretrain is the text-only pre-stage)."""

_FUNCTIONS: dict[str, str] = {
    "lm_pretrain": "moonforge.stages.lm_pretrain:lm_pretrain",
    "vit_pretrain": "moonforge.stages.vit_pretrain:vit_pretrain",
    "align": "moonforge.stages.align:align",
    "joint_pretrain": "moonforge.stages.joint_pretrain:joint_pretrain",
    "cooldown": "moonforge.stages.cooldown:cooldown",
    "long_context": "moonforge.stages.long_context:long_context",
    "sft": "moonforge.stages.sft:sft",
    "long_cot_sft": "moonforge.stages.long_cot_sft:long_cot_sft",
    "rl": "moonforge.stages.rl:rl",
    "long2short": "moonforge.stages.long2short:long2short",
}


class StageNotAvailable(RuntimeError):
    """A stage kind is declared in the recipe schema but this build has no function for it."""


def is_available(kind: str) -> bool:
    module, _ = _FUNCTIONS[kind].split(":")
    return importlib.util.find_spec(module) is not None


def stage_function(kind: str) -> Callable:
    """Import and return the function that runs stage `kind`."""
    if kind not in STAGE_CONFIGS:
        raise KeyError(f"unknown stage kind {kind!r}; known: {', '.join(STAGE_CONFIGS)}")
    if not is_available(kind):
        raise StageNotAvailable(
            f"stage {kind!r} is declared but not implemented in this version of moonforge; "
            f"run the lifecycle with --until <an earlier stage>"
        )
    module, fn = _FUNCTIONS[kind].split(":")
    return getattr(importlib.import_module(module), fn)

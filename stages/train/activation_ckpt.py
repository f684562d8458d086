"""Activation checkpointing per block, applied to a built model from outside (torchtitan's
apply_ac).

Each transformer block of the chosen parts keeps only its inputs during the forward and recomputes
its activations in the backward (torch.utils.checkpoint, non-reentrant): activation memory drops
from every block's intermediates to one block's plus the residual stream, for ~1/3 more compute.

What is unusual:
- Gated on `torch.is_grad_enabled()`, not on `module.training`: the align stage keeps the frozen
  LM in eval mode yet back-propagates through it (to the projector), so it still saves memory
  there; under no_grad (eval, generation) blocks run plainly.
- The block's own `forward` is replaced on the instance (a bound method, so a deep copy rebinds
  to the copy); parameter and state-dict names do not change, so optimizers, freezing, digests
  and checkpoints see the same model.
- A recomputed MoE forward must not count router loads twice: the recompute runs under
  `model.moe.paused_counting`.

Gradients with and without are equal (tests/test_activation_ckpt.py).
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from contextlib import nullcontext
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moonforge.model.moe import paused_counting

INNER_FORWARD = "_inner_forward"
"""Instance attribute a checkpointed block runs inside the checkpoint instead of its class's
forward, when set (the compiled forward: stages/train/compile_blocks.py)."""
BLOCKS = {"lm": ("layers",), "vision": ("blocks",), "caption": ("text_blocks", "dec_blocks")}
"""Per checkpointable part, the ModuleLists holding its blocks (the stage-1 towers have two)."""


def _contexts(block: nn.Module):
    return nullcontext(), paused_counting(block)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # the block's own forward, or the compiled one (compile_blocks.py compiles inside the
    # checkpoint: a compiled region cannot hold a checkpoint whose context_fn pauses counting)
    forward = self.__dict__.get(INNER_FORWARD) or type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    return checkpoint(
        forward, self, *args, use_reentrant=False, context_fn=partial(_contexts, self), **kwargs
    )


def checkpoint_block(block: nn.Module) -> None:
    """Make `block`'s forward recompute its activations in the backward (idempotent)."""
    block.forward = types.MethodType(_checkpointed_forward, block)


def is_checkpointed(block: nn.Module) -> bool:
    return (
        isinstance(block.__dict__.get("forward"), types.MethodType)
        and block.__dict__["forward"].__func__ is _checkpointed_forward
    )


def apply_ac(model: nn.Module, parts: Iterable[str]) -> int:
    """Checkpoint every block of `parts` (any of "lm", "vision", "caption") of a VLM; returns the
    number of blocks wrapped.

    Raises ValueError for a part that has no blocks to checkpoint (e.g. "projector": one MLP,
    nothing to recompute per block) or that the model does not have.
    Example: apply_ac(vlm, ("lm", "vision")) on the tiny recipe wraps 3 + 2 blocks.
    """
    count = 0
    for part in parts:
        if part not in BLOCKS:
            raise ValueError(
                f"activation checkpointing works per transformer block; {part!r} "
                f"has none (checkpointable parts: {', '.join(BLOCKS)})"
            )
        module = getattr(model, part, None)
        lists = [getattr(module, name, None) for name in BLOCKS[part]]
        block_lists = [ml for ml in lists if isinstance(ml, nn.ModuleList)]
        if module is None or len(block_lists) < len(lists):
            raise ValueError(
                f"activation checkpointing of {part!r}: the model has no "
                f"{part}.{'/'.join(BLOCKS[part])} block list to wrap"
            )
        for blocks in block_lists:
            for block in blocks:
                checkpoint_block(block)
                count += 1
    return count

"""torch.compile per LM block, applied to a built model from outside (torchtitan's apply_compile).

Each decoder block of the LM is compiled on its own (`nn.Module.compile`): the blocks share one
code object, so one graph serves them all, and a graph break in one block cannot spill into the
loop around them. Inductor fuses the elementwise work between the matmuls (RMSNorm, RoPE,
SwiGLU, the router's sigmoid / top-k bookkeeping), which is where eager CPU time goes besides
the GEMMs.

What is unusual:
- The routed experts stay eager (`torch.compiler.disable`): on CPU, torch 2.13's fake-tensor
  check of `torch._grouped_mm` accepts bf16 only, though the eager fp32 kernel runs; they are
  big GEMMs, which compiling would not speed up.
- Off by default (a Runtime field, `compile`): the first step pays the compile (32 s for the
  benchmark's 4-layer LM on this CPU) and a batch layout the graph has not seen recompiles once
  more; `benchmarks/bench_lm_vs_hf.py --compile` measures what it buys after that (1.1x there).
- Composes with activation checkpointing (apply that first): a checkpointed block runs its
  compiled forward inside the checkpoint, since a compiled region cannot hold our checkpoint
  (its context_fn pauses router counting in the recompute); and with context parallelism (the
  gathers are graph breaks).

Outputs and gradients equal the eager ones up to float rounding (tests/test_compile_blocks.py).
"""

from __future__ import annotations

import torch
from torch import nn

from moonforge.model.experts import GroupedExperts
from moonforge.stages.train.activation_ckpt import INNER_FORWARD, is_checkpointed


def apply_compile(model: nn.Module) -> int:
    """Compile every LM decoder block of `model` (a VLM, or an MoELM itself) in place; returns
    the number of blocks compiled. Raises ValueError when there is no LM block list."""
    lm = getattr(model, "lm", model)
    blocks = getattr(lm, "layers", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(
            f"compile works per LM decoder block; {type(model).__name__} has no lm.layers block "
            "list to compile (set compile: false for this stage)"
        )
    for m in lm.modules():
        if isinstance(m, GroupedExperts) and "forward" not in m.__dict__:
            m.__dict__["forward"] = _eager(m.forward)
    for block in blocks:
        if is_checkpointed(block):  # compile inside the checkpoint (see activation_ckpt.py)
            block.__dict__[INNER_FORWARD] = torch.compile(type(block).forward)
        else:
            block.compile()
    return len(blocks)


def _eager(fn):
    return torch.compiler.disable(fn, recursive=True)

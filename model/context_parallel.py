"""Context parallelism: one micro-batch's sequence sharded over the ranks of a CP group.

Every rank of a group holds the same packed micro-batch. The LM (lm.py `hidden`) keeps only its
contiguous slice of the sequence, [rank * L/n, (rank + 1) * L/n), for every activation; the
attention layers all-gather what keys and values are made from (MLA: the compressed latent
[c_kv | k_rope], R + Dr numbers per token instead of H * (2 Dn + Dr); MHA: the Hkv-head k, v),
so each rank's queries attend, document by document, over the positions up to its slice's end
(attention.py `cp_attention_meta`: a padded per-document SDPA). This is the all-gather form
(Llama 3's choice for document-masked long context): one gather per layer, exact, with no ring
bookkeeping; its memory is the gathered keys, which is the latent under MLA.

The loss: each rank sums its slice's token losses and divides by the micro-batch's labelled-token
count; `ContextParallel.sum` adds the ranks' parts in the forward (every rank sees the whole loss, so
metrics need no special case) and passes the gradient through unchanged in the backward (each
rank back-propagates its own part). Every parameter's gradient is then a partial sum over the
group's ranks, which the trainer adds up (stages/train/distributed.py `average_gradients`).

What is unusual:
- The gathers' backward is a reduce-scatter: the gradient of a rank's keys comes from every
  rank's queries. gloo has no reduce-scatter, so it all-reduces and keeps the rank's slice.
- Slices are contiguous, so the last rank does the most causal attention work (a zig-zag split
  would balance it; not done).
- Embedding is per slice too: a rank embeds its own tokens and encodes only the images (whole
  clips) with a token in its slice (vlm.py `embed_slice`); an image cut by a slice edge is
  encoded by both ranks, each back-propagating the gradient of its own tokens; a slice with no
  media encodes one entry and scatters none, so every rank reaches the same parameters.

Legend: B batch rows, L whole sequence length, Lc = L / n local slice, n ranks in the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in its context-parallel group."""

    rank: int
    size: int
    group: Any = None
    """The torch.distributed process group of the ranks sharing one sequence (None: WORLD)."""

    def bounds(self, seq_len: int) -> tuple[int, int]:
        """[lo, hi) of this rank's slice of a length-`seq_len` sequence."""
        if seq_len % self.size:
            raise ValueError(
                f"context parallelism over {self.size} ranks needs a sequence length divisible by "
                f"{self.size}, got {seq_len}; set the stage's seq_len to a multiple of {self.size} "
                "or change launcher.context_parallel"
            )
        n = seq_len // self.size
        return self.rank * n, (self.rank + 1) * n

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's slice of `x` along `dim` (the sequence axis)."""
        lo, hi = self.bounds(x.shape[dim])
        return x.narrow(dim, lo, hi - lo)

    def gather(self, x: Tensor, dim: int = 1) -> Tensor:
        """The whole sequence from every rank's slice along `dim`, differentiably."""
        return _Gather.apply(x, dim, self)

    def sum(self, x: Tensor) -> Tensor:
        """The group's sum of `x` in the forward; the identity in the backward."""
        return _SumForward.apply(x, self)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, cp: ContextParallel) -> Tensor:
        ctx.dim, ctx.cp = dim, cp
        parts = [torch.empty_like(x) for _ in range(cp.size)]
        dist.all_gather(parts, x.contiguous(), group=cp.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cp: ContextParallel = ctx.cp
        grad = grad.contiguous()
        if dist.get_backend(cp.group) == "nccl":
            parts = list(grad.chunk(cp.size, dim=ctx.dim))
            out = torch.empty_like(parts[cp.rank]).contiguous()
            dist.reduce_scatter(out, [p.contiguous() for p in parts], group=cp.group)
            return out, None, None
        dist.all_reduce(grad, group=cp.group)  # gloo: no reduce-scatter
        return cp.shard(grad, ctx.dim).contiguous(), None, None


class _SumForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cp: ContextParallel) -> Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, group=cp.group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None

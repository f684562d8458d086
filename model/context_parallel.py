"""Context parallelism: one micro-batch's sequence sharded over the ranks of a CP group.

Every rank of a group holds the same packed micro-batch. The LM (lm.py `hidden`) keeps only its
part of the sequence for every activation: the zig-zag split (Megatron's and torch's
context-parallel load balancer) cuts the sequence into 2n equal chunks and rank r keeps chunks r
and 2n - 1 - r, so under causal attention every rank has the same work (a contiguous split gives
the last rank 2n - 1 times the first's attention work, and the step waits for it). The
attention layers all-gather what keys and values are made from (MLA: the compressed latent
[c_kv | k_rope], R + Dr numbers per token instead of H * (2 Dn + Dr); MHA: the Hkv-head k, v),
so each rank's queries attend, document by document, over the positions up to them
(attention.py `cp_attention_meta`: padded per-document SDPAs over query chunks). This is the
all-gather form (Llama 3's choice for document-masked long context): one gather per layer,
exact, with no ring bookkeeping; its memory is the gathered keys, which is the latent under MLA.

The loss: each rank sums its tokens' losses and divides by the micro-batch's labelled-token
count; `ContextParallel.sum` adds the ranks' parts in the forward (every rank sees the whole loss, so
metrics need no special case) and passes the gradient through unchanged in the backward (each
rank back-propagates its own part). Every parameter's gradient is then a partial sum over the
group's ranks, which the trainer adds up (stages/train/distributed.py `average_gradients`).

What is unusual:
- The gathers' backward is a reduce-scatter: the gradient of a rank's keys comes from every
  rank's queries. gloo has no reduce-scatter, so it all-reduces and keeps the rank's part.
- A rank's part is two pieces of the sequence (one where they touch: rank n - 1's chunks n - 1
  and n), so "this rank's slice" below means its pieces, concatenated in sequence order.
- Embedding is per slice too: a rank embeds its own tokens and encodes only the images (whole
  clips) with a token in its slice (vlm.py `embed_slice`); an image cut by a slice edge is
  encoded by both ranks, each back-propagating the gradient of its own tokens; a slice with no
  media encodes one entry and scatters none, so every rank reaches the same parameters.

Legend: B batch rows, L whole sequence length, Lc = L / n local slice, n ranks in the group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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

    def ranges(self, seq_len: int) -> tuple[tuple[int, int], ...]:
        """This rank's [lo, hi) pieces of a length-`seq_len` sequence, in order (the zig-zag
        split: chunks r and 2n - 1 - r of 2n; one piece where they touch)."""
        chunks = 2 * self.size
        if seq_len % chunks:
            raise ValueError(
                f"context parallelism over {self.size} ranks needs a sequence length divisible by "
                f"{chunks} (2 chunks a rank), got {seq_len}; set the stage's seq_len to a multiple "
                f"of {chunks} or change launcher.context_parallel"
            )
        c = seq_len // chunks
        first, last = self.rank, chunks - 1 - self.rank
        if last == first + 1:
            return ((first * c, (last + 1) * c),)
        return ((first * c, (first + 1) * c), (last * c, (last + 1) * c))

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's slice of `x` along `dim` (the sequence axis): its pieces, concatenated."""
        pieces = [x.narrow(dim, lo, hi - lo) for lo, hi in self.ranges(x.shape[dim])]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)

    def gather(self, x: Tensor, dim: int = 1) -> Tensor:
        """The whole sequence from every rank's slice along `dim`, differentiably."""
        return _Gather.apply(x, dim, self)

    def unshard(self, parts: list[Tensor], dim: int) -> Tensor:
        """The whole sequence from every rank's slice (parts[q]: rank q's), in sequence order."""
        seq_len = parts[0].shape[dim] * self.size
        pieces = []
        for q, part in enumerate(parts):
            off = 0
            for lo, hi in replace(self, rank=q).ranges(seq_len):
                pieces.append((lo, part.narrow(dim, off, hi - lo)))
                off += hi - lo
        return torch.cat([p for _, p in sorted(pieces, key=lambda lp: lp[0])], dim)

    def sum(self, x: Tensor) -> Tensor:
        """The group's sum of `x` in the forward; the identity in the backward."""
        return _SumForward.apply(x, self)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, cp: ContextParallel) -> Tensor:
        ctx.dim, ctx.cp = dim, cp
        parts = [torch.empty_like(x) for _ in range(cp.size)]
        dist.all_gather(parts, x.contiguous(), group=cp.group)
        return cp.unshard(parts, dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cp: ContextParallel = ctx.cp
        grad = grad.contiguous()
        if dist.get_backend(cp.group) == "nccl":
            parts = [replace(cp, rank=q).shard(grad, ctx.dim) for q in range(cp.size)]
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

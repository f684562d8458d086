"""KV cache for incremental decoding of `MoELM`: preallocated per-layer buffers plus key doc ids.

What each layer stores is up to its attention module (the cache is shape-agnostic):
- MLA stores the compressed latent from `MLA.compress` as one (B, 1, K, R + Dr) tensor: c_kv
  (normalised, R dims) then the ONE shared, already-rotated rope key (Dr dims), i.e. (R + Dr)
  numbers per token per layer instead of H * (2 * Dn + Dr). Decoding steps attend over it
  directly (`MLA.attend_absorbed`: kv_b_proj folded into the query and the output), so no step
  re-expands the cached positions; it equals the expanded form up to float summation order.
- MHA stores the rotated per-head k and v of its key/value heads (num_kv_heads under GQA).

What is unusual:
- Every stored tensor keeps its sequence axis second to last ((B, 1, K, R + Dr),
  (B, H, K, Dh)), so one `write` serves both attention kinds.
- The key doc ids live here too (-1 = padding): batched prompts of different lengths are
  left-padded, and padded keys are isolated exactly as `attention.segment_ids` isolates them in
  a full forward, so cached and uncached decoding see the same mask.
- `keep(rows)` drops finished rows from every buffer, so later steps cost only the live rows.

Legend: B batch rows, K cached positions (capacity C), Q new positions written in one step.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCache:
    """One layer's buffers, allocated on the first write as (..., C, X) per stored tensor."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffers: list[Tensor] = []

    def write(self, start: int, *new: Tensor) -> tuple[Tensor, ...]:
        """Store `new` tensors (..., Q, X) at positions [start, start + Q); return views of
        positions [0, start + Q) of every buffer, in the order given."""
        if not self.buffers:
            self.buffers = [t.new_zeros(*t.shape[:-2], self.capacity, t.shape[-1]) for t in new]
        end = start + new[0].shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; writing up to {end}")
        for buf, t in zip(self.buffers, new):
            buf[..., start:end, :] = t
        return tuple(buf[..., :end, :] for buf in self.buffers)

    def keep(self, rows_R: Tensor) -> None:
        self.buffers = [buf.index_select(0, rows_R) for buf in self.buffers]


class KVCache:
    """Cache for `MoELM.hidden_cached`: one `LayerCache` per decoder block + key doc ids.

    Usage: `cache = KVCache(num_layers, batch, capacity, device)`; each `hidden_cached` call
    appends its Q positions to every layer and advances `length`.
    """

    def __init__(
        self, num_layers: int, batch: int, capacity: int, device: torch.device | str = "cpu"
    ) -> None:
        self.capacity = capacity
        self.length = 0
        self.layers = [LayerCache(capacity) for _ in range(num_layers)]
        self.doc_ids_BC = torch.full((batch, capacity), -1, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return self.doc_ids_BC.shape[0]

    def push_doc_ids(self, doc_ids_BQ: Tensor) -> Tensor:
        """Record the doc ids of Q new positions; return the doc ids (B, K) of all keys so far,
        K = length + Q. `length` is advanced by `advance` once every layer has written."""
        end = self.length + doc_ids_BQ.shape[1]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; writing up to {end}")
        self.doc_ids_BC[:, self.length : end] = doc_ids_BQ
        return self.doc_ids_BC[:, :end]

    def advance(self, num_new: int) -> None:
        self.length += num_new

    def keep(self, rows_R: Tensor) -> None:
        """Keep only batch rows `rows_R` (indices into the current rows, increasing)."""
        self.doc_ids_BC = self.doc_ids_BC.index_select(0, rows_R)
        for layer in self.layers:
            layer.keep(rows_R)

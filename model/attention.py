"""Attention over packed variable-length sequences (documents or images side by side in one row).

Several documents share a row; a token may attend only within its own document (block-diagonal),
and, when `causal`, only to itself and earlier tokens of that document. Backends:

- `sdpa`: `F.scaled_dot_product_attention` with a dense (B, 1, L, L) boolean mask. Runs anywhere.
- `flash`: `flash_attn_varlen_func` over the flattened tokens with `cu_seqlens` built from the
  document boundaries (CUDA + flash-attn only; fp32 inputs are run in bf16 and cast back).
- `auto`: `flash` when the inputs are on CUDA and flash-attn imports, otherwise `sdpa`.
KV-cache decoding (`attend_cached`) always runs SDPA on the last Q rows of the same mask.

What is unusual:
- A "document" is a maximal run of equal, non-negative `doc_ids` inside one row. Two runs with the
  same id separated by another id are two documents; rows never see each other.
- Padding (`doc_ids == -1`) becomes a set of length-1 documents: each padded query attends only to
  itself, so its output is its own value vector. This keeps SDPA rows free of NaN (no fully masked
  row) and makes both backends agree even on padding.
- `v` may have a smaller head dim than `q`/`k` (MLA: 192 vs 128); flash pads it and slices back.

Legend: B batch rows, H heads, L sequence length, Dh q/k head dim, Dv v head dim,
Q new queries and K cached keys (KV-cache decoding), T = B*L flattened tokens, S number of
documents (segments) in the flattened batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["auto", "sdpa", "flash"]

try:  # guarded: flash-attn is an optional CUDA extra
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # noqa: BLE001 - any import failure (missing, wrong CUDA) means "not available"
    _flash_varlen = None


def flash_available(device: torch.device) -> bool:
    """True when flash-attn imported and `device` is a CUDA device."""
    return _flash_varlen is not None and device.type == "cuda"


def segment_ids(doc_ids_BL: Tensor) -> Tensor:
    """Per-token segment index, unique across the whole batch: (B, L) long.

    A new segment starts at every row start, every change of doc id, and every padding token.
    Example: doc_ids [[0, 0, 1, -1, -1]] -> [[0, 0, 1, 2, 3]].
    """
    B, L = doc_ids_BL.shape
    starts_BL = torch.ones_like(doc_ids_BL, dtype=torch.bool)
    starts_BL[:, 1:] = doc_ids_BL[:, 1:] != doc_ids_BL[:, :-1]
    starts_BL |= doc_ids_BL < 0
    return starts_BL.flatten().long().cumsum(0).view(B, L) - 1


def cu_seqlens_from_doc_ids(doc_ids_BL: Tensor) -> tuple[Tensor, int]:
    """Cumulative document lengths over the flattened (B*L) tokens, flash-attn style.

    Returns (cu_seqlens_S1 int32 of shape (S + 1,), max_seqlen as a Python int). Documents are the
    segments of `segment_ids`, so padding tokens count as length-1 documents and every token of
    the flattened batch belongs to exactly one segment.
    Example: doc_ids [[0, 0, 1, -1]] -> (tensor([0, 2, 3, 4]), 2).
    """
    seg_T = segment_ids(doc_ids_BL).flatten()
    lengths_S = torch.bincount(seg_T)
    cu_S1 = F.pad(lengths_S.cumsum(0), (1, 0)).to(torch.int32)
    return cu_S1, int(lengths_S.max().item())


def block_mask(doc_ids_BL: Tensor, causal: bool) -> Tensor:
    """Dense boolean attention mask (B, 1, L, L); True means "may attend".

    mask[b, 0, q, k] = same segment(q, k) and (not causal or q >= k). Padding tokens are their own
    segments, so a padded query sees exactly itself and real queries never see padding.
    """
    seg_BL = segment_ids(doc_ids_BL)
    mask_BLL = seg_BL[:, :, None] == seg_BL[:, None, :]
    if causal:
        L = doc_ids_BL.shape[1]
        mask_BLL &= torch.ones(L, L, dtype=torch.bool, device=doc_ids_BL.device).tril()
    return mask_BLL[:, None]


def suffix_block_mask(doc_ids_BK: Tensor, num_queries: int) -> Tensor:
    """Rows [K - Q, K) of `block_mask(doc_ids_BK, causal=True)`: (B, 1, Q, K), built in O(Q*K).

    The mask a KV cache needs: the Q queries are the last Q of the K key positions.
    Example: doc_ids [[-1, 0, 0]], Q = 1 -> [[[[False, True, True]]]].
    """
    B, K = doc_ids_BK.shape
    seg_BK = segment_ids(doc_ids_BK)
    mask_BQK = seg_BK[:, K - num_queries:, None] == seg_BK[:, None, :]
    q_pos_Q = torch.arange(K - num_queries, K, device=doc_ids_BK.device)
    mask_BQK &= torch.arange(K, device=doc_ids_BK.device)[None, :] <= q_pos_Q[:, None]
    return mask_BQK[:, None]


def attend_cached(q_BHQD: Tensor, k_BHKD: Tensor, v_BHKE: Tensor, doc_ids_BK: Tensor,
                  scale: float | None = None) -> Tensor:
    """Causal block-diagonal attention of Q new queries over K >= Q cached keys: (B, H, Q, Dv).

    The queries sit at the last Q key positions; doc_ids_BK covers all K keys (-1 = padding).
    Equals rows [K - Q, K) of `attend(..., causal=True)` over the full sequence. Always SDPA
    with a dense mask (a decode step has Q = 1, so the mask is small).
    """
    mask_B1QK = suffix_block_mask(doc_ids_BK, q_BHQD.shape[2])
    return F.scaled_dot_product_attention(q_BHQD, k_BHKD, v_BHKE, attn_mask=mask_B1QK,
                                          scale=scale)


def _sdpa(q_BHLD: Tensor, k_BHLD: Tensor, v_BHLE: Tensor, doc_ids_BL: Tensor, causal: bool,
          scale: float | None) -> Tensor:
    """Dense block mask when it is cheap; per-segment padded batches when many short segments
    share long rows (a ViT batch packs ~100 images into one row: N^2 would be ~50x the work)."""
    B, L = doc_ids_BL.shape
    real_T = (doc_ids_BL >= 0).flatten()
    seg_T = segment_ids(doc_ids_BL).flatten()[real_T]
    if seg_T.numel():
        lengths = torch.bincount(seg_T)
        lengths = lengths[lengths > 0]
        if len(lengths) * int(lengths.max()) ** 2 * 2 < B * L * L:
            return _sdpa_segments(q_BHLD, k_BHLD, v_BHLE, seg_T, real_T, causal, scale)
    mask_B1LL = block_mask(doc_ids_BL, causal)
    return F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLE, attn_mask=mask_B1LL, scale=scale)


def _sdpa_segments(q_BHLD: Tensor, k_BHLD: Tensor, v_BHLE: Tensor, seg_R: Tensor, real_T: Tensor,
                   causal: bool, scale: float | None) -> Tensor:
    """SDPA over the real segments gathered into a padded (S, H, Lmax, D) batch (varlen by padding).

    R real tokens (doc id >= 0) in row-major order with segment ids seg_R; padding tokens attend
    only to themselves, so their output is their own value vector.
    """
    B, H, L, Dh = q_BHLD.shape
    Dv = v_BHLE.shape[-1]
    flat = lambda x: x.transpose(1, 2).reshape(B * L, H, x.shape[-1])  # noqa: E731
    q_THD, k_THD, v_THE = flat(q_BHLD), flat(k_BHLD), flat(v_BHLE)
    idx_R = real_T.nonzero().squeeze(1)
    _, seg_R = torch.unique_consecutive(seg_R, return_inverse=True)  # dense 0..S-1
    starts_S = F.pad(torch.bincount(seg_R).cumsum(0), (1, 0))[:-1]
    pos_R = torch.arange(len(seg_R), device=seg_R.device) - starts_S[seg_R]
    S, Lmax = int(seg_R.max()) + 1, int(pos_R.max()) + 1
    def gather(x_THX: Tensor) -> Tensor:
        out = x_THX.new_zeros(S, Lmax, H, x_THX.shape[-1])
        out[seg_R, pos_R] = x_THX[idx_R]
        return out.transpose(1, 2)  # (S, H, Lmax, X)
    valid_SL = torch.zeros(S, Lmax, dtype=torch.bool, device=seg_R.device)
    valid_SL[seg_R, pos_R] = True
    mask_S1LL = valid_SL[:, None, None, :].expand(S, 1, Lmax, Lmax)
    if causal:
        mask_S1LL = mask_S1LL & torch.ones(Lmax, Lmax, dtype=torch.bool, device=seg_R.device).tril()
    # rows of padding queries would be fully masked (NaN); let them see key 0, then drop them
    mask_S1LL = mask_S1LL | (~valid_SL)[:, None, :, None] & (torch.arange(Lmax, device=seg_R.device) == 0)
    out_SHLE = F.scaled_dot_product_attention(gather(q_THD), gather(k_THD), gather(v_THE),
                                              attn_mask=mask_S1LL, scale=scale)
    out_THE = v_THE.clone()  # padding tokens: attention to themselves returns their value
    out_THE[idx_R] = out_SHLE.transpose(1, 2)[seg_R, pos_R]
    return out_THE.reshape(B, L, H, Dv).transpose(1, 2)


def _flash(q_BHLD: Tensor, k_BHLD: Tensor, v_BHLE: Tensor, doc_ids_BL: Tensor, causal: bool,
           scale: float | None) -> Tensor:
    if _flash_varlen is None:
        raise RuntimeError("attn backend 'flash' needs flash-attn (pip install moonforge[flash])")
    B, H, L, Dh = q_BHLD.shape
    Dv = v_BHLE.shape[-1]
    dtype = q_BHLD.dtype
    run_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    cu_S1, max_len = cu_seqlens_from_doc_ids(doc_ids_BL)

    def flat(x_BHLX: Tensor) -> Tensor:  # (B, H, L, X) -> (T, H, X), tokens in row-major order
        return x_BHLX.transpose(1, 2).reshape(B * L, H, x_BHLX.shape[-1]).to(run_dtype)

    v_THE = flat(v_BHLE)
    if Dv < Dh:  # flash-attn wants one head dim for q, k and v; zero-pad v and slice back
        v_THE = F.pad(v_THE, (0, Dh - Dv))
    out_THE = _flash_varlen(flat(q_BHLD), flat(k_BHLD), v_THE, cu_S1, cu_S1, max_len, max_len,
                            softmax_scale=scale, causal=causal)
    out_BHLE = out_THE[..., :Dv].reshape(B, L, H, Dv).transpose(1, 2)
    return out_BHLE.to(dtype)


def attend(q_BHLD: Tensor, k_BHLD: Tensor, v_BHLE: Tensor, doc_ids_BL: Tensor, causal: bool,
           backend: Backend = "auto", scale: float | None = None) -> Tensor:
    """Block-diagonal (per document) attention; returns (B, H, L, Dv).

    q, k: (B, H, L, Dh); v: (B, H, L, Dv); doc_ids_BL: int, -1 = padding. `scale` defaults to
    Dh ** -0.5. Queries and keys share positions; with a KV cache use `attend_cached`.
    """
    if backend == "auto":
        backend = "flash" if flash_available(q_BHLD.device) else "sdpa"
    if backend == "flash":
        return _flash(q_BHLD, k_BHLD, v_BHLE, doc_ids_BL, causal, scale)
    if backend == "sdpa":
        return _sdpa(q_BHLD, k_BHLD, v_BHLE, doc_ids_BL, causal, scale)
    raise ValueError(f"unknown attention backend {backend!r}; use 'auto', 'sdpa' or 'flash'")


def attend_reference(q_BHLD: Tensor, k_BHLD: Tensor, v_BHLE: Tensor, doc_ids_BL: Tensor,
                     causal: bool, scale: float | None = None) -> Tensor:
    """Slow per-document reference: one SDPA call per segment, no masks. For tests only."""
    B, H, L, _ = q_BHLD.shape
    out_BHLE = torch.zeros(B, H, L, v_BHLE.shape[-1], dtype=v_BHLE.dtype, device=v_BHLE.device)
    seg_BL = segment_ids(doc_ids_BL)
    for b in range(B):
        for s in torch.unique(seg_BL[b]).tolist():
            idx = (seg_BL[b] == s).nonzero().flatten()
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            out_BHLE[b, :, lo:hi] = F.scaled_dot_product_attention(
                q_BHLD[b, :, lo:hi], k_BHLD[b, :, lo:hi], v_BHLE[b, :, lo:hi],
                is_causal=causal, scale=scale)
    return out_BHLE

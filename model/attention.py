"""Attention over packed variable-length sequences (documents or images side by side in one row).

Several documents share a row; a token may attend only within its own document (block-diagonal),
and, when `causal`, only to itself and earlier tokens of that document.

Per-batch metadata is built ONCE per forward (`attention_meta`, at the model's entry) and passed to
every layer: the segment layout, `cu_seqlens` / max length, the dense mask or the padded-segment
plan, the flex block mask. No layer rebuilds it and no layer reads a value back to the host.

Backends, chosen when the model is built (`resolve_backend`, by device):
- `sdpa` (CPU default): per batch, the cheapest exact SDPA form by a cost model measured on CPU
  (`PADDED_OVER_DENSE`): `full` when every row is one unpadded document (plain causal SDPA, no
  mask); `padded` (documents gathered into an (S, H, Lmax, D) batch; causal needs no mask because
  each document's padding sits after it) when S * Lmax^2 is below the dense B * L^2; else `dense`.
- `dense`: SDPA with a dense (B, 1, L, L) boolean mask; the reference form. `padded`: always the
  padded-segment form.
- `flash` (CUDA default): varlen kernels over the flattened tokens with `cu_seqlens`:
  flash-attn's `flash_attn_varlen_func` when installed, else torch's own
  `torch.nn.attention.varlen.varlen_attn`. They run bf16 / fp16 only: fp32 activations are never
  cast down; such a batch runs `sdpa` instead (one warning).
- `flex`: FlexAttention with a document block mask (compiled on CUDA; eager elsewhere, slow).
- `auto`: `flash` on CUDA when a varlen kernel exists, else `sdpa`.
Under context parallelism (model/context_parallel.py) every backend runs the `cp` kernel: this
rank's Lc queries (its zig-zag pieces) over the gathered keys [k0, hi) (hi = its last piece's
end, k0 = the earliest start of a document its slice continues), per document and per chunk of
queries: each document's chunk tokens attend its positions from its start to the chunk's last
query, in one padded (S, H, Qmax, Kmax) SDPA a chunk (`CPPlan`).
KV-cache decoding (`attend_cached`) always runs SDPA on the last Q rows of the same mask.

What is unusual:
- A "document" is a maximal run of equal, non-negative `doc_ids` inside one row. Two runs with the
  same id separated by another id are two documents; rows never see each other.
- Padding (`doc_ids == -1`) becomes a set of length-1 documents: each padded query attends only to
  itself, so its output is its own value vector. This keeps SDPA rows free of NaN (no fully masked
  row) and makes all backends agree even on padding.
- `v` may have a smaller head dim than `q`/`k` (MLA: 192 vs 128); varlen kernels pad it and slice.
- Causal SDPA on CPU runs in query chunks of `CAUSAL_CHUNK` rows, each over only the keys up to
  its end (`causal_sdpa`): torch's CPU kernels compute the masked upper triangle anyway, so this
  skips ~40% of the work at L = 512 (1.8x faster forward + backward with MLA's head dims).

Legend: B batch rows, H heads, L sequence length, Dh q/k head dim, Dv v head dim,
Q new queries and K cached keys (KV-cache decoding), T = B*L flattened tokens, S number of
documents (segments), R real (non-padding) tokens, P = S * Lmax padded slots.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from moonforge.model.context_parallel import ContextParallel

Backend = Literal["auto", "sdpa", "dense", "padded", "flash", "flex"]
BACKENDS = ("auto", "sdpa", "dense", "padded", "flash", "flex")
Kernel = Literal["full", "dense", "padded", "varlen", "flex", "cp"]

try:  # guarded: flash-attn is an optional CUDA extra
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # noqa: BLE001 - any import failure (missing, wrong CUDA) means "not available"
    _flash_varlen = None

PADDED_OVER_DENSE = 1.0
"""`sdpa` takes the padded form when S * Lmax^2 < this * B * L^2. Measured on this CPU (fp32,
forward + backward, 1 thread, CPU seconds, 13 layouts from 4 x 512 to 1 x 4096, causal and not):
padded / dense time = (0.7 .. 1.0) x S * Lmax^2 / (B * L^2), so the padded form wins below 1.0
and the two tie near it (24 documents in 2,048 tokens: ratio 0.51, padded 2.1x faster)."""
CAUSAL_CHUNK = 128
"""Query rows per causal SDPA call on CPU (measured best of 64 / 128 / 256 at L = 256 .. 1024)."""
_warned: set[str] = set()


@functools.cache
def torch_varlen() -> Callable[..., Any] | None:
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.10, CUDA), or None where this torch has
    none. Imported on first need, not with this module: it imports torch._dynamo, which took the
    model's import from 1.6-2.8 s to 2.8-4.6 s on this CPU, for a kernel that runs on CUDA only.
    (A process that builds an optimizer imports torch._dynamo anyway: torch.optim's
    add_param_group does; evals, chat, import and export do not.)"""
    try:
        from torch.nn.attention.varlen import varlen_attn  # its keywords differ across versions
    except Exception:  # noqa: BLE001
        return None
    return varlen_attn


def flash_available(device: torch.device) -> bool:
    """True when a varlen flash kernel (flash-attn or torch's own) can run on `device` (CUDA)."""
    return device.type == "cuda" and (_flash_varlen is not None or torch_varlen() is not None)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend a model on `device` runs: `auto` -> `flash` on CUDA with a varlen
    kernel, else `sdpa`; other names are checked and returned."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "flash" if flash_available(torch.device(device)) else "sdpa"


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
    mask_BQK = seg_BK[:, K - num_queries :, None] == seg_BK[:, None, :]
    q_pos_Q = torch.arange(K - num_queries, K, device=doc_ids_BK.device)
    mask_BQK &= torch.arange(K, device=doc_ids_BK.device)[None, :] <= q_pos_Q[:, None]
    return mask_BQK[:, None]


@dataclass(frozen=True, eq=False)
class SegmentPlan:
    """Where each real token goes in the padded (S, Lmax) batch and back.

    gather_P: token index for every padded slot (document s, position j at s * Lmax + j); slots past
    a document's end read token 0 (finite filler: masked as keys, dropped as queries).
    unpad_T: per token, its slot in the padded output, or P + t for padding tokens, whose output is
    their own value (row t of the value tensor appended after the P slots).
    keys_S11L: key-validity mask for non-causal attention (causal needs none: the filler sits after
    each document, so causal masking already hides it from every real query).
    """

    gather_P: Tensor
    unpad_T: Tensor
    keys_S11L: Tensor | None
    num_segments: int
    max_len: int


def segment_plan(doc_ids_BL: Tensor, causal: bool, seg_BL: Tensor | None = None) -> SegmentPlan:
    """The padded-segment plan of a batch (one host read: the segment count and longest one)."""
    device = doc_ids_BL.device
    seg_BL = segment_ids(doc_ids_BL) if seg_BL is None else seg_BL
    real_T = (doc_ids_BL >= 0).flatten()
    idx_R = real_T.nonzero().squeeze(1)
    _, seg_R = torch.unique_consecutive(seg_BL.flatten()[idx_R], return_inverse=True)
    lengths_S = torch.bincount(seg_R)
    S, Lmax = len(lengths_S), int(lengths_S.max())
    pos_R = torch.arange(len(seg_R), device=device) - (lengths_S.cumsum(0) - lengths_S)[seg_R]
    slot_R = seg_R * Lmax + pos_R
    gather_P = torch.zeros(S * Lmax, dtype=torch.long, device=device).index_copy(0, slot_R, idx_R)
    T = real_T.numel()
    unpad_T = torch.arange(S * Lmax, S * Lmax + T, device=device).index_copy(0, idx_R, slot_R)
    keys = None
    if not causal:
        keys = torch.arange(Lmax, device=device)[None, :] < lengths_S[:, None]
        keys = keys[:, None, None, :]
    return SegmentPlan(gather_P, unpad_T, keys, S, Lmax)


@dataclass(frozen=True, eq=False)
class AttnMeta:
    """One batch's document layout in the form its attention kernel needs (see module docstring).

    kernel: `full` (plain SDPA, every row one document), `dense`, `padded`, `varlen` or `flex`.
    """

    kernel: Kernel
    causal: bool
    doc_ids_BL: Tensor
    mask_B1LL: Tensor | None = None
    segments: SegmentPlan | None = None
    cu_seqlens_S1: Tensor | None = None
    max_seqlen: int = 0
    block_mask: BlockMask | None = None
    cp: ContextParallel | None = None
    """Context parallelism (kernel `cp`): the group whose slices the keys are gathered from."""
    keys: tuple[int, int] = (0, 0)
    """Kernel `cp`: the gathered key positions [k0, hi) this rank's queries may see."""
    cp_plan: CPPlan | None = None
    """Kernel `cp`: the per-document padded layout of this rank's queries and keys."""


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def activation_dtype(x: Tensor) -> torch.dtype:
    """The dtype projections produce from `x`: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def attention_meta(
    doc_ids_BL: Tensor, causal: bool, backend: str, dtype: torch.dtype = torch.float32
) -> AttnMeta:
    """Everything every layer's attention needs about this batch, built once.

    backend: a resolved backend (`resolve_backend`); dtype: the q/k/v dtype (`activation_dtype`),
    which decides whether a varlen kernel may run (bf16 / fp16 only). Costs at most two host reads
    per batch (the layout decision and the longest document), never one per layer.
    """
    backend = resolve_backend(backend, doc_ids_BL.device)
    if backend == "flash" and not _half(dtype):
        if "flash-fp32" not in _warned:
            _warned.add("flash-fp32")
            warnings.warn(
                f"attention backend 'flash' runs bf16 / fp16 only; {dtype} activations "
                "run 'sdpa' instead (exact, slower); use bf16 autocast for flash",
                stacklevel=2,
            )
        backend = "sdpa"
    if backend == "dense":
        return AttnMeta("dense", causal, doc_ids_BL, mask_B1LL=block_mask(doc_ids_BL, causal))
    if backend == "padded":
        return _padded_meta(doc_ids_BL, causal)
    if backend == "flash":
        cu_S1, max_len = cu_seqlens_from_doc_ids(doc_ids_BL)
        return AttnMeta("varlen", causal, doc_ids_BL, cu_seqlens_S1=cu_S1, max_seqlen=max_len)
    if backend == "flex":
        return AttnMeta(
            "flex", causal, doc_ids_BL, block_mask=_flex_block_mask(segment_ids(doc_ids_BL), causal)
        )
    return _sdpa_meta(doc_ids_BL, causal)


@dataclass(frozen=True, eq=False)
class CPPart:
    """One query chunk of a context-parallel rank's slice, its documents gathered into a padded
    batch (the `cp` kernel runs one SDPA a part).

    Segment s (a document, or a padding token, with queries in the chunk) has its q_len chunk
    tokens as queries and its k_len positions from the document's start to its last query as
    keys; its queries are the last q_len of its keys (causal, bottom-right). q_gather_P: local
    token (B * Lc flattened) for query slot s * Qmax + i; k_gather_P: gathered key token
    (B * (hi - k0) flattened) for key slot s * Kmax + j; fillers read the segment's first one.
    mask_S1QK: key j visible to query i; a filler query row sees key 0 only (no row is fully
    masked, so no NaN reaches the backward).
    """

    q_gather_P: Tensor
    k_gather_P: Tensor
    mask_S1QK: Tensor
    num_segments: int
    max_q: int
    max_k: int


@dataclass(frozen=True, eq=False)
class CPPlan:
    """The `cp` kernel's parts and unpad_T: each local token's row in the parts' padded outputs,
    concatenated in part order."""

    parts: tuple[CPPart, ...]
    unpad_T: Tensor


CP_QUERY_CHUNK = 256
"""Query positions per `cp` kernel part. A part's SDPA computes every (query, key) pair up to its
last query, so smaller chunks skip more of the causal triangle's masked half, and each costs a
gather and a call. Measured (benchmarks/bench_context_parallel.py --balance, 4096 tokens over 2
ranks, the slowest rank against the contiguous split in one part): chunks of 128 1.50x on one
document / 1.33x packed, 256 2.00x / 1.20x, 512 1.74x / 1.19x, 1024 1.48x / 0.78x."""


def cp_attention_meta(doc_ids_BL: Tensor, cp: ContextParallel, chunk: int = CP_QUERY_CHUNK) -> AttnMeta:
    """The `cp` kernel's metadata for this rank's slice of a batch whose whole layout is
    `doc_ids_BL` (B, L), causal: queries are the slice's pieces (`cp.ranges`), keys are gathered
    over [k0, hi), and each chunk of `chunk` query positions attends per document (cost: the sum
    over documents of q_len x k_len, not Lc x hi). One host read for k0, one a part."""
    B, L = doc_ids_BL.shape
    ranges = cp.ranges(L)
    Lc = sum(hi - lo for lo, hi in ranges)
    seg_BL = segment_ids(doc_ids_BL)
    lo0, hi = ranges[0][0], ranges[-1][1]
    # earliest key any query of the slice may see: the start of the segment at its first position
    # in each row (segments are contiguous runs: a segment of a later piece is that one or starts
    # after it); keys before it are never gathered into the matmul
    k0 = int((seg_BL < seg_BL[:, lo0 : lo0 + 1]).sum(1).min())
    parts, unpad_BC, rows = [], torch.empty(B, Lc, dtype=torch.long, device=doc_ids_BL.device), 0
    off = 0  # local offset of the current piece
    for piece_lo, piece_hi in ranges:
        for q_lo in range(piece_lo, piece_hi, chunk):
            q_hi = min(q_lo + chunk, piece_hi)
            local = off + q_lo - piece_lo
            part, unpad_BN = _cp_part(seg_BL, q_lo, q_hi, local, Lc, k0, hi - k0)
            unpad_BC[:, local : local + q_hi - q_lo] = unpad_BN + rows
            rows += part.num_segments * part.max_q
            parts.append(part)
        off += piece_hi - piece_lo
    plan = CPPlan(tuple(parts), unpad_BC.flatten())
    return AttnMeta("cp", True, cp.shard(doc_ids_BL), cp=cp, keys=(k0, hi), cp_plan=plan)


def _cp_part(
    seg_BL: Tensor, lo: int, hi: int, local: int, Lc: int, k0: int, Kg: int
) -> tuple[CPPart, Tensor]:
    """The part for queries [lo, hi) of every row (local positions [local, local + hi - lo) of
    the slice), and each of its tokens' row in the part's padded output, (B, hi - lo)."""
    B, L = seg_BL.shape
    dev, n = seg_BL.device, hi - lo
    ids_S, inv_T, q_len_S = torch.unique_consecutive(
        seg_BL[:, lo:hi].flatten(), return_inverse=True, return_counts=True
    )
    first_S = torch.searchsorted(seg_BL.flatten(), ids_S)  # segment ids ascend in row-major order
    row_S, start_S = first_S // L, first_S % L
    q_start_S = start_S.clamp(min=lo)
    k_len_S = q_start_S + q_len_S - start_S
    S, Q, K = len(ids_S), *torch.stack([q_len_S.max(), k_len_S.max()]).tolist()
    i_Q, j_K = torch.arange(Q, device=dev), torch.arange(K, device=dev)
    q_base_S = row_S * Lc + local + (q_start_S - lo)
    k_base_S = row_S * Kg + (start_S - k0)
    q_real_SQ = i_Q[None, :] < q_len_S[:, None]
    k_real_SK = j_K[None, :] < k_len_S[:, None]
    q_gather = torch.where(q_real_SQ, q_base_S[:, None] + i_Q[None, :], q_base_S[:, None])
    k_gather = torch.where(k_real_SK, k_base_S[:, None] + j_K[None, :], k_base_S[:, None])
    # query i sits at key position (q_start - start) + i of its segment
    q_at_SQ = (q_start_S - start_S)[:, None] + i_Q[None, :]
    mask_SQK = k_real_SK[:, None, :] & (j_K[None, None, :] <= q_at_SQ[:, :, None])
    mask_SQK |= ~q_real_SQ[:, :, None] & (j_K == 0)[None, None, :]
    local_T = (torch.arange(B, device=dev)[:, None] * Lc + local + torch.arange(n, device=dev)).flatten()
    unpad_T = inv_T * Q + local_T - q_base_S[inv_T]  # slot s * Q + (position within the segment)
    part = CPPart(q_gather.flatten(), k_gather.flatten(), mask_SQK[:, None], S, Q, K)
    return part, unpad_T.view(B, n)


def cp_keys(meta: AttnMeta, x: Tensor, dim: int) -> Tensor:
    """Under the `cp` kernel, the key positions [k0, hi) of `x` gathered from every rank's slice
    along `dim` (what keys and values are made from); otherwise `x` itself."""
    if meta.cp is None:
        return x
    k0, hi = meta.keys
    return meta.cp.gather(x, dim).narrow(dim, k0, hi - k0)


def _padded_meta(doc_ids_BL: Tensor, causal: bool) -> AttnMeta:
    if not bool((doc_ids_BL >= 0).any()):  # nothing but padding: every token sees itself
        return AttnMeta("dense", causal, doc_ids_BL, mask_B1LL=block_mask(doc_ids_BL, causal))
    return AttnMeta("padded", causal, doc_ids_BL, segments=segment_plan(doc_ids_BL, causal))


def _sdpa_meta(doc_ids_BL: Tensor, causal: bool) -> AttnMeta:
    """The cheapest exact SDPA form for this layout (one host read of four numbers)."""
    B, L = doc_ids_BL.shape
    seg_BL = segment_ids(doc_ids_BL)
    real_T = (doc_ids_BL >= 0).flatten()
    lengths_S = torch.bincount(seg_BL.flatten()[real_T], minlength=1)  # 0 for padding segments
    one_doc_rows = (seg_BL[:, -1] == seg_BL[:, 0]).all() if L else real_T.all()
    full, S, Lmax = torch.stack(
        [real_T.all() & one_doc_rows, (lengths_S > 0).sum(), lengths_S.max()]
    ).tolist()
    if full:
        return AttnMeta("full", causal, doc_ids_BL)
    if S and S * Lmax * Lmax < PADDED_OVER_DENSE * B * L * L:
        return AttnMeta("padded", causal, doc_ids_BL, segments=segment_plan(doc_ids_BL, causal, seg_BL))
    return AttnMeta("dense", causal, doc_ids_BL, mask_B1LL=block_mask(doc_ids_BL, causal))


def _flex_block_mask(seg_BL: Tensor, causal: bool) -> BlockMask:
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        same = seg_BL[b, q_idx] == seg_BL[b, kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    B, L = seg_BL.shape
    return create_block_mask(mask_mod, B, None, L, L, device=seg_BL.device)


def attention(
    q_BHLD: Tensor, k_BHLD: Tensor, v_BHLE: Tensor, meta: AttnMeta, scale: float | None = None
) -> Tensor:
    """Block-diagonal (per document) attention with prebuilt metadata; returns (B, H, L, Dv).

    q, k: (B, H, L, Dh); v: (B, H, L, Dv). `scale` defaults to Dh ** -0.5. Kernel `cp`: q is
    this rank's (B, H, Lc, Dh) slice and k, v the gathered keys [k0, hi) (`cp_keys`).
    """
    if meta.kernel == "full":
        if meta.causal:
            return causal_sdpa(q_BHLD, k_BHLD, v_BHLE, scale)
        return F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLE, scale=scale)
    if meta.kernel == "dense":
        return F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLE, attn_mask=meta.mask_B1LL, scale=scale)
    if meta.kernel == "padded":
        assert meta.segments is not None  # attention_meta plans segments for the padded kernel
        return _sdpa_segments(q_BHLD, k_BHLD, v_BHLE, meta.segments, meta.causal, scale)
    if meta.kernel == "varlen":
        return _flash(q_BHLD, k_BHLD, v_BHLE, meta, scale)
    if meta.kernel == "cp":  # k, v: the gathered keys [k0, hi) (`cp_keys`)
        assert meta.cp_plan is not None  # cp_attention_meta plans it
        return _sdpa_cp(q_BHLD, k_BHLD, v_BHLE, meta.cp_plan, scale)
    return _flex(q_BHLD, k_BHLD, v_BHLE, meta, scale)


def causal_sdpa(q_BHLD: Tensor, k_BHLD: Tensor, v_BHLE: Tensor, scale: float | None) -> Tensor:
    """Causal SDPA (no other mask); on CPU in chunks of CAUSAL_CHUNK queries, each attending only
    keys [0, chunk end) with a causal mask on the diagonal block. Same result up to rounding."""
    L = q_BHLD.shape[2]
    if q_BHLD.device.type != "cpu" or L <= CAUSAL_CHUNK:
        return F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLE, is_causal=True, scale=scale)
    outs = []
    for lo in range(0, L, CAUSAL_CHUNK):
        hi = min(lo + CAUSAL_CHUNK, L)
        mask_QK = torch.ones(hi - lo, hi, dtype=torch.bool, device=q_BHLD.device).tril(lo)
        outs.append(
            F.scaled_dot_product_attention(
                q_BHLD[:, :, lo:hi], k_BHLD[:, :, :hi], v_BHLE[:, :, :hi], attn_mask=mask_QK, scale=scale
            )
        )
    return torch.cat(outs, dim=2)


def attend(
    q_BHLD: Tensor,
    k_BHLD: Tensor,
    v_BHLE: Tensor,
    doc_ids_BL: Tensor,
    causal: bool,
    backend: Backend = "auto",
    scale: float | None = None,
) -> Tensor:
    """One-shot `attention`: builds the metadata for `doc_ids_BL` (-1 = padding) and attends.

    Models build the metadata once per forward instead (`attention_meta`). With a KV cache use
    `attend_cached`.
    """
    meta = attention_meta(doc_ids_BL, causal, resolve_backend(backend, q_BHLD.device), q_BHLD.dtype)
    return attention(q_BHLD, k_BHLD, v_BHLE, meta, scale)


def attend_cached(
    q_BHQD: Tensor, k_BHKD: Tensor, v_BHKE: Tensor, doc_ids_BK: Tensor, scale: float | None = None
) -> Tensor:
    """Causal block-diagonal attention of Q new queries over K >= Q cached keys: (B, H, Q, Dv).

    The queries sit at the last Q key positions; doc_ids_BK covers all K keys (-1 = padding).
    Equals rows [K - Q, K) of `attend(..., causal=True)` over the full sequence. Always SDPA
    with a dense mask (a decode step has Q = 1, so the mask is small). k, v may have a head axis
    of size 1 expanded over H (MLA's absorbed decode).
    """
    mask_B1QK = suffix_block_mask(doc_ids_BK, q_BHQD.shape[2])
    return F.scaled_dot_product_attention(q_BHQD, k_BHKD, v_BHKE, attn_mask=mask_B1QK, scale=scale)


def _tokens(x_BHLX: Tensor) -> Tensor:
    """(B, H, L, X) -> (T, H, X), tokens in row-major order."""
    B, H, L, X = x_BHLX.shape
    return x_BHLX.transpose(1, 2).reshape(B * L, H, X)


def _sdpa_segments(
    q_BHLD: Tensor, k_BHLD: Tensor, v_BHLE: Tensor, plan: SegmentPlan, causal: bool, scale: float | None
) -> Tensor:
    """SDPA over the documents gathered into a padded (S, H, Lmax, D) batch (varlen by padding);
    padding tokens of the packed rows return their own value vector."""
    B, H, L, _ = q_BHLD.shape
    S, Lmax = plan.num_segments, plan.max_len
    v_THE = _tokens(v_BHLE)

    def pad(x_THX: Tensor) -> Tensor:  # (T, H, X) -> (S, H, Lmax, X)
        return x_THX.index_select(0, plan.gather_P).view(S, Lmax, H, -1).transpose(1, 2)

    q_SHLD, k_SHLD, v_SHLE = pad(_tokens(q_BHLD)), pad(_tokens(k_BHLD)), pad(v_THE)
    if causal:
        out_SHLE = causal_sdpa(q_SHLD, k_SHLD, v_SHLE, scale)
    else:
        out_SHLE = F.scaled_dot_product_attention(
            q_SHLD, k_SHLD, v_SHLE, attn_mask=plan.keys_S11L, scale=scale
        )
    out_PHE = out_SHLE.transpose(1, 2).reshape(S * Lmax, H, -1)
    out_THE = torch.cat([out_PHE, v_THE]).index_select(0, plan.unpad_T)
    return out_THE.view(B, L, H, -1).transpose(1, 2)


def _sdpa_cp(q_BHLD: Tensor, k_BHKD: Tensor, v_BHKE: Tensor, plan: CPPlan, scale: float | None) -> Tensor:
    """SDPA of a context-parallel rank's queries over its gathered keys, one call a part: its
    documents gathered into padded (S, H, Qmax / Kmax, D) batches, the bottom-right causal mask,
    back into the slice's token order."""
    B, H, Lc, _ = q_BHLD.shape
    q_THD, k_THD, v_THE = _tokens(q_BHLD), _tokens(k_BHKD), _tokens(v_BHKE)

    def pad(x_THX: Tensor, idx_P: Tensor, n: int) -> Tensor:  # (T, H, X) -> (S, H, n, X)
        return x_THX.index_select(0, idx_P).view(-1, n, H, x_THX.shape[-1]).transpose(1, 2)

    outs = []
    for part in plan.parts:
        q_SHQD = pad(q_THD, part.q_gather_P, part.max_q)
        k_SHKD, v_SHKE = pad(k_THD, part.k_gather_P, part.max_k), pad(v_THE, part.k_gather_P, part.max_k)
        out_SHQE = F.scaled_dot_product_attention(
            q_SHQD, k_SHKD, v_SHKE, attn_mask=part.mask_S1QK, scale=scale
        )
        outs.append(out_SHQE.transpose(1, 2).reshape(part.num_segments * part.max_q, H, -1))
    out_THE = torch.cat(outs).index_select(0, plan.unpad_T)
    return out_THE.view(B, Lc, H, -1).transpose(1, 2)


def _varlen_kernel() -> tuple[Callable[..., Any], str]:
    if _flash_varlen is not None:
        return _flash_varlen, "flash_attn"
    if (kernel := torch_varlen()) is not None:
        return kernel, "torch"
    raise RuntimeError(
        "attn backend 'flash' needs flash-attn (pip install moonforge[flash]) or "
        "torch >= 2.10 with torch.nn.attention.varlen on CUDA; use 'sdpa'"
    )


def _flash(q_BHLD: Tensor, k_BHLD: Tensor, v_BHLE: Tensor, meta: AttnMeta, scale: float | None) -> Tensor:
    kernel, kind = _varlen_kernel()
    B, H, L, Dh = q_BHLD.shape
    Dv = v_BHLE.shape[-1]
    if not _half(q_BHLD.dtype):  # attention_meta never plans this; a direct caller might
        raise TypeError(
            f"attn backend 'flash' runs bf16 / fp16 only, got {q_BHLD.dtype}; cast "
            "explicitly, run under autocast, or use the 'sdpa' backend"
        )
    v_THE = _tokens(v_BHLE)
    if Dv < Dh:  # varlen kernels want one head dim for q, k and v; zero-pad v and slice back
        v_THE = F.pad(v_THE, (0, Dh - Dv))
    cu_S1, max_len = meta.cu_seqlens_S1, meta.max_seqlen
    q_THD, k_THD = _tokens(q_BHLD), _tokens(k_BHLD)
    if kind == "flash_attn":
        out_THE = kernel(
            q_THD, k_THD, v_THE, cu_S1, cu_S1, max_len, max_len, softmax_scale=scale, causal=meta.causal
        )
    elif "is_causal" in inspect.signature(kernel).parameters:  # torch 2.10 / 2.11
        out_THE = kernel(
            q_THD, k_THD, v_THE, cu_S1, cu_S1, max_len, max_len, is_causal=meta.causal, scale=scale
        )
    else:  # torch >= 2.12: a causal window instead of is_causal
        out_THE = kernel(
            q_THD,
            k_THD,
            v_THE,
            cu_S1,
            cu_S1,
            max_len,
            max_len,
            scale=scale,
            window_size=(-1, 0) if meta.causal else (-1, -1),
        )
    return out_THE[..., :Dv].reshape(B, L, H, Dv).transpose(1, 2)


_compiled_flex: Callable[..., Tensor] | None = None


def _flex(q_BHLD: Tensor, k_BHLD: Tensor, v_BHLE: Tensor, meta: AttnMeta, scale: float | None) -> Tensor:
    """FlexAttention with the batch's block mask: compiled once on CUDA (the fused kernel);
    eager elsewhere (it materialises the scores: a reference, not a fast path)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn: Callable[..., Tensor] = flex_attention
    if q_BHLD.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return fn(q_BHLD, k_BHLD, v_BHLE, block_mask=meta.block_mask, scale=scale)


def attend_reference(
    q_BHLD: Tensor,
    k_BHLD: Tensor,
    v_BHLE: Tensor,
    doc_ids_BL: Tensor,
    causal: bool,
    scale: float | None = None,
) -> Tensor:
    """Slow per-document reference: one SDPA call per segment, no masks. For tests only."""
    B, H, L, _ = q_BHLD.shape
    out_BHLE = torch.zeros(B, H, L, v_BHLE.shape[-1], dtype=v_BHLE.dtype, device=v_BHLE.device)
    seg_BL = segment_ids(doc_ids_BL)
    for b in range(B):
        for s in torch.unique(seg_BL[b]).tolist():
            idx = (seg_BL[b] == s).nonzero().flatten()
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            out_BHLE[b, :, lo:hi] = F.scaled_dot_product_attention(
                q_BHLD[b, :, lo:hi], k_BHLD[b, :, lo:hi], v_BHLE[b, :, lo:hi], is_causal=causal, scale=scale
            )
    return out_BHLE

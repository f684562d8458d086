"""Packed attention: flash-attn varlen vs padded SDPA (and our SDPA backend), with MFU.

One packed row of documents with long-tailed lengths (what the ViT and the SFT packer produce) is
attended several ways, all causal within each document and all measured side by side here:
  padded   the usual baseline: documents cut out into a (S, max_len) batch, SDPA with a causal +
           key-padding mask; padding positions cost FLOPs too;
  dense    moonforge's dense block-mask form (the reference);
  segments moonforge's padded-segment form (documents gathered, causal SDPA, scattered back);
  sdpa     moonforge's CPU backend: whichever of the two its cost model picks for this layout;
  flash    varlen flash with cu_seqlens (CUDA + flash-attn or torch's varlen kernel only).
Then "metadata once vs per layer": a stack of `--layers` attention calls whose document layout
is turned into metadata once (moonforge's models now) or again in every layer (before).
MFU = useful attention FLOPs (4 * H * D * sum_i L_i^2 / 2 for causal) per second over a matmul peak
measured in this same run (bf16 on CUDA, fp32 on CPU), so the ratio means something on any box.

Run: python benchmarks/bench_attention.py            (CUDA if present, else CPU at a small size)
     python benchmarks/bench_attention.py --threads 1 --clock cpu   (CPU seconds: shared boxes)
     python benchmarks/bench_attention.py --tokens 65536 --heads 16 --head-dim 128   (GPU scale)
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from moonforge.model.attention import attend, attention, attention_meta, flash_available


def doc_lengths(total: int, median: float, sigma: float, seed: int) -> list[int]:
    """Log-normal document lengths (most short, a few long) that fill exactly `total` tokens."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while sum(out) < total:
        n = int(math.exp(math.log(median) + sigma * torch.randn(1, generator=g).item()))
        out.append(max(1, min(n, total - sum(out))))
    return out


CLOCK = time.perf_counter
"""Wall seconds; `--clock cpu` swaps in process CPU seconds (with --threads 1 on a shared box)."""


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = CLOCK()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(CLOCK() - t0)
    return sorted(times)[len(times) // 2]


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved FLOP/s of a square matmul in `dtype` (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device, 5)


def padded_sdpa(q, k, v, lengths: list[int]):
    """The padded baseline: (S, H, max_len, D) with causal + key-padding mask."""
    S, M = len(lengths), max(lengths)
    H, D = q.shape[1], q.shape[-1]
    qp, kp, vp = (torch.zeros(S, H, M, D, device=q.device, dtype=q.dtype) for _ in range(3))
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        qp[i, :, :n], kp[i, :, :n], vp[i, :, :n] = q[0, :, s : s + n], k[0, :, s : s + n], v[0, :, s : s + n]
    keep = torch.arange(M, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]
    causal = torch.ones(M, M, dtype=torch.bool, device=q.device).tril()
    mask = causal[None, None] & keep[:, None, None, :]
    mask |= torch.eye(M, dtype=torch.bool, device=q.device)[None, None]  # no fully masked pad rows
    return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=None, help="packed row length (GPU 32768, CPU 2048)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--median", type=float, default=None, help="median document length")
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--layers", type=int, default=8, help="layers for metadata once vs per layer")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK = time.process_time
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    T = args.tokens or (32768 if gpu else 2048)
    H = args.heads or (16 if gpu else 4)
    D = args.head_dim or (128 if gpu else 32)
    dtype = torch.bfloat16 if gpu else torch.float32
    lengths = doc_lengths(T, args.median or (512 if gpu else 64), args.sigma, seed=0)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].to(device)
    q, k, v = (torch.randn(1, H, T, D, device=device, dtype=dtype) for _ in range(3))
    useful = 4 * H * D * sum(n * n for n in lengths) / 2
    peak = matmul_peak(device, dtype)
    print(
        f"device {device} ({torch.cuda.get_device_name() if gpu else 'cpu'}), {dtype}; "
        f"{len(lengths)} docs in {T} tokens (max {max(lengths)}), H={H} D={D}; "
        f"matmul peak {peak / 1e12:.2f} TFLOP/s"
    )
    runs = {
        "padded": lambda: padded_sdpa(q, k, v, lengths),
        "dense": lambda: attend(q, k, v, doc, True, backend="dense"),
        "segments": lambda: attend(q, k, v, doc, True, backend="padded"),
        "sdpa": lambda: attend(q, k, v, doc, True, backend="sdpa"),
    }
    if flash_available(device):
        runs["flash"] = lambda: attend(q, k, v, doc, True, backend="flash")
    else:
        print("flash: skipped (needs CUDA and flash-attn: pip install moonforge[flash])")
    with torch.no_grad():
        ref = runs["sdpa"]()
        out = padded_sdpa(q, k, v, lengths)
        got = torch.cat([out[i, :, :n] for i, n in enumerate(lengths)], dim=1)[None]
        err = (got.float() - ref.float()).abs().max().item()
        times = {name: timed(fn, device, args.repeats) for name, fn in runs.items()}
    print(f"padded vs sdpa max |diff| {err:.2e}")
    base = times["padded"]
    print(f"sdpa picked the {attention_meta(doc, True, 'sdpa').kernel!r} form")
    print(f"{'backend':>8} {'ms':>9} {'vs padded':>10} {'MFU':>7}")
    for name, t in times.items():
        print(f"{name:>8} {1e3 * t:>9.2f} {base / t:>9.2f}x {useful / t / peak:>7.2%}")
    metadata_once_vs_per_layer(q, k, v, doc, args.layers, device, args.repeats)


def metadata_once_vs_per_layer(q, k, v, doc, layers: int, device, repeats: int) -> None:
    """`layers` attention calls on one layout: metadata built once vs rebuilt in every layer."""
    backend = "flash" if flash_available(device) else "sdpa"

    def once():
        meta = attention_meta(doc, True, backend, q.dtype)
        return [attention(q, k, v, meta) for _ in range(layers)]

    def per_layer():
        return [attend(q, k, v, doc, True, backend=backend) for _ in range(layers)]

    with torch.no_grad():
        t_once, t_per = timed(once, device, repeats), timed(per_layer, device, repeats)
        t_meta = timed(lambda: attention_meta(doc, True, backend, q.dtype), device, repeats)
    print(
        f"metadata once vs per layer ({layers} layers, {backend}): {1e3 * t_once:.2f} ms vs "
        f"{1e3 * t_per:.2f} ms = {t_per / t_once:.2f}x (building it: {1e3 * t_meta:.2f} ms)"
    )


if __name__ == "__main__":
    main()

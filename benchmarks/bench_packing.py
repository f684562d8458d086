"""Packing vs padding for the tiny LM on CPU: useful-token fraction, time per useful token, MFU.

The same stream of variable-length documents (long-tailed lengths in [16, 256]) is trained
forward + backward in rows of 256 tokens with block-diagonal causal attention, packed by
moonforge's own packer (stages/data/packing.py, as the training stream runs it):
  (a) best-fit: RowPacker over batches.OPEN_ROWS open rows (the default);
  (b) next-fit: RowPacker with one open row (what moonforge did before);
and, for reference, (c) first-fit-decreasing over the whole set at once (offline, which a
stream cannot do) and (d) padded: one document per row, padded to the longest document.
All use micro-batches of the same number of rows and the SDPA backend. MFU is measured against
an fp32 matmul peak timed in this process:
  model FLOPs = 6 * active params (no embedding lookup) * useful tokens
              + 6 * layers * heads * (d_qk + d_v) * sum_docs n (n + 1) / 2   (causal attention)

Run: python benchmarks/bench_packing.py [--docs 1000] [--threads 2]  (goal: best-fit >= 0.98 useful)

Legend: B rows per micro-batch, L row length, V vocab.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from moonforge.model.config import LMConfig, VLMConfig
from moonforge.model.lm import MoELM
from moonforge.stages.data.batches import OPEN_ROWS
from moonforge.stages.data.packing import RowPacker

ROOT = Path(__file__).resolve().parents[1]
ROW_LEN = 256


def doc_lengths(num_docs: int, seed: int = 0) -> list[int]:
    """Long-tailed (log-normal, median ~48) lengths clipped to [16, ROW_LEN]."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(num_docs, generator=g) * 0.9 + torch.log(torch.tensor(48.0)))
    return raw.round().clamp(16, ROW_LEN).long().tolist()


def pack_ffd(lengths: list[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: lists of document indices whose lengths sum to <= row_len."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        slot = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if slot is None:
            rows.append([])
            free.append(row_len)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= lengths[i]
    return rows


def pack_stream(lengths: list[int], row_len: int, open_rows: int) -> list[list[int]]:
    """moonforge's packer over the documents in arrival order: lists of document indices."""
    packer = RowPacker(row_len, open_rows=open_rows)
    rows = []
    for i, n in enumerate(lengths):
        rows += packer.add([0] * n, tag=i)
    return [r.tags for r in rows + packer.flush()]


def dead_gaps(lengths: list[int], rows: list[list[int]], row_len: int) -> tuple[int, int]:
    """(padding in rows left with less room than the shortest document, all padding)."""
    free = [row_len - sum(lengths[i] for i in r) for r in rows]
    return sum(f for f in free if f < min(lengths)), sum(free)


def make_rows(docs: list[torch.Tensor], rows: list[list[int]], row_len: int):
    """(ids_BL, pos_BL, doc_BL) with positions restarting per document and -1 padding."""
    B = len(rows)
    ids = torch.zeros(B, row_len, dtype=torch.long)
    pos = torch.zeros(B, row_len, dtype=torch.long)
    doc = torch.full((B, row_len), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        off = 0
        for d, i in enumerate(members):
            n = len(docs[i])
            seg = slice(off, off + n)
            ids[r, seg], pos[r, seg], doc[r, seg] = docs[i], torch.arange(n), d
            off += n
    return ids, pos, doc


def train_pass(lm: MoELM, batch, rows_per_step: int) -> float:
    """Seconds for forward + backward over all rows, in micro-batches of rows_per_step."""
    ids, pos, doc = batch
    start = time.perf_counter()
    for s in range(0, ids.shape[0], rows_per_step):
        sl = slice(s, s + rows_per_step)
        logits_BLV = lm(ids[sl], pos[sl], doc[sl])
        # next-token loss only inside a document
        target = torch.where(doc[sl][:, 1:] == doc[sl][:, :-1], ids[sl][:, 1:], -100)
        target = torch.where(doc[sl][:, 1:] < 0, -100, target)
        loss = F.cross_entropy(logits_BLV[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)
        loss.backward()
        lm.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def best_time(lm: MoELM, batch, rows_per_step: int, repeats: int) -> float:
    train_pass(lm, batch, rows_per_step)  # warm-up
    return min(train_pass(lm, batch, rows_per_step) for _ in range(repeats))


def matmul_peak(n: int = 1024, iters: int = 20) -> float:
    """Achieved fp32 FLOP/s of n x n matmuls (best of 5 timings)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * iters / best


def model_flops(lm: MoELM, cfg: LMConfig, lengths: list[int]) -> float:
    """Training FLOPs (fwd + bwd) for the useful tokens, see the module docstring."""
    active = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    idle = sum(
        (m.num_experts - cfg.num_experts_per_tok) * sum(p.numel() for p in m.experts[0].parameters())
        for _, m in lm.moe_layers()
    )
    d_qk = cfg.head_dim + (cfg.qk_rope_head_dim if cfg.attention == "mla" else 0)
    causal_pairs = sum(n * (n + 1) / 2 for n in lengths)
    attn = 6 * cfg.num_layers * cfg.num_heads * (d_qk + cfg.head_dim) * causal_pairs
    return 6 * (active - idle) * sum(lengths) + attn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows-per-step", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    recipe = yaml.safe_load((ROOT / "recipes/tiny.yaml").read_text())
    cfg = VLMConfig.model_validate(recipe["model"]).lm
    lm = MoELM(cfg, backend="sdpa").train()
    lengths = doc_lengths(args.docs)
    docs = [torch.randint(0, cfg.vocab_size, (n,)) for n in lengths]
    useful = sum(lengths)

    max_len = max(lengths)
    layouts = {
        f"best-fit ({OPEN_ROWS} open)": make_rows(docs, pack_stream(lengths, ROW_LEN, OPEN_ROWS), ROW_LEN),
        "next-fit": make_rows(docs, pack_stream(lengths, ROW_LEN, 1), ROW_LEN),
        "FFD offline": make_rows(docs, pack_ffd(lengths, ROW_LEN), ROW_LEN),
        "padded": make_rows(docs, [[i] for i in range(len(docs))], max_len),
    }
    peak_before = matmul_peak()
    times = {name: best_time(lm, batch, args.rows_per_step, args.repeats) for name, batch in layouts.items()}
    peak = max(peak_before, matmul_peak())  # timed on both sides: a shared CPU is noisy
    flops = model_flops(lm, cfg, lengths)

    print(
        f"tiny LM ({sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M params, "
        f"{cfg.attention}), {args.docs} docs, lengths {min(lengths)}-{max_len} "
        f"(mean {useful / len(lengths):.0f}), {useful} useful tokens, threads={args.threads}"
    )
    print(
        f"{'layout':<20} {'rows x len':>12} {'useful frac':>12} {'fwd+bwd s':>10} "
        f"{'us/useful tok':>14} {'MFU':>7}"
    )
    for name, (ids, _, _) in layouts.items():
        B, L = ids.shape
        t = times[name]
        print(
            f"{name:<20} {f'{B} x {L}':>12} {useful / (B * L):>12.3f} {t:>10.3f} "
            f"{1e6 * t / useful:>14.2f} {flops / t / peak:>7.2%}"
        )
    best = f"best-fit ({OPEN_ROWS} open)"
    short, free = dead_gaps(lengths, pack_stream(lengths, ROW_LEN, OPEN_ROWS), ROW_LEN)
    print(
        f"best-fit padding: {short} of its {free} padded tokens sit in rows closed with fewer free "
        f"tokens than the shortest document ({min(lengths)}), which no whole document could fill"
    )
    print(
        f"time per useful token against best-fit: next-fit {times['next-fit'] / times[best]:.2f}x, "
        f"padded {times['padded'] / times[best]:.2f}x, FFD offline {times['FFD offline'] / times[best]:.2f}x"
    )
    print(
        f"fp32 matmul peak (1024^3, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s; "
        f"best-fit run achieved {flops / times[best] / 1e9:.2f} GFLOP/s model FLOPs -> "
        f"MFU {flops / times[best] / peak:.2%}"
    )


if __name__ == "__main__":
    main()

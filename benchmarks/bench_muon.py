"""Muon's share of an LM train step at d = 512: the optimizer step against the forward + backward
it follows, and against AdamW's step over the same parameters, side by side in one process.

The LM is moonforge's MoE (MLA, d = 512, 4 layers, 8 experts top-2 plus a shared one, experts of
1024) on 4 x 512 random tokens, fp32 on this CPU. MuonAdamW (stages/train/optim.py) is the
stages' optimizer: Muon on every 2-D matrix, each expert's matrix orthogonalised on its own
(batched Newton-Schulz over the stacked [E, ...] weights, stages/train/muon.py, fp32 on CPU),
AdamW on embeddings, the head, norms and biases. Rounds alternate forward + backward, the Muon
step and the AdamW step, so load on a shared box hits all three alike; each is the median of
`--steps` timings per round.

Run: python benchmarks/bench_muon.py [--rounds 4] [--steps 3] [--threads 2]
Prints the optimizer's share of a train step (goal: Muon <= 10% at d = 512), Muon / AdamW, the
Newton-Schulz FLOPs and their rate against a matmul peak measured in the same run, and the
tokens per optimizer step from which Muon's share is <= 10% (its cost does not grow with them).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from moonforge.model.config import LMConfig
from moonforge.model.lm import MoELM
from moonforge.stages.config import OptimizerConfig
from moonforge.stages.train.objectives import IGNORE, token_ce
from moonforge.stages.train.optim import MuonAdamW, is_muon_param, matrix_shape

B, L = 4, 512
CONFIG = LMConfig(
    vocab_size=8192,
    hidden_size=512,
    num_layers=4,
    num_heads=8,
    attention="mla",
    head_dim=64,
    kv_lora_rank=128,
    qk_rope_head_dim=32,
    first_k_dense=1,
    dense_intermediate_size=2048,
    num_experts=8,
    num_experts_per_tok=2,
    num_shared_experts=1,
    moe_intermediate_size=1024,
    routed_scaling_factor=1.0,
    max_position_embeddings=L,
)


def newton_schulz_flops(named, steps: int) -> float:
    """FLOPs of one Muon step's Newton-Schulz iterations: per (m <= n) matrix and iteration,
    gram = X X^T (2 m^2 n), gram^2 (2 m^3), update X (2 m^2 n)."""
    total = 0.0
    for name, p in named:
        if not is_muon_param(name, p):
            continue
        count, a, b = matrix_shape(name, p) or (1, *p.shape)
        m, n = min(a, b), max(a, b)
        total += count * steps * (4 * m * m * n + 2 * m**3)
    return total


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best achieved fp32 FLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def median_seconds(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lm = MoELM(CONFIG)
    lm.reset_parameters()
    named = list(lm.named_parameters())
    muon = MuonAdamW(named, OptimizerConfig(lr=1e-3))
    adamw = torch.optim.AdamW([p for _, p in named], lr=1e-3, weight_decay=0.1)
    ids_BL = torch.randint(0, CONFIG.vocab_size, (B, L))
    pos_BL = torch.arange(L).repeat(B, 1)
    doc_BL = torch.zeros(B, L, dtype=torch.long)
    labels_BL = F.pad(ids_BL[:, 1:], (0, 1), value=IGNORE)

    def forward_backward() -> None:
        for p in lm.parameters():
            p.grad = None
        loss, _ = token_ce(lm(ids_BL, pos_BL, doc_BL), labels_BL)
        loss.backward()

    forward_backward()  # warm-up; both optimizers build their state once
    muon.step()
    adamw.step()
    n_params = sum(p.numel() for _, p in named)
    print(
        f"MoE LM d={CONFIG.hidden_size}, {CONFIG.num_layers} layers, {CONFIG.num_experts} experts "
        f"top-{CONFIG.num_experts_per_tok}: {n_params / 1e6:.1f}M parameters ({muon.num_muon / 1e6:.1f}M "
        f"under Muon), {B} x {L} tokens, fp32, {torch.get_num_threads()} threads"
    )
    fb, mu, ad = [], [], []
    for r in range(args.rounds):
        fb.append(median_seconds(forward_backward, args.steps))
        mu.append(median_seconds(muon.step, args.steps))  # the gradients of the last backward
        ad.append(median_seconds(adamw.step, args.steps))
        print(
            f"round {r}: forward+backward {fb[-1]:.3f} s, Muon step {mu[-1]:.3f} s, AdamW step {ad[-1]:.3f} s"
        )
    f, m, a = (statistics.median(x) for x in (fb, mu, ad))
    ns = newton_schulz_flops(named, OptimizerConfig(lr=1e-3).muon.ns_steps)
    peak = matmul_peak()
    print(
        f"Newton-Schulz: {ns / 1e9:.0f} GFLOP per step at {ns / m / 1e9:.0f} GFLOP/s "
        f"({ns / m / peak:.0%} of the {peak / 1e9:.0f} GFLOP/s matmul peak measured now)"
    )
    print(
        f"Muon step: {m / (f + m):.1%} of a train step of {B * L} tokens (goal <= 10%); "
        f"{m / a:.1f}x AdamW's step"
    )
    print(f"AdamW step: {a / (f + a):.1%} of a train step of {B * L} tokens")
    # Muon's cost is per optimizer step, the forward + backward's per token: with k micro-batches
    # accumulated per step Muon takes m / (k f + m), <= 10% from k = 9 m / f.
    k = max(1, math.ceil(9 * m / f))
    print(
        f"Muon's share falls with the tokens per optimizer step: <= 10% from {k} accumulated "
        f"micro-batches ({k * B * L} tokens per step; derived from the times above)"
    )


if __name__ == "__main__":
    main()

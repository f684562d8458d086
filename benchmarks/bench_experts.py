"""Grouped vs looped MoE experts: forward + backward of the routed experts, side by side.

The routed-expert part of one MoE layer (tokens sorted by expert, SwiGLU experts, weighted
scatter back) at the LM benchmark's shape (4 x 512 tokens, d=256, 8 experts top-2, width 512),
run three ways on the same weights and routing, in alternating order:
  looped      the previous implementation: one F.linear chain per expert on its slice, with the
              expert counts read to the host (the reference of tests/test_model_grouped_experts.py)
  grouped_mm  torch's grouped GEMM over the sorted rows (no host sync; `auto` wherever it runs)
  padded      rows scattered into an (E, C, D) batch, one bmm per projection (the fallback)
Printed: ms per forward + backward and the speed-up over the looped form.

Run: python benchmarks/bench_experts.py [--tokens 2048] [--rounds 7] [--skew 0]
                                        [--threads 1 --clock cpu]
(--skew > 0 routes that share of tokens to expert 0, to see where padding stops paying; on a shared
box, `--threads 1 --clock cpu` times CPU seconds that other processes do not inflate.)

Legend: T tokens, K top-k, A = T*K assignments, D hidden, F expert width, E experts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moonforge.model.experts import GroupedExperts, grouped_mm_available


def looped(experts: GroupedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            outs.append(experts[e](x_AD[start : start + n]))
        start += n
    return torch.cat(outs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--skew", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    T, K, E = args.tokens, args.top_k, args.experts
    experts = GroupedExperts(E, args.dim, args.width)
    experts.reset_parameters(0.02, 0.02)
    scores_TE = torch.rand(T, E)
    scores_TE[: int(args.skew * T), 0] += 10.0
    idx_TK = scores_TE.topk(K, dim=-1).indices
    flat_A = idx_TK.flatten()
    order_A = torch.argsort(flat_A, stable=True)
    counts_E = torch.bincount(flat_A, minlength=E)
    x_TD = torch.randn(T, args.dim, requires_grad=True)
    gy_AD = torch.randn(T * K, args.dim)

    def run(fn) -> None:
        x_AD = x_TD[order_A // K]
        fn(x_AD).backward(gy_AD)

    forms = {
        "looped": lambda x: looped(experts, x, counts_E),
        "padded": lambda x: experts._padded(x, counts_E, experts.gate_up, experts.down),
    }
    if grouped_mm_available(x_TD.device, x_TD.dtype):
        forms["grouped_mm"] = lambda x: experts._grouped_mm(x, counts_E, experts.gate_up, experts.down)
    with torch.no_grad():
        x_AD = x_TD[order_A // K]
        ref = forms["looped"](x_AD)
        for name, fn in forms.items():
            print(f"{name:>10} max |diff| vs looped {(fn(x_AD) - ref).abs().max().item():.1e}")
    times: dict[str, list[float]] = {name: [] for name in forms}
    for r in range(args.rounds):
        names = list(forms)[:: 1 if r % 2 == 0 else -1]
        for name in names:
            t0 = clock()
            run(forms[name])
            times[name].append(clock() - t0)
    base = statistics.median(times["looped"][1:])
    print(
        f"{T} tokens x top-{K} over {E} experts (busiest {int(counts_E.max())} of "
        f"{T * K} rows), d={args.dim}, width {args.width}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock"
    )
    print(f"{'form':>10} {'ms fwd+bwd':>11} {'vs looped':>10}")
    for name, ts in times.items():
        t = statistics.median(ts[1:])
        print(f"{name:>10} {1e3 * t:>11.1f} {base / t:>9.2f}x")


if __name__ == "__main__":
    main()

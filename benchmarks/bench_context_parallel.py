"""Context parallelism on this CPU: one process training a long packed row against two gloo ranks
that each keep half of it (model/context_parallel.py), side by side in one command.

The LM is the tiny recipe's shape (MLA, MoE) with max_position_embeddings raised to the row;
one micro-batch of ROWS x LEN tokens in documents of 256-1024 tokens, forward + backward + the
gradient sum over the pair. Both sides use the same cores: the single process runs
`--threads` threads, each rank `--threads / 2`. Prints, per side, the median step time, tokens/s
and the peak resident memory of the process (ru_maxrss: weights, libraries and activations),
and the ratios. Context parallelism is for sequences that do not fit one device; on one shared
CPU the pair mostly pays its gathers, so expect a ratio below 1 here.

With `--balance`, instead: the `cp` attention kernel alone (forward + backward, one thread), per
rank of 2, at the mid-size recipe's heads (recipes/small.yaml: 8 heads, q/k 96 wide, v 64), on one
`--len`-token document and on the packed layout, for the zig-zag split in query chunks (what the
LM runs) against the contiguous split in one part (what it ran before), alternating in one
process. A step waits for its slowest rank, so the ratio is of the slowest ranks' times.

Run: python benchmarks/bench_context_parallel.py [--len 8192] [--steps 3] [--threads 2]
     python benchmarks/bench_context_parallel.py --balance [--len 4096] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
ROWS = 1


def _model(seq_len: int):
    from moonforge.model.lm import MoELM
    from moonforge.stages.recipe import load_recipe

    cfg = load_recipe(REPO / "recipes" / "tiny.yaml").model.lm
    torch.manual_seed(0)
    return MoELM(cfg.model_copy(update={"max_position_embeddings": seq_len}), backend="sdpa")


def _batch(seq_len: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, 2048, (ROWS, seq_len), generator=g)
    doc, pos, start, d = torch.zeros(ROWS, seq_len, dtype=torch.long), torch.zeros_like(ids), 0, 0
    while start < seq_len:  # documents of 256..1024 tokens
        n = min(int(torch.randint(256, 1025, (1,), generator=g)), seq_len - start)
        doc[:, start : start + n], pos[:, start : start + n] = d, torch.arange(n)
        start, d = start + n, d + 1
    return ids, pos, doc


def _steps(lm, seq_len: int, n: int, sync=None) -> list[float]:
    ids, pos, doc = _batch(seq_len)
    times = []
    for _ in range(n + 1):  # the first is warm-up
        lm.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        lm(ids, pos, doc, labels_BL=ids).backward()
        if sync is not None:
            sync(lm)
        times.append(time.perf_counter() - t0)
    return times[1:]


def _rank(rank: int, world: int, port: int, seq_len: int, n: int, threads: int, out: str) -> None:
    from moonforge.model.context_parallel import ContextParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lm = _model(seq_len)
    lm.context_parallel = ContextParallel(rank, world)

    def sync(model) -> None:  # the trainer's gradient sum over the group
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)

    times = _steps(lm, seq_len, n, sync)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, f"rank{rank}.json").write_text(json.dumps({"times": times, "rss": rss}))
    dist.destroy_process_group()


def _single(seq_len: int, n: int, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    times = _steps(_model(seq_len), seq_len, n)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, "single.json").write_text(json.dumps({"times": times, "rss": rss}))


def _balance(seq_len: int, rounds: int) -> None:
    from moonforge.model.attention import CP_QUERY_CHUNK, attention, cp_attention_meta
    from moonforge.model.context_parallel import ContextParallel

    class Contiguous(ContextParallel):
        """The baseline split: rank r keeps [r L/n, (r + 1) L/n)."""

        def ranges(self, seq_len: int) -> tuple[tuple[int, int], ...]:
            n = seq_len // self.size
            return ((self.rank * n, (self.rank + 1) * n),)

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    H, Dqk, Dv = 8, 96, 64
    q, k = torch.randn(1, H, seq_len, Dqk, generator=g), torch.randn(1, H, seq_len, Dqk, generator=g)
    v = torch.randn(1, H, seq_len, Dv, generator=g)
    sides = {
        "contiguous, one part": (Contiguous, seq_len),
        f"zig-zag, chunks of {CP_QUERY_CHUNK}": (ContextParallel, CP_QUERY_CHUNK),
    }
    layouts = {"one document": torch.zeros(1, seq_len, dtype=torch.long), "packed": _batch(seq_len)[2]}
    print(
        f"torch {torch.__version__}; cp attention kernel, {seq_len} tokens over 2 ranks, fwd + bwd, "
        f"1 thread, median of {rounds} alternating rounds"
    )
    for name, doc in layouts.items():
        times: dict[tuple[str, int], list[float]] = {(side, r): [] for side in sides for r in range(2)}
        for _ in range(rounds + 1):  # the first round is warm-up
            for side, (kind, chunk) in sides.items():
                for r in range(2):
                    cp = kind(r, 2)
                    meta = cp_attention_meta(doc, cp, chunk)
                    k0, end = meta.keys
                    qs = cp.shard(q, 2).detach().requires_grad_()
                    ks, vs = (
                        k[:, :, k0:end].detach().requires_grad_(),
                        v[:, :, k0:end].detach().requires_grad_(),
                    )
                    t0 = time.perf_counter()
                    attention(qs, ks, vs, meta).sum().backward()
                    times[side, r].append(time.perf_counter() - t0)
        slowest = {}
        for side in sides:
            per_rank = [statistics.median(times[side, r][1:]) for r in range(2)]
            slowest[side] = max(per_rank)
            print(
                f"  {name:12s} {side:28s} "
                f"rank 0 {per_rank[0] * 1e3:7.1f} ms, rank 1 {per_rank[1] * 1e3:7.1f} ms"
            )
        base, new = slowest.values()
        print(f"  {name:12s} slowest rank: {base / new:.2f}x faster zig-zag")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--len", type=int, default=8192, help="tokens in the row")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="threads of the single process")
    p.add_argument("--balance", action="store_true", help="the per-rank kernel time instead")
    p.add_argument("--rounds", type=int, default=5, help="--balance: timed rounds")
    args = p.parse_args()
    if args.balance:
        return _balance(args.len, args.rounds)
    with tempfile.TemporaryDirectory() as out:
        # each side in its own process, so each peak RSS is its own
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_single, args=(args.len, args.steps, args.threads, out))
        proc.start()
        proc.join()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        per_rank = max(1, args.threads // 2)
        mp.start_processes(
            _rank, args=(2, port, args.len, args.steps, per_rank, out), nprocs=2, start_method="spawn"
        )
        single = json.loads(Path(out, "single.json").read_text())
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    tokens = ROWS * args.len
    t1 = statistics.median(single["times"])
    t2 = statistics.median(max(a, b) for a, b in zip(ranks[0]["times"], ranks[1]["times"]))
    rss2 = max(r["rss"] for r in ranks)
    print(f"torch {torch.__version__}; {ROWS} x {args.len} tokens, tiny LM, fwd + bwd, {args.steps} steps")
    print(
        f"one process ({args.threads} threads): {t1:.2f} s/step, {tokens / t1:,.0f} tok/s, "
        f"peak RSS {single['rss'] / 2**20:,.0f} MiB"
    )
    print(
        f"context parallel x2 ({per_rank} thread each): {t2:.2f} s/step, {tokens / t2:,.0f} tok/s, "
        f"peak RSS per rank {rss2 / 2**20:,.0f} MiB"
    )
    print(f"ratio: tokens/s {t1 / t2:.2f}x, peak RSS per process {rss2 / single['rss']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())

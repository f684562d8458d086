"""RL iteration wall time with vs without partial rollouts, on a long-tailed response-length mix.

The tiny VLM (random init) runs real OPMD iterations (`opmd_loop.run_opmd`: rollouts through
model.generate, rewards, optimizer reset, gradient steps). Response lengths are forced: each prompt
draws a length from `replay.long_tailed_lengths` (log-normal, most short, a few very long) and a
wrapper around generate stops it exactly there, so both modes produce the same samples.
  full     every trajectory finishes inside its iteration (segment budget = max length), so an
           iteration waits for its longest response;
  partial  each iteration gives a trajectory at most --budget new tokens; long ones park in the
           replay buffer and resume next iteration (k1.5 sec. 2.6.2).
Same prompts and samples per iteration in both modes. Run: python benchmarks/bench_rl_partial.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml

import moonforge.stages.rl.policy as policy
from moonforge.model.config import VLMConfig
from moonforge.model.generate import GenerationOutput
from moonforge.model.tokenizer import Tokenizer
from moonforge.model.vlm import build_vlm
from moonforge.stages.artifacts import StageContext
from moonforge.stages.config import OptimizerConfig, ScheduleConfig
from moonforge.stages.data.chat import ChatPromptItem
from moonforge.stages.rl.opmd_loop import OPMDRun, run_opmd
from moonforge.stages.rl.replay import RolloutConfig, long_tailed_lengths
from moonforge.stages.rl.rewards import LengthPenaltyConfig
from moonforge.stages.rl.sampling import SamplerConfig

REPO = Path(__file__).resolve().parent.parent
PROMPT_LEN = 16


def forced_generate(lengths: dict[tuple[int, ...], int], real):
    """generate() that ends each row at its prompt's drawn length (stop ids ignored)."""

    def gen(model, contexts, *, max_new_tokens, **kw):
        left = [lengths[tuple(c[:PROMPT_LEN])] - (len(c) - PROMPT_LEN) for c in contexts]
        steps = min(max_new_tokens, max(left))
        kw.update(stop_ids=(), repeat_ngram=None, repeat_max=None)
        out = real(model, contexts, max_new_tokens=steps, **kw)
        cut = [min(n, max_new_tokens) for n in left]
        # a sampled media pad (the tokenizer's id, passed by RolloutSampler) would read as an
        # image slot on resume; any plain id will do here
        media_pad = kw["media_pad_id"]
        toks = [[300 if x == media_pad else x for x in t[:n]] for t, n in zip(out.tokens, cut)]
        return GenerationOutput(
            toks,
            [lp[:n] for lp, n in zip(out.logprobs, cut)],
            ["stop" if n <= max_new_tokens else "length" for n in left],
            cut,
        )

    return gen


def run(mode: str, budget: int, args, model_cfg, tok, items, lengths) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_vlm(model_cfg, seed=0)
    segment = budget if mode == "partial" else args.max_len
    cfg = OPMDRun(
        label=f"bench_{mode}",
        num_iterations=args.iterations,
        prompts_per_iteration=args.prompts,
        samples_per_prompt=args.k,
        steps_per_iteration=1,
        tau=0.5,
        temperature=1.0,
        rollout=RolloutConfig(segment_budget=segment, max_total_tokens=args.max_len, repeat=None),
        length=LengthPenaltyConfig(weight=0.0),
        sampler=SamplerConfig(use_curriculum=False),
        optimizer=OptimizerConfig(lr=1e-4),
        schedule=ScheduleConfig(kind="constant"),
        trainable=("lm",),
        rows_per_forward=64,
        seed=0,
    )
    real = policy.generate
    policy.generate = forced_generate(lengths, real)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            curves = run_opmd(model, tok, items, cfg, StageContext(out=Path(tmp), model=model_cfg))
            total = time.perf_counter() - t0
    finally:
        policy.generate = real
    return {
        "iter_s": total / args.iterations,
        "rollout_s": sum(c["rollout_seconds"] for c in curves) / args.iterations,
        "trained": sum(c["trajectories"] for c in curves),
        "tokens": curves[-1]["generated_tokens"],
        "buffered_end": curves[-1]["buffered"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--median", type=float, default=8.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--budget", type=int, default=24)
    args = p.parse_args()
    torch.set_num_threads(2)
    model_cfg = VLMConfig.model_validate(yaml.safe_load((REPO / "recipes/tiny.yaml").read_text())["model"])
    tok = Tokenizer.load(REPO / "data" / "tokenizer")
    gen = torch.Generator().manual_seed(0)
    n = args.prompts * args.iterations
    prompts = [torch.randint(300, 2000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(n)]
    drawn = long_tailed_lengths(n, args.median, args.sigma, args.max_len, seed=0)
    lengths = {tuple(pr): d for pr, d in zip(prompts, drawn)}
    items = [
        ChatPromptItem(f"p{i}", "text", pr, None, None, "1", "exact", 0.0) for i, pr in enumerate(prompts)
    ]
    print(
        f"lengths: median {sorted(drawn)[n // 2]}, mean {sum(drawn) / n:.1f}, max {max(drawn)} "
        f"({n} prompts x k={args.k}, {args.iterations} iterations, budget {args.budget})"
    )
    warm = argparse.Namespace(**{**vars(args), "iterations": 1})
    run("partial", args.budget, warm, model_cfg, tok, items, lengths)  # first-call overheads out
    res = {m: run(m, args.budget, args, model_cfg, tok, items, lengths) for m in ("full", "partial")}
    print(f"{'':14s}{'full':>10s}{'partial':>10s}{'ratio':>8s}")
    for key in ("iter_s", "rollout_s", "trained", "tokens", "buffered_end"):
        a, b = res["full"][key], res["partial"][key]
        print(f"{key:14s}{a:10.2f}{b:10.2f}{(a / b if b else float('nan')):8.2f}")


if __name__ == "__main__":
    main()

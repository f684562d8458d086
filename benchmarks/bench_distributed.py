"""CPU benchmark: data-parallel (torchrun, 2 gloo processes) vs single-process throughput, and the
Muon optimizer-step share of a train step vs AdamW's. Both sides run in this invocation.

    .venv/bin/python benchmarks/bench_distributed.py [--steps 30]

Throughput uses the loop's own per-step clock (launch and process start-up excluded; the first
3 steps are warm-up). The model is tests/dist_stage.py's next-token MLP-LM; the global batch is
the same in both runs (each rank computes half the micro-batches). On a 2-core machine the ideal
DDP ratio is 2x minus the all-reduce and the duplicated optimizer step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import dist_stage  # noqa: E402

from moonforge.registry.launch import launch_stage  # noqa: E402
from moonforge.stages.artifacts import ListSink, StageContext  # noqa: E402
from moonforge.stages.config import OptimizerConfig  # noqa: E402
from moonforge.stages.recipe import load_recipe  # noqa: E402
from moonforge.stages.stage_configs import LMPretrainConfig  # noqa: E402
from moonforge.stages.train.optim import MuonAdamW  # noqa: E402

WARMUP = 3


def _cfg(steps: int, **launcher) -> LMPretrainConfig:
    return LMPretrainConfig(
        upstream=None,
        trainable=("lm",),
        optimizer={"lr": 1e-2},
        seq_len=64,
        batch_size=32,
        micro_batch_size=8,
        num_steps=steps,
        launcher=launcher,
    )


def _steps_per_s(sink: ListSink) -> float:
    secs = sink.series("toy/seconds")
    (s0, t0), (s1, t1) = secs[WARMUP - 1], secs[-1]
    return (s1 - s0) / (t1 - t0)


def throughput(steps: int) -> tuple[float, float]:
    model = load_recipe(REPO / "recipes" / "tiny.yaml").model
    rates = []
    for launcher in ({}, {"kind": "torchrun", "nproc_per_node": 2}):
        with tempfile.TemporaryDirectory() as d:
            ctx = StageContext(out=Path(d), model=model, sink=ListSink())
            cfg = _cfg(steps, **launcher)
            if launcher:
                launch_stage("dist_stage:toy_stage", None, {}, cfg, ctx)
            else:
                dist_stage.toy_stage(None, {}, cfg, ctx)
            rates.append(_steps_per_s(ctx.sink))
    return rates[0], rates[1]


def optimizer_share(use_muon: bool, steps: int) -> tuple[float, float]:
    """(seconds per optimizer step, its share of the whole train step) on one process."""
    torch.manual_seed(0)
    net = dist_stage.ToyLM()
    named = [(n, p) for n, p in net.named_parameters() if n.startswith("lm.")]
    opt = MuonAdamW(named, OptimizerConfig(lr=1e-2, use_muon=use_muon))
    data = dist_stage.batches(32, 64, 0)
    t_opt = t_all = 0.0
    for i in range(steps + WARMUP):
        x = next(data)
        t0 = time.perf_counter()
        opt.zero_grad()
        dist_stage.lm_loss(net, x)[0].backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if i >= WARMUP:
            t_opt += t2 - t1
            t_all += t2 - t0
    return t_opt / steps, t_opt / t_all


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)  # what each torchrun rank gets (OMP_NUM_THREADS=1): same per-process budget
    one, two = throughput(args.steps)
    print(
        f"throughput, global batch 32 x 64 tokens: single process {one:.2f} steps/s, "
        f"torchrun 2 procs {two:.2f} steps/s -> DDP/single = {two / one:.2f}x"
    )
    mu_s, mu_share = optimizer_share(True, args.steps)
    ad_s, ad_share = optimizer_share(False, args.steps)
    print(
        f"optimizer step: Muon+AdamW {mu_s * 1e3:.2f} ms ({mu_share:.1%} of the train step), "
        f"AdamW only {ad_s * 1e3:.2f} ms ({ad_share:.1%}) -> Muon/AdamW step time = "
        f"{mu_s / ad_s:.2f}x"
    )


if __name__ == "__main__":
    main()

"""The tiny LM train step with glibc's default malloc against stages/train/host_memory.py's
thresholds (freed blocks kept in the heap), side by side.

Each round starts two fresh processes, one per setting, in alternating order (mallopt acts on a
whole process, once): each builds the tiny recipe's LM, takes 3 warm-up steps (Muon + AdamW, 16 x
256 tokens in documents of 40, fp32) and times 15 more in process CPU seconds, which other jobs on
a shared box do not inflate. Prints each round, the median step per setting and their ratio, and
each process's peak RSS.

Run: python benchmarks/bench_host_memory.py [--rounds 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

STEP = r"""
import json, os, resource, sys, time
import torch, yaml
from moonforge.stages.train.host_memory import keep_freed_memory
applied = keep_freed_memory()
from moonforge.model.config import VLMConfig
from moonforge.model.vlm import build_vlm
from moonforge.stages.config import OptimizerConfig
from moonforge.stages.train.optim import MuonAdamW
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
torch.manual_seed(0)
cfg = VLMConfig.model_validate(yaml.safe_load(open("recipes/tiny.yaml"))["model"])
lm = build_vlm(cfg, seed=0).lm
opt = MuonAdamW(list(lm.named_parameters()), OptimizerConfig(lr=1e-3))
B, L = 16, 256
ids = torch.randint(0, cfg.lm.vocab_size, (B, L))
labels, pos = ids.roll(-1, 1), torch.arange(L).repeat(B, 1)
doc = (torch.arange(L) // 40).repeat(B, 1)
def step():
    lm(ids, pos, doc, labels_BL=labels).backward()
    for o in opt.optimizers:
        o.step()
        o.zero_grad(set_to_none=True)
for _ in range(3):
    step()
t = time.process_time()
for _ in range(15):
    step()
print(json.dumps({"applied": applied, "step_s": (time.process_time() - t) / 15,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(tuned: bool, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS=str(threads), MOONFORGE_MALLOC_TUNING="1" if tuned else "0")
    out = subprocess.run([sys.executable, "-c", STEP], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(out.stderr)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if got["applied"] != tuned:
        sys.exit(f"host_memory applied={got['applied']} where {tuned} was asked (not glibc?)")
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    res: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(args.rounds):
        for tuned in (False, True) if r % 2 == 0 else (True, False):
            res[tuned].append(run(tuned, args.threads))
        print(
            f"round {r + 1}: default {res[False][-1]['step_s'] * 1e3:.0f} ms, "
            f"kept {res[True][-1]['step_s'] * 1e3:.0f} ms",
            flush=True,
        )
    med = {k: statistics.median(x["step_s"] for x in v) for k, v in res.items()}
    rss = {k: statistics.median(x["peak_rss_mib"] for x in v) for k, v in res.items()}
    print(
        f"tiny LM step, {args.threads} thread(s), process CPU per step (median of {args.rounds}): "
        f"default malloc {med[False] * 1e3:.0f} ms, freed memory kept {med[True] * 1e3:.0f} ms: "
        f"{med[False] / med[True]:.2f}x; peak RSS {rss[False]:.0f} vs {rss[True]:.0f} MiB"
    )


if __name__ == "__main__":
    main()

"""Run one stage of a test project in its own process, the way `moonforge rerun` would, with a
tiny stage function on the real training loop: for the lease, crash and kill tests.

    python tests/lease_stage.py PROJECT STAGE CALLS_DIR [GATE]
    python tests/lease_stage.py PROJECT --flow CALLS_DIR      # the whole mini lifecycle flow

Every stage kind runs `tiny_stage`: it records its call in CALLS_DIR/<pid> (with the checkpoint it
resumes from), waits until the file GATE exists when one is given (the test opens the gate once
it has seen what it wants, e.g. a second process waiting), then trains a small net for
cfg.steps steps with the shared loop, checkpointing every 2 steps. The StageOutcome is printed as
JSON on the last line of stdout (--flow: the flow's outcomes; PREFECT_API_URL names the Prefect
API). The store, tracking and leases are the real ones (MOONFORGE_STORE may point at s3://).
MOONFORGE_CRASH_AFTER_CHECKPOINT kills it at a given step.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from moonforge.stages.artifacts import StageResult
from moonforge.stages.train.checkpoint import save_weights
from moonforge.stages.train.loop import TrainSpec, train


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision, self.projector = nn.Linear(4, 4), nn.Linear(4, 4)
        self.lm, self.caption = nn.Linear(4, 1), nn.Linear(1, 1)


def batches():
    g = torch.Generator().manual_seed(1)
    while True:
        yield torch.randn(8, 4, generator=g)


def loss_fn(model, x):
    return model.lm(model.projector(model.vision(x))).pow(2).mean(), {}


def tiny_stage(base, data, cfg, ctx):
    calls = Path(os.environ["MF_TEST_CALLS"])
    calls.mkdir(parents=True, exist_ok=True)
    (calls / str(os.getpid())).write_text(str(ctx.resume_from or ""))
    gate = os.environ.get("MF_TEST_GATE")
    while gate and not Path(gate).exists():  # the test decides when training may go on
        time.sleep(0.05)
    torch.manual_seed(0)
    net = TinyNet()
    params = [(n, p) for n, p in net.named_parameters() if not n.startswith("caption")]
    spec = TrainSpec(
        num_steps=cfg.steps,
        optimizer=cfg.optimizer,
        schedule=cfg.schedule,
        trainable=("vision", "projector", "lm"),
        checkpoint_every=2,
    )
    state = train(net, params, batches(), loss_fn, spec, ctx, ctx.model)
    return StageResult(
        save_weights(net, ctx.model, ctx.out),
        {"train/steps": float(state.step), "train/loss": state.history[-1]["loss"]},
    )


def main(project: str, stage: str, calls: str, gate: str | None = None) -> None:
    from moonforge.registry.run_stage import run_stage
    from moonforge.stages import catalog
    from moonforge.stages.recipe import load_recipe

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    os.environ["MF_TEST_CALLS"] = calls
    if gate:
        os.environ["MF_TEST_GATE"] = gate
    catalog.stage_function = lambda kind: tiny_stage
    os.chdir(project)
    if stage == "--flow":
        from moonforge.flows.lifecycle import lifecycle_flow, owned

        with owned():
            out = lifecycle_flow("recipes/mini.yaml", [], None, project)
        print(json.dumps(out), flush=True)
        return
    out = run_stage(load_recipe("recipes/mini.yaml"), stage, project)
    print(json.dumps(out.to_dict()), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

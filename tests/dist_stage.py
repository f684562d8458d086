"""A purpose-built tiny stage for the launcher tests: a small next-token MLP-LM trained by the
real loop (Muon on its hidden matrices, AdamW on embeddings / head / biases).

Imported by the launched child too (registry/launch.py puts this process's sys.path on the
child's PYTHONPATH). The per-step loss curve comes back in the metrics as train/loss/NNN.
MOONFORGE_TOY_STEP_SLEEP (seconds per micro-batch) slows it down for the kill test.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moonforge.stages.artifacts import StageContext, StageResult
from moonforge.stages.train.checkpoint import PERIODIC_DIR, load_weights, save_weights
from moonforge.stages.train.loop import TrainSpec, train

VOCAB, DIM = 64, 32
REPO = Path(__file__).resolve().parents[1]


def toy_cfg(**launcher):
    """The LM-pretrain config the launcher tests give the toy stage: 8 steps of 4 micro-batches."""
    from moonforge.stages.stage_configs import LMPretrainConfig

    return LMPretrainConfig(
        upstream=None,
        trainable=("lm",),
        optimizer={"lr": 1e-2},
        schedule={"kind": "cosine", "warmup_steps": 2},
        seq_len=12,
        batch_size=8,
        micro_batch_size=2,
        num_steps=8,
        launcher=launcher,
    )


def toy_ctx(tmp_path: Path, name: str) -> StageContext:
    """A fresh output directory `tmp_path/name` with the tiny recipe's model config."""
    from moonforge.stages.recipe import load_recipe

    out = tmp_path / name
    out.mkdir()
    return StageContext(out=out, model=load_recipe(REPO / "recipes" / "tiny.yaml").model)


def loss_curve(metrics: dict[str, float]) -> list[float]:
    """The per-step losses toy_stage reports as train/loss/NNN, in step order."""
    return [v for k, v in sorted(metrics.items()) if k.startswith("train/loss/")]


class ToyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision, self.projector, self.caption = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
        self.lm = nn.ModuleDict(
            dict(
                embed=nn.Embedding(VOCAB, DIM),
                up=nn.Linear(DIM, 3 * DIM),
                mid=nn.Linear(3 * DIM, 3 * DIM),
                down=nn.Linear(3 * DIM, DIM),
                lm_head=nn.Linear(DIM, VOCAB, bias=False),
            )
        )


def lm_loss(model: ToyLM, tokens_BL: torch.Tensor):
    if (s := float(os.environ.get("MOONFORGE_TOY_STEP_SLEEP", "0"))) > 0:
        time.sleep(s)
    lm = model.lm
    x = lm["embed"](tokens_BL[:, :-1])
    h = x + lm["down"](F.gelu(lm["mid"](F.gelu(lm["up"](x)))))
    logits = lm["lm_head"](h)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens_BL[:, 1:].reshape(-1))
    return loss, {"tokens": float(tokens_BL[:, 1:].numel())}


def batches(rows: int, seq_len: int, seed: int):
    """Sequences t_{i+1} = (5 t_i + 3) mod VOCAB from random starts, 10% of tokens random."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, VOCAB, (rows, 1), generator=g)
        seq = [start]
        for _ in range(seq_len - 1):
            seq.append((seq[-1] * 5 + 3) % VOCAB)
        t = torch.cat(seq, 1)
        noise = torch.rand(t.shape, generator=g) < 0.1
        yield torch.where(noise, torch.randint(0, VOCAB, t.shape, generator=g), t)


def toy_stage(base, data, cfg, ctx) -> StageResult:
    torch.manual_seed(cfg.seed)
    net = ToyLM()
    if base is not None:
        load_weights(net, base)
    for n, p in net.named_parameters():
        p.requires_grad_(n.startswith("lm."))
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    spec = TrainSpec(
        num_steps=cfg.steps,
        optimizer=cfg.optimizer,
        schedule=cfg.schedule,
        trainable=("lm",),
        grad_accum=cfg.grad_accum,
        log_every=1,
        checkpoint_every=cfg.checkpoint_every,
        label="toy",
    )
    rows = cfg.micro_batch_size or cfg.batch_size
    state = train(net, params, batches(rows, cfg.seq_len, cfg.seed), lm_loss, spec, ctx, ctx.model)
    first = state.step - len(state.history)
    metrics = {f"train/loss/{first + i + 1:03d}": h["loss"] for i, h in enumerate(state.history)}
    metrics["train/steps"] = float(state.step)
    shutil.rmtree(ctx.out / PERIODIC_DIR, ignore_errors=True)
    return StageResult(save_weights(net, ctx.model, ctx.out), metrics)

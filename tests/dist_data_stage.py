"""A purpose-built stage for the data sharding / resume tests: the real declared-data path
(DeclaredMix -> DeclaredDocSource -> lm_stream, per-rank shards) and the real loop (checkpoints,
resume), with a tiny embedding LM so that a step costs next to nothing.

Imported by the launched child too (registry/launch.py passes this process's sys.path). Every
micro-batch a rank draws is logged to $MOONFORGE_TEST_DATA_LOG/rank<r>.jsonl as
{"micro": global micro-batch index, "docs": [record numbers, one per row]}; with
$MOONFORGE_TEST_KILL_AT=K, rank 0 SIGKILLs itself when it draws the first micro-batch of step
K + 1, i.e. right after the periodic checkpoint of step K was written: a deterministic crash.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.artifacts import StageResult
from moonforge.stages.data.user_mix import DeclaredMix
from moonforge.stages.train.checkpoint import save_weights
from moonforge.stages.train.loop import TrainSpec, train
from moonforge.stages.train.stage_io import lm_stream, vision_spec

REC = re.compile(r"rec (\d+)")


class TinyLM(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vision, self.projector, self.caption = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
        self.lm = nn.ModuleDict(dict(embed=nn.Embedding(vocab, 16), head=nn.Linear(16, vocab)))


def lm_loss(model: TinyLM, batch):
    logits = model.lm["head"](model.lm["embed"](batch.input_ids_BL))
    loss = F.cross_entropy(logits.flatten(0, 1), batch.labels_BL.flatten(), ignore_index=-100)
    return loss, {}


def doc_numbers(batch, tok: Tokenizer) -> list[int]:
    """The record number each row of a micro-batch holds (its text starts "rec N")."""
    out = []
    for ids, docs in zip(batch.input_ids_BL.tolist(), batch.doc_ids_BL.tolist()):
        for d in sorted(set(docs) - {-1}):
            text = tok.decode([t for t, x in zip(ids, docs) if x == d])
            out.append(int(REC.search(text).group(1)))
    return out


class Logged:
    """Passes the stream through, logging each drawn micro-batch (and the kill hook)."""

    def __init__(self, inner, tok: Tokenizer, rank: int, grad_accum: int):
        self.inner, self.tok, self.rank, self.grad_accum = inner, tok, rank, grad_accum
        log = os.environ.get("MOONFORGE_TEST_DATA_LOG")
        self.path = Path(log) / f"rank{rank}.jsonl" if log else None
        self.kill_at = int(os.environ.get("MOONFORGE_TEST_KILL_AT", "-1"))

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        micro = self.inner.step - 1
        if self.rank == 0 and self.kill_at >= 0 and micro >= self.kill_at * self.grad_accum:
            os.kill(os.getpid(), signal.SIGKILL)
        if batch is not None and self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"micro": micro, "docs": doc_numbers(batch, self.tok)}) + "\n")
        return batch

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def data_stage(base, data, cfg, ctx) -> StageResult:
    tok = Tokenizer.load(data["tokenizer"].path / "tokenizer.json")
    mix = DeclaredMix(cfg, data, tok, vision_spec(ctx.model), ctx.parallel)
    rank = ctx.parallel.rank if ctx.parallel is not None else 0
    batches = Logged(
        lm_stream(mix.sources(), mix.weights({}), tok, cfg, ctx.model, par=ctx.parallel),
        tok,
        rank,
        cfg.grad_accum,
    )
    torch.manual_seed(cfg.seed)
    net = TinyLM(tok.vocab_size)
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
        label="data",
    )
    state = train(net, params, batches, lm_loss, spec, ctx, ctx.model)
    metrics = {"train/steps": float(state.step), **mix.metrics(batches.inner)}
    return StageResult(save_weights(net, ctx.model, ctx.out), metrics, tuple(data))

"""Context-parallel checks shared by tests/test_context_parallel.py and the processes it starts.

- `vlm` / `packed_batch`: the tiny recipe's VLM (MLA + MoE + MoonViT) or an MHA-GQA variant, and a
  packed micro-batch whose documents and images straddle the slice boundary, with padding.
- `parity_worker`: one rank of a gloo group; runs the model's loss and backward with its LM
  sharded, sums the gradients over the group (what the trainer's all-reduce does) and rank 0
  saves the loss and the summed gradients for the parent to compare with one process.
- `cp_stage`: a stage for the launcher test: the real loop trains the VLM on such batches with
  the real next-token loss; the per-step losses come back as train/loss/NNN.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from moonforge.model.config import VLMConfig
from moonforge.model.vlm import VLM, build_vlm
from moonforge.stages.artifacts import StageResult
from moonforge.stages.data.batches import LMBatch
from moonforge.stages.train.checkpoint import save_weights
from moonforge.stages.train.loop import TrainSpec, train
from moonforge.stages.train.objectives import lm_loss

REPO = Path(__file__).resolve().parents[1]
SEQ = 64
CASES = {
    "mla": ({}, False, False),
    "mla_recompute": ({}, True, False),
    "mha_gqa": ({"attention": "mha", "num_kv_heads": 2, "attention_bias": True}, False, False),
    "images_on_one_rank": ({}, False, True),
}
"""name -> (LM config changes over the tiny recipe's, activation checkpointing, the batch's
images all in the second half)."""


def model_cfg(lm_update: dict | None = None) -> VLMConfig:
    from moonforge.stages.recipe import load_recipe

    cfg = load_recipe(REPO / "recipes" / "tiny.yaml").model
    return cfg.model_copy(update={"lm": cfg.lm.model_copy(update=lm_update or {})})


def vlm(lm_update: dict | None = None, recompute: bool = False) -> VLM:
    from moonforge.stages.train.activation_ckpt import apply_ac

    model = build_vlm(model_cfg(lm_update), seed=0, attn_backend="sdpa")
    if recompute:
        apply_ac(model, ("lm",))
    return model


def packed_batch(seed: int = 0, late_images: bool = False, media_pad: int = 7) -> LMBatch:
    """Two rows of SEQ tokens. Row 0: documents of 20, 30 and 10 tokens, then 4 of padding (the
    30-token one crosses the middle). Row 1: one document holding two 4-token images, one across
    the middle (positions 30..33) and one in the second half (44..47); with `late_images` at
    36..39 and 44..47, so the first half of two ranks encodes no image at all."""
    g = torch.Generator().manual_seed(seed)
    # t_{i+1} = (5 t_i + 3) mod 64 (+ 8, past the special ids) from a random start: learnable
    start = torch.randint(0, 64, (2, 1), generator=g)
    ids = torch.cat([start] + [start := (5 * start + 3) % 64 for _ in range(SEQ - 1)], dim=1) + 8
    doc = torch.zeros(2, SEQ, dtype=torch.long)
    pos = torch.zeros(2, SEQ, dtype=torch.long)
    starts = [(0, 0, 20), (1, 20, 50), (2, 50, 60)]
    for d, lo, hi in starts:
        doc[0, lo:hi], pos[0, lo:hi] = d, torch.arange(hi - lo)
    doc[0, 60:] = -1
    pos[1] = torch.arange(SEQ)
    media = torch.zeros(2, SEQ, dtype=torch.bool)
    media[1, 44:48] = True
    if late_images:
        media[1, 36:40] = True
    else:
        media[1, 30:34] = True
    ids[media] = media_pad
    labels = torch.full((2, SEQ), -100, dtype=torch.long)
    labels[:, :-1] = ids[:, 1:]
    for _, _, hi in starts:  # no token predicts across a document end
        labels[0, hi - 1] = -100
    labels[doc < 0] = -100
    labels[:, :-1][media[:, 1:]] = -100  # nor an image token
    labels[media] = -100
    grid = torch.tensor([[4, 4], [4, 4]])
    pixels = torch.randn(32, 3 * 8 * 8, generator=g)
    return LMBatch(ids, labels, pos, doc, media, pixels, grid)


def loss_and_grads(model: VLM, batch: LMBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    loss, _ = lm_loss(model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def parity_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from moonforge.model.context_parallel import ContextParallel

    try:
        for name, (update, recompute, late) in CASES.items():
            model = vlm(update, recompute)
            model.lm.context_parallel = ContextParallel(rank, world)
            loss, grads = loss_and_grads(model, packed_batch(late_images=late))
            # a rank whose slice shows no image has no vision gradient: count what any rank has
            params = dict(model.named_parameters())
            names = sorted(params)
            has = torch.tensor([n in grads for n in names], dtype=torch.uint8)
            dist.all_reduce(has, op=dist.ReduceOp.MAX)
            names = [n for n, h in zip(names, has.tolist()) if h]
            grads = {n: grads.get(n, torch.zeros_like(params[n])) for n in names}
            flat = torch.cat([grads[n].flatten() for n in names])
            dist.all_reduce(flat)  # the partial sums of the group's ranks add up
            if rank == 0:
                parts = flat.split([grads[n].numel() for n in names])
                summed = {n: part.view_as(grads[n]) for n, part in zip(names, parts)}
                torch.save({"loss": loss, "grads": summed}, Path(out) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


def text_only(b: LMBatch) -> LMBatch:
    """`b` without its images (their positions keep their token ids, without a loss)."""
    labels = b.labels_BL.masked_fill(b.media_mask_BL, -100)
    return LMBatch(
        b.input_ids_BL, labels, b.position_ids_BL, b.doc_ids_BL, b.media_mask_BL & False, None, None
    )


def batches(seed: int, text_only_every: int = 0):
    """Packed batches, a new token draw each step; every other one has its images in the
    second half only (as packed_batch); every `text_only_every`-th has none."""
    step = 0
    while True:
        b = packed_batch(seed * 1000 + step, late_images=step % 2 == 1)
        yield text_only(b) if text_only_every and step % text_only_every == 0 else b
        step += 1


def cp_stage(base, data, cfg, ctx) -> StageResult:
    model = build_vlm(ctx.model, seed=cfg.seed, attn_backend="sdpa")
    params = [(n, p) for n, p in model.named_parameters() if n.split(".")[0] in cfg.trainable]
    for n, p in model.named_parameters():
        p.requires_grad_(n.split(".")[0] in cfg.trainable)
    spec = TrainSpec(
        num_steps=cfg.steps,
        optimizer=cfg.optimizer,
        schedule=cfg.schedule,
        trainable=tuple(cfg.trainable),
        grad_accum=cfg.grad_accum,
        router_bias_update=cfg.router_bias_update,
        log_every=1,
        label="cp",
    )
    # with 2 micro-batches per step, rank 0's is text only and rank 1's has images
    text_every = 2 if cfg.grad_accum == 2 else 0
    state = train(model, params, batches(cfg.seed, text_every), lm_loss, spec, ctx, ctx.model)
    metrics = {f"train/loss/{i + 1:03d}": h["loss"] for i, h in enumerate(state.history)}
    metrics["train/max_over_mean"] = state.history[-1].get("router/max_over_mean", 0.0)
    return StageResult(save_weights(model, ctx.model, ctx.out), metrics)

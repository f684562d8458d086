"""Stage 2: align. Train MoonViT + projector on next-token loss of text given image tokens.

The LM is frozen (requires_grad off, eval mode, router bias untouched) and checked: its weights and
buffers must be bit-identical after the stage, or the stage fails. This lowers the LM's
perplexity on image embeddings before joint pretraining (Kimi-VL section 2.3).
"""

from __future__ import annotations

from collections.abc import Mapping

from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.data.records import read_image_records
from moonforge.stages.data.sources import caption_docs, qa_docs
from moonforge.stages.data.user_mix import DeclaredMix
from moonforge.stages.evals import heldout_metrics, heldout_sets
from moonforge.stages.stage_configs import AlignConfig
from moonforge.stages.train.freeze import apply_trainable, group_digest
from moonforge.stages.train.loop import train
from moonforge.stages.train.objectives import lm_loss
from moonforge.stages.train.stage_io import (
    eval_batches,
    finish,
    lm_stream,
    open_model,
    open_tokenizer,
    require,
    train_spec,
    vision_spec,
)


class FrozenModuleChanged(RuntimeError):
    """A group that must stay frozen moved: a bug, never a tolerable drift."""


def align(
    base: Checkpoint | None, data: Mapping[str, DatasetRef], cfg: AlignConfig, ctx: StageContext
) -> StageResult:
    """Return a checkpoint with the ViT + projector aligned to the (unchanged) LM."""
    model, mcfg = open_model(
        base, ctx, cfg.seed, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile
    )
    tok = open_tokenizer(data, mcfg, cfg.stage_name)
    world = require(data, "toyworld", cfg.stage_name).path
    sets = heldout_sets(tok, None, world, lambda src: eval_batches(src, tok, cfg, mcfg))
    before = heldout_metrics(model, sets, "_before")
    lm_before = group_digest(model, "lm")
    images = read_image_records(world, "train")
    sources = {
        "caption": caption_docs(images, world / "train", tok),
        "qa": qa_docs(images, world / "train", tok),
    }
    mix = DeclaredMix(cfg, data, tok, vision_spec(mcfg), ctx.parallel)
    batches = lm_stream(
        {**sources, **mix.sources()},
        mix.weights({"caption": 0.7, "qa": 0.3}),
        tok,
        cfg,
        mcfg,
        par=ctx.parallel,
    )
    state = train(
        model,
        apply_trainable(model, cfg.trainable),
        batches,
        lm_loss,
        train_spec(cfg, router_bias_update=0.0),
        ctx,
        mcfg,
    )
    if group_digest(model, "lm") != lm_before:
        raise FrozenModuleChanged("align: the LM changed during alignment although it is frozen")
    metrics = {
        **before,
        **heldout_metrics(model, sets),
        "align/lm_bit_identical": 1.0,
        "train/final_loss": state.history[-1]["loss"],
        "train/steps": float(state.step),
        "data/skipped_images": float(batches.skipped),
        **mix.metrics(batches),
    }
    return finish(model, mcfg, ctx, metrics, data)

"""Stage 4: cooldown. High-quality subset + a low ratio of synthetic QA, LR decaying, bias frozen.

Only records marked quality=high are read (text and images) unless the recipe says otherwise;
QA documents make up `qa_ratio` of the tokens; the MoE balancing bias stops moving
(router_bias_update = 0, as Moonlight's cooldown sets u = 0).
"""

from __future__ import annotations

from collections.abc import Mapping

from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.data.records import read_image_records, read_text_records
from moonforge.stages.data.sources import caption_docs, qa_docs, text_docs
from moonforge.stages.data.user_mix import DeclaredMix
from moonforge.stages.data.video_mix import VIDEO_SOURCES, video_sources, with_video
from moonforge.stages.evals import heldout_metrics, heldout_sets
from moonforge.stages.stage_configs import CooldownConfig
from moonforge.stages.train.freeze import apply_trainable
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


def cooldown(
    base: Checkpoint | None, data: Mapping[str, DatasetRef], cfg: CooldownConfig, ctx: StageContext
) -> StageResult:
    """Return a checkpoint annealed on the high-quality mixture with synthetic QA."""
    model, mcfg = open_model(
        base, ctx, cfg.seed, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile
    )
    tok = open_tokenizer(data, mcfg, cfg.stage_name)
    text = require(data, "text", cfg.stage_name).path
    world = require(data, "toyworld", cfg.stage_name).path
    sets = heldout_sets(tok, text, world, lambda src: eval_batches(src, tok, cfg, mcfg))
    before = heldout_metrics(model, sets, "_before")
    quality = "high" if cfg.high_quality_only else None
    images = [r for r in read_image_records(world, "train") if quality is None or r.quality == quality]
    sources = {
        "text": text_docs(read_text_records(text, "train"), tok, quality=quality),
        "caption": caption_docs(images, world / "train", tok),
        "qa": qa_docs(images, world / "train", tok),
    }
    sources.update(video_sources(cfg.video, data, tok))
    rest = 1.0 - cfg.qa_ratio
    weights = {
        "text": rest * (1 - cfg.multimodal_ratio),
        "caption": rest * cfg.multimodal_ratio,
        "qa": cfg.qa_ratio,
    }
    weights = with_video(weights, ("caption", "qa"), cfg.video)
    mix = DeclaredMix(cfg, data, tok, vision_spec(mcfg), ctx.parallel)
    batches = lm_stream({**sources, **mix.sources()}, mix.weights(weights), tok, cfg, mcfg, par=ctx.parallel)
    state = train(model, apply_trainable(model, cfg.trainable), batches, lm_loss, train_spec(cfg), ctx, mcfg)
    drawn = batches.tokens_by_source
    metrics = {
        **before,
        **heldout_metrics(model, sets),
        "train/final_loss": state.history[-1]["loss"],
        "train/steps": float(state.step),
        "data/qa_token_share": drawn["qa"] / max(sum(drawn.values()), 1),
        "data/video_token_share": sum(drawn.get(n, 0) for n in VIDEO_SOURCES) / max(sum(drawn.values()), 1),
        "data/skipped_images": float(batches.skipped),
        **mix.metrics(batches),
    }
    return finish(model, mcfg, ctx, metrics, data)

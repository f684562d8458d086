"""Stage 3: joint_pretrain. Everything trains; text-only first, then a rising multimodal share.

Pure text keeps the LM's language ability ("all stages that update the language model are joint
training stages"); the multimodal share (image-conditioned captions/OCR and QA) ramps from 0 to
the recipe's final ratio (k1.5: 30%) and then holds. With `video:`, clip captions and QA take
their share of the multimodal weight (stages/data/video_mix.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.data.records import read_image_records, read_text_records
from moonforge.stages.data.sources import caption_docs, qa_docs, text_docs
from moonforge.stages.data.user_mix import DeclaredMix
from moonforge.stages.data.video_mix import VIDEO_SOURCES, video_sources, with_video
from moonforge.stages.evals import heldout_metrics, heldout_sets
from moonforge.stages.stage_configs import JointPretrainConfig
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

QA_SHARE_OF_MULTIMODAL = 1 / 3
"""Within the multimodal share, QA documents vs captions/OCR/alt text (the rest)."""


def joint_pretrain(
    base: Checkpoint | None, data: Mapping[str, DatasetRef], cfg: JointPretrainConfig, ctx: StageContext
) -> StageResult:
    """Return a checkpoint trained on text + a ramped multimodal mixture."""
    model, mcfg = open_model(
        base, ctx, cfg.seed, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile
    )
    tok = open_tokenizer(data, mcfg, cfg.stage_name)
    text = require(data, "text", cfg.stage_name).path
    world = require(data, "toyworld", cfg.stage_name).path
    sets = heldout_sets(tok, text, world, lambda src: eval_batches(src, tok, cfg, mcfg))
    before = heldout_metrics(model, sets, "_before")
    images = read_image_records(world, "train")
    sources = {
        "text": text_docs(read_text_records(text, "train"), tok),
        "caption": caption_docs(images, world / "train", tok),
        "qa": qa_docs(images, world / "train", tok),
    }

    sources.update(video_sources(cfg.video, data, tok))

    def weights_at(batch_index: int) -> dict[str, float]:
        mm = cfg.multimodal_ramp.ratio_at(batch_index / (cfg.steps * cfg.grad_accum))
        images = {
            "text": 1.0 - mm,
            "caption": mm * (1 - QA_SHARE_OF_MULTIMODAL),
            "qa": mm * QA_SHARE_OF_MULTIMODAL,
        }
        return with_video(images, ("caption", "qa"), cfg.video)

    mix = DeclaredMix(cfg, data, tok, vision_spec(mcfg), ctx.parallel)
    batches = lm_stream(
        {**sources, **mix.sources()}, mix.weights(weights_at), tok, cfg, mcfg, par=ctx.parallel
    )
    state = train(model, apply_trainable(model, cfg.trainable), batches, lm_loss, train_spec(cfg), ctx, mcfg)
    metrics = {
        **before,
        **heldout_metrics(model, sets),
        "train/final_loss": state.history[-1]["loss"],
        "train/steps": float(state.step),
        "data/multimodal_token_share": _share(batches, ("caption", "qa", *VIDEO_SOURCES)),
        "data/video_token_share": _share(batches, VIDEO_SOURCES),
        "data/skipped_images": float(batches.skipped),
        **mix.metrics(batches),
    }
    return finish(model, mcfg, ctx, metrics, data)


def _share(batches, names: tuple[str, ...]) -> float:
    drawn = batches.tokens_by_source
    return sum(drawn.get(n, 0) for n in names) / max(sum(drawn.values()), 1)

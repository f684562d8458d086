"""Pre-stage: lm_pretrain. Text-only next-token pretraining of the MoE LM.

Kimi-VL starts from Moonlight's 5.2T-token text checkpoint; the tiny lifecycle makes its own so
that alignment has a language model to align to. Only the LM trains.
"""

from __future__ import annotations

from collections.abc import Mapping

from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.data.records import read_text_records
from moonforge.stages.data.sources import text_docs
from moonforge.stages.data.user_mix import DeclaredMix
from moonforge.stages.evals import lm_eval_loss
from moonforge.stages.stage_configs import LMPretrainConfig
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


def lm_pretrain(
    base: Checkpoint | None, data: Mapping[str, DatasetRef], cfg: LMPretrainConfig, ctx: StageContext
) -> StageResult:
    """Return a checkpoint whose LM is trained on the `text` dataset; other groups are untouched."""
    model, mcfg = open_model(
        base, ctx, cfg.seed, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile
    )
    tok = open_tokenizer(data, mcfg, cfg.stage_name)
    text = require(data, "text", cfg.stage_name).path
    val = eval_batches(text_docs(read_text_records(text, "val"), tok), tok, cfg, mcfg)
    before = lm_eval_loss(model, val)
    mix = DeclaredMix(cfg, data, tok, vision_spec(mcfg), ctx.parallel)
    batches = lm_stream(
        {"text": text_docs(read_text_records(text, "train"), tok), **mix.sources()},
        mix.weights({"text": 1.0}),
        tok,
        cfg,
        mcfg,
        par=ctx.parallel,
    )
    state = train(model, apply_trainable(model, cfg.trainable), batches, lm_loss, train_spec(cfg), ctx, mcfg)
    after = lm_eval_loss(model, val)
    metrics = {
        "eval/text_loss_before": before["loss"],
        "eval/text_loss": after["loss"],
        "eval/text_ppl": after["ppl"],
        "train/final_loss": state.history[-1]["loss"],
        "train/steps": float(state.step),
        **mix.metrics(batches),
    }
    return finish(model, mcfg, ctx, metrics, data)

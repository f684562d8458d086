"""Stage 5: long_context. Reset the RoPE base, then extend context in sub-stages (x4 each).

The new base (Kimi-VL: 50,000 -> 800,000) goes into the checkpoint's model config, so every later
stage and `chat` run with it. Each sub-stage mixes `long_ratio` long documents (needle-in-a-
haystack) with replay of the previous stages' data (text and image-conditioned text), keeping the
tokens per step constant. Closes with needle recall at the base and the final length. Each
sub-stage is a `train` phase of its own index: a rerun after a crash skips the finished ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

from moonforge.model.config import VLMConfig
from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.data.evalsets import lm_eval_batches
from moonforge.stages.data.records import read_image_records, read_longdoc_records, read_text_records
from moonforge.stages.data.sources import caption_docs, long_docs, text_docs
from moonforge.stages.data.user_mix import DeclaredMix
from moonforge.stages.evals import exact_match, heldout_metrics, heldout_sets
from moonforge.stages.stage_configs import LongContextConfig, SubStage
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


def extended(cfg: VLMConfig, rope_theta: float, seq_len: int) -> VLMConfig:
    """The model config with the new RoPE base and trained context length."""
    lm = cfg.lm.model_copy(update={"rope_theta": rope_theta, "max_position_embeddings": seq_len})
    return cfg.model_copy(update={"lm": lm})


def needle_recall(model, records, tok, mcfg: VLMConfig, seq_len: int, n: int) -> float:
    """Exact-match recall of the needle's value with documents trimmed to `seq_len` tokens."""
    src = long_docs(records[:n], tok, max_tokens=seq_len, answer_only=True, name="needle")
    batches = lm_eval_batches(src, tok, seq_len, 1, vision_spec(mcfg), max_docs=n)
    return exact_match(model, batches)["acc"]


def long_context(
    base: Checkpoint | None, data: Mapping[str, DatasetRef], cfg: LongContextConfig, ctx: StageContext
) -> StageResult:
    """Return a checkpoint trained at the sub-stages' lengths with the new RoPE base recorded."""
    start_cfg = base.model_config() if base is not None else ctx.model
    final_len = cfg.sub_stages[-1].seq_len
    model, mcfg = open_model(
        base,
        ctx,
        cfg.seed,
        extended(start_cfg, cfg.rope_theta, final_len),
        activation_checkpointing=cfg.activation_checkpointing,
        compile=cfg.compile,
    )
    tok = open_tokenizer(data, mcfg, cfg.stage_name)
    longdoc = require(data, "longdoc", cfg.stage_name).path
    text = require(data, "text", cfg.stage_name).path
    world = require(data, "toyworld", cfg.stage_name).path
    sets = heldout_sets(tok, text, world, lambda src: eval_batches(src, tok, cfg, mcfg))
    val_long = read_longdoc_records(longdoc, "val")
    n_needle = min(cfg.needle_eval_docs, len(val_long))
    metrics = {
        "eval/needle_recall_base_len_before": needle_recall(model, val_long, tok, mcfg, cfg.seq_len, n_needle)
    }
    images = read_image_records(world, "train")
    replay = {
        "text": text_docs(read_text_records(text, "train"), tok),
        "caption": caption_docs(images, world / "train", tok),
    }
    mix = DeclaredMix(cfg, data, tok, vision_spec(mcfg), ctx.parallel)
    params = apply_trainable(model, cfg.trainable)
    offset = 0
    drawn: dict[str, int] = {}
    for i, sub in enumerate(cfg.sub_stages):
        state, batches = _train_sub_stage(
            model, params, mcfg, cfg, sub, i, offset, tok, longdoc, replay, mix, ctx
        )
        offset += state.step
        for n, k in batches.docs_by_source.items():
            drawn[n] = drawn.get(n, 0) + k
        metrics[f"train/sub{i}_final_loss"] = state.history[-1]["loss"]
        metrics[f"train/sub{i}_seq_len"] = float(sub.seq_len)
    metrics.update(heldout_metrics(model, sets))
    metrics.update(
        {
            "eval/needle_recall": needle_recall(model, val_long, tok, mcfg, final_len, n_needle),
            "eval/needle_recall_base_len": needle_recall(model, val_long, tok, mcfg, cfg.seq_len, n_needle),
            "eval/needle_n": float(n_needle),
            "model/rope_theta": mcfg.lm.rope_theta,
            "model/max_position_embeddings": float(final_len),
            "train/steps": float(offset),
        }
    )
    metrics.update(mix.metrics(SimpleNamespace(docs_by_source=drawn)))
    return finish(model, mcfg, ctx, metrics, data)


def _train_sub_stage(
    model,
    params,
    mcfg,
    cfg: LongContextConfig,
    sub: SubStage,
    index: int,
    offset: int,
    tok,
    longdoc,
    replay,
    mix,
    ctx,
):
    long_src = long_docs(read_longdoc_records(longdoc, "train"), tok, max_tokens=sub.seq_len)
    sources = {"long": long_src, **replay}
    share = (1.0 - cfg.long_ratio) / len(replay)
    weights = {"long": cfg.long_ratio, **{name: share for name in replay}}
    rows = cfg.sub_stage_batch(sub)
    batches = lm_stream(
        {**sources, **mix.sources()},
        mix.weights(weights),
        tok,
        cfg,
        mcfg,
        seq_len=sub.seq_len,
        rows=rows,
        par=ctx.parallel,
    )
    spec = train_spec(
        cfg,
        num_steps=cfg.sub_stage_steps(sub),
        grad_accum=1,
        step_offset=offset,
        label=f"{cfg.stage_name}/{sub.seq_len}",
        phase=index,
    )
    return train(model, params, batches, lm_loss, spec, ctx, mcfg), batches

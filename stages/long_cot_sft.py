"""Stage 7: long_cot_sft. A lightweight SFT warm-up on verified step-by-step reasoning traces.

The `reasoning` dataset holds problems (text, and images from `toyworld/<split>`) with one verified
trace each (plan, steps, check, "Answer: X"); every trace is re-verified when read. Same masked
ChatML loss as stage 6 (assistant trace + closing <|im_end|>), dialogues packed several per row,
one cosine schedule from the stage's optimizer / schedule over `num_steps` (or `num_tokens`).

Closing eval, before and after: greedy reasoning accuracy on the held-out RL prompt set
(`rl_prompts` val, the prompts RL will train on), scored by each prompt's verifier on the text after
the last "Answer:"; the mean response length (traces make it grow); accuracy per 1k tokens; and
the held-out masked loss on reasoning val traces. Generation is capped at the longest training
trace plus a margin, so a model that learned to reason is not cut off mid-trace.
"""

from __future__ import annotations

from collections.abc import Mapping

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.data.chat import chat_docs, chat_prompt_items
from moonforge.stages.data.chat_records import read_reasoning_records, read_rl_prompt_records
from moonforge.stages.data.user_mix import DeclaredMix
from moonforge.stages.evals import lm_eval_loss
from moonforge.stages.posttrain_evals import answer_accuracy, as_metrics, split_by_kind
from moonforge.stages.sft import sft_loss, source_tokens
from moonforge.stages.stage_configs import LongCoTSFTConfig
from moonforge.stages.train.freeze import apply_trainable
from moonforge.stages.train.loop import train
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

TRACE_MARGIN = 16
"""Generated tokens allowed beyond the longest training trace (and its <|im_end|>)."""


def trace_budget(tok: Tokenizer, records, max_prompt: int, max_positions: int) -> int:
    """max_new_tokens for reasoning evals: longest trace + margin, within the model's positions."""
    longest = max(len(tok.encode(r.messages[-1].content)) for r in records)
    return max(1, min(longest + 1 + TRACE_MARGIN, max_positions - max_prompt))


def reasoning_eval(
    model, tok: Tokenizer, items, loss_batches, max_new_tokens: int, batch_size: int, suffix: str = ""
) -> dict[str, float]:
    """eval/{reasoning_acc,text_acc,image_acc,mean_len,acc_per_1k_tokens,n,cot_loss}{suffix}."""
    res = answer_accuracy(model, tok, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out = as_metrics(res, "eval/", suffix)
    out[f"eval/reasoning_acc{suffix}"] = out.pop(f"eval/acc{suffix}")
    out[f"eval/cot_loss{suffix}"] = lm_eval_loss(model, loss_batches)["loss"]
    return out


def long_cot_sft(
    base: Checkpoint | None, data: Mapping[str, DatasetRef], cfg: LongCoTSFTConfig, ctx: StageContext
) -> StageResult:
    """Return a checkpoint fine-tuned on the verified reasoning traces (text and image)."""
    model, mcfg = open_model(
        base, ctx, cfg.seed, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile
    )
    tok = open_tokenizer(data, mcfg, cfg.stage_name)
    reasoning = require(data, "reasoning", cfg.stage_name).path
    prompts = require(data, "rl_prompts", cfg.stage_name).path
    world = require(data, "toyworld", cfg.stage_name).path
    train_recs = read_reasoning_records(reasoning, "train")
    items = split_by_kind(
        chat_prompt_items(
            read_rl_prompt_records(prompts, "val"),
            world / "val",
            tok,
            vision_spec(mcfg),
            dataset_name="rl_prompts/val",
        ),
        max(1, cfg.eval.num_examples // 2),
    )
    val_src = chat_docs(read_reasoning_records(reasoning, "val"), world / "val", tok, name="reasoning/val")
    loss_batches = eval_batches(val_src, tok, cfg, mcfg)
    budget = trace_budget(
        tok, train_recs, max(len(it.prompt_ids) for it in items), mcfg.lm.max_position_embeddings
    )
    metrics = reasoning_eval(model, tok, items, loss_batches, budget, cfg.eval.batch_size, "_before")
    source = chat_docs(train_recs, world / "train", tok, name="reasoning")
    mix = DeclaredMix(cfg, data, tok, vision_spec(mcfg), ctx.parallel)
    batches = lm_stream(
        {"reasoning": source, **mix.sources()},
        mix.weights({"reasoning": 1.0}),
        tok,
        cfg,
        mcfg,
        par=ctx.parallel,
    )
    state = train(model, apply_trainable(model, cfg.trainable), batches, sft_loss, train_spec(cfg), ctx, mcfg)
    metrics.update(reasoning_eval(model, tok, items, loss_batches, budget, cfg.eval.batch_size))
    seen = sum(batches.tokens_by_source.values())
    epoch = source_tokens({"reasoning": source}, mcfg)
    metrics.update(
        {
            "train/final_loss": state.history[-1]["loss"],
            "train/steps": float(state.step),
            "train/epochs": seen / max(epoch, 1),
            "eval/max_new_tokens": float(budget),
            "data/skipped_images": float(batches.skipped),
            **mix.metrics(batches),
        }
    )
    return finish(model, mcfg, ctx, metrics, data)

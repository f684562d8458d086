"""Stage 6: sft. Joint ChatML SFT: answer-only loss, packed dialogues, phases with LR re-warm.

Dialogues of the `sft` dataset (images from `toyworld/<split>`) become `chat_docs` documents:
ChatML ids whose loss mask is 1 exactly on assistant content and the <|im_end|> closing each
assistant turn. Text-only and image dialogues are two sources mixed by token share
(`text_image_token_ratio`, about 1:1 as in Kimi-VL) and packed several per row with block-diagonal
attention and positions restarting per dialogue (`lm_batches`). The loss is the per-token mean over
the packed micro-batch's supervised tokens; a micro-batch with none raises (never a silent zero).

Phases run in order (Kimi-VL: 1 epoch at 32K with LR 2e-5 -> 2e-6, then 1 epoch at 128K re-warming
to 1e-5 -> 1e-6): each gets a fresh optimizer, its own peak LR, linear warmup over `warmup_frac` of
its steps and a cosine decay to `min_lr`; rows per step shrink with seq_len so tokens per step stay
constant. A phase may mix its own data (`video:`, `text_image_token_ratio`; phase_mixes), as the
tiny recipe's first phase trains on motion clips alone. A `num_epochs` phase resolves its steps
from its mixture's token count. Each phase is a `train` phase of its own index, so a rerun after a
crash skips the finished phases and resumes the interrupted one at its step.

Users' own conversation datasets (the recipe's `datasets:`, named in `mixture:`) are checked
before training and mixed in by token share; the generated `sft` set is optional when they are.

Closing eval, before and after training: greedy answer accuracy on held-out sft dialogues
(image = VQA, and text), mean response length, and the held-out masked SFT loss; and
eval/<name>_acc on each declared set's held-out dialogues (first in the summary). With `video:`,
also video QA on the first eval.num_examples clips of videoworld/val against the same clips with
shuffled frames and the per-type majority (video_evals.video_qa_of, what `eval --video` reports),
plotted by question type in video_qa.png.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

from moonforge.model.config import VLMConfig
from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.config import ScheduleConfig
from moonforge.stages.data.chat import chat_docs, chat_prompt_items
from moonforge.stages.data.chat_records import read_sft_records
from moonforge.stages.data.sources import DocSource
from moonforge.stages.data.user_mix import DeclaredMix
from moonforge.stages.data.video_mix import VIDEO_CHAT, video_sources, with_video
from moonforge.stages.evals import lm_eval_loss
from moonforge.stages.posttrain_evals import (
    answer_accuracy,
    answer_budget,
    as_metrics,
    set_metrics,
    split_by_kind,
    with_other_images,
)
from moonforge.stages.stage_configs import SFTConfig, SFTPhase
from moonforge.stages.train.freeze import apply_trainable
from moonforge.stages.train.loop import TrainState, train
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
from moonforge.stages.video_evals import plot_video_qa, video_qa_of


class NoSupervisedTokensError(ValueError):
    """A packed micro-batch has no assistant token to supervise (the loss would be a silent 0)."""


def sft_loss(model, batch):
    """Masked next-token CE (assistant content + closing <|im_end|>), mean over supervised tokens."""
    if batch.num_targets == 0:
        raise NoSupervisedTokensError(
            f"SFT micro-batch of {batch.num_tokens} tokens has no supervised (assistant) token; "
            "the dialogues' assistant turns were masked out or truncated away (check seq_len)"
        )
    loss, metrics = lm_loss(model, batch)
    metrics["supervised_frac"] = batch.num_targets / max(batch.num_tokens, 1)
    return loss, metrics


def chat_sources(records: Sequence, image_root: Path, tok: Tokenizer, name: str) -> dict[str, DocSource]:
    """{"text": text-only dialogues, "image": dialogues with images} as chat_docs sources."""
    out = {}
    for kind in ("text", "image"):
        recs = [r for r in records if r.kind == kind]
        if recs:
            out[kind] = chat_docs(recs, image_root, tok, name=f"{name}/{kind}")
    if not out:
        raise ValueError(f"{name}: no training dialogues")
    return out


def mix_weights(sources: Mapping[str, DocSource], text_image_ratio: float) -> dict[str, float]:
    """Token shares: text : image = text_image_ratio : 1 (a missing kind gets everything else)."""
    want = {"text": text_image_ratio / (1 + text_image_ratio), "image": 1 / (1 + text_image_ratio)}
    return {k: w for k, w in want.items() if k in sources}


def source_tokens(sources: Mapping[str, DocSource], mcfg: VLMConfig) -> int:
    """Total tokens of every document of `sources` (one epoch), image placeholders included; a bad
    record of a declared dataset (doc None, counted by its loader) has none."""
    vision = vision_spec(mcfg)
    docs = (src.doc(i, vision) for src in sources.values() for i in range(len(src)))
    return sum(len(d.ids) for d in docs if d is not None)


def phase_rows(cfg: SFTConfig, phase: SFTPhase) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step): tokens per step = batch_size * seq_len."""
    return cfg.phase_rows(phase)


def phase_steps(cfg: SFTConfig, phase: SFTPhase, epoch_tokens: int | None) -> int:
    """num_steps, or ceil(num_epochs * epoch tokens / tokens per step) (packing fill ~ 1)."""
    if phase.num_steps is not None:
        return phase.num_steps
    assert phase.num_epochs is not None  # SFTConfig's validator: num_steps or num_epochs
    if epoch_tokens is None:
        raise ValueError(f"phase_steps: a phase of num_epochs={phase.num_epochs} needs the epoch's tokens")
    micro, accum = phase_rows(cfg, phase)
    return max(1, math.ceil(phase.num_epochs * epoch_tokens / (micro * accum * phase.seq_len)))


def phase_schedule(phase: SFTPhase) -> ScheduleConfig:
    """Warmup over warmup_frac of the phase from 0, then cosine from lr down to min_lr."""
    return ScheduleConfig(
        kind="cosine", warmup_frac=phase.warmup_frac, min_ratio=min(1.0, phase.min_lr / phase.lr)
    )


Weights = Callable[[int], Mapping[str, float]]
"""A mixture's token shares by source name at a step (DeclaredMix.weights gives one)."""


def run_phases(
    model,
    params,
    mcfg: VLMConfig,
    cfg,
    phases: Sequence[SFTPhase],
    mixes: Sequence[tuple[Mapping[str, DocSource], Weights]],
    tok: Tokenizer,
    ctx: StageContext,
) -> tuple[list[TrainState], dict[str, float], SimpleNamespace]:
    """Train the phases in order, phase i on mixes[i] = (sources, weights); returns their
    states, per-phase metrics and the documents drawn per source (`.docs_by_source`, summed
    over the phases)."""
    if len(mixes) != len(phases):
        raise ValueError(f"run_phases: {len(phases)} phases but {len(mixes)} mixtures")
    states, metrics, offset = [], {}, 0
    drawn_docs = SimpleNamespace(docs_by_source={n: 0 for srcs, _ in mixes for n in srcs})
    for i, (phase, (sources, weights)) in enumerate(zip(phases, mixes, strict=True)):
        # A num_epochs phase counts the epoch of its own mixture's sources.
        epoch_tokens = source_tokens(sources, mcfg) if phase.num_steps is None else None
        micro, accum = phase_rows(cfg, phase)
        batches = lm_stream(
            sources, weights, tok, cfg, mcfg, seq_len=phase.seq_len, rows=micro, par=ctx.parallel
        )
        opt = cfg.optimizer.model_copy(update={"lr": phase.lr})
        spec = train_spec(
            cfg,
            num_steps=phase_steps(cfg, phase, epoch_tokens),
            grad_accum=accum,
            optimizer=opt,
            schedule=phase_schedule(phase),
            step_offset=offset,
            label=f"{cfg.stage_name}/{phase.seq_len}",
            phase=i,
        )
        state = train(model, params, batches, sft_loss, spec, ctx, mcfg)
        offset += state.step
        states.append(state)
        drawn = batches.tokens_by_source
        for n, k in batches.docs_by_source.items():
            drawn_docs.docs_by_source[n] += k
        metrics.update(
            {
                f"train/phase{i}_final_loss": state.history[-1]["loss"],
                f"train/phase{i}_seq_len": float(phase.seq_len),
                f"train/phase{i}_steps": float(state.step),
                f"data/phase{i}_text_token_share": drawn.get("text", 0) / max(sum(drawn.values()), 1),
                f"data/phase{i}_video_token_share": drawn.get(VIDEO_CHAT, 0) / max(sum(drawn.values()), 1),
            }
        )
        if epoch_tokens is not None:
            metrics[f"data/phase{i}_epoch_tokens"] = float(epoch_tokens)
    metrics["train/steps"] = float(offset)
    return states, metrics, drawn_docs


def chat_eval(
    model, tok: Tokenizer, items, loss_batches, max_new_tokens: int, batch_size: int, suffix: str = ""
) -> dict[str, float]:
    """eval/{acc,vqa_acc,text_acc,mean_len,acc_per_1k_tokens,n,sft_loss}{suffix}, and
    eval/vqa_acc_other_image{suffix}: the image questions asked about other images of the same
    size (posttrain_evals.with_other_images), which a model that reads no image scores the same."""
    res = answer_accuracy(model, tok, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out = as_metrics(res, "eval/", suffix)
    if "image" in res["by_kind"]:
        out[f"eval/vqa_acc{suffix}"] = out.pop(f"eval/image_acc{suffix}")
        others = with_other_images(items)
        ctl = answer_accuracy(model, tok, others, max_new_tokens=max_new_tokens, batch_size=batch_size)
        out[f"eval/vqa_acc_other_image{suffix}"] = ctl["acc"]
    out[f"eval/sft_loss{suffix}"] = lm_eval_loss(model, loss_batches)["loss"]
    return out


def declared_eval(
    model, tok: Tokenizer, held: Mapping[str, list], batch_size: int, suffix: str = ""
) -> dict[str, float]:
    """eval/<name>_acc{suffix} (+ _n, + per kind when mixed) on each declared dataset's
    held-out dialogues (posttrain_evals.set_metrics; `moonforge eval --dataset` scores alike)."""
    out: dict[str, float] = {}
    for name, items in held.items():
        out.update(set_metrics(model, tok, name, items, batch_size, suffix))
    return out


def video_eval(
    model, tok: Tokenizer, data: Mapping[str, DatasetRef], cfg: SFTConfig, suffix: str = ""
) -> dict[str, float]:
    """eval/video_qa_*{suffix} when the stage mixes video in, else nothing. Every videoworld
    answer is one word, so 8 new tokens always reach it and its <|im_end|>."""
    if cfg.video is None:
        return {}
    root = data["videoworld"].path
    v = cfg.video
    return video_qa_of(
        model, tok, root, cfg.eval.num_examples, v.num_frames, 8, suffix, video_tokens=v.max_tokens, fps=v.fps
    )


def _generated(data: Mapping[str, DatasetRef], cfg: SFTConfig, tok: Tokenizer, mcfg: VLMConfig):
    """(train sources, eval items, eval loss batches) of the generated `sft` set; empty when the
    stage's data: names only declared datasets."""
    if "sft" not in data:
        return {}, [], []
    sft_dir = require(data, "sft", cfg.stage_name).path
    world = require(data, "toyworld", cfg.stage_name).path
    val_recs = read_sft_records(sft_dir, "val")
    items = split_by_kind(
        chat_prompt_items(val_recs, world / "val", tok, vision_spec(mcfg), dataset_name="sft/val"),
        max(1, cfg.eval.num_examples // 2),
    )
    val_src = chat_docs(val_recs, world / "val", tok, name="sft/val")
    loss_batches = eval_batches(val_src, tok, cfg, mcfg, seq_len=cfg.phases[0].seq_len)
    sources = chat_sources(read_sft_records(sft_dir, "train"), world / "train", tok, "sft")
    return sources, items, loss_batches


def phase_mixes(
    cfg: SFTConfig,
    own: Mapping[str, DocSource],
    mix: DeclaredMix,
    data: Mapping[str, DatasetRef],
    tok: Tokenizer,
) -> list[tuple[dict[str, DocSource], Weights]]:
    """Each phase's (sources, weights): the generated text / image dialogues (`own`) at the
    phase's text_image_token_ratio, its video (the phase's `video:`, else the stage's) and the
    declared datasets at their shares. Phases that override nothing share one mixture."""
    built: dict[tuple, tuple[dict[str, DocSource], Weights]] = {}
    out = []
    for p in cfg.phases:
        video = p.video or cfg.video
        ratio = p.text_image_token_ratio or cfg.text_image_token_ratio
        if (video, ratio) not in built:
            sources = {**own, **video_sources(video, data, tok, chat=True)}
            weights = with_video(mix_weights(sources, ratio), ("image",), video, chat=True)
            built[video, ratio] = ({**sources, **mix.sources()}, mix.weights(weights))
        out.append(built[video, ratio])
    return out


def sft(
    base: Checkpoint | None, data: Mapping[str, DatasetRef], cfg: SFTConfig, ctx: StageContext
) -> StageResult:
    """Return the instruct checkpoint: phases of masked ChatML SFT on the text/image mixture
    (plus the declared datasets of `mixture:`, checked before training)."""
    model, mcfg = open_model(
        base, ctx, cfg.seed, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile
    )
    tok = open_tokenizer(data, mcfg, cfg.stage_name)
    mix = DeclaredMix(cfg, data, tok, vision_spec(mcfg), ctx.parallel)
    held = {n: mix.heldout_items(n) for n, ds in mix.sets.items() if ds.heldout}
    sources, items, loss_batches = _generated(data, cfg, tok, mcfg)
    if not sources and not mix:
        raise ValueError(
            f"stage {cfg.stage_name!r}: no training dialogues; give it the sft "
            "dataset or declared conversations in mixture:"
        )
    budget = answer_budget(tok, items) if items else 0
    metrics = declared_eval(model, tok, held, cfg.eval.batch_size, "_before")
    if items:
        metrics.update(chat_eval(model, tok, items, loss_batches, budget, cfg.eval.batch_size, "_before"))
    metrics.update(video_eval(model, tok, data, cfg, "_before"))
    mixes = phase_mixes(cfg, sources, mix, data, tok)
    params = apply_trainable(model, cfg.trainable)
    _, train_metrics, drawn = run_phases(model, params, mcfg, cfg, cfg.phases, mixes, tok, ctx)
    after = declared_eval(model, tok, held, cfg.eval.batch_size)
    metrics = {**{k: v for k, v in after.items() if "_acc" in k}, **metrics, **train_metrics}
    if items:
        metrics.update(chat_eval(model, tok, items, loss_batches, budget, cfg.eval.batch_size))
        metrics["eval/max_new_tokens"] = float(budget)
    metrics.update(video_eval(model, tok, data, cfg))
    if cfg.video is not None:
        plot_video_qa(metrics, ctx.out / "video_qa.png", f"{cfg.stage_name}: videoworld/val QA by type")
    metrics.update({k: v for k, v in after.items() if "_acc" not in k})
    metrics.update(mix.metrics(drawn))
    return finish(model, mcfg, ctx, metrics, data)

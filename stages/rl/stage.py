"""Stage 8: rl. k1.5 online policy mirror descent on verifiable, answer-only rewards.

The loop itself is `opmd_loop.run_opmd` (see there for one iteration's steps: curriculum +
prioritized prompts, k samples from the iteration's reference, partial rollouts with a replay
buffer, repeat detection, binary reward + length reward with warm-up, optimizer reset, OPMD loss).
This module maps RLConfig onto it, runs the closing eval (held-out rl_prompts/val answer accuracy,
text and image, mean length and accuracy per 1k tokens, greedy; and the accuracy of k seeded
samples per prompt at the rollout temperature) before and after, and writes
`rl_curves.png` (reward / accuracy / length per iteration) and `rl_rollouts.jsonl` under ctx.out.
A killed run resumes at the last checkpointed iteration (every `checkpoint_every` iterations and
at the end; loop_state says what is kept); the "before" eval is greedy, so recomputing it on the
upstream weights gives the same numbers (the sampled eval is seeded: the same too).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.data.chat import ChatPromptItem, chat_prompt_items
from moonforge.stages.data.chat_records import read_rl_prompt_records
from moonforge.stages.data.user_mix import DeclaredMix, weighted_pool
from moonforge.stages.posttrain_evals import answer_accuracy, as_metrics, split_by_kind
from moonforge.stages.rl.opmd_loop import OPMDRun, run_opmd
from moonforge.stages.rl.repeat import RepeatConfig
from moonforge.stages.rl.replay import RolloutConfig
from moonforge.stages.rl.rewards import LengthPenaltyConfig
from moonforge.stages.rl.sampling import SamplerConfig
from moonforge.stages.rl.verifiers import RewardError
from moonforge.stages.stage_configs import RLConfig
from moonforge.stages.train.stage_io import finish, open_model, open_tokenizer, require, vision_spec


def opmd_run(cfg: RLConfig, label: str | None = None) -> OPMDRun:
    """The loop settings of an RLConfig."""
    repeat = RepeatConfig(penalty=cfg.repeat_penalty) if cfg.repeat_detection else None
    return OPMDRun(
        label=label or cfg.stage_name,
        num_iterations=cfg.num_iterations,
        prompts_per_iteration=cfg.prompts_per_iteration,
        samples_per_prompt=cfg.samples_per_prompt,
        steps_per_iteration=cfg.steps_per_iteration,
        tau=cfg.tau,
        temperature=cfg.temperature,
        rollout=RolloutConfig(
            segment_budget=cfg.rollout_token_budget or cfg.max_new_tokens,
            max_total_tokens=cfg.max_new_tokens,
            max_segment_age=cfg.max_segment_age,
            repeat=repeat,
        ),
        length=LengthPenaltyConfig(
            weight=cfg.length_penalty_weight, warmup_iterations=cfg.length_penalty_warmup_iters
        ),
        sampler=SamplerConfig(
            use_curriculum=cfg.use_curriculum,
            warmup_iterations=cfg.curriculum_switch_iter,
            hard_threshold=cfg.hard_threshold,
            use_priority=cfg.use_priority,
        ),
        optimizer=cfg.optimizer,
        schedule=cfg.schedule,
        trainable=tuple(cfg.trainable),
        rows_per_forward=cfg.micro_batch_size or cfg.batch_size,
        seed=cfg.seed,
        baseline=cfg.baseline,
        top_p=cfg.top_p,
        repeat_ngram=cfg.repeat_ngram if cfg.repeat_detection else None,
        repeat_max=cfg.repeat_max if cfg.repeat_detection else None,
        max_verifier_error_rate=cfg.max_verifier_error_rate,
        checkpoint_every=cfg.checkpoint_every,
    )


def plot_curves(curves: Sequence[Mapping[str, float]], path: Path, title: str) -> None:
    """Reward, accuracy and mean length per iteration side by side, as a PNG (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.2))
    FigureCanvasAgg(fig)
    for n, (key, name) in enumerate(
        (
            ("reward_mean", "reward (with length reward)"),
            ("accuracy", "train accuracy"),
            ("mean_len", "mean length"),
        )
    ):
        ax = fig.add_subplot(1, 3, n + 1)
        pts = [(c["iteration"], c[key]) for c in curves if key in c]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(name)
        ax.set_xlabel("iteration")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def prompt_items(
    data: Mapping[str, DatasetRef],
    tok: Tokenizer,
    vision,
    split: str,
    stage: str,
    per_kind: int | None = None,
) -> list[ChatPromptItem]:
    """RL prompts of `split` (images from toyworld/<split>); `per_kind` balances text / image."""
    records = read_rl_prompt_records(require(data, "rl_prompts", stage).path, split)
    world = require(data, "toyworld", stage).path
    items = chat_prompt_items(records, world / split, tok, vision)
    if per_kind is not None:
        items = split_by_kind(items, per_kind)
    if not items:
        raise ValueError(f"rl_prompts/{split}: empty prompt set after loading (corrupt images?)")
    return items


def answer_metrics(
    model: nn.Module,
    tok: Tokenizer,
    items: Sequence[ChatPromptItem],
    max_new_tokens: int,
    batch_size: int,
    suffix: str = "",
    repeat: tuple[int | None, int | None] = (None, None),
) -> dict[str, float]:
    """Greedy held-out answer accuracy, mean length and acc per 1k tokens as eval/* metrics."""
    res = answer_accuracy(
        model,
        tok,
        items,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        repeat_ngram=repeat[0],
        repeat_max=repeat[1],
    )
    return as_metrics(res, "eval/", suffix)


SAMPLED_EVAL_SEED = 1_000_003
"""Seed stride between eval/sampled_acc's passes (each pass seeds its batches from its own base)."""


def sampled_metrics(
    model: nn.Module,
    tok: Tokenizer,
    items: Sequence[ChatPromptItem],
    cfg: RLConfig,
    suffix: str = "",
    repeat: tuple[int | None, int | None] = (None, None),
) -> dict[str, float]:
    """eval/sampled_acc: held-out answer accuracy averaged over `cfg.eval_samples` seeded samples
    per prompt at the rollout temperature and top_p (DeepSeek-R1's pass@1 from k samples), and
    eval/sampled_mean_len. {} when eval_samples is 0.

    Why next to the greedy eval: RL optimises the policy it samples from. At the tiny recipe's scale
    its greedy held-out accuracy moves by a few prompts either way from seed to seed (README, "What
    the tiny numbers mean"), while the sampled accuracy, the quantity the rewards push, rises in every
    run measured. Seeded per pass, so a resumed run's "before" is the same number."""
    if cfg.eval_samples == 0:
        return {}
    passes = [
        answer_accuracy(
            model,
            tok,
            items,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.eval.batch_size,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=SAMPLED_EVAL_SEED * (k + 1),
            repeat_ngram=repeat[0],
            repeat_max=repeat[1],
        )
        for k in range(cfg.eval_samples)
    ]
    return {
        f"eval/sampled_acc{suffix}": sum(p["acc"] for p in passes) / len(passes),
        f"eval/sampled_mean_len{suffix}": sum(p["mean_len"] for p in passes) / len(passes),
    }


def declared_metrics(
    model: nn.Module,
    tok: Tokenizer,
    held: Mapping[str, list],
    max_new_tokens: int,
    batch_size: int,
    suffix: str = "",
    repeat: tuple[int | None, int | None] = (None, None),
) -> dict[str, float]:
    """eval/<name>_acc{suffix} on each declared prompt set's held-out prompts (its verifiers)."""
    out = {}
    for name, items in held.items():
        res = answer_accuracy(
            model,
            tok,
            items,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            repeat_ngram=repeat[0],
            repeat_max=repeat[1],
        )
        out[f"eval/{name}_acc{suffix}"] = res["acc"]
    return out


def with_declared(
    items: list[ChatPromptItem],
    cfg,
    data: Mapping[str, DatasetRef],
    tok: Tokenizer,
    vision,
    ctx: StageContext,
) -> tuple[list[ChatPromptItem], DeclaredMix, dict]:
    """The training prompts with the declared prompt sets of `mixture:` mixed in by share
    (checked before training), the DeclaredMix and their held-out prompts by name."""
    mix = DeclaredMix(cfg, data, tok, vision, ctx.parallel)
    prompts = {n: mix.prompts(n) for n, ds in mix.sets.items() if ds.kind == "prompt"}
    held = {n: mix.heldout_items(n) for n, ds in mix.sets.items() if ds.kind == "prompt" and ds.heldout}
    return weighted_pool(items, prompts, cfg.mixture, f"{cfg.stage_name}/{cfg.seed}"), mix, held


def rl(
    base: Checkpoint | None, data: Mapping[str, DatasetRef], cfg: RLConfig, ctx: StageContext
) -> StageResult:
    """Return the policy after cfg.num_iterations OPMD iterations on rl_prompts/train.

    Metrics: eval/* (held-out rl_prompts/val accuracy, text and image, mean length, acc per 1k
    tokens, greedy; eval/sampled_acc at the rollout temperature) after, the same with `_before`,
    eval/acc_gain, eval/sampled_acc_gain, and rl/* summary numbers.
    Bad input (no prompts, NaN reward, nothing finished) raises an error naming the stage.
    """
    try:
        return _rl(base, data, cfg, ctx)
    except RewardError as exc:
        raise RewardError(f"stage {cfg.stage_name!r}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"stage {cfg.stage_name!r}: {exc}") from exc


def _rl(base, data, cfg: RLConfig, ctx: StageContext) -> StageResult:
    model, mcfg = open_model(
        base, ctx, cfg.seed, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile
    )
    tok = open_tokenizer(data, mcfg, cfg.stage_name)
    vision = vision_spec(mcfg)
    train_items = prompt_items(data, tok, vision, "train", cfg.stage_name)
    val_items = prompt_items(data, tok, vision, "val", cfg.stage_name, cfg.eval.num_examples // 2)
    train_items, mix, held = with_declared(train_items, cfg, data, tok, vision, ctx)
    run = opmd_run(cfg)
    repeat = (run.repeat_ngram, run.repeat_max)
    evaluate = lambda suffix: {  # noqa: E731
        **declared_metrics(model, tok, held, cfg.max_new_tokens, cfg.eval.batch_size, suffix, repeat),
        **answer_metrics(model, tok, val_items, cfg.max_new_tokens, cfg.eval.batch_size, suffix, repeat),
        **sampled_metrics(model, tok, val_items, cfg, suffix, repeat),
    }
    before = evaluate("_before")
    t0 = time.perf_counter()
    curves = run_opmd(model, tok, train_items, run, ctx, model_cfg=mcfg)  # resumable
    seconds = time.perf_counter() - t0
    after = evaluate("")
    plot_curves(curves, ctx.out / "rl_curves.png", f"{cfg.stage_name}: k1.5 OPMD")
    trained = [c for c in curves if "reward_mean" in c]
    metrics = {
        **before,
        # run summaries show a stage's first eval/* metrics: both accuracies lead
        **{k: after[k] for k in ("eval/acc", "eval/sampled_acc") if k in after},
        **after,
        "eval/acc_gain": after["eval/acc"] - before["eval/acc_before"],
        **(
            {"eval/sampled_acc_gain": after["eval/sampled_acc"] - before["eval/sampled_acc_before"]}
            if cfg.eval_samples
            else {}
        ),
        "rl/reward_first": trained[0]["reward_mean"],
        "rl/reward_last": trained[-1]["reward_mean"],
        "rl/accuracy_first": trained[0]["accuracy"],
        "rl/accuracy_last": trained[-1]["accuracy"],
        "rl/mean_len_first": trained[0]["mean_len"],
        "rl/mean_len_last": trained[-1]["mean_len"],
        "rl/verifier_errors": curves[-1]["verifier_errors"],
        "rl/seconds": seconds,
        "train/steps": float(cfg.steps_per_iteration * cfg.num_iterations),
        **mix.metrics(),
    }
    return finish(model, mcfg, ctx, metrics, data)

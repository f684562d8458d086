"""Stage 9: long2short (k1.5 sec. 2.4). Shorter reasoning at held accuracy, four ways, best one kept.

Every method in `cfg.methods` starts from the long model (the upstream checkpoint, = pi_ref) and
yields a candidate checkpoint under ctx.out/<method>/:
  shortest_rs  sample `num_samples` responses per question (rl_prompts/train, `num_questions` of
               them), keep the shortest correct one, SFT on it (answer-only loss = mean response
               token NLL after the prompt, i.e. the chat loss on the assistant turn + <|im_end|>).
  merge        theta = merge_weight * theta_long + (1 - merge_weight) * theta_short (no training).
               The stage has no separate short model upstream, so theta_short is the shortest_rs
               candidate (trained here if shortest_rs is not listed): "merge" is k1.5's merge of a
               long and a short model, with the short one distilled from the long one's shortest
               correct samples.
  dpo          pairs from the same samples (dpo.build_dpo_pairs: chosen = shortest correct,
               rejected = wrong and longer, or correct and >= dpo_long_factor x longer), loss
               dpo.dpo_loss with pi_ref = the long model (its log-probs precomputed, no grad).
  rl           the OPMD loop (opmd_loop.run_opmd) with the length penalty on from iteration 0 and
               the rollout cap cut to `max_new_tokens` (over-long answers get no reward).
Each candidate and the long model are evaluated greedily on rl_prompts/val (accuracy, mean length,
accuracy per 1k tokens, all at the long model's budget `sample_max_new_tokens`); the returned
checkpoint is efficiency.pick_best over them with `acc_tolerance` (the long model competes too, so
a method that loses accuracy is never returned). `long2short.json` records the table and choice.
A method with nothing to train on (no correct sample, no DPO pair) is skipped and reported.
A checkpoint is written after the samples are drawn and after each method (long2short_state.py):
a killed run resumes at the method it was in, with the finished candidates as they were.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from moonforge.model.generate import generate
from moonforge.model.tokenizer import Tokenizer
from moonforge.model.vlm import VLM
from moonforge.stages import long2short_state as resume
from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.data.chat import ChatPromptItem, prompt_media
from moonforge.stages.data.user_mix import preference_pairs, weighted_pool
from moonforge.stages.posttrain_evals import answer_accuracy
from moonforge.stages.rl.dpo import Sample, build_dpo_pairs, dpo_loss, shortest_correct
from moonforge.stages.rl.efficiency import pick_best
from moonforge.stages.rl.merge import merge_state_dicts
from moonforge.stages.rl.opmd_loop import OPMDRun, run_opmd
from moonforge.stages.rl.policy import response_logprobs, rollout_stop_ids
from moonforge.stages.rl.repeat import RepeatConfig
from moonforge.stages.rl.replay import RolloutConfig
from moonforge.stages.rl.rewards import LengthPenaltyConfig
from moonforge.stages.rl.sampling import SamplerConfig
from moonforge.stages.rl.stage import declared_metrics, prompt_items, with_declared
from moonforge.stages.rl.verifiers import RewardError, VerifyStats, score
from moonforge.stages.stage_configs import Long2ShortConfig
from moonforge.stages.train.checkpoint import load_weights, save_weights
from moonforge.stages.train.freeze import apply_trainable
from moonforge.stages.train.loop import LossFn, TrainSpec, TrainState, train_step
from moonforge.stages.train.optim import MuonAdamW
from moonforge.stages.train.stage_io import finish, open_model, open_tokenizer, vision_spec

REPEAT = (8, 4)
"""(repeat_ngram, repeat_max) for sampling and evals: a looping answer ends early everywhere."""
Samples = resume.Samples
"""train item index -> its sampled responses (content = generated ids)."""


def sample_responses(
    model: VLM,
    tok: Tokenizer,
    items: Sequence[ChatPromptItem],
    questions: Sequence[int],
    cfg: Long2ShortConfig,
) -> Samples:
    """`cfg.num_samples` responses per question from the long model, scored by its verifier."""
    gen = torch.Generator(model.lm.embed_tokens.weight.device).manual_seed(cfg.seed)
    stats, out = VerifyStats(), cast(Samples, {})
    per_call = max(1, cfg.eval.batch_size // cfg.num_samples)
    for start in range(0, len(questions), per_call):
        qs = questions[start : start + per_call]
        rows = [items[q] for q in qs for _ in range(cfg.num_samples)]
        res = generate(
            model,
            [it.prompt_ids for it in rows],
            max_new_tokens=cfg.sample_max_new_tokens,
            temperature=cfg.sample_temperature,
            generator=gen,
            stop_ids=rollout_stop_ids(tok),
            pad_id=tok.pad_id,
            media_pad_id=tok.media_pad_id,
            **prompt_media(rows),
            repeat_ngram=REPEAT[0],
            repeat_max=REPEAT[1],
        )
        for r, (it, ids) in enumerate(zip(rows, res.tokens)):
            ok = score(it.verifier, tok.decode(ids), it.answer, stats) == 1.0
            out.setdefault(qs[r // cfg.num_samples], []).append(Sample(ids, len(ids), ok))
    return out


def _train(
    model: VLM,
    cfg: Long2ShortConfig,
    ctx: StageContext,
    label: str,
    step_batches: Callable[[int], list[tuple[Any, float]]],
    loss_fn: LossFn,
) -> list[float]:
    """cfg.steps steps of the shared train_step with a fresh optimizer; returns the losses.
    `step_batches(step)`: that step's micro-batches with their weights in the step's loss."""
    named = apply_trainable(model, cfg.trainable)
    par = ctx.parallel
    opt = (
        MuonAdamW(named, cfg.optimizer)
        if par is None
        else par.build_optimizer(model, named, cfg.optimizer, cfg.grad_accum)
    )
    spec = TrainSpec(cfg.steps, cfg.optimizer, cfg.schedule, tuple(cfg.trainable), label=label)
    state, losses = TrainState(model, opt, spec), []
    model.eval()  # no dropout; MoE router bias frozen as in the RL stage
    for step in range(cfg.steps):
        parts = step_batches(step)
        state, m = train_step(
            state, [b for b, _ in parts], loss_fn, ctx.device, par, weights=[w for _, w in parts]
        )
        losses.append(m["loss"])
        ctx.sink.log(step + 1, {f"{label}/{k}": v for k, v in m.items()})
    return losses


def _micro(rows: list[int], size: int) -> list[list[int]]:
    """A step's rows cut into micro-batches of `size` rows."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _batch(n: int, step: int, rows: int, seed: int) -> list[int]:
    """`rows` indices of range(n) for `step`: a seeded permutation, cycled."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[(step * rows + j) % n] for j in range(min(rows, n))]


def shortest_rs(
    model: VLM,
    tok: Tokenizer,
    items: Sequence[ChatPromptItem],
    samples: Samples,
    cfg: Long2ShortConfig,
    ctx: StageContext,
) -> dict[str, float] | None:
    """SFT on each question's shortest correct sample; None when no question has one."""
    data = [(items[q], s.content) for q, ss in samples.items() if (s := shortest_correct(ss))]
    if not data:
        return None

    def step_batches(step: int) -> list[tuple[Any, float]]:
        rows = _batch(len(data), step, cfg.batch_size, cfg.seed)
        tokens = sum(len(data[i][1]) for i in rows)  # the step's loss is per response token
        return [((mb, tokens), 1.0) for mb in _micro(rows, cfg.micro_batch_size or cfg.batch_size)]

    def loss_fn(_policy: nn.Module, mb: tuple[list[int], int]) -> tuple[Tensor, dict[str, float]]:
        rows, tokens = mb
        logp = response_logprobs(
            model, [data[i][0] for i in rows], [data[i][1] for i in rows], media_pad_id=tok.media_pad_id
        )
        return -logp.sum() / tokens, {"tokens": float(sum(len(data[i][1]) for i in rows))}

    losses = _train(model, cfg, ctx, "long2short_shortest_rs", step_batches, loss_fn)
    return {
        "examples": float(len(data)),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "target_mean_len": sum(len(d[1]) for d in data) / len(data),
    }


def dpo(
    model: VLM,
    tok: Tokenizer,
    items: Sequence[ChatPromptItem],
    samples: Samples,
    cfg: Long2ShortConfig,
    ctx: StageContext,
    declared: Mapping[str, list] | None = None,
) -> dict[str, float] | None:
    """DPO on long2short pairs plus the declared preference pairs of `mixture:` (by share),
    pi_ref = the model as it is on entry; None when there is no pair."""
    own = [
        (items[cast(int, p.question)], p.chosen.content, p.rejected.content)
        for p in build_dpo_pairs(samples, cfg.dpo_long_factor)
    ]
    pairs = weighted_pool(own, declared or {}, cfg.mixture, f"{cfg.stage_name}/dpo/{cfg.seed}")
    if not pairs:
        return None
    its, chosen, rejected = [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]
    with torch.no_grad():  # pi_ref: the starting (long) model
        ref_w = response_logprobs(model, its, chosen, media_pad_id=tok.media_pad_id)
        ref_l = response_logprobs(model, its, rejected, media_pad_id=tok.media_pad_id)

    def step_batches(step: int) -> list[tuple[Any, float]]:
        idx = _batch(len(pairs), step, max(1, cfg.batch_size // 2), cfg.seed)
        size = max(1, (cfg.micro_batch_size or cfg.batch_size) // 2)
        return [(mb, len(mb) / len(idx)) for mb in _micro(idx, size)]  # dpo_loss is a mean over pairs

    def loss_fn(_policy: nn.Module, idx: list[int]) -> tuple[Tensor, dict[str, float]]:
        both = response_logprobs(
            model,
            [its[i] for i in idx] * 2,
            [chosen[i] for i in idx] + [rejected[i] for i in idx],
            media_pad_id=tok.media_pad_id,
        )
        return dpo_loss(both[: len(idx)], both[len(idx) :], ref_w[idx], ref_l[idx], cfg.dpo_beta)

    losses = _train(model, cfg, ctx, "long2short_dpo", step_batches, loss_fn)
    return {"pairs": float(len(pairs)), "loss_first": losses[0], "loss_last": losses[-1]}


def long2short_rl(
    model: VLM,
    tok: Tokenizer,
    items: Sequence[ChatPromptItem],
    cfg: Long2ShortConfig,
    ctx: StageContext,
) -> dict[str, float]:
    """OPMD with the length penalty on from the start and the rollout cap cut to max_new_tokens."""
    run = OPMDRun(
        label="long2short_rl",
        num_iterations=cfg.rl_iterations,
        prompts_per_iteration=cfg.rl_prompts_per_iteration,
        samples_per_prompt=cfg.rl_samples_per_prompt,
        steps_per_iteration=cfg.rl_steps_per_iteration,
        tau=cfg.rl_tau,
        temperature=cfg.sample_temperature,
        rollout=RolloutConfig(
            segment_budget=cfg.max_new_tokens, max_total_tokens=cfg.max_new_tokens, repeat=RepeatConfig()
        ),
        length=LengthPenaltyConfig(weight=cfg.length_penalty_weight, warmup_iterations=0),
        sampler=SamplerConfig(use_curriculum=False),
        optimizer=cfg.optimizer,
        schedule=cfg.schedule,
        trainable=tuple(cfg.trainable),
        rows_per_forward=cfg.micro_batch_size or cfg.batch_size,
        seed=cfg.seed,
        repeat_ngram=REPEAT[0],
        repeat_max=REPEAT[1],
    )
    curves = [c for c in run_opmd(model, tok, items, run, ctx) if "reward_mean" in c]
    return {
        "reward_first": curves[0]["reward_mean"],
        "reward_last": curves[-1]["reward_mean"],
        "mean_len_first": curves[0]["mean_len"],
        "mean_len_last": curves[-1]["mean_len"],
    }


def choose(table: Mapping[str, Mapping[str, float]], acc_tolerance: float) -> str:
    """Name of the most token-efficient candidate within `acc_tolerance` of the best accuracy."""
    return pick_best([(n, r["acc"], r["mean_len"]) for n, r in table.items()], acc_tolerance)[0]


def long2short(
    base: Checkpoint | None, data: Mapping[str, DatasetRef], cfg: Long2ShortConfig, ctx: StageContext
) -> StageResult:
    """Return the most token-efficient of the long model and its long2short candidates.

    Metrics: eval/acc, eval/mean_len, eval/acc_per_1k_tokens of the returned model; the same of
    the long model with `_before`; cand/<name>/{acc,mean_len,acc_per_1k_tokens} per candidate
    (name "long" = the base), <method>/* training numbers, chosen/<name> = 1.
    """
    try:
        return _long2short(base, data, cfg, ctx)
    except RewardError as exc:
        raise RewardError(f"stage {cfg.stage_name!r}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"stage {cfg.stage_name!r}: {exc}") from exc


def _long2short(base, data, cfg: Long2ShortConfig, ctx: StageContext) -> StageResult:
    if base is None:
        raise ValueError("long2short starts from a long-CoT model; set `upstream: rl` (or long_cot_sft)")
    model, mcfg = open_model(
        base, ctx, cfg.seed, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile
    )
    tok = open_tokenizer(data, mcfg, cfg.stage_name)
    train = prompt_items(data, tok, vision_spec(mcfg), "train", cfg.stage_name)
    val = prompt_items(data, tok, vision_spec(mcfg), "val", cfg.stage_name, cfg.eval.num_examples // 2)
    train, mix, held = with_declared(train, cfg, data, tok, vision_spec(mcfg), ctx)
    prefs = {n: preference_pairs(mix, n) for n, ds in mix.sets.items() if ds.kind == "preference"}

    def evaluate() -> dict[str, float]:
        r = answer_accuracy(
            model,
            tok,
            val,
            max_new_tokens=cfg.sample_max_new_tokens,
            batch_size=cfg.eval.batch_size,
            repeat_ngram=REPEAT[0],
            repeat_max=REPEAT[1],
        )
        mine = declared_metrics(
            model, tok, held, cfg.sample_max_new_tokens, cfg.eval.batch_size, repeat=REPEAT
        )
        return {
            **{k: float(r[k]) for k in ("acc", "mean_len", "acc_per_1k_tokens")},
            **{k.removeprefix("eval/"): v for k, v in mine.items()},
        }

    long_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    p = resume.restore(ctx, cfg.methods)
    if p is None:
        table = {"long": evaluate()}
        num_q = min(cfg.num_questions, len(train))
        questions = sorted(random.Random(cfg.seed).sample(range(len(train)), num_q))
        needs_samples = {"shortest_rs", "dpo", "merge"} & set(cfg.methods)
        samples = sample_responses(model, tok, train, questions, cfg) if needs_samples else {}
        p = resume.Progress([], table, {}, samples)
        resume.save_point(model, mcfg, ctx, cfg.methods, p)
    for method in cfg.methods:
        if method in p.done:
            continue
        model.load_state_dict(long_state)
        if _candidate(method, model, tok, train, cfg, ctx, p, long_state, prefs):
            save_weights(model, mcfg, ctx.out / method)
            p.table[method] = evaluate()
        p.done.append(method)
        resume.save_point(model, mcfg, ctx, cfg.methods, p)
    table, extra = p.table, p.extra
    extra["data"] = {k.removeprefix("data/"): v for k, v in mix.metrics().items()}
    return _close(model, mcfg, ctx, cfg, data, table, extra, long_state)


def _candidate(method, model, tok, train, cfg, ctx, p: resume.Progress, long_state, prefs) -> bool:
    """Turn `model` (the long model on entry) into `method`'s candidate, its training numbers in
    p.extra; False when the method has nothing to train on (skipped, reported)."""
    extra = p.extra
    if method in ("shortest_rs", "merge") and p.short_state is None:
        info = shortest_rs(model, tok, train, p.samples, cfg, ctx)
        extra["shortest_rs"] = info or {"skipped": 1.0}
        p.short_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if info else {}
    if method == "merge":
        if not p.short_state:
            extra["merge"] = {"skipped": 1.0}
            return False
        model.load_state_dict(merge_state_dicts(long_state, p.short_state, cfg.merge_weight))
    elif method == "shortest_rs":
        if not p.short_state:
            return False
        model.load_state_dict(p.short_state)
    elif method == "dpo":
        extra["dpo"] = dpo(model, tok, train, p.samples, cfg, ctx, prefs) or {"skipped": 1.0}
        return "skipped" not in extra["dpo"]
    else:
        extra["rl"] = long2short_rl(model, tok, train, cfg, ctx)
    return True


def _close(model, mcfg, ctx, cfg, data, table, extra, long_state) -> StageResult:
    name = choose(table, cfg.acc_tolerance)
    if name == "long":
        model.load_state_dict(long_state)
    else:
        load_weights(model, Checkpoint(ctx.out / name))
    (ctx.out / "long2short.json").write_text(
        json.dumps({"chosen": name, "candidates": table, "methods": extra}, indent=2)
    )
    metrics = {f"cand/{n}/{k}": v for n, r in table.items() for k, v in r.items()}
    metrics.update({f"{m}/{k}": v for m, r in extra.items() for k, v in r.items()})
    metrics.update({f"eval/{k}": v for k, v in table[name].items()})
    metrics.update({f"eval/{k}_before": v for k, v in table["long"].items()})
    metrics[f"chosen/{name}"] = 1.0
    return finish(model, mcfg, ctx, metrics, data)

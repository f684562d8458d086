"""The k1.5 OPMD training loop over a VLM (stage 8 `rl`, and long2short RL in stage 9).

One iteration i (`run_opmd`), with pi_i = the weights at the start of the iteration:
  1. draw prompts (curriculum easy -> hard by difficulty, weighted by 1 - running success rate)
     and start k trajectories each;
  2. partial rollouts (replay.rollout_step): every active trajectory, new or resumed from the
     replay buffer, gets at most `segment_budget` new tokens sampled from pi_i (images passed to
     generate); unfinished ones go back to the buffer; loops are cut by repeat detection;
  3. a prompt's group trains once all its k trajectories have finished: binary reward on the
     final answer (verifiers.score), optional repeat penalty, the length reward with warm-up;
  4. logp_old = summed response log-probs under pi_i, no grad, computed before any update (so it
     is exactly the frozen reference's value without holding a second copy of the weights);
  5. the optimizer is RESET (a new MuonAdamW), then `steps_per_iteration` gradient steps on
     (1/k) sum_j [-(r_j - rbar) logp_j + (tau/2)(logp_j - logp_old_j)^2]   (opmd.opmd_loss),
     each one the shared train_step (train/loop.py: autocast, non-finite guard, ranks) over
     forwards of whole prompt groups weighted by their share of the groups.
No value network. The MoE router bias is frozen and the model stays in eval mode, so logp at the
first step equals logp_old and the l2 term starts at zero.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from moonforge.model.config import VLMConfig
from moonforge.model.tokenizer import Tokenizer
from moonforge.model.vlm import VLM
from moonforge.stages.artifacts import StageContext
from moonforge.stages.config import OptimizerConfig, ScheduleConfig
from moonforge.stages.data.chat import ChatPromptItem
from moonforge.stages.rl import loop_state
from moonforge.stages.rl.opmd_update import Batch, update_policy
from moonforge.stages.rl.policy import RolloutSampler
from moonforge.stages.rl.repeat import repeat_penalty
from moonforge.stages.rl.replay import ReplayBuffer, RolloutConfig, Trajectory, rollout_step
from moonforge.stages.rl.rewards import LengthPenaltyConfig, total_rewards
from moonforge.stages.rl.sampling import PromptSampler, SamplerConfig
from moonforge.stages.rl.verifiers import VerifyStats, score
from moonforge.stages.train.checkpoint import read_train_state, save_train_state
from moonforge.stages.train.freeze import apply_trainable


@dataclass(frozen=True)
class OPMDRun:
    """Everything `run_opmd` needs; built from RLConfig (`opmd_run`) or by long2short."""

    label: str
    num_iterations: int
    prompts_per_iteration: int
    samples_per_prompt: int
    steps_per_iteration: int
    tau: float
    temperature: float
    rollout: RolloutConfig
    length: LengthPenaltyConfig
    sampler: SamplerConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    trainable: tuple[str, ...]
    rows_per_forward: int
    seed: int
    baseline: Literal["mean", "logmeanexp"] = "mean"
    top_p: float = 1.0
    repeat_ngram: int | None = None
    repeat_max: int | None = None
    max_verifier_error_rate: float = 0.5
    checkpoint_every: int | None = None
    """Iterations between periodic checkpoints (run_opmd with model_cfg; None: at the end only)."""


def _score_groups(
    groups: Mapping[tuple, list[Trajectory]],
    items: Sequence[ChatPromptItem],
    tok: Tokenizer,
    iteration: int,
    run: OPMDRun,
    stats: VerifyStats,
    sampler: PromptSampler,
) -> Batch:
    """Binary answer reward + repeat penalty + length reward for every finished group."""
    batch = Batch([], [], [], [], [])
    for (idx, start), trajs in groups.items():
        item = items[idx]
        raw = [score(item.verifier, tok.decode(t.ids), item.answer, stats) for t in trajs]
        total = total_rewards([t.num_generated for t in trajs], raw, iteration, run.length)
        if run.rollout.repeat is not None:
            total = [
                repeat_penalty(r, t.finish_reason == "repeat", run.rollout.repeat)
                for r, t in zip(total, trajs)
            ]
        sampler.update(idx, raw)
        batch.items += [item] * len(trajs)
        batch.trajs += trajs
        batch.rewards += total
        batch.correct += raw
        batch.group_ids += [f"{idx}@{start}"] * len(trajs)
    return batch


def _iteration_metrics(
    i: int,
    batch: Batch,
    trace: dict,
    stats: VerifyStats,
    buffer: ReplayBuffer,
    gen: RolloutSampler,
    seconds: float,
) -> dict[str, float]:
    n = len(batch.trajs)
    m = {
        "iteration": float(i),
        "groups": float(len(set(batch.group_ids))),
        "trajectories": float(n),
        "buffered": float(len(buffer)),
        "generated_tokens": float(gen.num_tokens),
        "verifier_errors": float(stats.num_errors),
        "seconds": seconds,
    }
    if n:
        m.update(
            reward_mean=sum(batch.rewards) / n,
            accuracy=sum(batch.correct) / n,
            mean_len=sum(t.num_generated for t in batch.trajs) / n,
            repeat_frac=sum(t.finish_reason == "repeat" for t in batch.trajs) / n,
            truncated_frac=sum(t.finish_reason == "truncated" for t in batch.trajs) / n,
        )
    if trace:
        m.update(
            loss_first=trace["loss"][0],
            loss_last=trace["loss"][-1],
            lr=trace["lr"],
            pg_loss=trace["pg_loss"][-1],
            l2_loss=trace["l2_loss"][-1],
            grad_norm=trace["grad_norm"][-1],
        )
    return m


def run_opmd(
    model: VLM,
    tok: Tokenizer,
    items: Sequence[ChatPromptItem],
    run: OPMDRun,
    ctx: StageContext,
    step_offset: int = 0,
    model_cfg: VLMConfig | None = None,
) -> list[dict[str, float]]:
    """Train `model` in place for run.num_iterations OPMD iterations; return per-iteration metrics.

    Logs each iteration through ctx.sink as `<label>/<metric>` and appends its trace (group ids,
    rewards, lengths, logp_old, first-step logp, loss per step) to ctx.out/<label>_rollouts.jsonl.
    With `model_cfg`, checkpoints every run.checkpoint_every iterations and at the end (weights +
    loop_state + the log so far) and resumes from ctx.resume_from at the iteration it recorded:
    the final weights equal an unbroken run's.
    Raises ValueError for an empty prompt set or when no group ever finished (nothing trained).
    """
    if not items:
        raise ValueError(f"{run.label}: empty prompt set (no RL prompt survived loading)")
    named = apply_trainable(model, run.trainable)
    model.eval()  # no dropout; routing identical for logp_old and logp
    k = run.samples_per_prompt
    sampler = PromptSampler([it.difficulty or 0.0 for it in items], run.sampler, run.seed)
    buffer, stats = ReplayBuffer(), VerifyStats()
    pending: defaultdict[tuple, list[Trajectory]] = defaultdict(list)  # finished, waiting for their group
    gen = RolloutSampler(
        model,
        items,
        tok,
        temperature=run.temperature,
        top_p=run.top_p,
        seed=run.seed,
        repeat_ngram=run.repeat_ngram,
        repeat_max=run.repeat_max,
    )
    parts = (sampler, buffer, pending, stats, gen)
    log_path = ctx.out / f"{run.label}_rollouts.jsonl"
    ctx.out.mkdir(parents=True, exist_ok=True)
    start, curves = _resume(model, run, ctx, parts, log_path) if model_cfg is not None else (0, [])
    with open(log_path, "a" if start else "w") as log:
        for i in range(start, run.num_iterations):
            m, row = _iteration(model, named, tok, items, run, ctx, i, parts)
            log.write(json.dumps(row) + "\n")
            curves.append(m)
            ctx.sink.log(step_offset + i + 1, {f"{run.label}/{key}": v for key, v in m.items()})
            every = run.checkpoint_every or run.num_iterations
            if model_cfg is not None and ((i + 1) % every == 0 or i + 1 == run.num_iterations):
                log.flush()
                state = loop_state.snapshot(run.label, i + 1, *parts, curves)
                _checkpoint(model, model_cfg, ctx, run, state, curves[-1], log_path)
            ctx.progress(i + 1, run.num_iterations, run.label)
    ctx.sink.flush()
    if not any("loss_first" in c for c in curves):
        raise ValueError(
            f"{run.label}: empty rollout batch in every iteration (no prompt group "
            f"finished all {k} samples); raise rollout_token_budget or num_iterations"
        )
    return curves


def _iteration(model, named, tok, items, run: OPMDRun, ctx: StageContext, i: int, parts) -> tuple[dict, dict]:
    """Iteration i: sample prompts, roll out, score the finished groups, update; returns the
    iteration's metrics and its rollout-log row."""
    sampler, buffer, pending, stats, gen = parts
    k = run.samples_per_prompt
    t0 = time.perf_counter()
    prompts = [
        ((p, i, j), list(items[p].prompt_ids))
        for p in sampler.sample(i, run.prompts_per_iteration)
        for j in range(k)
    ]
    gen.expect(buffer, prompts)
    for t in rollout_step(prompts, buffer, gen, i, run.rollout):
        pending[cast(tuple, t.prompt_id)[:2]].append(t)  # (prompt, start iteration)
    rollout_s = time.perf_counter() - t0
    ready = {g: pending.pop(g) for g in [g for g, ts in pending.items() if len(ts) == k]}
    batch = _score_groups(ready, items, tok, i, run, stats, sampler)
    stats.check(run.max_verifier_error_rate)
    trace = update_policy(model, named, batch, run, i, tok.media_pad_id, ctx) if ready else {}
    m = _iteration_metrics(i, batch, trace, stats, buffer, gen, time.perf_counter() - t0)
    m["rollout_seconds"] = rollout_s
    row = {
        "iteration": i,
        "group_ids": batch.group_ids,
        "rewards": batch.rewards,
        "correct": batch.correct,
        "lengths": [t.num_generated for t in batch.trajs],
        **trace,
    }
    return m, row


def _resume(model: VLM, run: OPMDRun, ctx: StageContext, parts, log_path: Path) -> tuple[int, list[dict]]:
    """(iterations done, their metrics) from ctx.resume_from, with the weights, RNG, loop state
    and rollout log put back; (0, []) without one."""
    if ctx.resume_from is None or not ctx.resume_from.exists():
        return 0, []
    record = read_train_state(model, ctx.resume_from)  # weights + torch RNG
    done, curves = loop_state.restore(record.extra.get("opmd") or {}, run.label, *parts)
    saved = ctx.resume_from / log_path.name
    if saved.exists():
        shutil.copyfile(saved, log_path)
    return done, curves


def _checkpoint(
    model, model_cfg, ctx: StageContext, run: OPMDRun, state: dict, last: dict, log_path: Path
) -> None:
    if ctx.parallel is not None and not ctx.parallel.is_writer:
        return
    done = state["iterations_done"]
    save_train_state(
        model,
        model_cfg,
        _NoOptimizerState(),
        done,
        ctx.out,
        global_step=done,
        num_steps=run.num_iterations,
        last=last,
        extra={"opmd": state},
        attach={log_path.name: log_path},
    )


class _NoOptimizerState:
    """The optimizer is reset every iteration: a checkpoint at an iteration's end holds none."""

    def state_dict(self) -> dict:
        return {}

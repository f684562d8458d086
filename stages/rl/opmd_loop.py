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
     (1/k) sum_j [-(r_j - rbar) logp_j + (tau/2)(logp_j - logp_old_j)^2]   (opmd.opmd_loss).
No value network. The MoE router bias is frozen and the model stays in eval mode, so logp at the
first step equals logp_old and the l2 term starts at zero.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.artifacts import StageContext
from moonforge.stages.config import OptimizerConfig, ScheduleConfig
from moonforge.stages.data.chat import ChatPromptItem
from moonforge.stages.rl.opmd import opmd_loss
from moonforge.stages.rl.policy import RolloutSampler, response_logprobs
from moonforge.stages.rl.repeat import repeat_penalty
from moonforge.stages.rl.replay import ReplayBuffer, RolloutConfig, Trajectory, rollout_step
from moonforge.stages.rl.rewards import LengthPenaltyConfig, total_rewards
from moonforge.stages.rl.sampling import PromptSampler, SamplerConfig
from moonforge.stages.rl.verifiers import VerifyStats, score
from moonforge.stages.train.freeze import apply_trainable
from moonforge.stages.train.optim import MuonAdamW
from moonforge.stages.train.schedule import lr_multiplier


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
    baseline: str = "mean"
    top_p: float = 1.0
    repeat_ngram: int | None = None
    repeat_max: int | None = None
    max_verifier_error_rate: float = 0.5


@dataclass
class _Batch:
    """The finished groups of one iteration, flattened (group-contiguous)."""

    items: list[ChatPromptItem]
    trajs: list[Trajectory]
    rewards: list[float]
    correct: list[float]
    group_ids: list[str]


def _score_groups(
    groups: Mapping[tuple, list[Trajectory]],
    items: Sequence[ChatPromptItem],
    tok: Tokenizer,
    iteration: int,
    run: OPMDRun,
    stats: VerifyStats,
    sampler: PromptSampler,
) -> _Batch:
    """Binary answer reward + repeat penalty + length reward for every finished group."""
    batch = _Batch([], [], [], [], [])
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


def _chunks(group_ids: Sequence[str], rows: int) -> list[list[int]]:
    """Row indices cut into forwards of about `rows` rows, never splitting a group."""
    out, cur = [], []
    for n, g in enumerate(group_ids):
        if cur and len(cur) >= rows and group_ids[cur[-1]] != g:
            out.append(cur)
            cur = []
        cur.append(n)
    return out + [cur] if cur else out


def _update(
    model: nn.Module, named: list, batch: _Batch, run: OPMDRun, iteration: int, media_pad_id: int
) -> dict:
    """Reset the optimizer, then run the iteration's OPMD gradient steps; returns the trace."""
    chunks = _chunks(batch.group_ids, run.rows_per_forward)
    resp = [t.ids for t in batch.trajs]
    masks = [t.loss_mask() for t in batch.trajs]
    logp_of = lambda c: response_logprobs(  # noqa: E731
        model,
        [batch.items[i] for i in c],
        [resp[i] for i in c],
        [masks[i] for i in c],
        media_pad_id=media_pad_id,
    )
    rewards = torch.tensor(batch.rewards, dtype=torch.float32)
    with torch.no_grad():  # pi_i: the weights at the iteration start, before any update
        logp_old = torch.cat([logp_of(c) for c in chunks]).float().cpu()
    opt = MuonAdamW(named, run.optimizer)  # k1.5: the optimizer is reset every iteration
    lr = run.optimizer.lr * lr_multiplier(iteration, run.num_iterations, run.schedule)
    opt.set_lr(lr)
    params = [p for _, p in named]
    num_groups = len(set(batch.group_ids))
    trace: dict = {"lr": lr, "logp_old": logp_old.tolist(), "loss": [], "pg_loss": [], "l2_loss": []}
    for step in range(run.steps_per_iteration):
        opt.zero_grad()
        sums, logp_step = {"loss": 0.0, "pg_loss": 0.0, "l2_loss": 0.0}, []
        for c in chunks:
            logp = logp_of(c)
            gids = [batch.group_ids[i] for i in c]
            loss, m = opmd_loss(logp, logp_old[c].to(logp), rewards[c].to(logp), gids, run.tau, run.baseline)
            share = len(set(gids)) / num_groups
            if not torch.isfinite(loss):
                raise ValueError(f"{run.label}: OPMD loss is {loss.item()} at iteration {iteration}")
            (loss * share).backward()
            logp_step.append(logp.detach().float().cpu())
            sums["loss"] += loss.item() * share
            sums["pg_loss"] += m["pg_loss"] * share
            sums["l2_loss"] += m["l2_loss"] * share
        clip = run.optimizer.grad_clip or float("inf")
        trace.setdefault("grad_norm", []).append(torch.nn.utils.clip_grad_norm_(params, clip).item())
        opt.step()
        for k, v in sums.items():
            trace[k].append(v)
        if step == 0:
            trace["logp"] = torch.cat(logp_step).tolist()
    return trace


def _iteration_metrics(
    i: int,
    batch: _Batch,
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
    model: nn.Module,
    tok: Tokenizer,
    items: Sequence[ChatPromptItem],
    run: OPMDRun,
    ctx: StageContext,
    step_offset: int = 0,
) -> list[dict[str, float]]:
    """Train `model` in place for run.num_iterations OPMD iterations; return per-iteration metrics.

    Logs each iteration through ctx.sink as `<label>/<metric>` and appends its trace (group ids,
    rewards, lengths, logp_old, first-step logp, loss per step) to ctx.out/<label>_rollouts.jsonl.
    Raises ValueError for an empty prompt set or when no group ever finished (nothing trained).
    """
    if not items:
        raise ValueError(f"{run.label}: empty prompt set (no RL prompt survived loading)")
    named = apply_trainable(model, run.trainable)
    model.eval()  # no dropout; routing identical for logp_old and logp
    k = run.samples_per_prompt
    sampler = PromptSampler([it.difficulty or 0.0 for it in items], run.sampler, run.seed)
    buffer, pending, stats = ReplayBuffer(), defaultdict(list), VerifyStats()
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
    curves: list[dict[str, float]] = []
    ctx.out.mkdir(parents=True, exist_ok=True)
    with open(ctx.out / f"{run.label}_rollouts.jsonl", "w") as log:
        for i in range(run.num_iterations):
            t0 = time.perf_counter()
            prompts = [
                ((p, i, j), list(items[p].prompt_ids))
                for p in sampler.sample(i, run.prompts_per_iteration)
                for j in range(k)
            ]
            gen.expect(buffer, prompts)
            for t in rollout_step(prompts, buffer, gen, i, run.rollout):
                pending[t.prompt_id[:2]].append(t)
            rollout_s = time.perf_counter() - t0
            ready = {g: pending.pop(g) for g in [g for g, ts in pending.items() if len(ts) == k]}
            batch = _score_groups(ready, items, tok, i, run, stats, sampler)
            stats.check(run.max_verifier_error_rate)
            trace = _update(model, named, batch, run, i, tok.media_pad_id) if ready else {}
            m = _iteration_metrics(i, batch, trace, stats, buffer, gen, time.perf_counter() - t0)
            m["rollout_seconds"] = rollout_s
            log.write(
                json.dumps(
                    {
                        "iteration": i,
                        "group_ids": batch.group_ids,
                        "rewards": batch.rewards,
                        "correct": batch.correct,
                        "lengths": [t.num_generated for t in batch.trajs],
                        **trace,
                    }
                )
                + "\n"
            )
            curves.append(m)
            ctx.sink.log(step_offset + i + 1, {f"{run.label}/{key}": v for key, v in m.items()})
            ctx.progress(i + 1, run.num_iterations, run.label)
    ctx.sink.flush()
    if not any("loss_first" in c for c in curves):
        raise ValueError(
            f"{run.label}: empty rollout batch in every iteration (no prompt group "
            f"finished all {k} samples); raise rollout_token_budget or num_iterations"
        )
    return curves

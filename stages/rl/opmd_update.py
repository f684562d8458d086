"""One OPMD iteration's policy update (k1.5 sec. 2.3, step 5 of opmd_loop's iteration).

The finished groups of the iteration (`Batch`, group-contiguous rows) are cut into forwards of
whole prompt groups (`forwards`); logp_old comes from the iteration-start weights, the optimizer
is reset, and every gradient step is the shared train_step (train/loop.py: autocast, the
non-finite guard, data parallelism) over those forwards, each weighted by its share of the groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from moonforge.model.vlm import VLM
from moonforge.stages.artifacts import StageContext
from moonforge.stages.data.chat import ChatPromptItem
from moonforge.stages.rl.opmd import opmd_loss
from moonforge.stages.rl.policy import response_logprobs
from moonforge.stages.rl.replay import Trajectory
from moonforge.stages.train.loop import TrainSpec, TrainState, train_step
from moonforge.stages.train.optim import MuonAdamW
from moonforge.stages.train.schedule import lr_multiplier

if TYPE_CHECKING:
    from moonforge.stages.rl.opmd_loop import OPMDRun


@dataclass
class Batch:
    """The finished groups of one iteration, flattened (group-contiguous)."""

    items: list[ChatPromptItem]
    trajs: list[Trajectory]
    rewards: list[float]
    correct: list[float]
    group_ids: list[str]


def forwards(group_ids: Sequence[str], rows: int, ranks: int = 1) -> list[list[int]]:
    """Row indices cut into forwards of about `rows` rows, never splitting a group. With `ranks`
    > 1 the forwards are a multiple of `ranks` (every rank gets as many), as even in rows as whole
    groups allow."""
    out: list[list[int]] = []
    cur: list[int] = []
    for n, g in enumerate(group_ids):
        if cur and len(cur) >= rows and group_ids[cur[-1]] != g:
            out.append(cur)
            cur = []
        cur.append(n)
    out = out + [cur] if cur else out
    if len(out) % ranks == 0:
        return out
    groups = [[n for n, g in enumerate(group_ids) if g == gid] for gid in dict.fromkeys(group_ids)]
    if len(groups) < ranks:
        raise ValueError(
            f"{len(groups)} finished prompt group(s) cannot be shared by {ranks} ranks; raise "
            "prompts_per_iteration or launch fewer processes"
        )
    want = -(-len(out) // ranks) * ranks
    want = want if want <= len(groups) else len(groups) // ranks * ranks
    parts: list[list[int]] = []
    cur = []
    for gi, grp in enumerate(groups):
        cur += grp
        parts_left, groups_left = want - len(parts) - 1, len(groups) - gi - 1
        if parts_left and (
            cur[-1] + 1 >= len(group_ids) * (len(parts) + 1) / want or groups_left == parts_left
        ):
            parts.append(cur)
            cur = []
    return parts + [cur]


def update_policy(
    model: VLM,
    named: list,
    batch: Batch,
    run: OPMDRun,
    iteration: int,
    media_pad_id: int,
    ctx: StageContext,
) -> dict:
    """Reset the optimizer, then run the iteration's OPMD gradient steps through the shared
    train_step (autocast, non-finite guard, data parallelism); returns the iteration's trace."""
    par = ctx.parallel
    chunks = forwards(batch.group_ids, run.rows_per_forward, 1 if par is None else par.world_size)
    resp = [t.ids for t in batch.trajs]
    masks = [t.loss_mask() for t in batch.trajs]

    def logp_of(c: list[int]) -> torch.Tensor:
        items, ids, mask = [batch.items[i] for i in c], [resp[i] for i in c], [masks[i] for i in c]
        return response_logprobs(model, items, ids, mask, media_pad_id=media_pad_id)

    rewards = torch.tensor(batch.rewards, dtype=torch.float32)
    with torch.no_grad():  # pi_i: the weights at the iteration start, before any update
        logp_old = torch.cat([logp_of(c) for c in chunks]).float().cpu()
    # k1.5: the optimizer is reset every iteration
    opt = (
        MuonAdamW(named, run.optimizer)
        if par is None
        else par.build_optimizer(model, named, run.optimizer, len(chunks))
    )
    spec = TrainSpec(
        num_steps=run.steps_per_iteration,
        optimizer=run.optimizer,
        schedule=run.schedule,
        trainable=run.trainable,
        step_offset=iteration * run.steps_per_iteration,
        label=run.label,
    )
    state = TrainState(model, opt, spec)
    lr = run.optimizer.lr * lr_multiplier(iteration, run.num_iterations, run.schedule)
    num_groups = len(set(batch.group_ids))
    weights = [len({batch.group_ids[i] for i in c}) / num_groups for c in chunks]
    first: dict[int, list[float]] = {}  # first step's logp per row (the l2 term starts at zero)

    def loss_fn(_policy: nn.Module, c: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        logp = logp_of(c)
        gids = [batch.group_ids[i] for i in c]
        loss, m = opmd_loss(logp, logp_old[c].to(logp), rewards[c].to(logp), gids, run.tau, run.baseline)
        if state.step == 0:
            first.update(zip(c, logp.detach().float().cpu().tolist()))
        return loss, m

    trace: dict = {
        "lr": lr,
        "logp_old": logp_old.tolist(),
        "loss": [],
        "pg_loss": [],
        "l2_loss": [],
        "grad_norm": [],
    }
    for _ in range(run.steps_per_iteration):
        state, m = train_step(state, chunks, loss_fn, ctx.device, par, weights=weights, lr=lr)
        for k in ("loss", "pg_loss", "l2_loss", "grad_norm"):
            trace[k].append(m[k])
    if par is not None:  # each rank saw its own forwards
        first = {i: v for part in par.gather_objects(first) for i, v in part.items()}
    trace["logp"] = [first[i] for i in range(len(resp))]
    return trace

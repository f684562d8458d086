"""Online policy mirror descent (k1.5 sec. 2.3): the surrogate loss and per-sequence log-probs.

Shapes: B sequences (prompt + response, right-padded), L length, V vocab, K samples of one prompt,
N sequences over several prompt groups.

For one prompt's K samples drawn from the iteration's reference policy pi_i:
    loss = (1/K) sum_j [ -(r_j - b) * logp_j + (tau/2) * (logp_j - logp_old_j)^2 ]
with logp_j the summed response log-prob under pi_theta (with grad), logp_old_j the same under pi_i
(no grad), and the baseline b = mean_j r_j ("mean", what k1.5 uses in practice) or
b = tau * log((1/K) sum_j exp(r_j / tau)) ("logmeanexp", the tau*log Z estimate). Its negative
gradient is the paper's eq. 3. No value network. When all K rewards are equal the policy-gradient
term is exactly zero and only the l2 term remains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat
from torch import Tensor

from moonforge.stages.config import Frozen

Baseline = Literal["mean", "logmeanexp"]


class OPMDConfig(Frozen):
    """The OPMD surrogate's knobs (k1.5 leaves tau unspecified; 0.1-1 is the proposal)."""

    tau: PositiveFloat
    """Strength of the KL (here l2 log-ratio) regulariser towards the iteration's reference."""
    baseline: Baseline = "mean"
    """Reward baseline: the group mean (k1.5 in practice) or tau * log-mean-exp(r / tau)."""


def sequence_logprobs(logits_BLV: Tensor, input_ids_BL: Tensor, response_mask_BL: Tensor) -> Tensor:
    """Summed log-prob of the masked tokens of each sequence: (B,) float32 (float64 kept), with grad.

    `logits_BLV[:, t]` is the model's prediction for `input_ids_BL[:, t + 1]` (the causal-LM output
    on `input_ids_BL` itself, unshifted). `response_mask_BL[b, t]` is True where token t is a response
    token to score; it must be False at t = 0 (nothing predicts the first token).
    """
    if logits_BLV.shape[:2] != input_ids_BL.shape or input_ids_BL.shape != response_mask_BL.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits_BLV.shape)}, ids "
            f"{tuple(input_ids_BL.shape)}, mask {tuple(response_mask_BL.shape)}"
        )
    mask_BL = response_mask_BL.bool()
    if mask_BL[:, 0].any():
        raise ValueError("response_mask[:, 0] is True: the first token has no prediction to score")
    logits_BLV = logits_BLV[:, :-1]
    if logits_BLV.dtype != torch.float64:
        logits_BLV = logits_BLV.float()  # bf16 log-softmax over a big vocab loses too much
    logp_BLV = F.log_softmax(logits_BLV, dim=-1)
    target_BL = input_ids_BL[:, 1:].long()
    tok_BL = logp_BLV.gather(-1, target_BL.unsqueeze(-1)).squeeze(-1)
    return (tok_BL * mask_BL[:, 1:]).sum(dim=1)


def _check_rewards(rewards_K: Tensor) -> None:
    if not torch.isfinite(rewards_K).all():
        raise ValueError(f"non-finite rewards {rewards_K.tolist()}: a verifier or RM returned NaN/inf")


def group_baseline(rewards_K: Tensor, tau: float, baseline: Baseline = "mean") -> Tensor:
    """The scalar baseline b for one group (see module docstring)."""
    if baseline == "mean":
        return rewards_K.mean()
    if baseline == "logmeanexp":
        return tau * (torch.logsumexp(rewards_K / tau, dim=0) - math.log(len(rewards_K)))
    raise ValueError(f"unknown baseline {baseline!r}; use 'mean' or 'logmeanexp'")


def opmd_group_loss(
    logp_K: Tensor, logp_old_K: Tensor, rewards_K: Tensor, tau: float, baseline: Baseline = "mean"
) -> tuple[Tensor, dict[str, float]]:
    """OPMD loss of one prompt's K samples; returns (scalar loss, metrics).

    `logp_old_K` and `rewards_K` are detached here (they are constants of the iteration).
    """
    k = logp_K.numel()
    if k == 0:
        raise ValueError("empty rollout group: OPMD needs at least one sampled response per prompt")
    if logp_old_K.shape != logp_K.shape or rewards_K.shape != logp_K.shape:
        raise ValueError(
            f"shape mismatch: logp {tuple(logp_K.shape)}, logp_old "
            f"{tuple(logp_old_K.shape)}, rewards {tuple(rewards_K.shape)}"
        )
    rewards_K = rewards_K.detach().to(logp_K)
    _check_rewards(rewards_K)
    if bool((rewards_K == rewards_K[0]).all()):
        adv_K = torch.zeros_like(rewards_K)  # exact zero, not a rounding residue of r - mean(r)
    else:
        adv_K = rewards_K - group_baseline(rewards_K, tau, baseline)
    log_ratio_K = logp_K - logp_old_K.detach().to(logp_K)
    pg = -(adv_K * logp_K).sum() / k
    l2 = (tau / 2) * log_ratio_K.pow(2).sum() / k
    metrics = {
        "pg_loss": float(pg.detach()),
        "l2_loss": float(l2.detach()),
        "reward_mean": float(rewards_K.mean()),
        "log_ratio_abs": float(log_ratio_K.detach().abs().mean()),
    }
    return pg + l2, metrics


def opmd_loss(
    logp_N: Tensor,
    logp_old_N: Tensor,
    rewards_N: Tensor,
    group_ids: Sequence[int | str],
    tau: float,
    baseline: Baseline = "mean",
) -> tuple[Tensor, dict[str, float]]:
    """Mean over prompt groups of `opmd_group_loss` (the E over x); metrics are group-averaged.

    `group_ids[n]` names the prompt of sequence n; each group's samples share a baseline.
    """
    if logp_N.numel() == 0:
        raise ValueError("empty rollout batch: no finished trajectories to train on this step")
    if len(group_ids) != logp_N.numel():
        raise ValueError(f"{len(group_ids)} group ids for {logp_N.numel()} sequences")
    groups: dict[int | str, list[int]] = {}
    for n, g in enumerate(group_ids):
        groups.setdefault(g, []).append(n)
    losses, totals = [], {}  # type: list[Tensor], dict[str, float]
    for idx in groups.values():
        sel = torch.tensor(idx, device=logp_N.device)
        loss, m = opmd_group_loss(logp_N[sel], logp_old_N[sel], rewards_N[sel], tau, baseline)
        losses.append(loss)
        for key, v in m.items():
            totals[key] = totals.get(key, 0.0) + v / len(groups)
    totals["num_groups"] = float(len(groups))
    return torch.stack(losses).mean(), totals

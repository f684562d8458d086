"""OPMD: loss and gradient recomputed by hand, baselines, degenerate groups, log-prob helper."""

import math

import pytest
import torch

from moonforge.stages.rl.opmd import group_baseline, opmd_group_loss, opmd_loss, sequence_logprobs


def _tiny_case():
    torch.manual_seed(0)
    # 3 sequences of length 4 (1 prompt token + 3 response tokens), vocab 5.
    logits = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, 4], [1, 0, 0, 2], [1, 4, 4, 4]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    return logits, ids, mask


def test_sequence_logprobs_by_hand():
    logits, ids, mask = _tiny_case()
    got = sequence_logprobs(logits, ids, mask).detach()
    for b in range(3):
        want = 0.0
        for t in range(1, 4):
            if mask[b, t]:
                row = logits[b, t - 1].detach()
                want += float(row[ids[b, t]] - torch.logsumexp(row, 0))
        assert float(got[b]) == pytest.approx(want, rel=1e-10)


def test_loss_and_gradient_match_hand_computation():
    logits, ids, mask = _tiny_case()
    tau, k = 0.5, 3
    rewards = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    logp = sequence_logprobs(logits, ids, mask)
    logp_old = logp.detach() + torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    loss, metrics = opmd_group_loss(logp, logp_old, rewards, tau)
    loss.backward()

    lp, lo, r = logp.detach().tolist(), logp_old.tolist(), rewards.tolist()
    rbar = sum(r) / k
    want = sum(-(r[j] - rbar) * lp[j] + tau / 2 * (lp[j] - lo[j]) ** 2 for j in range(k)) / k
    assert loss.item() == pytest.approx(want, rel=1e-12)
    # dL/dlogp_j = (1/k) [-(r_j - rbar) + tau (logp_j - logp_old_j)];
    # dlogp_j/dlogits[j, t-1, v] = onehot(ids[j, t])_v - softmax(logits[j, t-1])_v on masked t.
    grad = torch.zeros_like(logits)
    for j in range(k):
        coef = (-(r[j] - rbar) + tau * (lp[j] - lo[j])) / k
        for t in range(1, 4):
            if mask[j, t]:
                p = torch.softmax(logits[j, t - 1].detach(), 0)
                grad[j, t - 1] = coef * (torch.nn.functional.one_hot(ids[j, t], 5).double() - p)
    torch.testing.assert_close(logits.grad, grad, rtol=1e-10, atol=1e-12)
    assert metrics["pg_loss"] == pytest.approx(sum(-(r[j] - rbar) * lp[j] for j in range(k)) / k)


def test_equal_rewards_leave_only_the_l2_term():
    logp = torch.tensor([-3.0, -5.0, -4.0], requires_grad=True)
    old = torch.tensor([-3.5, -5.0, -3.0])
    for baseline in ("mean", "logmeanexp"):
        loss, m = opmd_group_loss(logp, old, torch.full((3,), 0.7), tau=0.2, baseline=baseline)
        assert m["pg_loss"] == 0.0
        assert loss.item() == pytest.approx(0.1 * (0.25 + 0 + 1) / 3)
    # on-policy (logp == old) with equal rewards: zero loss and zero gradient
    loss, _ = opmd_group_loss(logp, logp.detach(), torch.ones(3), tau=0.2)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logp.grad == 0)


def test_logmeanexp_baseline():
    r = torch.tensor([0.0, 1.0, 1.0, 0.0])
    tau = 0.5
    want = tau * math.log(sum(math.exp(x / tau) for x in r.tolist()) / 4)
    assert float(group_baseline(r, tau, "logmeanexp")) == pytest.approx(want)
    assert float(group_baseline(r, 100.0, "logmeanexp")) == pytest.approx(0.5, abs=1e-2)  # -> mean


def test_batch_loss_averages_groups():
    logp = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0], requires_grad=True)
    old, r = logp.detach().clone(), torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    groups = ["a", "a", "b", "b", "b"]
    loss, m = opmd_loss(logp, old, r, groups, tau=1.0)
    la, _ = opmd_group_loss(logp[:2], old[:2], r[:2], 1.0)
    lb, _ = opmd_group_loss(logp[2:], old[2:], r[2:], 1.0)
    assert loss.item() == pytest.approx((la + lb).item() / 2)
    assert m["num_groups"] == 2.0


def test_errors_are_clear():
    with pytest.raises(ValueError, match="empty rollout batch"):
        opmd_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), [], tau=1.0)
    with pytest.raises(ValueError, match="empty rollout group"):
        opmd_group_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), tau=1.0)
    with pytest.raises(ValueError, match="non-finite rewards"):
        opmd_group_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, math.nan]), tau=1.0)
    with pytest.raises(ValueError, match="first token"):
        sequence_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))

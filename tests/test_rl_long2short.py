"""long2short: DPO pairs and loss, shortest rejection sampling, merging, token efficiency."""

import math

import pytest
import torch

from moonforge.stages.rl.dpo import (
    DPOConfig,
    Sample,
    build_dpo_pairs,
    dpo_loss,
    question_pairs,
    shortest_correct,
)
from moonforge.stages.rl.efficiency import accuracy_per_1k_tokens, efficiency_of, pick_best
from moonforge.stages.rl.merge import merge_state_dicts


def S(name, length, correct):
    return Sample(name, length, correct)


RESPONSES = [
    S("c100", 100, True),  # chosen: shortest correct
    S("c120", 120, True),  # correct, < 1.5x  -> kept out
    S("c150", 150, True),  # correct, == 1.5x -> rejected
    S("c400", 400, True),  # correct, long    -> rejected
    S("w80", 80, False),  # wrong but shorter -> not rejected
    S("w100", 100, False),  # wrong, same length -> not rejected (must be longer)
    S("w101", 101, False),  # wrong, longer     -> rejected
    S("w900", 900, False),  # wrong, longer     -> rejected
]


def test_dpo_pairs_exact():
    pairs = question_pairs("q1", RESPONSES, long_factor=1.5)
    assert all(p.chosen.content == "c100" and p.question == "q1" for p in pairs)
    assert [p.rejected.content for p in pairs] == ["c150", "c400", "w101", "w900"]


def test_dpo_pairs_over_questions_and_edge_cases():
    data = {
        "q1": RESPONSES,
        "none_correct": [S("w1", 10, False), S("w2", 20, False)],
        "tie": [S("a", 50, True), S("b", 50, True), S("w", 60, False)],
    }
    pairs = build_dpo_pairs(data, long_factor=2.0)
    by_q = {}
    for p in pairs:
        by_q.setdefault(p.question, []).append((p.chosen.content, p.rejected.content))
    assert "none_correct" not in by_q
    assert by_q["tie"] == [("a", "w")]
    assert by_q["q1"] == [("c100", "c400"), ("c100", "w101"), ("c100", "w900")]
    with pytest.raises(ValueError, match="must be > 1"):
        question_pairs("q", RESPONSES, long_factor=1.0)
    with pytest.raises(ValueError):
        DPOConfig(long_factor=0.9)


def test_shortest_rejection_sampling():
    assert shortest_correct(RESPONSES).content == "c100"
    assert shortest_correct([S("w", 3, False)]) is None
    assert shortest_correct([]) is None


def test_dpo_loss_value_and_gradient():
    logp_w = torch.tensor([-10.0, -20.0], requires_grad=True)
    logp_l = torch.tensor([-12.0, -15.0], requires_grad=True)
    ref_w, ref_l = torch.tensor([-11.0, -19.0]), torch.tensor([-11.0, -16.0])
    beta = 0.1
    loss, m = dpo_loss(logp_w, logp_l, ref_w, ref_l, beta)
    margins = [(-10 + 11) - (-12 + 11), (-20 + 19) - (-15 + 16)]  # 2, -2
    want = -sum(math.log(1 / (1 + math.exp(-beta * x))) for x in margins) / 2
    assert loss.item() == pytest.approx(want)
    assert m["dpo_accuracy"] == 0.5
    loss.backward()
    # dL/dlogp_w = -(beta/2) * sigmoid(-beta * margin)
    want_grad = [-(beta / 2) * torch.sigmoid(torch.tensor(-beta * x)).item() for x in margins]
    assert logp_w.grad.tolist() == pytest.approx(want_grad)
    assert logp_l.grad.tolist() == pytest.approx([-g for g in want_grad])
    # at the reference (zero margin) the loss is log 2
    z = torch.zeros(3)
    assert float(dpo_loss(z, z, z, z, 0.1)[0]) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="empty DPO batch"):
        dpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0), 0.1)


def test_merge_weighted_average_and_buffers():
    a = {
        "w": torch.ones(2, 2),
        "h": torch.full((3,), 2.0, dtype=torch.bfloat16),
        "steps": torch.tensor(5),
        "mask": torch.tensor([True, False]),
    }
    b = {
        "w": torch.zeros(2, 2),
        "h": torch.zeros(3, dtype=torch.bfloat16),
        "steps": torch.tensor(9),
        "mask": torch.tensor([False, False]),
    }
    m = merge_state_dicts(a, b)
    assert torch.equal(m["w"], torch.full((2, 2), 0.5))
    assert m["h"].dtype == torch.bfloat16 and torch.equal(m["h"], torch.ones(3, dtype=torch.bfloat16))
    assert int(m["steps"]) == 5 and m["mask"].tolist() == [True, False]
    m3 = merge_state_dicts(a, b, weight=0.25)
    assert torch.allclose(m3["w"], torch.full((2, 2), 0.25))
    lin1, lin2 = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    merged = merge_state_dicts(lin1.state_dict(), lin2.state_dict())
    assert torch.allclose(merged["weight"], (lin1.weight + lin2.weight).detach() / 2)


def test_merge_mismatches_name_the_key():
    a = {"x": torch.zeros(2), "y": torch.zeros(3)}
    with pytest.raises(ValueError, match="'y' is in the long model but not the short"):
        merge_state_dicts(a, {"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="'z' is in the short model"):
        merge_state_dicts(a, {**a, "z": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'y' has shape \(3,\) vs \(4,\)"):
        merge_state_dicts(a, {"x": torch.zeros(2), "y": torch.zeros(4)})
    with pytest.raises(ValueError, match="weight"):
        merge_state_dicts(a, a, weight=1.5)


def test_token_efficiency_and_pick_best():
    assert accuracy_per_1k_tokens(0.8, 400) == pytest.approx(2.0)
    assert efficiency_of([True, False, True, True], [100, 300, 200, 200]) == pytest.approx(0.75 * 1000 / 200)
    cands = [("long", 0.80, 2000.0), ("mid", 0.78, 800.0), ("short", 0.60, 200.0)]
    assert pick_best(cands, 0.05)[0] == "mid"
    assert pick_best(cands, 0.0)[0] == "long"
    assert pick_best(cands, 0.5)[0] == "short"
    assert pick_best([("a", 0.5, 100.0), ("b", 0.6, 120.0)], 0.2)[0] == "b"  # equal efficiency -> acc
    with pytest.raises(ValueError):
        pick_best([], 0.1)
    with pytest.raises(ValueError, match="mean generated length"):
        accuracy_per_1k_tokens(0.5, 0)

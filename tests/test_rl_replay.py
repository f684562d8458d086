"""Partial rollouts: exact resumption across iterations, loss masking, caps, repeat cuts."""

import pytest
import torch

from moonforge.stages.rl.repeat import RepeatConfig, find_repeat, periodic_tail, repeat_penalty
from moonforge.stages.rl.replay import (
    ReplayBuffer,
    RolloutConfig,
    Trajectory,
    long_tailed_lengths,
    rollout_step,
    training_tensors,
)

EOS_AFTER = {}  # prompt head token -> response length at which the fake emits "stop"


def fake_generate(contexts, max_new_tokens):
    """Deterministic: the next token is a hash of the whole context; stops at a per-prompt length.

    contexts[i][0] is a prompt head token, contexts[i][1] the prompt length.
    """
    outs = []
    for ctx in contexts:
        ctx, new, lps = list(ctx), [], []
        target = EOS_AFTER[ctx[0]]
        while len(new) < max_new_tokens:
            tok = (sum(ctx) * 31 + len(ctx) * 7) % 97 + 3
            ctx.append(tok)
            new.append(tok)
            lps.append(-0.01 * tok)
            if len(ctx) - ctx[1] >= target:
                outs.append((new, lps, "stop"))
                break
        else:
            outs.append((new, lps, "length"))
    return outs


def _prompt(head, target, length=4):
    EOS_AFTER[head] = target
    return [head, length] + [head + 1] * (length - 2)


def test_long_trajectory_resumes_exactly_where_it_stopped():
    prompt = _prompt(200, 25)
    unbroken_ids, unbroken_lps, reason = fake_generate([prompt], 1000)[0]
    assert reason == "stop" and len(unbroken_ids) == 25

    cfg = RolloutConfig(segment_budget=10, repeat=None)
    buf = ReplayBuffer()
    finished = rollout_step([("long", prompt)], buf, fake_generate, iteration=0, cfg=cfg)
    assert finished == [] and len(buf) == 1
    assert rollout_step([], buf, fake_generate, iteration=1, cfg=cfg) == []
    done = rollout_step([], buf, fake_generate, iteration=2, cfg=cfg)
    assert len(done) == 1 and len(buf) == 0
    traj = done[0]
    assert traj.finish_reason == "stop" and traj.start_iteration == 0
    assert [len(s.ids) for s in traj.segments] == [10, 10, 5]
    assert [s.iteration for s in traj.segments] == [0, 1, 2]
    assert traj.ids == unbroken_ids and traj.logprobs == unbroken_lps


def test_short_and_long_mix_and_segment_age_mask():
    cfg = RolloutConfig(segment_budget=10, max_segment_age=1, repeat=None)
    buf = ReplayBuffer()
    got0 = rollout_step([("s", _prompt(300, 4)), ("l", _prompt(310, 25))], buf, fake_generate, 0, cfg)
    assert [t.prompt_id for t in got0] == ["s"] and got0[0].loss_mask() == [True] * 4
    rollout_step([], buf, fake_generate, 1, cfg)
    (long,) = rollout_step([], buf, fake_generate, 2, cfg)
    assert [s.in_loss for s in long.segments] == [False, True, True]  # iteration 0 is 2 old
    ids_BL, mask_BL = training_tensors(got0 + [long], pad_id=0)
    assert ids_BL.shape == (2, 4 + 25)
    assert mask_BL[0].tolist() == [False] * 4 + [True] * 4 + [False] * 21
    assert mask_BL[1].tolist() == [False] * 4 + [False] * 10 + [True] * 15
    assert ids_BL[1, 4:].tolist() == long.ids


def test_max_total_tokens_truncates():
    cfg = RolloutConfig(segment_budget=10, max_total_tokens=15, repeat=None)
    buf = ReplayBuffer()
    assert rollout_step([("p", _prompt(400, 40))], buf, fake_generate, 0, cfg) == []
    (t,) = rollout_step([], buf, fake_generate, 1, cfg)
    assert t.finish_reason == "truncated" and t.num_generated == 15


def test_repeat_is_cut_and_finishes():
    def loop_gen(contexts, n):
        ids = [5] + [1, 2] * ((n - 1) // 2)
        return [(ids, [-0.1] * len(ids), "length") for _ in contexts]

    cfg = RolloutConfig(segment_budget=21, repeat=RepeatConfig(min_repeats=4, min_span=8))
    (t,) = rollout_step([("p", [9, 9])], ReplayBuffer(), loop_gen, 0, cfg)
    assert t.finish_reason == "repeat" and t.ids == [5, 1, 2] and len(t.logprobs) == 3


def test_bad_generator_output_is_an_error():
    with pytest.raises(ValueError, match="budget of 3"):
        rollout_step(
            [("p", [1])],
            ReplayBuffer(),
            lambda c, n: [([1] * 5, [0.0] * 5, "stop")],
            0,
            RolloutConfig(segment_budget=3),
        )
    with pytest.raises(ValueError, match="no progress"):
        rollout_step(
            [("p", [1])],
            ReplayBuffer(),
            lambda c, n: [([], [], "length")],
            0,
            RolloutConfig(segment_budget=3),
        )


def test_truncate_across_segments():
    from moonforge.stages.rl.replay import Segment

    t = Trajectory("p", [0], 0, [Segment([1, 2, 3], [0.1] * 3, 0), Segment([4, 5], [0.2] * 2, 1)])
    t.truncate(4)
    assert t.ids == [1, 2, 3, 4] and [s.iteration for s in t.segments] == [0, 1]


def test_find_repeat():
    cfg = RepeatConfig(max_period=8, min_repeats=3, min_span=0)
    assert find_repeat([7, 8, 1, 2, 3, 1, 2, 3, 1, 2, 3], cfg) == (5, 3)
    assert find_repeat([7, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], cfg) == (4, 3)  # stops mid-copy
    assert find_repeat([1, 2, 3, 4, 5, 6], cfg) is None
    assert find_repeat([4, 0, 0, 0], RepeatConfig(min_repeats=3, min_span=8)) is None  # span too small
    assert periodic_tail([1, 1, 1], 1) == 3
    assert repeat_penalty(1.0, True, RepeatConfig(penalty=0.5)) == 0.5
    assert repeat_penalty(1.0, False, RepeatConfig(penalty=0.5)) == 1.0


def test_long_tailed_lengths():
    xs = long_tailed_lengths(5000, median=200, sigma=1.0, max_len=4000, seed=0)
    assert xs == long_tailed_lengths(5000, median=200, sigma=1.0, max_len=4000, seed=0)
    xs_sorted = sorted(xs)
    assert 170 < xs_sorted[2500] < 230 and max(xs) == 4000 and min(xs) >= 1
    mean = sum(xs) / len(xs)
    assert mean > 1.3 * xs_sorted[2500]  # long tail: mean well above median
    assert torch.tensor(xs).float().quantile(0.99) > 5 * xs_sorted[2500]

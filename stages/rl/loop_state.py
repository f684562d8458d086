"""What an OPMD run carries from one iteration to the next, as JSON: the resumable part of a
periodic RL checkpoint. The weights are the checkpoint's own, and the optimizer is reset every
iteration, so a checkpoint taken at an iteration's end needs no optimizer state.

Carried: the prompt sampler (running success rates, RNG), the replay buffer (unfinished
trajectories, oldest first), finished trajectories whose group still waits for its other
samples, the verifier counts, the rollout sampler's RNG and token count, and the metrics of the
iterations done. `snapshot` and `restore` round-trip them exactly: Python floats survive JSON
bit for bit, RNG states travel as byte lists. No pickle.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, cast

import torch

from moonforge.stages.rl.policy import RolloutSampler
from moonforge.stages.rl.replay import ReplayBuffer, Segment, Trajectory
from moonforge.stages.rl.sampling import PromptSampler
from moonforge.stages.rl.verifiers import VerifyStats

FORMAT = "moonforge-opmd-state/1"


def _traj(t: Trajectory) -> dict[str, Any]:
    return {
        "prompt_id": list(cast(tuple, t.prompt_id)),  # (prompt index, start iteration, sample index)
        "prompt": t.prompt,
        "start_iteration": t.start_iteration,
        "segments": [[s.ids, s.logprobs, s.iteration, s.in_loss] for s in t.segments],
        "finish_reason": t.finish_reason,
    }


def _traj_back(d: dict[str, Any]) -> Trajectory:
    segs = [
        Segment(list(ids), [float(x) for x in lps], int(it), bool(keep))
        for ids, lps, it, keep in d["segments"]
    ]
    return Trajectory(
        tuple(d["prompt_id"]), list(d["prompt"]), int(d["start_iteration"]), segs, d["finish_reason"]
    )


def _rng(g: torch.Generator) -> list[int]:
    return g.get_state().tolist()


def _rng_back(g: torch.Generator, state: list[int]) -> None:
    g.set_state(torch.tensor(state, dtype=torch.uint8))


def snapshot(
    label: str,
    iterations_done: int,
    sampler: PromptSampler,
    buffer: ReplayBuffer,
    pending: MutableMapping[tuple, list[Trajectory]],
    stats: VerifyStats,
    gen: RolloutSampler,
    curves: list[dict[str, float]],
) -> dict[str, Any]:
    """The loop's state after `iterations_done` iterations, as a JSON object."""
    waiting = buffer.drain()
    for t in waiting:
        buffer.push(t)
    return {
        "format": FORMAT,
        "label": label,
        "iterations_done": iterations_done,
        "sampler": {
            "rate": sampler.tracker.rate,
            "count": sampler.tracker.count,
            "rng": _rng(sampler.generator),
        },
        "buffer": [_traj(t) for t in waiting],
        "pending": [[list(g), [_traj(t) for t in ts]] for g, ts in pending.items()],
        "verifier": {"num_calls": stats.num_calls, "num_errors": stats.num_errors, "errors": stats.errors},
        "rollout": {"rng": _rng(gen.generator), "num_tokens": gen.num_tokens},
        "curves": curves,
    }


def restore(
    state: dict[str, Any],
    label: str,
    sampler: PromptSampler,
    buffer: ReplayBuffer,
    pending: MutableMapping[tuple, list[Trajectory]],
    stats: VerifyStats,
    gen: RolloutSampler,
) -> tuple[int, list[dict[str, float]]]:
    """Put a snapshot back into freshly built loop parts; returns (iterations done, curves).
    Raises ValueError for a snapshot of another run or format (a checkpoint of another stage)."""
    if state.get("format") != FORMAT or state.get("label") != label:
        raise ValueError(
            f"{label}: the checkpoint to resume holds no state of this OPMD run (format "
            f"{state.get('format')!r}, label {state.get('label')!r}); remove it to start over"
        )
    s = state["sampler"]
    if len(s["rate"]) != len(sampler.tracker.rate):
        raise ValueError(
            f"{label}: the checkpoint was taken over {len(s['rate'])} prompts, this run has "
            f"{len(sampler.tracker.rate)}; the prompt set changed, so it cannot resume"
        )
    sampler.tracker.rate, sampler.tracker.count = [float(x) for x in s["rate"]], [int(x) for x in s["count"]]
    _rng_back(sampler.generator, s["rng"])
    buffer.drain()
    for d in state["buffer"]:
        buffer.push(_traj_back(d))
    pending.clear()
    for g, ts in state["pending"]:
        pending[tuple(g)] = [_traj_back(d) for d in ts]
    v = state["verifier"]
    stats.num_calls, stats.num_errors, stats.errors = (
        int(v["num_calls"]),
        int(v["num_errors"]),
        list(v["errors"]),
    )
    _rng_back(gen.generator, state["rollout"]["rng"])
    gen.num_tokens = int(state["rollout"]["num_tokens"])
    return int(state["iterations_done"]), [dict(c) for c in state["curves"]]

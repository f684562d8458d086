"""moonforge.stages.rl: the k1.5 RL machinery (stage 8) and long2short tools (stage 9).

Modules, each one concept, pure torch/python and testable without a model:
    verifiers   answer extraction + 0/1 verifiers, a registry by name, error-counting scorer
    rewards     the k1.5 length penalty with its warm-up schedule
    opmd        per-sequence log-probs from logits and the OPMD surrogate loss
    sampling    curriculum (easy -> hard) and prioritized (1 - success rate) prompt sampling
    replay      partial rollouts over an injected generate_fn, with a replay buffer
    repeat      tail-repetition detection (where to cut) and its optional penalty
    dpo         DPO loss, long2short pair construction, shortest rejection sampling
    merge       weight averaging of two state_dicts
    efficiency  accuracy per 1k generated tokens and checkpoint selection
    stage       the stage function `rl` (catalog: moonforge.stages.rl:rl) and its OPMD loop
"""

from __future__ import annotations

from typing import Any

__all__ = ["rl"]


def __getattr__(name: str) -> Any:
    # The stage function on first use only: the dataset builders import the verifiers, and the
    # stage would bring the whole model and trainer with them (seconds of every build's start).
    if name == "rl":
        from moonforge.stages.rl.stage import rl

        return rl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

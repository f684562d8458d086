"""long2short's resume points: after the long model's samples are drawn, and after each method's
candidate is trained and evaluated (a kill loses at most the method it was in).

A point is a periodic checkpoint (save_train_state) whose `extra["long2short"]` holds, as JSON,
the methods done, the candidate table and training numbers so far, the sampled responses (token
ids, length, correct) and which file holds the short model that `merge` mixes with the long one.
Each finished candidate's weights and config ride along as attached files, because a resumed
run starts in a fresh staging directory. Nothing else needs restoring: every method starts from
the long model (the upstream checkpoint) and draws from its own seeded generators.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moonforge.model.config import VLMConfig
from moonforge.stages.artifacts import MODEL_CONFIG_FILE, WEIGHTS_FILE, StageContext
from moonforge.stages.rl.dpo import Sample
from moonforge.stages.train.checkpoint import restore_rng, save_train_state
from moonforge.stages.train.train_record import read_train_record

KEY = "long2short"
SHORT_FILE = "short.safetensors"
Samples = dict[int, list[Sample]]


@dataclass
class Progress:
    """What a long2short run has finished; the same shape whether fresh or resumed."""

    done: list[str]
    table: dict[str, dict[str, float]]
    extra: dict[str, dict[str, float]]
    samples: Samples
    short_state: dict[str, torch.Tensor] | None = None
    """The shortest-RS model merge mixes with the long one: None = not trained yet, {} = none
    (no correct sample to train on)."""


def _cand_file(method: str, name: str) -> str:
    return f"cand-{method}-{name}"


def save_point(
    model: nn.Module, mcfg: VLMConfig, ctx: StageContext, methods: tuple[str, ...], p: Progress
) -> None:
    """Checkpoint `p` (global step = 1 + methods done, of 1 + len(methods)); the writer rank only."""
    if ctx.parallel is not None and not ctx.parallel.is_writer:
        return
    attach = {
        _cand_file(m, f): ctx.out / m / f
        for m in p.done
        for f in (WEIGHTS_FILE, MODEL_CONFIG_FILE)
        if (ctx.out / m / WEIGHTS_FILE).exists()
    }
    state = {
        "methods": list(methods),
        "done": p.done,
        "table": p.table,
        "extra": p.extra,
        "samples": {str(q): [[s.content, s.length, s.correct] for s in ss] for q, ss in p.samples.items()},
        "short": None if p.short_state is None else ("file" if p.short_state else "none"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if p.short_state:
            short = Path(tmp) / SHORT_FILE
            save_file({k: v.detach().to("cpu").contiguous() for k, v in p.short_state.items()}, str(short))
            attach[SHORT_FILE] = short
        save_train_state(
            model,
            mcfg,
            _NoOptimizerState(),
            len(p.done),
            ctx.out,
            global_step=1 + len(p.done),
            num_steps=1 + len(methods),
            extra={KEY: state},
            attach=attach,
        )


def restore(ctx: StageContext, methods: tuple[str, ...]) -> Progress | None:
    """The progress recorded at ctx.resume_from, with its candidates put back under ctx.out and
    the RNG as it was; None without a resume point. A point of another stage kind or of another
    method list is refused (naming the fix) before anything is written."""
    path = ctx.resume_from
    if path is None or not path.exists():
        return None
    state = read_train_record(path).extra.get(KEY)
    if not isinstance(state, Mapping):
        raise ValueError(
            f"resume point {path} was not written by long2short; delete it (or rerun with a "
            "fresh stage name) to start this stage from its first method"
        )
    if tuple(state["methods"]) != tuple(methods):
        raise ValueError(
            f"resume point {path} is of a long2short run with methods {state['methods']}, this one "
            f"has {list(methods)}; delete it to start over"
        )
    for m in state["done"]:
        if (path / _cand_file(m, WEIGHTS_FILE)).exists():
            (ctx.out / m).mkdir(parents=True, exist_ok=True)
            for f in (WEIGHTS_FILE, MODEL_CONFIG_FILE):
                (ctx.out / m / f).write_bytes((path / _cand_file(m, f)).read_bytes())
    short: dict[str, torch.Tensor] | None = None if state["short"] is None else {}
    if state["short"] == "file":
        short = load_file(str(path / SHORT_FILE))
    restore_rng(path)
    samples = {int(q): [Sample(c, n, ok) for c, n, ok in ss] for q, ss in state["samples"].items()}
    return Progress(list(state["done"]), dict(state["table"]), dict(state["extra"]), samples, short)


class _NoOptimizerState:
    """Every method builds its own optimizer and finishes before a point is written: none to keep."""

    def state_dict(self) -> dict:
        return {}

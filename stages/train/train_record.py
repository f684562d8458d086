"""The JSON side of a periodic checkpoint, readable without torch (the CLI's `status` and the
store read it to show and find resumable work).

A periodic checkpoint `train_state/step-<global step>/` is complete when its `train_state.json`
(written last) exists and every file it lists has the recorded size. Nothing here unpickles.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAIN_STATE_FILE = "train_state.json"
"""The JSON record of a periodic checkpoint; its presence (written last) marks it complete."""
TENSORS_FILE = "optimizer.safetensors"
PERIODIC_DIR = "train_state"
FORMAT = "moonforge-train-state/1"

log = logging.getLogger("moonforge.checkpoint")


@dataclass
class TrainRecord:
    """What a periodic checkpoint records besides the weights."""

    step: int
    """Optimizer steps done in this phase."""
    phase: int = 0
    """Index of the phase (an SFT phase, a long_context sub-stage) within the stage."""
    global_step: int = 0
    """step + the steps of the earlier phases (the checkpoint's name and metric axis)."""
    num_steps: int = 0
    """Steps of this phase: step == num_steps means the phase is finished."""
    last: dict[str, float] = field(default_factory=dict)
    """Metrics of the last step taken."""
    phases: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Finished earlier phases: index -> {"steps", "last", "extra"}."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any JSON object a caller saves with the checkpoint, returned as-is (e.g. a data loader's
    state)."""
    optimizer: dict | None = None
    """The optimizer state (read_train_state only)."""

    def describe(self) -> str:
        return f"phase {self.phase} step {self.step}/{self.num_steps} (global step {self.global_step})"


def complete_record(path: Path) -> dict | None:
    """The JSON record of a periodic checkpoint if it is complete (every file there, at the size
    recorded), else None. Never unpickles anything."""
    try:
        record = json.loads((path / TRAIN_STATE_FILE).read_text())
        files = record["files"]
        if record.get("format") != FORMAT or not all(
            (path / name).stat().st_size == size for name, size in files.items()
        ):
            return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def as_record(raw: dict) -> TrainRecord:
    return TrainRecord(
        step=int(raw["step"]),
        phase=int(raw.get("phase", 0)),
        global_step=int(raw.get("global_step", raw["step"])),
        num_steps=int(raw.get("num_steps", 0)),
        last=dict(raw.get("last") or {}),
        phases={int(k): v for k, v in (raw.get("phases") or {}).items()},
        extra=dict(raw.get("extra") or {}),
    )


def is_complete(path: Path) -> bool:
    return complete_record(path) is not None


def latest_train_state(out: Path) -> Path | None:
    """The newest complete periodic checkpoint under `out/train_state/` (torn ones and any
    old-format `train_state.pt` are skipped, never loaded)."""
    return latest_checkpoint(out / PERIODIC_DIR)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete `step-*` checkpoint directly under `root`, or None."""
    steps = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
    for p in steps:
        if is_complete(p):
            return p
        log.warning("skipping incomplete or old-format checkpoint %s (no complete %s)", p, TRAIN_STATE_FILE)
    return None


def read_train_record(path: Path) -> TrainRecord:
    """The JSON part of a periodic checkpoint (phase, step, metrics, extra): no tensors loaded."""
    raw = complete_record(path)
    if raw is None:
        raise FileNotFoundError(
            f"{path} is not a complete periodic checkpoint (no valid "
            f"{TRAIN_STATE_FILE}); it was torn by a crash or is from an older "
            "moonforge; delete it and the stage starts from its first step"
        )
    return as_record(raw)

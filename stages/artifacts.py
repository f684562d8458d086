"""Typed artifacts and the context a stage function receives.

A stage is `fn(base, data, cfg, ctx) -> StageResult`. It reads `base` (upstream checkpoint or None)
and `data` (datasets by name, already resolved to their pinned versions), writes only under
`ctx.out`, reports metrics through `ctx.sink` and progress through `ctx.progress`. Everything else
(fingerprint, store, lineage, MLflow, Prefect) wraps it from registry/ and flows/.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from moonforge.model.config import VLMConfig

WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class DatasetRef:
    """A dataset as a stage sees it: a local directory plus the DVC hash it was built as."""

    name: str
    path: Path
    digest: str
    """DVC md5 of the output (from dvc.lock); recorded in lineage and MLflow dataset inputs."""


@dataclass(frozen=True)
class Checkpoint:
    """A model checkpoint directory: safetensors weights + the model config it was trained with."""

    path: Path

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    def model_config(self) -> VLMConfig:
        return VLMConfig.model_validate_json((self.path / MODEL_CONFIG_FILE).read_text())

    def eval_metrics(self) -> dict[str, float]:
        p = self.path / EVAL_FILE
        return json.loads(p.read_text()) if p.exists() else {}


class MetricSink(Protocol):
    """Buffered metric logger; the registry layer backs it with batched MLflow calls."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def flush(self) -> None: ...


class ListSink:
    """In-memory sink: what tests and the CLI summary use; also the default when nothing tracks."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    def flush(self) -> None:
        pass

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(s, m[name]) for s, m in self.rows if name in m]


ProgressFn = Callable[[int, int, str], None]
"""progress(done, total, description): the CLI renders it as a rich progress bar."""


def _no_progress(done: int, total: int, desc: str) -> None:
    pass


@dataclass
class StageContext:
    """Where a stage writes and how it reports. Built by registry.run_stage, never by a stage."""

    out: Path
    model: VLMConfig
    """The recipe's model shape (used when there is no upstream checkpoint to load it from)."""
    sink: MetricSink = field(default_factory=ListSink)
    progress: ProgressFn = _no_progress
    device: str = "cpu"
    resume_from: Path | None = None
    """A periodic checkpoint of this same stage/version to resume from (after a crash)."""
    init: Mapping[str, Path] = field(default_factory=dict)
    """Part name ("vlm", "vision", "projector", "lm") -> artifact directory whose weights the
    stage loads over its model before training (the recipe's `init:`, resolved by the registry)."""
    parallel: Any = None
    """This process's place in a data-parallel job (stages.train.distributed.Parallel), set only
    in a torchrun/deepspeed-launched child; None = single process."""


@dataclass(frozen=True)
class StageResult:
    """What a stage returns: its checkpoint and the summary metrics of its closing eval."""

    checkpoint: Checkpoint
    metrics: dict[str, float]
    """Closing-eval and summary numbers, e.g. {"eval/retrieval_acc": 0.61, "eval/chance": 0.03}."""
    data_used: tuple[str, ...] = ()
    """Names of the datasets actually read (for lineage / MLflow inputs)."""

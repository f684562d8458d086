"""Checkpoints: safetensors weights + the model config, and resumable train state.

Layout of a checkpoint directory (an artifact's root, or a periodic one under
`train_state/step-<global step>/`):
    model.safetensors      weights (all groups, fp32)
    model_config.json      the VLMConfig they belong to (RoPE base included)
    optimizer.safetensors  optimizer and RNG tensors (periodic checkpoints only)
    train_state.json       the rest, as JSON, written LAST: phase, step, the optimizer state's
                           structure (tensors referenced by name), the metrics of the last step,
                           summaries of finished phases, `extra` (e.g. a data loader's position)
                           and the size of every file, so a torn checkpoint is never read.
No pickle anywhere: a tampered checkpoint in a shared store can hold wrong numbers, never code.
Each file is fsynced and the directory renamed into place, so a kill (or power loss) at any
moment leaves the previous complete checkpoint.

Crash tests need a crash at a known point: with MOONFORGE_CRASH_AFTER_CHECKPOINT=<global step>
the process raises SimulatedCrash right after that checkpoint is complete; with
`<global step>:kill` it SIGKILLs its whole process group there (what a preempted node does), and
with `<global step>:kill-self` only itself (one rank of a launched stage, as the OOM killer
does). Unset, nothing happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moonforge.model.config import VLMConfig
from moonforge.stages.artifacts import MODEL_CONFIG_FILE, WEIGHTS_FILE, Checkpoint
from moonforge.stages.train.train_record import (  # noqa: F401  (re-exported)
    FORMAT,
    PERIODIC_DIR,
    TENSORS_FILE,
    TRAIN_STATE_FILE,
    TrainRecord,
    as_record,
    complete_record,
    is_complete,
    latest_checkpoint,
    latest_train_state,
    read_train_record,
)

CRASH_ENV = "MOONFORGE_CRASH_AFTER_CHECKPOINT"


class SimulatedCrash(RuntimeError):
    """Raised by the MOONFORGE_CRASH_AFTER_CHECKPOINT test hook."""


def _crash_hook(global_step: int, path: Path) -> None:
    spec = os.environ.get(CRASH_ENV, "")
    at, _, how = spec.partition(":")
    if not at or int(at) != global_step:
        return
    if how == "kill":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    if how == "kill-self":
        os.kill(os.getpid(), signal.SIGKILL)
    raise SimulatedCrash(f"{CRASH_ENV}={spec}: crashing right after writing {path}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    _fsync(tmp)
    os.replace(tmp, path)


def save_weights(model: nn.Module, cfg: VLMConfig, out: Path) -> Checkpoint:
    """Write weights + config into `out` (created if needed) and return it as a Checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    _fsync(tmp)
    os.replace(tmp, out / WEIGHTS_FILE)
    _atomic_write_bytes(out / MODEL_CONFIG_FILE, cfg.model_dump_json(indent=2).encode())
    return Checkpoint(out)


def load_weights(model: nn.Module, ckpt: Checkpoint) -> None:
    """Load a checkpoint's weights strictly (every key present, no extras; a checkpoint without
    any caption-tower tensor, i.e. an imported VLM, leaves those towers as built)."""
    if not ckpt.weights.exists():
        raise FileNotFoundError(
            f"checkpoint {ckpt.path} has no {WEIGHTS_FILE}; it is not a complete artifact "
            "(rerun the stage that produced it)"
        )
    state = load_file(str(ckpt.weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if not any(k.startswith("caption.") for k in state):
        # An imported whole VLM (e.g. Kimi-VL) has no stage-1 caption towers: they keep their
        # seeded init, which only vit_pretrain ever trains or reads.
        missing = [k for k in missing if not k.startswith("caption.")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt.path} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; the recipe's model shape differs from the upstream's"
        )


def save_train_state(
    model: nn.Module,
    cfg: VLMConfig,
    optimizer,
    step: int,
    out: Path,
    *,
    phase: int = 0,
    global_step: int | None = None,
    num_steps: int = 0,
    last: dict[str, float] | None = None,
    phases: dict[int, dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    attach: dict[str, Path] | None = None,
) -> Path:
    """Periodic checkpoint `out/train_state/step-<global step>/`; older ones are removed after.

    `extra` (JSON) is stored and returned as-is by read_train_state / read_train_record.
    `attach` {name: file}: files copied into the checkpoint (size-checked like the others), for
    state that grows with the run and is not worth keeping in JSON (RL's rollout log).
    """
    root = out / PERIODIC_DIR
    gstep = step if global_step is None else global_step
    final = root / f"step-{gstep:07d}"
    tmp = root / f".tmp-step-{gstep:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, cfg, tmp)
    tensors: dict[str, torch.Tensor] = {}
    rng = {"cpu": _tensor_ref(torch.get_rng_state(), tensors, "rng.cpu")}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = _tensor_ref(torch.cuda.get_rng_state(), tensors, "rng.cuda")
    record = {
        "format": FORMAT,
        "step": step,
        "phase": phase,
        "global_step": gstep,
        "num_steps": num_steps,
        "last": dict(last or {}),
        "phases": {str(k): v for k, v in sorted((phases or {}).items())},
        "extra": extra or {},
        "rng": rng,
        "optimizer": _encode(optimizer.state_dict(), tensors, "opt"),
    }
    save_file(tensors, str(tmp / TENSORS_FILE))
    _fsync(tmp / TENSORS_FILE)
    for name, src in (attach or {}).items():
        if (tmp / name).exists():
            raise ValueError(f"train state: cannot attach {name!r}, the checkpoint has a file of that name")
        shutil.copyfile(src, tmp / name)
        _fsync(tmp / name)
    record["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    _atomic_write_bytes(tmp / TRAIN_STATE_FILE, json.dumps(record, indent=1).encode())
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(root)
    for old in root.iterdir():
        if old != final and old.name.startswith(("step-", ".tmp-step-")):
            shutil.rmtree(old, ignore_errors=True)
    _crash_hook(gstep, final)
    return final


def _tensor_ref(t: torch.Tensor, tensors: dict[str, torch.Tensor], name: str) -> dict:
    tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    return {"__tensor__": name}


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """A JSON tree of `obj` (an optimizer state dict): tensors go to `tensors` by name, tuples
    and dicts with non-string keys are tagged so they come back as they were."""
    if isinstance(obj, torch.Tensor):
        return _tensor_ref(obj, tensors, path)
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"train state: cannot store a {type(obj).__name__} at {path} as JSON or a "
        "tensor; keep optimizer state to tensors, numbers, strings, lists and dicts"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def load_train_state(model: nn.Module, optimizer, path: Path) -> TrainRecord:
    """Restore weights, optimizer and RNG from a periodic checkpoint; return its record."""
    record = read_train_state(model, path)
    optimizer.load_state_dict(record.optimizer)
    return record


def read_train_state(model: nn.Module, path: Path, restore_rng: bool = True) -> TrainRecord:
    """Restore weights (and the RNG unless restore_rng=False: `restore_rng(record_path)` later);
    return the record with `.optimizer` set, for an optimizer built afterwards.

    The optimizer state is in the single-process MuonAdamW format whatever world size saved it
    (sharded optimizers gather it before saving), so a checkpoint resumes at any world size.
    """
    raw = complete_record(path)
    if raw is None:
        read_train_record(path)  # raises, naming the problem
        raise ValueError(f"{path}: not a complete periodic checkpoint")  # (read_train_record raised)
    load_weights(model, Checkpoint(path))
    tensors = load_file(str(path / TENSORS_FILE))
    record = as_record(raw)
    record.optimizer = _decode(raw["optimizer"], tensors)
    if restore_rng:
        _set_rng(raw, tensors)
    return record


def restore_rng(path: Path) -> None:
    """Set the RNG state a periodic checkpoint recorded."""
    raw = complete_record(path)
    if raw is not None:
        _set_rng(raw, load_file(str(path / TENSORS_FILE)))


def _set_rng(raw: dict, tensors: dict[str, torch.Tensor]) -> None:
    rng = raw.get("rng") or {}
    if "cpu" in rng:
        torch.set_rng_state(_decode(rng["cpu"], tensors))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(rng["cuda"], tensors))

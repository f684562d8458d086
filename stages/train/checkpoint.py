"""Checkpoints: safetensors weights + the model config, and resumable train state.

Layout of a checkpoint directory (an artifact's root, or a periodic one under `train_state/`):
    model.safetensors      weights (all groups, fp32)
    model_config.json      the VLMConfig they belong to (RoPE base included)
    train_state.pt         optimizer state, step, RNG state (periodic checkpoints only)
Writes go to a temp name and are renamed, so a killed process never leaves a torn file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moonforge.model.config import VLMConfig
from moonforge.stages.artifacts import MODEL_CONFIG_FILE, WEIGHTS_FILE, Checkpoint

TRAIN_STATE_FILE = "train_state.pt"
PERIODIC_DIR = "train_state"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_weights(model: nn.Module, cfg: VLMConfig, out: Path) -> Checkpoint:
    """Write weights + config into `out` (created if needed) and return it as a Checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
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


def save_train_state(model: nn.Module, cfg: VLMConfig, optimizer, step: int, out: Path) -> Path:
    """Periodic checkpoint `out/train_state/step-<n>/`; older periodic ones are removed after."""
    root = out / PERIODIC_DIR
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, cfg, tmp)
    torch.save({"optimizer": optimizer.state_dict(), "step": step,
                "rng": torch.get_rng_state()}, tmp / TRAIN_STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_train_state(out: Path) -> Path | None:
    steps = sorted((out / PERIODIC_DIR).glob("step-*"))
    return steps[-1] if steps else None


def load_train_state(model: nn.Module, optimizer, path: Path) -> int:
    """Restore weights, optimizer and RNG from a periodic checkpoint; return the step to resume at."""
    step, opt_state = read_train_state(model, path)
    optimizer.load_state_dict(opt_state)
    return step


def read_train_state(model: nn.Module, path: Path) -> tuple[int, dict]:
    """Restore weights and RNG; return (step, optimizer state) for an optimizer built afterwards.

    The optimizer state is in the single-process MuonAdamW format whatever world size saved it
    (sharded optimizers gather it before saving), so a checkpoint resumes at any world size.
    """
    load_weights(model, Checkpoint(path))
    state = torch.load(path / TRAIN_STATE_FILE, weights_only=False)
    torch.set_rng_state(state["rng"])
    return int(state["step"]), state["optimizer"]

"""Freezing by module group, and digests that prove a frozen group did not move.

Groups are the VLM's top-level children: `vision`, `projector`, `lm`, `caption`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

GROUPS = ("vision", "projector", "lm", "caption")


def apply_trainable(model: nn.Module, trainable: Iterable[str]) -> list[tuple[str, nn.Parameter]]:
    """Set requires_grad per group; return the trainable (name, param) pairs in a stable order."""
    trainable = set(trainable)
    unknown = trainable - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown module groups {sorted(unknown)}; use any of {GROUPS}")
    out = []
    for group in GROUPS:
        module = getattr(model, group)
        for name, p in module.named_parameters(prefix=group):
            p.requires_grad_(group in trainable)
            if group in trainable:
                out.append((name, p))
    return out


def group_digest(model: nn.Module, group: str) -> str:
    """sha256 over a group's parameters and buffers (names, dtypes, raw bytes): bit-identity check."""
    h = hashlib.sha256()
    state = getattr(model, group).state_dict()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

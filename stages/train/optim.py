"""Muon for 2-D weight matrices + AdamW for everything else (Moonlight, Kimi-VL section 2.2).

Muon (stages/train/muon.py: torch.optim.Muon's math with a per-device NS dtype) takes 2-D
params and the stacked 3-D expert weights (each expert's gate, up and down orthogonalised on
their own); embeddings / output heads are not hidden-layer matrices, so they go to AdamW with the
norms, biases, conv/patch weights and the position grid.
Muon uses `adjust_lr_fn="match_rms_adamw"` (lr * 0.2 * sqrt(max(A, B))) so both optimizers share
one peak LR and weight decay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moonforge.model.experts import EXPERT_PARAMS
from moonforge.stages.config import OptimizerConfig
from moonforge.stages.train.muon import Muon

# Parameters whose names contain these are embeddings / output heads: AdamW even when 2-D.
_ADAMW_NAME_HINTS = ("embed", "lm_head", "head.weight", "pos_emb", "logit_")


def matrix_shape(name: str, p: nn.Parameter) -> tuple[int, int, int] | None:
    """The (N, A, B) independent matrices a stacked expert parameter holds, else None.

    gate_up [E, 2F, D] -> (2E, F, D): gate and up are separate matrices, as when each expert
    was three nn.Linear; down [E, D, F] -> itself.
    """
    if p.ndim != 3 or not name.endswith(EXPERT_PARAMS):
        return None
    E, X, D = p.shape
    return (2 * E, X // 2, D) if name.endswith("gate_up") else (E, X, D)


def is_muon_param(name: str, p: nn.Parameter) -> bool:
    if any(h in name for h in _ADAMW_NAME_HINTS):
        return False
    return p.ndim == 2 or matrix_shape(name, p) is not None


class MuonAdamW:
    """Two optimizers stepped together; `set_lr(lr)` sets the (unadjusted) LR of every group."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], cfg: OptimizerConfig) -> None:
        muon = [p for n, p in named_params if cfg.use_muon and is_muon_param(n, p)]
        stacked: dict[torch.Tensor, tuple[int, int, int]] = {
            p: shape for n, p in named_params if (shape := matrix_shape(n, p))
        }
        muon_ids = {id(p) for p in muon}
        adamw = [p for _, p in named_params if id(p) not in muon_ids]
        self.optimizers: list[torch.optim.Optimizer] = []
        if muon:
            ns_dtype = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
            self.optimizers.append(
                Muon(
                    muon,
                    lr=cfg.lr,
                    weight_decay=cfg.weight_decay,
                    momentum=cfg.muon.momentum,
                    nesterov=True,
                    ns_steps=cfg.muon.ns_steps,
                    adjust_lr_fn=cfg.muon.adjust_lr_fn,
                    ns_dtype=ns_dtype[cfg.muon.ns_dtype],
                    matrix_shapes=stacked,
                )
            )
        if adamw:
            self.optimizers.append(
                torch.optim.AdamW(
                    adamw, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.adamw.betas, eps=cfg.adamw.eps
                )
            )
        self.num_muon = sum(p.numel() for p in muon)
        self.num_adamw = sum(p.numel() for p in adamw)

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)

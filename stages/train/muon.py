"""Muon with the Newton-Schulz dtype as a knob: torch.optim.Muon's math, runnable fast on CPU.

torch.optim.Muon (2.9+) always orthogonalises in bfloat16. That is right on GPUs and ~50x slow on
CPUs without bf16 matmul units: on the tiny recipe the optimizer step took 0.97 s of a 1.2 s train
step. This class is the same update (EMA momentum, Nesterov lerp, quintic NS with the same
coefficients, decoupled weight decay with the unadjusted lr, Moonlight's match_rms_adamw scaling;
see training-methods.md section 1) with `ns_dtype` chosen per device. With ns_dtype=bfloat16 it
reproduces torch.optim.Muon bit for bit (tests/test_train_muon.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)


def newton_schulz(grad_AB: Tensor, steps: int, eps: float, dtype: torch.dtype,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS) -> Tensor:
    """Approximate U V^T of grad = U S V^T with the quintic iteration (Keller Jordan's Muon)."""
    a, b, c = coefficients
    x = grad_AB.to(dtype)
    tall = grad_AB.size(0) > grad_AB.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, shape: torch.Size, adjust_lr_fn: str) -> float:
    """match_rms_adamw: lr * 0.2 * sqrt(max(A, B)); original: lr * sqrt(max(1, A / B))."""
    A, B = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(A, B))
    return lr * math.sqrt(max(1.0, A / B))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters; `ns_dtype=None` picks bf16 on CUDA and fp32 elsewhere."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7,
                 adjust_lr_fn: str = "match_rms_adamw", ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, eps=eps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes only 2-D parameters, got shape {tuple(p.shape)}; "
                                     "route it to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            lr, mu = g["lr"], g["momentum"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if g["nesterov"] else buf
                dtype = g["ns_dtype"] or (torch.bfloat16 if p.is_cuda else torch.float32)
                update = newton_schulz(update, g["ns_steps"], g["eps"], dtype)
                p.mul_(1 - lr * g["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-adjusted_lr(lr, p.shape, g["adjust_lr_fn"]))
        return loss

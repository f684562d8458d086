"""Muon with the Newton-Schulz dtype as a knob: torch.optim.Muon's math, runnable fast on CPU.

torch.optim.Muon (2.9+) always orthogonalises in bfloat16. That is right on GPUs and ~50x slow on
CPUs without bf16 matmul units: on the tiny recipe the optimizer step took 0.97 s of a 1.2 s train
step. This class is the same update (EMA momentum, Nesterov lerp, quintic NS with the same
coefficients, decoupled weight decay with the unadjusted lr, Moonlight's match_rms_adamw scaling;
see training-methods.md section 1) with `ns_dtype` chosen per device. With ns_dtype=bfloat16 it
reproduces torch.optim.Muon bit for bit (tests/test_train_muon.py).

Stacked expert weights (model/experts.py: `gate_up` [E, 2F, D], `down` [E, D, F]) are 3-D
parameters holding independent matrices. Each is orthogonalised on its own, all at once
(`newton_schulz` batched over the leading dim): `matrix_shapes` says how a 3-D parameter splits,
e.g. gate_up as (2E, F, D) so gate and up stay separate matrices, exactly as when every expert
was three nn.Linear weights. The lr adjustment uses one matrix's (A, B).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)


def newton_schulz(
    grad_AB: Tensor,
    steps: int,
    eps: float,
    dtype: torch.dtype,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
) -> Tensor:
    """Approximate U V^T of grad = U S V^T with the quintic iteration (Keller Jordan's Muon).

    grad: one (A, B) matrix, or a batch (N, A, B) of independent matrices, each normalised and
    iterated on its own (the batched form of the 2-D one, step for step).
    """
    if grad_AB.dim() == 3:
        return _newton_schulz_batched(grad_AB, steps, eps, dtype, coefficients)
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


def _newton_schulz_batched(
    grad_NAB: Tensor, steps: int, eps: float, dtype: torch.dtype, coefficients: tuple[float, float, float]
) -> Tensor:
    a, b, c = coefficients
    x = grad_NAB.to(dtype)
    tall = grad_NAB.size(1) > grad_NAB.size(2)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, shape: torch.Size, adjust_lr_fn: str) -> float:
    """match_rms_adamw: lr * 0.2 * sqrt(max(A, B)); original: lr * sqrt(max(1, A / B)).

    shape: one matrix's (A, B), or a batch's (N, A, B) (the matrices' own A, B count)."""
    A, B = shape[-2:]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(A, B))
    return lr * math.sqrt(max(1.0, A / B))


def check_matrix_shape(shape: tuple[int, ...], matrices: tuple[int, int, int] | None) -> None:
    """Raise ValueError unless `shape` is 2-D, or 3-D with `matrices` (N, A, B) covering it."""
    if len(shape) == 2 and matrices is None:
        return
    if len(shape) == 3 and matrices is not None and math.prod(matrices) == math.prod(shape):
        return
    raise ValueError(
        f"Muon takes only 2-D parameters (or 3-D stacks of independent matrices "
        f"with their (N, A, B) in matrix_shapes), got shape {tuple(shape)}; route it "
        "to AdamW"
    )


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters and stacks of matrices; `ns_dtype=None` picks bf16 on CUDA and
    fp32 elsewhere. `matrix_shapes` maps a 3-D parameter to the (N, A, B) matrices it holds."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr_fn: str = "match_rms_adamw",
        ns_dtype: torch.dtype | None = None,
        matrix_shapes: dict[Tensor, tuple[int, int, int]] | None = None,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)
        self.matrix_shapes = dict(matrix_shapes or {})
        for group in self.param_groups:
            for p in group["params"]:
                check_matrix_shape(tuple(p.shape), self.matrix_shapes.get(p))

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
                shape = self.matrix_shapes.get(p, p.shape)
                update = newton_schulz(update.view(shape), g["ns_steps"], g["eps"], dtype)
                p.mul_(1 - lr * g["weight_decay"])
                p.add_(update.reshape(p.shape).to(p.dtype), alpha=-adjusted_lr(lr, shape, g["adjust_lr_fn"]))
        return loss

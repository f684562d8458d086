"""Muon + AdamW as one client optimizer for DeepSpeed ZeRO-1/2 (Moonlight's Distributed Muon).

ZeRO-1/2 flatten each param group and hand the optimizer only this rank's 1-D slice of it (with
its gradient slice, already averaged over ranks). AdamW is elementwise, so it runs on the slice
as is. Muon needs the whole matrix, so every Muon matrix gets a param group of its own (its flat
buffer is then the matrix itself plus alignment padding) and a step does:

    momentum (local slice) -> Nesterov update U (local slice)
    -> all-gather U into the full matrix -> Newton-Schulz on it -> keep this rank's slice
    -> decoupled weight decay + the match_rms_adamw-scaled update on the local parameter slice

i.e. "gather the full matrix, Newton-Schulz, keep the local shard" (training-methods.md section
1). Optimizer state stays sharded (ZeRO-1). Without a ZeRO wrapper (full 2-D params) it is
exactly MuonAdamW's math, which is what tests/test_distributed.py compares against.

Who runs which Newton-Schulz: a stacked 3-D expert parameter holds independent matrices, and a
rank orthogonalises only those its slice overlaps (about E / R of them, tests/test_zero_muon.py),
so the experts' NS, most of an MoE's, is spread over the ranks with no exchange after it. A 2-D
matrix is sharded over all ranks, so every rank runs its NS. With shared flat buffers (Moonlight)
only the one or two ranks holding part of a matrix would; spreading 2-D matrices so needs the NS
before DeepSpeed's per-group loop, which copies each group's fp32 partition right after that
group's step. One group per parameter costs one small flatten per parameter; the gradient
reduction is still bucketed by DeepSpeed.

Checkpoints: `full_state_dict()` gathers the shards into the single-process MuonAdamW format and
`load_full_state_dict()` slices it again, so train state moves freely between world sizes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moonforge.stages.config import OptimizerConfig
from moonforge.stages.train.muon import adjusted_lr, newton_schulz
from moonforge.stages.train.optim import MuonAdamW, is_muon_param, matrix_shape

_NS_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ZeroMuonAdamW(torch.optim.Optimizer):
    """One param group per parameter: kind "muon" (2-D hidden matrices) or "adamw" (the rest)."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], cfg: OptimizerConfig) -> None:
        # The single-process optimizer's layout: which (optimizer, index) each parameter is there.
        reference = MuonAdamW(named_params, cfg)
        self._template = reference.state_dict()
        index = {
            id(p): (i, j)
            for i, opt in enumerate(reference.optimizers)
            for j, p in enumerate(opt.param_groups[0]["params"])
        }
        groups = [
            {
                "params": [p],
                "name": n,
                "shape": tuple(p.shape),
                "numel": p.numel(),
                "matrices": matrix_shape(n, p) or tuple(p.shape),
                "kind": "muon" if cfg.use_muon and is_muon_param(n, p) else "adamw",
                "ref": index[id(p)],
            }
            for n, p in named_params
        ]
        defaults = dict(
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon.momentum,
            ns_steps=cfg.muon.ns_steps,
            ns_eps=1e-7,
            adjust_lr_fn=cfg.muon.adjust_lr_fn,
            ns_dtype=_NS_DTYPES[cfg.muon.ns_dtype],
            betas=cfg.adamw.betas,
            eps=cfg.adamw.eps,
        )
        super().__init__(groups, defaults)

    # DeepSpeed swaps `param_groups` to one group at a time and calls step() per group.
    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            p = g["params"][0]
            if p.grad is None:
                continue
            if g["kind"] == "muon":
                self._muon(p, g)
            else:
                self._adamw(p, g)

    def _muon(self, p: Tensor, g: dict) -> None:
        lr, mu = g["lr"], g["momentum"]
        buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        grad = p.grad
        assert grad is not None  # step() skips parameters without a gradient
        buf.lerp_(grad, 1 - mu)
        update = grad.lerp(buf, mu)
        full = self._gather(update, g).view(g["matrices"])  # stacked experts: (N, A, B)
        ortho = self._orthogonalised_slice(full, p, g)
        p.mul_(1 - lr * g["weight_decay"])
        p.add_(ortho, alpha=-adjusted_lr(lr, torch.Size(g["matrices"]), g["adjust_lr_fn"]))

    def _orthogonalised_slice(self, full: Tensor, p: Tensor, g: dict) -> Tensor:
        """This rank's slice of Newton-Schulz(full), orthogonalising only the matrices it touches.

        A stacked expert tensor holds N independent matrices, so the slice needs only the ones
        that overlap it: with E experts over R ranks that is about E / R of them per rank (one
        more where a slice boundary splits a matrix), and no exchange afterwards. A 2-D matrix
        is one matrix every rank's slice touches, so every rank runs its whole NS.
        """
        dtype = g["ns_dtype"] or (torch.bfloat16 if p.is_cuda else torch.float32)
        lo, hi = self._bounds(p, g)
        out = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        if hi <= lo:  # the tail rank of a tensor smaller than its padding: nothing of it here
            return out
        size = full.shape[-2] * full.shape[-1]  # one matrix
        first, last = lo // size, -(-hi // size)  # the matrices [first, last) overlap [lo, hi)
        mine = full[first:last] if full.dim() == 3 else full
        ortho = newton_schulz(mine, g["ns_steps"], g["ns_eps"], dtype)
        start = lo - first * size
        out[: hi - lo] = ortho.to(p.dtype).reshape(-1)[start : start + hi - lo]
        return out.view(p.shape)

    def _bounds(self, p: Tensor, g: dict) -> tuple[int, int]:
        """The flat [lo, hi) of the whole tensor that this rank's slice holds (ZeRO's partition)."""
        if not self._sharded(p, g):
            return 0, g["numel"]
        rank, _ = _world()
        n = p.numel()
        return rank * n, min((rank + 1) * n, g["numel"])

    def _adamw(self, p: Tensor, g: dict) -> None:
        """torch.optim.AdamW's single-tensor update (no amsgrad), elementwise on the slice."""
        (b1, b2), lr = g["betas"], g["lr"]
        st = self.state[p]
        if not st:
            st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        st["step"] += 1
        t = st["step"].item()
        p.mul_(1 - lr * g["weight_decay"])
        st["exp_avg"].lerp_(p.grad, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(g["eps"])
        p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1**t))

    @staticmethod
    def _sharded(p: Tensor, g: dict) -> bool:
        return tuple(p.shape) != g["shape"]

    def _gather(self, local: Tensor, g: dict) -> Tensor:
        """The full flattened tensor of a group from every rank's slice (slices are equal-sized)."""
        if not self._sharded(local, g):
            return local.reshape(-1)
        _, world = _world()
        out = torch.empty(local.numel() * world, dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(out, local.contiguous())
        return out[: g["numel"]]

    def _local(self, full: Tensor, p: Tensor, g: dict) -> Tensor:
        """This rank's slice of a full tensor, zero-padded like ZeRO's flat partitions."""
        if not self._sharded(p, g):
            return full
        lo, hi = self._bounds(p, g)
        out = torch.zeros(p.numel(), dtype=full.dtype, device=full.device)
        if hi > lo:
            out[: hi - lo] = full.reshape(-1)[lo:hi]
        return out

    # -- world-size-free checkpoints ------------------------------------------------------------
    def full_state_dict(self) -> dict[str, Any]:
        """The single-process MuonAdamW.state_dict() (collective: every rank must call it)."""
        sd = {
            "optimizers": [
                {"state": {}, "param_groups": [dict(pg) for pg in o["param_groups"]]}
                for o in self._template["optimizers"]
            ]
        }
        for g in self.param_groups:
            p = g["params"][0]
            i, j = g["ref"]
            st = self.state.get(p, {})
            if not st:  # every rank steps every group, so this is the same on all ranks
                continue
            full = {}
            for k, v in st.items():
                full[k] = v.clone() if k == "step" else self._gather(v, g).view(g["shape"]).clone()
            sd["optimizers"][i]["state"][j] = full
        return sd

    def load_full_state_dict(self, sd: dict[str, Any]) -> None:
        """Load a single-process MuonAdamW state dict, keeping this rank's slices."""
        for g in self.param_groups:
            p = g["params"][0]
            i, j = g["ref"]
            st = sd["optimizers"][i]["state"].get(j)
            if st is None:
                continue
            self.state[p] = {
                k: (v.clone() if k == "step" else self._local(v.to(p), p, g).clone()) for k, v in st.items()
            }

"""The worker of tests/test_zero_muon.py: ZeroMuonAdamW on 2 gloo ranks holding ZeRO-style slices.

Each rank builds the same parameters and gradients, keeps its slice of each tensor's flat buffer
(padded to a multiple of the world size, as DeepSpeed ZeRO-1/2 partitions a param group) and
steps the client optimizer on it, as DeepSpeed does. It records the matrices each Newton-Schulz
call got and saves its slices, its gathered optimizer state, and whether a fresh optimizer
loading that state holds the same slices.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moonforge.stages.config import OptimizerConfig
from moonforge.stages.train import zero_muon

E, F, D = 3, 6, 5
"""3 experts over 2 ranks: the ranks' slices of `down` split expert 1 between them."""
STEPS = 2
CFG = OptimizerConfig(lr=1e-2)


def named_params() -> list[tuple[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "lm.layers.1.mlp.experts.gate_up": (E, 2 * F, D),
        "lm.layers.1.mlp.experts.down": (E, D, F),
        "lm.layers.0.mlp.up.weight": (F, D),
        "lm.norm.weight": (D,),
    }
    return [(n, nn.Parameter(torch.randn(s, generator=g))) for n, s in shapes.items()]


def grads(step: int, named: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for _, p in named]


def _slice(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = -(-full.numel() // world)
    flat = torch.zeros(n * world, dtype=full.dtype)
    flat[: full.numel()] = full.reshape(-1)
    return flat[rank * n : (rank + 1) * n].clone()


def worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    calls: list[list[int]] = []
    real = zero_muon.newton_schulz

    def recording(x, *args, **kwargs):
        calls.append(list(x.shape))
        return real(x, *args, **kwargs)

    zero_muon.newton_schulz = recording
    try:
        named = named_params()
        opt = zero_muon.ZeroMuonAdamW(named, CFG)
        shards = [nn.Parameter(_slice(p.detach(), rank, world)) for _, p in named]
        for group, shard in zip(opt.param_groups, shards, strict=True):
            group["params"] = [shard]  # what DeepSpeed hands a client optimizer
        for step in range(STEPS):
            for shard, grad in zip(shards, grads(step, named), strict=True):
                shard.grad = _slice(grad, rank, world)
            opt.step()
        result = {n: s.detach() for (n, _), s in zip(named, shards, strict=True)}
        # the world-size-free checkpoint: gathered whole, then sliced again by a fresh optimizer
        full = opt.full_state_dict()
        fresh = zero_muon.ZeroMuonAdamW(named, CFG)
        for group, shard in zip(fresh.param_groups, shards, strict=True):
            group["params"] = [shard]
        fresh.load_full_state_dict(full)
        reloaded = all(torch.equal(fresh.state[s][k], v) for s in shards for k, v in opt.state[s].items())
        state = {
            f"{i}.{j}.{k}": v
            for i, o in enumerate(full["optimizers"])
            for j, st in o["state"].items()
            for k, v in st.items()
        }
        torch.save(
            {"slices": result, "ns_calls": calls, "full_state": state, "reloaded": reloaded},
            f"{out}/rank{rank}.pt",
        )
    finally:
        zero_muon.newton_schulz = real
        dist.destroy_process_group()

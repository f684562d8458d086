"""Routed experts stored the way they run fastest: two stacked 3-D parameters, one grouped GEMM
each.

    gate_up [E, 2F, D]   expert e's gate rows [0, F) then its up rows [F, 2F) (transformers 5's
                         fused layout, so a fused HF checkpoint copies in as is)
    down    [E, D, F]
    expert_e(x) = down[e] @ (silu(gate[e] @ x) * up[e] @ x)

The MoE sorts its token-expert assignments by expert once, then `GroupedExperts.forward` runs all
experts at once on the sorted rows, in one of two ways:
- `grouped_mm`: torch's grouped GEMM (`F.grouped_mm`, else `torch._grouped_mm`) with the group
  ends `offs` = cumsum(counts) computed on the device: no host sync. The CUDA path (bf16 under
  autocast; the CUDA kernels take bf16 only), and the CPU path where torch has a CPU kernel
  (2.10+, fp32): in the LM benchmark's train step (benchmarks/bench_lm_vs_hf.py) it was 1.2x
  faster than `padded` in CPU seconds at 1 thread and faster in wall time at 2 threads.
- `padded`: rows scattered into an (E, C, D) batch padded to the busiest expert's count C, one
  `bmm` per projection; reading C is a host sync. The fallback where grouped GEMM cannot run
  (older torch, odd row strides, fp32 on CUDA without autocast).
`impl="auto"` takes grouped_mm wherever it runs; `"grouped_mm"` requires it (RuntimeError where it
is unavailable: a recipe that must not silently run slower); an unavailable grouped GEMM under
"auto" on CUDA warns once and runs `padded`.

What is unusual:
- Construction draws the same random numbers, in the same order, as E x 3 `nn.Linear`s did (the
  previous per-expert layout), and `reset_parameters` fills the same slices in the same order, so
  a seeded model initialises bit-identically to the old layout.
- `experts[e]` is an `ExpertView`: expert e as a SwiGLU over views into the stacked weights
  (gradients flow into them). Parameter counting and the per-expert reference in the parity test
  read it; no forward uses it.
- Old checkpoints hold per-expert keys `experts.{e}.{gate,up,down}_proj.weight`. Loading merges
  them into the stacked keys (`_load_from_state_dict`), bit for bit; `split_expert_state` is the
  inverse that the HF adapters use on export.

Legend: T tokens, A assignments sorted by expert (T * K), D hidden, F expert width, E experts,
C rows per expert in the padded batch.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ExpertsImpl = Literal["auto", "grouped_mm", "padded"]
EXPERT_PARAMS = ("experts.gate_up", "experts.down")
"""Name suffixes of the stacked expert parameters (Muon treats their leading dim as a batch)."""

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_PER_EXPERT = re.compile(r"(?P<prefix>.*?)(?P<e>\d+)\.(?P<kind>gate|up|down)_proj\.weight")
_warned: set[str] = set()


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True when torch's grouped GEMM runs on `device` for `dtype` (CUDA: bf16 on SM >= 8.0)."""
    if _GROUPED_MM is None:
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def _expects_grouped_mm(x: Tensor) -> bool:
    """Devices where grouped GEMM is the planned path (its absence costs speed: warn)."""
    return x.is_cuda


def _aligned(*tensors: Tensor) -> bool:
    """grouped GEMM kernels need every row stride a multiple of 16 bytes."""
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


class ExpertView:
    """Expert e of a `GroupedExperts` as a SwiGLU: views into the stacked weights, no copy."""

    def __init__(self, gate_up_XD: Tensor, down_DF: Tensor) -> None:
        F_ = down_DF.shape[1]
        self.gate_proj_weight, self.up_proj_weight = gate_up_XD[:F_], gate_up_XD[F_:]
        self.down_proj_weight = down_DF

    def parameters(self) -> Iterator[Tensor]:
        """gate, up and down weights (as `nn.Module.parameters` would list a SwiGLU's)."""
        return iter((self.gate_proj_weight, self.up_proj_weight, self.down_proj_weight))

    def __call__(self, x_ND: Tensor) -> Tensor:
        h_NF = F.silu(F.linear(x_ND, self.gate_proj_weight)) * F.linear(x_ND, self.up_proj_weight)
        return F.linear(h_NF, self.down_proj_weight)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as two 3-D parameters. forward(x_AD sorted by expert, counts_E) -> y_AD."""

    def __init__(self, num_experts: int, dim: int, hidden: int, impl: ExpertsImpl = "auto") -> None:
        super().__init__()
        if impl not in ("auto", "grouped_mm", "padded"):
            raise ValueError(f"unknown experts impl {impl!r}; use 'auto', 'grouped_mm' or 'padded'")
        self.num_experts, self.impl = num_experts, impl
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self._init_like_linear()

    @torch.no_grad()
    def _init_like_linear(self) -> None:
        """nn.Linear's default init per expert matrix, in the old per-expert module order."""
        F_ = self.down.shape[2]
        for e in range(self.num_experts):
            for w in (self.gate_up[e, :F_], self.gate_up[e, F_:], self.down[e]):
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal(0, std) gate / up and Normal(0, out_std) down, drawn per expert in the order
        the per-expert layout drew them."""
        F_ = self.down.shape[2]
        for e in range(self.num_experts):
            nn.init.normal_(self.gate_up[e, :F_], std=std)
            nn.init.normal_(self.gate_up[e, F_:], std=std)
            nn.init.normal_(self.down[e], std=out_std)

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, e: int) -> ExpertView:
        return ExpertView(self.gate_up[e], self.down[e])

    def params_per_expert(self) -> int:
        return self.gate_up[0].numel() + self.down[0].numel()

    def forward(self, x_AD: Tensor, counts_E: Tensor) -> Tensor:
        """Rows of x_AD sorted by expert (counts_E[e] rows for expert e, on the device) -> y_AD."""
        gate_up: Tensor = self.gate_up
        down: Tensor = self.down
        if x_AD.is_cuda and torch.is_autocast_enabled("cuda"):  # what autocast does to a Linear
            dtype = torch.get_autocast_dtype("cuda")
            x_AD, gate_up, down = x_AD.to(dtype), gate_up.to(dtype), down.to(dtype)
        if self._use_grouped_mm(x_AD, gate_up, down):
            return self._grouped_mm(x_AD, counts_E, gate_up, down)
        return self._padded(x_AD, counts_E, gate_up, down)

    def _use_grouped_mm(self, x_AD: Tensor, gate_up: Tensor, down: Tensor) -> bool:
        ok = grouped_mm_available(x_AD.device, x_AD.dtype) and _aligned(x_AD, gate_up, down)
        if self.impl == "grouped_mm":
            if not ok:
                raise RuntimeError(
                    f"experts impl 'grouped_mm' is required but torch's grouped GEMM cannot run "
                    f"{x_AD.dtype} on {x_AD.device} (needs torch >= 2.8 with F.grouped_mm / "
                    "torch._grouped_mm, bf16 on CUDA SM >= 8.0, row strides of 16 bytes); use "
                    "impl 'auto' to fall back to the padded bmm path"
                )
            return True
        if self.impl == "padded" or not ok:
            where = x_AD.device.type
            if self.impl == "auto" and _expects_grouped_mm(x_AD) and where not in _warned:
                _warned.add(where)
                warnings.warn(
                    f"grouped GEMM unavailable for {x_AD.dtype} on {x_AD.device}; MoE "
                    "experts run as padded bmm (a host sync per layer)",
                    stacklevel=3,
                )
            return False
        return True

    @staticmethod
    def _grouped_mm(x_AD: Tensor, counts_E: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
        assert _GROUPED_MM is not None  # _use_grouped_mm checked grouped_mm_available
        offs_E = counts_E.cumsum(0).to(torch.int32)
        h_AX = _GROUPED_MM(x_AD, gate_up.transpose(-2, -1), offs=offs_E)
        gate_AF, up_AF = h_AX.chunk(2, dim=-1)
        return _GROUPED_MM(F.silu(gate_AF) * up_AF, down.transpose(-2, -1), offs=offs_E)

    @staticmethod
    def _padded(x_AD: Tensor, counts_E: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
        A, D = x_AD.shape
        E = counts_E.shape[0]
        C = int(counts_E.max()) if A else 0
        expert_A = torch.repeat_interleave(torch.arange(E, device=x_AD.device), counts_E, output_size=A)
        starts_E = counts_E.cumsum(0) - counts_E
        slot_A = torch.arange(A, device=x_AD.device) - starts_E[expert_A]
        x_ECD = x_AD.new_zeros(E, C, D).index_put((expert_A, slot_A), x_AD)
        gate_ECF, up_ECF = torch.bmm(x_ECD, gate_up.transpose(1, 2)).chunk(2, dim=-1)
        y_ECD = torch.bmm(F.silu(gate_ECF) * up_ECF, down.transpose(1, 2))
        return y_ECD[expert_A, slot_A]

    def _load_from_state_dict(
        self, state_dict: MutableMapping[str, Tensor], prefix: str, *args, **kwargs
    ) -> None:
        merge_expert_keys(state_dict, prefix, self.num_experts)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def merge_expert_keys(state: MutableMapping[str, Tensor], prefix: str, num_experts: int) -> None:
    """In place: per-expert `{prefix}{e}.{gate,up,down}_proj.weight` for all e -> the stacked
    `{prefix}gate_up` [E, 2F, D] and `{prefix}down` [E, D, F] (values copied bit for bit).

    Does nothing when the stacked keys are there or any per-expert key is missing (the caller's
    strict load then names what is missing or unexpected).
    """
    names = [[f"{prefix}{e}.{k}_proj.weight" for k in ("gate", "up", "down")] for e in range(num_experts)]
    if prefix + "gate_up" in state or not all(n in state for row in names for n in row):
        return
    state[prefix + "gate_up"] = torch.stack([torch.cat([state[g], state[u]]) for g, u, _ in names])
    state[prefix + "down"] = torch.stack([state[d] for _, _, d in names])
    for row in names:
        for n in row:
            del state[n]


def merge_all_expert_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A copy of `state` with every per-expert key set (any prefix ending in `experts.`) merged
    into stacked tensors, as `merge_expert_keys` does per layer; other keys are kept as is."""
    out = dict(state)
    counts: dict[str, int] = {}
    for key in state:
        m = _PER_EXPERT.fullmatch(key)
        if m and m["prefix"].endswith("experts."):
            counts[m["prefix"]] = max(counts.get(m["prefix"], 0), int(m["e"]) + 1)
    for prefix, num_experts in counts.items():
        merge_expert_keys(out, prefix, num_experts)
    return out


def split_expert_state(gate_up_EXD: Tensor, down_EDF: Tensor) -> Iterator[tuple[int, str, Tensor]]:
    """(expert, "gate" | "up" | "down", weight) for every expert, each a fresh contiguous copy
    (safetensors refuses tensors that share storage)."""
    F_ = down_EDF.shape[2]
    for e in range(gate_up_EXD.shape[0]):
        yield e, "gate", gate_up_EXD[e, :F_].clone()
        yield e, "up", gate_up_EXD[e, F_:].clone()
        yield e, "down", down_EDF[e].clone()

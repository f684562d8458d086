"""SwiGLU feed-forwards: a dense FFN and a DeepSeek-V3 / Moonlight mixture of experts.

Router (DeepSeek-V3 `noaux_tc`):
    s = sigmoid(x @ W_g^T); idx = topk(s + b, k); w = s[idx] / sum(s[idx]) * routed_scaling_factor
    y = sum_k w_k * Expert_{idx_k}(x) + Shared(x)
With `norm_topk_prob` False, w = s[idx] * routed_scaling_factor (no renormalisation). With G > 1
expert groups (DeepSeek-V3 `n_group`), each group is scored by the sum of its two best biased
scores and the top-k runs only over the experts of the best `topk_groups` groups (all groups
when topk_groups >= G, as with G = 1).

What is unusual:
- The per-expert bias b (`e_score_correction_bias`, a persistent buffer: it is model state and is
  checkpointed) only changes WHICH experts are picked; the mixing weights use the unbiased s.
- No auxiliary loss. While training, every forward adds the tokens each expert received to a
  non-persistent `load_counts` buffer; `update_bias(u)` applies Moonlight's rule
  b_i += u * (sign(e_i) - mean_j sign(e_j)), e_i = mean load - load_i, then clears the counts.
- Routed experts are stacked 3-D parameters run as grouped GEMMs (experts.py); the assignments
  are sorted by expert once per layer, on the device. Muon orthogonalises each expert's matrices
  on their own (stages/train/muon.py). The HF adapters translate to per-expert names at the border.
- Activation recomputation re-runs a forward that already counted its loads: `paused_counting`
  turns the counting off around it (stages/train/activation_ckpt.py uses it).

Legend: T tokens (flattened batch), D hidden, F expert / FFN width, E routed experts, K top-k,
A = T*K token-expert assignments, G expert groups.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moonforge.model.config import LMConfig
from moonforge.model.experts import ExpertsImpl, GroupedExperts


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases: the dense FFN, each expert, the shared experts."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))


class Router(nn.Module):
    """Sigmoid top-k gate with a selection-only bias and load counting.

    forward(x_TD) -> (idx_TK long expert ids, weights_TK fp32 mixing weights).
    """

    e_score_correction_bias: Tensor
    load_counts: Tensor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        scaling: float,
        norm_topk_prob: bool = True,
        num_groups: int = 1,
        topk_groups: int = 1,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.scaling = scaling
        self.norm_topk_prob = norm_topk_prob
        self.num_groups, self.topk_groups = num_groups, min(topk_groups, num_groups)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        self.register_buffer("load_counts", torch.zeros(num_experts), persistent=False)
        self.counting = True
        """Whether training forwards add to load_counts (off while a forward is recomputed)."""

    def scores(self, x_TD: Tensor) -> Tensor:
        """(T, E) fp32 sigmoid affinities, before any bias."""
        return torch.sigmoid(F.linear(x_TD.float(), self.weight.float()))

    def limit_to_groups(self, biased_TE: Tensor) -> Tensor:
        """biased_TE with the experts outside each token's best `topk_groups` groups at -inf."""
        T, E = biased_TE.shape
        biased_TGX = biased_TE.view(T, self.num_groups, E // self.num_groups)
        group_TG = biased_TGX.topk(2, dim=-1).values.sum(-1)
        best_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(
            1, group_TG.topk(self.topk_groups, dim=-1).indices, True
        )
        return biased_TGX.masked_fill(~best_TG[..., None], float("-inf")).view(T, E)

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        s_TE = self.scores(x_TD)
        biased_TE = s_TE.detach() + self.e_score_correction_bias
        if self.topk_groups < self.num_groups:
            biased_TE = self.limit_to_groups(biased_TE)
        idx_TK = torch.topk(biased_TE, self.top_k, dim=-1).indices
        w_TK = s_TE.gather(-1, idx_TK)
        if self.norm_topk_prob:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        w_TK = w_TK * self.scaling
        if self.training and self.counting:
            with torch.no_grad():
                self.load_counts += torch.bincount(idx_TK.flatten(), minlength=len(s_TE[0]))
        return idx_TK, w_TK

    @torch.no_grad()
    def update_bias(self, u: float) -> float:
        """Moonlight's bias step from the loads counted since the last call; clears the counts.

        Returns the imbalance max(load) / mean(load) (1.0 = perfectly balanced; 0.0 when nothing
        was counted). u = 0 (cooldown) still measures and clears. Example: loads [3, 1], u = 0.1
        -> e = [-1, 1], sign(e) - mean = [-1, 1], bias += [-0.1, 0.1], returns 1.5.
        """
        load_E = self.load_counts.clone()
        self.load_counts.zero_()
        mean = load_E.mean()
        if mean <= 0:
            return 0.0
        sign_E = torch.sign(mean - load_E)
        self.e_score_correction_bias += u * (sign_E - sign_E.mean())
        return float(load_E.max() / mean)


class MoE(nn.Module):
    """Routed SwiGLU experts + always-on shared experts. forward(x_TD) -> (T, D)."""

    def __init__(self, cfg: LMConfig, experts_impl: ExpertsImpl = "auto") -> None:
        super().__init__()
        D, F_ = cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = cfg.num_experts
        self.gate = Router(
            D,
            cfg.num_experts,
            cfg.num_experts_per_tok,
            cfg.routed_scaling_factor,
            cfg.norm_topk_prob,
            cfg.num_expert_groups,
            cfg.num_topk_groups,
        )
        self.experts = GroupedExperts(cfg.num_experts, D, F_, experts_impl)
        self.shared_experts = SwiGLU(D, cfg.num_shared_experts * F_) if cfg.num_shared_experts > 0 else None

    def routed(self, x_TD: Tensor, idx_TK: Tensor, w_TK: Tensor) -> Tensor:
        """Sort the T*K assignments by expert, run all experts at once, scatter-add back."""
        T, K = idx_TK.shape
        if T == 0:
            return torch.zeros_like(x_TD)
        flat_A = idx_TK.flatten()
        order_A = torch.argsort(flat_A, stable=True)
        token_A = order_A // K
        counts_E = torch.bincount(flat_A, minlength=self.num_experts)
        y_AD = self.experts(x_TD[token_A], counts_E)
        y_AD = y_AD.to(x_TD.dtype) * w_TK.flatten()[order_A, None].to(x_TD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_A, y_AD)

    def forward(self, x_TD: Tensor) -> Tensor:
        idx_TK, w_TK = self.gate(x_TD)
        y_TD = self.routed(x_TD, idx_TK, w_TK)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD

    def update_bias(self, u: float) -> float:
        """See `Router.update_bias`."""
        return self.gate.update_bias(u)


@contextmanager
def paused_counting(module: nn.Module) -> Iterator[None]:
    """Within the block, no Router under `module` counts loads (a recomputed forward was already
    counted once); restores each router's previous setting."""
    routers = [m for m in module.modules() if isinstance(m, Router)]
    before = [r.counting for r in routers]
    for r in routers:
        r.counting = False
    try:
        yield
    finally:
        for r, c in zip(routers, before):
            r.counting = c

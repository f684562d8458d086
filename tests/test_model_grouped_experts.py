"""Grouped experts: parity with the per-expert loop (outputs and gradients), the grouped-GEMM
fallback and requirement, old per-expert checkpoints, HF round trips bit for bit, and Muon per
expert matrix (batched == one matrix at a time, ZeRO client == MuonAdamW).

Legend: T tokens, D width, F expert width, E experts, K top-k, A = T*K assignments.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from moonforge.model import experts as experts_mod
from moonforge.model.adapters import deepseek_v3
from moonforge.model.config import LMConfig, VLMConfig
from moonforge.model.experts import GroupedExperts, merge_all_expert_keys, split_expert_state
from moonforge.model.lm import MoELM
from moonforge.model.moe import MoE
from moonforge.model.vlm import build_vlm, param_counts
from moonforge.stages.config import OptimizerConfig
from moonforge.stages.train.optim import MuonAdamW, is_muon_param, matrix_shape
from moonforge.stages.train.zero_muon import ZeroMuonAdamW

CFG = LMConfig(
    vocab_size=64,
    hidden_size=16,
    num_layers=3,
    num_heads=2,
    head_dim=8,
    kv_lora_rank=8,
    qk_rope_head_dim=4,
    dense_intermediate_size=32,
    num_experts=4,
    num_experts_per_tok=2,
    num_shared_experts=1,
    moe_intermediate_size=8,
    routed_scaling_factor=2.5,
    max_position_embeddings=64,
)
PARITY_TOL = 1e-6
"""fp32, relative to the largest magnitude of each tensor: grouped vs looped differ only in
summation order (measured: 3e-7 on the gradients here, where values reach ~300)."""


def _moe(impl: str, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(CFG, experts_impl=impl)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() <= PARITY_TOL * b.abs().max().clamp(min=1.0)


def _looped(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The reference: every expert run alone on its tokens (the old per-expert loop)."""
    idx_TK, w_TK = moe.gate(x_TD)
    y_TD = torch.zeros_like(x_TD)
    for e in range(moe.num_experts):
        tok_N, k_N = (idx_TK == e).nonzero(as_tuple=True)
        if len(tok_N):
            y_ND = moe.experts[e](x_TD[tok_N]) * w_TK[tok_N, k_N, None]
            y_TD = y_TD.index_add(0, tok_N, y_ND)
    return y_TD + moe.shared_experts(x_TD)


@pytest.mark.parametrize("impl", ["grouped_mm", "padded", "auto"])
def test_grouped_matches_looped_outputs_and_gradients(impl):
    moe = _moe(impl)
    x_TD = torch.randn(37, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = moe(x_TD)
    grads = torch.autograd.grad(y.square().sum(), [x_TD, *moe.parameters()])
    y_ref = _looped(moe, x_TD)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x_TD, *moe.parameters()])
    _close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref)


def test_skewed_routing_and_empty_experts():
    """Every token on expert 0 and 3 (1 and 2 get nothing): both paths still match."""
    for impl in ("grouped_mm", "padded"):
        moe = _moe(impl).eval()
        with torch.no_grad():
            moe.gate.e_score_correction_bias.copy_(torch.tensor([50.0, 0.0, 0.0, 50.0]))
        x_TD = torch.randn(9, 16)
        _close(moe(x_TD), _looped(moe, x_TD))
        assert moe(x_TD[:0]).shape == (0, 16)


def test_required_grouped_gemm_fails_clearly_where_unavailable(monkeypatch):
    monkeypatch.setattr(experts_mod, "_GROUPED_MM", None)
    with pytest.raises(RuntimeError, match="'grouped_mm' is required.*impl 'auto'"):
        _moe("grouped_mm")(torch.randn(5, 16))
    moe = _moe("auto")  # CPU: the padded path is a planned one, so no warning
    x_TD = torch.randn(5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _close(moe(x_TD), _looped(moe, x_TD))


def test_unavailable_grouped_gemm_on_an_accelerator_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(experts_mod, "_GROUPED_MM", None)
    monkeypatch.setattr(experts_mod, "_expects_grouped_mm", lambda x: True)
    monkeypatch.setattr(experts_mod, "_warned", set())
    moe = _moe("auto")
    x_TD = torch.randn(11, 16)
    with pytest.warns(UserWarning, match="grouped GEMM unavailable.*padded bmm"):
        y = moe(x_TD)
    _close(y, _looped(moe, x_TD))


def test_unknown_impl_rejected():
    with pytest.raises(ValueError, match="unknown experts impl"):
        GroupedExperts(4, 16, 8, impl="loop")


def _per_expert_state(lm: MoELM) -> dict[str, torch.Tensor]:
    """lm's state dict in the old layout: experts.{e}.{gate,up,down}_proj.weight."""
    out = {}
    for key, t in lm.state_dict().items():
        if key.endswith("experts.gate_up"):
            prefix = key.removesuffix("gate_up")
            down = lm.state_dict()[prefix + "down"]
            for e, kind, w in split_expert_state(t, down):
                out[f"{prefix}{e}.{kind}_proj.weight"] = w
        elif not key.endswith("experts.down"):
            out[key] = t.clone()
    return out


def test_old_per_expert_checkpoint_loads_into_grouped_experts_bit_for_bit():
    torch.manual_seed(0)
    src, dst = MoELM(CFG), MoELM(CFG)
    old = _per_expert_state(src)
    assert "layers.1.mlp.experts.3.up_proj.weight" in old
    assert not any(k.endswith("experts.gate_up") for k in old)
    dst.load_state_dict(old, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    # and through a whole VLM with the "lm." prefix (what load_weights does)
    vlm = build_vlm(VLMConfig(lm=CFG), seed=1)
    full = {k: v for k, v in vlm.state_dict().items() if not k.startswith("lm.")}
    full.update({"lm." + k: v for k, v in old.items()})
    missing, unexpected = vlm.load_state_dict(full, strict=False)
    assert not missing and not unexpected
    assert torch.equal(vlm.lm.layers[2].mlp.experts.down, src.layers[2].mlp.experts.down)


def test_incomplete_per_expert_checkpoint_names_what_is_wrong():
    torch.manual_seed(0)
    old = _per_expert_state(MoELM(CFG))
    del old["layers.1.mlp.experts.2.down_proj.weight"]
    missing, unexpected = MoELM(CFG).load_state_dict(old, strict=False)
    assert "layers.1.mlp.experts.gate_up" in missing
    assert "layers.1.mlp.experts.0.gate_proj.weight" in unexpected


def test_hf_per_expert_tensors_into_grouped_experts_and_back_bit_identical():
    """Bad input list: a checkpoint with per-expert tensors, loaded into grouped experts and
    exported back, is the same bytes."""
    torch.manual_seed(0)
    lm = MoELM(CFG)
    parts = {"lm": CFG}
    state = {"lm." + k: v for k, v in lm.state_dict().items()}
    hf = deepseek_v3.state_to_hf(state, parts)
    assert "model.layers.2.mlp.experts.1.gate_proj.weight" in hf
    hf_config = deepseek_v3.hf_from_parts(parts)
    ours = deepseek_v3.state_from_hf(hf, parts, hf_config)
    assert ours.keys() == state.keys()
    assert all(torch.equal(ours[k], state[k]) for k in state)
    again = deepseek_v3.state_to_hf(ours, parts)
    assert again.keys() == hf.keys() and all(torch.equal(again[k], hf[k]) for k in hf)
    # an old artifact (per-expert keys in our own layout) exports the same tensors
    old = {"lm." + k: v for k, v in _per_expert_state(lm).items()}
    from_old = deepseek_v3.state_to_hf(old, parts)
    assert all(torch.equal(from_old[k], hf[k]) for k in hf)
    assert merge_all_expert_keys(old).keys() == state.keys()


def test_param_counts_and_expert_views():
    lm = MoELM(CFG)
    moe = lm.layers[1].mlp
    assert len(moe.experts) == 4
    assert sum(p.numel() for p in moe.experts[0].parameters()) == 3 * 8 * 16
    counts = param_counts(VLMConfig(lm=CFG))
    assert counts["lm_total"] == sum(p.numel() for p in lm.parameters())
    assert counts["lm_total"] - counts["lm_active"] == 2 * (4 - 2) * 3 * 8 * 16


def test_muon_orthogonalises_each_expert_matrix_like_per_expert_muon():
    """MuonAdamW on stacked experts == MuonAdamW on the same experts as 2-D matrices, exactly."""
    torch.manual_seed(0)
    lm = MoELM(CFG)
    experts = lm.layers[1].mlp.experts
    assert matrix_shape("lm.layers.1.mlp.experts.gate_up", experts.gate_up) == (8, 8, 16)
    assert is_muon_param("lm.layers.1.mlp.experts.down", experts.down)
    stacked = [
        ("gate_up", torch.nn.Parameter(experts.gate_up.detach().clone())),
        ("down", torch.nn.Parameter(experts.down.detach().clone())),
    ]
    stacked = [(f"lm.layers.1.mlp.experts.{n}", p) for n, p in stacked]
    per = [
        torch.nn.Parameter(w.detach().clone())
        for e in range(4)
        for w in (experts[e].gate_proj_weight, experts[e].up_proj_weight, experts[e].down_proj_weight)
    ]
    cfg = OptimizerConfig(lr=2e-2)
    opt_s = MuonAdamW(stacked, cfg)
    opt_p = MuonAdamW([(f"lm.m{i}", p) for i, p in enumerate(per)], cfg)
    assert opt_s.num_muon == opt_p.num_muon == sum(p.numel() for p in per)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for _, p in stacked:
            p.grad = torch.randn(p.shape, generator=g)
        for e in range(4):
            per[3 * e].grad = stacked[0][1].grad[e, :8].clone()
            per[3 * e + 1].grad = stacked[0][1].grad[e, 8:].clone()
            per[3 * e + 2].grad = stacked[1][1].grad[e].clone()
        opt_s.step()
        opt_p.step()
    for e in range(4):
        assert torch.equal(stacked[0][1][e, :8], per[3 * e])
        assert torch.equal(stacked[0][1][e, 8:], per[3 * e + 1])
        assert torch.equal(stacked[1][1][e], per[3 * e + 2])


def test_zero_muon_client_handles_stacked_experts_like_muon_adamw():
    torch.manual_seed(0)
    lms = [MoELM(CFG), MoELM(CFG)]
    lms[1].load_state_dict(lms[0].state_dict())
    named = [[("lm." + n, p) for n, p in lm.named_parameters()] for lm in lms]
    cfg = OptimizerConfig(lr=1e-2)
    opts = [MuonAdamW(named[0], cfg), ZeroMuonAdamW(named[1], cfg)]
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    pos, doc = torch.arange(10).repeat(2, 1), torch.zeros(2, 10, dtype=torch.long)
    for _ in range(2):
        for lm, opt in zip(lms, opts):
            opt.zero_grad()
            lm(ids, pos, doc).logsumexp(-1).mean().backward()
            opt.step()
    for (n, a), b in zip(lms[0].named_parameters(), lms[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)

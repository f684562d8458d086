"""Router: top-k by biased score, weights from unbiased scores; Moonlight bias rule; MoE shapes.

Legend: T tokens, D width, E experts, K top-k.
"""

import torch

from moonforge.model.config import LMConfig
from moonforge.model.moe import MoE, Router, SwiGLU

CFG = LMConfig(
    vocab_size=64,
    hidden_size=16,
    num_layers=2,
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
)


def _router_with_logits(logits_E: list[float], scaling: float = 2.5) -> tuple[Router, torch.Tensor]:
    """A router whose weight makes x = e_0 produce exactly `logits_E`."""
    E = len(logits_E)
    r = Router(dim=E, num_experts=E, top_k=2, scaling=scaling)
    with torch.no_grad():
        r.weight.zero_()
        r.weight[:, 0] = torch.tensor(logits_E)
    x = torch.zeros(1, E)
    x[0, 0] = 1.0
    return r, x


def test_router_selects_by_biased_score_but_weights_by_unbiased():
    r, x = _router_with_logits([2.0, 1.0, 0.0, -1.0])
    idx, w = r(x)
    assert sorted(idx[0].tolist()) == [0, 1]
    r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    idx, w = r(x)
    assert sorted(idx[0].tolist()) == [0, 3]
    s = torch.sigmoid(torch.tensor([2.0, 1.0, 0.0, -1.0]))
    expected = {0: s[0] / (s[0] + s[3]) * 2.5, 3: s[3] / (s[0] + s[3]) * 2.5}
    for e, wt in zip(idx[0].tolist(), w[0]):
        torch.testing.assert_close(wt, expected[e])
    torch.testing.assert_close(w.sum(), torch.tensor(2.5))


def test_load_counted_only_in_training():
    r, x = _router_with_logits([2.0, 1.0, 0.0, -1.0])
    r.eval()
    r(x)
    assert r.load_counts.sum() == 0
    r.train()
    r(x.repeat(3, 1))
    assert r.load_counts.tolist() == [3.0, 3.0, 0.0, 0.0]
    assert "load_counts" not in r.state_dict()
    assert "e_score_correction_bias" in r.state_dict()


def test_bias_update_on_hand_made_loads():
    r = Router(dim=4, num_experts=4, top_k=2, scaling=1.0)
    r.load_counts.copy_(torch.tensor([10.0, 2.0, 4.0, 0.0]))  # mean 4
    imbalance = r.update_bias(0.1)
    # e = mean - load = [-6, 2, 0, 4]; sign = [-1, 1, 0, 1]; mean sign = 0.25
    torch.testing.assert_close(r.e_score_correction_bias, 0.1 * torch.tensor([-1.25, 0.75, -0.25, 0.75]))
    assert imbalance == 2.5
    assert r.load_counts.sum() == 0
    before = r.e_score_correction_bias.clone()
    r.load_counts.copy_(torch.tensor([1.0, 0.0, 0.0, 3.0]))
    assert r.update_bias(0.0) == 3.0  # u = 0 (cooldown): measure and clear, never move
    torch.testing.assert_close(r.e_score_correction_bias, before)
    assert r.update_bias(0.1) == 0.0  # nothing counted


def test_moe_output_shape_and_grads():
    torch.manual_seed(0)
    moe = MoE(CFG)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(13, 16, requires_grad=True)
    y = moe(x)
    assert y.shape == (13, 16)
    y.square().sum().backward()
    assert x.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.gate.load_counts.sum() == 13 * 2
    assert moe.experts.gate_up.shape == (4, 2 * 8, 16) and moe.experts.down.shape == (4, 16, 8)
    assert moe.experts.gate_up.grad.abs().sum() > 0 and moe.experts.down.grad.abs().sum() > 0


def test_moe_matches_dense_per_token_loop():
    torch.manual_seed(1)
    moe = MoE(CFG).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(7, 16)
    idx, w = moe.gate(x)
    ref = torch.stack(
        [
            sum(w[t, j] * moe.experts[int(idx[t, j])](x[t]) for j in range(2)) + moe.shared_experts(x[t])
            for t in range(7)
        ]
    )
    torch.testing.assert_close(moe(x), ref, atol=1e-5, rtol=1e-5)


def test_dense_swiglu_shape():
    assert SwiGLU(16, 40)(torch.randn(3, 5, 16)).shape == (3, 5, 16)

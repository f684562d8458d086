"""MoE LM: MLA / MHA shapes, causality, packing, RoPE theta change without state changes.

Legend: B batch, L length, V vocab.
"""

import pytest
import torch

from moonforge.model.config import LMConfig
from moonforge.model.lm import MoELM

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    head_dim=8,
    kv_lora_rank=16,
    qk_rope_head_dim=4,
    first_k_dense=1,
    dense_intermediate_size=48,
    num_experts=4,
    num_experts_per_tok=2,
    num_shared_experts=1,
    moe_intermediate_size=16,
    max_position_embeddings=64,
)


def _lm(attention: str = "mla", seed: int = 0, **kw) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(LMConfig(**{**BASE, "attention": attention, **kw}), backend="sdpa").eval()


def _batch(B: int = 2, L: int = 12):
    ids = torch.randint(0, 97, (B, L), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(L).repeat(B, 1)
    return ids, pos, torch.zeros(B, L, dtype=torch.long)


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_shapes(attention):
    lm = _lm(attention)
    ids, pos, doc = _batch()
    assert lm(ids, pos, doc).shape == (2, 12, 97)
    emb = lm.embed(ids)
    torch.testing.assert_close(lm(None, pos, doc, inputs_embeds_BLD=emb), lm(ids, pos, doc))
    with pytest.raises(ValueError, match="exactly one"):
        lm(ids, pos, doc, inputs_embeds_BLD=emb)


def test_mla_projection_shapes():
    attn = _lm("mla").layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * (8 + 4), 32)
    assert attn.kv_a_proj_with_mqa.weight.shape == (16 + 4, 32)
    assert attn.kv_b_proj.weight.shape == (4 * (8 + 8), 16)
    assert attn.o_proj.weight.shape == (32, 4 * 8)


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_causal_future_tokens_do_not_change_past_logits(attention):
    lm = _lm(attention)
    ids, pos, doc = _batch()
    with torch.no_grad():
        a = lm(ids, pos, doc)
        ids2 = ids.clone()
        ids2[:, 8:] = (ids2[:, 8:] + 1) % 97
        b = lm(ids2, pos, doc)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_packed_documents_match_separate_runs():
    lm = _lm("mla")
    ids, _, _ = _batch(1, 12)
    doc = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        packed = lm(ids, pos, doc)
        first = lm(ids[:, :5], pos[:, :5], doc[:, :5])
        second = lm(ids[:, 5:], pos[:, 5:], torch.zeros(1, 7, dtype=torch.long))
    torch.testing.assert_close(packed, torch.cat([first, second], 1), atol=1e-5, rtol=1e-5)


def test_rope_theta_change_changes_outputs_not_state():
    lm_a = _lm("mla", rope_theta=50_000.0)
    lm_b = MoELM(LMConfig(**{**BASE, "rope_theta": 800_000.0}), backend="sdpa").eval()
    sd_a = lm_a.state_dict()
    lm_b.load_state_dict(sd_a)  # strict: identical keys
    sd_b = lm_b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    ids, pos, doc = _batch()
    with torch.no_grad():
        a, b = lm_a(ids, pos, doc), lm_b(ids, pos, doc)
    torch.testing.assert_close(a[:, 0], b[:, 0])  # position 0 is not rotated
    assert not torch.allclose(a, b, atol=1e-6)
    assert lm_b.rope_theta == 800_000.0


def test_positions_beyond_max_position_embeddings_grow_the_table():
    lm = _lm("mha")
    L = 80  # > max_position_embeddings = 64
    out = lm(torch.zeros(1, L, dtype=torch.long), torch.arange(L)[None], torch.zeros(1, L, dtype=torch.long))
    assert out.shape == (1, L, 97) and not out.isnan().any()


def test_update_router_biases_reports_per_layer_and_resets():
    lm = _lm("mla").train()
    ids, pos, doc = _batch()
    lm(ids, pos, doc).sum().backward()
    metrics = lm.update_router_biases(1e-3)
    assert set(metrics) == {
        "router/max_over_mean/layer_1",
        "router/max_over_mean/layer_2",
        "router/max_over_mean",
        "router/max_over_mean_avg",
    }
    assert all(v >= 1.0 for v in metrics.values())
    assert all(moe.gate.load_counts.sum() == 0 for _, moe in lm.moe_layers())
    assert any(moe.gate.e_score_correction_bias.abs().sum() > 0 for _, moe in lm.moe_layers())


def test_init_is_deterministic_given_seed():
    a, b = _lm("mla", seed=7), _lm("mla", seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

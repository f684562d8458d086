"""Attention metadata once per batch: built once per forward whatever the depth, no host read per
layer, every backend equal on packed rows with padding, the cost-chosen SDPA form, the backend as a
runtime choice (old model_config.json with attn_backend still loads), and MLA's absorbed decode
equal to the expanded one.

Legend: B rows, L length, V vocab, H heads, K cached positions.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from moonforge.model import attention as attn
from moonforge.model import lm as lm_mod
from moonforge.model.attention import attention_meta, resolve_backend
from moonforge.model.config import LMConfig, VLMConfig
from moonforge.model.kv_cache import KVCache
from moonforge.model.lm import MoELM
from moonforge.model.vlm import build_vlm

BASE = dict(
    vocab_size=97,
    hidden_size=32,
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
TOL = 1e-5
"""fp32 logits: the backends differ in summation order only (measured <= 2e-6)."""


def _lm(num_layers: int = 3, backend: str = "sdpa", seed: int = 0, **kw) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(
        LMConfig(**{**BASE, "num_layers": num_layers, **kw}), backend=backend, experts_impl="grouped_mm"
    ).eval()


def _packed(B: int = 2, L: int = 24):
    """Rows of several documents with restarting positions and trailing padding."""
    ids = torch.randint(0, 97, (B, L), generator=torch.Generator().manual_seed(3))
    doc = torch.tensor([[0] * 7 + [1] * 5 + [2] * 9 + [-1] * 3, [4] * 15 + [6] * 2 + [-1] * 7])[:B, :L]
    pos = torch.zeros_like(doc)
    for b in range(B):
        run = 0
        for t in range(L):
            run = run + 1 if t and doc[b, t] == doc[b, t - 1] and doc[b, t] >= 0 else 0
            pos[b, t] = run if doc[b, t] >= 0 else 0
    return ids, pos, doc


@contextlib.contextmanager
def _count_host_reads():
    """Counts .item() / .tolist() / int() / bool() on tensors (explicit host reads)."""
    counter = {"n": 0}
    names = ("item", "tolist", "__int__", "__bool__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(fn):
        def counted(self, *a, **kw):
            counter["n"] += 1
            return fn(self, *a, **kw)

        return counted

    for n in names:
        setattr(torch.Tensor, n, wrap(saved[n]))
    try:
        yield counter
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


@pytest.mark.parametrize("backend", ["sdpa", "dense", "padded"])
def test_metadata_once_per_forward_and_no_host_read_per_layer(backend, monkeypatch):
    built = []
    real = lm_mod.attention_meta
    monkeypatch.setattr(lm_mod, "attention_meta", lambda *a, **kw: built.append(1) or real(*a, **kw))
    ids, pos, doc = _packed()
    reads = {}
    for depth in (2, 5):
        lm = _lm(depth, backend)
        built.clear()
        with torch.no_grad(), _count_host_reads() as counter:
            lm(ids, pos, doc)
        assert len(built) == 1
        reads[depth] = counter["n"]
    assert reads[2] == reads[5], reads  # depth adds no host read (grouped experts, any backend)


@pytest.mark.parametrize("backend", ["dense", "padded", "flex"])
def test_every_backend_matches_sdpa_on_packed_rows(backend):
    ids, pos, doc = _packed()
    with torch.no_grad():
        ref = _lm(backend="sdpa")(ids, pos, doc)
        out = _lm(backend=backend)(ids, pos, doc)
    real = doc >= 0
    assert (out - ref)[real].abs().max() <= TOL


def test_vision_and_towers_match_across_backends():
    from moonforge.model.config import VisionConfig
    from moonforge.model.vision import MoonViT

    vcfg = VisionConfig(
        patch_size=4,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        pos_grid=4,
        max_patches=64,
    )
    grid = torch.tensor([[4, 4], [2, 6], [3, 3]])
    pixels = torch.rand(37, 48, generator=torch.Generator().manual_seed(0))
    outs = []
    for backend in ("sdpa", "dense", "padded"):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(MoonViT(vcfg, backend).eval()(pixels, grid))
    for o in outs[1:]:
        assert (o - outs[0]).abs().max() <= TOL


def test_sdpa_picks_the_cheapest_exact_form():
    assert attention_meta(torch.zeros(4, 64, dtype=torch.long), True, "sdpa").kernel == "full"
    many_short = torch.arange(512)[None] // 16  # 32 documents of 16 tokens
    assert attention_meta(many_short, True, "sdpa").kernel == "padded"
    one_long = torch.tensor([[0] * 500 + [1] * 10 + [-1] * 2])
    assert attention_meta(one_long, True, "sdpa").kernel == "dense"
    assert attention_meta(torch.full((1, 6), -1), False, "sdpa").kernel == "dense"
    assert resolve_backend("auto", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        _lm(backend="xformers")


def test_attn_backend_is_a_runtime_choice_not_model_config():
    raw = VLMConfig().model_dump()
    assert "attn_backend" not in raw
    old_json = VLMConfig().model_dump_json()[:-1] + ', "attn_backend": "flash"}'
    assert VLMConfig.model_validate_json(old_json) == VLMConfig()
    assert VLMConfig.model_validate({"attn_backend": "sdpa"}) == VLMConfig()
    vlm = build_vlm(VLMConfig(lm=LMConfig(**{**BASE, "num_layers": 2})), device="meta", attn_backend="padded")
    assert vlm.lm.attn_backend == vlm.vision.attn_backend == vlm.caption.attn_backend == "padded"


def _decode_all(lm: MoELM, ids, absorbed: bool, monkeypatch) -> torch.Tensor:
    """Prefill 5 tokens, then decode the rest one position at a time: (B, L, V) logits."""
    if not absorbed:  # the previous decode: re-expand the whole cached latent every step

        def expanded(self, q_BHQX, latent_B1KX, doc_ids_BK):
            c_kv, k_rope = latent_B1KX[:, 0, :, : self.R], latent_B1KX[..., self.R :]
            k, v = self.expand(c_kv, k_rope)
            return attn.attend_cached(q_BHQX, k, v, doc_ids_BK, scale=self.scale)

        monkeypatch.setattr(lm_mod.MLA, "attend_absorbed", expanded)
    B, L = ids.shape
    cache = KVCache(len(lm.layers), B, L)
    doc = torch.zeros(B, L, dtype=torch.long)
    doc[1, :2] = -1  # a left-padded prompt
    pos = (torch.arange(L)[None] - torch.tensor([[0], [2]])).clamp(min=0)
    outs = [lm.logits(lm.hidden_cached(lm.embed(ids[:, :5]), pos[:, :5], doc[:, :5], cache))]
    for t in range(5, L):
        outs.append(
            lm.logits(
                lm.hidden_cached(lm.embed(ids[:, t : t + 1]), pos[:, t : t + 1], doc[:, t : t + 1], cache)
            )
        )
    monkeypatch.undo()
    return torch.cat(outs, dim=1)


def test_mla_absorbed_decode_equals_the_expanded_decode(monkeypatch):
    lm = _lm(3, q_lora_rank=12)
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        absorbed = _decode_all(lm, ids, True, monkeypatch)
        expanded = _decode_all(lm, ids, False, monkeypatch)
        doc = torch.zeros(2, 14, dtype=torch.long)
        doc[1, :2] = -1
        pos = (torch.arange(14)[None] - torch.tensor([[0], [2]])).clamp(min=0)
        full = lm(ids, pos, doc)
    assert (absorbed - expanded).abs().max() <= TOL
    assert (absorbed - full)[doc >= 0].abs().max() <= TOL


@pytest.mark.parametrize("backend", ["sdpa", "padded"])
def test_chunked_causal_attention_matches_reference_with_gradients(backend):
    """Rows longer than CAUSAL_CHUNK: the CPU chunked causal form (full rows, and long documents
    in the padded form) equals the per-document reference, outputs and gradients."""
    g = torch.Generator().manual_seed(0)
    L = 2 * attn.CAUSAL_CHUNK + 37
    doc = (
        torch.zeros(2, L, dtype=torch.long)
        if backend == "sdpa"
        else torch.tensor([[0] * (L - 40) + [1] * 30 + [-1] * 10, [3] * 7 + [4] * (L - 7)])
    )
    q, k = (torch.randn(2, 3, L, 12, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, L, 8, generator=g, requires_grad=True)
    meta = attention_meta(doc, True, backend)
    assert meta.kernel == ("full" if backend == "sdpa" else "padded")
    out = attn.attention(q, k, v, meta)
    ref = attn.attend_reference(q, k, v, doc, causal=True)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    for a, b in zip(
        torch.autograd.grad(out.square().sum(), (q, k, v)), torch.autograd.grad(ref.square().sum(), (q, k, v))
    ):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)

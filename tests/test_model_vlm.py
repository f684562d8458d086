"""VLM wiring: image-token scatter, count mismatch, tiny forward + backward, full-shape counts.

Legend: B batch, L length, V vocab, D LM width, N patches, P pixels per patch, M image tokens.
"""

from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moonforge.model.config import VLMConfig
from moonforge.model.vlm import FREEZE_GROUPS, VLM, build_vlm, param_counts

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _cfg(name: str) -> VLMConfig:
    return VLMConfig.model_validate(yaml.safe_load((RECIPES / name).read_text())["model"])


@pytest.fixture(scope="module")
def tiny() -> VLM:
    cfg = _cfg("tiny.yaml").model_copy(update={"attn_backend": "sdpa"})
    return build_vlm(cfg, seed=0)


def _images(cfg: VLMConfig):
    grid = torch.tensor([[4, 6], [2, 2]])
    P = 3 * cfg.vision.patch_size**2
    return torch.randn(28, P, generator=torch.Generator().manual_seed(0)), grid


def test_freeze_groups_are_children(tiny):
    assert {name for name, _ in tiny.named_children()} == set(FREEZE_GROUPS)


def test_image_tokens_scattered_in_order(tiny):
    pixels, grid = _images(tiny.cfg)
    M = tiny.num_image_tokens(grid)
    assert M == 6 + 1
    ids = torch.randint(0, 2048, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 6:] = True  # 4 slots in row 0 ...
    mask[1, 1:4] = True  # ... then 3 in row 1
    with torch.no_grad():
        h = tiny.embed(ids, mask, pixels, grid)
        img = tiny.encode_images(pixels, grid)
        text = tiny.lm.embed(ids)
    torch.testing.assert_close(h[mask], img)
    torch.testing.assert_close(h[~mask], text[~mask])
    torch.testing.assert_close(h[0, 6:], img[:4])
    torch.testing.assert_close(h[1, 1:4], img[4:])


def test_count_mismatch_names_both_counts(tiny):
    pixels, grid = _images(tiny.cfg)
    ids = torch.zeros(1, 12, dtype=torch.long)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, :5] = True
    pos, doc = torch.arange(12)[None], torch.zeros(1, 12, dtype=torch.long)
    with pytest.raises(ValueError, match=r"5 image positions .* 7 image tokens"):
        tiny(ids, pos, doc, mask, pixels, grid)
    with pytest.raises(ValueError, match="5 image positions but no pixels_NP"):
        tiny(ids, pos, doc, mask)


def test_tiny_forward_backward(tiny):
    pixels, grid = _images(tiny.cfg)
    B, L = 2, 32
    ids = torch.randint(0, 2048, (B, L))
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 2:9] = True
    doc = torch.tensor([[0] * 20 + [1] * 12, [0] * 28 + [-1] * 4])
    pos = torch.stack([torch.cat([torch.arange(20), torch.arange(12)]), torch.arange(L)])
    tiny.zero_grad()
    logits = tiny(ids, pos, doc, mask, pixels, grid)
    assert logits.shape == (B, L, 2048) and not logits.isnan().any()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for group in ("vision", "projector", "lm"):
        grads = [p.grad for p in getattr(tiny, group).parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, group
    assert all(p.grad is None for p in tiny.caption.parameters())


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3))
def test_output_shape_for_random_image_counts(tiny, merged_grids):
    grid = torch.tensor([[2 * h, 2 * w] for h, w in merged_grids])
    N, M = int((grid[:, 0] * grid[:, 1]).sum()), sum(h * w for h, w in merged_grids)
    pixels = torch.randn(N, 3 * tiny.cfg.vision.patch_size**2)
    L = M + 5
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, 2 : 2 + M] = True
    with torch.no_grad():
        assert tiny.encode_images(pixels, grid).shape == (M, tiny.cfg.lm.hidden_size)
        out = tiny(
            torch.zeros(1, L, dtype=torch.long),
            torch.arange(L)[None],
            torch.zeros(1, L, dtype=torch.long),
            mask,
            pixels,
            grid,
        )
    assert out.shape == (1, L, tiny.cfg.lm.vocab_size)


def test_text_only_forward(tiny):
    ids = torch.randint(0, 2048, (1, 8))
    out = tiny(ids, torch.arange(8)[None], torch.zeros(1, 8, dtype=torch.long))
    assert out.shape == (1, 8, 2048)


def test_init_is_deterministic():
    cfg = _cfg("tiny.yaml")
    a, b = build_vlm(cfg, seed=3), build_vlm(cfg, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_full_kimi_vl_a3b_param_counts():
    c = param_counts(_cfg("kimi-vl-a3b.yaml"))
    print({k: f"{v / 1e9:.3f}B" for k, v in c.items()})
    assert 0.35e9 <= c["vision"] <= 0.45e9
    assert 14.5e9 <= c["lm_total"] <= 16.5e9
    assert 2.8e9 <= c["lm_active"] <= 3.2e9
    # Moonlight reports 15.29B total / 2.24B activated without embeddings
    assert abs(c["lm_total_no_embed"] - 15.29e9) < 0.02e9
    assert abs(c["lm_active_no_embed"] - 2.24e9) < 0.02e9

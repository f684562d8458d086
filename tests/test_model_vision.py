"""MoonViT pieces: 2-D RoPE, pos-emb interpolation, packed == per-image encoding, projector counts.

Legend: N patches, P pixels per patch, D width, H heads, M merged tokens.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moonforge.model.config import ProjectorConfig, VisionConfig
from moonforge.model.projector import PixelShuffleProjector, merge_index, num_merged_tokens
from moonforge.model.rope import Rope2D, apply_rotary, grid_positions
from moonforge.model.vision import MoonViT, PosEmbGrid

VCFG = VisionConfig(
    patch_size=4,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    pos_grid=6,
    merge_size=2,
    max_patches=64,
)


def test_rope2d_frequencies_follow_spec():
    rope = Rope2D(dim=72, theta=10000.0)
    f = rope.freqs()
    assert f.shape == (18,)
    torch.testing.assert_close(f, 1.0 / 10000.0 ** (torch.arange(0, 72, 4).float() / 72))


def test_rope2d_interleaves_x_and_y():
    rope = Rope2D(dim=8, theta=100.0)
    y, x = grid_positions(torch.tensor([[2, 3]]))
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and x.tolist() == [0, 1, 2, 0, 1, 2]
    ang = rope.angles(y, x)  # (N, 4): pairs (x f0, y f0, x f1, y f1)
    f = rope.freqs()
    torch.testing.assert_close(ang[:, 0], x.float() * f[0])
    torch.testing.assert_close(ang[:, 1], y.float() * f[0])
    torch.testing.assert_close(ang[:, 2], x.float() * f[1])
    torch.testing.assert_close(ang[:, 3], y.float() * f[1])


def test_rope2d_is_a_complex_multiply_on_adjacent_pairs():
    rope = Rope2D(dim=8)
    grid = torch.tensor([[3, 2]])
    cos, sin = rope(grid)
    x = torch.randn(2, 6, 8)  # (H, N, D)
    out = apply_rotary(x, cos, sin)
    ang = rope.angles(*grid_positions(grid))
    ref = torch.view_as_real(
        torch.view_as_complex(x.unflatten(-1, (4, 2)).contiguous()) * torch.polar(torch.ones_like(ang), ang)
    ).flatten(-2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # rotations keep the norm


def test_rope2d_scores_depend_only_on_relative_offset():
    rope = Rope2D(dim=8)
    q, k = torch.randn(8), torch.randn(8)

    def score(qy, qx, ky, kx):
        y, x = torch.tensor([qy, ky]), torch.tensor([qx, kx])
        ang = rope.angles(y, x)
        rot = apply_rotary(torch.stack([q, k])[None], ang.cos(), ang.sin())[0]
        return rot[0] @ rot[1]

    torch.testing.assert_close(score(1, 2, 3, 5), score(4, 0, 6, 3))


def test_pos_emb_interpolates_to_each_grid():
    pe = PosEmbGrid(grid=6, dim=5)
    torch.nn.init.normal_(pe.weight)
    assert pe.for_grid(3, 4).shape == (12, 5)
    assert pe.for_grid(10, 2).shape == (20, 5)
    torch.testing.assert_close(pe.for_grid(6, 6), pe.weight.flatten(0, 1))
    assert pe(torch.tensor([[3, 4], [2, 2]])).shape == (16, 5)


def test_packed_encoding_equals_each_image_alone():
    torch.manual_seed(0)
    vit = MoonViT(VCFG, backend="sdpa").eval()
    grids = [torch.tensor([[4, 6]]), torch.tensor([[2, 2]]), torch.tensor([[6, 6]])]
    pixels = [torch.randn(int(g.prod()), 3 * 4 * 4) for g in grids]
    with torch.no_grad():
        packed = vit(torch.cat(pixels), torch.cat(grids))
        alone = torch.cat([vit(p, g) for p, g in zip(pixels, grids)])
    assert packed.shape == (24 + 4 + 36, 32)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_vision_rejects_bad_inputs():
    vit = MoonViT(VCFG, backend="sdpa")
    with pytest.raises(ValueError, match="covers 8 patches"):
        vit(torch.randn(6, 48), torch.tensor([[2, 4]]))
    with pytest.raises(ValueError, match="max_patches"):
        vit(torch.randn(100, 48), torch.tensor([[10, 10]]))


def test_merge_index_groups_2x2_neighbours():
    idx = merge_index(torch.tensor([[2, 4], [2, 2]]), 2)
    assert idx.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 10, 11]]


def test_projector_rejects_grids_not_divisible_by_merge():
    proj = PixelShuffleProjector(ProjectorConfig(), VCFG, lm_hidden=16)
    with pytest.raises(ValueError, match="not divisible by merge_size=2"):
        proj(torch.randn(6, 32), torch.tensor([[2, 3]]))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4),
    st.sampled_from([1, 2, 3]),
)
def test_projector_token_count_is_hw_over_merge_squared(half_grids, m):
    cfg = VCFG.model_copy(update={"merge_size": m})
    grid = torch.tensor([[h * m, w * m] for h, w in half_grids])
    proj = PixelShuffleProjector(ProjectorConfig(hidden_size=16), cfg, lm_hidden=8)
    N = int((grid[:, 0] * grid[:, 1]).sum())
    out = proj(torch.randn(N, 32), grid)
    expected = sum(h * w for h, w in half_grids)  # (h*m)(w*m) / m^2
    assert out.shape == (expected, 8) == (num_merged_tokens(grid, m), 8)
    assert sorted(merge_index(grid, m).flatten().tolist()) == list(range(N))


def test_projector_default_hidden_is_merge_squared_times_width():
    proj = PixelShuffleProjector(ProjectorConfig(), VCFG, lm_hidden=16)
    assert proj.linear_1.in_features == proj.linear_1.out_features == 4 * 32
    assert math.isclose(float(proj.pre_norm.eps), 1e-5)

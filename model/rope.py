"""Rotary position embeddings: 1-D for the LM, 2-D (x, y interleaved) for MoonViT.

Both rotate adjacent channel pairs (2i, 2i+1) as a complex multiply, the DeepSeek-V3 /
MoonViT convention (not the rotate-half layout of HF Llama). Arithmetic is done in real fp32.

What is unusual:
- Nothing here is learned or saved. `Rope1D` keeps its cos/sin table as a plain attribute,
  rebuilt whenever theta, the needed length, the device or the dtype changes. The long-context
  stage builds a new config with a larger `rope_theta` and loads the same state_dict; that works
  because RoPE contributes no keys to it.
- `Rope2D` follows MoonViT exactly: freqs = 1 / theta ** (arange(0, dim, 4) / dim) gives dim/4
  frequencies; rotary pair 2i uses the column (x = w) and pair 2i+1 the row (y = h), so x and y
  each take half of the pairs.
- Video (3-D) positions add a temporal turn to every pair instead of taking pairs away from x and
  y: pair j turns by (its x or y angle) + t * g_j, g_j = theta ** (-j / P), for temporal patch t.
  At t = 0 nothing changes, so an image (and a video's first temporal patch) is rotated exactly
  as before, and q.k still depends only on the offsets in x, y and t.

Legend: B batch, L sequence length, H heads, D rotated channels (even), N packed patches,
P = D/2 rotary pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def apply_rotary(x_BHLD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of `x` by angles given as cos/sin (P = D/2 pairs).

    x: (..., L, D) with a head axis before L (e.g. (B, H, L, D)); cos/sin: (B, L, P) or (L, P),
    broadcast over heads. Returns a tensor of x's shape and dtype.
    """
    cos = cos_BLP.unsqueeze(-3) if cos_BLP.dim() == 3 else cos_BLP
    sin = sin_BLP.unsqueeze(-3) if sin_BLP.dim() == 3 else sin_BLP
    x_pairs = x_BHLD.float().unflatten(-1, (-1, 2))
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x_BHLD.dtype)


class Rope1D(nn.Module):
    """1-D RoPE over `dim` channels with base `theta`; cos/sin looked up by position id.

    Usage: `cos, sin = rope(position_ids_BL)`, then `apply_rotary(q_BHLD, cos, sin)`. Position ids
    may restart per packed document. `theta` is a plain attribute and may be reassigned.
    """

    def __init__(self, dim: int, theta: float, max_len: int = 4096) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE dim must be even, got {dim}")
        self.dim = dim
        self.theta = float(theta)
        self.max_len = max_len
        self._cache: tuple[tuple, Tensor, Tensor] | None = None

    def inv_freq(self, device: torch.device | None = None) -> Tensor:
        """(P,) fp32 inverse frequencies theta ** (-2i / dim)."""
        exps = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        return self.theta**-exps

    def table(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos/sin tables (length', P) fp32 covering positions [0, length'), length' >= length."""
        length = max(length, self.max_len)
        key = (self.theta, device)
        if self._cache is None or self._cache[0] != key or self._cache[1].shape[0] < length:
            pos_L = torch.arange(length, dtype=torch.float32, device=device)
            ang_LP = pos_L[:, None] * self.inv_freq(device)[None, :]
            self._cache = (key, ang_LP.cos(), ang_LP.sin())
        return self._cache[1], self._cache[2]

    def forward(self, position_ids_BL: Tensor) -> tuple[Tensor, Tensor]:
        """(cos_BLP, sin_BLP) fp32. Position ids must be < max(L, max_len)."""
        cos_LP, sin_LP = self.table(position_ids_BL.shape[-1], position_ids_BL.device)
        return cos_LP[position_ids_BL], sin_LP[position_ids_BL]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}"


def grid_positions(grid_hw: Tensor, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Row (y) and column (x) index of every patch of images packed row-major: two (N,) longs.

    grid_hw: (n_img, 2) with each image's (h, w) patch grid.
    Example: grid_hw [[2, 3]] -> y = [0,0,0,1,1,1], x = [0,1,2,0,1,2].
    """
    ys, xs = [], []
    for h, w in grid_hw.tolist():
        ys.append(torch.arange(h, device=device).repeat_interleave(w))
        xs.append(torch.arange(w, device=device).repeat(h))
    return torch.cat(ys), torch.cat(xs)


class Rope2D(nn.Module):
    """MoonViT 2-D RoPE over a head dim `dim` (multiple of 4), from each image's (h, w) grid."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"2-D RoPE needs head dim divisible by 4, got {dim}")
        self.dim = dim
        self.theta = float(theta)

    def freqs(self, device: torch.device | None = None) -> Tensor:
        """(dim/4,) fp32: 1 / theta ** (arange(0, dim, 4) / dim)."""
        exps = torch.arange(0, self.dim, 4, dtype=torch.float32, device=device) / self.dim
        return self.theta**-exps

    def angles(self, y_N: Tensor, x_N: Tensor) -> Tensor:
        """(N, dim/2) rotation angles; pair 2i turns by x * f_i, pair 2i+1 by y * f_i."""
        f_F = self.freqs(y_N.device)
        ang_x = x_N.float()[:, None] * f_F[None]
        ang_y = y_N.float()[:, None] * f_F[None]
        return torch.stack((ang_x, ang_y), dim=-1).flatten(1)

    def temporal_freqs(self, device: torch.device | None = None) -> Tensor:
        """(dim/2,) fp32: g_j = 1 / theta ** (j / (dim/2)), the temporal turn of pair j."""
        P = self.dim // 2
        return self.theta ** -(torch.arange(P, dtype=torch.float32, device=device) / P)

    def forward(
        self, grid_hw: Tensor, device: torch.device | None = None, t_N: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(cos_NP, sin_NP) fp32 for the packed patches of `grid_hw`; use with `apply_rotary`.
        `t_N`: each patch's temporal index (video); None = all 0 (images)."""
        y_N, x_N = grid_positions(grid_hw, device)
        ang_NP = self.angles(y_N, x_N)
        if t_N is not None:
            ang_NP = ang_NP + t_N.float()[:, None] * self.temporal_freqs(ang_NP.device)[None]
        return ang_NP.cos(), ang_NP.sin()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}"

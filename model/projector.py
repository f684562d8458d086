"""Pixel-shuffle projector: merge m x m neighbouring patches into one LM token, then a 2-layer MLP.

Kimi-VL's KimiVLMultiModalProjector: (h, w, C) -> (h/m, w/m, m*m, C) -> LayerNorm over C for
each of the m*m sub-patches -> flatten to m*m*C -> Linear -> GELU -> Linear(-> LM width).

What is unusual: the merge is done for all packed images at once with one gather. The packed
patch order is row-major per image, so the m x m block at merged cell (r, c) of an image starting
at offset o is the patches o + (m*r + i) * w + (m*c + j) for i, j < m; merged tokens come out
row-major per image, images in order. h and w must be multiples of m.

Legend: N packed patches, C vision width, M merged tokens (sum h*w/m^2), S = m*m sub-patches,
F MLP hidden width, D LM width, n_img images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moonforge.model.config import ProjectorConfig, VisionConfig


def num_merged_tokens(grid_hw: Tensor, merge_size: int) -> int:
    """Total LM tokens produced for `grid_hw`: sum over images of h*w / merge_size**2."""
    return int((grid_hw[:, 0] * grid_hw[:, 1]).sum().item()) // merge_size**2


def merge_index(grid_hw: Tensor, merge_size: int, device: torch.device | None = None) -> Tensor:
    """(M, m*m) indices into the packed patches: row k lists the patches merged into token k.

    Raises ValueError when an image's h or w is not a multiple of `merge_size`.
    Example: grid [[2, 4]], m = 2 -> [[0, 1, 4, 5], [2, 3, 6, 7]].
    """
    m = merge_size
    out, offset = [], 0
    for h, w in grid_hw.tolist():
        if h % m or w % m:
            raise ValueError(
                f"image grid (h={h}, w={w}) is not divisible by merge_size={m}; "
                f"resize images to multiples of {m} patches per side"
            )
        r = torch.arange(h // m, device=device)[:, None, None, None]
        c = torch.arange(w // m, device=device)[None, :, None, None]
        i = torch.arange(m, device=device)[None, None, :, None]
        j = torch.arange(m, device=device)[None, None, None, :]
        idx = offset + (m * r + i) * w + (m * c + j)
        out.append(idx.reshape(-1, m * m))
        offset += h * w
    if not out:
        return torch.zeros(0, m * m, dtype=torch.long, device=device)
    return torch.cat(out)


class PixelShuffleProjector(nn.Module):
    """forward(feats_ND, grid_hw) -> tokens_MD for the LM (D = LM hidden size)."""

    def __init__(self, cfg: ProjectorConfig, vision: VisionConfig, lm_hidden: int) -> None:
        super().__init__()
        self.merge_size = vision.merge_size
        C = vision.hidden_size
        in_dim = vision.merge_size**2 * C
        hidden = cfg.hidden_size or in_dim
        self.pre_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.linear_1 = nn.Linear(in_dim, hidden, bias=True)
        self.linear_2 = nn.Linear(hidden, lm_hidden, bias=True)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, zero biases, unit LayerNorm."""
        for lin in (self.linear_1, self.linear_2):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        nn.init.ones_(self.pre_norm.weight)
        nn.init.zeros_(self.pre_norm.bias)

    def forward(self, feats_NC: Tensor, grid_hw: Tensor) -> Tensor:
        """Merge m x m patches per image and project: (N, C) -> (sum h*w/m^2, D)."""
        num_patches = int((grid_hw[:, 0] * grid_hw[:, 1]).sum())
        if num_patches != feats_NC.shape[0]:
            raise ValueError(f"grid_hw covers {num_patches} patches but feats has {feats_NC.shape[0]} rows")
        idx_MS = merge_index(grid_hw, self.merge_size, feats_NC.device)
        x_MSC = self.pre_norm(feats_NC[idx_MS])
        h_MF = F.gelu(self.linear_1(x_MSC.flatten(1)))
        return self.linear_2(h_MF)

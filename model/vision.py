"""MoonViT: a native-resolution ViT that encodes several images packed into one sequence (NaViT).

Input is pre-extracted patches: every image of (h, w) patches contributes h*w rows of
`pixels_NP`, in row-major patch order, each row the flattened (3, p, p) patch (channel-major,
the layout of a Conv2d(3, D, k=p, s=p) weight). The patch embedding is therefore a Linear over
3*p*p, numerically identical to that Conv2d and a 2-D parameter for Muon.

What is unusual:
- Positions are added twice: a learnable (G, G, D) absolute grid, bicubically interpolated to
  each image's (h, w), after the patch projection; and 2-D RoPE on q/k in every layer
  (`use_rope: false` drops the RoPE, leaving a plain SigLIP-style ViT with the same weights).
- All images of a batch form ONE row (B = 1) with block-diagonal non-causal attention: the
  document id of a patch is its image index. Packed output equals encoding each image alone.
  The attention metadata of that layout is built once per forward and shared by every block.
- Video goes through the same weights (Kimi K2.5 / Qwen2-VL): a clip is cut into temporal
  patches of TEMPORAL_PATCH frames (`video_patches`), each patchified like an image, so one
  grid entry per temporal patch. `media_group` puts a clip's entries in one attention document
  (every patch of the clip sees every other) and `media_t` gives their temporal index, which
  turns the 2-D RoPE further (rope.py); an image is group-of-one at t = 0, exactly as before.
  The temporal patch averages its frames' pixels: a Conv3d(k = (2, p, p)) whose kernel is the
  image kernel halved on both frames, so an image as two identical frames embeds as itself.

Legend: N total patches of all images, P = 3*p*p patch pixels, D hidden, H heads, Dh head dim,
I MLP width, G pos-grid side, n_img images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moonforge.model.attention import (
    AttnMeta,
    Backend,
    activation_dtype,
    attention,
    attention_meta,
    resolve_backend,
)
from moonforge.model.config import VisionConfig
from moonforge.model.rope import Rope2D, apply_rotary

TEMPORAL_PATCH = 2
"""Frames per temporal patch of a video (Qwen2-VL, Kimi K2.5)."""


def image_ids(grid_hw: Tensor, device: torch.device | None = None) -> Tensor:
    """(N,) image index of every packed patch: image i repeated h_i * w_i times."""
    return per_patch(torch.arange(len(grid_hw)), grid_hw, device)


def per_patch(values_n: Tensor, grid_hw: Tensor, device: torch.device | None = None) -> Tensor:
    """(N,) a per-grid-entry value repeated for each of its h * w patches."""
    sizes = (grid_hw[:, 0] * grid_hw[:, 1]).to(device)
    return values_n.to(device).repeat_interleave(sizes)


def video_patches(frames_TNP: Tensor) -> Tensor:
    """A clip's frames, each already patchified on one grid (T, N, P), -> temporal patches
    (ceil(T / TEMPORAL_PATCH), N, P): the mean of each run of TEMPORAL_PATCH frames (a last
    short run repeats its final frame, as Qwen2-VL pads). One frame -> itself."""
    T = frames_TNP.shape[0]
    pad = -T % TEMPORAL_PATCH
    if pad:
        frames_TNP = torch.cat([frames_TNP, frames_TNP[-1:].expand(pad, -1, -1)])
    return frames_TNP.unflatten(0, (-1, TEMPORAL_PATCH)).mean(dim=1)


def temporal_merge(
    feats_ND: Tensor, grid_hw: Tensor, media_group: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Average every k consecutive temporal patches of a clip (same group, hence same grid) into
    one: (feats (N', D), grid (n', 2), group (n',)). A clip's last run may be shorter; k = 1 and
    images (groups of one) pass through unchanged. Fewer LM tokens per clip, no new weights."""
    sizes = (grid_hw[:, 0] * grid_hw[:, 1]).tolist()
    groups = media_group.tolist()
    starts = [0]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)
    out, keep = [], []
    i = 0
    while i < len(sizes):
        j = i + 1
        while j < len(sizes) and j - i < k and groups[j] == groups[i]:
            j += 1
        run = [feats_ND[starts[e] : starts[e] + sizes[e]] for e in range(i, j)]
        out.append(run[0] if len(run) == 1 else torch.stack(run).mean(dim=0))
        keep.append(i)
        i = j
    idx = torch.tensor(keep, dtype=torch.long)
    return (torch.cat(out) if out else feats_ND), grid_hw[idx], media_group[idx]


def merged_tokens_per_entry(grid_hw: Tensor, media_group: Tensor, merge_size: int, k: int) -> Tensor:
    """LM tokens each grid entry ends up as after `temporal_merge` by k: a run's first entry
    carries the run's h*w / merge**2 tokens, the entries averaged into it none (int64 (n,))."""
    tokens = grid_hw[:, 0] * grid_hw[:, 1] // merge_size**2
    if k == 1:
        return tokens
    groups = media_group.tolist()
    first = [i == 0 or groups[i] != groups[i - 1] for i in range(len(groups))]
    pos, at = [], 0
    for f in first:
        at = 0 if f else at + 1
        pos.append(at)
    return tokens * (torch.tensor(pos, dtype=torch.long, device=tokens.device) % k == 0)


class PosEmbGrid(nn.Module):
    """Learnable (G, G, D) absolute positions, bicubically resized to each image's (h, w)."""

    def __init__(self, grid: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(grid, grid, dim))

    def for_grid(self, h: int, w: int) -> Tensor:
        """(h*w, D) position embeddings for one image, row-major."""
        G = self.weight.shape[0]
        if (h, w) == (G, G):
            return self.weight.flatten(0, 1)
        grid_1DGG = self.weight.permute(2, 0, 1)[None]
        out_1Dhw = F.interpolate(grid_1DGG, size=(h, w), mode="bicubic", align_corners=False)
        return out_1Dhw[0].flatten(1).T

    def forward(self, grid_hw: Tensor) -> Tensor:
        """(N, D) position embeddings for all packed images."""
        return torch.cat([self.for_grid(h, w) for h, w in grid_hw.tolist()])


class VisionBlock(nn.Module):
    """Pre-LN block: fused-qkv attention with 2-D RoPE (when cos/sin are given), then a GELU-tanh
    MLP."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.norm0 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.wqkv = nn.Linear(D, 3 * D, bias=True)
        self.wo = nn.Linear(D, D, bias=True)
        self.norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.fc0 = nn.Linear(D, cfg.intermediate_size, bias=True)
        self.fc1 = nn.Linear(cfg.intermediate_size, D, bias=True)

    def attention(self, x_ND: Tensor, cos_NP: Tensor | None, sin_NP: Tensor | None, meta: AttnMeta) -> Tensor:
        N, D = x_ND.shape
        qkv_3HND = self.wqkv(x_ND).view(N, 3, self.num_heads, -1).permute(1, 2, 0, 3)
        q_HND, k_HND = qkv_3HND[0], qkv_3HND[1]
        if cos_NP is not None:
            assert sin_NP is not None  # the rope tables come as a pair
            q_HND = apply_rotary(q_HND, cos_NP, sin_NP)
            k_HND = apply_rotary(k_HND, cos_NP, sin_NP)
        out_1HND = attention(q_HND[None], k_HND[None], qkv_3HND[2][None], meta)
        return self.wo(out_1HND[0].transpose(0, 1).reshape(N, D))

    def forward(self, x_ND: Tensor, cos_NP: Tensor | None, sin_NP: Tensor | None, meta: AttnMeta) -> Tensor:
        x_ND = x_ND + self.attention(self.norm0(x_ND), cos_NP, sin_NP, meta)
        h_NI = F.gelu(self.fc0(self.norm1(x_ND)), approximate="tanh")
        return x_ND + self.fc1(h_NI)


class MoonViT(nn.Module):
    """forward(pixels_NP, grid_hw) -> feats_ND: packed patch features, one row per patch."""

    def __init__(self, cfg: VisionConfig, backend: Backend = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        resolve_backend(backend, "cpu")  # reject unknown names at build
        self.attn_backend = backend
        D = cfg.hidden_size
        self.patch_embed = nn.Linear(3 * cfg.patch_size**2, D, bias=True)
        self.pos_emb = PosEmbGrid(cfg.pos_grid, D)
        self.rope = Rope2D(D // cfg.num_heads, cfg.rope_theta) if cfg.use_rope else None
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights and pos grid, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_emb.weight, std=std)

    def check_input(
        self,
        pixels_NP: Tensor,
        grid_hw: Tensor,
        media_t: Tensor | None = None,
        media_group: Tensor | None = None,
    ) -> None:
        """Raise ValueError when pixels and grid disagree, an image exceeds max_patches, or the
        video layout (one value per grid entry; a group's entries adjacent) is malformed."""
        n = len(grid_hw)
        for name, v in (("media_t", media_t), ("media_group", media_group)):
            if v is not None and v.shape != (n,):
                raise ValueError(f"{name} must have one value per grid entry ({n}), got {tuple(v.shape)}")
        if media_group is not None and n:
            runs = int((media_group[1:] != media_group[:-1]).sum()) + 1
            if runs != len(torch.unique(media_group)):
                raise ValueError(
                    f"media_group {media_group.tolist()} splits a clip: a clip's temporal patches "
                    "must be adjacent in the packed batch"
                )
        P = 3 * self.cfg.patch_size**2
        sizes = (grid_hw[:, 0] * grid_hw[:, 1]).tolist()
        if pixels_NP.dim() != 2 or pixels_NP.shape[1] != P:
            raise ValueError(f"pixels_NP must be (N, 3*p*p = {P}), got {tuple(pixels_NP.shape)}")
        if sum(sizes) != pixels_NP.shape[0]:
            raise ValueError(
                f"grid_hw covers {sum(sizes)} patches but pixels_NP has {pixels_NP.shape[0]} rows"
            )
        if sizes and max(sizes) > self.cfg.max_patches:
            raise ValueError(
                f"an image has {max(sizes)} patches > vision.max_patches="
                f"{self.cfg.max_patches}; resize it before encoding"
            )

    def forward(
        self,
        pixels_NP: Tensor,
        grid_hw: Tensor,
        media_t: Tensor | None = None,
        media_group: Tensor | None = None,
    ) -> Tensor:
        """Encode packed images and video temporal patches. pixels_NP: (N, 3*p*p); grid_hw:
        (n, 2) ints, one entry per image or temporal patch; media_t / media_group: (n,) temporal
        index and clip of each entry (None: images, each its own group at t = 0) -> (N, D)."""
        self.check_input(pixels_NP, grid_hw, media_t, media_group)
        x_ND = self.patch_embed(pixels_NP) + self.pos_emb(grid_hw).to(pixels_NP.dtype)
        cos_NP = sin_NP = None
        if self.rope is not None:
            t_N = None if media_t is None else per_patch(media_t, grid_hw, pixels_NP.device)
            cos_NP, sin_NP = self.rope(grid_hw, device=pixels_NP.device, t_N=t_N)
        if media_group is None:
            img_1N = image_ids(grid_hw, pixels_NP.device)[None]
        else:
            img_1N = per_patch(media_group, grid_hw, pixels_NP.device)[None]
        meta = attention_meta(
            img_1N, False, resolve_backend(self.attn_backend, x_ND.device), activation_dtype(x_ND)
        )
        for block in self.blocks:
            x_ND = block(x_ND, cos_NP, sin_NP, meta)
        return self.final_norm(x_ND)

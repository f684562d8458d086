"""The Kimi-VL-style VLM: MoonViT -> pixel-shuffle projector -> MoE LM (+ stage-1 towers).

The four child modules are the freeze groups stages address by name: `vision`, `projector`,
`lm`, `caption`. Text and images meet in `forward`: token embeddings are computed for the whole
packed batch, then the projected image tokens overwrite the embeddings at the `<|media_pad|>`
positions (media_mask_BL), in order: image 0's tokens row-major, then image 1's, and so on
across rows in row-major order of the batch.

What is unusual:
- `param_counts` instantiates the model on the meta device, so the full 16B shape is counted
  without allocating memory; active parameters are counted the DeepSeek / Moonlight way.

Legend: B batch rows, L sequence length, V vocab, D LM width, N packed patches,
P = 3*p*p pixels per patch, M image tokens (sum h*w / merge^2), n_img images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moonforge.model.attention import Backend
from moonforge.model.coca import CaptionTowers
from moonforge.model.config import VLMConfig
from moonforge.model.context_parallel import ContextParallel
from moonforge.model.experts import ExpertsImpl
from moonforge.model.lm import MoELM
from moonforge.model.projector import PixelShuffleProjector, num_merged_tokens
from moonforge.model.vision import MoonViT, merged_tokens_per_entry, temporal_merge

FREEZE_GROUPS = ("vision", "projector", "lm", "caption")
"""Names of the child modules that stages freeze or train as units."""


class VLM(nn.Module):
    """forward(input_ids_BL, position_ids_BL, doc_ids_BL, media_mask_BL, pixels_NP, grid_hw)
    -> logits_BLV."""

    reach_media_params: bool = False
    """Set while training under DeepSpeed ZeRO: a micro-batch without media still runs the
    vision tower and projector on one blank image and adds 0 x its output, so every rank's
    backward reaches the same parameters (ZeRO's bucketed gradient reduction fails when one
    rank's micro-batch has images and another's has none). Changes no value."""

    def __init__(
        self, cfg: VLMConfig, attn_backend: Backend = "auto", experts_impl: ExpertsImpl = "auto"
    ) -> None:
        super().__init__()
        self.cfg = cfg
        backend = attn_backend
        self.vision = MoonViT(cfg.vision, backend)
        self.projector = PixelShuffleProjector(cfg.projector, cfg.vision, cfg.lm.hidden_size)
        self.lm = MoELM(cfg.lm, backend, experts_impl)
        self.caption = CaptionTowers(cfg.caption, cfg.vision.hidden_size, cfg.lm.vocab_size, backend)

    def num_image_tokens(self, grid_hw: Tensor) -> int:
        """LM tokens the images of `grid_hw` become: sum of h*w / merge_size**2."""
        return num_merged_tokens(grid_hw, self.cfg.vision.merge_size)

    def encode_images(self, pixels_NP: Tensor, grid_hw: Tensor) -> Tensor:
        """Packed patches (N, P) of images with grids (n_img, 2) -> image tokens (M, D)."""
        return self.projector(self.vision(pixels_NP, grid_hw), grid_hw)

    def encode_media(
        self,
        pixels_NP: Tensor,
        grid_hw: Tensor,
        media_t: Tensor,
        media_group: Tensor,
        temporal_merge_size: int | None = None,
    ) -> Tensor:
        """Packed images and video temporal patches (see MoonViT.forward) -> LM tokens (M, D):
        the same ViT and projector weights for both; every `temporal_merge_size` consecutive
        temporal patches of a clip (default: the config's vision.temporal_merge_size) are
        averaged into one set of tokens."""
        k = self.cfg.vision.temporal_merge_size if temporal_merge_size is None else temporal_merge_size
        feats_ND = self.vision(pixels_NP, grid_hw, media_t, media_group)
        if k > 1:
            feats_ND, grid_hw, _ = temporal_merge(feats_ND, grid_hw, media_group, k)
        return self.projector(feats_ND, grid_hw)

    def embed(
        self,
        input_ids_BL: Tensor,
        media_mask_BL: Tensor | None = None,
        pixels_NP: Tensor | None = None,
        grid_hw: Tensor | None = None,
        media_t: Tensor | None = None,
        media_group: Tensor | None = None,
    ) -> Tensor:
        """Token embeddings (B, L, D) with image tokens scattered into media_mask_BL positions.
        With `media_t` / `media_group` (video: see `encode_media`) the grid entries are temporal
        patches of clips as well as images."""
        h_BLD = self.lm.embed(input_ids_BL)
        num_slots = 0 if media_mask_BL is None else int(media_mask_BL.sum())
        if pixels_NP is None or grid_hw is None:
            if num_slots:
                raise ValueError(
                    f"media_mask_BL has {num_slots} image positions but no "
                    "pixels_NP / grid_hw were given (0 image tokens)"
                )
            return self._reach_media_params(h_BLD)
        return self._scatter_media(h_BLD, media_mask_BL, num_slots, pixels_NP, grid_hw, media_t, media_group)

    def _reach_media_params(self, h_BLD: Tensor) -> Tensor:
        """h, plus 0 x a blank image's tokens when `reach_media_params` asks for it."""
        if not (self.reach_media_params and torch.is_grad_enabled()):
            return h_BLD
        v = self.cfg.vision
        grid = torch.tensor([[v.merge_size, v.merge_size]], device=h_BLD.device)
        blank = torch.zeros(v.merge_size**2, 3 * v.patch_size**2, device=h_BLD.device)
        return h_BLD + 0.0 * self.encode_images(blank, grid).sum().to(h_BLD.dtype)

    def _scatter_media(
        self,
        h_BLD: Tensor,
        media_mask_BL: Tensor | None,
        num_slots: int,
        pixels_NP: Tensor,
        grid_hw: Tensor,
        media_t: Tensor | None,
        media_group: Tensor | None,
    ) -> Tensor:
        """`embed`'s second half: encode the media and scatter their tokens into h."""
        if media_t is None and media_group is None:
            img_MD = self.encode_images(pixels_NP, grid_hw)
        else:
            n = len(grid_hw)
            t = torch.zeros(n, dtype=torch.long) if media_t is None else media_t
            group = torch.arange(n) if media_group is None else media_group
            img_MD = self.encode_media(pixels_NP, grid_hw, t, group)
        if num_slots != img_MD.shape[0]:
            raise ValueError(
                f"media_mask_BL has {num_slots} image positions but the images give "
                f"{img_MD.shape[0]} image tokens (grid_hw={grid_hw.tolist()}); "
                "the placeholder count must equal sum(h*w/merge^2), a clip's after its "
                "temporal merge (vision.temporal_merge_size)"
            )
        if media_mask_BL is None:  # only reachable when the images give 0 tokens
            raise ValueError("pixels_NP / grid_hw were given without media_mask_BL")
        return h_BLD.masked_scatter(media_mask_BL[..., None], img_MD.to(h_BLD.dtype))

    def forward(
        self,
        input_ids_BL: Tensor,
        position_ids_BL: Tensor,
        doc_ids_BL: Tensor,
        media_mask_BL: Tensor | None = None,
        pixels_NP: Tensor | None = None,
        grid_hw: Tensor | None = None,
        labels_BL: Tensor | None = None,
        media_t: Tensor | None = None,
        media_group: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, L, V); text-only when pixels_NP is None. With `labels_BL`, the mean
        next-token cross-entropy instead (see `MoELM.forward`). Raises ValueError when the count
        of True positions in media_mask_BL differs from the number of image tokens."""
        cp = self.lm.context_parallel
        if cp is None:
            h_BLD = self.embed(input_ids_BL, media_mask_BL, pixels_NP, grid_hw, media_t, media_group)
        else:  # context parallel: embed this rank's slice only, encoding only the media it shows
            h_BLD = self.embed_slice(
                cp, input_ids_BL, media_mask_BL, pixels_NP, grid_hw, media_t, media_group
            )
        return self.lm(None, position_ids_BL, doc_ids_BL, inputs_embeds_BLD=h_BLD, labels_BL=labels_BL)

    def embed_slice(
        self,
        cp: ContextParallel,
        input_ids_BL: Tensor,
        media_mask_BL: Tensor | None,
        pixels_NP: Tensor | None,
        grid_hw: Tensor | None,
        media_t: Tensor | None = None,
        media_group: Tensor | None = None,
    ) -> Tensor:
        """This context-parallel rank's slice (B, Lc, D) of `embed`: only the images (whole
        clips) with a token in the slice are encoded. Equal to cp.shard(embed(...)); the image
        an edge cuts is encoded by both ranks, each back-propagating its own tokens' gradient."""
        ids_BC = cp.shard(input_ids_BL)
        if pixels_NP is None or grid_hw is None or media_mask_BL is None:
            return self.embed(ids_BC, None if media_mask_BL is None else cp.shard(media_mask_BL))
        mask_BC = cp.shard(media_mask_BL)
        group_I = torch.arange(len(grid_hw)) if media_group is None else media_group
        v = self.cfg.vision  # LM tokens per grid entry (0 for one averaged into its run's first)
        k = v.temporal_merge_size if media_t is not None or media_group is not None else 1
        tokens_I = merged_tokens_per_entry(grid_hw, group_I, v.merge_size, k)
        # image token k's index in the batch's row-major media order, for the slice's tokens
        order_BL = media_mask_BL.flatten().long().cumsum(0).view_as(media_mask_BL) - 1
        local_K = cp.shard(order_BL)[mask_BC]
        ends_I = tokens_I.cumsum(0)
        owner_K = torch.searchsorted(ends_I, local_K, right=True)  # skips 0-token entries
        # whole clips (a clip is one document). A slice that shows no media still encodes the
        # first entry and scatters none of it: every rank's backward then reaches the same
        # parameters (zero gradients), which ZeRO's bucketed reduction needs on every rank.
        needed = group_I[owner_K] if len(owner_K) else group_I[:1]
        keep_I = torch.isin(group_I, needed)
        patches_I = grid_hw[:, 0] * grid_hw[:, 1]
        keep_N = torch.repeat_interleave(keep_I, patches_I)
        sub = (pixels_NP[keep_N], grid_hw[keep_I])
        if media_t is None and media_group is None:
            img_MD = self.encode_images(*sub)
        else:
            t = torch.zeros(len(grid_hw), dtype=torch.long) if media_t is None else media_t
            img_MD = self.encode_media(*sub, t[keep_I], group_I[keep_I])
        # row of token k in the kept images' features: its offset within its image, plus the
        # kept tokens before its image
        starts_I = ends_I - tokens_I
        kept_before_I = (tokens_I * keep_I).cumsum(0) - tokens_I * keep_I
        rows_K = kept_before_I[owner_K] + local_K - starts_I[owner_K]
        h_BCD = self.lm.embed(ids_BC)
        return h_BCD.masked_scatter(mask_BC[..., None], img_MD[rows_K].to(h_BCD.dtype))


def build_vlm(
    cfg: VLMConfig,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    attn_backend: Backend = "auto",
    experts_impl: ExpertsImpl = "auto",
) -> VLM:
    """Construct and initialise a VLM directly on `device` ("meta" allocates nothing).

    With `seed` (or a prior torch.manual_seed) the init is deterministic for a given device.
    `attn_backend` (model/attention.py) and `experts_impl` (model/experts.py) are runtime
    choices: `auto` picks by device (flash varlen on CUDA, the cost-chosen SDPA form on CPU;
    grouped GEMM wherever torch has it); `experts_impl="grouped_mm"` fails where it cannot run.
    """
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        return VLM(cfg, attn_backend, experts_impl)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts(cfg: VLMConfig) -> dict[str, int]:
    """Parameter counts of the shape `cfg`, built on the meta device.

    Keys: vision, projector, caption, lm_total, lm_total_no_embed, lm_active,
    lm_active_no_embed, lm_embed (embed_tokens + lm_head; embed_tokens alone when tied), and
    vlm_total / vlm_active (vision + projector + LM, with embeddings; the caption towers are
    stage-1 only).
    Active = everything except the routed experts a token does not visit: per MoE layer,
    top-k routed experts + shared experts + router, plus attention, dense FFNs and norms
    (DeepSeek / Moonlight convention; "no_embed" drops embed_tokens and lm_head).
    """
    model = build_vlm(cfg, device="meta")
    lm = model.lm
    embed = _numel(lm.embed_tokens) + (_numel(lm.lm_head) if lm.lm_head is not None else 0)
    total = _numel(lm)
    idle_experts = sum(
        (moe.num_experts - cfg.lm.num_experts_per_tok) * moe.experts.params_per_expert()
        for _, moe in lm.moe_layers()
    )
    counts = {
        "vision": _numel(model.vision),
        "projector": _numel(model.projector),
        "caption": _numel(model.caption),
        "lm_total": total,
        "lm_total_no_embed": total - embed,
        "lm_active": total - idle_experts,
        "lm_active_no_embed": total - idle_experts - embed,
        "lm_embed": embed,
    }
    counts["vlm_total"] = counts["vision"] + counts["projector"] + counts["lm_total"]
    counts["vlm_active"] = counts["vision"] + counts["projector"] + counts["lm_active"]
    return counts

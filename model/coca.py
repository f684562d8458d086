"""Stage-1 (CoCa-like) towers trained with MoonViT: a SigLIP text encoder and a caption decoder.

Loss (in the stage, not here): L = L_siglip(image_embed, text_embed) + 2 * L_caption.

Design choices (the sources leave them open):
- Image embedding: a SigLIP-style MAP head. One learned probe query attends (per image, never
  across images) over that image's ViT patch features; then LayerNorm + residual MLP, a Linear to
  `embed_dim`, L2 normalisation.
- Text encoder: bidirectional pre-LN transformer with learned absolute positions; masked mean
  pooling over real tokens -> Linear -> L2 normalisation.
- Caption decoder: a tiny decoder-only LM whose prefix is the image's patch features (Linear to
  the tower width). Attention is causal over the whole [prefix | caption] row (simplest; the
  prefix also reads causally). Rows are LEFT-padded so every caption sits in the last L positions.
- The token embedding is shared by the text encoder and the decoder (it sits on this module, not
  inside either tower, so the state_dict holds it once); the caption head is a separate Linear.
- SigLIP's learnable temperature t' and bias b live here: logits = exp(t') * <x, y> + b.

Legend: N packed patches, Dv ViT width, C tower width, E joint embedding width, H heads,
n_img images, B captions (= n_img for the decoder), L caption length, V vocab, n most patches
of any image (the prefix width), R = n + L decoder row length.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping

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
from moonforge.model.config import CaptionTowerConfig
from moonforge.model.vision import image_ids


class TowerBlock(nn.Module):
    """Pre-LN transformer block (fused qkv, GELU-tanh MLP of width 4C); causal or not as the
    tower's attention metadata says."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.H = num_heads
        self.norm0 = nn.LayerNorm(dim)
        self.wqkv = nn.Linear(dim, 3 * dim)
        self.wo = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc0 = nn.Linear(dim, 4 * dim)
        self.fc1 = nn.Linear(4 * dim, dim)

    def forward(self, x_BLC: Tensor, meta: AttnMeta) -> Tensor:
        B, L, C = x_BLC.shape
        qkv_3BHLc = self.wqkv(self.norm0(x_BLC)).view(B, L, 3, self.H, -1).permute(2, 0, 3, 1, 4)
        q_BHLc, k_BHLc, v_BHLc = qkv_3BHLc.unbind(0)
        out_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, meta)
        x_BLC = x_BLC + self.wo(out_BHLc.transpose(1, 2).reshape(B, L, C))
        return x_BLC + self.fc1(F.gelu(self.fc0(self.norm1(x_BLC)), approximate="tanh"))


class AttentionPool(nn.Module):
    """MAP head: one learned query per image over its patches. (N, Dv) -> (n_img, C)."""

    def __init__(self, vision_dim: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.H = num_heads
        self.probe = nn.Parameter(torch.empty(dim))
        self.k_proj = nn.Linear(vision_dim, dim)
        self.v_proj = nn.Linear(vision_dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc0 = nn.Linear(dim, 4 * dim)
        self.fc1 = nn.Linear(4 * dim, dim)

    def forward(self, feats_NDv: Tensor, grid_hw: Tensor) -> Tensor:
        n_img, N = grid_hw.shape[0], feats_NDv.shape[0]
        C = self.probe.shape[0]
        k_1HNc = self.k_proj(feats_NDv).view(N, self.H, -1).transpose(0, 1)[None]
        v_1HNc = self.v_proj(feats_NDv).view(N, self.H, -1).transpose(0, 1)[None]
        q_1HIc = self.probe.view(self.H, 1, -1).expand(self.H, n_img, -1)[None]
        img_N = image_ids(grid_hw, feats_NDv.device)
        # queries (one per image) and keys (patches) differ in length, so not `attend`: a mask
        own_IN = img_N[None, :] == torch.arange(n_img, device=img_N.device)[:, None]
        mask_11IN = own_IN[None, None]
        out_1HIc = F.scaled_dot_product_attention(q_1HIc, k_1HNc, v_1HNc, attn_mask=mask_11IN)
        x_IC = self.o_proj(out_1HIc[0].transpose(0, 1).reshape(n_img, C))
        return x_IC + self.fc1(F.gelu(self.fc0(self.norm(x_IC)), approximate="tanh"))


class CaptionTowers(nn.Module):
    """image_embed / text_embed for SigLIP, caption_logits for the caption loss."""

    def __init__(
        self,
        cfg: CaptionTowerConfig,
        vision_dim: int,
        vocab_size: int,
        backend: Backend = "auto",
        logit_scale_init: float = math.log(10.0),
        logit_bias_init: float = -10.0,
    ) -> None:
        super().__init__()
        C, H = cfg.hidden_size, cfg.num_heads
        if C % H:
            raise ValueError(f"model.caption.hidden_size={C} is not divisible by num_heads={H}")
        self.cfg = cfg
        resolve_backend(backend, "cpu")  # reject unknown names at build
        self.attn_backend = backend
        self.tok_embed = nn.Embedding(vocab_size, C)
        # text encoder
        self.text_pos = nn.Parameter(torch.empty(cfg.max_text_len, C))
        self.text_blocks = nn.ModuleList(TowerBlock(C, H) for _ in range(cfg.num_text_layers))
        self.text_norm = nn.LayerNorm(C)
        self.text_proj = nn.Linear(C, cfg.embed_dim)
        # image embedding
        self.pool = AttentionPool(vision_dim, C, H)
        self.img_proj = nn.Linear(C, cfg.embed_dim)
        # caption decoder
        self.prefix_proj = nn.Linear(vision_dim, C)
        self.dec_pos = nn.Parameter(torch.empty(cfg.max_text_len, C))
        self.dec_blocks = nn.ModuleList(TowerBlock(C, H) for _ in range(cfg.num_decoder_layers))
        self.dec_norm = nn.LayerNorm(C)
        self.caption_head = nn.Linear(C, vocab_size, bias=False)
        # SigLIP temperature (log-space) and bias: 1-element vectors, as HF's SiglipModel keeps
        # them (DeepSpeed's ZeRO cannot hold a 0-dim parameter: stages/train/distributed.py)
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.logit_bias = nn.Parameter(torch.empty(1))
        self.reset_parameters(logit_scale_init, logit_bias_init)

    def _load_from_state_dict(
        self, state_dict: MutableMapping[str, Tensor], prefix: str, *args, **kwargs
    ) -> None:
        for name in ("logit_scale", "logit_bias"):  # artifacts written before they were vectors
            t = state_dict.get(prefix + name)
            if t is not None and t.dim() == 0:
                state_dict[prefix + name] = t.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(
        self, logit_scale_init: float = math.log(10.0), logit_bias_init: float = -10.0, std: float = 0.02
    ) -> None:
        """Normal(0, std) weights, zero biases, unit LayerNorms, SigLIP t' and b set as given."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                bias = getattr(m, "bias", None)
                if bias is not None:
                    nn.init.zeros_(bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.text_pos, self.dec_pos, self.pool.probe):
            nn.init.normal_(p, std=std)
        self.init_logit_params(logit_scale_init, logit_bias_init)

    @torch.no_grad()
    def init_logit_params(self, logit_scale_init: float, logit_bias_init: float) -> None:
        """Set SigLIP's t' (log temperature) and b, e.g. from the stage config."""
        self.logit_scale.fill_(logit_scale_init)
        self.logit_bias.fill_(logit_bias_init)

    def _meta(self, doc_ids_BL: Tensor, causal: bool, x_BLC: Tensor) -> AttnMeta:
        """A tower's attention metadata, built once per call and shared by its blocks."""
        return attention_meta(
            doc_ids_BL, causal, resolve_backend(self.attn_backend, x_BLC.device), activation_dtype(x_BLC)
        )

    def _check_len(self, L: int) -> None:
        if L > self.cfg.max_text_len:
            raise ValueError(
                f"caption length {L} > model.caption.max_text_len="
                f"{self.cfg.max_text_len}; truncate captions before the towers"
            )

    def image_embed(self, feats_NDv: Tensor, grid_hw: Tensor) -> Tensor:
        """(N, Dv) packed ViT features -> (n_img, E) unit-norm image embeddings."""
        return F.normalize(self.img_proj(self.pool(feats_NDv, grid_hw)), dim=-1)

    def text_embed(self, ids_BL: Tensor, mask_BL: Tensor) -> Tensor:
        """(B, L) caption ids + bool mask of real tokens -> (B, E) unit-norm text embeddings."""
        B, L = ids_BL.shape
        self._check_len(L)
        mask_BL = mask_BL.bool()
        x_BLC = self.tok_embed(ids_BL) + self.text_pos[:L]
        meta = self._meta(torch.where(mask_BL, 0, -1), False, x_BLC)
        for block in self.text_blocks:
            x_BLC = block(x_BLC, meta)
        x_BLC = self.text_norm(x_BLC)
        w_BL1 = mask_BL[..., None].to(x_BLC.dtype)
        pooled_BC = (x_BLC * w_BL1).sum(1) / w_BL1.sum(1).clamp(min=1.0)
        return F.normalize(self.text_proj(pooled_BC), dim=-1)

    def siglip_logits(self, img_emb_IE: Tensor, txt_emb_BE: Tensor) -> Tensor:
        """(I, B) pair logits exp(t') * <x_i, y_j> + b."""
        return self.logit_scale.exp() * img_emb_IE @ txt_emb_BE.T + self.logit_bias

    def _prefix_rows(self, feats_NDv: Tensor, grid_hw: Tensor) -> tuple[Tensor, int]:
        """Left-padded rows of each image's projected patches: (n_img, max_n, C) and max_n."""
        sizes_I = grid_hw[:, 0] * grid_hw[:, 1]
        n_img, max_n = len(sizes_I), int(sizes_I.max())
        img_N = image_ids(grid_hw, feats_NDv.device)
        starts_I = F.pad(sizes_I.cumsum(0), (1, 0))[:-1].to(feats_NDv.device)
        local_N = torch.arange(len(img_N), device=img_N.device) - starts_I[img_N]
        col_N = max_n - sizes_I.to(img_N.device)[img_N] + local_N
        prefix_NC = self.prefix_proj(feats_NDv)
        x_InC = prefix_NC.new_zeros(n_img, max_n, prefix_NC.shape[-1])
        return x_InC.index_put((img_N, col_N), prefix_NC), max_n

    def caption_logits(self, feats_NDv: Tensor, grid_hw: Tensor, ids_BL: Tensor) -> Tensor:
        """Next-token logits (B, L, V) for captions conditioned on their image (B = n_img).

        logits[:, t] predicts ids[:, t + 1]; logits[:, -1] has no target. Caption padding must
        be masked by the loss (causal attention keeps it from affecting earlier positions).
        """
        B, L = ids_BL.shape
        self._check_len(L)
        if B != grid_hw.shape[0]:
            raise ValueError(f"{B} captions for {grid_hw.shape[0]} images; need one per image")
        prefix_BnC, max_n = self._prefix_rows(feats_NDv, grid_hw)
        caption_BLC = self.tok_embed(ids_BL) + self.dec_pos[:L]
        x_BRC = torch.cat([prefix_BnC, caption_BLC], dim=1)
        sizes_B = (grid_hw[:, 0] * grid_hw[:, 1]).to(ids_BL.device)
        col_R = torch.arange(max_n + L, device=ids_BL.device)
        doc_BR = torch.where(col_R[None] >= (max_n - sizes_B)[:, None], 0, -1)
        meta = self._meta(doc_BR, True, x_BRC)
        for block in self.dec_blocks:
            x_BRC = block(x_BRC, meta)
        return self.caption_head(self.dec_norm(x_BRC[:, max_n:]))

"""Losses: next-token CE on packed LM batches, SigLIP's sigmoid loss, the CoCa caption loss.

Shapes: B batch rows, L sequence length, V vocab, E joint embedding width.
Labels are pre-shifted by the packer: `labels_BL[b, t]` is the target for `logits_BLV[b, t]`, with
-100 on padding, media pads, prompts (SFT) and document ends, so no token predicts across documents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moonforge.model.lm_loss import IGNORE


def token_ce(logits_BLV: Tensor, labels_BL: Tensor) -> tuple[Tensor, int]:
    """Mean CE over labelled tokens (per-token normalisation over the packed micro-batch)."""
    n = int((labels_BL != IGNORE).sum())
    if n == 0:
        raise ValueError("batch has no labelled tokens: every label is -100 (check the loss mask)")
    loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), labels_BL.flatten(), ignore_index=IGNORE)
    return loss, n


def lm_forward(model: nn.Module, batch, labels_BL: Tensor | None = None) -> Tensor:
    """The model on an LMBatch: logits, or with `labels_BL` the model's own mean CE."""
    return model(
        batch.input_ids_BL,
        batch.position_ids_BL,
        batch.doc_ids_BL,
        media_mask_BL=batch.media_mask_BL,
        pixels_NP=batch.pixels_NP,
        grid_hw=batch.grid_hw,
        labels_BL=labels_BL,
        media_t=batch.media_t,
        media_group=batch.media_group,
    )


def lm_loss(model: nn.Module, batch) -> tuple[Tensor, dict[str, float]]:
    """Next-token CE of the VLM on an LMBatch (text, image-text, QA or long documents); the
    model computes it from its hidden states (never keeping big logits: model/lm_loss.py),
    through its own forward so that DDP / DeepSpeed wrappers see the call."""
    n = int((batch.labels_BL != IGNORE).sum())
    if n == 0:
        raise ValueError("batch has no labelled tokens: every label is -100 (check the loss mask)")
    loss = lm_forward(model, batch, labels_BL=batch.labels_BL)
    return loss, {"tokens": float(n)}


def siglip_loss(img_BE: Tensor, txt_BE: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """SigLIP: -(1/|B|) sum_ij log sigmoid(z_ij * (exp(t') <x_i, y_j> + b)), z = +1 on the diagonal.

    Inputs are L2-normalised embeddings (B, E); t' (logit_scale) and b are learnable scalars.
    """
    logits_BB = logit_scale.exp() * img_BE @ txt_BE.T + logit_bias
    z_BB = 2 * torch.eye(len(img_BE), device=img_BE.device) - 1
    return -F.logsigmoid(z_BB * logits_BB).sum() / len(img_BE)


def caption_loss(logits_BLV: Tensor, text_ids_BL: Tensor, text_mask_BL: Tensor) -> Tensor:
    """Mean CE of the caption decoder; logits[:, t] predicts text_ids[:, t + 1] (CoCa captioning)."""
    target = text_ids_BL[:, 1:].masked_fill(~text_mask_BL[:, 1:].bool(), IGNORE)
    return F.cross_entropy(logits_BLV[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE)

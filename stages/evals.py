"""Closing evals shared by the stages: held-out LM loss, exact-match answer accuracy, retrieval.

Answer accuracy is teacher-forced exact match: a document counts as correct when the argmax at
every supervised position equals its label. For answer-only loss masks (QA, needle questions)
that is exactly "greedy decoding reproduces the answer and then stops", in one forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moonforge.stages.data.records import read_image_records, read_text_records
from moonforge.stages.data.sources import caption_docs, qa_docs, text_docs
from moonforge.stages.train.objectives import IGNORE, lm_forward, token_ce

if TYPE_CHECKING:
    from moonforge.model.vlm import VLM


@torch.no_grad()
def lm_eval_loss(model: nn.Module, batches: Iterable) -> dict[str, float]:
    """Token-weighted mean CE and perplexity over `batches` (LMBatch)."""
    model.eval()
    total, n = 0.0, 0
    for batch in batches:
        loss, k = token_ce(lm_forward(model, batch), batch.labels_BL)
        total, n = total + loss.item() * k, n + k
    mean = total / max(n, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": float(n)}


def _doc_correct(pred_BL: Tensor, labels_BL: Tensor, doc_ids_BL: Tensor) -> list[bool]:
    ok_BL = (pred_BL == labels_BL) | (labels_BL == IGNORE)
    supervised_BL = labels_BL != IGNORE
    out = []
    for b in range(labels_BL.shape[0]):
        for d in doc_ids_BL[b].unique().tolist():
            if d < 0:
                continue
            in_doc = doc_ids_BL[b] == d
            if supervised_BL[b][in_doc].any():
                out.append(bool(ok_BL[b][in_doc].all()))
    return out


@torch.no_grad()
def exact_match(model: nn.Module, batches: Iterable) -> dict[str, float]:
    """Fraction of documents whose supervised tokens are all predicted (greedy) correctly."""
    model.eval()
    results: list[bool] = []
    for batch in batches:
        pred_BL = lm_forward(model, batch).argmax(-1)
        results += _doc_correct(pred_BL, batch.labels_BL, batch.doc_ids_BL)
    return {"acc": sum(results) / max(len(results), 1), "n": float(len(results))}


@torch.no_grad()
def retrieval_accuracy(model: VLM, batch) -> dict[str, float]:
    """Image -> text top-1 accuracy over an ImageTextBatch whose image i matches text i.

    The eval batch holds distinct captions, so chance is 1 / num_images.
    """
    model.eval()
    towers = model.caption
    feats = model.vision(batch.pixels_NP, batch.grid_hw)
    img = towers.image_embed(feats, batch.grid_hw)
    txt = towers.text_embed(batch.text_ids_BL, batch.text_mask_BL)
    top = (img @ txt.T).argmax(-1)
    n = len(top)
    acc = (top == torch.arange(n, device=top.device)).float().mean().item()
    return {"acc": acc, "chance": 1.0 / n, "n": float(n)}


@dataclass(frozen=True)
class HeldOut:
    """Held-out batches built once per stage: text LM, image-conditioned text, and VQA."""

    text: list
    caption: list
    vqa: list


def heldout_sets(tok, text_dir, world_dir, make_batches) -> HeldOut:
    """Build the val-split sets; `make_batches(source)` packs a DocSource in index order."""
    text = make_batches(text_docs(read_text_records(text_dir, "val"), tok)) if text_dir else []
    images = read_image_records(world_dir, "val")
    return HeldOut(
        text=text,
        caption=make_batches(caption_docs(images, world_dir / "val", tok, ("caption",))),
        vqa=make_batches(qa_docs(images, world_dir / "val", tok)),
    )


def heldout_metrics(model: nn.Module, sets: HeldOut, suffix: str = "") -> dict[str, float]:
    """eval/text_loss, eval/caption_loss (image-conditioned) and eval/vqa_acc (exact match)."""
    out = {
        f"eval/caption_loss{suffix}": lm_eval_loss(model, sets.caption)["loss"],
        f"eval/vqa_acc{suffix}": exact_match(model, sets.vqa)["acc"],
    }
    if sets.text:
        out[f"eval/text_loss{suffix}"] = lm_eval_loss(model, sets.text)["loss"]
    return out

"""Closing evals shared by the stages: held-out LM loss, exact-match answer accuracy, retrieval.

Answer accuracy is teacher-forced exact match: a document counts as correct when the argmax at
every supervised position equals its label. For answer-only loss masks (QA, needle questions)
that is exactly "greedy decoding reproduces the answer and then stops", in one forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moonforge.stages.data.records import ImageRecord, read_image_records, read_text_records
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
    """Held-out batches built once per stage: text LM, image-conditioned text, VQA, and the same
    VQA with each question shown another image (`other_image`)."""

    text: list
    caption: list
    vqa: list
    vqa_other_image: list


def other_image(images: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Each record showing the image of the next record of its size (in order; a size no other
    record has keeps its own): the control that tells a model reading the image from one
    answering from the question alone, as shuffled frames are for video QA."""
    by_size: dict[tuple[int, int], list[ImageRecord]] = {}
    for r in images:
        by_size.setdefault((r.width, r.height), []).append(r)
    out = []
    for r in images:
        same = by_size[(r.width, r.height)]
        out.append(r.model_copy(update={"image": same[(same.index(r) + 1) % len(same)].image}))
    return out


def heldout_sets(tok, text_dir, world_dir, make_batches) -> HeldOut:
    """Build the val-split sets; `make_batches(source)` packs a DocSource in index order."""
    text = make_batches(text_docs(read_text_records(text_dir, "val"), tok)) if text_dir else []
    images = read_image_records(world_dir, "val")
    return HeldOut(
        text=text,
        caption=make_batches(caption_docs(images, world_dir / "val", tok, ("caption",))),
        vqa=make_batches(qa_docs(images, world_dir / "val", tok)),
        vqa_other_image=make_batches(qa_docs(other_image(images), world_dir / "val", tok)),
    )


def heldout_metrics(model: nn.Module, sets: HeldOut, suffix: str = "") -> dict[str, float]:
    """eval/text_loss, eval/caption_loss (image-conditioned), eval/vqa_acc (exact match) and
    eval/vqa_acc_other_image (the same questions about another image of the same size: equal
    to vqa_acc when the model does not read the image)."""
    out = {
        f"eval/caption_loss{suffix}": lm_eval_loss(model, sets.caption)["loss"],
        f"eval/vqa_acc{suffix}": exact_match(model, sets.vqa)["acc"],
        f"eval/vqa_acc_other_image{suffix}": exact_match(model, sets.vqa_other_image)["acc"],
    }
    if sets.text:
        out[f"eval/text_loss{suffix}"] = lm_eval_loss(model, sets.text)["loss"]
    return out

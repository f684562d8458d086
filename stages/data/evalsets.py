"""Held-out evaluation sets over the val splits: fixed order, no randomness, same formats as training.

* `lm_eval_batches`: a DocSource packed in index order -> a list of LMBatch (validation loss).
* `vqa_eval_items`: image + question prompt -> expected answer string (exact-match accuracy).
  The plain prompt is the prefix of a qa_docs document up to "Answer:"; `chat=True` gives the
  ChatML prompt (user turn with the image and question, then an open assistant header).
* `retrieval_eval_batch`: N images and their N captions, image i matching caption i (records
  with a caption already used are dropped, so the match is unique).
* `needle_eval_items`: long document + question -> the needle's value.

Corrupt images are skipped, as in training, with the same threshold error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.data.batches import (
    ImageTextBatch,
    LMBatch,
    collate_rows,
    load_doc_images,
    pad_texts,
    text_ids,
)
from moonforge.stages.data.images import ImageLoader, num_image_tokens, to_patches
from moonforge.stages.data.packing import RowPacker
from moonforge.stages.data.records import ImageRecord, LongDocRecord
from moonforge.stages.data.sources import DocSource, VisionSpec, needle_parts, qa_prompt


def lm_eval_batches(
    source: DocSource,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    vision: VisionSpec,
    max_docs: int | None = None,
) -> list[LMBatch]:
    """Documents 0..max_docs-1 of `source`, packed in order into batches (the last may be short)."""
    packer = RowPacker(seq_len, tokenizer.pad_id, ignore_ids=(tokenizer.media_pad_id,))
    rows = []
    for i in range(min(len(source), max_docs or len(source))):
        doc = source.doc(i, vision)
        if doc is None:  # only a declared dataset's source has bad records
            raise ValueError(
                f"evaluation source {source.name!r}: document {i} is a bad record; "
                "evaluate generated sources only"
            )
        images = load_doc_images(doc, vision) if doc.images else None
        if doc.images and images is None:
            continue
        rows += packer.add(doc.ids, doc.loss_mask, images)
    rows += packer.flush()
    return [
        collate_rows(rows[i : i + batch_size], tokenizer.media_pad_id)
        for i in range(0, len(rows), batch_size)
    ]


@dataclass(frozen=True)
class VQAItem:
    """One visual question: generate from `prompt_ids` (with the image), compare to `answer`."""

    record_id: str
    type: str
    prompt_ids: list[int]
    pixels_NP: torch.Tensor
    grid_hw: tuple[int, int]
    answer: str


def vqa_eval_items(
    records: Sequence[ImageRecord],
    image_root: Path,
    tokenizer: Tokenizer,
    vision: VisionSpec,
    limit: int | None = None,
    chat: bool = False,
    dataset_name: str = "toyworld/val",
) -> list[VQAItem]:
    """Every QA pair of `records` in order (at most `limit`), with its image patched."""
    loader = ImageLoader(dataset_name, image_root, len(records))
    items: list[VQAItem] = []
    for rec in records:
        if limit is not None and len(items) >= limit:
            break
        img = loader.load(rec.image)
        if img is None:
            continue
        pixels, grid = to_patches(img, vision.patch_size, vision.merge_size, vision.max_patches)
        n = num_image_tokens(grid, vision.merge_size)
        for qa in rec.qa[: None if limit is None else limit - len(items)]:
            if chat:
                ids, _ = tokenizer.encode_chat(
                    [{"role": "user", "content": f"<image>\n{qa.question}"}], [n], add_generation_prompt=True
                )
            else:
                ids = tokenizer.media_placeholder(n) + qa_prompt(tokenizer, qa.question)
            items.append(VQAItem(rec.id, qa.type, ids, pixels, grid, qa.answer))
    return items


def retrieval_eval_batch(
    records: Sequence[ImageRecord],
    image_root: Path,
    tokenizer: Tokenizer,
    vision: VisionSpec,
    max_text_len: int,
    limit: int | None = None,
    dataset_name: str = "toyworld/val",
) -> ImageTextBatch:
    """Images and captions with distinct captions, image i <-> caption i; chance = 1 / num_images."""
    loader = ImageLoader(dataset_name, image_root, len(records))
    pixels: list[torch.Tensor] = []
    grids: list[tuple[int, int]] = []
    texts: list[list[int]] = []
    seen: set[str] = set()
    for rec in records:
        if (limit is not None and len(grids) >= limit) or rec.caption in seen:
            continue
        img = loader.load(rec.image)
        if img is None:
            continue
        seen.add(rec.caption)
        p, g = to_patches(img, vision.patch_size, vision.merge_size, vision.max_patches)
        pixels.append(p)
        grids.append(g)
        texts.append(text_ids(tokenizer, rec.caption, max_text_len))
    ids, mask = pad_texts(texts, tokenizer.pad_id)
    return ImageTextBatch(torch.cat(pixels), torch.tensor(grids, dtype=torch.long), ids, mask)


@dataclass(frozen=True)
class NeedleItem:
    """A long prompt ending in "Answer:"; the model should generate `answer`."""

    record_id: str
    prompt_ids: list[int]
    answer: str
    depth: float
    num_tokens: int


def needle_eval_items(
    records: Sequence[LongDocRecord],
    tokenizer: Tokenizer,
    max_tokens: int | None = None,
    limit: int | None = None,
) -> list[NeedleItem]:
    """Needle-recall prompts in record order; `max_tokens` bounds prompt + answer like long_docs."""
    items = []
    for rec in records[:limit]:
        context, answer = needle_parts(rec, tokenizer, max_tokens)
        items.append(NeedleItem(rec.id, context, rec.answer, rec.depth, len(context) + len(answer)))
    return items

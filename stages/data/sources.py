"""Document sources: how dataset records become token documents for LM-style training.

A `DocSource` is an indexable set of documents; `lm_batches` samples from several of them by
weight, evaluation iterates one in index order. Building document i is deterministic and cheap:
image documents carry `ImageRef`s (path + patch grid from the record's width/height) and their
pixels are only loaded when a batch is assembled. Document formats (the model sees exactly
these; evaluation prompts are their prefixes):

  text_docs     {text} <|endoftext|>                                 loss on every token
  caption_docs  [image] {caption | ocr | alt_text} <|endoftext|>     loss on the text
  qa_docs       [image] \\nQuestion: {q}\\nAnswer: {a} <|endoftext|>   loss on " {a}" + eos
  long_docs     {text}\\n\\nQuestion: {q}\\nAnswer: {a} <|endoftext|>   loss on every token

where [image] is `Tokenizer.media_placeholder(h * w / merge**2)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from moonforge.model.config import VisionConfig
from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.data.images import ImageLoader, num_image_tokens, patch_grid, to_patches
from moonforge.stages.data.records import ImageRecord, LongDocRecord, TextRecord
from moonforge.stages.data.shard_order import ShardOrder


class ImageCounter(Protocol):
    """What a DocSource keeps of its image loader (an ImageLoader, or a declared set's reader):
    where the images are and how many were skipped as bad."""

    root: Path
    skipped: int


@dataclass(frozen=True)
class VisionSpec:
    """How images are patched for the model at hand (from the recipe's model.vision)."""

    patch_size: int
    merge_size: int
    max_patches: int
    temporal_merge: int = 1
    """Video: temporal patches averaged into one set of LM tokens (vision.temporal_merge_size)."""

    @classmethod
    def of(cls, v: VisionConfig, max_patches: int | None = None) -> VisionSpec:
        """The spec of a model's vision config (`max_patches` lowers its cap, e.g. a resolution
        schedule's)."""
        return cls(v.patch_size, v.merge_size, max_patches or v.max_patches, v.temporal_merge_size)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        return patch_grid(width, height, self.patch_size, self.merge_size, self.max_patches)


@dataclass(frozen=True)
class Media:
    """One grid entry of a batch's media: an image, or one temporal patch of a clip."""

    pixels_NP: torch.Tensor
    grid_hw: tuple[int, int]
    t: int = 0
    """The temporal patch's index in its clip (0 for an image)."""
    clip: int | None = None
    """Which clip of its document the entry belongs to; None for an image."""


def media_tokens(media: Sequence[Media], vision: VisionSpec) -> int:
    """LM tokens of a document's media: each image's grid tokens, each clip's per group of
    `vision.temporal_merge` temporal patches (the model averages a group into one)."""
    k = vision.temporal_merge
    return sum(
        num_image_tokens(m.grid_hw, vision.merge_size) for m in media if m.clip is None or m.t % k == 0
    )


class MediaRef(Protocol):
    """What a document shows, not yet decoded (an ImageRef, or video_sources.VideoRef)."""

    def media(self, vision: VisionSpec, clip: int) -> list[Media] | None:
        """Its grid entries (`clip`: its index among the document's media), or None when the
        file is corrupt (counted by its loader)."""
        ...


@dataclass(frozen=True)
class ImageRef:
    """An image a document shows, not yet loaded: its loader, path and patch grid."""

    loader: ImageLoader
    path: str
    grid_hw: tuple[int, int]

    def load(self):
        """The decoded image, or None when it is corrupt (counted by the loader)."""
        return self.loader.load(self.path)

    def media(self, vision: VisionSpec, clip: int = 0) -> list[Media] | None:
        """The image's patches as one grid entry, or None when it is corrupt."""
        img = self.load()
        if img is None:
            return None
        pixels, grid = to_patches(img, vision.patch_size, vision.merge_size, vision.max_patches)
        if grid != self.grid_hw:
            raise ValueError(
                f"{self.loader.root / self.path}: the file's size gives patch grid {grid} "
                f"but its record says {self.grid_hw}; the manifest and images disagree"
            )
        return [Media(pixels, grid)]


@dataclass(frozen=True)
class Doc:
    """One document: ids, loss mask aligned with ids (None = all ones), media (images, clips)
    in placeholder order."""

    ids: list[int]
    loss_mask: list[int] | None = None
    images: tuple[MediaRef, ...] = ()


class DocSource:
    """`len(source)` documents, document i built by `source.doc(i, vision)`.

    `order` says in which order a batch iterator visits them (a fresh seeded permutation per
    epoch, the share of one data-parallel rank); a streamed source (a declared dataset) orders
    by blocks of its files instead and may return None for a bad record (counted, skipped).
    """

    def __init__(
        self,
        name: str,
        num_docs: int,
        make: Callable[[int, VisionSpec], Doc | None],
        loader: ImageCounter | None = None,
    ):
        if num_docs <= 0:
            raise ValueError(f"document source {name!r} is empty; check its dataset and filters")
        self.name, self._num_docs, self._make, self.loader = name, num_docs, make, loader

    def __len__(self) -> int:
        return self._num_docs

    def doc(self, index: int, vision: VisionSpec) -> Doc | None:
        return self._make(index, vision)

    def order(self, seed: str, slot: int = 0, num_slots: int = 1) -> ShardOrder:
        """The visiting order of this source for one data-parallel slot (see ShardOrder)."""
        return ShardOrder([len(self)], 1, seed, slot, num_slots)


def _image(
    tok: Tokenizer, loader: ImageLoader, rec: ImageRecord, vision: VisionSpec
) -> tuple[list[int], ImageRef]:
    grid = vision.grid(rec.width, rec.height)
    return tok.media_placeholder(num_image_tokens(grid, vision.merge_size)), ImageRef(loader, rec.image, grid)


def text_docs(
    text_records: Sequence[TextRecord], tokenizer: Tokenizer, quality: str | None = None, name: str = "text"
) -> DocSource:
    """Plain LM documents; `quality="high"` keeps only the cooldown's clean subset."""
    recs = [r for r in text_records if quality is None or r.quality == quality]
    return DocSource(
        name, len(recs), lambda i, vision: Doc(tokenizer.encode(recs[i].text) + [tokenizer.eos_id])
    )


def caption_docs(
    image_records: Sequence[ImageRecord],
    image_root: Path,
    tokenizer: Tokenizer,
    fields: Sequence[str] = ("caption", "ocr", "alt_text"),
    name: str = "caption",
    max_corrupt_frac: float = 0.01,
) -> DocSource:
    """Image-conditioned text: document i shows record i // len(fields) with field i % len(fields).

    A field a record lacks (ocr of a shapes image) falls back to the caption.
    """
    recs = list(image_records)
    loader = ImageLoader(name, image_root, len(recs), max_corrupt_frac)

    def make(i: int, vision: VisionSpec) -> Doc:
        rec = recs[i // len(fields)]
        text = getattr(rec, fields[i % len(fields)]) or rec.caption
        media, ref = _image(tokenizer, loader, rec, vision)
        body = tokenizer.encode(text) + [tokenizer.eos_id]
        return Doc(media + body, [0] * len(media) + [1] * len(body), (ref,))

    return DocSource(name, len(recs) * len(fields), make, loader)


def qa_prompt(tokenizer: Tokenizer, question: str) -> list[int]:
    """Text ids of the QA prompt after the image: "\\nQuestion: {q}\\nAnswer:"."""
    return tokenizer.encode(f"\nQuestion: {question}\nAnswer:")


def qa_docs(
    image_records: Sequence[ImageRecord],
    image_root: Path,
    tokenizer: Tokenizer,
    types: Sequence[str] | None = None,
    name: str = "qa",
    max_corrupt_frac: float = 0.01,
) -> DocSource:
    """One document per (image, QA pair), loss on the answer and eos only."""
    recs = list(image_records)
    pairs = [(r, q) for r in recs for q in r.qa if types is None or q.type in types]
    loader = ImageLoader(name, image_root, len(recs), max_corrupt_frac)

    def make(i: int, vision: VisionSpec) -> Doc:
        rec, qa = pairs[i]
        media, ref = _image(tokenizer, loader, rec, vision)
        prompt = media + qa_prompt(tokenizer, qa.question)
        answer = tokenizer.encode(f" {qa.answer}") + [tokenizer.eos_id]
        return Doc(prompt + answer, [0] * len(prompt) + [1] * len(answer), (ref,))

    return DocSource(name, len(pairs), make, loader)


def needle_parts(
    rec: LongDocRecord, tokenizer: Tokenizer, max_tokens: int | None
) -> tuple[list[int], list[int]]:
    """(context ids ending in "Answer:", answer ids " {a}" + eos), trimmed to `max_tokens` in all.

    Trimming drops filler on both sides of the needle in proportion to its depth, so the needle
    always survives and keeps its relative position.
    """
    before, after = rec.text.split(rec.needle, 1)
    ids_b, ids_n, ids_a = (tokenizer.encode(t) for t in (before, rec.needle, after))
    question = tokenizer.encode(f"\n\nQuestion: {rec.question}\nAnswer:")
    answer = tokenizer.encode(f" {rec.answer}") + [tokenizer.eos_id]
    if max_tokens is not None:
        budget = max_tokens - len(ids_n) - len(question) - len(answer)
        if budget < 0:
            raise ValueError(f"max_tokens={max_tokens} cannot hold the needle and question of {rec.id}")
        if len(ids_b) + len(ids_a) > budget:
            keep_b = round(budget * len(ids_b) / (len(ids_b) + len(ids_a)))
            ids_b, ids_a = ids_b[len(ids_b) - keep_b :], ids_a[: budget - keep_b]
    return ids_b + ids_n + ids_a + question, answer


def long_docs(
    longdoc_records: Sequence[LongDocRecord],
    tokenizer: Tokenizer,
    max_tokens: int | None = None,
    answer_only: bool = False,
    name: str = "longdoc",
) -> DocSource:
    """Needle documents (text, question, answer); `max_tokens` trims them to fit a context."""
    recs = list(longdoc_records)

    def make(i: int, vision: VisionSpec) -> Doc:
        context, answer = needle_parts(recs[i], tokenizer, max_tokens)
        mask = [0] * len(context) + [1] * len(answer) if answer_only else None
        return Doc(context + answer, mask)

    return DocSource(name, len(recs), make)

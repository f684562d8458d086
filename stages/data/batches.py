"""Torch batches and the infinite training iterators that build them.

Shape legend: B batch rows, L sequence length, N patches of all images in the batch (NaViT
packing, see images.py for the patch layout), P = 3 * patch_size**2, I images in the batch.

* `LMBatch`: packed rows for every LM-loss stage (align, joint pretraining, cooldown, long
  context). Labels are already shifted (packing.py). Images go into `pixels_NP` / `grid_hw` in
  row order (row 0's images first, each row left to right), which is the order of the
  `<|media_pad|>` runs in `input_ids_BL`, so features scatter into
  `input_ids_BL == media_pad_id` positions in one flat pass.
* `ImageTextBatch`: stage 1 (SigLIP + caption). One text per image. `text_ids_BL` is
  `<|endoftext|> tokens... <|endoftext|>`: the leading one acts as BOS, so a decoder whose
  logits[:, t] predict text_ids[:, t + 1] supervises every text token and the closing eos
  (kept even when the text is truncated to max_text_len). Padding is `<|pad|>` with
  text_mask 0; the mask is 1 on both eos tokens.

Mixture weights of `lm_batches` are token shares: a source with weight 0.25 supplies about a
quarter of the non-padding tokens, whatever its document lengths. The next document comes from
the source furthest below its share of the recent tokens (counts decay over ~8 batches), so
shares track weights that change with the step (ramps) without a lag from earlier steps.
Text documents longer than seq_len are handed out one seq_len chunk per pick (each chunk is its
own packed segment anyway), so one huge document cannot swamp the mixture.
Which document a source gives is a seeded per-source permutation, reshuffled every epoch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.data.images import ImageLoader, num_image_tokens, to_patches
from moonforge.stages.data.packing import PackedRow, RowPacker
from moonforge.stages.data.records import ImageRecord
from moonforge.stages.data.sources import (  # re-exported: batch builders and their sources
    Doc, DocSource, VisionSpec, caption_docs, long_docs, qa_docs, text_docs,
)
from moonforge.stages.data.targets import grounding_text, pad_texts, text_ids

__all__ = ["LMBatch", "ImageTextBatch", "lm_batches", "image_text_batches", "DocSource",
           "VisionSpec", "text_docs", "caption_docs", "qa_docs", "long_docs", "grounding_text"]


def _to(batch, device):
    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch)
                             if isinstance(getattr(batch, f.name), torch.Tensor)})


@dataclass
class LMBatch:
    """Packed LM rows with their images."""

    input_ids_BL: torch.Tensor
    labels_BL: torch.Tensor
    """Shifted targets: labels_BL[b, t] is what position t predicts; -100 = no loss."""
    position_ids_BL: torch.Tensor
    doc_ids_BL: torch.Tensor
    """Segment index within the row (block-diagonal attention), -1 on padding."""
    media_mask_BL: torch.Tensor
    """True at <|media_pad|> positions; media_mask_BL.sum() == sum(h * w) / merge**2."""
    pixels_NP: torch.Tensor | None
    grid_hw: torch.Tensor | None
    """(I, 2) int64 patch grid per image, in row order."""

    def to(self, device: torch.device | str) -> "LMBatch":
        return _to(self, device)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens (throughput accounting)."""
        return int((self.doc_ids_BL >= 0).sum())

    @property
    def num_targets(self) -> int:
        """Positions that carry a loss (the normaliser of a per-token mean loss)."""
        return int((self.labels_BL != -100).sum())


@dataclass
class ImageTextBatch:
    """Images (NaViT-packed) and one target text each, for stage-1 contrastive + caption loss."""

    pixels_NP: torch.Tensor
    grid_hw: torch.Tensor
    text_ids_BL: torch.Tensor
    text_mask_BL: torch.Tensor

    def to(self, device: torch.device | str) -> "ImageTextBatch":
        return _to(self, device)

    @property
    def num_images(self) -> int:
        return int(self.grid_hw.shape[0])


def collate_rows(rows: Sequence[PackedRow], media_pad_id: int) -> LMBatch:
    """Stack packed rows; each row payload is a list of (pixels_NP, (h, w)) per document."""
    images = [img for row in rows for payload in row.payloads for img in payload]
    ids = torch.tensor([r.input_ids for r in rows], dtype=torch.long)
    return LMBatch(
        input_ids_BL=ids,
        labels_BL=torch.tensor([r.labels for r in rows], dtype=torch.long),
        position_ids_BL=torch.tensor([r.position_ids for r in rows], dtype=torch.long),
        doc_ids_BL=torch.tensor([r.doc_ids for r in rows], dtype=torch.long),
        media_mask_BL=ids == media_pad_id,
        pixels_NP=torch.cat([p for p, _ in images]) if images else None,
        grid_hw=torch.tensor([g for _, g in images], dtype=torch.long) if images else None,
    )


def load_doc_images(doc: Doc, vision: VisionSpec) -> list[tuple[torch.Tensor, tuple[int, int]]] | None:
    """Patches of every image of `doc`, or None if one is corrupt (counted by its loader)."""
    out = []
    for ref in doc.images:
        img = ref.loader.load(ref.path)
        if img is None:
            return None
        pixels, grid = to_patches(img, vision.patch_size, vision.merge_size, vision.max_patches)
        if grid != ref.grid_hw:
            raise ValueError(f"{ref.loader.root / ref.path}: the file's size gives patch grid {grid} "
                             f"but its record says {ref.grid_hw}; the manifest and images disagree")
        out.append((pixels, grid))
    return out


class _Cycler:
    """Indices 0..n-1 in a fresh seeded permutation per epoch, forever."""

    def __init__(self, n: int, seed: str):
        self.n, self.seed, self.epoch, self.order = n, seed, 0, []

    def next(self) -> int:
        if not self.order:
            self.order = list(range(self.n))
            random.Random(f"{self.seed}/{self.epoch}").shuffle(self.order)
            self.order.reverse()  # pop() from the end walks the permutation front to back
            self.epoch += 1
        return self.order.pop()


class LMBatchIterator(Iterator[LMBatch]):
    """Infinite LMBatch stream over a re-weighted source mixture (see lm_batches)."""

    def __init__(self, sources: Mapping[str, DocSource], weights_at: Callable[[int], Mapping[str, float]],
                 tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int, vision: VisionSpec):
        if not sources:
            raise ValueError("lm_batches needs at least one document source")
        self.sources, self.weights_at, self.tok = dict(sources), weights_at, tokenizer
        self.batch_size, self.vision, self.step = batch_size, vision, 0
        self.packer = RowPacker(seq_len, tokenizer.pad_id, ignore_ids=(tokenizer.media_pad_id,))
        self.cyclers = {n: _Cycler(len(s), f"lm_batches/{seed}/{n}") for n, s in self.sources.items()}
        self.tokens_by_source = {n: 0 for n in self.sources}
        """Non-padding tokens drawn from each source so far (what the weights control)."""
        self._recent = {n: 0.0 for n in self.sources}
        self._pending: dict[str, list] = {n: [] for n in self.sources}
        """Remaining seq_len chunks of a long text document, handed out one per pick."""
        self._window = 8 * batch_size * seq_len
        """Tokens over which `_recent` (exponentially decayed token counts) remembers."""
        self._rows: list[PackedRow] = []

    @property
    def skipped(self) -> int:
        """Documents dropped because an image was corrupt, over all sources."""
        return sum(s.loader.skipped for s in self.sources.values() if s.loader is not None)

    def _pick_source(self) -> str:
        weights = self.weights_at(self.step)
        unknown = sorted(set(weights) - set(self.sources))
        if unknown or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mixture weights {dict(weights)} at step {self.step} must be "
                             f">= 0, not all 0, over the sources {sorted(self.sources)}")
        total_w = sum(weights.values())
        recent = sum(self._recent.values()) or 1.0
        # The source furthest below its share of recent tokens goes next (ties: by name).
        return max(sorted(n for n, w in weights.items() if w > 0),
                   key=lambda n: weights[n] / total_w - self._recent[n] / recent)

    def _next_piece(self, name: str) -> tuple[list[int], list[int] | None, list | None] | None:
        """The next <= seq_len tokens of source `name` (long text documents come in chunks)."""
        if self._pending[name]:
            return self._pending[name].pop(0)
        doc = self.sources[name].doc(self.cyclers[name].next(), self.vision)
        seq_len = self.packer.seq_len
        if not doc.images:
            mask = doc.loss_mask
            self._pending[name] = [(doc.ids[i:i + seq_len], mask[i:i + seq_len] if mask else None, None)
                                   for i in range(0, len(doc.ids), seq_len)]
            return self._pending[name].pop(0) if self._pending[name] else None
        images = load_doc_images(doc, self.vision)
        if images is None:
            return None  # corrupt image: counted by the loader; draw another document
        ids, mask = doc.ids[:seq_len], (doc.loss_mask[:seq_len] if doc.loss_mask else None)
        if ids.count(self.tok.media_pad_id) != sum(num_image_tokens(g, self.vision.merge_size)
                                                   for _, g in images):
            raise ValueError(f"an image document from {name!r} is longer than seq_len={seq_len} "
                             "and truncation would cut its image; raise seq_len")
        return ids, mask, images

    def _add_one(self) -> None:
        name = self._pick_source()
        piece = self._next_piece(name)
        if piece is None:
            return
        ids, mask, images = piece
        decay = math.exp(-len(ids) / self._window)
        self._recent = {n: v * decay for n, v in self._recent.items()}
        self._recent[name] += len(ids)
        self.tokens_by_source[name] += len(ids)
        self._rows += self.packer.add(ids, mask, images)

    def __next__(self) -> LMBatch:
        while len(self._rows) < self.batch_size:
            self._add_one()
        rows, self._rows = self._rows[:self.batch_size], self._rows[self.batch_size:]
        self.step += 1
        return collate_rows(rows, self.tok.media_pad_id)


def lm_batches(sources: Mapping[str, DocSource], weights_at: Callable[[int], Mapping[str, float]],
               tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int,
               patch_size: int, merge_size: int, max_patches: int) -> LMBatchIterator:
    """Infinite packed LM batches from a mixture whose token shares follow `weights_at(step)`.

    `step` counts batches already produced by this iterator. Example (joint pretraining ramp):
        lm_batches({"text": text_docs(...), "caption": caption_docs(...)},
                   lambda s: {"text": 1.0 - ramp(s), "caption": ramp(s)}, tok, 256, 16, 0, 8, 2, 64)
    Image documents with a corrupt file are skipped (`.skipped`); too many raise
    TooManyCorruptImagesError from the source's loader.
    """
    return LMBatchIterator(sources, weights_at, tokenizer, seq_len, batch_size, seed,
                           VisionSpec(patch_size, merge_size, max_patches))


class ImageTextIterator(Iterator[ImageTextBatch]):
    """Infinite ImageTextBatch stream (see image_text_batches)."""

    def __init__(self, records: Sequence[ImageRecord], loader: ImageLoader, tokenizer: Tokenizer,
                 batch_size: int, max_patches_at: Callable[[int], int], text_targets: Sequence[str],
                 patch_size: int, merge_size: int, seed: int, max_text_len: int):
        bad = sorted(set(text_targets) - {"caption", "alt_text", "ocr", "grounding"})
        if bad or not text_targets:
            raise ValueError(f"text_targets {list(text_targets)}: use caption, alt_text, ocr, grounding")
        if not records:
            raise ValueError("image_text_batches got no records")
        self.records, self.loader, self.tok = list(records), loader, tokenizer
        self.batch_size, self.max_patches_at, self.targets = batch_size, max_patches_at, tuple(text_targets)
        self.patch_size, self.merge_size, self.max_text_len = patch_size, merge_size, max_text_len
        self.rng = random.Random(f"image_text/{seed}")
        self.cycler = _Cycler(len(self.records), f"image_text/{seed}/order")
        self.step = 0

    @property
    def skipped(self) -> int:
        return self.loader.skipped

    def _target(self, rec: ImageRecord) -> str:
        target = self.rng.choice(self.targets)
        if target == "grounding" and rec.boxes:
            return grounding_text(rec, self.rng.randrange(len(rec.boxes)))
        if target in ("alt_text", "ocr") and getattr(rec, target):
            return getattr(rec, target)
        return rec.caption

    def __next__(self) -> ImageTextBatch:
        cap = self.max_patches_at(self.step)
        pixels, grids, texts = [], [], []
        while len(grids) < self.batch_size:
            rec = self.records[self.cycler.next()]
            img = self.loader.load(rec.image)
            if img is None:
                continue
            p, g = to_patches(img, self.patch_size, self.merge_size, cap)
            pixels.append(p)
            grids.append(g)
            texts.append(text_ids(self.tok, self._target(rec), self.max_text_len))
        self.step += 1
        ids, mask = pad_texts(texts, self.tok.pad_id)
        return ImageTextBatch(torch.cat(pixels), torch.tensor(grids, dtype=torch.long), ids, mask)


def image_text_batches(records: Sequence[ImageRecord], image_root: Path, tokenizer: Tokenizer,
                       batch_size: int, max_patches_at: Callable[[int], int],
                       text_targets: Sequence[str], patch_size: int, merge_size: int, seed: int,
                       max_text_len: int, dataset_name: str = "toyworld",
                       max_corrupt_frac: float = 0.01) -> ImageTextIterator:
    """Infinite stage-1 batches; the patch cap of batch k is max_patches_at(k) (progressive resolution).

    Each image gets one target text, drawn per example from `text_targets` (a target the record
    lacks falls back to its caption). Corrupt images are skipped and counted (`.skipped`).
    """
    loader = ImageLoader(dataset_name, image_root, len(records), max_corrupt_frac)
    return ImageTextIterator(records, loader, tokenizer, batch_size, max_patches_at, text_targets,
                             patch_size, merge_size, seed, max_text_len)

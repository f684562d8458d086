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
Which document a source gives is its ShardOrder (shard_order.py): a seeded permutation per epoch
(per block of its files for a declared dataset). Under data parallelism each rank draws from its
own share of every source and builds only its own micro-batches (None for the others'); the
iterators' state_dict() / load_state_dict() (small JSON) resume the stream exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.data.images import ImageLoader, to_patches
from moonforge.stages.data.packing import PackedRow, RowPacker
from moonforge.stages.data.records import ImageRecord
from moonforge.stages.data.shard_order import ShardOrder
from moonforge.stages.data.sources import (  # re-exported: batch builders and their sources
    Doc,
    DocSource,
    Media,
    VisionSpec,
    caption_docs,
    long_docs,
    media_tokens,
    qa_docs,
    text_docs,
)
from moonforge.stages.data.targets import grounding_text, pad_texts, text_ids

__all__ = [
    "LMBatch",
    "ImageTextBatch",
    "lm_batches",
    "image_text_batches",
    "DocSource",
    "VisionSpec",
    "text_docs",
    "caption_docs",
    "qa_docs",
    "long_docs",
    "grounding_text",
]


def _to(batch, device):
    return replace(
        batch,
        **{
            f.name: getattr(batch, f.name).to(device)
            for f in fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor)
        },
    )


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
    """(I, 2) int64 patch grid per image (or temporal patch of a clip), in row order."""
    media_t: torch.Tensor | None = None
    """(I,) temporal index of each grid entry in its clip; None when the batch holds no clip."""
    media_group: torch.Tensor | None = None
    """(I,) which grid entries are one clip (an image is a group of its own); None likewise."""

    def to(self, device: torch.device | str) -> LMBatch:
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

    def to(self, device: torch.device | str) -> ImageTextBatch:
        return _to(self, device)

    @property
    def num_images(self) -> int:
        return int(self.grid_hw.shape[0])


def collate_rows(rows: Sequence[PackedRow], media_pad_id: int) -> LMBatch:
    """Stack packed rows; each row payload is the list of Media of one document. A batch with a
    clip also gets media_t / media_group (each clip one group, each image its own)."""
    media = [m for row in rows for payload in row.payloads for m in payload]
    ids = torch.tensor([r.input_ids for r in rows], dtype=torch.long)
    media_t = media_group = None
    if any(m.clip is not None for m in media):
        groups: list[int] = []
        for payload in (p for row in rows for p in row.payloads):
            first: dict[int, int] = {}  # a document's clip -> its batch-wide group
            for m in payload:
                if m.clip is None or m.clip not in first:
                    groups.append(len(set(groups)))
                    if m.clip is not None:
                        first[m.clip] = groups[-1]
                else:
                    groups.append(first[m.clip])
        media_t = torch.tensor([m.t for m in media], dtype=torch.long)
        media_group = torch.tensor(groups, dtype=torch.long)
    return LMBatch(
        input_ids_BL=ids,
        labels_BL=torch.tensor([r.labels for r in rows], dtype=torch.long),
        position_ids_BL=torch.tensor([r.position_ids for r in rows], dtype=torch.long),
        doc_ids_BL=torch.tensor([r.doc_ids for r in rows], dtype=torch.long),
        media_mask_BL=ids == media_pad_id,
        pixels_NP=torch.cat([m.pixels_NP for m in media]) if media else None,
        grid_hw=torch.tensor([m.grid_hw for m in media], dtype=torch.long) if media else None,
        media_t=media_t,
        media_group=media_group,
    )


def load_doc_images(doc: Doc, vision: VisionSpec) -> list[Media] | None:
    """The grid entries of every image and clip of `doc`, or None if one is corrupt (counted by
    its loader)."""
    out: list[Media] = []
    for k, ref in enumerate(doc.images):
        got = ref.media(vision, k)
        if got is None:
            return None
        out += got
    return out


def owns(step: int, rank: int, world: int, worker: int = 0, num_workers: int = 1) -> bool:
    """Whether micro-batch `step` of a stream is built by `rank` (and, with loader workers, by
    `worker` of that rank): a step's micro-batches are dealt round-robin over the ranks
    (Parallel.my_share keeps micro_batches[rank::world]; grad_accum is a multiple of world, so
    the position in the step and in the stream agree mod world), and a rank's own micro-batches
    round-robin over its workers (the order torch's DataLoader takes them in)."""
    return step % world == rank and (step // world) % num_workers == worker


OPEN_ROWS = 16
"""Rows the training stream's packer keeps open (packing.py: best fit over them, oldest out
first; 1 = next-fit). 16 reaches the 0.98 useful-token plateau on long-tailed lengths."""


class LMBatchIterator(Iterator[LMBatch | None]):
    """Infinite LMBatch stream over a re-weighted source mixture (see lm_batches).

    Data parallel (`rank` of `world`): every rank draws from its own share of each source
    (ShardOrder slots), packs only its own rows and yields None for the micro-batches other ranks
    build (`owns`), so no rank loads, patches or collates another rank's data.

    `state_dict()` is a small JSON object: per source the order position and token counters, and
    which document pieces sit in each open row of the packer and in closed rows not yet handed
    out, named by (source, document, chunk). `load_state_dict` rebuilds exactly the same stream
    from it (and from a state the next-fit packer saved: one open row).
    """

    def __init__(
        self,
        sources: Mapping[str, DocSource],
        weights_at: Callable[[int], Mapping[str, float]],
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        seed: int,
        vision: VisionSpec,
        rank: int = 0,
        world: int = 1,
        worker: int = 0,
        num_workers: int = 1,
        open_rows: int = OPEN_ROWS,
    ):
        if not sources:
            raise ValueError("lm_batches needs at least one document source")
        self.sources, self.weights_at, self.tok = dict(sources), weights_at, tokenizer
        self.batch_size, self.vision, self.step = batch_size, vision, 0
        self.rank, self.world, self.worker, self.num_workers = rank, world, worker, num_workers
        self.open_rows = open_rows
        self.packer = self._new_packer(seq_len)
        slot, slots = rank * num_workers + worker, world * num_workers
        self.orders = {n: s.order(f"lm_batches/{seed}/{n}", slot, slots) for n, s in self.sources.items()}
        self.tokens_by_source = {n: 0 for n in self.sources}
        """Non-padding tokens drawn from each source so far (what the weights control)."""
        self.docs_by_source = {n: 0 for n in self.sources}
        """Documents drawn from each source so far (this rank)."""
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
            raise ValueError(
                f"mixture weights {dict(weights)} at step {self.step} must be "
                f">= 0, not all 0, over the sources {sorted(self.sources)}"
            )
        total_w = sum(weights.values())
        recent = sum(self._recent.values()) or 1.0
        # The source furthest below its share of recent tokens goes next (ties: by name).
        return max(
            sorted(n for n, w in weights.items() if w > 0),
            key=lambda n: weights[n] / total_w - self._recent[n] / recent,
        )

    def _pieces(self, name: str, index: int, first_chunk: int = 0) -> list | None:
        """[(tag, ids, mask, images)] of document `index` of `name` from chunk `first_chunk` on;
        None for a bad record or a corrupt image (counted by the source)."""
        doc = self.sources[name].doc(index, self.vision)
        if doc is None:
            return None
        seq_len = self.packer.seq_len
        if not doc.images:
            mask = doc.loss_mask
            return [
                ([name, index, k], doc.ids[i : i + seq_len], mask[i : i + seq_len] if mask else None, None)
                for k, i in enumerate(range(0, len(doc.ids), seq_len))
            ][first_chunk:]
        images = load_doc_images(doc, self.vision)
        if images is None:
            return None  # corrupt image: counted by the loader; draw another document
        ids, mask = doc.ids[:seq_len], (doc.loss_mask[:seq_len] if doc.loss_mask else None)
        if ids.count(self.tok.media_pad_id) != media_tokens(images, self.vision):
            raise ValueError(
                f"an image document from {name!r} is longer than seq_len={seq_len} "
                "and truncation would cut its image; raise seq_len"
            )
        return [([name, index, 0], ids, mask, images)]

    def _next_piece(self, name: str):
        """The next <= seq_len tokens of source `name` (long text documents come in chunks)."""
        if not self._pending[name]:
            self._pending[name] = self._pieces(name, self.orders[name].next()) or []
            self.docs_by_source[name] += bool(self._pending[name])
        return self._pending[name].pop(0) if self._pending[name] else None

    def _add_one(self) -> None:
        name = self._pick_source()
        piece = self._next_piece(name)
        if piece is None:
            return
        tag, ids, mask, images = piece
        decay = math.exp(-len(ids) / self._window)
        self._recent = {n: v * decay for n, v in self._recent.items()}
        self._recent[name] += len(ids)
        self.tokens_by_source[name] += len(ids)
        self._rows += self.packer.add(ids, mask, images, tag)

    def __next__(self) -> LMBatch | None:
        if not owns(self.step, self.rank, self.world, self.worker, self.num_workers):
            self.step += 1
            return None  # another rank's micro-batch: it builds it from its own share
        while len(self._rows) < self.batch_size:
            self._add_one()
        rows, self._rows = self._rows[: self.batch_size], self._rows[self.batch_size :]
        self.step += 1
        return collate_rows(rows, self.tok.media_pad_id)

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the stream is, as JSON (see the class docstring)."""
        return {
            "step": self.step,
            "rank": self.rank,
            "world": self.world,
            "worker": self.worker,
            "num_workers": self.num_workers,
            "skipped": self.skipped,
            "orders": {n: o.state_dict() for n, o in self.orders.items()},
            "recent": dict(self._recent),
            "tokens": dict(self.tokens_by_source),
            "docs": dict(self.docs_by_source),
            "pending": {n: p[0][0] for n, p in self._pending.items() if p},
            "open": self.packer.open_tags,
            "rows": [r.tags for r in self._rows],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. A data-parallel job saves every rank's state
        ({"ranks": [...]}, see stages/train/loop.py); saved at another world size, the stream is
        rebuilt by drawing (and dropping) as many micro-batches as the saved one had produced."""
        if "ranks" in state:
            per_rank = state["ranks"]
            if len(per_rank) != self.world:
                return self._replay(int(per_rank[0]["step"]))
            state = per_rank[self.rank]
        mine = (self.world, self.rank, self.worker, self.num_workers)
        if (
            state.get("world", 1),
            state.get("rank", 0),
            state.get("worker", 0),
            state.get("num_workers", 1),
        ) != mine:
            return self._replay(int(state["step"]))
        self.step = int(state["step"])
        for n, o in self.orders.items():
            o.load_state_dict(state["orders"][n])
        self._recent = {n: float(state["recent"][n]) for n in self.sources}
        self.tokens_by_source = {n: int(state["tokens"][n]) for n in self.sources}
        self.docs_by_source = {n: int(state.get("docs", {}).get(n, 0)) for n in self.sources}
        self._pending = {n: [] for n in self.sources}
        for n, (_, index, chunk) in state["pending"].items():
            self._pending[n] = self._pieces(n, index, chunk) or []
        seq_len = self.packer.seq_len
        self._rows = []
        for tags in state["rows"]:  # closed rows: their pieces, in order, fill exactly one row
            packer = RowPacker(seq_len, self.tok.pad_id, (self.tok.media_pad_id,))
            for tag in tags:
                packer.add(*self._segment(tag))
            self._rows += packer.flush()
        opened = state["open"]
        if opened and isinstance(opened[0][0], str):  # saved by the next-fit packer: one open row
            opened = [opened]
        self.packer = self._new_packer(seq_len)
        self.packer.restore_open([[self._segment(tag) for tag in tags] for tags in opened])

    def _new_packer(self, seq_len: int) -> RowPacker:
        return RowPacker(seq_len, self.tok.pad_id, (self.tok.media_pad_id,), self.open_rows)

    def _segment(self, tag: list) -> tuple:
        """(ids, mask, media, tag) of the piece `tag` names, read again from its source."""
        name, index, chunk = tag
        pieces = self._pieces(name, index, chunk)
        if not pieces:
            raise ValueError(
                f"resuming the data stream: document {index} of {name!r} no longer "
                "reads as it did (the dataset changed since the checkpoint)"
            )
        _, ids, mask, images = pieces[0]
        return ids, mask, images, tag

    def _replay(self, steps: int) -> None:
        for _ in range(steps):
            next(self)


def lm_batches(
    sources: Mapping[str, DocSource],
    weights_at: Callable[[int], Mapping[str, float]],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    patch_size: int,
    merge_size: int,
    max_patches: int,
    rank: int = 0,
    world: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    temporal_merge: int = 1,
    open_rows: int = OPEN_ROWS,
) -> LMBatchIterator:
    """Infinite packed LM batches from a mixture whose token shares follow `weights_at(step)`.

    `step` counts batches already produced by this iterator. Example (joint pretraining ramp):
        lm_batches({"text": text_docs(...), "caption": caption_docs(...)},
                   lambda s: {"text": 1.0 - ramp(s), "caption": ramp(s)}, tok, 256, 16, 0, 8, 2, 64)
    Image documents with a corrupt file are skipped (`.skipped`); too many raise
    TooManyCorruptImagesError from the source's loader. `rank` / `world`: this process's share
    under data parallelism (see LMBatchIterator). `open_rows`: rows the packer fills at once
    (packing.py: best fit; 1 = next-fit).
    """
    return LMBatchIterator(
        sources,
        weights_at,
        tokenizer,
        seq_len,
        batch_size,
        seed,
        VisionSpec(patch_size, merge_size, max_patches, temporal_merge),
        rank,
        world,
        worker,
        num_workers,
        open_rows,
    )


class ImageTextIterator(Iterator[ImageTextBatch | None]):
    """Infinite ImageTextBatch stream (see image_text_batches); sharded and resumable like
    LMBatchIterator (None for another rank's micro-batch; JSON state_dict).

    `extra` mixes in other image-text sources by share of the examples: name -> (source, share),
    a source having `order(seed, slot, slots)` and `pair(index) -> (image, text) or None`
    (user_mix.DeclaredPairs); the toy-world records get the rest."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        loader: ImageLoader,
        tokenizer: Tokenizer,
        batch_size: int,
        max_patches_at: Callable[[int], int],
        text_targets: Sequence[str],
        patch_size: int,
        merge_size: int,
        seed: int,
        max_text_len: int,
        rank: int = 0,
        world: int = 1,
        extra: Mapping[str, tuple] | None = None,
    ):
        bad = sorted(set(text_targets) - {"caption", "alt_text", "ocr", "grounding"})
        if bad or not text_targets:
            raise ValueError(f"text_targets {list(text_targets)}: use caption, alt_text, ocr, grounding")
        if not records:
            raise ValueError("image_text_batches got no records")
        self.records, self.loader, self.tok = list(records), loader, tokenizer
        self.batch_size, self.max_patches_at, self.targets = batch_size, max_patches_at, tuple(text_targets)
        self.patch_size, self.merge_size, self.max_text_len = patch_size, merge_size, max_text_len
        self.rng = random.Random(f"image_text/{seed}")
        self.order = ShardOrder([len(self.records)], 1, f"image_text/{seed}/order", rank, world)
        self.step, self.rank, self.world = 0, rank, world
        self.extra = dict(extra or {})
        self.extra_orders = {
            n: src.order(f"image_text/{seed}/{n}", rank, world) for n, (src, _) in self.extra.items()
        }
        self.shares = {
            "": max(0.0, 1.0 - sum(s for _, s in self.extra.values())),
            **{n: s for n, (_, s) in self.extra.items()},
        }
        self.drawn = {n: 0 for n in self.shares}
        """Examples drawn per source ("" = the toy-world records)."""

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

    def __next__(self) -> ImageTextBatch | None:
        cap = self.max_patches_at(self.step)
        mine = owns(self.step, self.rank, self.world)
        self.step += 1
        if not mine:
            return None  # another rank's micro-batch
        pixels: list[torch.Tensor] = []
        grids: list[tuple[int, int]] = []
        texts: list[list[int]] = []
        while len(grids) < self.batch_size:
            got = self._example()
            if got is None:
                continue
            img, text = got
            p, g = to_patches(img, self.patch_size, self.merge_size, cap)
            pixels.append(p)
            grids.append(g)
            texts.append(text_ids(self.tok, text, self.max_text_len))
        ids, mask = pad_texts(texts, self.tok.pad_id)
        return ImageTextBatch(torch.cat(pixels), torch.tensor(grids, dtype=torch.long), ids, mask)

    def _example(self):
        """(image, target text) of the next example, or None if it was bad (counted)."""
        total = sum(self.drawn.values()) or 1
        # the source furthest below its share of the examples so far goes next (ties: by name)
        name = max(
            sorted(n for n, s in self.shares.items() if s > 0),
            key=lambda n: self.shares[n] - self.drawn[n] / total,
        )
        self.drawn[name] += 1
        if name:
            src, _ = self.extra[name]
            return src.pair(self.extra_orders[name].next())
        rec = self.records[self.order.next()]
        img = self.loader.load(rec.image)
        return None if img is None else (img, self._target(rec))

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "step": self.step,
            "rank": self.rank,
            "world": self.world,
            "order": self.order.state_dict(),
            "rng": [version, list(internal), gauss],
            "extra": {n: o.state_dict() for n, o in self.extra_orders.items()},
            "drawn": dict(self.drawn),
        }

    def load_state_dict(self, state: dict) -> None:
        """See LMBatchIterator.load_state_dict."""
        if "ranks" in state:
            if len(state["ranks"]) != self.world:
                return self._replay(int(state["ranks"][0]["step"]))
            state = state["ranks"][self.rank]
        if state.get("world", 1) != self.world or state.get("rank", 0) != self.rank:
            return self._replay(int(state["step"]))
        self.step = int(state["step"])
        self.order.load_state_dict(state["order"])
        for n, o in self.extra_orders.items():
            o.load_state_dict(state["extra"][n])
        self.drawn = {n: int(state.get("drawn", {}).get(n, 0)) for n in self.shares}
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def _replay(self, steps: int) -> None:
        for _ in range(steps):
            next(self)


def image_text_batches(
    records: Sequence[ImageRecord],
    image_root: Path,
    tokenizer: Tokenizer,
    batch_size: int,
    max_patches_at: Callable[[int], int],
    text_targets: Sequence[str],
    patch_size: int,
    merge_size: int,
    seed: int,
    max_text_len: int,
    dataset_name: str = "toyworld",
    max_corrupt_frac: float = 0.01,
    rank: int = 0,
    world: int = 1,
    extra: Mapping[str, tuple] | None = None,
) -> ImageTextIterator:
    """Infinite stage-1 batches; the patch cap of batch k is max_patches_at(k) (progressive resolution).

    Each image gets one target text, drawn per example from `text_targets` (a target the record
    lacks falls back to its caption). Corrupt images are skipped and counted (`.skipped`).
    """
    loader = ImageLoader(dataset_name, image_root, len(records), max_corrupt_frac)
    return ImageTextIterator(
        records,
        loader,
        tokenizer,
        batch_size,
        max_patches_at,
        text_targets,
        patch_size,
        merge_size,
        seed,
        max_text_len,
        rank,
        world,
        extra,
    )

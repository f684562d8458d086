"""Declared datasets inside a stage: checked before training, mixed in by weight, scored, recorded.

    mix = DeclaredMix(cfg, data, tok, vision, ctx.parallel)   # opens + checks every mixture entry
    batches = lm_stream({**generated, **mix.sources()}, mix.weights(weights_at), ...)
    ... train ...
    metrics.update(mix.metrics(batches))                     # records used / skipped, by reason

`DeclaredMix` opens each dataset the stage's `mixture:` names (its declaration is in the stage
config, its files under the DatasetRef's directory or on S3), runs the full check (every record
read, every image decoded; split over the data-parallel ranks and merged) and raises
DeclaredDataError with the report, before any training, when more than max_bad_fraction of the
records are bad. Documents: a dialogue is `encode_chat` with the answer-only loss mask, a pair is
[image] caption <eos> (loss on the caption), a text is text <eos>; pixels load at batch time.
`weights` scales the stage's own mixture to 1 - sum(shares) and adds the declared shares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import cast

import torch

from moonforge.model.tokenizer import IMAGE_MARKER, Tokenizer
from moonforge.stages.data.chat import ChatPromptItem
from moonforge.stages.data.images import ImageLoader, num_image_tokens, to_patches
from moonforge.stages.data.shard_order import ShardOrder
from moonforge.stages.data.sources import Doc, DocSource, ImageRef, Media, MediaRef, VisionSpec
from moonforge.stages.data.user_check import CheckReport, check_set, require_ok
from moonforge.stages.data.user_images import BadRecord, ImageSource, decode_image, image_size
from moonforge.stages.data.user_samples import Sample
from moonforge.stages.data.user_sets import DeclaredSet
from moonforge.stages.data.user_videos import (
    VIDEO_MARKER,
    ClipSampling,
    clip_tokens,
    media_in_order,
    video_frames,
)
from moonforge.stages.data.video_files import clip_patches


class _Images:
    """The 'loader' of a declared source's ImageRefs: decodes, counts what fails."""

    def __init__(self, ds: DeclaredSet):
        self.ds, self.root, self.skipped = ds, ds.root, 0

    def failed(self, err: BadRecord) -> None:
        self.skipped += 1
        self.ds.skipped[err.reason] += 1


@dataclass(frozen=True)
class _SourceRef(ImageRef):
    """An ImageRef whose bytes come from an ImageSource (a file, an S3 object or inline bytes)."""

    source: ImageSource | None = None

    def load(self):
        try:
            return decode_image(self.source)
        except BadRecord as e:
            self.loader.failed(e)
            return None


class DeclaredDocSource(DocSource):
    """Training documents of a declared dataset of kind chat, pair or text (see module doc)."""

    loader: _Images

    def __init__(self, ds: DeclaredSet, tok: Tokenizer):
        self.ds, self.tok = ds, tok
        super().__init__(ds.name, len(ds), self._make, _Images(ds))

    def order(self, seed: str, slot: int = 0, num_slots: int = 1) -> ShardOrder:
        return self.ds.order(seed, slot, num_slots)

    def _make(self, index: int, vision: VisionSpec) -> Doc | None:
        rec = self.ds.record(index)
        try:
            if isinstance(rec, BadRecord):
                raise rec
            if rec.videos:
                return self._with_videos(rec, vision)
            grids = [vision.grid(*image_size(im)) for im in rec.images]
        except BadRecord as e:
            self.loader.failed(e)
            return None
        counts = [num_image_tokens(g, vision.merge_size) for g in grids]
        # _SourceRef.load decodes its ImageSource and reports to loader.failed; ImageRef's other
        # users read only loader.root, which _Images has too
        loader = cast(ImageLoader, self.loader)
        refs = tuple(_SourceRef(loader, im.uri, g, im) for im, g in zip(rec.images, grids))
        tok = self.tok
        if rec.kind == "chat":
            ids, mask = tok.encode_chat(rec.message_dicts(), counts)
            return Doc(ids, mask, refs)
        body = tok.encode(rec.text) + [tok.eos_id]
        media = [i for n in counts for i in tok.media_placeholder(n)]
        return Doc(media + body, [0] * len(media) + [1] * len(body) if media else None, refs)

    def _with_videos(self, rec: Sample, vision: VisionSpec) -> Doc:
        """A dialogue with videos: images and videos in marker order, each video its sampled
        frames' temporal patches behind one placeholder run (video_sources.py)."""
        sampling = ClipSampling.of(self.ds.decl)
        loader = cast(ImageLoader, self.loader)
        refs: list[MediaRef] = []
        counts = []
        for kind, src in media_in_order(rec.messages, rec.images, rec.videos):
            if kind == "image":
                g = vision.grid(*image_size(src))
                refs.append(_SourceRef(loader, src.uri, g, src))
                counts.append(num_image_tokens(g, vision.merge_size))
            else:
                frames, grid, cap = sampling.shape(src, vision)
                ref = _SourceVideo(self.loader, src, grid, frames, cap, sampling.fps)
                refs.append(ref)
                counts.append(ref.num_tokens(vision))
        msgs = [
            {**m, "content": m["content"].replace(VIDEO_MARKER, IMAGE_MARKER)} for m in rec.message_dicts()
        ]
        ids, mask = self.tok.encode_chat(msgs, counts)
        return Doc(ids, mask, tuple(refs))


@dataclass(frozen=True)
class _SourceVideo:
    """A video a declared dialogue shows: decoded (num_frames sampled) when its batch is built."""

    loader: _Images
    source: ImageSource
    grid_hw: tuple[int, int]
    num_frames: int
    max_patches: int
    """Patches per frame at most (below the model's under a declared video_max_tokens)."""
    fps: float | None = None

    def num_tokens(self, vision: VisionSpec) -> int:
        return clip_tokens(self.grid_hw, vision.merge_size, self.num_frames, vision.temporal_merge)

    def media(self, vision: VisionSpec, clip: int) -> list[Media] | None:
        try:
            pixels_NP, t = decode_clip(
                self.source, self.grid_hw, self.num_frames, self.max_patches, self.fps, vision
            )
        except BadRecord as e:
            self.loader.failed(e)
            return None
        n = self.grid_hw[0] * self.grid_hw[1]
        return [Media(pixels_NP[i * n : (i + 1) * n], self.grid_hw, int(t[i]), clip) for i in range(len(t))]


def decode_clip(
    src: ImageSource,
    grid_hw: tuple[int, int],
    num_frames: int,
    max_patches: int,
    fps: float | None,
    vision: VisionSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels_NP, media_t) of a video's temporal patches, decoded as `ClipSampling.shape` sized
    it from its header (grid_hw, num_frames, max_patches); BadRecord when the video cannot be
    read or its frames disagree with the header."""
    frames = video_frames(src, num_frames, fps)
    pixels_NP, grid, t = clip_patches(frames, vision.patch_size, vision.merge_size, max_patches)
    if tuple(grid[0].tolist()) != grid_hw:  # the header's size is the first frame's
        raise BadRecord("corrupt_video", f"video {src.uri}: frames change size")
    if len(frames) != num_frames:  # its duration promised another count
        raise BadRecord("corrupt_video", f"video {src.uri}: frame times disagree")
    return pixels_NP, t


class DeclaredPairs:
    """A declared image-text pair set as vit_pretrain's ImageTextIterator reads it."""

    def __init__(self, ds: DeclaredSet):
        self.ds, self.loader = ds, _Images(ds)

    def order(self, seed: str, slot: int = 0, num_slots: int = 1) -> ShardOrder:
        return self.ds.order(seed, slot, num_slots)

    def pair(self, index: int):
        """(decoded image, caption), or None for a bad record / image (counted)."""
        rec = self.ds.record(index)
        try:
            if isinstance(rec, BadRecord):
                raise rec
            return decode_image(rec.images[0]), rec.text
        except BadRecord as e:
            self.loader.failed(e)
            return None


def _prompt_media(msgs: list[dict[str, str]], rec: Sample, vision: VisionSpec, sampling: ClipSampling):
    """(pixels, grid, media_t, media_group, LM tokens per medium) of the images and videos the
    prompt turns show, in marker order; media_t / media_group only when a video is shown."""
    pix: list[torch.Tensor] = []
    grids: list[tuple[int, int]] = []
    ts: list[int] = []
    groups: list[int] = []
    counts: list[int] = []
    shown = media_in_order([(m["role"], m["content"]) for m in msgs], rec.images, rec.videos)
    for kind, src in shown:
        if kind == "image":
            p, g = to_patches(decode_image(src), vision.patch_size, vision.merge_size, vision.max_patches)
            t, tokens = [0], num_image_tokens(g, vision.merge_size)
        else:
            n, g, cap = sampling.shape(src, vision)
            p, t_ = decode_clip(src, g, n, cap, sampling.fps, vision)
            t, tokens = t_.tolist(), clip_tokens(g, vision.merge_size, n, vision.temporal_merge)
        pix.append(p)
        grids += [g] * len(t)
        ts += t
        groups += [len(counts)] * len(t)
        counts.append(tokens)
    if not pix:
        return None, None, None, None, counts
    if not any(kind == "video" for kind, _ in shown):  # images only: no clip layout, as before
        return torch.cat(pix), torch.tensor(grids, dtype=torch.long), None, None, counts
    layout = torch.tensor([ts, groups], dtype=torch.long)
    return torch.cat(pix), torch.tensor(grids, dtype=torch.long), layout[0], layout[1], counts


def prompt_item(
    rec: Sample, tok: Tokenizer, vision: VisionSpec, sampling: ClipSampling = ClipSampling()
) -> ChatPromptItem:
    """A generation prompt of a sample: a chat's turns before its last answer (reference = that
    answer, exact match), or an RL prompt with its answer and verifier. Its images and videos
    (sampled as the dataset declares, `sampling`) are decoded here; BadRecord if one does not
    decode."""
    msgs, answer, verifier = rec.message_dicts(), rec.answer or rec.chosen, rec.verifier or "exact"
    if rec.kind == "chat":
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        msgs, answer = msgs[:last], msgs[last]["content"]
    pixels, grid, media_t, media_group, counts = _prompt_media(msgs, rec, vision, sampling)
    msgs = [{**m, "content": m["content"].replace(VIDEO_MARKER, IMAGE_MARKER)} for m in msgs]
    ids, _ = tok.encode_chat(msgs, counts, add_generation_prompt=True)
    kind = "video" if media_t is not None else "image" if counts else "text"
    difficulty = (
        rec.difficulty
        if rec.kind == "prompt" and rec.difficulty is not None
        else (0.5 if rec.kind == "prompt" else None)
    )
    item = ChatPromptItem(rec.key, kind, ids, pixels, grid, answer, verifier, difficulty)
    return replace(item, media_t=media_t, media_group=media_group)


def reduce_reports(rep: CheckReport, par) -> CheckReport:
    """Merge the per-rank check reports (a collective under data parallelism)."""
    if par is None or par.world_size == 1:
        return rep
    parts = par.gather_objects(rep)
    merged = parts[0]
    for other in parts[1:]:
        merged.merge(other)
    return merged


class DeclaredMix:
    """The declared datasets of one stage's `mixture:` (see the module docstring)."""

    def __init__(self, cfg, data: Mapping, tok: Tokenizer, vision: VisionSpec, par=None):
        self.cfg, self.tok, self.vision, self.par = cfg, tok, vision, par
        self.shares = dict(cfg.mixture)
        self.sets: dict[str, DeclaredSet] = {}
        self.reports: dict[str, CheckReport] = {}
        rank, world = (par.rank, par.world_size) if par is not None else (0, 1)
        for name in self.shares:
            if name not in data:
                raise KeyError(
                    f"stage {cfg.stage_name!r}: mixture names {name!r} but the stage "
                    f"was given datasets {sorted(data)}; list it in the stage's data:"
                )
            ds = DeclaredSet(cfg.declaration(name), data[name].path)
            rep = reduce_reports(check_set(ds, tok, vision, rank, world), par)
            require_ok(rep, cfg.stage_name)
            self.sets[name], self.reports[name] = ds, rep
        self._sources: dict[str, DeclaredDocSource] = {}
        self._prompt_counts: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.sets)

    def sources(self) -> dict[str, DocSource]:
        """Training documents of the chat / pair / text datasets, by dataset name."""
        for name, ds in self.sets.items():
            if ds.kind in ("chat", "pair", "text") and name not in self._sources:
                self._sources[name] = DeclaredDocSource(ds, self.tok)
        return dict(self._sources)

    def weights(
        self, weights_at: Callable[[int], Mapping[str, float]] | Mapping[str, float]
    ) -> Callable[[int], Mapping[str, float]]:
        """The stage's own weights scaled to 1 - sum(shares), plus the declared shares."""
        rest = max(0.0, 1.0 - sum(self.shares.values()))
        self.sources()
        if not self._sources:
            return weights_at if callable(weights_at) else (lambda step: dict(weights_at))

        def at(step: int) -> dict[str, float]:
            own = dict(weights_at(step) if callable(weights_at) else weights_at)
            total = sum(own.values())
            out = {k: (rest * v / total if total > 0 else 0.0) for k, v in own.items()}
            out.update({n: s for n, s in self.shares.items() if n in self._sources})
            return out

        return at

    def heldout_items(self, name: str) -> list[ChatPromptItem]:
        """Prompts of the held-out records of `name` (in id order; a bad one is left out)."""
        ds, items = self.sets[name], []
        for rid in ds.heldout:
            rec = ds.record(rid)
            try:
                if isinstance(rec, BadRecord):
                    raise rec
                items.append(prompt_item(rec, self.tok, self.vision, ClipSampling.of(ds.decl)))
            except BadRecord:
                continue
        return items

    def prompts(self, name: str, exclude_heldout: bool = True) -> list[ChatPromptItem]:
        """Every usable record of an RL prompt / chat dataset as a generation prompt (the whole
        set is in memory: prompt sets are small next to pretraining data)."""
        ds, held, items = self.sets[name], set(self.sets[name].heldout), []
        for rid, rec in ds.records():
            if exclude_heldout and rid in held or isinstance(rec, BadRecord):
                continue
            try:
                items.append(prompt_item(rec, self.tok, self.vision, ClipSampling.of(ds.decl)))
            except BadRecord:
                continue
        self._prompt_counts[name] = len(items)
        return items

    def pairs(self) -> dict[str, tuple[DeclaredPairs, float]]:
        """The image-text pair sets with their shares (vit_pretrain's `extra` sources)."""
        return {n: (DeclaredPairs(ds), self.shares[n]) for n, ds in self.sets.items() if ds.kind == "pair"}

    def metrics(self, batches=None) -> dict[str, float]:
        """Per dataset: records, valid, held out, used (documents drawn, all ranks), skipped in
        the check and in training, by reason: data/<name>/... (lineage reads them)."""
        out: dict[str, float] = {}
        drawn = {**self._prompt_counts, **(getattr(batches, "docs_by_source", None) or {})}
        used = {n: float(drawn.get(n, 0)) for n in self.sets}
        trained_bad = {f"{n}/{r}": float(c) for n, ds in self.sets.items() for r, c in ds.skipped.items()}
        if self.par is not None and self.par.world_size > 1:
            keys = sorted(used) + sorted(trained_bad)
            summed = self.par.mean_metrics({k: {**used, **trained_bad}[k] for k in keys})
            # a context-parallel group's ranks drew the same documents: count each replica once
            used = {n: summed[n] * self.par.dp_size for n in used}
            trained_bad = {k: summed[k] * self.par.dp_size for k in trained_bad}
        for name, rep in self.reports.items():
            p = f"data/{name}/"
            out.update(
                {
                    p + "records": float(rep.num_records),
                    p + "valid": float(rep.num_records - rep.num_bad),
                    p + "heldout": float(len(self.sets[name].heldout)),
                    p + "records_used": float(round(used[name])),
                    p + "skipped": float(rep.num_bad),
                }
            )
            out.update({p + f"skipped/{r}": float(c) for r, c in rep.bad.items()})
        out.update(
            {
                f"data/{k.split('/')[0]}/skipped_in_training/{k.split('/')[1]}": v
                for k, v in trained_bad.items()
            }
        )
        return out


def weighted_pool(own: list, declared: Mapping[str, list], shares: Mapping[str, float], seed: str) -> list:
    """A list of prompts (or pairs) in which each declared set makes up its share of the items
    (repeated or subsampled in a seeded order) and `own` the rest: uniform sampling from the pool
    then follows the mixture. With no own items the declared sets split the pool by share."""
    import random

    declared = {n: items for n, items in declared.items() if items}
    if not declared:
        return list(own)
    rest = max(0.0, 1.0 - sum(shares[n] for n in declared))
    unit = (
        len(own) / rest if own and rest > 0 else float(max(len(v) / shares[n] for n, v in declared.items()))
    )
    pool = list(own) if rest > 0 else []
    for name, items in declared.items():
        want = max(1, round(unit * shares[name]))
        order = list(range(len(items)))
        random.Random(f"{seed}/{name}").shuffle(order)
        pool += [items[order[i % len(items)]] for i in range(want)]
    return pool


def preference_pairs(mix: DeclaredMix, name: str) -> list[tuple[ChatPromptItem, list[int], list[int]]]:
    """(prompt, chosen ids, rejected ids) of a preference dataset's training records; responses
    end in the turn-end token, as sampled responses do."""
    ds, held, out = mix.sets[name], set(mix.sets[name].heldout), []
    end = [mix.tok.turn_end_id]
    for rid, rec in ds.records():
        if rid in held or isinstance(rec, BadRecord):
            continue
        try:
            item = prompt_item(rec, mix.tok, mix.vision, ClipSampling.of(ds.decl))
        except BadRecord:
            continue
        out.append((item, mix.tok.encode(rec.chosen) + end, mix.tok.encode(rec.rejected) + end))
    return out

"""Video documents: `videoworld` clips as LM documents beside the image ones (sources.py).

A clip is shown as `num_frames` frames sampled at the centres of equal spans of it, or with
`fps` at fps from t=0, at most num_frames (`video_decode.sample_clip`), which become
ceil(num_frames / 2) temporal patches of its patch grid (`clip_patches`, model/vision.py
`video_patches`) behind ONE media placeholder, as
`moonforge chat --video` builds it:

  video_caption_docs  [video] {caption} <|endoftext|>                          loss on the text
  video_qa_docs       [video] \\nQuestion: {q}\\nAnswer: {a} <|endoftext|>     loss on " {a}" + eos
  video_chat_docs     user "<image>\\n{q}" ([video] at the marker), assistant "{a}"   loss on the answer

where [video] is `Tokenizer.media_placeholder(ceil(ceil(num_frames / 2) / k) * h * w / merge**2)`
(k: the model's temporal merge; a `max_tokens` budget per clip shrinks (h, w), never F). A batch
that holds a clip carries `media_t` (each grid entry's temporal index) and `media_group` (which
entries are one clip) for the encoder (batches.py `collate_rows`).

Legend: F frames sampled, T temporal patches, (h, w) the clip's patch grid.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.data.images import CorruptImageError, TooManyCorruptImagesError
from moonforge.stages.data.sources import Doc, DocSource, Media, VisionSpec, qa_prompt
from moonforge.stages.data.user_videos import clip_grid, clip_tokens
from moonforge.stages.data.video_decode import sample_clip, sampled_count
from moonforge.stages.data.video_files import VideoRecord, clip_patches

CLIP_CACHE_BYTES = 256 * 2**20
"""Patched clips a VideoLoader keeps (least recently used out first). A clip is read once per
question it has and again every epoch: the tiny recipe's SFT motion phase reads each of its 194
clips ~77 times, and decoding + patching (~1 ms a clip) was 12% of SFT's time. A tiny clip's
patches take 74 KB; a user's long clips beyond the budget are decoded again as before."""

Patched = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]
"""clip_patches' output (pixels_NP, grid_hw, media_t) and the number of frames sampled."""


class VideoLoader:
    """Decodes one dataset's clips, skipping and counting corrupt files up to a share of them
    (ImageLoader's contract: `skipped` counts skip events, `corrupt` the distinct bad paths),
    and keeps the clips it patched last (`patches`, up to `cache_bytes` of pixels)."""

    def __init__(
        self,
        dataset: str,
        root: Path,
        num_clips: int,
        max_corrupt_frac: float = 0.01,
        cache_bytes: int = CLIP_CACHE_BYTES,
    ):
        self.dataset, self.root = dataset, Path(root)
        self.num_clips, self.max_corrupt_frac = num_clips, max_corrupt_frac
        self.skipped = 0
        self.corrupt: set[str] = set()
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple, Patched] = OrderedDict()
        self._cached_bytes = 0

    def load(self, rel_path: str, num_frames: int, fps: float | None = None) -> list[Image.Image] | None:
        """The sampled frames (video_decode.sample_clip), or None (counted) when the clip is corrupt."""
        if rel_path not in self.corrupt:
            try:
                return sample_clip(self.root / rel_path, num_frames, fps)
            except FileNotFoundError:
                self._bad(rel_path)
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
                self._bad(rel_path)
        self.skipped += 1
        return None

    def patches(
        self, rel_path: str, num_frames: int, fps: float | None, vision: VisionSpec, max_patches: int
    ) -> Patched | None:
        """The clip's `clip_patches` and its frame count, from the cache when it was patched the
        same way lately, else decoded (`load`: None, counted, when it is corrupt). Decoding is
        deterministic, so a cached clip is what a fresh decode gives. Callers must not modify the
        tensors in place (collate_rows copies them into the batch)."""
        key = (rel_path, num_frames, fps, vision.patch_size, vision.merge_size, max_patches)
        if (hit := self._cache.get(key)) is not None:
            self._cache.move_to_end(key)
            return hit
        frames = self.load(rel_path, num_frames, fps)
        if frames is None:
            return None
        out = (*clip_patches(frames, vision.patch_size, vision.merge_size, max_patches), len(frames))
        size = out[0].nbytes
        if size <= self.cache_bytes:
            self._cache[key] = out
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                self._cached_bytes -= self._cache.popitem(last=False)[1][0].nbytes
        return out

    def _bad(self, rel_path: str) -> None:
        self.corrupt.add(rel_path)
        if len(self.corrupt) > self.max_corrupt_frac * self.num_clips:
            raise TooManyCorruptImagesError(
                self.dataset, len(self.corrupt), self.num_clips, self.max_corrupt_frac
            )


@dataclass(frozen=True)
class VideoRef:
    """A clip a document shows, not yet decoded: its loader, path, patch grid, frame count and
    patches per frame (below the model's max_patches when a token budget shrinks the frames)."""

    loader: VideoLoader
    path: str
    grid_hw: tuple[int, int]
    num_frames: int
    """Frames it shows: the stage's num_frames, or with fps those of its length (at most that)."""
    max_patches: int
    fps: float | None = None

    @classmethod
    def of(
        cls,
        loader: VideoLoader,
        rec: VideoRecord,
        vision: VisionSpec,
        num_frames: int,
        max_tokens: int | None,
        fps: float | None = None,
    ) -> VideoRef:
        # the record's clip lasts num_frames frames of 1000 / fps ms (a whole number)
        n = sampled_count(rec.num_frames * (1000 // rec.fps), num_frames, fps)
        grid, cap = clip_grid((rec.width, rec.height), vision, n, max_tokens)
        return cls(loader, rec.video, grid, n, cap, fps)

    def num_tokens(self, vision: VisionSpec) -> int:
        return clip_tokens(self.grid_hw, vision.merge_size, self.num_frames, vision.temporal_merge)

    def media(self, vision: VisionSpec, clip: int) -> list[Media] | None:
        """The clip's temporal patches (document-local clip index `clip`), or None if corrupt."""
        got = self.loader.patches(self.path, self.num_frames, self.fps, vision, self.max_patches)
        if got is None:
            return None
        pixels_NP, grid, t, num_frames = got
        hw = (int(grid[0, 0]), int(grid[0, 1]))
        if hw != self.grid_hw or num_frames != self.num_frames:
            raise CorruptImageError(
                self.loader.root / self.path,
                f"its frames give patch grid {hw} and {num_frames} samples but its record says "
                f"{self.grid_hw} and {self.num_frames}; the manifest and clips disagree",
            )
        n = hw[0] * hw[1]
        return [Media(pixels_NP[i * n : (i + 1) * n], hw, int(t[i]), clip) for i in range(len(t))]


def _video(
    tok: Tokenizer,
    loader: VideoLoader,
    rec: VideoRecord,
    vision: VisionSpec,
    num_frames: int,
    max_tokens: int | None,
    fps: float | None,
) -> tuple[list[int], VideoRef]:
    ref = VideoRef.of(loader, rec, vision, num_frames, max_tokens, fps)
    return tok.media_placeholder(ref.num_tokens(vision)), ref


def video_caption_docs(
    records: Sequence[VideoRecord],
    clip_root: Path,
    tokenizer: Tokenizer,
    num_frames: int,
    name: str = "video_caption",
    max_corrupt_frac: float = 0.01,
    max_tokens: int | None = None,
    fps: float | None = None,
) -> DocSource:
    """One document per clip: the clip, then its caption (the events in order)."""
    recs = list(records)
    loader = VideoLoader(name, clip_root, len(recs), max_corrupt_frac)

    def make(i: int, vision: VisionSpec) -> Doc:
        media, ref = _video(tokenizer, loader, recs[i], vision, num_frames, max_tokens, fps)
        body = tokenizer.encode(recs[i].caption) + [tokenizer.eos_id]
        return Doc(media + body, [0] * len(media) + [1] * len(body), (ref,))

    return DocSource(name, len(recs), make, loader)


def video_qa_docs(
    records: Sequence[VideoRecord],
    clip_root: Path,
    tokenizer: Tokenizer,
    num_frames: int,
    name: str = "video_qa",
    max_corrupt_frac: float = 0.01,
    max_tokens: int | None = None,
    fps: float | None = None,
) -> DocSource:
    """One document per (clip, question), loss on the answer and eos only."""
    recs = list(records)
    pairs = [(r, q) for r in recs for q in r.qa]
    loader = VideoLoader(name, clip_root, len(recs), max_corrupt_frac)

    def make(i: int, vision: VisionSpec) -> Doc:
        rec, qa = pairs[i]
        media, ref = _video(tokenizer, loader, rec, vision, num_frames, max_tokens, fps)
        prompt = media + qa_prompt(tokenizer, qa.question)
        answer = tokenizer.encode(f" {qa.answer}") + [tokenizer.eos_id]
        return Doc(prompt + answer, [0] * len(prompt) + [1] * len(answer), (ref,))

    return DocSource(name, len(pairs), make, loader)


def video_chat_docs(
    records: Sequence[VideoRecord],
    clip_root: Path,
    tokenizer: Tokenizer,
    num_frames: int,
    name: str = "video_chat",
    max_corrupt_frac: float = 0.01,
    max_tokens: int | None = None,
    fps: float | None = None,
) -> DocSource:
    """One SFT dialogue per (clip, question), asked as `moonforge chat --video` asks it: the
    user turn "<image>\\n{question}" with the clip at the marker, the answer supervised."""
    recs = list(records)
    pairs = [(r, q) for r in recs for q in r.qa]
    loader = VideoLoader(name, clip_root, len(recs), max_corrupt_frac)

    def make(i: int, vision: VisionSpec) -> Doc:
        rec, qa = pairs[i]
        ref = VideoRef.of(loader, rec, vision, num_frames, max_tokens, fps)
        turns = [
            {"role": "user", "content": f"<image>\n{qa.question}"},
            {"role": "assistant", "content": qa.answer},
        ]
        ids, mask = tokenizer.encode_chat(turns, [ref.num_tokens(vision)])
        return Doc(ids, mask, (ref,))

    return DocSource(name, len(pairs), make, loader)

"""Video clips on disk: the `videoworld` manifest schema and a frame reader.

Layout: data/videoworld/{train,val}/records.jsonl + clips/*.webp -> VideoRecord

Clips are lossless animated WebP written by Pillow (pinned): the decoded pixels are exactly the
rendered ones, and the same params give the same bytes on the same Pillow/libwebp build. Like
every video encoder (GIF and WebP in Pillow alike), it stores a run of identical frames as one
longer frame, so the number of stored frames is not the clip's frame count. A reader therefore
never counts stored frames: it samples the clip at timestamps (`read_frames` with `fps` or
`num_frames`), as video decoders and VLM frame samplers do; at the record's own fps it gets back
every rendered frame. `clip_patches` turns sampled frames into MoonViT's temporal patches.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Literal

import torch
from PIL import Image
from pydantic import Field

from moonforge.model.vision import video_patches
from moonforge.stages.data.images import to_patches
from moonforge.stages.data.records import Box, _Record, _split, read_jsonl, require_dataset

VideoKind = Literal["motion", "order", "crossings", "count"]


class VideoQA(_Record):
    """A question whose answer needs the frames in order (or all of them), checked exactly."""

    question: str
    answer: str = Field(min_length=1)
    type: Literal["direction", "order", "crossings", "count"]


class FrameBoxes(_Record):
    """The frames manifest: what one rendered frame shows, and when."""

    t_ms: int = Field(ge=0)
    """Start of the frame in milliseconds from the start of the clip."""
    boxes: tuple[Box, ...]


class VideoRecord(_Record):
    """One toy-world clip with its verifiable facts."""

    id: str
    video: str
    """Path of the animated WebP relative to the split directory (e.g. "clips/train-000123.webp")."""
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    kind: VideoKind
    fps: int = Field(gt=0)
    """Rendered frame rate; 1000 / fps is a whole number of milliseconds."""
    num_frames: int = Field(ge=2)
    caption: str = Field(min_length=1)
    """The events in the order they happen."""
    qa: tuple[VideoQA, ...]
    frames: tuple[FrameBoxes, ...]


def read_video_records(dataset: Path, split: str, name: str = "videoworld") -> list[VideoRecord]:
    """Validated records of `split` ('train' or 'val') of a built videoworld dataset."""
    root = require_dataset(dataset, name)
    return read_jsonl(root / _split(split) / "records.jsonl", VideoRecord)


def _stored(path: Path | BinaryIO) -> tuple[list[Image.Image], list[int], int]:
    """The stored frames (RGB), their start times and the clip's length, in milliseconds."""
    frames, starts, t = [], [], 0
    with Image.open(path) as im:
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            im.load()  # Pillow sets a WebP frame's duration when it decodes it
            frames.append(im.convert("RGB"))
            starts.append(t)
            t += int(im.info.get("duration") or 0)
    if t <= 0:
        raise ValueError(f"{path}: a video needs frame durations; this file has none (a still image?)")
    return frames, starts, t


def read_frames(
    path: Path | BinaryIO, *, fps: float | None = None, num_frames: int | None = None
) -> list[Image.Image]:
    """The frames shown at `fps` samples per second from t=0, or at the centres of `num_frames`
    equal spans of the clip (give exactly one); `path` may be an open binary file. A frame shown
    at time t is the last stored frame starting at or before t."""
    if (fps is None) == (num_frames is None):
        raise ValueError("read_frames: give exactly one of fps= or num_frames=")
    frames, starts, total = _stored(path)
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"read_frames: fps must be > 0, got {fps}")
        times, k = [], 0
        while round(k * 1000.0 / fps) < total:
            times.append(round(k * 1000.0 / fps))
            k += 1
    else:
        if num_frames is None or num_frames < 1:
            raise ValueError(f"read_frames: num_frames must be >= 1, got {num_frames}")
        times = [int((k + 0.5) * total / num_frames) for k in range(num_frames)]
    out, j = [], 0
    for t in times:
        while j + 1 < len(starts) and starts[j + 1] <= t:
            j += 1
        out.append(frames[j])
    return out


def clip_patches(
    frames: list[Image.Image], patch_size: int, merge_size: int, max_patches: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A clip's sampled frames -> MoonViT input: (pixels_NP, grid_hw (n, 2), media_t (n,)), one
    grid entry per temporal patch of TEMPORAL_PATCH frames (model/vision.py `video_patches`).
    Every frame is resized to the first frame's patch grid, so a clip has one grid; one frame
    gives exactly the image's patches."""
    if not frames:
        raise ValueError("clip_patches: a clip needs at least one frame")
    first, (h, w) = to_patches(frames[0], patch_size, merge_size, max_patches)
    size = (w * patch_size, h * patch_size)
    rest = [
        to_patches(
            f.convert("RGB").resize(size, Image.Resampling.BICUBIC), patch_size, merge_size, max_patches
        )[0]
        for f in frames[1:]
    ]
    temporal_TNP = video_patches(torch.stack([first, *rest]))
    n = temporal_TNP.shape[0]
    return temporal_TNP.flatten(0, 1), torch.tensor([[h, w]] * n), torch.arange(n)

"""Video clips on disk: the `videoworld` manifest schema, and sampled frames -> MoonViT input.

Layout: data/videoworld/{train,val}/records.jsonl + clips/*.webp -> VideoRecord

Clips are lossless animated WebP written by Pillow (pinned): the decoded pixels are exactly the
rendered ones, and the same params give the same bytes on the same Pillow/libwebp build. Like
every video encoder, it stores a run of identical frames as one longer frame, so the number of
stored frames is not the clip's frame count: clips are read by time (video_decode.read_frames),
which at the record's own fps gives back every rendered frame. `clip_patches` turns sampled
frames into MoonViT's temporal patches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from pydantic import Field

from moonforge.model.vision import video_patches
from moonforge.stages.data.images import to_patches
from moonforge.stages.data.params import VideoKind
from moonforge.stages.data.records import Box, _Record, _split, read_jsonl, require_dataset


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

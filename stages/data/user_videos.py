"""The videos of users' records: decoded by time into frames, as `videoworld` clips are.

A video reference resolves exactly like an image reference (a path inside images_root, an s3://
URI, a data: URI or inline bytes: user_images.resolve_image), and is read as MP4 (or any container
FFmpeg reads) through PyAV, or as animated WebP or GIF through Pillow: video_decode.py samples
`num_frames` frames evenly by time. In
messages a `<video>` marker says where a video goes; the document then holds it as
ceil(num_frames / 2) temporal patches behind one media placeholder run (video_sources.py).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass

from PIL import Image

from moonforge.model.vision import TEMPORAL_PATCH
from moonforge.stages.data.images import num_image_tokens, patch_grid
from moonforge.stages.data.sources import VisionSpec
from moonforge.stages.data.user_images import BadRecord, ImageSource
from moonforge.stages.data.video_decode import duration_ms, sample_clip, sampled_count
from moonforge.stages.data.video_decode import video_size as read_size

VIDEO_MARKER = "<video>"


def video_frames(src: ImageSource, num_frames: int, fps: float | None = None) -> list[Image.Image]:
    """`num_frames` frames sampled evenly from the video, or with `fps` at fps from t=0 (at most
    `num_frames`: video_decode.sample_clip); BadRecord (missing_video / corrupt_video) if it
    cannot be read."""
    data = _read(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return sample_clip(_named(data, src.uri), num_frames, fps)
        except _DECODE_ERRORS as e:
            raise _corrupt(src, e) from None


def clip_tokens(grid_hw: tuple[int, int], merge_size: int, num_frames: int, temporal_merge: int = 1) -> int:
    """LM tokens of a clip sampled as `num_frames` frames of patch grid `grid_hw`: its grid's
    tokens over ceil(num_frames / 2) temporal patches, every `temporal_merge` of them averaged
    into one (model vision.temporal_merge_size)."""
    return _groups(num_frames, temporal_merge) * num_image_tokens(grid_hw, merge_size)


def _groups(num_frames: int, temporal_merge: int) -> int:
    """Temporal token groups of a clip: ceil(num_frames / 2) temporal patches, merged by k."""
    return math.ceil(math.ceil(num_frames / TEMPORAL_PATCH) / temporal_merge)


def clip_grid(
    size_wh: tuple[int, int], vision: VisionSpec, num_frames: int, max_tokens: int | None
) -> tuple[tuple[int, int], int]:
    """(patch grid, patches per frame at most) of a width x height clip sampled as `num_frames`
    frames, so that it takes at most `max_tokens` LM tokens (None: no budget, the model's
    max_patches): the frames keep their count and each frame's resolution shrinks, as
    Qwen2.5-VL's video pixel budget does. A budget below one token per temporal group is
    refused, naming the fix."""
    cap = _budget_patches(vision, num_frames, max_tokens)
    return patch_grid(*size_wh, vision.patch_size, vision.merge_size, cap), cap


def _budget_patches(vision: VisionSpec, num_frames: int, max_tokens: int | None) -> int:
    if max_tokens is None:
        return vision.max_patches
    groups = _groups(num_frames, vision.temporal_merge)
    if max_tokens < groups:
        raise ValueError(
            f"a video token budget of {max_tokens} cannot show {num_frames} frames: they make "
            f"{groups} temporal token groups of at least one token each; raise the budget to "
            f">= {groups} or sample fewer frames"
        )
    return min(vision.max_patches, max_tokens // groups * vision.merge_size**2)


def _header(src: ImageSource, num_frames: int, fps: float | None) -> tuple[tuple[int, int], int]:
    """((width, height), frames `video_frames` takes) of a video, from one read of its bytes and
    no frame decoded (with fps the count comes from its duration, which an MP4's packets give)."""
    data = _read(src)
    try:
        size = read_size(_named(data, src.uri))
        if fps is None:
            return size, num_frames
        return size, sampled_count(duration_ms(_named(data, src.uri)), num_frames, fps)
    except _DECODE_ERRORS as e:
        raise _corrupt(src, e) from None


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What Pillow and video_decode raise for a file they cannot read as a video."""


def _read(src: ImageSource) -> bytes:
    try:
        return src.read_bytes()
    except BadRecord as e:
        raise BadRecord("missing_video", e.detail.replace("image", "video", 1)) from None


def _corrupt(src: ImageSource, e: Exception) -> BadRecord:
    msg = f"{type(e).__name__}: {e}"
    return BadRecord("corrupt_video", msg if src.uri in msg else f"video {src.uri}: {msg}")


def _named(data: bytes, uri: str) -> io.BytesIO:
    """The video's bytes as a file whose name (in the decoders' errors) is its reference."""
    f = io.BytesIO(data)
    f.name = uri
    return f


@dataclass(frozen=True)
class ClipSampling:
    """How a declared dataset's videos become frames and tokens: its `video_frames`,
    `video_fps` and `video_max_tokens` (the stages' `video:` sections mean the same)."""

    num_frames: int = 8
    fps: float | None = None
    max_tokens: int | None = None

    @classmethod
    def of(cls, decl) -> ClipSampling:
        return cls(decl.video_frames, decl.video_fps, decl.video_max_tokens)

    def shape(self, src: ImageSource, vision: VisionSpec) -> tuple[int, tuple[int, int], int]:
        """(frames sampled, patch grid, patches per frame at most) of a video, before decoding it."""
        size, n = _header(src, self.num_frames, self.fps)
        grid, cap = clip_grid(size, vision, n, self.max_tokens)
        return n, grid, cap

    def tokens(self, src: ImageSource, vision: VisionSpec) -> int:
        n, grid, _ = self.shape(src, vision)
        return clip_tokens(grid, vision.merge_size, n, vision.temporal_merge)

    def frames(self, src: ImageSource) -> list[Image.Image]:
        return video_frames(src, self.num_frames, self.fps)


def media_in_order(messages, images, videos) -> list[tuple[str, ImageSource]]:
    """("image" | "video", source) for each marker of the messages' contents, in order."""
    from moonforge.model.tokenizer import IMAGE_MARKER

    its = {IMAGE_MARKER: ("image", iter(images)), VIDEO_MARKER: ("video", iter(videos))}
    out = []
    for _, content in messages:
        for m in re.findall(f"{IMAGE_MARKER}|{VIDEO_MARKER}", content):
            kind, it = its[m]
            out.append((kind, next(it)))
    return out

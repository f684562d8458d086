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

from PIL import Image

from moonforge.model.vision import TEMPORAL_PATCH
from moonforge.stages.data.images import num_image_tokens
from moonforge.stages.data.user_images import BadRecord, ImageSource
from moonforge.stages.data.video_decode import read_frames
from moonforge.stages.data.video_decode import video_size as read_size

VIDEO_MARKER = "<video>"


def video_frames(src: ImageSource, num_frames: int) -> list[Image.Image]:
    """`num_frames` frames sampled evenly from the video; BadRecord (missing_video /
    corrupt_video) if it cannot be read."""
    try:
        data = src.read_bytes()
    except BadRecord as e:
        raise BadRecord("missing_video", e.detail.replace("image", "video", 1)) from None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return read_frames(_named(data, src.uri), num_frames=num_frames)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise _corrupt(src, e) from None


def clip_tokens(grid_hw: tuple[int, int], merge_size: int, num_frames: int) -> int:
    """LM tokens of a clip sampled as `num_frames` frames of patch grid `grid_hw`: its grid's
    tokens over ceil(num_frames / 2) temporal patches."""
    return math.ceil(num_frames / TEMPORAL_PATCH) * num_image_tokens(grid_hw, merge_size)


def video_size(src: ImageSource) -> tuple[int, int]:
    """(width, height) of the video's frames from its header (no frame decoded)."""
    try:
        data = src.read_bytes()
    except BadRecord as e:
        raise BadRecord("missing_video", e.detail.replace("image", "video", 1)) from None
    try:
        return read_size(_named(data, src.uri))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise _corrupt(src, e) from None


def _corrupt(src: ImageSource, e: Exception) -> BadRecord:
    msg = f"{type(e).__name__}: {e}"
    return BadRecord("corrupt_video", msg if src.uri in msg else f"video {src.uri}: {msg}")


def _named(data: bytes, uri: str) -> io.BytesIO:
    """The video's bytes as a file whose name (in the decoders' errors) is its reference."""
    f = io.BytesIO(data)
    f.name = uri
    return f


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

"""The videos of users' records: decoded by time into frames, as `videoworld` clips are.

A video reference resolves exactly like an image reference (a path inside images_root, an s3://
URI, a data: URI or inline bytes: user_images.resolve_image), and is read as animated WebP or GIF
through Pillow (stages/data/video_files.py samples `num_frames` frames evenly by time). In
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

VIDEO_MARKER = "<video>"


def video_frames(src: ImageSource, num_frames: int) -> list[Image.Image]:
    """`num_frames` frames sampled evenly from the video; BadRecord (missing_video /
    corrupt_video) if it cannot be read."""
    from moonforge.stages.data.video_files import read_frames

    try:
        data = src.read_bytes()
    except BadRecord as e:
        raise BadRecord("missing_video", e.detail.replace("image", "video", 1)) from None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return read_frames(io.BytesIO(data), num_frames=num_frames)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise BadRecord("corrupt_video", f"video {src.uri}: {type(e).__name__}: {e}") from None


def clip_tokens(grid_hw: tuple[int, int], merge_size: int, num_frames: int) -> int:
    """LM tokens of a clip sampled as `num_frames` frames of patch grid `grid_hw`: its grid's
    tokens over ceil(num_frames / 2) temporal patches."""
    return math.ceil(num_frames / TEMPORAL_PATCH) * num_image_tokens(grid_hw, merge_size)


def video_size(src: ImageSource) -> tuple[int, int]:
    """(width, height) of the video's first frame from its header (no frame decoded)."""
    try:
        data = src.read_bytes()
    except BadRecord as e:
        raise BadRecord("missing_video", e.detail.replace("image", "video", 1)) from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise BadRecord("corrupt_video", f"video {src.uri}: {type(e).__name__}: {e}") from None


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

"""Reading a video file as frames at chosen times.

Two decoders, picked by the file's first bytes (never by its name):
- animated WebP and GIF through Pillow (videoworld's clips are lossless WebP);
- every container FFmpeg reads (MP4, MOV, MKV, WebM, AVI: H.264, HEVC, VP9, AV1, MPEG-4) through
  PyAV, pinned, which bundles its own FFmpeg. Users' video sets (LLaVA-Video, ShareGPT4Video) are
  MP4.
Every encoder stores a run of identical frames as one longer frame (GIF and WebP in Pillow; a
variable-frame-rate MP4 likewise), so a reader never counts stored frames: it samples the clip at
timestamps (`read_frames` with `fps` or `num_frames`), as video decoders and VLM frame samplers do,
and the frame shown at time t is the last stored frame starting at or before t. At a videoworld
record's own fps this gives back every rendered frame.

An MP4 is read in two passes: its packets' timestamps first (demuxed, nothing decoded), then a
decode that converts only the sampled frames to RGB and stops after the last, so a long video costs
its decoding up to the last sample, never a copy of every frame in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

from PIL import Image

Source = Path | BinaryIO


def read_frames(
    src: Source, *, fps: float | None = None, num_frames: int | None = None, max_frames: int | None = None
) -> list[Image.Image]:
    """The frames (RGB) shown at `fps` samples per second from t=0, or at the centres of
    `num_frames` equal spans of the clip (give exactly one). With fps, `max_frames` caps the
    count: a clip that would give more is sampled as `num_frames=max_frames` instead (Qwen2-VL's
    fps with max_frames). `src` is a path or an open binary file. ValueError names the file
    when it is not a video this can decode."""
    if (fps is None) == (num_frames is None):
        raise ValueError("read_frames: give exactly one of fps= or num_frames=")
    if fps is not None and fps <= 0:
        raise ValueError(f"read_frames: fps must be > 0, got {fps}")
    for name, n in (("num_frames", num_frames), ("max_frames", max_frames)):
        if n is not None and n < 1:
            raise ValueError(f"read_frames: {name} must be >= 1, got {n}")
    plan = _Plan(fps, num_frames, max_frames)
    if _is_pillow_video(src):
        return _pillow_frames(src, plan)
    return _av_frames(src, plan)


def sample_clip(src: Source, num_frames: int, fps: float | None = None) -> list[Image.Image]:
    """The sampling recipes and declarations ask for: `num_frames` frames evenly, or with `fps`
    the frames at fps from t=0, at most `num_frames` of them."""
    if fps is None:
        return read_frames(src, num_frames=num_frames)
    return read_frames(src, fps=fps, max_frames=num_frames)


def sampled_count(total_ms: float, num_frames: int, fps: float | None = None) -> int:
    """How many frames `sample_clip` takes from a clip `total_ms` long (known before decoding)."""
    if fps is None:
        return num_frames
    return min(len(sample_times(total_ms, fps, None)), num_frames)


def duration_ms(src: Source) -> float:
    """A video's length in milliseconds: its frames' durations (Pillow) or its packets'
    timestamps (FFmpeg; demuxed, nothing decoded)."""
    import av

    if _is_pillow_video(src):
        return float(_pillow_stored(src)[2])
    try:
        with _open_av(src) as (container, stream):
            return _av_timeline(container, stream, _name(src))[2]
    except av.FFmpegError as e:
        raise ValueError(f"{_name(src)}: FFmpeg cannot read the video ({e})") from None


def video_size(src: Source) -> tuple[int, int]:
    """(width, height) of the video's frames, from its header (no frame decoded)."""
    if _is_pillow_video(src):
        with Image.open(src) as im:
            return im.size
    with _open_av(src) as (container, stream):
        return _checked_size(stream, _name(src))


def sample_times(total_ms: float, fps: float | None, num_frames: int | None) -> list[float]:
    """Sample times in milliseconds for a clip `total_ms` long: k * 1000 / fps from 0 while
    inside it, or the centres of `num_frames` equal spans."""
    if fps is not None:
        times, k = [], 0
        while round(k * 1000.0 / fps) < total_ms:
            times.append(float(round(k * 1000.0 / fps)))
            k += 1
        return times
    assert num_frames is not None
    return [float(int((k + 0.5) * total_ms / num_frames)) for k in range(num_frames)]


def shown_at(starts: Sequence[float], times: Sequence[float]) -> list[int]:
    """For each (ascending) time, the index of the last frame starting at or before it. Times
    are whole milliseconds and an MP4's starts are not (1000 / 6 fps), so a start within half a
    millisecond after t counts as at t."""
    out, j = [], 0
    for t in times:
        while j + 1 < len(starts) and starts[j + 1] <= t + 0.5:
            j += 1
        out.append(j)
    return out


def _name(src: Source) -> str:
    return str(src) if isinstance(src, Path) else str(getattr(src, "name", "<video bytes>"))


def _is_pillow_video(src: Source) -> bool:
    """GIF or WebP by magic bytes; anything else goes to FFmpeg."""
    if isinstance(src, Path):
        with open(src, "rb") as f:
            head = f.read(12)
    else:
        pos = src.tell()
        head = src.read(12)
        src.seek(pos)
    return head[:4] == b"GIF8" or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


@dataclass(frozen=True)
class _Plan:
    fps: float | None
    num_frames: int | None
    max_frames: int | None

    def times(self, total_ms: float) -> list[float]:
        times = sample_times(total_ms, self.fps, self.num_frames)
        if self.max_frames is not None and len(times) > self.max_frames:
            return sample_times(total_ms, None, self.max_frames)
        return times


def _pillow_stored(src: Source) -> tuple[list[Image.Image], list[int], int]:
    """The stored frames (RGB), their start times and the clip's length, in milliseconds."""
    frames, starts, t = [], [], 0
    with Image.open(src) as im:
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            im.load()  # Pillow sets a WebP frame's duration when it decodes it
            frames.append(im.convert("RGB"))
            starts.append(t)
            t += int(im.info.get("duration") or 0)
    if t <= 0:
        raise ValueError(f"{_name(src)}: a video needs frame durations; this file has none (a still image?)")
    return frames, starts, t


def _pillow_frames(src: Source, plan: _Plan) -> list[Image.Image]:
    frames, starts, t = _pillow_stored(src)
    return [frames[j] for j in shown_at(starts, plan.times(t))]


class _open_av:
    """`with _open_av(src) as (container, first video stream)`; FFmpeg's errors become ValueError
    naming the file (callers count or report a corrupt video the same way for both decoders)."""

    def __init__(self, src: Source):
        self.src = src

    def __enter__(self):
        import av

        if not isinstance(self.src, Path):
            self.src.seek(0)
        try:
            self.container = av.open(str(self.src) if isinstance(self.src, Path) else self.src, mode="r")
        except av.FFmpegError as e:
            raise ValueError(f"{_name(self.src)}: not a video FFmpeg can read ({e})") from None
        if not self.container.streams.video:
            self.container.close()
            raise ValueError(f"{_name(self.src)}: the file has no video stream")
        return self.container, self.container.streams.video[0]

    def __exit__(self, *exc) -> None:
        self.container.close()


def _checked_size(stream, name: str) -> tuple[int, int]:
    """The stream's frame size, refused past Pillow's decompression-bomb limit as images are."""
    w, h = stream.codec_context.width, stream.codec_context.height
    if w <= 0 or h <= 0:
        raise ValueError(f"{name}: the video stream declares no frame size")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        raise Image.DecompressionBombError(f"{name}: {w}x{h} frames exceed the {limit}-pixel limit")
    return w, h


def _av_timeline(container, stream, name: str) -> tuple[list[int], list[float], float]:
    """(every frame's pts sorted, their start times and the clip's length in milliseconds) from
    the packets' timestamps, so B-frames (decode order != display order) are sorted into place."""
    tb = stream.time_base or Fraction(1, 1000)
    stamps, last_end = [], None
    for p in container.demux(stream):
        if p.pts is None or p.size == 0:
            continue
        stamps.append(p.pts)
        end = p.pts + (p.duration or 0)
        last_end = end if last_end is None else max(last_end, end)
    stamps.sort()
    # FFmpeg reads a PNG or JPEG as a one-frame stream ("png_pipe", "image2"): not a video
    still = container.format.name == "image2" or container.format.name.endswith("_pipe")
    if not stamps or still or (len(stamps) == 1 and (last_end or 0) <= stamps[0]):
        raise ValueError(f"{name}: a video needs frame durations; this one has none (a still image?)")
    first = stamps[0]
    if last_end is None or last_end <= stamps[-1]:  # no durations: one more mean frame step
        step = (stamps[-1] - first) / max(len(stamps) - 1, 1) or 1
        last_end = stamps[-1] + step
    starts = [float((s - first) * tb * 1000) for s in stamps]
    return stamps, starts, float((last_end - first) * tb * 1000)


def _av_frames(src: Source, plan: _Plan) -> list[Image.Image]:
    import av

    name = _name(src)
    try:
        with _open_av(src) as (container, stream):
            _checked_size(stream, name)
            stamps, starts, total = _av_timeline(container, stream, name)
            want = shown_at(starts, plan.times(total))
            wanted_pts = {stamps[j] for j in want}
            got: dict[int, Image.Image] = {}
        with _open_av(src) as (container, stream):
            for frame in container.decode(stream):
                if frame.pts in wanted_pts:
                    got[frame.pts] = frame.to_image()  # RGB
                    if len(got) == len(wanted_pts):
                        break
    except av.FFmpegError as e:
        raise ValueError(f"{name}: FFmpeg cannot decode the video ({e})") from None
    missing = wanted_pts - got.keys()
    if missing:
        raise ValueError(f"{name}: {len(missing)} sampled frame(s) did not decode (a truncated file?)")
    return [got[stamps[j]] for j in want]

"""Reading users' videos (stages/data/video_decode.py): MP4 and every container FFmpeg reads,
through PyAV, sampled by time exactly as the animated WebP clips are.

The files are encoded here with PyAV's own FFmpeg: lossless RGB H.264 where pixels are compared
exactly, ordinary yuv420p H.264 with B-frames (decode order is not display order), VP9 in WebM,
MPEG-4 in AVI, and a variable-frame-rate MP4 whose frames last different times.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from moonforge.stages.data.video_decode import (
    duration_ms,
    read_frames,
    sample_clip,
    sampled_count,
    video_size,
)
from moonforge.stages.data.videoworld import write_clip

W, H = 48, 32


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(n)]


def _bar(i: int) -> np.ndarray:
    """A white bar at x = 4i on black: its column survives lossy coding."""
    a = np.zeros((H, W, 3), np.uint8)
    a[:, 4 * i : 4 * i + 4] = 255
    return a


def _bar_at(im: Image.Image) -> int:
    return int(np.argmax(np.asarray(im)[H // 2, :, 0] > 128)) // 4


def write_video(dst, frames, fps, codec="libx264rgb", fmt="mp4", pts=None, options=None):
    """Encode RGB frames; `pts` (in 1/fps units) gives each frame's start when they are uneven."""
    c = av.open(dst, "w", format=fmt)
    s = c.add_stream(codec, rate=fps)
    s.width, s.height = W, H
    s.pix_fmt = "rgb24" if codec == "libx264rgb" else "yuv420p"
    s.options = options or ({"qp": "0"} if codec == "libx264rgb" else {})
    for i, a in enumerate(frames):
        f = av.VideoFrame.from_ndarray(a, format="rgb24")
        if pts is not None:
            f.pts, f.time_base = pts[i], Fraction(1, fps)
        for p in s.encode(f):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


def test_a_lossless_mp4_gives_back_every_frame_by_time_and_by_count(tmp_path):
    frames = _frames(6)
    write_video(str(tmp_path / "c.mp4"), frames, fps=4)
    got = read_frames(tmp_path / "c.mp4", fps=4)
    assert len(got) == 6 and all(np.array_equal(np.asarray(g), a) for g, a in zip(got, frames))
    assert [np.asarray(g).tobytes() for g in read_frames(tmp_path / "c.mp4", fps=2)] == [
        frames[i].tobytes() for i in (0, 2, 4)
    ]
    # num_frames samples the centres of equal spans: 1500 ms / 3 -> 250, 750, 1250 ms
    mid = read_frames(tmp_path / "c.mp4", num_frames=3)
    assert [np.asarray(g).tobytes() for g in mid] == [frames[i].tobytes() for i in (1, 3, 5)]
    assert video_size(tmp_path / "c.mp4") == (W, H)


def test_an_mp4_reads_exactly_as_the_same_clip_in_animated_webp(tmp_path):
    """The two decoders agree frame for frame on one clip, at 6 fps (1000/6 ms is not a whole
    number of milliseconds in the MP4's time base, but whole in WebP's)."""
    frames = _frames(9, seed=1)
    write_video(str(tmp_path / "c.mp4"), frames, fps=6)
    write_clip([Image.fromarray(a) for a in frames], 6, tmp_path / "c.webp")
    for kw in ({"fps": 6}, {"fps": 3}, {"num_frames": 4}, {"num_frames": 8}, {"num_frames": 1}):
        a, b = read_frames(tmp_path / "c.mp4", **kw), read_frames(tmp_path / "c.webp", **kw)
        assert [np.asarray(x).tobytes() for x in a] == [np.asarray(y).tobytes() for y in b], kw


@pytest.mark.parametrize(
    "codec, fmt, options",
    [
        ("libx264", "mp4", {"preset": "medium", "bf": "3", "crf": "10"}),  # B-frames reorder
        ("libvpx-vp9", "webm", {"crf": "10", "b": "0"}),
        ("libx264", "matroska", {"crf": "10"}),
        ("mpeg4", "avi", {"qscale": "2"}),
    ],
)
def test_lossy_containers_sample_the_frames_in_display_order(tmp_path, codec, fmt, options):
    write_video(str(tmp_path / "v"), [_bar(i) for i in range(10)], 5, codec, fmt, options=options)
    if codec == "libx264" and fmt == "mp4":
        with av.open(str(tmp_path / "v")) as c:
            packets = [p for p in c.demux(c.streams.video[0]) if p.size]
        assert any(p.pts != p.dts for p in packets)  # the file really holds B-frames
    assert [_bar_at(f) for f in read_frames(tmp_path / "v", fps=5)] == list(range(10))
    assert [_bar_at(f) for f in read_frames(tmp_path / "v", num_frames=5)] == [1, 3, 5, 7, 9]
    raw = (tmp_path / "v").read_bytes()
    assert [_bar_at(f) for f in read_frames(io.BytesIO(raw), num_frames=2)] == [2, 7]


def test_a_variable_frame_rate_mp4_shows_each_frame_for_its_own_time(tmp_path):
    """Frames start at 0, 1, 4, 5 (of 1/4 s): frame 1 is held for 750 ms, as a WebP run is."""
    write_video(str(tmp_path / "vfr.mp4"), [_bar(i) for i in range(4)], 4, pts=[0, 1, 4, 5])
    assert [_bar_at(f) for f in read_frames(tmp_path / "vfr.mp4", fps=4)] == [0, 1, 1, 1, 2, 3]


def test_fps_sampling_is_capped_by_max_frames_and_its_count_is_known_before_decoding(tmp_path):
    """sample_clip(num_frames, fps): at fps from t=0 while that gives at most num_frames frames,
    else num_frames evenly; sampled_count says how many from the duration alone, for MP4 and
    WebP alike."""
    frames = [_bar(i) for i in range(10)]  # 2 s at 5 fps
    write_video(str(tmp_path / "c.mp4"), frames, fps=5)
    write_clip([Image.fromarray(a) for a in frames], 5, tmp_path / "c.webp")
    for name in ("c.mp4", "c.webp"):
        path = tmp_path / name
        assert duration_ms(path) == pytest.approx(2000, abs=0.5)
        for num_frames, fps, want in [
            (8, 2.0, [0, 2, 5, 7]),
            (3, 2.0, [1, 5, 8]),
            (12, 5.0, list(range(10))),
        ]:
            got = [_bar_at(f) for f in sample_clip(path, num_frames, fps)]
            assert got == want and len(got) == sampled_count(duration_ms(path), num_frames, fps), (name, fps)
        assert [_bar_at(f) for f in sample_clip(path, 4)] == [1, 3, 6, 8]  # no fps: evenly


def _audio_only(path: Path) -> None:
    c = av.open(str(path), "w", format="mp4")
    s = c.add_stream("aac", rate=16000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 16000, 0
    for p in [*s.encode(frame), *s.encode()]:
        c.mux(p)
    c.close()


def test_what_is_not_a_readable_video_is_refused_naming_the_file(tmp_path, monkeypatch):
    write_video(str(tmp_path / "c.mp4"), _frames(4), fps=4)
    raw = (tmp_path / "c.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(raw[: len(raw) // 2])  # the index (moov) is at the end
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01 not a video at all" * 10)
    Image.new("RGB", (W, H)).save(tmp_path / "still.jpg")
    _audio_only(tmp_path / "sound.m4a")
    for name, match in [
        ("cut.mp4", "cut.mp4"),
        ("junk.mp4", "junk.mp4: not a video FFmpeg can read"),
        ("still.jpg", "still.jpg: a video needs frame durations.*still image"),
        ("sound.m4a", "sound.m4a: the file has no video stream"),
    ]:
        with pytest.raises(ValueError, match=match):
            read_frames(tmp_path / name, num_frames=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", W * H - 1)
    with pytest.raises(Image.DecompressionBombError, match=rf"c.mp4: {W}x{H} frames exceed"):
        read_frames(tmp_path / "c.mp4", num_frames=2)
    with pytest.raises(Image.DecompressionBombError):
        video_size(tmp_path / "c.mp4")

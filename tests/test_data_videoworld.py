"""The video toy world (dataset `videoworld`): clips built the way `dvc repro` builds them, whose
every fact can be recovered from the decoded pixels, and a frame reader that samples by time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from moonforge.stages.data import scenes
from moonforge.stages.data.build import build
from moonforge.stages.data.params import VideoworldParams, load_params
from moonforge.stages.data.records import DatasetMissingError, ManifestError
from moonforge.stages.data.video_decode import read_frames
from moonforge.stages.data.video_files import VideoRecord, read_video_records

REPO = Path(__file__).resolve().parent.parent
SMALL = {"seed": 3, "num_train": 40, "num_val": 8, "frames": [3, 8], "fps": [2, 4, 8]}


def _build(root: Path, params: dict = SMALL) -> Path:
    (root / "params.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"videoworld": params}))
    build("videoworld", root / "params.yaml", root / "data" / "videoworld")
    return root / "data" / "videoworld"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("videoworld"))


def _seen(frame: Image.Image, colour: str) -> tuple[float, float] | None:
    """Centroid of the pixels of `colour` in `frame`, None when it is not in the frame."""
    a = np.asarray(frame)
    ys, xs = np.nonzero((a == np.array(scenes.COLORS[colour], dtype=a.dtype)).all(axis=-1))
    return (float(xs.mean()), float(ys.mean())) if len(xs) else None


def _direction(track: list[tuple[float, float]]) -> str:
    dx, dy = track[-1][0] - track[0][0], track[-1][1] - track[0][1]
    return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")


def _answers(rec: VideoRecord) -> dict[str, str]:
    return {qa.question: qa.answer for qa in rec.qa}


def test_the_same_params_give_the_same_bytes(built, tmp_path):
    again = _build(tmp_path)
    files = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((built / f).read_bytes() == (again / f).read_bytes() for f in files)
    recs = read_video_records(built, "train")
    assert len(recs) == 40 and len(read_video_records(built, "val")) == 8
    assert {r.kind for r in recs} == {"motion", "order", "crossings", "count"}
    assert len({(r.width, r.height) for r in recs}) > 1 and len({r.fps for r in recs}) > 1
    assert len({r.num_frames for r in recs}) > 1


def test_every_fact_is_in_the_decoded_pixels_and_needs_the_frame_order(built):
    for split, rec in [(s, r) for s in ("train", "val") for r in read_video_records(built, s)]:
        frames = read_frames(built / split / rec.video, fps=rec.fps)
        assert len(frames) == rec.num_frames == len(rec.frames), rec.id
        assert all(f.size == (rec.width, rec.height) for f in frames)
        colours = {b.label.split()[0]: b.label.split()[1] for fb in rec.frames for b in fb.boxes}
        for frame, fb in zip(frames, rec.frames):  # the manifest's boxes are what each frame shows
            assert {c for c in colours if _seen(frame, c)} == {b.label.split()[0] for b in fb.boxes}, rec.id
        seen = {c: [_seen(f, c) for f in frames] for c in colours}
        ans = _answers(rec)
        if rec.kind == "motion":
            ((c, track),) = seen.items()
            assert f"Which way does the {c} {colours[c]} move?" in ans
            assert _direction(track) == next(iter(ans.values())), rec.id
            assert _direction(track[::-1]) != _direction(track)  # reversed, the answer changes
        elif rec.kind == "crossings":
            ((c, track),) = seen.items()
            sides = [x < rec.width / 2 for x, _ in track]
            assert sum(a != b for a, b in zip(sides, sides[1:])) == int(next(iter(ans.values()))), rec.id
        elif rec.kind == "order":
            event = "disappears" if any("disappears" in q for q in ans) else "appears"
            on = {c: [p is not None for p in t] for c, t in seen.items()}
            when = {c: v.index(True) if event == "appears" else v.index(False) for c, v in on.items()}
            first, last = min(when, key=when.get), max(when, key=when.get)
            assert when[first] < when[last], rec.id
            assert ans[f"Which shape {event} first?"] == colours[first]
            assert ans[f"Which colour {event} last?"] == last
        else:
            assert ans["How many shapes appear in the video?"] == str(len(colours))
            assert all(
                sum(p is not None for p in (seen[c][i] for c in colours)) <= 1 for i in range(len(frames))
            )
            last = max(colours, key=lambda c: max(i for i, p in enumerate(seen[c]) if p is not None))
            assert ans["Which shape appears last?"] == colours[last]


def test_frames_are_sampled_by_time_although_the_file_merges_repeats(tmp_path):
    frames = [Image.new("RGB", (32, 32), (255, 255, 255)) for _ in range(5)]
    for i, f in enumerate(frames[2:], start=2):
        ImageDraw.Draw(f).rectangle((i * 4, 3, i * 4 + 6, 9), fill=scenes.COLORS["red"])
    from moonforge.stages.data.videoworld import write_clip

    write_clip(frames, 4, tmp_path / "c.webp")
    with Image.open(tmp_path / "c.webp") as im:
        assert im.n_frames == 4  # frames 0 and 1 are stored once, for 500 ms
    same = [
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(read_frames(tmp_path / "c.webp", fps=4), frames)
    ]
    assert same == [True] * 5
    half = read_frames(tmp_path / "c.webp", fps=2)
    assert len(half) == 3 and all(
        np.array_equal(np.asarray(a), np.asarray(frames[2 * i])) for i, a in enumerate(half)
    )
    (mid,) = read_frames(tmp_path / "c.webp", num_frames=1)
    assert np.array_equal(np.asarray(mid), np.asarray(frames[2]))
    assert len(read_frames(tmp_path / "c.webp", num_frames=5)) == 5
    with pytest.raises(ValueError, match="exactly one of fps= or num_frames="):
        read_frames(tmp_path / "c.webp", fps=4, num_frames=2)
    frames[0].save(tmp_path / "still.png")
    with pytest.raises(ValueError, match="still image"):
        read_frames(tmp_path / "still.png", fps=4)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fps": [3]}, r"fps: \[3\] do not divide 1000"),
        ({"frames": [2, 6]}, r"frames: need 3 <= min"),
        ({"kind_weights": {"motion": 1.0, "zoom": 1.0}}, r"kind_weights: use the kinds"),
        ({"sizes": [40]}, r"sizes: \[40\] must be multiples of 16"),
    ],
)
def test_bad_params_name_the_field_and_build_nothing(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        _build(tmp_path, {**SMALL, **change})
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_repo_params_validate_and_dvc_yaml_builds_them():
    params = load_params(REPO / "params.yaml", "videoworld")
    assert isinstance(params, VideoworldParams) and params.num_train >= 100
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["videoworld"]
    assert "stages/data/videoworld.py" in stage["deps"] and stage["outs"] == ["data/videoworld"]


def test_missing_or_broken_manifest_names_the_dataset_and_line(built, tmp_path):
    with pytest.raises(DatasetMissingError, match="videoworld"):
        read_video_records(tmp_path / "nope", "train")
    bad = tmp_path / "vw"
    (bad / "train").mkdir(parents=True)
    lines = (built / "train" / "records.jsonl").read_text().splitlines()
    (bad / "train" / "records.jsonl").write_text(
        lines[0] + "\n" + lines[1].replace('"fps":', '"fpz":') + "\n"
    )
    with pytest.raises(ManifestError, match=r"records.jsonl:2: field"):
        read_video_records(bad, "train")

"""Build the video toy world: short clips of moving shapes whose facts need time (dataset
`videoworld`).

Kinds (each clip 2-4 facts' worth of one of them, over `frames` frames at one of `fps`):
  motion     one shape crosses the frame left, right, up or down      "Which way does ... move?"
  order      two shapes appear (or disappear) one after the other     "Which shape appears first?"
  crossings  a shape jumps between the halves 1-3 times               "How many times ... cross the middle?"
  count      shapes shown one at a time, never two at once            "How many shapes appear?"
Direction, order and crossings change when the frames are shuffled or reversed, so a model that
answers them uses the order of the frames, not only what they show; count needs every frame.
Shapes are drawn without anti-aliasing in the toy world's colours, so a test can recover every
fact from the pixels. Every clip draws from its own RNG seeded by (seed, split, index); clips are
lossless animated WebP (see video_files.py) with the per-frame boxes in the manifest.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import cast

from PIL import Image, ImageDraw

from moonforge.stages.data import scenes
from moonforge.stages.data.params import VideoKind, VideoworldParams
from moonforge.stages.data.records import Box, write_jsonl
from moonforge.stages.data.video_files import FrameBoxes, VideoQA, VideoRecord

BACKGROUND = (255, 255, 255)
MOVES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}

Obj = tuple[str, str]
"""(colour, shape) of one object in a clip."""
Placed = list[tuple[Obj, int, int]]
"""What one frame shows: (object, x0, y0) for each visible object."""


def _objects(rng: random.Random, n: int) -> list[Obj]:
    """`n` objects differing in both colour and shape (n <= 3), so either word names one."""
    colours = rng.sample(sorted(scenes.COLORS), n)
    shapes = rng.sample(scenes.SHAPES, n)
    return list(zip(colours, shapes))


def _label(o: Obj) -> str:
    return f"{o[0]} {o[1]}"


def _motion(rng: random.Random, w: int, h: int, n: int, size: int) -> tuple[list[Placed], str, list]:
    (obj,) = _objects(rng, 1)
    way = rng.choice(sorted(MOVES))
    horizontal = way in ("left", "right")
    span = (w if horizontal else h) - size
    fixed = rng.randint(0, (h if horizontal else w) - size)
    path = [round(i * span / (n - 1)) for i in range(n)]
    if way in ("left", "up"):
        path.reverse()
    frames = [[(obj, p, fixed) if horizontal else (obj, fixed, p)] for p in path]
    qa = [(f"Which way does the {_label(obj)} move?", way, "direction")]
    return frames, f"a {_label(obj)} moves {MOVES[way]}", qa


def _order(rng: random.Random, w: int, h: int, n: int, size: int) -> tuple[list[Placed], str, list]:
    first, second = _objects(rng, 2)
    event = rng.choice(("appears", "disappears"))
    a, b = sorted(rng.sample(range(1, n), 2))  # frames >= 3 (VideoworldParams)
    spots = [
        (rng.randint(0, w // 2 - size), rng.randint(0, h - size)),  # one in each half: no overlap
        (rng.randint(w // 2, w - size), rng.randint(0, h - size)),
    ]
    rng.shuffle(spots)
    frames: list[Placed] = []
    for i in range(n):
        shown = (i >= a, i >= b) if event == "appears" else (i < a, i < b)
        frames.append([(o, *spot) for o, spot, on in zip((first, second), spots, shown) if on])
    qa = [
        (f"Which shape {event} first?", first[1], "order"),
        (f"Which colour {event} last?", second[0], "order"),
    ]
    return frames, f"a {_label(first)} {event}, then a {_label(second)} {event}", qa


def _crossings(rng: random.Random, w: int, h: int, n: int, size: int) -> tuple[list[Placed], str, list]:
    (obj,) = _objects(rng, 1)
    k = rng.randint(1, min(3, n - 1))
    flips = set(rng.sample(range(1, n), k))  # frame i is on the other side from frame i - 1
    side = rng.randrange(2)
    y = rng.randint(0, h - size)
    frames: list[Placed] = []
    for i in range(n):
        side ^= i in flips
        x = rng.randint(0, w // 2 - size) if side == 0 else rng.randint(w // 2, w - size)
        frames.append([(obj, x, y)])
    times = ("once", "twice", "three times")[k - 1]
    qa = [(f"How many times does the {_label(obj)} cross the middle?", str(k), "crossings")]
    return frames, f"a {_label(obj)} crosses the middle {times}", qa


def _count(rng: random.Random, w: int, h: int, n: int, size: int) -> tuple[list[Placed], str, list]:
    m = rng.randint(1, min(3, n))
    objs = _objects(rng, m)
    cuts = sorted(rng.sample(range(1, n), m - 1))  # m runs of frames, one object each
    bounds = list(zip([0, *cuts], [*cuts, n]))
    frames: list[Placed] = [[] for _ in range(n)]
    for o, (lo, hi) in zip(objs, bounds):
        x, y = rng.randint(0, w - size), rng.randint(0, h - size)
        # now and then a blank frame first; always for a lone shape, or the clip would be a still
        first = lo + 1 if hi - lo > 1 and (m == 1 or rng.random() < 0.5) else lo
        for i in range(first, hi):
            frames[i].append((o, x, y))
    qa = [
        ("How many shapes appear in the video?", str(m), "count"),
        ("Which shape appears last?", objs[-1][1], "order"),
    ]
    caption = ", then ".join(f"a {_label(o)}" for o in objs)
    caption = f"one at a time: {caption}" if m > 1 else caption
    return frames, caption, qa


KINDS: dict[str, Callable[..., tuple[list[Placed], str, list]]] = {
    "motion": _motion,
    "order": _order,
    "crossings": _crossings,
    "count": _count,
}


def _render(frames: list[Placed], w: int, h: int, size: int) -> tuple[list[Image.Image], list[list[Box]]]:
    images, boxes = [], []
    for placed in frames:
        img = Image.new("RGB", (w, h), BACKGROUND)
        draw, mine = ImageDraw.Draw(img), []
        for (colour, shape), x0, y0 in placed:
            x1, y1, fill = x0 + size - 1, y0 + size - 1, scenes.COLORS[colour]
            if shape == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif shape == "square":
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                draw.polygon(((x0 + x1) // 2, y0, x0, y1, x1, y1), fill=fill)
            mine.append(Box(label=f"{colour} {shape}", bbox=(x0, y0, x1 + 1, y1 + 1)))
        images.append(img)
        boxes.append(mine)
    return images, boxes


def make_clip(params: VideoworldParams, split: str, index: int) -> tuple[VideoRecord, list[Image.Image]]:
    """Sample and render clip `index` of `split`; a pure function of its arguments."""
    rng = random.Random(f"videoworld/{params.seed}/{split}/{index}")
    kinds = sorted(params.kind_weights)
    kind = rng.choices(kinds, weights=[params.kind_weights[k] for k in kinds])[0]
    w, h = rng.choice(params.sizes), rng.choice(params.sizes)
    n, fps = rng.randint(*params.frames), rng.choice(params.fps)
    size = max(4, min(w, h) // 4)
    placed, caption, qa = KINDS[kind](rng, w, h, n, size)
    images, boxes = _render(placed, w, h, size)
    rid = f"{split}-{index:06d}"
    record = VideoRecord(
        id=rid,
        video=f"clips/{rid}.webp",
        width=w,
        height=h,
        kind=cast(VideoKind, kind),
        fps=fps,
        num_frames=n,
        caption=caption,
        qa=tuple(VideoQA(question=q, answer=a, type=t) for q, a, t in qa),
        frames=tuple(FrameBoxes(t_ms=i * 1000 // fps, boxes=tuple(b)) for i, b in enumerate(boxes)),
    )
    return record, images


def write_clip(images: list[Image.Image], fps: int, path: Path) -> None:
    """Lossless animated WebP, `fps` frames per second (1000 / fps whole milliseconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(
        path,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=1000 // fps,
        loop=0,
        lossless=True,
        quality=100,
        method=0,
    )


def build_videoworld(params: VideoworldParams, out: Path) -> dict:
    """Write `out/{train,val}/records.jsonl` and `clips/*.webp`; return counts for the log."""
    stats: dict = {}
    for split, num in (("train", params.num_train), ("val", params.num_val)):
        records = []
        for i in range(num):
            record, images = make_clip(params, split, i)
            write_clip(images, record.fps, out / split / record.video)
            records.append(record)
        write_jsonl(out / split / "records.jsonl", records)
        kinds: dict[str, int] = {}
        for r in records:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        stats[split] = {
            "clips": num,
            "frames": sum(r.num_frames for r in records),
            "qa": sum(len(r.qa) for r in records),
            "kinds": dict(sorted(kinds.items())),
        }
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats

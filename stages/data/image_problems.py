"""Image problems over toy-world records, and the sampler that mixes them with arithmetic.

* counting: "How many red shapes are in the image?" over a `shapes` record, solved by listing
  every shape (colour, kind, grid position read from its box) and then filtering;
* colour: "What color is the square?" when exactly one square is drawn;
* chart: read a bar, compare two bars, take a difference or a sum, find the tallest.

The facts come from the records alone (boxes, and the caption for bar values), never from
re-rendering, so these problems depend only on the toy-world manifest.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from moonforge.stages.data import scenes
from moonforge.stages.data.problems import Problem, arithmetic_problem, clip_unit, held_out
from moonforge.stages.data.records import ImageRecord


@dataclass(frozen=True)
class SeenShape:
    color: str
    shape: str
    position: str


def shapes_in(rec: ImageRecord) -> list[SeenShape]:
    """The shapes of a `shapes` record in reading order; the grid cell comes from the box centre."""
    out = []
    for box in rec.boxes:
        color, shape = box.label.split(" ", 1)
        cx, cy = (box.bbox[0] + box.bbox[2]) / 2, (box.bbox[1] + box.bbox[3]) / 2
        col, row = min(2, int(cx * 3 / rec.width)), min(2, int(cy * 3 / rec.height))
        out.append(SeenShape(color, shape, scenes.POSITIONS[row][col]))
    return out


_BAR = re.compile(r"\b(" + "|".join(scenes.COLORS) + r") (\d+)\b")


def bars_in(rec: ImageRecord) -> list[tuple[str, int]]:
    """(colour, value) of each bar of a `chart` record, left to right (from its caption)."""
    bars = [(c, int(v)) for c, v in _BAR.findall(rec.caption)]
    boxed = [b.label.removesuffix(" bar") for b in rec.boxes]
    if [c for c, _ in bars] != boxed:
        raise ValueError(f"chart record {rec.id}: caption bars {bars} disagree with boxes {boxed}")
    return bars


def _a(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _listing(shapes: list[SeenShape]) -> list[str]:
    lines = ["First I list every shape in the image, in reading order:"]
    lines += [f"{i + 1}. {_a(s.color)} {s.shape} at the {s.position}" for i, s in enumerate(shapes)]
    return lines


def count_problem(rng: random.Random, rec: ImageRecord) -> Problem:
    """ "How many {colour} shapes / {colour} {shape}s ...?" solved by listing, filtering, counting."""
    shapes = shapes_in(rec)
    present = sorted({s.color for s in shapes})
    color = rng.choice(present) if rng.random() < 0.85 else rng.choice(sorted(scenes.COLORS))
    by_kind = rng.random() < 0.3
    shape = rng.choice([s.shape for s in shapes if s.color == color] or list(scenes.SHAPES))
    what = f"{color} {shape}s" if by_kind else f"{color} shapes"
    match = [i for i, s in enumerate(shapes) if s.color == color and (not by_kind or s.shape == shape)]
    q = rng.choice(
        ("How many {w} are in the image?", "Count the {w} in the image.", "How many {w} can you see?")
    ).format(w=what)

    def steps(n: int) -> tuple[str, ...]:
        if not match:
            tail = [f"None of them is {_a(what[:-1])}, so the count is {n}."]
        else:
            idx = ", ".join(str(i + 1) for i in match)
            tail = [f"The {what} are number {idx}.", f"Counting them one by one gives {n}."]
        return tuple(_listing(shapes) + tail)

    n = len(match)
    wrong_n = n + 1 if n == 0 or rng.random() < 0.5 else n - 1
    difficulty = 0.1 + 0.6 * (len(shapes) - 1) / 3 + 0.2 * by_kind
    return Problem(
        f"{rec.image}|count|{what}",
        f"<image>\n{q}",
        str(n),
        "numeric",
        clip_unit(difficulty),
        rec.image,
        steps(n),
        (steps(wrong_n), str(wrong_n)),
    )


def color_problem(rng: random.Random, rec: ImageRecord) -> Problem | None:
    """ "What color is the {shape}?" when exactly one shape of that kind is drawn, else None."""
    shapes = shapes_in(rec)
    unique = [s for s in shapes if sum(t.shape == s.shape for t in shapes) == 1]
    if not unique:
        return None
    s = rng.choice(unique)
    q = f"What color is the {s.shape}?"
    other = rng.choice([c for c in sorted(scenes.COLORS) if c != s.color])
    steps = tuple(_listing(shapes) + [f"Only one of them is a {s.shape}: the {s.color} one."])
    wrong = tuple(_listing(shapes) + [f"Only one of them is a {s.shape}: the {other} one."])
    return Problem(
        f"{rec.image}|color|{s.shape}",
        f"<image>\n{q}",
        s.color,
        "exact",
        clip_unit(0.05 + 0.5 * (len(shapes) - 1) / 3),
        rec.image,
        steps,
        (wrong, other),
    )


_CHART_BASE = {"value": 0.1, "tallest": 0.25, "compare": 0.3, "difference": 0.5, "sum": 0.6}


def chart_problem(rng: random.Random, rec: ImageRecord) -> Problem:
    """Read, compare, subtract or add bar values of a `chart` record."""
    bars = bars_in(rec)
    values = dict(bars)
    read = (
        "Reading the bars from left to right: " + scenes.join_phrases([f"{c} is {v}" for c, v in bars]) + "."
    )
    kinds = ["value", "sum"]
    if values and list(values.values()).count(max(values.values())) == 1:
        kinds.append("tallest")
    pairs = [(a, b) for a, _ in bars for b, _ in bars if values[a] > values[b]]
    if pairs:
        kinds += ["compare", "difference"]
    kind = rng.choice(kinds)
    ans: int | str  # a bar value or a bar's color
    wrong: int | str
    if kind == "value":
        c = rng.choice([c for c, _ in bars])
        q, ans = f"What is the value of the {c} bar?", values[c]
        body, wrong = [f"The {c} bar reaches {ans}."], ans + rng.choice((-1, 1))
        wrong_body = [f"The {c} bar reaches {wrong}."]
    elif kind == "sum":
        ans = sum(values.values())
        q = "What is the sum of all the bar values?"
        body = [f"Adding them: {'+'.join(str(v) for _, v in bars)} = {ans}."]
        wrong = ans + rng.choice((-1, 1))
        wrong_body = [f"Adding them: {'+'.join(str(v) for _, v in bars)} = {wrong}."]
    elif kind == "tallest":
        ans = max(values, key=values.__getitem__)
        q = "Which bar is the tallest?"
        body = [f"The largest value is {values[ans]}, which belongs to the {ans} bar."]
        wrong = rng.choice([c for c in values if c != ans])
        wrong_body = [f"The largest value is {values[wrong]}, which belongs to the {wrong} bar."]
    else:
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:  # ask about the taller bar first or second
            a, b = b, a
        hi, lo = (a, b) if values[a] > values[b] else (b, a)
        if kind == "compare":
            q, ans, wrong = f"Which bar is taller, the {a} bar or the {b} bar?", hi, lo
            body = [f"{values[hi]} is more than {values[lo]}, so the {hi} bar is taller."]
            wrong_body = [f"{values[lo]} looks more than {values[hi]}, so the {lo} bar is taller."]
        else:
            ans = values[hi] - values[lo]
            q = f"How much taller is the {hi} bar than the {lo} bar?"
            body = [f"The difference is {values[hi]}-{values[lo]} = {ans}."]
            wrong = ans + 1
            wrong_body = [f"The difference is {values[hi]}-{values[lo]} = {wrong}."]
    verifier = "numeric" if isinstance(ans, int) else "exact"
    difficulty = _CHART_BASE[kind] + 0.1 * (len(bars) - 2)
    return Problem(
        f"{rec.image}|{q}",
        f"<image>\n{q}",
        str(ans),
        verifier,
        clip_unit(difficulty),
        rec.image,
        (read, *body),
        ((read, *wrong_body), str(wrong)),
    )


def sample_problem(
    rng: random.Random,
    kind: str,
    pools: dict[str, list[ImageRecord]],
    split: str,
    val_frac: float,
    ops: tuple[int, int],
) -> Problem | None:
    """One problem of `kind` for `split`, or None (the drawn record fits no question of `kind`).

    Arithmetic problems belong to val iff `held_out(expression)`; image problems use the records
    of `pools` (the toy-world split's `shapes` and `chart` records), so the split follows them.
    """
    if kind == "arith":
        for _ in range(1000):  # redraw until the expression falls on this split's side
            p = arithmetic_problem(rng, rng.randint(*ops), ops[1])
            if held_out(p.key, val_frac) == (split == "val"):
                return p
        return None
    pool = pools["chart" if kind == "chart" else "shapes"]
    rec = pool[rng.randrange(len(pool))]
    if kind == "count":
        return count_problem(rng, rec)
    if kind == "color":
        return color_problem(rng, rec)
    return chart_problem(rng, rec)


def image_pools(records: list[ImageRecord]) -> dict[str, list[ImageRecord]]:
    """The records each image problem kind draws from."""
    return {k: [r for r in records if r.kind == k] for k in ("shapes", "chart")}


def usable_kinds(weights: dict[str, float], pools: dict[str, list[ImageRecord]]) -> dict[str, float]:
    """`weights` without image kinds whose pool is empty (a tiny toy world may lack charts)."""
    need = {"count": "shapes", "color": "shapes", "chart": "chart"}
    kept = {k: w for k, w in sorted(weights.items()) if w > 0 and (k not in need or pools[need[k]])}
    if not kept:
        raise ValueError(
            f"no problem kind of {sorted(weights)} can be generated: the toy world "
            "split has no shapes/chart records; raise toyworld.num_train/num_val"
        )
    return kept

"""Toy-world facts and how they are put into words: shape scenes, captions, alt text, QA.

This module is text only (no PIL): the image builder renders the same facts it describes, and
the text corpus reuses the descriptions as generated prose. Captions name every shape with its
colour and count (so an image-text retrieval model can beat chance) and vary their phrasing;
QA answers are short and exact (digits, one colour word, one shape word, one position phrase).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
"""Colour names and their RGB; chosen far apart so that a 32-px rendering stays unambiguous."""

SHAPES = ("circle", "square", "triangle")

POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
"""Name of each cell of the 3x3 grid a shape is placed in, indexed [row][col]."""

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

WORDS = (
    "cat",
    "dog",
    "sun",
    "map",
    "box",
    "red",
    "sky",
    "tree",
    "fish",
    "bird",
    "moon",
    "star",
    "book",
    "door",
    "lamp",
    "milk",
    "rain",
    "road",
    "ship",
    "town",
    "wolf",
    "frog",
    "cake",
    "bell",
    "key",
    "cup",
    "pen",
    "hat",
    "car",
    "bus",
    "egg",
    "ice",
    "owl",
    "fox",
    "bee",
    "ant",
    "cow",
    "pig",
    "hen",
    "jam",
    "tea",
    "art",
    "day",
    "sea",
    "bag",
    "leaf",
    "wind",
    "fire",
    "gold",
    "iron",
)
"""Short words for rendered text (OCR, documents); all fit the 6-px bitmap font."""


@dataclass(frozen=True)
class Shape:
    """One shape in a 3x3-grid scene."""

    shape: str
    color: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"


def sample_shapes(rng: random.Random, max_shapes: int = 4) -> list[Shape]:
    """1..max_shapes shapes in distinct cells, sorted in reading order (row, then column)."""
    n = rng.randint(1, max_shapes)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    # Repeating a (shape, colour) pair sometimes makes counting questions non-trivial.
    palette = [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(n)]
    if n > 1 and rng.random() < 0.35:
        palette[1] = palette[0]
    shapes = [Shape(s, c, r, col) for (s, c), (r, col) in zip(palette, cells)]
    return sorted(shapes, key=lambda s: (s.row, s.col))


def _count_phrase(n: int, color: str, shape: str) -> str:
    if n == 1:
        return f"a {color} {shape}"
    return f"{NUMBER_WORDS[n]} {color} {shape}s"


def join_phrases(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def inventory(shapes: list[Shape]) -> str:
    """E.g. "two red circles and a blue square" (groups in order of first appearance)."""
    counts = Counter((s.color, s.shape) for s in shapes)
    return join_phrases([_count_phrase(n, c, s) for (c, s), n in counts.items()])


def describe_shapes(shapes: list[Shape], rng: random.Random) -> str:
    """An informative caption with varied phrasing; positions are added half of the time."""
    inv = inventory(shapes)
    template = rng.choice(
        (
            "{inv}",
            "an image of {inv}",
            "{there} {inv}",
            "{inv} on a plain background",
            "a picture showing {inv}",
            "a simple drawing with {inv}",
        )
    )
    text = template.format(inv=inv, there="there is" if len(shapes) == 1 else "there are")
    if rng.random() < 0.5:
        where = join_phrases([f"the {s.label} is at the {s.position}" for s in shapes])
        text = f"{text}; {where}"
    return text[0].upper() + text[1:] + "."


def alt_shapes(shapes: list[Shape], rng: random.Random, noisy: bool) -> str:
    """Short alt text; `noisy` drops words or adds web-like junk, like scraped alt attributes."""
    if not noisy:
        return inventory(shapes)
    kinds = sorted({s.shape for s in shapes})
    return rng.choice(
        (
            f"{rng.choice(shapes).color} shapes",
            " ".join(kinds),
            f"img{rng.randint(100, 9999)} {shapes[0].shape}",
            f"{shapes[0].label} clipart",
            "shapes",
        )
    )


def qa_shapes(shapes: list[Shape], rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, type) pairs whose answers follow from the facts alone."""
    qa: list[tuple[str, str, str]] = [("How many shapes are there?", str(len(shapes)), "count")]
    kind = rng.choice(SHAPES)
    n = sum(s.shape == kind for s in shapes)
    qa.append((f"How many {kind}s are there?", str(n), "count"))
    color = rng.choice([s.color for s in shapes])
    qa.append((f"How many {color} shapes are there?", str(sum(s.color == color for s in shapes)), "count"))
    by_shape = Counter(s.shape for s in shapes)
    unique = [s for s in shapes if by_shape[s.shape] == 1]
    if unique:
        s = rng.choice(unique)
        qa.append((f"What color is the {s.shape}?", s.color, "color"))
    s = rng.choice(shapes)
    qa.append((f"What shape is at the {s.position}?", s.shape, "shape"))
    by_label = Counter(s.label for s in shapes)
    unique = [s for s in shapes if by_label[s.label] == 1]
    if unique:
        s = rng.choice(unique)
        qa.append((f"Where is the {s.label}?", s.position, "position"))
    return qa


def arithmetic(rng: random.Random) -> tuple[str, int]:
    """A small problem like "7-3" and its value (never negative)."""
    op = rng.choice("+-*")
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a}{op}{b}", value


def arithmetic_sentence(rng: random.Random) -> str:
    """Generated prose stating a sum, difference or product in words or symbols."""
    expr, value = arithmetic(rng)
    a, op, b = expr[0], expr[1], expr[2]
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    return rng.choice(
        (
            f"{a} {op} {b} = {value}.",
            f"{NUMBER_WORDS[int(a)]} {word} {NUMBER_WORDS[int(b)]} is {value}.",
            f"If you compute {a} {op} {b}, the result is {value}.",
            f"The answer to {a}{op}{b} is {value}.",
        )
    )


def text_snippet(rng: random.Random, max_chars: int) -> str:
    """One or two words, optionally with a number, at most `max_chars` characters long."""
    for _ in range(100):
        parts = [rng.choice(WORDS)]
        if rng.random() < 0.6:
            parts.append(str(rng.randint(0, 99)))
        elif rng.random() < 0.5:
            parts.append(rng.choice(WORDS))
        text = " ".join(parts)
        if len(text) <= max_chars:
            return text
    return rng.choice([w for w in WORDS if len(w) <= max_chars])

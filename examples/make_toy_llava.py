"""Write a small LLaVA-format dataset of toy-world pictures: what a user would bring.

    python examples/make_toy_llava.py OUT [--num 240] [--seed 0]

OUT/llava.json is one JSON array of {id, image, conversations: [{from: human, value:
"<image>\\nWhat color is the shape?"}, {from: gpt, value: "red"}]} (half the questions ask for
the colour, half for the shape); OUT/images/NNNN.png are 32 x 32 pictures of one shape on white.
The README's "Bring your own data" walkthrough adds it with `moonforge data add` and SFT learns
it in a few dozen steps.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")
SIZE = 32


def picture(color: str, shape: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    r = rng.randint(9, 13)
    cx, cy = rng.randint(r + 1, SIZE - r - 2), rng.randint(r + 1, SIZE - r - 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def build(out: Path, num: int, seed: int) -> Path:
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        name = f"{i:04d}.png"
        picture(color, shape, rng).save(out / "images" / name)
        question, answer = ("What color is the shape?", color) if i % 2 == 0 else ("What shape is it?", shape)
        rows.append(
            {
                "id": f"toy-{i:04d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    path = out / "llava.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--num", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out, args.num, args.seed))


if __name__ == "__main__":
    main()

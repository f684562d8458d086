"""Build the toy world: small rendered RGB images with verifiable facts (dataset `toyworld`).

Kinds: `shapes` (1-4 coloured circles/squares/triangles on a 3x3 grid), `ocr` (a short rendered
word or number), `chart` (a tiny bar chart), `arith` (a problem like "3+4=?") and `doc` (a few
lines of text). Each record carries a caption, alt text, OCR text, grounding boxes and QA pairs
(see records.ImageRecord). Text is drawn with PIL's built-in bitmap font and shapes without
anti-aliasing, so the PNG bytes depend only on the params and the Pillow/zlib build, not on
FreeType or the fonts installed on the machine. Every record draws from its own RNG seeded by
(seed, split, index), so records are independent of each other and of generation order.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import cast

from PIL import Image, ImageDraw, ImageFont

from moonforge.stages.data import scenes
from moonforge.stages.data.params import ToyworldParams
from moonforge.stages.data.records import QA, Box, ImageKind, ImageRecord, write_jsonl

FONT = ImageFont.load_default_imagefont()
"""PIL's bitmap font: 6 px per character, 11 px line height, identical on every machine."""
CHAR_W, LINE_H = 6, 11
BACKGROUNDS = ((255, 255, 255), (240, 240, 240), (250, 245, 230), (230, 240, 250))
INKS = ((0, 0, 0), (40, 40, 40), (20, 20, 90))


def _canvas(rng: random.Random, w: int, h: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (w, h), rng.choice(BACKGROUNDS))
    return img, ImageDraw.Draw(img)


def _draw_text(img: Image.Image, rng: random.Random, text: str, scale: int) -> tuple[int, int, int, int]:
    """Draw one line of `text` at a random spot, `scale` x nearest-neighbour; return its bbox."""
    w, h = img.size
    tw, th = len(text) * CHAR_W * scale, LINE_H * scale
    x, y = rng.randint(1, max(1, w - tw - 1)), rng.randint(1, max(1, h - th - 1))
    tile = Image.new("RGB", (len(text) * CHAR_W, LINE_H), img.getpixel((0, 0)))
    ImageDraw.Draw(tile).text((0, 0), text, font=FONT, fill=rng.choice(INKS))
    if scale > 1:
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)
    img.paste(tile, (x, y))
    return (x, y, min(w, x + tw), min(h, y + th))


def _scale_for(rng: random.Random, text: str, w: int, h: int) -> int:
    fits2 = len(text) * CHAR_W * 2 + 2 <= w and LINE_H * 2 + 2 <= h
    return 2 if fits2 and rng.random() < 0.5 else 1


def _shapes(rng: random.Random, w: int, h: int, noisy: bool) -> dict:
    shapes = scenes.sample_shapes(rng)
    img, draw = _canvas(rng, w, h)
    boxes = []
    for s in shapes:
        cw, ch = w / 3, h / 3
        size = int(min(cw, ch) * rng.uniform(0.6, 0.9))
        x0 = int(s.col * cw + rng.uniform(0, cw - size))
        y0 = int(s.row * ch + rng.uniform(0, ch - size))
        x1, y1 = x0 + size - 1, y0 + size - 1
        fill = scenes.COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(((x0 + x1) // 2, y0, x0, y1, x1, y1), fill=fill)
        boxes.append(Box(label=s.label, bbox=(x0, y0, x1 + 1, y1 + 1)))
    return dict(
        img=img,
        caption=scenes.describe_shapes(shapes, rng),
        alt_text=scenes.alt_shapes(shapes, rng, noisy),
        ocr=None,
        boxes=boxes,
        qa=scenes.qa_shapes(shapes, rng),
    )


def _ocr(rng: random.Random, w: int, h: int, noisy: bool) -> dict:
    text = scenes.text_snippet(rng, (w - 2) // CHAR_W)
    img, _ = _canvas(rng, w, h)
    bbox = _draw_text(img, rng, text, _scale_for(rng, text, w, h))
    caption = rng.choice(
        (
            "The text reads '{t}'.",
            "A sign that says '{t}'.",
            "The words '{t}' written in dark ink.",
            "Printed text: '{t}'.",
        )
    )
    alt = rng.choice(("text", f"img{rng.randint(100, 9999)}", text.split()[0])) if noisy else text
    return dict(
        img=img,
        caption=caption.format(t=text),
        alt_text=alt,
        ocr=text,
        boxes=[Box(label=f"text '{text}'", bbox=bbox)],
        qa=[("What does the text say?", text, "ocr")],
    )


def _chart(rng: random.Random, w: int, h: int, noisy: bool) -> dict:
    n = rng.randint(2, 4)
    colors = rng.sample(list(scenes.COLORS), n)
    values = [rng.randint(1, 9) for _ in range(n)]
    img, draw = _canvas(rng, w, h)
    base, slot = h - 3, (w - 6) // n
    draw.line((2, base, w - 3, base), fill=(0, 0, 0))
    boxes = []
    for i, (c, v) in enumerate(zip(colors, values)):
        x0, top = 3 + i * slot + 1, base - max(1, round(v / 9 * (h - 8)))
        draw.rectangle((x0, top, x0 + slot - 3, base - 1), fill=scenes.COLORS[c])
        boxes.append(Box(label=f"{c} bar", bbox=(x0, top, x0 + slot - 2, base)))
    bars = scenes.join_phrases([f"{c} {v}" for c, v in zip(colors, values)])
    caption = rng.choice(
        (
            f"A bar chart with {scenes.NUMBER_WORDS[n]} bars: {bars}.",
            f"Bar chart showing {bars}.",
            f"A small chart of {n} bars ({bars}).",
        )
    )
    qa = [("How many bars are in the chart?", str(n), "count")]
    k = rng.randrange(n)
    qa.append((f"What is the value of the {colors[k]} bar?", str(values[k]), "chart"))
    if values.count(max(values)) == 1:
        qa.append(("Which bar is the tallest?", colors[values.index(max(values))], "chart"))
    alt = rng.choice(("chart", "bar graph", f"graph{rng.randint(1, 99)}")) if noisy else "bar chart"
    return dict(img=img, caption=caption, alt_text=alt, ocr=None, boxes=boxes, qa=qa)


def _arith(rng: random.Random, w: int, h: int, noisy: bool) -> dict:
    expr, value = scenes.arithmetic(rng)
    text = f"{expr}=?"
    img, _ = _canvas(rng, w, h)
    bbox = _draw_text(img, rng, text, _scale_for(rng, text, w, h))
    caption = rng.choice(
        (
            "The arithmetic problem {t}.",
            "A math exercise: {t}",
            "A handwritten-style sum {t} to solve.",
            "An equation reading {t}",
        )
    )
    alt = rng.choice(("math", "homework", expr)) if noisy else f"math problem {expr}"
    return dict(
        img=img,
        caption=caption.format(t=text),
        alt_text=alt,
        ocr=text,
        boxes=[Box(label=f"text '{text}'", bbox=bbox)],
        qa=[
            ("What is the result of the arithmetic in the image?", str(value), "arith"),
            ("What is written in the image?", text, "ocr"),
        ],
    )


def _doc(rng: random.Random, w: int, h: int, noisy: bool) -> dict:
    max_chars, n = (w - 4) // CHAR_W, rng.randint(2, max(2, (h - 4) // (LINE_H + 1)))
    lines = [scenes.text_snippet(rng, max_chars) for _ in range(n)]
    img, draw = _canvas(rng, w, h)
    ink, boxes = rng.choice(INKS), []
    for i, line in enumerate(lines):
        y = 2 + i * (LINE_H + 1)
        draw.text((2, y), line, font=FONT, fill=ink)
        boxes.append(Box(label=f"line {i + 1}", bbox=(2, y, 2 + len(line) * CHAR_W, y + LINE_H)))
    caption = rng.choice(
        (
            "A document with {n} lines of text; the first line reads '{f}'.",
            "A page of {n} lines beginning with '{f}'.",
            "Scanned text, {n} lines, starting '{f}'.",
        )
    )
    qa = [
        ("How many lines of text are there?", str(n), "count"),
        ("What is the first word of the document?", lines[0].split()[0], "ocr"),
        ("What does the last line say?", lines[-1], "ocr"),
    ]
    alt = rng.choice(("document", "scan", lines[0].split()[0])) if noisy else "text document"
    return dict(
        img=img,
        caption=caption.format(n=scenes.NUMBER_WORDS[n], f=lines[0]),
        alt_text=alt,
        ocr="\n".join(lines),
        boxes=boxes,
        qa=qa,
    )


KINDS = {"shapes": _shapes, "ocr": _ocr, "chart": _chart, "arith": _arith, "doc": _doc}


def make_record(params: ToyworldParams, split: str, index: int) -> tuple[ImageRecord, Image.Image]:
    """Sample and render record `index` of `split`; a pure function of its arguments."""
    rng = random.Random(f"toyworld/{params.seed}/{split}/{index}")
    kinds = sorted(params.kind_weights)
    kind = rng.choices(kinds, weights=[params.kind_weights[k] for k in kinds])[0]
    w, h = rng.choice(params.sizes), rng.choice(params.sizes)
    if kind == "doc":  # at least two text lines and a few words per line
        w, h = max(w, 48), max(h, 32)
    noisy = rng.random() < params.web_frac
    facts = KINDS[kind](rng, w, h, noisy)
    rid = f"{split}-{index:06d}"
    record = ImageRecord(
        id=rid,
        image=f"images/{rid}.png",
        width=w,
        height=h,
        kind=cast(ImageKind, kind),
        caption=facts["caption"],
        alt_text=facts["alt_text"],
        ocr=facts["ocr"],
        boxes=tuple(facts["boxes"]),
        qa=tuple(QA(question=q, answer=a, type=t) for q, a, t in facts["qa"]),
        quality="web" if noisy else "high",
    )
    return record, facts["img"]


def build_toyworld(params: ToyworldParams, out: Path) -> dict:
    """Write `out/{train,val}/records.jsonl` and `images/*.png`; return counts for the log."""
    stats: dict = {}
    for split, num in (("train", params.num_train), ("val", params.num_val)):
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(num):
            record, img = make_record(params, split, i)
            img.save(out / split / record.image, format="PNG", compress_level=6)
            records.append(record)
        write_jsonl(out / split / "records.jsonl", records)
        kinds: dict[str, int] = {}
        for r in records:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        stats[split] = {
            "records": num,
            "qa": sum(len(r.qa) for r in records),
            "kinds": dict(sorted(kinds.items())),
        }
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats

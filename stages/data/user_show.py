"""`moonforge data show NAME`: samples of a declared dataset as the model will see them.

Each sample is encoded exactly as training encodes it (the chat template of the tokenizer's
dialect, image placeholders expanded to their media-pad count for the recipe's vision patching)
and printed token run by token run: special tokens by name, a run of media pads as
`<|media_pad|> x N`, text as text; the supervised part (loss mask 1) is listed after. The images
go into one PNG of thumbnails, a row per sample.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.data.images import num_image_tokens
from moonforge.stages.data.sources import VisionSpec
from moonforge.stages.data.user_images import BadRecord, decode_image, image_size
from moonforge.stages.data.user_samples import Sample
from moonforge.stages.data.user_sets import DeclaredSet

THUMB = 96


def encode_sample(s: Sample, tok: Tokenizer, vision: VisionSpec) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a sample as training builds them (an RL prompt / preference prompt
    ends in the open assistant header; a preference pair shows its chosen answer)."""
    counts = [num_image_tokens(vision.grid(*image_size(im)), vision.merge_size) for im in s.images]
    if s.kind == "chat":
        return tok.encode_chat(s.message_dicts(), counts)
    if s.kind == "preference":
        return tok.encode_chat(s.message_dicts() + [{"role": "assistant", "content": s.chosen}], counts)
    if s.kind == "prompt":
        return tok.encode_chat(s.message_dicts(), counts, add_generation_prompt=True)
    media = [i for n in counts for i in tok.media_placeholder(n)]
    body = tok.encode(s.text) + [tok.eos_id]
    return media + body, [0] * len(media) + [1] * len(body)


def render_ids(ids: list[int], tok: Tokenizer) -> str:
    """Token ids as text: specials by name, media-pad runs counted, the rest decoded."""
    out, run, k = [], [], 0
    while k < len(ids):
        t = ids[k]
        if t not in tok.special_ids:
            run.append(t)
            k += 1
            continue
        if run:
            out.append(tok.decode(run))
            run = []
        n = 1
        while k + n < len(ids) and ids[k + n] == t:
            n += 1
        name = tok.id_to_token(t)
        out.append(f"{name} x{n}" if n > 1 else name)
        k += n
    if run:
        out.append(tok.decode(run))
    return "".join(out)


def show_samples(ds: DeclaredSet, tok: Tokenizer, vision: VisionSpec, n: int, png: Path | None) -> list[str]:
    """Text blocks for the first `n` usable records; thumbnails of their images into `png`."""
    blocks: list[str] = []
    rows: list[list[Image.Image]] = []
    for _, rec in ds.records():
        if len(blocks) >= n:
            break
        if isinstance(rec, BadRecord):
            continue
        try:
            ids, mask = encode_sample(rec, tok, vision)
            images = [decode_image(im) for im in rec.images]
        except BadRecord:
            continue
        supervised = tok.decode([t for t, m in zip(ids, mask) if m])
        extra = (
            f"\n  reference answer: {rec.answer!r} (verifier {rec.verifier})" if rec.kind == "prompt" else ""
        )
        if rec.kind == "preference":
            extra = f"\n  rejected: {rec.rejected!r}"
        blocks.append(
            f"[{len(blocks)}] {rec.key} ({rec.kind}, {len(ids)} tokens, "
            f"{len(images)} image(s))\n{render_ids(ids, tok)}\n  supervised: "
            f"{supervised!r}{extra}"
        )
        rows.append(images)
    if png is not None and any(rows):
        _thumbnails(rows, png)
    return blocks


def _thumbnails(rows: list[list[Image.Image]], png: Path) -> None:
    width = max(1, max(len(r) for r in rows)) * (THUMB + 4) + 40
    sheet = Image.new("RGB", (width, len(rows) * (THUMB + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for y, images in enumerate(rows):
        draw.text((4, y * (THUMB + 4) + THUMB // 2), f"[{y}]", fill=(0, 0, 0))
        for x, img in enumerate(images):
            thumb = img.copy()
            thumb.thumbnail((THUMB, THUMB))
            sheet.paste(thumb, (40 + x * (THUMB + 4), y * (THUMB + 4)))
    png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png)

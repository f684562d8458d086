"""Stage-1 text targets: what an image is paired with for the SigLIP and caption losses.

A target is one of the record's caption, alt text, OCR text, or a grounding phrase such as
"red circle at (12,40,37,65)" (a box label and its corners scaled to 0..100 of the image, so the
phrase does not depend on the resolution the image is fed at). Token ids are framed by
<|endoftext|> on both sides (see batches.py for why).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.data.records import ImageRecord


def grounding_text(rec: ImageRecord, box_index: int) -> str:
    """E.g. "red circle at (12,40,37,65)": the box corners scaled to 0..100 of the image."""
    box = rec.boxes[box_index]
    x0, y0, x1, y1 = box.bbox
    sx, sy = 100 / rec.width, 100 / rec.height
    return f"{box.label} at ({round(x0 * sx)},{round(y0 * sy)},{round(x1 * sx)},{round(y1 * sy)})"


def text_ids(tokenizer: Tokenizer, text: str, max_text_len: int) -> list[int]:
    """Stage-1 text target: <|endoftext|>, tokens truncated to max_text_len - 2, <|endoftext|>."""
    if max_text_len < 3:
        raise ValueError(f"max_text_len={max_text_len} leaves no room for text between the eos tokens")
    return [tokenizer.eos_id, *tokenizer.encode(text)[: max_text_len - 2], tokenizer.eos_id]


def pad_texts(texts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_BL, mask_BL) padded to the longest text."""
    width = max(len(t) for t in texts)
    ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, : len(t)] = 1
    return ids, mask

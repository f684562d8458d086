"""ChatML records as training documents and as generation prompts (SFT, long-CoT SFT, RL, evals).

* `chat_docs`: a DocSource whose document i is `Tokenizer.encode_chat` of record i: ids plus a
  loss mask that is 1 exactly on assistant content and the <|im_end|> closing each assistant
  turn, with the record's images as ImageRefs (pixels load at batch time). `lm_batches` /
  `RowPacker` then pack several dialogues per row with block-diagonal attention (doc_ids) and
  positions restarting at each dialogue, so no example attends to or is supervised from another.
* `chat_prompt_items`: for generation (eval accuracy, RL rollouts): the prompt ids end in an
  open assistant header (`add_generation_prompt=True`), with the prompt's images patched, the
  reference answer, the verifier name and the difficulty (None where the record has none).

Records are any of SftRecord, ReasoningRecord, RLPromptRecord (chat_records.py). Image paths
are relative to `image_root` (data/toyworld/<split>). An image's patch grid comes from its PNG
header (read once per path); an unreadable file gets the smallest grid and then fails to load
at batch time, where it is skipped and counted like every corrupt image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, cast

import torch
from PIL import Image

from moonforge.model.tokenizer import IMAGE_MARKER, Tokenizer
from moonforge.stages.data.chat_records import RLPromptRecord, _Dialogue
from moonforge.stages.data.images import ImageLoader, num_image_tokens, to_patches
from moonforge.stages.data.sources import Doc, DocSource, ImageRef, VisionSpec


class _ImageSizes:
    """(width, height) of images under `root`, from the file header, cached per path."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self._sizes: dict[str, tuple[int, int] | None] = {}

    def grid(self, rel: str, vision: VisionSpec) -> tuple[int, int]:
        if rel not in self._sizes:
            assert self.root is not None  # _need_root: records with images come with a root
            try:
                with Image.open(self.root / rel) as img:  # header only, no decode
                    self._sizes[rel] = img.size
            except (OSError, ValueError, TypeError):
                self._sizes[rel] = None
        size = self._sizes[rel]
        if size is None:  # the loader will fail on it and count it
            return vision.merge_size, vision.merge_size
        return vision.grid(*size)


def _need_root(records: Sequence[_Dialogue], image_root: Path | None, name: str) -> None:
    if image_root is None and any(r.images for r in records):
        raise ValueError(
            f"{name}: records show images but no image_root was given; pass the "
            "toy-world split directory (e.g. data/toyworld/train)"
        )


def chat_docs(
    records: Sequence[_Dialogue],
    image_root: Path | None,
    tokenizer: Tokenizer,
    name: str = "chat",
    max_corrupt_frac: float = 0.01,
) -> DocSource:
    """One document per dialogue: encode_chat ids, its answer-only loss mask, its images.

    Example: a record [user "<image>\\nWhat color?", assistant "red"] with a 32x32 image under
    patch 8 / merge 2 gives <|im_user|> user <|im_middle|> [placeholder of 4 pads] \\nWhat color?
    <|im_end|> <|im_assistant|> assistant <|im_middle|> red <|im_end|>, mask 1 on "red" and the
    last <|im_end|> only. RL prompts (no assistant turn) have nothing to supervise: ValueError.
    """
    recs = list(records)
    bad = [r.id for r in recs if r.messages[-1].role != "assistant"]
    if bad:
        raise ValueError(
            f"{name}: {len(bad)} record(s) end without an assistant turn (e.g. "
            f"{bad[0]!r}); chat_docs trains on assistant answers, use "
            "chat_prompt_items for prompts"
        )
    _need_root(recs, image_root, name)
    num_images = sum(len(r.images) for r in recs)
    loader = None
    if num_images:
        assert image_root is not None  # _need_root refused images without one
        loader = ImageLoader(name, image_root, num_images, max_corrupt_frac)
    sizes = _ImageSizes(image_root)

    def make(i: int, vision: VisionSpec) -> Doc:
        rec = recs[i]
        grids = [sizes.grid(p, vision) for p in rec.images]
        ids, mask = tokenizer.encode_chat(
            rec.message_dicts(), [num_image_tokens(g, vision.merge_size) for g in grids]
        )
        if not grids:
            return Doc(ids, mask, ())
        assert loader is not None  # this record has images, so num_images > 0
        return Doc(ids, mask, tuple(ImageRef(loader, p, g) for p, g in zip(rec.images, grids)))

    return DocSource(name, len(recs), make, loader)


@dataclass(frozen=True)
class ChatPromptItem:
    """One generation prompt: continue `prompt_ids` (with the images), check against `answer`."""

    record_id: str
    kind: str
    prompt_ids: list[int]
    """encode_chat of the prompt turns, ending in the open assistant header."""
    pixels_NP: torch.Tensor | None
    """Patches of the prompt's images in marker order (None for text-only prompts)."""
    grid_hw: torch.Tensor | None
    """(I, 2) int64 patch grid per image, or None."""
    answer: str
    verifier: str
    difficulty: float | None
    media_t: torch.Tensor | None = None
    """(I,) temporal index of each grid entry when the prompt shows a video (None: images only)."""
    media_group: torch.Tensor | None = None
    """(I,) the prompt's media each grid entry belongs to (a clip's temporal patches share one,
    numbered from 0 in marker order); None with media_t."""


class PromptMedia(TypedDict):
    """`generate` / `VLM.forward` media keyword arguments of a batch of prompts."""

    pixels_NP: torch.Tensor | None
    grid_hw: torch.Tensor | None
    media_t: torch.Tensor | None
    media_group: torch.Tensor | None


def prompt_media(items: Sequence[ChatPromptItem], device: torch.device | str | None = None) -> PromptMedia:
    """The media of `items` in prompt order as `generate` / `VLM.forward` keyword arguments:
    pixels_NP, grid_hw and, when an item shows a video, media_t / media_group (each item's groups
    renumbered after the previous item's; an image item's entries are groups of their own), the
    pixels on `device` when given."""
    shown = [it for it in items if it.pixels_NP is not None and it.grid_hw is not None]
    out = PromptMedia(pixels_NP=None, grid_hw=None, media_t=None, media_group=None)
    if not shown:
        return out
    out["pixels_NP"] = torch.cat([cast(torch.Tensor, it.pixels_NP) for it in shown])
    grids = [cast(torch.Tensor, it.grid_hw) for it in shown]
    out["grid_hw"] = torch.cat(grids)
    if any(it.media_t is not None for it in shown):
        out["media_t"], out["media_group"] = _clip_layout(shown, grids)
    if device is not None:  # the layout tensors stay on the host: the model reads them there
        out["pixels_NP"] = cast(torch.Tensor, out["pixels_NP"]).to(device)
    return out


def _clip_layout(
    shown: Sequence[ChatPromptItem], grids: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(media_t, media_group) of the prompts' grid entries, groups numbered batch-wide."""
    ts, groups, base = [], [], 0
    for it, grid in zip(shown, grids):
        if it.media_t is None or it.media_group is None:
            t, g = torch.zeros(len(grid), dtype=torch.long), torch.arange(len(grid))
        else:
            t, g = it.media_t, it.media_group
        ts.append(t)
        groups.append(g + base)
        base += int(g.max()) + 1
    return torch.cat(ts), torch.cat(groups)


def _prompt_of(rec: _Dialogue) -> tuple[list[dict[str, str]], str, str, float | None]:
    """(prompt messages, reference answer, verifier, difficulty) of any chat record."""
    msgs = rec.message_dicts()
    if isinstance(rec, RLPromptRecord):
        return msgs, rec.answer, rec.verifier, rec.difficulty
    # SFT / reasoning: the prompt is everything before the last assistant turn.
    answer = getattr(rec, "answer", None) or msgs[-1]["content"]
    return msgs[:-1], answer, getattr(rec, "verifier", "exact"), None


def chat_prompt_items(
    records: Sequence[_Dialogue],
    image_root: Path | None,
    tokenizer: Tokenizer,
    vision: VisionSpec,
    limit: int | None = None,
    dataset_name: str = "toyworld",
) -> list[ChatPromptItem]:
    """Prompts of `records` in order (at most `limit`); a prompt with a corrupt image is skipped.

    For SFT records the reference is the last assistant turn (verifier "exact"); reasoning and
    RL records carry their own answer and verifier; difficulty is set for RL prompts only.
    """
    recs = list(records)[:limit]
    _need_root(recs, image_root, dataset_name)
    num_images = sum(len(r.images) for r in recs)
    loader = None
    if num_images:
        assert image_root is not None  # _need_root refused images without one
        loader = ImageLoader(dataset_name, image_root, num_images)
    items = []
    for rec in recs:
        msgs, answer, verifier, difficulty = _prompt_of(rec)
        paths = rec.images[: sum(m["content"].count(IMAGE_MARKER) for m in msgs)]
        patches = [loader.load(p) for p in paths] if loader is not None else []  # no paths without images
        loaded = [img for img in patches if img is not None]
        if len(loaded) < len(patches):
            continue
        patched = [
            to_patches(img, vision.patch_size, vision.merge_size, vision.max_patches) for img in loaded
        ]
        ids, _ = tokenizer.encode_chat(
            msgs, [num_image_tokens(g, vision.merge_size) for _, g in patched], add_generation_prompt=True
        )
        pixels = torch.cat([p for p, _ in patched]) if patched else None
        grid = torch.tensor([g for _, g in patched], dtype=torch.long) if patched else None
        items.append(ChatPromptItem(rec.id, rec.kind, ids, pixels, grid, answer, verifier, difficulty))
    return items

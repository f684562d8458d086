"""Answer one question about an image (or none) with a checkpoint: what `moonforge chat` runs.

The prompt is the ChatML user turn the SFT and RL stages train on ("<image>\\n{question}"), decoded
greedily with the KV cache until <|im_end|>.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moonforge.model.generate import generate
from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.artifacts import Checkpoint
from moonforge.stages.data.images import load_image, num_image_tokens, to_patches
from moonforge.stages.train.checkpoint import load_weights
from moonforge.model.vlm import build_vlm


@dataclass(frozen=True)
class ChatAnswer:
    text: str
    num_tokens: int
    finish_reason: str


def chat(ckpt: Checkpoint, tokenizer: Tokenizer, question: str, image: Path | None = None,
         max_new_tokens: int = 64) -> ChatAnswer:
    """Greedy answer of the checkpoint's model to `question` about `image`."""
    cfg = ckpt.model_config()
    tokenizer.require_vocab_size(cfg.lm.vocab_size)
    model = build_vlm(cfg)
    load_weights(model, ckpt)
    model.eval()
    pixels, grid, counts, content = None, None, [], question
    if image is not None:
        v = cfg.vision
        pixels, hw = to_patches(load_image(image), v.patch_size, v.merge_size, v.max_patches)
        grid = torch.tensor([hw], dtype=torch.long)
        counts, content = [num_image_tokens(hw, v.merge_size)], f"<image>\n{question}"
    ids, _ = tokenizer.encode_chat([{"role": "user", "content": content}], counts,
                                   add_generation_prompt=True)
    out = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=0.0,
                   stop_ids=(tokenizer.im_end_id, tokenizer.eos_id), pixels_NP=pixels,
                   grid_hw=grid, media_pad_id=tokenizer.media_pad_id)
    return ChatAnswer(tokenizer.decode(out.tokens[0]).strip(), out.lengths[0], out.finish_reasons[0])

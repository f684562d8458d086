"""Answer one question about an image, a video clip (or neither) with a checkpoint: what
`moonforge chat` runs;
and `evaluate`, the held-out answer accuracy `moonforge eval` reports.

The prompt is the ChatML user turn the SFT and RL stages train on ("<image>\\n{question}"), decoded
greedily with the KV cache until a stop id of the tokenizer (its turn end, <|im_end|> for ours).
A clip takes the image's place: its frames, sampled evenly, become temporal patches through the
same encoder and fill one media placeholder (Kimi-VL uses one placeholder kind for both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moonforge.model.generate import generate
from moonforge.model.tokenizer import Tokenizer
from moonforge.model.vlm import build_vlm
from moonforge.stages.artifacts import Checkpoint
from moonforge.stages.data.images import load_image, num_image_tokens, to_patches
from moonforge.stages.data.sources import VisionSpec
from moonforge.stages.data.user_videos import clip_grid, clip_tokens
from moonforge.stages.data.video_decode import sample_clip
from moonforge.stages.data.video_files import clip_patches
from moonforge.stages.train.checkpoint import load_weights


@dataclass(frozen=True)
class ChatAnswer:
    text: str
    num_tokens: int
    finish_reason: str


def open_model(ckpt: Checkpoint, tokenizer: Tokenizer):
    """The checkpoint's VLM with its weights, in eval mode, after checking the tokenizer fits its
    vocabulary (imports may pad embedding rows past the tokenizer's ids)."""
    cfg = ckpt.model_config()
    tokenizer.require_vocab_size(cfg.lm.vocab_size, allow_spare_rows=True)
    model = build_vlm(cfg)
    load_weights(model, ckpt)
    model.eval()
    return model


def chat(
    ckpt: Checkpoint,
    tokenizer: Tokenizer,
    question: str,
    image: Path | None = None,
    max_new_tokens: int = 64,
    video: Path | None = None,
    num_frames: int = 8,
    video_tokens: int | None = None,
    fps: float | None = None,
) -> ChatAnswer:
    """Greedy answer of the checkpoint's model to `question` about `image` or `video` (at most
    one; `num_frames` frames sampled evenly from the clip, or at `fps` and at most num_frames, in
    at most `video_tokens` tokens)."""
    if image is not None and video is not None:
        raise ValueError("ask about an image or a video, not both")
    model = open_model(ckpt, tokenizer)
    cfg = model.cfg
    if video is not None:
        frames = sample_clip(video, num_frames, fps)
        return answer_clip(model, tokenizer, frames, question, max_new_tokens, video_tokens)
    pixels, grid, counts, content = None, None, [], question
    if image is not None:
        v = cfg.vision
        pixels, hw = to_patches(load_image(image), v.patch_size, v.merge_size, v.max_patches)
        grid = torch.tensor([hw], dtype=torch.long)
        counts, content = [num_image_tokens(hw, v.merge_size)], f"<image>\n{question}"
    return _answer(model, tokenizer, content, counts, max_new_tokens, pixels_NP=pixels, grid_hw=grid)


def answer_clip(
    model,
    tokenizer: Tokenizer,
    frames: list,
    question: str,
    max_new_tokens: int = 64,
    max_tokens: int | None = None,
) -> ChatAnswer:
    """Greedy answer of a loaded VLM to `question` about a clip given as its sampled frames (see
    clip_prompt)."""
    ids, media = clip_prompt(tokenizer, VisionSpec.of(model.cfg.vision), frames, question, max_tokens)
    return _generate_one(model, tokenizer, ids, max_new_tokens, **media)


def clip_prompt(
    tokenizer: Tokenizer, vision: VisionSpec, frames: list, question: str, max_tokens: int | None = None
) -> tuple[list[int], dict[str, torch.Tensor]]:
    """(prompt ids, media keyword arguments) of `question` about a clip given as its sampled
    frames: the frames' temporal patches (at most `max_tokens` LM tokens, the frames shrunk to
    fit, as the clip documents are) fill one media placeholder of the "<image>\n{question}" turn."""
    (h, w), cap = clip_grid(frames[0].size, vision, len(frames), max_tokens)
    pixels, grid, media_t = clip_patches(frames, vision.patch_size, vision.merge_size, cap)
    count = clip_tokens((h, w), vision.merge_size, len(frames), vision.temporal_merge)
    media = dict(pixels_NP=pixels, grid_hw=grid, media_t=media_t, media_group=torch.zeros_like(media_t))
    return _chat_ids(tokenizer, f"<image>\n{question}", [count]), media


def _answer(
    model, tokenizer: Tokenizer, content: str, counts: list[int], max_new_tokens: int, **media
) -> ChatAnswer:
    """Greedy answer to one user turn `content` whose media markers take `counts` tokens."""
    return _generate_one(model, tokenizer, _chat_ids(tokenizer, content, counts), max_new_tokens, **media)


def _chat_ids(tokenizer: Tokenizer, content: str, counts: list[int]) -> list[int]:
    """encode_chat of one user turn, ending in the open assistant header."""
    ids, _ = tokenizer.encode_chat([{"role": "user", "content": content}], counts, add_generation_prompt=True)
    return ids


def _generate_one(model, tokenizer: Tokenizer, ids: list[int], max_new_tokens: int, **media) -> ChatAnswer:
    """Greedy continuation of one prompt, until a stop id or max_new_tokens."""
    out = generate(
        model,
        [ids],
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        stop_ids=tokenizer.stop_ids,
        pad_id=tokenizer.pad_id,
        media_pad_id=tokenizer.media_pad_id,
        **media,
    )
    return ChatAnswer(tokenizer.decode(out.tokens[0]).strip(), out.lengths[0], out.finish_reasons[0])


def evaluate(
    ckpt: Checkpoint,
    tokenizer: Tokenizer,
    rl_prompts: Path,
    toyworld: Path,
    num_examples: int = 128,
    max_new_tokens: int = 112,
    batch_size: int = 64,
) -> dict:
    """What `moonforge eval` runs: greedy held-out answer accuracy of a checkpoint.

    The set is rl_prompts/val balanced text / image (`num_examples // 2` of each, images from
    toyworld/val), scored by each prompt's verifier; the same numbers the post-training stages
    record as eval/acc, eval/text_acc, eval/image_acc, eval/mean_len, eval/acc_per_1k_tokens.
    """
    # Imported here: inference serves `chat` too, which needs none of the eval machinery.
    from moonforge.stages.data.chat import chat_prompt_items
    from moonforge.stages.data.chat_records import read_rl_prompt_records
    from moonforge.stages.posttrain_evals import answer_accuracy, as_metrics, split_by_kind
    from moonforge.stages.train.stage_io import vision_spec

    if num_examples < 2:
        raise ValueError(f"num_examples={num_examples}: need >= 2 (half text, half image)")
    model = open_model(ckpt, tokenizer)
    cfg = model.cfg
    items = split_by_kind(
        chat_prompt_items(
            read_rl_prompt_records(rl_prompts, "val"),
            toyworld / "val",
            tokenizer,
            vision_spec(cfg),
            dataset_name="rl_prompts/val",
        ),
        num_examples // 2,
    )
    res = answer_accuracy(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return as_metrics(res, "eval/")


def evaluate_declared(
    ckpt: Checkpoint,
    tokenizer: Tokenizer,
    ds,
    num_examples: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """What `moonforge eval --dataset NAME` runs: greedy answer accuracy on a declared dataset's
    prompts, asked as the stages ask them (posttrain_evals.set_metrics: eval/<name>_acc, _n, per
    kind when it mixes text, image and video prompts). The prompts are the held-out records when
    the declaration holds some out (what SFT and RL score), else every record, the first
    `num_examples` of them; a record that cannot be asked (a bad record, an image or video that
    does not decode) is counted in eval/<name>_skipped. `ds` is a DeclaredSet of kind chat,
    prompt or preference; its videos are sampled as it declares."""
    from moonforge.stages.data.user_images import BadRecord
    from moonforge.stages.data.user_mix import prompt_item
    from moonforge.stages.data.user_videos import ClipSampling
    from moonforge.stages.posttrain_evals import set_metrics
    from moonforge.stages.train.stage_io import vision_spec

    if ds.kind not in ("chat", "prompt", "preference"):
        raise ValueError(
            f"dataset {ds.name!r} is a {ds.kind} set ({ds.decl.format}): it has no questions to "
            "ask; eval takes chat, prompt or preference datasets"
        )
    model = open_model(ckpt, tokenizer)
    vision, sampling = vision_spec(model.cfg), ClipSampling.of(ds.decl)
    ids = list(ds.heldout) or [rid for rid, _ in ds.records()]
    items, skipped = [], 0
    for rid in ids[:num_examples]:
        rec = ds.record(rid)
        try:
            if isinstance(rec, BadRecord):
                raise rec
            items.append(prompt_item(rec, tokenizer, vision, sampling))
        except BadRecord:
            skipped += 1
    if not items:
        raise ValueError(
            f"dataset {ds.name!r}: none of its {len(ids[:num_examples])} prompts could be asked "
            f"(check it with `moonforge data check {ds.name}`)"
        )
    out = set_metrics(model, tokenizer, ds.name, items, batch_size, max_new_tokens=max_new_tokens)
    out[f"eval/{ds.name}_skipped"] = float(skipped)
    return out

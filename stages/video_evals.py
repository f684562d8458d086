"""Video QA accuracy of a checkpoint on `videoworld/val`: what `moonforge eval --video` reports.

Every question of the first `num_clips` clips is asked as `moonforge chat --video` asks it
(inference.answer_clip: `num_frames` frames sampled evenly, greedy), and scored by exact match
(case and surrounding space ignored). Two references come with it:
- `shuffled`: the same questions with each clip's frames in a seeded shuffled order (never the
  original one). The videoworld facts need time (direction, order, crossings), so a model that
  reads order answers worse on them; one that only reads appearance does not.
- `majority`: the accuracy of always giving each question type's most common answer, the
  chance level of these questions.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from moonforge.model.tokenizer import Tokenizer
from moonforge.model.vlm import build_vlm
from moonforge.stages.artifacts import Checkpoint
from moonforge.stages.data.video_files import read_frames, read_video_records
from moonforge.stages.inference import answer_clip
from moonforge.stages.train.checkpoint import load_weights


def shuffled(frames: list, seed: str) -> list:
    """`frames` in a seeded order that differs from the original (when it can: >= 2 distinct)."""
    order = list(range(len(frames)))
    rng = random.Random(seed)
    for _ in range(16):
        rng.shuffle(order)
        if order != sorted(order):
            break
    return [frames[i] for i in order]


def _same(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def video_qa(
    ckpt: Checkpoint,
    tokenizer: Tokenizer,
    videoworld: Path,
    num_clips: int = 16,
    num_frames: int = 8,
    max_new_tokens: int = 16,
) -> dict[str, float]:
    """{eval/video_qa_acc, eval/video_qa_acc_shuffled, eval/video_qa_majority, eval/video_qa_n}."""
    if num_clips < 1:
        raise ValueError(f"num_clips={num_clips}: need >= 1")
    cfg = ckpt.model_config()
    tokenizer.require_vocab_size(cfg.lm.vocab_size, allow_spare_rows=True)
    model = build_vlm(cfg)
    load_weights(model, ckpt)
    model.eval()
    recs = read_video_records(videoworld, "val")[:num_clips]
    right = right_shuffled = 0
    asked: list[tuple[str, str]] = []  # (type, answer)
    for rec in recs:
        frames = read_frames(videoworld / "val" / rec.video, num_frames=num_frames)
        mixed = shuffled(frames, f"video-qa/{rec.id}")
        for qa in rec.qa:
            got = answer_clip(model, tokenizer, frames, qa.question, max_new_tokens).text
            got_mixed = answer_clip(model, tokenizer, mixed, qa.question, max_new_tokens).text
            right += _same(got, qa.answer)
            right_shuffled += _same(got_mixed, qa.answer)
            asked.append((qa.type, qa.answer))
    n = len(asked)
    top = {t: Counter(a for tt, a in asked if tt == t).most_common(1)[0][1] for t, _ in asked}
    return {
        "eval/video_qa_acc": right / n,
        "eval/video_qa_acc_shuffled": right_shuffled / n,
        "eval/video_qa_majority": sum(top.values()) / n,
        "eval/video_qa_n": float(n),
    }

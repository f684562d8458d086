"""Video QA accuracy on `videoworld/val`: what `moonforge eval --video` reports, and what the
sft stage records before and after training when it mixes video in.

Every question of the first `num_clips` clips is asked as `moonforge chat --video` asks it
(inference.clip_prompt: `num_frames` frames sampled evenly; greedy, generated in batches by
clip_answers with the same text as one by one), and scored by exact match (case and surrounding
space ignored). Two references come with it:
- `shuffled`: the same questions with each clip's frames in a seeded shuffled order (never the
  original one). The videoworld facts need time (direction, order, crossings), so a model that
  reads order answers worse on them; one that only reads appearance does not.
- `majority`: the accuracy of always giving each question type's most common answer, the
  strongest score a model that does not look can reach.
- `chance`: the expected accuracy of guessing uniformly among the answers each question type
  takes here (direction: 1 in 4), the floor a model that only learned the answer formats sits at.
Each comes per question type too: a model that gives every question of a type one answer
scores that type's majority share overall, so only the per-type rows show whether it looks.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.artifacts import Checkpoint
from moonforge.stages.data.chat import ChatPromptItem
from moonforge.stages.data.sources import VisionSpec
from moonforge.stages.data.video_decode import sample_clip
from moonforge.stages.data.video_files import read_video_records
from moonforge.stages.inference import clip_prompt, open_model
from moonforge.stages.posttrain_evals import generate_responses


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
    video_tokens: int | None = None,
    fps: float | None = None,
) -> dict[str, float]:
    """video_qa_of the checkpoint's model (see there)."""
    model = open_model(ckpt, tokenizer)
    return video_qa_of(
        model,
        tokenizer,
        videoworld,
        num_clips,
        num_frames,
        max_new_tokens,
        video_tokens=video_tokens,
        fps=fps,
    )


def video_qa_of(
    model,
    tokenizer: Tokenizer,
    videoworld: Path,
    num_clips: int = 16,
    num_frames: int = 8,
    max_new_tokens: int = 16,
    suffix: str = "",
    kind: str | None = None,
    video_tokens: int | None = None,
    fps: float | None = None,
) -> dict[str, float]:
    """{eval/video_qa_acc, _acc_shuffled, _majority, _chance, _n} of a loaded VLM over the first
    `num_clips` clips of videoworld/val (of one `kind` of clip when given), then
    eval/video_qa_<type>_acc, _acc_shuffled, _majority and _chance per question type (direction, order,
    crossings, count): an overall score can hide a model that answers each type's most common
    answer whatever it is shown. Each key ends in `suffix`. Clips are sampled as the stages
    sample them (`num_frames` evenly, or at `fps`, at most num_frames) in at most `video_tokens`
    LM tokens (frames shrunk to fit; None: the model's max_patches per frame)."""
    if num_clips < 1:
        raise ValueError(f"num_clips={num_clips}: need >= 1")
    recs = [r for r in read_video_records(videoworld, "val") if kind in (None, r.kind)][:num_clips]
    if not recs:
        raise ValueError(f"{videoworld}/val has no clips of kind {kind!r}")
    asks, qas = [], []
    for rec in recs:
        frames = sample_clip(videoworld / "val" / rec.video, num_frames, fps)
        mixed = shuffled(frames, f"video-qa/{rec.id}")
        for qa in rec.qa:
            asks += [(frames, qa.question), (mixed, qa.question)]
            qas.append(qa)
    got = clip_answers(model, tokenizer, asks, max_new_tokens, video_tokens)
    # (type, answer, right, right with shuffled frames)
    asked = [
        (qa.type, qa.answer, _same(got[2 * i], qa.answer), _same(got[2 * i + 1], qa.answer))
        for i, qa in enumerate(qas)
    ]
    n = len(asked)
    top = {t: Counter(a for tt, a, _, _ in asked if tt == t).most_common(1)[0][1] for t, *_ in asked}
    options = {t: len({a.strip().lower() for tt, a, _, _ in asked if tt == t}) for t in top}
    out = {
        "eval/video_qa_acc": sum(r for *_, r, _ in asked) / n,
        "eval/video_qa_acc_shuffled": sum(r for *_, r in asked) / n,
        "eval/video_qa_majority": sum(top.values()) / n,
        "eval/video_qa_chance": sum(1 / options[t] for t, *_ in asked) / n,
        "eval/video_qa_n": float(n),
    }
    for t in sorted(top):
        mine = [(r, rs) for tt, _, r, rs in asked if tt == t]
        out[f"eval/video_qa_{t}_acc"] = sum(r for r, _ in mine) / len(mine)
        out[f"eval/video_qa_{t}_acc_shuffled"] = sum(rs for _, rs in mine) / len(mine)
        out[f"eval/video_qa_{t}_majority"] = top[t] / len(mine)
        out[f"eval/video_qa_{t}_chance"] = 1 / options[t]
    return {k + suffix: v for k, v in out.items()}


def clip_answers(
    model,
    tokenizer: Tokenizer,
    asks: list[tuple[list, str]],
    max_new_tokens: int,
    video_tokens: int | None = None,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers to (sampled frames, question) pairs, each the prompt `chat --video` builds
    (inference.clip_prompt), generated `batch_size` at a time: the same text as answering them one
    by one (inference.answer_clip), several times faster."""
    vision = VisionSpec.of(model.cfg.vision)
    items = []
    for i, (frames, question) in enumerate(asks):
        ids, media = clip_prompt(tokenizer, vision, frames, question, video_tokens)
        items.append(
            ChatPromptItem(
                record_id=str(i),
                kind="video",
                prompt_ids=ids,
                pixels_NP=media["pixels_NP"],
                grid_hw=media["grid_hw"],
                answer="",
                verifier="exact",
                difficulty=None,
                media_t=media["media_t"],
                media_group=media["media_group"],
            )
        )
    was_training = model.training
    model.eval()
    try:
        gens = generate_responses(
            model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    finally:
        model.train(was_training)
    return [text.strip() for text, _, _ in gens]


def plot_video_qa(metrics: Mapping[str, float], path: Path, title: str) -> None:
    """Per question type: accuracy before and after, with shuffled frames, the majority
    answer's share and uniform guessing, as grouped bars (a PNG; Agg, no pyplot). Reads
    video_qa_of's keys, the "before" ones with suffix "_before" (left out when absent)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    types = sorted(
        k.removeprefix("eval/video_qa_").removesuffix("_majority")
        for k in metrics
        if k.startswith("eval/video_qa_") and k.endswith("_majority") and k != "eval/video_qa_majority"
    )
    bars = [
        ("before", "_acc_before"),
        ("after", "_acc"),
        ("after, frames shuffled", "_acc_shuffled"),
        ("majority answer", "_majority"),
        ("uniform guess", "_chance"),
    ]
    bars = [(label, key) for label, key in bars if all(f"eval/video_qa_{t}{key}" in metrics for t in types)]
    fig = Figure(figsize=(8, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(bars), 1)
    for i, (label, key) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(types))]
        ax.bar(xs, [metrics[f"eval/video_qa_{t}{key}"] for t in types], width, label=label)
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)

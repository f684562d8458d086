"""Build the text corpus (dataset `text`): stdlib prose mixed with generated toy-world text.

Real text (source=stdlib) teaches the LM English and code vocabulary; generated text
(source=generated: scene descriptions and arithmetic statements in the toy world's words) ties
that vocabulary to what the images show before any image is seen. quality=high marks the clean
subset the cooldown stage replays: longer docstrings without doctest lines, the language
reference, and all generated text (its facts are correct by construction).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from moonforge.stages.data import scenes
from moonforge.stages.data.params import TextParams
from moonforge.stages.data.records import TextRecord, write_jsonl
from moonforge.stages.data.stdlib_text import harvest


def _is_high(name: str, text: str, min_chars: int) -> bool:
    if name.startswith("pydoc_topics."):
        return True
    return len(text) >= min_chars and ">>>" not in text


def generated_document(rng: random.Random) -> str:
    """1-4 sentences: scene descriptions (captions of unrendered scenes) and arithmetic facts."""
    sentences = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.6:
            sentences.append(scenes.describe_shapes(scenes.sample_shapes(rng), rng))
        else:
            sentences.append(scenes.arithmetic_sentence(rng))
    return " ".join(sentences)


def is_val(text: str, val_frac: float) -> bool:
    """Held out by a hash of the text, so the split does not depend on document order."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) < val_frac * 2**32


def build_text(params: TextParams, out: Path) -> dict:
    """Write `out/train.jsonl` and `out/val.jsonl` ({"text", "source", "quality"})."""
    records = [
        TextRecord(
            text=f"{name}\n{text}",
            source="stdlib",
            quality="high" if _is_high(name, text, params.high_min_chars) else "web",
        )
        for name, text in harvest(params.max_stdlib_chars)
    ]
    rng = random.Random(f"text/{params.seed}")
    seen = {r.text for r in records}
    for _ in range(params.num_generated):
        text = generated_document(rng)
        if text not in seen:
            seen.add(text)
            records.append(TextRecord(text=text, source="generated", quality="high"))
    rng.shuffle(records)
    splits = {
        "train": [r for r in records if not is_val(r.text, params.val_frac)],
        "val": [r for r in records if is_val(r.text, params.val_frac)],
    }
    stats = {}
    for split, recs in splits.items():
        write_jsonl(out / f"{split}.jsonl", recs)
        stats[split] = {
            "docs": len(recs),
            "chars": sum(len(r.text) for r in recs),
            "high": sum(r.quality == "high" for r in recs),
            "generated": sum(r.source == "generated" for r in recs),
        }
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats

"""Build needle-in-a-haystack documents (dataset `longdoc`) for the long-context stage.

Each document is stdlib prose (a random run of docstrings and reference topics) with one needle
sentence, "The secret code of the blue falcon is 4821.", inserted on its own line at a random
relative depth. The question and answer are stored apart from the text, so the same record
serves training (text + question + answer as one long document) and needle-recall evaluation
(text + question as the prompt, exact match on the answer). Lengths run from `min_chars` to
`max_chars` characters, i.e. past the longest tiny context (4096 tokens at ~3 chars/token).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from moonforge.stages.data.params import LongdocParams
from moonforge.stages.data.records import LongDocRecord, write_jsonl
from moonforge.stages.data.stdlib_text import harvest

NEEDLE_COLORS = ("red", "blue", "green", "golden", "silver", "black", "white", "purple", "orange")
NEEDLE_ANIMALS = (
    "falcon",
    "tiger",
    "otter",
    "heron",
    "badger",
    "lynx",
    "raven",
    "salmon",
    "beetle",
    "walrus",
    "gecko",
    "moose",
)


def _filler(rng: random.Random, pool: list[str], num_chars: int) -> str:
    """Whole pool texts in random order, cut at the last line break before `num_chars`."""
    parts, total = [], 0
    while total < num_chars:
        text = rng.choice(pool)
        parts.append(text)
        total += len(text) + 2
    filler = "\n\n".join(parts)
    cut = filler.rfind("\n", 0, num_chars)
    return filler[: cut if cut > num_chars // 2 else num_chars]


def make_longdoc(rng: random.Random, pool: list[str], rid: str, params: LongdocParams) -> LongDocRecord:
    """One needle document; a pure function of the RNG state and the pool."""
    filler = _filler(rng, pool, rng.randint(params.min_chars, params.max_chars))
    key = f"{rng.choice(NEEDLE_COLORS)} {rng.choice(NEEDLE_ANIMALS)}"
    value = str(rng.randint(1000, 9999))
    needle = f"The secret code of the {key} is {value}."
    at = int(rng.random() * len(filler))
    line_start = filler.rfind("\n", 0, at) + 1  # 0 when there is no earlier line break
    text = filler[:line_start] + needle + "\n" + filler[line_start:]
    return LongDocRecord(
        id=rid,
        text=text,
        needle=needle,
        needle_key=key,
        needle_value=value,
        depth=round(line_start / max(1, len(text)), 4),
        question=f"What is the secret code of the {key}?",
        answer=value,
    )


def build_longdoc(params: LongdocParams, out: Path) -> dict:
    """Write `out/train.jsonl` and `out/val.jsonl`; return length statistics for the log."""
    pool = [text for _, text in harvest(params.pool_chars) if "secret code" not in text]
    stats = {}
    for split, num in (("train", params.num_train), ("val", params.num_val)):
        recs = [
            make_longdoc(
                random.Random(f"longdoc/{params.seed}/{split}/{i}"), pool, f"{split}-{i:05d}", params
            )
            for i in range(num)
        ]
        write_jsonl(out / f"{split}.jsonl", recs)
        lengths = sorted(len(r.text) for r in recs)
        stats[split] = {
            "docs": num,
            "chars_min": lengths[0],
            "chars_max": lengths[-1],
            "chars_median": lengths[len(lengths) // 2],
        }
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats

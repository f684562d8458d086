"""Build the RL prompt set (dataset `rl_prompts`): checkable answers with difficulty labels.

Kinds: arithmetic of 1..max_ops operations (text), counting shapes by colour, naming a shape's
colour, and bar-chart reading / comparison / difference / sum (image, on toy-world records of
the same split). Every answer is checked by a rule verifier ("numeric" or "exact"); there are no
true/false, multiple-choice or proof prompts (k1.5 prompt-set curation drops them, and
chat_records.RLPromptRecord rejects them). `difficulty` in [0, 1] grows with the number of
operations, shapes or chart steps (problems.py and image_problems.py give each formula); the
curriculum and the "hard only" phase of RL sample by it. The val split is held out for reasoning accuracy: its
arithmetic expressions are val by a hash of the expression (the same rule the `reasoning` set
uses, so no val expression is trained on there either) and its images are toy-world val images.

Record: {"id", "messages": [optional system, user], "images", "answer", "verifier",
"difficulty", "kind"}.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from moonforge.stages.data.chat_records import Message, RLPromptRecord
from moonforge.stages.data.image_problems import image_pools, sample_problem, usable_kinds
from moonforge.stages.data.posttrain_params import RLPromptParams
from moonforge.stages.data.records import read_image_records, write_jsonl

SYSTEM_PROMPTS = (
    "Think step by step, then give the final answer on the last line as 'Answer: <answer>'.",
    "Solve the problem. End your reply with a line of the form 'Answer: <answer>'.",
)


def build_split(
    params: RLPromptParams, split: str, num: int, toyworld: Path
) -> tuple[list[RLPromptRecord], dict]:
    """`num` distinct prompts of `split` and their counts."""
    pools = image_pools(read_image_records(toyworld, split))
    weights = usable_kinds(params.kind_weights, pools)
    kinds, w = list(weights), list(weights.values())
    rng = random.Random(f"rl_prompts/{params.seed}/{split}")
    records: list[RLPromptRecord] = []
    seen: set[str] = set()
    by_kind: Counter = Counter()
    for _ in range(200 * num):
        if len(records) >= num:
            break
        kind = rng.choices(kinds, weights=w)[0]
        p = sample_problem(rng, kind, pools, split, params.val_frac, (1, params.max_ops))
        if p is None or p.key in seen:
            continue
        seen.add(p.key)
        messages = [Message(role="user", content=p.question)]
        if rng.random() < params.system_frac:
            messages.insert(0, Message(role="system", content=rng.choice(SYSTEM_PROMPTS)))
        records.append(
            RLPromptRecord(
                id=f"rl-{split}-{len(records):06d}",
                messages=tuple(messages),
                images=(p.image,) if p.image else (),
                answer=p.answer,
                verifier=p.verifier,
                difficulty=p.difficulty,
                kind=p.kind,
            )
        )
        by_kind[kind] += 1
    if len(records) < num:
        raise ValueError(
            f"rl_prompts/{split}: only {len(records)} distinct prompts of {num}; "
            f"lower rl_prompts.num_{split} or grow the toy world"
        )
    d = sorted(r.difficulty for r in records)
    stats = {
        "prompts": len(records),
        "by_kind": dict(sorted(by_kind.items())),
        "image": sum(r.kind == "image" for r in records),
        "difficulty": {
            "min": d[0],
            "median": d[len(d) // 2],
            "max": d[-1],
            "mean": round(sum(d) / len(d), 3),
        },
    }
    return records, stats


def build_rl_prompts(params: RLPromptParams, out: Path, toyworld: Path) -> dict:
    """Write `out/{train,val}.jsonl` and stats.json; return the stats."""
    stats = {}
    for split, num in (("train", params.num_train), ("val", params.num_val)):
        records, stats[split] = build_split(params, split, num, toyworld)
        write_jsonl(out / f"{split}.jsonl", records)
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats

"""Build verified step-by-step reasoning traces (dataset `reasoning`, the long-CoT SFT warm-up).

Problems come from the same generators as the RL prompts (problems.py, image_problems.py):
multi-step arithmetic (text), counting shapes by colour and reading or comparing bars (image,
on toy-world records of the same split). Each candidate trace is scored with the answer verifier it names
(stages/rl/verifiers.py: `score`, which takes the text after the last "Answer:") BEFORE it is
admitted, as the spec's "wrong CoTs are filtered out" requires. With probability
`negative_frac` a problem also gets a deliberately wrong trace (one step off, carried to the
end); the check must reject it. stats.json counts candidates, admissions and rejections, so a
broken check (a negative admitted, a correct trace rejected) shows in the dataset itself.

Record: {"id", "messages": [user question, assistant trace], "images", "answer", "verifier",
"kind"}; an image problem's user turn is "<image>\\n{question}" with the image path (relative
to data/toyworld/<split>) in "images".
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from moonforge.stages.data.chat_records import Message, ReasoningRecord
from moonforge.stages.data.image_problems import image_pools, sample_problem, usable_kinds
from moonforge.stages.data.posttrain_params import ReasoningParams
from moonforge.stages.data.problems import Problem
from moonforge.stages.data.records import read_image_records, write_jsonl
from moonforge.stages.rl.verifiers import VerifyStats, score


def _record(rid: str, p: Problem, trace: str) -> ReasoningRecord:
    return ReasoningRecord(
        id=rid,
        messages=(Message(role="user", content=p.question), Message(role="assistant", content=trace)),
        images=(p.image,) if p.image else (),
        answer=p.answer,
        verifier=p.verifier,
        kind=p.kind,
    )


def build_split(
    params: ReasoningParams, split: str, num: int, toyworld: Path
) -> tuple[list[ReasoningRecord], dict]:
    """`num` admitted traces of `split` and the admission counts."""
    pools = image_pools(read_image_records(toyworld, split))
    weights = usable_kinds(params.kind_weights, pools)
    kinds, w = list(weights), list(weights.values())
    rng = random.Random(f"reasoning/{params.seed}/{split}")
    records: list[ReasoningRecord] = []
    seen: set[str] = set()
    c: Counter = Counter()
    vstats = VerifyStats()
    for _ in range(200 * num):
        if len(records) >= num:
            break
        kind = rng.choices(kinds, weights=w)[0]
        p = sample_problem(rng, kind, pools, split, params.val_frac, (params.min_ops, params.max_ops))
        if p is None or p.key in seen:
            continue
        seen.add(p.key)
        candidates = [(p.solution(), False)]
        wrong = p.wrong_solution()  # None iff p.wrong is None
        if wrong is not None and rng.random() < params.negative_frac:
            candidates.append((wrong, True))
        admitted = False
        for trace, negative in candidates:
            c["candidates"] += 1
            c["negatives"] += negative
            ok = score(p.verifier, trace, p.answer, vstats) == 1.0
            if not ok:
                c["rejected"] += 1
                c["rejected_negatives" if negative else "rejected_correct"] += 1
            elif not admitted:  # one trace per problem
                records.append(_record(f"reasoning-{split}-{len(records):06d}", p, trace))
                c["admitted_negatives"] += negative
                c[f"admitted_{kind}"] += 1
                admitted = True
    if len(records) < num:
        raise ValueError(
            f"reasoning/{split}: only {len(records)} distinct problems of {num}; "
            "lower reasoning.num_" + split + " or grow the toy world"
        )
    stats = {
        "admitted": len(records),
        **dict(sorted(c.items())),
        "verifier_errors": vstats.num_errors,
        "image": sum(r.kind == "image" for r in records),
    }
    for key in ("rejected", "rejected_negatives", "rejected_correct", "admitted_negatives"):
        stats.setdefault(key, 0)
    return records, dict(sorted(stats.items()))


def build_reasoning(params: ReasoningParams, out: Path, toyworld: Path) -> dict:
    """Write `out/{train,val}.jsonl` and stats.json; return the stats."""
    stats = {}
    for split, num in (("train", params.num_train), ("val", params.num_val)):
        records, stats[split] = build_split(params, split, num, toyworld)
        write_jsonl(out / f"{split}.jsonl", records)
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats

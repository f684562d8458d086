"""Post-training dataset builds: verified traces (wrong ones rejected and counted), RL prompts
with answers and difficulty, the SFT text:image token mix, no val leakage, byte determinism,
the dvc.yaml stages, and the pretraining datasets' dvc.lock hashes left as they were."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from test_data_helpers import tree_digest
from test_data_post_helpers import POST_DATASETS, build_post, post_data

from moonforge.stages.data import problems
from moonforge.stages.data.chat_records import (
    read_reasoning_records,
    read_rl_prompt_records,
    read_sft_records,
)
from moonforge.stages.data.posttrain_params import ReasoningParams
from moonforge.stages.data.traces import build_split
from moonforge.stages.rl.verifiers import VerifyStats, extract_answer, get_verifier, score

REPO = Path(__file__).resolve().parent.parent
PRETRAIN_HASHES = {
    "toyworld": "052eacc6a97f1bd1d648d665ff6c1f8c.dir",
    "text": "a0d04ab1f198f807ea469fac1c2eaa6e.dir",
    "longdoc": "eee59f581dbe56a436c317599f03bc61.dir",
    "tokenizer": "2530e25c5cceace7b3c3090cb38daacd.dir",
}
"""dvc.lock output hashes of the pretraining datasets before the post-training sets were added."""


def _stats(name: str) -> dict:
    return json.loads((post_data() / name / "stats.json").read_text())


def test_every_admitted_trace_passes_its_verifier_and_wrong_ones_are_rejected():
    for split in ("train", "val"):
        records = read_reasoning_records(post_data() / "reasoning", split)
        for r in records:
            trace = r.messages[-1].content
            assert trace.splitlines()[-1] == f"Answer: {r.answer}"
            assert get_verifier(r.verifier)(extract_answer(trace), r.answer) == 1.0
        assert {r.kind for r in records} == {"text", "image"}
        s = _stats("reasoning")[split]
        assert s["admitted"] == len(records) and s["rejected_correct"] == 0
        assert s["admitted_negatives"] == 0 and s["rejected"] == s["rejected_negatives"] == s["negatives"]
    assert _stats("reasoning")["train"]["negatives"] > 0


def test_wrong_traces_fail_the_same_check():
    rng, stats = random.Random(0), VerifyStats()
    for _ in range(50):
        p = problems.arithmetic_problem(rng, rng.randint(2, 4), 4)
        assert score(p.verifier, p.solution(), p.answer, stats) == 1.0
        assert score(p.verifier, p.wrong_solution(), p.answer, stats) == 0.0
    assert stats.num_errors == 0


def test_negatives_are_counted_when_every_problem_gets_one():
    params = ReasoningParams(num_train=20, num_val=4, negative_frac=1.0)
    records, stats = build_split(params, "train", 20, post_data() / "toyworld")
    assert len(records) == 20 and stats["rejected_negatives"] == stats["negatives"] >= 15
    assert stats["rejected_correct"] == 0


def test_rl_prompts_have_answers_difficulty_and_both_kinds():
    train = read_rl_prompt_records(post_data() / "rl_prompts", "train")
    val = read_rl_prompt_records(post_data() / "rl_prompts", "val")
    for recs in (train, val):
        assert {r.kind for r in recs} == {"text", "image"}
        assert all(r.answer.strip() and 0.0 <= r.difficulty <= 1.0 for r in recs)
        assert all(r.messages[-1].role == "user" for r in recs)
        assert {r.verifier for r in recs} == {"numeric", "exact"}
        assert not {r.answer.lower() for r in recs} & {"yes", "no", "true", "false"}
    d = [r.difficulty for r in train]
    assert min(d) < 0.2 and max(d) > 0.8  # a real spread for the curriculum
    ops = {r.messages[-1].content: r.difficulty for r in train if r.kind == "text"}
    assert len(set(ops.values())) > 3
    # Held out: no val question on the same image (or the same expression) is in train.
    key = lambda r: (r.images, r.messages[-1].content)  # noqa: E731
    assert not {key(r) for r in val} & {key(r) for r in train}


def test_sft_mix_is_about_one_to_one_and_val_is_held_out():
    for split in ("train", "val"):
        s = _stats("sft")[split]
        assert 0.9 <= s["text_image_token_ratio"] <= 1.15
        assert s["image_multi_turn"] > 0 and s["image_caption"] > 0
        assert s["text_arith"] and s["text_facts"] and s["text_stdlib"]
    train = read_sft_records(post_data() / "sft", "train")
    val = read_sft_records(post_data() / "sft", "val")
    assert all(r.images[0].startswith("images/val-") for r in val if r.images)
    text_q = lambda recs: {r.messages[-2].content for r in recs if r.kind == "text"}  # noqa: E731
    assert text_q(val) and not text_q(val) & text_q(train)
    answers = [m.content for r in train for m in r.messages if m.role == "assistant"]
    assert sum(len(a) <= 40 for a in answers) / len(answers) > 0.8  # short, checkable answers


def test_builds_are_byte_deterministic(tmp_path):
    again = build_post(tmp_path / "again")
    for name in POST_DATASETS:
        assert tree_digest(again / name) == tree_digest(post_data() / name), name


def test_dvc_stages_and_pretraining_hashes():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in POST_DATASETS:
        assert stages[name]["outs"] == [f"data/{name}"] and stages[name]["params"] == [name]
        assert f"build {name} --params params.yaml --out data/{name}" in stages[name]["cmd"]
        assert "data/toyworld" in stages[name]["deps"]
        assert all((REPO / d).exists() or d.startswith("data/") for d in stages[name]["deps"])
    assert {"data/text", "data/tokenizer"} <= set(stages["sft"]["deps"])
    assert "stages/rl/verifiers.py" in stages["reasoning"]["deps"]
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    assert {n: lock[n]["outs"][0]["md5"] for n in PRETRAIN_HASHES} == PRETRAIN_HASHES
    assert set(POST_DATASETS) <= set(lock)


@pytest.mark.parametrize("name", POST_DATASETS)
def test_params_reject_unknown_keys(tmp_path, name):
    from moonforge.stages.data.posttrain_params import load_post_params

    (tmp_path / "p.yaml").write_text(f"{name}: {{num_trian: 3}}\n")
    with pytest.raises(ValueError, match=rf"{name}\."):
        load_post_params(tmp_path / "p.yaml", name)

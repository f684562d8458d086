"""Post-training records: the built manifests validate, and malformed dialogues, unverified
traces and answerless or true/false RL prompts fail at load time naming file:line."""

from __future__ import annotations

import json

import pytest
from test_data_post_helpers import post_data

from moonforge.stages.data.chat_records import (
    ReasoningRecord,
    RLPromptRecord,
    SftRecord,
    read_reasoning_records,
    read_rl_prompt_records,
    read_sft_records,
)
from moonforge.stages.data.records import ManifestError

READERS = {"sft": read_sft_records, "reasoning": read_reasoning_records, "rl_prompts": read_rl_prompt_records}


@pytest.mark.parametrize("name", sorted(READERS))
def test_built_records_validate(name):
    for split in ("train", "val"):
        records = READERS[name](post_data() / name, split)
        assert records and len({r.id for r in records}) == len(records)
        for r in records:
            assert len(r.images) == sum(m.content.count("<image>") for m in r.messages)
            assert (r.kind == "image") == bool(r.images)
            for p in r.images:
                assert (post_data() / "toyworld" / split / p).is_file()


def _write(tmp_path, name, lines):
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


GOOD = {
    "id": "x",
    "kind": "image",
    "images": ["images/val-000000.png"],
    "messages": [
        {"role": "user", "content": "<image>\nWhat color is it?"},
        {"role": "assistant", "content": "red"},
    ],
}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda r: r["messages"].pop(0), r"role 'assistant' where 'user' is expected"),
        (lambda r: r["messages"][0].pop("role"), r"field 'messages.0.role': Field required"),
        (lambda r: r["messages"][1].update(content="  "), r"message 1: assistant turn has no content"),
        (
            lambda r: r["messages"][0].update(content="<image><image>\nWhich?"),
            r"2 <image> marker\(s\) but 1 image path",
        ),
        (lambda r: r["messages"].append({"role": "user", "content": "and?"}), r"must end with an assistant"),
        (lambda r: r["messages"].append({"role": "system", "content": "hi"}), r"message 2 has role 'system'"),
        (lambda r: r.update(images=["/abs.png"]), r"must be relative"),
        (lambda r: r.update(kind="text"), r"kind 'text' does not match 1 image"),
    ],
)
def test_malformed_dialogue_names_file_and_line(tmp_path, change, match):
    bad = json.loads(json.dumps(GOOD))
    change(bad)
    d = _write(tmp_path, "sft", [GOOD, bad])
    with pytest.raises(ManifestError, match=r"val.jsonl:2: .*" + match):
        read_sft_records(d, "val")


def test_reasoning_trace_must_verify(tmp_path):
    rec = {
        **GOOD,
        "messages": [GOOD["messages"][0], {"role": "assistant", "content": "It is red.\nAnswer: red"}],
        "answer": "red",
        "verifier": "exact",
    }
    ReasoningRecord.model_validate(rec)
    wrong = {**rec, "answer": "blue"}
    d = _write(tmp_path, "reasoning", [rec, wrong])
    with pytest.raises(ManifestError, match=r"val.jsonl:2: .*does not verify"):
        read_reasoning_records(d, "val")


def test_rl_prompts_without_answers_raise(tmp_path):
    good = {
        "id": "p0",
        "kind": "text",
        "images": [],
        "verifier": "numeric",
        "difficulty": 0.5,
        "messages": [{"role": "user", "content": "What is 2+3?"}],
        "answer": "5",
    }
    RLPromptRecord.model_validate(good)
    d = _write(tmp_path, "rl_prompts", [{k: v for k, v in good.items() if k != "answer"}])
    with pytest.raises(ManifestError, match=r"val.jsonl:1: .*RL prompt has no reference answer"):
        read_rl_prompt_records(d, "val")
    d = _write(tmp_path, "rl_prompts", [{**good, "answer": " "}])
    with pytest.raises(ManifestError, match=r"no reference answer"):
        read_rl_prompt_records(d, "val")
    d = _write(tmp_path, "rl_prompts", [])
    with pytest.raises(ManifestError, match=r"no records"):
        read_rl_prompt_records(d, "val")
    for bad, match in [
        ({"answer": "yes", "verifier": "exact"}, "true/false"),
        ({"answer": "B", "verifier": "multiple_choice"}, "multiple-choice"),
        ({"answer": "five"}, "holds no number"),
        ({"difficulty": 1.5}, "less than or equal to 1"),
        ({"messages": good["messages"] + [{"role": "assistant", "content": "5"}]}, "no assistant turn"),
    ]:
        with pytest.raises(ValueError, match=match):
            RLPromptRecord.model_validate({**good, **bad})


def test_extra_fields_are_rejected():
    with pytest.raises(ValueError, match="extra"):
        SftRecord.model_validate({**GOOD, "source": "web"})

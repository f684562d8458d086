"""Record schemas and validating readers of the post-training datasets (ChatML dialogues).

Layouts (image paths are relative to the toy-world split directory, data/toyworld/<split>):
    data/sft/{train,val}.jsonl         -> SftRecord        dialogue ending in an assistant turn
    data/reasoning/{train,val}.jsonl   -> ReasoningRecord  user problem + verified trace "... Answer: X"
    data/rl_prompts/{train,val}.jsonl  -> RLPromptRecord   [system] + user problem, answer, difficulty

A dialogue is checked when it is read: roles in ChatML order (an optional system message first,
then user and assistant alternating, starting with user), no empty assistant turn, exactly one
image path per `<image>` marker, `kind` "image" iff it shows images. A bad line fails with
`file:line` (records.read_jsonl). Reasoning traces are re-verified on load with the answer
verifier they name, and an RL prompt without a reference answer is rejected, so a prompt set
with no answers can never reach the RL loop.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field, field_validator, model_validator

from moonforge.model.tokenizer import IMAGE_MARKER
from moonforge.stages.data.records import (
    DatasetMissingError,
    ManifestError,
    _Record,
    _split,
    read_jsonl,
    require_dataset,
)

NO_TRUE_FALSE = frozenset({"yes", "no", "true", "false"})
"""Answers of true/false prompts, which the RL prompt set drops (k1.5 prompt-set curation)."""


class Message(_Record):
    """One ChatML turn; `content` may hold `<image>` markers."""

    role: Literal["system", "user", "assistant"]
    content: str


class _Dialogue(_Record):
    id: str = Field(min_length=1)
    messages: tuple[Message, ...]
    images: tuple[str, ...] = ()
    """Relative image paths, in `<image>` marker order."""
    kind: Literal["text", "image"]

    @field_validator("images")
    @classmethod
    def _relative(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            pp = PurePosixPath(p)
            if not p or pp.is_absolute() or ".." in pp.parts:
                raise ValueError(f"image path {p!r} must be relative to the split directory")
        return v

    @model_validator(mode="after")
    def _check_dialogue(self):
        msgs = self.messages
        if not msgs:
            raise ValueError("dialogue has no messages")
        offset = int(msgs[0].role == "system")
        turns = msgs[offset:]
        for j, m in enumerate(turns):
            i, want = j + offset, ("user", "assistant")[j % 2]
            if m.role != want:
                raise ValueError(
                    f"message {i} has role {m.role!r} where {want!r} is expected "
                    "(ChatML order: [system], user, assistant, user, ...)"
                )
            if m.role == "assistant" and not m.content.replace(IMAGE_MARKER, "").strip():
                raise ValueError(f"message {i}: assistant turn has no content to supervise")
        if not turns:
            raise ValueError("dialogue has no user turn")
        markers = sum(m.content.count(IMAGE_MARKER) for m in msgs)
        if markers != len(self.images):
            raise ValueError(
                f"dialogue has {markers} {IMAGE_MARKER} marker(s) but "
                f"{len(self.images)} image path(s); give one path per marker"
            )
        if (self.kind == "image") != bool(self.images):
            raise ValueError(f"kind {self.kind!r} does not match {len(self.images)} image(s)")
        return self

    def message_dicts(self) -> list[dict[str, str]]:
        """The messages as Tokenizer.encode_chat takes them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


class SftRecord(_Dialogue):
    """A ChatML dialogue for SFT; loss goes on the assistant turns only."""

    @model_validator(mode="after")
    def _ends_with_assistant(self) -> SftRecord:
        if self.messages[-1].role != "assistant":
            raise ValueError("SFT dialogue must end with an assistant turn (nothing to supervise)")
        return self


def _check_reference(answer: str, verifier: str) -> None:
    from moonforge.stages.rl.verifiers import VERIFIERS, parse_last_number

    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; registered: {sorted(VERIFIERS)}")
    if verifier == "multiple_choice":
        raise ValueError(
            "multiple-choice prompts are dropped from the RL/reasoning sets "
            "(k1.5 prompt curation); rephrase with an exact or numeric answer"
        )
    if answer.strip().lower() in NO_TRUE_FALSE:
        raise ValueError(
            f"answer {answer!r} makes this a true/false prompt, which the RL "
            "prompt set drops; ask for a checkable value instead"
        )
    if verifier == "numeric" and parse_last_number(answer) is None:
        raise ValueError(f"numeric verifier but the answer {answer!r} holds no number")


class ReasoningRecord(_Dialogue):
    """A problem and one verified step-by-step trace ending in "Answer: X"."""

    answer: str = Field(min_length=1)
    verifier: str

    @model_validator(mode="after")
    def _verified(self) -> ReasoningRecord:
        from moonforge.stages.rl.verifiers import VerifyStats, score

        if self.messages[-1].role != "assistant":
            raise ValueError("reasoning record must end with the assistant trace")
        _check_reference(self.answer, self.verifier)
        if score(self.verifier, self.messages[-1].content, self.answer, VerifyStats()) != 1.0:
            raise ValueError(
                f"trace does not verify: its final answer is not {self.answer!r} "
                f"under the {self.verifier!r} verifier"
            )
        return self


class RLPromptRecord(_Dialogue):
    """A prompt (optional system + one user turn) with a checkable answer and a difficulty."""

    answer: str
    """Reference answer the verifier compares the policy's final answer with."""
    verifier: str
    difficulty: float = Field(ge=0.0, le=1.0)
    """0 = easiest, 1 = hardest (number of operations / shapes / chart steps)."""

    @model_validator(mode="before")
    @classmethod
    def _has_answer(cls, data):
        if isinstance(data, dict) and not str(data.get("answer") or "").strip():
            raise ValueError(
                "RL prompt has no reference answer; every prompt needs a checkable "
                "answer for its verifier (drop the prompt or fill in `answer`)"
            )
        return data

    @model_validator(mode="after")
    def _prompt_only(self) -> RLPromptRecord:
        if any(m.role == "assistant" for m in self.messages):
            raise ValueError("an RL prompt holds no assistant turn (the policy writes it)")
        _check_reference(self.answer, self.verifier)
        return self


def _read(dataset: Path, split: str, name: str, model):
    path = require_dataset(dataset, name) / f"{_split(split)}.jsonl"
    if not path.is_file():
        raise DatasetMissingError(f"{name}/{split}", path)
    records = read_jsonl(path, model)
    if not records:
        raise ManifestError(f"{path}: no records; rebuild it with `dvc repro {name}`")
    return records


def read_sft_records(dataset: Path, split: str, name: str = "sft") -> list[SftRecord]:
    """Records of `dataset/<split>.jsonl` (`dataset` is e.g. data/sft)."""
    return _read(dataset, split, name, SftRecord)


def read_reasoning_records(dataset: Path, split: str, name: str = "reasoning") -> list[ReasoningRecord]:
    """Records of `dataset/<split>.jsonl`; every trace is re-verified while reading."""
    return _read(dataset, split, name, ReasoningRecord)


def read_rl_prompt_records(dataset: Path, split: str, name: str = "rl_prompts") -> list[RLPromptRecord]:
    """Records of `dataset/<split>.jsonl`; a prompt without an answer is a ManifestError."""
    return _read(dataset, split, name, RLPromptRecord)

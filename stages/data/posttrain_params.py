"""Build parameters of the post-training datasets (`sft`, `reasoning`, `rl_prompts`).

These are params.yaml sections like those of params.py, kept in their own registry so that the
pretraining datasets' section list (and everything keyed on it) stays as it was. Every section
validates strictly: an unknown or misspelt key is an error naming the key.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def _check_weights(section: str, weights: dict[str, float], known: tuple[str, ...]) -> None:
    bad = sorted(set(weights) - set(known))
    if bad:
        raise ValueError(f"{section} has unknown kinds {bad}; use {', '.join(known)}")
    if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise ValueError(f"{section} weights must be >= 0 with a positive sum, got {weights}")


class VisionTokens(_Params):
    """How many LM tokens an image occupies (for the text:image token balance of `sft` only)."""

    patch_size: PositiveInt = 8
    merge_size: PositiveInt = 2
    max_patches: PositiveInt = 64
    """Defaults match the tiny recipe's model.vision."""


SFT_TEXT_KINDS = ("arith", "facts", "stdlib")


class SftParams(_Params):
    """ChatML dialogues: toy-world image QA / captions and text-only dialogues, about 1:1 by tokens."""

    seed: int = 0
    max_images_train: PositiveInt
    """Toy-world train images turned into image dialogues (one dialogue each)."""
    max_images_val: PositiveInt
    """Toy-world val images turned into val image dialogues."""
    text_image_ratio: PositiveFloat = 1.0
    """Text-only dialogue tokens per image-dialogue token (the paper's 1:1)."""
    multi_turn_frac: float = Field(default=0.25, ge=0.0, le=1.0)
    """Share of image dialogues with two QA turns about the same image."""
    caption_frac: float = Field(default=0.2, ge=0.0, le=1.0)
    """Share of image dialogues that ask for a description (answer: the caption)."""
    system_frac: float = Field(default=0.3, ge=0.0, le=1.0)
    """Share of dialogues that open with a system message."""
    text_weights: dict[str, float] = {"arith": 0.4, "facts": 0.35, "stdlib": 0.25}
    """Mix of text-only dialogues: arithmetic word problems, scene facts, stdlib docstrings."""
    val_frac: float = Field(default=0.1, gt=0.0, lt=0.5)
    """Share of generated text questions (by a hash of the question) held out for val."""
    vision: VisionTokens = VisionTokens()

    @model_validator(mode="after")
    def _check(self) -> SftParams:
        _check_weights("sft.text_weights", self.text_weights, SFT_TEXT_KINDS)
        if self.multi_turn_frac + self.caption_frac > 1.0:
            raise ValueError("sft.multi_turn_frac + sft.caption_frac must not exceed 1")
        return self


REASONING_KINDS = ("arith", "count", "chart")


class ReasoningParams(_Params):
    """Verified step-by-step traces (long-CoT warm-up) for text and image problems."""

    seed: int = 0
    num_train: PositiveInt
    """Admitted (verified) train traces."""
    num_val: PositiveInt
    kind_weights: dict[str, float] = {"arith": 0.4, "count": 0.3, "chart": 0.3}
    """Problem mix: multi-step arithmetic, counting shapes by colour, reading/comparing bars."""
    min_ops: PositiveInt = 2
    max_ops: PositiveInt = 4
    """Operations per arithmetic problem (multi-step)."""
    negative_frac: float = Field(default=0.1, ge=0.0, le=1.0)
    """Per problem, the chance of also generating a deliberately wrong trace; the verifier must
    reject it (counted in stats.json), which proves the admission check works."""
    val_frac: float = Field(default=0.1, gt=0.0, lt=0.5)
    """Share of arithmetic expressions (by a hash of the expression) held out for val."""

    @model_validator(mode="after")
    def _check(self) -> ReasoningParams:
        _check_weights("reasoning.kind_weights", self.kind_weights, REASONING_KINDS)
        if self.min_ops > self.max_ops:
            raise ValueError("reasoning.min_ops must not exceed reasoning.max_ops")
        return self


RL_KINDS = ("arith", "count", "color", "chart")


class RLPromptParams(_Params):
    """RL prompts with checkable answers and difficulty labels (no true/false, no multiple choice)."""

    seed: int = 0
    num_train: PositiveInt
    num_val: PositiveInt
    kind_weights: dict[str, float] = {"arith": 0.5, "count": 0.2, "color": 0.1, "chart": 0.2}
    max_ops: PositiveInt = 5
    """Arithmetic prompts have 1..max_ops operations (difficulty grows with the count)."""
    system_frac: float = Field(default=0.5, ge=0.0, le=1.0)
    """Share of prompts with a system message stating the answer format."""
    val_frac: float = Field(default=0.1, gt=0.0, lt=0.5)

    @model_validator(mode="after")
    def _check(self) -> RLPromptParams:
        _check_weights("rl_prompts.kind_weights", self.kind_weights, RL_KINDS)
        if self.max_ops < 2:
            raise ValueError("rl_prompts.max_ops must be at least 2 (difficulty needs a range)")
        return self


POST_SECTIONS: dict[str, type[_Params]] = {
    "sft": SftParams,
    "reasoning": ReasoningParams,
    "rl_prompts": RLPromptParams,
}
"""Post-training dataset name -> its params.yaml section model."""


def load_post_params(path: Path, name: str) -> _Params:
    """Validate section `name` of the params file at `path`, with an error naming the bad key."""
    if name not in POST_SECTIONS:
        raise KeyError(f"unknown post-training dataset {name!r}; known: {', '.join(POST_SECTIONS)}")
    data = yaml.safe_load(Path(path).read_text()) or {}
    if name not in data:
        raise ValueError(f"{path} has no `{name}:` section; add one (see params.yaml at the repo root)")
    try:
        return POST_SECTIONS[name].model_validate(data[name])
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{path}: {name}.{field}: {err['msg']}") from None

"""Build parameters of every generated dataset, read from the sections of params.yaml.

dvc.yaml names these sections under each stage's `params:`, so changing a number here re-builds
exactly the datasets that read it (and, through their hashes, everything downstream). Each
section validates strictly: an unknown or misspelt key is an error naming the key, never ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ToyworldParams(_Params):
    """The generated image world: shapes, rendered text, charts, arithmetic, documents."""

    seed: int = 0
    """Seed of the scene sampler (the only source of randomness)."""
    num_train: PositiveInt
    num_val: PositiveInt
    sizes: tuple[PositiveInt, ...] = (32, 48, 64)
    """Allowed image sides in pixels; multiples of 16 keep the patch-8 / merge-2 grid even."""
    kind_weights: dict[str, float] = {"shapes": 0.45, "ocr": 0.15, "chart": 0.13, "arith": 0.14, "doc": 0.13}
    """Sampling weight of each image kind."""
    web_frac: float = Field(default=0.3, ge=0.0, le=1.0)
    """Share of records marked quality=web (their alt text is noisier)."""

    @model_validator(mode="after")
    def _check(self) -> ToyworldParams:
        bad = sorted(set(self.kind_weights) - {"shapes", "ocr", "chart", "arith", "doc"})
        if bad:
            raise ValueError(
                f"toyworld.kind_weights has unknown kinds {bad}; use shapes, ocr, chart, arith, doc"
            )
        if any(s % 16 or s < 32 for s in self.sizes):
            raise ValueError(f"toyworld.sizes={list(self.sizes)} must be multiples of 16, >= 32")
        return self


VideoKind = Literal["motion", "order", "crossings", "count"]
"""The clip kinds of videoworld (each asks one question type that needs time to answer)."""


class VideoworldParams(_Params):
    """The generated video world: short clips of moving shapes (stages/data/videoworld.py)."""

    seed: int = 0
    """Seed of the clip sampler (the only source of randomness)."""
    num_train: PositiveInt
    num_val: PositiveInt
    sizes: tuple[PositiveInt, ...] = (32, 48)
    """Allowed frame sides in pixels; multiples of 16 keep the patch-8 / merge-2 grid even."""
    frames: tuple[PositiveInt, PositiveInt] = (4, 8)
    """Fewest and most frames per clip (3 at least: an order needs two events after the start)."""
    fps: tuple[PositiveInt, ...] = (2, 4, 8)
    """Allowed frame rates; each must divide 1000 (a frame lasts whole milliseconds)."""
    kind_weights: dict[str, float] = {"motion": 0.3, "order": 0.25, "crossings": 0.25, "count": 0.2}
    """Sampling weight of each clip kind."""

    @model_validator(mode="after")
    def _check(self) -> VideoworldParams:
        known = set(get_args(VideoKind))
        if not self.kind_weights or set(self.kind_weights) - known:
            raise ValueError(f"kind_weights: use the kinds {sorted(known)}, got {sorted(self.kind_weights)}")
        if any(v <= 0 for v in self.kind_weights.values()):
            raise ValueError("kind_weights: every weight must be > 0 (leave a kind out instead)")
        if not 3 <= self.frames[0] <= self.frames[1] <= 32:
            raise ValueError(f"frames: need 3 <= min <= max <= 32, got {list(self.frames)}")
        if bad := [f for f in self.fps if 1000 % f]:
            raise ValueError(f"fps: {bad} do not divide 1000; use e.g. 1, 2, 4, 5, 8 or 10")
        if bad := [s for s in self.sizes if s % 16 or s < 32]:
            raise ValueError(f"sizes: {bad} must be multiples of 16 and at least 32")
        return self


class TextParams(_Params):
    """Real text (Python stdlib docstrings) mixed with generated toy-world and arithmetic text."""

    seed: int = 0
    max_stdlib_chars: PositiveInt
    """Stop harvesting stdlib docstrings after this many characters."""
    num_generated: PositiveInt
    """Generated documents (scene descriptions, arithmetic statements)."""
    val_frac: float = Field(default=0.03, gt=0.0, lt=0.5)
    """Share of documents (chosen by a hash of their text) held out for validation."""
    high_min_chars: PositiveInt = 200
    """Stdlib docstrings at least this long (and free of doctest lines) are quality=high."""


class LongdocParams(_Params):
    """Needle-in-a-haystack documents over stdlib filler text."""

    seed: int = 0
    num_train: PositiveInt
    num_val: PositiveInt
    min_chars: PositiveInt = 2000
    """Shortest filler; about 3 characters per token for the tiny BPE."""
    max_chars: PositiveInt = 15000
    """Longest filler (about 5000 tokens: past the 4096-token tiny context on purpose)."""
    pool_chars: PositiveInt = 10_000_000
    """Stdlib text the filler is drawn from (the default takes all of it)."""

    @model_validator(mode="after")
    def _check(self) -> LongdocParams:
        if self.min_chars > self.max_chars:
            raise ValueError("longdoc.min_chars must not exceed longdoc.max_chars")
        return self


class TokenizerParams(_Params):
    """Byte-level BPE trained on the text corpus plus toy-world captions and QA."""

    vocab_size: PositiveInt
    """Total vocabulary including special tokens; must equal the model's lm.vocab_size."""
    min_frequency: PositiveInt = 2
    """A merge must occur this often in the corpus."""


SECTIONS: dict[str, type[_Params]] = {
    "toyworld": ToyworldParams,
    "videoworld": VideoworldParams,
    "text": TextParams,
    "longdoc": LongdocParams,
    "tokenizer": TokenizerParams,
}
"""Dataset name -> its params.yaml section model."""


def load_params(path: Path, name: str) -> _Params:
    """Validate section `name` of the params file at `path`, with an error naming the bad key."""
    if name not in SECTIONS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(SECTIONS)}")
    data = yaml.safe_load(Path(path).read_text()) or {}
    if name not in data:
        raise ValueError(f"{path} has no `{name}:` section; add one (see params.yaml at the repo root)")
    try:
        return SECTIONS[name].model_validate(data[name])
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{path}: {name}.{field}: {err['msg']}") from None

"""Record schemas of the built datasets and validating readers for their JSONL manifests.

Every dataset directory is produced by `dvc repro` (see dvc.yaml). The readers are the only way
training code looks at a manifest, so a malformed line fails here, naming `file:line` and the
field, instead of deep inside a batch builder; a missing directory names the dataset and the fix.

Layouts:
    data/toyworld/{train,val}/records.jsonl + images/*.png     -> ImageRecord
    data/text/{train,val}.jsonl                                -> TextRecord
    data/longdoc/{train,val}.jsonl                             -> LongDocRecord
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SPLITS = ("train", "val")

Quality = Literal["high", "web"]
"""`high`: clean text (the cooldown subset); `web`: noisier text such as alt text or short docstrings."""


ImageKind = Literal["shapes", "ocr", "chart", "arith", "doc"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Box(_Record):
    """A grounding box in pixel coordinates of the stored image."""

    label: str
    """What is inside, e.g. "red circle" or "text 'cat 42'"."""
    bbox: tuple[int, int, int, int]
    """(x0, y0, x1, y1), inclusive-exclusive pixel corners."""

    @field_validator("bbox")
    @classmethod
    def _ordered(cls, v: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        if not (v[0] < v[2] and v[1] < v[3]):
            raise ValueError(f"bbox {list(v)} must satisfy x0 < x1 and y0 < y1")
        return v


class QA(_Record):
    """A question with a short exact answer (checked by exact match)."""

    question: str
    answer: str = Field(min_length=1)
    type: Literal["count", "color", "shape", "position", "ocr", "chart", "arith"]


class ImageRecord(_Record):
    """One toy-world image with its verifiable facts."""

    id: str
    image: str
    """Path of the PNG relative to the split directory (e.g. "images/000123.png")."""
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    kind: ImageKind
    caption: str = Field(min_length=1)
    """Informative description (enough for image-text retrieval to beat chance)."""
    alt_text: str
    """Shorter, noisier text, like web alt text."""
    ocr: str | None
    """The rendered text, when the image shows text."""
    boxes: tuple[Box, ...]
    qa: tuple[QA, ...]
    quality: Quality


class TextRecord(_Record):
    """One text document for LM training."""

    text: str = Field(min_length=1)
    source: Literal["stdlib", "generated"]
    quality: Quality


class LongDocRecord(_Record):
    """A needle-in-a-haystack document: filler text with one inserted fact, and a question on it."""

    id: str
    text: str
    """Filler with the needle sentence inserted at `depth`."""
    needle: str
    """The inserted sentence, verbatim (it occurs exactly once in `text`)."""
    needle_key: str
    needle_value: str
    depth: float = Field(ge=0.0, le=1.0)
    """Relative character position of the needle in `text`."""
    question: str
    answer: str


class DatasetMissingError(FileNotFoundError):
    """A dataset directory (a dvc.yaml output) has not been built or was not pulled."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        super().__init__(
            f"dataset {name!r} not found at {path}; build it with `moonforge data build` "
            f"(or `dvc repro {name}` / `dvc pull` at the repository root)"
        )


class ManifestError(ValueError):
    """A manifest line is not valid JSON or does not match its record schema."""


R = TypeVar("R", bound=_Record)


def read_jsonl(path: Path, model: type[R]) -> list[R]:
    """Parse and validate every line of `path`; the error names file:line and the bad field."""
    records: list[R] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            try:
                records.append(model.model_validate(obj))
            except ValidationError as e:
                err = e.errors()[0]
                field = ".".join(str(p) for p in err["loc"]) or "(record)"
                raise ManifestError(
                    f"{path}:{lineno}: field {field!r}: {err['msg']} "
                    f"(expected a {model.__name__}; {e.error_count()} error(s) on this line)"
                ) from None
    return records


def require_dataset(path: Path, name: str) -> Path:
    """Return `path` (a dataset directory such as data/toyworld); raise DatasetMissingError if absent."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetMissingError(name, path)
    return path


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return split


def read_image_records(dataset: Path, split: str, name: str = "toyworld") -> list[ImageRecord]:
    """Records of `dataset/<split>/records.jsonl` (`dataset` is e.g. data/toyworld).

    Image paths in the records are relative to `dataset/<split>`.
    """
    path = require_dataset(dataset, name) / _split(split) / "records.jsonl"
    if not path.is_file():
        raise DatasetMissingError(f"{name}/{split}", path)
    return read_jsonl(path, ImageRecord)


def read_text_records(dataset: Path, split: str, name: str = "text") -> list[TextRecord]:
    """Records of `dataset/<split>.jsonl`."""
    path = require_dataset(dataset, name) / f"{_split(split)}.jsonl"
    if not path.is_file():
        raise DatasetMissingError(f"{name}/{split}", path)
    return read_jsonl(path, TextRecord)


def read_longdoc_records(dataset: Path, split: str, name: str = "longdoc") -> list[LongDocRecord]:
    """Records of `dataset/<split>.jsonl`."""
    path = require_dataset(dataset, name) / f"{_split(split)}.jsonl"
    if not path.is_file():
        raise DatasetMissingError(f"{name}/{split}", path)
    return read_jsonl(path, LongDocRecord)


def write_jsonl(path: Path, records: Iterable[_Record]) -> None:
    """Write records one per line with sorted keys and ASCII escapes (byte-deterministic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r.model_dump(mode="json"), sort_keys=True, ensure_ascii=True))
            f.write("\n")

"""Declared datasets: users' own data, named in the recipe's `datasets:` section.

A declaration says what the files are (`format`), where they are (`path`: a file, a directory,
a glob, or an `s3://` URI; relative paths are inside `data/<name>/`, the directory
`moonforge data add` tracks with DVC as `data/<name>.dvc`), where relative image paths point
(`images_root`), and how the files' columns and role tags map onto moonforge's fields, in the
spirit of LLaMA-Factory's `dataset_info.json`:

    datasets:
      - name: my_llava
        format: llava
        path: train.json
        images_root: images
        num_heldout: 32            # kept out of training, scored by the stage's closing eval
      - name: my_pairs
        format: webdataset
        path: s3://bucket/pairs/*.tar
        columns: {image: jpg, text: txt}

Stages mix them in by weight through their `mixture:` field (`mixture: {my_llava: 0.5}` = half
of the stage's training tokens); the recipe copies each named declaration into the stage config
(`declared`), so a stage's fingerprint covers format, mapping and paths, and its `data:` list gets
the name, so the DVC hash is recorded like any dataset's. Each stage kind accepts the formats in
`ACCEPTS`; any other fails when the recipe loads, naming the list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator

from moonforge.stages.config import Frozen

FormatName = Literal[
    "llava",
    "sharegpt",
    "messages",
    "openai",
    "webdataset",
    "parquet",
    "text",
    "verl",
    "rl_messages",
    "preference",
]
Kind = Literal["chat", "pair", "text", "prompt", "preference"]
"""What a record becomes: a dialogue to train on, an image-text pair, a text document, an RL
prompt with a reference answer, or a preference pair."""

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
GENERATED = ("toyworld", "text", "longdoc", "tokenizer", "sft", "reasoning", "rl_prompts")
"""Names of the generated datasets (dvc.yaml stages); a declared dataset may not reuse them."""
VERIFIER_NAMES = ("exact", "numeric", "multiple_choice")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")


@dataclass(frozen=True)
class FormatSpec:
    """How one format is laid out: its kind, file types and default column / tag mapping."""

    kind: Kind
    files: tuple[str, ...]
    """File extensions it reads (the first is what a directory is searched for first)."""
    columns: Mapping[str, str | None]
    """moonforge field -> column name (dots reach into nested columns); None = optional, unset."""
    tags: Mapping[str, str] | None = None
    """Role / content keys and role values of the message dicts (conversations only)."""
    doc: str = ""


_SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
}
_ROLE_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
}

FORMATS: dict[str, FormatSpec] = {
    "llava": FormatSpec(
        "chat",
        ("json", "jsonl"),
        {"messages": "conversations", "images": "image", "videos": "video", "system": None},
        _SHAREGPT_TAGS,
        "LLaVA: a JSON array of {id, image, conversations: [{from, value}]}; "
        "`<image>` is moved to the start of its turn; LLaVA-NeXT video rows: {video, "
        "conversations} whose `<image>` marks the video",
    ),
    "sharegpt": FormatSpec(
        "chat",
        ("json", "jsonl", "parquet"),
        {"messages": "conversations", "images": "images", "videos": "videos", "system": "system"},
        _SHAREGPT_TAGS,
        "ShareGPT as LLaMA-Factory declares it (`<video>` tags take the videos column)",
    ),
    "messages": FormatSpec(
        "chat",
        ("jsonl", "json", "parquet"),
        {"messages": "messages", "images": "images", "videos": "videos", "system": None},
        _ROLE_TAGS,
        "ms-swift / LLaMA-Factory: {messages: [{role, content}], images: [...], videos: [...]}",
    ),
    "openai": FormatSpec(
        "chat",
        ("jsonl", "json", "parquet"),
        {"messages": "messages", "images": "images", "system": None},
        _ROLE_TAGS,
        "OpenAI content parts: {type: text, text} / {type: image_url, image_url: "
        "{url}} (or TRL {type: image} + an images column)",
    ),
    "webdataset": FormatSpec(
        "pair",
        ("tar",),
        {"image": "jpg", "text": "txt"},
        doc="img2dataset shards: KEY.jpg + KEY.txt (+ KEY.json)",
    ),
    "parquet": FormatSpec(
        "pair",
        ("parquet",),
        {"image": "image", "text": "text"},
        doc="image-text pairs: an HF Image struct {bytes, path} + a caption column",
    ),
    "text": FormatSpec("text", ("jsonl", "json", "parquet"), {"text": "text"}, doc="{text: ...}"),
    "verl": FormatSpec(
        "prompt",
        ("parquet", "jsonl", "json"),
        {
            "prompt": "prompt",
            "images": "images",
            "ground_truth": "reward_model.ground_truth",
            "data_source": "data_source",
            "difficulty": None,
        },
        _ROLE_TAGS,
        "verl RL rows: prompt (messages), images, reward_model.ground_truth, data_source",
    ),
    "rl_messages": FormatSpec(
        "prompt",
        ("jsonl", "json", "parquet"),
        {
            "prompt": "messages",
            "images": "images",
            "ground_truth": "solution",
            "data_source": None,
            "difficulty": None,
        },
        _ROLE_TAGS,
        "TRL / ms-swift GRPO rows: messages without the answer + solution",
    ),
    "preference": FormatSpec(
        "preference",
        ("jsonl", "json", "parquet"),
        {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "images": "images"},
        _ROLE_TAGS,
        "TRL preference pairs: prompt / chosen / rejected (+ images)",
    ),
}

CONVERSATIONS = ("llava", "sharegpt", "messages", "openai")
PAIRS = ("webdataset", "parquet")
PROMPTS = ("verl", "rl_messages")

ACCEPTS: dict[str, tuple[str, ...]] = {
    "lm_pretrain": ("text",),
    "vit_pretrain": PAIRS,
    "align": PAIRS + CONVERSATIONS,
    "joint_pretrain": ("text",) + PAIRS + CONVERSATIONS,
    "cooldown": ("text",) + PAIRS + CONVERSATIONS,
    "long_context": ("text",),
    "sft": CONVERSATIONS,
    "long_cot_sft": CONVERSATIONS,
    "rl": PROMPTS,
    "long2short": PROMPTS + ("preference",),
}
"""Stage kind -> the declared formats its `mixture:` may name."""

DATA_SOURCE_VERIFIERS = {
    "openai/gsm8k": "numeric",
    "gsm8k": "numeric",
    "lighteval/math": "numeric",
    "math": "numeric",
    "hiyouga/geometry3k": "exact",
    "geometry3k": "exact",
}
"""verl `data_source` values and the verifier each gets unless the declaration says otherwise."""


def _relative_or_s3(value: str, what: str) -> str:
    if value.startswith("s3://"):
        return value
    if "://" in value:
        raise ValueError(
            f"{what} {value!r}: only local paths and s3:// URIs are read (no network "
            "fetches); download it and `moonforge data add` the local copy"
        )
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(
            f"{what} {value!r} must be relative to data/<name>/ (the directory DVC "
            "tracks) or an s3:// URI; `moonforge data add NAME PATH` copies local "
            "data there and writes the declaration"
        )
    return value


class DeclaredDataset(Frozen):
    """One user dataset: its files, format, column / role mapping and bad-record policy."""

    name: str
    """Dataset name (lower case, digits, `_`): what stages' `mixture:` and `data:` use."""
    format: FormatName
    """llava, sharegpt, messages, openai (conversations); webdataset, parquet (image-text pairs);
    text; verl, rl_messages (RL prompts); preference (prompt / chosen / rejected)."""
    path: str
    """A file, a directory, a glob (`shards/*.tar`) or an s3:// URI; relative paths are inside
    data/<name>/ (tracked by DVC as data/<name>.dvc)."""
    images_root: str | None = None
    """Where relative image paths of the records point (relative to data/<name>/, or s3://).
    A record whose image path is absolute or climbs out of it (`../`) is refused."""
    columns: dict[str, str] = {}
    """moonforge field -> your column (LLaMA-Factory `columns`), merged over the format's
    defaults; dots reach into nested columns (`reward_model.ground_truth`)."""
    tags: dict[str, str] = {}
    """Message keys and role values (LLaMA-Factory `tags`): role_tag, content_tag, user_tag,
    assistant_tag, system_tag, merged over the format's defaults."""
    num_samples: PositiveInt | None = None
    """Read only the first N records (in file order); None = all."""
    max_bad_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    """Bad records are skipped and counted; above this share the stage fails before training."""
    num_heldout: NonNegativeInt = 0
    """Records set aside (a seeded choice) for the stage's closing eval; never trained on."""
    verifier: Literal["exact", "numeric", "multiple_choice"] | None = None
    """RL prompts: the verifier for every row; None = by data_source (`data_source_verifiers`,
    then the built-in table for known verl sources), else exact match."""
    data_source_verifiers: dict[str, str] = {}
    """RL prompts: data_source value -> verifier name."""
    video_frames: PositiveInt = 8
    """Frames sampled evenly from each video of a record (ceil(video_frames / 2) temporal
    patches); videos are MP4 / WebM / MKV / AVI (PyAV) or animated WebP / GIF (Pillow), read
    by time (stages/data/video_decode.py)."""
    video_fps: PositiveFloat | None = None
    """Sample each video at this many frames per second from t=0 instead, at most video_frames of
    them (a longer video is sampled evenly as video_frames; Qwen2-VL's fps with max_frames)."""
    video_max_tokens: PositiveInt | None = None
    """LM tokens per video at most: its frames keep their count and shrink in resolution to
    fit (None = the model's max_patches per frame)."""
    shuffle_block: PositiveInt = 64
    """Records per shuffle block: an epoch visits files in a seeded order, blocks of each file in
    a seeded order and records of a block in a seeded order; ranks take whole blocks."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                f"dataset name {v!r}: use lower-case letters, digits and '_', "
                "starting with a letter (e.g. my_llava)"
            )
        if v in GENERATED:
            raise ValueError(f"dataset name {v!r} is a generated dataset (dvc.yaml); pick another")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _relative_or_s3(v, "path")

    @field_validator("images_root")
    @classmethod
    def _images_root(cls, v: str | None) -> str | None:
        return None if v is None else _relative_or_s3(v, "images_root")

    @model_validator(mode="after")
    def _mapping(self) -> DeclaredDataset:
        spec = FORMATS[self.format]
        bad = sorted(set(self.columns) - set(spec.columns))
        if bad:
            raise ValueError(
                f"dataset {self.name!r}: columns {bad} do not apply to format "
                f"{self.format!r}; its fields are {sorted(spec.columns)}"
            )
        if self.tags and spec.tags is None:
            raise ValueError(
                f"dataset {self.name!r}: format {self.format!r} has no messages, so no tags; remove `tags`"
            )
        bad = sorted(set(self.tags) - set(TAG_KEYS))
        if bad:
            raise ValueError(f"dataset {self.name!r}: unknown tags {bad}; use {list(TAG_KEYS)}")
        for src, name in {**self.data_source_verifiers}.items():
            if name not in VERIFIER_NAMES:
                raise ValueError(
                    f"dataset {self.name!r}: data_source_verifiers[{src!r}] = "
                    f"{name!r}; use one of {list(VERIFIER_NAMES)}"
                )
        return self

    @property
    def kind(self) -> Kind:
        return FORMATS[self.format].kind

    def column(self, field: str) -> str | None:
        """The column that holds `field` (the declaration's mapping over the format's default)."""
        return self.columns.get(field, FORMATS[self.format].columns.get(field))

    def tag(self, key: str) -> str:
        return self.tags.get(key) or (FORMATS[self.format].tags or {})[key]

    def verifier_for(self, data_source: str | None) -> str:
        """The verifier of an RL row (see `verifier`)."""
        if self.verifier:
            return self.verifier
        src = (data_source or "").strip()
        return self.data_source_verifiers.get(src) or DATA_SOURCE_VERIFIERS.get(src.lower()) or "exact"


def accepted_formats(kind: str) -> tuple[str, ...]:
    return ACCEPTS.get(kind, ())


def check_mixture(
    stage_kind: str, stage_name: str, mixture: Mapping[str, float], declared: Mapping[str, DeclaredDataset]
) -> None:
    """Raise ValueError (naming the fix) unless every mixture entry is declared and accepted."""
    ok = accepted_formats(stage_kind)
    for name in mixture:
        if name not in declared:
            raise ValueError(
                f"mixture names {name!r}, which the recipe's `datasets:` section does "
                f"not declare (declared: {sorted(declared) or 'none'}); add it with "
                f"`moonforge data add {name} PATH --format F`"
            )
        fmt = declared[name].format
        if fmt not in ok:
            raise ValueError(
                f"dataset {name!r} has format {fmt!r}, which stage kind "
                f"{stage_kind!r} does not accept; it accepts: "
                f"{', '.join(ok) or 'no declared datasets'}"
            )
    total = sum(mixture.values())
    if total > 1.0 + 1e-9:
        raise ValueError(
            f"stage {stage_name!r}: mixture shares add up to {total:g} > 1; they are "
            "shares of the stage's training data (the generated sources get the rest)"
        )


def inject_declared(data: Any) -> Any:
    """Recipe mapping before validation: copy each stage's mixture declarations into the stage
    (`declared`) and add the names to its `data:` list. Anything in `declared` is replaced."""
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        return data
    decls = {d.get("name"): d for d in data.get("datasets") or [] if isinstance(d, Mapping)}
    stages = []
    for st in data["stages"]:
        if not isinstance(st, Mapping):
            stages.append(st)
            continue
        st = dict(st)
        mix = st.get("mixture") or {}
        names = list(mix) if isinstance(mix, Mapping) else []
        st["declared"] = [decls[n] for n in names if n in decls]
        if names and isinstance(st.get("data", []), (list, tuple)):
            st["data"] = list(st.get("data") or []) + [n for n in names if n not in (st.get("data") or [])]
        stages.append(st)
    return {**data, "stages": stages}

"""Hugging Face checkpoint directories on disk: read one safely, write one atomically.

Reading (`read_hf_dir`): `config.json` plus safetensors weights, one file or shards listed by
`model.safetensors.index.json`, plus the tokenizer files if present. What users get burned by,
refused with the fix:
- pickle weights (`pytorch_model.bin`, `*.pt`): never unpickled (a pickle runs arbitrary code);
  convert to safetensors first;
- remote code (`auto_map` in config.json, `*.py` files): never imported or executed; supported
  architectures are mapped natively, so it is only noted;
- a shard the index lists that is not there; a tensor listed in the index but absent from its shard.

Writing (`write_hf_dir`): everything goes to a hidden temporary sibling of OUT, which is renamed
into place only when complete, so an interrupted export leaves nothing at OUT; an existing
non-empty OUT is refused unless `force`, and then replaced only after the new one is complete.
Weights above `max_shard_bytes` are sharded with an index, as transformers' save_pretrained does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moonforge.model.adapters.base import InteropError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
"""Files copied along with a checkpoint's weights when present (never code)."""
DEFAULT_SHARD_BYTES = 5 * 1024**3
"""transformers' default max_shard_size (5 GB)."""


@dataclass
class HFCheckpoint:
    """A checkpoint directory as read: its config, its tensors, and where everything came from."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    files: dict[str, str]
    """Relative file name -> sha256 of every config and weight file read (the import's identity)."""
    tokenizer_files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InteropError(f"{what} {path} is not valid JSON ({e}); re-save the checkpoint") from e
    if not isinstance(data, dict):
        raise InteropError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def weight_files(path: Path) -> list[str]:
    """Relative names of the safetensors files holding the weights (index order), or an error
    naming the fix when there are none, only pickles, or a listed shard is missing."""
    if (path / INDEX).is_file():
        weight_map = _read_json(path / INDEX, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InteropError(f"{path / INDEX} has no weight_map; re-save the checkpoint")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise InteropError(
                f"{path / INDEX} lists shard(s) {missing} that are not in {path}; copy the "
                "missing shard files (an interrupted download or copy?)"
            )
        return shards
    if (path / SINGLE).is_file():
        return [SINGLE]
    singles = sorted(p.name for p in path.glob("*.safetensors"))
    if len(singles) == 1:
        return singles
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InteropError(
            f"{path} holds only pickle weights {pickles}; moonforge never unpickles checkpoints "
            "(loading a pickle can run arbitrary code). Convert them to safetensors first, e.g. "
            "in a trusted environment: model = AutoModel.from_pretrained(dir); "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    if len(singles) > 1:
        raise InteropError(
            f"{path} has several .safetensors files {singles} but no {INDEX}; "
            "add the index (save_pretrained writes it)"
        )
    raise InteropError(
        f"{path} has no weights ({SINGLE} or {INDEX}); point at a Hugging Face checkpoint directory"
    )


def read_hf_dir(path: str | Path) -> HFCheckpoint:
    """Read a local HF checkpoint directory. Raises InteropError for every bad input above."""
    path = Path(path)
    if not path.is_dir():
        raise InteropError(
            f"{path} is not a directory; pass a Hugging Face checkpoint directory "
            "(config.json + *.safetensors)"
        )
    if not (path / CONFIG).is_file():
        raise InteropError(
            f"{path} has no {CONFIG}; a Hugging Face checkpoint directory needs "
            "one (save_pretrained writes it)"
        )
    config = _read_json(path / CONFIG, "config")
    notes = []
    if "auto_map" in config or any(path.glob("*.py")):
        notes.append(
            "remote code (auto_map / *.py) ignored: moonforge maps this architecture "
            "natively and never executes code from a checkpoint"
        )
    shards = weight_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    if (path / INDEX).is_file():
        weight_map = _read_json(path / INDEX, "safetensors index")["weight_map"]
        absent = sorted(k for k in weight_map if k not in tensors)
        if absent:
            raise InteropError(
                f"{path / INDEX} lists tensors {absent[:5]} that no shard holds; "
                "the shards and the index disagree (re-save the checkpoint)"
            )
    files = {name: sha256_file(path / name) for name in [CONFIG, *shards]}
    tok_files = [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
    return HFCheckpoint(path, config, tensors, files, tok_files, notes)


def _shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split tensors, in name order, into groups of at most max_bytes (a bigger tensor alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    return groups


def write_weights(
    out: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[str]:
    """Write safetensors (sharded + index above max_shard_bytes) into `out`; return file names."""
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    groups = _shards(contiguous, max_shard_bytes)
    meta = {"format": "pt"}
    if len(groups) == 1:
        save_file(groups[0], str(out / SINGLE), metadata=meta)
        return [SINGLE]
    names, weight_map = [], {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(out / name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in group})
    total = sum(t.numel() * t.element_size() for t in contiguous.values())
    (out / INDEX).write_text(
        json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
        )
    )
    return names + [INDEX]


def prepare_out(out: Path, force: bool) -> None:
    """Refuse a non-empty OUT unless `force` (checked before any work is done)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise InteropError(
            f"{out} exists and is not empty; choose another directory or pass --force to replace it"
        )


def write_hf_dir(out: str | Path, fill: Callable[[Path], None], force: bool = False) -> Path:
    """Run `fill(tmp)` to write a whole directory, then move it to `out` atomically.

    `tmp` is a hidden sibling of `out` (same filesystem, so the rename is atomic). If `fill`
    raises, or the process dies, `out` is untouched and the temporary directory is removed (or,
    after a hard kill, left hidden as `.<name>.tmp-*`, never at `out`).
    """
    out = Path(out).absolute()
    prepare_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fill(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

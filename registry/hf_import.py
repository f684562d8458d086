"""`moonforge import PATH`: a Hugging Face checkpoint directory becomes a versioned store artifact.

The artifact (`<store>/<name>/<n>/`, default name `import`) holds moonforge's layout of the parts
the checkpoint provides, so stages load it like any checkpoint:
    model.safetensors   our state-dict keys, prefixed by part ("vision.", "projector.", "lm.")
    import.json         model_type, the parts and their shape configs, source path, per-file
                        sha256, tokenizer changes (media tokens added, embedding rows grown)
    model_config.json   only for a whole VLM (kimi_vl): then it is a complete Checkpoint that
                        `chat`, `eval` and `rerun --from` take like any stage output
    tokenizer/          the checkpoint's tokenizer files, when it has a tokenizer.json
    lineage.json        source path and file digests (the store's sidecar)
Its fingerprint is the sha256 of the canonical record of the source files' digests and the
model_type, so importing the same files twice is a cache hit on the same version. Nothing is
visible in the store until the commit: a bad checkpoint fails before the store is touched.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors.torch import save_file

from moonforge.model.adapters import adapter_for
from moonforge.model.adapters.base import PARTS, InteropError
from moonforge.model.config import LMConfig, ProjectorConfig, VisionConfig, VLMConfig
from moonforge.registry.fingerprint import fingerprint
from moonforge.registry.hf_files import HFCheckpoint, read_hf_dir
from moonforge.registry.hf_tokenizer import TOKENIZER_DIR, import_tokenizer
from moonforge.registry.lineage import git_info, package_versions
from moonforge.registry.store import ArtifactInfo, ArtifactStore
from moonforge.stages.artifacts import MODEL_CONFIG_FILE, WEIGHTS_FILE

IMPORT_FILE = "import.json"
IMPORT_KIND = "import"
PART_CONFIGS: dict[str, type[BaseModel]] = {
    "vision": VisionConfig,
    "projector": ProjectorConfig,
    "lm": LMConfig,
}


@dataclass(frozen=True)
class ImportOutcome:
    info: ArtifactInfo
    cache_hit: bool
    model_type: str
    parts: tuple[str, ...]
    notes: tuple[str, ...]


def read_import(path: Path) -> dict:
    """The import.json of an imported artifact directory (InteropError if it is not one)."""
    p = Path(path) / IMPORT_FILE
    if not p.is_file():
        raise InteropError(
            f"{path} is not an imported checkpoint (no {IMPORT_FILE}); import one "
            "with `moonforge import HF_DIR`"
        )
    return json.loads(p.read_text())


def import_parts(path: Path) -> dict[str, Any]:
    """Part name -> shape config of an imported artifact."""
    rec = read_import(path)
    return {name: PART_CONFIGS[name].model_validate(cfg) for name, cfg in rec["parts"].items()}


def is_import(info: ArtifactInfo) -> bool:
    return ((info.inputs or {}).get("stage") or {}).get("kind") == IMPORT_KIND


def _inputs(name: str, ckpt: HFCheckpoint) -> dict:
    return {
        "stage": {"kind": IMPORT_KIND, "name": name},
        "source": {"model_type": ckpt.model_type, "files": dict(sorted(ckpt.files.items()))},
    }


def _write(
    staging: Path,
    ckpt: HFCheckpoint,
    parts: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    tok: dict | None,
) -> None:
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(staging / WEIGHTS_FILE), metadata={"format": "pt"}
    )
    if set(parts) == set(PARTS):  # a whole VLM: a complete Checkpoint for chat / eval / rerun
        cfg = VLMConfig(vision=parts["vision"], projector=parts["projector"], lm=parts["lm"])
        (staging / MODEL_CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
    record = {
        "model_type": ckpt.model_type,
        "source_path": str(ckpt.path.resolve()),
        "files": ckpt.files,
        "notes": ckpt.notes,
        "parts": {k: v.model_dump(mode="json") for k, v in parts.items()},
        "tokenizer": tok,
        "hf_config": ckpt.config,
    }
    (staging / IMPORT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))


def import_checkpoint(
    path: str | Path,
    store: ArtifactStore,
    name: str = IMPORT_KIND,
    project: str | Path = ".",
    reserved: tuple[str, ...] = (),
) -> ImportOutcome:
    """Import the HF checkpoint at `path` as the next version of `name` in `store`.

    `reserved`: names that may not be used (the lifecycle's stage names, so `sft@1` always means
    a trained SFT). Raises InteropError (bad checkpoint, unsupported type, shapes, tokenizer)
    before anything is written to the store.
    """
    if name in reserved:
        raise InteropError(
            f"--name {name!r} is a lifecycle stage name; pick another name for the "
            "import (e.g. moonlight, siglip)"
        )
    started = time.time()
    ckpt = read_hf_dir(path)
    adapter = adapter_for(ckpt.model_type)
    model_type = ckpt.model_type
    assert model_type is not None  # adapter_for refused it otherwise
    parts = dict(adapter.parts_from_hf(ckpt.config))
    state = dict(adapter.state_from_hf(ckpt.tensors, parts, ckpt.config))
    inputs = _inputs(name, ckpt)
    fp = fingerprint(inputs)
    hit = store.lookup(name, fp)
    if hit is not None:
        return ImportOutcome(hit, True, model_type, tuple(parts), tuple(ckpt.notes))
    staging = store.begin(name)
    try:
        tok = None
        if any(p.name == "tokenizer.json" for p in ckpt.tokenizer_files):
            tok, parts, state = import_tokenizer(ckpt.tokenizer_files, staging / TOKENIZER_DIR, parts, state)
        _write(staging, ckpt, parts, state, tok)
        lineage = {
            "stage": name,
            "kind": IMPORT_KIND,
            "fingerprint": fp,
            "source": {"path": str(ckpt.path.resolve()), "model_type": ckpt.model_type, "files": ckpt.files},
            "parts": sorted(parts),
            "tokenizer": tok,
            "upstream": None,
            "datasets": [],
            "git": git_info(project),
            "packages": package_versions(),
            "metrics": {},
            "timestamps": {"start": started, "end": time.time()},
        }
        info = store.commit(
            staging,
            fp,
            inputs,
            sidecars=lambda v: {"lineage.json": {**lineage, "version": v, "ref": f"{name}@{v}"}},
        )
    except BaseException:
        store.abort(staging)
        raise
    return ImportOutcome(info, False, model_type, tuple(parts), tuple(ckpt.notes))


def load_part_state(path: Path, part: str) -> dict[str, torch.Tensor]:
    """The tensors of one part of an imported (or any) checkpoint, keys without the part prefix."""
    from safetensors.torch import load_file

    prefix = part + "."
    return {
        k[len(prefix) :]: v
        for k, v in load_file(str(Path(path) / WEIGHTS_FILE)).items()
        if k.startswith(prefix)
    }


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in Path(src).iterdir():
        if p.is_file():
            shutil.copy2(p, dst / p.name)

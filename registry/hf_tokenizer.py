"""Tokenizers at the Hugging Face border: taken in with an imported checkpoint, found again for an
artifact (chat, eval, export), written out with a chat template.

On import the checkpoint's `tokenizer.json` is copied into the artifact's `tokenizer/` folder. If
its chat dialect lacks media tokens (e.g. a Llama or Moonlight tokenizer has no image
placeholder), they are added as special tokens at the end of the vocabulary and the LM's
embedding and lm_head rows grow to match; both are recorded in import.json and the lineage. A
tokenizer with more tokens than the LM has embedding rows is refused: ids past the table would
index out of range.

An artifact's tokenizer is the one its stage read: the `tokenizer` dataset in its lineage (the DVC
BPE, or an import's tokenizer/ when the recipe names one), else its own `tokenizer/` (imports).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer

from moonforge.model.adapters.base import InteropError
from moonforge.model.hf_tokenizer import ensure_media_tokens, generation_config, hf_tokenizer_files
from moonforge.model.tokenizer import Tokenizer
from moonforge.model.vocab_growth import grow_vocab
from moonforge.registry.store import ArtifactInfo, ArtifactStore

TOKENIZER_DIR = "tokenizer"


def import_tokenizer(
    files: list[Path], out: Path, parts: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[dict, dict[str, Any], dict[str, torch.Tensor]]:
    """Copy the tokenizer files into `out`, add missing media tokens, grow the LM's rows to match.

    Returns (the record for import.json, parts with lm.vocab_size updated, the state).
    """
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, out / f.name)
    hf = HFTokenizer.from_file(str(out / "tokenizer.json"))
    original = hf.get_vocab_size(with_added_tokens=True)
    rows = parts["lm"].vocab_size if "lm" in parts else None
    if rows is not None and original > rows:
        raise InteropError(
            f"the checkpoint's tokenizer.json has {original} tokens but its LM has only {rows} "
            "embedding rows; token ids past the table cannot be embedded. Use the tokenizer the "
            "model was trained with, or resize the model's embeddings before importing"
        )
    hf, added = ensure_media_tokens(hf)
    hf.save(str(out / "tokenizer.json"))
    size = hf.get_vocab_size(with_added_tokens=True)
    grown = 0
    if rows is not None and size > rows:
        state = grow_vocab(state, size)
        grown = size - rows
        parts = {**parts, "lm": parts["lm"].model_copy(update={"vocab_size": size})}
    tok = Tokenizer.load(out / "tokenizer.json")
    record = {
        "vocab_size": size,
        "original_vocab_size": original,
        "added_tokens": added,
        "embedding_rows_grown": grown,
        "dialect": tok.dialect.name,
    }
    return record, parts, state


def _dataset_tokenizer(rec: Mapping) -> Path | None:
    for d in rec.get("datasets") or []:
        if d.get("name") == "tokenizer" and d.get("path"):
            p = Path(d["path"])
            p = p / "tokenizer.json" if p.is_dir() else p
            if p.is_file():
                return p.parent
    return None


def checkpoint_tokenizer(info: ArtifactInfo, store: ArtifactStore, project: str | Path = ".") -> Path | None:
    """The directory of the tokenizer.json `info` was trained with, or None if none is known."""
    own = info.path / TOKENIZER_DIR / "tokenizer.json"
    found = _dataset_tokenizer(info.lineage())
    if found is not None:
        return found
    if own.is_file():
        return own.parent
    return None


def load_checkpoint_tokenizer(info: ArtifactInfo, store: ArtifactStore, project: str | Path) -> Tokenizer:
    """`checkpoint_tokenizer` loaded, falling back to the project's DVC-built BPE."""
    found = checkpoint_tokenizer(info, store, project)
    if found is not None:
        return Tokenizer.load(found)
    from moonforge.registry.data_versions import read_lock

    return Tokenizer.load(read_lock(project, ["tokenizer"])["tokenizer"].path)


def write_tokenizer_files(tok_dir: Path, out: Path, hf_config: dict, override_ids: bool = True) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json (chat template), special_tokens_map.json and
    generation_config.json into `out`; set the special-token ids in `hf_config` (only where the
    adapter left them unset unless `override_ids`: an adapter that knows the tokenizer's ids,
    such as Kimi-VL's, writes its own). Returns the names written."""
    tok = Tokenizer.load(tok_dir)
    files = dict(hf_tokenizer_files(tok))
    gen = generation_config(tok)
    files["generation_config.json"] = json.dumps(gen, indent=2, sort_keys=True) + "\n"
    for name, text in files.items():
        (out / name).write_text(text)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is not None and (override_ids or hf_config.get(key) is None):
            hf_config[key] = gen[key]
    return sorted(files)

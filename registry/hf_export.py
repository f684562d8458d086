"""`moonforge export REF --format hf OUT`: a store artifact as a checkpoint transformers / vLLM load.

`--part lm` (default) writes the LM alone as a transformers-native causal LM: DeepseekV3ForCausalLM
for an MLA/MoE LM, LlamaForCausalLM or Qwen2ForCausalLM for a dense one (Qwen2 when it has q/k/v
biases). `--part vlm` writes the whole VLM in the published Kimi-VL layout that vLLM's native
KimiVLForConditionalGeneration reads. Beside the weights: config.json, the tokenizer the artifact
was trained with (tokenizer.json + tokenizer_config.json with a chat template), generation_config.json
and a model card (README.md) carrying the lineage: fingerprint, data versions, upstream chain and
metrics. Safetensors only, sharded with an index above the shard size; everything is written to a
temporary directory and renamed into place (registry/hf_files.write_hf_dir).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from moonforge.model.adapters import adapter_for
from moonforge.model.adapters.base import InteropError
from moonforge.model.config import LMConfig
from moonforge.registry.hf_files import DEFAULT_SHARD_BYTES, prepare_out, write_hf_dir, write_weights
from moonforge.registry.hf_import import import_parts, is_import
from moonforge.registry.hf_tokenizer import checkpoint_tokenizer, write_tokenizer_files
from moonforge.registry.lineage import walk
from moonforge.registry.store import ArtifactInfo, ArtifactStore
from moonforge.stages.artifacts import MODEL_CONFIG_FILE, WEIGHTS_FILE, Checkpoint

Part = Literal["lm", "vlm"]


@dataclass(frozen=True)
class ExportOutcome:
    out: Path
    model_type: str
    files: tuple[str, ...]
    tokenizer: str | None


def lm_model_type(lm: LMConfig) -> str:
    """The transformers architecture an LM exports as."""
    if lm.attention == "mla":
        return "deepseek_v3"
    return "qwen2" if lm.attention_bias and not lm.attention_out_bias else "llama"


def artifact_parts(info: ArtifactInfo) -> dict[str, Any]:
    """Part name -> shape config of any artifact (a stage checkpoint or an import)."""
    if (info.path / MODEL_CONFIG_FILE).is_file():
        cfg = Checkpoint(info.path).model_config()
        return {"vision": cfg.vision, "projector": cfg.projector, "lm": cfg.lm}
    if is_import(info):
        return import_parts(info.path)
    raise InteropError(f"{info.ref} has no {MODEL_CONFIG_FILE}; it is not a model checkpoint")


def _select(
    state: Mapping[str, torch.Tensor], parts: Mapping[str, Any], names: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    missing = [p for p in names if p not in parts]
    if missing:
        raise InteropError(
            f"the artifact has no {', '.join(missing)} part(s) (it holds "
            f"{', '.join(sorted(parts))}); export --part lm, or a whole VLM"
        )
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in names}


def _kimi_token_ids(tok_dir: Path | None) -> dict[str, int] | None:
    """Kimi-VL config token ids from the artifact's tokenizer (None: the adapter's defaults)."""
    if tok_dir is None:
        return None
    from moonforge.model.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    ids = {
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "media_placeholder_token_id": tok.media_pad_id,
        "bos_token_id": tok.bos_id,
    }
    return {k: v for k, v in ids.items() if v is not None}


def _data_version(d: Mapping) -> str:
    digest = str(d.get("digest"))
    if digest.startswith("import:"):  # an imported tokenizer stands in for the DVC dataset
        return f"{d['name']} (import fp {digest.removeprefix('import:')[:12]})"
    return f"{d['name']} (md5 {digest[:12]})"


def model_card(
    info: ArtifactInfo, store: ArtifactStore, project: str | Path, model_type: str, part: str
) -> str:
    """README.md: what this is and where it came from (the lineage chain, data, metrics)."""
    try:
        chain = walk(store, info.ref if store.lookup(info.stage, info.fingerprint) else info.path, project)
    except Exception:  # a card without the chain beats no export
        chain = [info.lineage()]
    rec = chain[0] if chain else {}
    lines = [
        f"---\nlibrary_name: transformers\ntags: [moonforge, {model_type}]\n---",
        f"# {info.ref} ({part}, exported by moonforge)",
        "",
        f"- fingerprint: `{info.fingerprint}`",
        f"- format: `{model_type}` (transformers-native, no remote code)",
        "",
        "## Lineage (newest first)",
        "",
    ]
    for r in chain:
        if r.get("missing"):
            lines.append(f"- {r.get('ref') or r['stage']}: missing from the store")
            continue
        data = ", ".join(_data_version(d) for d in r.get("datasets") or [])
        init = ", ".join(
            f"{part} <- {i.get('ref')} (fp {str(i.get('fingerprint'))[:12]})"
            for part, i in sorted((r.get("init") or {}).items())
        )
        src = (r.get("source") or {}).get("path")
        lines.append(
            f"- `{r.get('ref')}` fp `{str(r.get('fingerprint'))[:12]}`"
            + (f", data: {data}" if data else "")
            + (f", init: {init}" if init else "")
            + (f", imported from `{src}`" if src else "")
        )
    metrics = rec.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {float(v):.4g} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def export_checkpoint(
    info: ArtifactInfo,
    out: str | Path,
    store: ArtifactStore,
    project: str | Path = ".",
    part: Part = "lm",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ExportOutcome:
    """Write `info` as a HF checkpoint directory at `out` (see the module docstring)."""
    out = Path(out)
    prepare_out(out, force)  # refuse before loading anything
    parts = artifact_parts(info)
    state = load_file(str(info.path / WEIGHTS_FILE))
    if part == "lm":
        if "lm" not in parts:
            raise InteropError(f"{info.ref} holds no LM (parts: {', '.join(sorted(parts))})")
        model_type = lm_model_type(parts["lm"])
        chosen = {"lm": parts["lm"]}
        tensors = _select(state, parts, ("lm",))
    else:
        model_type = "kimi_vl"
        chosen = {k: parts[k] for k in ("vision", "projector", "lm") if k in parts}
        tensors = _select(state, parts, ("vision", "projector", "lm"))
    adapter = adapter_for(model_type)
    tok_dir = checkpoint_tokenizer(info, store, project)
    if model_type == "kimi_vl":  # vLLM finds image slots by media_placeholder_token_id
        hf_config = adapter.hf_from_parts(chosen, token_ids=_kimi_token_ids(tok_dir))
    else:
        hf_config = adapter.hf_from_parts(chosen)
    hf_state = adapter.state_to_hf(tensors, chosen)
    card = model_card(info, store, project, model_type, part)
    written: list[str] = []

    def fill(tmp: Path) -> None:
        names = write_weights(tmp, hf_state, max_shard_bytes)
        cfg = dict(hf_config)
        if tok_dir is not None:
            names += write_tokenizer_files(tok_dir, tmp, cfg, override_ids=model_type != "kimi_vl")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(card)
        written.extend(["config.json", *names, "README.md"])

    final = write_hf_dir(out, fill, force=force)
    return ExportOutcome(final, model_type, tuple(written), None if tok_dir is None else str(tok_dir))

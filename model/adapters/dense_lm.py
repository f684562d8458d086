"""Adapter for dense Hugging Face LMs: Llama (`model_type: llama`) and Qwen2 (`qwen2`).

Both become a MoELM with `attention: mha` and every layer dense (first_k_dense = num_layers; the
MoE fields keep their defaults and are unused), with grouped-query attention
(`num_key_value_heads`), head_dim from config.json or hidden_size / heads, and tied embeddings
when `tie_word_embeddings`. Biases: Qwen2 always has q/k/v biases and no o_proj bias; Llama's
`attention_bias: true` puts biases on all four projections. Export picks the architecture from
the biases the same way: q/k/v biases without an o_proj bias -> Qwen2, anything else -> Llama
(an o_proj bias without q/k/v biases exists in neither and is refused).

What is unusual:
- RoPE layout: HF Llama / Qwen2 rotate half (pairs (i, i + Dh/2)); moonforge rotates adjacent
  pairs. The q_proj / k_proj rows (and their biases) are permuted per head on import and back
  on export (hf_lm.py), which leaves the logits unchanged.
- A tied checkpoint may or may not carry `lm_head.weight` (save_pretrained omits it); transformers
  ties it to embed_tokens whatever it holds, so import ignores it and export writes none.

Refused, naming the key: sliding-window attention (Qwen2 `use_sliding_window: true` or any
`sliding_attention` layer type), `mlp_bias: true`, `hidden_act` other than silu,
`partial_rotary_factor` != 1, RoPE scaling (llama3, yarn, linear, dynamic, ...).
Ignored on import: `*rotary_emb.inv_freq`.

Legend: H query heads, Hkv key/value heads, Dh head dim, D hidden.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from pydantic import BaseModel
from torch import Tensor

from moonforge.model.adapters.base import InteropError
from moonforge.model.adapters.hf_lm import (
    TensorReader,
    config_value,
    halves_from_pairs,
    lm_config,
    lm_state_shapes,
    our_lm_tensors,
    pairs_from_halves,
    permute_rows,
    rope_theta_from_hf,
)
from moonforge.model.config import LMConfig

MODEL_TYPES = ("llama", "qwen2")

# transformers 5.23 LlamaConfig / Qwen2Config defaults for keys a config may omit
_DEFAULTS: dict[str, dict[str, object]] = {
    "llama": {
        "num_key_value_heads": None,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "head_dim": None,
    },
    "qwen2": {
        "num_key_value_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "layer_types": None,
        "head_dim": None,
    },
}


def _model_type(hf_config: Mapping) -> str:
    kind = hf_config.get("model_type")
    if kind not in MODEL_TYPES:
        raise InteropError(f"dense_lm handles model_type llama or qwen2, not {kind!r}")
    return kind


def _refuse_unsupported(kind: str, get) -> None:
    if get("hidden_act") != "silu":
        raise InteropError(
            f"config.json sets hidden_act: {get('hidden_act')!r}; moonforge's FFN is SwiGLU (silu)"
        )
    if kind == "llama" and get("mlp_bias"):
        raise InteropError("config.json sets mlp_bias: true; moonforge's FFN has no biases")
    sliding = kind == "qwen2" and (
        get("use_sliding_window") or "sliding_attention" in (get("layer_types") or ())
    )
    if sliding:
        raise InteropError(
            "config.json enables sliding-window attention (use_sliding_window / "
            "layer_types sliding_attention); moonforge attends to the whole "
            "document, so sliding windows are not implemented"
        )


def parts_from_hf(hf_config: Mapping) -> dict[str, BaseModel]:
    """{"lm": LMConfig} of a Llama or Qwen2 config.json dict."""
    kind = _model_type(hf_config)
    get = lambda key: config_value(hf_config, key, _DEFAULTS[kind])  # noqa: E731
    _refuse_unsupported(kind, get)
    heads, hidden = get("num_attention_heads"), get("hidden_size")
    num_layers = get("num_hidden_layers")
    kv_heads = get("num_key_value_heads") or heads
    bias = kind == "qwen2" or bool(get("attention_bias"))
    return {
        "lm": lm_config(
            f"config.json ({kind})",
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            attention="mha",
            head_dim=get("head_dim") or hidden // heads,
            num_kv_heads=None if kv_heads == heads else kv_heads,
            attention_bias=bias,
            attention_out_bias=kind == "llama" and bias,
            first_k_dense=num_layers,
            dense_intermediate_size=get("intermediate_size"),
            rope_theta=rope_theta_from_hf(hf_config),
            max_position_embeddings=get("max_position_embeddings"),
            rms_norm_eps=get("rms_norm_eps"),
            tie_word_embeddings=get("tie_word_embeddings"),
        )
    }


def _hf_name(key: str) -> str:
    return key if key == "lm_head.weight" else "model." + key


def _rotary_rows(key: str, t: Tensor, lm: LMConfig, order_for) -> Tensor:
    """q_proj / k_proj weights and biases with each head's rows reordered by order_for(Dh)."""
    for proj, heads in (("q_proj", lm.num_heads), ("k_proj", lm.num_kv_heads or lm.num_heads)):
        if key.endswith((f"self_attn.{proj}.weight", f"self_attn.{proj}.bias")):
            return permute_rows(t, heads, 0, order_for(lm.head_dim))
    return t


def state_from_hf(
    hf_state: Mapping[str, Tensor], parts: Mapping[str, BaseModel], hf_config: Mapping
) -> dict[str, Tensor]:
    """Our "lm."-prefixed state from Llama / Qwen2 tensors (q/k rows to adjacent rope pairs)."""
    lm = cast(LMConfig, parts["lm"])
    reader = TensorReader(hf_state)
    out = {
        "lm." + key: _rotary_rows(key, reader.get(_hf_name(key), shape), lm, pairs_from_halves)
        for key, shape in lm_state_shapes(lm).items()
    }
    if lm.tie_word_embeddings:
        reader.skip("lm_head.weight")  # transformers ties it to embed_tokens whatever it holds
    reader.finish(lambda name: name.endswith("rotary_emb.inv_freq"))
    return out


def _export_kind(lm: LMConfig) -> str:
    if lm.attention != "mha":
        raise InteropError("llama / qwen2 export needs attention: mha; an MLA LM exports as deepseek_v3")
    if lm.first_k_dense < lm.num_layers:
        raise InteropError(
            f"the LM has {lm.num_layers - lm.first_k_dense} MoE layers "
            f"(first_k_dense={lm.first_k_dense} < num_layers={lm.num_layers}); "
            "Llama / Qwen2 are dense"
        )
    if lm.attention_out_bias and not lm.attention_bias:
        raise InteropError("an o_proj bias without q/k/v biases exists in neither Llama nor Qwen2")
    return "qwen2" if lm.attention_bias and not lm.attention_out_bias else "llama"


def hf_from_parts(parts: Mapping[str, BaseModel]) -> dict:
    """The config.json transformers 5.23 writes for LlamaForCausalLM / Qwen2ForCausalLM of this
    shape (Qwen2 when the LM has q/k/v biases but no o_proj bias). Special-token ids are left null
    (the exporter sets them from the tokenizer); dtype is float32, moonforge's checkpoint dtype."""
    lm = cast(LMConfig, parts["lm"])
    kind = _export_kind(lm)
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"],
        "model_type": kind,
        "vocab_size": lm.vocab_size,
        "hidden_size": lm.hidden_size,
        "intermediate_size": lm.dense_intermediate_size,
        "num_hidden_layers": lm.num_layers,
        "num_attention_heads": lm.num_heads,
        "num_key_value_heads": lm.num_kv_heads or lm.num_heads,
        "head_dim": lm.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": lm.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": lm.rms_norm_eps,
        "use_cache": True,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
        "tie_word_embeddings": lm.tie_word_embeddings,
        "rope_parameters": {"rope_theta": lm.rope_theta, "rope_type": "default"},
        "attention_dropout": 0.0,
        "dtype": "float32",
    }
    if kind == "llama":
        cfg.update(attention_bias=lm.attention_bias, mlp_bias=False, pretraining_tp=1)
    else:
        cfg.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=lm.num_layers,
            layer_types=["full_attention"] * lm.num_layers,
        )
    return cfg


def state_to_hf(state: Mapping[str, Tensor], parts: Mapping[str, BaseModel]) -> dict[str, Tensor]:
    """Llama / Qwen2 tensors (rotate-half q/k rows) from our "lm." state; a tied LM writes no
    lm_head.weight, as save_pretrained does."""
    lm = cast(LMConfig, parts["lm"])
    _export_kind(lm)
    return {
        _hf_name(key): _rotary_rows(key, t, lm, halves_from_pairs) for key, t in our_lm_tensors(state, lm)
    }

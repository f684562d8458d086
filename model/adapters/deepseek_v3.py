"""Adapter for transformers' DeepseekV3 (`model_type: deepseek_v3`): Moonlight, DeepSeek-V3, and
Kimi-VL's `text_config` (which has the same keys but no model_type).

moonforge's MoELM with `attention: mla` is this architecture, and its parameter names are the HF
names without the `model.` prefix, so the mapping is mostly a rename. What it translates:
- experts: moonforge stacks them (`mlp.experts.gate_up` [E, 2F, D], gate rows first, and
  `mlp.experts.down` [E, D, F]: model/experts.py), as transformers 5 does in memory
  (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, the same layout); files hold per-expert
  `mlp.experts.N.{gate,up,down}_proj.weight`. Both import (stacked bit for bit); export writes
  per-expert names.
- RoPE: the rope rows on disk (per head in q_proj / q_b_proj, and the last qk_rope_head_dim rows
  of kv_a_proj_with_mqa) are interleaved pairs when `rope_interleave: true` (the default), which
  is moonforge's own layout: no permutation (the parity test proves it). With
  `rope_interleave: false` they are rotate-half and are permuted on import. Export always writes
  interleaved rows and `rope_interleave: true`.
- `e_score_correction_bias` is kept in fp32 both ways.
- The latent RMSNorms (kv_a_layernorm, q_a_layernorm) use eps 1e-6 in transformers whatever
  `rms_norm_eps` says; an import sets `latent_norm_eps: 1e-6` to match. A moonforge-trained LM
  exported with another latent eps differs from transformers' forward by that eps alone (vLLM
  uses rms_norm_eps there).

Ignored on import: `*rotary_emb.inv_freq` (derived, not learned) and the multi-token-prediction
layers `model.layers.{num_hidden_layers + i}.*` that `num_nextn_predict_layers` declares
(moonforge does not implement MTP; export writes none). Refused, naming the key: `topk_method`
other than noaux_tc, `scoring_func` other than sigmoid, `moe_layer_freq` != 1, `hidden_act` other
than silu, `attention_bias`, `qk_nope_head_dim` != `v_head_dim`, RoPE scaling (yarn, ...).
Group-limited routing (`n_group`, `topk_group`) is implemented (num_expert_groups /
num_topk_groups).

Legend: E routed experts, F expert width, D hidden, H heads, Dn nope/v head dim, Dr rope dims,
R kv_lora_rank.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import cast

import torch
from pydantic import BaseModel
from torch import Tensor

from moonforge.model.adapters.base import InteropError
from moonforge.model.adapters.hf_lm import (
    TensorReader,
    config_value,
    lm_config,
    lm_state_shapes,
    our_lm_tensors,
    pairs_from_halves,
    permute_rows,
    rope_theta_from_hf,
)
from moonforge.model.config import LMConfig
from moonforge.model.experts import split_expert_state

MODEL_TYPES = ("deepseek_v3",)

HF_LATENT_NORM_EPS = 1e-6
"""transformers' DeepseekV3RMSNorm default, used by kv_a_layernorm / q_a_layernorm."""

_DEFAULTS = {  # transformers 5.23 DeepseekV3Config defaults, for keys a config.json may omit
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "attention_bias": False,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 0,
}
_REQUIRED_VALUES = {
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "moe_layer_freq": 1,
    "hidden_act": "silu",
    "attention_bias": False,
}
_STACKED = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up|down)")


def _value(hf_config: Mapping, key: str):
    return config_value(hf_config, key, _DEFAULTS)


def _refuse_unsupported(hf_config: Mapping) -> None:
    for key, want in _REQUIRED_VALUES.items():
        got = _value(hf_config, key)
        if got != want:
            raise InteropError(
                f"config.json sets {key}: {got!r}; moonforge implements only "
                f"{key}: {want!r} (DeepSeek-V3 / Moonlight)"
            )
    nope, v = _value(hf_config, "qk_nope_head_dim"), _value(hf_config, "v_head_dim")
    if nope != v:
        raise InteropError(
            f"config.json has qk_nope_head_dim={nope} != v_head_dim={v}; "
            "moonforge's MLA uses one head_dim for both"
        )


def parts_from_hf(hf_config: Mapping) -> dict[str, BaseModel]:
    """{"lm": LMConfig} of a DeepseekV3 config.json (or Kimi-VL text_config) dict."""
    _refuse_unsupported(hf_config)
    get = lambda key: _value(hf_config, key)  # noqa: E731
    num_layers = get("num_hidden_layers")
    return {
        "lm": lm_config(
            "config.json (deepseek_v3)",
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            num_layers=num_layers,
            num_heads=get("num_attention_heads"),
            attention="mla",
            head_dim=get("v_head_dim"),
            kv_lora_rank=get("kv_lora_rank"),
            q_lora_rank=get("q_lora_rank"),
            latent_norm_eps=HF_LATENT_NORM_EPS,
            qk_rope_head_dim=get("qk_rope_head_dim"),
            first_k_dense=min(get("first_k_dense_replace"), num_layers),
            dense_intermediate_size=get("intermediate_size"),
            num_experts=get("n_routed_experts"),
            num_experts_per_tok=get("num_experts_per_tok"),
            num_shared_experts=get("n_shared_experts") or 0,
            moe_intermediate_size=get("moe_intermediate_size"),
            routed_scaling_factor=get("routed_scaling_factor"),
            norm_topk_prob=get("norm_topk_prob"),
            num_expert_groups=get("n_group") or 1,
            num_topk_groups=get("topk_group") or 1,
            rope_theta=rope_theta_from_hf(hf_config),
            max_position_embeddings=get("max_position_embeddings"),
            rms_norm_eps=get("rms_norm_eps"),
            tie_word_embeddings=get("tie_word_embeddings"),
        )
    }


def _hf_name(key: str) -> str:
    return key if key == "lm_head.weight" else "model." + key


def _pairs_from_halves(key: str, t: Tensor, lm: LMConfig) -> Tensor:
    """Rotate-half rope rows (rope_interleave: false) to adjacent pairs: per head in q_proj /
    q_b_proj, and the tail of kv_a_proj_with_mqa (the one shared rope key)."""
    order = pairs_from_halves(lm.qk_rope_head_dim)
    if key.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        return permute_rows(t, lm.num_heads, lm.head_dim, order)
    if key.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        return permute_rows(t, 1, lm.kv_lora_rank, order)
    return t


def _stacked_experts(reader: TensorReader, lm: LMConfig, layer: int, kind: str, fused: bool) -> Tensor:
    """Our stacked `gate_up` [E, 2F, D] or `down` [E, D, F] of one layer, from transformers 5's
    fused tensors (the same layout) or from the per-expert tensors of a file."""
    E, F, D = lm.num_experts, lm.moe_intermediate_size, lm.hidden_size
    prefix = f"model.layers.{layer}.mlp.experts."
    if fused:
        return (
            reader.get(prefix + "gate_up_proj", (E, 2 * F, D))
            if kind == "gate_up"
            else reader.get(prefix + "down_proj", (E, D, F))
        )
    if kind == "down":
        return torch.stack([reader.get(f"{prefix}{e}.down_proj.weight", (D, F)) for e in range(E)])
    return torch.stack(
        [
            torch.cat(
                [
                    reader.get(f"{prefix}{e}.gate_proj.weight", (F, D)),
                    reader.get(f"{prefix}{e}.up_proj.weight", (F, D)),
                ]
            )
            for e in range(E)
        ]
    )


def _ignorable(num_layers: int, num_mtp: int):
    mtp = re.compile(r"model\.layers\.(\d+)\.")

    def ignorable(name: str) -> bool:
        m = mtp.match(name)
        is_mtp = m is not None and num_layers <= int(m.group(1)) < num_layers + num_mtp
        return name.endswith("rotary_emb.inv_freq") or is_mtp

    return ignorable


def state_from_hf(
    hf_state: Mapping[str, Tensor], parts: Mapping[str, BaseModel], hf_config: Mapping
) -> dict[str, Tensor]:
    """Our "lm."-prefixed state from DeepseekV3 tensors (per-expert or fused experts)."""
    lm = cast(LMConfig, parts["lm"])
    reader = TensorReader(hf_state)
    interleaved = _value(hf_config, "rope_interleave")
    out: dict[str, Tensor] = {}
    for key, shape in lm_state_shapes(lm).items():
        m = _STACKED.fullmatch(key)
        if m:
            fused = f"model.layers.{m[1]}.mlp.experts.gate_up_proj" in hf_state
            t = _stacked_experts(reader, lm, int(m[1]), m[2], fused)
        else:
            t = reader.get(_hf_name(key), shape)
        if key.endswith("e_score_correction_bias"):
            t = t.float()
        elif not interleaved:
            t = _pairs_from_halves(key, t, lm)
        out["lm." + key] = t
    if lm.tie_word_embeddings:
        reader.skip("lm_head.weight")  # transformers ties it to embed_tokens whatever it holds
    reader.finish(_ignorable(lm.num_layers, _value(hf_config, "num_nextn_predict_layers") or 0))
    return out


def hf_from_parts(parts: Mapping[str, BaseModel]) -> dict:
    """The config.json transformers 5.23 writes for DeepseekV3ForCausalLM of this shape, plus
    the keys vLLM needs (topk_method, scoring_func). Special-token ids are left null (the
    exporter sets them from the tokenizer); dtype is float32, moonforge's checkpoint dtype (an
    exporter that casts the tensors sets its own)."""
    lm = cast(LMConfig, parts["lm"])
    if lm.attention != "mla":
        raise InteropError(
            "deepseek_v3 export needs attention: mla; a dense mha LM exports as llama / qwen2 (dense_lm)"
        )
    if lm.attention_out_bias:
        raise InteropError(
            "attention_out_bias has no DeepseekV3 equivalent (its attention_bias "
            "would also add q_a / kv_a biases); export is not possible"
        )
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": lm.vocab_size,
        "hidden_size": lm.hidden_size,
        "intermediate_size": lm.dense_intermediate_size,
        "moe_intermediate_size": lm.moe_intermediate_size,
        "num_hidden_layers": lm.num_layers,
        "num_attention_heads": lm.num_heads,
        "num_key_value_heads": lm.num_heads,
        "n_shared_experts": lm.num_shared_experts,
        "n_routed_experts": lm.num_experts,
        "routed_scaling_factor": lm.routed_scaling_factor,
        "kv_lora_rank": lm.kv_lora_rank,
        "q_lora_rank": lm.q_lora_rank,
        "qk_rope_head_dim": lm.qk_rope_head_dim,
        "v_head_dim": lm.head_dim,
        "qk_nope_head_dim": lm.head_dim,
        "qk_head_dim": lm.head_dim + lm.qk_rope_head_dim,
        "n_group": lm.num_expert_groups,
        "topk_group": min(lm.num_topk_groups, lm.num_expert_groups),
        "num_experts_per_tok": lm.num_experts_per_tok,
        "first_k_dense_replace": lm.first_k_dense,
        "norm_topk_prob": lm.norm_topk_prob,
        "hidden_act": "silu",
        "max_position_embeddings": lm.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": lm.rms_norm_eps,
        "use_cache": True,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
        "pretraining_tp": 1,
        "tie_word_embeddings": lm.tie_word_embeddings,
        "rope_parameters": {"rope_theta": lm.rope_theta, "rope_type": "default"},
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_nextn_predict_layers": 0,
        "output_router_logits": False,
        "dtype": "float32",
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "moe_layer_freq": 1,
    }


def state_to_hf(state: Mapping[str, Tensor], parts: Mapping[str, BaseModel]) -> dict[str, Tensor]:
    """DeepseekV3 tensors (per-expert names, interleaved rope rows) from our "lm." state; a tied
    LM writes no lm_head.weight, as save_pretrained does."""
    lm = cast(LMConfig, parts["lm"])
    out: dict[str, Tensor] = {}
    tensors = dict(our_lm_tensors(state, lm))
    for key, t in tensors.items():
        m = _STACKED.fullmatch(key)
        if m and m[2] == "gate_up":
            prefix = f"model.layers.{m[1]}.mlp.experts."
            for e, kind, w in split_expert_state(t, tensors[key.replace("gate_up", "down")]):
                out[f"{prefix}{e}.{kind}_proj.weight"] = w
        elif not m:
            out[_hf_name(key)] = t.float() if key.endswith("e_score_correction_bias") else t
    return out

"""Kimi-VL (`model_type: kimi_vl`, KimiVLForConditionalGeneration) <-> the whole VLM: parts vision,
projector and lm, in the published layout that vLLM loads natively.

Our model is shaped after Kimi-VL, so most of the vision tower and the projector map 1:1 by name:
- `vision_tower.patch_embed.proj` is a Conv2d [D, 3, p, p]; ours is the same weight as a Linear
  over the channel-major flattened patch, [D, 3*p*p] (a reshape, no permutation);
- `vision_tower.patch_embed.pos_emb.weight` is (H, W, C) = our (G, G, D) grid, interpolated the
  same way (bicubic, align_corners False); the published grid is square (64 x 64) and so is ours;
- `vision_tower.encoder.blocks.N.{wqkv, wo, norm0, norm1, mlp.fc0, mlp.fc1}`: `wqkv` is fused
  [Q; K; V], each head-major, exactly our fused layout; our fc0/fc1 sit on the block itself;
- `vision_tower.encoder.final_layernorm` = our final_norm;
- `multi_modal_projector.{pre_norm, linear_1, linear_2}` = our projector (LayerNorm per sub-patch
  before the m x m concat, exact GELU);
- `language_model.model.*` / `language_model.lm_head.weight`: DeepSeek-V3 names, translated by
  the deepseek_v3 adapter with the `language_model.` prefix stripped / added here. The hub's
  per-layer `rotary_emb.inv_freq` buffers are ignored on import and never written.

What the layout cannot say, and how we deal with it:
- MoonViT's LayerNorm eps is PyTorch's default 1e-5 in the published code (hard-wired, no config
  key), as is the projector's. Import records 1e-5 in VisionConfig / ProjectorConfig; export writes
  our values as extra keys (`vision_config.layer_norm_eps`, `projector_layer_norm_eps`, ignored by
  vLLM, read back by us), so a SigLIP-initialised tower (1e-6) round-trips exactly here and runs
  with vLLM's 1e-5 there. Likewise `vision_config.temporal_merge_size` when it is above 1 (video
  only: vLLM reads a video as frames, so its clips never match ours whatever k is).
- 2-D RoPE (theta 10000) is always on in MoonViT: a tower with use_rope false or another
  rope_theta, a projector hidden width other than m*m*C, an LM that is not DeepSeek-V3 shaped
  (MLA attention) or whose lm_head is tied cannot be expressed and is refused with InteropError.
- `max_patches` (per-image patch budget) is the image processor's business, not config.json's:
  import sets max(4096, G*G), 4096 being Kimi-VL's published `in_token_limit`.
- Token ids depend on the tokenizer: `hf_from_parts(parts, token_ids)` writes the given ones, else
  Kimi-VL's published ids when the vocabulary is Kimi's (163840 rows), else none.

Legend: D vision width, p patch side, G pos-grid side, I vision MLP width, m merge size,
C_in = m*m*D projector input, F projector hidden, E LM width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from pydantic import BaseModel, ValidationError
from torch import Tensor

from moonforge.model.adapters import deepseek_v3
from moonforge.model.adapters.base import InteropError, expect_shape, take
from moonforge.model.adapters.siglip import make_vision_config, our_tensor
from moonforge.model.config import LMConfig, ProjectorConfig, VisionConfig

MODEL_TYPES = ("kimi_vl",)
VISION, PROJECTOR, LM = "vision_tower.", "multi_modal_projector.", "language_model."
INV_FREQ = "rotary_emb.inv_freq"
MOONVIT_EPS = 1e-5
"""nn.LayerNorm's default, which the published MoonViT and projector use (no config key)."""
MOONVIT_ROPE_THETA = 10000.0
KIMI_VOCAB_SIZE = 163840
KIMI_TOKEN_IDS = {
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "pad_token_id": 163839,
    "media_placeholder_token_id": 163605,
}
"""The published Kimi-VL ids, written when the vocabulary is Kimi's and no ids are given."""
TOKEN_ID_KEYS = tuple(KIMI_TOKEN_IDS)
IGNORE_INDEX = -100


def _vision_tensors(cfg: VisionConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(our name, Kimi-VL name, shape) for every vision tensor except the patch Conv2d."""
    D, I, G = cfg.hidden_size, cfg.intermediate_size, cfg.pos_grid
    rows = [
        ("vision.patch_embed.bias", VISION + "patch_embed.proj.bias", (D,)),
        ("vision.pos_emb.weight", VISION + "patch_embed.pos_emb.weight", (G, G, D)),
    ]
    leaves = [
        ("norm0", "norm0", (D,), (D,)),
        ("norm1", "norm1", (D,), (D,)),
        ("wqkv", "wqkv", (3 * D, D), (3 * D,)),
        ("wo", "wo", (D, D), (D,)),
        ("fc0", "mlp.fc0", (I, D), (I,)),
        ("fc1", "mlp.fc1", (D, I), (D,)),
    ]
    for i in range(cfg.num_layers):
        for ours, hf, w_shape, b_shape in leaves:
            for t, shape in (("weight", w_shape), ("bias", b_shape)):
                rows.append((f"vision.blocks.{i}.{ours}.{t}", f"{VISION}encoder.blocks.{i}.{hf}.{t}", shape))
    rows += [
        (f"vision.final_norm.{t}", f"{VISION}encoder.final_layernorm.{t}", (D,)) for t in ("weight", "bias")
    ]
    return rows


def _projector_tensors(
    vision: VisionConfig, projector: ProjectorConfig, lm_hidden: int
) -> list[tuple[str, str, tuple[int, ...]]]:
    """(our name, Kimi-VL name, shape) for the projector."""
    D, C_in = vision.hidden_size, vision.merge_size**2 * vision.hidden_size
    F = projector.hidden_size or C_in
    shapes = {
        "pre_norm": ((D,), (D,)),
        "linear_1": ((F, C_in), (F,)),
        "linear_2": ((lm_hidden, F), (lm_hidden,)),
    }
    return [
        (f"projector.{name}.{t}", f"{PROJECTOR}{name}.{t}", shape)
        for name, (w_shape, b_shape) in shapes.items()
        for t, shape in (("weight", w_shape), ("bias", b_shape))
    ]


def _square(name: str, value) -> int:
    """An int, or the side of a square [s, s] pair; InteropError for a rectangle."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise InteropError(
                f"Kimi-VL vision_config.{name}={list(value)} is not square; "
                "moonforge's MoonViT supports square patches, grids and merges"
            )
        value = value[0]
    return int(value)


def text_config_as_hf(hf_config: Mapping) -> dict:
    """The `text_config` as a standalone DeepSeek-V3 config.json dict (model_type added, the
    top-level vocab_size filled in when text_config lacks it)."""
    tc = dict(hf_config.get("text_config") or {})
    if not tc:
        raise InteropError("Kimi-VL config.json has no text_config; the checkpoint is incomplete")
    top, own = hf_config.get("vocab_size"), tc.get("vocab_size")
    if top is not None and own is not None and top != own:
        raise InteropError(
            f"Kimi-VL config.json has vocab_size={top} but text_config.vocab_size={own}; make them agree"
        )
    if own is None and top is not None:
        tc["vocab_size"] = top
    return {**tc, "model_type": "deepseek_v3"}


def parts_from_hf(hf_config: Mapping) -> dict[str, BaseModel]:
    """{"vision", "projector", "lm"} shape configs from a Kimi-VL config.json dict.

    MoonViT: pos_grid = init_pos_emb_height (must equal the width), merge_size from
    merge_kernel_size (square), LayerNorm eps 1e-5 unless our own export recorded another,
    rope_theta 10000. Projector: hidden = m*m*D (None), eps 1e-5. LM: the deepseek_v3 adapter on
    text_config. Raises InteropError for what MoonViT cannot represent.
    """
    vc = hf_config.get("vision_config") or {}
    if vc.get("model_type", "moonvit") != "moonvit":
        raise InteropError(
            f"Kimi-VL vision_config.model_type is {vc['model_type']!r}; only 'moonvit' is supported"
        )
    height, width = vc.get("init_pos_emb_height", 64), vc.get("init_pos_emb_width", 64)
    if height != width:
        raise InteropError(
            f"Kimi-VL pos-emb grid is {height} x {width}; moonforge's MoonViT grid "
            "is square (resample it to a square grid first)"
        )
    vision = make_vision_config(
        patch_size=_square("patch_size", vc.get("patch_size", 14)),
        hidden_size=vc.get("hidden_size", 1152),
        num_layers=vc.get("num_hidden_layers", 27),
        num_heads=vc.get("num_attention_heads", 16),
        intermediate_size=vc.get("intermediate_size", 4304),
        pos_grid=height,
        rope_theta=MOONVIT_ROPE_THETA,
        use_rope=True,
        merge_size=_square("merge_kernel_size", vc.get("merge_kernel_size", [2, 2])),
        max_patches=max(VisionConfig().max_patches, height * width),
        layer_norm_eps=vc.get("layer_norm_eps", MOONVIT_EPS),
        temporal_merge_size=vc.get("temporal_merge_size", 1),
    )
    try:
        projector = ProjectorConfig(
            hidden_size=None, layer_norm_eps=hf_config.get("projector_layer_norm_eps", MOONVIT_EPS)
        )
    except ValidationError as e:
        raise InteropError(f"Kimi-VL projector_layer_norm_eps is invalid: {e}") from None
    lm = deepseek_v3.parts_from_hf(text_config_as_hf(hf_config))["lm"]
    return {"vision": vision, "projector": projector, "lm": lm}


def _vision_projector_from_hf(
    hf_state: Mapping[str, Tensor], parts: Mapping[str, BaseModel]
) -> tuple[dict[str, Tensor], set[str]]:
    vision = cast(VisionConfig, parts["vision"])
    D, p = vision.hidden_size, vision.patch_size
    name = VISION + "patch_embed.proj.weight"
    out = {
        "vision.patch_embed.weight": expect_shape(name, take(hf_state, name), (D, 3, p, p)).reshape(
            D, 3 * p * p
        )
    }
    used = {name}
    projector = cast(ProjectorConfig, parts["projector"])
    lm = cast(LMConfig, parts["lm"])
    rows = _vision_tensors(vision) + _projector_tensors(vision, projector, lm.hidden_size)
    for ours, hf, shape in rows:
        out[ours] = expect_shape(hf, take(hf_state, hf), shape)
        used.add(hf)
    return out, used


def state_from_hf(
    hf_state: Mapping[str, Tensor], parts: Mapping[str, BaseModel], hf_config: Mapping
) -> dict[str, Tensor]:
    """Our "vision." / "projector." / "lm."-prefixed state from a Kimi-VL checkpoint's tensors
    (dtypes kept). Raises InteropError naming a missing tensor, a wrong shape (both shapes), or
    vision / projector / unprefixed tensors this mapping does not know."""
    out, used = _vision_projector_from_hf(hf_state, parts)
    unknown = sorted(k for k in hf_state if k not in used and not k.startswith(LM))
    if unknown:
        raise InteropError(
            f"Kimi-VL checkpoint has {len(unknown)} tensors outside the published "
            f"layout (e.g. {unknown[:3]}); is it another architecture or version?"
        )
    lm_hf = {k[len(LM) :]: v for k, v in hf_state.items() if k.startswith(LM) and not k.endswith(INV_FREQ)}
    lm = deepseek_v3.state_from_hf(lm_hf, {"lm": parts["lm"]}, text_config_as_hf(hf_config))
    return {**out, **lm}


def check_exportable(parts: Mapping[str, BaseModel]) -> None:
    """InteropError when the shapes have no Kimi-VL expression (named, with the reason)."""
    vision = cast(VisionConfig, parts["vision"])
    projector = cast(ProjectorConfig, parts["projector"])
    lm = cast(LMConfig, parts["lm"])
    if lm.attention != "mla":
        ffn = (
            "a dense SwiGLU FFN in every layer"
            if lm.first_k_dense >= lm.num_layers
            else f"{lm.num_experts}-expert MoE FFNs"
        )
        kv = lm.num_kv_heads or lm.num_heads
        raise InteropError(
            f"the LM has {lm.attention!r} attention ({lm.num_heads} query / {kv} key-value heads, "
            f"Llama / Qwen2 style) and {ffn}; Kimi-VL's text model is DeepSeek-V3 (MLA attention, "
            "MoE FFN), so this VLM cannot be exported as kimi_vl (export the LM as its own format)"
        )
    if lm.tie_word_embeddings:
        raise InteropError(
            "the LM ties lm_head to embed_tokens; Kimi-VL's lm_head is a separate "
            "tensor (tie_word_embeddings false), so untie it before exporting"
        )
    deepseek_v3.hf_from_parts({"lm": lm})  # the LM adapter's own refusals (named) apply too
    if not vision.use_rope or vision.rope_theta != MOONVIT_ROPE_THETA:
        raise InteropError(
            f"vision use_rope={vision.use_rope}, rope_theta={vision.rope_theta}: Kimi-VL's MoonViT "
            f"always applies 2-D RoPE with theta {MOONVIT_ROPE_THETA:g}, so this tower would "
            "compute differently there; export it as siglip_vision_model instead"
        )
    C_in = vision.merge_size**2 * vision.hidden_size
    if projector.hidden_size not in (None, C_in):
        raise InteropError(
            f"projector.hidden_size={projector.hidden_size}: Kimi-VL's projector hidden width is "
            f"merge_size**2 * vision.hidden_size = {C_in}; set projector.hidden_size to null"
        )


def hf_from_parts(parts: Mapping[str, BaseModel], token_ids: Mapping[str, int] | None = None) -> dict:
    """The Kimi-VL config.json dict vLLM's KimiVLForConditionalGeneration loads (no auto_map).

    `token_ids`: any of bos_token_id, eos_token_id, pad_token_id, media_placeholder_token_id from
    the tokenizer that goes with the weights; None writes Kimi-VL's published ids when
    lm.vocab_size is Kimi's 163840, else no ids (the caller must then add
    media_placeholder_token_id: vLLM defaults it to 163605). Raises InteropError (check_exportable).
    """
    check_exportable(parts)
    vision = cast(VisionConfig, parts["vision"])
    lm = cast(LMConfig, parts["lm"])
    text = {
        k: v
        for k, v in deepseek_v3.hf_from_parts({"lm": lm}).items()
        if k not in ("model_type", "architectures", "auto_map", "transformers_version")
    }
    text.setdefault("topk_method", "noaux_tc")  # vLLM makes the router bias only for noaux_tc
    text.setdefault("scoring_func", "sigmoid")  # vLLM defaults to softmax
    if "rope_theta" not in text:  # transformers 5 writes rope_parameters; older readers want this
        text["rope_theta"] = lm.rope_theta
    if token_ids is None:
        token_ids = KIMI_TOKEN_IDS if lm.vocab_size == KIMI_VOCAB_SIZE else {}
    bad = sorted(set(token_ids) - set(TOKEN_ID_KEYS))
    if bad:
        raise InteropError(f"unknown token id keys {bad}; use {', '.join(TOKEN_ID_KEYS)}")
    return {
        "model_type": "kimi_vl",
        "architectures": ["KimiVLForConditionalGeneration"],
        "vision_config": {
            "model_type": "moonvit",
            "patch_size": vision.patch_size,
            "init_pos_emb_height": vision.pos_grid,
            "init_pos_emb_width": vision.pos_grid,
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_layers,
            "num_attention_heads": vision.num_heads,
            "intermediate_size": vision.intermediate_size,
            "merge_kernel_size": [vision.merge_size, vision.merge_size],
            "layer_norm_eps": vision.layer_norm_eps,
            # ours, for video; written only when set, so a plain tower's config is the published one
            **({"temporal_merge_size": vision.temporal_merge_size} if vision.temporal_merge_size > 1 else {}),
        },
        "text_config": text,
        "vocab_size": lm.vocab_size,
        "tie_word_embeddings": False,
        "ignore_index": IGNORE_INDEX,
        "projector_layer_norm_eps": cast(ProjectorConfig, parts["projector"]).layer_norm_eps,
        **dict(token_ids),
    }


def state_to_hf(state: Mapping[str, Tensor], parts: Mapping[str, BaseModel]) -> dict[str, Tensor]:
    """Kimi-VL tensors (published names and layout) from our prefixed state; the caption towers
    ("caption.") are stage-1 only and not exported. Raises InteropError (check_exportable, or a
    missing / wrong-shaped tensor named)."""
    check_exportable(parts)
    vision = cast(VisionConfig, parts["vision"])
    D, p = vision.hidden_size, vision.patch_size
    patch_DP = our_tensor(state, "vision.patch_embed.weight", (D, 3 * p * p))
    out = {VISION + "patch_embed.proj.weight": patch_DP.reshape(D, 3, p, p).contiguous()}
    projector = cast(ProjectorConfig, parts["projector"])
    lm = cast(LMConfig, parts["lm"])
    rows = _vision_tensors(vision) + _projector_tensors(vision, projector, lm.hidden_size)
    for ours, hf, shape in rows:
        out[hf] = our_tensor(state, ours, shape)
    lm_state = {k: v for k, v in state.items() if k.startswith("lm.")}
    lm_hf = deepseek_v3.state_to_hf(lm_state, {"lm": parts["lm"]})
    out.update({LM + k: v for k, v in lm_hf.items()})
    return out

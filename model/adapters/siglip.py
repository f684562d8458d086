"""SigLIP vision tower (transformers `SiglipVisionModel`) <-> MoonViT, our keys prefixed "vision.".

Kimi-VL's MoonViT was initialised from SigLIP-SO-400M and then continually pretrained with 2-D
RoPE added; this adapter is that initialisation. The imported VisionConfig keeps `use_rope: true`
(the recipe's MoonViT is RoPE-based and learns to use it); set `use_rope: false` to get a plain ViT
that computes exactly SigLIP's `last_hidden_state` (the parity test does so).

Layout facts (checked against transformers' modeling_siglip.py):
- `embeddings.patch_embedding` is a Conv2d [D, 3, p, p] with kernel = stride = p. Our patch
  embedding is a Linear over the flattened (3, p, p) patch, channel-major, so its weight is the
  Conv2d weight reshaped to [D, 3*p*p] (no transpose, no channel permutation).
- `embeddings.position_embedding.weight` [G*G, D] is a row-major G x G grid (no CLS token,
  position ids 0..G*G-1) -> our (G, G, D) grid with pos_grid = G, SigLIP's own grid. Moving to
  another grid side is a separate, explicit step: `resample_pos_grid` (bicubic, align_corners
  False: what MoonViT's PosEmbGrid and SigLIP's `interpolate_pos_encoding` both do).
- q/k/v_proj (each [D, D], rows head-major) are fused into `wqkv` as [Q; K; V], biases too;
  attention scale head_dim ** -0.5 on both sides; out_proj -> wo.
- pre-LN blocks: layer_norm1 -> norm0, layer_norm2 -> norm1, mlp.fc1 -> fc0, mlp.fc2 -> fc1;
  `post_layernorm` is applied to `last_hidden_state` -> final_norm. eps (`layer_norm_eps`, 1e-6
  by default) is carried over; the MLP must be GELU-tanh (`gelu_pytorch_tanh`), others refused.
Dropped on import: the attention-pooling `head.*` (MoonViT feeds every patch to the projector; no
pooled embedding) and, for a full `SiglipModel` checkpoint (`model_type: siglip`, tower under
`vision_model.`), the whole text tower and logit scale/bias. Export writes a bare
`siglip_vision_model` without a head (`vision_use_head: false`).

Legend: D hidden, p patch side, G pos-grid side, I MLP width, L layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError
from torch import Tensor

from moonforge.model.adapters.base import InteropError, expect_shape, take
from moonforge.model.config import VisionConfig

MODEL_TYPES = ("siglip", "siglip_vision_model")

VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
"""transformers' SiglipVisionConfig defaults: a saved config.json omits keys left at default."""

GELU_TANH = "gelu_pytorch_tanh"
DROPPED_PREFIXES = ("head.",)
"""Tower tensors deliberately not imported (attention-pooling head)."""
IGNORED_NAMES = ("embeddings.position_ids",)
"""Non-persistent buffers that old checkpoints sometimes saved."""
FULL_MODEL_PREFIX = "vision_model."


def vision_config_dict(hf_config: Mapping) -> dict:
    """The SiglipVisionConfig dict (defaults filled in) of a `siglip_vision_model` config or of a
    full `siglip` config's `vision_config` (its `text_config` is ignored)."""
    if hf_config.get("model_type") == "siglip" or "vision_config" in hf_config:
        vc = hf_config.get("vision_config") or {}
    else:
        vc = hf_config
    return {**VISION_DEFAULTS, **{k: v for k, v in vc.items() if v is not None}}


def _side(name: str, value) -> int:
    """An int, or a square [s, s] list as transformers allows for image_size / patch_size."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise InteropError(
                f"SigLIP {name}={list(value)} is not square; MoonViT's patches and position grid are square"
            )
        value = value[0]
    return int(value)


def make_vision_config(**fields) -> VisionConfig:
    """VisionConfig(**fields), with a validation failure re-raised as InteropError."""
    try:
        return VisionConfig(**fields)
    except ValidationError as e:
        raise InteropError(f"the checkpoint's vision shape cannot be a MoonViT: {e}") from None


def parts_from_hf(hf_config: Mapping) -> dict[str, BaseModel]:
    """{"vision": VisionConfig} with SigLIP's own grid (pos_grid = image_size / patch_size),
    use_rope True, merge_size 2 and max_patches large enough for that grid.

    Raises InteropError for an activation other than gelu_pytorch_tanh (named), channels != 3,
    or a non-square image/patch size.
    """
    vc = vision_config_dict(hf_config)
    if vc["hidden_act"] != GELU_TANH:
        raise InteropError(
            f"SigLIP hidden_act {vc['hidden_act']!r} is not supported: MoonViT's "
            f"MLP is GELU-tanh ({GELU_TANH!r}); convert the checkpoint or extend "
            "VisionBlock"
        )
    if vc["num_channels"] != 3:
        raise InteropError(f"SigLIP num_channels={vc['num_channels']}; MoonViT takes RGB (3)")
    p, size = _side("patch_size", vc["patch_size"]), _side("image_size", vc["image_size"])
    G = size // p  # floor, as SigLIP's Conv2d: so400m-patch14-384 has a 27 x 27 grid (378 px)
    return {
        "vision": make_vision_config(
            patch_size=p,
            hidden_size=vc["hidden_size"],
            num_layers=vc["num_hidden_layers"],
            num_heads=vc["num_attention_heads"],
            intermediate_size=vc["intermediate_size"],
            pos_grid=G,
            merge_size=2,
            max_patches=max(VisionConfig().max_patches, G * G),
            layer_norm_eps=vc["layer_norm_eps"],
        )
    }


def block_tensors(cfg: VisionConfig, i: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(our name without "vision.", SigLIP name, shape) for the 1:1 tensors of block i (the
    fused wqkv is handled apart)."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    ours, hf = f"blocks.{i}.", f"encoder.layers.{i}."
    leaves = [
        ("norm0", "layer_norm1", (D,), (D,)),
        ("norm1", "layer_norm2", (D,), (D,)),
        ("wo", "self_attn.out_proj", (D, D), (D,)),
        ("fc0", "mlp.fc1", (I, D), (I,)),
        ("fc1", "mlp.fc2", (D, I), (D,)),
    ]
    return [
        (f"{ours}{o}.{t}", f"{hf}{h}.{t}", shape)
        for o, h, w_shape, b_shape in leaves
        for t, shape in (("weight", w_shape), ("bias", b_shape))
    ]


def our_tensor(state: Mapping[str, Tensor], name: str, shape: tuple[int, ...]) -> Tensor:
    """state[name] checked against `shape`; InteropError naming a missing tensor or both shapes."""
    if name not in state:
        raise InteropError(
            f"the model state has no tensor {name!r}, which its shape config "
            "implies; export the state dict of a model built from these configs"
        )
    if tuple(state[name].shape) != tuple(shape):
        raise InteropError(
            f"tensor {name!r} has shape {list(state[name].shape)} but the model's "
            f"shape config implies {list(shape)}; the state and configs disagree"
        )
    return state[name]


def tower_prefix(hf_state: Mapping[str, Tensor]) -> str:
    """ "vision_model." when the tensors come from a full SiglipModel (or an old-style saved
    tower), else "" (transformers 5.x saves the bare tower without it)."""
    full = FULL_MODEL_PREFIX + "embeddings.patch_embedding.weight"
    return FULL_MODEL_PREFIX if full in hf_state else ""


def state_from_hf(
    hf_state: Mapping[str, Tensor], parts: Mapping[str, BaseModel], hf_config: Mapping
) -> dict[str, Tensor]:
    """Our "vision."-prefixed MoonViT state from a SigLIP tower's tensors (dtypes kept).

    parts["vision"].pos_grid must be SigLIP's grid side (as parts_from_hf gives); resample
    afterwards with `resample_pos_grid`. Raises InteropError naming a missing tensor, a tensor
    whose shape disagrees (both shapes), or tower tensors this mapping does not know.
    """
    cfg = cast(VisionConfig, parts["vision"])
    pre = tower_prefix(hf_state)
    D, p, G = cfg.hidden_size, cfg.patch_size, cfg.pos_grid
    used: set[str] = set()

    def get(name: str, shape: tuple[int, ...]) -> Tensor:
        used.add(pre + name)
        return expect_shape(pre + name, take(hf_state, pre + name), shape)

    out = {
        "vision.patch_embed.weight": get("embeddings.patch_embedding.weight", (D, 3, p, p)).reshape(
            D, 3 * p * p
        ),
        "vision.patch_embed.bias": get("embeddings.patch_embedding.bias", (D,)),
        "vision.pos_emb.weight": get("embeddings.position_embedding.weight", (G * G, D)).reshape(G, G, D),
    }
    for i in range(cfg.num_layers):
        for t in ("weight", "bias"):
            shape: tuple[int, ...] = (D, D) if t == "weight" else (D,)
            qkv = [get(f"encoder.layers.{i}.self_attn.{n}_proj.{t}", shape) for n in "qkv"]
            out[f"vision.blocks.{i}.wqkv.{t}"] = torch.cat(qkv)  # [Q; K; V], each head-major
        for ours, hf, shape in block_tensors(cfg, i):
            out["vision." + ours] = get(hf, shape)
    for t in ("weight", "bias"):
        out[f"vision.final_norm.{t}"] = get(f"post_layernorm.{t}", (D,))
    unknown = sorted(
        k
        for k in hf_state
        if k.startswith(pre)
        and k not in used
        and not k[len(pre) :].startswith(DROPPED_PREFIXES)
        and k[len(pre) :] not in IGNORED_NAMES
    )
    if unknown:
        raise InteropError(
            f"SigLIP checkpoint has {len(unknown)} tower tensors this importer does "
            f"not know (e.g. {unknown[:3]}); is it another architecture?"
        )
    return out


def resample_pos_grid(state: Mapping[str, Tensor], new_grid: int) -> dict[str, Tensor]:
    """A copy of our prefixed `state` whose (G, G, D) "vision.pos_emb.weight" is bicubically
    resized (align_corners False, in fp32, cast back) to (new_grid, new_grid, D), exactly what
    MoonViT's PosEmbGrid computes for an image of new_grid x new_grid patches. Pair it with
    VisionConfig(pos_grid=new_grid), e.g. SigLIP-SO-400M's 27 x 27 grid -> Kimi-VL's 64 x 64."""
    key = "vision.pos_emb.weight"
    if key not in state:
        raise InteropError(f"the model state has no {key!r} to resample")
    grid_GGD = state[key]
    out = dict(state)
    if grid_GGD.shape[0] != new_grid or grid_GGD.shape[1] != new_grid:
        grid_1DGG = grid_GGD.float().permute(2, 0, 1)[None]
        new_1Dgg = F.interpolate(grid_1DGG, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
        out[key] = new_1Dgg[0].permute(1, 2, 0).contiguous().to(grid_GGD.dtype)
    return out


def hf_from_parts(parts: Mapping[str, BaseModel]) -> dict:
    """A `siglip_vision_model` config.json dict for parts["vision"] (no pooling head).

    SigLIP has no field for RoPE: a MoonViT with use_rope True exports its weights faithfully, but
    transformers' SiglipVisionModel then computes without RoPE (as `use_rope: false` does).
    rope_theta, merge_size, max_patches and temporal_merge_size have no SigLIP field either and are
    not written.
    """
    cfg = cast(VisionConfig, parts["vision"])
    return {
        "model_type": "siglip_vision_model",
        "architectures": ["SiglipVisionModel"],
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_channels": 3,
        "image_size": cfg.pos_grid * cfg.patch_size,
        "patch_size": cfg.patch_size,
        "hidden_act": GELU_TANH,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "vision_use_head": False,
    }


def state_to_hf(state: Mapping[str, Tensor], parts: Mapping[str, BaseModel]) -> dict[str, Tensor]:
    """SigLIP tower tensors (bare `siglip_vision_model` names) from our "vision."-prefixed state:
    wqkv split back into q/k/v_proj, the (G, G, D) grid flattened to [G*G, D], the patch Linear
    reshaped to the Conv2d [D, 3, p, p]. state_from_hf(state_to_hf(s)) == s bit for bit."""
    cfg = cast(VisionConfig, parts["vision"])
    D, p, G = cfg.hidden_size, cfg.patch_size, cfg.pos_grid

    def get(name: str, shape: tuple[int, ...]) -> Tensor:
        return our_tensor(state, "vision." + name, shape)

    out = {
        "embeddings.patch_embedding.weight": get("patch_embed.weight", (D, 3 * p * p))
        .reshape(D, 3, p, p)
        .contiguous(),
        "embeddings.patch_embedding.bias": get("patch_embed.bias", (D,)),
        "embeddings.position_embedding.weight": get("pos_emb.weight", (G, G, D))
        .reshape(G * G, D)
        .contiguous(),
    }
    for i in range(cfg.num_layers):
        for t in ("weight", "bias"):
            shape: tuple[int, ...] = (3 * D, D) if t == "weight" else (3 * D,)
            q, k, v = get(f"blocks.{i}.wqkv.{t}", shape).chunk(3)
            for n, x in zip("qkv", (q, k, v)):  # clone: safetensors refuses shared storage
                out[f"encoder.layers.{i}.self_attn.{n}_proj.{t}"] = x.clone()
        for ours, hf, shape in block_tensors(cfg, i):
            out[hf] = get(ours, shape)
    for t in ("weight", "bias"):
        out[f"post_layernorm.{t}"] = get(f"final_norm.{t}", (D,))
    return out

"""Vision-side interop: SigLIP -> MoonViT parity, the MoonViT 2-D RoPE layout against an
independent reference, and the whole Kimi-VL layout out and back in.

All models are tiny and random (transformers models are built from configs, never downloaded).

Legend: N patches, P = 3*p*p pixels per patch, D width, H heads, Dh head dim, G pos-grid side,
B batch, L length, V vocab.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from moonforge.model.adapters import adapter_for, siglip
from moonforge.model.adapters.base import InteropError
from moonforge.model.rope import Rope2D, apply_rotary
from moonforge.model.vision import MoonViT
from moonforge.stages.data.images import to_patches

TOL = 1e-5
SIGLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
    layer_norm_eps=1e-6,
)
"""A 4 x 4 patch grid; head_dim 8 (a multiple of 4, so use_rope may be on after import)."""


def _siglip_tower(seed: int = 0, **overrides) -> SiglipVisionModel:
    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(**{**SIGLIP, **overrides})).eval()
    with torch.no_grad():  # random LayerNorms and biases too, so a swapped pair would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _pixel_values(img: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in the same normalisation as stages.data.images.to_patches."""
    x = torch.from_numpy(np.asarray(img).copy()).float() / 127.5 - 1.0
    return x.permute(2, 0, 1)[None]


def _moonvit_from(tower: SiglipVisionModel, hf_config: dict, use_rope: bool = False) -> MoonViT:
    parts = siglip.parts_from_hf(hf_config)
    state = siglip.state_from_hf(tower.state_dict(), parts, hf_config)
    cfg = parts["vision"].model_copy(update={"use_rope": use_rope})
    vit = MoonViT(cfg, backend="sdpa").eval()
    vit.load_state_dict({k.removeprefix("vision."): v for k, v in state.items()}, strict=True)
    return vit


def _encode(vit: MoonViT, img: Image.Image) -> torch.Tensor:
    p = vit.cfg.patch_size
    pixels_NP, (h, w) = to_patches(img, p, 1, img.width * img.height // p**2)
    assert (h, w) == (img.height // p, img.width // p)  # no resize happened
    with torch.no_grad():
        return vit(pixels_NP, torch.tensor([[h, w]]))


def test_siglip_parity_at_its_own_grid():
    tower = _siglip_tower()
    vit = _moonvit_from(tower, tower.config.to_dict())
    assert vit.cfg.pos_grid == 4 and vit.cfg.layer_norm_eps == 1e-6
    img = _image(16, 16)
    with torch.no_grad():
        ref = tower(_pixel_values(img)).last_hidden_state[0]
    ours = _encode(vit, img)
    diff = (ours - ref).abs().max().item()
    print(f"siglip parity 4x4 grid: max abs diff {diff:.3g}")
    assert diff <= TOL


def test_siglip_parity_on_a_resampled_grid():
    """A non-square image: both sides resize the grid bicubically (align_corners False)."""
    tower = _siglip_tower(seed=1)
    vit = _moonvit_from(tower, tower.config.to_dict())
    img = _image(24, 8, seed=1)  # 2 x 6 patches
    with torch.no_grad():
        ref = tower(_pixel_values(img), interpolate_pos_encoding=True).last_hidden_state[0]
    diff = (_encode(vit, img) - ref).abs().max().item()
    print(f"siglip parity 2x6 grid: max abs diff {diff:.3g}")
    assert diff <= TOL


def test_rope_changes_the_features_but_not_the_state():
    tower = _siglip_tower()
    plain = _moonvit_from(tower, tower.config.to_dict(), use_rope=False)
    roped = _moonvit_from(tower, tower.config.to_dict(), use_rope=True)
    assert plain.state_dict().keys() == roped.state_dict().keys()
    assert (_encode(plain, _image(16, 16)) - _encode(roped, _image(16, 16))).abs().max() > 1e-3


def test_plain_vit_allows_any_head_dim():
    from moonforge.model.config import VisionConfig

    with pytest.raises(ValueError, match="use_rope: false"):
        VisionConfig(hidden_size=36, num_heads=6)
    cfg = VisionConfig(
        patch_size=4,
        hidden_size=36,
        num_layers=1,
        num_heads=6,
        intermediate_size=8,
        pos_grid=2,
        use_rope=False,
    )
    assert MoonViT(cfg)(torch.randn(4, 48), torch.tensor([[2, 2]])).shape == (4, 36)


def test_imported_config_keeps_rope_and_fits_the_grid():
    vision = siglip.parts_from_hf(SiglipVisionConfig(**SIGLIP).to_dict())["vision"]
    assert vision.use_rope and vision.merge_size == 2 and vision.max_patches >= 16
    big = siglip.parts_from_hf(
        {
            "model_type": "siglip_vision_model",
            "image_size": 384,
            "patch_size": 14,
            "hidden_size": 1152,
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "intermediate_size": 4304,
        }
    )["vision"]
    assert big.pos_grid == 27 and big.max_patches >= 729 and big.layer_norm_eps == 1e-6


def test_full_siglip_model_imports_its_vision_tower():
    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 50,
        },
        vision_config=SIGLIP,
    )
    full = SiglipModel(cfg).eval()
    hf_state = full.state_dict()
    assert any(k.startswith("vision_model.") for k in hf_state)
    assert any(k.startswith("text_model.") for k in hf_state)
    hf_config = cfg.to_dict()
    assert adapter_for(hf_config["model_type"]) is siglip
    parts = siglip.parts_from_hf(hf_config)
    assert set(parts) == {"vision"} and parts["vision"].hidden_size == 32
    state = siglip.state_from_hf(hf_state, parts, hf_config)
    assert torch.equal(
        state["vision.blocks.1.wqkv.weight"][:32],
        hf_state["vision_model.encoder.layers.1.self_attn.q_proj.weight"],
    )
    vit = MoonViT(parts["vision"].model_copy(update={"use_rope": False}), backend="sdpa").eval()
    vit.load_state_dict({k.removeprefix("vision."): v for k, v in state.items()})
    img = _image(16, 16, seed=2)
    with torch.no_grad():
        ref = full.vision_model(_pixel_values(img)).last_hidden_state[0]
    assert (_encode(vit, img) - ref).abs().max().item() <= TOL


def test_siglip_export_round_trip_and_loads_in_transformers():
    tower = _siglip_tower()
    hf_config = tower.config.to_dict()
    parts = siglip.parts_from_hf(hf_config)
    state = siglip.state_from_hf(tower.state_dict(), parts, hf_config)
    hf_state = siglip.state_to_hf(state, parts)
    again = siglip.state_from_hf(hf_state, parts, siglip.hf_from_parts(parts))
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)
    exported = siglip.hf_from_parts(parts)
    assert exported["model_type"] == "siglip_vision_model" and exported["vision_use_head"] is False
    assert siglip.parts_from_hf(exported) == parts
    kwargs = {k: v for k, v in exported.items() if k not in ("model_type", "architectures")}
    reloaded = SiglipVisionModel(SiglipVisionConfig(**kwargs)).eval()
    reloaded.load_state_dict(hf_state, strict=True)  # every name and shape transformers expects
    save(hf_state)  # no two tensors share storage (safetensors would refuse)
    img = _image(16, 16)
    with torch.no_grad():
        a = tower(_pixel_values(img)).last_hidden_state
        b = reloaded(_pixel_values(img)).last_hidden_state
    assert torch.equal(a, b)


def test_resample_pos_grid_matches_moonvit_interpolation():
    tower = _siglip_tower()
    hf_config = tower.config.to_dict()
    parts = siglip.parts_from_hf(hf_config)
    state = siglip.state_from_hf(tower.state_dict(), parts, hf_config)
    vit = _moonvit_from(tower, hf_config)
    big = siglip.resample_pos_grid(state, 10)
    assert big["vision.pos_emb.weight"].shape == (10, 10, 32)
    assert torch.equal(big["vision.pos_emb.weight"].flatten(0, 1), vit.pos_emb.for_grid(10, 10))
    assert all(big[k] is state[k] for k in state if k != "vision.pos_emb.weight")
    cfg10 = parts["vision"].model_copy(update={"pos_grid": 10})
    MoonViT(cfg10).load_state_dict({k.removeprefix("vision."): v for k, v in big.items()})


def test_siglip_refuses_other_activations_by_name():
    with pytest.raises(InteropError, match="'gelu'.*gelu_pytorch_tanh"):
        siglip.parts_from_hf({**SiglipVisionConfig(**SIGLIP).to_dict(), "hidden_act": "gelu"})
    with pytest.raises(InteropError, match="quick_gelu"):
        siglip.parts_from_hf(
            {"model_type": "siglip", "vision_config": {**SIGLIP, "hidden_act": "quick_gelu"}}
        )


def test_siglip_wrong_shape_names_tensor_and_both_shapes():
    tower = _siglip_tower()
    hf_config = tower.config.to_dict()
    parts = siglip.parts_from_hf(hf_config)
    hf_state = dict(tower.state_dict())
    hf_state["encoder.layers.1.mlp.fc1.weight"] = torch.zeros(48, 32)
    with pytest.raises(
        InteropError,
        match=r"'encoder\.layers\.1\.mlp\.fc1\.weight'.*"
        r"\[48, 32\].*\[64, 32\]",
    ):
        siglip.state_from_hf(hf_state, parts, hf_config)
    del hf_state["post_layernorm.bias"]
    hf_state["encoder.layers.1.mlp.fc1.weight"] = torch.zeros(64, 32)
    with pytest.raises(InteropError, match="post_layernorm.bias"):
        siglip.state_from_hf(hf_state, parts, hf_config)


def _rope2d_reference(q_HND: torch.Tensor, ys: list[int], xs: list[int], theta: float):
    """Independent MoonViT 2-D RoPE: head dims in groups of 4; dims (4i, 4i+1) are one complex
    number turned by the COLUMN x * theta^(-4i/Dh), dims (4i+2, 4i+3) one turned by the ROW y."""
    H, N, Dh = q_HND.shape
    out = q_HND.clone()
    for n in range(N):
        for i in range(Dh // 4):
            f = theta ** (-4 * i / Dh)
            for start, pos in ((4 * i, xs[n]), (4 * i + 2, ys[n])):
                z = torch.complex(q_HND[:, n, start].double(), q_HND[:, n, start + 1].double())
                z = z * torch.polar(
                    torch.tensor(1.0, dtype=torch.float64), torch.tensor(pos * f, dtype=torch.float64)
                )
                out[:, n, start], out[:, n, start + 1] = z.real.float(), z.imag.float()
    return out


def test_moonvit_rope_layout_matches_the_published_one():
    Dh, theta = 16, 10000.0
    grid = torch.tensor([[3, 5], [2, 2]])  # two images, rectangular first
    ys = [r for h, w in grid.tolist() for r in range(h) for _ in range(w)]
    xs = [c for h, w in grid.tolist() for _ in range(h) for c in range(w)]
    q_HND = torch.randn(2, len(ys), Dh, generator=torch.Generator().manual_seed(0))
    cos_NP, sin_NP = Rope2D(Dh, theta)(grid)
    ours = apply_rotary(q_HND, cos_NP, sin_NP)
    ref = _rope2d_reference(q_HND, ys, xs, theta)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    swapped = _rope2d_reference(q_HND, xs, ys, theta)  # rows and columns exchanged
    assert (ours - swapped).abs().max() > 1e-2


# ---------------------------------------------------------------- Kimi-VL: the whole VLM


def _tiny_kimi_cfg(**lm_overrides):
    from moonforge.model.config import LMConfig, ProjectorConfig, VisionConfig, VLMConfig

    vision = VisionConfig(
        patch_size=4,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        pos_grid=4,
        merge_size=2,
        max_patches=64,
        layer_norm_eps=1e-5,
    )
    lm = LMConfig(
        **{
            **dict(
                vocab_size=96,
                hidden_size=48,
                num_layers=3,
                num_heads=4,
                attention="mla",
                head_dim=8,
                kv_lora_rank=16,
                qk_rope_head_dim=4,
                first_k_dense=1,
                dense_intermediate_size=64,
                num_experts=4,
                num_experts_per_tok=2,
                num_shared_experts=1,
                moe_intermediate_size=16,
                routed_scaling_factor=1.5,
                rope_theta=800000.0,
                max_position_embeddings=64,
            ),
            **lm_overrides,
        }
    )
    return VLMConfig(
        vision=vision, projector=ProjectorConfig(layer_norm_eps=1e-5), lm=lm, attn_backend="sdpa"
    )


def _tiny_kimi_vlm(seed: int = 0):
    from moonforge.model.vlm import build_vlm

    vlm = build_vlm(_tiny_kimi_cfg(), seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # everything random (norms, biases, router bias): swaps would show
        for t in vlm.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return vlm


def _parts(cfg):
    return {"vision": cfg.vision, "projector": cfg.projector, "lm": cfg.lm}


def _published_names(cfg) -> dict[str, tuple[int, ...]]:
    """The Kimi-VL tensor names and shapes for `cfg`, written from interop.md's rules."""
    v, lm = cfg.vision, cfg.lm
    D, p, G, I = v.hidden_size, v.patch_size, v.pos_grid, v.intermediate_size
    names = {
        "vision_tower.patch_embed.proj.weight": (D, 3, p, p),
        "vision_tower.patch_embed.proj.bias": (D,),
        "vision_tower.patch_embed.pos_emb.weight": (G, G, D),
    }
    for i in range(v.num_layers):
        b = f"vision_tower.encoder.blocks.{i}."
        for leaf, w, bias in (
            ("wqkv", (3 * D, D), (3 * D,)),
            ("wo", (D, D), (D,)),
            ("norm0", (D,), (D,)),
            ("norm1", (D,), (D,)),
            ("mlp.fc0", (I, D), (I,)),
            ("mlp.fc1", (D, I), (D,)),
        ):
            names[b + leaf + ".weight"], names[b + leaf + ".bias"] = w, bias
    names["vision_tower.encoder.final_layernorm.weight"] = (D,)
    names["vision_tower.encoder.final_layernorm.bias"] = (D,)
    C = 4 * D
    E, V, H = lm.hidden_size, lm.vocab_size, lm.num_heads
    for name, shape in (
        ("pre_norm.weight", (D,)),
        ("pre_norm.bias", (D,)),
        ("linear_1.weight", (C, C)),
        ("linear_1.bias", (C,)),
        ("linear_2.weight", (E, C)),
        ("linear_2.bias", (E,)),
    ):
        names["multi_modal_projector." + name] = shape
    Dn, Dr, R = lm.head_dim, lm.qk_rope_head_dim, lm.kv_lora_rank
    m = "language_model.model."
    names[m + "embed_tokens.weight"] = (V, E)
    for i in range(lm.num_layers):
        layer = f"{m}layers.{i}."
        names[layer + "input_layernorm.weight"] = (E,)
        names[layer + "post_attention_layernorm.weight"] = (E,)
        names[layer + "self_attn.q_proj.weight"] = (H * (Dn + Dr), E)
        names[layer + "self_attn.kv_a_proj_with_mqa.weight"] = (R + Dr, E)
        names[layer + "self_attn.kv_a_layernorm.weight"] = (R,)
        names[layer + "self_attn.kv_b_proj.weight"] = (H * 2 * Dn, R)
        names[layer + "self_attn.o_proj.weight"] = (E, H * Dn)

        def swiglu(prefix: str, hidden: int) -> None:
            names[prefix + "gate_proj.weight"] = names[prefix + "up_proj.weight"] = (hidden, E)
            names[prefix + "down_proj.weight"] = (E, hidden)

        if i < lm.first_k_dense:
            swiglu(layer + "mlp.", lm.dense_intermediate_size)
        else:
            names[layer + "mlp.gate.weight"] = (lm.num_experts, E)
            names[layer + "mlp.gate.e_score_correction_bias"] = (lm.num_experts,)
            for j in range(lm.num_experts):
                swiglu(f"{layer}mlp.experts.{j}.", lm.moe_intermediate_size)
            swiglu(layer + "mlp.shared_experts.", lm.num_shared_experts * lm.moe_intermediate_size)
    names[m + "norm.weight"] = (E,)
    names["language_model.lm_head.weight"] = (V, E)
    return names


def _batch(cfg):
    g = torch.Generator().manual_seed(7)
    grid = torch.tensor([[4, 4], [2, 4]])  # 4 + 2 merged tokens
    pixels_NP = torch.rand(24, 3 * cfg.vision.patch_size**2, generator=g) * 2 - 1
    B, L = 2, 12
    ids = torch.randint(0, cfg.lm.vocab_size, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 5:7] = True
    pos = torch.arange(L).repeat(B, 1)
    return ids, pos, torch.zeros(B, L, dtype=torch.long), mask, pixels_NP, grid


def test_kimi_vl_export_names_shapes_and_bit_identical_round_trip():
    from moonforge.model.adapters import kimi_vl
    from moonforge.model.vlm import build_vlm

    vlm = _tiny_kimi_vlm()
    cfg, parts = vlm.cfg, _parts(vlm.cfg)
    state = vlm.state_dict()
    hf_state = kimi_vl.state_to_hf(state, parts)
    expected = _published_names(cfg)
    assert sorted(hf_state) == sorted(expected)
    for name, shape in expected.items():
        assert tuple(hf_state[name].shape) == shape, name
    assert not any("inv_freq" in k or k.startswith("caption") for k in hf_state)
    bias = hf_state["language_model.model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    bf16_hf = kimi_vl.state_to_hf(bf16, parts)
    assert (
        bf16_hf["language_model.model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
        and bf16_hf["vision_tower.encoder.blocks.0.wqkv.weight"].dtype == torch.bfloat16
    )
    save(hf_state)  # no two tensors share storage (safetensors would refuse)
    # q/k/v stay fused head-major; the patch Conv2d is our Linear reshaped
    assert torch.equal(
        hf_state["vision_tower.encoder.blocks.1.wqkv.weight"], state["vision.blocks.1.wqkv.weight"]
    )
    assert torch.equal(
        hf_state["vision_tower.patch_embed.proj.weight"].flatten(1), state["vision.patch_embed.weight"]
    )

    hf_config = kimi_vl.hf_from_parts(parts)
    back = kimi_vl.state_from_hf(hf_state, parts, hf_config)
    ours = {k: v for k, v in state.items() if not k.startswith("caption.")}
    assert sorted(back) == sorted(ours)
    for k, v in ours.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k

    again = build_vlm(cfg, seed=123).eval()
    again.load_state_dict(
        {**back, **{k: v for k, v in state.items() if k.startswith("caption.")}}, strict=True
    )
    batch = _batch(cfg)
    with torch.no_grad():
        assert torch.equal(vlm(*batch), again(*batch))


def test_kimi_vl_import_ignores_inv_freq_and_reads_the_config_back():
    from moonforge.model.adapters import kimi_vl

    vlm = _tiny_kimi_vlm(seed=1)
    parts = _parts(vlm.cfg)
    hf_config = kimi_vl.hf_from_parts(parts)
    hf_state = kimi_vl.state_to_hf(vlm.state_dict(), parts)
    hf_state["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(2)
    got = kimi_vl.parts_from_hf(hf_config)
    # max_patches is a preprocessing limit with no config.json key: import uses max(4096, G*G)
    assert got["vision"] == parts["vision"].model_copy(update={"max_patches": 4096})
    assert got["projector"] == parts["projector"]
    assert got["lm"].model_dump(exclude={"latent_norm_eps"}) == parts["lm"].model_dump(
        exclude={"latent_norm_eps"}
    )
    back = kimi_vl.state_from_hf(hf_state, got, hf_config)
    assert not any("inv_freq" in k for k in back)
    assert "temporal_merge_size" not in hf_config["vision_config"]  # the published layout
    merged = {**parts, "vision": parts["vision"].model_copy(update={"temporal_merge_size": 2})}
    assert kimi_vl.parts_from_hf(kimi_vl.hf_from_parts(merged))["vision"].temporal_merge_size == 2


def test_kimi_vl_config_has_what_vllm_needs():
    from moonforge.model.adapters import adapter_for, kimi_vl

    assert adapter_for("kimi_vl") is kimi_vl
    cfg = _tiny_kimi_cfg()
    hf = kimi_vl.hf_from_parts(_parts(cfg))
    assert hf["model_type"] == "kimi_vl"
    assert hf["architectures"] == ["KimiVLForConditionalGeneration"]
    assert "auto_map" not in hf and hf["tie_word_embeddings"] is False
    assert hf["vocab_size"] == 96 and hf["ignore_index"] == -100
    vc = hf["vision_config"]
    assert vc["model_type"] == "moonvit" and vc["merge_kernel_size"] == [2, 2]
    assert (vc["patch_size"], vc["init_pos_emb_height"], vc["init_pos_emb_width"]) == (4, 4, 4)
    assert (
        vc["hidden_size"],
        vc["num_hidden_layers"],
        vc["num_attention_heads"],
        vc["intermediate_size"],
    ) == (32, 2, 4, 64)
    tc = hf["text_config"]
    assert "model_type" not in tc and "auto_map" not in tc
    assert tc["topk_method"] == "noaux_tc" and tc["scoring_func"] == "sigmoid"
    assert tc["q_lora_rank"] is None and tc["kv_lora_rank"] == 16
    assert tc["n_routed_experts"] == 4 and tc["num_experts_per_tok"] == 2
    assert tc["first_k_dense_replace"] == 1 and tc["n_shared_experts"] == 1
    assert tc["hidden_size"] == 48 and tc["vocab_size"] == 96
    assert "media_placeholder_token_id" not in hf  # vocab is not Kimi's and no ids given
    with_ids = kimi_vl.hf_from_parts(_parts(cfg), {"media_placeholder_token_id": 9, "eos_token_id": 1})
    assert with_ids["media_placeholder_token_id"] == 9 and with_ids["eos_token_id"] == 1
    kimi = _tiny_kimi_cfg(vocab_size=163840)
    published = kimi_vl.hf_from_parts(_parts(kimi))
    assert (
        published["media_placeholder_token_id"],
        published["bos_token_id"],
        published["eos_token_id"],
        published["pad_token_id"],
    ) == (163605, 163584, 163585, 163839)


def test_kimi_vl_refuses_a_dense_lm_naming_its_kind():
    from moonforge.model.adapters import kimi_vl

    cfg = _tiny_kimi_cfg(attention="mha", first_k_dense=3, num_kv_heads=2)
    with pytest.raises(InteropError, match=r"'mha' attention.*2 key-value heads.*dense SwiGLU"):
        kimi_vl.hf_from_parts(_parts(cfg))
    with pytest.raises(InteropError, match="'mha' attention"):
        kimi_vl.state_to_hf({}, _parts(cfg))
    with pytest.raises(InteropError, match="ties lm_head"):
        kimi_vl.hf_from_parts(_parts(_tiny_kimi_cfg(tie_word_embeddings=True)))
    no_rope = _tiny_kimi_cfg()
    parts = {**_parts(no_rope), "vision": no_rope.vision.model_copy(update={"use_rope": False})}
    with pytest.raises(InteropError, match="use_rope=False"):
        kimi_vl.hf_from_parts(parts)


def test_kimi_vl_wrong_shape_names_tensor_and_both_shapes():
    from moonforge.model.adapters import kimi_vl

    vlm = _tiny_kimi_vlm()
    parts = _parts(vlm.cfg)
    hf_config = kimi_vl.hf_from_parts(parts)
    hf_state = kimi_vl.state_to_hf(vlm.state_dict(), parts)
    hf_state["vision_tower.patch_embed.proj.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(
        InteropError,
        match=r"'vision_tower\.patch_embed\.proj\.weight'.*"
        r"\[32, 3, 5, 5\].*\[32, 3, 4, 4\]",
    ):
        kimi_vl.state_from_hf(hf_state, parts, hf_config)
    hf_state = kimi_vl.state_to_hf(vlm.state_dict(), parts)
    hf_state["multi_modal_projector.linear_2.weight"] = torch.zeros(48, 64)
    with pytest.raises(InteropError, match=r"linear_2\.weight.*\[48, 64\].*\[48, 128\]"):
        kimi_vl.state_from_hf(hf_state, parts, hf_config)
    hf_state = kimi_vl.state_to_hf(vlm.state_dict(), parts)
    hf_state["vision_tower.encoder.blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(InteropError, match="blocks.0.extra.weight"):
        kimi_vl.state_from_hf(hf_state, parts, hf_config)
    bad_state = dict(vlm.state_dict())
    bad_state["vision.blocks.1.fc0.weight"] = torch.zeros(60, 32)
    with pytest.raises(
        InteropError,
        match=r"'vision\.blocks\.1\.fc0\.weight'.*\[60, 32\].*"
        r"\[64, 32\]",
    ):
        kimi_vl.state_to_hf(bad_state, parts)


def test_kimi_vl_import_reads_published_vision_defaults():
    from moonforge.model.adapters import kimi_vl

    cfg = _tiny_kimi_cfg()
    hf = kimi_vl.hf_from_parts(_parts(cfg))
    for key in ("layer_norm_eps",):
        del hf["vision_config"][key]
    del hf["projector_layer_norm_eps"]
    parts = kimi_vl.parts_from_hf(hf)
    assert parts["vision"].layer_norm_eps == 1e-5 and parts["projector"].layer_norm_eps == 1e-5
    assert parts["vision"].use_rope and parts["vision"].rope_theta == 10000.0
    assert parts["projector"].hidden_size is None
    hf["vision_config"]["init_pos_emb_width"] = 8
    with pytest.raises(InteropError, match="4 x 8"):
        kimi_vl.parts_from_hf(hf)


def _kimi_reference_image_tokens(hf: dict, cfg, pixels_NP: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """MoonViT + projector computed straight from the published tensors, written after vLLM's
    native port (Conv2d on (N, 3, p, p) patches, complex freqs_cis with [x, y] per frequency,
    packed wqkv unbound as (3, heads, head_dim), per-image attention, (h/2, 2, w/2, 2) merger,
    LayerNorm eps 1e-5 everywhere, exact GELU in the projector)."""
    F = torch.nn.functional
    v = cfg.vision
    D, p, H, G = v.hidden_size, v.patch_size, v.num_heads, v.pos_grid
    Dh, N, V = D // H, pixels_NP.shape[0], "vision_tower."
    x = F.conv2d(
        pixels_NP.view(N, 3, p, p),
        hf[V + "patch_embed.proj.weight"],
        hf[V + "patch_embed.proj.bias"],
        stride=p,
    ).view(N, D)
    table = hf[V + "patch_embed.pos_emb.weight"]
    pos, cis, sizes = [], [], []
    freqs = 1.0 / 10000.0 ** (torch.arange(0, Dh, 4)[: Dh // 4].float() / Dh)
    for h, w in grid.tolist():
        pos.append(
            table.flatten(0, 1)
            if (h, w) == (G, G)
            else F.interpolate(table.permute(2, 0, 1)[None], size=(h, w), mode="bicubic")[0]
            .permute(1, 2, 0)
            .flatten(0, 1)
        )
        flat = torch.arange(h * w).float()
        xs, ys = flat % w, flat // w
        pair = torch.stack(
            [
                torch.polar(torch.ones(h * w, Dh // 4), torch.outer(xs, freqs)),
                torch.polar(torch.ones(h * w, Dh // 4), torch.outer(ys, freqs)),
            ],
            -1,
        )
        cis.append(pair.reshape(h * w, Dh // 2))
        sizes.append(h * w)
    x, cis = x + torch.cat(pos), torch.cat(cis)[:, None]

    def ln(t, name):
        return F.layer_norm(t, (t.shape[-1],), hf[name + ".weight"], hf[name + ".bias"], 1e-5)

    def lin(t, name):
        return F.linear(t, hf[name + ".weight"], hf[name + ".bias"])

    def rope(t):
        return torch.view_as_real(torch.view_as_complex(t.float().view(N, H, -1, 2)) * cis).flatten(-2)

    for i in range(v.num_layers):
        b = f"{V}encoder.blocks.{i}."
        q, k, val = lin(ln(x, b + "norm0"), b + "wqkv").view(N, 3, H, Dh).unbind(1)
        q, k = rope(q), rope(k)
        out = torch.cat(
            [
                F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in chunk)).transpose(0, 1)
                for chunk in zip(q.split(sizes), k.split(sizes), val.split(sizes))
            ]
        )
        x = x + lin(out.reshape(N, D), b + "wo")
        x = x + lin(F.gelu(lin(ln(x, b + "norm1"), b + "mlp.fc0"), approximate="tanh"), b + "mlp.fc1")
    x = ln(x, V + "encoder.final_layernorm")
    merged = [
        img.view(h // 2, 2, w // 2, 2, D).permute(0, 2, 1, 3, 4).reshape(-1, 4, D)
        for img, (h, w) in zip(x.split(sizes), grid.tolist())
    ]
    P = "multi_modal_projector."
    y = ln(torch.cat(merged), P + "pre_norm").view(-1, 4 * D)
    return lin(F.gelu(lin(y, P + "linear_1")), P + "linear_2")


def test_kimi_vl_layout_computes_like_the_published_moonvit():
    from moonforge.model.adapters import kimi_vl

    vlm = _tiny_kimi_vlm(seed=2)
    hf = kimi_vl.state_to_hf(vlm.state_dict(), _parts(vlm.cfg))
    _, _, _, _, pixels_NP, grid = _batch(vlm.cfg)  # a native 4 x 4 grid and a resized 2 x 4 one
    with torch.no_grad():
        ours = vlm.encode_images(pixels_NP, grid)
        ref = _kimi_reference_image_tokens(hf, vlm.cfg, pixels_NP, grid)
    diff = (ours - ref).abs().max().item()
    print(f"kimi-vl reference image tokens: max abs diff {diff:.3g}")
    assert diff <= TOL

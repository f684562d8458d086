"""Model shape configs: MoonViT encoder, pixel-shuffle projector, MoE LM, and the stage-1 towers.

These are the only configs `model/` knows. They are frozen pydantic models so a recipe's `model:`
section validates field by field and the resolved shape is hashable into fingerprints. Field names
follow the HF / DeepSeek-V3 config vocabulary where one exists.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, model_validator


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class VisionConfig(_Shape):
    """MoonViT: NaViT-packed native-resolution ViT with 2-D RoPE + interpolated absolute grid."""

    patch_size: PositiveInt = 14
    """Square patch side in pixels (a Conv2d with kernel = stride = patch_size)."""
    hidden_size: PositiveInt = 1152
    """Channel width of every ViT block."""
    num_layers: PositiveInt = 27
    """Number of pre-LN transformer blocks."""
    num_heads: PositiveInt = 16
    """Attention heads; head_dim = hidden_size / num_heads must be divisible by 4 for 2-D RoPE."""
    intermediate_size: PositiveInt = 4304
    """MLP width (GELU, tanh approximation)."""
    pos_grid: PositiveInt = 64
    """Side of the learnable absolute position grid, bicubically interpolated to each image's (h, w)."""
    rope_theta: PositiveFloat = 10000.0
    """Base of the 2-D rotary embedding."""
    use_rope: bool = True
    """2-D RoPE on q/k in every block; False gives a plain ViT (absolute grid only), e.g. to
    compare with SigLIP, which has none. RoPE adds no parameters, so the state dict is the same."""
    merge_size: PositiveInt = 2
    """Pixel-shuffle kernel: merge_size x merge_size patches become one LM token."""
    max_patches: PositiveInt = 4096
    """Largest patch count per image the encoder accepts (images are resized to fit)."""
    temporal_merge_size: PositiveInt = 1
    """Video: every k consecutive temporal patches of a clip (2 frames each) are averaged into
    one set of LM tokens after the ViT, so a clip costs ceil(ceil(F / 2) / k) times its grid's
    tokens. Adds no weights; images are untouched. Kimi-VL's checkpoints have no such field
    (export writes none; the HF model reads video as frames)."""
    layer_norm_eps: PositiveFloat = 1e-6
    """LayerNorm epsilon."""

    @model_validator(mode="after")
    def _check(self) -> VisionConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.vision.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; pick a head count that divides it"
            )
        if self.use_rope and (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"model.vision head_dim={self.hidden_size // self.num_heads} must be a multiple of 4 "
                "(2-D RoPE splits rotary pairs between x and y); change hidden_size or num_heads, "
                "or set use_rope: false"
            )
        return self


class ProjectorConfig(_Shape):
    """2x2 pixel shuffle -> LayerNorm per sub-patch -> Linear -> GELU -> Linear to the LM width."""

    hidden_size: PositiveInt | None = None
    """Width of the MLP's hidden layer; None means merge_size**2 * vision.hidden_size (Kimi-VL)."""
    layer_norm_eps: PositiveFloat = 1e-5
    """LayerNorm epsilon applied per sub-patch before the MLP."""


class LMConfig(_Shape):
    """DeepSeek-V3 / Moonlight style MoE decoder with optional MLA attention."""

    vocab_size: PositiveInt = 163840
    """Tokenizer vocabulary size (rows of embed_tokens, and of lm_head when untied)."""
    hidden_size: PositiveInt = 2048
    """Residual stream width."""
    num_layers: PositiveInt = 27
    """Decoder blocks; the first `first_k_dense` use a dense SwiGLU FFN, the rest MoE."""
    num_heads: PositiveInt = 16
    """Attention heads (query heads)."""
    attention: Literal["mla", "mha"] = "mla"
    """`mla`: DeepSeek multi-head latent attention (RoPE on a decoupled slice); `mha`: plain MHA."""
    head_dim: PositiveInt = 128
    """Per-head dim for `mha`, and qk_nope_head_dim / v_head_dim for `mla`."""
    num_kv_heads: PositiveInt | None = None
    """MHA: key/value heads for grouped-query attention (Llama / Qwen2); each serves
    num_heads / num_kv_heads query heads and the KV cache stores only these. None = num_heads.
    MLA ignores it (as MHA ignores the MLA-only fields)."""
    attention_bias: bool = False
    """MHA: biases on the q, k, v projections (Qwen2 has them; Llama's `attention_bias: true`
    sets this and `attention_out_bias`). MLA ignores it."""
    attention_out_bias: bool = False
    """Bias on the attention output projection o_proj (Llama's `attention_bias: true`)."""
    kv_lora_rank: PositiveInt = 512
    """MLA: rank of the compressed KV latent."""
    q_lora_rank: PositiveInt | None = None
    """MLA: rank of the low-rank query path q_a_proj -> RMSNorm -> q_b_proj (DeepSeek-V3 uses
    1536); None = one full q_proj (Moonlight, Kimi-VL). MHA ignores it."""
    latent_norm_eps: PositiveFloat | None = None
    """MLA: epsilon of the latent RMSNorms (kv_a_layernorm, q_a_layernorm); None = rms_norm_eps.
    transformers' DeepseekV3 and DeepSeek's reference code fix it at 1e-6 whatever rms_norm_eps
    says, so checkpoints imported from them set 1e-6."""
    qk_rope_head_dim: PositiveInt = 64
    """MLA: per-head dims that carry RoPE (the decoupled rope slice)."""
    first_k_dense: int = 1
    """How many leading layers use a dense FFN instead of MoE."""
    dense_intermediate_size: PositiveInt = 11264
    """Width of the dense SwiGLU FFN."""
    num_experts: PositiveInt = 64
    """Routed experts per MoE layer."""
    num_experts_per_tok: PositiveInt = 6
    """Top-k routed experts per token."""
    num_shared_experts: int = 2
    """Shared experts (always active); their MLP width is num_shared_experts * moe_intermediate_size."""
    moe_intermediate_size: PositiveInt = 1408
    """Width of one routed expert's SwiGLU."""
    routed_scaling_factor: PositiveFloat = 2.446
    """Scale on the renormalised routing weights (Moonlight App. C)."""
    norm_topk_prob: bool = True
    """Renormalise the top-k sigmoid scores to sum to one before the scale; False mixes the raw
    scores (DeepSeek-V3 `norm_topk_prob`)."""
    num_expert_groups: PositiveInt = 1
    """Group-limited routing (DeepSeek-V3 `n_group`): experts split into this many equal groups,
    each scored by the sum of its two best biased scores; top-k picks only inside the best
    `num_topk_groups` groups. 1 = plain top-k over all experts (Moonlight)."""
    num_topk_groups: PositiveInt = 1
    """Groups a token may route into (DeepSeek-V3 `topk_group`); num_expert_groups or more
    means every group (no limit)."""
    rope_theta: PositiveFloat = 50000.0
    """RoPE base; the long-context stage resets it (50,000 -> 800,000 at full scale)."""
    max_position_embeddings: PositiveInt = 8192
    """Longest sequence the current RoPE setting is trained for (recorded per checkpoint)."""
    rms_norm_eps: PositiveFloat = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Logits use embed_tokens' weight (no separate lm_head parameter); small Llama / Qwen2
    models tie. Moonlight / Kimi-VL do not."""

    @model_validator(mode="after")
    def _check(self) -> LMConfig:
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"model.lm.num_experts_per_tok={self.num_experts_per_tok} exceeds "
                f"num_experts={self.num_experts}; lower top-k or add experts"
            )
        if self.first_k_dense > self.num_layers:
            raise ValueError("model.lm.first_k_dense cannot exceed num_layers")
        if self.attention == "mha" and self.qk_rope_head_dim % 2:
            raise ValueError("model.lm.qk_rope_head_dim must be even")
        self._check_attention()
        self._check_groups()
        return self

    def _check_attention(self) -> None:
        if self.attention == "mha" and self.num_heads % (self.num_kv_heads or self.num_heads):
            raise ValueError(
                f"model.lm.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}; each key/value head serves a whole group"
            )

    def _check_groups(self) -> None:
        G, E = self.num_expert_groups, self.num_experts
        if E % G:
            raise ValueError(f"model.lm.num_experts={E} is not divisible by num_expert_groups={G}")
        if G > 1 and E // G < 2:
            raise ValueError(
                "model.lm.num_expert_groups leaves fewer than 2 experts per group; "
                "groups are scored by their two best experts"
            )
        reachable = min(self.num_topk_groups, G) * (E // G)
        if self.num_experts_per_tok > reachable:
            raise ValueError(
                f"model.lm.num_experts_per_tok={self.num_experts_per_tok} exceeds the "
                f"{reachable} experts of num_topk_groups={self.num_topk_groups} "
                "groups; raise num_topk_groups or lower top-k"
            )


class CaptionTowerConfig(_Shape):
    """Stage-1 only (CoCa-like): a small text encoder for SigLIP and a tiny caption decoder."""

    hidden_size: PositiveInt = 768
    """Width of the text encoder and caption decoder."""
    num_text_layers: PositiveInt = 12
    """Text-encoder blocks (bidirectional), pooled to one embedding for the contrastive loss."""
    num_decoder_layers: PositiveInt = 6
    """Caption-decoder blocks (causal), taking the image patch features as a prefix."""
    num_heads: PositiveInt = 12
    """Attention heads in both towers."""
    embed_dim: PositiveInt = 768
    """Joint image-text embedding width for the SigLIP loss."""
    max_text_len: PositiveInt = 64
    """Longest caption, in tokens."""


class VLMConfig(_Shape):
    """The whole model: encoder + projector + LM (+ the stage-1 towers)."""

    vision: VisionConfig = VisionConfig()
    projector: ProjectorConfig = ProjectorConfig()
    lm: LMConfig = LMConfig()
    caption: CaptionTowerConfig = CaptionTowerConfig()

    @model_validator(mode="before")
    @classmethod
    def _drop_runtime_keys(cls, data: Any) -> Any:
        """Accept and drop `attn_backend`: older model_config.json files and recipes carry it,
        but the attention backend is a runtime choice (`build_vlm(..., attn_backend=)`), so a
        checkpoint trained with flash-attn opens on a CPU and the fingerprint ignores it."""
        if isinstance(data, dict) and "attn_backend" in data:
            data = {k: v for k, v in data.items() if k != "attn_backend"}
        return data

"""Per-token cost model of the VLM for `moonforge plan`: parameters, FLOPs and activation bytes.

Parameter counts come from `model.vlm.param_counts` (the real modules, built on the meta device),
so the plan and the model cannot disagree. FLOPs and activations are closed-form in the shape:
- FLOPs per token through a module of N (compute) params: 2N forward; backward 4N when its
  weights train, 2N when it is frozen but gradients must flow through it to a trained module
  upstream (align: LM frozen, projector trains), 0 when nothing before it trains.
- Causal attention, forward, per token per layer: H * (d_qk + d_v) * s  (QK^T and AV, 2 FLOPs per
  multiply-add, on average s/2 keys). An upper bound under packing, where a token only attends
  within its own document. ViT attention is bidirectional within one image of P patches: 4 h P.
- Activations: the tensors autograd keeps for the backward, per token per layer, counted from
  what moonforge's own layers save (`_lm_layer_elems`), plus the logits and the cross-entropy's
  backward buffers: the peak of one micro-batch's forward + backward beyond the parameters,
  gradients and optimizer states. Attention is assumed to keep only q, k, v, its output and a
  per-row logsumexp (flash-attn, and torch's CPU flash kernel); bf16 unless `act_bytes` says
  otherwise. Under bf16 autocast over fp32 weights the LM also keeps what autocast leaves fp32
  and the weights' bf16 casts (`_lm_activation_bytes`); the vision tower is still counted at
  `act_bytes` throughout. tests/test_plan_memory.py checks the LM's estimate against the torch
  memory profiler's measurement of a training step on CPU (fp32), with and without recompute;
  tests/test_gpu.py and benchmarks/bench_gpu.py against max_memory_allocated on a GPU (bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from moonforge.model.config import VLMConfig
from moonforge.stages.config import StageConfig

BF16 = 2
FP32 = 4


@dataclass(frozen=True)
class TokenPath:
    """The modules a stage's tokens pass through, in order, and which of them train."""

    modules: tuple[str, ...]
    trained: tuple[str, ...]
    unit: str
    """What a token is: 'lm' (an LM sequence position) or 'patch' (a ViT patch, stage 1)."""

    def backward_through(self, module: str) -> bool:
        """True when backward reaches `module` (it trains, or something before it does)."""
        i = self.modules.index(module)
        return any(m in self.trained for m in self.modules[: i + 1])


def stage_path(stage: StageConfig) -> TokenPath:
    """Modules on a stage's token path: stage 1 runs MoonViT + the CoCa towers (the LM is not
    involved); the text pre-stage runs the LM alone; every later stage runs the whole VLM."""
    if stage.kind == "vit_pretrain":
        modules: tuple[str, ...] = ("vision", "caption")
        unit = "patch"
    elif stage.kind == "lm_pretrain":
        modules, unit = ("lm",), "lm"
    else:
        modules, unit = ("vision", "projector", "lm"), "lm"
    return TokenPath(modules, tuple(m for m in modules if m in stage.trainable), unit)


@dataclass(frozen=True)
class ModelCosts:
    """Parameter counts and per-token cost coefficients of one model shape."""

    shape: VLMConfig
    params: dict[str, int]
    """Module group -> parameters: vision, projector, caption, lm (LM with embeddings)."""
    lm_embed: int
    """embed_tokens + lm_head parameters (AdamW-routed)."""
    lm_active: int
    """LM parameters a token uses, embeddings included (the architecture's 'activated' count)."""
    lm_compute: int
    """LM parameters that do matmuls per token: active minus the embedding lookup table."""
    avg_patches_per_image: float
    """Patches per image for ViT attention in LM stages (vision.max_patches: an upper bound)."""

    # --- FLOPs ---------------------------------------------------------------------------------

    def lm_attention_fwd(self, seq_len: int) -> float:
        lm = self.shape.lm
        d_qk = lm.head_dim + (lm.qk_rope_head_dim if lm.attention == "mla" else 0)
        return lm.num_layers * lm.num_heads * (d_qk + lm.head_dim) * seq_len

    def vit_attention_fwd(self, patches_per_image: float) -> float:
        v = self.shape.vision
        return v.num_layers * 4 * v.hidden_size * patches_per_image

    def flops_per_token(
        self,
        path: TokenPath,
        seq_len: int,
        train: bool,
        image_share: float = 0.3,
        patches_per_image: float | None = None,
        text_per_patch: float = 0.0,
    ) -> float:
        """FLOPs per token of `path` (training when `train`, else one forward pass)."""

        def mult(module: str) -> tuple[int, int]:  # (x N, x attention-forward)
            if not train or not path.backward_through(module):
                return 2, 1
            return (6, 3) if module in path.trained else (4, 3)

        merge2 = self.shape.vision.merge_size**2
        total = 0.0
        if path.unit == "patch":  # stage 1: every token is a ViT patch
            p = patches_per_image or self.avg_patches_per_image
            w, a = mult("vision")
            total += w * self.params["vision"] + a * self.vit_attention_fwd(p)
            if "caption" in path.modules:  # CoCa towers run on the caption's text tokens only
                total += mult("caption")[0] * self.params["caption"] * text_per_patch
            return total
        if "lm" in path.modules:
            w, a = mult("lm")
            total += w * self.lm_compute + a * self.lm_attention_fwd(seq_len)
        if "vision" in path.modules:
            w, a = mult("vision")
            vit = w * self.params["vision"] + a * self.vit_attention_fwd(self.avg_patches_per_image)
            total += image_share * (merge2 * vit + mult("projector")[0] * self.params["projector"])
        return total

    # --- activations ---------------------------------------------------------------------------

    def _lm_layer_elems(self) -> tuple[int, int]:
        """Saved elements per token of (a dense layer, a MoE layer), as autograd keeps them in
        model/lm.py (measured one by one with saved-tensor hooks):
        - each RMSNorm + the matmul after it: its input, the normalised x and the weighted output
          the next matmul keeps, plus 1/rms: 3h + 1 (two per layer);
        - attention: q, k (H x d_qk each), v, the output and o_proj's input (H x d_v each) and a
          logsumexp per head; MLA adds its latent (kv_a output, normalised, kv_b's input: 2r +
          rope + 1) and, with q_lora_rank, the query latent (2 r_q + 1);
        - a SwiGLU of width f: gate and up outputs, silu(gate) and the product: 4f;
        - a MoE: the router's fp32 scores and top-k (E + 3k + 1), per routed copy of a token its
          gathered input, the experts' input and the weighted output (3h) plus its expert's 4f
          and its indices (5 in all), and the shared experts' 4f."""
        lm = self.shape.lm
        h, H, k = lm.hidden_size, lm.num_heads, lm.num_experts_per_tok
        mla = lm.attention == "mla"
        d_qk = lm.head_dim + (lm.qk_rope_head_dim if mla else 0)
        norm = 3 * h + 1
        attn = 2 * H * d_qk + 3 * H * lm.head_dim + H
        if mla:
            attn += 2 * lm.kv_lora_rank + lm.qk_rope_head_dim + 1
            attn += 2 * lm.q_lora_rank + 1 if lm.q_lora_rank else 0
        f = lm.moe_intermediate_size
        dense = 2 * norm + attn + 4 * lm.dense_intermediate_size
        router = lm.num_experts + 3 * k + 1
        moe = 2 * norm + attn + router + k * (3 * h + 4 * f + 5) + 4 * lm.num_shared_experts * f
        return dense, moe

    def _lm_layer_fp32_elems(self) -> tuple[int, int]:
        """The part of `_lm_layer_elems` that stays fp32 under bf16 autocast over fp32 weights
        (measured on an H200 with saved-tensor hooks: 4,242 of a dense layer's elements per token
        and 29,722 of a MoE layer's at benchmarks/bench_gpu.py's shapes, against 4,114 and 28,773
        here): each RMSNorm's input (the residual stream, which autocast leaves fp32) and 1/rms,
        attention's logsumexp per head, the router's scores and top-k, and per routed copy of a
        token its gathered input and its weighted output (a bf16 expert output times an fp32
        routing weight)."""
        lm = self.shape.lm
        h, k = lm.hidden_size, lm.num_experts_per_tok
        dense = 2 * (h + 1) + lm.num_heads
        return dense, dense + lm.num_experts + 3 * k + 1 + 2 * k * h

    def _lm_weight_copies(self) -> tuple[float, float, float, float]:
        """Matmul weights autocast casts to bf16, in elements: (a dense layer's, a MoE layer's,
        the logits', all the Linear layers' of the forward). A layer's backward keeps its casts
        until it runs; under recompute only the rebuilt layer's exist, but autocast's cache holds
        every nn.Linear weight's cast (not the experts', which model/experts.py casts itself)
        until the forward's autocast region closes."""
        lm = self.shape.lm
        h, f = lm.hidden_size, lm.moe_intermediate_size
        dense_ffn = 3 * h * lm.dense_intermediate_size
        shared = 3 * h * f * lm.num_shared_experts
        routed = lm.num_experts * (3 * h * f + h)  # experts and the router's weight
        n_moe = lm.num_layers - lm.first_k_dense
        layers = self.params["lm"] - self.lm_embed  # norms' weights included: negligible
        attn = (layers - lm.first_k_dense * dense_ffn - n_moe * (shared + routed)) / lm.num_layers
        head = lm.vocab_size * h
        linear = lm.num_layers * attn + lm.first_k_dense * dense_ffn + n_moe * shared + head
        return attn + dense_ffn, attn + shared + routed, head, linear

    def _vit_layer_elems(self) -> int:
        """Saved elements per patch of a MoonViT block (model/vision.py): per pre-LayerNorm its
        input, output, mean and 1/std (2h + 2, twice); the fused qkv output that v is a view of
        (3h), the rotated q and k (2h), the attention output, a logsumexp per head and wo's input
        (2h + H); the MLP's fc0 output and GELU output (2f)."""
        v = self.shape.vision
        return 11 * v.hidden_size + 2 * v.intermediate_size + v.num_heads + 4

    def _stack_bytes(self, tokens: float, width: int, layers: list[int], ckpt: bool, act: int) -> float:
        # With full recompute only each layer's input (width) stays, plus one layer rebuilt at a time.
        per_token = width * len(layers) + max(layers) if ckpt else sum(layers)
        return act * tokens * per_token

    def lm_head_bytes(self, tokens: float, act: int) -> tuple[float, float]:
        """(saved, backward) bytes of the final norm, the logits and the cross-entropy over V
        (model/lm_loss.py): the norm keeps 3h + 1 per token. Unchunked, only log_softmax's fp32
        output stays until the backward (the logits and their fp32 copy are freed once it is
        computed), which starts by allocating the fp32 gradient of the log-probabilities and
        the logits' gradient. Chunked (above CE_CHUNK_ELEMS logit entries), nothing of the
        logits stays: the backward rebuilds one chunk's (logits, fp32 copy, log-probabilities)
        and their gradients at a time."""
        from moonforge.model.lm_loss import CE_CHUNK_ELEMS, chunk_tokens  # torch: only when planning

        lm = self.shape.lm
        V = lm.vocab_size
        upcast = FP32 if act != FP32 else 0
        norm = tokens * act * (3 * lm.hidden_size + 1)
        if tokens * V > CE_CHUNK_ELEMS:
            return norm, min(tokens, chunk_tokens(V)) * V * (act + upcast + FP32 + FP32 + act)
        return norm + tokens * V * FP32, tokens * V * (FP32 + act)

    def _cp_key_elems(self) -> int:
        """Saved elements per gathered key position of one layer under context parallelism
        (model/lm.py): MLA keeps kv_b_proj's input (the gathered latent, r) and the expanded
        keys and values attention saves (H x (d_qk + d_v)); MHA the keys and values shared out
        to H heads (2 H d)."""
        lm = self.shape.lm
        if lm.attention == "mla":
            d_qk = lm.head_dim + lm.qk_rope_head_dim
            return lm.kv_lora_rank + lm.num_heads * (d_qk + lm.head_dim)
        return 2 * lm.num_heads * lm.head_dim

    def _lm_activation_bytes(self, tokens: int, ckpt: bool, act: int, cp: int, seq_len: int) -> float:
        """The LM's part of `activation_bytes`. With `act` narrower than fp32 the step autocasts
        over fp32 weights (stages/train/loop.py): the residual stream and what is computed from
        it outside the matmuls stay fp32 (`_lm_layer_fp32_elems`); every matmul weight has a bf16
        cast alive until its backward (`_lm_weight_copies`); and a layer's backward makes its
        weights' gradients in bf16, then their fp32 copies, before adding them to the fp32
        grads (2 act + 4 bytes per weight, one layer at a time)."""
        lm = self.shape.lm
        autocast = act < FP32
        n_moe = lm.num_layers - lm.first_k_dense
        (dense, moe), (dense32, moe32) = self._lm_layer_elems(), self._lm_layer_fp32_elems()
        if not autocast:
            dense32 = moe32 = 0
        per_token = [act * dense + (FP32 - act) * dense32] * lm.first_k_dense
        per_token += [act * moe + (FP32 - act) * moe32] * n_moe
        dense_w, moe_w, head_w, linear_w = self._lm_weight_copies() if autocast else (0.0,) * 4
        last_w = moe_w if n_moe else dense_w  # the first layer the backward reaches
        biggest_w = max(dense_w * (lm.first_k_dense > 0), moe_w * (n_moe > 0))
        saved, backward = self.lm_head_bytes(tokens, act)
        gathered = act * tokens * (cp - 1) * self._cp_key_elems()  # per layer
        mask = tokens * seq_len if cp > 1 else 0.0
        if ckpt:  # the layers' inputs stay; the peak is the backward's start, the forward's end
            # (autocast's cache of every Linear weight), or one layer rebuilt and back-propagated
            inputs = (FP32 if autocast else act) * tokens * lm.hidden_size * lm.num_layers
            rebuilt = tokens * max(per_token) + gathered + (2 * act + FP32) * biggest_w  # cast, grads
            peak = max(saved + backward + act * head_w, saved + act * linear_w, rebuilt)
            return inputs + mask + peak
        casts = act * (dense_w * lm.first_k_dense + moe_w * n_moe + head_w)
        stack = tokens * sum(per_token) + gathered * lm.num_layers
        return stack + mask + saved + casts + max(backward, (act + FP32) * last_w)

    def activation_bytes(
        self,
        path: TokenPath,
        tokens: int,
        image_share: float,
        ckpt: bool,
        act_bytes: int = BF16,
        cp: int = 1,
        seq_len: int = 0,
    ) -> float:
        """Peak activation bytes of one micro-batch of `tokens` tokens on one GPU (activations in
        `act_bytes`-wide floats). Modules that no backward reaches run under no_grad and keep
        nothing. The LM's peak is at the start of the backward (every saved tensor, the logits
        and the cross-entropy's gradient buffers), or, under recompute, whichever is larger of
        that and the layer inputs plus one layer rebuilt.

        Context parallelism over `cp` ranks (`tokens` is then this rank's slice of sequences of
        `seq_len`; model/context_parallel.py): the rank holding the sequence's last chunk (rank 0
        under the zig-zag split) also keeps in every layer the keys gathered from the other cp - 1
        slices, and the batch's attention mask (at most one byte per query and key: the kernel
        pads per document and query chunk; shared by every layer); the vision tower encodes the
        slice's images."""
        total = 0.0
        v = self.shape.vision
        if "lm" in path.modules and path.backward_through("lm"):
            total += self._lm_activation_bytes(tokens, ckpt, act_bytes, cp, seq_len)
        if "vision" in path.modules and path.backward_through("vision"):
            # under context parallelism a rank encodes the images of its own slice
            patches = tokens if path.unit == "patch" else tokens * image_share * v.merge_size**2
            vit_layers = [self._vit_layer_elems()] * v.num_layers
            total += self._stack_bytes(patches, v.hidden_size, vit_layers, ckpt, act_bytes)
        return total


@lru_cache(maxsize=8)  # building on the meta device takes ~1 s; a shape (frozen, hashable) is a key
def model_costs(shape: VLMConfig) -> ModelCosts:
    """ModelCosts of `shape` (counts from the real modules on the meta device)."""
    from moonforge.model.vlm import param_counts  # torch import: only when a plan is made

    c = param_counts(shape)
    lm_head = shape.lm.vocab_size * shape.lm.hidden_size  # a real matmul per token, tied or not
    return ModelCosts(
        shape=shape,
        params={
            "vision": c["vision"],
            "projector": c["projector"],
            "caption": c["caption"],
            "lm": c["lm_total"],
        },
        lm_embed=c["lm_embed"],
        lm_active=c["lm_active"],
        lm_compute=c["lm_active_no_embed"] + lm_head,
        avg_patches_per_image=float(shape.vision.max_patches),
    )

"""Moonlight / DeepSeek-V3-small style decoder LM over packed documents.

Blocks are pre-RMSNorm: h += attn(norm(h)); h += ffn(norm(h)). The first `first_k_dense` blocks use
a dense SwiGLU, the rest the sigmoid-routed MoE of `moe.py` (first_k_dense = num_layers gives a
dense Llama / Qwen2-style LM). lm_head is untied unless `tie_word_embeddings`, in which case there
is no lm_head parameter at all and `logits` multiplies by embed_tokens' weight (so a state dict
never holds two names for one tensor, which safetensors refuses).

Attention (config `attention`):
- `mla`: DeepSeek-V3 multi-head latent attention.
  q = q_proj(x), or q_b_proj(RMSNorm(q_a_proj(x))) when q_lora_rank is set,
  -> per head [nope (head_dim) | rope (qk_rope_head_dim)].
  kv_a_proj_with_mqa(x) -> [c_kv (kv_lora_rank) | k_rope (qk_rope_head_dim, ONE shared head)];
  kv_b_proj(RMSNorm(c_kv)) -> per head [k_nope (head_dim) | v (head_dim)].
  RoPE touches only the rope slices; softmax scale = (head_dim + qk_rope_head_dim) ** -0.5.
- `mha`: multi-head attention with RoPE over the whole head_dim (which must be even), optional
  grouped-query attention (`num_kv_heads` key/value heads, each shared by a run of
  num_heads / num_kv_heads consecutive query heads, as HF's repeat_kv) and optional q/k/v and
  o_proj biases.

What is unusual:
- Attention is causal AND block-diagonal by `doc_ids_BL` (packed documents never see each other;
  -1 marks padding). Position ids come from the caller, typically restarting per document. The
  layout is turned into attention metadata once per forward (`hidden`) and every block reuses it.
- RoPE holds no state (see rope.py): set `rope_theta` in a new config and load the same weights.
- KV cache (`hidden_cached`, see kv_cache.py): MLA caches the compressed latent [c_kv | k_rope]
  from `MLA.compress`, which is the whole point of MLA. The prefill expands per-head k, v from it
  (`MLA.expand`); decoding steps attend in the latent space instead ("absorbed": kv_b_proj's
  key half folds into the query and its value half into the output, DeepSeek-V2 section 2.1.3),
  so a step costs O(K * (R + Dr)) per head instead of re-expanding all K cached positions. MHA
  caches the rotated k and v of its Hkv key/value heads only.

Legend: B batch rows, L sequence length, D hidden, H heads, Hkv key/value heads (MHA), Dn =
head_dim (no-RoPE part and v), Dr rope dims, R kv_lora_rank, Rq q_lora_rank, P rope pairs,
V vocab, T = B*L tokens, Q new positions of a cached step, K cached positions including them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moonforge.model.attention import (
    AttnMeta,
    Backend,
    activation_dtype,
    attend_cached,
    attention,
    attention_meta,
    cp_attention_meta,
    cp_keys,
    resolve_backend,
)
from moonforge.model.config import LMConfig
from moonforge.model.context_parallel import ContextParallel
from moonforge.model.experts import ExpertsImpl, GroupedExperts
from moonforge.model.kv_cache import KVCache, LayerCache
from moonforge.model.lm_loss import IGNORE, cross_entropy_from_hidden
from moonforge.model.moe import MoE, Router, SwiGLU
from moonforge.model.rope import Rope1D, apply_rotary


class MLA(nn.Module):
    """Multi-head latent attention. forward(x_BLD, cos, sin, meta) -> x_BLD."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_heads
        self.H, self.Dn, self.Dr, self.R = H, cfg.head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        self.scale = (self.Dn + self.Dr) ** -0.5
        latent_eps = cfg.latent_norm_eps or cfg.rms_norm_eps
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * (self.Dn + self.Dr), bias=False)
        else:  # HF DeepseekV3 names; q_a_proj has no bias (attention_bias is refused on import)
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(cfg.q_lora_rank, eps=latent_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (self.Dn + self.Dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.R + self.Dr, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(self.R, eps=latent_eps)
        self.kv_b_proj = nn.Linear(self.R, H * 2 * self.Dn, bias=False)
        self.o_proj = nn.Linear(H * self.Dn, D, bias=cfg.attention_out_bias)

    def compress(self, x_BLD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor) -> tuple[Tensor, Tensor]:
        """The cacheable latent: (c_kv_BLR normalised, k_rope_B1LDr already rotated)."""
        B, L, _ = x_BLD.shape
        c_kv_BLR, k_rope_BLDr = self.kv_a_proj_with_mqa(x_BLD).split([self.R, self.Dr], dim=-1)
        k_rope_B1LDr = apply_rotary(k_rope_BLDr[:, None], cos_BLP, sin_BLP)
        # .float(): under bf16 autocast the latent comes out of its matmul in bf16 while the
        # norm's weight is fp32, and rms_norm then runs unfused (with a warning per call); an
        # fp32 input takes the fused kernel and gives the same fp32 output (a no-op in fp32)
        return self.kv_a_layernorm(c_kv_BLR.float()), k_rope_B1LDr

    def expand(self, c_kv_BLR: Tensor, k_rope_B1LDr: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys (B, H, L, Dn + Dr) and values (B, H, L, Dn) from the latent."""
        B, L, _ = c_kv_BLR.shape
        kv_BHLX = self.kv_b_proj(c_kv_BLR).view(B, L, self.H, 2 * self.Dn).transpose(1, 2)
        k_nope_BHLDn, v_BHLDn = kv_BHLX.split([self.Dn, self.Dn], dim=-1)
        k_BHLX = torch.cat([k_nope_BHLDn, k_rope_B1LDr.expand(B, self.H, L, self.Dr)], dim=-1)
        return k_BHLX, v_BHLDn

    def queries(self, x_BLD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor) -> Tensor:
        """Per-head queries (B, H, L, Dn + Dr), rope slice rotated."""
        B, L, _ = x_BLD.shape
        if self.q_lora_rank is None:
            q_BLX = self.q_proj(x_BLD)
        else:
            q_BLX = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BLD).float()))  # see compress
        q_BHLX = q_BLX.view(B, L, self.H, self.Dn + self.Dr).transpose(1, 2)
        q_nope, q_rope = q_BHLX.split([self.Dn, self.Dr], dim=-1)
        return torch.cat([q_nope, apply_rotary(q_rope, cos_BLP, sin_BLP)], dim=-1)

    def forward(self, x_BLD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor, meta: AttnMeta) -> Tensor:
        B, L, _ = x_BLD.shape
        q_BHLX = self.queries(x_BLD, cos_BLP, sin_BLP)
        c_kv_BLR, k_rope_B1LDr = self.compress(x_BLD, cos_BLP, sin_BLP)
        if meta.cp is not None:  # context parallel: gather the latent, not the expanded heads
            latent_B1KX = cp_keys(meta, torch.cat([c_kv_BLR[:, None], k_rope_B1LDr], dim=-1), 2)
            c_kv_BLR, k_rope_B1LDr = latent_B1KX[:, 0, :, : self.R], latent_B1KX[..., self.R :]
        k_BHLX, v_BHLDn = self.expand(c_kv_BLR, k_rope_B1LDr)
        out_BHLDn = attention(q_BHLX, k_BHLX, v_BHLDn, meta, scale=self.scale)
        return self.o_proj(out_BHLDn.transpose(1, 2).reshape(B, L, self.H * self.Dn))

    def forward_cached(
        self,
        x_BQD: Tensor,
        cos_BQP: Tensor,
        sin_BQP: Tensor,
        doc_ids_BK: Tensor,
        cache: LayerCache,
        start: int,
    ) -> Tensor:
        """Attend Q new positions over the cache; stores their latent at [start, start + Q).

        The prefill (start 0) expands per-head k, v; later steps use `attend_absorbed`.
        """
        B, Q, _ = x_BQD.shape
        q_BHQX = self.queries(x_BQD, cos_BQP, sin_BQP)
        c_kv_BQR, k_rope_B1QDr = self.compress(x_BQD, cos_BQP, sin_BQP)
        (latent_B1KX,) = cache.write(start, torch.cat([c_kv_BQR[:, None], k_rope_B1QDr], dim=-1))
        if start == 0:
            c_kv_BKR, k_rope_B1KDr = latent_B1KX[:, 0, :, : self.R], latent_B1KX[..., self.R :]
            k_BHKX, v_BHKDn = self.expand(c_kv_BKR, k_rope_B1KDr)
            out_BHQDn = attend_cached(q_BHQX, k_BHKX, v_BHKDn, doc_ids_BK, scale=self.scale)
        else:
            out_BHQDn = self.attend_absorbed(q_BHQX, latent_B1KX, doc_ids_BK)
        return self.o_proj(out_BHQDn.transpose(1, 2).reshape(B, Q, self.H * self.Dn))

    def attend_absorbed(self, q_BHQX: Tensor, latent_B1KX: Tensor, doc_ids_BK: Tensor) -> Tensor:
        """Attention of Q queries over K cached latents without expanding them: (B, H, Q, Dn).

        q_nope . k_nope = (q_nope W_uk) . c_kv, and p @ v = (p @ c_kv) W_uv^T, with W_uk, W_uv
        the key / value rows of kv_b_proj per head. Equal to the expanded form up to float
        summation order (tests/test_model_attention_meta.py).
        """
        B, H, Q, _ = q_BHQX.shape
        K = latent_B1KX.shape[2]
        w_HXR = self.kv_b_proj.weight.view(H, 2 * self.Dn, self.R)
        w_uk_HDnR, w_uv_HDnR = w_HXR[:, : self.Dn], w_HXR[:, self.Dn :]
        q_nope_BHQDn, q_rope_BHQDr = q_BHQX.split([self.Dn, self.Dr], dim=-1)
        q_lat_BHQX = torch.cat([q_nope_BHQDn @ w_uk_HDnR, q_rope_BHQDr], dim=-1)
        k_BHKX = latent_B1KX.expand(B, H, K, self.R + self.Dr)
        out_BHQR = attend_cached(q_lat_BHQX, k_BHKX, k_BHKX[..., : self.R], doc_ids_BK, scale=self.scale)
        return out_BHQR @ w_uv_HDnR.transpose(1, 2)


class MHA(nn.Module):
    """Multi-head attention with RoPE on the full head dim, optional GQA and biases."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        if cfg.head_dim % 2:
            raise ValueError(f"model.lm.head_dim={cfg.head_dim} must be even for RoPE in mha")
        D, H, Dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        Hkv = cfg.num_kv_heads or H
        self.H, self.Hkv, self.Dh = H, Hkv, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=cfg.attention_out_bias)

    def qkv(self, x_BLD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, L, Dh) and k, v (B, Hkv, L, Dh); q and k rotated."""
        B, L, _ = x_BLD.shape

        def heads(proj: nn.Linear, num_heads: int) -> Tensor:
            return proj(x_BLD).view(B, L, num_heads, self.Dh).transpose(1, 2)

        q_BHLD = apply_rotary(heads(self.q_proj, self.H), cos_BLP, sin_BLP)
        k_BHLD = apply_rotary(heads(self.k_proj, self.Hkv), cos_BLP, sin_BLP)
        return q_BHLD, k_BHLD, heads(self.v_proj, self.Hkv)

    def share_kv(self, x_BHkvLD: Tensor) -> Tensor:
        """(B, Hkv, L, Dh) -> (B, H, L, Dh): query head h reads key/value head h // (H / Hkv)."""
        if self.Hkv == self.H:
            return x_BHkvLD
        return x_BHkvLD.repeat_interleave(self.H // self.Hkv, dim=1)

    def forward(self, x_BLD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor, meta: AttnMeta) -> Tensor:
        B, L, _ = x_BLD.shape
        q_BHLD, k_BHLD, v_BHLD = self.qkv(x_BLD, cos_BLP, sin_BLP)
        if meta.cp is not None:  # context parallel: one gather of the Hkv-head keys and values
            kv_BHKX = cp_keys(meta, torch.cat([k_BHLD, v_BHLD], dim=-1), 2)
            k_BHLD, v_BHLD = kv_BHKX.split([self.Dh, self.Dh], dim=-1)
        out_BHLD = attention(q_BHLD, self.share_kv(k_BHLD), self.share_kv(v_BHLD), meta)
        return self.o_proj(out_BHLD.transpose(1, 2).reshape(B, L, self.H * self.Dh))

    def forward_cached(
        self,
        x_BQD: Tensor,
        cos_BQP: Tensor,
        sin_BQP: Tensor,
        doc_ids_BK: Tensor,
        cache: LayerCache,
        start: int,
    ) -> Tensor:
        """Attend Q new positions over the cache; stores their Hkv-head k, v at
        [start, start + Q)."""
        B, Q, _ = x_BQD.shape
        q_BHQD, k_BHQD, v_BHQD = self.qkv(x_BQD, cos_BQP, sin_BQP)
        k_BHKD, v_BHKD = cache.write(start, k_BHQD, v_BHQD)
        out_BHQD = attend_cached(q_BHQD, self.share_kv(k_BHKD), self.share_kv(v_BHKD), doc_ids_BK)
        return self.o_proj(out_BHQD.transpose(1, 2).reshape(B, Q, self.H * self.Dh))


class DecoderBlock(nn.Module):
    """RMSNorm -> attention -> residual; RMSNorm -> dense SwiGLU or MoE -> residual."""

    def __init__(self, cfg: LMConfig, layer: int, experts_impl: ExpertsImpl = "auto") -> None:
        super().__init__()
        D = cfg.hidden_size
        self.input_layernorm = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.self_attn = MLA(cfg) if cfg.attention == "mla" else MHA(cfg)
        self.post_attention_layernorm = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.is_moe = layer >= cfg.first_k_dense
        self.mlp = MoE(cfg, experts_impl) if self.is_moe else SwiGLU(D, cfg.dense_intermediate_size)

    def forward(self, h_BLD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor, meta: AttnMeta) -> Tensor:
        h_BLD = h_BLD + self.self_attn(self.input_layernorm(h_BLD), cos_BLP, sin_BLP, meta)
        return self.ffn(h_BLD)

    def forward_cached(
        self,
        h_BQD: Tensor,
        cos_BQP: Tensor,
        sin_BQP: Tensor,
        doc_ids_BK: Tensor,
        cache: LayerCache,
        start: int,
    ) -> Tensor:
        """`forward` for Q new positions whose keys/values go to `cache` at `start`."""
        h_BQD = h_BQD + self.self_attn.forward_cached(
            self.input_layernorm(h_BQD), cos_BQP, sin_BQP, doc_ids_BK, cache, start
        )
        return self.ffn(h_BQD)

    def ffn(self, h_BLD: Tensor) -> Tensor:
        """The residual FFN half of the block: h + mlp(norm(h))."""
        x_BLD = self.post_attention_layernorm(h_BLD)
        if self.is_moe:  # the MoE works on a flat token list
            return h_BLD + self.mlp(x_BLD.flatten(0, 1)).view_as(h_BLD)
        return h_BLD + self.mlp(x_BLD)


class MoELM(nn.Module):
    """Token embedding -> decoder blocks -> RMSNorm -> lm_head (or the tied embedding).

    `backend` (attention, see attention.py) and `experts_impl` (experts.py) are runtime choices,
    not part of the shape config: the same weights run on any device. So is
    `context_parallel` (context_parallel.py): set by the training loop while a context-parallel
    stage trains, None otherwise.
    """

    context_parallel: ContextParallel | None = None

    def __init__(self, cfg: LMConfig, backend: Backend = "auto", experts_impl: ExpertsImpl = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        resolve_backend(backend, "cpu")  # reject unknown names at build
        self.attn_backend = backend
        rope_dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
        self.rope = Rope1D(rope_dim, cfg.rope_theta, max_len=cfg.max_position_embeddings)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i, experts_impl) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        # Tied: no module at all, so the state dict and optimizer see embed_tokens.weight once.
        self.lm_head: nn.Linear | None = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) for embeddings, projections and router weights; output projections
        (o_proj, down_proj) get std / sqrt(2 * num_layers) (GPT-2 style); norms to one; router
        and projection biases to zero."""
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, GroupedExperts):
                m.reset_parameters(std, out_std)
            elif isinstance(m, (nn.Linear, nn.Embedding, Router)):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(m.weight, std=out_std if is_out else std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, Router):
                m.e_score_correction_bias.zero_()

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    def embed(self, input_ids_BL: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L, D) input embeddings."""
        return self.embed_tokens(input_ids_BL)

    def logits(self, h_XD: Tensor) -> Tensor:
        """Normed hidden states (..., D) -> logits (..., V): lm_head, or embed_tokens' weight
        when tied. Use this, never `lm_head` directly (it is None when tied)."""
        if self.lm_head is None:
            return F.linear(h_XD, self.embed_tokens.weight)
        return self.lm_head(h_XD)

    def attention_meta(self, doc_ids_BL: Tensor, h_BLD: Tensor) -> AttnMeta:
        """This batch's attention metadata for every block (built once per forward)."""
        backend = resolve_backend(self.attn_backend, h_BLD.device)
        return attention_meta(doc_ids_BL, True, backend, activation_dtype(h_BLD))

    def hidden(self, h_BLD: Tensor, position_ids_BL: Tensor, doc_ids_BL: Tensor) -> Tensor:
        """Run the blocks and the final norm on input embeddings: (B, L, D) -> (B, L, D). Under
        context parallelism h is this rank's slice (B, Lc, D) and so is the output; positions and
        doc ids are the whole sequence's."""
        cp = self.context_parallel
        if cp is not None:  # h is this rank's slice; positions and the layout come whole
            if h_BLD.shape[1] * cp.size != doc_ids_BL.shape[1]:
                raise ValueError(
                    f"a context-parallel LM over {cp.size} ranks takes this rank's slice of the "
                    f"embeddings ({doc_ids_BL.shape[1] // cp.size} positions) but got {h_BLD.shape[1]}"
                )
            meta = cp_attention_meta(doc_ids_BL, cp)
            position_ids_BL = cp.shard(position_ids_BL)
        else:
            meta = self.attention_meta(doc_ids_BL, h_BLD)
        cos_BLP, sin_BLP = self.rope(position_ids_BL)
        for layer in self.layers:
            h_BLD = layer(h_BLD, cos_BLP, sin_BLP, meta)
        return self.norm(h_BLD)

    def hidden_cached(
        self, h_BQD: Tensor, position_ids_BQ: Tensor, doc_ids_BQ: Tensor, cache: KVCache
    ) -> Tensor:
        """`hidden` for Q new positions appended after the `cache.length` cached ones.

        Returns (B, Q, D) normed hidden states (apply `logits` for logits) and advances the
        cache by Q. Equals rows [K - Q, K) of `hidden` over the whole sequence, K = length + Q.
        Prefill is one call with the whole (left-padded) prompt; decoding then passes Q = 1.
        """
        start, Q = cache.length, h_BQD.shape[1]
        doc_ids_BK = cache.push_doc_ids(doc_ids_BQ)
        # Look positions up in a table sized for the largest one: a decode step has L = 1.
        cos_LP, sin_LP = self.rope.table(int(position_ids_BQ.max()) + 1, h_BQD.device)
        cos_BQP, sin_BQP = cos_LP[position_ids_BQ], sin_LP[position_ids_BQ]
        for layer, layer_cache in zip(cast(Iterable[DecoderBlock], self.layers), cache.layers):
            h_BQD = layer.forward_cached(h_BQD, cos_BQP, sin_BQP, doc_ids_BK, layer_cache, start)
        cache.advance(Q)
        return self.norm(h_BQD)

    def forward(
        self,
        input_ids_BL: Tensor | None,
        position_ids_BL: Tensor,
        doc_ids_BL: Tensor,
        inputs_embeds_BLD: Tensor | None = None,
        labels_BL: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, L, V) from token ids OR precomputed embeddings (exactly one of the two);
        with `labels_BL`, the mean next-token cross-entropy over its labelled (!= -100) positions
        instead, computed without keeping big logits (model/lm_loss.py).

        Causal within each packed document of `doc_ids_BL` (-1 = padding; padded logits are
        meaningless and must be masked by the loss). Under context parallelism: labels only, and
        `inputs_embeds_BLD` is this rank's slice (token ids, positions and labels come whole).
        """
        if (input_ids_BL is None) == (inputs_embeds_BLD is None):
            raise ValueError("pass exactly one of input_ids_BL and inputs_embeds_BLD")
        cp = self.context_parallel
        if cp is not None and labels_BL is None:
            raise ValueError(
                "a context-parallel LM computes the training loss only (pass labels_BL); "
                "logits need the whole sequence: run without context parallelism"
            )
        if inputs_embeds_BLD is None:
            assert input_ids_BL is not None  # exactly one of the two, checked above
            h_BLD = self.embed(input_ids_BL if cp is None else cp.shard(input_ids_BL))
        else:
            h_BLD = inputs_embeds_BLD
        h_BLD = self.hidden(h_BLD, position_ids_BL, doc_ids_BL)
        if labels_BL is None:
            return self.logits(h_BLD)
        if cp is None:
            h_TD, labels_T = h_BLD.flatten(0, 1), labels_BL.flatten()
            return cross_entropy_from_hidden(h_TD, self.logits, labels_T, self.cfg.vocab_size)
        # this rank's token losses over the whole micro-batch's count, summed over the group
        n = (labels_BL != IGNORE).sum()
        h_TD, labels_T = h_BLD.flatten(0, 1), cp.shard(labels_BL).flatten()
        part = cross_entropy_from_hidden(h_TD, self.logits, labels_T, self.cfg.vocab_size, denominator=n)
        return cp.sum(part)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(layer index, MoE) for every MoE block."""
        blocks = cast(Iterable[DecoderBlock], self.layers)
        return [(i, cast(MoE, blk.mlp)) for i, blk in enumerate(blocks) if blk.is_moe]

    def update_router_biases(self, u: float) -> dict[str, float]:
        """Apply the aux-loss-free bias step to every MoE layer; returns load-imbalance metrics.

        Keys: `router/max_over_mean/layer_{i}` per MoE layer, plus `router/max_over_mean` (worst
        layer) and `router/max_over_mean_avg` (mean over layers). Empty dict with no MoE layers.
        """
        metrics = {f"router/max_over_mean/layer_{i}": moe.update_bias(u) for i, moe in self.moe_layers()}
        if metrics:
            vals = list(metrics.values())
            metrics["router/max_over_mean"] = max(vals)
            metrics["router/max_over_mean_avg"] = sum(vals) / len(vals)
        return metrics

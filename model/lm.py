"""Moonlight / DeepSeek-V3-small style decoder LM over packed documents.

Blocks are pre-RMSNorm: h += attn(norm(h)); h += ffn(norm(h)). The first `first_k_dense` blocks use
a dense SwiGLU, the rest the sigmoid-routed MoE of `moe.py`. Embeddings and lm_head are untied.

Attention (config `attention`):
- `mla`: DeepSeek-V3 multi-head latent attention with q_lora_rank = null (full q projection).
  q = q_proj(x) -> per head [nope (head_dim) | rope (qk_rope_head_dim)].
  kv_a_proj_with_mqa(x) -> [c_kv (kv_lora_rank) | k_rope (qk_rope_head_dim, ONE shared head)];
  kv_b_proj(RMSNorm(c_kv)) -> per head [k_nope (head_dim) | v (head_dim)].
  RoPE touches only the rope slices; softmax scale = (head_dim + qk_rope_head_dim) ** -0.5.
- `mha`: plain multi-head attention with RoPE over the whole head_dim (which must be even).

What is unusual:
- Attention is causal AND block-diagonal by `doc_ids_BL` (packed documents never see each other;
  -1 marks padding). Position ids come from the caller, typically restarting per document.
- RoPE holds no state (see rope.py): set `rope_theta` in a new config and load the same weights.
- KV cache (`hidden_cached`, see kv_cache.py): MLA caches the compressed (c_kv, k_rope) from
  `MLA.compress`, which is the whole point of MLA, and re-expands per-head k, v with `MLA.expand`
  at every step; MHA caches the rotated k and v.

Legend: B batch rows, L sequence length, D hidden, H heads, Dn = head_dim (no-RoPE part and v),
Dr rope dims, R kv_lora_rank, P rope pairs, V vocab, T = B*L tokens, Q new positions of a cached
step, K cached positions including them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moonforge.model.attention import Backend, attend, attend_cached
from moonforge.model.config import LMConfig
from moonforge.model.kv_cache import KVCache, LayerCache
from moonforge.model.moe import MoE, Router, SwiGLU
from moonforge.model.rope import Rope1D, apply_rotary


class MLA(nn.Module):
    """Multi-head latent attention, q_lora_rank = null. forward(x_BLD, cos, sin, doc) -> x_BLD."""

    def __init__(self, cfg: LMConfig, backend: Backend) -> None:
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_heads
        self.H, self.Dn, self.Dr, self.R = H, cfg.head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        self.backend = backend
        self.scale = (self.Dn + self.Dr) ** -0.5
        self.q_proj = nn.Linear(D, H * (self.Dn + self.Dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.R + self.Dr, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(self.R, eps=cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.R, H * 2 * self.Dn, bias=False)
        self.o_proj = nn.Linear(H * self.Dn, D, bias=False)

    def compress(self, x_BLD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor) -> tuple[Tensor, Tensor]:
        """The cacheable latent: (c_kv_BLR normalised, k_rope_B1LDr already rotated)."""
        B, L, _ = x_BLD.shape
        c_kv_BLR, k_rope_BLDr = self.kv_a_proj_with_mqa(x_BLD).split([self.R, self.Dr], dim=-1)
        k_rope_B1LDr = apply_rotary(k_rope_BLDr[:, None], cos_BLP, sin_BLP)
        return self.kv_a_layernorm(c_kv_BLR), k_rope_B1LDr

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
        q_BHLX = self.q_proj(x_BLD).view(B, L, self.H, self.Dn + self.Dr).transpose(1, 2)
        q_nope, q_rope = q_BHLX.split([self.Dn, self.Dr], dim=-1)
        return torch.cat([q_nope, apply_rotary(q_rope, cos_BLP, sin_BLP)], dim=-1)

    def forward(self, x_BLD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor,
                doc_ids_BL: Tensor) -> Tensor:
        B, L, _ = x_BLD.shape
        q_BHLX = self.queries(x_BLD, cos_BLP, sin_BLP)
        k_BHLX, v_BHLDn = self.expand(*self.compress(x_BLD, cos_BLP, sin_BLP))
        out_BHLDn = attend(q_BHLX, k_BHLX, v_BHLDn, doc_ids_BL, causal=True,
                           backend=self.backend, scale=self.scale)
        return self.o_proj(out_BHLDn.transpose(1, 2).reshape(B, L, self.H * self.Dn))

    def forward_cached(self, x_BQD: Tensor, cos_BQP: Tensor, sin_BQP: Tensor,
                       doc_ids_BK: Tensor, cache: LayerCache, start: int) -> Tensor:
        """Attend Q new positions over the cache; stores their latent at [start, start + Q)."""
        B, Q, _ = x_BQD.shape
        q_BHQX = self.queries(x_BQD, cos_BQP, sin_BQP)
        c_kv_BKR, k_rope_B1KDr = cache.write(start, *self.compress(x_BQD, cos_BQP, sin_BQP))
        k_BHKX, v_BHKDn = self.expand(c_kv_BKR, k_rope_B1KDr)
        out_BHQDn = attend_cached(q_BHQX, k_BHKX, v_BHKDn, doc_ids_BK, scale=self.scale)
        return self.o_proj(out_BHQDn.transpose(1, 2).reshape(B, Q, self.H * self.Dn))


class MHA(nn.Module):
    """Plain multi-head attention with RoPE on the full head dim."""

    def __init__(self, cfg: LMConfig, backend: Backend) -> None:
        super().__init__()
        if cfg.head_dim % 2:
            raise ValueError(f"model.lm.head_dim={cfg.head_dim} must be even for RoPE in mha")
        D, H, Dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.H, self.Dh, self.backend = H, Dh, backend
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, H * Dh, bias=False)
        self.v_proj = nn.Linear(D, H * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)

    def qkv(self, x_BLD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head (q, k, v), each (B, H, L, Dh); q and k rotated."""
        B, L, _ = x_BLD.shape

        def heads(proj: nn.Linear) -> Tensor:
            return proj(x_BLD).view(B, L, self.H, self.Dh).transpose(1, 2)

        q_BHLD = apply_rotary(heads(self.q_proj), cos_BLP, sin_BLP)
        k_BHLD = apply_rotary(heads(self.k_proj), cos_BLP, sin_BLP)
        return q_BHLD, k_BHLD, heads(self.v_proj)

    def forward(self, x_BLD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor,
                doc_ids_BL: Tensor) -> Tensor:
        B, L, _ = x_BLD.shape
        q_BHLD, k_BHLD, v_BHLD = self.qkv(x_BLD, cos_BLP, sin_BLP)
        out_BHLD = attend(q_BHLD, k_BHLD, v_BHLD, doc_ids_BL, causal=True, backend=self.backend)
        return self.o_proj(out_BHLD.transpose(1, 2).reshape(B, L, self.H * self.Dh))

    def forward_cached(self, x_BQD: Tensor, cos_BQP: Tensor, sin_BQP: Tensor,
                       doc_ids_BK: Tensor, cache: LayerCache, start: int) -> Tensor:
        """Attend Q new positions over the cache; stores their k, v at [start, start + Q)."""
        B, Q, _ = x_BQD.shape
        q_BHQD, k_BHQD, v_BHQD = self.qkv(x_BQD, cos_BQP, sin_BQP)
        k_BHKD, v_BHKD = cache.write(start, k_BHQD, v_BHQD)
        out_BHQD = attend_cached(q_BHQD, k_BHKD, v_BHKD, doc_ids_BK)
        return self.o_proj(out_BHQD.transpose(1, 2).reshape(B, Q, self.H * self.Dh))


class DecoderBlock(nn.Module):
    """RMSNorm -> attention -> residual; RMSNorm -> dense SwiGLU or MoE -> residual."""

    def __init__(self, cfg: LMConfig, layer: int, backend: Backend) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.input_layernorm = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, backend) if cfg.attention == "mla" else MHA(cfg, backend)
        self.post_attention_layernorm = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.is_moe = layer >= cfg.first_k_dense
        self.mlp = MoE(cfg) if self.is_moe else SwiGLU(D, cfg.dense_intermediate_size)

    def forward(self, h_BLD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor,
                doc_ids_BL: Tensor) -> Tensor:
        h_BLD = h_BLD + self.self_attn(self.input_layernorm(h_BLD), cos_BLP, sin_BLP, doc_ids_BL)
        return self.ffn(h_BLD)

    def forward_cached(self, h_BQD: Tensor, cos_BQP: Tensor, sin_BQP: Tensor,
                       doc_ids_BK: Tensor, cache: LayerCache, start: int) -> Tensor:
        """`forward` for Q new positions whose keys/values go to `cache` at `start`."""
        h_BQD = h_BQD + self.self_attn.forward_cached(self.input_layernorm(h_BQD), cos_BQP,
                                                      sin_BQP, doc_ids_BK, cache, start)
        return self.ffn(h_BQD)

    def ffn(self, h_BLD: Tensor) -> Tensor:
        """The residual FFN half of the block: h + mlp(norm(h))."""
        x_BLD = self.post_attention_layernorm(h_BLD)
        if self.is_moe:  # the MoE works on a flat token list
            return h_BLD + self.mlp(x_BLD.flatten(0, 1)).view_as(h_BLD)
        return h_BLD + self.mlp(x_BLD)


class MoELM(nn.Module):
    """Token embedding -> decoder blocks -> RMSNorm -> untied lm_head."""

    def __init__(self, cfg: LMConfig, backend: Backend = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        rope_dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
        self.rope = Rope1D(rope_dim, cfg.rope_theta, max_len=cfg.max_position_embeddings)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i, backend) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) for embeddings, projections and router weights; output projections
        (o_proj, down_proj) get std / sqrt(2 * num_layers) (GPT-2 style); norms to one; router
        biases to zero."""
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, (nn.Linear, nn.Embedding, Router)):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(m.weight, std=out_std if is_out else std)
            if isinstance(m, Router):
                m.e_score_correction_bias.zero_()

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    def embed(self, input_ids_BL: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L, D) input embeddings."""
        return self.embed_tokens(input_ids_BL)

    def hidden(self, h_BLD: Tensor, position_ids_BL: Tensor, doc_ids_BL: Tensor) -> Tensor:
        """Run the blocks and the final norm on input embeddings: (B, L, D) -> (B, L, D)."""
        cos_BLP, sin_BLP = self.rope(position_ids_BL)
        for layer in self.layers:
            h_BLD = layer(h_BLD, cos_BLP, sin_BLP, doc_ids_BL)
        return self.norm(h_BLD)

    def hidden_cached(self, h_BQD: Tensor, position_ids_BQ: Tensor, doc_ids_BQ: Tensor,
                      cache: KVCache) -> Tensor:
        """`hidden` for Q new positions appended after the `cache.length` cached ones.

        Returns (B, Q, D) normed hidden states (apply `lm_head` for logits) and advances the
        cache by Q. Equals rows [K - Q, K) of `hidden` over the whole sequence, K = length + Q.
        Prefill is one call with the whole (left-padded) prompt; decoding then passes Q = 1.
        """
        start, Q = cache.length, h_BQD.shape[1]
        doc_ids_BK = cache.push_doc_ids(doc_ids_BQ)
        # Look positions up in a table sized for the largest one: a decode step has L = 1.
        cos_LP, sin_LP = self.rope.table(int(position_ids_BQ.max()) + 1, h_BQD.device)
        cos_BQP, sin_BQP = cos_LP[position_ids_BQ], sin_LP[position_ids_BQ]
        for layer, layer_cache in zip(self.layers, cache.layers):
            h_BQD = layer.forward_cached(h_BQD, cos_BQP, sin_BQP, doc_ids_BK, layer_cache, start)
        cache.advance(Q)
        return self.norm(h_BQD)

    def forward(self, input_ids_BL: Tensor | None, position_ids_BL: Tensor, doc_ids_BL: Tensor,
                inputs_embeds_BLD: Tensor | None = None) -> Tensor:
        """Logits (B, L, V) from token ids OR precomputed embeddings (exactly one of the two).

        Causal within each packed document of `doc_ids_BL` (-1 = padding; padded logits are
        meaningless and must be masked by the loss).
        """
        if (input_ids_BL is None) == (inputs_embeds_BLD is None):
            raise ValueError("pass exactly one of input_ids_BL and inputs_embeds_BLD")
        h_BLD = self.embed(input_ids_BL) if inputs_embeds_BLD is None else inputs_embeds_BLD
        return self.lm_head(self.hidden(h_BLD, position_ids_BL, doc_ids_BL))

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(layer index, MoE) for every MoE block."""
        return [(i, blk.mlp) for i, blk in enumerate(self.layers) if blk.is_moe]

    def update_router_biases(self, u: float) -> dict[str, float]:
        """Apply the aux-loss-free bias step to every MoE layer; returns load-imbalance metrics.

        Keys: `router/max_over_mean/layer_{i}` per MoE layer, plus `router/max_over_mean` (worst
        layer) and `router/max_over_mean_avg` (mean over layers). Empty dict with no MoE layers.
        """
        metrics = {f"router/max_over_mean/layer_{i}": moe.update_bias(u)
                   for i, moe in self.moe_layers()}
        if metrics:
            vals = list(metrics.values())
            metrics["router/max_over_mean"] = max(vals)
            metrics["router/max_over_mean_avg"] = sum(vals) / len(vals)
        return metrics

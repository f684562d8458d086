"""Model FLOPs of an LM training step, the numerator of the benchmarks' MFU.

Per token: 6 x the matmul parameters a token uses (attention projections, dense FFN, its top-k
routed experts and the shared ones, router, lm_head; not the embedding lookup) plus causal
attention, 6 x layers x heads x (d_qk + d_v) x (L + 1) / 2 (a token sees (L + 1) / 2 keys on
average). MLA's queries and keys are head_dim + qk_rope_head_dim wide; MHA's are head_dim.
"""

from __future__ import annotations

from moonforge.model.lm import MoELM


def lm_flops_per_token(lm: MoELM, seq: int) -> float:
    """Training FLOPs per token of `lm` on rows of `seq` tokens (one document each)."""
    cfg = lm.cfg
    matmul = sum(
        p.numel()
        for n, p in lm.named_parameters()
        if p.dim() >= 2 and not n.startswith("embed_tokens") and "experts." not in n
    )
    matmul += sum(cfg.num_experts_per_tok * moe.experts.params_per_expert() for _, moe in lm.moe_layers())
    d_qk = cfg.head_dim + (cfg.qk_rope_head_dim if cfg.attention == "mla" else 0)
    attn = cfg.num_layers * cfg.num_heads * (d_qk + cfg.head_dim) * (seq + 1) / 2
    return 6 * matmul + 6 * attn

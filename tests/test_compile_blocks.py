"""torch.compile per LM block (stages/train/compile_blocks.py) against eager, fp32 on CPU: the
same loss, gradients and router loads for two packed layouts (the second recompiles), with
activation checkpointing underneath, and a clear error for a model without LM blocks.

The LM is the smallest the code supports (one dense block, one MoE block): compiling costs tens
of seconds on this CPU whatever the width.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moonforge.model.config import LMConfig
from moonforge.model.lm import MoELM
from moonforge.stages.train.activation_ckpt import apply_ac
from moonforge.stages.train.compile_blocks import apply_compile

CFG = LMConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    head_dim=8,
    kv_lora_rank=8,
    qk_rope_head_dim=4,
    first_k_dense=1,
    dense_intermediate_size=48,
    num_experts=4,
    num_experts_per_tok=2,
    num_shared_experts=1,
    moe_intermediate_size=16,
    max_position_embeddings=64,
)
TOL = 1e-5
"""fp32: inductor fuses and reorders the elementwise work, so results agree to rounding; bounds
|a - b| relative to each tensor's largest magnitude."""


def _batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 24), generator=g)
    labels = torch.randint(0, 64, (2, 24), generator=g)
    one_doc = torch.zeros(2, 24, dtype=torch.long), torch.arange(24).expand(2, 24)
    doc = torch.tensor([[0] * 10 + [1] * 14, [0] * 20 + [-1] * 4])  # packed, with padding
    pos = torch.tensor([list(range(10)) + list(range(14)), list(range(20)) + [0] * 4])
    return [(ids, one_doc[1], one_doc[0], labels), (ids, pos, doc, labels)]


def _run(lm: MoELM):
    out = []
    for ids, pos, doc, labels in _batches():
        lm.zero_grad(set_to_none=True)
        loss = lm(ids, pos, doc, labels_BL=labels)
        loss.backward()
        loads = [moe.gate.load_counts.clone() for _, moe in lm.moe_layers()]
        grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
        out.append((loss.detach(), grads, loads))
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= TOL * max(float(b.abs().max()), 1e-12)


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
def test_compiled_blocks_match_eager(recompute):
    torch.manual_seed(0)
    eager = MoELM(CFG, backend="sdpa")
    compiled = MoELM(CFG, backend="sdpa")
    compiled.load_state_dict(eager.state_dict())
    if recompute:
        for m in (eager, compiled):
            apply_ac(nn.ModuleDict({"lm": m}), ("lm",))
    assert apply_compile(compiled) == 2
    for (l1, g1, c1), (l2, g2, c2) in zip(_run(eager), _run(compiled)):
        assert _close(l2, l1), (float(l2), float(l1))
        assert sorted(g1) == sorted(g2) and all(_close(g2[n], g1[n]) for n in g1)
        assert all(torch.equal(a, b) for a, b in zip(c1, c2))  # loads counted once, in the graph
    for blk in compiled.layers:  # compiled whole, or inside its checkpoint
        assert (blk._compiled_call_impl is not None) != ("_inner_forward" in blk.__dict__)


def test_a_model_without_lm_blocks_is_refused():
    with pytest.raises(ValueError, match=r"no lm.layers block list to compile .*compile: false"):
        apply_compile(nn.Linear(2, 2))

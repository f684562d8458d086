"""`moonforge plan`'s activation memory against a measurement: a small MoE LM and a MoonViT each
train one step on CPU (fp32) under the torch memory profiler, with and without activation
checkpointing, and the peak of what is neither model state nor input (activations, the
backward's buffers, temporaries) must lie within 25% of `ModelCosts.activation_bytes` for the
same shape and tokens.

The shape is plain MHA with 128-token rows: torch's CPU kernel then keeps what flash-attn keeps
(q, k, v, output, logsumexp), which is what the plan assumes. (MLA's unequal q/k and v head dims
send CPU SDPA to its math kernel, which also keeps the L x L probabilities.)
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category, MemoryProfileTimeline

from moonforge.model import lm_loss
from moonforge.model.config import LMConfig, VisionConfig, VLMConfig
from moonforge.model.context_parallel import ContextParallel
from moonforge.model.lm import MoELM
from moonforge.model.vision import MoonViT
from moonforge.stages.plan_model import FP32, TokenPath, model_costs
from moonforge.stages.train.activation_ckpt import checkpoint_block

LM = LMConfig(
    vocab_size=2048,
    hidden_size=128,
    num_layers=3,
    num_heads=4,
    attention="mha",
    head_dim=32,
    qk_rope_head_dim=16,
    first_k_dense=1,
    dense_intermediate_size=384,
    num_experts=8,
    num_experts_per_tok=2,
    num_shared_experts=1,
    moe_intermediate_size=96,
    max_position_embeddings=256,
)
ROWS, LEN = 8, 128
VIT = VisionConfig(
    patch_size=8,
    hidden_size=128,
    num_layers=3,
    num_heads=4,
    intermediate_size=512,
    pos_grid=8,
    max_patches=64,
)
IMAGES = 16
STATE = (Category.PARAMETER, Category.OPTIMIZER_STATE, Category.INPUT, Category.GRADIENT)


def activation_peak(model: torch.nn.Module, blocks: torch.nn.ModuleList, step, ckpt: bool) -> int:
    """Peak bytes of one `step()` (fwd + bwd of `model`) beyond parameters, gradients, optimizer
    state and inputs, with `blocks` recomputed when `ckpt`."""
    if ckpt:
        for block in blocks:
            checkpoint_block(block)
    step()  # warm-up: one-time allocations (rope tables, kernels' workspaces) out of the way
    model.zero_grad(set_to_none=True)
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as p:
        step()
    # what `export_memory_timeline` writes (deprecated there for CUDA's snapshots, which do not
    # see CPU memory): per allocation event, the live bytes of each category
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline("cpu")
    state = [_CATEGORY_TO_INDEX[c] + 1 for c in STATE]  # column 0 of each row is unused
    return max(sum(row) - sum(row[i] for i in state) for row in sizes)


def lm_peak(ckpt: bool) -> int:
    torch.manual_seed(0)
    lm = MoELM(LM, backend="sdpa")
    ids = torch.randint(0, LM.vocab_size, (ROWS, LEN))
    pos = torch.arange(LEN).expand(ROWS, LEN)
    doc = torch.zeros(ROWS, LEN, dtype=torch.long)

    def step() -> None:  # the training objective's path: the model computes its own loss
        lm(ids, pos, doc, labels_BL=ids).backward()

    return activation_peak(lm, lm.layers, step, ckpt)


def vit_peak(ckpt: bool) -> int:
    """16 images of 8 x 8 patches packed in one row (stage 1's layout)."""
    torch.manual_seed(0)
    vit = MoonViT(VIT, backend="sdpa")
    grid = torch.tensor([[8, 8]] * IMAGES)
    pixels = torch.randn(IMAGES * 64, 3 * VIT.patch_size**2)
    return activation_peak(vit, vit.blocks, lambda: vit(pixels, grid).square().mean().backward(), ckpt)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "recompute"])
@pytest.mark.parametrize("part", ["lm", "lm-chunked-loss", "vision"])
def test_plan_activation_memory_is_within_25_percent_of_the_measured_peak(
    part, ckpt, one_thread, monkeypatch
):
    costs = model_costs(VLMConfig(lm=LM, vision=VIT))
    if part == "lm-chunked-loss":  # the loss over chunks of 128 tokens (model/lm_loss.py)
        monkeypatch.setattr(lm_loss, "CE_CHUNK_ELEMS", 128 * LM.vocab_size)
    if part.startswith("lm"):
        path, tokens, measured = TokenPath(("lm",), ("lm",), "lm"), ROWS * LEN, lm_peak(ckpt)
    else:
        path, tokens, measured = TokenPath(("vision",), ("vision",), "patch"), IMAGES * 64, vit_peak(ckpt)
    planned = costs.activation_bytes(path, tokens, 0.3, ckpt, act_bytes=FP32)
    # measured here: plan / measured = LM 1.000 plain, 0.999 recompute; with the loss in chunks
    # 0.988, 0.935; ViT 0.999, 0.915
    assert abs(planned / measured - 1) <= 0.25, (
        f"plan {planned / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB"
    )


class _StandInCP(ContextParallel):
    """Rank `rank` of a context-parallel group whose collectives are local stand-ins of the same
    shapes (the memory profiler's dataflow analysis cannot follow c10d ops): the gather
    puts zeros in the other ranks' slices, the loss sum is the identity."""

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        parts = [x if r == self.rank else torch.zeros_like(x) for r in range(self.size)]
        return self.unshard(parts, dim)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "recompute"])
def test_plan_context_parallel_memory_is_within_25_percent_of_the_largest_ranks_peak(ckpt, one_thread):
    """Two ranks share each 128-token row; rank 0 keeps the most (under the zig-zag split it
    holds the last chunk, whose queries see the gathered keys of the whole row): the plan counts
    its slice's activations, the gathered keys and the mask. Measured: that rank's step with
    stand-in collectives."""
    torch.manual_seed(0)
    lm = MoELM(LM, backend="sdpa")
    lm.context_parallel = _StandInCP(0, 2)
    ids = torch.randint(0, LM.vocab_size, (ROWS, LEN))
    pos = torch.arange(LEN).expand(ROWS, LEN)
    doc = torch.zeros(ROWS, LEN, dtype=torch.long)
    measured = activation_peak(lm, lm.layers, lambda: lm(ids, pos, doc, labels_BL=ids).backward(), ckpt)
    costs = model_costs(VLMConfig(lm=LM, vision=VIT))
    path = TokenPath(("lm",), ("lm",), "lm")
    planned = costs.activation_bytes(path, ROWS * LEN // 2, 0.3, ckpt, act_bytes=FP32, cp=2, seq_len=LEN)
    # measured here: plan / measured = 0.966 plain, 1.003 recompute (rank 1: 1.008, 1.004);
    # with the contiguous split, on its last rank, it was 0.980 and 1.004, and without the
    # gathered keys and the mask the plan said 0.934 plain, so this bound is tighter than the others'
    assert abs(planned / measured - 1) <= 0.05, (
        f"plan {planned / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB"
    )

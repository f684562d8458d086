"""The CUDA paths against their references, on a GPU (marked `gpu`: deselected by default; run
with `pytest -m gpu` on a machine with CUDA). CI has no GPU, so these run when a session is lent
one (benchmarks/bench_gpu.py's README section says where they last passed). They need torch and
pydantic only, and no conftest fixture, so `pytest --noconftest -m gpu tests/test_gpu.py` runs
them on a machine without the rest of the stack.

- the packed-attention kernels CUDA picks (`flash`: torch's varlen kernel or flash-attn; `flex`:
  compiled FlexAttention) against the fp32 per-document reference, outputs and gradients
- the context-parallel `cp` kernel (2 ranks' zig-zag pieces, query chunks) in bf16 against
  whole-sequence attention, outputs and gradients
- grouped-GEMM experts (bf16) against the per-expert loop, outputs and gradients
- a whole MoE LM on CUDA (`auto`: flash + grouped GEMM, bf16 autocast) against the same weights
  in fp32 on the CPU, and its weights opening on the CPU with the CPU's backend
- Muon's Newton-Schulz in bf16 on CUDA, equal to torch.optim.Muon's
- activation checkpointing on CUDA: the same gradients as without

Tolerances are relative to each tensor's largest magnitude: bf16 has 8 bits of mantissa, so
~4e-3 per rounding, and a layer stack compounds it.
"""

from __future__ import annotations

import pytest
import torch

from moonforge.model.attention import attend, attend_reference, flash_available
from moonforge.model.config import LMConfig
from moonforge.model.experts import GroupedExperts, grouped_mm_available
from moonforge.model.lm import MoELM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = torch.device("cuda")
BF16_TOL = 2e-2
"""bf16 kernels against an fp32 reference, relative to the reference's largest magnitude."""

CFG = LMConfig(
    vocab_size=1024,
    hidden_size=256,
    num_layers=3,
    num_heads=4,
    head_dim=64,
    kv_lora_rank=128,
    qk_rope_head_dim=32,
    first_k_dense=1,
    dense_intermediate_size=512,
    num_experts=8,
    num_experts_per_tok=2,
    num_shared_experts=1,
    moe_intermediate_size=128,
    max_position_embeddings=1024,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _docs(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].to(CUDA)


@pytest.mark.parametrize("backend", ["flash", "flex"])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_attention_kernels_match_the_per_document_reference(backend, causal):
    if backend == "flash" and not flash_available(CUDA):
        pytest.skip("no varlen kernel: torch < 2.10 and no flash-attn")
    doc_BL = _docs([300, 17, 900, 64, 243])  # 1524 tokens, uneven documents
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k = (torch.randn(1, 4, doc_BL.shape[1], 64, device=CUDA, generator=g) for _ in range(2))
    v = torch.randn(1, 4, doc_BL.shape[1], 64, device=CUDA, generator=g)
    gy = torch.randn_like(v)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = attend(qb, kb, vb, doc_BL, causal, backend=backend)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, (qb, kb, vb), gy.bfloat16())
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = attend_reference(qr, kr, vr, doc_BL, causal)
    grads_ref = torch.autograd.grad(ref, (qr, kr, vr), gy)
    assert _rel(out, ref) < BF16_TOL
    for a, b in zip(grads, grads_ref):
        assert _rel(a, b) < BF16_TOL


def _cp_rank_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gy: torch.Tensor,
    doc_BL: torch.Tensor,
    size: int,
    chunk: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's `cp` kernel output for `size` context-parallel ranks, and the whole
    sequence's q, k, v gradients in fp32 (each rank's query rows put back in place; the keys'
    summed over ranks, as their reduce-scatter does). The ranks' key gathers are done here by
    slicing the whole keys."""
    from moonforge.model.attention import attention, cp_attention_meta
    from moonforge.model.context_parallel import ContextParallel

    outs, gqs = [], []
    gk_all, gv_all = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    for rank in range(size):
        cp = ContextParallel(rank, size)
        meta = cp_attention_meta(doc_BL, cp, chunk)
        k0, end = meta.keys
        ql, kl, vl = (t.detach().clone().requires_grad_() for t in (cp.shard(q, 2), k, v))
        o = attention(ql, kl[:, :, k0:end], vl[:, :, k0:end], meta)
        gq, gk, gv = torch.autograd.grad(o, (ql, kl, vl), cp.shard(gy, 2))
        outs.append(o.detach())
        gqs.append(gq.float())
        gk_all += gk
        gv_all += gv
    return outs, [ContextParallel(0, size).unshard(gqs, 2), gk_all, gv_all]


@pytest.mark.parametrize("chunk", [256, 64])
def test_context_parallel_kernel_in_bf16_matches_the_whole_sequence_reference(chunk):
    """The `cp` kernel (zig-zag pieces, padded per-document SDPA per query chunk) on CUDA in bf16:
    2 ranks' rows and their q, k, v gradients against whole-sequence fp32 attention."""
    from moonforge.model.context_parallel import ContextParallel

    doc_BL = _docs([700, 33, 900, 64, 351])  # 2048 tokens: documents cross both ranks' pieces
    g = torch.Generator(device=CUDA).manual_seed(2)
    q, k = (torch.randn(1, 4, 2048, 96, device=CUDA, generator=g) for _ in range(2))
    v, gy = (torch.randn(1, 4, 2048, 64, device=CUDA, generator=g) for _ in range(2))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = attend_reference(qr, kr, vr, doc_BL, True)
    grads_ref = torch.autograd.grad(ref, (qr, kr, vr), gy)
    out, grads = _cp_rank_rows(*(t.bfloat16() for t in (q, k, v, gy)), doc_BL, 2, chunk)
    for rank, o in enumerate(out):
        assert o.dtype == torch.bfloat16
        assert _rel(o, ContextParallel(rank, 2).shard(ref, 2)) < BF16_TOL
    for a, b in zip(grads, grads_ref):
        assert _rel(a, b) < BF16_TOL


def test_mla_head_dims_run_through_the_varlen_kernel():
    """MLA's queries and keys are 96 wide and its values 64: the kernel gets v zero-padded."""
    if not flash_available(CUDA):
        pytest.skip("no varlen kernel")
    doc_BL = _docs([100, 200, 28])
    g = torch.Generator(device=CUDA).manual_seed(1)
    q, k = (torch.randn(1, 4, 328, 96, device=CUDA, generator=g) for _ in range(2))
    v = torch.randn(1, 4, 328, 64, device=CUDA, generator=g)
    out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), doc_BL, True, backend="flash")
    assert out.shape == v.shape
    assert _rel(out, attend_reference(q, k, v, doc_BL, True)) < BF16_TOL


def test_grouped_gemm_experts_match_the_per_expert_loop_in_bf16():
    assert grouped_mm_available(CUDA, torch.bfloat16), "torch's grouped GEMM should run bf16 on this GPU"
    torch.manual_seed(0)
    E, D, Fw, K, T = 8, 256, 128, 2, 1000
    experts = GroupedExperts(E, D, Fw, impl="grouped_mm").to(CUDA)
    experts.reset_parameters(0.05, 0.05)
    idx = torch.rand(T, E, device=CUDA).topk(K, dim=-1).indices.flatten()
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx, minlength=E)
    x = torch.randn(T, D, device=CUDA)[order // K]
    gy = torch.randn(T * K, D, device=CUDA)

    def grads(fn) -> list[torch.Tensor]:
        xx = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(xx)
        got = torch.autograd.grad(y, [xx, experts.gate_up, experts.down], gy.to(y.dtype))
        return [y, *got]

    def looped(xx: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            outs.append(experts[e](xx[start : start + n]))
            start += n
        return torch.cat(outs)

    fast, ref = grads(lambda xx: experts(xx, counts)), grads(looped)
    assert fast[0].dtype == torch.bfloat16
    for a, b in zip(fast, ref):
        assert _rel(a, b) < BF16_TOL


def _lm_and_batch(device: torch.device) -> tuple[MoELM, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    lm = MoELM(CFG)
    g = torch.Generator().manual_seed(1)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate([200, 312, 500])])[None].repeat(2, 1)
    pos = torch.cat([torch.arange(n) for n in (200, 312, 500)])[None].repeat(2, 1)
    ids = torch.randint(0, CFG.vocab_size, doc.shape, generator=g)
    return lm.to(device), tuple(t.to(device) for t in (ids, pos, doc))


def test_lm_on_cuda_with_flash_and_grouped_gemm_matches_fp32_on_cpu():
    """The whole MoE LM, `auto` everything under bf16 autocast, against the same weights in fp32
    on the CPU (packed documents, loss and gradients of every parameter)."""
    lm_cpu, (ids, pos, doc) = _lm_and_batch(torch.device("cpu"))
    loss_cpu = lm_cpu(ids, pos, doc, labels_BL=ids)
    loss_cpu.backward()
    lm_gpu, batch = _lm_and_batch(CUDA)
    meta = lm_gpu.attention_meta(batch[2], torch.empty(1, device=CUDA, dtype=torch.bfloat16))
    assert meta.kernel == ("varlen" if flash_available(CUDA) else meta.kernel)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_gpu = lm_gpu(*batch, labels_BL=batch[0])
    loss_gpu.backward()
    assert abs(loss_gpu.item() - loss_cpu.item()) < 1e-2 * loss_cpu.item()
    # bf16 routing may send a near-tie token to another expert, so each gradient is compared by
    # direction (an expert's gradient moves by a token's share when one of ~500 tokens flips;
    # the routers' own gradients, through bf16 scores, differ most)
    for (name, p_cpu), p_gpu in zip(lm_cpu.named_parameters(), lm_gpu.parameters()):
        if p_cpu.grad is None:
            assert p_gpu.grad is None, name
            continue
        assert _cos(p_gpu.grad.cpu(), p_cpu.grad) > 0.95, name  # measured on an H200: >= 0.979


def test_weights_trained_on_cuda_open_on_the_cpu():
    """The attention backend is a runtime choice: weights stepped on CUDA (flash, grouped GEMM)
    load into a CPU model (sdpa, padded or CPU grouped GEMM) and give the GPU's fp32 logits."""
    lm_gpu, (ids, pos, doc) = _lm_and_batch(CUDA)
    opt = torch.optim.AdamW(lm_gpu.parameters(), lr=1e-3)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lm_gpu(ids, pos, doc, labels_BL=ids).backward()
        opt.step()
        opt.zero_grad()
    state = {k: v.cpu() for k, v in lm_gpu.state_dict().items()}
    lm_cpu = MoELM(CFG)
    lm_cpu.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits_cpu = lm_cpu(ids.cpu(), pos.cpu(), doc.cpu())
        logits_gpu = lm_gpu(ids, pos, doc).cpu()  # fp32 on CUDA: flash is bf16-only, sdpa runs
    # per token: a route whose top-k scores tie within fp32 rounding may go another way on the
    # other device (that token and what attends to it differ); a wrong kernel or a misnamed
    # weight moves every token
    off_T = (logits_cpu - logits_gpu).abs().amax(-1).flatten() > 1e-3 * logits_gpu.abs().max()
    assert off_T.float().mean() < 0.02, f"{int(off_T.sum())} of {off_T.numel()} tokens differ"
    assert (logits_cpu - logits_gpu).abs().median() < 1e-5 * logits_gpu.abs().max()


def test_muon_runs_newton_schulz_in_bf16_on_cuda_like_torch_muon():
    from moonforge.stages.train.muon import Muon

    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")

    def run(opt_cls, **kw) -> list[torch.Tensor]:
        torch.manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(64, 160, device=CUDA)) for _ in range(2)]
        opt = opt_cls(ws, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", **kw)
        g = torch.Generator(device=CUDA).manual_seed(1)
        for _ in range(3):
            for w in ws:
                w.grad = torch.randn(w.shape, device=CUDA, generator=g)
            opt.step()
        return [w.detach() for w in ws]

    for a, b in zip(run(Muon), run(torch.optim.Muon)):  # Muon's ns_dtype=None: bf16 on CUDA
        assert torch.equal(a, b)


def test_activation_checkpointing_on_cuda_gives_the_same_gradients():
    from moonforge.stages.train.activation_ckpt import checkpoint_block

    def grads(ckpt: bool) -> list[torch.Tensor]:
        lm, (ids, pos, doc) = _lm_and_batch(CUDA)
        if ckpt:
            for block in lm.layers:
                checkpoint_block(block)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lm(ids, pos, doc, labels_BL=ids).backward()
        return [p.grad for p in lm.parameters() if p.grad is not None]

    plain, recomputed = grads(False), grads(True)
    assert len(plain) == len(recomputed)
    for a, b in zip(plain, recomputed):  # the recompute reruns the same bf16 kernels; CUDA's
        assert _cos(a, b) > 0.995  # atomic index_add may still flip a near-tie route


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "recompute"])
def test_plan_activation_memory_is_within_25_percent_of_cuda_peak(ckpt):
    """`moonforge plan`'s activation estimate (bf16 autocast over fp32 weights: the fp32
    residual stream, the weights' bf16 casts, a rebuilt layer's gradient copies) against what
    one forward + backward adds to max_memory_allocated beyond weights, gradients and AdamW."""
    from moonforge.model.config import VLMConfig
    from moonforge.stages.plan_model import BF16, TokenPath, model_costs
    from moonforge.stages.train.activation_ckpt import checkpoint_block

    cfg = LMConfig(
        vocab_size=32000,
        hidden_size=1024,
        num_layers=4,
        num_heads=8,
        head_dim=128,
        kv_lora_rank=256,
        qk_rope_head_dim=64,
        first_k_dense=1,
        dense_intermediate_size=2816,
        num_experts=32,
        num_experts_per_tok=4,
        num_shared_experts=1,
        moe_intermediate_size=704,
        max_position_embeddings=4096,
    )
    rows, seq = 4, 4096
    torch.manual_seed(0)
    with CUDA:
        lm = MoELM(cfg).train()
    if ckpt:
        for block in lm.layers:
            checkpoint_block(block)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (rows, seq), device=CUDA)
    pos = torch.arange(seq, device=CUDA).expand(rows, seq)
    doc = torch.zeros(rows, seq, dtype=torch.long, device=CUDA)

    def fwd_bwd() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm(ids, pos, doc, labels_BL=ids)
        loss.backward()

    fwd_bwd()
    opt.step()  # gradients and AdamW's moments exist from here on: they are state, not activations
    torch.cuda.synchronize()
    state = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - state
    path = TokenPath(("lm",), ("lm",), "lm")
    planned = model_costs(VLMConfig(lm=cfg)).activation_bytes(path, rows * seq, 0.3, ckpt, act_bytes=BF16)
    assert abs(planned / measured - 1) <= 0.25, (
        f"plan {planned / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB"
    )

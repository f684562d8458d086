"""The GPU check: everything moonforge's CUDA paths promise, measured in one run on one GPU.

CI has no GPU, so this is the script a session runs when it is lent one (a few minutes). Each
part prints its numbers and appends them to `--out` (JSON lines), so a run cut short keeps what
it measured. Parts:

  peak       bf16 matmul peak (8192^3, best of 20): the MFU denominator, measured in this run
  attention  packed documents (8K tokens, 16 heads of 128, bf16): `flash` (torch's varlen
             kernel, or flash-attn when installed), `flex` (compiled) and `sdpa` against the
             fp32 per-document reference (outputs and gradients), and forward + backward ms
  experts    one MoE layer's routed experts at Kimi-VL-A3B's shape (64 experts top-6, d 2048,
             width 1408, 16K tokens, bf16): grouped GEMM and padded bmm against the per-expert
             loop (parity and ms)
  lm         a train step (fp32 weights, bf16 autocast as stages/train/loop.py runs it, fused
             AdamW) of a ~1.1B dense LM (TinyLlama's shape: d 2048, 22 layers, GQA 16/4, FFN
             5632) and a Moonlight-shaped MoE LM cut to 8 of its 27 layers (4.8B total, 1.3B
             active: MLA, 64 experts top-6 + 2 shared): tokens/s and MFU; then the same with
             activation checkpointing (time cost, memory saved), and `moonforge plan`'s
             activation estimate against max_memory_allocated (what the step adds beyond
             weights, gradients and optimizer state)
  compiled   the dense step with every block compiled (the `compile` Runtime field)

MFU = model FLOPs / s over the measured peak; model FLOPs per token = 6 * (matmul parameters a
token uses, lm_head included) + 6 * layers * heads * (d_qk + d_v) * (L + 1) / 2 (causal).

Run: python benchmarks/bench_gpu.py [--out results.jsonl] [--parts peak,attention,...]
Needs torch with CUDA and pydantic only (model/ and stages/train/ import nothing else here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_experts import looped  # the per-expert reference (benchmarks/ is the script's path)
from lm_flops import lm_flops_per_token

from moonforge.model.attention import attend, attend_reference, flash_available
from moonforge.model.config import LMConfig, VLMConfig
from moonforge.model.experts import GroupedExperts, grouped_mm_available
from moonforge.model.lm import MoELM
from moonforge.stages.plan_model import BF16, TokenPath, model_costs

DENSE = LMConfig(
    vocab_size=32000,
    hidden_size=2048,
    num_layers=22,
    num_heads=16,
    attention="mha",
    head_dim=128,
    num_kv_heads=4,
    first_k_dense=22,
    dense_intermediate_size=5632,
    max_position_embeddings=8192,
)
MOE = LMConfig(num_layers=8, max_position_embeddings=8192)  # Moonlight / Kimi-VL-A3B's LM, 8 layers
SEQ = 4096
OUT: Path | None = None
DEV = torch.device("cuda")
SMOKE = False
"""--smoke: the same code on this CPU at toy sizes (fp32 timings, no memory numbers), to check
the script before spending device minutes on it."""


def record(part: str, **values) -> None:
    print(f"[{part}] " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)
    if OUT is not None:
        with OUT.open("a") as f:
            f.write(json.dumps({"part": part, **values}) + "\n")


def cuda_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median ms of `fn` over `repeats` runs, timed by CUDA events (a wall clock in --smoke)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if DEV.type != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def part_peak() -> float:
    n, dtype = (1024, torch.float32) if SMOKE else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=DEV, dtype=dtype) for _ in range(2))
    best = min(cuda_ms(lambda: a @ b, 1, warmup=0) for _ in range(20))
    peak = 2 * n**3 / (best / 1e3)
    record("peak", bf16_tflops=round(peak / 1e12, 1), n=n)
    return peak


def _packed_docs(total: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths, used = [], 0
    while used < total:
        n = min(int(torch.randint(256, 2049, (1,), generator=g)), total - used)
        lengths.append(n)
        used += n
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].to(DEV)


def part_attention() -> None:
    doc_BL = _packed_docs(1024 if SMOKE else 8192)
    H, D = (2, 32) if SMOKE else (16, 128)
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(1, H, doc_BL.shape[1], D, device=DEV, generator=g) for _ in range(3))
    gy = torch.randn_like(q)
    backends = ["sdpa", "flex"] + (["flash"] if flash_available(q.device) else [])
    for name in backends:
        qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        out = attend(qb, kb, vb, doc_BL, True, backend=name)
        grads = torch.autograd.grad(out, (qb, kb, vb), gy.bfloat16())
        ref = attend_reference(qr, kr, vr, doc_BL, True)
        grads_ref = torch.autograd.grad(ref, (qr, kr, vr), gy)
        err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
        gerr = max(
            (a.float() - b).abs().max().item() / b.abs().max().item() for a, b in zip(grads, grads_ref)
        )

        def step(name=name, qb=qb, kb=kb, vb=vb) -> None:
            o = attend(qb, kb, vb, doc_BL, True, backend=name)
            torch.autograd.grad(o, (qb, kb, vb), gy.bfloat16())

        ms = cuda_ms(step, 10)
        record(
            "attention",
            backend=name,
            docs=int(doc_BL.max()) + 1,
            tokens=doc_BL.shape[1],
            rel_err_out=f"{err:.1e}",
            rel_err_grad=f"{gerr:.1e}",
            fwd_bwd_ms=round(ms, 2),
        )


def part_experts() -> None:
    T, K, E, D, Fw = (512, 2, 8, 64, 32) if SMOKE else (16384, 6, 64, 2048, 1408)
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, Fw).to(DEV)
    experts.reset_parameters(0.02, 0.02)
    idx_TK = torch.rand(T, E, device=DEV).topk(K, dim=-1).indices
    flat_A = idx_TK.flatten()
    order_A = torch.argsort(flat_A, stable=True)
    counts_E = torch.bincount(flat_A, minlength=E)
    x_TD = torch.randn(T, D, device=DEV)
    gy_AD = torch.randn(T * K, D, device=DEV)

    def impl(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(x_AD: torch.Tensor) -> torch.Tensor:
            experts.impl = name
            return experts(x_AD, counts_E)

        return fn

    forms = {"looped": lambda x: looped(experts, x, counts_E), "padded": impl("padded")}
    if grouped_mm_available(x_TD.device, torch.bfloat16):
        forms["grouped_mm"] = impl("grouped_mm")
    ref: torch.Tensor | None = None
    base: float | None = None
    for name, fn in forms.items():

        def run(fn=fn) -> torch.Tensor:
            x = x_TD[order_A // K].requires_grad_()
            with autocast():
                y = fn(x)
            y.backward(gy_AD.to(y.dtype))
            return y

        y = run().float()
        ref = y if ref is None else ref
        err = (y - ref).abs().max().item() / ref.abs().max().item()
        ms = cuda_ms(run, 10)
        base = base or ms
        flops = 6 * T * K * 3 * D * Fw
        record(
            "experts",
            form=name,
            tokens=T,
            top_k=K,
            experts=E,
            rel_err_vs_looped=f"{err:.1e}",
            fwd_bwd_ms=round(ms, 2),
            speedup_vs_looped=round(base / ms, 2),
            tflops=round(flops / (ms / 1e3) / 1e12, 1),
        )


def autocast():
    """bf16 autocast on CUDA, as stages/train/loop.py trains; fp32 in --smoke (CPU bf16 is slow)."""
    return torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=DEV.type == "cuda")


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def smoke_shape(cfg: LMConfig) -> LMConfig:
    """The same layout at toy width (the `--smoke` run)."""
    return cfg.model_copy(
        update=dict(
            vocab_size=512,
            hidden_size=64,
            num_layers=min(cfg.num_layers, 3),
            first_k_dense=min(cfg.first_k_dense, 3),
            head_dim=16,
            num_heads=4,
            kv_lora_rank=32,
            qk_rope_head_dim=8,
            dense_intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            num_kv_heads=2 if cfg.num_kv_heads else None,
        )
    )


def build_lm(cfg: LMConfig) -> tuple[MoELM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    with DEV:  # built where it trains: no host copy of billions of parameters
        lm = MoELM(cfg).train()
    return lm, torch.optim.AdamW(lm.parameters(), lr=1e-4, weight_decay=0.1, fused=True)


def batch(cfg: LMConfig, rows: int) -> tuple[torch.Tensor, ...]:
    """`rows` rows of SEQ random tokens, one document per row, and their next-token labels
    (shifted the way the packer ships them)."""
    ids = torch.randint(0, cfg.vocab_size, (rows, SEQ), device=DEV)
    pos = torch.arange(SEQ, device=DEV).expand(rows, SEQ)
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)
    return ids, pos, torch.zeros(rows, SEQ, dtype=torch.long, device=DEV), labels


def part_lm(name: str, cfg: LMConfig, rows: int, peak: float, ckpt_rows: int) -> None:
    from moonforge.stages.train.activation_ckpt import checkpoint_block

    lm, opt = build_lm(cfg)
    fpt = lm_flops_per_token(lm, SEQ)
    costs = model_costs(VLMConfig(lm=cfg))
    path = TokenPath(("lm",), ("lm",), "lm")

    def measure(n: int, ckpt: bool) -> None:
        ids, pos, doc, labels = batch(cfg, n)
        losses: list[float] = []

        def fwd_bwd() -> None:
            with autocast():
                loss = lm(ids, pos, doc, labels_BL=labels)
            loss.backward()
            losses.append(loss.item())

        def step() -> None:
            opt.zero_grad(set_to_none=False)  # grads stay allocated: they count as state below
            fwd_bwd()
            opt.step()

        step()  # gradients and AdamW state exist from here on
        sync()
        measured = planned = float("nan")
        state = 0
        if DEV.type == "cuda":  # what one forward + backward adds beyond weights, grads, AdamW
            state = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd()
            sync()
            measured = torch.cuda.max_memory_allocated() - state
            planned = costs.activation_bytes(path, n * SEQ, 0.3, ckpt, act_bytes=BF16)
        ms = cuda_ms(step, 2 if SMOKE else 5, warmup=1)
        tokens = n * SEQ
        record(
            f"lm-{name}",
            ckpt=ckpt,
            tokens=tokens,
            step_ms=round(ms, 1),
            tokens_per_s=round(tokens / (ms / 1e3)),
            mfu=f"{fpt * tokens / (ms / 1e3) / peak:.1%}",
            act_measured_gib=round(measured / 2**30, 2),
            act_planned_gib=round(planned / 2**30, 2),
            plan_over_measured=round(planned / measured, 3),
            state_gib=round(state / 2**30, 1),
            loss_first=round(losses[0], 4),
            loss_last=round(losses[-1], 4),
        )

    total = sum(p.numel() for p in lm.parameters())
    record(f"lm-{name}", params_b=round(total / 1e9, 3), gflop_per_token=round(fpt / 1e9, 2), seq=SEQ)
    measure(rows, False)
    for block in lm.layers:
        checkpoint_block(block)
    measure(ckpt_rows, True)


def part_compiled(cfg: LMConfig, rows: int, peak: float) -> None:
    from moonforge.stages.train.compile_blocks import apply_compile

    lm, opt = build_lm(cfg)
    fpt = lm_flops_per_token(lm, SEQ)
    ids, pos, doc, labels = batch(cfg, rows)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = lm(ids, pos, doc, labels_BL=labels)
        loss.backward()
        opt.step()

    apply_compile(lm)
    t0 = time.perf_counter()
    step()
    sync()
    record("compiled", compile_and_first_step_s=round(time.perf_counter() - t0, 1))
    ms = cuda_ms(step, 2 if SMOKE else 5, warmup=1)
    tokens = rows * SEQ
    record(
        "compiled",
        model="dense",
        tokens=tokens,
        step_ms=round(ms, 1),
        tokens_per_s=round(tokens / (ms / 1e3)),
        mfu=f"{fpt * tokens / (ms / 1e3) / peak:.1%}",
    )


def main() -> None:
    global OUT, DEV, SMOKE, SEQ
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--parts", default="attention,experts,dense,moe,compiled")
    p.add_argument("--smoke", action="store_true", help="toy sizes on this CPU (checks the script)")
    args = p.parse_args()
    OUT, SMOKE = args.out, args.smoke
    if SMOKE:
        DEV, SEQ = torch.device("cpu"), 128
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (or --smoke to check it on a CPU)")
    t_start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    record(
        "env",
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (smoke)",
        python=sys.version.split()[0],
        flash=flash_available(DEV),
        grouped_mm=grouped_mm_available(DEV, torch.bfloat16),
    )
    dense, moe = (smoke_shape(DENSE), smoke_shape(MOE)) if SMOKE else (DENSE, MOE)
    peak = part_peak()
    parts: dict[str, Callable[[], None]] = {
        "attention": part_attention,
        "experts": part_experts,
        "dense": lambda: part_lm("dense", dense, 8, peak, 8),
        "moe": lambda: part_lm("moe", moe, 4, peak, 8),  # 4.8B params' state is 78 GB: 4 rows plain
        "compiled": lambda: part_compiled(dense, 8, peak),
    }
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            parts[name]()
        except Exception as e:  # noqa: BLE001 - one part failing must not lose the others' numbers
            traceback.print_exc()
            record(name, error=f"{type(e).__name__}: {e}"[:500])
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
        took, total = time.perf_counter() - t0, time.perf_counter() - t_start
        print(f"-- {name}: {took:.1f} s (total {total:.1f} s)", flush=True)


if __name__ == "__main__":
    main()

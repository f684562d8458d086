"""moonforge's LM train step vs transformers' DeepseekV3ForCausalLM: tokens/s ratio and MFU.

Both models hold the same weights (transformers' random init, imported through
model/adapters/deepseek_v3.py), see the same tokens (4 x 512 random ids, one document per row,
next-token loss: transformers' own from `labels`; moonforge's the stages' own, the LM's loss from
its hidden states (model/lm_loss.py), on labels shifted the way the packer ships them) and take
AdamW steps with the same settings, in fp32 on this CPU.
transformers runs its defaults (SDPA attention, grouped_mm experts where torch has them);
moonforge its `auto` choices (attention form by measured cost, grouped GEMM experts). The two step in
alternating order, round after round, in one process, so load on a shared box hits both alike.

MFU = model FLOPs per second / a fp32 matmul peak measured in this same run:
  model FLOPs per token = 6 * (matmul params a token uses: attention projections, dense FFN,
  top-k routed + shared experts, router, lm_head) + 6 * layers * heads * (d_qk + d_v) * (L + 1) / 2
  (benchmarks/lm_flops.py)
  (causal attention: a token sees (L + 1) / 2 keys on average).

Run: python benchmarks/bench_lm_vs_hf.py [--rounds 6] [--steps 2] [--threads N] [--clock cpu]
                                          [--compile] [--profile] [--device cuda [--shape mid]]
Prints the per-round ratios, the median ratio (goal >= 1.3x) and both MFUs (goal >= 55%).
`--compile` adds moonforge with every LM block compiled (the `compile` Runtime field,
stages/train/compile_blocks.py) as a third contender, after timing its compile.
Both run with freed host memory kept in the heap, as moonforge's stages train
(stages/train/host_memory.py; MOONFORGE_MALLOC_TUNING=0 for glibc's defaults).
It runs under the OpenMP wait policy of its environment, as moonforge's stages do (the header
names it; unset is libgomp's default, which spins a while before sleeping). On a box shared
with other jobs, `--threads 1 --clock cpu` times process CPU seconds, which other processes do
not inflate, or export OMP_WAIT_POLICY=PASSIVE so that 2 threads do not spin against each other
(every parallel region then pays a thread wake-up: measured 1.04x and 42.7% MFU that way).

On a GPU (`--device cuda`): both models keep fp32 weights and run under bf16 autocast, as
stages/train/loop.py trains (fused AdamW for both), timed with a CUDA sync per step, MFU against a
bf16 matmul peak measured in the same run. `--shape mid` is a size a GPU is for: d=1024, 8 layers
(1 dense + 7 MoE), 64 experts top-6 of width 512 + 1 shared, MLA (kv rank 256, 8 heads of
128 + 64), vocab 32000, 8 x 2048 tokens (1.3B parameters, 0.36B active).

Legend: B rows, L tokens per row, V vocab, D hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from lm_flops import lm_flops_per_token  # benchmarks/ is the script's path
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from moonforge.model.adapters import deepseek_v3
from moonforge.model.lm import MoELM
from moonforge.stages.train.host_memory import keep_freed_memory
from moonforge.stages.train.objectives import IGNORE

HF_CONFIG = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    moe_intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    kv_lora_rank=128,
    q_lora_rank=None,
    qk_rope_head_dim=32,
    qk_nope_head_dim=64,
    v_head_dim=64,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    rope_theta=10000.0,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    attn_implementation="sdpa",
)
"""d=256, 4 layers (1 dense + 3 MoE), 8 experts top-2 + 1 shared, MLA (kv rank 128, 4 heads of
64 + 32 rope dims), vocab 8192."""
MID_CONFIG = dict(
    HF_CONFIG,
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=4096,
    moe_intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    n_routed_experts=64,
    num_experts_per_tok=6,
    kv_lora_rank=256,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    max_position_embeddings=2048,
)
SHAPES = {"tiny": (HF_CONFIG, 4, 512), "mid": (MID_CONFIG, 8, 2048)}
B, L = 4, 512
LR = 1e-4
DEVICE = torch.device("cpu")


def build_pair(seed: int = 0) -> tuple[DeepseekV3ForCausalLM, MoELM]:
    """transformers' model (its own init, router biases randomised) and moonforge's LM with the
    same weights, imported through the deepseek_v3 adapter."""
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**HF_CONFIG)).train().to(DEVICE)
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.01)
    hf_config = json.loads(hf.config.to_json_string())
    parts = deepseek_v3.parts_from_hf(hf_config)
    state = deepseek_v3.state_from_hf(hf.state_dict(), parts, hf_config)
    lm = MoELM(parts["lm"]).train()
    lm.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()}, strict=True)
    return hf, lm.to(DEVICE)


def _cuda_wall() -> float:
    torch.cuda.synchronize()  # a step's kernels run asynchronously: time them to the end
    return time.perf_counter()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "cuda": _cuda_wall}


def matmul_peak(clock, n: int = 2048, repeats: int = 5) -> float:
    """Best achieved FLOP/s of an n x n x n matmul (the MFU denominator): fp32 on the CPU, bf16
    (n = 8192) on a GPU."""
    cuda = DEVICE.type == "cuda"
    n = 8192 if cuda else n
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats * (4 if cuda else 1)):
        t0 = clock()
        a @ b
        best = min(best, clock() - t0)
    return 2 * n**3 / best


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEVICE.type == "cuda")


def make_steps(hf: DeepseekV3ForCausalLM, lm: MoELM, ids_BL: torch.Tensor):
    """One full train step (zero_grad, forward, loss, backward, AdamW step) for each model."""
    pos_BL = torch.arange(L, device=DEVICE).repeat(B, 1)
    doc_BL = torch.zeros(B, L, dtype=torch.long, device=DEVICE)
    labels_BL = F.pad(ids_BL[:, 1:], (0, 1), value=IGNORE)  # pre-shifted, as the packer does
    fused = DEVICE.type == "cuda" or None  # CPU: torch's default (foreach), as measured before
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.1, fused=fused)
    opt_mf = torch.optim.AdamW(lm.parameters(), lr=LR, weight_decay=0.1, fused=fused)

    def hf_step() -> float:
        opt_hf.zero_grad(set_to_none=True)
        with _autocast():
            loss = hf(input_ids=ids_BL, labels=ids_BL).loss
        loss.backward()
        opt_hf.step()
        return loss.item()

    def mf_step() -> float:
        opt_mf.zero_grad(set_to_none=True)
        with _autocast():
            loss = lm(ids_BL, pos_BL, doc_BL, labels_BL=labels_BL)  # the stages' LM loss
        loss.backward()
        opt_mf.step()
        return loss.item()

    return hf_step, mf_step


def timed(step, n: int, clock) -> float:
    """Seconds per step, median of n."""
    times = []
    for _ in range(n):
        t0 = clock()
        step()
        times.append(clock() - t0)
    return statistics.median(times)


def profile(step, label: str, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"--- profile: {label} (self CPU time) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall seconds, or process CPU seconds (use with --threads 1)",
    )
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables")
    p.add_argument("--compile", action="store_true", help="also time moonforge with compiled blocks")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    args = p.parse_args()
    global HF_CONFIG, B, L, DEVICE
    HF_CONFIG, B, L = SHAPES[args.shape]
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        args.clock = "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as moonforge's stages run; both contenders share the process
    hf, lm = build_pair()
    ids_BL = torch.randint(0, HF_CONFIG["vocab_size"], (B, L), generator=torch.Generator().manual_seed(1))
    ids_BL = ids_BL.to(DEVICE)
    hf_step, mf_step = make_steps(hf, lm, ids_BL)
    loss_hf, loss_mf = hf_step(), mf_step()  # warm-up; the same weights give the same loss
    print(
        f"step-1 loss: transformers {loss_hf:.6f}, moonforge {loss_mf:.6f} "
        f"(|diff| {abs(loss_hf - loss_mf):.1e})"
    )
    flops = lm_flops_per_token(lm, L) * B * L
    clock = CLOCKS[args.clock]
    peak = matmul_peak(clock)
    cuda = DEVICE.type == "cuda"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
        f"freed host memory {'kept (host_memory.py)' if kept else 'returned (malloc defaults)'}; "
        f"{B} x {L} tokens, "
        f"{flops / 1e9:.1f} GFLOP per step; {'bf16' if cuda else 'fp32'} matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s; device {torch.cuda.get_device_name() if cuda else 'cpu'}, "
        f"transformers experts: {getattr(hf.config, '_experts_implementation', 'default')}"
    )
    steps = [("hf", hf_step), ("mf", mf_step)]
    if args.compile:
        from moonforge.stages.train.compile_blocks import apply_compile

        _, lm_c = build_pair()
        apply_compile(lm_c)
        _, mfc_step = make_steps(hf, lm_c, ids_BL)
        t0 = clock()
        loss_c = mfc_step()
        print(f"compile + first step: {clock() - t0:.1f} s; step-1 loss {loss_c:.6f}")
        steps.append(("mfc", mfc_step))
    ratios, t_hf, t_mf, t_mfc = [], [], [], []
    for r in range(args.rounds):
        order = steps[:: 1 if r % 2 == 0 else -1]
        got = {name: timed(step, args.steps, clock) for name, step in order}
        t_hf.append(got["hf"])
        t_mf.append(got["mf"])
        ratios.append(got["hf"] / got["mf"])
        compiled = ""
        if "mfc" in got:
            t_mfc.append(got["mfc"])
            compiled = (
                f", compiled {B * L / got['mfc']:7.0f} tok/s ({got['hf'] / got['mfc']:.2f}x transformers, "
                f"{got['mf'] / got['mfc']:.2f}x eager)"
            )
        print(
            f"round {r}: transformers {B * L / got['hf']:7.0f} tok/s, moonforge "
            f"{B * L / got['mf']:7.0f} tok/s, ratio {ratios[-1]:.2f}x{compiled}"
        )
    med_hf, med_mf = statistics.median(t_hf), statistics.median(t_mf)
    print(
        f"median ratio (moonforge / transformers tokens/s): {statistics.median(ratios):.2f}x "
        f"(rounds {min(ratios):.2f}-{max(ratios):.2f}); goal >= 1.3x"
    )
    print(
        f"MFU: moonforge {flops / med_mf / peak:.1%}, transformers {flops / med_hf / peak:.1%} "
        f"(of {peak / 1e9:.1f} GFLOP/s); goal >= 55%"
    )
    if t_mfc:
        med_c = statistics.median(t_mfc)
        print(
            f"compiled: {med_hf / med_c:.2f}x transformers, {med_mf / med_c:.2f}x eager moonforge, "
            f"MFU {flops / med_c / peak:.1%}"
        )
    if args.profile:
        profile(mf_step, "moonforge")
        profile(hf_step, "transformers")


if __name__ == "__main__":
    main()

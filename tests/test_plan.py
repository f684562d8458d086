"""`moonforge plan`: the full-scale recipe's budgets, FLOPs, memory and GPU-hours, pinned against
numbers computed by hand from training-methods.md (model shape, Table 1 budgets)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from moonforge.flows import cli
from moonforge.stages.plan import (
    PRETRAIN_KINDS,
    PlanError,
    budgeted_tokens,
    make_plan,
    memory_per_gpu,
    plan_config,
)
from moonforge.stages.plan_model import model_costs, stage_path
from moonforge.stages.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
FULL = str(ROOT / "recipes" / "kimi-vl-a3b.yaml")
TINY = str(ROOT / "recipes" / "tiny.yaml")

# --- hand computation of the Kimi-VL-A3B LM (training-methods.md 0.3) ---------------------------
H, V, L, HEADS = 2048, 163840, 27, 16
EMBED = V * H  # embed_tokens; lm_head is untied and the same size
MLA = (
    H * HEADS * (128 + 64)  # q_proj: nope 128 + rope 64 per head
    + H * (512 + 64)
    + 512  # kv_a_proj_with_mqa + its RMSNorm
    + 512 * HEADS * (128 + 128)  # kv_b_proj -> k_nope, v
    + HEADS * 128 * H
)  # o_proj
NORMS = 2 * H  # two RMSNorms per layer
DENSE_FFN = 3 * H * 11264  # layer 0: SwiGLU gate, up, down
EXPERT = 3 * H * 1408  # one routed expert
MOE = 64 * EXPERT + 3 * H * (2 * 1408) + 64 * H  # routed + 2 shared (one MLP of width 2816) + router
LM_TOTAL = 2 * EMBED + L * (MLA + NORMS) + DENSE_FFN + (L - 1) * MOE + H  # + final norm
LM_ACTIVE = LM_TOTAL - (L - 1) * (64 - 6) * EXPERT  # top-6 of 64 routed experts per token
LM_COMPUTE = LM_ACTIVE - EMBED  # the embedding lookup does no matmul; lm_head does
VIT, PROJ = 416_866_032, 30_679_808  # tests/test_model_vlm.py pins these two


@pytest.fixture(scope="module")
def full():
    return load_recipe(FULL)


@pytest.fixture(scope="module")
def plan(full):
    return make_plan(full, plan_config(gpu="h100", num_gpus=512, mfu=0.4, zero_stage=2))


def row(plan, name):
    return next(r for r in plan.rows if r.stage == name)


def test_params_match_the_architecture(plan):
    assert LM_TOTAL == 15_960_108_544 and LM_ACTIVE == 2_914_774_528  # ~16B total / ~3B active
    c = plan.costs
    assert (c.params["lm"], c.lm_active, c.lm_compute) == (LM_TOTAL, LM_ACTIVE, LM_COMPUTE)
    assert (c.params["vision"], c.params["projector"]) == (VIT, PROJ)


def test_stage_budgets_add_up_to_the_papers_4_4T(full, plan):
    budgets = {s.kind: budgeted_tokens(s) for s in full.stages if s.kind in PRETRAIN_KINDS}
    assert budgets == {
        "vit_pretrain": 2.0e12,
        "align": 0.1e12,
        "joint_pretrain": 1.4e12,
        "cooldown": 0.6e12,
        "long_context": 0.3e12,
    }
    assert sum(budgets.values()) == pytest.approx(4.4e12, rel=1e-12)
    # steps = round(tokens / (batch * seq_len)); long context keeps 4096 x 8192 tokens per step
    per_step = {
        "vit_pretrain": 2048 * 8192,
        "align": 2048 * 8192,
        "joint_pretrain": 4096 * 8192,
        "cooldown": 4096 * 8192,
        "long_context[0]": 1024 * 32768,
        "long_context[1]": 256 * 131072,
    }
    steps = {
        "vit_pretrain": 119_209,  # 2.0e12 / 16,777,216 = 119,209.29
        "align": 5_960,  # 1.0e11 / 16,777,216 =   5,960.46
        "joint_pretrain": 41_723,  # 1.4e12 / 33,554,432 =  41,723.25
        "cooldown": 17_881,  # 6.0e11 / 33,554,432 =  17,881.39
        "long_context[0]": 4_470,  # 1.5e11 / 33,554,432 =   4,470.35
        "long_context[1]": 4_470,
    }
    for name, n in steps.items():
        r = row(plan, name)
        assert (r.steps, r.tokens) == (n, n * per_step[name]), name
    ran = sum(n * per_step[k] for k, n in steps.items())
    assert ran == 4_399_942_336_512  # whole steps: 4.4T less 57.7B of rounding (0.0013%)
    assert plan.total("tokens", PRETRAIN_KINDS) == ran


def test_joint_pretrain_flops_and_gpu_hours_by_hand(plan):
    s = 8192
    lm = 6 * LM_COMPUTE + 3 * (L * HEADS * (192 + 128) * s)  # 6N + causal attention (x3 fwd+bwd)
    vit = 6 * VIT + 3 * (27 * 4 * 1152 * 4096)  # per patch; images <= 4096 patches
    per_token = lm + 0.3 * (4 * vit + 6 * PROJ)  # 30% image tokens, 2x2 patches each
    tokens = 41_723 * 4096 * 8192
    r = row(plan, "joint_pretrain")
    assert r.flops == pytest.approx(per_token * tokens, rel=1e-12)
    assert r.flops == pytest.approx(3.3269e22, rel=1e-4)
    assert r.gpu_hours == pytest.approx(per_token * tokens / (989e12 * 0.4) / 3600, rel=1e-12)


def test_align_pays_backward_through_the_frozen_lm_but_no_weight_grads(plan):
    r, s = row(plan, "align"), 8192
    lm = 4 * LM_COMPUTE + 3 * (L * HEADS * 320 * s)  # frozen LM: 2N fwd + 2N input-grads, no 2N weight grads
    vit = 6 * VIT + 3 * (27 * 4 * 1152 * 4096)
    assert r.flops == pytest.approx((lm + 0.3 * (4 * vit + 6 * PROJ)) * 5_960 * 2048 * s, rel=1e-12)
    total = VIT + PROJ + LM_TOTAL
    trained = VIT + PROJ
    assert r.memory.params == 4 * total  # fp32 weights (the trainer's), all resident under ZeRO-2
    assert r.memory.grads == pytest.approx(4 * trained / 512)
    assert r.memory.optimizer == pytest.approx(4 * trained / 512)  # Muon: the fp32 momentum


def test_joint_pretrain_memory_per_gpu_by_hand(plan, full):
    """What the trainer keeps: fp32 weights replicated under ZeRO-2 (65.6 GB), bf16 autocast
    over them. An H100's usable 72 GB leaves ~6 GB, less than a whole 8K sequence takes with the
    bf16 weight casts and one rebuilt MoE layer's gradient copies, so the plan splits each
    sequence over 4 GPUs (context parallelism); an H200 fits it one sequence per GPU."""
    r = row(plan, "joint_pretrain")
    total = VIT + PROJ + LM_TOTAL
    assert r.memory.params == 4 * total
    assert r.memory.grads == pytest.approx(4 * total / 512)
    # Muon keeps a 4 B fp32 momentum per param; AdamW takes embed + lm_head: both moments, +4 B
    assert r.memory.optimizer == pytest.approx((4 * total + 4 * 2 * EMBED) / 512)
    assert (r.dp, r.cp, r.micro_batch, r.grad_accum) == (128, 4, 1, 32) and r.fits and not r.needs_cp
    assert "set stages.joint_pretrain.launcher.context_parallel: 4" in r.note
    t, cp = 2048, 4  # this GPU's quarter of one 8K sequence
    norm = 3 * H + 1  # input, normalised, weighted output (the next matmul's input) + 1/rms
    attn = 2 * HEADS * 192 + 3 * HEADS * 128 + HEADS + (2 * 512 + 64 + 1)  # q, k; v, out, o_in; lse; latent
    moe_layer = 2 * norm + attn + (64 + 3 * 6 + 1) + 6 * (3 * H + 4 * 1408 + 5) + 4 * 2 * 1408
    # of which autocast keeps fp32 (4 B, not 2): the norms' inputs and 1/rms, the logsumexp, the
    # router's scores and top-k, each routed copy's gathered input and weighted output
    moe_fp32 = 2 * (H + 1) + HEADS + (64 + 3 * 6 + 1) + 2 * 6 * H
    chunk = 2**28 // V  # the loss runs over chunks of 1638 tokens (model/lm_loss.py): no logits kept
    saved, backward = (
        2 * t * norm,
        chunk * V * (2 + 4 + 4 + 4 + 2),
    )  # one chunk: logits, fp32, log-probs, grads
    gathered = 2 * t * (cp - 1) * (512 + HEADS * (192 + 128))  # the others' keys: latent, expanded k and v
    mask = t * 8192  # one byte per (query, key) of the slice, shared by the layers
    attn_w = MLA + NORMS + H / L  # a layer's attention weights (the final norm's spread over the layers)
    moe_w = attn_w + 3 * H * 2816 + 64 * (EXPERT + H)  # shared, routed, router
    linear_w = L * attn_w + DENSE_FFN + (L - 1) * 3 * H * 2816 + EMBED  # autocast's cache: nn.Linear's
    rebuilt = t * (2 * moe_layer + 2 * moe_fp32) + gathered + (2 + 2 + 4) * moe_w  # casts, grads, fp32
    peak = max(saved + backward + 2 * EMBED, saved + 2 * linear_w, rebuilt)  # backward, forward's end
    lm_acts = 4 * t * H * L + mask + peak  # recompute: the fp32 residual stream at each layer's input
    patches = t * 0.3 * 4  # the images of this GPU's slice
    vit_acts = 2 * patches * (1152 * 27 + 11 * 1152 + 2 * 4304 + 16 + 4)  # inputs + one block rebuilt
    assert r.memory.activations == pytest.approx(lm_acts + vit_acts, rel=1e-12)
    stage = next(s for s in full.stages if s.kind == "joint_pretrain")
    one = memory_per_gpu(stage_path(stage), model_costs(full.model), plan_config(), 8192, True)
    assert one.total / 1e9 == pytest.approx(75.6, abs=0.05)  # a whole sequence on one GPU
    h200 = row(make_plan(full, plan_config(gpu="h200")), "joint_pretrain")
    assert h200.fits and (h200.dp, h200.cp, h200.micro_batch, h200.grad_accum) == (512, 1, 1, 8)


def test_long_rows_split_sequences_and_stages_without_context_parallelism_say_so(plan, full):
    """Stages trained by next-token loss shard long sequences (launcher.context_parallel): the
    plan picks the smallest degree that fits and names the setting. RL and long2short cannot, so
    a row of theirs that would need it is flagged with what would fit; --assume-cp is the
    what-if for them."""
    lc = row(plan, "long_context[0]")  # H100: 32K over 32 GPUs per sequence
    assert lc.fits and not lc.needs_cp and (lc.dp, lc.cp) == (16, 32) and lc.memory.total / 1e9 < 72
    assert "set stages.long_context.launcher.context_parallel: 32" in lc.note
    # 128K: what every GPU keeps whole (fp32 weights, their bf16 casts, one rebuilt layer's
    # gradients) leaves too little even at the largest degree; the note names the GPU that fits
    lc = row(plan, "long_context[1]")
    assert (
        not lc.fits and (lc.dp, lc.cp) == (1, 512) and "needs 72.2 GB > 72 GB usable: --gpu h200" in lc.note
    )
    rl = row(plan, "rl")
    assert rl.needs_cp and not rl.fits and rl.memory.total / 1e9 == pytest.approx(151.8, abs=0.05)
    assert "needs context parallelism x512, which a rl stage does not have" in rl.note
    assert "sequences up to 2,305 tokens fit one GPU)" in rl.note and "--assume-cp" in rl.note
    assert {r.stage for r in plan.rows if not r.fits} == {"rl", "long2short", "long_context[1]", "sft[1]"}
    h200 = make_plan(full, plan_config(gpu="h200"))
    assert {r.stage for r in h200.rows if not r.fits} == {"rl"} and row(h200, "rl").needs_cp
    assert row(h200, "long_context[1]").cp == 2  # 256 sequences of 128K over 512 GPUs
    what_if = make_plan(full, plan_config(gpu="h200", context_parallel=True))
    assert all(r.fits and not r.needs_cp for r in what_if.rows), [r.stage for r in what_if.rows if not r.fits]
    assert row(what_if, "rl").cp > 1
    assert what_if.unplanned == ["sft[0]", "sft[1]"]  # epoch budgets resolve against the data


def test_zero_stages_shard_what_they_say(full):
    mem = {z: row(make_plan(full, plan_config(zero_stage=z)), "cooldown").memory for z in (0, 1, 2, 3)}
    total = VIT + PROJ + LM_TOTAL
    assert mem[0].optimizer == pytest.approx(4 * total + 8 * EMBED)  # Muon momentum; AdamW 2 moments
    assert mem[1].optimizer == pytest.approx(mem[0].optimizer / 512) and mem[1].grads == 4 * total
    assert mem[2].grads == pytest.approx(4 * total / 512) and mem[2].params == 4 * total
    assert mem[3].params == pytest.approx(4 * total / 512)
    assert mem[0].total > mem[1].total > mem[2].total > mem[3].total
    z3 = row(make_plan(full, plan_config(zero_stage=3)), "cooldown")  # the trainer refuses it
    assert not z3.fits and "ZeRO-3 does not run with the Muon optimizer yet" in z3.note


def test_oom_is_flagged_with_the_fix(full):
    r = load_recipe(FULL, ["stages.cooldown.micro_batch_size=8"])
    c = row(make_plan(r, plan_config(zero_stage=0)), "cooldown")
    assert not c.fits and "micro_batch_size" in c.note and "--zero" in c.note


def test_tiny_recipe_plans_on_one_gpu():
    p = make_plan(load_recipe(TINY), plan_config(num_gpus=1, gpu="a100"))
    assert all(r.dp == 1 and r.cp == 1 and r.fits for r in p.rows)
    assert row(p, "joint_pretrain").tokens == 100 * 16 * 256  # 100 steps x 16 seqs x 256 tokens


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(gpu="h800"), "unknown GPU type 'h800'; use one of a100, h100, h200, b200"),
        (dict(mfu=1.5), "--mfu"),
        (dict(zero_stage=4), "--zero"),
        (dict(num_gpus=0), "--gpus"),
    ],
)
def test_bad_options_name_the_option(kw, msg):
    with pytest.raises(PlanError, match=msg):
        plan_config(**kw)


def test_world_size_that_cannot_divide_the_batch_names_the_fix(full):
    # 384 = 3 x 128: no dp x cp split of 384 divides 4096 sequences of a power-of-two length
    with pytest.raises(PlanError, match=r"4096 sequences cannot be split over 384 GPUs.*--gpus 256 or 512"):
        make_plan(full, plan_config(num_gpus=384))


def test_micro_batch_that_does_not_divide_the_per_gpu_batch(full):
    r = load_recipe(
        FULL, ["stages.joint_pretrain.micro_batch_size=4", "stages.joint_pretrain.batch_size=6144"]
    )
    # 12 seqs per GPU at cp=1, run as 4 x 8K tokens per forward on an H200 (the loss in chunks
    # keeps no logits, so 4 sequences fit) and 3 accumulated
    j = row(make_plan(r, plan_config(gpu="h200")), "joint_pretrain")
    assert (j.dp, j.cp, j.micro_batch, j.grad_accum, j.fits) == (512, 1, 4, 3, True)
    r = load_recipe(
        FULL, ["stages.joint_pretrain.micro_batch_size=4", "stages.joint_pretrain.batch_size=3072"]
    )  # recipe-valid, 6 per GPU
    with pytest.raises(PlanError, match=r"6 sequences per GPU.*micro_batch_size=4.*stages\.joint_pretrain"):
        make_plan(r, plan_config(num_gpus=512))


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=250, force_terminal=False))
    monkeypatch.setattr(cli, "err_console", Console(width=250, stderr=True, force_terminal=False))
    return CliRunner()


def test_cli_prints_the_table_and_totals(runner):
    res = runner.invoke(cli.app, ["plan", FULL, "--gpu", "h100", "--gpus", "512", "--mfu", "0.4"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "plan: kimi-vl-a3b on 512 x H100 (MFU 0.4, ZeRO-2, recompute)" in out
    assert "stages 1-5 token budget (recipe num_tokens): 4.40T" in out
    assert "LM 15.96B total / 2.91B active" in out and "ViT 0.417B" in out
    for name in ("vit_pretrain", "long_context[1]", "rl", "long2short"):
        assert name in out


def test_cli_bad_input_exits_1_with_the_fix(runner):
    res = runner.invoke(cli.app, ["plan", FULL, "--gpu", "tpu"])
    assert res.exit_code == 1 and "plan error" in res.output and "use one of a100" in res.output
    res = runner.invoke(cli.app, ["plan", FULL, "--gpus", "384"])
    assert res.exit_code == 1 and "--gpus 256 or 512" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli.app, ["plan", FULL, "--set", "stages.rl.tauu=1"])
    assert res.exit_code == 1 and "did you mean 'tau'" in res.output

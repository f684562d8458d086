"""`moonforge plan`: per-stage tokens, steps, FLOPs, memory per GPU and GPU-hours for a recipe.

Pure arithmetic over the recipe and the model shape (no prefect / mlflow, no data, no GPU): a
budget check before anyone books a cluster. Every estimate is a stated formula (see each
function), so a plan is reproducible by hand; tests/test_plan.py pins the full-scale totals.

Conventions:
- tokens = steps x batch_size x seq_len (what the loop would actually run, after rounding the
  recipe's num_tokens to whole steps); RL counts generated rollout tokens at their cap.
- FLOPs = model FLOPs (MFU convention: activation recompute is not counted): 6 N per trained
  token (2 forward + 4 backward) for the parameters on the token's path, plus causal attention.
- memory = what the trainer keeps: fp32 weights, grads and optimizer states (bf16 autocast for the
  compute, so bf16 activations), sharded per ZeRO stage over all GPUs, plus the activations of
  one micro-batch per GPU.
- layout: data parallel x context parallel (cp splits each sequence over a group of GPUs:
  model/context_parallel.py, `launcher.context_parallel`); cp is the smallest degree that
  divides the batch and fits in memory, and the note names the launcher setting when the recipe
  has another. Stages whose loss cannot shard a sequence (ViT pretraining, RL, long2short) have
  no context parallelism: unless the plan assumes it (`--assume-cp`), such a row needing cp > 1
  is flagged (`needs_cp`), with its memory on one GPU and what would fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from moonforge.model.config import VLMConfig
from moonforge.stages.config import StageConfig
from moonforge.stages.plan_hw import (  # noqa: F401  (re-exported: the plan's public names)
    GPUS,
    MEMORY_HEADROOM,
    GPUSpec,
    PlanConfig,
    PlanError,
    choose_layout,
    plan_config,
)
from moonforge.stages.plan_model import ModelCosts, TokenPath, model_costs, stage_path

if TYPE_CHECKING:
    from moonforge.stages.stage_configs import (
        Long2ShortConfig,
        LongContextConfig,
        RLConfig,
        ViTPretrainConfig,
    )


@dataclass
class Memory:
    """Bytes per GPU."""

    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


@dataclass
class SegmentPlan:
    """One row of the plan: a stage, or one sub-stage / phase of it."""

    stage: str
    kind: str
    seq_len: int
    steps: int | None
    tokens: float | None
    flops: float | None
    gpu_hours: float | None
    memory: Memory
    fits: bool
    dp: int
    cp: int
    micro_batch: int
    grad_accum: int
    note: str = ""
    needs_cp: bool = False
    """The row's layout splits sequences over GPUs, which this stage's trainer cannot do."""


@dataclass
class Plan:
    recipe: str
    config: PlanConfig
    costs: ModelCosts
    rows: list[SegmentPlan] = field(default_factory=list)

    def total(self, attr: str, kinds: tuple[str, ...] | None = None) -> float:
        return sum(getattr(r, attr) or 0.0 for r in self.rows if kinds is None or r.kind in kinds)

    @property
    def unplanned(self) -> list[str]:
        """Rows whose budget resolves against the data (epochs), so no tokens / FLOPs here."""
        return [r.stage for r in self.rows if r.tokens is None]


PRETRAIN_KINDS = ("vit_pretrain", "align", "joint_pretrain", "cooldown", "long_context")
"""Kimi-VL's pretraining stages after text pretraining: 2.0 + 0.1 + 1.4 + 0.6 + 0.3 = 4.4T tokens."""


def budgeted_tokens(stage: StageConfig) -> float | None:
    """The recipe's own token budget of a stage (num_tokens, summed over sub-stages)."""
    subs = getattr(stage, "sub_stages", None)
    if subs:
        return sum(s.num_tokens or 0.0 for s in subs) or None
    return stage.num_tokens


# ----------------------------------------------------------------------------------------------
# memory


def memory_per_gpu(
    path: TokenPath,
    costs: ModelCosts,
    cfg: PlanConfig,
    seq_tokens: int,
    use_muon: bool,
    cp: int = 1,
    seq_len: int = 0,
) -> Memory:
    """Per-GPU bytes for a stage's module path and `seq_tokens` tokens per micro-batch per GPU
    (under context parallelism over `cp` GPUs: its slice of sequences of `seq_len`).

    What the trainer keeps (registry/launch.py: DeepSpeed with bf16 off; the loop autocasts the
    compute to bf16 on CUDA): fp32 weights (4 B) for every resident module; for trained ones fp32
    grads (4 B) and optimizer states: the momentum (4 B) under Muon, both moments (8 B) under
    AdamW (which always takes the embeddings and lm_head). No separate master copy: the fp32
    weights are the master. ZeRO-1/2/3 divide states / +grads / +params by num_gpus (no tensor or
    expert parallelism is assumed).
    """
    n = cfg.num_gpus
    resident = sum(costs.params[m] for m in path.modules)
    trained = sum(costs.params[m] for m in path.trained)
    adamw = trained if not use_muon else (costs.lm_embed if "lm" in path.trained else 0)
    states = 4 * trained + 4 * adamw
    z = cfg.zero_stage
    params = 4 * resident / (n if z >= 3 else 1)
    grads = 4 * trained / (n if z >= 2 else 1)
    optimizer = states / (n if z >= 1 else 1)
    acts = costs.activation_bytes(
        path, seq_tokens, cfg.image_token_share, cfg.activation_checkpointing, cp=cp, seq_len=seq_len
    )
    return Memory(params, grads, optimizer, acts)


# ----------------------------------------------------------------------------------------------
# stages -> rows


def _segments(stage: StageConfig) -> list[tuple[str, int, int, int | None]]:
    """(label, seq_len, batch rows, steps or None) for each part of a stage with its own length."""
    name = stage.stage_name
    subs = getattr(stage, "sub_stages", None)
    if subs:
        lc = cast("LongContextConfig", stage)  # the stage kind with sub_stages
        return [
            (f"{name}[{i}]", s.seq_len, lc.sub_stage_batch(s), lc.sub_stage_steps(s))
            for i, s in enumerate(subs)
        ]
    phases = getattr(stage, "phases", None)
    if phases:
        return [(f"{name}[{i}]", p.seq_len, stage.batch_size, p.num_steps) for i, p in enumerate(phases)]
    return [(name, stage.seq_len, stage.batch_size, stage.steps)]


def _rl_work(stage: StageConfig) -> tuple[float, float, int]:
    """(rollout tokens, training-token passes, trajectories per iteration) of an RL-like stage.

    Per OPMD iteration: prompts x k trajectories, each sampled up to its per-iteration cap
    (partial rollouts: rollout_token_budget, else max_new_tokens); one no-grad log-prob pass for
    pi_i, then steps_per_iteration forward+backward passes over the same tokens. long2short adds
    its sampling for rejection sampling / DPO and num_steps SFT/DPO steps of batch x seq_len.
    """
    if stage.kind == "rl":
        rl = cast("RLConfig", stage)
        traj = rl.prompts_per_iteration * rl.samples_per_prompt
        gen = rl.num_iterations * traj * (rl.rollout_token_budget or rl.max_new_tokens)
        return gen, gen * rl.steps_per_iteration, traj
    l2s = cast("Long2ShortConfig", stage)  # the other RL-like kind
    traj = l2s.rl_prompts_per_iteration * l2s.rl_samples_per_prompt
    rl_gen = l2s.rl_iterations * traj * l2s.max_new_tokens
    sample_gen = l2s.num_questions * l2s.num_samples * l2s.sample_max_new_tokens
    sft = l2s.steps * l2s.batch_size * l2s.seq_len
    return rl_gen + sample_gen, rl_gen * l2s.rl_steps_per_iteration + sft, traj


def vit_patches_per_image(stage: StageConfig) -> float:
    """Mean patches per image over stage 1's progressive-resolution schedule (images at the cap)."""
    ms = cast("ViTPretrainConfig", stage).resolution_schedule  # the stage kind measured in patches
    ends = [m.at_frac for m in ms[1:]] + [1.0]
    return sum((end - m.at_frac) * m.max_patches for m, end in zip(ms, ends))


def flops_per_token(
    stage: StageConfig, costs: ModelCosts, cfg: PlanConfig, seq_len: int, train: bool = True
) -> float:
    """Model FLOPs per token of `stage` (training, or one forward pass when not `train`)."""
    path = stage_path(stage)
    if path.unit == "patch":
        p = vit_patches_per_image(stage)
        return costs.flops_per_token(
            path, seq_len, train, patches_per_image=p, text_per_patch=costs.shape.caption.max_text_len / p
        )
    return costs.flops_per_token(path, seq_len, train, image_share=cfg.image_token_share)


def _row(
    stage: StageConfig,
    label: str,
    seq_len: int,
    rows: int,
    steps: int | None,
    cfg: PlanConfig,
    costs: ModelCosts,
) -> SegmentPlan:
    path = stage_path(stage)
    use_muon = stage.optimizer.use_muon
    cap = cfg.spec.memory_gb * 1e9 * MEMORY_HEADROOM

    def mem(mb: int, cp: int) -> Memory:
        return memory_per_gpu(path, costs, cfg, mb * seq_len // cp, use_muon, cp, seq_len)

    rl_like = stage.kind in ("rl", "long2short")
    layout_rows = _rl_work(stage)[2] if rl_like else rows
    dp, cp, mb = choose_layout(
        stage.stage_name,
        layout_rows,
        stage.micro_batch_size,
        seq_len,
        cfg,
        lambda mb, cp: mem(mb, cp).total <= cap,
    )
    m = mem(mb, cp)
    needs_cp = cp > 1 and not (stage.context_parallel_ok or cfg.context_parallel)
    if needs_cp:
        m = mem(1, 1)  # what one sequence takes on one GPU: the only layout the trainer has
    peak = cfg.spec.peak_tflops * 1e12
    note, tokens, flops, hours = "", None, None, None
    if rl_like:
        gen, trained, _ = _rl_work(stage)
        fwd = flops_per_token(stage, costs, cfg, seq_len, train=False)
        # training passes plus the no-grad pi_i log-prob pass over every generated token
        train_flops = flops_per_token(stage, costs, cfg, seq_len) * trained + fwd * gen
        gen_flops = fwd * gen
        tokens, flops = float(gen), train_flops + gen_flops
        hours = (train_flops / (peak * cfg.mfu) + gen_flops / (peak * cfg.rollout_mfu)) / 3600
        steps = stage.steps
        note = f"rollout tokens at their cap; sampling at {cfg.rollout_mfu:g} MFU"
    elif steps is None:
        note = "epoch budget: tokens depend on the dataset; set num_steps in the phase to plan it"
    else:
        tokens = float(steps * rows * seq_len)
        flops = flops_per_token(stage, costs, cfg, seq_len) * tokens
        hours = flops / (peak * cfg.mfu) / 3600
    if needs_cp:
        if m.total > cap:  # memory is linear in the micro-batch's tokens
            fixed = memory_per_gpu(path, costs, cfg, 0, use_muon).total
            longest = int((cap - fixed) / (m.total - fixed) * seq_len)
            fit = f"sequences up to {longest:,} tokens fit one GPU" if longest > 0 else "no sequence fits"
            why = (
                f"one {seq_len:,}-token sequence needs {m.total / 1e9:.1f} GB > {cap / 1e9:.0f} GB "
                f"usable; {fit}" + "".join(f", or {f}" for f in _zero_fix(cfg, use_muon))
            )
        else:
            why = f"{layout_rows} sequences cannot occupy {cfg.num_gpus} GPUs; --gpus {layout_rows} would"
        note = (
            f"needs context parallelism x{cp}, which a {stage.kind} stage does not have ({why}); "
            f"--assume-cp plans with it"
        ) + (f"; {note}" if note else "")
    elif not m.total <= cap:
        smaller = [f"a smaller stages.{stage.stage_name}.micro_batch_size"] if mb > 1 else []
        fixes = ", ".join([*_zero_fix(cfg, use_muon), *smaller, *_bigger_gpu(cfg, m.total)]) or "none known"
        note = f"needs {m.total / 1e9:.1f} GB > {cap / 1e9:.0f} GB usable: {fixes}" + (
            f"; {note}" if note else ""
        )
    if not needs_cp and cp > 1 and stage.launcher.context_parallel != cp:
        note = f"set stages.{stage.stage_name}.launcher.context_parallel: {cp}" + (
            f"; {note}" if note else ""
        )
    if cfg.zero_stage == 3 and use_muon:  # registry/launch.py refuses this combination
        note = "ZeRO-3 does not run with the Muon optimizer yet (it needs whole matrices): use --zero 2" + (
            f"; {note}" if note else ""
        )
    return SegmentPlan(
        label,
        stage.kind,
        seq_len,
        steps,
        tokens,
        flops,
        hours,
        m,
        m.total <= cap and not needs_cp and not (cfg.zero_stage == 3 and use_muon),
        dp,
        cp,
        mb,
        rows // dp // mb if not rl_like else layout_rows // dp // mb,
        note,
        needs_cp,
    )


def _bigger_gpu(cfg: PlanConfig, need: float) -> list[str]:
    """The smallest GPU type in GPUS whose usable memory holds `need` bytes, as a --gpu flag."""
    for name, spec in sorted(GPUS.items(), key=lambda kv: kv[1].memory_gb):
        if spec.memory_gb > cfg.spec.memory_gb and spec.memory_gb * 1e9 * MEMORY_HEADROOM >= need:
            return [f"--gpu {name}"]
    return []


def _zero_fix(cfg: PlanConfig, use_muon: bool) -> list[str]:
    """The higher ZeRO stage that would shard more, when the trainer can run it (not ZeRO-3
    with Muon)."""
    z = cfg.zero_stage + 1
    return [f"--zero {z}"] if z <= 2 or (z == 3 and not use_muon) else []


def make_plan(recipe, cfg: PlanConfig, model: VLMConfig | None = None) -> Plan:
    """The plan of every stage of `recipe` (a loaded Recipe) under the assumptions `cfg`."""
    costs = model_costs(model or recipe.model)
    plan = Plan(recipe.name, cfg, costs)
    for stage in recipe.stages:
        for label, seq_len, rows, steps in _segments(stage):
            plan.rows.append(_row(stage, label, seq_len, rows, steps, cfg, costs))
    return plan

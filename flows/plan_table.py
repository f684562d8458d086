"""Rich rendering of a `stages.plan.Plan` for `moonforge plan` (the numbers live in stages/plan.py)."""

from __future__ import annotations

from rich.table import Table

from moonforge.stages.plan import PRETRAIN_KINDS, Plan, budgeted_tokens


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}{unit}"
    return f"{x:.0f}{unit}"


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def plan_table(plan: Plan) -> Table:
    """One row per stage (or sub-stage / phase), then the totals."""
    cfg = plan.config
    t = Table(title=f"plan: {plan.recipe} on {cfg.num_gpus} x {cfg.gpu.upper()} "
                    f"(MFU {cfg.mfu:g}, ZeRO-{cfg.zero_stage}"
                    f"{', recompute' if cfg.activation_checkpointing else ''})")
    for col in ("stage", "seq len", "steps", "tokens", "FLOPs", "params GB", "grads GB", "optim GB",
                "act GB", "mem/GPU GB", "dp x cp", "micro x accum", "GPU-hours", "days"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for r in plan.rows:
        m = r.memory
        mem = _gb(m.total) if r.fits else f"[red]{_gb(m.total)} (OOM)[/red]"
        days = None if r.gpu_hours is None else r.gpu_hours / cfg.num_gpus / 24
        t.add_row(r.stage, str(r.seq_len), "-" if r.steps is None else f"{r.steps:,}", _si(r.tokens),
                  "-" if r.flops is None else f"{r.flops:.2e}", _gb(m.params), _gb(m.grads),
                  _gb(m.optimizer), _gb(m.activations), mem, f"{r.dp} x {r.cp}",
                  f"{r.micro_batch} x {r.grad_accum}",
                  "-" if r.gpu_hours is None else f"{r.gpu_hours:,.0f}",
                  "-" if days is None else f"{days:.1f}")
    t.add_section()
    pre = plan.total("tokens", PRETRAIN_KINDS)
    pre_hours = plan.total("gpu_hours", PRETRAIN_KINDS)
    t.add_row("stages 1-5 (after text)", "", "", _si(pre), f"{plan.total('flops', PRETRAIN_KINDS):.2e}",
              *[""] * 7, f"{pre_hours:,.0f}", f"{pre_hours / cfg.num_gpus / 24:.1f}")
    hours = plan.total("gpu_hours")
    t.add_row("all planned rows", "", "", _si(plan.total("tokens")), f"{plan.total('flops'):.2e}",
              *[""] * 7, f"{hours:,.0f}", f"{hours / cfg.num_gpus / 24:.1f}")
    return t


def plan_notes(plan: Plan, recipe) -> list[str]:
    """Lines under the table: the model's sizes, the paper check and per-row caveats."""
    c = plan.costs
    p = c.params
    budget = sum(budgeted_tokens(s) or 0.0 for s in recipe.stages if s.kind in PRETRAIN_KINDS)
    lines = [
        f"model: ViT {p['vision'] / 1e9:.3f}B + projector {p['projector'] / 1e9:.3f}B + LM "
        f"{p['lm'] / 1e9:.2f}B total / {c.lm_active / 1e9:.2f}B active = VLM "
        f"{(p['vision'] + p['projector'] + p['lm']) / 1e9:.2f}B total / "
        f"{(p['vision'] + p['projector'] + c.lm_active) / 1e9:.2f}B active "
        f"(stage-1 caption towers {p['caption'] / 1e9:.2f}B)",
        f"stages 1-5 token budget (recipe num_tokens): {budget / 1e12:.2f}T; whole steps run "
        f"{plan.total('tokens', PRETRAIN_KINDS) / 1e12:.5f}T",
    ]
    lines += [f"{r.stage}: {r.note}" for r in plan.rows if r.note]
    return lines

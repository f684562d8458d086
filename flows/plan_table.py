"""Rendering of a `stages.plan.Plan` for `moonforge plan` (the numbers live in stages/plan.py).

`--format table`: one wide table when the console has room, else (a pipe, a CI log at 80
columns) two narrow ones: compute (steps, tokens, FLOPs, GPU-hours) and memory per GPU.
`--format markdown`: the wide table as Markdown. `--format json`: every number raw.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from moonforge.flows.tables import Column, emit, natural_width, rich_table
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
    t = Table(
        title=f"plan: {plan.recipe} on {cfg.num_gpus} x {cfg.gpu.upper()} "
        f"(MFU {cfg.mfu:g}, ZeRO-{cfg.zero_stage}"
        f"{', recompute' if cfg.activation_checkpointing else ''}"
        f"{', context parallelism assumed' if cfg.context_parallel else ''})"
    )
    for col in (
        "stage",
        "seq len",
        "steps",
        "tokens",
        "FLOPs",
        "params GB",
        "grads GB",
        "optim GB",
        "act GB",
        "mem/GPU GB",
        "dp x cp",
        "micro x accum",
        "GPU-hours",
        "days",
    ):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for r in plan.rows:
        m = r.memory
        mem = _gb(m.total) if r.fits else f"[red]{_gb(m.total)} ({'needs CP' if r.needs_cp else 'OOM'})[/red]"
        days = None if r.gpu_hours is None else r.gpu_hours / cfg.num_gpus / 24
        t.add_row(
            r.stage,
            str(r.seq_len),
            "-" if r.steps is None else f"{r.steps:,}",
            _si(r.tokens),
            "-" if r.flops is None else f"{r.flops:.2e}",
            _gb(m.params),
            _gb(m.grads),
            _gb(m.optimizer),
            _gb(m.activations),
            mem,
            f"{r.dp} x {r.cp}",
            f"{r.micro_batch} x {r.grad_accum}",
            "-" if r.gpu_hours is None else f"{r.gpu_hours:,.0f}",
            "-" if days is None else f"{days:.1f}",
        )
    t.add_section()
    pre = plan.total("tokens", PRETRAIN_KINDS)
    pre_hours = plan.total("gpu_hours", PRETRAIN_KINDS)
    t.add_row(
        "stages 1-5 (after text)",
        "",
        "",
        _si(pre),
        f"{plan.total('flops', PRETRAIN_KINDS):.2e}",
        *[""] * 7,
        f"{pre_hours:,.0f}",
        f"{pre_hours / cfg.num_gpus / 24:.1f}",
    )
    hours = plan.total("gpu_hours")
    t.add_row(
        "all planned rows",
        "",
        "",
        _si(plan.total("tokens")),
        f"{plan.total('flops'):.2e}",
        *[""] * 7,
        f"{hours:,.0f}",
        f"{hours / cfg.num_gpus / 24:.1f}",
    )
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


def _title(plan: Plan) -> str:
    cfg = plan.config
    return (
        f"plan: {plan.recipe} on {cfg.num_gpus} x {cfg.gpu.upper()} (MFU {cfg.mfu:g}, "
        f"ZeRO-{cfg.zero_stage}{', recompute' if cfg.activation_checkpointing else ''}"
        f"{', CP assumed' if cfg.context_parallel else ''})"
    )


def _unfit(r) -> str:
    """Why a row does not run as planned: it needs context parallelism, or it is out of memory."""
    return "CP" if r.needs_cp else "OOM"


def _display_rows(plan: Plan) -> list[dict[str, str]]:
    cfg = plan.config
    rows = []
    for r in plan.rows:
        m = r.memory
        days = None if r.gpu_hours is None else r.gpu_hours / cfg.num_gpus / 24
        rows.append(
            {
                "stage": r.stage,
                "seq": f"{r.seq_len:,}",
                "steps": "-" if r.steps is None else f"{r.steps:,}",
                "tokens": _si(r.tokens),
                "flops": "-" if r.flops is None else f"{r.flops:.2e}",
                "params": _gb(m.params),
                "grads": _gb(m.grads),
                "optim": _gb(m.optimizer),
                "act": _gb(m.activations),
                "mem": _gb(m.total) + ("" if r.fits else f" {_unfit(r)}"),
                "dpcp": f"{r.dp} x {r.cp}",
                "micro": f"{r.micro_batch} x {r.grad_accum}",
                "hours": "-" if r.gpu_hours is None else f"{r.gpu_hours:,.0f}",
                "days": "-" if days is None else f"{days:.1f}",
            }
        )
    for label, kinds in (("sum stages 1-5", PRETRAIN_KINDS), ("sum all rows", None)):
        hours = plan.total("gpu_hours", kinds)
        rows.append(
            {
                "stage": label,
                "tokens": _si(plan.total("tokens", kinds)),
                "flops": f"{plan.total('flops', kinds):.2e}",
                "hours": f"{hours:,.0f}",
                "days": f"{hours / cfg.num_gpus / 24:.1f}",
            }
        )
    return rows


def _num(key: str, header: str) -> Column:
    return Column(key, header, "right", no_wrap=True)


COMPUTE = [
    Column("stage", "stage", no_wrap=True),
    _num("seq", "seq len"),
    _num("steps", "steps"),
    _num("tokens", "tokens"),
    _num("flops", "FLOPs"),
    _num("hours", "GPU-hours"),
    _num("days", "days"),
]
MEMORY = [
    Column("stage", "stage", no_wrap=True),
    _num("params", "params"),
    _num("grads", "grads"),
    _num("optim", "optim"),
    _num("act", "act"),
    _num("mem", "total"),
    _num("dpcp", "dp x cp"),
    _num("micro", "mbs x acc"),
]
WIDE = (
    COMPUTE[:-2]
    + [
        _num("params", "params GB"),
        _num("grads", "grads GB"),
        _num("optim", "optim GB"),
        _num("act", "act GB"),
        _num("mem", "mem/GPU GB"),
        _num("dpcp", "dp x cp"),
        _num("micro", "micro x accum"),
    ]
    + COMPUTE[-2:]
)


def plan_record(plan: Plan, recipe) -> dict[str, Any]:
    """Everything `moonforge plan` shows, as JSON-able raw numbers (bytes, FLOPs, hours)."""
    rows = []
    for r in plan.rows:
        d = asdict(r)
        d["memory"] = {**d["memory"], "total": r.memory.total}
        rows.append(d)
    return {
        "recipe": plan.recipe,
        "config": plan.config.model_dump(mode="json"),
        "rows": rows,
        "totals": {
            "pretrain_tokens": plan.total("tokens", PRETRAIN_KINDS),
            "pretrain_flops": plan.total("flops", PRETRAIN_KINDS),
            "pretrain_gpu_hours": plan.total("gpu_hours", PRETRAIN_KINDS),
            "tokens": plan.total("tokens"),
            "flops": plan.total("flops"),
            "gpu_hours": plan.total("gpu_hours"),
        },
        "params": dict(plan.costs.params),
        "lm_active_params": plan.costs.lm_active,
        "notes": plan_notes(plan, recipe),
    }


def print_plan(plan: Plan, recipe, fmt: str, console: Console) -> None:
    """`moonforge plan` output in `fmt` (table | json | markdown)."""
    rows, notes = _display_rows(plan), plan_notes(plan, recipe)
    if fmt != "table":
        emit(console, fmt, rows, WIDE, plan_record(plan, recipe), _title(plan), notes)
        return
    wide = plan_table(plan)
    if natural_width(wide) <= console.width:
        console.print(wide)
    else:  # a pipe or a CI log: two narrow tables, memory in GB per GPU
        mem_rows = [r for r in rows if "params" in r]
        console.print(rich_table(rows, COMPUTE, _title(plan), console.width))
        console.print(rich_table(mem_rows, MEMORY, "memory per GPU (GB) and layout", console.width))
    for line in notes:
        console.print(line, highlight=False, markup=False)

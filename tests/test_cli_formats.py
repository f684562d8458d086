"""Every table command reads well in an 80-column log and has --format json / markdown.

`moonforge plan recipes/kimi-vl-a3b.yaml | cat` (a real pipe, COLUMNS=80): no line over 80
characters, nothing cut to "...", every stage named in full. `models`, `status`, the run summary,
`rerun --dry-run` and `data status` at 80 columns likewise (headline metrics one a line, names in
full); their --format json parses to the records, --format markdown is a pipe table.
Wall time ~25 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from rich.console import Console
from typer.testing import CliRunner

from moonforge.flows import cli
from moonforge.registry.run_stage import run_stage
from moonforge.registry.tracking import Tracker
from moonforge.stages.artifacts import StageResult
from moonforge.stages.recipe import load_recipe

MINI = "recipes/mini.yaml"
LONG = {
    "eval/acc_per_1k_tokens": 0.0123456,
    "eval/acc_per_1k_tokens_before": 0.00567,  # the upstream model's: the run summary shows both
    "eval/needle_recall_base_len_before": 0.75,  # the same: shown once
    "eval/needle_recall_base_len": 0.75,
    "eval/vqa_acc_with_a_rather_long_name": 0.5,
}


def readable_at_80(text: str) -> None:
    for line in text.splitlines():
        assert len(line) <= 80, f"{len(line)} columns: {line!r}"
    assert "…" not in text and "..." not in text, text


@pytest.fixture
def narrow(monkeypatch):
    """The CLI's consoles as in a pipe to an 80-column log."""
    monkeypatch.setattr(cli, "console", Console(width=80, force_terminal=False, color_system=None))
    monkeypatch.setattr(cli, "err_console", Console(width=80, stderr=True, force_terminal=False))


def invoke(*args: str) -> str:
    res = CliRunner().invoke(cli.app, list(args))
    assert res.exit_code == 0, res.output
    return res.output


def test_plan_piped_at_80_columns_and_as_json_and_markdown():
    env = {**os.environ, "COLUMNS": "80"}
    cmd = [sys.executable, "-m", "moonforge.flows.cli", "plan", "recipes/kimi-vl-a3b.yaml"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    readable_at_80(out)
    data = json.loads(invoke("plan", str(REPO / "recipes/kimi-vl-a3b.yaml"), "--format", "json"))
    stages = [r["stage"] for r in data["rows"]]
    assert "long_context[1]" in stages and all(s in out for s in stages)
    assert data["rows"][0]["memory"]["total"] > 1e9 and data["totals"]["gpu_hours"] > 0
    needs_cp = [r["stage"] for r in data["rows"] if r["needs_cp"]]
    assert needs_cp == ["rl", "long2short"] and "rl: needs context parallelism x512" in out
    what_if = json.loads(
        invoke("plan", str(REPO / "recipes/kimi-vl-a3b.yaml"), "--assume-cp", "--format", "json")
    )
    assert what_if["config"]["context_parallel"] and not any(r["needs_cp"] for r in what_if["rows"])
    md = invoke("plan", str(REPO / "recipes/kimi-vl-a3b.yaml"), "--format", "markdown")
    assert md.startswith("**plan: kimi-vl-a3b") and "| stage | seq len |" in md and "|---|---:|" in md
    assert CliRunner().invoke(cli.app, ["plan", "x.yaml", "--format", "xml"]).exit_code == 2


@pytest.fixture
def built(tmp_project, fake_stages, monkeypatch):
    """The mini chain built with fake stages that report long metric names; align@1 registered."""
    from moonforge.registry.promotion import set_candidate
    from moonforge.registry.store import open_store
    from moonforge.stages import catalog

    def with_long_names(base, data, cfg, ctx):
        res = fake_stages(base, data, cfg, ctx)
        return StageResult(res.checkpoint, {**LONG, **res.metrics}, res.data_used)

    monkeypatch.setattr(catalog, "stage_function", lambda kind: with_long_names)
    recipe = load_recipe(tmp_project / MINI)
    tracker = Tracker(tmp_project, recipe.name)
    out = {n: run_stage(recipe, n, tmp_project, tracker=tracker) for n in recipe.stage_names()}
    set_candidate(recipe, tmp_project, open_store(tmp_project), "align@1")
    return out


def test_models_status_dry_run_and_data_status(built, narrow):
    out = invoke("models", "--recipe", MINI)
    readable_at_80(out)
    assert all(f"{k}=" in out for k in LONG if not k.endswith("_before"))
    assert "candidate" in out and "align@1" in out and " -> " not in out  # the summary's, not the registry's
    rows = json.loads(invoke("models", "--recipe", MINI, "--format", "json"))
    assert rows[0]["artifact"] == "align@1" and rows[0]["metrics"]["eval/acc_per_1k_tokens"] > 0
    assert "| version | aliases |" in invoke("models", "--recipe", MINI, "--format", "markdown")

    over = ["--set", "stages.vit_pretrain.seed=2", "--set", "stages.lm_pretrain.optimizer.lr=0.002"]
    out = invoke("status", MINI, *over)
    readable_at_80(out)
    assert "config.optimizer.lr: 0.001 -> 0.002" in out and "config.seed: 0 -> 2" in out
    rows = {r["stage"]: r for r in json.loads(invoke("status", MINI, *over, "--format", "json"))}
    assert rows["align"]["state"] == "stale" and rows["align"]["changed"] == ["upstream"]
    assert rows["align"]["partial"] is None
    md = invoke("status", MINI, *over, "--format", "markdown")
    assert "| lm_pretrain | stale | lm_pretrain@1 |" in md and "<br>" in md

    out = invoke("rerun", "vit_pretrain", "--recipe", MINI, "--downstream", "--dry-run", *over[:2])
    readable_at_80(out)
    plan = json.loads(
        invoke(
            "rerun",
            "vit_pretrain",
            "--recipe",
            MINI,
            "--downstream",
            "--dry-run",
            *over[:2],
            "--format",
            "json",
        )
    )
    assert [p["action"] for p in plan] == ["run", "run"] and plan[1]["ref"] == "align@2"

    out = invoke("data", "status")
    readable_at_80(out)
    assert {r["name"]: r["state"] for r in json.loads(invoke("data", "status", "--format", "json"))} == {
        "text": "up to date",
        "toyworld": "up to date",
    }


def test_run_summary_shows_headline_metrics_in_full(built, narrow, capsys):
    outcomes = {n: o.to_dict() for n, o in built.items()}
    outcomes["align"]["resumed_from"] = "phase 0 step 6/12 (global step 6) at /x/step-0000006"
    cli._summary(outcomes, 0.0)
    out = capsys.readouterr().out
    readable_at_80(out.replace("/x/step", "step"))
    assert all(f"{k}=" in out for k in LONG if not k.endswith("_before"))
    assert "eval/acc_per_1k_tokens=0.00567 -> 0.01235" in out  # the upstream model's, then the stage's
    assert "eval/needle_recall_base_len=0.75\n" in out.replace(" ", "").replace("│", "\n")
    assert "align: resumed from phase 0 step 6/12" in out
    cli._summary(outcomes, 0.0, "json")
    data = json.loads(capsys.readouterr().out)
    assert data["stages"]["align"]["metrics"]["eval/needle_recall_base_len"] == 0.75
    cli._summary(outcomes, 0.0, "markdown")
    assert "| stage | artifact | how | headline metrics |" in capsys.readouterr().out

"""CLI for issue 4 items 1-3: rerun --dry-run, status by input kind, lineage / diff from any ref,
promote / models / chat through the MLflow model registry, candidate set by the lifecycle."""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from moonforge.flows import cli
from moonforge.registry.run_stage import run_stage
from moonforge.registry.tracking import Tracker, tracking_uri
from moonforge.stages.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("wide_consoles")

runner = CliRunner()
MINI = "recipes/mini.yaml"
GATED = "recipes/gated.yaml"


@pytest.fixture
def gated(tmp_project):
    """mini + promotion gates FakeStage can fail (final_loss = 1.255 + 0.01 * seed)."""
    data = yaml.safe_load((tmp_project / MINI).read_text())
    data["promotion"] = {"model_name": "mini-vlm", "gates": ["eval/acc >= 0.55", "train/final_loss <= 1.3"]}
    (tmp_project / GATED).write_text(yaml.safe_dump(data, sort_keys=False))
    return GATED


def invoke(*args):
    return runner.invoke(cli.app, list(args))


def rows(output: str, keys: tuple[str, ...]) -> dict[str, str]:
    """Table lines of a rich table by their first cell (borders or column gaps stripped)."""
    import re

    out = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]| {2,}", line) if c.strip()]
        if cells and cells[0] in keys:
            out[cells[0]] = " | ".join(cells)
    return out


def build(project, recipe=MINI, *overrides):
    r = load_recipe(project / recipe, list(overrides))
    tracker = Tracker(project, r.name)
    return {n: run_stage(r, n, project, tracker=tracker) for n in r.stage_names()}


def test_help_lists_the_registry_commands():
    res = invoke("--help")
    assert res.exit_code == 0
    for cmd in ("diff", "promote", "models", "chat"):
        assert cmd in res.output
    res = invoke("rerun", "--help")
    assert "--dry-run" in res.output and "models:/<name>@<alias>" in res.output


def test_dry_run_status_lineage_and_diff(tmp_project, fake_stages):
    out = build(tmp_project)
    res = invoke(
        "rerun", "vit_pretrain", "--recipe", MINI, "--from", "lm_pretrain@1", "--downstream", "--dry-run"
    )
    assert res.exit_code == 0, res.output
    assert "nothing was run" in res.output and "reuse vit_pretrain@1" in res.output
    assert "reuse align@1" in res.output and "0 stage(s) would train, 2 would be reused" in res.output

    res = invoke(
        "rerun",
        "vit_pretrain",
        "--recipe",
        MINI,
        "--downstream",
        "--dry-run",
        "--set",
        "stages.vit_pretrain.seed=2",
    )
    assert res.exit_code == 0, res.output
    assert "run -> vit_pretrain@2" in res.output and "run -> align@2" in res.output
    assert "vs vit_pretrain@1: config.seed: 0 -> 2" in res.output
    assert "upstream vit_pretrain changed (vit_pretrain@1 -> fingerprint" in res.output
    assert fake_stages.calls.count("vit_pretrain") == 1  # nothing ran

    res = invoke("rerun", "vit_pretrain", "--recipe", MINI, "--from", "align@1", "--dry-run")
    assert res.exit_code == 1 and "artifact not found" in res.output
    assert "a align artifact, but stage 'vit_pretrain' starts from its upstream 'lm_pretrain'" in res.output
    res = invoke("rerun", "align", "--recipe", MINI, "--from", "lm_pretrain@1", "--dry-run")
    assert res.exit_code == 0 and "skips vit_pretrain" in res.output and "run -> align@2" in res.output

    res = invoke("status", MINI, "--set", "stages.vit_pretrain.seed=2")
    st = rows(res.output, ("lm_pretrain", "vit_pretrain", "align"))
    assert "fresh" in st["lm_pretrain"]
    assert "stale" in st["vit_pretrain"] and "| config |" in st["vit_pretrain"]
    assert "stale" in st["align"] and "| upstream |" in st["align"]

    res = invoke("lineage", f"runs:/{out['align'].mlflow_run_id}", "--format", "json")
    assert res.exit_code == 0, res.output
    chain = json.loads(res.output)
    assert [c["ref"] for c in chain] == ["align@1", "vit_pretrain@1", "lm_pretrain@1"]
    assert chain[0]["mlflow_run_id"] == out["align"].mlflow_run_id
    assert chain[0]["recipe"]["name"] == "mini" and chain[-1]["datasets"][0]["name"] == "text"
    res = invoke("lineage", "align@1", "--format", "mermaid")
    assert res.output.startswith("graph LR") and "vit_pretrain_1 --> align_1" in res.output
    assert "-.-> align_1" in res.output and "recipe mini" in res.output
    assert f"mlflow {out['align'].mlflow_run_id[:8]}" in res.output
    res = invoke("lineage", "align@1")
    assert "recipe mini" in res.output and "data toyworld" in res.output
    assert invoke("lineage", "align@1", "--format", "dot").exit_code == 2

    build(tmp_project, MINI, "stages.align.seed=5", "stages.align.log_every=3")
    res = invoke("diff", "align@1", "align@latest")
    assert res.exit_code == 0, res.output
    assert "align@1" in res.output and "align@2" in res.output
    assert "config.seed: 0 -> 5" in res.output
    assert "runtime (not in fingerprint)" in res.output and "config.log_every: 10 -> 3" in res.output
    assert "train/final_loss: 1.255 -> 1.305" in res.output and "mlflow run" in res.output
    res = invoke("diff", "align@1", "align@1")
    assert "same fingerprint: identical inputs" in res.output
    res = invoke("diff", "lm_pretrain@1", "align@1")
    assert res.exit_code == 1 and "diff compares two versions of one stage" in res.output
    res = invoke("diff", "align@1", "align@9")
    assert res.exit_code == 1 and "no artifact 'align@9'" in res.output


def test_promote_refuses_then_passes_models_and_chat(tmp_project, fake_stages, gated, monkeypatch):
    build(tmp_project, gated, "stages.align.seed=9")
    res = invoke("promote", "align@latest", "--alias", "champion", "--recipe", gated)
    assert res.exit_code == 1, res.output
    assert "promotion refused: mini-vlm version 1 (align@1) was not promoted to 'champion'" in res.output
    assert "train/final_loss = 1.345 fails train/final_loss <= 1.3" in res.output
    assert "FAIL" in res.output and "Traceback" not in res.output

    build(tmp_project, gated)
    res = invoke("promote", "align@latest", "--recipe", gated)  # --alias defaults to champion
    assert res.exit_code == 0, res.output
    assert "promoted: mini-vlm@champion -> version 2 (align@2)" in res.output

    res = invoke("models", "--recipe", gated)
    assert res.exit_code == 0, res.output
    lines = rows(res.output, ("1", "2"))
    assert "align@1" in lines["1"] and "champion: refused" in lines["1"]
    assert "champion" in lines["2"] and "champion: promoted" in lines["2"] and "eval/acc=0.6" in lines["2"]

    for args, msg in {
        ("promote", "align@1", "--alias", "Bad!", "--recipe", gated): "registry error: invalid alias 'Bad!'",
        ("promote", "align@1", "--alias", "latest", "--recipe", gated): "reserves 'latest'",
        ("promote", "lm_pretrain@1", "--recipe", gated): "add 'lm_pretrain' to promotion.stages",
        ("promote", "align@7", "--recipe", gated): "no artifact 'align@7'",
        ("models", "--name", "nope"): "no registered model 'nope'",
        ("models", "--name", "bad name"): "invalid model name 'bad name'",
        (
            "promote",
            "align@1",
            "--recipe",
            gated,
            "--set",
            'promotion.gates=["eval/vqa_acc >= 1"]',
        ): "eval/vqa_acc was not recorded for this version",
    }.items():
        res = invoke(*args)
        assert res.exit_code == 1 and msg in res.output, (args, res.output)

    # chat loads whatever the alias points at (the model itself is stubbed: this is about refs)
    from moonforge.model import tokenizer
    from moonforge.registry import data_versions
    from moonforge.stages import inference

    seen = []
    monkeypatch.setattr(
        data_versions, "read_lock", lambda *a, **k: {"tokenizer": type("D", (), {"path": "tok"})}
    )
    monkeypatch.setattr(tokenizer.Tokenizer, "load", staticmethod(lambda path: "tok"))
    monkeypatch.setattr(
        inference,
        "chat",
        lambda ckpt, tok, q, img, n, **video_options: (
            seen.append(ckpt.path) or inference.ChatAnswer("a red circle", 3, "eos")
        ),
    )
    res = invoke("chat", "models:/mini-vlm@champion", "what is this?")
    assert res.exit_code == 0, res.output
    assert "align@2: a red circle" in res.output and seen[0].name == "2"
    res = invoke("chat", "models:/mini-vlm@candidate", "what is this?")
    assert res.exit_code == 1 and "model 'mini-vlm' has no alias 'candidate' (champion -> v2)" in res.output


def test_lifecycle_sets_candidate_and_reruns_take_mlflow_refs(tmp_project, fake_stages, prefect_api):
    res = invoke("run", MINI)
    assert res.exit_code == 0, res.output
    client = MlflowClient(tracking_uri(tmp_project))
    mv = client.get_model_version_by_alias("mini", "candidate")
    assert mv.tags["moonforge.artifact_ref"] == "align@1"
    assert mv.tags["moonforge.decision.candidate"] == "set"
    res = invoke("models", "--recipe", MINI)
    assert "candidate" in res.output and "align@1" in res.output

    vit_run = client.search_runs(
        [client.get_experiment_by_name("mini").experiment_id], "tags.`moonforge.stage` = 'vit_pretrain'"
    )[0].info.run_id
    res = invoke(
        "rerun", "align", "--recipe", MINI, "--from", f"runs:/{vit_run}", "--set", "stages.align.seed=4"
    )
    assert res.exit_code == 0, res.output
    assert "align@2" in res.output
    chain = json.loads(invoke("lineage", "models:/mini@candidate", "--format", "json").output)
    assert chain[0]["ref"] == "align@2"  # the rerun of the final stage is the new candidate
    assert chain[0]["upstream"]["ref"] == "vit_pretrain@1"
    assert chain[0]["upstream"]["resolution"] == "explicit (vit_pretrain@1)"  # pinned before the flow
    assert chain[0]["prefect_flow_run_id"]

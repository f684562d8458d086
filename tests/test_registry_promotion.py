"""MLflow model registry (SQLite backend): stage outputs as reference versions, recipe gates,
promotion refusing and then passing, the decision recorded, bad aliases / names / stages refused."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from moonforge.registry import model_registry as mr
from moonforge.registry.errors import PromotionRefused, RegistryError
from moonforge.registry.promotion import check_gates, promote, set_candidate
from moonforge.registry.run_stage import run_stage
from moonforge.registry.store import open_store
from moonforge.registry.tracking import Tracker, tracking_uri
from moonforge.stages.recipe import Gate, RecipeError, load_recipe

# FakeStage: train/final_loss = 4 * 0.9**11 + 0.01 * seed = 1.255 + 0.01 * seed; eval/acc = 0.6
GATES = 'promotion.gates=["eval/acc >= 0.55", "train/final_loss <= 1.3"]'


def mini(project, *overrides):
    return load_recipe(project / "recipes" / "mini.yaml", [GATES, *overrides])


def build(project, *overrides):
    recipe = mini(project, *overrides)
    tracker = Tracker(project, recipe.name)
    return {n: run_stage(recipe, n, project, tracker=tracker) for n in recipe.stage_names()}


def all_artifacts(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += all_artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_gate_refuses_then_passes_and_records_the_decision(tmp_project, fake_stages):
    build(tmp_project, "stages.align.seed=9")  # align@1: final_loss 1.345 > 1.3
    store, client = open_store(tmp_project), MlflowClient(tracking_uri(tmp_project))
    with pytest.raises(PromotionRefused) as ei:
        promote(mini(tmp_project), tmp_project, store, "align@latest", "champion")
    msg = str(ei.value)
    assert "mini version 1 (align@1) was not promoted to 'champion': 1 of 2 gate(s) failed" in msg
    assert "train/final_loss = 1.345 fails train/final_loss <= 1.3" in msg
    assert "eval/acc" not in msg.split("failed:")[1]  # only the failing gate is named
    assert "champion" not in client.get_registered_model("mini").aliases
    v1 = client.get_model_version("mini", "1")
    assert v1.tags["moonforge.decision.champion"] == "refused"
    evidence = json.loads(v1.tags["moonforge.evidence.champion"])
    assert [(g["gate"], g["passed"]) for g in evidence["gates"]] == [
        ("eval/acc >= 0.55", True),
        ("train/final_loss <= 1.3", False),
    ]
    assert evidence["gates"][1]["observed"] == pytest.approx(1.345, abs=1e-3)

    build(tmp_project)  # align@2: final_loss 1.255
    d = promote(mini(tmp_project), tmp_project, store, "align@latest", "champion")
    assert (d.version, d.artifact, d.outcome) == (2, "align@2", "promoted")
    assert int(client.get_model_version_by_alias("mini", "champion").version) == 2
    assert client.get_model_version("mini", "2").tags["moonforge.decision.champion"] == "promoted"
    # promoting the same artifact again reuses its version (one version per fingerprint)
    assert promote(mini(tmp_project), tmp_project, store, "align@2", "champion").version == 2
    assert [int(v.version) for v in mr.list_versions(client, "mini")] == [1, 2]


def test_versions_are_references_to_the_store_not_copies(tmp_project, fake_stages):
    out = build(tmp_project)
    store, client = open_store(tmp_project), MlflowClient(tracking_uri(tmp_project))
    d = set_candidate(mini(tmp_project), tmp_project, store, "align@1")
    mv = client.get_model_version("mini", str(d.version))
    run_id = out["align"].mlflow_run_id
    assert mv.run_id == run_id and mv.source == f"runs:/{run_id}/moonforge_ref"
    assert mv.tags["moonforge.stage"] == "align"
    assert mv.tags["moonforge.fingerprint"] == out["align"].fingerprint
    assert mv.tags["moonforge.artifact_path"] == str(store.resolve("align@1").path)
    assert float(mv.tags["moonforge.metric.eval/acc"]) == pytest.approx(0.6)
    files = all_artifacts(client, run_id)
    assert "moonforge_ref/reference.json" in files
    assert not [f for f in files if f.endswith((".safetensors", ".pt", ".bin"))], files
    assert int(client.get_model_version_by_alias("mini", "candidate").version) == d.version
    assert mv.tags["moonforge.decision.candidate"] == "set"  # ungated, but the evidence is kept
    assert len(json.loads(mv.tags["moonforge.evidence.candidate"])["gates"]) == 2


def test_missing_metric_fails_its_gate(tmp_project, fake_stages):
    build(tmp_project)
    store = open_store(tmp_project)
    strict = 'promotion.gates=["eval/vqa_acc >= 0.5"]'
    with pytest.raises(
        PromotionRefused,
        match=r"eval/vqa_acc was not recorded for this version "
        r"\(recorded: data/bytes, eval/acc, train/final_loss\)",
    ):
        promote(mini(tmp_project, strict), tmp_project, store, "align@1", "champion")
    res = check_gates((Gate.model_validate("eval/acc > 0.6"),), {"eval/acc": 0.6})
    assert not res[0].passed and res[0].reason == "eval/acc = 0.6 fails eval/acc > 0.6"


def test_bad_alias_name_stage_and_gate_are_refused_before_registering(tmp_project, fake_stages):
    build(tmp_project)
    store, client = open_store(tmp_project), MlflowClient(tracking_uri(tmp_project))
    for alias, msg in {
        "Champion!": "invalid alias 'Champion!'",
        "latest": "reserves 'latest'",
        "v3": "reserves 'latest' and 'v<N>'",
        "": "invalid alias ''",
    }.items():
        with pytest.raises(RegistryError, match=msg):
            promote(mini(tmp_project), tmp_project, store, "align@1", alias)
    with pytest.raises(
        RegistryError,
        match=r"lm_pretrain@1, a lm_pretrain artifact, but recipe "
        r"'mini' registers only align as model 'mini'.*add 'lm_pretrain' to promotion.stages",
    ):
        promote(mini(tmp_project), tmp_project, store, "lm_pretrain@1", "champion")
    assert client.search_registered_models() == []  # nothing registered by refused requests
    with pytest.raises(RegistryError, match="invalid model name 'bad name'"):
        mr.version_rows(client, "bad name")
    with pytest.raises(RegistryError, match="no registered model 'mini' .*registered: none yet"):
        mr.version_rows(client, "mini")

    with pytest.raises(RecipeError, match=r"promotion.model_name 'bad name' is not a valid model name"):
        mini(tmp_project, "promotion.model_name=bad name")
    with pytest.raises(RecipeError, match=r"gate 'eval/acc => 0.5': write it as '<metric> <op> <number>'"):
        mini(tmp_project, 'promotion.gates=["eval/acc => 0.5"]')
    with pytest.raises(RecipeError, match=r"promotion.stages: 'sft' is not a stage of this recipe"):
        mini(tmp_project, "promotion.stages=[sft]")
    with pytest.raises(RecipeError, match=r"promotion.gatez: unknown field; did you mean 'gates'"):
        mini(tmp_project, "promotion.gatez=[]")


def test_a_registry_failure_at_lifecycle_end_is_logged_not_raised(tmp_project, monkeypatch):
    """The stage artifacts are committed by then; a registry outage must not fail the run."""
    from moonforge.flows import lifecycle

    def down(*a, **k):
        raise ConnectionError("registry endpoint refused the connection")

    warned = []  # Prefect owns the logging config (caplog's root handler sees nothing)
    monkeypatch.setattr(lifecycle, "set_candidate", down)
    monkeypatch.setattr(lifecycle.log, "warning", lambda msg, *a: warned.append(msg % a))
    outcomes = {"align": {"stage": "align", "ref": "align@3"}}
    lifecycle._mark_candidate(mini(tmp_project), str(tmp_project), outcomes)
    assert "could not register align@3 as mini@candidate (ConnectionError" in warned[0]
    assert "moonforge promote align@3 --alias candidate" in warned[0]
    # a run that stopped before the promoted stage registers nothing
    monkeypatch.setattr(lifecycle, "set_candidate", lambda *a, **k: pytest.fail("registered"))
    lifecycle._mark_candidate(mini(tmp_project), str(tmp_project), {"lm_pretrain": {"ref": "lm_pretrain@1"}})

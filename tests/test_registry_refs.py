"""Refs in every form (stage@N, prefixes, paths, runs:/, models:/, s3://) resolve to one store
artifact or fail naming the ref and the fix; wrong-kind upstreams are refused; dry-run plans."""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow import MlflowClient

from moonforge.registry.errors import ArtifactNotFound
from moonforge.registry.promotion import set_candidate
from moonforge.registry.refs import pinned, resolve_ref
from moonforge.registry.rerun_plan import plan_rerun
from moonforge.registry.run_stage import resolve_upstream, run_stage, stage_status
from moonforge.registry.store import LocalStore, open_store
from moonforge.registry.tracking import Tracker, tracking_uri
from moonforge.stages.recipe import load_recipe


def mini(project, *overrides):
    return load_recipe(project / "recipes" / "mini.yaml", list(overrides))


def build(project, *overrides):
    """lm_pretrain -> vit_pretrain -> align through run_stage with real MLflow (SQLite)."""
    recipe = mini(project, *overrides)
    tracker = Tracker(project, recipe.name)
    return {n: run_stage(recipe, n, project, tracker=tracker) for n in recipe.stage_names()}


def test_every_ref_form_names_the_same_artifact(tmp_project, fake_stages):
    out = build(tmp_project)
    store = open_store(tmp_project)
    align = store.resolve("align@1")
    run_id = out["align"].mlflow_run_id
    forms = [
        "align@latest",
        "align@1",
        "align",
        f"align@{align.fingerprint[:6]}",
        str(align.path),
        f"runs:/{run_id}",
        f"runs:/{run_id}/lineage.json",
    ]
    for ref in forms:
        assert resolve_ref(ref, store, tmp_project).fingerprint == align.fingerprint, ref

    set_candidate(mini(tmp_project), tmp_project, store, "align@1")
    for ref in ("models:/mini@candidate", "models:/mini/1"):
        got = resolve_ref(ref, store, tmp_project)
        assert (got.ref, got.fingerprint) == ("align@1", align.fingerprint)
        assert pinned(got, store) == "align@1"


def test_mlflow_refs_that_name_nothing_say_what_exists(tmp_project, fake_stages):
    build(tmp_project)
    store = open_store(tmp_project)
    set_candidate(mini(tmp_project), tmp_project, store, "align@latest")
    cases = {
        "runs:/" + "0" * 32: "no MLflow run " + "0" * 32,
        "runs:/not-a-run": "expected runs:/<mlflow-run-id>",
        "models:/nope@champion": "no registered model 'nope'",
        "models:/mini@champion": "has no alias 'champion' (candidate -> v1)",
        "models:/mini/9": "has no version 9 (versions: 1)",
        "models:/mini/abc": "is not a number",
        "models:/mini": "expected models:/<name>@<alias>",
        "models:/mini@Bad!": "invalid alias 'Bad!'",
        "s3://bucket/store/align/1": "not supported by this store yet",
        "": "empty ref",
    }
    for ref, msg in cases.items():
        with pytest.raises((ArtifactNotFound, ValueError), match=None) as ei:
            resolve_ref(ref, store, tmp_project)
        assert msg in str(ei.value), (ref, str(ei.value))

    client = MlflowClient(tracking_uri(tmp_project))
    tracker = Tracker(tmp_project, "mini")
    parent = tracker.start_lifecycle(mini(tmp_project))
    tracker.end_lifecycle()
    with pytest.raises(ArtifactNotFound, match="is a lifecycle \\(parent\\) run"):
        resolve_ref(f"runs:/{parent}", store, tmp_project)
    # a run whose artifact is gone from the store (deleted, or built into another store)
    run_id = client.search_runs(
        [client.get_experiment_by_name("mini").experiment_id], "tags.`moonforge.stage` = 'align'"
    )[0].info.run_id
    shutil.rmtree(store.resolve("align@1").path)
    with pytest.raises(
        ArtifactNotFound, match="points at align fingerprint .* not in the store .*set MOONFORGE_STORE"
    ):
        resolve_ref(f"runs:/{run_id}", store, tmp_project)


def _fake_artifact(store: LocalStore, stage: str, version: int, fp: str) -> None:
    d = store.root / stage / str(version)
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(
        json.dumps({"stage": stage, "version": version, "fingerprint": fp, "inputs": {}, "files": {}})
    )


def test_ambiguous_and_missing_store_refs(tmp_project):
    store = open_store(tmp_project)
    _fake_artifact(store, "sft", 1, "abcd1111" + "0" * 56)
    _fake_artifact(store, "sft", 2, "abcd2222" + "0" * 56)
    with pytest.raises(ArtifactNotFound, match="ambiguous ref 'sft@abcd'.*versions 1 .*2 .*longer prefix"):
        resolve_ref("sft@abcd", store, tmp_project)
    assert resolve_ref("sft@abcd2", store, tmp_project).version == 2
    with pytest.raises(ArtifactNotFound, match="no artifact 'sft@7': sft has versions 1 .*, 2 "):
        resolve_ref("sft@7", store, tmp_project)
    with pytest.raises(ArtifactNotFound, match="stage 'rl' has no committed versions"):
        resolve_ref("rl@latest", store, tmp_project)


def test_upstream_of_another_stage_kind_is_refused(tmp_project, fake_stages):
    build(tmp_project)
    r, store = mini(tmp_project), open_store(tmp_project)
    for stage, ref in (("vit_pretrain", "align@1"), ("align", "align@1")):  # later stage, itself
        with pytest.raises(
            ArtifactNotFound,
            match=rf"--from {ref}: resolves to align@1, a align "
            rf"artifact, but stage '{stage}' starts from its upstream .* or an "
            rf"earlier stage of its chain .*recent: ",
        ):
            resolve_upstream(r, stage, tmp_project, store, ref)
    with pytest.raises(ArtifactNotFound, match="starts from scratch .* drop --from"):
        resolve_upstream(r, "lm_pretrain", tmp_project, store, "lm_pretrain@1")
    info, how = resolve_upstream(r, "align", tmp_project, store, "vit_pretrain@latest")
    assert info.ref == "vit_pretrain@1" and how == "explicit (vit_pretrain@latest)"
    # an earlier ancestor is an ablation (skip stages), and the reason says what is skipped
    info, how = resolve_upstream(r, "align", tmp_project, store, "lm_pretrain@1")
    assert info.ref == "lm_pretrain@1" and how == "explicit (lm_pretrain@1; skips vit_pretrain)"


def test_dry_run_plan_and_status_name_the_changed_input(tmp_project, fake_stages):
    build(tmp_project)
    store = open_store(tmp_project)
    plan = plan_rerun(mini(tmp_project), "vit_pretrain", tmp_project, store, "lm_pretrain@1", downstream=True)
    assert [(p.stage, p.action, p.ref) for p in plan] == [
        ("vit_pretrain", "reuse", "vit_pretrain@1"),
        ("align", "reuse", "align@1"),
    ]

    over = ("stages.vit_pretrain.optimizer.lr=0.005",)
    plan = plan_rerun(mini(tmp_project, *over), "vit_pretrain", tmp_project, store, None, True)
    assert [(p.stage, p.action, p.ref) for p in plan] == [
        ("vit_pretrain", "run", "vit_pretrain@2"),
        ("align", "run", "align@2"),
    ]
    assert plan[0].reasons == ["vs vit_pretrain@1: config.optimizer.lr: 0.001 -> 0.005"]
    assert plan[1].upstream == "vit_pretrain@2" and plan[1].upstream_how == "planned output of this rerun"
    assert plan[1].reasons == [
        f"vs align@1: upstream vit_pretrain changed (vit_pretrain@1 -> "
        f"fingerprint {plan[0].fingerprint[:8]}, not built yet)"
    ]
    assert fake_stages.calls.count("vit_pretrain") == 1  # planning trained nothing
    assert plan_rerun(mini(tmp_project), "align", tmp_project, store, "vit_pretrain@1")[0].action == "reuse"

    rows = {r["stage"]: r for r in stage_status(mini(tmp_project, *over), tmp_project)}
    assert rows["lm_pretrain"]["changed"] == [] and rows["lm_pretrain"]["state"] == "fresh"
    assert rows["vit_pretrain"]["changed"] == ["config"]
    assert rows["align"]["changed"] == ["upstream"]
    assert "upstream vit_pretrain changed (vit_pretrain@1 -> fingerprint" in rows["align"]["reasons"][0]
    (tmp_project / "params.yaml").write_text("text_repeat: 5\ntoy_items: 4\n")
    from moonforge.registry.data_versions import dvc

    dvc(tmp_project, "repro", "-q")
    rows = {r["stage"]: r for r in stage_status(mini(tmp_project), tmp_project)}
    assert rows["lm_pretrain"]["changed"] == ["data"]
    assert rows["lm_pretrain"]["reasons"][0].startswith("data text: ")


def test_every_staleness_reason_names_its_input_kind():
    from moonforge.model.config import VLMConfig
    from moonforge.registry.fingerprint import explain_diff, fingerprint_inputs, reason_kind
    from moonforge.stages.stage_configs import LMPretrainConfig

    base = dict(
        kind="lm_pretrain",
        upstream=None,
        trainable=["lm"],
        optimizer={"lr": 1e-3},
        seq_len=16,
        batch_size=4,
        num_steps=10,
    )
    a = fingerprint_inputs(
        LMPretrainConfig.model_validate(base), VLMConfig(), ("up", "a" * 64), {"text": "11111111"}, "c0"
    )
    b = fingerprint_inputs(
        LMPretrainConfig.model_validate({**base, "seed": 3}),
        VLMConfig.model_validate({"lm": {"rope_theta": 1e5}}),
        ("up", "b" * 64),
        {"text": "22222222"},
        "c1",
    )
    names = {"a" * 64: "up@1", "b" * 64: "up@2"}
    reasons = explain_diff(a, b, lambda stage, fp: names.get(fp))
    assert {reason_kind(r): r for r in reasons} == {
        "config": "config.seed: 0 -> 3",
        "model": "model.lm.rope_theta: 50000.0 -> 100000.0",
        "upstream": "upstream up changed (up@1 -> up@2)",
        "data": "data text: 11111111 -> 22222222",
        "code": "code version changed (c0 -> c1)",
    }

"""run_stage end to end with a real test stage, the real store, DVC and MLflow (SQLite)."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from moonforge.registry.errors import ArtifactNotFound, StageFailed
from moonforge.registry.lineage import render_json, render_mermaid, render_tree, walk
from moonforge.registry.run_stage import run_stage, stage_status
from moonforge.registry.store import open_store
from moonforge.registry.tracking import NullTracker, Tracker, tracking_uri
from moonforge.stages.recipe import load_recipe


class NonFiniteLossError(FloatingPointError):
    """What a training stage raises on a NaN loss."""


def mini(tmp_project, *overrides):
    return load_recipe(tmp_project / "recipes" / "mini.yaml", list(overrides))


def test_run_commit_then_cache_hit_and_runtime_fields_do_not_rebuild(tmp_project, fake_stages):
    r = mini(tmp_project)
    first = run_stage(r, "lm_pretrain", tmp_project, tracker=NullTracker())
    assert (first.ref, first.cache_hit) == ("lm_pretrain@1", False)
    assert (tmp_project / ".moonforge/store/lm_pretrain/1/model.safetensors").exists()
    again = run_stage(
        mini(tmp_project, "stages.lm_pretrain.log_every=3", "stages.lm_pretrain.num_workers=2"),
        "lm_pretrain",
        tmp_project,
        tracker=NullTracker(),
    )
    assert again.cache_hit and again.ref == "lm_pretrain@1" and again.metrics == first.metrics
    changed = run_stage(
        mini(tmp_project, "stages.lm_pretrain.seed=1"), "lm_pretrain", tmp_project, tracker=NullTracker()
    )
    assert (changed.ref, changed.cache_hit) == ("lm_pretrain@2", False)
    assert fake_stages.calls == ["lm_pretrain", "lm_pretrain"]


def test_failing_stage_leaves_nothing_visible_and_names_the_stage(tmp_project, fake_stages):
    r = mini(tmp_project)
    ok = run_stage(r, "lm_pretrain", tmp_project, tracker=NullTracker())
    weights = (tmp_project / ".moonforge/store/lm_pretrain/1/model.safetensors").read_bytes()
    r2 = mini(tmp_project, "stages.lm_pretrain.seed=5")
    fake_stages.fail["lm_pretrain"] = [NonFiniteLossError("loss is nan at step 3")]
    with pytest.raises(
        StageFailed, match=r"stage 'lm_pretrain' failed: NonFiniteLossError: loss is nan"
    ) as ei:
        run_stage(r2, "lm_pretrain", tmp_project, tracker=NullTracker())
    assert ei.value.transient is False and isinstance(ei.value.__cause__, NonFiniteLossError)
    store = open_store(tmp_project)
    assert [a.ref for a in store.versions("lm_pretrain")] == [ok.ref]
    assert not list((tmp_project / ".moonforge/store/lm_pretrain").glob(".tmp-*"))
    assert (tmp_project / ".moonforge/store/lm_pretrain/1/model.safetensors").read_bytes() == weights
    fake_stages.fail["lm_pretrain"] = [ConnectionResetError("s3 dropped")]
    with pytest.raises(StageFailed) as ei:
        run_stage(r2, "lm_pretrain", tmp_project, tracker=NullTracker())
    assert ei.value.transient is True


def test_upstream_resolution_lineage_walk_and_status(tmp_project, fake_stages):
    r = mini(tmp_project)
    with pytest.raises(ArtifactNotFound, match="needs an artifact of its upstream 'lm_pretrain'"):
        run_stage(r, "vit_pretrain", tmp_project, tracker=NullTracker())
    for name in r.stage_names():
        run_stage(r, name, tmp_project, tracker=NullTracker())
    assert [row["state"] for row in stage_status(r, tmp_project)] == ["fresh"] * 3

    chain = walk(open_store(tmp_project), "align@latest")
    assert [c["ref"] for c in chain] == ["align@1", "vit_pretrain@1", "lm_pretrain@1"]
    rec = chain[0]
    assert rec["upstream"]["fingerprint"] == chain[1]["fingerprint"]
    assert {d["name"] for d in rec["datasets"]} == {"toyworld", "text"}
    assert all(len(d["digest"]) == 36 for d in rec["datasets"])
    assert rec["config"]["num_steps"] == 12 and rec["model"]["lm"]["hidden_size"] == 128
    assert set(rec["packages"]) == {"torch", "prefect", "mlflow", "dvc", "moonforge"}
    assert rec["timestamps"]["end"] >= rec["timestamps"]["start"] and rec["world_size"] == 1
    assert rec["metrics"]["eval/acc"] == pytest.approx(0.6) and "git" in rec and "kind" in rec
    assert "lm_pretrain_1 --> vit_pretrain_1" in render_mermaid(chain)
    assert json.loads(render_json(chain))[2]["stage"] == "lm_pretrain"
    from rich.console import Console

    con = Console(record=True, width=200)
    con.print(render_tree(chain))
    text = con.export_text()
    assert "align@1" in text and "lm_pretrain@1" in text and "data text" in text

    # rerun the first stage with a change: everything downstream goes stale, and says why
    r2 = mini(tmp_project, "stages.lm_pretrain.optimizer.lr=0.002")
    run_stage(r2, "lm_pretrain", tmp_project, tracker=NullTracker())
    rows = {row["stage"]: row for row in stage_status(r2, tmp_project)}
    assert rows["lm_pretrain"]["state"] == "fresh" and rows["lm_pretrain"]["ref"] == "lm_pretrain@2"
    assert rows["vit_pretrain"]["state"] == "stale"
    assert any(x.startswith("upstream lm_pretrain changed") for x in rows["vit_pretrain"]["reasons"])
    assert rows["align"]["state"] == "stale"
    assert stage_status(r, tmp_project)[0]["reasons"] == [
        "latest is lm_pretrain@2, but lm_pretrain@1 matches the recipe"
    ]

    # an explicit upstream ref wins over the recipe chain
    out = run_stage(r, "vit_pretrain", tmp_project, "lm_pretrain@2", tracker=NullTracker())
    assert out.ref == "vit_pretrain@2"
    assert walk(open_store(tmp_project), out.ref)[1]["ref"] == "lm_pretrain@2"


def test_mlflow_child_runs_params_batched_metrics_datasets_and_failures(tmp_project, fake_stages):
    r = mini(tmp_project)
    tracker = Tracker(tmp_project, r.name, flush_every=5)
    parent = tracker.start_lifecycle(r, flow_run_id="flow-123")
    out = run_stage(r, "lm_pretrain", tmp_project, tracker=tracker, flow_run_id="flow-123")
    hit = run_stage(r, "lm_pretrain", tmp_project, tracker=tracker, flow_run_id="flow-123")
    fake_stages.fail["vit_pretrain"] = [NonFiniteLossError("nan")]
    with pytest.raises(StageFailed):
        run_stage(r, "vit_pretrain", tmp_project, tracker=tracker)
    tracker.end_lifecycle("FINISHED")

    assert tracking_uri(tmp_project) == f"sqlite:///{tmp_project / '.moonforge' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri(tmp_project))
    exp = client.get_experiment_by_name("mini")
    assert exp.artifact_location.startswith((tmp_project / ".moonforge" / "mlartifacts").as_uri())
    runs = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", order_by=["attributes.start_time ASC"]
    )
    assert [x.info.run_name for x in runs] == ["lm_pretrain", "lm_pretrain", "vit_pretrain"]
    child, cached, failed = runs
    assert child.info.run_id == out.mlflow_run_id and cached.info.run_id == hit.mlflow_run_id
    t = child.data.tags
    assert t["moonforge.stage"] == "lm_pretrain" and t["moonforge.kind"] == "lm_pretrain"
    assert t["moonforge.version"] == "1" and t["moonforge.fingerprint"] == out.fingerprint
    assert t["moonforge.cache_hit"] == "false" and t["moonforge.prefect_flow_run_id"] == "flow-123"
    assert t["moonforge.recipe_digest"] == r.digest() and "moonforge.git_commit" in t
    assert cached.data.tags["moonforge.cache_hit"] == "true"
    assert cached.data.metrics["eval/acc"] == child.data.metrics["eval/acc"]
    p = child.data.params
    assert p["optimizer.lr"] == "0.001" and p["num_steps"] == "12" and p["trainable"] == '["lm"]'
    history = client.get_metric_history(child.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(12))
    ds = child.inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in ds] == [("text", out_digest(tmp_project, "text"))]
    assert "data/text" in ds[0].dataset.source
    arts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert "lineage.json" in arts and "plots" in arts
    assert [a.path for a in client.list_artifacts(child.info.run_id, "plots")] == ["plots/loss_curve.png"]
    assert child.info.status == "FINISHED" and failed.info.status == "FAILED"
    assert "NonFiniteLossError" in failed.data.tags["moonforge.error"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.params["stages"] == "lm_pretrain,vit_pretrain,align"


def out_digest(project, name):
    from moonforge.registry.data_versions import read_lock

    return read_lock(project)[name].digest


def test_batched_sink_uses_few_log_batch_calls(tmp_project):
    from moonforge.registry.tracking import BatchedMlflowSink

    client = MlflowClient(tracking_uri(tmp_project))
    exp = client.create_experiment("sink", artifact_location=(tmp_project / "a").as_uri())
    run = client.create_run(exp)
    sink = BatchedMlflowSink(client, run.info.run_id, every=50)
    for step in range(120):
        sink.log(step, {"loss": 1.0 / (step + 1), "lr": 0.1})
    sink.flush()
    assert sink.num_batches == 3
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 120
    assert sink.series("lr")[0] == (0, 0.1)

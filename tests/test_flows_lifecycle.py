"""The Prefect flows on a real (test-harness) Prefect API, real MLflow, store and DVC."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from moonforge.flows import lifecycle
from moonforge.flows.lifecycle import lifecycle_flow, rerun_flow
from moonforge.registry.errors import StageFailed
from moonforge.registry.run_stage import stage_status
from moonforge.registry.tracking import tracking_uri
from moonforge.stages.recipe import RecipeError, load_recipe

pytestmark = pytest.mark.usefixtures("prefect_api")


class NonFiniteLossError(FloatingPointError):
    pass


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(lifecycle, "RETRY_DELAYS", [0.0, 0.0])


def recipe_path(p):
    return str(p / "recipes" / "mini.yaml")


def test_lifecycle_runs_the_chain_then_hits_the_cache(tmp_project, fake_stages):
    seen = []
    token = lifecycle.PROGRESS.set(lambda stage, done, total, desc: seen.append((stage, desc)))
    try:
        out = lifecycle_flow(recipe_path(tmp_project), [], None, str(tmp_project))
    finally:
        lifecycle.PROGRESS.reset(token)
    assert [o["ref"] for o in out.values()] == ["lm_pretrain@1", "vit_pretrain@1", "align@1"]
    assert not any(o["cache_hit"] for o in out.values())
    assert ("align", "done") in seen and ("lm_pretrain", "train") in seen

    again = lifecycle_flow(recipe_path(tmp_project), [], "vit_pretrain", str(tmp_project))
    assert list(again) == ["lm_pretrain", "vit_pretrain"]
    assert all(o["cache_hit"] for o in again.values()) and fake_stages.calls.count("lm_pretrain") == 1

    client = MlflowClient(tracking_uri(tmp_project))
    exp = client.get_experiment_by_name("mini")
    parents = client.search_runs([exp.experiment_id], "tags.`moonforge.kind` = 'lifecycle'")
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    flow_ids = {p.data.tags["moonforge.prefect_flow_run_id"] for p in parents}
    assert len(flow_ids) == 2 and "" not in flow_ids
    for p in parents:
        kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{p.info.run_id}'")
        assert {k.data.tags["moonforge.prefect_flow_run_id"] for k in kids} == {
            p.data.tags["moonforge.prefect_flow_run_id"]
        }
        assert len(kids) in (2, 3)


def test_transient_errors_are_retried_nan_and_config_errors_are_not(tmp_project, fake_stages):
    fake_stages.fail["lm_pretrain"] = [ConnectionResetError("store endpoint dropped")]
    out = lifecycle_flow(recipe_path(tmp_project), [], "lm_pretrain", str(tmp_project))
    assert out["lm_pretrain"]["ref"] == "lm_pretrain@1"
    assert fake_stages.calls == ["lm_pretrain", "lm_pretrain"]

    fake_stages.fail["vit_pretrain"] = [NonFiniteLossError("loss is nan"), NonFiniteLossError("x")]
    with pytest.raises(StageFailed, match="stage 'vit_pretrain' failed: NonFiniteLossError"):
        lifecycle_flow(recipe_path(tmp_project), [], None, str(tmp_project))
    assert fake_stages.calls.count("vit_pretrain") == 1  # no retry
    client = MlflowClient(tracking_uri(tmp_project))
    exp = client.get_experiment_by_name("mini")
    last_parent = client.search_runs(
        [exp.experiment_id], "tags.`moonforge.kind` = 'lifecycle'", order_by=["attributes.start_time DESC"]
    )[0]
    assert last_parent.info.status == "FAILED"

    with pytest.raises(RecipeError, match="--until 'nope'"):
        lifecycle_flow(recipe_path(tmp_project), [], "nope", str(tmp_project))


def test_rerun_downstream_from_an_older_upstream_and_status(tmp_project, fake_stages):
    lifecycle_flow(recipe_path(tmp_project), [], None, str(tmp_project))
    over = ["stages.vit_pretrain.optimizer.lr=0.005"]
    out = rerun_flow(recipe_path(tmp_project), "vit_pretrain", None, over, True, str(tmp_project))
    assert [o["ref"] for o in out.values()] == ["vit_pretrain@2", "align@2"]
    rows = {r["stage"]: r for r in stage_status(load_recipe(recipe_path(tmp_project)), tmp_project)}
    assert rows["vit_pretrain"]["state"] == "fresh" and rows["vit_pretrain"]["ref"] == "vit_pretrain@1"
    rows = {r["stage"]: r for r in stage_status(load_recipe(recipe_path(tmp_project), over), tmp_project)}
    assert rows["align"]["state"] == "fresh" and rows["align"]["ref"] == "align@2"

    # align from the first vit_pretrain version, explicitly: same inputs as align@1 -> cache hit
    hit = rerun_flow(recipe_path(tmp_project), "align", "vit_pretrain@1", [], False, str(tmp_project))
    assert hit["align"]["ref"] == "align@1" and hit["align"]["cache_hit"]

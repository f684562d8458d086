"""Integration: the model registry and gated promotion against a real `mlflow server` on loopback
(SQLite backend, proxied artifact root), started and stopped by the test on a free port.

This is what a team's shared MLflow looks like to moonforge: every call goes over REST, and the
server enforces its own rules (e.g. a model-version source must be a runs:/ URI of the run, not a
local path outside the run's artifacts), which the SQLite-file tests cannot see.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port, stop_process
from mlflow import MlflowClient
from typer.testing import CliRunner

from moonforge.flows import cli
from moonforge.registry.errors import PromotionRefused
from moonforge.registry.promotion import promote
from moonforge.registry.refs import resolve_ref
from moonforge.registry.run_stage import run_stage
from moonforge.registry.store import open_store
from moonforge.registry.tracking import Tracker
from moonforge.stages.recipe import load_recipe

MLFLOW = str(Path(sys.executable).parent / "mlflow")
# Only the first stage is built (two versions), to keep the REST round trips few.
GATES = ['promotion.gates=["eval/acc >= 0.45", "train/final_loss <= 1.3"]', "promotion.stages=[lm_pretrain]"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, _mlflow_template):
    root = tmp_path_factory.mktemp("mlflow-server")
    db = root / "mlflow.db"
    shutil.copy(_mlflow_template, db)  # pre-migrated: the server skips the ~3 s schema setup
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            MLFLOW,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with {proc.returncode}: "
                    f"{(root / 'server.log').read_text()[-2000:]}"
                )
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(
                        f"mlflow server not up after 120 s: {(root / 'server.log').read_text()[-2000:]}"
                    )
                time.sleep(0.3)
        yield url
    finally:
        stop_process(proc)
        log.close()


def test_gate_refuses_then_passes_on_a_real_mlflow_server(
    tmp_project, fake_stages, mlflow_server, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    recipe_path = tmp_project / "recipes" / "mini.yaml"

    def build(*overrides):
        r = load_recipe(recipe_path, [*GATES, *overrides])
        tracker = Tracker(tmp_project, r.name)
        assert tracker.uri == mlflow_server
        return run_stage(r, "lm_pretrain", tmp_project, tracker=tracker)

    store, client = open_store(tmp_project), MlflowClient(mlflow_server)
    first = build("stages.lm_pretrain.seed=9")  # final_loss 1.345: fails the loss gate
    with pytest.raises(PromotionRefused, match=r"train/final_loss = 1.345 fails train/final_loss <= 1.3"):
        promote(load_recipe(recipe_path, GATES), tmp_project, store, "lm_pretrain@1", "champion")
    v1 = client.get_model_version("mini", "1")
    assert v1.tags["moonforge.decision.champion"] == "refused"
    assert v1.source == f"runs:/{first.mlflow_run_id}/moonforge_ref"
    assert "champion" not in client.get_registered_model("mini").aliases

    build()  # final_loss 1.255: passes
    res = CliRunner().invoke(
        cli.app,
        [
            "promote",
            "lm_pretrain@latest",
            "--alias",
            "champion",
            "--recipe",
            "recipes/mini.yaml",
            "--set",
            GATES[0],
            "--set",
            GATES[1],
        ],
    )
    assert res.exit_code == 0, res.output
    assert "promoted: mini@champion -> version 2 (lm_pretrain@2)" in res.output
    assert int(client.get_model_version_by_alias("mini", "champion").version) == 2
    assert client.get_model_version("mini", "2").tags["moonforge.decision.champion"] == "promoted"

    # the alias, the version number and the stage run all lead back to the same store artifact
    assert resolve_ref("models:/mini@champion", store, tmp_project).ref == "lm_pretrain@2"
    assert resolve_ref("models:/mini/1", store, tmp_project).ref == "lm_pretrain@1"
    assert resolve_ref(f"runs:/{first.mlflow_run_id}", store, tmp_project).ref == "lm_pretrain@1"
    # the reference (not the weights) is what MLflow stores
    ref_file = client.download_artifacts(
        first.mlflow_run_id, "moonforge_ref/reference.json", str(tmp_project)
    )
    assert yaml.safe_load(Path(ref_file).read_text())["ref"] == "lm_pretrain@1"
    files = [f.path for f in client.list_artifacts(first.mlflow_run_id)]
    assert not [f for f in files if f.endswith(".safetensors")], files
    res = CliRunner().invoke(cli.app, ["models", "--name", "mini"])
    assert res.exit_code == 0 and "champion" in res.output

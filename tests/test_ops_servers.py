"""Integration: `moonforge server up`, `deploy` and `serve` against the real Prefect and MLflow
servers on loopback, with a real process worker running deployment runs.

One project and one pair of servers for the module (starting them costs ~25 s on 2 cores):
- `server up` starts both on free ports and records them; a second `up` and a taken port fail
  with the fix named; `server down` (teardown) stops them.
- `deploy` registers the lifecycle (with a cron schedule) and each stage rerun on the process
  pool; a `prefect worker` runs `rerun/mini-align` created through the Prefect API, and the test
  checks the new artifact, its lineage, its MLflow run on the server and the Prefect artifacts.
- bad parameters in a deployment run fail that Prefect run with the pydantic message.
- the browser test (tests/browser.py) reads the Prefect and MLflow UIs with headless chromium.
- `serve` takes the deployments over and runs one from this project without a pool.

The worker's flow-run processes train nothing: tests/fake_stage_site puts conftest's FakeStage
behind every stage kind (see its docstring).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port, mini_recipe, stop_process

BIN = Path(sys.executable).parent
MOONFORGE = str(BIN / "moonforge")
FAKE_SITE = str(REPO / "tests" / "fake_stage_site")
pytestmark = pytest.mark.timeout(600)


def _env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for child processes: nothing pointing at another server or DB."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MOONFORGE_"))}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


def _cli(project: Path, *args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MOONFORGE, *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_env(project / ".client-home"), "COLUMNS": "200", **env},
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory, _dvc_template, _mlflow_template) -> Path:
    """A mini moonforge project (test DVC pipeline, recipes/mini.yaml, migrated MLflow DB)."""
    proj = tmp_path_factory.mktemp("ops") / "proj"
    shutil.copytree(_dvc_template, proj, symlinks=True)
    shutil.copytree(REPO / "recipes", proj / "recipes")
    (proj / "recipes" / "mini.yaml").write_text(yaml.safe_dump(mini_recipe(), sort_keys=False))
    (proj / ".moonforge").mkdir()
    shutil.copy(_mlflow_template, proj / ".moonforge" / "mlflow.db")
    return proj


@pytest.fixture(scope="module")
def servers(project):
    """`moonforge server up` on free ports; teardown runs `moonforge server down` and checks it."""
    ports = {"prefect": free_port(), "mlflow": free_port()}
    res = _cli(
        project,
        "server",
        "up",
        "--prefect-port",
        str(ports["prefect"]),
        "--mlflow-port",
        str(ports["mlflow"]),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    state = json.loads((project / ".moonforge" / "servers.json").read_text())["services"]
    urls = {s["name"]: s["api_url"] for s in state}
    try:
        yield {
            "prefect": urls["prefect"],
            "mlflow": urls["mlflow"],
            "prefect_ui": f"http://127.0.0.1:{ports['prefect']}",
            "ports": ports,
            "pids": [s["pid"] for s in state],
        }
    finally:
        res = _cli(project, "server", "down", timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "stopped prefect" in res.stdout and "stopped mlflow" in res.stdout
        assert not (project / ".moonforge" / "servers.json").exists()
        for pid in [s["pid"] for s in state]:
            assert (
                not Path(f"/proc/{pid}/cmdline").exists()
                or b"server" not in Path(f"/proc/{pid}/cmdline").read_bytes()
            )


@pytest.fixture(scope="module")
def prefect_client(servers):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: servers["prefect"]}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture(scope="module")
def deployed(project, servers, worker):
    """`moonforge deploy --recipe recipes/mini.yaml --cron ...`, pointed at the servers by the
    state file alone (no env var names them)."""
    res = _cli(project, "deploy", "--recipe", "recipes/mini.yaml", "--cron", "0 3 * * *")
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def upstream(project, servers):
    """lm_pretrain@1 and vit_pretrain@1 built here (fake stages), tracked on the MLflow server."""
    from conftest import FakeStage

    from moonforge.registry.run_stage import run_stage
    from moonforge.registry.tracking import Tracker
    from moonforge.stages import catalog
    from moonforge.stages.recipe import load_recipe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(catalog, "stage_function", lambda kind: FakeStage())
        recipe = load_recipe(project / "recipes" / "mini.yaml")
        tracker = Tracker(project, recipe.name, uri=servers["mlflow"])
        return {n: run_stage(recipe, n, project, tracker=tracker) for n in ("lm_pretrain", "vit_pretrain")}


@pytest.fixture(scope="module")
def worker(project, servers):
    """A real `prefect worker` on the process pool (started before `deploy`, it boots meanwhile
    and may create the pool first); its flow runs see the fake stages."""
    log = project / "worker.log"
    env = _env(
        project / ".worker-home",
        PREFECT_API_URL=servers["prefect"],
        PYTHONPATH=FAKE_SITE,
        MOONFORGE_FAKE_STAGES="1",
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "moonforge-process", "--type", "process"],
            cwd=project,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log
    finally:
        stop_process(proc, group=True)


def _params(project: Path, **kw) -> dict:
    return {
        "params": {
            "recipe": "recipes/mini.yaml",
            "stage": "align",
            "from_ref": None,
            "downstream": False,
            "overrides": [],
            "project": str(project),
            **kw,
        }
    }


def _run(name: str, parameters: dict, log: Path | None, timeout: float = 150):
    from prefect.deployments import run_deployment

    fr = run_deployment(name, parameters=parameters, timeout=timeout, poll_interval=1, as_subflow=False)
    if not fr.state.is_final():
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        pytest.fail(f"{name}: flow run {fr.id} still {fr.state.name} after {timeout}s\n{tail}")
    return fr


@pytest.fixture(scope="module")
def align_run(project, servers, prefect_client, worker, deployed, upstream):
    """`rerun/mini-align` from vit_pretrain@1, created through the Prefect API, run by the worker."""
    return _run("rerun/mini-align", _params(project, from_ref="vit_pretrain@1"), worker)


def test_server_up_refuses_when_running_or_port_taken(project, servers, tmp_path):
    res = _cli(project, "server", "up", "--prefect-port", str(free_port()), "--mlflow-port", str(free_port()))
    assert res.returncode == 1
    assert "already running for this project: prefect at " + servers["prefect_ui"] in res.stderr
    assert "moonforge server down" in res.stderr

    other = tmp_path / "other"
    other.mkdir()
    res = _cli(
        other,
        "server",
        "up",
        "--prefect-port",
        str(servers["ports"]["prefect"]),
        "--mlflow-port",
        str(free_port()),
    )
    assert res.returncode == 1
    assert f"prefect: port {servers['ports']['prefect']} on 127.0.0.1 is taken" in res.stderr
    assert "--prefect-port <port>" in res.stderr
    assert not (other / ".moonforge" / "servers.json").exists()

    res = _cli(project, "server", "status")
    assert res.returncode == 0
    assert res.stdout.count(" up ") == 2 and servers["prefect_ui"] in res.stdout


def test_deploy_registers_typed_deployments_on_the_process_pool(deployed, prefect_client, project):
    from moonforge.stages.recipe import load_recipe

    names = ["lifecycle/mini"] + [
        f"rerun/mini-{s}" for s in load_recipe(project / "recipes" / "mini.yaml").stage_names()
    ]
    for name in names:
        assert name in deployed
        d = prefect_client.read_deployment_by_name(name)
        assert d.work_pool_name == "moonforge-process"
        assert d.entrypoint.startswith("moonforge.flows.deployments.")
        assert d.job_variables["working_dir"] == str(project)
        # runs start in the project itself, not in a per-run copy of it (deployments.py)
        assert d.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}
        ]
        # runs track where the deploying CLI tracked: the `server up` MLflow
        assert d.job_variables["env"]["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
        props = d.parameter_openapi_schema["definitions"]
        assert set(props) == {"LifecycleParams" if name.startswith("lifecycle") else "RerunParams"}
    sched = prefect_client.read_deployment_by_name("lifecycle/mini").schedules
    assert [(s.schedule.cron, s.active) for s in sched] == [("0 3 * * *", True)]
    rerun = prefect_client.read_deployment_by_name("rerun/mini-align")
    assert rerun.parameters["params"]["stage"] == "align"
    fields = rerun.parameter_openapi_schema["definitions"]["RerunParams"]["properties"]
    assert list(fields) == ["recipe", "stage", "from_ref", "downstream", "overrides", "project"]
    assert "stage@latest" in fields["from_ref"]["description"]  # the UI form explains each field


def test_stage_rerun_deployment_run_through_the_prefect_api(
    align_run, prefect_client, project, servers, upstream, worker
):
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from moonforge.registry.refs import resolve_ref
    from moonforge.registry.store import open_store

    assert align_run.state.is_completed(), align_run.state.message
    log = worker.read_text(errors="replace")
    assert "Running 1 deployment pull step(s)" in log and "Downloading flow code" not in log, log[-3000:]
    info = resolve_ref("align@latest", open_store(project), project)
    lineage = info.lineage()
    assert info.ref == "align@1"
    assert lineage["prefect_flow_run_id"] == str(align_run.id)
    assert lineage["upstream"]["ref"] == "vit_pretrain@1"
    assert lineage["upstream"]["fingerprint"] == upstream["vit_pretrain"].fingerprint

    run = MlflowClient(servers["mlflow"]).get_run(lineage["mlflow_run_id"])  # on the server
    assert run.info.status == "FINISHED"
    assert run.data.tags["moonforge.stage"] == "align"
    assert run.data.tags["moonforge.prefect_flow_run_id"] == str(align_run.id)
    assert run.data.tags["moonforge.upstream"] == "vit_pretrain@1"
    assert run.data.metrics["eval/acc"] == pytest.approx(0.6)

    arts = {
        a.key: a
        for a in prefect_client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[align_run.id]))
        )
    }
    assert {"mini-align-metrics", "mini-align-lineage"} <= set(arts)
    assert arts["mini-align-metrics"].type == "table"
    rows = json.loads(arts["mini-align-metrics"].data)
    assert {"metric": "eval/acc", "value": 0.6} in rows
    md = arts["mini-align-lineage"].data
    assert "align -> `align@1`" in md and "vit_pretrain@1" in md and "lm_pretrain@1" in md
    assert lineage["mlflow_run_id"] in md and "```mermaid" in md


def test_bad_parameters_fail_the_prefect_run_with_the_pydantic_message(project, align_run, worker):
    fr = _run("rerun/mini-align", _params(project, stage="nope"), worker)
    assert fr.state.is_failed()
    assert "Validation of flow parameters failed" in fr.state.message
    assert (
        "stage 'nope' is not in recipe 'mini'; stages are: lm_pretrain, vit_pretrain, align"
        in fr.state.message
    )


def test_browser_shows_deployments_run_and_champion(project, servers, align_run, upstream):
    from browser import chromium_or_skip, page

    exe = chromium_or_skip()
    from moonforge.registry.promotion import promote
    from moonforge.registry.store import open_store
    from moonforge.stages.recipe import load_recipe

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", servers["mlflow"])
        d = promote(
            load_recipe(project / "recipes" / "mini.yaml"),
            project,
            open_store(project),
            "align@1",
            "champion",
        )
    assert d.outcome == "promoted"

    ui = servers["prefect_ui"]
    dom = page(exe, f"{ui}/deployments", "prefect-deployments", until=lambda dom: "mini-align" in dom)
    for name in ("mini-lm_pretrain", "mini-vit_pretrain", "mini-align"):
        assert name in dom
    dom = page(
        exe, f"{ui}/runs/flow-run/{align_run.id}", "prefect-align-run", until=lambda dom: "Completed" in dom
    )
    assert align_run.name in dom and "Completed" in dom
    dom = page(
        exe, f"{servers['mlflow']}/#/models/mini", "mlflow-model-mini", until=lambda dom: "champion" in dom
    )
    assert "champion" in dom and "candidate" in dom


def test_serve_runs_a_deployment_from_this_process(project, servers, prefect_client, align_run):
    """`moonforge serve` registers pool-less deployments and runs them itself (recipe mini2, a
    renamed copy of mini, so the worker's pool deployments stay as they are)."""
    from prefect.exceptions import ObjectNotFound

    (project / "recipes" / "mini2.yaml").write_text(
        yaml.safe_dump({**mini_recipe(), "name": "mini2"}, sort_keys=False)
    )
    log = project / "serve.log"
    env = _env(
        project / ".serve-home",
        PYTHONPATH=FAKE_SITE,
        MOONFORGE_FAKE_STAGES="1",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        COLUMNS="200",
    )
    with log.open("wb") as fh:  # finds the servers through .moonforge/servers.json
        proc = subprocess.Popen(
            [MOONFORGE, "serve", "--recipe", "recipes/mini2.yaml"],
            cwd=project,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "serve registered no deployments in 90 s: " + log.read_text()
            try:
                d = prefect_client.read_deployment_by_name("rerun/mini2-align")
                break
            except ObjectNotFound:
                time.sleep(1)
        assert d.work_pool_name is None and d.entrypoint == "moonforge.flows.deployments.rerun_deployment"
        fr = _run(
            "rerun/mini2-align",
            {"params": {**_params(project)["params"], "recipe": "recipes/mini2.yaml"}},
            log,
        )
        assert fr.state.is_completed(), f"{fr.state.message}\n{log.read_text()[-3000:]}"
    finally:
        stop_process(proc, group=True)
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    arts = {
        a.key: a.data
        for a in prefect_client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id]))
        )
    }
    # same inputs as align@1 (the recipe name is not one of them): served, and a cache hit
    assert "`align@1` (cache hit" in arts["mini2-align-lineage"]

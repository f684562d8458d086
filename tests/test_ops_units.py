"""Deployments, server state and Prefect-artifact rendering without any server (fast); the real
servers, worker and UIs are exercised in tests/test_ops_servers.py."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from conftest import free_port
from typer.testing import CliRunner

from moonforge.flows import servers
from moonforge.flows.deployments import LifecycleParams, RerunParams, build_deployments, rerun_deployment
from moonforge.flows.prefect_artifacts import artifact_key, lineage_markdown, metrics_rows
from moonforge.stages.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"stage": "nope"}, "stage 'nope' is not in recipe 'tiny'; stages are: lm_pretrain"),
        ({"stage": "sft", "overrides": ["lr"]}, "each must be key=value"),
        ({"stage": "sft", "overrides": ["stages.sft.nope=1"]}, "stages[6](sft).nope: unknown field"),
        ({"stage": "sft", "recipe": "recipes/missing.yaml"}, "recipe 'recipes/missing.yaml': no such file"),
        ({"stage": "sft", "colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_rerun_params_name_the_bad_field(kw, message):
    with pytest.raises(ValueError) as e:
        RerunParams(project=str(REPO), **kw)
    assert message in str(e.value)


def test_lifecycle_params_check_until_against_the_recipe():
    assert LifecycleParams(project=str(REPO), until="sft").until == "sft"
    with pytest.raises(ValueError, match=r"until 'x': no such stage in recipe 'tiny'"):
        LifecycleParams(project=str(REPO), until="x")


def test_params_without_a_project_use_moonforge_home_not_the_flow_cwd(monkeypatch, tmp_path):
    """`prefect deployment run --params` replaces the deployment's defaults; a Slurm job then
    runs the flow in Prefect's temp copy of the code, where "." would hide the artifacts."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOONFORGE_HOME", str(REPO))
    assert RerunParams(stage="sft").project == str(REPO)
    assert LifecycleParams().recipe_path() == str(REPO / "recipes" / "tiny.yaml")
    monkeypatch.delenv("MOONFORGE_HOME")
    with pytest.raises(ValueError, match="no such file under project '.'"):
        RerunParams(stage="sft")


def test_prefect_reports_the_pydantic_message_for_a_run():
    """What the flow-run process does before the flow body: the message reaches the run state."""
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match=r"params: Value error, stage 'nope' is not in"):
        rerun_deployment.validate_parameters({"params": {"stage": "nope", "project": str(REPO)}})
    ok = rerun_deployment.validate_parameters({"params": {"stage": "sft", "project": str(REPO)}})
    assert isinstance(ok["params"], RerunParams) and ok["params"].recipe_path().endswith("tiny.yaml")


def test_build_deployments_pool_schedule_and_serve_variants(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
    deps = build_deployments(
        recipe,
        "recipes/tiny.yaml",
        REPO,
        cron="0 3 * * *",
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"},
    )
    names = [f"{d.flow_name}/{d.name}" for d in deps]
    assert names == ["lifecycle/tiny"] + [f"rerun/tiny-{s}" for s in recipe.stage_names()]
    assert {d.work_pool_name for d in deps} == {"moonforge-process"}
    assert [s.schedule.cron for s in deps[0].schedules] == ["0 3 * * *"]
    assert all(not d.schedules for d in deps[1:])  # reruns are launched, not scheduled
    sft = deps[names.index("rerun/tiny-sft")]
    assert sft.parameters["params"] == {
        "recipe": "recipes/tiny.yaml",
        "overrides": [],
        "project": str(REPO),
        "stage": "sft",
        "from_ref": None,
        "downstream": False,
    }
    assert sft.job_variables == {
        "working_dir": str(REPO),
        "env": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"},
    }
    assert "default: long_context@latest" in sft.description
    served = build_deployments(recipe, "recipes/tiny.yaml", REPO, pool=None)
    assert all(d.work_pool_name is None and not d.job_variables for d in served)


def test_deploy_and_serve_need_a_prefect_server(tmp_project, monkeypatch):
    from moonforge.flows import cli

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for cmd in ("deploy", "serve"):
        res = CliRunner().invoke(cli.app, [cmd, "--recipe", "recipes/mini.yaml"])
        assert res.exit_code == 1
        assert "no Prefect server" in res.output and "moonforge server up" in res.output


def _state(project: Path, pid: int, marker: str) -> None:
    (project / ".moonforge").mkdir(exist_ok=True)
    svc = lambda name, port: {
        "name": name,
        "pid": pid,
        "port": port,  # noqa: E731
        "url": f"http://127.0.0.1:{port}",
        "log": "x",
        "marker": marker,
        "api_url": f"http://127.0.0.1:{port}" + ("/api" if name == "prefect" else ""),
    }
    servers.state_path(project).write_text(json.dumps({"services": [svc("prefect", 1), svc("mlflow", 2)]}))


def test_apply_state_points_at_live_servers_only(tmp_path, monkeypatch):
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    _state(tmp_path, os.getpid(), "python")  # this process stands in for a live server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://explicit:1")
    assert servers.apply_state(tmp_path) == {"PREFECT_API_URL": "http://127.0.0.1:1/api"}
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://explicit:1"  # an explicit setting wins

    monkeypatch.delenv("PREFECT_API_URL")
    _state(tmp_path, os.getpid(), "no-such-command-word")  # pid alive but not our server
    assert servers.apply_state(tmp_path) == {} and "PREFECT_API_URL" not in os.environ
    servers.state_path(tmp_path).write_text("{not json")
    assert servers.apply_state(tmp_path) == {}
    with pytest.raises(servers.ServerError, match="unreadable .* delete it"):
        servers.read_state(tmp_path)


def test_server_up_refuses_a_taken_port_before_starting_anything(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not servers.port_free(port)
        with pytest.raises(
            servers.ServerError,
            match=rf"mlflow: port {port} on 127.0.0.1 is taken.*"
            r"--mlflow-port <port>",
        ):
            servers.up(tmp_path, {"prefect": free_port(), "mlflow": port})
    assert not servers.state_path(tmp_path).exists()
    assert not (tmp_path / servers.LOG_DIR).exists()  # nothing was started


def test_server_down_and_status_without_servers(tmp_project):
    from moonforge.flows import cli

    for args, text in (
        (["server", "status"], "no moonforge servers for this project"),
        (["server", "down"], "no moonforge servers were running"),
    ):
        res = CliRunner().invoke(cli.app, args)
        assert res.exit_code == 0 and text in res.output


def test_stage_artifacts_render_metrics_and_lineage():
    assert artifact_key("Kimi_VL", "long_cot_sft", "lineage") == "kimi-vl-long-cot-sft-lineage"
    outcome = {
        "stage": "sft",
        "ref": "sft@3",
        "fingerprint": "f" * 64,
        "cache_hit": False,
        "path": "/store/sft/3",
        "mlflow_run_id": "abc123",
        "wall_s": 1.0,
        "metrics": {"eval/acc": 0.75, "train/loss": 1.5},
    }
    assert metrics_rows(outcome) == [
        {"metric": "eval/acc", "value": 0.75},
        {"metric": "train/loss", "value": 1.5},
    ]
    chain = [
        {
            "stage": "sft",
            "version": 3,
            "ref": "sft@3",
            "fingerprint": "f" * 64,
            "datasets": [{"name": "chat", "digest": "0123456789abcdef"}],
            "git": {"commit": "deadbeefcafe", "dirty": True},
            "mlflow_run_id": "abc123",
            "prefect_flow_run_id": "run-1",
        },
        {"stage": "cooldown", "ref": "cooldown@2", "fingerprint": "e" * 64, "missing": True},
    ]
    md = lineage_markdown(outcome, chain)
    assert (
        "| sft@3 | `ffffffffffff` | chat (md5 `0123456789`) | `deadbeef`+dirty | `abc123` | `run-1` |" in md
    )
    assert "| cooldown@2 | `eeeeeeeeeeee` | missing from the store |" in md
    assert "moonforge lineage sft@3" in md and "```mermaid\ngraph LR" in md

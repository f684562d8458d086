"""A real Slurm cluster on this machine: flow runs submitted by the moonforge-slurm work pool.

Module fixtures bring up a one-node Slurm (munge, slurmctld, slurmd on 127.0.0.1; config, state
and socket in a temp dir: infra/slurm/local_cluster.py) and, on the session's Prefect test API,
the `moonforge-slurm` pool from infra/work-pools/slurm.json, a `prefect worker` on it and the
mini recipe's deployments (`moonforge deploy --pool moonforge-slurm`), in a test project whose
sbatch script is rendered by infra/slurm/render.py. Each flow run then goes
worker -> infra/slurm/submit.py -> `sbatch --wait` -> the flow inside the allocation ->
`srun` + torchrun with 2 processes for the stage. The stage function is tests/dist_stage.py's toy
stage (the real training loop, launcher, checkpoints and resume; a startup hook routes
lm_pretrain to it in every process of the job), so the test spends its time on Slurm, not on
data: the real tiny lm_pretrain ran the same way by hand (docs/cluster.md).

- A rerun of lm_pretrain is cancelled with `scancel` after its first checkpoint: the flow run is
  Failed with the Slurm job id, state and reason; the rerun resumes from that checkpoint and its
  artifact, lineage (with the Slurm job id) and MLflow run appear as from any other run.
- A run whose job hits its time limit (SBATCH_TIMELIMIT=1 minute) is Failed naming the time
  limit, with its checkpoint kept for the rerun.
- Bad input: the controller down, a partition the cluster lacks, an account the partition does
  not allow (the job would wait forever): each fails its run with the fix named.
Wall time: about 2 min on 2 cores (the time-limit job alone takes 60-75 s, asleep; the other
runs go meanwhile).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, mini_recipe, stop_process

BIN = Path(sys.executable).parent
POOL = "moonforge-slurm"
RERUN = "rerun/mini-lm_pretrain"
STAGE_SETS = [
    "data=[]",
    "num_steps=8",
    "micro_batch_size=1",
    "checkpoint_every=2",
    "launcher.kind=torchrun",
    "launcher.nproc_per_node=2",
]
"""The toy stage reads no dataset (data=[]: no DVC check, which concurrent jobs would contend for)."""
TOY_SITE = f"""# Test-only startup hook (tests/test_cluster_slurm.py): every stage kind runs the toy stage.
import os, sys
if os.environ.get("MOONFORGE_TOY_STAGES") == "1":
    sys.path.insert(0, {str(REPO / "tests")!r})
    import dist_stage
    from moonforge.stages import catalog
    catalog.stage_function = lambda kind: dist_stage.toy_stage
"""
pytestmark = pytest.mark.timeout(900)


def _local_cluster():
    import importlib.util

    if "_local_slurm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_local_slurm", REPO / "infra/slurm/local_cluster.py")
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses need it
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["_local_slurm"]


def slurm_or_skip():
    local = _local_cluster()
    missing = local.missing_tools()
    if missing or os.geteuid() != 0:
        why = f"missing {', '.join(missing)}" if missing else "not root (slurmd runs as root)"
        pytest.skip(
            f"no local Slurm: {why} (issue 13, Slurm test; skip expires 2026-12-31): "
            "install Debian's slurm-wlm and munge with `make slurm` as root (`make test` "
            "does this when it runs as root with apt)"
        )
    return local


@pytest.fixture(scope="module")
def slurm():
    """A one-node cluster (4 CPUs offered on a 2-core box, so two 2-CPU jobs run side by side)."""
    local = slurm_or_skip()
    d = Path(tempfile.mkdtemp(prefix="mf-slurm-"))  # /tmp: munged wants a searchable socket dir
    cluster = local.LocalSlurm(d)
    try:
        cluster.up(cpus=4)
        yield cluster
    finally:
        env = {**os.environ, **cluster.env()}
        left = (
            subprocess.run(
                ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env
            ).stdout.split()
            if "slurmctld" in cluster.procs
            else []
        )
        if left:  # a failed test's jobs: their processes must not outlive the cluster
            subprocess.run(["scancel", *left], env=env)
            deadline = time.time() + 60
            while (
                time.time() < deadline
                and subprocess.run(
                    ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env
                ).stdout.strip()
            ):
                time.sleep(1)
        for name in reversed(local.DAEMONS):
            if name in cluster.procs:
                stop_process(cluster.procs[name], group=True)
        shutil.rmtree(d, ignore_errors=True)


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MLFLOW_", "MOONFORGE_", "SLURM_", "SBATCH_"))
    }
    return {
        **env,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PATH": f"{BIN}:{env['PATH']}",
        **extra,
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory, _dvc_template, _mlflow_template) -> Path:
    """A mini project (conftest's DVC pipeline) with infra/slurm and its rendered sbatch script."""
    proj = tmp_path_factory.mktemp("slurm") / "proj"
    shutil.copytree(_dvc_template, proj, symlinks=True)
    shutil.copytree(REPO / "recipes", proj / "recipes")
    (proj / "recipes" / "mini.yaml").write_text(yaml.safe_dump(mini_recipe(), sort_keys=False))
    shutil.copytree(
        REPO / "infra" / "slurm",
        proj / "infra" / "slurm",
        ignore=shutil.ignore_patterns("flow-run.sbatch", "__pycache__"),
    )
    (proj / ".moonforge" / "slurm-logs").mkdir(parents=True)
    for db in ("mlflow.db", "mlflow-timelimit.db"):  # migrated once per session (conftest)
        shutil.copy(_mlflow_template, proj / ".moonforge" / db)
    (proj / ".toy-site").mkdir()
    (proj / ".toy-site" / "sitecustomize.py").write_text(TOY_SITE)
    site = {
        "job_name": "moonforge",
        "partition": "debug",
        "nodes": 1,
        "gpus_per_node": 0,
        "cpus_per_node": 2,
        "exclusive": False,
        "time_limit": "0:30:00",
        "log_dir": str(proj / ".moonforge" / "slurm-logs"),
        "moonforge_home": str(proj),
        "venv": str(BIN.parent),
        "env": {},
    }
    (proj / "cluster.yaml").write_text(yaml.safe_dump(site))
    subprocess.run(
        [sys.executable, "infra/slurm/render.py", "--config", "cluster.yaml"],
        cwd=proj,
        check=True,
        capture_output=True,
    )
    return proj


@pytest.fixture(scope="module")
def api(prefect_api) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def client(api):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        yield c


@pytest.fixture(scope="module")
def worker(project, slurm, api, client):
    """The pool from infra/work-pools/slurm.json and a process worker on it (a login node)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    template = json.loads((REPO / "infra/work-pools/slurm.json").read_text())
    try:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process", base_job_template=template))
    except ObjectAlreadyExists:
        pass
    log = project / "worker.log"
    env = _env(
        project / ".worker-home",
        PREFECT_API_URL=api,
        MOONFORGE_HOME=str(project),
        PREFECT_WORKER_QUERY_SECONDS="1",
        MOONFORGE_SLURM_POLL_S="1",
        PYTHONPATH=str(project / ".toy-site"),
        MOONFORGE_TOY_STAGES="1",
        **slurm.env(),
    )
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL],
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


@pytest.fixture(scope="module")
def deployed(project, api, worker) -> None:
    res = subprocess.run(
        [str(BIN / "moonforge"), "deploy", "--recipe", "recipes/mini.yaml", "--pool", POOL],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=240,
        env={**_env(project / ".client-home"), "COLUMNS": "200", "PREFECT_API_URL": api},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"pool {POOL}, process" in res.stdout


def _start(client, project: Path, sets: list[str], **env: str):
    """A flow run of `rerun/mini-lm_pretrain` (not waited for); `env` adds to the job's env."""
    from prefect.deployments import run_deployment

    d = client.read_deployment_by_name(RERUN)
    env = {"MOONFORGE_TOY_STEP_SLEEP": "0", **env}
    params = {
        "params": {
            "recipe": "recipes/mini.yaml",
            "stage": "lm_pretrain",
            "from_ref": None,
            "downstream": False,
            "project": str(project),
            "overrides": [f"stages.lm_pretrain.{s}" for s in sets],
        }
    }
    jv = {"env": {**(d.job_variables or {}).get("env", {}), **env}}
    return run_deployment(RERUN, parameters=params, job_variables=jv, timeout=0, as_subflow=False)


def _wait(client, fr, worker_log: Path, timeout: float = 300):
    """The run's final state; a killed job's flow shows Crashed until submit.py, seeing the
    job end, replaces it with Failed and the Slurm reason."""
    deadline = time.time() + timeout
    while True:
        fr = client.read_flow_run(fr.id)
        if fr.state.is_final() and not fr.state.is_crashed():
            return fr
        if time.time() > deadline:
            pytest.fail(
                f"flow run {fr.id} still {fr.state.name} after {timeout:.0f}s:\n"
                + worker_log.read_text(errors="replace")[-4000:]
            )
        time.sleep(1)


def _slurm_job(project: Path, fr, timeout: float = 120) -> str:
    """The Slurm job id of a flow run: its job log's first line names the run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for out in (project / ".moonforge" / "slurm-logs").glob("moonforge-*.out"):
            if str(fr.id) in out.read_text(errors="replace")[:500]:
                return re.search(r"moonforge-(\d+)\.out", out.name).group(1)
        time.sleep(0.5)
    pytest.fail(f"no Slurm job log names flow run {fr.id}")


def _scontrol(slurm, job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        capture_output=True,
        text=True,
        env={**os.environ, **slurm.env()},
    ).stdout
    return dict(re.findall(r"(\S+?)=(\S*)", out))


def _checkpoints(store: Path, pattern: str) -> list[Path]:
    return sorted(store.glob(f"lm_pretrain/{pattern}/train_state/step-*"))


@pytest.fixture(scope="module")
def timelimit_run(client, project, deployed):
    """Started first, finished last: a long lm_pretrain (one process, mostly asleep, its own
    store and MLflow file) in a job with a 1-minute time limit."""
    return _start(
        client,
        project,
        ["data=[]", "num_steps=100000", "checkpoint_every=1"],
        SBATCH_TIMELIMIT="1",
        MOONFORGE_TOY_STEP_SLEEP="0.5",
        MOONFORGE_STORE=str(project / ".store-timelimit"),
        MLFLOW_TRACKING_URI=f"sqlite:///{project / '.moonforge' / 'mlflow-timelimit.db'}",
    )


@pytest.fixture(scope="module")
def cancelled(client, project, slurm, worker, deployed, timelimit_run):
    """A rerun whose Slurm job is scancel'ed once its first periodic checkpoint is written."""
    fr = _start(client, project, STAGE_SETS, MOONFORGE_TOY_STEP_SLEEP="0.5")
    job = _slurm_job(project, fr)
    store = project / ".moonforge" / "store"
    deadline = time.time() + 240
    while not _checkpoints(store, "*"):  # in the staging dir or the kept partial
        assert time.time() < deadline, "no checkpoint in 240 s: " + worker.read_text()[-3000:]
        assert not client.read_flow_run(fr.id).state.is_final(), worker.read_text()[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", job], check=True, env={**os.environ, **slurm.env()})
    return _wait(client, fr, worker), job


def test_a_cancelled_job_fails_the_run_with_the_slurm_reason(cancelled, project, slurm):
    fr, job = cancelled
    assert fr.state.is_failed(), (fr.state.name, fr.state.message)
    assert f"Slurm job {job} ended CANCELLED (Reason=" in fr.state.message
    assert "it was cancelled (scancel" in fr.state.message
    assert "rerunning the flow resumes from it" in fr.state.message
    assert _scontrol(slurm, job)["JobState"] == "CANCELLED"
    assert _checkpoints(project / ".moonforge" / "store", ".partial-*")  # kept for the rerun


@pytest.fixture(scope="module")
def bad_runs(client, project, slurm, deployed) -> dict:
    """Runs that must fail before or instead of running (started together, while the rerun runs):
    the controller down, a partition the cluster lacks, an account the partition refuses."""
    conf = slurm.conf.read_text()
    port = re.search(r"^SlurmctldPort=(\d+)", conf, re.M).group(1)
    from conftest import free_port

    dead = project / "slurm-down.conf"
    dead.write_text(conf.replace(f"SlurmctldPort={port}", f"SlurmctldPort={free_port()}"))
    return {
        "down": (_start(client, project, STAGE_SETS, SLURM_CONF=str(dead)), dead),
        "partition": _start(client, project, STAGE_SETS, SBATCH_PARTITION="gpu-h100"),
        "account": _start(client, project, STAGE_SETS, SBATCH_PARTITION="restricted", SBATCH_ACCOUNT="nope"),
    }


@pytest.fixture(scope="module")
def resumed(cancelled, bad_runs, client, project, worker):
    fr = _wait(client, _start(client, project, STAGE_SETS), worker)
    return fr, _slurm_job(project, fr)


def test_the_rerun_resumes_and_records_the_slurm_job(resumed, client, project, worker):
    from mlflow import MlflowClient

    from moonforge.registry.refs import resolve_ref
    from moonforge.registry.store import open_store

    fr, job = resumed
    assert fr.state.is_completed(), (fr.state.message, worker.read_text()[-3000:])
    log = (project / ".moonforge" / "slurm-logs" / f"moonforge-{job}.out").read_text()
    assert re.search(r"resuming from .*step-\d+", log), log[-3000:]
    # the job ran in the project, not in a copy of it that a concurrent checkpoint could break
    assert "Downloading flow code" not in log, log[-3000:]

    info = resolve_ref("lm_pretrain@latest", open_store(project), project)
    lineage = info.lineage()
    assert lineage["scheduler"] == {
        "kind": "slurm",
        "job_id": job,
        "cluster": "moonforge-local",
        "partition": "debug",
        "nodes": "mfnode",
        "num_nodes": "1",
    }
    assert lineage["prefect_flow_run_id"] == str(fr.id) and lineage["world_size"] == 2
    assert not _checkpoints(project / ".moonforge" / "store", ".partial-*")  # consumed
    mlflow = MlflowClient(f"sqlite:///{project / '.moonforge' / 'mlflow.db'}")
    run = mlflow.get_run(lineage["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["moonforge.stage"] == "lm_pretrain"
    assert run.data.tags["moonforge.prefect_flow_run_id"] == str(fr.id)
    runs = mlflow.search_runs([run.info.experiment_id], "tags.`moonforge.stage` = 'lm_pretrain'")
    assert {r.info.status for r in runs} == {"FINISHED", "FAILED"}  # cancelled, then resumed


def _failed(client, fr, worker) -> str:
    fr = _wait(client, fr, worker, timeout=120)
    assert fr.state.is_failed(), (fr.state.name, fr.state.message)
    return fr.state.message


def test_slurm_down_names_the_controller_and_the_fix(bad_runs, client, worker):
    fr, dead = bad_runs["down"]
    msg = _failed(client, fr, worker)
    assert re.search(
        rf"the Slurm controller localhost:\d+ \(SlurmctldHost in {dead}\) does not "
        r"answer from .*: `scontrol ping` says .*DOWN.*Start slurmctld",
        msg,
    ), msg


def test_a_partition_the_cluster_lacks_is_named_with_those_it_has(bad_runs, client, worker):
    msg = _failed(client, bad_runs["partition"], worker)
    assert "partition 'gpu-h100' does not exist on this cluster (it has: debug, restricted)" in msg
    assert "set `partition:` in infra/slurm/cluster.yaml" in msg


def test_an_account_the_partition_refuses_is_cancelled_not_left_waiting(bad_runs, client, slurm, worker):
    msg = _failed(client, bad_runs["account"], worker)
    m = re.search(
        r"Slurm job (\d+) can never start: it waits with Reason=\S*account\S* "
        r"\(partition restricted, account nope\); cancelled it",
        msg,
    )
    assert m, msg
    assert _scontrol(slurm, m.group(1))["JobState"] == "CANCELLED"


def test_a_job_killed_by_its_time_limit_is_reported_as_such_and_resumable(
    timelimit_run, resumed, client, project, slurm, worker
):
    fr = _wait(client, timelimit_run, worker, timeout=300)
    job = _slurm_job(project, fr)
    assert fr.state.is_failed(), (fr.state.name, fr.state.message)
    assert f"Slurm job {job} ended TIMEOUT (Reason=TimeLimit" in fr.state.message
    assert "it reached its time limit (00:01:00) and Slurm killed it" in fr.state.message
    assert _checkpoints(project / ".store-timelimit", ".partial-*")  # what the rerun resumes from

    _, rerun_job = resumed  # meanwhile the rerun's job ended too (its flow process exited)
    deadline = time.time() + 60
    while f"Slurm job {rerun_job} COMPLETED" not in worker.read_text():
        assert time.time() < deadline, worker.read_text()[-3000:]
        time.sleep(0.5)
    assert _scontrol(slurm, rerun_job)["JobState"] == "COMPLETED"

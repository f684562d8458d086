"""Crash-proof resume with real processes killed by SIGKILL (their whole process group).

1. `moonforge run` of a one-stage SFT recipe killed with kill -9 right after a periodic checkpoint
   of SFT phase 1 (the deterministic hook MOONFORGE_CRASH_AFTER_CHECKPOINT=<step>:kill): the
   rerun says it resumes from that checkpoint and commits the same sft@1 weights, bit for bit,
   as an uninterrupted run into another store; the killed run's MLflow runs end KILLED and its
   Prefect flow run Crashed.
2. A kill storm: the mini lifecycle flow (3 short stages on the real loop, tests/lease_stage.py)
   killed at seeded random moments MOONFORGE_KILL_STORM times (default 5; the issue's 20 with
   MOONFORGE_KILL_STORM=20), checking after every kill that every visible artifact is complete;
   then a final run. Afterwards: one version per stage, no staging / partial / lease leftovers
   in the store, no MLflow run RUNNING, no owned Prefect flow run left running.
Wall time ~3 min on a quiet 2-core machine (test 1 ~80 s, test 2 ~90 s with 6 kills).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_project
from frozen_code import python_path
from mlflow import MlflowClient
from safetensors.torch import load_file

from moonforge.registry.store import MANIFEST, LocalStore, _sha256
from moonforge.registry.tracking import OWNED_TAG, tracking_uri

pytestmark = pytest.mark.usefixtures("prefect_api")
SCRIPT = Path(__file__).with_name("lease_stage.py")


def api_env(frozen: Path, **extra: str) -> dict[str, str]:
    """This environment, pointed at the session's Prefect test API, for child processes."""
    from prefect.settings import PREFECT_API_URL

    return {
        **os.environ,
        "PYTHONPATH": python_path(frozen),
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def mlflow_runs(project: Path, experiment: str) -> list:
    client = MlflowClient(tracking_uri(project))
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def prefect_states(flow_run_ids) -> dict[str, str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {i: client.read_flow_run(i).state.type.value for i in flow_run_ids}


def owned_unfinished_flow_runs() -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[OWNED_TAG])), limit=200
        )
    return [str(r.id) for r in runs if not r.state.is_final()]


# -- 1. moonforge run, kill -9 in SFT phase 1 --------------------------------------------------

SFT_RECIPE = {
    "name": "sft-crash",
    "description": "one short two-phase SFT stage from scratch",
    "stages": [
        {
            "kind": "sft",
            "upstream": None,
            "data": ["sft", "toyworld", "tokenizer"],
            "trainable": ["vision", "projector", "lm"],
            "optimizer": {"lr": 1.0e-3},
            "seq_len": 128,
            "batch_size": 4,
            "checkpoint_every": 2,
            "eval": {"num_examples": 2, "batch_size": 2},
            "phases": [
                {"seq_len": 128, "lr": 1.0e-3, "min_lr": 1.0e-4, "num_steps": 4},
                {"seq_len": 256, "lr": 5.0e-4, "min_lr": 5.0e-5, "num_steps": 4, "warmup_frac": 0.25},
            ],
        }
    ],
}


@pytest.fixture(scope="module")
def sft_project(tmp_path_factory, repo_data) -> Path:
    proj = copy_project(tmp_path_factory.mktemp("crash") / "proj", ("toyworld", "text", "tokenizer"))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["sft"].update(max_images_train=120, max_images_val=30)  # a small SFT build
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    model = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())["model"]
    (proj / "recipes" / "sft-crash.yaml").write_text(
        yaml.safe_dump({**SFT_RECIPE, "model": model}, sort_keys=False)
    )
    return proj


def moonforge_run(frozen: Path, project: Path, store: Path, **env: str):
    cmd = [sys.executable, "-m", "moonforge.flows.cli", "run", "recipes/sft-crash.yaml"]
    env = api_env(frozen, MOONFORGE_STORE=str(store), COLUMNS="200", **env)
    return subprocess.run(
        cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900, start_new_session=True
    )


def test_moonforge_run_killed_in_sft_phase_1_resumes_to_the_same_weights(sft_project, frozen):
    unbroken = moonforge_run(frozen, sft_project, sft_project / "store-a")
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]

    store = sft_project / "store-b"
    killed = moonforge_run(frozen, sft_project, store, MOONFORGE_CRASH_AFTER_CHECKPOINT="6:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    work = next((store / "sft").glob(".partial-*"))
    assert [p.name for p in (work / "train_state").iterdir()] == ["step-0000006"]  # phase 1
    assert LocalStore(store).versions("sft") == []
    running = [r for r in mlflow_runs(sft_project, "sft-crash") if r.info.status == "RUNNING"]
    assert len(running) == 2  # the lifecycle parent and the sft child, left by kill -9
    dead_flow = running[0].data.tags["moonforge.prefect_flow_run_id"]

    rerun = moonforge_run(frozen, sft_project, store)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    said = rerun.stdout + rerun.stderr
    assert "resum" in said and "phase 1 step 2/4" in said, said[-3000:]
    a = load_file(str(sft_project / "store-a" / "sft" / "1" / "model.safetensors"))
    b = load_file(str(store / "sft" / "1" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert not [p for p in (store / "sft").iterdir() if p.name.startswith((".tmp-", ".partial-", ".lease-"))]
    runs = {r.info.run_id: r for r in mlflow_runs(sft_project, "sft-crash")}
    assert all(runs[r.info.run_id].info.status == "KILLED" for r in running)
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    assert prefect_states([dead_flow])[dead_flow] == "CRASHED"


# -- 2. the kill storm -----------------------------------------------------------------------


def check_complete(store: LocalStore) -> None:
    """Every visible artifact has every file its manifest lists, byte for byte."""
    for stage in store.stages():
        for a in store.versions(stage):
            for rel, meta in a.manifest["files"].items():
                p = a.path / rel
                assert p.is_file() and p.stat().st_size == meta["size"], p
                assert _sha256(p) == meta["sha256"], p
            assert (a.path / MANIFEST).is_file()


def test_random_kill_9s_then_a_rerun_leave_nothing_open(tmp_project, tmp_path, frozen):
    kills = int(os.environ.get("MOONFORGE_KILL_STORM", "5"))
    rng = random.Random(20)
    env = api_env(frozen)
    store = LocalStore(tmp_project / ".moonforge" / "store")
    cmd = [sys.executable, str(SCRIPT), str(tmp_project), "--flow", str(tmp_path / "calls")]
    t0 = time.time()
    for i in range(kills):
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        if i % 2:  # a random moment once a stage trains (then: its steps, commit, the next stage)
            started = tmp_path / "calls" / str(proc.pid)
            deadline = time.time() + 120
            while not started.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            delay = rng.uniform(0.0, 3.0)
        else:  # a random moment from start-up on (imports, flow start, data check, ...)
            delay = rng.uniform(0.5, 10.0)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        check_complete(store)
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    out = json.loads(final.stdout.strip().splitlines()[-1])
    assert [o["ref"] for o in out.values()] == ["lm_pretrain@1", "vit_pretrain@1", "align@1"]
    check_complete(store)
    left = [
        p
        for d in store.root.iterdir()
        if d.is_dir()
        for p in d.iterdir()
        if p.name.startswith((".tmp-", ".partial-", ".lease-"))
    ]
    assert left == [], left
    runs = mlflow_runs(tmp_project, "mini")
    assert runs and not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert owned_unfinished_flow_runs() == []
    print(
        f"{kills} kills + final run: {time.time() - t0:.0f} s; MLflow runs by status: "
        f"{sorted((s, sum(r.info.status == s for r in runs)) for s in {r.info.status for r in runs})}"
    )

"""One builder per fingerprint, with real processes, on the local store and on S3 (moto_server).

Three concurrent runs of one stage with one fingerprint: the first takes the lease and is killed
with SIGKILL mid-training; it loses its lease (at once locally: the kernel drops its flock; on S3
after the lease's ttl without renewal). One of the two waiting runs takes over, resumes from the
dead run's last periodic checkpoint, trains to the end and ends the MLflow run the dead one left
RUNNING as KILLED; the other waits for it and reports a cache hit on the same version. Every
process runs tests/lease_stage.py (the real run_stage, store, MLflow and loop). Wall time ~30 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from frozen_code import python_path
from mlflow import MlflowClient

from moonforge.registry.tracking import tracking_uri

SCRIPT = Path(__file__).with_name("lease_stage.py")
STAGE = "lm_pretrain"


class Proc:
    """A lease_stage.py process whose stderr is collected as it comes."""

    def __init__(self, project: Path, calls: Path, env: dict, gate: Path | None = None):
        args = [sys.executable, str(SCRIPT), str(project), STAGE, str(calls)]
        self.p = subprocess.Popen(
            args + ([str(gate)] if gate else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.err: list[str] = []
        self._t = threading.Thread(target=lambda: self.err.extend(self.p.stderr), daemon=True)
        self._t.start()

    def outcome(self) -> dict:
        out = self.p.stdout.read()
        assert self.p.wait(timeout=300) == 0, "".join(self.err)[-3000:]
        self._t.join(10)
        return json.loads(out.strip().splitlines()[-1])

    def killed(self) -> int:
        self.p.stdout.read()
        rc = self.p.wait(timeout=300)
        self._t.join(10)
        return rc


def wait_for(cond, what: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(params=["local", "s3"])
def store_env(request, tmp_project, frozen):
    """(env for the processes, the stage's directory in a local store or None for S3)."""
    env = {**os.environ, "PYTHONPATH": python_path(frozen)}
    if request.param == "local":
        return env, tmp_project / ".moonforge" / "store" / STAGE
    _, bucket, _ = request.getfixturevalue("s3_env")
    env = {
        **os.environ,
        "PYTHONPATH": env["PYTHONPATH"],
        "MOONFORGE_STORE": f"s3://{bucket}/st",
        "MOONFORGE_LEASE_TTL_S": "10",  # a loaded box (make test's workers) delays beats by seconds
    }
    return env, None


def stage_runs(project: Path) -> list:
    client = MlflowClient(tracking_uri(project))
    exp = client.get_experiment_by_name("mini")
    return client.search_runs(
        [exp.experiment_id], f"tags.`moonforge.stage` = '{STAGE}'", order_by=["attributes.start_time ASC"]
    )


def no_leftovers(d: Path | None) -> None:
    if d is None or not d.exists():
        return
    left = [p.name for p in d.iterdir() if p.name.startswith((".tmp-", ".partial-", ".lease-"))]
    assert left == [], left


def test_one_builder_per_fingerprint_and_a_dead_one_is_taken_over(store_env, tmp_project, tmp_path):
    """A takes the lease and is SIGKILLed right after its step-6 checkpoint; B and C, started while
    A held it, wait. One of them takes over (locally at once, on S3 once A's lease expired) and
    resumes from step 6; the other then waits for it and reuses its version: a cache hit."""
    env, stage_dir = store_env
    env = {**env, "MOONFORGE_S3_CACHE": str(tmp_path / "cache")}
    calls, gate = tmp_path / "calls", tmp_path / "gate"
    a = Proc(tmp_project, calls, {**env, "MOONFORGE_CRASH_AFTER_CHECKPOINT": "6:kill"}, gate)
    wait_for(lambda: (calls / str(a.p.pid)).exists(), "A to hold the lease and start")
    b, c = Proc(tmp_project, calls, env, gate), Proc(tmp_project, calls, env, gate)
    wait_for(
        lambda: all(any("is building this fingerprint" in line for line in p.err) for p in (b, c)),
        "B and C to wait for A",
    )
    a_run = stage_runs(tmp_project)[-1]
    gate.touch()
    assert a.killed() == -9
    killed_at = time.time()
    outs = {b.p.pid: b.outcome(), c.p.pid: c.outcome()}
    ((trainer, trained),) = [(pid, o) for pid, o in outs.items() if not o["cache_hit"]]
    ((_, reused),) = [(pid, o) for pid, o in outs.items() if o["cache_hit"]]
    assert trained["ref"] == reused["ref"] == f"{STAGE}@1"
    assert trained["fingerprint"] == reused["fingerprint"]
    assert "phase 0 step 6/12" in trained["resumed_from"] and "step-0000006" in trained["resumed_from"]
    assert (calls / str(trainer)).read_text().endswith("step-0000006")
    assert sorted(int(p.name) for p in calls.iterdir()) == sorted([a.p.pid, trainer])  # no 3rd
    host = os.uname().nodename
    assert reused["waited_for"] in (f"pid {a.p.pid} on {host}", f"pid {trainer} on {host}")
    if stage_dir is None:  # S3: A's lease had to expire (ttl 10 s) first
        taker = b if trainer == b.p.pid else c
        assert any("expired" in line and "taking over" in line for line in taker.err)
        assert time.time() - killed_at > 6  # ttl less the beat (10 / 3 s) A may have renewed in
    client = MlflowClient(tracking_uri(tmp_project))
    dead = client.get_run(a_run.info.run_id)
    assert dead.info.status == "KILLED" and "died" in dead.data.tags["moonforge.end_reason"]
    runs = {r.info.run_id: r for r in stage_runs(tmp_project)}
    assert [r.info.status for r in runs.values()].count("RUNNING") == 0
    done = [r for r in runs.values() if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["moonforge.cache_hit"] for r in done) == ["false", "true"]
    assert (
        next(r for r in done if r.data.tags["moonforge.cache_hit"] == "false").data.tags[
            "moonforge.resumed_from_run"
        ]
        == a_run.info.run_id
    )
    no_leftovers(stage_dir)


def test_a_slow_checkpoint_upload_never_holds_up_the_lease_renewals():
    """The S3 store uploads new checkpoints on the heartbeat; an upload longer than the lease's
    ttl must not delay a renewal, or a waiter takes over a live run's work."""
    from moonforge.registry.lease import Heartbeat, Lease

    renewals, upload_started, release = [], threading.Event(), threading.Event()

    class Counting(Lease):
        def renew(self) -> bool:
            renewals.append(time.monotonic())
            return True

    def slow_upload() -> None:
        upload_started.set()
        release.wait(30)

    lease = Counting(STAGE, "f" * 64, {}, None)
    with Heartbeat(lease, 0.02, also=slow_upload):
        assert upload_started.wait(10)
        seen = len(renewals)
        deadline = time.monotonic() + 10
        while len(renewals) < seen + 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(renewals) >= seen + 5, "renewals stopped while an upload was running"
        release.set()

"""Multi-node launch on one machine: two "nodes" of one process each on 127.0.0.1.

Node 0 is this test process (registry.launch / run_stage, as a flow would run it); node 1 is a
second launcher process, `python -m moonforge.registry.launch node JOB.json`, started on the
job file the way `srun` or a Kubernetes indexed Job starts it on another machine (its node rank
from NODE_RANK). The two torchrun agents meet at a c10d rendezvous; the loss curve must match
the single-process one (tests/dist_stage.py's toy stage, as in tests/test_distributed.py).
Bad input: a node lost mid-stage (the stage fails naming it, the checkpoint is kept, and the
rerun resumes), a rendezvous endpoint nobody reaches (times out naming the endpoint), and node
rank / endpoint / node count resolution from the recipe, Slurm and Kubernetes environments.
Wall time: about 60 s on 2 cores.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dist_stage
import psutil
import pytest
from conftest import free_port, stop_process

from moonforge.registry import launch
from moonforge.registry.errors import StageFailed
from moonforge.registry.run_stage import run_stage
from moonforge.registry.store import open_store
from moonforge.registry.tracking import NullTracker
from moonforge.stages.artifacts import ListSink
from moonforge.stages.config import LauncherConfig
from moonforge.stages.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STAGE = "dist_stage:toy_stage"
LOSS_TOL = 1e-4
pytestmark = pytest.mark.timeout(300)


_cfg, _ctx, _curve = dist_stage.toy_cfg, dist_stage.toy_ctx, dist_stage.loss_curve


class OtherNode:
    """Node 1: waits for node 0's job file under `launch_dir`, then runs the node launcher on
    it in its own process group (so the test can take the whole "machine" down)."""

    def __init__(self, launch_dir: Path, log: Path, pattern: str = "*/job.json") -> None:
        self.launch_dir, self.log, self.pattern = launch_dir, log, pattern
        self.proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._start, daemon=True)
        self._thread.start()

    def _start(self) -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            jobs = list(self.launch_dir.glob(self.pattern))
            if jobs:
                env = {**os.environ, "NODE_RANK": "1", "PYTHONPATH": str(TESTS)}
                with self.log.open("wb") as fh:
                    self.proc = subprocess.Popen(
                        [sys.executable, "-m", "moonforge.registry.launch", "node", str(jobs[0])],
                        env=env,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                return
            time.sleep(0.05)

    def lose(self) -> None:
        """The machine goes away: SIGKILL its launcher and its training process (torchrun puts
        each worker in a session of its own) at once."""
        procs = [psutil.Process(self.proc.pid)]
        procs += procs[0].children(recursive=True)
        for p in procs:
            p.kill()
        self.proc.wait()

    def wait(self) -> int:
        self._thread.join()
        assert self.proc is not None, "node 0 never wrote its job file"
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                stop_process(self.proc, group=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    ctx = _ctx(tmp_path_factory.mktemp("single"), "out")
    return dist_stage.toy_stage(None, {}, _cfg(), ctx)


@pytest.fixture
def no_scheduler(monkeypatch) -> None:
    """No scheduler variables from the outer shell."""
    for var in (
        *launch.NODE_RANK_VARS,
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_JOB_ID",
        "SLURM_JOB_NUM_NODES",
        "SLURM_NNODES",
        "SLURM_JOB_NODELIST",
        "MOONFORGE_LAUNCH_DIR",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def launch_dir(tmp_path, monkeypatch, no_scheduler) -> Path:
    """The "shared filesystem" both nodes see (MOONFORGE_LAUNCH_DIR)."""
    d = tmp_path / "launch"
    monkeypatch.setenv("MOONFORGE_LAUNCH_DIR", str(d))
    return d


def test_two_nodes_match_the_single_process_curve(single, launch_dir, tmp_path):
    other = OtherNode(launch_dir, tmp_path / "node1.log")
    ctx = _ctx(tmp_path, "out")
    ctx.sink = ListSink()
    la = dict(
        kind="torchrun",
        nnodes=2,
        nproc_per_node=1,
        node_rank=0,
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_timeout_s=120,
    )
    try:
        res = launch.launch_stage(STAGE, None, {}, _cfg(**la), ctx)
    finally:
        rc = other.wait()
    node1 = (tmp_path / "node1.log").read_text()
    assert rc == 0, node1
    assert "moonforge node 1 of 2" in node1 and "node rank from NODE_RANK" in node1
    got, want = _curve(res.metrics), _curve(single.metrics)
    assert len(got) == len(want) == 8
    assert max(abs(a - b) for a, b in zip(got, want)) < LOSS_TOL, (got, want)
    assert res.checkpoint.weights.exists()  # node 0 wrote the artifact
    assert [s for s, _ in ctx.sink.series("toy/loss")] == list(range(1, 9))
    assert not list(launch_dir.iterdir())  # the job dir is cleaned up


def test_a_lost_node_fails_the_stage_clearly_and_the_rerun_resumes(
    tmp_project, no_scheduler, monkeypatch, single, caplog
):
    """The job file lives beside the staging dir (the default without MOONFORGE_LAUNCH_DIR)."""
    from moonforge.stages import catalog

    monkeypatch.setattr(catalog, "stage_function", lambda kind: dist_stage.toy_stage)
    monkeypatch.setenv("MOONFORGE_TOY_STEP_SLEEP", "0.4")
    toy = [
        "optimizer.lr=0.01",
        "schedule.kind=cosine",
        "schedule.warmup_steps=2",
        "seq_len=12",
        "batch_size=8",
        "micro_batch_size=2",
        "num_steps=8",
        "checkpoint_every=3",
    ]
    sets = [f"stages.lm_pretrain.{s}" for s in toy]
    two = load_recipe(
        tmp_project / "recipes" / "mini.yaml",
        sets
        + [
            f"stages.lm_pretrain.launcher.{k}"
            for k in (
                "kind=torchrun",
                "nnodes=2",
                "node_rank=0",
                "rdzv_timeout_s=120",
                f"rdzv_endpoint=127.0.0.1:{free_port()}",
            )
        ],
    )
    store_dir = tmp_project / ".moonforge" / "store"
    other = OtherNode(store_dir / "lm_pretrain", tmp_project / "node1.log", ".tmp-launch-*/job.json")

    def lose_node_1_after_a_checkpoint() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if other.proc is not None and list(store_dir.rglob("train_state/step-*")):
                return other.lose()
            time.sleep(0.05)

    killer = threading.Thread(target=lose_node_1_after_a_checkpoint, daemon=True)
    killer.start()
    with pytest.raises(
        StageFailed,
        match=r"(?s)LaunchFailed.*torchrun launcher \(2 processes\) "
        r"failed.*rank 1 was lost: with 2 nodes this means a node "
        r"died.*last good checkpoint kept",
    ):
        run_stage(two, "lm_pretrain", tmp_project, tracker=NullTracker())
    killer.join()
    assert other.wait() == -signal.SIGKILL
    assert open_store(tmp_project).versions("lm_pretrain") == []
    kept = list((store_dir / "lm_pretrain").glob(".partial-*/train_state/step-*"))
    assert [p.name for p in kept] == ["step-0000003"]

    # the rerun (one node, in process: the launcher is Runtime, so the same version) resumes
    monkeypatch.setenv("MOONFORGE_TOY_STEP_SLEEP", "0")
    with caplog.at_level(logging.WARNING, logger="moonforge"):
        out = run_stage(
            load_recipe(tmp_project / "recipes" / "mini.yaml", sets),
            "lm_pretrain",
            tmp_project,
            tracker=NullTracker(),
        )
    assert out.ref == "lm_pretrain@1"
    assert "resuming" in caplog.text and "step-0000003" in caplog.text
    resumed, want = _curve(out.metrics)[-5:], _curve(single.metrics)[3:]  # steps 4..8
    assert max(abs(a - b) for a, b in zip(resumed, want)) < LOSS_TOL, (resumed, want)
    assert not [p for p in (store_dir / "lm_pretrain").iterdir() if p.name.startswith(".tmp-launch")]


def test_a_rendezvous_nobody_reaches_times_out_naming_the_endpoint(launch_dir, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"  # node 1 of 2: a client of a store nobody hosts
    t0 = time.time()
    with pytest.raises(
        launch.LaunchFailed,
        match=rf"the 2 nodes did not meet at the rendezvous "
        rf"{endpoint} within 3 s.*node 0's address",
    ):
        launch.launch_stage(
            STAGE,
            None,
            {},
            _cfg(
                kind="torchrun",
                nnodes=2,
                nproc_per_node=1,
                node_rank=1,
                rdzv_endpoint=endpoint,
                rdzv_timeout_s=3,
            ),
            _ctx(tmp_path, "out"),
        )
    assert time.time() - t0 < 60


# -- where node rank, endpoint and node count come from ---------------------------------------


def _la(**kw) -> LauncherConfig:
    return LauncherConfig(kind="torchrun", nnodes=4, **kw)


def test_node_plan_from_the_recipe_slurm_and_kubernetes(monkeypatch):
    plan = launch.node_plan(_la(node_rank=0, rdzv_endpoint="head:29400"), {})
    assert (plan.node_rank, plan.endpoint) == (0, "head:29400")
    assert plan.source == "node rank from launcher.node_rank, endpoint from launcher.rdzv_endpoint"

    slurm = {
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu[017-020]",
    }
    monkeypatch.setattr(launch, "_slurm_first_host", lambda nodelist: "gpu017")
    plan = launch.node_plan(_la(), slurm)  # the scheduler's rank wins over none in the recipe
    assert (plan.nnodes, plan.node_rank, plan.endpoint) == (4, 2, "gpu017:29400")
    plan = launch.node_plan(_la(), {**slurm, "MASTER_ADDR": "gpu017", "MASTER_PORT": "29500"})
    assert plan.endpoint == "gpu017:29500"  # what infra/slurm/flow-run.sbatch exports

    k8s = {"JOB_COMPLETION_INDEX": "3", "MASTER_ADDR": "train-0.train", "MASTER_PORT": "29400"}
    plan = launch.node_plan(_la(), k8s)
    assert (plan.node_rank, plan.endpoint) == (3, "train-0.train:29400")
    assert "JOB_COMPLETION_INDEX" in plan.source
    assert launch.node_plan(_la(), k8s, node_rank=1).node_rank == 1  # --node-rank wins


@pytest.mark.parametrize(
    "la, env, msg",
    [
        (
            dict(),
            {"MASTER_ADDR": "h", "MASTER_PORT": "1"},
            "this node's rank is unknown: set launcher.node_rank",
        ),
        (dict(node_rank=0), {}, "no rendezvous endpoint: set launcher.rdzv_endpoint"),
        (
            dict(),
            {"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0"},
            r"launcher.nnodes=4 but Slurm job 9 has 2 node\(s\); submit it with --nodes=4",
        ),
        (
            dict(),
            {"NODE_RANK": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
            r"node rank 4 \(from NODE_RANK\) is not in 0..3",
        ),
    ],
)
def test_node_plan_names_what_is_missing(la, env, msg):
    with pytest.raises(launch.LauncherUnavailable, match=msg):
        launch.node_plan(_la(**la), env)


@pytest.mark.parametrize(
    "field, value, msg",
    [
        ("rdzv_endpoint", "head", "use host:port"),
        ("rdzv_endpoint", "head:99999", "use host:port"),
        ("node_rank", 4, "node_rank=4 is not below nnodes=4"),
    ],
)
def test_bad_launcher_fields_are_config_errors(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        _la(**{field: value})


def test_inside_a_slurm_batch_script_the_launch_goes_through_srun(tmp_path, monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")
    env = {"SLURM_JOB_ID": "5", "SLURM_NODEID": "0", "SLURM_CPUS_PER_TASK": "8"}
    cmd, extra = launch.launch_command(
        _cfg(kind="torchrun", nproc_per_node=2), tmp_path / "j.json", "rid", env
    )
    assert cmd[:7] == [
        "srun",
        "--nodes=1",
        "--ntasks=1",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--export=ALL",
        "--job-name=moonforge-lm_pretrain",
    ]
    assert "--cpus-per-task=8" in cmd and cmd[-3:] == [
        "moonforge.registry.launch",
        "node",
        str(tmp_path / "j.json"),
    ]
    # inside a job step (srun already ran), this process is one node: no nested srun
    cmd, _ = launch.launch_command(
        _cfg(kind="torchrun", nproc_per_node=2), tmp_path / "j.json", "rid", {**env, "SLURM_STEP_ID": "0"}
    )
    assert cmd[0] == sys.executable and "torch.distributed.run" in cmd

"""Shared fixtures: a real Prefect test API (opt-in), a temp project with a real DVC pipeline and a
real MLflow SQLite file, and a small real stage function to stand in for the training stages.

- `prefect_api`: ONE session-scoped `prefect_test_harness` (its server takes ~15 s to start);
  request it only in tests that run flows.
- `tmp_project`: cwd = a temp project with dvc.yaml (datasets `text`, `toyworld`), dvc.lock,
  built data, the repo's recipes plus `recipes/mini.yaml` (3 cheap stages on the tiny model),
  and a pre-migrated `.moonforge/mlflow.db` (copied from a session template; migrating a fresh
  MLflow DB costs ~2.5 s).
- `fake_stages`: routes every stage kind to `FakeStage`, which writes a tiny safetensors file,
  logs a loss curve and returns metrics; tests can queue exceptions per stage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two xdist workers on a 2-core box: each worker, and every process it
    # starts, computes on one thread. Two 2-thread trainers at once cost ~3x each; one thread
    # costs a trainer ~1.5x, and the workers' waits (servers, Slurm, subprocess start-up) overlap.
    # Tried: the lifecycle's run at 2 threads beside the other worker at 1. The CPU stayed ~98%
    # busy and the suite went from 1172 s to over 1500 s (killed there), so one thread it is.
    os.environ["OMP_NUM_THREADS"] = "1"

# A stage run through run_stage (the CLI's way) keeps freed host memory for reuse
# (stages/train/host_memory.py: the tiny LM step 1.08-1.24x faster); the many tests that call a
# stage function directly get the same, process-wide, here.
from moonforge.stages.train.host_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()

REPO = Path(__file__).resolve().parent.parent

# Hypothesis keeps no example database: it would write .hypothesis/ into the checkout. No
# per-example deadline either: on a loaded box (make test's workers) it only measures the load.
settings.register_profile("moonforge", database=None, deadline=None)
settings.load_profile("moonforge")
DVC = (
    str(Path(sys.executable).parent / "dvc")
    if (Path(sys.executable).parent / "dvc").exists()
    else (shutil.which("dvc") or "dvc")
)

DVC_YAML = {
    "stages": {
        "text": {
            "cmd": "python -c \"import os; os.makedirs('data/text', exist_ok=True); "
            "open('data/text/corpus.txt', 'w').write('the cat sat ' * ${text_repeat})\"",
            "params": ["text_repeat"],
            "outs": ["data/text"],
        },
        "toyworld": {
            "cmd": "python -c \"import os, json; os.makedirs('data/toyworld', exist_ok=True); "
            "json.dump([{'shape': 'circle', 'n': i} for i in range(${toy_items})], "
            "open('data/toyworld/items.json', 'w'))\"",
            "params": ["toy_items"],
            "outs": ["data/toyworld"],
        },
    }
}
PARAMS = {"text_repeat": 3, "toy_items": 4}


def mini_recipe(repo: Path = REPO) -> dict:
    """Three cheap stages on the tiny model shape; datasets from the test DVC pipeline."""
    tiny = yaml.safe_load((repo / "recipes" / "tiny.yaml").read_text())

    def common():  # fresh dicts: shared ones would dump as YAML aliases that overrides mutate together
        return {"optimizer": {"lr": 1.0e-3}, "seq_len": 16, "batch_size": 2, "num_steps": 12}

    return {
        "name": "mini",
        "description": "test recipe",
        "model": tiny["model"],
        "stages": [
            {"kind": "lm_pretrain", "upstream": None, "data": ["text"], "trainable": ["lm"], **common()},
            {
                "kind": "vit_pretrain",
                "upstream": "lm_pretrain",
                "data": ["toyworld"],
                "trainable": ["vision", "caption"],
                **common(),
            },
            {
                "kind": "align",
                "upstream": "vit_pretrain",
                "data": ["toyworld", "text"],
                "trainable": ["vision", "projector"],
                **common(),
            },
        ],
    }


@pytest.fixture(scope="session")
def prefect_api():
    """A real (temporary) Prefect API for the whole session; opt in by requesting it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # runs the schema migrations once
    return db


@pytest.fixture(scope="session")
def _dvc_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dvc-template")
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([DVC, "config", "core.analytics", "false"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    subprocess.run([DVC, "repro", "-q"], cwd=root, check=True, capture_output=True)
    return root


@pytest.fixture
def tmp_project(tmp_path, monkeypatch, _dvc_template, _mlflow_template) -> Path:
    proj = tmp_path / "proj"
    shutil.copytree(_dvc_template, proj, symlinks=True)
    shutil.copytree(REPO / "recipes", proj / "recipes")
    (proj / "recipes" / "mini.yaml").write_text(yaml.safe_dump(mini_recipe(), sort_keys=False))
    (proj / ".moonforge").mkdir()
    shutil.copy(_mlflow_template, proj / ".moonforge" / "mlflow.db")
    for var in ("MLFLOW_TRACKING_URI", "MOONFORGE_STORE", "MOONFORGE_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(proj)
    return proj


class FakeStage:
    """A real (cheap) stage function: reads its datasets, writes weights + config, logs a curve.

    `fail[stage_name]` is a list of exceptions raised by successive calls (after a partial write,
    so atomicity is exercised); `calls` records stage names in call order.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: dict[str, list[BaseException]] = {}

    def __call__(self, base, data, cfg, ctx):
        import numpy as np
        from safetensors.numpy import save_file

        from moonforge.stages.artifacts import MODEL_CONFIG_FILE, WEIGHTS_FILE, Checkpoint, StageResult

        self.calls.append(cfg.stage_name)
        start = 0.0
        if base is not None:
            assert base.weights.exists() and base.model_config() == ctx.model
            start = 1.0
        nbytes = sum(f.stat().st_size for d in data.values() for f in d.path.rglob("*") if f.is_file())
        (ctx.out / "partial.bin").write_bytes(b"x" * 16)
        queued = self.fail.get(cfg.stage_name) or []
        if queued:
            raise queued.pop(0)
        loss = 4.0
        for step in range(cfg.steps):
            loss = 4.0 * 0.9**step + 0.01 * cfg.seed
            ctx.sink.log(step, {"train/loss": loss, "train/lr": cfg.optimizer.lr})
            ctx.progress(step + 1, cfg.steps, "train")
        (ctx.out / "partial.bin").unlink()
        save_file({"w": np.full((4, 4), loss, dtype=np.float32)}, str(ctx.out / WEIGHTS_FILE))
        (ctx.out / MODEL_CONFIG_FILE).write_text(ctx.model.model_dump_json())
        metrics = {"eval/acc": 0.5 + start * 0.1, "train/final_loss": loss, "data/bytes": float(nbytes)}
        return StageResult(Checkpoint(ctx.out), metrics, tuple(data))


@pytest.fixture
def fake_stages(monkeypatch) -> FakeStage:
    from moonforge.stages import catalog

    fake = FakeStage()
    monkeypatch.setattr(catalog, "stage_function", lambda kind: fake)
    return fake


_BUILT: list[Path] = []
"""The session's data project (repo_data), where copy_project takes built datasets from."""


def _shared_dir(tmp_path_factory) -> Path:
    """A temp dir every xdist worker of this session sees (the workers' common parent); the
    session's own temp dir without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def repo_data(tmp_path_factory) -> Path:
    """The datasets most tests read (toyworld, tokenizer, rl_prompts, videoworld), built once per session
    (shared by the xdist workers) through the real DVC pipeline (`dvc repro`) in a copy of this
    project, never in the checkout (its data/ and dvc.lock stay as they are); returns that
    copy's data directory."""
    from filelock import FileLock

    from moonforge.registry.data_versions import ensure_datasets

    shared = _shared_dir(tmp_path_factory)
    proj = shared / "data-proj"
    with FileLock(str(shared / "data-proj.lock")):
        if not (proj / ".git").exists():
            shutil.rmtree(proj, ignore_errors=True)  # a half-made copy of a worker that died
            copy_project(proj, ())
        ensure_datasets(proj, ["toyworld", "tokenizer", "rl_prompts", "videoworld"])
    _BUILT.append(proj)
    return proj / "data"


def copy_project(dest: Path, datasets: tuple[str, ...]) -> Path:
    """A newcomer's copy of this project at `dest`: tracked and not-ignored files, plus the
    built `datasets` (each built once per session in repo_data's project, on first demand, and
    copied with that project's dvc.lock so DVC finds them up to date; without repo_data the
    copy builds them itself), committed as its own git repo. Returns `dest`."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    dest.mkdir(parents=True)
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    built = _BUILT[0] if _BUILT else None
    if built is not None and datasets:
        from filelock import FileLock

        from moonforge.registry.data_versions import ensure_datasets

        with FileLock(str(built.parent / "data-proj.lock")):  # one `dvc repro` there at a time
            ensure_datasets(built, list(datasets))
            shutil.copy2(built / "dvc.lock", dest / "dvc.lock")
            for name in datasets:
                if (built / "data" / name).is_dir():
                    shutil.copytree(built / "data" / name, dest / "data" / name)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    (dest / ".gitignore").write_text("/data/\n/.moonforge/\n")
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "project copy"], cwd=dest, check=True)
    return dest


# -- a local S3 endpoint (moto_server) for the S3 store / MLflow / DVC remote tests -------------


def stop_process(proc: subprocess.Popen, timeout: float = 20, group: bool = False) -> None:
    """Stop a server/worker a test started: SIGTERM (its whole process group when `group`),
    then SIGKILL if it has not exited within `timeout` seconds."""
    import signal

    def send(sig: int) -> None:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> str:
    """A real S3 API (moto_server, in memory) on 127.0.0.1:<free port>; stopped at teardown."""
    import time
    import urllib.request

    exe = Path(sys.executable).parent / "moto_server"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    for _ in range(3):  # the port may be taken between choosing and binding it
        port = free_port()
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                [*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=fh, stderr=subprocess.STDOUT
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        if proc.poll() is None:
            break
    else:
        pytest.fail(f"moto_server did not start; its log: {log.read_text()[-2000:]}")
    try:
        yield url
    finally:
        stop_process(proc, timeout=10)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch, tmp_path):
    """AWS environment pointing at the moto endpoint, with a fresh bucket; returns
    (endpoint, bucket, boto3 client). No real AWS config or instance metadata is consulted."""
    import uuid

    import boto3

    for var in [v for v in os.environ if v.startswith(("AWS_", "MLFLOW_S3_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = f"mf-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    return s3_endpoint, bucket, client


# -- fixtures several modules share ---------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops (decode steps, toy models): extra intra-op threads only add sync cost, badly so
    on a loaded 2-core box. A module opts in with pytest.mark.usefixtures("one_thread"); the
    setting is restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def wide_consoles(monkeypatch):
    """The CLI's consoles 250 columns wide (no wrapping in asserted output) and no retry waits."""
    from rich.console import Console

    from moonforge.flows import cli, lifecycle

    monkeypatch.setattr(cli, "console", Console(width=250, force_terminal=False))
    monkeypatch.setattr(cli, "err_console", Console(width=250, stderr=True, force_terminal=False))
    monkeypatch.setattr(lifecycle, "RETRY_DELAYS", [0.0, 0.0])


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> Path:
    """A copy of the package that every child process of a module runs (edits to the checkout
    while the tests run do not reach it)."""
    from frozen_code import package_copy

    return package_copy(tmp_path_factory.mktemp("code"))


# -- order: the longest modules first, so two xdist workers end together -------------------------

_LONGEST_FIRST = (
    "test_lifecycle_tiny.py",  # one module-long chain (~12 min on one thread): a worker's whole share
    "test_cluster_slurm.py",  # needs no built dataset: runs while the lifecycle's are being built
    "test_interop_walkthrough.py",
    "test_resume_crash.py",
)


def pytest_collection_modifyitems(config, items):
    """`make test` hands out whole modules (--dist loadfile) in collection order: the long ones go
    first so the short ones fill in around them (each module keeps its own order)."""
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

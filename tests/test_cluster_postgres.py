"""The production servers on PostgreSQL: `moonforge server up --prefect-db URL --mlflow-db URL`.

A throwaway PostgreSQL cluster (Debian's postgresql package: `initdb` + `postgres` as the
`postgres` user, data in a temp dir, TCP on 127.0.0.1:<free port> with password auth) holds a
`prefect` and an `mlflow` database. The servers start on it (each migrates its empty database on
first use), the mini recipe runs through both (tests/fake_stage_site's stages: the point is the
servers, not training), `moonforge promote` moves the champion alias, and the test reads the
flow runs, the MLflow runs and the model version straight from Postgres.
Bad input: Postgres unreachable, a wrong password: `server up` refuses before starting anything,
naming the URL with the password masked.
Wall time: about 75 s on 2 cores.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port, mini_recipe, stop_process

BIN = Path(sys.executable).parent
MOONFORGE = str(BIN / "moonforge")
FAKE_SITE = str(REPO / "tests" / "fake_stage_site")
SECRET = "Pw-n0t-in-logs"
pytestmark = pytest.mark.timeout(600)


def pg_bin_or_skip() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    exe = Path(found[-1]) if found else (Path(shutil.which("initdb")) if shutil.which("initdb") else None)
    why = None
    if exe is None:
        why = "no PostgreSQL server binaries (initdb)"
    elif os.geteuid() != 0:
        why = "not root (the cluster runs as the postgres user via runuser)"
    else:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            why = "no postgres user"
    if why:
        pytest.skip(
            f"no local PostgreSQL: {why} (issue 13, Postgres test; skip expires "
            "2026-12-31): install Debian's postgresql with `make postgres` as root "
            "(`make test` does this when it runs as root with apt)"
        )
    return exe.parent


def _as_postgres(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, text=True, **kw
    )


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster of its own on 127.0.0.1 with roles and databases prefect + mlflow;
    yields (port, superuser connect function)."""
    pg = pg_bin_or_skip()
    d = Path(tempfile.mkdtemp(prefix="mf-pg-"))  # /tmp: the postgres user must reach it
    shutil.chown(d, "postgres", "postgres")
    (d / "pw").write_text(SECRET + "\n")
    shutil.chown(d / "pw", "postgres", "postgres")
    _as_postgres(
        str(pg / "initdb"),
        "-D",
        str(d / "data"),
        "-U",
        "postgres",
        "-E",
        "UTF8",
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        f"--pwfile={d / 'pw'}",
        "--no-sync",
    )
    port = free_port()
    log = (d / "postgres.log").open("wb")
    proc = subprocess.Popen(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            str(pg / "postgres"),
            "-D",
            str(d / "data"),
            "-p",
            str(port),
            "-k",
            str(d),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    import psycopg2

    def connect(db: str = "postgres", user: str = "postgres"):
        return psycopg2.connect(
            host="127.0.0.1", port=port, user=user, password=SECRET, dbname=db, connect_timeout=5
        )

    try:
        deadline = time.time() + 60
        while True:
            try:
                conn = connect()
                break
            except psycopg2.OperationalError:
                assert proc.poll() is None and time.time() < deadline, (d / "postgres.log").read_text()[
                    -2000:
                ]
                time.sleep(0.2)
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in ("prefect", "mlflow"):
                cur.execute(f"CREATE ROLE {name} LOGIN PASSWORD %s", (SECRET,))
                cur.execute(f"CREATE DATABASE {name} OWNER {name}")
        conn.close()
        yield port, connect
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # postgres: fast shutdown (clients disconnected)
        stop_process(proc, group=True)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def _url(name: str, port: int, password: str = SECRET) -> str:
    return f"postgresql://{name}:{password}@127.0.0.1:{port}/{name}"


def _cli(project: Path, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MOONFORGE_"))}
    return subprocess.run(
        [MOONFORGE, *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            **base,
            "PREFECT_HOME": str(project / ".client-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "COLUMNS": "200",
            **env,
        },
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory, _dvc_template) -> Path:
    proj = tmp_path_factory.mktemp("pg") / "proj"
    shutil.copytree(_dvc_template, proj, symlinks=True)
    shutil.copytree(REPO / "recipes", proj / "recipes")
    (proj / "recipes" / "mini.yaml").write_text(yaml.safe_dump(mini_recipe(), sort_keys=False))
    return proj


@pytest.fixture(scope="module")
def servers(project, postgres):
    port, _ = postgres
    res = _cli(
        project,
        "server",
        "up",
        "--prefect-port",
        str(free_port()),
        "--mlflow-port",
        str(free_port()),
        "--prefect-db",
        _url("prefect", port),
        "--mlflow-db",
        _url("mlflow", port),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    try:
        yield res.stdout
    finally:
        res = _cli(project, "server", "down", timeout=60)
        assert res.returncode == 0 and "stopped prefect" in res.stdout, res.stdout + res.stderr


def _rows(connect, db: str, sql: str) -> list[tuple]:
    conn = connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def test_bad_database_urls_refuse_to_start_naming_the_url_not_the_password(postgres, tmp_path):
    port, _ = postgres
    dead = free_port()
    for args, msg in [
        (
            ["--prefect-db", _url("prefect", dead)],
            f"prefect: cannot use its database postgresql+asyncpg://prefect:***@127.0.0.1:{dead}/prefect: "
            f'connection to server at "127.0.0.1", port {dead} failed: Connection refused',
        ),
        (
            ["--mlflow-db", _url("mlflow", port, "wrong-" + SECRET)],
            f"mlflow: cannot use its database postgresql+psycopg2://mlflow:***@127.0.0.1:{port}/mlflow: "
            f'connection to server at "127.0.0.1", port {port} failed: FATAL: password '
            'authentication failed for user "mlflow"',
        ),
        (["--mlflow-db", "mysql://mlflow:x@db/mlflow"], "use a PostgreSQL URL"),
    ]:
        res = _cli(
            tmp_path,
            "server",
            "up",
            "--prefect-port",
            str(free_port()),
            "--mlflow-port",
            str(free_port()),
            *args,
        )
        err = " ".join(res.stderr.split())
        assert res.returncode == 1, res.stdout + res.stderr
        assert msg in err, err
        assert SECRET not in res.stdout + res.stderr
        assert not (tmp_path / ".moonforge" / "servers.json").exists()
        assert not (tmp_path / ".moonforge" / "server-logs").exists()  # nothing was started


def test_a_stage_runs_and_promotes_through_servers_on_postgres(project, postgres, servers):
    port, connect = postgres
    assert SECRET not in servers
    status = _cli(project, "server", "status")
    assert f"database postgresql+asyncpg://prefect:***@127.0.0.1:{port}/prefect" in status.stdout
    assert f"database postgresql+psycopg2://mlflow:***@127.0.0.1:{port}/mlflow" in status.stdout
    state = (project / ".moonforge" / "servers.json").read_text()
    assert SECRET not in state and json.loads(state)["services"][1]["db"].endswith("/mlflow")

    fake = {"PYTHONPATH": FAKE_SITE, "MOONFORGE_FAKE_STAGES": "1"}
    run = _cli(project, "run", "recipes/mini.yaml", **fake)  # finds the servers via servers.json
    assert run.returncode == 0, run.stdout + run.stderr
    promoted = _cli(project, "promote", "align@1", "--recipe", "recipes/mini.yaml")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert "promoted" in promoted.stdout and "mini@champion" in promoted.stdout

    # Prefect's database: the lifecycle flow run and a task run per stage
    flows = _rows(
        connect, "prefect", "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id"
    )
    assert ("lifecycle", "COMPLETED") in flows
    tasks = {
        n for (n,) in _rows(connect, "prefect", "SELECT name FROM task_run WHERE state_type = 'COMPLETED'")
    }
    assert {"lm_pretrain", "vit_pretrain", "align"} <= tasks
    # MLflow's: the stage runs, finished, and the model version the alias points at
    runs = _rows(
        connect,
        "mlflow",
        "SELECT t.value, r.status FROM runs r JOIN tags t ON "
        "t.run_uuid = r.run_uuid WHERE t.key = 'moonforge.stage'",
    )
    assert {("lm_pretrain", "FINISHED"), ("vit_pretrain", "FINISHED"), ("align", "FINISHED")} <= set(runs)
    aliases = _rows(
        connect,
        "mlflow",
        "SELECT a.alias, v.version, v.run_id FROM "
        "registered_model_aliases a JOIN model_versions v ON "
        "v.name = a.name AND v.version = a.version WHERE a.name = 'mini'",
    )
    assert {a for a, _, _ in aliases} >= {"champion", "candidate"}
    champion = next(r for r in aliases if r[0] == "champion")
    assert (champion[2],) in _rows(connect, "mlflow", "SELECT run_uuid FROM runs")

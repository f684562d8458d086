"""`moonforge server up|down|status`: a local Prefect server and MLflow tracking server.

Both listen on 127.0.0.1 and by default keep their state in the project's `.moonforge/`, the same
files the embedded defaults use, so the UIs show every run made before the servers started:
- Prefect: `prefect server start` with PREFECT_HOME=.moonforge/prefect (its SQLite DB),
- MLflow:  `mlflow server` on sqlite:///.moonforge/mlflow.db with artifacts served from
  .moonforge/mlartifacts.
The production setup puts both databases on PostgreSQL: `up(..., db={"prefect": URL, "mlflow":
URL})` (`moonforge server up --prefect-db URL --mlflow-db URL`), URLs like
postgresql://USER:PASSWORD@HOST:PORT/DB. Before starting anything, `up` connects to each
(psycopg2) and refuses with the URL, password masked, and the reason when it cannot; the servers
create or migrate their schemas on first use (Prefect at start, MLflow's `mlflow db upgrade` for
an existing database). Passwords reach the servers through their environment, never argv.
`up` records pids, ports and URLs in `.moonforge/servers.json`; every later CLI command reads
it (`apply_state`) and points PREFECT_API_URL / MLFLOW_TRACKING_URI at the live servers unless
those are set explicitly. Without the file (or with dead servers) the embedded defaults apply.

The servers run detached in their own process groups (logs in .moonforge/server-logs/), so they
outlive the `up` command; `down` stops exactly the groups it recorded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

HOST = "127.0.0.1"
STATE_FILE = Path(".moonforge") / "servers.json"
LOG_DIR = Path(".moonforge") / "server-logs"
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000}
FLAGS = {"prefect": "--prefect-port", "mlflow": "--mlflow-port"}


class ServerError(RuntimeError):
    """A server could not be started or stopped; the message names the server and the fix."""


@dataclass(frozen=True)
class Service:
    name: str
    pid: int
    port: int
    url: str
    """Where the UI is; the API is `api_url`."""
    api_url: str
    log: str
    marker: str
    """A word of the command line, to tell our process from a recycled pid."""
    db: str = ""
    """Its database, password masked (empty: the project's SQLite file)."""


def state_path(project: str | Path) -> Path:
    return Path(project) / STATE_FILE


def read_state(project: str | Path) -> list[Service]:
    p = state_path(project)
    if not p.is_file():
        return []
    try:
        return [Service(**s) for s in json.loads(p.read_text())["services"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ServerError(
            f"{p} is unreadable ({e}); delete it (after stopping any server it "
            "started) and run `moonforge server up` again"
        ) from None


def is_alive(s: Service) -> bool:
    """The recorded process still runs our command (a zombie or a recycled pid does not)."""
    try:
        cmdline = Path(f"/proc/{s.pid}/cmdline").read_bytes()
    except OSError:
        if not Path("/proc/self").exists():  # no procfs (macOS): fall back to signal 0
            try:
                os.kill(s.pid, 0)
                return True
            except OSError:
                return False
        return False
    if not cmdline:  # a zombie, or a process in the middle of exec (mlflow re-execs uvicorn)
        try:
            state = Path(f"/proc/{s.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"
    return s.marker.encode() in cmdline


def healthy(s: Service, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(s.api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def apply_state(project: str | Path) -> dict[str, str]:
    """Point this process's Prefect and MLflow clients at live servers from `up` (explicit env
    vars win). Cheap: no imports, no HTTP. Returns the variables it set."""
    try:
        live = [s for s in read_state(project) if is_alive(s)]
    except ServerError:
        return {}
    wanted = {"prefect": "PREFECT_API_URL", "mlflow": "MLFLOW_TRACKING_URI"}
    done = {}
    for s in live:
        var = wanted[s.name]
        if var not in os.environ:
            os.environ[var] = done[var] = s.api_url
    return done


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "taken"
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


_PG = ("postgresql", "postgres")


def database_url(name: str, url: str) -> str:
    """The URL in the driver form each server takes: postgresql+asyncpg for Prefect,
    postgresql+psycopg2 for MLflow; sqlite URLs pass through. ServerError on anything else."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(url)
    except ArgumentError:
        raise ServerError(
            f"{name}: {url!r} is not a database URL; use postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    backend = u.drivername.split("+")[0]
    if backend in _PG:
        if not u.database or not u.host:
            raise ServerError(
                f"{name}: {masked(url)} names no host or database; use "
                "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
            )
        # SQLAlchemy 2.1's plain postgresql:// means psycopg 3; MLflow gets the pinned psycopg2
        u = u.set(drivername="postgresql+asyncpg" if name == "prefect" else "postgresql+psycopg2")
    elif backend != "sqlite":
        raise ServerError(
            f"{name}: {masked(url)}: use a PostgreSQL URL "
            "(postgresql://USER:PASSWORD@HOST:PORT/DATABASE) or sqlite:///PATH"
        )
    elif name == "prefect":
        u = u.set(drivername="sqlite+aiosqlite")
    return u.render_as_string(hide_password=False)


def masked(url: str) -> str:
    """`url` with its password replaced by ***, for messages and the state file."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: show only the scheme
        return url.split("://", 1)[0] + "://..."


def check_database(name: str, url: str, timeout: int = 10) -> None:
    """Connect once to a PostgreSQL URL; ServerError naming the masked URL and the reason (the
    password never appears). For MLflow, an existing schema is upgraded (a no-op when current)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.drivername.split("+")[0] not in _PG:
        return
    import psycopg2

    try:
        conn = psycopg2.connect(
            host=u.host,
            port=u.port or 5432,
            user=u.username,
            password=u.password,
            dbname=u.database,
            connect_timeout=timeout,
        )
    except psycopg2.Error as e:
        reason = " ".join(str(e).split())
        if u.password:
            reason = reason.replace(u.password, "***")
        raise ServerError(
            f"{name}: cannot use its database {masked(url)}: {reason}. Check that PostgreSQL runs "
            f"at {u.host}:{u.port or 5432} and that role {u.username!r} may log in to database "
            f"{u.database!r} with this password, then rerun `moonforge server up`"
        ) from None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL")
            existing = cur.fetchone()[0]
    finally:
        conn.close()
    if name == "mlflow" and existing:  # a fresh database: `mlflow server` creates the schema
        res = subprocess.run(
            [sys.executable, "-m", "mlflow", "db", "upgrade", url],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if res.returncode != 0:
            tail = (res.stderr or res.stdout)[-1500:]
            tail = tail.replace(u.password, "***") if u.password else tail
            raise ServerError(f"mlflow: `mlflow db upgrade` failed on {masked(url)}:\n{tail}")


def _command(
    name: str, port: int, project: Path, db: str | None = None
) -> tuple[list[str], dict[str, str], str, str]:
    """argv, extra env, API URL, UI URL for one server (`db`: its database URL, default the
    project's SQLite file)."""
    base = f"http://{HOST}:{port}"
    mf = project / ".moonforge"
    if name == "prefect":
        env = {
            "PREFECT_HOME": str(mf / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": f"{base}/api",
        }
        if db:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = db
        return (
            [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
            env,
            f"{base}/api",
            base,
        )
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--serve-artifacts",
        "--artifacts-destination",
        str(mf / "mlartifacts"),
    ]
    env = {"MLFLOW_BACKEND_STORE_URI": db or f"sqlite:///{mf / 'mlflow.db'}"}
    return argv, env, base, base


def up(
    project: str | Path,
    ports: dict[str, int] | None = None,
    timeout: float = 180.0,
    db: dict[str, str | None] | None = None,
) -> list[Service]:
    """Start both servers, wait until each answers /health, record them; ServerError if they
    run already, a port is taken, a database (`db`: server name -> URL) cannot be reached, or
    one does not come up (the other is stopped again)."""
    project = Path(project).resolve()
    ports = {**DEFAULT_PORTS, **(ports or {})}
    dbs = {n: database_url(n, u) for n, u in (db or {}).items() if u}
    running = [s for s in read_state(project) if is_alive(s)]
    if running:
        raise ServerError(
            "moonforge servers are already running for this project: "
            + ", ".join(f"{s.name} at {s.url} (pid {s.pid})" for s in running)
            + "; use them, or stop them first with `moonforge server down`"
        )
    for name, port in ports.items():
        if not port_free(port):
            raise ServerError(
                f"{name}: port {port} on {HOST} is taken by another process; pick a "
                f"free one with `moonforge server up {FLAGS[name]} <port>` or stop "
                "whatever listens there"
            )
    for name, url in dbs.items():
        check_database(name, url)
    (project / ".moonforge" / "prefect").mkdir(parents=True, exist_ok=True)
    (project / LOG_DIR).mkdir(parents=True, exist_ok=True)
    started: list[Service] = []
    for name, port in ports.items():
        argv, extra, api, ui = _command(name, port, project, dbs.get(name))
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in (
                "PREFECT_API_URL",
                "MLFLOW_TRACKING_URI",
                "PREFECT_API_DATABASE_CONNECTION_URL",
                "MLFLOW_BACKEND_STORE_URI",
            )
        }
        log = project / LOG_DIR / f"{name}.log"
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                argv,
                cwd=project,
                env={**env, **extra},
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # own group: outlives `up`, `down` kills it
        started.append(
            Service(
                name, proc.pid, port, ui, api, str(log), "server", masked(dbs[name]) if name in dbs else ""
            )
        )
    try:
        _wait_healthy(started, timeout)
    except ServerError:
        _stop(started)
        raise
    state_path(project).write_text(json.dumps({"services": [asdict(s) for s in started]}, indent=2))
    return started


def _wait_healthy(services: list[Service], timeout: float) -> None:
    deadline = time.time() + timeout
    waiting = list(services)
    while waiting:
        for s in list(waiting):
            if healthy(s):
                waiting.remove(s)
            elif not is_alive(s):
                raise ServerError(
                    f"{s.name} server exited while starting; the end of {s.log}:\n" + _tail(Path(s.log))
                )
        if waiting and time.time() > deadline:
            s = waiting[0]
            raise ServerError(
                f"{s.name} server did not answer {s.api_url}/health within "
                f"{timeout:.0f}s; the end of {s.log}:\n{_tail(Path(s.log))}"
            )
        time.sleep(0.5)


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _stop(services: list[Service], grace: float = 20.0) -> list[Service]:
    """SIGTERM each live server's process group, SIGKILL after `grace` s; returns those stopped."""
    live = [s for s in services if is_alive(s)]
    for s in live:
        try:
            os.killpg(s.pid, signal.SIGTERM)  # the group `up` created (pgid == pid)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while any(is_alive(s) for s in live) and time.time() < deadline:
        time.sleep(0.2)
    for s in live:
        if is_alive(s):
            try:
                os.killpg(s.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return live


def down(project: str | Path) -> list[Service]:
    """Stop the servers `up` recorded for this project and forget them; returns those stopped."""
    services = read_state(project)
    stopped = _stop(services)
    state_path(project).unlink(missing_ok=True)
    return stopped


def status(project: str | Path) -> list[tuple[Service, str]]:
    """Each recorded server with its state: up | not answering | stopped."""
    out = []
    for s in read_state(project):
        state = ("up" if healthy(s) else "not answering") if is_alive(s) else "stopped"
        out.append((s, state))
    return out

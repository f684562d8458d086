"""CLI commands for running moonforge as a service: deploy, serve, server up|down|status.

Registered on `moonforge.flows.cli.app` when that module is imported (it imports this one last).
The app callback points every command at the servers `moonforge server up` started for the
project (via .moonforge/servers.json) before any command imports prefect or mlflow.
"""

from __future__ import annotations

import os

import typer
from rich.markup import escape
from rich.table import Table

from moonforge.flows.cli import (
    DEFAULT_RECIPE,
    _errors,
    _load,
    _project,
    _recipe_path,
    app,
    console,
    err_console,
)

server_app = typer.Typer(
    help="Local Prefect + MLflow servers with their UIs (127.0.0.1).", no_args_is_help=True
)
app.add_typer(server_app, name="server")


@app.callback()
def _use_local_servers() -> None:
    from moonforge.flows.servers import apply_state

    apply_state(_project())


def _require_prefect_server(what: str) -> str:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        err_console.print(
            f"[bold red]no Prefect server:[/bold red] {what} registers deployments "
            "with a Prefect server, and the embedded default has none; start one "
            "with `moonforge server up` (or set PREFECT_API_URL)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None
    return url


def _build(recipe: str, cron: str | None, timezone: str, pool: str | None):
    from moonforge.flows.deployments import build_deployments

    path = _recipe_path(recipe)
    rec = _load(path, [])
    rel = os.path.relpath(path, _project())
    # runs started by a worker track where this CLI tracks (e.g. the `server up` MLflow)
    env = {
        k: os.environ[k]
        for k in ("MLFLOW_TRACKING_URI", "MOONFORGE_STORE", "MOONFORGE_MLFLOW_ARTIFACT_ROOT")
        if k in os.environ
    }
    return rec, build_deployments(rec, rel, _project(), cron=cron, timezone=timezone, env=env, pool=pool)


@app.command()
def deploy(
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", help="Recipe YAML."),
    pool: str = typer.Option(
        "moonforge-process", "--pool", help="Work pool (created as a process pool if missing)."
    ),
    cron: str | None = typer.Option(None, "--cron", help='Schedule the lifecycle, e.g. "0 3 * * *".'),
    timezone: str = typer.Option("UTC", "--timezone", help="Time zone of --cron."),
) -> None:
    """Register the lifecycle and every stage rerun as Prefect deployments on a work pool."""
    url = _require_prefect_server("moonforge deploy")
    with _errors():
        from moonforge.flows.deployments import apply_deployments, ensure_work_pool

        rec, deps = _build(recipe, cron, timezone, pool)
        kind = ensure_work_pool(pool)
        ids = apply_deployments(deps)
        table = Table(title=f"Prefect deployments for recipe {rec.name} (pool {pool}, {kind})")
        for col in ("deployment", "schedule", "id"):
            table.add_column(col)
        for d, i in zip(deps, ids):
            sched = ", ".join(f"{s.schedule.cron} {s.schedule.timezone}" for s in d.schedules or [])
            table.add_row(f"{d.flow_name}/{d.name}", sched or "-", i)
        console.print(table)
        console.print(
            f"UI: {url.removesuffix('/api')}/deployments\nRuns start when a worker "
            f"polls the pool: prefect worker start --pool {pool}",
            highlight=False,
        )


@app.command()
def serve(
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", help="Recipe YAML."),
    cron: str | None = typer.Option(None, "--cron", help="Schedule the lifecycle."),
    timezone: str = typer.Option("UTC", "--timezone", help="Time zone of --cron."),
    limit: int = typer.Option(1, "--limit", help="Flow runs at a time (training is heavy)."),
) -> None:
    """Serve the lifecycle and every stage rerun from this process (no work pool) until Ctrl-C."""
    _require_prefect_server("moonforge serve")
    with _errors():
        from prefect import serve as prefect_serve

        _, deps = _build(recipe, cron, timezone, None)
        prefect_serve(*deps, limit=limit)


@server_app.command("up")
def server_up(
    prefect_port: int = typer.Option(4200, "--prefect-port"),
    mlflow_port: int = typer.Option(5000, "--mlflow-port"),
    prefect_db: str | None = typer.Option(
        None,
        "--prefect-db",
        envvar="MOONFORGE_PREFECT_DB",
        show_envvar=True,
        help="Prefect's database, postgresql://USER:PASSWORD@HOST:PORT/DB "
        "(default: SQLite in .moonforge/prefect).",
    ),
    mlflow_db: str | None = typer.Option(
        None,
        "--mlflow-db",
        envvar="MOONFORGE_MLFLOW_DB",
        show_envvar=True,
        help="MLflow's backend store, postgresql://USER:PASSWORD@HOST:PORT/DB "
        "(default: .moonforge/mlflow.db).",
    ),
    timeout: float = typer.Option(180.0, "--timeout", help="Seconds to wait for each."),
) -> None:
    """Start the Prefect and MLflow servers for this project and point the CLI at them."""
    from moonforge.flows import servers

    try:
        started = servers.up(
            _project(),
            {"prefect": prefect_port, "mlflow": mlflow_port},
            timeout,
            db={"prefect": prefect_db, "mlflow": mlflow_db},
        )
    except servers.ServerError as e:
        err_console.print(
            f"[bold red]server error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(1) from None
    _print_status([(s, "up") for s in started])
    console.print(
        "moonforge commands in this project now use these servers; `moonforge server down` stops them.",
        highlight=False,
    )


@server_app.command("down")
def server_down() -> None:
    """Stop the servers `moonforge server up` started for this project."""
    from moonforge.flows import servers

    with _errors():
        stopped = servers.down(_project())
    if not stopped:
        console.print(
            "no moonforge servers were running for this project; the CLI uses the embedded defaults",
            highlight=False,
        )
    for s in stopped:
        console.print(f"stopped {s.name} (pid {s.pid}, {s.url})", highlight=False)


@server_app.command("status")
def server_status() -> None:
    """Which servers run for this project, where their UIs are, and what the CLI uses."""
    from moonforge.flows import servers

    with _errors():
        rows = servers.status(_project())
    if not rows:
        console.print(
            "no moonforge servers for this project (start them with `moonforge server "
            "up`); the CLI uses the embedded defaults",
            highlight=False,
        )
        return
    _print_status(rows)


def _print_status(rows) -> None:
    table = Table(title="moonforge servers (127.0.0.1)")
    for col in ("server", "state", "UI", "pid"):
        table.add_column(col, no_wrap=True)
    colors = {"up": "green", "not answering": "yellow", "stopped": "red"}
    for s, state in rows:
        table.add_row(s.name, f"[{colors[state]}]{state}[/]", s.url, str(s.pid))
    console.print(table)
    for s, _ in rows:
        db = f", database {s.db}" if s.db else ""
        console.print(f"{s.name}: API {s.api_url}{db}, log {s.log}", highlight=False, soft_wrap=True)

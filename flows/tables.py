"""The CLI's tables in three formats (`--format table|json|markdown`).

table: a rich table that stays readable at 80 columns (a pipe, a CI log): when the full table is
wider than the console it drops the columns marked `wide_only`, and cells wrap (folded, never cut
to "..."); multi-line cells put one item (a metric, a reason) on each line.
json: the command's records as JSON, raw values (numbers stay numbers), for scripts.
markdown: a pipe table (line breaks as <br>), for notes, issues and PRs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

import typer
from rich import box
from rich.console import Console, JustifyMethod
from rich.table import Table

FORMATS = ("table", "json", "markdown")
FORMAT_HELP = "Output: table (readable at 80 columns), json or markdown."


def check_format(value: str) -> str:
    """Typer callback: only the known formats."""
    if value not in FORMATS:
        raise typer.BadParameter(f"{value!r}: use one of {', '.join(FORMATS)}")
    return value


def format_option() -> Any:
    return typer.Option("table", "--format", help=FORMAT_HELP, callback=check_format)


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    justify: JustifyMethod = "left"
    wide_only: bool = False
    """Dropped when the table would not fit the console."""
    no_wrap: bool = False
    """Never folded (names): other columns give way."""


def rich_table(
    rows: Sequence[Mapping[str, str]], cols: Sequence[Column], title: str | None, width: int
) -> Table:
    """The rich table, narrowed to fit `width` columns if needed."""

    def build(use: Sequence[Column]) -> Table:
        multiline = any("\n" in str(r.get(c.key, "")) for r in rows for c in use)
        t = Table(
            title=title,
            box=box.SIMPLE_HEAD,
            title_justify="left",
            pad_edge=False,
            expand=False,
            show_lines=multiline,
        )  # a rule between rows of several lines
        for c in use:
            t.add_column(c.header, justify=c.justify, overflow="fold", no_wrap=c.no_wrap)
        for r in rows:
            t.add_row(*[str(r.get(c.key, "")) for c in use])
        return t

    table = build(cols)
    if any(c.wide_only for c in cols) and natural_width(table) > width:
        table = build([c for c in cols if not c.wide_only])
    return table


def natural_width(table: Table) -> int:
    """Columns the table takes when nothing limits it."""
    probe = Console(width=10_000, file=cast(IO[str], _Null()), color_system=None)  # rich only writes
    return probe.measure(table).maximum


class _Null:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def markdown_table(
    rows: Sequence[Mapping[str, str]], cols: Sequence[Column], title: str | None = None
) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", "<br>")

    out = [f"**{title}**", ""] if title else []
    out.append("| " + " | ".join(c.header for c in cols) + " |")
    out.append("|" + "|".join("---:" if c.justify == "right" else "---" for c in cols) + "|")
    out += ["| " + " | ".join(cell(r.get(c.key, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def emit(
    console: Console,
    fmt: str,
    rows: Sequence[Mapping[str, str]],
    cols: Sequence[Column],
    data: Any,
    title: str | None = None,
    notes: Sequence[str] = (),
) -> None:
    """Print one table command's output: `rows` (display strings) as a table or markdown with
    `notes` under it, or `data` (raw records) as JSON."""
    if fmt == "json":
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    if fmt == "markdown":
        typer.echo(markdown_table(rows, cols, title))
        for n in notes:
            typer.echo(f"\n{n}")
        return
    console.print(rich_table(rows, cols, title, console.width))
    for n in notes:
        console.print(n, highlight=False, soft_wrap=False, markup=False)


def metric_lines(metrics: Mapping[str, float], keys: Sequence[str], before: bool = False) -> str:
    """One `name=value` per line, names in full; with `before`, `name=upstream -> value` where the
    metrics hold a different `name_before` (the same eval of the model the stage started from)."""

    def line(k: str) -> str:
        was = metrics.get(f"{k}_before") if before else None
        if was is None or f"{was:.4g}" == f"{metrics[k]:.4g}":
            return f"{k}={metrics[k]:.4g}"
        return f"{k}={was:.4g} -> {metrics[k]:.4g}"

    return "\n".join(line(k) for k in keys)

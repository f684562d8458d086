"""Per-stage Prefect artifacts on the flow-run page: a metrics table and the lineage.

Called from the stage task, so they appear under the run in the Prefect UI (Artifacts tab) and
under a stable key per recipe and stage (`<recipe>-<stage>-metrics`, `<recipe>-<stage>-lineage`),
whose history the UI's Artifacts page lists across runs. The lineage is read back from the
committed `lineage.json` (the same record `moonforge lineage` walks), never rebuilt here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("moonforge.flows")


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-") or "x"


def metrics_rows(outcome: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"metric": k, "value": round(float(v), 6)} for k, v in sorted(outcome["metrics"].items())]


def lineage_markdown(outcome: Mapping[str, Any], chain: list[dict]) -> str:
    """The artifact's lineage back to its data as a markdown table plus its mermaid source."""
    from moonforge.registry.lineage import render_mermaid

    rows = []
    for rec in chain:
        if rec.get("missing"):
            rows.append(
                f"| {rec.get('ref') or rec['stage']} | `{rec['fingerprint'][:12]}` | "
                "missing from the store | | | |"
            )
            continue
        data = ", ".join(
            f"{d['name']} (md5 `{str(d.get('digest'))[:10]}`)" for d in rec.get("datasets") or []
        )
        git = rec.get("git") or {}
        commit = (
            f"`{str(git.get('commit'))[:8]}`{'+dirty' if git.get('dirty') else ''}"
            if git.get("commit")
            else "-"
        )
        rows.append(
            f"| {rec.get('ref')} | `{rec['fingerprint'][:12]}` | {data or '-'} | {commit} | "
            f"`{rec.get('mlflow_run_id') or '-'}` | `{rec.get('prefect_flow_run_id') or '-'}` |"
        )
    hit = " (cache hit: an existing artifact was reused)" if outcome["cache_hit"] else ""
    return (
        f"### {outcome['stage']} -> `{outcome['ref']}`{hit}\n\n"
        f"Artifact: `{outcome['path']}`  \nMLflow run: `{outcome.get('mlflow_run_id') or '-'}`  \n"
        f"Walk it yourself: `moonforge lineage {outcome['ref']}`\n\n"
        "| artifact | fingerprint | data (DVC) | git | MLflow run | Prefect flow run |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + f"\n\n```mermaid\n{render_mermaid(chain)}\n```\n"
    )


def publish_stage(recipe_name: str, outcome: Mapping[str, Any], project: str | Path) -> None:
    """Create the stage's metrics-table and lineage artifacts in the current Prefect run.
    A lineage that cannot be read is logged and skipped: the stage's artifact is committed
    already, and the summary must not fail it."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from moonforge.registry.lineage import walk
    from moonforge.registry.store import open_store

    stage, ref = outcome["stage"], outcome["ref"]
    create_table_artifact(
        key=artifact_key(recipe_name, stage, "metrics"),
        table=metrics_rows(outcome),
        description=f"{stage} -> {ref}: metrics (fingerprint {outcome['fingerprint'][:12]}, "
        f"cache hit {outcome['cache_hit']}, wall {outcome['wall_s']:.1f}s)",
    )
    try:
        chain = walk(open_store(project), ref, project)
    except Exception as e:  # noqa: BLE001 - reported, not raised (see docstring)
        log.warning("lineage of %s not published: %s: %s", ref, type(e).__name__, e)
        return
    create_markdown_artifact(
        key=artifact_key(recipe_name, stage, "lineage"),
        markdown=lineage_markdown(outcome, chain),
        description=f"{stage} -> {ref}: lineage back to the data",
    )

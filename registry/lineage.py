"""Lineage records (`lineage.json` beside every artifact) and walking them back to the data.

A record holds everything needed to say where an artifact came from: fingerprint, stage, kind,
version, resolved stage + model config, upstream ref and fingerprint, datasets with their DVC
md5, git commit (+ dirty flag), package versions, device / world size, the scheduler job it ran
in (Slurm job id, Kubernetes pod), MLflow run id, Prefect flow-run id, metrics summary and
timestamps. `walk` follows upstream fingerprints through the
store; `render_tree` / `render_mermaid` / `render_json` present the chain.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moonforge.registry.errors import ArtifactNotFound
from moonforge.registry.store import ArtifactInfo, ArtifactStore

PACKAGES = ("torch", "prefect", "mlflow", "dvc", "moonforge")


@functools.cache
def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "moonforge":
                from moonforge import __version__

                out[name] = __version__
            else:
                out[name] = None
    return out


def scheduler_info(env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The batch job this process runs in: Slurm (job id, cluster, partition, nodes) or a
    Kubernetes pod; None on a plain machine."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        keys = {
            "job_id": "SLURM_JOB_ID",
            "cluster": "SLURM_CLUSTER_NAME",
            "partition": "SLURM_JOB_PARTITION",
            "nodes": "SLURM_JOB_NODELIST",
            "num_nodes": "SLURM_JOB_NUM_NODES",
        }
        return {"kind": "slurm", **{k: env[v] for k, v in keys.items() if env.get(v)}}
    if env.get("KUBERNETES_SERVICE_HOST"):
        return {
            "kind": "kubernetes",
            "pod": env.get("HOSTNAME", "?"),
            **({"index": env["JOB_COMPLETION_INDEX"]} if env.get("JOB_COMPLETION_INDEX") else {}),
        }
    return None


def git_info(project: str | Path) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} for the project checkout."""

    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", "-C", str(project), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def dataset_counts(name: str, metrics: Mapping[str, float]) -> dict[str, Any]:
    """What a stage recorded about a declared dataset it read (metrics data/<name>/...): records,
    records used in training, held out, skipped (and why); {} for the generated datasets."""
    prefix = f"data/{name}/"
    mine = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    if not mine:
        return {}
    out: dict[str, Any] = {
        k: int(mine[k]) for k in ("records", "records_used", "heldout", "skipped") if k in mine
    }
    out["skipped_by_reason"] = {
        k.split("/", 1)[1]: int(v)
        for k, v in sorted(mine.items())
        if k.startswith(("skipped/", "skipped_in_training/"))
    }
    return out


def build_lineage(
    *,
    stage: str,
    kind: str,
    version: int,
    fingerprint: str,
    config: Mapping[str, Any],
    model: Mapping[str, Any],
    upstream: Mapping[str, Any] | None,
    datasets: list[Mapping[str, Any]],
    project: str | Path,
    recipe: Mapping[str, Any],
    metrics: Mapping[str, float],
    started: float,
    ended: float,
    device: str = "cpu",
    world_size: int = 1,
    mlflow_run_id: str | None = None,
    prefect_flow_run_id: str | None = None,
    code_version: str | None = None,
    init: Mapping[str, Any] | None = None,
) -> dict:
    """The lineage record of one committed artifact (JSON-able)."""
    return {
        "init": dict(init or {}),
        "fingerprint": fingerprint,
        "stage": stage,
        "kind": kind,
        "version": version,
        "ref": f"{stage}@{version}",
        "config": dict(config),
        "model": dict(model),
        "upstream": dict(upstream) if upstream else None,
        "datasets": [{**dict(d), **dataset_counts(d["name"], metrics)} for d in datasets],
        "recipe": dict(recipe),
        "code_version": code_version,
        "git": git_info(project),
        "packages": package_versions(),
        "device": device,
        "world_size": world_size,
        "scheduler": scheduler_info(),
        "mlflow_run_id": mlflow_run_id,
        "prefect_flow_run_id": prefect_flow_run_id,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "timestamps": {"start": started, "end": ended, "duration_s": round(ended - started, 3)},
    }


def walk(store: ArtifactStore, ref: str | Path, project: str | Path = ".") -> list[dict]:
    """Lineage records from `ref` (any form registry.refs resolves) back to the first stage
    (newest first).

    Each record gets "path" added. Upstreams are found by fingerprint (falling back to the
    recorded path), so the chain survives a store being moved.
    """
    from moonforge.registry.refs import resolve_ref

    info: ArtifactInfo | None = resolve_ref(ref, store, project)
    chain: list[dict] = []
    seen: set[str] = set()
    while info is not None and info.fingerprint not in seen:
        seen.add(info.fingerprint)
        rec = info.lineage() or {
            "stage": info.stage,
            "version": info.version,
            "fingerprint": info.fingerprint,
            "ref": info.ref,
        }
        rec = {**rec, "path": str(info.path)}
        chain.append(rec)
        up = rec.get("upstream")
        if not up:
            break
        info = store.lookup(up["stage"], up["fingerprint"])
        if info is None and up.get("path"):
            try:
                info = store.open_path(Path(up["path"]))
            except ArtifactNotFound:
                info = None
        if info is None:
            chain.append(
                {
                    "stage": up["stage"],
                    "ref": up.get("ref"),
                    "missing": True,
                    "fingerprint": up["fingerprint"],
                }
            )
    return chain


def _metrics_line(rec: Mapping[str, Any], n: int = 3) -> str:
    ms = rec.get("metrics") or {}
    keys = [k for k in ms if k.startswith("eval/")][:n] or list(ms)[:n]
    return ", ".join(f"{k}={ms[k]:.4g}" for k in keys)


def render_tree(chain: list[dict]):
    """A rich Tree: the artifact at the root, each upstream nested inside, datasets as leaves."""
    from rich.tree import Tree

    root: Tree | None = None
    node: Tree | None = None
    for rec in chain:
        if rec.get("missing"):
            label = f"[red]{rec.get('ref') or rec['stage']} (missing from the store)[/red]"
        else:
            git = rec.get("git") or {}
            recipe = rec.get("recipe") or {}
            sched = rec.get("scheduler") or {}
            ids = [
                f"mlflow run {rec['mlflow_run_id']}" if rec.get("mlflow_run_id") else "",
                f"prefect flow run {rec['prefect_flow_run_id']}" if rec.get("prefect_flow_run_id") else "",
                f"slurm job {sched.get('job_id')} on {sched.get('nodes', '?')}"
                if sched.get("kind") == "slurm"
                else "",
            ]
            label = (
                f"[bold]{rec.get('ref')}[/bold]  fp {rec['fingerprint'][:12]}"
                + (
                    f"  git {str(git.get('commit'))[:8]}{'+dirty' if git.get('dirty') else ''}"
                    if git.get("commit")
                    else ""
                )
                + (
                    f"  recipe {recipe.get('name')} ({str(recipe.get('digest'))[:8]})"
                    if recipe.get("name")
                    else ""
                )
                + (f"\n{_metrics_line(rec)}" if rec.get("metrics") else "")
                + "".join(f"\n{i}" for i in ids if i)
            )
        if root is None:
            child = Tree(label)
        else:
            assert node is not None  # set together with root
            child = node.add(label)
        root = root or child
        for d in rec.get("datasets") or []:
            used = (
                f"  used {d['records_used']} of {d.get('records')}, skipped {d.get('skipped', 0)}"
                + "".join(f" {k}:{v}" for k, v in (d.get("skipped_by_reason") or {}).items())
                if "records_used" in d
                else ""
            )
            child.add(
                f"[cyan]data {d['name']}[/cyan]  md5 {str(d.get('digest'))[:12]}  {d.get('path')}{used}"
            )
        for part, i in sorted((rec.get("init") or {}).items()):
            child.add(
                f"[magenta]init {part}[/magenta] <- {i.get('ref')}  fp "
                f"{str(i.get('fingerprint'))[:12]}  {i.get('path')}"
            )
        src = rec.get("source") or {}
        if src.get("path"):
            child.add(f"[magenta]imported[/magenta] {src.get('model_type')} from {src['path']}")
        node = child
    return root if root is not None else Tree("(empty)")


def _node_id(rec: Mapping[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{rec['stage']}_{rec.get('version', 'x')}")


def _mid(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", s)


def render_mermaid(chain: list[dict]) -> str:
    """A mermaid `graph LR`: datasets -> first stage -> ... -> the artifact, with the git commit
    and recipe each stage was built from as dotted inputs; labels carry the MLflow run and
    Prefect flow-run ids."""
    lines = ["graph LR"]
    declared: set[str] = set()

    def node(nid: str, decl: str) -> str:
        if nid not in declared:
            declared.add(nid)
            return decl
        return nid

    for rec in reversed(chain):
        nid = _node_id(rec)
        label = f"{rec.get('ref') or rec['stage']}<br/>fp {rec['fingerprint'][:8]}"
        if rec.get("missing"):
            label += "<br/>missing from the store"
        if rec.get("mlflow_run_id"):
            label += f"<br/>mlflow {rec['mlflow_run_id'][:8]}"
        if rec.get("prefect_flow_run_id"):
            label += f"<br/>prefect {rec['prefect_flow_run_id'][:8]}"
        lines.append(f'  {nid}["{label}"]')
        for d in rec.get("datasets") or []:
            did = _mid(f"data_{d['name']}_{str(d.get('digest'))[:8]}")
            decl = f'{did}[("{d["name"]}<br/>md5 {str(d.get("digest"))[:8]}")]'
            lines.append(f"  {node(did, decl)} --> {nid}")
        for part, i in sorted((rec.get("init") or {}).items()):
            iid = _mid(f"init_{i.get('ref')}")
            decl = f'{iid}[/"{i.get("ref")}<br/>fp {str(i.get("fingerprint"))[:8]}"/]'
            lines.append(f"  {node(iid, decl)} -- init {part} --> {nid}")
        commit = (rec.get("git") or {}).get("commit")
        if commit:
            gid = _mid(f"git_{commit[:8]}")
            dirty = "+dirty" if (rec.get("git") or {}).get("dirty") else ""
            decl = gid + '{{"git ' + commit[:8] + dirty + '"}}'
            lines.append(f"  {node(gid, decl)} -.-> {nid}")
        recipe = rec.get("recipe") or {}
        if recipe.get("name"):
            rid = _mid(f"recipe_{recipe['name']}_{str(recipe.get('digest'))[:8]}")
            decl = f'{rid}[/"recipe {recipe["name"]}<br/>{str(recipe.get("digest"))[:8]}"/]'
            lines.append(f"  {node(rid, decl)} -.-> {nid}")
    for newer, older in zip(chain, chain[1:]):
        lines.append(f"  {_node_id(older)} --> {_node_id(newer)}")
    return "\n".join(lines)


def render_json(chain: list[dict]) -> str:
    return json.dumps(chain, indent=2, sort_keys=True, default=str)

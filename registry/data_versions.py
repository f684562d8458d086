"""Dataset versions from DVC: `dvc.lock` pins every dataset; stages read them by name.

A dataset `<name>` is the output `data/<name>` of the dvc.yaml stage called `<name>`. Its version
is the md5 DVC recorded for that output in dvc.lock. `ensure_datasets` rebuilds (via the real
`dvc` CLI) only when `dvc status` reports a change or the output directory is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable

import yaml

from moonforge.registry.errors import DatasetError
from moonforge.stages.artifacts import DatasetRef

_VERIFIED: dict[str, tuple[tuple, frozenset[str]]] = {}
"""project -> ((dvc.yaml, dvc.lock) mtimes, names already checked up to date this process)."""


def dvc_executable() -> str:
    """The venv's dvc next to this interpreter, else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    if local.exists():
        return str(local)
    found = shutil.which("dvc")
    if not found:
        raise DatasetError("the dvc CLI is not installed; install it with `pip install 'dvc[s3]'`")
    return found


def dvc(project_root: str | Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `dvc <args>` in the project; raise DatasetError with dvc's own message on failure."""
    # dvc.yaml commands call `python`: make it this interpreter's (the venv's), active or not
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([dvc_executable(), *args], cwd=project_root, capture_output=True,
                          text=True, env=env)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise DatasetError(f"`dvc {' '.join(args)}` failed in {project_root}: "
                           + " ".join(msg[-5:]))
    return proc


def _load_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DatasetError(f"cannot read {what} {path}: {e}; fix or regenerate it "
                           "(`moonforge data build`)") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{what} {path} is not a YAML mapping; regenerate it (`moonforge data build`)")
    return data


def _dvc_stages(root: Path) -> dict:
    path = root / "dvc.yaml"
    if not path.exists():
        raise DatasetError(f"no dvc.yaml in {root}: the data pipeline is missing; datasets are "
                           "built by dvc.yaml stages named after each dataset (outs: data/<name>)")
    return _load_yaml(path, "dvc.yaml").get("stages") or {}


def _out_path(name: str) -> str:
    return f"data/{name}"


def read_lock(project_root: str | Path, names: Iterable[str] | None = None) -> dict[str, DatasetRef]:
    """Datasets pinned in dvc.lock: name -> DatasetRef(name, <root>/data/<name>, md5).

    With `names`, every name must be pinned, else DatasetError naming it and the fix.
    """
    root = Path(project_root).resolve()
    lock_path = root / "dvc.lock"
    wanted = list(names) if names is not None else None
    if not lock_path.exists():
        if wanted == []:
            return {}
        raise DatasetError(f"no dvc.lock in {root}: datasets {', '.join(wanted or [])} are not "
                           "built yet; run `moonforge data build` (dvc repro)")
    stages = _load_yaml(lock_path, "dvc.lock").get("stages") or {}
    refs: dict[str, DatasetRef] = {}
    for name, st in stages.items():
        for out in (st or {}).get("outs") or []:
            if out.get("path") in (_out_path(name), _out_path(name) + "/") and out.get("md5"):
                refs[name] = DatasetRef(name, root / _out_path(name), str(out["md5"]))
    if wanted is None:
        return refs
    missing = [n for n in wanted if n not in refs]
    if missing:
        declared = _dvc_stages(root) if (root / "dvc.yaml").exists() else {}
        for n in missing:
            if n not in declared:
                raise DatasetError(
                    f"dataset {n!r} has no dvc stage: add a stage named {n!r} with `outs: "
                    f"[{_out_path(n)}]` to dvc.yaml (declared: {', '.join(declared) or 'none'}), "
                    "or remove it from the stage's `data:` list")
        raise DatasetError(f"dataset(s) {', '.join(missing)} not pinned in dvc.lock; run "
                           f"`moonforge data build` (dvc repro {' '.join(missing)})")
    return {n: refs[n] for n in wanted}


def dvc_status(project_root: str | Path, names: Iterable[str] = ()) -> dict:
    """`dvc status --json [names]`: {} when everything is up to date."""
    proc = dvc(project_root, "status", "--json", *names)
    out = proc.stdout.strip()
    try:
        return json.loads(out) if out else {}
    except ValueError:
        return {"(dvc)": out}


def dvc_repro(project_root: str | Path, names: Iterable[str] = ()) -> str:
    """`dvc repro [names]`; returns dvc's output."""
    return dvc(project_root, "repro", *names).stdout


def _stamp(root: Path) -> tuple:
    return tuple((root / f).stat().st_mtime_ns if (root / f).exists() else 0
                 for f in ("dvc.yaml", "dvc.lock"))


def ensure_datasets(project_root: str | Path, names: Iterable[str]) -> dict[str, DatasetRef]:
    """Make sure `names` are built at their pinned versions and return them.

    Runs `dvc repro <names>` only if data/<name> is missing or `dvc status` reports a change; the
    result of that check is remembered for the process until dvc.yaml or dvc.lock change.
    """
    root = Path(project_root).resolve()
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    declared = _dvc_stages(root)
    for n in names:
        if n not in declared:
            raise DatasetError(
                f"dataset {n!r} has no dvc stage: add a stage named {n!r} with `outs: "
                f"[{_out_path(n)}]` to dvc.yaml (declared: {', '.join(declared) or 'none'}), "
                "or remove it from the stage's `data:` list")
    if not (root / ".dvc").is_dir():
        raise DatasetError(f"{root} is not a DVC project (no .dvc/); run `dvc init` there "
                           f"(or `dvc init --no-scm` outside git), then `moonforge data build`")
    stamp, checked = _VERIFIED.get(str(root), ((), frozenset()))
    missing = [n for n in names if not (root / _out_path(n)).exists()]
    if missing or stamp != _stamp(root) or not set(names) <= checked:
        if missing or dvc_status(root, names):
            dvc_repro(root, names)
        prev = checked if stamp == _stamp(root) else frozenset()
        _VERIFIED[str(root)] = (_stamp(root), prev | set(names))
    return read_lock(root, names)

"""Dataset versions from DVC: `dvc.lock` pins every dataset; stages read them by name.

A generated dataset `<name>` is the output `data/<name>` of the dvc.yaml stage called `<name>`;
its version is the md5 DVC recorded for that output in dvc.lock. A declared dataset (users' own
data, `moonforge data add`) is `data/<name>`, tracked by `data/<name>.dvc` (`dvc add`, or `dvc
import-url --no-download` for S3, whose data stays on S3 and is streamed); its version is the md5
in that file (of the S3 objects for an import). `ensure_datasets` rebuilds generated datasets
(via the real `dvc` CLI) only when `dvc status` reports a change or the output directory is
missing, and refuses a declared dataset whose files changed since they were tracked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

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
    proc = subprocess.run(
        [dvc_executable(), *args], cwd=project_root, capture_output=True, text=True, env=env
    )
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise DatasetError(f"`dvc {' '.join(args)}` failed in {project_root}: " + " ".join(msg[-5:]))
    return proc


def _load_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DatasetError(
            f"cannot read {what} {path}: {e}; fix or regenerate it (`moonforge data build`)"
        ) from e
    if not isinstance(data, dict):
        raise DatasetError(f"{what} {path} is not a YAML mapping; regenerate it (`moonforge data build`)")
    return data


def _dvc_stages(root: Path) -> dict:
    path = root / "dvc.yaml"
    if not path.exists():
        raise DatasetError(
            f"no dvc.yaml in {root}: the data pipeline is missing; datasets are "
            "built by dvc.yaml stages named after each dataset (outs: data/<name>)"
        )
    return _load_yaml(path, "dvc.yaml").get("stages") or {}


def _out_path(name: str) -> str:
    return f"data/{name}"


def declared_file(root: Path, name: str) -> Path:
    """The DVC file that tracks declared dataset `name` (data/<name>.dvc)."""
    return root / "data" / f"{name}.dvc"


def _declared_ref(root: Path, name: str) -> DatasetRef | None:
    path = declared_file(root, name)
    if not path.is_file():
        return None
    meta = _load_yaml(path, "DVC file")
    outs, deps = meta.get("outs") or [{}], meta.get("deps") or [{}]
    digest = outs[0].get("md5") or deps[0].get("md5") or deps[0].get("etag")
    if not digest:
        raise DatasetError(
            f"{path} records no md5 for {name!r}; re-track it with "
            f"`moonforge data add {name} PATH --format F`"
        )
    return DatasetRef(name, root / _out_path(name), str(digest))


def declared_refs(root: str | Path) -> dict[str, DatasetRef]:
    """Every declared dataset of the project: data/<name>.dvc -> DatasetRef."""
    root = Path(root).resolve()
    refs = {}
    for path in sorted((root / "data").glob("*.dvc")):
        ref = _declared_ref(root, path.stem)
        if ref is not None:
            refs[path.stem] = ref
    return refs


def read_lock(project_root: str | Path, names: Iterable[str] | None = None) -> dict[str, DatasetRef]:
    """Datasets pinned in dvc.lock: name -> DatasetRef(name, <root>/data/<name>, md5).

    With `names`, every name must be pinned, else DatasetError naming it and the fix.
    """
    root = Path(project_root).resolve()
    lock_path = root / "dvc.lock"
    wanted = list(names) if names is not None else None
    if not lock_path.exists():
        declared = declared_refs(root)
        if wanted is None or (wanted and all(n in declared for n in wanted)):
            return declared if wanted is None else {n: declared[n] for n in wanted}
        if wanted == []:
            return {}
        raise DatasetError(
            f"no dvc.lock in {root}: datasets {', '.join(wanted or [])} are not "
            "built yet; run `moonforge data build` (dvc repro)"
        )
    stages = _load_yaml(lock_path, "dvc.lock").get("stages") or {}
    refs: dict[str, DatasetRef] = declared_refs(root)
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
                raise DatasetError(_unknown(n, declared))
        raise DatasetError(
            f"dataset(s) {', '.join(missing)} not pinned in dvc.lock; run "
            f"`moonforge data build` (dvc repro {' '.join(missing)})"
        )
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
    return tuple(
        (root / f).stat().st_mtime_ns if (root / f).exists() else 0 for f in ("dvc.yaml", "dvc.lock")
    )


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
    users = [n for n in names if n not in declared and declared_file(root, n).is_file()]
    for n in names:
        if n not in declared and n not in users:
            raise DatasetError(_unknown(n, declared))
    names = [n for n in names if n not in users]
    if not (root / ".dvc").is_dir():
        raise DatasetError(
            f"{root} is not a DVC project (no .dvc/); run `dvc init` there "
            f"(or `dvc init --no-scm` outside git), then `moonforge data build`"
        )
    stamp, checked = _VERIFIED.get(str(root), ((), frozenset()))
    missing = [n for n in names if not (root / _out_path(n)).exists()]
    if missing or stamp != _stamp(root) or not set(names) <= checked:
        if missing or dvc_status(root, names):
            dvc_repro(root, names)
        prev = checked if stamp == _stamp(root) else frozenset()
        _VERIFIED[str(root)] = (_stamp(root), prev | set(names))
    refs = read_lock(root, names) if names else {}
    refs.update({n: ensure_declared(root, n) for n in users})
    return {n: refs[n] for n in [*names, *users]}


def _unknown(name: str, stages: dict) -> str:
    return (
        f"dataset {name!r} has no dvc stage and no data/{name}.dvc: add your own data with "
        f"`moonforge data add {name} PATH --format F`, or a stage named {name!r} with `outs: "
        f"[{_out_path(name)}]` to dvc.yaml (stages: {', '.join(stages) or 'none'}), or remove "
        "it from the stage's `data:` list"
    )


def ensure_declared(root: Path, name: str) -> DatasetRef:
    """A declared dataset at the version its .dvc file records: checked out if its directory is
    missing (from the DVC cache or remote), refused if its files changed since they were tracked.
    An S3 import (`dvc import-url --no-download`) is streamed from S3; its version is the md5 of
    the objects when it was added, `dvc update --no-download data/<name>.dvc` records a new one."""
    ref = _declared_ref(root, name)
    if ref is None:
        raise DatasetError(
            f"dataset {name!r} has no data/{name}.dvc; add it with "
            f"`moonforge data add {name} PATH --format F`"
        )
    dvc_file = str(declared_file(root, name).relative_to(root))
    if _load_yaml(declared_file(root, name), "DVC file").get("deps"):
        return ref
    if not ref.path.exists():
        dvc(root, "checkout", dvc_file, check=False)
        if not ref.path.exists():
            dvc(root, "pull", dvc_file)
    changed = dvc_status(root, [dvc_file])
    if changed:
        raise DatasetError(
            f"declared dataset {name!r} changed since it was tracked "
            f"({json.dumps(changed)[:300]}); `dvc add data/{name}` (or `moonforge "
            f"data add` again) records the new version, `dvc checkout {dvc_file}` "
            "restores the tracked one"
        )
    return ref

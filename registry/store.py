"""The content-addressed artifact store: `<root>/<stage>/<version>/`, committed atomically.

Protocol for one stage execution:
    staging = store.begin("sft")               # <root>/sft/.tmp-<uuid>/ ; the stage writes here
    info = store.commit(staging, fp, inputs)    # lock, pick version n, write sidecars, manifest
                                               # last, rename to <root>/sft/<n>/ ; or
    store.abort(staging)                       # on failure: nothing becomes visible
Only directories holding a `manifest.json` are artifacts: a crash before the rename leaves a
`.tmp-*` directory that no lookup ever returns. Versions are 1, 2, 3... per stage and are never
reused or overwritten; `index.json` maps fingerprint -> version (a cache of the manifests).

Work in progress, beside the versions of a stage:
    .tmp-<uuid>/ + .tmp-<uuid>.lock   a staging dir; its writer holds a flock on the .lock file
                                      for as long as it lives, so `gc` removes exactly the
                                      staging dirs whose writer died (kill -9 included)
    .lease-<fp16>                     who builds this fingerprint now (registry.lease)
    .partial-<fp16>/train_state/      the periodic checkpoints of a run of that fingerprint;
                                      written there directly (the staging dir links to it), so a
                                      rerun finds the last complete one whatever ended the run

`ArtifactStore` is the interface; `LocalStore` is the embedded default; `registry.s3_store.S3Store`
implements the same methods on `s3://bucket/prefix` (stage locally, upload, put the manifest last).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moonforge.registry.errors import ArtifactNotFound
from moonforge.registry.lease import (
    LEASE_PREFIX,
    Lease,
    WaitFn,
    acquire_local,
    local_lease_held,
    read_holder,
    try_local_lock,
)
from moonforge.stages.train.train_record import latest_checkpoint, read_train_record

MANIFEST = "manifest.json"
LINEAGE = "lineage.json"
INDEX = "index.json"
TMP_PREFIX = ".tmp-"
PARTIAL_PREFIX = ".partial-"
"""A run's periodic checkpoints, kept per fingerprint so a rerun resumes from them."""
LOCK_SUFFIX = ".lock"
TRAIN_STATE_DIR = "train_state"
STORE_DIR = Path(".moonforge") / "store"
S3_CACHE_DIR = Path(".moonforge") / "s3cache"
MIN_PREFIX = 4
"""Shortest fingerprint prefix accepted in a ref."""

_STAGE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_STAGING_RE = re.compile(rf"^{re.escape(TMP_PREFIX)}[0-9a-f]{{32}}$")
"""A staging dir's name (`begin`); gc removes only these, not other tools' `.tmp-*` dirs."""


@dataclass(frozen=True)
class ArtifactInfo:
    """A committed artifact: where it is and what its manifest says."""

    stage: str
    version: int
    fingerprint: str
    path: Path
    manifest: dict

    @property
    def ref(self) -> str:
        return f"{self.stage}@{self.version}"

    @property
    def uri(self) -> str:
        """Where the artifact lives: its directory here, `s3://...` for an S3 store's artifacts."""
        return str(self.path)

    @property
    def inputs(self) -> dict:
        """The fingerprint inputs record it was built from (see registry.fingerprint)."""
        return self.manifest.get("inputs") or {}

    def lineage(self) -> dict:
        p = self.path / LINEAGE
        return json.loads(p.read_text()) if p.exists() else {}


Sidecars = Callable[[int], Mapping[str, Any]]
"""version -> {file name: JSON-able object}, written into the artifact before its manifest."""


class ArtifactStore(ABC):
    """What the registry needs from a store; a local dir today, S3 later."""

    @abstractmethod
    def begin(self, stage: str) -> Path:
        """A fresh local staging directory for `stage` to write its output into."""

    @abstractmethod
    def commit(
        self, staging: Path, fingerprint: str, inputs: Mapping[str, Any], sidecars: Sidecars | None = None
    ) -> ArtifactInfo:
        """Make `staging` visible as the next version of its stage (or return the existing
        artifact if another writer committed the same fingerprint first)."""

    @abstractmethod
    def abort(self, staging: Path, keep: bool = False) -> None:
        """Discard a staging directory (keep=True leaves it under .tmp- for debugging)."""

    @abstractmethod
    def lease(self, stage: str, fingerprint: str, wait: WaitFn | None = None, poll_s: float = 1.0) -> Lease:
        """Block until this process may build (stage, fingerprint); see registry.lease."""

    @abstractmethod
    def drop_partial(self, stage: str, fingerprint: str) -> None:
        """Forget a fingerprint's periodic checkpoints once its artifact is committed."""

    @abstractmethod
    def partial_work(self, stage: str, fingerprint: str) -> dict | None:
        """Resumable work of an unfinished run of this fingerprint, for `moonforge status`:
        {"checkpoint", "phase", "step", "num_steps", "global_step", "running": holder or None}."""

    @abstractmethod
    def stages(self) -> list[str]:
        """Stage names with at least one committed artifact."""

    @abstractmethod
    def versions(self, stage: str) -> list[ArtifactInfo]:
        """Committed artifacts of `stage`, oldest first."""

    @abstractmethod
    def lookup(self, stage: str, fingerprint: str) -> ArtifactInfo | None:
        """The committed artifact of `stage` with exactly this fingerprint, if any."""

    @abstractmethod
    def open_path(self, path: Path) -> ArtifactInfo:
        """An artifact given by its directory."""

    def latest(self, stage: str) -> ArtifactInfo | None:
        vs = self.versions(stage)
        return vs[-1] if vs else None

    def describe(self) -> str:
        """What exists, for error messages: "align (1, 2), sft (1)" or "nothing yet"."""
        parts = [f"{s} ({', '.join(str(a.version) for a in self.versions(s))})" for s in self.stages()]
        return ", ".join(parts) if parts else "nothing yet"

    def resolve(self, ref: str | Path) -> ArtifactInfo:
        """`stage@latest`, `stage@<n>`, `stage@<fingerprint-prefix>` (>= 4 hex chars; all-digit
        strings of up to 6 chars are version numbers), a bare `stage` (= @latest), or a path to
        an artifact directory. Raises ArtifactNotFound listing what exists."""
        s = str(ref)
        if s.startswith(("runs:/", "models:/", "s3://")):
            raise ArtifactNotFound(
                f"ref {s!r}: {s.split(':')[0]} refs are not supported by this store yet; use "
                f"stage@version (existing: {self.describe()}) or an artifact path"
            )
        p = Path(s).expanduser()
        if "@" not in s and (os.sep in s or p.exists()):
            return self.open_path(p)
        stage, _, sel = s.partition("@")
        sel = sel or "latest"
        if not _STAGE_RE.match(stage):
            raise ArtifactNotFound(f"ref {s!r} is not a stage@version ref or an existing path")
        versions = self.versions(stage)
        if not versions:
            raise ArtifactNotFound(
                f"no artifact {s!r}: stage {stage!r} has no committed versions in {self.where()}; "
                f"existing: {self.describe()}. Run the lifecycle up to it (moonforge run --until "
                f"{stage}) or pass an existing ref"
            )
        listing = ", ".join(f"{a.version} ({a.fingerprint[:8]})" for a in versions)
        if sel == "latest":
            return versions[-1]
        if sel.isdigit() and len(sel) <= 6:
            for a in versions:
                if a.version == int(sel):
                    return a
            raise ArtifactNotFound(f"no artifact {s!r}: {stage} has versions {listing}")
        if len(sel) < MIN_PREFIX or not re.fullmatch(r"[0-9a-fA-F]+", sel):
            raise ArtifactNotFound(
                f"ref {s!r}: after '@' give latest, a version number or a fingerprint prefix of "
                f">= {MIN_PREFIX} hex chars; {stage} has versions {listing}"
            )
        hits = [a for a in versions if a.fingerprint.startswith(sel.lower())]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise ArtifactNotFound(
                f"no artifact {s!r}: no {stage} fingerprint starts with "
                f"{sel!r}; {stage} has versions {listing}"
            )
        raise ArtifactNotFound(
            f"ambiguous ref {s!r}: fingerprint prefix {sel!r} matches {stage} versions "
            + ", ".join(f"{a.version} ({a.fingerprint[:12]})" for a in hits)
            + "; use a longer prefix or the version number"
        )

    def where(self) -> str:
        return repr(self)

    # -- local work dirs (a LocalStore's root; an S3 store's cache) ---------------------------
    local_root: Path
    _staging_locks: dict[str, int]

    def _begin_local(self, stage: str) -> Path:
        """A fresh `<local root>/<stage>/.tmp-<uuid>/`, flock-ed (via its .lock file) until
        commit / abort or until this process dies, so `gc` never removes a live one."""
        if not _STAGE_RE.match(stage):
            raise ValueError(f"invalid stage name {stage!r} for the store")
        d = self.local_root / stage
        d.mkdir(parents=True, exist_ok=True)
        name = f"{TMP_PREFIX}{uuid.uuid4().hex}"
        fd = try_local_lock(d / f"{name}{LOCK_SUFFIX}")
        assert fd is not None, "a fresh lock file cannot be held by anyone else"
        staging = d / name
        staging.mkdir()
        self._staging_locks[str(staging)] = fd
        return staging

    def _unlock_staging(self, staging: Path) -> None:
        fd = self._staging_locks.pop(str(staging), None)
        if fd is not None:
            try:
                os.unlink(staging.parent / f"{staging.name}{LOCK_SUFFIX}")
            except FileNotFoundError:
                pass
            os.close(fd)

    def work_dir(self, stage: str, fingerprint: str) -> Path:
        """Where a run of this fingerprint keeps its periodic checkpoints (`train_state/`)."""
        return self.local_root / stage / f"{PARTIAL_PREFIX}{fingerprint[:16]}"

    def resume_point(self, stage: str, fingerprint: str) -> Path | None:
        """The last complete periodic checkpoint of a run of this fingerprint, or None."""
        return latest_checkpoint(self.work_dir(stage, fingerprint) / TRAIN_STATE_DIR)

    def sync_partial(self, stage: str, fingerprint: str) -> None:  # noqa: B027 (a no-op by default)
        """Make the newest local periodic checkpoint durable where other machines see it (an S3
        store uploads it; a local store already is)."""

    def partial(self, stage: str, fingerprint: str) -> Path | None:
        """The work dir of an unfinished run of this fingerprint if it holds a checkpoint."""
        return self.work_dir(stage, fingerprint) if self.resume_point(stage, fingerprint) else None

    def _local_partial(self, stage: str, fingerprint: str) -> dict | None:
        ck = self.resume_point(stage, fingerprint)
        if ck is None:
            return None
        rec = read_train_record(ck)
        return {
            "checkpoint": str(ck),
            "phase": rec.phase,
            "step": rec.step,
            "num_steps": rec.num_steps,
            "global_step": rec.global_step,
            "running": None,
        }

    def gc(self, stage: str) -> list[Path]:
        """Remove what dead runs left under the local `stage` dir: staging dirs whose writer is
        gone (its flock is free), lock files without a dir, and the work dirs and leases of
        fingerprints that are committed or hold no complete checkpoint. Never touches a live
        run's files. Returns what it removed."""
        d = self.local_root / stage
        if not _STAGE_RE.match(stage) or not d.is_dir():
            return []
        removed: list[Path] = []
        committed: set[str] | None = None
        for p in sorted(d.iterdir()):
            name = p.name
            if _STAGING_RE.match(name.removesuffix(LOCK_SUFFIX)) and name.endswith(LOCK_SUFFIX):
                if not (d / name[: -len(LOCK_SUFFIX)]).exists() and _remove_if_unlocked(p, p):
                    removed.append(p)
            elif _STAGING_RE.match(name) and p.is_dir() and str(p) not in self._staging_locks:
                if _remove_if_unlocked(d / f"{name}{LOCK_SUFFIX}", p):
                    removed.append(p)
            elif name.startswith(PARTIAL_PREFIX) and p.is_dir():
                if committed is None:
                    committed = {a.fingerprint[:16] for a in self.versions(stage)}
                fp16 = name[len(PARTIAL_PREFIX) :]
                done = fp16 in committed
                if (done or latest_checkpoint(p / TRAIN_STATE_DIR) is None) and self._remove_partial_if_free(
                    stage, fp16, p, drop_lease=done
                ):
                    removed.append(p)
        return removed

    def _remove_partial_if_free(self, stage: str, fp16: str, path: Path, drop_lease: bool) -> bool:
        """Remove a work dir nobody can still be using. Without a local lease to ask, only one
        whose fingerprint is committed (drop_lease) qualifies; an empty one may be a live run's."""
        if not drop_lease:
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True


def _remove_if_unlocked(lock: Path, target: Path) -> bool:
    """rmtree `target` (and unlink `lock`) if no live process holds `lock`'s flock."""
    fd = try_local_lock(lock)
    if fd is None:
        return False
    try:
        if target != lock:
            shutil.rmtree(target, ignore_errors=True)
        lock.unlink(missing_ok=True)
    finally:
        os.close(fd)
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


class LocalStore(ArtifactStore):
    """A directory store (the embedded default: `<project>/.moonforge/store`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.local_root = self.root
        self._staging_locks = {}

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def where(self) -> str:
        return str(self.root)

    # -- writing ------------------------------------------------------------------------------
    def begin(self, stage: str) -> Path:
        return self._begin_local(stage)

    @contextmanager
    def _lock(self, stage: str) -> Iterator[None]:
        d = self.root / stage
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def commit(
        self, staging: Path, fingerprint: str, inputs: Mapping[str, Any], sidecars: Sidecars | None = None
    ) -> ArtifactInfo:
        staging = Path(staging)
        stage = staging.parent.name
        if not staging.name.startswith(TMP_PREFIX) or staging.parent.parent != self.root:
            raise ValueError(f"{staging} is not a staging directory of {self}")
        with self._lock(stage):
            existing = self.lookup(stage, fingerprint)
            if existing is not None:  # a concurrent writer won; keep its artifact
                self.abort(staging)
                return existing
            version = self._next_version(stage)
            for name, obj in (sidecars(version) if sidecars else {}).items():
                _write_json_atomic(staging / name, obj)
            files = {
                p.relative_to(staging).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                for p in sorted(staging.rglob("*"))
                if p.is_file() and p.name != MANIFEST
            }
            manifest = {
                "stage": stage,
                "version": version,
                "fingerprint": fingerprint,
                "inputs": dict(inputs),
                "files": files,
                "created": time.time(),
            }
            _write_json_atomic(staging / MANIFEST, manifest)  # last file in: the commit mark
            final = self.root / stage / str(version)
            os.rename(staging, final)  # atomic; fails rather than overwrite an existing version
            self._update_index(stage, fingerprint, version)
        self._unlock_staging(staging)
        return ArtifactInfo(stage, version, fingerprint, final, manifest)

    def abort(self, staging: Path, keep: bool = False) -> None:
        staging = Path(staging)
        if not keep and staging.name.startswith(TMP_PREFIX):
            shutil.rmtree(staging, ignore_errors=True)
        self._unlock_staging(staging)

    def _lease_path(self, stage: str, fp16: str) -> Path:
        return self.root / stage / f"{LEASE_PREFIX}{fp16[:16]}"

    def lease(self, stage: str, fingerprint: str, wait: WaitFn | None = None, poll_s: float = 1.0) -> Lease:
        if not _STAGE_RE.match(stage):
            raise ValueError(f"invalid stage name {stage!r} for the store")
        return acquire_local(self._lease_path(stage, fingerprint), stage, fingerprint, wait, poll_s)

    def drop_partial(self, stage: str, fingerprint: str) -> None:
        shutil.rmtree(self.work_dir(stage, fingerprint), ignore_errors=True)

    def partial_work(self, stage: str, fingerprint: str) -> dict | None:
        lease = self._lease_path(stage, fingerprint)
        running = read_holder(lease) if local_lease_held(lease) else None
        out = self._local_partial(stage, fingerprint)
        if out is None and running is None:
            return None
        return {**(out or {"checkpoint": None}), "running": running}

    def _remove_partial_if_free(self, stage: str, fp16: str, path: Path, drop_lease: bool) -> bool:
        lease = self._lease_path(stage, fp16)
        fd = try_local_lock(lease)
        if fd is None:
            return False  # a live run builds this fingerprint
        try:
            shutil.rmtree(path, ignore_errors=True)
            if drop_lease or not lease.stat().st_size:
                lease.unlink(missing_ok=True)
        finally:
            os.close(fd)
        return True

    def gc(self, stage: str) -> list[Path]:
        removed = super().gc(stage)
        d = self.root / stage
        if not d.is_dir():
            return removed
        committed = {a.fingerprint[:16] for a in self.versions(stage)}
        for p in d.glob(f"{LEASE_PREFIX}*"):  # a lease of a committed fingerprint is history
            fp16 = p.name[len(LEASE_PREFIX) :]
            if fp16 in committed and not self.work_dir(stage, fp16).exists() and _remove_if_unlocked(p, p):
                removed.append(p)
        return removed

    def _next_version(self, stage: str) -> int:
        d = self.root / stage
        nums = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.exists() else []
        return max(nums, default=0) + 1

    def _update_index(self, stage: str, fingerprint: str, version: int) -> None:
        path = self.root / stage / INDEX
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError):
            index = {}
        index[fingerprint] = version
        _write_json_atomic(path, index)

    # -- reading ------------------------------------------------------------------------------
    def _read(self, path: Path) -> ArtifactInfo | None:
        try:
            m = json.loads((path / MANIFEST).read_text())
            return ArtifactInfo(m["stage"], int(m["version"]), m["fingerprint"], path, m)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no (or a malformed) manifest: not an artifact

    def stages(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(d.name for d in self.root.iterdir() if d.is_dir() and self.versions(d.name))

    def versions(self, stage: str) -> list[ArtifactInfo]:
        d = self.root / stage
        if not _STAGE_RE.match(stage) or not d.is_dir():
            return []
        dirs = sorted((p for p in d.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        return [a for a in map(self._read, dirs) if a is not None]

    def lookup(self, stage: str, fingerprint: str) -> ArtifactInfo | None:
        try:
            v = json.loads((self.root / stage / INDEX).read_text()).get(fingerprint)
        except (OSError, ValueError):
            v = None
        if v is not None:
            a = self._read(self.root / stage / str(v))
            if a is not None and a.fingerprint == fingerprint:
                return a
        # The index is a cache; the manifests are the truth.
        return next((a for a in self.versions(stage) if a.fingerprint == fingerprint), None)

    def open_path(self, path: Path) -> ArtifactInfo:
        path = Path(path).expanduser().resolve()
        if not path.exists():
            raise ArtifactNotFound(
                f"no artifact at {path}: the path does not exist; existing artifacts: {self.describe()}"
            )
        a = self._read(path)
        if a is None:
            raise ArtifactNotFound(
                f"{path} is not a committed artifact (no readable {MANIFEST}); "
                f"existing artifacts: {self.describe()}"
            )
        return ArtifactInfo(a.stage, a.version, a.fingerprint, path, a.manifest)


def open_store(project: str | Path, uri: str | None = None) -> ArtifactStore:
    """The project's store: `uri` or $MOONFORGE_STORE (a directory or `s3://bucket/prefix`), else
    `<project>/.moonforge/store`."""
    uri = uri or os.environ.get("MOONFORGE_STORE")
    if uri and uri.startswith("s3://"):
        from moonforge.registry.s3_store import S3Store, parse_s3_uri

        # Stages read and write local directories: an S3 store stages and caches them here
        # ($MOONFORGE_S3_CACHE, e.g. node-local scratch on a cluster).
        bucket, prefix = parse_s3_uri(uri)
        cache = Path(os.environ.get("MOONFORGE_S3_CACHE") or Path(project) / S3_CACHE_DIR)
        return S3Store(uri, cache / bucket / prefix)
    return LocalStore(Path(uri) if uri else Path(project) / STORE_DIR)

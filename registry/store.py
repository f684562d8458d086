"""The content-addressed artifact store: `<root>/<stage>/<version>/`, committed atomically.

Protocol for one stage execution:
    staging = store.begin("sft")               # <root>/sft/.tmp-<uuid>/ ; the stage writes here
    info = store.commit(staging, fp, inputs)    # lock, pick version n, write sidecars, manifest
                                               # last, rename to <root>/sft/<n>/ ; or
    store.abort(staging)                       # on failure: nothing becomes visible
Only directories holding a `manifest.json` are artifacts: a crash before the rename leaves a
`.tmp-*` directory that no lookup ever returns. Versions are 1, 2, 3... per stage and are never
reused or overwritten; `index.json` maps fingerprint -> version (a cache of the manifests).

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from moonforge.registry.errors import ArtifactNotFound

MANIFEST = "manifest.json"
LINEAGE = "lineage.json"
INDEX = "index.json"
TMP_PREFIX = ".tmp-"
PARTIAL_PREFIX = ".partial-"
"""A failed stage's periodic checkpoints, kept per fingerprint so a rerun resumes from them."""
TRAIN_STATE_DIR = "train_state"
STORE_DIR = Path(".moonforge") / "store"
S3_CACHE_DIR = Path(".moonforge") / "s3cache"
MIN_PREFIX = 4
"""Shortest fingerprint prefix accepted in a ref."""

_STAGE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


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
    def commit(self, staging: Path, fingerprint: str, inputs: Mapping[str, Any],
               sidecars: Sidecars | None = None) -> ArtifactInfo:
        """Make `staging` visible as the next version of its stage (or return the existing
        artifact if another writer committed the same fingerprint first)."""

    @abstractmethod
    def abort(self, staging: Path, keep: bool = False) -> None:
        """Discard a staging directory (keep=True leaves it under .tmp- for debugging)."""

    @abstractmethod
    def keep_partial(self, staging: Path, fingerprint: str) -> Path | None:
        """Move a failed staging dir's periodic checkpoints aside; return where (None if none)."""

    @abstractmethod
    def partial(self, stage: str, fingerprint: str) -> Path | None:
        """The kept periodic checkpoints of an unfinished `stage` run with this fingerprint."""

    @abstractmethod
    def drop_partial(self, stage: str, fingerprint: str) -> None:
        """Forget kept checkpoints once the artifact is committed."""

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
                f"stage@version (existing: {self.describe()}) or an artifact path")
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
                f"{stage}) or pass an existing ref")
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
                f">= {MIN_PREFIX} hex chars; {stage} has versions {listing}")
        hits = [a for a in versions if a.fingerprint.startswith(sel.lower())]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise ArtifactNotFound(f"no artifact {s!r}: no {stage} fingerprint starts with "
                                   f"{sel!r}; {stage} has versions {listing}")
        raise ArtifactNotFound(
            f"ambiguous ref {s!r}: fingerprint prefix {sel!r} matches {stage} versions "
            + ", ".join(f"{a.version} ({a.fingerprint[:12]})" for a in hits)
            + "; use a longer prefix or the version number")

    def where(self) -> str:
        return repr(self)


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

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def where(self) -> str:
        return str(self.root)

    # -- writing ------------------------------------------------------------------------------
    def begin(self, stage: str) -> Path:
        if not _STAGE_RE.match(stage):
            raise ValueError(f"invalid stage name {stage!r} for the store")
        staging = self.root / stage / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        return staging

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

    def commit(self, staging: Path, fingerprint: str, inputs: Mapping[str, Any],
               sidecars: Sidecars | None = None) -> ArtifactInfo:
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
                for p in sorted(staging.rglob("*")) if p.is_file() and p.name != MANIFEST
            }
            manifest = {"stage": stage, "version": version, "fingerprint": fingerprint,
                        "inputs": dict(inputs), "files": files, "created": time.time()}
            _write_json_atomic(staging / MANIFEST, manifest)  # last file in: the commit mark
            final = self.root / stage / str(version)
            os.rename(staging, final)  # atomic; fails rather than overwrite an existing version
            self._update_index(stage, fingerprint, version)
        return ArtifactInfo(stage, version, fingerprint, final, manifest)

    def abort(self, staging: Path, keep: bool = False) -> None:
        staging = Path(staging)
        if not keep and staging.name.startswith(TMP_PREFIX):
            shutil.rmtree(staging, ignore_errors=True)

    def _partial_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / stage / f"{PARTIAL_PREFIX}{fingerprint[:16]}"

    def keep_partial(self, staging: Path, fingerprint: str) -> Path | None:
        src = Path(staging) / TRAIN_STATE_DIR
        if not src.is_dir() or not any(src.glob("step-*")):
            return None
        dest = self._partial_dir(Path(staging).parent.name, fingerprint)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        os.rename(src, dest / TRAIN_STATE_DIR)
        return dest

    def partial(self, stage: str, fingerprint: str) -> Path | None:
        d = self._partial_dir(stage, fingerprint)
        return d if any((d / TRAIN_STATE_DIR).glob("step-*")) else None

    def drop_partial(self, stage: str, fingerprint: str) -> None:
        shutil.rmtree(self._partial_dir(stage, fingerprint), ignore_errors=True)

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
            raise ArtifactNotFound(f"no artifact at {path}: the path does not exist; existing "
                                   f"artifacts: {self.describe()}")
        a = self._read(path)
        if a is None:
            raise ArtifactNotFound(f"{path} is not a committed artifact (no readable {MANIFEST}); "
                                   f"existing artifacts: {self.describe()}")
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

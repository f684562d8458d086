"""The artifact store on S3 (`s3://bucket/prefix`, any S3-compatible endpoint), via boto3.

Same protocol as LocalStore (begin -> the stage writes locally -> commit | abort); the bucket
mirrors the local layout:

    <prefix>/<stage>/<n>/.claim          put first, conditionally (If-None-Match: *): reserves n
    <prefix>/<stage>/<n>/<files>         the staged files (multipart above the threshold)
    <prefix>/<stage>/<n>/manifest.json   put LAST: the commit mark
    <prefix>/<stage>/.partial-<fp16>/    a failed run's periodic checkpoints (+ partial.json last)

S3 has no rename and no lock, so visibility and numbering work differently from LocalStore: a
version is visible only once its manifest exists (lookups read manifests, nothing else), and a
version number is reserved by the conditional `.claim` put, so two writers never share a prefix.
A crash mid-upload leaves a claimed prefix without a manifest: never listed, never a cache hit,
and its number is never reused. (Concurrent writers of the *same* fingerprint may both commit;
lookups then return the older one.)

Local side: `cache_dir` mirrors `<stage>/<n>/`. Stages stage under `<cache>/<stage>/.tmp-<uuid>`,
and an artifact's `.path` is its local copy, downloaded on first access and checked against the
manifest's sha256s, so stages keep reading plain directories while manifests, lineage.json and
`.uri` say `s3://bucket/prefix/<stage>/<n>`.

Talking to the bucket (retries, credentials, errors that name the fix): registry.s3_bucket.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from botocore.exceptions import ClientError

from moonforge.registry.errors import ArtifactNotFound
from moonforge.registry.s3_bucket import (S3Bucket, S3Settings, StoreConfigError,
                                          StoreUnavailable, parse_s3_uri)
from moonforge.registry.store import (LINEAGE, MANIFEST, PARTIAL_PREFIX, TMP_PREFIX,
                                      TRAIN_STATE_DIR, ArtifactInfo, ArtifactStore, Sidecars,
                                      _sha256, _STAGE_RE, _write_json_atomic)

__all__ = ["S3Store", "S3ArtifactInfo", "S3Settings", "StoreConfigError", "StoreUnavailable",
           "parse_s3_uri"]

log = logging.getLogger("moonforge.registry.s3")

CLAIM = ".claim"
PARTIAL_MARK = "partial.json"


class S3ArtifactInfo(ArtifactInfo):
    """A committed artifact in an S3 store. `path` is its local copy, fetched on first access
    (so listing versions or resolving refs downloads nothing); `uri` is where it lives."""

    def __init__(self, store: "S3Store", stage: str, version: int, manifest: dict):
        # ArtifactInfo is a frozen dataclass whose `path` we replace with a lazy property.
        for k, v in (("stage", stage), ("version", version), ("manifest", manifest),
                     ("fingerprint", manifest["fingerprint"]), ("_store", store)):
            object.__setattr__(self, k, v)

    @property
    def path(self) -> Path:  # type: ignore[override]
        return self._store.materialize(self)

    @property
    def uri(self) -> str:
        return self._store.uri_of(self.stage, self.version)

    def lineage(self) -> dict:
        return self._store.read_sidecar(self, LINEAGE) or {}

    def __repr__(self) -> str:
        return f"S3ArtifactInfo({self.ref}, {self.uri}, fp={self.fingerprint[:12]})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3ArtifactInfo) and (self.uri, self.fingerprint) == (other.uri, other.fingerprint)

    def __hash__(self) -> int:
        return hash((self.uri, self.fingerprint))


class S3Store(ArtifactStore):
    """Artifacts under `s3://bucket/prefix`, staged and read through a local `cache_dir`."""

    def __init__(self, uri: str, cache_dir: str | Path, settings: S3Settings | None = None):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.root_uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.cache = Path(cache_dir).resolve()
        self.s3 = S3Bucket(self.bucket, settings)
        self._manifests: dict[tuple[str, int], dict] = {}  # immutable once committed

    def __repr__(self) -> str:
        return f"S3Store({self.root_uri!r})"

    def where(self) -> str:
        return self.root_uri

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use, from the AWS environment)."""
        return self.s3.client

    def _key(self, *parts: object) -> str:
        return "/".join(p for p in (self.prefix, *map(str, parts)) if p)

    def uri_of(self, stage: str, version: int) -> str:
        return f"s3://{self.bucket}/{self._key(stage, version)}"

    def _upload(self, path: Path, key: str) -> None:
        self.s3.upload(path, key)

    # -- writing ------------------------------------------------------------------------------
    def begin(self, stage: str) -> Path:
        if not _STAGE_RE.match(stage):
            raise ValueError(f"invalid stage name {stage!r} for the store")
        staging = self.cache / stage / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        return staging

    def _claim(self, stage: str) -> int:
        """Reserve the next version number of `stage` with a conditional put (no lock on S3)."""
        dirs, _ = self.s3.list(self._key(stage) + "/")
        n = max((int(d) for d in dirs if d.isdigit()), default=0) + 1
        while True:
            try:
                self.s3.put_json(self._key(stage, n, CLAIM), {
                    "claimed": time.time(), "host": socket.gethostname(), "pid": os.getpid()},
                    only_if_new=True)
                return n
            except ClientError as e:  # 412: another writer holds n (or 409: racing for it)
                if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed",
                                                                   "ConditionalRequestConflict"):
                    raise
                n += 1

    def commit(self, staging: Path, fingerprint: str, inputs: Mapping[str, Any],
               sidecars: Sidecars | None = None) -> ArtifactInfo:
        staging = Path(staging)
        stage = staging.parent.name
        if not staging.name.startswith(TMP_PREFIX) or staging.parent.parent != self.cache:
            raise ValueError(f"{staging} is not a staging directory of {self}")
        existing = self.lookup(stage, fingerprint)
        if existing is not None:  # another writer committed the same inputs first
            self.abort(staging)
            return existing
        version = self._claim(stage)
        uri = self.uri_of(stage, version)
        for name, obj in (sidecars(version) if sidecars else {}).items():
            _write_json_atomic(staging / name, self._with_uris(name, obj, uri))
        files = {p.relative_to(staging).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(staging.rglob("*")) if p.is_file() and p.name != MANIFEST}
        manifest = {"stage": stage, "version": version, "fingerprint": fingerprint,
                    "inputs": dict(inputs), "files": files, "created": time.time(), "uri": uri}
        uploaded: list[str] = []
        try:
            for rel in files:
                self._upload(staging / rel, self._key(stage, version, rel))
                uploaded.append(self._key(stage, version, rel))
            self.s3.put_json(self._key(stage, version, MANIFEST), manifest)  # last: the commit mark
        except BaseException:
            self._cleanup(uploaded)
            raise
        # The staged files are the artifact: keep them as its local copy (manifest last, as ever).
        _write_json_atomic(staging / MANIFEST, manifest)
        local = self.cache / stage / str(version)
        if local.exists():  # a stale copy from a store that was since emptied
            shutil.rmtree(local)
        os.rename(staging, local)
        self._manifests[(stage, version)] = manifest
        return S3ArtifactInfo(self, stage, version, manifest)

    def _with_uris(self, name: str, obj: Any, uri: str) -> Any:
        """lineage.json records where the artifact and its upstream live in the bucket."""
        if name != LINEAGE or not isinstance(obj, dict):
            return obj
        obj = {**obj, "uri": uri, "store": self.root_uri}
        up = obj.get("upstream")
        if isinstance(up, dict) and up.get("stage") and up.get("version") is not None:
            obj["upstream"] = {**up, "uri": self.uri_of(up["stage"], int(up["version"]))}
        return obj

    def _cleanup(self, keys: list[str]) -> None:
        """Best effort after a failed commit: the missing manifest already hides these objects;
        deleting them only saves space. The claim stays so the number is never reused."""
        if not keys:
            return
        try:
            self.s3.delete(keys)
        except Exception as e:  # the commit's own error is what matters
            log.warning("could not delete %d uploaded objects of a failed commit (%s); they are "
                        "invisible without a manifest", len(keys), type(e).__name__)

    def abort(self, staging: Path, keep: bool = False) -> None:
        staging = Path(staging)
        if not keep and staging.name.startswith(TMP_PREFIX):
            shutil.rmtree(staging, ignore_errors=True)

    # -- a failed run's checkpoints ----------------------------------------------------------
    def _partial_name(self, fingerprint: str) -> str:
        return f"{PARTIAL_PREFIX}{fingerprint[:16]}"

    def keep_partial(self, staging: Path, fingerprint: str) -> Path | None:
        src = Path(staging) / TRAIN_STATE_DIR
        if not src.is_dir() or not any(src.glob("step-*")):
            return None
        stage = Path(staging).parent.name
        dest = self.cache / stage / self._partial_name(fingerprint)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        os.rename(src, dest / TRAIN_STATE_DIR)
        # Called while a stage is failing (often because S3 is down): never raise from here.
        try:
            base = self._key(stage, self._partial_name(fingerprint))
            files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
            for rel in files:
                self._upload(dest / rel, f"{base}/{rel}")
            self.s3.put_json(f"{base}/{PARTIAL_MARK}", {"files": files})  # last: complete
        except Exception as e:
            log.warning("kept the failed run's checkpoints locally at %s only; uploading them "
                        "to %s failed: %s", dest, self.root_uri, e)
        return dest

    def partial(self, stage: str, fingerprint: str) -> Path | None:
        local = self.cache / stage / self._partial_name(fingerprint)
        if any((local / TRAIN_STATE_DIR).glob("step-*")):
            return local
        base = self._key(stage, self._partial_name(fingerprint))
        mark = self.s3.get_json(f"{base}/{PARTIAL_MARK}")
        if not mark or not mark.get("files"):
            return None
        tmp = self.cache / stage / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        for rel in mark["files"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            self.s3.download(f"{base}/{rel}", tmp / rel)
        shutil.rmtree(local, ignore_errors=True)
        os.rename(tmp, local)
        return local

    def drop_partial(self, stage: str, fingerprint: str) -> None:
        shutil.rmtree(self.cache / stage / self._partial_name(fingerprint), ignore_errors=True)
        try:  # after a successful commit: a leftover only costs space
            _, keys = self.s3.list(self._key(stage, self._partial_name(fingerprint)) + "/", None)
            if keys:
                self.s3.delete(keys)
        except Exception as e:
            log.warning("could not delete kept checkpoints of %s from %s: %s", stage,
                        self.root_uri, e)

    # -- reading ------------------------------------------------------------------------------
    def _manifest(self, stage: str, version: int) -> dict | None:
        m = self._manifests.get((stage, version))
        if m is None:
            m = self.s3.get_json(self._key(stage, version, MANIFEST))
            if not m or m.get("fingerprint") is None or m.get("version") != version:
                return None  # no (or a malformed) manifest: not an artifact
            self._manifests[(stage, version)] = m
        return m

    def _info(self, stage: str, version: int) -> S3ArtifactInfo | None:
        m = self._manifest(stage, version)
        return None if m is None else S3ArtifactInfo(self, stage, version, m)

    def stages(self) -> list[str]:
        dirs, _ = self.s3.list(self._key() + "/" if self.prefix else "")
        return sorted(d for d in dirs if _STAGE_RE.match(d) and self.versions(d))

    def versions(self, stage: str) -> list[ArtifactInfo]:
        if not _STAGE_RE.match(stage):
            return []
        dirs, _ = self.s3.list(self._key(stage) + "/")
        nums = sorted(int(d) for d in dirs if d.isdigit())
        return [a for a in (self._info(stage, n) for n in nums) if a is not None]

    def lookup(self, stage: str, fingerprint: str) -> ArtifactInfo | None:
        return next((a for a in self.versions(stage) if a.fingerprint == fingerprint), None)

    def open_path(self, path: Path | str) -> ArtifactInfo:
        """An artifact by its s3:// URI or by its local copy `<cache>/<stage>/<n>`."""
        s = str(path)
        if s.startswith("s3:/") and not s.startswith("s3://"):
            s = "s3://" + s[len("s3:/"):]  # Path() collapses the double slash
        if s.startswith("s3://"):
            return self._open_uri(s)
        p = Path(s).expanduser().resolve()
        if p.parent.parent == self.cache and p.name.isdigit():
            a = self._info(p.parent.name, int(p.name))
            if a is not None:
                return a
        raise ArtifactNotFound(f"no artifact at {p}: it is not a local copy of an artifact of "
                               f"{self.root_uri}; existing artifacts: {self.describe()}")

    def _open_uri(self, uri: str) -> ArtifactInfo:
        bucket, key = parse_s3_uri(uri)
        rest = key[len(self.prefix):].strip("/") if key.startswith(self.prefix) else None
        parts = rest.split("/") if rest is not None else []
        if bucket != self.bucket or len(parts) != 2 or not parts[1].isdigit():
            raise ArtifactNotFound(
                f"{uri} is not an artifact of this store ({self.root_uri}/<stage>/<version>); "
                f"point MOONFORGE_STORE at its store, or use stage@version (existing: "
                f"{self.describe()})")
        a = self._info(parts[0], int(parts[1]))
        if a is None:
            raise ArtifactNotFound(f"no committed artifact at {uri} (no manifest.json); "
                                   f"existing: {self.describe()}")
        return a

    def resolve(self, ref: str | Path) -> ArtifactInfo:
        if str(ref).startswith("s3://"):
            return self._open_uri(str(ref))
        return super().resolve(ref)

    def read_sidecar(self, info: S3ArtifactInfo, name: str) -> dict | None:
        """A small JSON file of an artifact, from the local copy if complete, else from S3."""
        local = self.cache / info.stage / str(info.version)
        if self._local_copy_ok(local, info.manifest):
            p = local / name
            return json.loads(p.read_text()) if p.exists() else None
        return self.s3.get_json(self._key(info.stage, info.version, name))

    @staticmethod
    def _local_copy_ok(local: Path, manifest: dict) -> bool:
        try:
            return json.loads((local / MANIFEST).read_text()) == manifest
        except (OSError, ValueError):
            return False

    def materialize(self, info: S3ArtifactInfo) -> Path:
        """The artifact's local copy, downloading and verifying it if missing or stale."""
        local = self.cache / info.stage / str(info.version)
        if self._local_copy_ok(local, info.manifest):
            return local
        tmp = self.cache / info.stage / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            for rel, meta in info.manifest.get("files", {}).items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.s3.download(self._key(info.stage, info.version, rel), tmp / rel)
                if _sha256(tmp / rel) != meta.get("sha256"):
                    raise StoreConfigError(
                        f"{info.uri}/{rel} does not match its manifest's sha256: the object was "
                        "changed outside moonforge; delete that version and rebuild it")
            _write_json_atomic(tmp / MANIFEST, info.manifest)  # last: the local copy is complete
            shutil.rmtree(local, ignore_errors=True)
            try:
                os.rename(tmp, local)
            except OSError:  # a concurrent reader finished first; its copy is as good
                if not self._local_copy_ok(local, info.manifest):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return local

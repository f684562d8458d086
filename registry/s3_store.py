"""The artifact store on S3 (`s3://bucket/prefix`, any S3-compatible endpoint), via boto3.

Same protocol as LocalStore (begin -> the stage writes locally -> commit | abort); the bucket
mirrors the local layout:

    <prefix>/<stage>/<n>/.claim          put first, conditionally (If-None-Match: *): reserves n
    <prefix>/<stage>/<n>/<files>         the staged files (multipart above the threshold)
    <prefix>/<stage>/<n>/manifest.json   put LAST: the commit mark
    <prefix>/<stage>/.partial-<fp16>/    a run's newest periodic checkpoint, uploaded while it
                                         trains (partial.json, put last, names it)
    <prefix>/<stage>/.lease-<fp16>       who builds that fingerprint now (registry.lease)

S3 has no rename and no lock, so visibility and numbering work differently from LocalStore: a
version is visible only once its manifest exists (lookups read manifests, nothing else), and a
version number is reserved by the conditional `.claim` put, so two writers never share a prefix.
A crash mid-upload leaves a claimed prefix without a manifest: never listed, never a cache hit,
and its number is never reused. (Concurrent writers of the *same* fingerprint may both commit;
lookups then return the older one; the lease makes that rare.)

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from moonforge.registry.errors import ArtifactNotFound
from moonforge.registry.lease import LEASE_PREFIX, Lease, WaitFn, lease_ttl_s, this_process
from moonforge.registry.s3_bucket import (
    S3Bucket,
    S3Settings,
    StoreConfigError,
    StoreUnavailable,
    is_precondition_failure,
    parse_s3_uri,
)
from moonforge.registry.store import (
    _STAGE_RE,
    LINEAGE,
    MANIFEST,
    PARTIAL_PREFIX,
    TMP_PREFIX,
    TRAIN_STATE_DIR,
    ArtifactInfo,
    ArtifactStore,
    Sidecars,
    _sha256,
    _write_json_atomic,
)
from moonforge.stages.train.train_record import latest_checkpoint, read_train_record

__all__ = ["S3Store", "S3ArtifactInfo", "S3Settings", "StoreConfigError", "StoreUnavailable", "parse_s3_uri"]

log = logging.getLogger("moonforge.registry.s3")

CLAIM = ".claim"
PARTIAL_MARK = "partial.json"


class S3ArtifactInfo(ArtifactInfo):
    """A committed artifact in an S3 store. `path` is its local copy, fetched on first access
    (so listing versions or resolving refs downloads nothing); `uri` is where it lives."""

    _store: S3Store  # set in __init__, like the frozen dataclass's fields

    def __init__(self, store: S3Store, stage: str, version: int, manifest: dict):
        # ArtifactInfo is a frozen dataclass whose `path` we replace with a lazy property.
        for k, v in (
            ("stage", stage),
            ("version", version),
            ("manifest", manifest),
            ("fingerprint", manifest["fingerprint"]),
            ("_store", store),
        ):
            object.__setattr__(self, k, v)

    @property
    def path(self) -> Path:
        return self._store.materialize(self)

    @property
    def uri(self) -> str:
        return self._store.uri_of(self.stage, self.version)

    def lineage(self) -> dict:
        return self._store.read_sidecar(self, LINEAGE) or {}

    def __repr__(self) -> str:
        return f"S3ArtifactInfo({self.ref}, {self.uri}, fp={self.fingerprint[:12]})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3ArtifactInfo) and (self.uri, self.fingerprint) == (
            other.uri,
            other.fingerprint,
        )

    def __hash__(self) -> int:
        return hash((self.uri, self.fingerprint))


class S3Store(ArtifactStore):
    """Artifacts under `s3://bucket/prefix`, staged and read through a local `cache_dir`."""

    def __init__(self, uri: str, cache_dir: str | Path, settings: S3Settings | None = None):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.root_uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.cache = Path(cache_dir).resolve()
        self.local_root = self.cache
        self._staging_locks = {}
        self.s3 = S3Bucket(self.bucket, settings)
        self._manifests: dict[tuple[str, int], dict] = {}  # immutable once committed
        self._synced: dict[tuple[str, str], str] = {}  # (stage, fp16) -> checkpoint uploaded

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
        return self._begin_local(stage)

    def _claim(self, stage: str) -> int:
        """Reserve the next version number of `stage` with a conditional put (no lock on S3)."""
        dirs, _ = self.s3.list(self._key(stage) + "/")
        n = max((int(d) for d in dirs if d.isdigit()), default=0) + 1
        while True:
            try:
                self.s3.put_json(
                    self._key(stage, n, CLAIM),
                    {"claimed": time.time(), "host": socket.gethostname(), "pid": os.getpid()},
                    only_if_new=True,
                )
                return n
            except ClientError as e:  # 412: another writer holds n (or 409: racing for it)
                if not is_precondition_failure(e):
                    raise
                n += 1

    def commit(
        self, staging: Path, fingerprint: str, inputs: Mapping[str, Any], sidecars: Sidecars | None = None
    ) -> ArtifactInfo:
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
            "uri": uri,
        }
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
        self._unlock_staging(staging)
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
            log.warning(
                "could not delete %d uploaded objects of a failed commit (%s); they are "
                "invisible without a manifest",
                len(keys),
                type(e).__name__,
            )

    def abort(self, staging: Path, keep: bool = False) -> None:
        staging = Path(staging)
        if not keep and staging.name.startswith(TMP_PREFIX):
            shutil.rmtree(staging, ignore_errors=True)
        self._unlock_staging(staging)

    # -- leases ------------------------------------------------------------------------------
    def lease(self, stage: str, fingerprint: str, wait: WaitFn | None = None, poll_s: float = 1.0) -> Lease:
        """Create `<stage>/.lease-<fp16>` conditionally; take over one not renewed for its ttl."""
        if not _STAGE_RE.match(stage):
            raise ValueError(f"invalid stage name {stage!r} for the store")
        key = self._key(stage, f"{LEASE_PREFIX}{fingerprint[:16]}")
        ttl = lease_ttl_s()
        while True:
            info = {**this_process(), "id": uuid.uuid4().hex, "acquired": time.time(), "ttl_s": ttl}
            try:
                etag = self.s3.put_json(key, info, only_if_new=True)
                return S3Lease(self, key, stage, fingerprint, info, None, etag)
            except ClientError as e:
                if not is_precondition_failure(e):
                    raise
            held, etag, age = self.s3.get_json_meta(key)
            if held is None and not etag:
                continue  # released in between
            if age is not None and age > float((held or {}).get("ttl_s") or ttl):
                try:  # expired: exactly one waiter's conditional put replaces it
                    new = self.s3.put_json(key, info, if_match=etag)
                except ClientError as e:
                    if not is_precondition_failure(e):
                        raise
                    continue
                log.warning(
                    "%s: the lease of %s expired %.0f s after its last renewal (its "
                    "holder died); taking over",
                    stage,
                    _who(held or {}),
                    age,
                )
                return S3Lease(self, key, stage, fingerprint, info, held or {}, new)
            if wait is not None:
                wait(held or {})
            time.sleep(poll_s)

    # -- a run's periodic checkpoints ----------------------------------------------------------
    def _partial_key(self, stage: str, fingerprint: str, *rest: str) -> str:
        return self._key(stage, f"{PARTIAL_PREFIX}{fingerprint[:16]}", *rest)

    def sync_partial(self, stage: str, fingerprint: str) -> None:
        """Upload the newest complete local checkpoint (hard-linked first, so the loop's rotation
        cannot delete it mid-upload), then the mark naming it, then delete the older one."""
        work = self.work_dir(stage, fingerprint)
        ck = latest_checkpoint(work / TRAIN_STATE_DIR)
        if ck is None or self._synced.get((stage, fingerprint[:16])) == ck.name:
            return
        snap = work / f".sync-{ck.name}"
        shutil.rmtree(snap, ignore_errors=True)
        try:
            snap.mkdir(parents=True)
            for f in ck.iterdir():
                os.link(f, snap / f.name)
        except FileNotFoundError:  # rotated away meanwhile: the next beat uploads the newer one
            shutil.rmtree(snap, ignore_errors=True)
            return
        try:
            files = sorted(f.name for f in snap.iterdir())
            for name in files:
                self._upload(snap / name, self._partial_key(stage, fingerprint, ck.name, name))
            rec = read_train_record(snap)
            self.s3.put_json(
                self._partial_key(stage, fingerprint, PARTIAL_MARK),
                {
                    "checkpoint": ck.name,
                    "files": files,
                    "phase": rec.phase,
                    "step": rec.step,
                    "num_steps": rec.num_steps,
                    "global_step": rec.global_step,
                },
            )  # last: complete
        finally:
            shutil.rmtree(snap, ignore_errors=True)
        self._synced[(stage, fingerprint[:16])] = ck.name
        _, keys = self.s3.list(self._partial_key(stage, fingerprint) + "/", None)
        stale = [k for k in keys if f"/{ck.name}/" not in k and not k.endswith(PARTIAL_MARK)]
        if stale:
            self.s3.delete(stale)

    def resume_point(self, stage: str, fingerprint: str) -> Path | None:
        """The newer of the local and the uploaded last checkpoint (downloaded if needed)."""
        work = self.work_dir(stage, fingerprint)
        local = latest_checkpoint(work / TRAIN_STATE_DIR)
        mark = self.s3.get_json(self._partial_key(stage, fingerprint, PARTIAL_MARK))
        if not mark or not mark.get("checkpoint"):
            return local
        newest = int(mark.get("global_step", 0))
        if local is not None and read_train_record(local).global_step >= newest:
            return local
        tmp = self._begin_local(stage)
        try:
            for name in mark["files"]:
                self.s3.download(self._partial_key(stage, fingerprint, mark["checkpoint"], name), tmp / name)
            dest = work / TRAIN_STATE_DIR / mark["checkpoint"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            os.rename(tmp, dest)
        finally:
            self.abort(tmp)
        self._synced[(stage, fingerprint[:16])] = mark["checkpoint"]
        log.info(
            "%s: fetched the checkpoint %s of an earlier run from %s",
            stage,
            mark["checkpoint"],
            self.root_uri,
        )
        return latest_checkpoint(work / TRAIN_STATE_DIR)

    def drop_partial(self, stage: str, fingerprint: str) -> None:
        shutil.rmtree(self.work_dir(stage, fingerprint), ignore_errors=True)
        self._synced.pop((stage, fingerprint[:16]), None)
        try:  # after a successful commit: a leftover only costs space (gc retries)
            _, keys = self.s3.list(self._partial_key(stage, fingerprint) + "/", None)
            if keys:
                self.s3.delete(keys)
        except Exception as e:
            log.warning("could not delete kept checkpoints of %s from %s: %s", stage, self.root_uri, e)

    def partial_work(self, stage: str, fingerprint: str) -> dict | None:
        out = self._local_partial(stage, fingerprint)
        mark = self.s3.get_json(self._partial_key(stage, fingerprint, PARTIAL_MARK))
        if mark and mark.get("checkpoint") and (out is None or out["global_step"] < mark["global_step"]):
            out = {
                "checkpoint": f"{self.root_uri}/{stage}/{PARTIAL_PREFIX}{fingerprint[:16]}/"
                f"{mark['checkpoint']}",
                **{k: mark.get(k) for k in ("phase", "step", "num_steps", "global_step")},
            }
        held, _, age = self.s3.get_json_meta(self._key(stage, f"{LEASE_PREFIX}{fingerprint[:16]}"))
        live = held and age is not None and age <= float(held.get("ttl_s") or 0)
        running = held if live else None
        if out is None and running is None:
            return None
        return {**(out or {"checkpoint": None}), "running": running}

    def gc(self, stage: str) -> list[Path]:
        """Local cache as for a local store; in the bucket, the uploaded checkpoints of
        fingerprints that are committed."""
        removed = super().gc(stage)
        if not _STAGE_RE.match(stage):
            return removed
        dirs, _ = self.s3.list(self._key(stage) + "/")
        committed = {a.fingerprint[:16] for a in self.versions(stage)}
        for d in dirs:
            if d.startswith(PARTIAL_PREFIX) and d[len(PARTIAL_PREFIX) :] in committed:
                _, keys = self.s3.list(self._key(stage, d) + "/", None)
                if keys:
                    self.s3.delete(keys)
                    removed.append(Path(self._key(stage, d)))
        return removed

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
            s = "s3://" + s[len("s3:/") :]  # Path() collapses the double slash
        if s.startswith("s3://"):
            return self._open_uri(s)
        p = Path(s).expanduser().resolve()
        if p.parent.parent == self.cache and p.name.isdigit():
            a = self._info(p.parent.name, int(p.name))
            if a is not None:
                return a
        raise ArtifactNotFound(
            f"no artifact at {p}: it is not a local copy of an artifact of "
            f"{self.root_uri}; existing artifacts: {self.describe()}"
        )

    def _open_uri(self, uri: str) -> ArtifactInfo:
        bucket, key = parse_s3_uri(uri)
        rest = key[len(self.prefix) :].strip("/") if key.startswith(self.prefix) else None
        parts = rest.split("/") if rest is not None else []
        if bucket != self.bucket or len(parts) != 2 or not parts[1].isdigit():
            raise ArtifactNotFound(
                f"{uri} is not an artifact of this store ({self.root_uri}/<stage>/<version>); "
                f"point MOONFORGE_STORE at its store, or use stage@version (existing: "
                f"{self.describe()})"
            )
        a = self._info(parts[0], int(parts[1]))
        if a is None:
            raise ArtifactNotFound(
                f"no committed artifact at {uri} (no manifest.json); existing: {self.describe()}"
            )
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
        tmp = self._begin_local(info.stage)  # flock-ed: gc leaves a live download alone
        try:
            for rel, meta in info.manifest.get("files", {}).items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.s3.download(self._key(info.stage, info.version, rel), tmp / rel)
                if _sha256(tmp / rel) != meta.get("sha256"):
                    raise StoreConfigError(
                        f"{info.uri}/{rel} does not match its manifest's sha256: the object was "
                        "changed outside moonforge; delete that version and rebuild it"
                    )
            _write_json_atomic(tmp / MANIFEST, info.manifest)  # last: the local copy is complete
            shutil.rmtree(local, ignore_errors=True)
            try:
                os.rename(tmp, local)
            except OSError:  # a concurrent reader finished first; its copy is as good
                if not self._local_copy_ok(local, info.manifest):
                    raise
        finally:
            self.abort(tmp)
        return local


def _who(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


class S3Lease(Lease):
    """A lease object in the bucket, renewed with puts conditional on its own ETag."""

    def __init__(
        self,
        store: S3Store,
        key: str,
        stage: str,
        fingerprint: str,
        info: dict,
        previous: dict | None,
        etag: str,
    ):
        super().__init__(stage, fingerprint, info, previous)
        self.store, self.key, self.etag = store, key, etag

    def renew(self) -> bool:
        with self._lock:
            if self.lost or not self.etag:
                return False
            self.info["renewed"] = time.time()
            try:
                self.etag = self.store.s3.put_json(self.key, self.info, if_match=self.etag)
            except ClientError as e:
                if not is_precondition_failure(e):
                    raise
                self.lost = True
                return False
        return True

    def release(self) -> None:
        with self._lock:
            if self.lost or not self.etag:
                return
            try:
                self.store.s3.delete_if_match(self.key, self.etag)
            except Exception as e:  # it expires by itself
                log.warning(
                    "could not release the lease %s (%s); it expires in %.0f s",
                    self.key,
                    e,
                    float(self.info.get("ttl_s") or 0),
                )
            self.etag = ""

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

Endpoint, region and credentials come from boto3's standard chain (AWS_ENDPOINT_URL,
AWS_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...); they are never logged
and never put in an error message. Each request is retried by botocore's "standard" mode
(exponential backoff with jitter on connection errors, throttling and 5xx); what still fails
becomes StoreUnavailable (transient: Prefect retries the task) or StoreConfigError (a missing
bucket, missing or rejected credentials: retrying cannot help).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt

from moonforge.registry.errors import ArtifactNotFound
from moonforge.registry.store import (LINEAGE, MANIFEST, PARTIAL_PREFIX, TMP_PREFIX,
                                      TRAIN_STATE_DIR, ArtifactInfo, ArtifactStore, Sidecars,
                                      _sha256, _STAGE_RE, _write_json_atomic)

log = logging.getLogger("moonforge.registry.s3")

CLAIM = ".claim"
PARTIAL_MARK = "partial.json"
MB = 1 << 20


class StoreUnavailable(ConnectionError):
    """The S3 endpoint could not be reached (or kept failing) after every retry. Transient."""


class StoreConfigError(RuntimeError):
    """The store is misconfigured (missing bucket, missing or rejected credentials). Permanent."""


class S3Settings(BaseModel):
    """How the S3 store talks to the endpoint (where it is comes from the AWS environment)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_attempts: PositiveInt = 5
    """Attempts per request, the first included (botocore standard retry mode)."""
    connect_timeout_s: PositiveFloat = 5.0
    """Seconds to wait for a TCP connection before the attempt counts as failed."""
    read_timeout_s: PositiveFloat = 60.0
    """Seconds to wait for response bytes before the attempt counts as failed."""
    multipart_threshold_mb: PositiveInt = 64
    """Files at least this big go up as multipart uploads (S3's minimum part size is 5 MB)."""
    multipart_chunksize_mb: PositiveInt = 64
    """Part size of multipart uploads and ranged downloads."""
    max_concurrency: PositiveInt = 8
    """Parallel part transfers per file."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix"); ValueError naming the fix."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI; use s3://bucket[/prefix]")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket; use s3://bucket[/prefix]")
    return bucket, prefix.strip("/")


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
        self.settings = settings or S3Settings()
        self._client: Any = None
        self._manifests: dict[tuple[str, int], dict] = {}  # immutable once committed

    def __repr__(self) -> str:
        return f"S3Store({self.root_uri!r})"

    def where(self) -> str:
        return self.root_uri

    # -- the connection ----------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            s = self.settings
            cfg = Config(retries={"total_max_attempts": s.max_attempts, "mode": "standard"},
                         connect_timeout=s.connect_timeout_s, read_timeout=s.read_timeout_s)
            with self._errors("connect to"):
                self._client = boto3.session.Session().client("s3", config=cfg)
        return self._client

    @property
    def endpoint(self) -> str:
        try:
            return self.client.meta.endpoint_url
        except StoreConfigError:
            return os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"

    @property
    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        return TransferConfig(multipart_threshold=s.multipart_threshold_mb * MB,
                              multipart_chunksize=s.multipart_chunksize_mb * MB,
                              max_concurrency=s.max_concurrency)

    @contextmanager
    def _errors(self, action: str, key: str = "") -> Iterator[None]:
        """botocore/s3transfer failures -> StoreUnavailable / StoreConfigError naming the
        endpoint, bucket and the fix (credentials never appear: botocore does not put them in
        its messages and we add none)."""
        try:
            yield
        except (StoreUnavailable, StoreConfigError, ArtifactNotFound):
            raise
        except Exception as e:
            mapped = self._translate(e, action, key)
            if mapped is None:
                raise
            raise mapped from e

    def _translate(self, e: Exception, action: str, key: str) -> Exception | None:
        from botocore import exceptions as bx

        where = f"s3://{self.bucket}/{key}" if key else self.root_uri
        if isinstance(e, bx.ProfileNotFound):
            return StoreConfigError(f"cannot {action} {where}: {e}; set AWS_PROFILE to a profile "
                                    "in ~/.aws/config, or unset it and use AWS_ACCESS_KEY_ID / "
                                    "AWS_SECRET_ACCESS_KEY")
        if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return StoreConfigError(
                f"cannot {action} {where}: no AWS credentials found ({type(e).__name__}); set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming a profile "
                "with credentials (endpoint: AWS_ENDPOINT_URL)")
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError,
                          bx.ReadTimeoutError, bx.ConnectionClosedError)):
            return StoreUnavailable(
                f"cannot {action} {where}: the S3 endpoint {self.endpoint} did not answer after "
                f"{self.settings.max_attempts} attempts with backoff ({type(e).__name__}). Check "
                "that it is up and that AWS_ENDPOINT_URL (or the profile's endpoint_url) points at "
                "it; nothing was committed, and rerunning resumes")
        client_error = e if isinstance(e, bx.ClientError) else None
        cause = e.__cause__ or e.__context__  # s3transfer wraps ClientError in S3UploadFailedError
        if client_error is None and isinstance(cause, bx.ClientError):
            client_error = cause
        if client_error is None:
            return None
        err = client_error.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StoreConfigError(
                f"cannot {action} {where}: bucket {self.bucket!r} does not exist at "
                f"{self.endpoint}; create it (`aws s3 mb s3://{self.bucket}`) or point "
                "MOONFORGE_STORE at an existing bucket")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                    "ExpiredToken", "InvalidToken") or status == 403:
            return StoreConfigError(
                f"cannot {action} {where}: S3 at {self.endpoint} refused the credentials ({code}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that they "
                f"may read and write bucket {self.bucket!r}")
        if isinstance(status, int) and (status >= 500 or code in ("SlowDown", "Throttling")):
            return StoreUnavailable(
                f"cannot {action} {where}: S3 at {self.endpoint} kept failing ({code}, HTTP "
                f"{status}) after {self.settings.max_attempts} attempts; retry later")
        return None

    # -- keys and small objects ------------------------------------------------------------
    def _key(self, *parts: object) -> str:
        return "/".join(p for p in (self.prefix, *map(str, parts)) if p)

    def uri_of(self, stage: str, version: int) -> str:
        return f"s3://{self.bucket}/{self._key(stage, version)}"

    def _get_json(self, key: str) -> dict | None:
        """The JSON object at `key`, or None when it does not exist (or is not a JSON object)."""
        with self._errors("read", key):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                return None
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    def _put_json(self, key: str, obj: Any, only_if_new: bool = False) -> None:
        body = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        extra = {"IfNoneMatch": "*"} if only_if_new else {}
        with self._errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                   ContentType="application/json", **extra)

    def _list(self, prefix: str, delimiter: str | None = "/") -> tuple[list[str], list[str]]:
        """(sub-"directory" names, object keys) directly under `prefix` (which ends in "/")."""
        dirs: list[str] = []
        keys: list[str] = []
        kw = {"Bucket": self.bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
        with self._errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(**kw):
                dirs += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
                keys += [o["Key"] for o in page.get("Contents", [])]
        return dirs, keys

    def _delete(self, keys: list[str]) -> None:
        with self._errors("delete", keys[0] if keys else ""):
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})

    def _upload(self, path: Path, key: str) -> None:
        with self._errors("upload to", key):
            self.client.upload_file(str(path), self.bucket, key, Config=self._transfer)

    def _download(self, key: str, path: Path) -> None:
        with self._errors("download", key):
            self.client.download_file(self.bucket, key, str(path), Config=self._transfer)

    # -- writing ------------------------------------------------------------------------------
    def begin(self, stage: str) -> Path:
        if not _STAGE_RE.match(stage):
            raise ValueError(f"invalid stage name {stage!r} for the store")
        staging = self.cache / stage / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        return staging

    def _claim(self, stage: str) -> int:
        """Reserve the next version number of `stage` with a conditional put (no lock on S3)."""
        from botocore.exceptions import ClientError

        dirs, _ = self._list(self._key(stage) + "/")
        n = max((int(d) for d in dirs if d.isdigit()), default=0) + 1
        while True:
            try:
                self._put_json(self._key(stage, n, CLAIM), {
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
            self._put_json(self._key(stage, version, MANIFEST), manifest)  # last: the commit mark
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
            self._delete(keys)
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
            self._put_json(f"{base}/{PARTIAL_MARK}", {"files": files})  # last: complete
        except Exception as e:
            log.warning("kept the failed run's checkpoints locally at %s only; uploading them "
                        "to %s failed: %s", dest, self.root_uri, e)
        return dest

    def partial(self, stage: str, fingerprint: str) -> Path | None:
        local = self.cache / stage / self._partial_name(fingerprint)
        if any((local / TRAIN_STATE_DIR).glob("step-*")):
            return local
        base = self._key(stage, self._partial_name(fingerprint))
        mark = self._get_json(f"{base}/{PARTIAL_MARK}")
        if not mark or not mark.get("files"):
            return None
        tmp = self.cache / stage / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        for rel in mark["files"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            self._download(f"{base}/{rel}", tmp / rel)
        shutil.rmtree(local, ignore_errors=True)
        os.rename(tmp, local)
        return local

    def drop_partial(self, stage: str, fingerprint: str) -> None:
        shutil.rmtree(self.cache / stage / self._partial_name(fingerprint), ignore_errors=True)
        try:  # after a successful commit: a leftover only costs space
            _, keys = self._list(self._key(stage, self._partial_name(fingerprint)) + "/", None)
            if keys:
                self._delete(keys)
        except Exception as e:
            log.warning("could not delete kept checkpoints of %s from %s: %s", stage,
                        self.root_uri, e)

    # -- reading ------------------------------------------------------------------------------
    def _manifest(self, stage: str, version: int) -> dict | None:
        m = self._manifests.get((stage, version))
        if m is None:
            m = self._get_json(self._key(stage, version, MANIFEST))
            if not m or m.get("fingerprint") is None or m.get("version") != version:
                return None  # no (or a malformed) manifest: not an artifact
            self._manifests[(stage, version)] = m
        return m

    def _info(self, stage: str, version: int) -> S3ArtifactInfo | None:
        m = self._manifest(stage, version)
        return None if m is None else S3ArtifactInfo(self, stage, version, m)

    def stages(self) -> list[str]:
        dirs, _ = self._list(self._key() + "/" if self.prefix else "")
        return sorted(d for d in dirs if _STAGE_RE.match(d) and self.versions(d))

    def versions(self, stage: str) -> list[ArtifactInfo]:
        if not _STAGE_RE.match(stage):
            return []
        dirs, _ = self._list(self._key(stage) + "/")
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
        return self._get_json(self._key(info.stage, info.version, name))

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
                self._download(self._key(info.stage, info.version, rel), tmp / rel)
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

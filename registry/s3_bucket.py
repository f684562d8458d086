"""One S3 bucket through boto3: retried requests, and failures turned into errors that say what to fix.

Endpoint, region and credentials come from boto3's standard chain (AWS_ENDPOINT_URL,
AWS_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...); they are never logged
and never put in an error message. Each request is retried by botocore's "standard" mode
(exponential backoff with jitter on connection errors, throttling and 5xx); what still fails
becomes StoreUnavailable (transient: Prefect retries the task) or StoreConfigError (a missing
bucket, missing or rejected credentials: retrying cannot help). boto3 is imported lazily.
"""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt

from moonforge.registry.errors import ArtifactNotFound

MB = 1 << 20


class StoreUnavailable(ConnectionError):
    """The S3 endpoint could not be reached (or kept failing) after every retry. Transient."""


class StoreConfigError(RuntimeError):
    """The store is misconfigured (missing bucket, missing or rejected credentials). Permanent."""


class S3Settings(BaseModel):
    """How to talk to the endpoint (where it is comes from the AWS environment)."""

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
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket; use s3://bucket[/prefix]")
    return bucket, prefix.strip("/")


def is_precondition_failure(e: Exception) -> bool:
    """A conditional write lost its race (412 PreconditionFailed, 409
    ConditionalRequestConflict)."""
    code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


class S3Bucket:
    """get/put/list/delete/upload/download on one bucket, each call retried, errors explained."""

    def __init__(self, bucket: str, settings: S3Settings | None = None):
        self.bucket = bucket
        self.settings = settings or S3Settings()
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            s = self.settings
            # total_max_attempts counts the first try; botocore's "max_attempts" would not
            cfg = Config(
                retries={"total_max_attempts": s.max_attempts, "mode": "standard"},
                connect_timeout=s.connect_timeout_s,
                read_timeout=s.read_timeout_s,
            )
            with self.errors("connect to"):
                self._client = boto3.session.Session().client("s3", config=cfg)
        return self._client

    @property
    def endpoint(self) -> str:
        if self._client is not None:
            return self._client.meta.endpoint_url
        return os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"

    @property
    def transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        return TransferConfig(
            multipart_threshold=s.multipart_threshold_mb * MB,
            multipart_chunksize=s.multipart_chunksize_mb * MB,
            max_concurrency=s.max_concurrency,
        )

    @contextmanager
    def errors(self, action: str, key: str = "") -> Iterator[None]:
        """botocore / s3transfer failures -> StoreUnavailable / StoreConfigError naming the
        endpoint, the object and the fix. Others pass through unchanged."""
        try:
            yield
        except (StoreUnavailable, StoreConfigError, ArtifactNotFound):
            raise
        except Exception as e:
            mapped = self.explain(e, action, f"s3://{self.bucket}/{key}")
            if mapped is None:
                raise
            raise mapped from e

    def explain(self, e: Exception, action: str, where: str) -> Exception | None:
        from botocore import exceptions as bx

        if isinstance(e, bx.ProfileNotFound):
            return StoreConfigError(
                f"cannot {action} {where}: {e}; set AWS_PROFILE to a profile "
                "in ~/.aws/config, or unset it and use AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return StoreConfigError(
                f"cannot {action} {where}: no AWS credentials found ({type(e).__name__}); set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming a profile "
                "with credentials (endpoint: AWS_ENDPOINT_URL)"
            )
        if isinstance(
            e,
            (
                bx.EndpointConnectionError,
                bx.ConnectTimeoutError,
                bx.ReadTimeoutError,
                bx.ConnectionClosedError,
            ),
        ):
            return StoreUnavailable(
                f"cannot {action} {where}: the S3 endpoint {self.endpoint} did not answer after "
                f"{self.settings.max_attempts} attempts with backoff ({type(e).__name__}). Check "
                "that it is up and that AWS_ENDPOINT_URL (or the profile's endpoint_url) points at "
                "it; nothing was committed, and rerunning resumes"
            )
        client_error = e if isinstance(e, bx.ClientError) else None
        cause = e.__cause__ or e.__context__  # s3transfer wraps ClientError in S3UploadFailedError
        if client_error is None and isinstance(cause, bx.ClientError):
            client_error = cause
        if client_error is None:
            return None
        code = str(client_error.response.get("Error", {}).get("Code", ""))
        status = client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StoreConfigError(
                f"cannot {action} {where}: bucket {self.bucket!r} does not exist at "
                f"{self.endpoint}; create it (`aws s3 mb s3://{self.bucket}`) or point "
                "MOONFORGE_STORE at an existing bucket"
            )
        if (
            code
            in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken")
            or status == 403
        ):
            return StoreConfigError(
                f"cannot {action} {where}: S3 at {self.endpoint} refused the credentials ({code}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that they "
                f"may read and write bucket {self.bucket!r}"
            )
        if isinstance(status, int) and (status >= 500 or code in ("SlowDown", "Throttling")):
            return StoreUnavailable(
                f"cannot {action} {where}: S3 at {self.endpoint} kept failing ({code}, HTTP "
                f"{status}) after {self.settings.max_attempts} attempts; retry later"
            )
        return None

    # -- operations ----------------------------------------------------------------------------
    def get_json(self, key: str) -> dict | None:
        """The JSON object at `key`, or None when it does not exist (or is not a JSON object)."""
        with self.errors("read", key):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                return None
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    def put_json(self, key: str, obj: Any, only_if_new: bool = False, if_match: str | None = None) -> str:
        """Write `obj` at `key` and return its ETag. only_if_new: fail with ClientError
        PreconditionFailed (412) when the key exists (S3 conditional write, If-None-Match: *);
        if_match: fail the same way unless the object's ETag is still `if_match`."""
        body = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        extra: dict[str, str] = {"IfNoneMatch": "*"} if only_if_new else {}
        if if_match is not None:
            extra["IfMatch"] = if_match
        with self.errors("write", key):
            return self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType="application/json", **extra
            ).get("ETag", "")

    def get_json_meta(self, key: str) -> tuple[dict | None, str, float | None]:
        """(JSON object or None, ETag, seconds since it was last written by the server's clock
        when it says its time, else by ours). (None, "", None) when the key does not exist."""
        import email.utils
        import time

        with self.errors("read", key):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=key)
            except self.client.exceptions.NoSuchKey:
                return None, "", None
            body = resp["Body"].read()
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        modified = resp.get("LastModified")
        age = now - modified.timestamp() if modified is not None else None
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        return (obj if isinstance(obj, dict) else None), resp.get("ETag", ""), age

    def delete_if_match(self, key: str, etag: str) -> bool:
        """Delete `key` only while its ETag is `etag`; False when it changed or is gone."""
        from botocore.exceptions import ClientError

        with self.errors("delete", key):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag)
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                if is_precondition_failure(e) or code in ("NoSuchKey", "404"):
                    return False
                raise
        return True

    def list(self, prefix: str, delimiter: str | None = "/") -> tuple[list[str], list[str]]:
        """(sub-"directory" names, object keys) under `prefix` (which ends in "/" or is "")."""
        dirs: list[str] = []
        keys: list[str] = []
        kw = {"Bucket": self.bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
        with self.errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(**kw):
                dirs += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
                keys += [o["Key"] for o in page.get("Contents", [])]
        return dirs, keys

    def delete(self, keys: builtins.list[str]) -> None:  # `list` here is the method above
        with self.errors("delete", keys[0] if keys else ""):
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
                )

    def upload(self, path: Path, key: str) -> None:
        """One file; multipart above the threshold (s3transfer aborts the upload on failure)."""
        with self.errors("upload to", key):
            self.client.upload_file(str(path), self.bucket, key, Config=self.transfer)

    def download(self, key: str, path: Path) -> None:
        with self.errors("download", key):
            self.client.download_file(self.bucket, key, str(path), Config=self.transfer)

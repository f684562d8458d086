"""S3 everywhere it belongs, against a real local S3 API (moto_server on 127.0.0.1):
the artifact store on s3://, MLflow artifacts on s3://, the DVC remote on s3://, and the bad
inputs (endpoint down, bucket missing, credentials missing, a crash mid-upload)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from botocore.exceptions import EndpointConnectionError

from moonforge.registry.errors import ArtifactNotFound, is_transient
from moonforge.registry.s3_bucket import S3Settings, StoreConfigError, StoreUnavailable
from moonforge.registry.s3_store import S3ArtifactInfo, S3Store
from moonforge.registry.store import MANIFEST, open_store

FAST = S3Settings(max_attempts=3, connect_timeout_s=2, read_timeout_s=10)


def put(store, stage: str, fp: str, payload: bytes = b"weights") -> S3ArtifactInfo:
    staging = store.begin(stage)
    (staging / "model.safetensors").write_bytes(payload)
    (staging / "sub").mkdir()
    (staging / "sub" / "x.txt").write_text("x")
    return store.commit(
        staging,
        fp,
        {"fp": fp},
        sidecars=lambda v: {
            "lineage.json": {"version": v, "upstream": {"stage": "up", "version": 3, "path": "/x"}}
        },
    )


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    out = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in out.get("Contents", []))


def count_attempts(store: S3Store, operation: str) -> list[str]:
    """Every HTTP attempt of `operation` (retries included) appends its key."""
    seen: list[str] = []
    store.client.meta.events.register(
        f"before-send.s3.{operation}", lambda request, **kw: seen.append(request.url)
    )
    return seen


def test_commit_is_visible_with_manifest_last_and_reads_back_through_a_fresh_cache(s3_env, tmp_path):
    _, bucket, client = s3_env
    store = S3Store(f"s3://{bucket}/runs/a", tmp_path / "cache1", FAST)
    a = put(store, "sft", "a" * 64)
    b = put(store, "sft", "b" * 64, b"other")
    assert (a.version, b.version) == (1, 2) and b.uri == f"s3://{bucket}/runs/a/sft/2"
    assert keys(client, bucket, "runs/a/sft/2/") == [
        "runs/a/sft/2/.claim",
        "runs/a/sft/2/lineage.json",
        "runs/a/sft/2/manifest.json",
        "runs/a/sft/2/model.safetensors",
        "runs/a/sft/2/sub/x.txt",
    ]
    m = json.loads(client.get_object(Bucket=bucket, Key="runs/a/sft/2/manifest.json")["Body"].read())
    assert (
        m["fingerprint"] == "b" * 64
        and m["uri"] == b.uri
        and set(m["files"]) == {"lineage.json", "model.safetensors", "sub/x.txt"}
    )
    lin = json.loads(client.get_object(Bucket=bucket, Key="runs/a/sft/2/lineage.json")["Body"].read())
    assert lin["uri"] == b.uri and lin["upstream"]["uri"] == f"s3://{bucket}/runs/a/up/3"

    # Another machine: empty cache, nothing local; everything comes from the bucket.
    other = S3Store(f"s3://{bucket}/runs/a", tmp_path / "cache2", FAST)
    assert other.stages() == ["sft"] and [x.version for x in other.versions("sft")] == [1, 2]
    hit = other.lookup("sft", "a" * 64)
    assert hit.ref == "sft@1" and hit.lineage()["uri"] == a.uri
    assert not (tmp_path / "cache2" / "sft" / "1").exists()  # lookups download nothing
    assert (hit.path / "model.safetensors").read_bytes() == b"weights"
    assert hit.path == tmp_path / "cache2" / "sft" / "1" and (hit.path / MANIFEST).exists()
    assert other.resolve("sft@latest").version == 2 and other.resolve("sft@" + "b" * 6).version == 2
    assert other.resolve(f"s3://{bucket}/runs/a/sft/1").fingerprint == "a" * 64
    assert other.open_path(hit.path).version == 1  # a local copy maps back to its artifact
    with pytest.raises(ArtifactNotFound, match=r"not an artifact of this store \(s3://.*/runs/a/<stage>"):
        other.resolve(f"s3://{bucket}/elsewhere/sft/1")
    with pytest.raises(ArtifactNotFound, match="no committed artifact at .*sft/9"):
        other.resolve(f"s3://{bucket}/runs/a/sft/9")
    assert put(other, "sft", "a" * 64).version == 1  # same fingerprint: the existing artifact


def test_a_local_copy_that_differs_from_the_bucket_is_fetched_again(s3_env, tmp_path):
    _, bucket, client = s3_env
    store = S3Store(f"s3://{bucket}", tmp_path / "cache", FAST)
    a = put(store, "sft", "a" * 64)
    (a.path / "model.safetensors").write_bytes(b"stale")
    (a.path / MANIFEST).write_text("{}")  # e.g. left over from a bucket that was emptied
    fresh = S3Store(f"s3://{bucket}", tmp_path / "cache", FAST).lookup("sft", "a" * 64)
    assert (fresh.path / "model.safetensors").read_bytes() == b"weights"
    client.put_object(Bucket=bucket, Key="sft/1/model.safetensors", Body=b"tampered")
    shutil.rmtree(tmp_path / "cache" / "sft" / "1")
    with pytest.raises(StoreConfigError, match="does not match its manifest's sha256"):
        _ = S3Store(f"s3://{bucket}", tmp_path / "cache", FAST).lookup("sft", "a" * 64).path
    assert not (tmp_path / "cache" / "sft" / "1").exists()


def test_big_files_go_up_as_multipart_uploads(s3_env, tmp_path):
    _, bucket, client = s3_env
    store = S3Store(
        f"s3://{bucket}", tmp_path / "cache", S3Settings(multipart_threshold_mb=5, multipart_chunksize_mb=5)
    )
    a = put(store, "sft", "c" * 64, b"\x01" * (6 << 20))
    etag = client.head_object(Bucket=bucket, Key="sft/1/model.safetensors")["ETag"]
    assert etag.strip('"').endswith("-2")  # S3's multipart ETag: md5-of-parts "-" part count
    assert (
        S3Store(f"s3://{bucket}", tmp_path / "c2").lookup("sft", a.fingerprint).path / "model.safetensors"
    ).stat().st_size == 6 << 20


def test_endpoint_down_during_commit_retries_then_clear_error_and_nothing_visible(s3_env, tmp_path):
    endpoint, bucket, client = s3_env
    store = S3Store(f"s3://{bucket}/p", tmp_path / "cache", FAST)
    first = put(store, "sft", "a" * 64)
    attempts: list[str] = []

    def outage(request, **kw):  # the endpoint drops exactly when the manifest goes up
        if request.url.endswith("/manifest.json"):
            attempts.append(request.url)
            raise EndpointConnectionError(endpoint_url=request.url)

    store.client.meta.events.register("before-send.s3.PutObject", outage)
    staging = store.begin("sft")
    (staging / "model.safetensors").write_bytes(b"new weights")
    with pytest.raises(StoreUnavailable) as ei:
        store.commit(staging, "d" * 64, {})
    msg = str(ei.value)
    assert len(attempts) == FAST.max_attempts == 3
    assert endpoint in msg and f"s3://{bucket}/p/sft/2/manifest.json" in msg
    assert "after 3 attempts" in msg and "AWS_ENDPOINT_URL" in msg and "nothing was committed" in msg
    assert is_transient(ei.value)  # Prefect retries the task
    assert staging.exists()  # run_stage aborts (or keeps) it; the commit never consumed it
    fresh = S3Store(f"s3://{bucket}/p", tmp_path / "other", FAST)
    assert [a.ref for a in fresh.versions("sft")] == [first.ref]
    assert fresh.lookup("sft", "d" * 64) is None
    assert keys(client, bucket, "p/sft/2/") == ["p/sft/2/.claim"]  # uploaded files cleaned up
    store.client.meta.events.unregister("before-send.s3.PutObject", outage)
    assert store.commit(staging, "d" * 64, {}).version == 3  # a claimed number is never reused


def test_a_crash_mid_upload_leaves_no_visible_artifact(s3_env, tmp_path):
    _, bucket, client = s3_env
    store = S3Store(f"s3://{bucket}", tmp_path / "cache", FAST)
    staging = store.begin("align")
    for name in ("a.bin", "b.bin", "c.bin"):
        (staging / name).write_bytes(name.encode())
    real_upload = store._upload
    done: list[str] = []

    def killed_after_one(path, key):
        if done:
            raise KeyboardInterrupt  # the process is interrupted between two uploads
        real_upload(path, key)
        done.append(key)

    store._upload = killed_after_one
    with pytest.raises(KeyboardInterrupt):
        store.commit(staging, "e" * 64, {})
    assert store.versions("align") == [] and store.lookup("align", "e" * 64) is None
    # A hard kill skips even the cleanup: a claimed prefix with files but no manifest.
    client.put_object(Bucket=bucket, Key="align/1/a.bin", Body=b"half")
    client.put_object(Bucket=bucket, Key="align/1/manifest.json", Body=b"{not json")
    client.put_object(Bucket=bucket, Key="align/2/model.safetensors", Body=b"half")
    fresh = S3Store(f"s3://{bucket}", tmp_path / "other", FAST)
    assert fresh.versions("align") == [] and fresh.stages() == []
    with pytest.raises(ArtifactNotFound, match="stage 'align' has no committed versions"):
        fresh.resolve("align@latest")
    assert put(fresh, "align", "e" * 64).version == 3  # 1 claimed, 2 has files: both skipped


def test_two_writers_never_share_a_version_number(s3_env, tmp_path, monkeypatch):
    _, bucket, _ = s3_env
    a = S3Store(f"s3://{bucket}", tmp_path / "a", FAST)
    b = S3Store(f"s3://{bucket}", tmp_path / "b", FAST)
    assert a._claim("sft") == 1
    monkeypatch.setattr(b.s3, "list", lambda prefix, delimiter="/": ([], []))  # a stale listing
    assert b._claim("sft") == 2  # the conditional put on sft/1/.claim was refused (412)


def test_a_runs_checkpoints_go_to_the_bucket_for_a_resume_elsewhere(s3_env, tmp_path):
    import torch

    from moonforge.model.config import VLMConfig
    from moonforge.stages.train.checkpoint import read_train_record, save_train_state

    _, bucket, client = s3_env
    store = S3Store(f"s3://{bucket}", tmp_path / "a", FAST)
    work = store.work_dir("sft", "9" * 64)
    assert work == tmp_path / "a" / "sft" / f".partial-{'9' * 16}"
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    for step in (4, 8):
        save_train_state(
            net,
            VLMConfig(),
            opt,
            step,
            work,
            phase=1,
            global_step=40 + step,
            num_steps=10,
            extra={"loader": [step]},
        )
        store.sync_partial("sft", "9" * 64)  # what the lease heartbeat does while it trains
    uploaded = keys(client, bucket, "sft/")
    assert uploaded and all("/step-0000048/" in k or k.endswith("partial.json") for k in uploaded)
    other = S3Store(f"s3://{bucket}", tmp_path / "b", FAST)  # a rerun on another node
    assert other.partial_work("sft", "9" * 64)["step"] == 8
    got = other.resume_point("sft", "9" * 64)
    rec = read_train_record(got)
    assert (got.name, rec.phase, rec.step, rec.extra) == ("step-0000048", 1, 8, {"loader": [8]})
    assert other.versions("sft") == [] and other.resume_point("sft", "8" * 64) is None
    other.drop_partial("sft", "9" * 64)
    assert keys(client, bucket, "sft/") == [] and not other.work_dir("sft", "9" * 64).exists()


def test_unreachable_endpoint_is_retried_then_named_with_the_fix(s3_env, tmp_path, monkeypatch):
    from conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    store = S3Store("s3://some-bucket/x", tmp_path / "cache", FAST)
    tries = count_attempts(store, "ListObjectsV2")
    with pytest.raises(StoreUnavailable, match=rf"the S3 endpoint {dead} did not answer after 3 attempts"):
        store.lookup("sft", "a" * 64)
    assert len(tries) == 3


def test_missing_bucket_is_a_clear_permanent_error(s3_env, tmp_path):
    endpoint, _, _ = s3_env
    store = S3Store("s3://no-such-bucket-here/x", tmp_path / "cache", FAST)
    tries = count_attempts(store, "ListObjectsV2")
    with pytest.raises(StoreConfigError) as ei:
        store.lookup("sft", "a" * 64)
    assert f"bucket 'no-such-bucket-here' does not exist at {endpoint}" in str(ei.value)
    assert "aws s3 mb s3://no-such-bucket-here" in str(ei.value) and not is_transient(ei.value)
    assert len(tries) == 1  # nothing to retry
    staging = store.begin("sft")
    (staging / "w").write_bytes(b"w")
    with pytest.raises(StoreConfigError, match="does not exist"):
        store.commit(staging, "a" * 64, {})


def test_missing_credentials_name_the_variables_and_secrets_are_never_logged(
    s3_env, tmp_path, monkeypatch, caplog
):
    _, bucket, _ = s3_env
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3Store(f"s3://{bucket}", tmp_path / "cache", FAST)
    with pytest.raises(
        StoreConfigError,
        match="no AWS credentials found.*set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
    ):
        store.versions("sft")
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    with pytest.raises(StoreConfigError, match="AWS_PROFILE to a profile in ~/.aws/config"):
        S3Store(f"s3://{bucket}", tmp_path / "cache", FAST).versions("sft")
    monkeypatch.delenv("AWS_PROFILE")

    secret = "sekrit-Do-Not-Log-7f3a"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE42")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG)  # botocore's own debug logging included
    store = S3Store(f"s3://{bucket}", tmp_path / "cache", FAST)
    a = put(store, "sft", "f" * 64)
    assert store.lookup("sft", "f" * 64) == a
    with pytest.raises(StoreConfigError) as ei:
        S3Store("s3://missing-bucket-zz", tmp_path / "c2", FAST).versions("sft")
    assert caplog.records and secret not in caplog.text and secret not in str(ei.value)


def test_open_store_maps_s3_uris_to_an_s3_store_with_a_project_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONFORGE_STORE", "s3://bucket/team/prefix/")
    monkeypatch.delenv("MOONFORGE_S3_CACHE", raising=False)
    store = open_store(tmp_path)
    assert isinstance(store, S3Store) and store.where() == "s3://bucket/team/prefix"
    assert store.cache == tmp_path / ".moonforge" / "s3cache" / "bucket" / "team" / "prefix"
    monkeypatch.setenv("MOONFORGE_S3_CACHE", str(tmp_path / "scratch"))
    assert open_store(tmp_path).cache == tmp_path / "scratch" / "bucket" / "team" / "prefix"
    with pytest.raises(ValueError, match="names no bucket; use s3://bucket"):
        open_store(tmp_path, "s3:///prefix")


def test_an_outage_at_commit_fails_the_stage_as_transient_and_a_rerun_succeeds(
    s3_env, tmp_project, fake_stages
):
    from moonforge.registry.errors import StageFailed
    from moonforge.registry.run_stage import run_stage
    from moonforge.registry.tracking import NullTracker
    from moonforge.stages.recipe import load_recipe

    _, bucket, _ = s3_env
    recipe = load_recipe(tmp_project / "recipes" / "mini.yaml", [])
    store = S3Store(f"s3://{bucket}/store", tmp_project / "cache", FAST)

    def outage(request, **kw):
        if request.url.endswith("/manifest.json"):
            raise EndpointConnectionError(endpoint_url=request.url)

    store.client.meta.events.register("before-send.s3.PutObject", outage)
    with pytest.raises(
        StageFailed, match="stage 'lm_pretrain' failed: StoreUnavailable: .*after 3 attempts"
    ) as ei:
        run_stage(recipe, "lm_pretrain", tmp_project, tracker=NullTracker(), store=store)
    assert ei.value.transient  # the flow's retry policy retries it; a NaN loss it would not
    assert not list((tmp_project / "cache" / "lm_pretrain").glob(".tmp-*"))  # staging aborted
    assert S3Store(f"s3://{bucket}/store", tmp_project / "c2", FAST).versions("lm_pretrain") == []
    store.client.meta.events.unregister("before-send.s3.PutObject", outage)
    ok = run_stage(recipe, "lm_pretrain", tmp_project, tracker=NullTracker(), store=store)
    assert (ok.ref, ok.cache_hit) == ("lm_pretrain@2", False)
    assert fake_stages.calls == ["lm_pretrain", "lm_pretrain"]


# -- the lifecycle with everything on S3 --------------------------------------------------------


def _dvc(project, *args):
    from moonforge.registry.data_versions import dvc

    return dvc(project, *args)


def _read_json(client, bucket: str, key: str) -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_dvc_remote_on_s3_push_then_pull_into_a_fresh_cache(s3_env, tmp_project):
    endpoint, bucket, client = s3_env
    _dvc(tmp_project, "remote", "add", "-d", "s3store", f"s3://{bucket}/dvc")
    _dvc(tmp_project, "remote", "modify", "s3store", "endpointurl", endpoint)
    assert "Everything is up to date" not in _dvc(tmp_project, "push").stdout
    pushed = keys(client, bucket, "dvc/")
    assert pushed and all(k.startswith("dvc/files/md5/") for k in pushed)
    corpus = (tmp_project / "data" / "text" / "corpus.txt").read_text()
    shutil.rmtree(tmp_project / ".dvc" / "cache")
    shutil.rmtree(tmp_project / "data")
    _dvc(tmp_project, "pull")
    assert (tmp_project / "data" / "text" / "corpus.txt").read_text() == corpus
    assert json.loads(_dvc(tmp_project, "status", "--json").stdout or "{}") == {}

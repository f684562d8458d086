"""The local artifact store: atomic commits, versions, index, ref resolution and its errors."""

from __future__ import annotations

import json
import threading

import pytest

from moonforge.registry.errors import ArtifactNotFound
from moonforge.registry.store import MANIFEST, LocalStore


def put(store: LocalStore, stage: str, fp: str, payload: bytes = b"w") -> object:
    staging = store.begin(stage)
    (staging / "model.safetensors").write_bytes(payload)
    (staging / "sub").mkdir()
    (staging / "sub" / "x.txt").write_text("x")
    return store.commit(staging, fp, {"fp": fp}, sidecars=lambda v: {"lineage.json": {"version": v}})


def test_commit_assigns_increasing_versions_and_writes_manifest(tmp_path):
    store = LocalStore(tmp_path / "store")
    a = put(store, "sft", "a" * 64)
    b = put(store, "sft", "b" * 64, b"ww")
    assert (a.version, b.version) == (1, 2)
    assert b.path == tmp_path / "store" / "sft" / "2"
    m = json.loads((b.path / MANIFEST).read_text())
    assert m["fingerprint"] == "b" * 64 and m["version"] == 2 and m["inputs"] == {"fp": "b" * 64}
    assert m["files"]["model.safetensors"]["size"] == 2 and len(m["files"]["sub/x.txt"]["sha256"]) == 64
    assert json.loads((b.path / "lineage.json").read_text()) == {"version": 2}
    assert store.lookup("sft", "a" * 64).version == 1 and store.latest("sft").version == 2
    assert [x.version for x in store.versions("sft")] == [1, 2] and store.stages() == ["sft"]
    assert not list((tmp_path / "store" / "sft").glob(".tmp-*"))


def test_a_failed_write_is_invisible_and_leaves_earlier_versions_intact(tmp_path):
    store = LocalStore(tmp_path / "store")
    first = put(store, "sft", "a" * 64)
    before = (first.path / "model.safetensors").read_bytes()
    staging = store.begin("sft")
    (staging / "model.safetensors").write_bytes(b"half-written")
    # a crash here (no commit) leaves a .tmp- dir without manifest: never a hit, never listed
    assert store.lookup("sft", "c" * 64) is None
    assert [a.version for a in store.versions("sft")] == [1]
    store.abort(staging)
    assert not staging.exists()
    assert (first.path / "model.safetensors").read_bytes() == before
    assert put(store, "sft", "c" * 64).version == 2  # numbering continues, nothing overwritten


def test_directories_without_a_manifest_are_never_artifacts(tmp_path):
    store = LocalStore(tmp_path / "store")
    put(store, "sft", "a" * 64)
    (tmp_path / "store" / "sft" / "7").mkdir()  # e.g. copied in by hand, no manifest
    (tmp_path / "store" / "sft" / "8").mkdir()
    (tmp_path / "store" / "sft" / "8" / MANIFEST).write_text("{not json")
    assert [a.version for a in store.versions("sft")] == [1]
    with pytest.raises(ArtifactNotFound, match="no readable manifest.json"):
        store.resolve(str(tmp_path / "store" / "sft" / "7"))
    assert put(store, "sft", "b" * 64).version == 9  # never reuses a number that exists on disk


def test_index_is_a_cache_not_the_truth(tmp_path):
    store = LocalStore(tmp_path / "store")
    put(store, "sft", "a" * 64)
    (tmp_path / "store" / "sft" / "index.json").write_text('{"' + "a" * 64 + '": 5}')
    assert store.lookup("sft", "a" * 64).version == 1
    (tmp_path / "store" / "sft" / "index.json").write_text("garbage")
    assert store.lookup("sft", "a" * 64).version == 1


def test_concurrent_commits_of_one_fingerprint_keep_one_version(tmp_path):
    store = LocalStore(tmp_path / "store")
    stagings = [store.begin("sft") for _ in range(4)]
    results = []

    def go(s):
        (s / "w").write_text("w")
        results.append(store.commit(s, "d" * 64, {}).version)

    threads = [threading.Thread(target=go, args=(s,)) for s in stagings]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == [1, 1, 1, 1] and len(store.versions("sft")) == 1
    assert not list((tmp_path / "store" / "sft").glob(".tmp-*"))


def test_ref_resolution_and_errors(tmp_path):
    store = LocalStore(tmp_path / "store")
    a = put(store, "align", "abcd1" + "0" * 59)
    b = put(store, "align", "abcd2" + "0" * 59)
    put(store, "sft", "ef" * 32)
    assert store.resolve("align@latest").version == 2
    assert store.resolve("align").version == 2
    assert store.resolve("align@1").fingerprint == a.fingerprint
    assert store.resolve("align@abcd2").version == 2
    assert store.resolve("align@ABCD1").version == 1
    assert store.resolve(str(b.path)).version == 2
    with pytest.raises(ArtifactNotFound, match=r"ambiguous ref 'align@abcd'.*versions 1 \(abcd1.*2 \(abcd2"):
        store.resolve("align@abcd")
    with pytest.raises(
        ArtifactNotFound, match=r"no artifact 'align@7': align has versions 1 \(abcd1000\), 2"
    ):
        store.resolve("align@7")
    with pytest.raises(
        ArtifactNotFound, match=r"stage 'cooldown' has no committed versions.*align \(1, 2\), sft \(1\)"
    ):
        store.resolve("cooldown@latest")
    with pytest.raises(ArtifactNotFound, match="no align fingerprint starts with 'ffff'"):
        store.resolve("align@ffff")
    with pytest.raises(ArtifactNotFound, match="fingerprint prefix of >= 4"):
        store.resolve("align@ab")
    with pytest.raises(ArtifactNotFound, match="the path does not exist"):
        store.resolve(str(tmp_path / "nowhere"))
    with pytest.raises(ArtifactNotFound, match="not supported by this store yet"):
        store.resolve("models:/tiny@champion")
    assert LocalStore(tmp_path / "empty").describe() == "nothing yet"

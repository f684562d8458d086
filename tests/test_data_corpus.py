"""Text corpus and needle documents: schema, provenance (stdlib only, no site-packages), quality
labels, needle placement, and byte-determinism."""

from __future__ import annotations

from test_data_helpers import tiny_data, tree_digest

from moonforge.stages.data.corpus import build_text
from moonforge.stages.data.longdoc import build_longdoc
from moonforge.stages.data.params import LongdocParams, TextParams
from moonforge.stages.data.records import read_longdoc_records, read_text_records
from moonforge.stages.data.stdlib_text import stdlib_files, stdlib_root


def test_stdlib_files_exclude_third_party_and_tests():
    root = stdlib_root()
    files = stdlib_files()
    assert len(files) > 200
    parts = {part for f in files for part in f.relative_to(root).parts[:-1]}
    assert not parts & {"site-packages", "dist-packages", "test", "tests"}
    assert files == stdlib_files()  # fixed order


def test_text_mixes_sources_and_marks_a_high_quality_subset():
    data = tiny_data() / "text"
    train, val = read_text_records(data, "train"), read_text_records(data, "val")
    assert train and val
    assert {r.source for r in train} == {"stdlib", "generated"}
    high = [r for r in train if r.quality == "high"]
    assert 0 < len(high) < len(train)
    assert not {r.text for r in train} & {r.text for r in val}
    assert any("assert" in r.text for r in train if r.source == "stdlib")


def test_text_build_is_byte_deterministic(tmp_path):
    params = TextParams(max_stdlib_chars=20_000, num_generated=50)
    build_text(params, tmp_path / "a")
    build_text(params, tmp_path / "b")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_needle_is_inserted_once_with_a_separate_question():
    for split in ("train", "val"):
        for r in read_longdoc_records(tiny_data() / "longdoc", split):
            assert r.text.count(r.needle) == 1 and r.text.count("secret code") == 1
            assert r.needle == f"The secret code of the {r.needle_key} is {r.needle_value}."
            assert r.answer == r.needle_value and r.needle_key in r.question
            assert r.answer not in r.question
            assert abs(r.text.index(r.needle) / len(r.text) - r.depth) < 1e-3
            assert 1000 <= len(r.text) <= 6000 + len(r.needle) + 1


def test_longdoc_build_is_byte_deterministic(tmp_path):
    params = LongdocParams(num_train=3, num_val=2, min_chars=500, max_chars=2000, pool_chars=100_000)
    build_longdoc(params, tmp_path / "a")
    build_longdoc(params, tmp_path / "b")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")

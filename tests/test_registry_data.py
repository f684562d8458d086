"""DVC data versions through the real dvc CLI on a temp project."""

from __future__ import annotations

import shutil

import pytest
import yaml

from moonforge.registry import data_versions
from moonforge.registry.data_versions import DatasetError, ensure_datasets, read_lock


def test_read_lock_gives_each_dataset_its_pinned_md5(tmp_project):
    refs = read_lock(tmp_project)
    lock = yaml.safe_load((tmp_project / "dvc.lock").read_text())
    assert set(refs) == {"text", "toyworld"}
    assert refs["text"].digest == lock["stages"]["text"]["outs"][0]["md5"]
    assert refs["text"].digest.endswith(".dir") and refs["text"].path == tmp_project / "data" / "text"


def test_ensure_rebuilds_only_when_needed(tmp_project, monkeypatch):
    calls = []
    real = data_versions.dvc

    def spy(root, *args, **kw):
        calls.append(args[0])
        return real(root, *args, **kw)

    monkeypatch.setattr(data_versions, "dvc", spy)
    before = ensure_datasets(tmp_project, ["text"])["text"]
    assert calls == ["status"]  # up to date: no repro
    ensure_datasets(tmp_project, ["text"])
    assert calls == ["status"]  # remembered for this process until dvc.yaml / dvc.lock change

    shutil.rmtree(tmp_project / "data" / "text")
    again = ensure_datasets(tmp_project, ["text"])["text"]
    assert calls[-1] == "repro" and again.digest == before.digest and again.path.exists()

    (tmp_project / "params.yaml").write_text(yaml.safe_dump({"text_repeat": 5, "toy_items": 4}))
    data_versions._VERIFIED.clear()
    changed = ensure_datasets(tmp_project, ["text", "toyworld"])
    assert calls[-2:] == ["status", "repro"]
    assert changed["text"].digest != before.digest
    assert "the cat sat " * 5 == (tmp_project / "data" / "text" / "corpus.txt").read_text()


def test_missing_dvc_stage_names_the_dataset_and_the_fix(tmp_project):
    with pytest.raises(
        DatasetError,
        match=r"dataset 'sft' has no dvc stage and no data/sft.dvc: add "
        r"your own data with `moonforge data add sft PATH --format "
        r"F`, or a stage named 'sft' with `outs: \[data/sft\]` to "
        r"dvc.yaml \(stages: text, toyworld\)",
    ):
        ensure_datasets(tmp_project, ["text", "sft"])
    with pytest.raises(DatasetError, match="dataset 'sft' has no dvc stage"):
        read_lock(tmp_project, ["sft"])


def test_unreadable_lock_or_pipeline_is_a_dataset_error(tmp_project):
    (tmp_project / "dvc.lock").write_text("stages: [unclosed")
    with pytest.raises(DatasetError, match="cannot read dvc.lock"):
        read_lock(tmp_project, ["text"])
    (tmp_project / "dvc.lock").unlink()
    with pytest.raises(DatasetError, match="no dvc.lock.*moonforge data build"):
        read_lock(tmp_project, ["text"])
    (tmp_project / "dvc.yaml").unlink()
    with pytest.raises(DatasetError, match="no dvc.yaml"):
        ensure_datasets(tmp_project, ["text"])

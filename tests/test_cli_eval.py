"""`moonforge eval REF`: held-out answer accuracy of a real checkpoint through the CLI."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import REPO
from typer.testing import CliRunner

from moonforge.flows.cli import app
from moonforge.model.vlm import build_vlm
from moonforge.registry.store import open_store
from moonforge.stages.recipe import load_recipe
from moonforge.stages.train.checkpoint import save_weights


@pytest.fixture
def project(tmp_path, repo_data, monkeypatch):
    """A project dir reading the repo's pinned datasets, with one real (random-init) tiny
    checkpoint committed to its store as sft@1."""
    shutil.copy(repo_data.parent / "dvc.lock", tmp_path / "dvc.lock")  # the lock that built them
    (tmp_path / "data").symlink_to(repo_data)
    monkeypatch.delenv("MOONFORGE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(REPO / "recipes" / "tiny.yaml").model
    store = open_store(tmp_path)
    staging = store.begin("sft")
    save_weights(build_vlm(cfg, seed=0), cfg, staging)
    store.commit(staging, "e" * 64, {"stage": "sft"})
    return tmp_path


def test_eval_reports_heldout_accuracy_of_a_checkpoint(project):
    res = CliRunner().invoke(app, ["eval", "sft@1", "--examples", "8", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert "sft@1: rl_prompts/val" in res.output
    n = re.search(r"eval/n\s+(\d+)\s", res.output)  # the table, one metric a row
    assert n and int(n.group(1)) == 8, res.output  # 4 text + 4 image prompts
    for key in ("eval/acc", "eval/text_acc", "eval/image_acc", "eval/mean_len"):
        assert key in res.output
    args = ["eval", "sft@1", "--examples", "8", "--max-new-tokens", "4", "--format", "json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)["metrics"]
    assert metrics["eval/n"] == 8 and 1 <= metrics["eval/mean_len"] <= 4  # capped by --max-new-tokens


def test_eval_of_a_missing_ref_names_it(project):
    res = CliRunner().invoke(app, ["eval", "sft@7"])
    assert res.exit_code == 1 and "sft@7" in res.output


def test_eval_video_reports_video_qa_against_shuffled_frames_and_the_majority(project):
    args = [
        "eval",
        "sft@1",
        "--examples",
        "2",
        "--max-new-tokens",
        "4",
        "--video",
        "--clips",
        "2",
        "--frames",
        "4",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "sft@1: rl_prompts/val, videoworld/val" in res.output
    for key in ("eval/video_qa_acc", "eval/video_qa_acc_shuffled", "eval/video_qa_majority"):
        assert key in res.output
    res = CliRunner().invoke(app, [*args, "--format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    got = {k: v for k, v in out["metrics"].items() if k.startswith("eval/video_qa_")}
    assert out["ref"] == "sft@1" and got["eval/video_qa_n"] >= 2
    assert 0 < got["eval/video_qa_majority"] <= 1
    types = {k.split("_")[2] for k in got if k.endswith("_acc") and k != "eval/video_qa_acc"}
    assert types and types <= {"direction", "order", "crossings", "count"}
    for t in types:  # each asked type reports both the clip's and the shuffled frames' accuracy
        assert 0 <= got[f"eval/video_qa_{t}_acc"] <= 1 and f"eval/video_qa_{t}_acc_shuffled" in got

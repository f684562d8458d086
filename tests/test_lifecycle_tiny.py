"""The whole tiny lifecycle (lm_pretrain .. long2short) end to end, for real.

One session-scoped run of `moonforge run recipes/tiny.yaml` (all stages) in a temp copy of
the project (its own git repo, DVC pipeline, MLflow SQLite file and artifact store), through the
real Prefect API, MLflow and DVC. The tests then assert what the issue promises: visible learning,
a bit-identical LM after alignment, the long-context lengths and RoPE base, MLflow parent/child
runs with params, metrics and dataset inputs, a rerun that makes its downstream stale, lineage
back to the DVC hashes and git commit, and an all-cache-hit second run.

Thresholds (measured on the 2-core CPU, with margin; the README's "What the tiny run shows"):
stage-1 image->text retrieval >= 3x chance over 128 distinct captions; held-out text loss lower
after joint pretraining than before it, and lower again after the cooldown; SFT VQA accuracy at
least 5 points above the pre-SFT model (measured 0 -> 9.4%); RL held-out reasoning accuracy at
least 3 points above its long-CoT start (measured 10.6 -> 17.1%); long2short mean response length
at least 10% shorter (measured 31.2 -> 25.0 tokens, -20%) with accuracy within 2 points (the
stage's acc_tolerance; measured 17.1 -> 18.7%).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from moonforge.flows.cli import app

from conftest import copy_project

pytestmark = pytest.mark.slow

PRETRAIN = ["lm_pretrain", "vit_pretrain", "align", "joint_pretrain", "cooldown", "long_context"]
POSTTRAIN = ["sft", "long_cot_sft", "rl", "long2short"]
STAGES = PRETRAIN + POSTTRAIN


def _cli(*args: str):
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, prefect_api):
    """A temp project that has run the whole tiny lifecycle once."""
    import os

    proj = copy_project(tmp_path_factory.mktemp("tiny") / "proj", (
        "text", "toyworld", "longdoc", "tokenizer", "sft", "reasoning", "rl_prompts"))
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", "MOONFORGE_STORE")}
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        out = _cli("run", "recipes/tiny.yaml")
        yield proj, out
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v


def _eval(proj: Path, ref: str) -> dict:
    stage, version = ref.split("@")
    return json.loads((proj / ".moonforge/store" / stage / version / "eval.json").read_text())


def test_every_stage_ran_and_the_summary_says_where_to_look(tiny_project):
    proj, out = tiny_project
    for stage in STAGES:
        assert f"{stage}@1" in out
    assert "mlflow ui" in out and "moonforge lineage" in out


def test_stage1_retrieval_is_well_above_chance(tiny_project):
    m = _eval(tiny_project[0], "vit_pretrain@1")
    assert m["eval/retrieval_chance"] == pytest.approx(1 / 128)
    assert m["eval/retrieval_acc"] >= 3 * m["eval/retrieval_chance"], m


def test_heldout_text_loss_falls_through_joint_pretrain_and_cooldown(tiny_project):
    joint, cool = _eval(tiny_project[0], "joint_pretrain@1"), _eval(tiny_project[0], "cooldown@1")
    assert joint["eval/text_loss"] < joint["eval/text_loss_before"], joint
    assert cool["eval/text_loss"] < cool["eval/text_loss_before"], cool
    assert cool["eval/text_loss"] < joint["eval/text_loss_before"]


def test_alignment_leaves_the_lm_bit_identical(tiny_project):
    store = tiny_project[0] / ".moonforge/store"
    before = load_file(str(store / "vit_pretrain/1/model.safetensors"))
    after = load_file(str(store / "align/1/model.safetensors"))
    lm_keys = [k for k in before if k.startswith("lm.")]
    assert lm_keys and all(before[k].equal(after[k]) for k in lm_keys)
    assert any(not before[k].equal(after[k]) for k in before if k.startswith("projector."))


def test_long_context_runs_at_4x_and_16x_with_the_new_rope_base(tiny_project):
    proj = tiny_project[0]
    m = _eval(proj, "long_context@1")
    assert (m["train/sub0_seq_len"], m["train/sub1_seq_len"]) == (4 * 256, 16 * 256)
    cfg = json.loads((proj / ".moonforge/store/long_context/1/model_config.json").read_text())
    assert cfg["lm"]["rope_theta"] == 800000.0 and cfg["lm"]["max_position_embeddings"] == 4096
    earlier = json.loads((proj / ".moonforge/store/cooldown/1/model_config.json").read_text())
    assert earlier["lm"]["rope_theta"] == 50000.0


def test_mlflow_holds_a_parent_run_with_a_child_per_stage(tiny_project):
    from mlflow import MlflowClient

    proj = tiny_project[0]
    client = MlflowClient(f"sqlite:///{proj}/.moonforge/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) >= 1
    first = min(parents, key=lambda r: r.info.start_time)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id]
    assert sorted(r.data.tags["moonforge.stage"] for r in children) == sorted(STAGES)
    for child in children:
        assert child.data.params and child.data.metrics, child.data.tags["moonforge.stage"]
        assert child.inputs.dataset_inputs, child.data.tags["moonforge.stage"]
    cool = next(c for c in children if c.data.tags["moonforge.stage"] == "cooldown")
    assert cool.data.params["qa_ratio"] == "0.2"
    digests = {d.dataset.name: d.dataset.digest for d in cool.inputs.dataset_inputs}
    lock = (proj / "dvc.lock").read_text()
    assert digests and all(d in lock for d in digests.values())


def test_rerun_makes_downstream_stale_and_lineage_reaches_data_and_git(tiny_project):
    proj = tiny_project[0]
    # sft is the cheapest stage with a trained downstream (~15 s against cooldown's ~30 s)
    out = _cli("rerun", "sft", "--from", "long_context@latest", "--set", "stages.sft.seed=1")
    assert "sft@2" in out
    status = _cli("status", "recipes/tiny.yaml", "--set", "stages.sft.seed=1")
    row = next(line for line in status.splitlines() if "long_cot_sft" in line)
    assert "stale" in row
    chain = json.loads(_cli("lineage", "long_context@latest", "--format", "json"))
    assert [c["stage"] for c in chain] == PRETRAIN[::-1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=proj, capture_output=True,
                          text=True, check=True).stdout.strip()
    lock = (proj / "dvc.lock").read_text()
    for link in chain:
        assert link["git"]["commit"] == head
        for ds in link["datasets"]:
            assert ds["digest"] in lock
    assert "graph LR" in _cli("lineage", "long_context@latest", "--format", "mermaid")


def test_second_run_is_all_cache_hits(tiny_project):
    out = _cli("run", "recipes/tiny.yaml")
    for stage in STAGES:  # the summary row: | stage | stage@1 | cache hit: yes | ...
        assert re.search(rf"{stage}@1\s*\u2502\s*yes\s*\u2502", out), out


def test_chat_answers_about_a_generated_image(tiny_project):
    proj = tiny_project[0]
    image = sorted((proj / "data/toyworld/val/images").glob("*.png"))[0]
    out = _cli("chat", "long_context@latest", "how many circles?", "--image", str(image))
    assert "long_context@1:" in out and "tokens," in out
    bad = CliRunner().invoke(app, ["chat", "long_context@latest", "hi", "--image", "nope.png"])
    assert bad.exit_code == 1 and "nope.png: no such file" in bad.output


def test_sft_lifts_vqa_accuracy_clearly_above_the_pre_sft_model(tiny_project):
    m = _eval(tiny_project[0], "sft@1")
    assert m["eval/vqa_acc"] >= m["eval/vqa_acc_before"] + 0.05, m
    assert m["eval/sft_loss"] < m["eval/sft_loss_before"], m


def test_long_cot_sft_learns_the_traces(tiny_project):
    m = _eval(tiny_project[0], "long_cot_sft@1")
    assert m["eval/cot_loss"] < 0.5 * m["eval/cot_loss_before"], m
    assert m["eval/mean_len"] > 4 * m["eval/mean_len_before"], m  # step-by-step, not one word


def test_rl_raises_heldout_reasoning_accuracy_over_its_long_cot_start(tiny_project):
    proj = tiny_project[0]
    m, start = _eval(proj, "rl@1"), _eval(proj, "long_cot_sft@1")
    assert m["eval/acc_before"] == pytest.approx(start["eval/reasoning_acc"], abs=1e-9)
    assert m["eval/acc"] >= m["eval/acc_before"] + 0.03, m
    assert (proj / ".moonforge/store/rl/1/rl_curves.png").stat().st_size > 10_000


def test_long2short_shortens_answers_at_held_accuracy(tiny_project):
    proj = tiny_project[0]
    m = _eval(proj, "long2short@1")
    assert m["eval/mean_len"] <= 0.9 * m["eval/mean_len_before"], m
    assert m["eval/acc"] >= m["eval/acc_before"] - 0.02, m
    table = json.loads((proj / ".moonforge/store/long2short/1/long2short.json").read_text())
    assert table["chosen"] != "long" and set(table["candidates"]) >= {"long", "merge", "dpo"}


def test_chat_answers_from_the_rl_policy(tiny_project):
    proj = tiny_project[0]
    image = sorted((proj / "data/toyworld/val/images").glob("*.png"))[0]
    out = _cli("chat", "rl@latest", "how many circles?", "--image", str(image))
    assert "rl@1:" in out and "tokens," in out

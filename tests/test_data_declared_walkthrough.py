"""The README's "Bring your own data" walkthrough, for real, in a copy of the project.

A cheap cooldown@1 (the cooldown stage from scratch, 4 steps: the walkthrough starts from
whatever cooldown@latest the user has), then the README's commands as written (the SFT budget
cut with --set to keep the suite fast): examples/make_toy_llava.py writes a LLaVA-format set of toy-world
pictures, `moonforge data add` tracks it with DVC and declares it in recipes/tiny.yaml, `data
check` / `data show` look at it, and `moonforge rerun sft --from cooldown@latest` with the set in
the SFT mixture raises its held-out answer accuracy (shown in the stage summary, recorded in
lineage.json with the records used), and `moonforge eval --dataset` scores the checkpoint on it
exactly as the stage did. Bad input on the CLI: an unknown format, a name taken twice.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_project
from typer.testing import CliRunner

from moonforge.flows.cli import app

pytestmark = pytest.mark.slow

EVAL = {"num_examples": 8, "batch_size": 32}
COOLDOWN = [
    "stages.cooldown.upstream=null",
    "stages.cooldown.num_steps=4",
    f"stages.cooldown.eval={json.dumps(EVAL)}",
]
"""A cooldown@1 in seconds (4 steps from scratch, straight through the registry: no Prefect,
no MLflow) instead of the lifecycle up to it."""
SFT_SHORT = [
    "--set",
    "stages.sft.seq_len=128",
    "--set",
    "stages.sft.phases=[{seq_len: 128, lr: 3.0e-3, min_lr: 3.0e-4, num_steps: 60, warmup_frac: 0.05}]",
    "--set",
    f"stages.sft.eval={json.dumps(EVAL)}",
]
"""The README runs the tiny recipe's full budgets; the test cuts them (the commands are the same)."""


def cli(*args: str, code: int = 0) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == code, res.output
    return res.output


@pytest.fixture(scope="module")
def proj(tmp_path_factory, repo_data):
    proj = copy_project(tmp_path_factory.mktemp("byod") / "proj", ("toyworld", "text", "tokenizer"))
    # a clone's own ignore rules: DVC-tracked data is ignored file by file (data/.gitignore), so
    # the data/<name>.dvc files `moonforge data add` writes can be committed
    (proj / ".gitignore").write_text((REPO / ".gitignore").read_text())
    old = Path.cwd()
    os.chdir(proj)
    env_store = os.environ.pop("MOONFORGE_STORE", None)
    try:
        from moonforge.registry.run_stage import run_stage
        from moonforge.registry.tracking import NullTracker
        from moonforge.stages.recipe import load_recipe

        recipe = load_recipe(proj / "recipes" / "tiny.yaml", COOLDOWN)
        assert run_stage(recipe, "cooldown", proj, tracker=NullTracker()).ref == "cooldown@1"
        yield proj
    finally:
        os.chdir(old)
        if env_store is not None:
            os.environ["MOONFORGE_STORE"] = env_store


def test_readme_walkthrough_sft_learns_the_users_llava_set(proj):
    subprocess.run(
        [sys.executable, "examples/make_toy_llava.py", "downloads/toy_llava"], check=True, capture_output=True
    )
    out = cli(
        "data",
        "add",
        "toy_llava",
        "downloads/toy_llava/llava.json",
        "--format",
        "llava",
        "--images-root",
        "downloads/toy_llava/images",
        "--heldout",
        "32",
    )
    assert "added toy_llava: 240 records (llava), tracked as data/toy_llava.dvc" in out
    assert (proj / "data" / "toy_llava.dvc").is_file() and (proj / "data/toy_llava/images/0000.png").is_file()
    recipe = (proj / "recipes" / "tiny.yaml").read_text()
    assert recipe.startswith("# The embedded default")  # the recipe's own comments survive
    decl = yaml.safe_load(recipe)["datasets"]
    assert decl == [
        {
            "name": "toy_llava",
            "format": "llava",
            "path": "llava.json",
            "images_root": "images",
            "num_heldout": 32,
        }
    ]

    report = json.loads(cli("data", "check", "toy_llava", "--format", "json"))
    assert report["records"] == 240 and report["bad"] == 0 and report["kinds"] == {"chat+image": 240}
    assert report["image_width"]["max"] == 32 and report["tokens"]["max"] < 64
    shown = cli("data", "show", "toy_llava", "-n", "2")
    assert "<|media_pad|> x4<|media_end|>" in shown and "<|im_assistant|>assistant<|im_middle|>" in shown
    assert (proj / "toy_llava-samples.png").is_file()

    out = cli(
        "rerun", "sft", "--from", "cooldown@latest", "--set", "stages.sft.mixture.toy_llava=0.5", *SFT_SHORT
    )
    m = re.search(r"eval/toy_llava_acc=([0-9.]+) -> ([0-9.]+)", out)
    assert m, out  # the stage summary shows it, the upstream model's score first
    lineage = json.loads((proj / ".moonforge/store/sft/1/lineage.json").read_text())
    metrics = lineage["metrics"]
    before, after = metrics["eval/toy_llava_acc_before"], metrics["eval/toy_llava_acc"]
    print(f"toy_llava held-out accuracy: {before:.3f} -> {after:.3f}")
    assert after >= before + 0.3 and abs(after - float(m.group(2))) < 1e-3
    assert abs(before - float(m.group(1))) < 1e-3
    ds = next(d for d in lineage["datasets"] if d["name"] == "toy_llava")
    assert ds["digest"].endswith(".dir") and ds["records"] == 240 and ds["heldout"] == 32
    assert ds["records_used"] > 208 and ds["skipped"] == 0  # more than one epoch of the rest
    assert lineage["config"]["declared"][0]["name"] == "toy_llava"
    from mlflow import MlflowClient

    from moonforge.registry.tracking import tracking_uri

    run = MlflowClient(tracking_uri(proj)).get_run(lineage["mlflow_run_id"])
    inputs = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert inputs["toy_llava"] == ds["digest"][:36]  # MLflow dataset input: name + DVC hash
    assert run.data.metrics["data/toy_llava/records_used"] == ds["records_used"]
    tree = " ".join(cli("lineage", "sft@latest").replace("\u2502", " ").split())
    print(tree[tree.index("data toy_llava") :][:120])
    assert f"used {ds['records_used']} of 240, skipped 0" in tree

    # the CLI scores the checkpoint on the user's set exactly as the stage did
    scored = json.loads(cli("eval", "sft@latest", "--dataset", "toy_llava", "--format", "json"))["metrics"]
    assert scored["eval/toy_llava_n"] == 32 and scored["eval/toy_llava_skipped"] == 0
    assert scored["eval/toy_llava_acc"] == after
    assert "declares no dataset 'nope'" in cli("eval", "sft@latest", "--dataset", "nope", code=1)


def test_data_add_refuses_bad_input_and_leaves_nothing(proj):
    out = cli("data", "add", "bad", "downloads/toy_llava/llava.json", "--format", "nope", code=1)
    assert "format" in out and not (proj / "data" / "bad").exists()
    out = cli("data", "add", "also_bad", "downloads/toy_llava/llava.json", "--format", "messages", code=1)
    assert "llava.json" in out and not (proj / "data" / "also_bad").exists()
    out = cli("data", "add", "toy_llava", "downloads/toy_llava/llava.json", "--format", "llava", code=1)
    assert "already declares a dataset 'toy_llava'" in out

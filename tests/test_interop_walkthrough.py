"""The README's "Start from Hugging Face weights" walkthrough, for real, in a copy of the project.

examples/make_tiny_hf.py saves a tiny random DeepSeek-V3 (+ tokenizer) and SigLIP with
transformers; `moonforge import` both; `moonforge run recipes/tiny-from-hf.yaml --until sft`
trains from them (budgets cut with --set to keep the suite fast; the README runs the full ones);
`moonforge export sft@latest --format hf` gives a checkpoint `AutoModelForCausalLM` loads and
whose greedy tokens equal `moonforge chat`'s. Then the whole VLM goes out in the Kimi-VL layout
and back in, bit-identical, and starts a rerun; a new import makes the chain stale, naming init.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_project
from safetensors.torch import load_file
from typer.testing import CliRunner

from moonforge.flows.cli import app

pytestmark = pytest.mark.slow

SHORT = [
    "--set",
    "stages.vit_pretrain.num_steps=6",
    "--set",
    "stages.align.num_steps=4",
    "--set",
    "stages.joint_pretrain.num_steps=4",
    "--set",
    "stages.cooldown.num_steps=4",
    "--set",
    "stages.long_context.sub_stages=[{seq_len: 512, num_steps: 2}]",
    "--set",
    "stages.sft.phases=[{seq_len: 256, lr: 1.0e-3, min_lr: 1.0e-4, num_steps: 6, warmup_frac: 0.25}]",
    # the closing evals read 8 held-out items (128 by default): this test checks wiring, not skill
    *[
        a
        for s in ("vit_pretrain", "align", "joint_pretrain", "cooldown", "long_context", "sft")
        for a in ("--set", f'stages.{s}.eval={{"num_examples": 8, "batch_size": 8}}')
    ],
]
QUESTION = "How many circles are there?"


def cli(*args: str, code: int = 0) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == code, res.output
    return res.output


@pytest.fixture(scope="module")
def proj(tmp_path_factory, repo_data):
    """A project copy after: make_tiny_hf, both imports and the (short) run up to sft."""
    datasets = ("toyworld", "text", "tokenizer", "rl_prompts", "longdoc", "sft")  # built once a session
    proj = copy_project(tmp_path_factory.mktemp("walk") / "proj", datasets)
    old = Path.cwd()
    os.chdir(proj)
    env_store = os.environ.pop("MOONFORGE_STORE", None)
    try:
        subprocess.run(
            [sys.executable, "examples/make_tiny_hf.py", "out/hf"], check=True, capture_output=True
        )
        cli("import", "out/hf/deepseek_v3", "--name", "moonlight")
        cli("import", "out/hf/siglip", "--name", "siglip")
        cli("run", "recipes/tiny-from-hf.yaml", "--until", "sft", *SHORT)
        yield proj
    finally:
        os.chdir(old)
        if env_store is not None:
            os.environ["MOONFORGE_STORE"] = env_store


def weights(proj: Path, stage: str, version: int) -> dict[str, torch.Tensor]:
    return load_file(str(proj / ".moonforge" / "store" / stage / str(version) / "model.safetensors"))


def test_init_loads_the_imported_weights_and_is_in_the_lineage(proj):
    vit, lm_import = weights(proj, "vit_pretrain", 1), weights(proj, "moonlight", 1)
    lm = {k: v for k, v in vit.items() if k.startswith("lm.")}
    assert lm.keys() == lm_import.keys()
    assert all(torch.equal(lm[k], lm_import[k]) for k in lm)  # frozen in vit_pretrain: the import
    assert vit["vision.pos_emb.weight"].shape == (8, 8, 64)
    lineage = json.loads((proj / ".moonforge/store/vit_pretrain/1/lineage.json").read_text())
    assert {p: i["ref"] for p, i in lineage["init"].items()} == {"lm": "moonlight@1", "vision": "siglip@1"}
    tok = next(d for d in lineage["datasets"] if d["name"] == "tokenizer")
    assert tok["digest"].startswith("import:") and "moonlight/1/tokenizer" in tok["path"]
    tree = cli("lineage", "sft@latest")
    assert "init lm <- moonlight@1" in tree and "init vision <- siglip@1" in tree


def test_exported_lm_generates_what_moonforge_chat_generates(proj):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cli("export", "sft@latest", "--format", "hf", "out/sft")
    assert "deepseek_v3" in out
    model = AutoModelForCausalLM.from_pretrained(proj / "out/sft").eval()
    tok = AutoTokenizer.from_pretrained(proj / "out/sft")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :]
    theirs = tok.decode(gen, skip_special_tokens=True).strip()
    chat = cli("chat", "sft@latest", QUESTION, "--max-new-tokens", "32")
    m = re.search(r"sft@1: (.*)\n\((\d+) tokens", chat, re.S)
    assert m, chat
    stops = set(model.generation_config.eos_token_id)
    n_theirs = next((i for i, t in enumerate(gen.tolist()) if t in stops), len(gen))
    assert m.group(1).strip() == theirs and int(m.group(2)) == n_theirs


def test_vlm_round_trips_through_the_kimi_vl_layout_and_starts_a_rerun(proj):
    cli("export", "sft@latest", "--format", "hf", "out/kimi", "--part", "vlm")
    cfg = json.loads((proj / "out/kimi/config.json").read_text())
    assert cfg["model_type"] == "kimi_vl" and cfg["text_config"]["topk_method"] == "noaux_tc"
    assert cfg["media_placeholder_token_id"] == 2046
    cli("import", "out/kimi", "--name", "kimi")
    a, b = weights(proj, "sft", 1), weights(proj, "kimi", 1)
    assert b.keys() == {k for k in a if not k.startswith("caption.")}
    assert all(torch.equal(a[k], b[k]) for k in b)
    image = next((proj / "data/toyworld/val").rglob("*.png"))
    sft = cli("chat", "sft@latest", "--image", str(image), QUESTION, "--max-new-tokens", "8")
    kimi = cli("chat", "kimi@1", "--image", str(image), QUESTION, "--max-new-tokens", "8")
    assert sft.split(":", 1)[1] == kimi.split(":", 1)[1]
    plan = cli("rerun", "sft", "--recipe", "recipes/tiny-from-hf.yaml", "--from", "kimi@1", "--dry-run")
    assert "run -> sft@2" in plan and "external" in plan and "kimi@1" in plan, plan


def test_a_new_import_makes_the_chain_stale_naming_init(proj):
    status = json.loads(cli("status", "recipes/tiny-from-hf.yaml", *SHORT, "--format", "json"))
    assert {r["stage"]: r["state"] for r in status}["sft"] == "fresh"
    cfg = json.loads((proj / "out/hf/deepseek_v3/config.json").read_text())
    cfg["rms_norm_eps"] = 2e-5  # another checkpoint of the same shape
    (proj / "out/hf/deepseek_v3/config.json").write_text(json.dumps(cfg))
    cli("import", "out/hf/deepseek_v3", "--name", "moonlight")
    rows = {
        r["stage"]: r
        for r in json.loads(cli("status", "recipes/tiny-from-hf.yaml", *SHORT, "--format", "json"))
    }
    assert rows["vit_pretrain"]["state"] == "stale"
    assert "init" in rows["vit_pretrain"]["changed"]
    assert any("init lm changed (moonlight@1 -> moonlight@2)" in r for r in rows["vit_pretrain"]["reasons"])
    assert rows["sft"]["state"] == "stale"

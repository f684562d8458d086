"""`moonforge import` / `moonforge export` on checkpoints transformers builds here (nothing is
downloaded): the store side (versions, cache hits, lineage, nothing partial on bad input), the
tokenizer side (media tokens added, rows grown), and round trips through export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moonforge.flows.cli import app
from moonforge.registry.store import open_store

sys.path.insert(0, str(REPO / "examples"))
import make_tiny_hf  # noqa: E402


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> Path:
    """examples/make_tiny_hf.py's checkpoints (DeepSeek-V3 + tokenizer, SigLIP), made once."""
    out = tmp_path_factory.mktemp("hf")
    make_tiny_hf.deepseek_v3(out / "deepseek_v3")
    make_tiny_hf.siglip(out / "siglip")
    return out


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MOONFORGE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args: str, code: int = 0) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == code, res.output
    return res.output


def _store_is_clean(project: Path, name: str) -> None:
    """No version and no staging directory of `name` is visible in the store."""
    store = open_store(project)
    assert store.versions(name) == []
    root = project / ".moonforge" / "store" / name
    assert not root.exists() or not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_import_versions_fingerprints_and_grows_the_vocabulary(project, hf_dirs):
    out = json.loads(cli("import", str(hf_dirs / "deepseek_v3"), "--name", "moonlight", "--format", "json"))
    assert out["ref"] == "moonlight@1" and not out["cache_hit"] and out["parts"] == ["lm"]
    tok = out["tokenizer"]
    assert tok["dialect"] == "kimi" and tok["original_vocab_size"] == 2044
    assert tok["added_tokens"] == ["<|media_start|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>"]
    assert tok["vocab_size"] == 2048 and tok["embedding_rows_grown"] == 4
    info = open_store(project).resolve("moonlight@1")
    state = load_file(str(info.path / "model.safetensors"))
    src = load_file(str(hf_dirs / "deepseek_v3" / "model.safetensors"))
    emb = state["lm.embed_tokens.weight"]
    assert emb.shape == (2048, 128)
    assert torch.equal(emb[:2044], src["model.embed_tokens.weight"])  # old rows untouched
    assert state["lm.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    lineage = json.loads((info.path / "lineage.json").read_text())
    assert lineage["source"]["model_type"] == "deepseek_v3"
    assert set(lineage["source"]["files"]) == {"config.json", "model.safetensors"}
    # the same files again: a cache hit on the same version
    again = json.loads(cli("import", str(hf_dirs / "deepseek_v3"), "--name", "moonlight", "--format", "json"))
    assert again["cache_hit"] and again["ref"] == "moonlight@1"


def test_export_lm_loads_in_transformers_with_the_same_logits(project, hf_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cli("import", str(hf_dirs / "deepseek_v3"), "--name", "moonlight")
    cli("export", "moonlight@1", "--format", "hf", "out")
    model = AutoModelForCausalLM.from_pretrained("out").eval()
    ref = AutoModelForCausalLM.from_pretrained(hf_dirs / "deepseek_v3").eval()
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, 2044, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert torch.equal(got[..., :2044], want)  # the same weights, the same code: bit-identical
    tok = AutoTokenizer.from_pretrained("out")
    assert tok.convert_tokens_to_ids("<|media_pad|>") == 2046
    card = Path("out/README.md").read_text()
    assert "moonlight@1" in card and "imported from" in card
    # export -> import: the same tensors
    cli("import", "out", "--name", "again")
    a = load_file(str(open_store(project).resolve("moonlight@1").path / "model.safetensors"))
    b = load_file(str(open_store(project).resolve("again@1").path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_a_non_empty_out_and_a_missing_part(project, hf_dirs):
    cli("import", str(hf_dirs / "siglip"), "--name", "siglip")
    Path("out").mkdir()
    Path("out/notes.txt").write_text("keep me")
    assert "not empty" in cli("export", "siglip@1", "out", code=1)
    assert Path("out/notes.txt").read_text() == "keep me"
    assert "holds no LM" in cli("export", "siglip@1", "out2", code=1)
    assert not Path("out2").exists()


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_bad_checkpoints_fail_clearly_and_leave_the_store_clean(project, hf_dirs, tmp_path):
    src = hf_dirs / "deepseek_v3"
    # a tensor whose shape disagrees with config.json
    bad = _copy(src, tmp_path / "bad_shape")
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(128, 100)
    save_file(state, str(bad / "model.safetensors"))
    out = cli("import", str(bad), "--name", "m", code=1)
    assert "model.layers.0.self_attn.o_proj.weight" in out and "[128, 100]" in out and "[128, 128]" in out
    # a rope_scaling kind the model does not implement
    yarn = _copy(src, tmp_path / "yarn")
    cfg = json.loads((yarn / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.get("rope_parameters", {}).update({"rope_type": "yarn", "factor": 4.0})
    (yarn / "config.json").write_text(json.dumps(cfg))
    assert "yarn" in cli("import", str(yarn), "--name", "m", code=1)
    # a tokenizer larger than the embedding
    big = _copy(src, tmp_path / "big_vocab")
    cfg = json.loads((big / "config.json").read_text())
    cfg["vocab_size"] = 2000
    (big / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(big / "model.safetensors"))
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:2000].clone()
    state["lm_head.weight"] = state["lm_head.weight"][:2000].clone()
    save_file(state, str(big / "model.safetensors"))
    out = cli("import", str(big), "--name", "m", code=1)
    assert "2044 tokens" in out and "2000" in out
    # an unsupported architecture lists the supported ones
    gpt = _copy(src, tmp_path / "gpt2")
    cfg = json.loads((gpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (gpt / "config.json").write_text(json.dumps(cfg))
    assert "deepseek_v3, llama, qwen2, siglip" in cli("import", str(gpt), "--name", "m", code=1)
    _store_is_clean(project, "m")


def test_a_lifecycle_stage_name_is_refused_as_import_name(project, hf_dirs):
    assert "lifecycle stage name" in cli("import", str(hf_dirs / "siglip"), "--name", "sft", code=1)


def test_a_registered_import_exports_by_models_alias(project, hf_dirs):
    from moonforge.registry.model_registry import client_for, register

    cli("import", str(hf_dirs / "deepseek_v3"), "--name", "moonlight")
    store = open_store(project)
    client = client_for(project)
    mv = register(client, "moonlight-lm", store.resolve("moonlight@1"), store, project, "imports")
    client.set_registered_model_alias("moonlight-lm", "champion", mv.version)
    assert "deepseek_v3" in cli("export", "models:/moonlight-lm@champion", "out")
    a = load_file(str(store.resolve("moonlight@1").path / "model.safetensors"))
    b = load_file("out/model.safetensors")
    assert torch.equal(a["lm.embed_tokens.weight"], b["model.embed_tokens.weight"])

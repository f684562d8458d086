"""Hugging Face checkpoint directories on disk (registry/hf_files.py): reading shards and indexes,
refusing pickles and missing shards, never running remote code, and writing atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moonforge.model.adapters import SUPPORTED_TYPES, adapter_for
from moonforge.model.adapters.base import InteropError
from moonforge.registry.hf_files import INDEX, read_hf_dir, write_hf_dir, write_weights


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer.{i}.weight": torch.randn(64, 32, generator=g) for i in range(6)}


def _config(path: Path, **extra) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **extra}))


def test_sharded_write_reads_back_identical(tmp_path):
    tensors = _tensors()
    out = tmp_path / "ckpt"
    out.mkdir()
    names = write_weights(out, tensors, max_shard_bytes=3 * 64 * 32 * 4)
    assert INDEX in names and len(names) == 3  # two shards of three tensors + the index
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"]) == set(tensors)
    _config(out)
    ckpt = read_hf_dir(out)
    assert set(ckpt.tensors) == set(tensors)
    assert all(torch.equal(ckpt.tensors[k], v) for k, v in tensors.items())
    assert set(ckpt.files) == {"config.json", *(n for n in names if n != INDEX)}


def test_no_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    save_file(_tensors(), str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(InteropError, match="has no config.json"):
        read_hf_dir(tmp_path / "m")


def test_only_pickle_weights_are_refused_with_the_fix(tmp_path):
    m = tmp_path / "m"
    _config(m)
    torch.save(_tensors(), m / "pytorch_model.bin")
    with pytest.raises(
        InteropError,
        match=r"only pickle weights \['pytorch_model.bin'\].*"
        r"never unpickles.*safetensors",
    ):
        read_hf_dir(m)


def test_missing_shard_named(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    names = write_weights(m, _tensors(), max_shard_bytes=3 * 64 * 32 * 4)
    _config(m)
    (m / names[1]).unlink()
    with pytest.raises(InteropError, match=rf"lists shard\(s\) \['{names[1]}'\].*missing shard"):
        read_hf_dir(m)


def test_remote_code_is_noted_never_run(tmp_path):
    m = tmp_path / "m"
    _config(m, auto_map={"AutoModel": "modeling_evil.Model"})
    save_file(_tensors(), str(m / "model.safetensors"))
    marker = tmp_path / "ran"
    (m / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    ckpt = read_hf_dir(m)
    assert not marker.exists()
    assert any("never executes code" in n for n in ckpt.notes)


def test_unsupported_model_type_lists_the_supported():
    with pytest.raises(InteropError, match="'gpt2' is not supported.*" + ", ".join(SUPPORTED_TYPES)):
        adapter_for("gpt2")


def test_interrupted_write_leaves_nothing_at_out(tmp_path):
    out = tmp_path / "export"

    def fill(tmp: Path) -> None:
        write_weights(tmp, _tensors())
        raise KeyboardInterrupt  # killed midway

    with pytest.raises(KeyboardInterrupt):
        write_hf_dir(out, fill)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too


def test_non_empty_out_refused_without_force_and_kept(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InteropError, match="not empty.*--force"):
        write_hf_dir(out, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (out / "keep.txt").read_text() == "mine"
    write_hf_dir(out, lambda tmp: (tmp / "config.json").write_text("{}"), force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

"""Checkpoint import / export throughput against a plain safetensors load + save of the same tensors.

A synthetic DeepSeek-V3-architecture checkpoint of about --gb GB (fp32, random weights, sharded
with an index like save_pretrained) is written once. Then, side by side in one process, timed
with a warm page cache for every contender (each runs once untimed first):
- baseline: `safetensors` reads every tensor of the shards, then `save_file` writes them again
  into a fresh directory (the least any importer or exporter must do: read once, write once);
- import: `moonforge import` (read, sha256 of the source files for the fingerprint, map to
  moonforge's layout, write the artifact, sha256 manifest, atomic commit into a local store);
- export: `moonforge export --part lm` of that artifact (read, map back to HF names, shard,
  config + model card, atomic rename).
Prints GB/s for each and the ratios import/baseline and export/baseline (goal >= 0.5).

Run: python benchmarks/bench_checkpoint_io.py [--gb 1.0] [--shard-gb 0.4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moonforge.model.adapters import deepseek_v3
from moonforge.model.config import LMConfig
from moonforge.model.lm import MoELM
from moonforge.registry.hf_export import export_checkpoint
from moonforge.registry.hf_files import write_weights
from moonforge.registry.hf_import import import_checkpoint
from moonforge.registry.store import LocalStore


def lm_config(gb: float) -> LMConfig:
    """A Moonlight-shaped MoE LM whose fp32 weights take about `gb` GB (layers scale it)."""
    base = dict(
        vocab_size=32000,
        hidden_size=1024,
        num_heads=8,
        attention="mla",
        head_dim=64,
        kv_lora_rank=256,
        qk_rope_head_dim=32,
        first_k_dense=1,
        dense_intermediate_size=2816,
        num_experts=16,
        num_experts_per_tok=2,
        num_shared_experts=1,
        moe_intermediate_size=704,
        latent_norm_eps=1e-6,
    )
    one = LMConfig(num_layers=2, **base)
    two = LMConfig(num_layers=3, **base)
    per_layer = _nbytes(two) - _nbytes(one)
    layers = max(2, round((gb * 1e9 - (_nbytes(one) - 2 * per_layer)) / per_layer))
    return LMConfig(num_layers=layers, **base)


def _nbytes(cfg: LMConfig) -> int:
    with torch.device("meta"):
        return sum(4 * p.numel() for p in MoELM(cfg).state_dict().values())


def write_source(cfg: LMConfig, out: Path, shard_bytes: int) -> int:
    """Random fp32 weights in the HF DeepSeek-V3 layout + config.json; returns total bytes."""
    with torch.device("meta"):
        shapes = {f"lm.{k}": v.shape for k, v in MoELM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ours = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    hf = deepseek_v3.state_to_hf(ours, {"lm": cfg})
    out.mkdir(parents=True)
    write_weights(out, hf, shard_bytes)
    (out / "config.json").write_text(json.dumps(deepseek_v3.hf_from_parts({"lm": cfg})))
    return sum(t.numel() * t.element_size() for t in hf.values())


def baseline(src: Path, dst: Path) -> None:
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))


def timed(fn, repeats: int) -> float:
    fn()  # warm: page cache, allocator, imports
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--shard-gb", type=float, default=0.4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        cfg = lm_config(args.gb)
        size = write_source(cfg, root / "src", int(args.shard_gb * 1e9))
        shards = len(list((root / "src").glob("*.safetensors")))
        print(
            f"checkpoint: DeepSeek-V3 layout, {cfg.num_layers} layers, {size / 1e9:.2f} GB fp32, "
            f"{shards} shard(s)"
        )
        n = [0]

        def fresh(name: str) -> Path:
            n[0] += 1
            return root / f"{name}{n[0]}"

        def run_import() -> None:  # a fresh store each time, so nothing is a cache hit
            import_checkpoint(root / "src", LocalStore(fresh("store")), "moonlight")

        store = LocalStore(root / "export_store")
        info = import_checkpoint(root / "src", store, "moonlight").info

        def run_export() -> None:
            export_checkpoint(info, fresh("out"), store, part="lm", max_shard_bytes=int(args.shard_gb * 1e9))

        def run_baseline() -> None:
            baseline(root / "src", fresh("base"))

        t_base = timed(run_baseline, args.repeats)
        t_imp = timed(run_import, args.repeats)
        t_exp = timed(run_export, args.repeats)
        gb = size / 1e9
        print(f"{'path':<28}{'best s':>8}{'GB/s':>8}{'ratio':>8}")
        for name, t in (
            ("safetensors load+save", t_base),
            ("moonforge import", t_imp),
            ("moonforge export --part lm", t_exp),
        ):
            print(f"{name:<28}{t:8.2f}{gb / t:8.2f}{t_base / t:8.2f}")
        print(
            f"import/baseline = {t_base / t_imp:.2f}x, export/baseline = {t_base / t_exp:.2f}x "
            "(goal >= 0.5: throughput relative to the plain load + save)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

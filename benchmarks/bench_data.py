"""Declared-data throughput: streaming WebDataset and Parquet against the in-memory path, and the
share of a tiny VLM training step spent waiting for data.

The same N image-caption pairs (toy pictures of 32-64 px, half PNG, half JPEG, written by Pillow)
are stored three ways and read through the code training uses, side by side in one process:
  in-memory   the pairs as a Python list (bytes + caption), documents built from it;
  webdataset  img2dataset-style tar shards (KEY.png / KEY.jpg + KEY.txt + KEY.json), streamed
              through DeclaredSet (HF `datasets`' tar iteration, block-shuffled order);
  parquet     one file of HF Image structs {bytes, path} + a caption column, row groups of 256,
              streamed through DeclaredSet (pyarrow).
samples/s = packed LM micro-batches built per second x documents per batch: each document is
[image placeholder] caption <eos>, images decoded and patched (the tiny recipe's vision: patch 8,
merge 2, <= 64 patches). Then the tiny VLM (recipes/tiny.yaml) trains on the WebDataset stream
with the real loop pieces (train_step, MuonAdamW) and the time spent in next(batches) is compared
with the step itself. Data is built in the training process (no loader workers).

Run: python benchmarks/bench_data.py [--pairs 2000] [--steps 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image, ImageDraw

from moonforge.model.config import VLMConfig
from moonforge.model.tokenizer import Tokenizer
from moonforge.model.vlm import build_vlm
from moonforge.stages.config import OptimizerConfig, ScheduleConfig
from moonforge.stages.data.batches import lm_batches
from moonforge.stages.data.declared import DeclaredDataset
from moonforge.stages.data.sources import Doc, DocSource, VisionSpec
from moonforge.stages.data.user_images import ImageSource, image_size
from moonforge.stages.data.user_mix import DeclaredDocSource, _Images, _SourceRef
from moonforge.stages.data.user_sets import DeclaredSet
from moonforge.stages.train.loop import TrainSpec, TrainState, train_step
from moonforge.stages.train.objectives import lm_loss
from moonforge.stages.train.optim import MuonAdamW

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SEQ_LEN, ROWS = 256, 8


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """(file name, encoded image, caption) of n toy pictures, half PNG and half JPEG."""
    rng, out = random.Random(seed), []
    for i in range(n):
        color = rng.choice(sorted(COLORS))
        w, h = rng.choice((32, 48, 64)), rng.choice((32, 48, 64))
        img = Image.new("RGB", (w, h), (255, 255, 255))
        ImageDraw.Draw(img).ellipse((4, 4, w - 4, h - 4), fill=COLORS[color])
        fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append((f"{i:06d}.{ext}", buf.getvalue(), f"a {color} circle on white, picture {i}"))
    return out


def write_webdataset(pairs, out: Path, per_shard: int = 500) -> None:
    out.mkdir(parents=True)
    for s in range(0, len(pairs), per_shard):
        with tarfile.open(out / f"{s // per_shard:05d}.tar", "w") as tf:
            for name, data, caption in pairs[s : s + per_shard]:
                key, ext = name.split(".")
                for member, blob in (
                    (name, data),
                    (f"{key}.txt", caption.encode()),
                    (f"{key}.json", json.dumps({"caption": caption}).encode()),
                ):
                    info = tarfile.TarInfo(member)
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))


def write_parquet(pairs, out: Path) -> None:
    out.mkdir(parents=True)
    rows = [{"image": {"bytes": data, "path": name}, "text": caption} for name, data, caption in pairs]
    pq.write_table(pa.Table.from_pylist(rows), out / "pairs.parquet", row_group_size=256)


def in_memory_source(pairs, tok: Tokenizer) -> DocSource:
    """The pairs held in a list: documents built exactly as a declared pair set builds them."""
    loader = _Images.__new__(_Images)
    loader.root, loader.skipped, loader.ds = Path("."), 0, None
    sources = [ImageSource(name, data) for name, data, _ in pairs]

    def make(i: int, vision: VisionSpec) -> Doc:
        src = sources[i]
        grid = vision.grid(*image_size(src))
        n = (grid[0] // vision.merge_size) * (grid[1] // vision.merge_size)
        media = tok.media_placeholder(n)
        body = tok.encode(pairs[i][2]) + [tok.eos_id]
        return Doc(
            media + body, [0] * len(media) + [1] * len(body), (_SourceRef(loader, src.uri, grid, src),)
        )

    return DocSource("in_memory", len(pairs), make, loader)


def samples_per_s(source: DocSource, tok: Tokenizer, vision: VisionSpec, batches: int) -> tuple[float, int]:
    it = lm_batches(
        {"s": source},
        lambda s: {"s": 1.0},
        tok,
        SEQ_LEN,
        ROWS,
        0,
        vision.patch_size,
        vision.merge_size,
        vision.max_patches,
    )
    next(it)  # warm up (first block / row group, imports)
    before = it.docs_by_source["s"]
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    took = time.perf_counter() - start
    docs = it.docs_by_source["s"] - before
    return docs / took, docs


def model_and_tok() -> tuple[VLMConfig, Tokenizer]:
    tok = Tokenizer.load(ROOT / "data" / "tokenizer" / "tokenizer.json")
    raw = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())["model"]
    return VLMConfig.model_validate(raw), tok


def wait_share(
    source: DocSource, tok: Tokenizer, mcfg: VLMConfig, vision: VisionSpec, steps: int
) -> tuple[float, float]:
    """(seconds per micro-batch waiting for data, seconds per training step) on the tiny VLM."""
    model = build_vlm(mcfg, seed=0)
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("caption.")]
    spec = TrainSpec(
        num_steps=steps + 2,
        optimizer=OptimizerConfig(lr=1e-3),
        schedule=ScheduleConfig(kind="constant"),
        trainable=("vision", "projector", "lm"),
    )
    state = TrainState(model, MuonAdamW(named, spec.optimizer), spec)
    it = lm_batches(
        {"s": source},
        lambda s: {"s": 1.0},
        tok,
        SEQ_LEN,
        ROWS,
        1,
        vision.patch_size,
        vision.merge_size,
        vision.max_patches,
    )
    model.train()
    waits, computes = [], []
    for step in range(steps + 2):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        train_step(state, [batch], lm_loss, "cpu")
        t2 = time.perf_counter()
        if step >= 2:  # the first steps warm up allocators and the first block
            waits.append(t1 - t0)
            computes.append(t2 - t1)
    return sum(waits) / len(waits), sum(computes) / len(computes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=40, help="Micro-batches timed per path.")
    parser.add_argument("--steps", type=int, default=12, help="Training steps timed.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mcfg, tok = model_and_tok()
    vision = VisionSpec.of(mcfg.vision)
    pairs = make_pairs(args.pairs)
    with tempfile.TemporaryDirectory(prefix="moonforge-bench-data-") as tmp:
        root = Path(tmp)
        write_webdataset(pairs, root / "wds")
        write_parquet(pairs, root / "pq")
        sets = {
            "webdataset": DeclaredSet(
                DeclaredDataset(name="wds", format="webdataset", path="wds/*.tar"), root
            ),
            "parquet": DeclaredSet(DeclaredDataset(name="pq", format="parquet", path="pq"), root),
        }
        sources = {
            "in-memory": in_memory_source(pairs, tok),
            **{k: DeclaredDocSource(ds, tok) for k, ds in sets.items()},
        }
        rates = {}
        for _ in range(2):  # interleaved rounds: machine load hits every path alike
            for name, src in sources.items():
                rate, _ = samples_per_s(src, tok, vision, args.batches)
                rates.setdefault(name, []).append(rate)
        base = max(rates["in-memory"])
        print(
            f"{'path':<12} {'samples/s':>10} {'vs in-memory':>13}   ({args.pairs} pairs, "
            f"{args.batches} micro-batches of {ROWS} x {SEQ_LEN} tokens per path, best of 2)"
        )
        for name, r in rates.items():
            print(f"{name:<12} {max(r):>10.0f} {max(r) / base:>12.2f}x")
        wait, step = wait_share(sources["webdataset"], tok, mcfg, vision, args.steps)
        print(
            f"tiny VLM step on the WebDataset stream: data {wait * 1000:.1f} ms + compute "
            f"{step * 1000:.0f} ms per step -> {wait / (wait + step):.1%} of the step waiting "
            f"for data (goal < 5%)"
        )


if __name__ == "__main__":
    main()

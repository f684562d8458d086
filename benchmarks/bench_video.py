"""Images and video through one MoonViT: tokens/s of a packed batch mixing images and clips
against an image-only batch of the same patch count, side by side in one process.

Both batches hold the same number of 8 x 8-patch grids; in the mixed one half of them are the
temporal patches of 4-patch clips (8 frames each), so a clip is one attention document of 256
patches where an image is one of 64: same projections and MLPs, 4x the attention span for the
video half. Each batch runs the tiny recipe's ViT + projector forward + backward (the joint
pretraining path), timed in alternating rounds; LM tokens/s = merged tokens per second.

With `--stream` (in a project that has built `videoworld`: make demo does), also the clip
dialogue stream of the tiny recipe's SFT motion phase (8 rows of 256 tokens, motion clips of 8
frames): micro-batches built per second with the VideoLoader's clip cache and without it
(cache_bytes=0: every clip decoded and patched again), each stream warmed by one pass over the
clips, against the tiny VLM's forward + backward on the same batches, in alternating rounds. The
forward + backward runs twice: as training does (logits only at the supervised tokens,
model/lm_loss.py) and with logits for every token, as before that change, same loss.

Run: python benchmarks/bench_video.py [--grids 64] [--rounds 5] [--threads 2] [--stream]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from moonforge.model.config import VLMConfig
from moonforge.model.vlm import build_vlm

ROOT = Path(__file__).resolve().parents[1]
CLIP = 4
"""Temporal patches per clip (8 frames)."""


def batch(grids: int, video_share: float, patch_pixels: int, seed: int):
    """(pixels, grid, media_t, media_group) of `grids` 8 x 8 grids, `video_share` of them in clips."""
    g = torch.Generator().manual_seed(seed)
    clips = int(grids * video_share) // CLIP
    images = grids - clips * CLIP
    t = [*[k for _ in range(clips) for k in range(CLIP)], *[0] * images]
    group = [*[c for c in range(clips) for _ in range(CLIP)], *range(clips, clips + images)]
    pixels = torch.rand(grids * 64, patch_pixels, generator=g) * 2 - 1
    return pixels, torch.tensor([[8, 8]] * grids), torch.tensor(t), torch.tensor(group)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="also the SFT clip stream, cache on / off")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = VLMConfig.model_validate(yaml.safe_load((ROOT / "recipes/tiny.yaml").read_text())["model"])
    vlm = build_vlm(cfg, seed=0, attn_backend="sdpa")
    P = 3 * cfg.vision.patch_size**2
    runs = {"images only": batch(args.grids, 0.0, P, 0), "half video": batch(args.grids, 0.5, P, 0)}

    def step(b) -> int:
        tokens = vlm.encode_media(*b)
        tokens.square().mean().backward()
        vlm.zero_grad(set_to_none=True)
        return tokens.shape[0]

    times: dict[str, list[float]] = {k: [] for k in runs}
    counts = {k: step(b) for k, b in runs.items()}  # warm-up; the same token count by construction
    assert len(set(counts.values())) == 1, counts
    for _ in range(args.rounds):
        for name, b in runs.items():
            t0 = time.perf_counter()
            step(b)
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    n = next(iter(counts.values()))
    print(
        f"{args.grids} grids of 8x8 patches ({args.grids * 64} patches, {n} LM tokens), "
        "ViT + projector fwd+bwd"
    )
    for name, t in med.items():
        print(f"{name:>12}: {1e3 * t:8.1f} ms  {n / t:9.0f} LM tokens/s")
    print(f"half video / images only: {med['images only'] / med['half video']:.2f}x the throughput")
    if args.stream:
        clip_stream(vlm, args.rounds)


def clip_stream(vlm, rounds: int, batches: int = 20) -> None:
    """Micro-batches/s of the motion-phase clip stream with and without the clip cache, and the
    VLM's forward + backward on those batches, in alternating rounds of `batches` each."""
    from moonforge.model.lm_loss import IGNORE
    from moonforge.model.tokenizer import Tokenizer
    from moonforge.registry.data_versions import read_lock
    from moonforge.stages.data.batches import lm_batches
    from moonforge.stages.data.video_files import read_video_records
    from moonforge.stages.data.video_sources import video_chat_docs
    from moonforge.stages.train.objectives import lm_forward, lm_loss

    def every_token_loss(b) -> torch.Tensor:  # the logits of all B x L tokens, then the same mean CE
        logits_BLV = lm_forward(vlm, b)
        return torch.nn.functional.cross_entropy(
            logits_BLV.float().flatten(0, 1), b.labels_BL.flatten(), ignore_index=IGNORE
        )

    lock = read_lock(Path.cwd(), ["videoworld", "tokenizer"])
    world, tok = lock["videoworld"].path, Tokenizer.load(lock["tokenizer"].path / "tokenizer.json")
    clips = [r for r in read_video_records(world, "train") if r.kind == "motion"]
    v = vlm.cfg.vision

    def stream(cache_bytes: int):
        src = video_chat_docs(clips, world / "train", tok, 8)
        assert src.loader is not None
        src.loader.cache_bytes = cache_bytes
        return lm_batches(
            {"clips": src},
            lambda s: {"clips": 1.0},
            tok,
            seq_len=256,
            batch_size=8,
            seed=0,
            patch_size=v.patch_size,
            merge_size=v.merge_size,
            max_patches=v.max_patches,
        )

    streams = {"cached": stream(2**30), "no cache": stream(0)}
    for it in streams.values():  # one pass over the clips: the cache holds every one of them
        for _ in range(len(clips) // 30 + 1):
            next(it)
    losses = {"fwd+bwd": lambda b: lm_loss(vlm, b)[0], "every token": every_token_loss}
    times: dict[str, list[float]] = {k: [] for k in [*streams, *losses]}
    supervised = []
    for _ in range(rounds):
        for name, it in streams.items():
            t0 = time.perf_counter()
            got = [next(it) for _ in range(batches)]
            times[name].append(time.perf_counter() - t0)
        supervised += [float((b.labels_BL != IGNORE).float().mean()) for b in got]
        for name, loss_fn in losses.items():
            t0 = time.perf_counter()
            for b in got:
                loss_fn(b).backward()
                vlm.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(t)[len(t) // 2] / batches for k, t in times.items()}
    print(f"\nSFT motion-phase clip stream ({len(clips)} clips, 8 rows x 256 tokens), per micro-batch:")
    for name, t in med.items():
        print(f"{name:>12}: {1e3 * t:8.1f} ms")
    print(
        f"cache: {med['no cache'] / med['cached']:.1f}x faster batches; building them is "
        f"{med['cached'] / med['fwd+bwd']:.1%} of the forward + backward with it, "
        f"{med['no cache'] / med['fwd+bwd']:.1%} without"
    )
    print(
        f"logits at the {sum(supervised) / len(supervised):.1%} supervised tokens only: forward + "
        f"backward {med['every token'] / med['fwd+bwd']:.2f}x faster than with every token's logits"
    )


if __name__ == "__main__":
    main()

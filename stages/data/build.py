"""Command every dvc.yaml data stage runs: build one dataset from params.yaml into a directory.

    python -m moonforge.stages.data.build toyworld --params params.yaml --out data/toyworld

The dataset is written to a hidden sibling directory first and renamed into place only when
complete, so a crash never leaves a half-built dataset where DVC or training would read it.
Inputs of derived datasets (the tokenizer reads `text` and `toyworld`; the post-training sets
`sft`, `reasoning` and `rl_prompts` read `toyworld`, and `sft` also `text` and `tokenizer`) are
siblings of `--out`, matching the `deps:` in dvc.yaml.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from moonforge.stages.data.params import SECTIONS, load_params
from moonforge.stages.data.posttrain_params import POST_SECTIONS, load_post_params

DATASETS = tuple(SECTIONS) + tuple(POST_SECTIONS)
"""Buildable dataset names (each is a dvc.yaml stage and a params.yaml section)."""


def build(name: str, params_path: Path, out: Path) -> dict:
    """Build dataset `name` into `out` atomically; return its stats."""
    params = load_post_params(params_path, name) if name in POST_SECTIONS else load_params(params_path, name)
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        stats = _build_into(name, params, tmp, out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return stats


def _build_into(name: str, params, tmp: Path, siblings: Path) -> dict:
    # Builders import lazily: the tokenizer build alone needs `tokenizers`, none needs torch.
    if name == "toyworld":
        from moonforge.stages.data.toyworld import build_toyworld

        return build_toyworld(params, tmp)
    if name == "videoworld":
        from moonforge.stages.data.videoworld import build_videoworld

        return build_videoworld(params, tmp)
    if name == "text":
        from moonforge.stages.data.corpus import build_text

        return build_text(params, tmp)
    if name == "longdoc":
        from moonforge.stages.data.longdoc import build_longdoc

        return build_longdoc(params, tmp)
    if name == "sft":
        from moonforge.stages.data.dialogues import build_sft

        return build_sft(params, tmp, siblings / "toyworld", siblings / "text", siblings / "tokenizer")
    if name == "reasoning":
        from moonforge.stages.data.traces import build_reasoning

        return build_reasoning(params, tmp, siblings / "toyworld")
    if name == "rl_prompts":
        from moonforge.stages.data.prompts import build_rl_prompts

        return build_rl_prompts(params, tmp, siblings / "toyworld")
    from moonforge.stages.data.bpe import build_tokenizer

    return build_tokenizer(params, tmp, siblings / "text", siblings / "toyworld")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moonforge.stages.data.build", description=__doc__.splitlines()[0]
    )
    parser.add_argument("name", choices=DATASETS)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        stats = build(args.name, args.params, args.out)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: building {args.name!r}: {e}", file=sys.stderr)
        return 1
    took = time.perf_counter() - start
    print(
        f"built {args.name} -> {args.out} in {took:.1f}s: {json.dumps(stats, sort_keys=True)}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the test_data_post_* modules: tiny params of the post-training datasets and one
cached build of them next to the shared tiny pretraining build (test_data_helpers.tiny_data)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from test_data_helpers import TINY_PARAMS, tiny_data, write_params

from moonforge.stages.data.build import build

POST_TINY_PARAMS = {
    "sft": {"seed": 0, "max_images_train": 120, "max_images_val": 30},
    "reasoning": {"seed": 0, "num_train": 60, "num_val": 12, "negative_frac": 0.25},
    "rl_prompts": {"seed": 0, "num_train": 80, "num_val": 20},
}
"""Small enough to build all three in about a second on top of the tiny toy world."""

POST_DATASETS = ("sft", "reasoning", "rl_prompts")


def build_post(root: Path, params: dict = POST_TINY_PARAMS) -> Path:
    """Build the post-training datasets into root/data (inputs: links to the tiny build)."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("toyworld", "text", "tokenizer"):
        if not (data / name).exists():
            (data / name).symlink_to(tiny_data() / name, target_is_directory=True)
    params_path = write_params(root / "params.yaml", {**TINY_PARAMS, **params})
    for name in POST_DATASETS:
        build(name, params_path, data / name)
    return data


@lru_cache(maxsize=1)
def post_data() -> Path:
    """The `data/` directory of one shared tiny build, post-training datasets included (read-only)."""
    root = Path(tempfile.mkdtemp(prefix="moonforge-tiny-post-"))
    atexit.register(shutil.rmtree, root, True)
    return build_post(root)


def test_post_tiny_params_validate():
    from moonforge.stages.data.posttrain_params import POST_SECTIONS

    assert set(POST_SECTIONS) == set(POST_DATASETS)
    for name, cls in POST_SECTIONS.items():
        cls.model_validate(POST_TINY_PARAMS[name])

"""Shared by the test_data_* modules: tiny build params and one cached build of every dataset.

Not a conftest fixture on purpose: the data tests import `tiny_data()` directly, and the cache
(a module-level lru_cache) makes the datasets build once per test session whichever module asks
first. Building them takes about two seconds.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import yaml

from moonforge.stages.data.build import build

TINY_PARAMS = {
    "toyworld": {"seed": 0, "num_train": 300, "num_val": 40},
    "text": {"seed": 0, "max_stdlib_chars": 600_000, "num_generated": 300, "val_frac": 0.05},
    "longdoc": {
        "seed": 0,
        "num_train": 8,
        "num_val": 4,
        "min_chars": 1000,
        "max_chars": 6000,
        "pool_chars": 600_000,
    },
    "tokenizer": {"vocab_size": 512, "min_frequency": 2},
    "videoworld": {"seed": 0, "num_train": 24, "num_val": 8},
}
"""Small enough to build in seconds, big enough for a 512-token BPE."""


def write_params(path: Path, params: dict = TINY_PARAMS) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=True))
    return path


def build_all(root: Path, params: dict = TINY_PARAMS) -> Path:
    """Build every dataset into root/data/<name> with `params`; return root/data."""
    root.mkdir(parents=True, exist_ok=True)
    params_path = write_params(root / "params.yaml", params)
    for name in ("toyworld", "text", "longdoc", "tokenizer"):
        build(name, params_path, root / "data" / name)
    return root / "data"


@lru_cache(maxsize=1)
def tiny_data() -> Path:
    """The `data/` directory of one shared tiny build (read-only for tests)."""
    root = Path(tempfile.mkdtemp(prefix="moonforge-tiny-data-"))
    atexit.register(shutil.rmtree, root, True)
    return build_all(root)


def tree_digest(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `path`."""
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_tiny_params_validate():
    from moonforge.stages.data.params import SECTIONS

    for name, cls in SECTIONS.items():
        cls.model_validate(TINY_PARAMS[name])

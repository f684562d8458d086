"""A frozen copy of the package's code for tests that run several processes.

The code part of a fingerprint is the code on disk when a process starts, so processes that must
share fingerprints (a killed run and its rerun, two concurrent runs) import a copy made once,
unaffected by edits to the checkout while the test runs: put `python_path(copy)` first on
PYTHONPATH (it wins over the editable install)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def package_copy(dest: Path) -> Path:
    """Every tracked .py file of the package (not tests) under `dest/moonforge`; returns it."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    root = dest / "moonforge"
    for name in files:
        if name.split("/")[0] in ("tests", "benchmarks", "examples", "docs"):
            continue
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


def python_path(copy: Path) -> str:
    """PYTHONPATH for a child process: the copy first, then this process's path."""
    return os.pathsep.join([str(copy.parent)] + [p for p in sys.path if p])

"""stages/train/host_memory.py: freed big tensors stay in the heap, so the next step's tensors of
the same size do not page-fault in again; a user's own allocator choice is left alone.

Each case runs in a fresh interpreter: mallopt changes the whole process, once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import torch
from moonforge.stages.train.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tune" else False
def step():  # a step's worth of one 64 MiB tensor, allocated, written and freed
    x = torch.ones(16 << 20)
    del x
for _ in range(10):  # the heap reaches its steady state (torch's aligned blocks fragment it at first)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="mallopt and minor-fault counts are glibc / Linux"
)


def _probe(mode: str, **env: str) -> dict:
    run_env = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MOONFORGE_MALLOC_TUNING"
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**run_env, "OMP_NUM_THREADS": "1", **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_big_tensors_are_reused_without_page_faults():
    pages = 5 * (64 << 20) // 4096  # what five fresh 64 MiB tensors fault in at 4 KiB pages
    default = _probe("default")
    tuned = _probe("tune")
    assert tuned["applied"] is True
    assert default["faults"] > pages // 2, default  # glibc maps each one anew
    assert tuned["faults"] < pages // 20, (tuned, default)  # the heap keeps and reuses it


@pytest.mark.parametrize(
    "env",
    [
        {"MOONFORGE_MALLOC_TUNING": "0"},
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"},
    ],
    ids=["opt-out", "users-glibc-setting", "preloaded-allocator"],
)
def test_a_users_allocator_choice_is_left_alone(env):
    got = _probe("tune", **env)
    assert got["applied"] is False
    assert got["faults"] > 5 * (64 << 20) // 4096 // 2, got  # still glibc's defaults

"""Keep freed host memory in the process while a stage trains (glibc's malloc, CPU training).

glibc serves every block over its mmap threshold with a fresh mmap and unmaps it on free. A
training step allocates the same big tensors again each step (logits, their log-probabilities,
the gradient buffers, activations), so every step page-faults them in anew: on this CPU
zero-filling the tiny LM's (4096, 2048) fp32 logit gradient took 18.5 ms, 9.6 ms from reused
heap, and the whole tiny LM train step ran 1.08-1.20x faster at one thread and 1.20-1.24x at
two (benchmarks/bench_host_memory.py: process CPU time, medians of four alternating runs).
Raising the mmap and trim thresholds keeps those blocks in the heap; PyTorch's CPU tuning guide
gets the same from jemalloc or tcmalloc.

The price is resident memory: up to TRIM_THRESHOLD of freed heap stays mapped after a peak
(the peak itself is unchanged). Nothing is changed when the user already chose: an
LD_PRELOADed allocator, glibc's MALLOC_*_ environment variables, or MOONFORGE_MALLOC_TUNING=0;
nor where the C library has no mallopt (musl's refuses, and is left alone).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 512 << 20
"""Blocks up to this size come from the heap (glibc's own dynamic cap is 32 MiB)."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the top of the heap kept up to this before it is returned to the system."""

_USER_CHOICE = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process (see the module docstring);
    True when this process runs with them."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("MOONFORGE_MALLOC_TUNING", "1") == "0":
        return False
    if any(v in os.environ for v in _USER_CHOICE):
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload or "mimalloc" in preload:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # no mallopt (macOS, Windows): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the thresholds; malloc stays at its defaults")
    return ok

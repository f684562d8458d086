#!/usr/bin/env bash
# The GPU check in one command, for a machine that has torch + CUDA but not moonforge's stack
# (the device machine a session may be lent): the `gpu` tests, then benchmarks/bench_gpu.py.
#
#   benchmarks/gpu_check.sh OUT_DIR [DEPS_DIR]
#
# Run from the repository root. DEPS_DIR, when given, holds what travels with the tree: `site/`
# (pydantic, pytest and their pure-Python dependencies, with pydantic_core for CPython 3.11) and
# `wheels/` (pydantic_core for other CPython versions; the one matching this python is unpacked
# in front). The repository root is the `moonforge` package, so a temp dir links it under that
# name. Writes pytest.txt, bench.txt and bench.jsonl to OUT_DIR.
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [DEPS_DIR]}
deps=${2:-}
py=${PYTHON:-python3}
mkdir -p "$out"
ns=$(mktemp -d)
ln -s "$PWD" "$ns/moonforge"
path=$ns
if [ -n "$deps" ]; then
  tag=$($py -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  wheel=$(ls "$deps"/wheels/pydantic_core-*-"$tag"-*.whl 2>/dev/null | head -1)
  if [ -n "$wheel" ]; then
    $py -m zipfile -e "$wheel" "$ns/core"
    path=$path:$ns/core
  fi
  path=$path:$(cd "$deps" && pwd)/site
fi
export PYTHONPATH=$path${PYTHONPATH:+:$PYTHONPATH}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
$py -c 'import torch, pydantic, moonforge.model.lm; print("torch", torch.__version__, "cuda", torch.version.cuda, "pydantic", pydantic.VERSION)' 2>&1 | tee -a "$out/gpu.txt"
# --noconftest: tests/conftest.py imports the whole stack; the gpu tests need none of its fixtures
timeout 240 $py -m pytest -p no:cacheprovider --noconftest -m gpu -q -rs \
  tests/test_gpu.py tests/test_model_attention.py 2>&1 | tail -40 | tee "$out/pytest.txt"
$py benchmarks/bench_gpu.py --out "$out/bench.jsonl" 2>&1 | tee "$out/bench.txt"

# The two README commands. Both create .venv on first use and install the pinned set.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV_PIN := uv==0.13.9
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(CURDIR)/.moonforge/prefect
# The install writes no bytecode (pip with --no-compile, uv by default; below), so Python must
# write each module's bytecode the first time a process imports it: with PYTHONDONTWRITEBYTECODE
# set (some CI images set it), every one of the suite's hundreds of processes would compile
# torch, MLflow and Prefect from source again (~9 s of CPU each; measured 1164 s of pytest
# against 946 s with bytecode written once).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-midsize gpu-deps lint install clean chromium slurm postgres sysdeps

$(STAMP): pyproject.toml requirements.lock.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch through pip: pip's config may point at a local CPU wheel (uv ignores pip's config, and
	@# torch==2.13.0 from PyPI alone is the multi-GB CUDA build). --no-compile: byte-compiling every
	@# installed module costs ~45 s; Python compiles what it imports.
	$(PY) -m pip install -q --disable-pip-version-check --no-compile --no-deps $$(grep '^torch==' requirements.lock.txt) $(UV_PIN)
	@# The rest of the lock (complete, so --no-deps; `pip check` below proves it) through uv:
	@# ~9 s against ~128 s for pip, which spends it on CPU (measured on a fresh venv, cold caches).
	grep -v -E '^(deepspeed|torch)==' requirements.lock.txt > $(VENV)/requirements.rest.txt
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -r $(VENV)/requirements.rest.txt
	@# DeepSpeed's setup imports torch: build it against the installed torch, without its CUDA ops
	$(PY) -m pip install -q --disable-pip-version-check setuptools==84.2.1
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation \
		--no-deps $$(grep '^deepspeed==' requirements.lock.txt)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(PY) -m pip check
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@mkdir -p $(PREFECT_HOME)
	$(VENV)/bin/moonforge run recipes/tiny.yaml

# The browser test (tests/test_ops_servers.py) drives Debian's chromium headless: install it
# when we can (root + apt); otherwise that one test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: chromium could not be installed (needs root and apt); the browser test will skip"

# The cluster tests start a one-node Slurm (tests/test_cluster_slurm.py, slurm-wlm + munge) and a
# throwaway PostgreSQL (tests/test_cluster_postgres.py) from Debian's packages: install them when
# we can (root + apt); otherwise those tests skip and say why.
APT_INSTALL = DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
slurm:
	@{ command -v slurmctld || test -x /usr/sbin/slurmctld; } >/dev/null 2>&1 && \
	  { command -v munged || test -x /usr/sbin/munged; } >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { $(APT_INSTALL) slurm-wlm munge >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && $(APT_INSTALL) slurm-wlm munge >/dev/null 2>&1; }; }; } || \
	  echo "note: slurm-wlm and munge could not be installed (needs root and apt); the Slurm tests will skip"

postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { $(APT_INSTALL) postgresql >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && $(APT_INSTALL) postgresql >/dev/null 2>&1; }; }; } || \
	  echo "note: postgresql could not be installed (needs root and apt); the Postgres test will skip"

# Static checks (configured in pyproject.toml): lint, format and types, before any test runs.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@mkdir -p $(VENV)/typeroot && ln -sfn ../.. $(VENV)/typeroot/moonforge
	$(VENV)/bin/mypy

# The Debian packages some tests drive, one after another (apt holds one dpkg lock).
sysdeps:
	@MAKEFLAGS= $(MAKE) --no-print-directory chromium slurm postgres

# pip and then the static checks run while apt installs the system packages (sysdeps); then pytest
# on TEST_WORKERS xdist workers (one compute thread each, see tests/conftest.py), whole modules
# per worker, the longest first. (Three workers with the lifecycle's at a higher priority measured
# slower on 2 cores: 1190 s against 1122 s.)
TEST_WORKERS ?= 2
test:
	@$(MAKE) --no-print-directory -j2 lint sysdeps
	@mkdir -p $(PREFECT_HOME)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# The mid-size proof (recipes/small.yaml: every stage under DeepSpeed ZeRO-2 x 2 with recompute),
# deselected from `make test`: it takes ~12 minutes alone (11.9 on 2026-11-29), and `make test`
# already fills CI's 20 (see tests/test_midsize.py and the README).
test-midsize: $(STAMP)
	@mkdir -p $(PREFECT_HOME)
	$(PY) -m pytest -q -m midsize tests/test_midsize.py --durations=5

# What benchmarks/gpu_check.sh needs on a machine with torch + CUDA and no package registry (the
# device machine): pydantic and pytest from .venv (pure Python, pydantic_core for CPython 3.11) and
# pydantic_core wheels for the other CPython versions such a machine may run. Carry the folder:
#   bash benchmarks/gpu_check.sh OUT .moonforge/gpu
GPU_DEPS := .moonforge/gpu
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
gpu-deps: $(STAMP)
	rm -rf $(GPU_DEPS) && mkdir -p $(GPU_DEPS)/site $(GPU_DEPS)/wheels
	cd $(SITE) && cp -r pydantic pydantic_core annotated_types typing_inspection typing_extensions.py \
		pytest _pytest pluggy iniconfig py.py exceptiongroup pydantic-*.dist-info \
		pydantic_core-*.dist-info pytest-*.dist-info pluggy-*.dist-info iniconfig-*.dist-info \
		$(CURDIR)/$(GPU_DEPS)/site/
	find $(GPU_DEPS) -name __pycache__ -prune -exec rm -rf {} +
	core=$$($(PY) -c 'import importlib.metadata as m; print(m.version("pydantic_core"))'); \
	for v in 3.10 3.12 3.13; do $(PY) -m pip download -q --disable-pip-version-check --no-deps \
		--only-binary=:all: --python-version $$v --platform manylinux2014_x86_64 \
		-d $(GPU_DEPS)/wheels pydantic_core==$$core || exit 1; done
	@du -sh $(GPU_DEPS)

clean:
	rm -rf .moonforge data/*/ .pytest_cache

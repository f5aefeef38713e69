# Two commands: `make demo` (the whole job on the built-in run) and `make test`.
# Both create .venv when missing and install the project: torch first, pinned to the CPU
# build (a looser spec pulls GBs of CUDA packages), then the project with its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test unit lint bench bench-gpu browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

# The browser test drives Debian's chromium (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || sudo sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null'; }

demo: install
	$(BIN)/circuits demo

# Lint and types first (seconds), then every test: the fast unit tier, then the journeys.
test: install browser lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

# The fast tier only: every test that needs no trained run (see tests/README.md).
unit: install
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not journey" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check circuits app tests
	$(BIN)/mypy

bench: install
	$(BIN)/circuits bench

# GPU figures (docs/performance.md, "pythia"): `circuits bench pythia --device cuda` at the
# 160m, 410m and 1b shapes, all results in bench-gpu.json. Needs a CUDA build of torch in
# $(VENV) (not `install`, which pins the CPU build): pip install torch==2.13.0 --index-url ...
BENCH_GPU_SIZES ?= 160m 410m 1b
bench-gpu:
	$(BIN)/python -c "from circuits.bench.pythia import gpu_main; gpu_main()" bench-gpu.json $(BENCH_GPU_SIZES)

clean:
	rm -rf $(VENV) .pytest_cache runs studies

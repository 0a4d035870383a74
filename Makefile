# chatserver: developer entry points. `make test` on a fresh Debian machine (as root) installs
# the system packages it needs, builds the venv and runs the whole suite.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`, each with its own throwaway Redis and Postgres; the
# suite waits on processes and sockets more than it computes, so 4 fill 2 cores (0: serial)
TEST_WORKERS ?= 4

.PHONY: venv deps run test lint fmt clean bench lock
# deps must finish before the venv is built (it may install python3-venv)
.NOTPARALLEL:

venv: $(STAMP)

# re-installed only when pyproject.toml or the lock changes; the runtime dependencies come
# from the hashed lock (as in the Docker image), the tools from the dev and bench extras.
# --no-deps: the lock is complete (pip check says so), nothing is resolved; Debian 12's pip (23.0) resolving it
# takes a dependency's extra (google-genai -> google-auth[requests]) for an unpinned
# requirement and refuses the lock as soon as a newer release of it is out.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps -r requirements.lock
	$(BIN)/python -m pip check
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@

# requirements.lock: one universal lock (environment markers) for CPython 3.11.0 and later on
# every platform, every pin with the hashes of its wheels (prebuilt only, as the image installs
# them). Pins already in the lock are kept where they still fit; LOCK_ARGS=--upgrade moves
# everything to the newest releases, LOCK_ARGS="--upgrade-package NAME" one package.
LOCK_ARGS ?=
lock: venv
	$(BIN)/uv pip compile --quiet --no-config --universal --python-version 3.11 \
		--only-binary :all: --generate-hashes --custom-compile-command 'make lock' \
		--output-file requirements.lock $(LOCK_ARGS) pyproject.toml

deps:
	./scripts/ensure-system-deps.sh

run: venv
	$(BIN)/chatserver serve $(ARGS)

test: deps venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# load scenarios beside their peers and a 10-minute soak per mode, ~35-40 min
# (docs/benchmarks.md); BENCH_ARGS=--quick: ~5 min
bench: venv
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# build and tool caches; the venv stays (rm -rf .venv to rebuild it from scratch)
clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

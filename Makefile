# `make test` and `make demo` set up everything themselves: the virtual environment, the Python
# packages and the servers the tests use (ClickHouse, via apt when missing).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist): most tests wait on real servers and processes, so 3 on 2 cores
# halve the suite's time; PYTEST_WORKERS=0 runs it in one process. Tests are handed out one at a
# time (--maxschedchunk 1), the long scenarios first (tests/conftest.py), so no process idles
# at the end while another runs a minute-long test it got last.
PYTEST_WORKERS ?= 3
.PHONY: help venv lock test pytest lint run demo bench clean system-deps

help:
	@echo "make demo   - start a standalone node, run the orders example, show the totals"
	@echo "make run    - run a standalone node on 127.0.0.1:8080 (data in ./chukcha-data)"
	@echo "make test   - install everything, run the whole test suite (and the cluster tests again"
	@echo "              with every node on 4 worker processes), ruff and mypy"
	@echo "make bench  - run the benchmarks"
	@echo "make lock   - refresh requirements.lock (exact versions) from pyproject.toml's ranges"

# pyproject.toml gives ranges; requirements.lock the exact versions development and CI use.
$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Re-resolve the newest versions within pyproject.toml's ranges into requirements.lock.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet '.[test]'
	{ echo "# Exact versions for development and CI (make lock regenerates; pyproject.toml has the ranges)."; \
	  .lock-venv/bin/pip freeze --exclude chukcha; } > requirements.lock
	rm -rf .lock-venv

system-deps:
	@./scripts/install-system-deps.sh

# The cluster, failure, Go-client and Go-peer tests run twice, with every `chukcha node` process
# on 1 and on 4 processes: tests/conftest.py (WORKERS_MODULES) and the README's Development.
# The suite starts some 400 Python processes (nodes, `chukcha run`, the command line tools) and
# 3 test processes: with bytecode caches (__pycache__, git-ignored) each loads chukcha's compiled
# modules instead of compiling them again, even where the environment says
# PYTHONDONTWRITEBYTECODE (a node process: 0.94 -> 0.73 s of CPU to import; pytest's collection
# 7.0 -> 1.6 s per test process).
test: export PYTHONDONTWRITEBYTECODE :=
test: venv system-deps
	$(BIN)/ruff check chukcha tests examples bench
	$(BIN)/mypy
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --maxschedchunk 1

pytest: venv
	$(BIN)/pytest -q $(ARGS)

lint: venv
	$(BIN)/ruff check chukcha tests examples bench
	$(BIN)/mypy

run: venv
	$(BIN)/chukcha node

demo: venv
	$(BIN)/python -m examples.demo

bench: venv system-deps
	$(BIN)/python bench/bench_bus.py
	$(BIN)/python bench/bench_cluster.py --runs 3
	$(BIN)/python bench/bench_client.py --runs 3
	$(BIN)/python bench/bench_processor.py --runs 3
	$(BIN)/python bench/bench_clickhouse.py --runs 3

clean:
	rm -rf $(VENV) chukcha-data .pytest_cache .mypy_cache .ruff_cache

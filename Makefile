# `make test` and `make demo` set up everything themselves: the virtual environment, the Python
# packages and the servers the tests use (ClickHouse, via apt when missing).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv test pytest lint run demo bench clean system-deps

help:
	@echo "make demo   - start a standalone node, run the orders example, show the totals"
	@echo "make run    - run a standalone node on 127.0.0.1:8080 (data in ./chukcha-data)"
	@echo "make test   - install everything, run the whole test suite, ruff and mypy"
	@echo "make bench  - run the benchmarks"

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	@./scripts/install-system-deps.sh

test: venv system-deps
	$(BIN)/ruff check chukcha tests examples bench
	$(BIN)/mypy
	$(BIN)/pytest -q

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

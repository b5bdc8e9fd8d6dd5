# Two commands for a fresh machine (see README): `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUITE ?= quickstart
# your own run goes here; the committed results/ holds the reference run (QS_RESULTS=results reuses its rows)
QS_RESULTS ?= results/local
PYTEST_ARGS ?=

.PHONY: setup quickstart test test-all lint clean-cache

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the package with pinned dependencies

quickstart: $(STAMP)  ## pre-train the baselines on phantoms, evaluate, write and print the leaderboard
	MEDBENCH_RESULTS=$(QS_RESULTS) $(BIN)/medbench bench suite=$(SUITE)
	$(BIN)/medbench report --results $(QS_RESULTS)

test: $(STAMP)  ## the default test run (CPU, no slow or GPU tests)
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

test-all: $(STAMP)  ## also the slow tests
	$(BIN)/pytest -m "not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-cache:  ## remove generated phantoms, checkpoints and scratch files (results/ is kept)
	rm -rf cache

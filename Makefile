# moorline: two commands. `make run` starts the embedded default config; `make test` installs what
# the tests need (Debian packages, the virtualenv) and runs lint, type checks and the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit deps venv bench bench-smoke clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/moorline run $(ARGS)

deps:
	./scripts/install-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check moorline tests bench
	$(BIN)/ruff format --check moorline tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: deps $(STAMP) lint typecheck
	$(BIN)/pytest -n 2 -p no:cacheprovider tests

bench: deps $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

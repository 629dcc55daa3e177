# moorline: two commands. `make run` starts the embedded default config; `make test` installs what
# the tests need (Debian packages, the virtualenv) and runs lint, type checks and the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit deps venv native bench bench-smoke conformance clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The compiled HTTP/1.1 parsers (moorline/protocol/_http1c.pyx on llhttp): rebuilt when the .pyx
# changed, a no-op otherwise. Without a compiler moorline runs its pure-Python parsers (say so).
native: $(STAMP)
	$(BIN)/python scripts/build-native.py $(NATIVE_FLAGS)

run: native
	$(BIN)/moorline run $(ARGS)

deps:
	PYTHON=$(PYTHON) ./scripts/install-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check moorline tests bench scripts
	$(BIN)/ruff format --check moorline tests bench scripts

typecheck: $(STAMP)
	$(BIN)/mypy

# The whole suite on the compiled modules (required: a build failure fails the run; HTTP/2 runs
# on libnghttp2), then the codec, stream, proxy and HTTP/2 end-to-end tests (conformance,
# gRPC, gRPC-Web, CONNECT) again on the pure-Python references: the HTTP/1.1 parsers and
# the h2 backend.
H2_E2E := tests/conformance tests/e2e/test_h2_e2e.py tests/e2e/test_h2_connect.py \
	tests/e2e/test_grpc_e2e.py tests/e2e/test_tls_h2_e2e.py tests/e2e/test_probe_findings.py \
	tests/filters/test_grpc_web_e2e.py
test: deps $(STAMP) lint typecheck
	$(MAKE) native NATIVE_FLAGS=--strict
	MOORLINE_REQUIRE_NATIVE=1 $(BIN)/pytest -n 2 -p no:cacheprovider tests
	MOORLINE_PURE_PYTHON=1 $(BIN)/pytest -n 2 -p no:cacheprovider tests/protocol tests/stream tests/proxy $(H2_E2E)

# The HTTP/2 conformance cases (moorline.testing.h2conformance) against each codec backend.
conformance: deps $(STAMP)
	$(BIN)/python scripts/h2-conformance.py --backend h2
	$(BIN)/python scripts/h2-conformance.py --backend nghttp2

bench: deps native
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build moorline/protocol/_http1c.*.so

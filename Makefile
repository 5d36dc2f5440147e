# Spaces: one Makefile for set-up, code generation, the local stack, tests and benchmarks.
# `make up` and `make test` work on a fresh clone: every target below installs what it needs.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
INSTALLED := $(VENV)/.installed
NODE_INSTALLED := node_modules/.installed
PROTO_SOURCES := $(shell find protos tests/protos -name '*.proto' 2>/dev/null)
PROTO_STAMP := build/gen/.stamp
NATIVE_STAMP := build/gen/.native
# Everything generated or compiled that the services import.
GEN := $(PROTO_STAMP) $(NATIVE_STAMP)
BUF := node_modules/.bin/buf
PYTEST_ARGS ?=

.PHONY: all install proto native lint format test test-resilience up bench lock clean docs chart

all: test

$(INSTALLED): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip >/dev/null
	$(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install -q --python $(PY) -r requirements.lock
	@# Put the repository and the generated protos on the venv's import path.
	$(PY) -c "import sysconfig, pathlib; root = pathlib.Path.cwd(); \
	  pathlib.Path(sysconfig.get_paths()['purelib'], 'spaces.pth').write_text(f'{root}\n{root}/build/gen\n')"
	@touch $@

$(NODE_INSTALLED): package.json package-lock.json
	@# npm ci trips over the platform-specific optional packages missing from the lock
	@# (npm bug 4828); install honours the lock and the exact version in package.json.
	npm install --no-audit --no-fund --loglevel=error
	@touch $@

install: $(INSTALLED) $(NODE_INSTALLED)

$(PROTO_STAMP): $(INSTALLED) $(PROTO_SOURCES) tools/protogen.py
	$(PY) tools/protogen.py
	@touch $@

proto: $(PROTO_STAMP)

# The media fast path's C inner loop (cffi; needs a C compiler, links only libc).
# After the protos: protogen rewrites build/gen.
$(NATIVE_STAMP): $(PROTO_STAMP) $(wildcard services/media/native/*.c services/media/native/*.h) services/media/native/build.py
	@$(PY) -m services.media.native.build build/gen || echo "WARNING: no C compiler:" \
	  "media forwards through its Python loop (slower)"
	@touch $@

native: $(NATIVE_STAMP)

# docs/api.md, the RPC index, is generated from the protos; tests/unit/test_api_doc.py
# fails when it is stale.
docs: $(PROTO_STAMP)
	$(PY) tools/apidoc.py

lint: $(GEN) $(NODE_INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services tools deploy/docker
	$(BUF) lint build/spaces.binpb --path spaces --config buf.yaml
	$(PY) -m tools.buf_breaking

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q -m "not resilience" $(PYTEST_ARGS) tests

test-resilience: $(GEN)
	@# Exit code 5 means no scenario was collected yet; anything else is a real result.
	@# -rP shows what each passing scenario printed: the figure it measured.
	$(PY) -m pytest -q -rP -m resilience $(PYTEST_ARGS) tests/resilience || [ $$? -eq 5 ]

# The Helm chart, dashboards and image checks alone (they also run in `make test`).
chart: $(GEN)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests/chart

up: $(GEN)
	$(PY) -m tools.devstack

bench: $(GEN)
	$(PY) -m tools.bench

lock: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile -q pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache

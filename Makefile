# Set-up and everyday commands. `make serve` and `make test` work on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
# torch is pinned here, not in pyproject.toml, so users keep the build (CPU/CUDA) they need;
# 2.13.0 is the CPU wheel our CI machines carry.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install serve test lint bench-offline clean

# no -q: pip draws its download bars only at the default verbosity (torch is large)
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed

include make/default-model.mk

serve: install default-model  ## install, fetch the embedded model, serve on 127.0.0.1:8000
	$(VENV)/bin/pagedserve serve --config configs/default.yaml --host $(HOST) --port $(PORT)

test: install default-model  ## install test dependencies and run the whole suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check engine server tests bench
	$(VENV)/bin/mypy engine server/protocol.py

bench-offline: install default-model
	$(PY) bench/offline.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

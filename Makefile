# Fresh machine: `make repro` (install if needed, then the embedded default pipeline) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Never more threads than cores (oversubscribed OpenMP slows a step ~20x on this machine).
export OMP_NUM_THREADS ?= 2

.PHONY: setup test lint repro repro-clean bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@if command -v apt-get >/dev/null 2>&1 && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "warning: could not install dataset-fashion-mnist; the generator falls back to procedural shapes"; \
	  else echo "warning: not root; run 'apt-get install dataset-fashion-mnist' for real silhouettes"; fi; \
	fi
	@# PostgreSQL server: tests/test_sweep_postgres.py starts a throw-away cluster (the multi-machine sweep storage).
	@if command -v apt-get >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) \
	    || echo "warning: could not install postgresql; the PostgreSQL sweep test will be skipped"; \
	  else echo "warning: not root; run 'apt-get install postgresql' for the PostgreSQL sweep test"; fi; \
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

# On a fresh clone every input of the committed results is committed too (weights, generated data), so `make repro`
# is a no-op until something changes; then exactly the dependent stages rerun. DVC's closing hint to `dvc push`
# is dropped: it only applies once a remote is configured (docs/sharing.md).
repro: setup
	@set -o pipefail; PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro 2>&1 | grep --line-buffered -v '^Use `dvc push`'
	@if [ -n "$$($(BIN)/dvc remote list 2>/dev/null)" ]; then echo "dvc push: send cached outputs to the configured remote (docs/sharing.md)"; fi

# Regenerate everything from scratch: the generated data, the pretraining, every run, the sweep, the benches.
repro-clean: setup
	rm -rf data/generated weights/vit_cpu_pretrained.safetensors weights/vit_cpu_pretrained.safetensors.json \
	  weights/vit_cpu_pretrained.head.safetensors weights/vit_cpu_items.safetensors \
	  weights/vit_cpu_items.safetensors.json weights/vit_cpu_items.head.safetensors results/runs results/sweeps
	@set -o pipefail; PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro --force 2>&1 | grep --line-buffered -v '^Use `dvc push`'

bench: setup
	$(BIN)/python bench/deform_attn.py

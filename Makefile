# Two commands do all set-up on a fresh machine:  make demo  and  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned in pyproject.toml: on these machines pip then takes the CPU build from local disk.

.PHONY: demo test install install-dev lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/curate run configs/demo.yaml

test: install-dev
	$(BIN)/python -m pytest -q

lint: install-dev
	$(BIN)/ruff check curate pipelines train tests benchmarks

clean:
	rm -rf runs .pytest_cache

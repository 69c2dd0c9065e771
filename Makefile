# tapefit: `make run` serves on :8000, `make test` runs lint, types and tests.
# Both create .venv on first use (Python 3.11 and make are all a fresh machine needs).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PYTEST_ARGS ?=

.PHONY: run test lint typecheck pytest bench bench-quick deploy-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m service

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(VENV)/.installed-test
	$(PY) -m bench

bench-quick: $(VENV)/.installed-test
	$(PY) -m bench --quick

deploy-check:
	bash deploy/check.sh

clean:
	rm -rf $(VENV) .venv-deploy .mypy_cache .pytest_cache .ruff_cache

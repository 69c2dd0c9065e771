# tapefit: `make run` serves on :8000, `make test` runs lint, types and tests.
# Both create .venv on first use (Python 3.11 and make are all a fresh machine needs).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PYTEST_ARGS ?=
# Every installed version comes from a lock with hashes (`make lock` refreshes both).
RUN_LOCK  := requirements/run.lock
TEST_LOCK := requirements/test.lock
MUTATE_LOCK := requirements/mutate.lock
UV_VERSION := 0.13.9
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	--no-header --quiet

.PHONY: run test lint typecheck pytest fuzz accuracy bench bench-quick deploy-check chaos chaos-expressions cluster-check mutate lock clean

# A venv made by another Python (or a broken one) is rebuilt rather than failing forever.
ifneq ($(shell $(PY) -c 'import sys; print(sys.version_info[:2] == (3, 11))' 2>/dev/null),True)
$(shell rm -rf $(VENV))
endif

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The project itself goes in without build isolation: setuptools comes from the lock too.
$(VENV)/.installed: $(RUN_LOCK) pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(RUN_LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(TEST_LOCK) pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(TEST_LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@ $(VENV)/.installed

# Re-resolve both locks from pyproject.toml (the test lock first; the run lock is held to it).
lock: | $(PY)
	$(PY) -m pip install --quiet "uv==$(UV_VERSION)"
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra server --extra test \
		$(LOCK_FLAGS) -o $(TEST_LOCK)
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra server -c $(TEST_LOCK) \
		$(LOCK_FLAGS) -o $(RUN_LOCK)
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra server --extra test \
		--extra mutate -c $(TEST_LOCK) $(LOCK_FLAGS) -o $(MUTATE_LOCK)

run: $(VENV)/.installed
	$(PY) -m service

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test
	$(PY) -m pytest -m "not fuzz and not accuracy" $(PYTEST_ARGS)

# Suites that compile a loop per NIST problem (multi-start from every far start), apart from
# `make test` to keep it within its budget; CI runs both.
accuracy: $(VENV)/.installed-test
	$(PY) -m pytest -m accuracy $(PYTEST_ARGS)

# Property-based fuzzing of every operation from the OpenAPI document (schemathesis against a
# real server: a fixed seed with every phase, and a daily seed), apart from `make test` to keep
# it within its budget; CI runs both.
fuzz: $(VENV)/.installed-test
	$(PY) -m pytest -m fuzz $(PYTEST_ARGS)

test: lint typecheck pytest

# The HTTP load comes from wrk (Debian's package, installed here when we are root with apt);
# without it bench/ falls back to an httpx driver that saturates before the servers do.
WRK := command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } \
	|| echo "no wrk: the httpx driver loads the servers, and saturates before they do"

bench: $(VENV)/.installed-test
	@$(WRK)
	$(PY) -m bench

bench-quick: $(VENV)/.installed-test
	@$(WRK)
	$(PY) -m bench --quick

deploy-check:
	bash deploy/check.sh

clean:
	rm -rf $(VENV) .venv-deploy .mypy_cache .pytest_cache .ruff_cache mutants

# Hostile and heavy load against the real server with the deployment's limits (loopback only).
chaos: $(VENV)/.installed-test
	$(PY) -m tests.chaos

# Compiles, floods of new expressions and a stopped fit process, same limits (issue #33).
chaos-expressions: $(VENV)/.installed-test
	$(PY) -m tests.chaos_expressions

# Three replicas behind HAProxy (Debian's haproxy): throughput, rolling restart, SIGKILL.
cluster-check: $(VENV)/.installed-test
	$(PY) -m tests.cluster

# Mutation testing of the HTTP contract's rules (mutmut; about an hour on 2 cores, so not in
# CI). Resumable: a second run only checks what changed. Survivors and why
# they survive: tests/mutation.md.
# Each mutant's worker compiles the loops its tests use: XLA's persistent cache halves that.
mutate: $(VENV)/.installed-test
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(MUTATE_LOCK)
	TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=$(CURDIR)/mutants/xla-cache \
		$(BIN)/mutmut run --max-children 2 > /dev/null || true
	$(BIN)/mutmut export-cicd-stats
	$(PY) -m tests.mutation_report

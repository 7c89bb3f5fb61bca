# llm-gateway. `make run` and `make test` work on a fresh machine: they create what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test venv engine lint unit e2e sim bench bench-quick litellm wrk postgres clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,skypilot]'
	touch $@

# A separate virtualenv with real vLLM (CPU build without CUDA) and the tiny demo model.
engine:
	PYTHON=$(PYTHON) scripts/setup_engine.sh

# Starts the gateway on 127.0.0.1:8000 with the local provider; tiny-llama starts on first request.
run: venv engine
	$(BIN)/llm-gateway serve --dev

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Unit and API tests only: seconds, no engine needed.
unit: venv postgres
	$(BIN)/pytest -q -m "not e2e"

e2e: venv engine postgres
	$(BIN)/pytest -q -m e2e

test: venv engine lint postgres
	$(BIN)/pytest -q

# The deterministic fault simulator (tests/sim) over many seeds: prints faults injected and every
# invariant broken, by seed; `.venv/bin/python -m tests.sim --seed N` replays seed N with its trace.
SEEDS ?= 2000
STEPS ?= 40
JOBS ?= 1
sim: venv
	$(BIN)/python -m tests.sim --seeds $(SEEDS) --steps $(STEPS) --jobs $(JOBS)

clean:
	rm -rf $(VENV) .venv-engine .venv-litellm data .mypy_cache .ruff_cache .pytest_cache

# Benchmarks: every figure against a baseline of the same run; bench/README.md says what each is.
bench: venv engine wrk
	$(BIN)/python -m bench

bench-quick: venv engine wrk
	$(BIN)/python -m bench --quick

# wrk (C) generates the load at 32 connections; installed from apt when missing and root.
wrk:
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; } || \
		echo "!! wrk is missing (apt-get install wrk): the bench uses its Python load generator"

# The store tests run on PostgreSQL too: they start a server of their own from Debian's binaries
# (tests/pg.py), so the package's own cluster is not made and its service is not started.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		scripts/install_postgres.sh; } || \
		echo "!! PostgreSQL is missing (apt-get install postgresql): its tests will fail"

# Optional (~750 MB, its own venv): LiteLLM's proxy side by side in the proxy benchmark.
litellm:
	PYTHON=$(PYTHON) scripts/setup_litellm.sh

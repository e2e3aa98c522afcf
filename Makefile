# The two commands of the README: `make run` and `make test`. Everything else is a step of them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test venv up down status lint unit integration bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "setting up $(VENV) (python, settler and its dev tools)..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -e '.[dev]'
	@touch $@

up: venv
	@$(BIN)/settler dev up

down: venv
	@$(BIN)/settler dev down

status: venv
	@$(BIN)/settler dev status

# Stack + schema, then the worker with a sample market stream (a few duplicates and
# malformed records on purpose): once it is settled, a summary and three next steps;
# the worker keeps running in the foreground until Ctrl-C (then 'make down').
run: up
	@echo "stack logs: .stack/logs/ (the worker logs below: JSON lines when not on a terminal)"
	@$(BIN)/settler sample --events 5000 --duplicates 0.01 --malformed 0.002 --worker

lint: venv
	@$(BIN)/ruff check settler tests benchmarks
	@$(BIN)/mypy
	@$(BIN)/lint-imports

unit: venv
	@$(BIN)/pytest tests/unit -q $(PYTEST_ARGS)

# Lint and type checks, then every test against a freshly started stack (in its secure
# mode: TLS/SASL listeners and a password-protected Cassandra beside the plain ones, for
# tests/integration/test_secure_*.py), which is stopped afterwards whatever the outcome.
test: lint
	@bash deploy/prometheus/ensure-prometheus.sh
	@$(BIN)/settler dev up --secure
	@status=0; $(BIN)/pytest -rfE --durations=15 $(PYTEST_ARGS) || status=$$?; \
	  $(BIN)/settler dev down; exit $$status

bench: up
	@$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .stack .pytest_cache .mypy_cache .ruff_cache .hypothesis

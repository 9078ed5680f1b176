# The two commands: `make run` (server + one worker on handlers/, SQLite) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# Server and one worker in the foreground; Ctrl-C stops both.
run: $(STAMP)
	@trap 'kill -TERM $$server $$worker 2>/dev/null; wait' INT TERM; \
	$(BIN)/martinet serve & server=$$!; \
	$(BIN)/martinet work --handlers handlers & worker=$$!; \
	wait

test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check martinet_app tests handlers
	$(BIN)/ruff format --check martinet_app tests handlers

clean:
	rm -rf $(VENV) build dist .pytest_cache martinet.db martinet.db-wal martinet.db-shm

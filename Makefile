# The two commands: `make run` (server + one worker on handlers/, SQLite) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint build bench bench-scale bench-floors bench-startup bench-cluster clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# Server and one worker on handlers/ in the foreground (packaging/run.sh): the worker starts once the
# server answers, a server that cannot start ends it at once, and Ctrl-C or SIGTERM stops the worker
# first (its running tasks finish and report within MARTINET_GRACE), then the server.
run: $(STAMP)
	@bash packaging/run.sh $(BIN)/martinet handlers

test: lint build
	$(BIN)/python -m pytest -q

# dist/martinet: one executable for every command (see build.spec and the README's build section).
build: dist/martinet

dist/martinet: $(STAMP) build.spec packaging/selfextract.sh $(wildcard martinet_app/*.py) $(wildcard martinet_app/static/*)
	$(BIN)/pyinstaller --noconfirm --log-level ERROR build.spec

lint: $(STAMP)
	$(BIN)/ruff check martinet_app tests handlers bench
	$(BIN)/ruff format --check martinet_app tests handlers bench

# Martinet against Huey on no-op workloads (docs/BENCHMARKS.md). Huey lives in bench/.venv only. Needs Redis
# (BENCH_REDIS_URL), for the martinet-pg runs PostgreSQL (BENCH_PG_URL) and for the martinet-mysql runs MariaDB
# (BENCH_MYSQL_URL); SYSTEMS picks the systems.
BENCH_STAMP := bench/.venv/.installed

$(BENCH_STAMP): bench/requirements.txt
	test -x bench/.venv/bin/python || $(PYTHON) -m venv bench/.venv
	bench/.venv/bin/python -m pip install -q -r bench/requirements.txt
	touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/compare.py

# Martinet with SCALE_N (1,000,000) scheduled tasks in its store against an empty one, and PURGE_N (1,000,000)
# finished tasks purged while a producer submits (bench/drive.py), once.
bench-scale: $(STAMP)
	WORKLOADS="scale purge" REPS=$${REPS:-1} $(BIN)/python bench/compare.py

# What one synchronous producer can get on this machine: ZeroMQ round trips, a durable SQLite commit, the
# fastest durable submit, and Martinet's ping and execute (bench/floors.py).
bench-floors: $(STAMP)
	$(BIN)/python bench/floors.py

# Drain and stream with 1 and 2 servers on one PostgreSQL (database bench_cluster at 127.0.0.1:5432, emptied
# before each run; CLUSTER_BACKEND=mysql: on MariaDB at 127.0.0.1:3306, dropped and created again), one worker
# per server: tasks/s and CPU per 1,000 tasks of each process and of the database (bench/cluster.py; REPS,
# DRAIN_N, STREAM_N, SERVERS, CLUSTER_WORKLOADS, CLUSTER_TIMEOUT, CLUSTER_CODE=tree for uncommitted code).
bench-cluster: $(STAMP)
	$(BIN)/python bench/cluster.py

# Start-up time of dist/martinet and of the virtualenv's script (figures in the README's build section).
bench-startup: build
	$(BIN)/python bench/startup.py

clean:
	rm -rf $(VENV) bench/.venv build dist .pytest_cache martinet.db martinet.db-wal martinet.db-shm martinet.db.lock

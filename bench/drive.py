"""One benchmark run of one system and one workload; bench/compare.py starts it and reads its JSON.

    python bench/drive.py martinet WORKLOAD    (the product's .venv)
    python bench/drive.py martinet-curve WORKLOAD (the same with CURVE keys on every socket)
    python bench/drive.py martinet-pg WORKLOAD (the same on PostgreSQL: BENCH_PG_URL, emptied first)
    python bench/drive.py martinet-mysql WORKLOAD (the same on MariaDB: BENCH_MYSQL_URL, recreated first)
    python bench/drive.py martinet-process WORKLOAD (SQLite with `serve --durability process`, opt-in)
    python bench/drive.py huey-sqlite WORKLOAD (bench/.venv)
    python bench/drive.py huey-redis WORKLOAD  (bench/.venv)

WORKLOAD is drain, stream, bulk (Martinet only), latency, timing-spread, timing-burst, producers,
monitor, aio, purge or scale (the last four Martinet only; purge and scale on SQLite only). Each run
starts its own server and worker (or consumer) as subprocesses, on free ports and a fresh temporary
SQLite file (martinet-pg: the PostgreSQL database of BENCH_PG_URL, default
postgresql://postgres@127.0.0.1:5432/bench_pg, created if missing, its public schema dropped and
created again; martinet-mysql: the MariaDB database of BENCH_MYSQL_URL, default
mysql://root@127.0.0.1:3306/bench_mysql, dropped and created again; Huey: a fresh Redis queue
name), and stops them before it prints one JSON object on stdout. The no-op task returns
time.time() taken as its handler starts, so the driver sees when each handler started (the same
clock: everything runs on one machine).

Settings (environment): N (2000, stream), DRAIN_N (20000, drain and bulk), LATENCY_N (300),
TIMING_N (500), SCALE_N (1000000), PURGE_N (1000000), PHASE_S (10), PRODUCERS (8), CONCURRENCY (16: Huey's
greenlets), SLOTS (4: Martinet's handler processes, its default; its prefetch is left automatic),
BENCH_TIMEOUT (600 s a run may wait), BENCH_PG_URL, BENCH_MYSQL_URL.

- drain, stream, bulk: tasks/s, and CPU seconds per 1,000 tasks (drain, stream) of the server,
  the worker and its handler processes (Huey: the consumer) during the timed phase, from
  /proc/PID/stat; martinet-pg adds the CPU of its server's PostgreSQL backends (client backends
  connected to the benchmark's database; PostgreSQL's shared processes, such as the WAL writer, are
  left out), as SQLite's work is in the server's own figure; martinet-mysql leaves MariaDB's CPU out
  (one process whose threads serve every connection: none of it can be told to be the server's).
  Huey's enqueues run in the driver (and in Redis), which are not counted; Martinet's submits run
  in its server, counted in stream (drain submits before its timed phase). Drain also reports
  startup_s: from spawning the worker (consumer) to the start of the first submitted task's handler,
  a proxy for the start-up that the drain time includes.
- latency: p50/p99 of submit -> result visible to the client (p50_ms, p99_ms) and of submit ->
  handler start (start_p50_ms, start_p99_ms), one awaited task at a time.
- timing-spread: TIMING_N tasks submitted evenly over TIMING_LEAD (2 s), each due 2 s after its
  own submit; timing-burst: TIMING_N tasks submitted back to back, all due at one instant 2 s
  after the first submit. Lateness of each handler start after its due time, p50/p99/max ms;
  submit_s is the time the submits took (lateness includes any overrun past the 2 s). Huey's
  consumer moves due tasks out of its schedule once a second (its minimum, -s 1), counted from its
  start; a run starts right after the consumer's first task, so the burst falls due just after one
  of those checks and Huey's burst lateness is near its ~1 s worst case (spread shows the range).
- producers: PRODUCERS processes (multiprocessing, spawned), each with a client of its own (Huey: its
  own Huey instance and connection), connected before a common start (a barrier); each submits one
  no-op task at a time (Martinet: execute, counted once its reply, sent after the commit, is in;
  Huey: one enqueue) for PHASE_S seconds, with the worker (consumer) running and warmed up. Total
  submitted tasks/s (submits_per_s: from the start to the last producer's last reply), tasks/s end
  to end (tasks_per_s: from the start until every task submitted is done), the submit call's
  p50/p99/max over all producers (submit_*), and CPU seconds per 1,000 tasks as stream counts them
  (the producers' own left out); every task is checked succeeded. Huey SQLite's enqueue fails with
  "database is locked" when its BEGIN EXCLUSIVE waits past its 5 s busy timeout (nothing written);
  its producer enqueues again, and the call's time counts the wait: retries is how often.
- monitor (Martinet only): one producer's executes, one call at a time with a worker running, for
  PHASE_S seconds; then as long again while a thread fetches the dashboard overview's data
  (GET /api/v1/stats and /api/v1/workers) every second, as a browser showing it does. The submit
  (execute call) p50/p99/max of each phase (quiet_*, polled_*), and the polls' time (poll_*).
- aio (Martinet only): one asyncio producer (martinet_app.aio) keeping AIO_INFLIGHT (64) executes in flight
  on one socket for PHASE_S seconds, with a worker running: submitted tasks/s (submits_per_s; each counted
  once its reply, sent after its commit, is in) and the execute call p50/p99/max (submit_*), then the
  time until every task has run (tasks_per_s counts the whole run); every task is checked succeeded.
- purge (Martinet only, in `make bench-scale`): PURGE_N tasks that succeeded two days ago written
  into a fresh store; with a worker, one producer's executes for PHASE_S seconds (quiet_*), then
  while a second client purges them all (`purge('succeeded', '1d')`, 100 per request) (purging_*);
  purge_s is how long the purge took.
- scale (Martinet only, not in `make bench`: `make bench-scale`): SCALE_N tasks scheduled over the
  next 3 days, written into a fresh SQLite file with Store.add_tasks in chunks of 10,000 (one
  run_at each); fill_s and rows/s. Then, for that store and for an empty one: server start-up
  (spawn to the first answered ping; ZeroMQ retries the connection every 100 ms), server RSS and
  VmHWM after start-up and at the end, p50/p99 (of 20 calls, so p99 is the slowest) of status(id),
  list(limit=50), list(status='scheduled'|'queued', limit=50) (backlog only), of the dashboard
  overview's data, /metrics and the dashboard page over HTTP (both stores), and, with a worker,
  20 tasks scheduled one at a time 0.3 s ahead: lateness of the handler start after the due time,
  and the server's CPU per such task (schedule, fire, dispatch, record, wait and the idle time
  between them).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import multiprocessing
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
N = int(os.environ.get("N", "2000"))
DRAIN_N = int(os.environ.get("DRAIN_N", "20000"))
LATENCY_N = int(os.environ.get("LATENCY_N", "300"))
TIMING_N = int(os.environ.get("TIMING_N", "500"))
SCALE_N = int(os.environ.get("SCALE_N", "1000000"))
CONCURRENCY = int(os.environ.get("CONCURRENCY", "16"))  # Huey's greenlets (-w)
SLOTS = int(os.environ.get("SLOTS", "4"))  # Martinet's handler processes: `work --concurrency`, its default
CHUNK = 1000  # execute_many chunk for drain
BULK_CHUNK = 10_000  # the server's SUBMIT_MANY_MAX; also the scale workload's add_tasks chunk
POLL = 0.01  # seconds between completion checks
TIMING_LEAD = 2.0  # seconds from a timing run's start to its tasks' due times
SCALE_DAYS = 3
SCALE_CALLS = 20  # calls per query, and tasks fired, in the scale workload
FIRE_LEAD = 0.3  # seconds ahead each fired task of the scale workload is due
PHASE_S = float(os.environ.get("PHASE_S", "10"))  # seconds of each submit phase of producers, monitor, purge, aio
AIO_INFLIGHT = 64  # executes the aio workload's producer keeps in flight
PRODUCERS = int(os.environ.get("PRODUCERS", "8"))  # processes of the producers workload
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/bench_pg")
MYSQL_URL = os.environ.get("BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306/bench_mysql")
MARTINET_SYSTEMS = ("martinet", "martinet-curve", "martinet-pg", "martinet-mysql", "martinet-process")
POLL_EVERY = 1.0  # seconds between two polls of the dashboard's overview (monitor)
#: What the dashboard's overview fetches at each poll.
OVERVIEW = ("/api/v1/stats", "/api/v1/workers")
PURGE_N = int(os.environ.get("PURGE_N", "1000000"))
NOOP = {"name": "noop"}
HUEY_CONSUMER = (
    "from gevent import monkey; monkey.patch_all(); from huey.bin.huey_consumer import consumer_main; consumer_main()"
)
DEADLINE = float(os.environ.get("BENCH_TIMEOUT", "600"))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_kb(pid: int, field: str = "VmHWM") -> int:
    """A memory field of a live process's /proc status (VmHWM: peak RSS, VmRSS: RSS now), kB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a live process, its reaped children and its live descendants (0 if gone)."""
    try:
        # utime, stime, cutime, cstime: fields 14-17, counted after the ")" that ends the command name.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / CLOCK_TICKS + sum(cpu_s(child) for child in children(pid))


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def until(check, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(POLL)


def per_1000(cpu: float, count: int) -> float:
    return cpu / (count / 1000)


def latency_figures(to_result_ms: list[float], to_start_ms: list[float]) -> dict:
    """p50/p99 of submit -> result visible to the client, and of submit -> handler start."""
    return {
        "p50_ms": percentile(to_result_ms, 0.5),
        "p99_ms": percentile(to_result_ms, 0.99),
        "start_p50_ms": percentile(to_start_ms, 0.5),
        "start_p99_ms": percentile(to_start_ms, 0.99),
    }


def lateness_figures(lateness_ms: list[float]) -> dict:
    return {
        "lateness_p50_ms": percentile(lateness_ms, 0.5),
        "lateness_p99_ms": percentile(lateness_ms, 0.99),
        "lateness_max_ms": max(lateness_ms),
    }


def timing(workload: str, submit: Callable[[float], Any], handler_start: Callable[[Any, float], float]) -> dict:
    """The timing-spread or timing-burst workload (module docstring).

    ``submit(due)`` schedules one no-op task due at the epoch time ``due`` and returns a handle;
    ``handler_start(handle, timeout)`` waits for it and returns the time its handler started.
    """
    if workload not in ("timing-spread", "timing-burst"):
        raise SystemExit(f"unknown workload {workload!r}")
    started = time.time()
    submitted: list[tuple[Any, float]] = []
    for i in range(TIMING_N):
        if workload == "timing-spread":
            time.sleep(max(0.0, started + i * TIMING_LEAD / TIMING_N - time.time()))
            due = time.time() + TIMING_LEAD
        else:
            due = started + TIMING_LEAD
        submitted.append((submit(due), due))
    submit_s = time.time() - started
    deadline = time.monotonic() + DEADLINE
    lateness = []
    for handle, due in submitted:
        lateness.append((handler_start(handle, max(deadline - time.monotonic(), 0.1)) - due) * 1000)
    return {**lateness_figures(lateness), "submit_s": submit_s}


def iso_utc(epoch: float) -> str:
    """An epoch time as ISO 8601 UTC with microseconds, as Martinet's schedule() takes it."""
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat()


# ------------------------------------------------------------------ Martinet


def pg_connect(url: str) -> Any:
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5, application_name="martinet-bench")
    conn.autocommit = True
    return conn


def reset_pg(url: str) -> None:
    """Empty the PostgreSQL database of ``url`` (created if missing): its public schema dropped and created again."""
    import psycopg2

    try:
        conn = pg_connect(url)
    except psycopg2.OperationalError as e:
        if "does not exist" not in str(e):
            raise
        parsed = urllib.parse.urlsplit(url)
        with contextlib.closing(pg_connect(parsed._replace(path="/postgres").geturl())) as admin:
            with admin.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{parsed.path.lstrip("/")}"')
        conn = pg_connect(url)
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("SET lock_timeout = '10s'")
        cur.execute("DROP SCHEMA IF EXISTS public CASCADE")
        cur.execute("CREATE SCHEMA public")


def pg_backend_pids(conn: Any) -> list[int]:
    """The PostgreSQL client backends of the benchmark's database, but ``conn``'s own."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        return [pid for (pid,) in cur.fetchall()]


def mysql_connect(url: str, database: bool = True) -> Any:
    """A PyMySQL connection (autocommit) to the MariaDB of ``url``: to its database, or to none."""
    import pymysql

    parsed = urllib.parse.urlsplit(url)
    return pymysql.connect(
        host=parsed.hostname, port=parsed.port or 3306, user=parsed.username, password=parsed.password or "",
        database=parsed.path.lstrip("/") if database else None, charset="utf8mb4", autocommit=True,
        connect_timeout=5,
    )  # fmt: skip


def reset_mysql(url: str) -> None:
    """Drop the MariaDB database of ``url`` and create it again, empty."""
    name = urllib.parse.urlsplit(url).path.lstrip("/")
    with contextlib.closing(mysql_connect(url, database=False)) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")


class ServerDatabase(NamedTuple):
    """How a Martinet variant on a database server gets a fresh database and the driver's own connection to it,
    and which processes' CPU is the server's work there (None: it cannot be told, and is left out)."""

    url: str
    reset: Callable[[str], None]
    connect: Callable[[str], Any]
    backend_pids: Callable[[Any], list[int]] | None


#: The Martinet variants whose store is a database server rather than a SQLite file.
SERVER_DATABASES = {
    "martinet-pg": ServerDatabase(PG_URL, reset_pg, pg_connect, pg_backend_pids),
    # MariaDB is one process whose threads serve every connection: its CPU cannot be split per connection.
    "martinet-mysql": ServerDatabase(MYSQL_URL, reset_mysql, mysql_connect, None),
}


class MartinetSide:
    """A Martinet server of one of MARTINET_SYSTEMS on a fresh store in ``tmp`` (martinet-pg, martinet-mysql: their
    SERVER_DATABASES entry's, emptied), its client, and its worker once started."""

    def __init__(self, tmp: str, system: str = "martinet") -> None:
        from martinet_app.client import Martinet

        self.ports = [free_port() for _ in range(3)]
        self.http = f"http://127.0.0.1:{free_port()}"
        self.path = f"{tmp}/martinet.db"
        python = str(ROOT / ".venv" / "bin" / "python")
        client, worker, status = (str(p) for p in self.ports)
        client_keys, worker_flags, server_flags = _keys(Path(tmp)) if system == "martinet-curve" else ({}, [], [])
        if system == "martinet-process":
            server_flags = ["--durability", "process"]
        self.database = SERVER_DATABASES.get(system)
        #: The driver's own connection to the database server (SERVER_DATABASES): counts and the backends' CPU.
        self.conn = None
        db = f"sqlite:///{self.path}"
        if self.database is not None:
            self.database.reset(self.database.url)
            db, self.conn = self.database.url, self.database.connect(self.database.url)
        #: CPU seconds last seen of each database backend of the server (kept once it is gone).
        self.backends: dict[int, float] = {}
        self.m = Martinet("127.0.0.1", self.ports[0], timeout=60, **client_keys)
        spawned = time.perf_counter()
        self.server_cmd = [
            python, "-m", "martinet_app", "serve", "--client-port", client, "--worker-port", worker,
            "--status-port", status, "--http-port", self.http.rsplit(":", 1)[1], "--db", db,
            "--log-level", "warning", *server_flags,
        ]  # fmt: skip
        self.server = subprocess.Popen(self.server_cmd, cwd=ROOT)
        self.worker_cmd = [
            python, "-m", "martinet_app", "work", "--handlers", str(BENCH / "handlers"),
            "--concurrency", str(SLOTS), "--worker-port", worker, "--status-port", status,
            "--log-level", "warning", *worker_flags,
        ]  # fmt: skip
        self.worker: subprocess.Popen | None = None
        until(self._pings, "the Martinet server")
        #: Seconds from spawning the server to its first answer to a ping.
        self.startup_s = time.perf_counter() - spawned

    def _pings(self) -> bool:
        from martinet_app.errors import ServerUnavailable

        if self.server.poll() is not None:
            raise SystemExit(f"the Martinet server exited ({self.server.returncode}): {' '.join(self.server_cmd)}")
        try:
            self.m.ping()
            return True
        except ServerUnavailable:
            return False

    def start_worker(self) -> None:
        self.worker = subprocess.Popen(self.worker_cmd, cwd=ROOT)

    def worker_ready(self) -> None:
        """Start the worker if needed and wait for it to run one task (outside any timing)."""
        if self.worker is None:
            self.start_worker()
        until(lambda: self.m.workers(), "the Martinet worker")
        self.m.wait(self.m.execute(NOOP), timeout=60)

    def handler_start(self, task_id: int, timeout: float) -> float:
        """Wait for a task to succeed; the time its handler started (the no-op handler's result)."""
        task = self.m.wait(task_id, timeout=timeout)
        if task["status"] != "succeeded":
            raise SystemExit(f"Martinet task {task_id} ended {task['status']}")
        return task["result"]

    def all_done(self) -> bool:
        return not self.m.list(status="queued", limit=1) and not self.m.list(status="running", limit=1)

    def wait_all(self, ids: list[int]) -> None:
        self.m.wait(ids[-1], timeout=DEADLINE)
        until(self.all_done, "all Martinet tasks")

    def submit_many(self, count: int, chunk: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < count:
            size = min(chunk, count - len(ids))
            ids += self.m.execute_many([(NOOP, None)] * size)
        return ids

    def cpu(self) -> float:
        """CPU seconds used so far by the server, by the worker with its handler processes, and (martinet-pg) by
        the server's PostgreSQL backends: those of the benchmark's database but the driver's own connection,
        each as last seen (a backend gone since the previous call loses only what it used meanwhile).
        martinet-mysql: MariaDB's CPU is left out (SERVER_DATABASES)."""
        if self.database is not None and self.database.backend_pids is not None:
            for pid in self.database.backend_pids(self.conn):
                self.backends[pid] = cpu_s(pid) or self.backends.get(pid, 0.0)
        workers = cpu_s(self.worker.pid) if self.worker else 0.0
        return cpu_s(self.server.pid) + workers + sum(self.backends.values())

    def server_memory(self, when: str) -> dict:
        return {
            f"rss_{when}_kb": vm_kb(self.server.pid, "VmRSS"),
            f"hwm_{when}_kb": vm_kb(self.server.pid, "VmHWM"),
        }

    def rss(self) -> dict:
        slots = children(self.worker.pid) if self.worker else []
        return {
            "server_rss_kb": vm_kb(self.server.pid),
            "worker_rss_kb": vm_kb(self.worker.pid) if self.worker else 0,
            "slots_rss_kb": sum(vm_kb(pid) for pid in slots),
            "slots": len(slots),
        }

    def check(self, expected: int) -> None:
        """Every task in the store succeeded, and there are ``expected``: counted in the store itself (SQLite:
        the file, read-only; a database server: the driver's connection), as a client lists at most 10,000 tasks."""
        count = "SELECT status, COUNT(*) FROM task GROUP BY status"
        if self.conn is not None:
            with self.conn.cursor() as cur:
                cur.execute(count)
                counts = dict(cur.fetchall())
        else:
            with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as db:
                counts = dict(db.execute(count).fetchall())
        if counts != {"succeeded": expected}:
            raise SystemExit(f"Martinet: tasks by status {counts}, expected {expected} succeeded")

    def close(self) -> None:
        self.m.close()
        if self.worker is not None:
            stop(self.worker)
        stop(self.server)
        if self.conn is not None:
            self.conn.close()


def _keys(tmp: Path) -> tuple[dict, list[str], list[str]]:
    """CURVE keys in ``tmp``: the client's keyword arguments, the worker's flags and the server's flags."""
    from martinet_app import keys

    for name, role in (("server", None), ("client", "client-keys"), ("worker", "worker-keys")):
        public, _ = keys.generate(name, tmp / "own")
        if role:
            (tmp / role).mkdir()
            (tmp / role / public.name).write_bytes(public.read_bytes())
    own = tmp / "own"
    client = {"secret_key": str(own / "client.key_secret"), "server_key": str(own / "server.key")}
    worker = ["--secret-key", str(own / "worker.key_secret"), "--server-key", str(own / "server.key")]
    server = ["--secret-key", str(own / "server.key_secret"), "--client-keys", str(tmp / "client-keys"),
              "--worker-keys", str(tmp / "worker-keys")]  # fmt: skip
    return client, worker, server


def martinet(system: str, workload: str) -> dict:
    if workload in ("scale", "purge"):
        if system != "martinet":
            raise SystemExit(f"{workload} runs on martinet (SQLite) only")
        return scale() if workload == "scale" else purge()
    with tempfile.TemporaryDirectory(prefix="martinet-bench-") as tmp:
        side = MartinetSide(tmp, system)
        try:
            result = run_martinet(side, workload)
            result.update(side.rss())
            return result
        finally:
            side.close()


def submit_and_finish(side: Any, count: int, submit: Callable[[], Any], wait: Callable[[Any], None]) -> dict:
    """Time ``submit`` (``count`` tasks, worker running) and the run until ``wait(what submit returned)``
    returns, with the CPU ``side.cpu()`` counts meanwhile."""
    cpu = side.cpu()
    started = time.perf_counter()
    submitted_tasks = submit()
    submitted = time.perf_counter() - started
    wait(submitted_tasks)
    elapsed = time.perf_counter() - started
    cpu = side.cpu() - cpu
    return {
        "tasks_per_s": count / elapsed,
        "submit_per_s": count / submitted,
        "seconds": elapsed,
        "cpu_s_per_1000": per_1000(cpu, count),
    }


def run_martinet(side: MartinetSide, workload: str) -> dict:
    m = side.m
    if workload == "drain":
        ids = side.submit_many(DRAIN_N, CHUNK)
        cpu = side.cpu()
        spawned, started = time.time(), time.perf_counter()
        side.start_worker()
        side.wait_all(ids)
        elapsed = time.perf_counter() - started
        cpu = side.cpu() - cpu
        side.check(DRAIN_N)
        return {
            "tasks_per_s": DRAIN_N / elapsed,
            "seconds": elapsed,
            "startup_s": side.handler_start(ids[0], 60) - spawned,
            "cpu_s_per_1000": per_1000(cpu, DRAIN_N),
        }
    side.worker_ready()
    if workload == "stream":
        result = submit_and_finish(side, N, lambda: [m.execute(NOOP) for _ in range(N)], side.wait_all)
        side.check(N + 1)  # and the warm-up task
        return result
    if workload == "bulk":
        result = submit_and_finish(side, DRAIN_N, lambda: side.submit_many(DRAIN_N, BULK_CHUNK), side.wait_all)
        side.check(DRAIN_N + 1)
        return result
    if workload == "producers":
        return producers(side, side.ports[0], lambda ids: side.wait_all(sorted(ids)), lambda n: side.check(n + 1))
    if workload == "monitor":
        return monitor(side)
    if workload == "aio":
        return aio(side)
    if workload == "latency":
        to_result, to_start = [], []
        for _ in range(LATENCY_N):
            submitted, started = time.time(), time.perf_counter()
            start = side.handler_start(m.execute(NOOP), 60)
            to_result.append((time.perf_counter() - started) * 1000)
            to_start.append((start - submitted) * 1000)
        return latency_figures(to_result, to_start)
    return timing(workload, lambda due: m.schedule(iso_utc(due), NOOP), side.handler_start)


def submits(m: Any, until_done: Callable[[], bool]) -> dict:
    """One producer's executes, one call at a time, until ``until_done()``: p50/p99/max of each call (submit to
    its committed reply) and their count."""
    times = []
    while not until_done():
        started = time.perf_counter()
        m.execute(NOOP)
        times.append((time.perf_counter() - started) * 1000)
    return {"submits": len(times), **{f"submit_{q}_ms": percentile(times, v) for q, v in (("p50", 0.5), ("p99", 0.99))},
            "submit_max_ms": max(times)}  # fmt: skip


def for_seconds(seconds: float) -> Callable[[], bool]:
    deadline = time.perf_counter() + seconds
    return lambda: time.perf_counter() >= deadline


def get_ms(url: str) -> float:
    """Fetch ``url`` (it must answer 200); how long it took, ms."""
    import urllib.request

    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        response.read()
    return (time.perf_counter() - started) * 1000


class Poller(threading.Thread):
    """Fetches ``paths`` every ``every`` seconds until stopped, as a browser showing the overview does."""

    def __init__(self, base: str, paths: tuple[str, ...], every: float) -> None:
        super().__init__(daemon=True)
        self.base, self.paths, self.every = base, paths, every
        self.times: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            started = time.perf_counter()
            self.times.append(sum(get_ms(self.base + path) for path in self.paths))
            self.done.wait(max(0.0, self.every - (time.perf_counter() - started)))

    def stop(self) -> dict:
        self.done.set()
        self.join()
        return {"polls": len(self.times), "poll_p50_ms": percentile(self.times, 0.5), "poll_max_ms": max(self.times)}


def monitor(side: MartinetSide) -> dict:
    """One producer's executes for PHASE_S seconds, then as long again while the overview is polled every
    POLL_EVERY seconds (OVERVIEW): the submit figures of each phase, and the polls' own."""
    quiet = submits(side.m, for_seconds(PHASE_S))
    poller = Poller(side.http, OVERVIEW, POLL_EVERY)
    poller.start()
    polled = submits(side.m, for_seconds(PHASE_S))
    return {**prefixed("quiet", quiet), **prefixed("polled", polled), **poller.stop()}


def aio(side: MartinetSide) -> dict:
    """AIO_INFLIGHT asyncio producers sharing one martinet_app.aio client for PHASE_S seconds (see the docstring)."""
    import asyncio

    from martinet_app import aio as martinet_aio

    times: list[float] = []
    ids: list[int] = []

    async def produce(m: martinet_aio.Martinet, done: Callable[[], bool]) -> None:
        while not done():
            started = time.perf_counter()
            ids.append(await m.execute(NOOP))
            times.append((time.perf_counter() - started) * 1000)

    async def run() -> float:
        async with martinet_aio.Martinet("127.0.0.1", side.ports[0], timeout=60) as m:
            started = time.perf_counter()
            done = for_seconds(PHASE_S)
            await asyncio.gather(*(produce(m, done) for _ in range(AIO_INFLIGHT)))
            return time.perf_counter() - started

    submitted = asyncio.run(run())
    started = time.perf_counter() - submitted
    side.wait_all(sorted(ids))
    elapsed = time.perf_counter() - started
    if len(set(ids)) != len(ids):
        raise SystemExit(f"Martinet aio: {len(ids) - len(set(ids))} task ids returned twice")
    side.check(len(ids) + 1)  # and the warm-up task
    return {
        "submits": len(ids),
        "submits_per_s": len(ids) / submitted,
        "tasks_per_s": len(ids) / elapsed,
        **{f"submit_{q}_ms": percentile(times, v) for q, v in (("p50", 0.5), ("p99", 0.99))},
        "submit_max_ms": max(times),
    }


def producer(port: int | None, start: Any, out: Any) -> None:
    """One process of the producers workload: a client of its own (Martinet on ``port``; None: Huey, from the
    environment HueySide set), connected, then after ``start`` (a barrier) one submit at a time for PHASE_S
    seconds; puts its task ids, call times (ms), retries and end (time.monotonic()) on ``out``."""
    retries = [0]
    if port is None:
        import huey_app

        huey_app.huey.pending_count()  # opens its connection

        def submit() -> str:
            while True:
                try:
                    return huey_app.noop().id
                except sqlite3.OperationalError as e:
                    # SqliteHuey's BEGIN EXCLUSIVE gave up after its busy timeout (5 s): nothing was written.
                    if "locked" not in str(e):
                        raise
                    retries[0] += 1
    else:
        from martinet_app.client import Martinet

        m = Martinet("127.0.0.1", port, timeout=60)
        m.ping()

        def submit() -> int:
            return m.execute(NOOP)

    ids, times = [], []
    start.wait(60)
    done = for_seconds(PHASE_S)
    while not done():
        started = time.perf_counter()
        ids.append(submit())
        times.append((time.perf_counter() - started) * 1000)
    out.put({"ids": ids, "times": times, "retries": retries[0], "end": time.monotonic()})


def producers(side: Any, port: int | None, wait: Callable[[list], None], check: Callable[[int], None]) -> dict:
    """The producers workload (module docstring), the worker (consumer) of ``side`` running and warmed up:
    PRODUCERS ``producer`` processes on ``port`` (None: Huey); ``wait(ids)`` returns once those tasks are done,
    ``check(count)`` fails unless ``count`` submitted tasks (and the warm-up's) succeeded."""
    ctx = multiprocessing.get_context("spawn")  # no client state, ZeroMQ's or Huey's, copied by a fork
    start, out = ctx.Barrier(PRODUCERS + 1), ctx.Queue()
    procs = [ctx.Process(target=producer, args=(port, start, out), daemon=True) for _ in range(PRODUCERS)]
    for proc in procs:
        proc.start()
    cpu = side.cpu()
    start.wait(60)
    started = time.monotonic()
    runs: list[dict] = []
    deadline = time.monotonic() + PHASE_S + 60
    while len(runs) < PRODUCERS:
        with contextlib.suppress(queue.Empty):
            runs.append(out.get(timeout=POLL))
        failed = [proc.exitcode for proc in procs if proc.exitcode not in (None, 0)]
        if failed or time.monotonic() > deadline:
            raise SystemExit(f"producers: {len(runs)} of {PRODUCERS} reported (exit codes of the failed: {failed})")
    for proc in procs:
        proc.join(60)
    submitted = max(run["end"] for run in runs) - started
    ids = [task for run in runs for task in run["ids"]]
    wait(ids)
    elapsed = time.monotonic() - started
    cpu = side.cpu() - cpu
    if len(set(ids)) != len(ids):
        raise SystemExit(f"producers: {len(ids) - len(set(ids))} task ids returned twice")
    check(len(ids))
    times = [t for run in runs for t in run["times"]]
    return {
        "producers": PRODUCERS,
        "submits": len(ids),
        "submits_per_s": len(ids) / submitted,
        "tasks_per_s": len(ids) / elapsed,
        **{f"submit_{q}_ms": percentile(times, v) for q, v in (("p50", 0.5), ("p99", 0.99))},
        "submit_max_ms": max(times),
        **({"retries": sum(run["retries"] for run in runs)} if port is None else {}),  # Huey's only
        "cpu_s_per_1000": per_1000(cpu, len(ids)),
    }


def prefixed(prefix: str, figures: dict) -> dict:
    return {f"{prefix}_{key}": value for key, value in figures.items()}


def fill_finished(path: str, count: int) -> None:
    """Write ``count`` tasks that succeeded two days ago into a new store (the server counts them at its start)."""
    from martinet_app.store import Store

    store = Store.open(f"sqlite:///{path}")
    try:
        for k in range(-(-count // BULK_CHUNK)):
            store.add_tasks([(NOOP, {})] * min(BULK_CHUNK, count - k * BULK_CHUNK), run_at=0.0, now=0.0)
    finally:
        store.close()
    ago = time.time() - 2 * 86400
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE task SET status = 'succeeded', attempts = 1, started_at = ?, finished_at = ?", (ago, ago))


def purge() -> dict:
    """PURGE_N tasks that finished two days ago; one producer's executes for PHASE_S seconds, then while another
    client purges them all (``purge('succeeded', '1d')``, 100 per request): the submit figures of each phase,
    and how long the purge took."""
    from martinet_app.client import Martinet

    with tempfile.TemporaryDirectory(prefix="martinet-bench-") as tmp:
        fill_finished(f"{tmp}/martinet.db", PURGE_N)
        side = MartinetSide(tmp)
        try:
            side.worker_ready()
            quiet = submits(side.m, for_seconds(PHASE_S))
            purger = Martinet("127.0.0.1", side.ports[0], timeout=60)
            outcome: dict[str, float] = {}

            def run() -> None:
                started = time.perf_counter()
                outcome["deleted"] = purger.purge("succeeded", "1d")
                outcome["purge_s"] = time.perf_counter() - started

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            purging = submits(side.m, lambda: not thread.is_alive())
            purger.close()
            if outcome.get("deleted") != PURGE_N:
                raise SystemExit(f"purge deleted {outcome.get('deleted')} tasks, expected {PURGE_N}")
            return {"purge_n": PURGE_N, **outcome, **prefixed("quiet", quiet), **prefixed("purging", purging)}
        finally:
            side.close()


def fill(path: str, count: int) -> int:
    """Write ``count`` tasks scheduled over the next SCALE_DAYS days into a new store; returns an id in the middle."""
    from martinet_app.store import Store

    store = Store.open(f"sqlite:///{path}")
    try:
        now, chunks = time.time(), -(-count // BULK_CHUNK)
        firsts = []
        for k in range(chunks):
            size = min(BULK_CHUNK, count - k * BULK_CHUNK)
            run_at = now + SCALE_DAYS * 86400 * (k + 1) / chunks
            firsts += store.add_tasks([(NOOP, {})] * size, run_at=run_at, now=now)[:1]
        return firsts[len(firsts) // 2]
    finally:
        store.close()


def query_times(m: Any, task_id: int) -> dict:
    """p50/p99 ms of SCALE_CALLS calls of each read a client makes."""
    calls = {
        "status": lambda: m.status(task_id),
        "list": lambda: m.list(limit=50),
        "list_scheduled": lambda: m.list(status="scheduled", limit=50),
        "list_queued": lambda: m.list(status="queued", limit=50),
    }
    figures = {}
    for name, call in calls.items():
        times = []
        for _ in range(SCALE_CALLS):
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000)
        figures |= {f"{name}_p50_ms": percentile(times, 0.5), f"{name}_p99_ms": percentile(times, 0.99)}
    return figures


def http_times(base: str) -> dict:
    """p50/p99 ms of SCALE_CALLS fetches of the overview's data, of /metrics and of the dashboard's page."""
    figures = {}
    for name, path in (("overview", None), ("metrics", "/metrics"), ("page", "/")):
        times = [sum(get_ms(base + p) for p in (OVERVIEW if path is None else (path,))) for _ in range(SCALE_CALLS)]
        figures |= {f"{name}_p50_ms": percentile(times, 0.5), f"{name}_p99_ms": percentile(times, 0.99)}
    return figures


def fire_due(side: MartinetSide) -> dict:
    """With a worker: SCALE_CALLS tasks, one at a time, each due FIRE_LEAD s ahead; lateness and server CPU."""
    side.worker_ready()
    cpu = cpu_s(side.server.pid)
    lateness = []
    for _ in range(SCALE_CALLS):
        due = time.time() + FIRE_LEAD
        lateness.append((side.handler_start(side.m.schedule(iso_utc(due), NOOP), 60) - due) * 1000)
    cpu = cpu_s(side.server.pid) - cpu
    return {**lateness_figures(lateness), "server_cpu_ms_per_task": cpu / SCALE_CALLS * 1000}


def measure_store(tmp: str, task_id: int | None) -> dict:
    """Start a server on ``tmp``'s store and measure it (queries only when it holds ``task_id``)."""
    side = MartinetSide(tmp)
    try:
        figures = {"startup_s": side.startup_s, **side.server_memory("start")}
        if task_id is not None:
            figures |= query_times(side.m, task_id)
        figures |= http_times(side.http)
        figures |= fire_due(side)
        return figures | side.server_memory("end")
    finally:
        side.close()


def scale() -> dict:
    """The scale workload (module docstring): an empty store, then one filled with SCALE_N scheduled tasks."""
    result: dict[str, Any] = {"scale_n": SCALE_N}
    with tempfile.TemporaryDirectory(prefix="martinet-bench-") as tmp:
        result["empty"] = measure_store(tmp, None)
    with tempfile.TemporaryDirectory(prefix="martinet-bench-") as tmp:
        started = time.perf_counter()
        task_id = fill(f"{tmp}/martinet.db", SCALE_N)
        took = time.perf_counter() - started
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        result |= {"fill_s": took, "fill_rows_per_s": SCALE_N / took, "db_mb": size / 2**20}
        result["backlog"] = measure_store(tmp, task_id)
    return result


# ------------------------------------------------------------------ Huey


class HueySide:
    """bench/huey_app.py on a fresh SQLite file or Redis queue name, and its consumer once started."""

    def __init__(self, tmp: str, backend: str) -> None:
        self.env = dict(os.environ, BENCH_HUEY=backend, BENCH_HUEY_FILE=f"{tmp}/huey.db")
        self.env["BENCH_HUEY_NAME"] = f"martinet-bench-{uuid.uuid4().hex[:8]}"
        os.environ.update(self.env)
        sys.path.insert(0, str(BENCH))
        import huey_app

        self.noop = huey_app.noop
        self.app = huey_app.huey
        self.app.flush()
        self.env["PYTHONPATH"] = str(BENCH)
        self.consumer: subprocess.Popen | None = None

    def start_consumer(self) -> None:
        # huey_consumer, with gevent's monkey-patching first, as Huey's docs ask for greenlet workers.
        self.consumer = subprocess.Popen(
            [str(BENCH / ".venv" / "bin" / "python"), "-c", HUEY_CONSUMER, "huey_app.huey",
             "-k", "greenlet", "-w", str(CONCURRENCY), "-q"],
            cwd=BENCH, env=self.env,
        )  # fmt: skip

    def consumer_ready(self) -> None:
        """Start the consumer and wait for it to run one task; get() removes that task's result."""
        self.start_consumer()
        self.noop().get(blocking=True, timeout=60)

    def wait_results(self, count: int) -> None:
        until(lambda: self.app.result_count() >= count, "all Huey results")

    def check(self, expected: int) -> None:
        if self.app.result_count() != expected:
            raise SystemExit(f"Huey: {self.app.result_count()} results, expected {expected}")

    def cpu(self) -> float:
        """CPU seconds used so far by the consumer (its greenlets share the process)."""
        return cpu_s(self.consumer.pid) if self.consumer else 0.0

    def close(self) -> None:
        if self.consumer is not None:
            stop(self.consumer)
        self.app.flush()


def huey_handler_start(result: Any, timeout: float) -> float:
    """Wait for a Huey task's result: the time its handler started."""
    start = result.get(blocking=True, timeout=timeout)
    if not isinstance(start, float):
        raise SystemExit(f"Huey task returned {start!r}, not its start time")
    return start


def huey(backend: str, workload: str) -> dict:
    if workload in ("bulk", "scale", "monitor", "aio", "purge"):
        raise SystemExit(f"{workload} is a Martinet-only workload")
    with tempfile.TemporaryDirectory(prefix="huey-bench-") as tmp:
        side = HueySide(tmp, backend)
        try:
            result = run_huey(side, workload)
            result["consumer_rss_kb"] = vm_kb(side.consumer.pid)
            return result
        finally:
            side.close()


def run_huey(side: HueySide, workload: str) -> dict:
    if workload == "drain":
        first = side.noop()
        for _ in range(DRAIN_N - 1):
            side.noop()
        spawned, started = time.time(), time.perf_counter()
        side.start_consumer()
        side.wait_results(DRAIN_N)
        elapsed = time.perf_counter() - started
        cpu = side.cpu()
        side.check(DRAIN_N)
        return {
            "tasks_per_s": DRAIN_N / elapsed,
            "seconds": elapsed,
            "startup_s": huey_handler_start(first, 60) - spawned,
            "cpu_s_per_1000": per_1000(cpu, DRAIN_N),
        }
    side.consumer_ready()
    if workload == "stream":
        result = submit_and_finish(side, N, lambda: [side.noop() for _ in range(N)], lambda _: side.wait_results(N))
        side.check(N)
        return result
    if workload == "producers":
        return producers(side, None, lambda ids: side.wait_results(len(ids)), side.check)
    if workload == "latency":
        to_result, to_start = [], []
        for _ in range(LATENCY_N):
            submitted, started = time.time(), time.perf_counter()
            start = huey_handler_start(side.noop(), 60)
            to_result.append((time.perf_counter() - started) * 1000)
            to_start.append((start - submitted) * 1000)
        return latency_figures(to_result, to_start)
    return timing(
        workload,
        lambda due: side.noop.schedule(eta=datetime.datetime.fromtimestamp(due, datetime.UTC)),
        huey_handler_start,
    )


def main() -> None:
    system, workload = sys.argv[1], sys.argv[2]
    if system in MARTINET_SYSTEMS:
        sys.path.insert(0, str(ROOT))
        result = martinet(system, workload)
    elif system in ("huey-sqlite", "huey-redis"):
        result = huey(system.removeprefix("huey-"), workload)
    else:
        raise SystemExit(f"unknown system {system!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

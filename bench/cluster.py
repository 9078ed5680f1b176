"""Martinet servers sharing one PostgreSQL or MariaDB: drain and stream with 1 and 2 servers (`make bench-cluster`).

    .venv/bin/python bench/cluster.py [--backend postgresql|mysql] [--reps 3] [--drain-n 20000] [--stream-n 3000]
        [--servers 1 2] [--workloads drain stream cross sparse]

Each run starts from an empty database ``bench_cluster``: on PostgreSQL (the default) at 127.0.0.1:5432,
user postgres, created if missing, its ``public`` schema dropped and created again; on MariaDB
(``--backend mysql``) at 127.0.0.1:3306, user root, dropped and created again. Then K servers
(``martinet serve --db postgresql://...`` or ``mysql://...``, ``--bind 127.0.0.K``, the same free ports on
every address) and, per server, one worker (``martinet work --url 127.0.0.K --handlers bench/handlers``, 4 slots,
automatic prefetch), running bench/handlers/noop.py (as bench/drive.py does), which returns the time its handler
started.

- drain: N tasks submitted with ``execute_many`` (chunks of 1,000) while no worker runs, split
  evenly between the servers; then every worker is started at once, and the time runs until no
  task is scheduled, queued or running (worker start-up included, as in bench/drive.py).
- stream: workers running (each warmed up with one task through its own server); one producer
  submits N tasks one ``execute`` at a time, round-robin over one client per server; the time runs
  from the first submit until no task is left unfinished. Also submit -> handler start, p50/p99,
  from each task's submit time and its result (read afterwards, outside the timed phase).
- cross (2 servers or more): stream with one worker only, on server 1, and the producer submitting
  to the last server: every task is woken across servers before it starts (PostgreSQL: a NOTIFY;
  MariaDB has none: server 1 finds it when it next looks at the queue, as a status event of its
  worker, its lease's heartbeat or its CLUSTER_POLL makes it do).
- sparse (2 servers or more, not in the default workloads): cross, but SPARSE_N (30) tasks, each
  submitted once every task has finished and a pause drawn from 0-2 s (seeded: the same every run)
  has passed: the worker is idle when each task comes, so submit -> handler start is the
  cross-server wake-up alone, at a random point of server 1's cycle. Its tasks/s and CPU per task
  count the pauses.

Completion is watched on the database itself (an EXISTS query every 20 ms on this script's own
connection; on PostgreSQL its backend is left out of the database's CPU figures, on MariaDB it is a
thread of mariadbd and counted), so the watching costs no Martinet CPU. CPU seconds per 1,000 tasks
over the timed phase, from /proc/PID/stat (user + system, with reaped children): each server; each
worker with its handler processes; the database: on PostgreSQL every process whose command name is
``postgres`` (the postmaster's reaped children included, so backends that end during the phase
count), split by what each serves; on MariaDB the ``mariadbd`` process, one process whose threads
serve every connection (other databases' too), not split; this script (the producer); and the
machine's busy cores from /proc/stat. From PostgreSQL's statistics (read 1.5 s after each phase, once
every backend has reported): this database's transactions per task (this script's own queries left
out), and the WAL records, bytes and syncs per task of the whole PostgreSQL cluster (other databases'
too). MariaDB keeps no such per-database figures: the table leaves those rows out.

A run whose tasks do not all finish within ``--timeout`` seconds is reported as incomplete (with
what it saw: tasks by status, server and worker log lines) and the benchmark goes on. Other
people's work shares the machine: before each run the script waits (up to --quiet-wait, 20 s) for
it to be nearly idle (--quiet, 0.3 busy cores), and each run reports the busy cores its counted
processes do not explain.

The servers, workers and handler processes import HEAD's martinet_app (--code REV: another commit's),
extracted with ``git archive`` into a temporary folder put first on PYTHONPATH (--code tree: the working
tree as it is), so the figures belong to a commit even while someone edits the working tree.

Prints a table of medians and writes every run as JSON to bench/results/cluster-<UTC time>.json.
Settings also come from the environment: REPS, DRAIN_N, STREAM_N, SPARSE_N (30), SERVERS ("1 2"),
CLUSTER_WORKLOADS ("drain stream cross"), CLUSTER_TIMEOUT (120), CLUSTER_BACKEND (postgresql, or mysql),
CLUSTER_PG (postgresql://postgres@127.0.0.1:5432), CLUSTER_MYSQL (mysql://root@127.0.0.1:3306), SLOTS (4),
CLUSTER_CODE (HEAD), CLUSTER_QUIET (0.3), CLUSTER_QUIET_WAIT (20).
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import datetime
import functools
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import drive

BENCH = drive.BENCH
ROOT = drive.ROOT
MARTINET = str(ROOT / ".venv" / "bin" / "martinet")
MARTINET_PYTHON = str(ROOT / ".venv" / "bin" / "python")
DATABASE = "bench_cluster"
WATCH = 0.02  # seconds between completion checks on PostgreSQL
UNFINISHED = ("scheduled", "queued", "running")
#: The longest pause before each submit of the sparse workload (uniform from 0): martinet_app.config.CLUSTER_POLL.
SPARSE_PAUSE = 2.0
STATS_FLUSH = 1.5  # seconds for backends to report their statistics (PostgreSQL 15: at most once a second)
RESULTS = BENCH / "results"
#: Where the servers, workers and handler processes run (and import martinet_app from, unless --code tree).
CODE = {"cwd": ROOT}


# ------------------------------------------------------------------ CPU from /proc


def stat_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime of one process, seconds (0 if it is gone); no live children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / drive.CLOCK_TICKS


def pids_named(comm: str) -> list[int]:
    """The live processes whose command name is ``comm``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    pids.append(int(entry.name))
    return pids


def postmaster(pids: set[int]) -> int | None:
    """The postgres process whose parent is not a postgres process."""
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) not in pids:
                return pid
    return None


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat (iowait counts as idle)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


# ------------------------------------------------------------------ the shared database


class Database(abc.ABC):
    """The database the servers share (``base``: its server's URL without a database name): DATABASE emptied,
    and the CPU of its server's processes. The figures a backend cannot give are empty here."""

    name = ""
    comm = ""  # the command name of the database server's processes
    cpu_label = ""  # the table's label of their CPU
    projected_label = ""  # what of it the projection scales (Database.projected)

    def __init__(self, base: str) -> None:
        self.url = f"{base}/{DATABASE}"
        self.base = base

    @abc.abstractmethod
    def reset(self) -> None:
        """Make DATABASE exist and be empty."""

    @abc.abstractmethod
    def connect(self) -> Any:
        """An autocommit connection to DATABASE."""

    @abc.abstractmethod
    def projected(self, run: dict) -> float:
        """The database's CPU per 1,000 tasks of ``run`` that the projection scales (projected_label)."""

    def cpu(self) -> dict[int, float]:
        """CPU seconds of every live process of the database server."""
        return {pid: stat_cpu(pid) for pid in pids_named(self.comm)}

    def own_pid(self, watch: Watch) -> int | None:
        """The process serving ``watch``'s connection alone, left out of the CPU figures (None: there is none)."""
        return None

    def counters(self, watch: Watch) -> dict[str, float]:
        """The database's counters (counter_figures)."""
        return {}

    def backends(self, watch: Watch) -> dict[int, str]:
        """pid -> what it serves, of the processes serving one connection each."""
        return {}

    def split(self, used: Callable[[Callable[[int], bool]], float], pids: set[int], backends: dict[int, str]) -> dict:
        """The database's CPU split by what its processes serve; ``used(keep)`` is the CPU per 1,000 tasks of
        the processes ``keep`` picks."""
        return {}


class Postgres(Database):
    """PostgreSQL: DATABASE's public schema emptied, its processes' CPU split, its statistics (transactions, WAL)."""

    name = "PostgreSQL"
    comm = "postgres"
    cpu_label = "PostgreSQL (all postgres processes)"
    projected_label = "Martinet's connections and auxiliary processes"

    def reset(self) -> None:
        drive.reset_pg(self.url)

    def connect(self) -> Any:
        return drive.pg_connect(self.url)

    def own_pid(self, watch: Watch) -> int | None:
        return watch.query("SELECT pg_backend_pid()")[0][0]

    def counters(self, watch: Watch) -> dict[str, float]:
        """PostgreSQL's counters, after STATS_FLUSH s for every backend to report: this database's transactions,
        and the cluster's WAL records, bytes and syncs (pg_stat_wal: every database's, someone else's too)."""
        time.sleep(STATS_FLUSH)
        own = watch.queries
        (xacts, records, size, syncs), *_ = watch.query(
            "SELECT d.xact_commit + d.xact_rollback, w.wal_records, w.wal_bytes, w.wal_sync"
            " FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = %s",
            (DATABASE,),
        )
        return {"xacts": xacts, "wal_records": records, "wal_bytes": float(size), "wal_syncs": syncs, "own": own}

    def backends(self, watch: Watch) -> dict[int, str]:
        """pid -> what it serves: 'bench' (this database, but not this connection), 'other' (another
        database's client backend); auxiliary processes (checkpointer, walwriter...) are left out."""
        rows = watch.query("SELECT pid, datname, backend_type FROM pg_stat_activity WHERE pid <> pg_backend_pid()")
        return {
            pid: "bench" if datname == DATABASE else "other"
            for pid, datname, backend_type in rows
            if datname is not None and backend_type == "client backend"
        }

    def split(self, used: Callable[[Callable[[int], bool]], float], pids: set[int], backends: dict[int, str]) -> dict:
        """Martinet's connections (this database's backends), other databases' live backends, the auxiliary
        processes (checkpointer, walwriter, autovacuum launcher...), and the postmaster, whose figure holds every
        backend or autovacuum worker that ended and was reaped meanwhile, of any database."""
        root = postmaster(pids)
        return {
            "postgres_split_per_1000": {
                "bench_backends": used(lambda p: backends.get(p) == "bench"),
                "other_databases": used(lambda p: backends.get(p) == "other"),
                "auxiliary": used(lambda p: p not in backends and p != root),
                "postmaster_and_reaped": used(lambda p: p == root),
            }
        }

    def projected(self, run: dict) -> float:
        split = run["postgres_split_per_1000"]
        return split["bench_backends"] + split["auxiliary"]


class MariaDB(Database):
    """MariaDB: DATABASE dropped and created again, and the ``mariadbd`` process's CPU. That one process's threads
    serve every connection (this script's and other databases' too), so its CPU cannot be split, and MariaDB
    keeps no per-database transaction count; its redo log figures are left out."""

    name = "MariaDB"
    comm = "mariadbd"
    cpu_label = "MariaDB (the mariadbd process: every connection)"
    projected_label = "the whole mariadbd process"

    def reset(self) -> None:
        drive.reset_mysql(self.url)

    def connect(self) -> Any:
        return drive.mysql_connect(self.url)

    def projected(self, run: dict) -> float:
        return run["cpu_s_per_1000"]["database"]


#: --backend -> the database the servers share, from the parsed arguments.
BACKENDS: dict[str, Callable[[argparse.Namespace], Database]] = {
    "postgresql": lambda args: Postgres(args.pg),
    "mysql": lambda args: MariaDB(args.mysql),
}


class Watch:
    """This script's own connection to the benchmark's database: completion checks and the figures after a run."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.conn = database.connect()
        self.queries = 0  # each one a transaction (autocommit), counted in pg_stat_database
        self.pid = database.own_pid(self)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        self.queries += 1
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

    def unfinished(self) -> bool:
        return bool(self.query("SELECT EXISTS (SELECT 1 FROM task WHERE status IN %s)", (UNFINISHED,))[0][0])

    def wait_finished(self, timeout: float) -> bool:
        """Wait until no task is unfinished; False if some still are after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.unfinished():
            if time.monotonic() > deadline:
                return False
            time.sleep(WATCH)
        return True

    def counters(self) -> dict[str, float]:
        """The database's counters (Database.counters)."""
        return self.database.counters(self)

    def counts(self) -> dict[str, int]:
        return dict(self.query("SELECT status, COUNT(*) FROM task GROUP BY status"))

    def tasks(self) -> list[tuple]:
        """(id, status, worker, attempts, result) of every task."""
        return self.query("SELECT id, status, worker, attempts, result FROM task ORDER BY id")

    def backends(self) -> dict[int, str]:
        """The database's processes serving one connection each (Database.backends)."""
        return self.database.backends(self)

    def close(self) -> None:
        self.conn.close()


# ------------------------------------------------------------------ the cluster


def free_ports(count: int, hosts: list[str]) -> list[int]:
    """``count`` TCP ports free on every one of ``hosts``."""
    import socket

    while True:
        ports = [drive.free_port() for _ in range(count)]
        try:
            for host in hosts:
                for port in ports:
                    with socket.socket() as s:
                        s.bind((host, port))
        except OSError:
            continue
        if len(set(ports)) == count:
            return ports


class Cluster:
    """``count`` servers on one PostgreSQL database, each on its own loopback address, and their workers."""

    def __init__(self, count: int, db_url: str, slots: int, tmp: Path) -> None:
        from martinet_app.client import Martinet

        self.tmp = tmp
        self.hosts = [f"127.0.0.{k + 1}" for k in range(count)]
        self.ports = free_ports(3, self.hosts)
        client, worker, status = (str(p) for p in self.ports)
        self.logs: dict[str, Path] = {}
        self.servers = [
            self._spawn(f"server{k + 1}", [MARTINET, "serve", "--db", db_url, "--bind", host, "--client-port", client,
                                           "--worker-port", worker, "--status-port", status, "--log-level", "warning"])
            for k, host in enumerate(self.hosts)
        ]  # fmt: skip
        self.worker_cmds = [
            [MARTINET, "work", "--handlers", str(BENCH / "handlers"), "--url", host, "--concurrency", str(slots),
             "--worker-port", worker, "--status-port", status, "--log-level", "warning"]
            for host in self.hosts
        ]  # fmt: skip
        self.workers: list[subprocess.Popen] = []
        self.clients = [Martinet(host, self.ports[0], timeout=60) for host in self.hosts]

    def wait_ready(self) -> None:
        """Wait (at most 30 s) until every server answers a ping."""
        from martinet_app.client import Martinet

        for k, host in enumerate(self.hosts):
            with contextlib.closing(Martinet(host, self.ports[0], timeout=1)) as m:
                self._until(lambda m=m: _answers(m), 30, f"server {k + 1} to answer a ping")

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.logs[name] = self.tmp / f"{name}.log"
        with self.logs[name].open("ab") as log:
            return subprocess.Popen(cmd, cwd=CODE["cwd"], stdout=subprocess.DEVNULL, stderr=log)

    def _until(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            dead = [name for name, proc in self._procs() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"gave up waiting for {what}" + (f": {', '.join(dead)} exited" if dead else ""))
            time.sleep(0.05)

    def _procs(self) -> list[tuple[str, subprocess.Popen]]:
        return [(f"server{k + 1}", p) for k, p in enumerate(self.servers)] + [
            (f"worker{k + 1}", p) for k, p in enumerate(self.workers)
        ]

    def start_workers(self, count: int | None = None) -> None:
        """Start the workers of the first ``count`` servers (None: of every server)."""
        self.workers = [self._spawn(f"worker{k + 1}", cmd) for k, cmd in enumerate(self.worker_cmds[:count])]

    def workers_listed(self) -> dict[str, int]:
        """Worker id -> the index of the server it was started for (by its pid), of the workers listed now.

        The union of every server's list: a server lists its own workers, or (since leases) every live server's.
        """
        index = {proc.pid: k for k, proc in enumerate(self.workers)}
        found = {}
        for m in self.clients:
            with contextlib.suppress(Exception):
                found |= {w["id"]: index[w["pid"]] for w in m.workers() if w.get("pid") in index}
        return found

    def workers_connected(self) -> dict[str, int]:
        """As workers_listed, once every worker is listed (at most 30 s)."""
        everyone = set(range(len(self.workers)))
        self._until(lambda: set(self.workers_listed().values()) == everyone, 30, "every worker to connect")
        return self.workers_listed()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each server, and of each worker with its handler processes."""
        figures = {f"server{k + 1}": drive.cpu_s(p.pid) for k, p in enumerate(self.servers)}
        return figures | {f"worker{k + 1}": drive.cpu_s(p.pid) for k, p in enumerate(self.workers)}

    def log_tail(self, lines: int = 5) -> dict[str, dict]:
        """Per process: how many lines it logged (WARNING and above) and the last ``lines`` of them."""
        found = {}
        for name, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            if text:
                found[name] = {"lines": len(text), "last": text[-lines:]}
        return found

    def close(self) -> None:
        for m in self.clients:
            m.close()
        for proc in self.workers:
            drive.stop(proc)
        for proc in self.servers:
            drive.stop(proc)


def _answers(m: Any) -> bool:
    from martinet_app.errors import ServerUnavailable

    try:
        m.ping()
        return True
    except ServerUnavailable:
        return False


# ------------------------------------------------------------------ one run


def snapshot(cluster: Cluster, database: Database) -> dict:
    return {
        "martinet": cluster.cpu(),
        "database": database.cpu(),
        "machine": machine_ticks(),
        "own": sum(os.times()[:2]),
        "at": time.perf_counter(),
    }


def cpu_figures(before: dict, after: dict, watch: Watch, backends: dict[int, str], done: int) -> dict:
    """CPU seconds per 1,000 finished tasks between two snapshots, per process and for the database server."""
    scale = 1000 / max(done, 1)
    per = {name: (after["martinet"][name] - before["martinet"].get(name, 0.0)) * scale for name in after["martinet"]}
    pids = (set(before["database"]) | set(after["database"])) - {watch.pid}

    def used(keep: Callable[[int], bool]) -> float:
        chosen = [p for p in pids if keep(p)]
        return sum(after["database"].get(p, 0.0) - before["database"].get(p, 0.0) for p in chosen) * scale

    seconds = after["at"] - before["at"]
    busy = (after["machine"][0] - before["machine"][0]) / drive.CLOCK_TICKS
    cpu = per | {"martinet": sum(per.values()), "database": used(lambda p: True)}
    cpu["harness"] = (after["own"] - before["own"]) * scale
    counted = cpu["martinet"] + cpu["database"] + cpu["harness"]
    return {
        "cpu_s_per_1000": cpu,
        **watch.database.split(used, set(before["database"]) | set(after["database"]), backends),
        "machine_busy_cores": busy / seconds,
        # Busy cores not explained by the processes counted here: someone else's load on the machine.
        "outside_busy_cores": busy / seconds - counted * done / 1000 / seconds,
    }


def counter_figures(before: dict, after: dict, done: int) -> dict:
    """Per finished task: this database's transactions (less this script's own queries), the cluster's WAL
    (PostgreSQL's counters; none on MariaDB)."""
    if not before:
        return {}
    delta = {key: after[key] - before[key] for key in before}
    per = 1 / max(done, 1)
    return {
        "postgres_per_task": {
            "transactions": (delta["xacts"] - delta["own"]) * per,
            "wal_records": delta["wal_records"] * per,
            "wal_bytes": delta["wal_bytes"] * per,
            "wal_syncs": delta["wal_syncs"] * per,
        }
    }


def outcome(cluster: Cluster, watch: Watch, owners: dict[int, int], worker_server: dict[str, int]) -> dict:
    """What the store holds after a run: tasks by status, by worker's server, run via another server, redelivered."""
    rows = watch.tasks()
    by_server = [0] * len(cluster.servers)
    elsewhere = redelivered = 0
    for task_id, _status, worker, attempts, _result in rows:
        if worker in worker_server:
            by_server[worker_server[worker]] += 1
            if task_id in owners and owners[task_id] != worker_server[worker]:
                elsewhere += 1
        if attempts and attempts > 1:
            redelivered += 1
    return {
        "status_counts": watch.counts(),
        "ran_by_worker": by_server,
        "ran_elsewhere": elsewhere,
        "redelivered": redelivered,
        "logs": cluster.log_tail(),
    }


def drain(cluster: Cluster, watch: Watch, count: int, timeout: float) -> dict:
    owners: dict[int, int] = {}
    for k, m in enumerate(cluster.clients):
        share = count // len(cluster.clients) + (k < count % len(cluster.clients))
        ids: list[int] = []
        while len(ids) < share:
            ids += m.execute_many([(drive.NOOP, None)] * min(drive.CHUNK, share - len(ids)))
        owners.update(dict.fromkeys(ids, k))
    counters = watch.counters()
    backends = watch.backends()
    before = snapshot(cluster, watch.database)
    spawned = time.time()
    cluster.start_workers()
    complete = watch.wait_finished(timeout)
    after = snapshot(cluster, watch.database)
    elapsed = after["at"] - before["at"]
    at_deadline = {} if complete else watch.counts()
    backends |= watch.backends()
    counters_after = watch.counters()
    worker_server = cluster.workers_connected() if complete else cluster.workers_listed()
    result = outcome(cluster, watch, owners, worker_server) | {"status_counts_at_deadline": at_deadline}
    done = (at_deadline or result["status_counts"]).get("succeeded", 0)
    starts = [json.loads(r[4]) for r in watch.tasks() if r[1] == "succeeded" and r[4] is not None]
    return {
        "complete": complete,
        "tasks": count,
        "seconds": elapsed,
        "tasks_per_s": done / elapsed,
        "startup_s": min(starts) - spawned if starts else None,
        **cpu_figures(before, after, watch, backends, done),
        **counter_figures(counters, counters_after, done),
        **result,
    }


def settle(watch: Watch, seconds: float, timeout: float) -> None:
    """Wait until every task has finished, then ``seconds`` more: the worker is idle when the next task comes."""
    if not watch.wait_finished(timeout):
        raise RuntimeError(f"the tasks did not finish within {timeout:g} s: {watch.counts()}")
    time.sleep(seconds)


def stream(
    cluster: Cluster,
    watch: Watch,
    count: int,
    timeout: float,
    cross: bool = False,
    pause: Callable[[], float] | None = None,
) -> dict:
    """One producer, one execute at a time, round-robin over the servers; ``cross``: one worker, on server 1,
    and every submit to the last server; ``pause``: before each submit, wait for every task to finish and
    ``pause()`` seconds more (settle)."""
    cluster.start_workers(1 if cross else None)
    worker_server = cluster.workers_connected()
    for m in cluster.clients:  # warm-up: one task through each server, outside the timing
        m.execute(drive.NOOP)
    if not watch.wait_finished(60):
        raise RuntimeError(f"the warm-up tasks did not finish within 60 s: {watch.counts()}")
    warm = {row[0] for row in watch.tasks()}
    counters = watch.counters()
    backends = watch.backends()
    owners: dict[int, int] = {}
    submitted: dict[int, float] = {}
    clients = cluster.clients[-1:] if cross else cluster.clients
    before = snapshot(cluster, watch.database)
    for i in range(count):
        if pause is not None:
            settle(watch, pause(), timeout)
        k = i % len(clients)
        at = time.time()
        task_id = clients[k].execute(drive.NOOP)
        submitted[task_id], owners[task_id] = at, len(cluster.clients) - 1 if cross else k
    submit_s = time.perf_counter() - before["at"]
    complete = watch.wait_finished(timeout)
    after = snapshot(cluster, watch.database)
    elapsed = after["at"] - before["at"]
    at_deadline = {} if complete else watch.counts()
    backends |= watch.backends()
    counters_after = watch.counters()
    result = outcome(cluster, watch, owners, worker_server) | {"status_counts_at_deadline": at_deadline}
    done = (at_deadline or result["status_counts"]).get("succeeded", 0) - len(warm)
    to_start = [
        (json.loads(r[4]) - submitted[r[0]]) * 1000
        for r in watch.tasks()
        if r[0] in submitted and r[1] == "succeeded" and r[4] is not None
    ]
    return {
        "complete": complete,
        "tasks": count,
        "seconds": elapsed,
        "tasks_per_s": done / elapsed,
        "submit_per_s": count / submit_s,
        **_latency(to_start),
        **cpu_figures(before, after, watch, backends, done),
        **counter_figures(counters, counters_after, done),
        **result,
    }


def _latency(to_start: list[float]) -> dict:
    if not to_start:
        return {}
    return {
        "start_p50_ms": drive.percentile(to_start, 0.5),
        "start_p99_ms": drive.percentile(to_start, 0.99),
        "start_max_ms": max(to_start),
        "start_over_100ms": sum(ms > 100 for ms in to_start),
    }


def quiet(limit: float, patience: float) -> float:
    """Wait up to ``patience`` seconds for the machine's busy cores (over half a second) to fall to ``limit``;
    returns the last figure (other people's tests share this machine)."""
    deadline = time.monotonic() + patience
    while True:
        before, started = machine_ticks()[0], time.perf_counter()
        time.sleep(0.5)
        busy = (machine_ticks()[0] - before) / drive.CLOCK_TICKS / (time.perf_counter() - started)
        if busy <= limit or time.monotonic() > deadline:
            return busy


def one_run(servers: int, workload: str, args: argparse.Namespace, database: Database) -> dict:
    database.reset()
    idle = {"busy_cores_before": quiet(args.quiet, args.quiet_wait)}
    with tempfile.TemporaryDirectory(prefix="martinet-cluster-") as tmp:
        cluster = Cluster(servers, database.url, args.slots, Path(tmp))
        watch = None
        try:
            cluster.wait_ready()
            watch = Watch(database)
            if workload == "drain":
                return idle | drain(cluster, watch, args.drain_n, args.timeout)
            if workload == "sparse":
                pause = functools.partial(random.Random(0).uniform, 0, SPARSE_PAUSE)  # the same pauses every run
                return idle | stream(cluster, watch, args.sparse_n, args.timeout, cross=True, pause=pause)
            return idle | stream(cluster, watch, args.stream_n, args.timeout, cross=workload == "cross")
        except Exception as exc:  # a run that breaks is reported, and the benchmark goes on
            seen = {"logs": cluster.log_tail(10)}
            with contextlib.suppress(Exception):
                seen["status_counts"] = watch.counts()
            return idle | {"complete": False, "error": f"{type(exc).__name__}: {exc}", **seen}
        finally:
            if watch is not None:
                watch.close()
            cluster.close()


# ------------------------------------------------------------------ the table


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}" if abs(value) >= 0.1 or not value else f"{value:.3f}"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def pick(run: dict, path: str) -> Any:
    value: Any = run
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


#: The workloads a row of the table applies to.
ALL, STREAMS, STARTS = ("drain", "stream", "cross", "sparse"), ("stream", "cross"), ("stream", "cross", "sparse")
ROWS = [
    # (label, path in a run's figures, workloads it applies to)
    ("tasks/s (median)", "tasks_per_s", ALL),
    ("submits/s", "submit_per_s", STREAMS),
    ("worker start-up (spawn to first handler start), s", "startup_s", ("drain",)),
    ("submit -> handler start p50, ms", "start_p50_ms", STARTS),
    ("submit -> handler start p99, ms", "start_p99_ms", STARTS),
    ("submit -> handler start max, ms", "start_max_ms", STARTS),
    ("CPU s / 1000 tasks: server 1", "cpu_s_per_1000.server1", ALL),
    ("CPU s / 1000 tasks: server 2", "cpu_s_per_1000.server2", ALL),
    ("CPU s / 1000 tasks: worker 1 + its handler processes", "cpu_s_per_1000.worker1", ALL),
    ("CPU s / 1000 tasks: worker 2 + its handler processes", "cpu_s_per_1000.worker2", ALL),
    ("CPU s / 1000 tasks: all Martinet processes", "cpu_s_per_1000.martinet", ALL),
    ("CPU s / 1000 tasks: {database}", "cpu_s_per_1000.database", ALL),
    ("CPU s / 1000 tasks: PostgreSQL, Martinet's connections", "postgres_split_per_1000.bench_backends",
     ALL),
    ("CPU s / 1000 tasks: PostgreSQL, ended backends and autovacuum (any database)",
     "postgres_split_per_1000.postmaster_and_reaped", ALL),
    ("CPU s / 1000 tasks: producer (this script)", "cpu_s_per_1000.harness", STARTS),
    ("PostgreSQL transactions per task (this database)", "postgres_per_task.transactions", ALL),
    ("WAL syncs per task (whole PostgreSQL cluster)", "postgres_per_task.wal_syncs", ALL),
    ("WAL bytes per task (whole PostgreSQL cluster)", "postgres_per_task.wal_bytes", ALL),
    ("machine busy just before the run, cores", "busy_cores_before", ALL),
    ("machine busy, cores of 2", "machine_busy_cores", ALL),
    ("machine busy outside the processes above (others' load), cores", "outside_busy_cores", ALL),
]  # fmt: skip


def table(runs: list[dict], configs: list[tuple[str, int]], database: Database) -> list[str]:
    """Medians over each configuration's complete runs; the "each run" rows show every run. Rows whose figure
    ``database`` cannot give (every cell "-") are left out."""
    header = ["", *(f"{w}, {s} server{'s' if s > 1 else ''}" for w, s in configs)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def of(config: tuple[str, int], complete: bool = False) -> list[dict]:
        return [r for r in runs if (r["workload"], r["servers"]) == config and (r["complete"] or not complete)]

    def row(label: str, cells: list[str]) -> None:
        lines.append("| " + " | ".join([label, *cells]) + " |")

    row("tasks/s, each run", [" ".join(fmt(r.get("tasks_per_s")) + ("" if r["complete"] else "*") for r in of(c))
                              for c in configs])  # fmt: skip
    for label, path, workloads in ROWS:
        cells = []
        for config in configs:
            values = [pick(r, path) for r in of(config, complete=True) if config[0] in workloads]
            cells.append(fmt(median([v for v in values if v is not None])))
        if any(cell != "-" for cell in cells):
            row(label.format(database=database.cpu_label), cells)
    shares = []
    for config in configs:
        parts = [r["ran_by_worker"] for r in of(config, complete=True)]
        shares.append(" / ".join(fmt(median([p[k] for p in parts])) for k in range(config[1])) if parts else "-")
    row("tasks run by worker 1 / 2", shares)
    for label, key in (("submit -> handler start over 100 ms, tasks, each run", "start_over_100ms"),
                       ("run by the other server's worker, each run", "ran_elsewhere"),
                       ("redelivered (attempts > 1), each run", "redelivered")):  # fmt: skip
        row(label, [" ".join(str(r[key]) for r in of(c) if key in r) or "-" for c in configs])
    row("incomplete runs", [str(sum(not r["complete"] for r in of(c))) for c in configs])
    return lines


def projection(runs: list[dict], configs: list[tuple[str, int]], database: Database) -> list[str]:
    """Where the database's CPU per task (Database.projected) would fill cores, from the measured medians: a
    projection, assuming its CPU per task stays as measured (no lock, fsync or contention effects of more load)."""
    lines = []
    for config in configs:
        done = [r for r in runs if (r["workload"], r["servers"]) == config and r["complete"]]
        db = median([database.projected(r) for r in done])
        ours = median([r["cpu_s_per_1000"]["martinet"] for r in done])
        server = median([max(v for k, v in r["cpu_s_per_1000"].items() if k.startswith("server")) for r in done])
        if not db or not server or not ours:
            continue
        lines.append(
            f"{config[0]}, {config[1]} server(s): {database.name} ({database.projected_label}) "
            f"{db:.3f} CPU s per 1000 tasks -> fills 1 core at {1000 / db:,.0f} tasks/s, 4 at {4000 / db:,.0f}, "
            f"8 at {8000 / db:,.0f}, 16 at {16000 / db:,.0f}; Martinet {ours:.3f} s per 1000 in all "
            f"({ours / db:.1f} cores of Martinet per core of {database.name}); the busiest server {server:.3f} s per "
            f"1000 of the run's tasks -> its one core is full at {1000 / server:,.0f} tasks/s"
        )
    return lines


# ------------------------------------------------------------------ main


def git(*cmd: str) -> str:
    proc = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip()


def use_commit(tmp: Path, rev: str) -> str:
    """Extract ``rev``'s martinet_app/ into ``tmp`` and import it from there, in this process and its children.

    The working tree may hold someone's unfinished edits; the figures are for a commit. The editable
    install's finder comes after PYTHONPATH, so this copy wins; checked by asking a fresh interpreter.
    """
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "martinet_app"], cwd=ROOT,
                             capture_output=True, check=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    os.environ["PYTHONPATH"] = str(tmp)
    sys.path.insert(0, str(tmp))
    CODE["cwd"] = tmp
    probe = subprocess.run([MARTINET_PYTHON, "-c", "import martinet_app; print(martinet_app.__file__)"],
                           cwd="/", capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    if not probe.startswith(str(tmp)):
        raise SystemExit(f"martinet_app still imports from {probe}, not from the copy of {rev} in {tmp}")
    return git("rev-parse", "--short", rev)


def main() -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=int(env("REPS", "3")))
    parser.add_argument("--drain-n", type=int, default=int(env("DRAIN_N", "20000")))
    parser.add_argument("--stream-n", type=int, default=int(env("STREAM_N", "3000")))
    parser.add_argument("--sparse-n", type=int, default=int(env("SPARSE_N", "30")))
    parser.add_argument("--servers", type=int, nargs="+", default=[int(s) for s in env("SERVERS", "1 2").split()])
    parser.add_argument("--workloads", nargs="+", default=env("CLUSTER_WORKLOADS", "drain stream cross").split(),
                        choices=["drain", "stream", "cross", "sparse"])  # fmt: skip
    parser.add_argument("--timeout", type=float, default=float(env("CLUSTER_TIMEOUT", "120")),
                        help="seconds a run's tasks may take to finish before it is reported incomplete")  # fmt: skip
    parser.add_argument("--slots", type=int, default=drive.SLOTS)
    parser.add_argument("--quiet", type=float, default=float(env("CLUSTER_QUIET", "0.3")),
                        help="before each run, wait for the machine's busy cores to fall to this...")  # fmt: skip
    parser.add_argument("--quiet-wait", type=float, default=float(env("CLUSTER_QUIET_WAIT", "20")),
                        help="...for at most this many seconds")  # fmt: skip
    parser.add_argument("--backend", default=env("CLUSTER_BACKEND", "postgresql"), choices=sorted(BACKENDS),
                        help="the database the servers share: PostgreSQL (--pg) or MariaDB (--mysql)")  # fmt: skip
    parser.add_argument("--pg", default=env("CLUSTER_PG", "postgresql://postgres@127.0.0.1:5432"))
    parser.add_argument("--mysql", default=env("CLUSTER_MYSQL", "mysql://root@127.0.0.1:3306"))
    parser.add_argument("--code", default=env("CLUSTER_CODE", "HEAD"),
                        help="a git revision whose martinet_app to run (a copy, so others' uncommitted edits "
                        "stay out; default HEAD, e.g. an older commit to compare with), or 'tree': the "
                        "working tree's as it is")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/cluster-TIME.json)")
    args = parser.parse_args()
    if not Path(MARTINET).exists():
        raise SystemExit(f"{MARTINET} is missing: run `make install`")
    with tempfile.TemporaryDirectory(prefix="martinet-cluster-code-") as code:
        if args.code != "tree":
            commit = use_commit(Path(code), args.code)
            dirty = ""
        else:
            commit = git("rev-parse", "--short", "HEAD")
            dirty = git("status", "--porcelain", "--", "martinet_app")
        benchmark(args, commit, dirty)


def benchmark(args: argparse.Namespace, commit: str, dirty: str) -> None:
    database = BACKENDS[args.backend](args)
    stamp = datetime.datetime.now(datetime.UTC)
    meta = {
        "command": " ".join(sys.argv),
        "date": stamp.isoformat(timespec="seconds"),
        "commit": commit,
        "martinet_app_last_changed_in": git("log", "-1", "--format=%h", commit, "--", "martinet_app"),
        "code": args.code,
        "martinet_app_uncommitted": dirty.splitlines(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "database": database.name,
    }
    print(f"{meta['date']} at {meta['commit']}" + (" (martinet_app has uncommitted changes)" if dirty else ""),
          file=sys.stderr)  # fmt: skip
    configs = [(w, s) for w in args.workloads for s in args.servers if w not in ("cross", "sparse") or s > 1]
    runs: list[dict] = []
    started = time.monotonic()
    for rep in range(args.reps):
        for workload in args.workloads:
            order = args.servers[rep % len(args.servers) :] + args.servers[: rep % len(args.servers)]
            for servers in [s for s in order if (workload, s) in configs]:
                result = {"workload": workload, "servers": servers, "rep": rep + 1}
                result |= one_run(servers, workload, args, database)
                runs.append(result)
                note = "" if result["complete"] else f" INCOMPLETE {result.get('error', '')}"
                note += "" if result["complete"] else f" at the deadline {result.get('status_counts_at_deadline')}"
                note += "" if result["complete"] else f", after {result.get('status_counts')}"
                cpu = {k: round(v, 3) for k, v in result.get("cpu_s_per_1000", {}).items()}
                rate = fmt(result.get("tasks_per_s"))
                what = f"rep {rep + 1}/{args.reps} {workload:6} {servers} server(s)"
                print(f"{what}: {rate} tasks/s, CPU s/1000 {cpu}{note}", file=sys.stderr, flush=True)
    took = time.monotonic() - started
    meta["seconds"] = took

    code = f"commit {meta['commit']} (martinet_app as of {meta['martinet_app_last_changed_in']})"
    if dirty:
        code = f"the working tree at {meta['commit']}, with uncommitted changes to martinet_app"
    print(f"\n{meta['date']}, {code}; medians of {args.reps}; {took:.0f} s.")
    print(f"drain {args.drain_n} tasks, stream {args.stream_n}; {args.slots} slots per worker; "
          f"{database.name}, database {DATABASE}.\n")  # fmt: skip
    print("\n".join(table(runs, configs, database)))
    print("\n(* incomplete run: its tasks/s counts the tasks that finished before the timeout)\n")
    print("Projection from the measured CPU per task (not measured throughput):")
    print("\n".join(projection(runs, configs, database)))
    for run in runs:
        if run.get("logs"):
            print(f"\n{run['workload']} {run['servers']} server(s) rep {run['rep']} logged:", json.dumps(run["logs"]))

    out = args.out
    if out is None:
        RESULTS.mkdir(exist_ok=True)
        ignore = RESULTS / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# bench/cluster.py's output, not for the repository\n*\n")
        out = RESULTS / f"cluster-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps({**meta, "runs": runs}, indent=1, default=str) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

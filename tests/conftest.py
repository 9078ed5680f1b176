"""Fixtures that start real ``martinet serve`` / ``martinet work`` processes on free ports.

Every server runs on a temporary SQLite file, on the PostgreSQL database ``test`` on
127.0.0.1:5432, or on the MariaDB database ``test`` on 127.0.0.1:3306 (tables dropped first;
TEST_PG_URL and TEST_MYSQL_URL name others, so that two test runs at once do not drop each
other's tables). PostgreSQL and MariaDB tests skip when no server answers, except under CI=true,
where they fail: CI never passes by skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from martinet_app import Martinet
from martinet_app.errors import ServerUnavailable
from martinet_app.schema import TABLES

ROOT = Path(__file__).resolve().parent.parent
TEST_HANDLERS = Path(__file__).resolve().parent / "handlers"
#: Every task name tests/handlers registers, sorted.
TEST_HANDLER_NAMES = [
    "bad_progress", "bad_result", "big", "crash", "deep", "echo", "explode", "fork_exit", "gather", "ledger", "nap",
    "poison", "spawn_sleep", "spin", "stamp", "stamp_too", "steps", "whoami",
]  # fmt: skip
PG_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
#: Heartbeat used by test servers and workers: short, so restarts are noticed quickly.
HEARTBEAT = 0.2
#: Longest any test waits for a condition before failing.
TIMEOUT = 20.0


def _unclaimed_ports() -> range:
    """The ports below the kernel's ephemeral range, from 10000 (none if it cannot be read): bind(0) and every
    connect() take theirs from that range, so a port chosen below it stays free until a server binds it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(10000, low) if low >= 11000 else range(0)


_UNCLAIMED = _unclaimed_ports()
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 holds now, below the ephemeral range where one is (else the kernel's
    choice, which a connection may take as its own end before the server binds it: Server.start_ready retries),
    and none handed out before while half the range is left."""
    for _ in range(100 if _UNCLAIMED else 0):
        if len(_handed_out) >= len(_UNCLAIMED) // 2:
            _handed_out.clear()
        port = random.choice(_UNCLAIMED)
        if port in _handed_out:
            continue
        _handed_out.add(port)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


Samples = dict[tuple[str, frozenset], float]


def scrape(url: str, token: str | None = None) -> Samples:
    """Every sample of GET /metrics, by (sample name, labels)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/metrics", headers=headers), timeout=5) as response:
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, sample: str, **labels: str) -> float:
    """The sample named ``sample`` with exactly ``labels``; KeyError if /metrics has none."""
    return samples[sample, frozenset(labels.items())]


def martinet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "martinet_app", *args]


class Process:
    """A martinet subprocess whose output goes to a log file, always stopped at teardown."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, inherit_env: bool = True) -> None:
        self.args = args
        self.log_path = log_path
        self.env = env or {}
        self.inherit_env = inherit_env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        """Start with the test's environment (minus MARTINET_* settings, and with no HTTP port unless asked)
        plus ``env``, or ``env`` alone."""
        env = dict(self.env)
        if self.inherit_env:
            inherited = {k: v for k, v in os.environ.items() if not k.startswith("MARTINET_")}
            env = {**inherited, "PYTHONUNBUFFERED": "1", "MARTINET_HTTP_PORT": "0", **env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"{self.log_path.stem} did not exit within {timeout} s of SIGTERM")
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class RawClient:
    """A DEALER on the client port that sends requests as given and reads replies by id."""

    def __init__(self, port: int) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def send(self, body: bytes) -> None:
        self.sock.send_multipart([b"", body])

    def request(self, op: str, request_id: Any = None, **fields: Any) -> None:
        self.send(json.dumps({"v": 1, "id": request_id or uuid.uuid4().hex, "op": op, **fields}).encode())

    def replies(self, count: int, timeout: float = 10.0) -> list[dict]:
        out = []
        for _ in range(count):
            assert self.sock.poll(timeout * 1000), f"no reply after {len(out)} of {count}"
            out.append(json.loads(self.sock.recv_multipart()[-1]))
        return out

    def ask(self, op: str, **fields: Any) -> dict:
        self.request(op, **fields)
        return self.replies(1)[0]

    def close(self) -> None:
        self.sock.close()


class Server(Process):
    """``martinet serve`` on free ports; ``http``: with its HTTP port too (``http_url``)."""

    def __init__(self, db_url: str, log_path: Path, *extra: str, http: bool = False) -> None:
        self.db_url = db_url
        self.client_port, self.worker_port, self.status_port = free_port(), free_port(), free_port()
        self.http_port = free_port() if http else 0
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        extra = ("--http-port", str(self.http_port), *extra) if http else extra
        super().__init__(
            martinet_cmd(
                "serve", "--bind", "127.0.0.1", "--client-port", str(self.client_port),
                "--worker-port", str(self.worker_port), "--status-port", str(self.status_port),
                "--db", db_url, "--heartbeat", str(HEARTBEAT), "--log-level", "DEBUG", *extra,
            ),
            log_path,
        )  # fmt: skip

    def client(self, timeout: float = 5.0) -> Martinet:
        return Martinet("127.0.0.1", self.client_port, timeout=timeout)

    def wait_ready(self, exited_ok: bool = False) -> Server:
        """Wait until the server answers ping; fail if it exits first (with ``exited_ok``, return then)."""
        client = self.client(timeout=0.5)

        def answers() -> bool:
            if exited_ok and not self.running():
                return True
            assert self.running(), f"server exited:\n{self.log()}"
            try:
                client.ping()
                return True
            except ServerUnavailable:
                return False

        wait_until(answers, what="the server to answer ping")
        client.close()
        return self

    def start_ready(self, tries: int = 3) -> Server:
        """Start and wait until it answers, on new free ports if one was taken before the server could bind
        it (free_port's port is free when asked, but another test run may choose it too): the server then
        exits with 3, and the next try has other ports."""
        for _ in range(tries - 1):
            self.start().wait_ready(exited_ok=True)
            if self.running() or self.proc.returncode != 3 or "cannot bind" not in self.log():
                break
            moved = {str(port): str(free_port()) for port in self.ports()}
            self.args = [moved.get(arg, arg) if flag.endswith("-port") else arg
                         for flag, arg in zip(["", *self.args[:-1]], self.args, strict=True)]  # fmt: skip
            self.client_port, self.worker_port, self.status_port = (int(moved[str(p)]) for p in self.ports()[:3])
            if self.http_port:
                self.http_port = int(moved[str(self.http_port)])
                self.http_url = f"http://127.0.0.1:{self.http_port}"
        if self.running():
            return self
        return self.start().wait_ready()

    def ports(self) -> list[int]:
        """The ports it binds: client, worker, status, and HTTP if it has one."""
        return [self.client_port, self.worker_port, self.status_port, *([self.http_port] if self.http_port else [])]

    def restart(self) -> Server:
        """Start again on the same ports and database."""
        return self.start().wait_ready()  # type: ignore[return-value]

    def worker_args(self, handlers: Path = TEST_HANDLERS, *extra: str) -> list[str]:
        return martinet_cmd(
            "work", "--handlers", str(handlers), "--url", "127.0.0.1", "--worker-port", str(self.worker_port),
            "--status-port", str(self.status_port), "--heartbeat", str(HEARTBEAT), "--log-level", "DEBUG",
            "--grace", "1", *extra,  # a short grace keeps teardown quick; a test may pass its own
        )  # fmt: skip


class Cluster:
    """A server and its workers for one test; everything is stopped at teardown."""

    def __init__(self, tmp_path: Path, db_url: str) -> None:
        self.tmp_path = tmp_path
        self.server = Server(db_url, tmp_path / "server.log", http=True)
        self.workers: list[Process] = []
        self._client: Martinet | None = None

    @property
    def client(self) -> Martinet:
        if self._client is None:
            self._client = self.server.client()
        return self._client

    def start_worker(self, *extra: str, handlers: Path = TEST_HANDLERS, wait: bool = True) -> Process:
        worker = Process(
            self.server.worker_args(handlers, *extra), self.tmp_path / f"worker{len(self.workers)}.log"
        ).start()
        self.workers.append(worker)
        if wait:
            self.wait_worker(worker)
        return worker

    def wait_worker(self, worker: Process) -> None:
        def registered() -> bool:
            assert worker.running(), f"worker exited:\n{worker.log()}"
            return any(w["pid"] == worker.pid for w in self.client.workers())

        wait_until(registered, what=f"worker {worker.pid} to register")

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        for proc in [*self.workers, self.server]:
            if proc.running():
                try:
                    proc.terminate()
                except BaseException:
                    proc.kill()

    def logs(self) -> str:
        return "\n".join(f"----- {p.log_path.name}\n{p.log()[-6000:]}" for p in [self.server, *self.workers])


class HostServer(Server):
    """``martinet serve --bind host``, on the ports of ``like`` if given (a server of the same list)."""

    def __init__(self, db_url: str, log_path: Path, host: str, like: Server | None = None, *extra: str) -> None:
        flags: list[str] = []
        if like is not None:
            ports = (like.client_port, like.worker_port, like.status_port)
            for flag, port in zip(("--client-port", "--worker-port", "--status-port"), ports, strict=True):
                flags += [flag, str(port)]
        super().__init__(db_url, log_path, "--bind", host, *flags, *extra)  # the last of a repeated flag wins
        self.host = host
        if like is not None:
            self.client_port, self.worker_port, self.status_port = ports

    def client(self, timeout: float = 5.0) -> Martinet:
        return Martinet(self.host, self.client_port, timeout=timeout)


class Fleet:
    """The servers and workers of one test, all stopped at teardown (stopped ones woken first)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Process] = []
        self.clients: list[Martinet] = []  # closed at teardown

    def server(self, host: str, like: Server | None = None, db: str | None = None, *extra: str) -> HostServer:
        db_url = db or f"sqlite:///{self.tmp_path / f'{host}.db'}"
        server = HostServer(db_url, self.tmp_path / f"server-{host}-{len(self.procs)}.log", host, like, *extra)
        self.procs.append(server)
        server.start().wait_ready()
        return server

    def worker(self, server: Server, hosts: str, *extra: str) -> Process:
        args = server.worker_args(TEST_HANDLERS, "--url", hosts, *extra)
        worker = Process(args, self.tmp_path / f"worker{len(self.procs)}.log").start()
        self.procs.append(worker)
        return worker

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        # Workers first, while their servers can still take what they hand back.
        for proc in sorted(self.procs, key=lambda proc: isinstance(proc, Server)):
            if proc.running():
                os.kill(proc.pid, signal.SIGCONT)
                try:
                    proc.terminate()
                except BaseException:
                    proc.kill()

    def logs(self) -> str:
        return "\n".join(f"----- {p.log_path.name}\n{p.log()[-6000:]}" for p in self.procs)


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.stop()
        print_if_failed(request, f.logs)


def _postgres_available() -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        import psycopg2

        psycopg2.connect(PG_URL, connect_timeout=3).close()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        return f"PostgreSQL at {PG_URL} not reachable: {exc}".strip()


def reset_postgres() -> None:
    import psycopg2

    conn = psycopg2.connect(PG_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {', '.join(table._meta.table_name for table in TABLES)} CASCADE")
    conn.close()


def mysql_connect() -> Any:
    """A PyMySQL connection to MYSQL_URL, in the SQL mode Martinet's own connections have (autocommit)."""
    from urllib.parse import urlparse

    import pymysql

    from martinet_app.db import MYSQL_SQL_MODE

    url = urlparse(MYSQL_URL)
    return pymysql.connect(
        host=url.hostname, port=url.port or 3306, user=url.username, password=url.password or "",
        database=url.path.lstrip("/"), charset="utf8mb4", sql_mode=MYSQL_SQL_MODE, autocommit=True, connect_timeout=3,
    )  # fmt: skip


def _mysql_available() -> str | None:
    """None if MariaDB answers, else why not."""
    try:
        mysql_connect().close()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        return f"MariaDB at {MYSQL_URL} not reachable: {exc}".strip()


def reset_mysql() -> None:
    conn = mysql_connect()
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {', '.join(table._meta.table_name for table in TABLES)}")
    conn.close()


#: Each server backend of db_url: its URL, what says whether it answers, what drops Martinet's tables.
_SERVER_BACKENDS = {
    "postgres": ("PostgreSQL", lambda: PG_URL, _postgres_available, reset_postgres),
    "mysql": ("MariaDB", lambda: MYSQL_URL, _mysql_available, reset_mysql),
}


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database: a temporary SQLite file, or PostgreSQL's or MariaDB's ``test`` with Martinet's tables
    dropped."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'martinet.db'}"
    name, url, available, reset = _SERVER_BACKENDS[request.param]
    missing = available()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing} (CI=true: {name} tests must run, not skip)")
        pytest.skip(missing)
    reset()
    return url()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'martinet.db'}"


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, db_url: str) -> Iterator[Cluster]:
    """A running server (no worker yet) on each backend."""
    yield from _cluster(request, tmp_path, db_url)


@pytest.fixture
def sqlite_cluster(request: pytest.FixtureRequest, tmp_path: Path, sqlite_url: str) -> Iterator[Cluster]:
    """A running server on SQLite only, for tests about processes rather than storage."""
    yield from _cluster(request, tmp_path, sqlite_url)


def _cluster(request: pytest.FixtureRequest, tmp_path: Path, url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, url)
    try:
        c.server.start_ready()
        yield c
    finally:
        c.stop()
        print_if_failed(request, c.logs)


def print_if_failed(request: pytest.FixtureRequest, logs: Callable[[], str]) -> None:
    """Print the processes' logs after a test that failed (pytest shows them with the failure)."""
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report

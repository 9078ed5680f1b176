"""Several ``martinet serve`` on one PostgreSQL database: real servers, workers and clients (issue 12).

Each server has its own ports on 127.0.0.1; they share the database ``test`` (or TEST_PG_URL, TEST_MYSQL_URL).
"""

from __future__ import annotations

import collections
import datetime
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from conftest import HEARTBEAT, PG_URL, Fleet, Process, mysql_connect, wait_until
from martinet_app import Martinet, config, protocol

# A cluster shares a PostgreSQL or MariaDB database: conftest's db_url, those cases (tables dropped first).
pytestmark = pytest.mark.parametrize("db_url", ["postgres", "mysql"], indirect=True)


HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


class Servers:
    """Servers on HOSTS sharing one database and ports (so one list names them all), their workers and clients."""

    def __init__(self, fleet: Fleet, count: int, db_url: str) -> None:
        self.fleet = fleet
        first = fleet.server(HOSTS[0], None, db_url)
        self.servers = [first, *(fleet.server(host, first, db_url) for host in HOSTS[1:count])]
        self.hosts = ",".join(HOSTS[:count])
        self.db_url = db_url

    def client(self, index: int, timeout: float = 10.0) -> Martinet:
        client = self.servers[index].client(timeout=timeout)
        self.fleet.clients.append(client)
        return client

    def start_worker(self, index: int, *extra: str) -> Process:
        """A worker of server ``index`` (first in its list, which goes on with the following servers)."""
        hosts = ",".join(HOSTS[index : len(self.servers)] + HOSTS[:index])
        worker = self.fleet.worker(self.servers[index], hosts, *extra)
        client = self.client(index)
        wait_until(lambda: any(w["pid"] == worker.pid for w in client.workers()), what=f"worker {worker.pid}")
        return worker

    def log(self, index: int) -> str:
        return self.servers[index].log()


@pytest.fixture
def servers(request: pytest.FixtureRequest, fleet: Fleet, db_url: str) -> Servers:
    return Servers(fleet, getattr(request, "param", 2), db_url)


def ts(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def test_task_submitted_on_b_runs_on_a_worker_at_once(servers: Servers) -> None:
    servers.start_worker(0)
    b = servers.client(1)
    # On PostgreSQL each one must be woken across (the slow poll is CLUSTER_POLL, 2 s: well under it means the
    # NOTIFY woke A); MariaDB has no NOTIFY, and the poll is the wake-up.
    bound = 1.0 if servers.db_url.startswith("postgres") else config.CLUSTER_POLL + 0.5
    for _ in range(5):  # one at a time
        task = b.wait(b.execute({"name": "echo"}, {"n": 1}), timeout=10)
        assert task["status"] == "succeeded"
        assert task["server"] == servers.client(0).workers()[0]["server"], "delivered by A, the worker's server"
        assert ts(task["started_at"]) - ts(task["created_at"]) < bound, task


def test_wait_cancel_and_workers_through_any_server(servers: Servers, tmp_path: Path) -> None:
    first = servers.start_worker(0)
    second = servers.start_worker(1)
    a, b = servers.client(0), servers.client(1)
    for client in (a, b):  # another server's workers are listed once it has recorded them (its next heartbeat)
        wait_until(lambda c=client: {w["pid"] for w in c.workers()} == {first.pid, second.pid}, what="both workers")
        listed = {w["pid"]: w for w in client.workers()}
        assert listed[first.pid]["server"] != listed[second.pid]["server"]
        assert listed[first.pid]["busy"] == 0 and listed[first.pid]["slots"] == 4
    # A task that runs on A's worker: submitted through A, waited for and cancelled through B.
    done = a.execute({"name": "nap"}, {"seconds": 0.5})
    assert b.wait(done, timeout=10)["status"] == "succeeded"
    ledger = tmp_path / "ledger.txt"
    running = a.execute({"name": "ledger"}, {"path": str(ledger), "seconds": 60})
    wait_until(lambda: a.status(running)["status"] == "running", what="the long task to start")
    worker_id = a.status(running)["worker"]
    assert b.cancel(running)["status"] == "cancelled"
    owner = first if worker_id.startswith(f"{_host()}-{first.pid}-") else second
    wait_until(lambda: f"cancelling task {running} attempt 1" in owner.log(), what="the worker to be told")
    assert a.status(running)["status"] == "cancelled"


def _host() -> str:
    import socket

    return socket.gethostname()


_RACE = """
import sys, time
from martinet_app import Martinet
port, start, count = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
m = Martinet("127.0.0.1", port, timeout=20)
time.sleep(max(0.0, start - time.time()))
print(" ".join(str(m.execute({"name": "nap", "key": f"order-{i}"}, {"seconds": 30})) for i in range(count)))
"""


def test_same_key_racing_through_two_servers_gives_one_task(servers: Servers) -> None:
    start = time.time() + 1.5
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, str(server.client_port), str(start), "20"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for server in servers.servers
    ]
    outputs = [racer.communicate(timeout=60) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), outputs
    first, second = ([int(i) for i in out.split()] for out, _ in outputs)
    assert first == second, "each key gave both racers the same task"
    assert len(set(first)) == 20
    listed = servers.client(0).list(name="nap", limit=100)
    assert sorted(t["id"] for t in listed) == sorted(first), "no second task for any key"
    assert {t["key"] for t in listed} == {f"order-{i}" for i in range(20)}


def test_superseded_delivery_event_through_another_server_changes_nothing(servers: Servers, tmp_path: Path) -> None:
    servers.start_worker(0)
    a, b = servers.client(0), servers.client(1)
    ledger = tmp_path / "ledger.txt"
    task_id = a.execute({"name": "ledger"}, {"path": str(ledger), "seconds": 2})
    wait_until(lambda: a.status(task_id)["status"] == "running", what="the first delivery to start")
    first = a.status(task_id)
    # Cancelled and retried through B: the second delivery supersedes the first.
    b.cancel(task_id)
    b.retry(task_id)
    wait_until(lambda: a.status(task_id)["attempts"] == 2 and a.status(task_id)["status"] == "running",
               what="the second delivery to start")  # fmt: skip
    # The first delivery's late success, and a success from a worker that holds no delivery, arrive at B,
    # which made neither delivery.
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.connect(f"tcp://{servers.servers[1].host}:{servers.servers[1].status_port}")
    stale = [(first["worker"], first["attempts"]), ("someone-else", 2)]
    for worker, attempt in stale:
        event = {"task_id": task_id, "attempt": attempt, "event": "succeeded", "result": "stale", "at": time.time()}
        push.send_multipart(protocol.status_batch(worker, [event]))
    wait_until(lambda: servers.log(1).count(f"ignored stale succeeded event for task {task_id}") == 2,
               what="B to decide both events")  # fmt: skip
    push.close(linger=0)
    context.term()
    assert b.status(task_id)["status"] == "running"
    finished = b.wait(task_id, timeout=15)
    assert finished["status"] == "succeeded" and finished["attempts"] == 2, finished
    assert finished["result"] != "stale" and "pid" in finished["result"]


@pytest.mark.parametrize("servers", [3], indirect=True)
def test_every_second_fires_each_planned_time_once_while_a_server_dies(servers: Servers) -> None:
    a = servers.client(0)
    for index in range(3):
        servers.start_worker(index)
    recurring_id = a.every("1 second", {"name": "echo"}, {})
    wait_until(lambda: len(_runs(a, recurring_id)) >= 5, timeout=15, what="five runs")
    servers.servers[1].kill()
    wait_until(lambda: len(_runs(a, recurring_id)) >= 10, timeout=20, what="five more runs")
    a.revoke(recurring_id)
    runs = _runs(a, recurring_id)
    planned = sorted(ts(t["run_at"]) for t in runs)
    counts = collections.Counter(planned)
    assert max(counts.values()) == 1, f"planned times that ran twice: {[p for p, c in counts.items() if c > 1]}"
    steps = {round(later - earlier, 3) for earlier, later in zip(planned, planned[1:], strict=False)}
    assert steps == {1.0}, f"every planned second in between ran (gaps: {sorted(steps)})"


def _runs(client: Martinet, recurring_id: int) -> list[dict]:
    return [t for t in client.list(name="echo", limit=1000) if t["recurring_id"] == recurring_id]


def _rows(db_url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """``sql``'s rows, read on a connection of the test's own to the cluster's database."""
    if db_url.startswith("mysql"):
        conn = mysql_connect()
    else:
        import psycopg2

        conn = psycopg2.connect(PG_URL)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())
    finally:
        conn.close()


def test_server_leases_are_in_the_database(servers: Servers) -> None:
    rows = _rows(servers.db_url, "SELECT id, pid, lease_until FROM server")
    pids = {server.pid for server in servers.servers}
    live = [row for row in rows if row[2] > time.time()]
    assert {row[1] for row in live} == pids, rows
    assert all(row[2] - time.time() <= 5 * HEARTBEAT + 1 for row in live), "a lease lasts a liveness period"
    servers.servers[0].terminate()
    [(ended,)] = _rows(servers.db_url, "SELECT lease_until FROM server WHERE pid = %s", (servers.servers[0].pid,))
    assert ended <= time.time(), "a server that stops ends its lease"


def _executions(ledger: Path) -> collections.Counter:
    return (
        collections.Counter(int(line) for line in ledger.read_text().split())
        if ledger.exists()
        else collections.Counter()
    )


def _succeeded(client: Martinet, ids: list[int]) -> bool:
    done = {t["id"] for t in client.iter_tasks(status="succeeded", name="ledger")}
    return done >= set(ids)


@pytest.mark.parametrize("servers", [3], indirect=True)
@pytest.mark.parametrize("victim", ["server", "worker"])
def test_3000_tasks_on_3_servers_survive_a_kill(servers: Servers, tmp_path: Path, victim: str) -> None:
    workers = [servers.start_worker(index) for index in range(3)]
    ledger = tmp_path / "ledger.txt"
    clients = [Martinet(",".join(servers.hosts.split(",")[i:] + servers.hosts.split(",")[:i]),
                        servers.servers[0].client_port, timeout=10) for i in range(3)]  # fmt: skip
    servers.fleet.clients.extend(clients)
    ids: list[int] = []
    for batch in range(60):  # round robin over the servers, 50 tasks a request
        tasks = [({"name": "ledger"}, {"path": str(ledger), "seconds": 0.02, "n": batch * 50 + i}) for i in range(50)]
        ids += clients[batch % 3].execute_many(tasks)
        if batch == 30:
            (servers.servers[1] if victim == "server" else workers[1]).kill()
    killed_at = time.monotonic()
    if victim == "server":
        wait_until(lambda: time.monotonic() - killed_at > 3, what="a while without server B")
        servers.servers[1].restart()
    wait_until(lambda: _succeeded(clients[0], ids), timeout=120, what="every task to succeed")
    assert len(ids) == len(set(ids)) == 3000
    stored = list(clients[0].iter_tasks(name="ledger"))
    assert len(stored) == 3000, "none created twice"
    counts = _executions(ledger)
    assert set(counts) == set(ids), "every task ran"
    duplicates = sum(count - 1 for count in counts.values())
    print(f"killed a {victim}: {duplicates} duplicate execution(s) of 3000 tasks")
    assert all(t["status"] == "succeeded" for t in stored)
    counts = clients[0].stats()["counts"]  # kept by each server in its own transactions
    assert {status: n for status, n in counts.items() if n} == {"succeeded": 3000}, "the counts are exact"


def test_a_client_with_two_servers_submits_through_a_kill(servers: Servers) -> None:
    servers.start_worker(1)
    m = Martinet(servers.hosts, servers.servers[0].client_port, timeout=5)
    servers.fleet.clients.append(m)
    killer = threading.Timer(0.3, servers.servers[0].kill)
    killer.start()
    ids = [m.execute({"name": "echo"}, {"i": i}) for i in range(200)]
    killer.join()
    assert not servers.servers[0].running(), "A was killed while the calls went on"
    assert len(set(ids)) == 200
    stored = list(servers.client(1).iter_tasks(name="echo"))
    assert sorted(t["id"] for t in stored) == sorted(ids), "each call's task exists, exactly once"


def test_a_limit_and_a_pause_hold_across_servers(fleet: Fleet, db_url: str) -> None:
    """One slot on each server's worker: with the limit decided in one server's memory, two would run at once."""
    first = fleet.server(HOSTS[0], None, db_url, "--limit", "stamp=1")
    second = fleet.server(HOSTS[1], first, db_url, "--limit", "stamp=1")
    clients = [first.client(timeout=10), second.client(timeout=10)]
    fleet.clients += clients
    workers = [
        fleet.worker(server, host, "--concurrency", "1") for server, host in ((first, HOSTS[0]), (second, HOSTS[1]))
    ]
    wait_until(lambda: {w["pid"] for w in clients[0].workers()} == {w.pid for w in workers}, what="both workers")
    a, b = clients
    assert a.pause("echo")["changed"]
    paused = b.execute({"name": "echo"}, {})
    ids = [client.execute({"name": "stamp"}, {"seconds": 0.4}) for client in (a, b, a, b)]
    records = [b.wait(task_id, timeout=30) for task_id in ids]
    assert [r["status"] for r in records] == ["succeeded"] * 4
    periods = sorted((r["result"]["start"], r["result"]["end"]) for r in records)
    overlaps = [(one, next) for one, next in zip(periods, periods[1:], strict=False) if next[0] < one[1]]
    assert not overlaps, f"one at a time: {periods}"
    assert a.status(paused)["status"] == "queued", "paused through A, held by B too"
    assert b.resume("echo")["changed"]
    assert a.wait(paused, timeout=10)["status"] == "succeeded"

"""Nothing lost, nothing stuck: crashes of the server, of workers and of handlers, and hostile input.

The figures these tests print (duplicates, memory) are quoted in docs/RELIABILITY.md; run with
``pytest tests/test_reliability.py -s`` to see them.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest
import zmq

from conftest import HEARTBEAT, PG_URL, TEST_HANDLERS, Cluster, Process, Server, mysql_connect, wait_until
from martinet_app import Martinet, protocol
from martinet_app.errors import RequestTooLarge, ServerUnavailable, StoreUnavailable

#: A worker is declared lost after this many seconds of silence in these tests.
LIVENESS_TIMEOUT = 5 * HEARTBEAT


def executions(ledger: Path) -> Counter:
    return Counter(int(line) for line in ledger.read_text().split()) if ledger.exists() else Counter()


def all_succeeded(m, ids: list[int]) -> bool:
    done = {t["id"] for t in m.list(status="succeeded", limit=10_000)}
    return done.issuperset(ids)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_2000_tasks_survive_two_server_kills(sqlite_cluster: Cluster, tmp_path: Path):
    sqlite_cluster.start_worker("--concurrency", "4")
    m = sqlite_cluster.client
    ledger = tmp_path / "ledger.txt"
    ids: list[int] = []
    for batch in (700, 700, 600):
        ids += [m.execute({"name": "ledger"}, {"path": str(ledger), "seconds": 0.002}) for _ in range(batch)]
        if len(ids) < 2000:
            submitted = len(ids)
            wait_until(lambda: len(executions(ledger)) > submitted - 600, what="tasks to be running")  # noqa: B023
            sqlite_cluster.server.kill()  # mid-run: tasks queued, running and finished-but-unreported
            sqlite_cluster.server.restart()
    wait_until(lambda: all_succeeded(m, ids), timeout=120, what="all 2,000 tasks to succeed")
    runs = executions(ledger)
    assert set(runs) == set(ids), "every task ran"
    duplicates = sum(count - 1 for count in runs.values())
    redelivered = sum(1 for t in m.list(limit=10_000) if t["attempts"] > 1)
    print(f"\n2,000 tasks, 2 server kills: {duplicates} duplicate execution(s), {redelivered} task(s) redelivered")
    assert len(m.list(limit=10_000)) == 2000, "no task was created twice"


def test_tasks_survive_a_worker_kill(sqlite_cluster: Cluster, tmp_path: Path):
    first = sqlite_cluster.start_worker("--concurrency", "4")
    sqlite_cluster.start_worker("--concurrency", "4")
    m = sqlite_cluster.client
    ledger = tmp_path / "ledger.txt"
    ids = [m.execute({"name": "ledger"}, {"path": str(ledger), "seconds": 0.01}) for _ in range(600)]
    wait_until(lambda: len(executions(ledger)) > 150, what="tasks to be running")
    first.kill()
    sqlite_cluster.start_worker("--concurrency", "4")
    wait_until(lambda: all_succeeded(m, ids), timeout=120, what="all 600 tasks to succeed")
    runs = executions(ledger)
    assert set(runs) == set(ids)
    duplicates = sum(count - 1 for count in runs.values())
    print(f"\n600 tasks, 1 worker killed: {duplicates} duplicate execution(s)")
    assert "lost: unreachable" in sqlite_cluster.server.log() or "lost: silent" in sqlite_cluster.server.log()


def test_a_handler_holding_the_cpu_is_not_redelivered(sqlite_cluster: Cluster):
    sqlite_cluster.start_worker("--concurrency", "2")
    m = sqlite_cluster.client
    seconds = LIVENESS_TIMEOUT * 3
    spinning = [m.execute({"name": "spin"}, {"seconds": seconds}) for _ in range(2)]
    tasks = [m.wait(task_id, timeout=30) for task_id in spinning]
    assert [t["status"] for t in tasks] == ["succeeded", "succeeded"]
    assert [t["attempts"] for t in tasks] == [1, 1], "a busy worker is not a dead worker"
    assert "lost" not in sqlite_cluster.server.log()


@pytest.mark.parametrize(
    "how, error, replaced",
    [
        ("sys.exit", "SystemExit: 3", False),  # caught: the process lives on
        ("os._exit", "the handler's process exited with status 7 while running the task", True),
        ("segfault", "the handler's process was killed by signal SIGSEGV while running the task", True),
        ("hang", "timed out after 1 s", True),
    ],
)
def test_a_crashing_handler_fails_only_its_own_task(
    sqlite_cluster: Cluster, tmp_path: Path, how: str, error: str, replaced: bool
):
    worker = sqlite_cluster.start_worker("--concurrency", "2")
    m = sqlite_cluster.client
    pids = tmp_path / "pids.txt"
    neighbour = m.execute({"name": "nap"}, {"seconds": 1.5})
    crashed = m.execute({"name": "crash"}, {"path": str(pids), "how": how}, timeout=1)
    task = m.wait(crashed, timeout=20)
    assert (task["status"], task["error"]) == ("failed", error)
    assert m.wait(neighbour, timeout=20)["status"] == "succeeded", "the other slot's task was unaffected"
    # A dead or killed handler process was replaced; the worker goes on.
    crashed_pid = int(pids.read_text().split()[0])
    after = [m.wait(m.execute({"name": "whoami"}, {}), timeout=20)["result"]["pid"] for _ in range(4)]
    assert (crashed_pid not in after) == replaced
    assert worker.running() and len(m.workers()) == 1


def test_cancelling_a_running_task_stops_its_handler(sqlite_cluster: Cluster, tmp_path: Path):
    sqlite_cluster.start_worker("--concurrency", "1")
    m = sqlite_cluster.client
    pids = tmp_path / "pids.txt"
    task_id = m.execute({"name": "crash"}, {"path": str(pids), "how": "hang"})
    wait_until(lambda: pids.exists() and pids.read_text().strip(), what="the handler to start")
    handler_pid = int(pids.read_text())
    assert m.cancel(task_id)["status"] == "cancelled"
    wait_until(lambda: not Path(f"/proc/{handler_pid}").exists(), timeout=5, what="the handler's process to end")
    # The single slot is free again at once (not after the handler's 'hang').
    assert m.wait(m.execute({"name": "echo"}, {}), timeout=10)["status"] == "succeeded"
    assert m.status(task_id)["status"] == "cancelled"


def test_timeout_applies_per_task(sqlite_cluster: Cluster):
    sqlite_cluster.start_worker("--concurrency", "2")
    m = sqlite_cluster.client
    slow = m.execute({"name": "nap"}, {"seconds": 5}, timeout=0.5)
    fine = m.execute({"name": "nap"}, {"seconds": 0.2}, timeout=5)
    task = m.wait(slow, timeout=20)
    assert (task["status"], task["error"]) == ("failed", "timed out after 0.5 s")
    assert m.wait(fine, timeout=20)["status"] == "succeeded"


def fuzz_messages(rng: random.Random, max_bytes: int) -> list[list[bytes]]:
    """Malformed messages of every kind the sockets must survive."""
    valid_header = protocol.WORKER_HEADER
    shapes = [
        lambda: [rng.randbytes(rng.randint(0, 300))],
        lambda: [rng.randbytes(rng.randint(1, 50)) for _ in range(rng.randint(2, 6))],
        lambda: [b"", rng.randbytes(rng.randint(0, 100))],
        lambda: [b"", b"{" + rng.randbytes(20)],
        lambda: [b"", json.dumps(rng.choice([[], 7, "x", None, {"v": 1}, {"v": 2, "op": "ping"}])).encode()],
        lambda: [b"", json.dumps({"v": 1, "id": 1, "op": "execute", "task": {"name": 5}}).encode()],
        lambda: [valid_header, rng.choice([b"READY", b"HEARTBEAT", b"NOPE"]), rng.randbytes(30)],
        lambda: [valid_header, b"READY", json.dumps({"v": 1, "worker": "x", "slots": -1}).encode()],
        lambda: [json.dumps({"v": 1, "worker": "w", "events": [{"task_id": "1"}]}).encode()],
        lambda: [json.dumps({"v": 9, "worker": "w", "events": []}).encode()],
    ]
    return [rng.choice(shapes)() for _ in range(3000)] + [[b"x" * (max_bytes + 1)]]


def test_fuzz_every_port_while_real_tasks_run(sqlite_cluster: Cluster):
    from martinet_app import config

    sqlite_cluster.start_worker("--concurrency", "4")
    server, m = sqlite_cluster.server, sqlite_cluster.client
    rng = random.Random(20261129)
    context = zmq.Context.instance()
    real: list[int] = []
    rss = []
    for _round in range(3):
        real += [m.execute({"name": "echo"}, {"n": i}) for i in range(100)]
        for kind, port in ((zmq.DEALER, server.client_port), (zmq.DEALER, server.worker_port),
                           (zmq.PUSH, server.status_port)):  # fmt: skip
            sock = context.socket(kind)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(f"tcp://127.0.0.1:{port}")
            for frames in fuzz_messages(rng, config.MAX_MESSAGE_BYTES):
                sock.send_multipart(frames)
            sock.close()
        real += [m.execute({"name": "echo"}, {"n": i}) for i in range(100)]
        wait_until(lambda: all_succeeded(m, real), timeout=60, what="the real tasks")  # noqa: B023
        assert m.ping()["protocol"] == protocol.VERSION
        rss.append(rss_kb(server.pid))
    print(f"\nserver RSS after fuzz rounds: {rss} kB")
    # The first round leaves the allocator holding what its oversized messages took (glibc keeps freed 16 MB
    # buffers in the heap once one has been freed): growth is measured over the rounds after it.
    assert rss[2] - rss[1] < 20_000, f"memory grows with garbage: {rss} kB"
    log = server.log()
    assert all(f"{name} socket: rejected" in log for name in ("client", "worker", "status"))
    assert "Traceback" not in log
    assert len(m.workers()) == 1


def test_sigterm_on_the_server_writes_what_is_in_hand(sqlite_cluster: Cluster):
    sqlite_cluster.start_worker("--concurrency", "4")
    m = sqlite_cluster.client
    ids = [m.execute({"name": "nap"}, {"seconds": 0.3}) for _ in range(8)]
    wait_until(lambda: any(m.status(i)["status"] == "running" for i in ids), what="tasks to run")
    assert sqlite_cluster.server.terminate() == 0
    assert "Traceback" not in sqlite_cluster.server.log()
    sqlite_cluster.server.restart()
    wait_until(lambda: all_succeeded(m, ids), timeout=30, what="every task to finish after the restart")


def test_worker_sigkill_kills_its_handler_processes(sqlite_cluster: Cluster, tmp_path: Path):
    worker = sqlite_cluster.start_worker("--concurrency", "1")
    m = sqlite_cluster.client
    pids = tmp_path / "pids.txt"
    m.execute({"name": "crash"}, {"path": str(pids), "how": "hang"})
    wait_until(lambda: pids.exists() and pids.read_text().strip(), what="the handler to start")
    handler_pid = int(pids.read_text())
    os.kill(worker.pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{handler_pid}").exists(), timeout=5, what="the orphaned handler to die")


def test_messages_over_the_configured_limit_are_refused(tmp_path: Path):
    server = Server(f"sqlite:///{tmp_path / 'limit.db'}", tmp_path / "server.log", "--max-message-bytes", "4096")
    server.start()
    try:
        server.wait_ready()
        big = server.client(timeout=5.0)
        with pytest.raises(RequestTooLarge, match=r"larger than this server accepts \(4096 bytes"):
            big.execute({"name": "echo"}, {"blob": "x" * 6000})
        with pytest.raises(ServerUnavailable):  # past twice the limit ZeroMQ drops the connection: no answer
            Martinet("127.0.0.1", server.client_port, timeout=1.0).execute({"name": "echo"}, {"blob": "x" * 9000})
        big.close()
        small = server.client()
        assert small.list() == [], "the oversized task was not stored"
        assert small.status(small.execute({"name": "echo"}, {"blob": "x" * 1024}))["status"] == "queued"
        small.close()
    finally:
        assert server.terminate() == 0


def submit(m, count: int, **args) -> list[int]:
    """Submit ``count`` nap tasks, trying each again while the store answers 'unavailable'."""
    ids = []
    for _ in range(count):
        ids.append(wait_until(lambda: _try_execute(m, args), what="a submission to be accepted"))
    return ids


def _try_execute(m, args: dict) -> int | None:
    try:
        return m.execute({"name": "nap"}, args)
    except StoreUnavailable as exc:
        assert "the request was not completed; try again" in exc.message
        return None


def _connect(backend: str, autocommit: bool = True):
    """A connection of the test's own to the server's database (``backend``: db_url's, postgres or mysql)."""
    if backend == "postgres":
        import psycopg2

        conn = psycopg2.connect(PG_URL)
        conn.autocommit = autocommit
        return conn
    conn = mysql_connect()
    conn.autocommit(autocommit)
    return conn


def _kill_connections(backend: str, server_pid: int) -> int:
    """End every connection the server has to its database, as its administrator would; how many."""
    conn = _connect(backend)
    try:
        with conn.cursor() as cur:
            if backend == "postgres":
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                    (f"martinet-server-{server_pid}",),
                )
                return cur.rowcount
            # The server is the only client of the test database (the worker has no connection).
            cur.execute("SELECT id FROM information_schema.processlist WHERE db = DATABASE() AND id != CONNECTION_ID()")
            killed = [connection for (connection,) in cur.fetchall()]
            for connection in killed:
                cur.execute(f"KILL CONNECTION {connection}")
            return len(killed)
    finally:
        conn.close()


@pytest.mark.parametrize("db_url", ["postgres", "mysql"], indirect=True)
def test_the_database_connections_killed_under_load(cluster: Cluster, request: pytest.FixtureRequest):
    """PostgreSQL's pg_terminate_backend, or MariaDB's KILL CONNECTION, of every connection the server has, twice
    while 400 tasks flow: every task succeeds, and the server logs the failures without a traceback."""
    backend = request.node.callspec.params["db_url"]
    cluster.start_worker("--concurrency", "4")
    m = cluster.client
    ids = submit(m, 200, seconds=0.01)
    for _ in range(2):
        wait_until(lambda: len(m.list(status="succeeded", limit=10_000)) >= 20, what="tasks to flow")
        assert _kill_connections(backend, cluster.server.pid) >= 1, "the server had connections to end"
        ids += submit(m, 100, seconds=0.01)
    wait_until(lambda: all_succeeded(m, ids), timeout=60, what="every task to succeed")
    log = cluster.server.log()
    assert "ERROR martinet_app.db: database error" in log, "the lost connection was logged"
    assert "Traceback" not in log and cluster.server.running()


class _Locker:
    """A transaction of the test's own on the server's database (PostgreSQL or MariaDB), beside a connection that
    watches for the server's transaction waiting on a row."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.conn, self.watcher = _connect(backend, autocommit=False), _connect(backend)
        self.cur = self.conn.cursor()

    def lock(self, task_id: int) -> None:
        self.cur.execute("SELECT id FROM task WHERE id = %s FOR UPDATE", (task_id,))
        assert [tuple(row) for row in self.cur.fetchall()] == [(task_id,)]

    def someone_waits(self) -> bool:
        with self.watcher.cursor() as cur:
            # Only this database's connections: another one's wait elsewhere on the server is not the server's.
            if self.backend == "postgres":
                cur.execute(
                    "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
                    " WHERE NOT granted AND datname = current_database()"
                )
            else:
                cur.execute(
                    "SELECT count(*) FROM information_schema.innodb_trx JOIN information_schema.processlist"
                    " ON trx_mysql_thread_id = id WHERE trx_state = 'LOCK WAIT' AND db = DATABASE()"
                )
            return cur.fetchone()[0] > 0

    def close(self) -> None:
        self.conn.rollback()
        self.conn.close()
        self.watcher.close()


@pytest.mark.parametrize("db_url", ["postgres", "mysql"], indirect=True)
def test_a_request_that_loses_a_deadlock_is_run_again(cluster: Cluster, request: pytest.FixtureRequest):
    """Another transaction holds the second of two tasks a bulk cancel locks in id order, waits for the server to
    hold the first, then asks for it: the database rolls the server's turn back to break the deadlock, and the
    server runs the turn again instead of answering "try again"."""
    m = cluster.client
    first, second = (m.schedule("in 1 hour", {"name": "deadlocked"}) for _ in range(2))
    backend = request.node.callspec.params["db_url"]
    locker = _Locker(backend)
    try:
        if backend == "postgres":
            # The server's wait begins first; a longer timeout here makes its backend the one to find the deadlock.
            locker.cur.execute("SET LOCAL deadlock_timeout = '10s'")
        else:
            # InnoDB rolls back the transaction that has written less: this one writes rows it rolls back at the end.
            for n in range(50):
                locker.cur.execute('INSERT INTO meta ("key", value) VALUES (%s, %s)', (f"deadlock-test:{n}", ""))
        locker.lock(second)
        outcome: dict = {}

        def cancel() -> None:
            with cluster.server.client(timeout=30) as client:
                try:
                    outcome["reply"] = client.bulk("cancel", name="deadlocked")
                except Exception as exc:  # noqa: BLE001 - the assertion below shows it
                    outcome["error"] = exc

        thread = threading.Thread(target=cancel)
        thread.start()
        # InnoDB refreshes innodb_trx only when it was last read 0.1 s ago or more: poll slower than that.
        wait_until(locker.someone_waits, interval=0.25, what="the server's turn to wait for the second task's row")
        locker.lock(first)  # the cycle: the server holds the first and waits for the second
    finally:
        locker.close()
    thread.join(timeout=30)
    assert outcome.get("reply") == {"done": [second, first], "failed": []}, outcome
    assert [m.status(task_id)["status"] for task_id in (first, second)] == ["cancelled", "cancelled"]
    log = cluster.server.log()
    assert "lost a deadlock: running it again (1 of 3)" in log
    assert "Traceback" not in log and cluster.server.running()


def test_sqlite_locked_by_another_process(sqlite_cluster: Cluster):
    import sqlite3

    sqlite_cluster.start_worker("--concurrency", "4")
    m = sqlite_cluster.client
    ids = submit(m, 50, seconds=0.01)
    path = sqlite_cluster.server.db_url.removeprefix("sqlite:///")
    locker = sqlite3.connect(path, isolation_level=None, timeout=10)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        wait_until(lambda: "database is locked" in sqlite_cluster.server.log(), what="the server to meet the lock")
        with pytest.raises(StoreUnavailable, match="database is locked"):
            m.execute({"name": "nap"}, {"seconds": 0})
        assert m.ping()["protocol"] == protocol.VERSION, "the server still answers"
    finally:
        locker.execute("COMMIT")
        locker.close()
    ids += submit(m, 50, seconds=0.01)
    wait_until(lambda: all_succeeded(m, ids), timeout=60, what="every task to succeed")
    assert "Traceback" not in sqlite_cluster.server.log()


def test_a_worker_back_from_the_dead_is_told_to_stop_cancelled_tasks(sqlite_cluster: Cluster, tmp_path: Path):
    worker = sqlite_cluster.start_worker("--concurrency", "1")
    m = sqlite_cluster.client
    pids = tmp_path / "pids.txt"
    task_id = m.execute({"name": "crash"}, {"path": str(pids), "how": "hang"})
    wait_until(lambda: pids.exists() and pids.read_text().strip(), what="the handler to start")
    handler_pid = int(pids.read_text())
    os.kill(worker.pid, signal.SIGSTOP)  # frozen: the server declares it lost and re-queues its task
    try:
        wait_until(lambda: m.status(task_id)["status"] == "queued", what="the task to be re-queued")
        assert m.cancel(task_id)["status"] == "cancelled"
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    # Back, the worker registers again listing the task; the server tells it to stop it.
    wait_until(lambda: not Path(f"/proc/{handler_pid}").exists(), timeout=10, what="the handler to be stopped")
    assert m.wait(m.execute({"name": "echo"}, {}), timeout=15)["status"] == "succeeded"
    assert m.status(task_id)["status"] == "cancelled"


def test_a_full_disk_fails_submissions_cleanly(tmp_path: Path):
    """The server's database on a 1 MB file system of its own (a private mount namespace)."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("unshare -m is not permitted here: the full-disk test cannot run")
        pytest.skip("unshare -m is not permitted here")
    disk = tmp_path / "disk"
    disk.mkdir()
    server = Server(f"sqlite:///{disk / 'full.db'}", tmp_path / "server.log")
    mount = f"mount -t tmpfs -o size=1m tmpfs {disk} && exec {shlex.join(server.args)}"
    server.args = ["unshare", "-m", "sh", "-c", mount]
    server.start()
    try:
        server.wait_ready()
        m = server.client()
        stored = []
        with pytest.raises(StoreUnavailable, match="database or disk is full"):
            for _ in range(200):
                stored.append(m.execute({"name": "echo"}, {"blob": "x" * 20_000}))
        assert stored, "some tasks fitted before the disk filled"
        assert m.ping()["protocol"] == protocol.VERSION, "the server keeps serving"
        assert [t["id"] for t in m.list(limit=1000)] == stored[::-1], "every accepted task is whole, no other"
        m.close()
    finally:
        assert server.terminate() == 0
    assert "Traceback" not in server.log() and "database or disk is full" in server.log()


def test_a_handler_process_killed_while_idle_is_replaced(sqlite_cluster: Cluster):
    worker = sqlite_cluster.start_worker("--concurrency", "2")
    m = sqlite_cluster.client
    children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
    assert len(children) == 2
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    # Dead (gone, or a zombie the worker has not reaped yet) before any task is sent: killed while idle.
    wait_until(lambda: all(_exited(int(pid)) for pid in children), what="the handler processes to die")
    tasks = [m.wait(m.execute({"name": "whoami"}, {}), timeout=20) for _ in range(4)]
    assert [t["status"] for t in tasks] == ["succeeded"] * 4
    assert not {t["result"]["pid"] for t in tasks} & {int(pid) for pid in children}


def _exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_large_args_run_and_a_too_large_result_fails_clearly(sqlite_cluster: Cluster):
    from martinet_app import config

    m = sqlite_cluster.client
    # Queued before the worker comes, two 9 MB tasks reach it in one TASK message of 18 MB, over the
    # 16 MiB the server accepts from a peer: the worker takes what its server sends.
    heavy = [m.execute({"name": "big"}, {"bytes": 10, "blob": "y" * 9_000_000}) for _ in range(2)]
    sqlite_cluster.start_worker("--concurrency", "2")
    assert [m.wait(t, timeout=30)["result"]["args_size"] for t in heavy] == [9_000_000, 9_000_000]
    too_big = m.wait(m.execute({"name": "big"}, {"bytes": config.MAX_RESULT_BYTES + 1}), timeout=30)
    assert too_big["status"] == "failed"
    assert f"more than the {config.MAX_RESULT_BYTES} allowed" in too_big["error"]
    fine = m.wait(m.execute({"name": "big"}, {"bytes": config.MAX_RESULT_BYTES - 100}), timeout=30)
    assert fine["status"] == "succeeded" and len(fine["result"]["blob"]) == config.MAX_RESULT_BYTES - 100


def test_a_task_whose_worker_is_lost_every_time_fails_after_max_deliveries(tmp_path: Path):
    server = Server(f"sqlite:///{tmp_path / 'poison.db'}", tmp_path / "server.log", "--max-deliveries", "2")
    server.start()
    workers: list[Process] = []
    try:
        server.wait_ready()
        m = server.client()
        pids = tmp_path / "pids.txt"
        task_id = m.execute({"name": "crash"}, {"path": str(pids), "how": "hang"})
        for delivery in (1, 2):
            worker = Process(server.worker_args(TEST_HANDLERS, "--concurrency", "1"), tmp_path / f"w{delivery}.log")
            workers.append(worker.start())
            wait_until(lambda: m.status(task_id)["attempts"] == delivery  # noqa: B023
                       and m.status(task_id)["status"] == "running", what=f"delivery {delivery}")  # fmt: skip
            worker.kill()  # the task "takes its worker down"
        task = m.wait(task_id, timeout=15)
        assert (task["status"], task["attempts"]) == ("failed", 2)
        assert "delivered 2 times and its worker was lost each time" in task["error"]
        m.close()
    finally:
        for worker in workers:
            if worker.running():
                worker.kill()
        assert server.terminate() == 0

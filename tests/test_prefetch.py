"""Prefetch, credit and pipes end to end: a worker holds tasks beyond its slots, adapts how many, hands
them back, and sends short tasks to a slot's process several at a time."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import zmq

from conftest import TIMEOUT, Cluster, wait_until
from martinet_app import protocol


def ran(ledger: Path) -> list[int]:
    return [int(line) for line in ledger.read_text().split()] if ledger.exists() else []


def test_fixed_prefetch_holds_tasks_beyond_the_slots(sqlite_cluster: Cluster, tmp_path: Path) -> None:
    sqlite_cluster.start_worker("--concurrency", "1", "--prefetch", "2")
    m = sqlite_cluster.client
    ledger = tmp_path / "ledger.txt"
    ids = [m.execute({"name": "ledger"}, {"path": str(ledger), "seconds": 0.6}) for _ in range(4)]
    wait_until(lambda: ran(ledger) == ids[:1], what="the first task to start")
    wait_until(lambda: m.workers()[0]["busy"] == 3, what="two tasks to be prefetched")
    assert m.workers()[0]["prefetch"] == 2
    assert [m.status(i)["status"] for i in ids] == ["running", "running", "running", "queued"]
    # A prefetched task that is cancelled before a slot takes it never runs.
    assert m.cancel(ids[2])["status"] == "cancelled"
    for task_id in (ids[0], ids[1], ids[3]):
        assert m.wait(task_id, timeout=TIMEOUT)["status"] == "succeeded"
    wait_until(lambda: m.workers()[0]["busy"] == 0, what="every slot and prefetch credit to come back")
    assert ran(ledger) == [ids[0], ids[1], ids[3]]
    assert m.status(ids[2])["status"] == "cancelled"


def test_automatic_prefetch_follows_task_durations(sqlite_cluster: Cluster) -> None:
    sqlite_cluster.start_worker("--concurrency", "2")
    m = sqlite_cluster.client
    assert m.workers()[0]["prefetch"] == 0, "no history yet: nothing is held beyond the slots"
    quick = m.execute_many([({"name": "echo"}, {"n": n}) for n in range(200)])
    assert m.wait(quick[-1], timeout=TIMEOUT)["status"] == "succeeded"
    wait_until(lambda: m.workers()[0]["prefetch"] >= 10, what="short tasks to raise the prefetch")
    slow = [m.execute({"name": "nap"}, {"seconds": 0.3}) for _ in range(4)]
    for task_id in slow:
        m.wait(task_id, timeout=TIMEOUT)
    wait_until(lambda: m.workers()[0]["prefetch"] == 0, what="long tasks to bring the prefetch back to none")


def test_stopping_worker_hands_back_prefetched_tasks_unstarted(sqlite_cluster: Cluster, tmp_path: Path) -> None:
    worker = sqlite_cluster.start_worker("--concurrency", "1", "--prefetch", "2", "--grace", "20")
    m = sqlite_cluster.client
    ledger = tmp_path / "ledger.txt"
    ids = [m.execute({"name": "ledger"}, {"path": str(ledger), "seconds": 1.0}) for _ in range(3)]
    wait_until(lambda: ran(ledger) == ids[:1] and m.workers()[0]["busy"] == 3, what="one running, two prefetched")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(20) == 0
    assert m.status(ids[0])["status"] == "succeeded", "the running task finished within the grace period"
    wait_until(lambda: [m.status(i)["status"] for i in ids[1:]] == ["queued", "queued"], what="the hand-back")
    assert ran(ledger) == ids[:1], "the prefetched tasks never started"


def _short_tasks_first(m) -> None:  # noqa: ANN001 - the client
    """Run enough quick tasks that the worker's running average says tasks are short (pipes open)."""
    ids = m.execute_many([({"name": "echo"}, {"n": n}) for n in range(300)])
    assert m.wait(ids[-1], timeout=TIMEOUT)["status"] == "succeeded"


def test_a_task_cancelled_in_a_slots_pipe_never_starts(sqlite_cluster: Cluster, tmp_path: Path) -> None:
    sqlite_cluster.start_worker("--concurrency", "1", "--prefetch", "8")
    m = sqlite_cluster.client
    _short_tasks_first(m)
    ledger = tmp_path / "ledger.txt"
    first, second, third = m.execute_many([({"name": "ledger"}, {"path": str(ledger), "seconds": 0.8})] * 3)
    wait_until(lambda: ran(ledger) == [first], what="the first task to start")
    assert m.cancel(second)["status"] == "cancelled"
    assert m.wait(third, timeout=TIMEOUT)["status"] == "succeeded"
    assert ran(ledger) == [first, third], "the cancelled task was skipped"
    assert m.status(first)["status"] == "succeeded", "and the one running was not disturbed"
    assert "skipping task" in sqlite_cluster.workers[0].log(), "the three went to the process in one pipe"


def test_a_timeout_in_a_pipe_stops_only_its_task(sqlite_cluster: Cluster, tmp_path: Path) -> None:
    sqlite_cluster.start_worker("--concurrency", "1", "--prefetch", "8")
    m = sqlite_cluster.client
    _short_tasks_first(m)
    ledger = tmp_path / "ledger.txt"
    task = {"name": "ledger"}
    tasks = [(task, {"path": str(ledger), "seconds": 30})] + [(task, {"path": str(ledger)})] * 3
    slow, *quick = m.execute_many(tasks, timeout=0.5)
    for task_id in quick:
        assert m.wait(task_id, timeout=TIMEOUT)["status"] == "succeeded"
    failed = m.wait(slow, timeout=TIMEOUT)
    assert (failed["status"], failed["error"]) == ("failed", "timed out after 0.5 s")
    assert sorted(ran(ledger)) == sorted([slow, *quick]), "each ran once: the ones behind it waited, then ran"


def _fake_worker(cluster: Cluster, identity: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(f"tcp://127.0.0.1:{cluster.server.worker_port}")
    return sock


def _tasks_received(sock: zmq.Socket, expected: int, quiet: float = 0.5) -> list[dict]:
    """The tasks the broker sends: wait for ``expected`` of them, then for any more within ``quiet`` seconds."""
    tasks: list[dict] = []
    deadline = time.monotonic() + TIMEOUT
    while len(tasks) < expected or time.monotonic() < deadline:
        if not sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
            break
        command, body = protocol.parse_worker_message(sock.recv_multipart(), protocol.BROKER_COMMANDS, 1 << 20)
        if command == protocol.TASK:
            tasks += body["tasks"]
            if len(tasks) >= expected:
                deadline = time.monotonic() + quiet
    return tasks


def test_credit_is_slots_plus_prefetch_and_credit_changes_it(sqlite_cluster: Cluster) -> None:
    m = sqlite_cluster.client
    sock = _fake_worker(sqlite_cluster, b"fake-worker")
    try:
        ready = {"worker": "fake-worker", "host": socket.gethostname(), "pid": os.getpid(), "handlers": ["echo"],
                 "slots": 2, "prefetch": 3, "heartbeat": 5.0, "running": []}  # fmt: skip
        sock.send_multipart(protocol.worker_message(protocol.READY, ready))
        wait_until(lambda: m.workers(), what="the fake worker to register")
        m.execute_many([({"name": "echo"}, {})] * 20)
        assert len(_tasks_received(sock, 5)) == 5, "slots + prefetch, and no more"
        sock.send_multipart(protocol.worker_message(protocol.CREDIT, {"slots": 2, "prefetch": 10}))
        assert len(_tasks_received(sock, 7)) == 7, "the new credit, minus the deliveries still held"
        assert (m.workers()[0]["slots"], m.workers()[0]["prefetch"], m.workers()[0]["busy"]) == (2, 10, 12)
    finally:
        sock.close()


def test_credit_from_an_unknown_or_confused_worker(sqlite_cluster: Cluster) -> None:
    m = sqlite_cluster.client
    sock = _fake_worker(sqlite_cluster, b"stranger")
    try:
        sock.send_multipart(protocol.worker_message(protocol.CREDIT, {"slots": 4, "prefetch": 4}))
        assert sock.poll(TIMEOUT * 1000), "an unknown worker is answered"
        command, _ = protocol.parse_worker_message(sock.recv_multipart(), protocol.BROKER_COMMANDS, 1 << 20)
        assert command == protocol.DISCONNECT, "and told to register first"
        assert m.workers() == []
        ready = {"worker": "stranger", "host": "h", "pid": 1, "handlers": ["echo"], "slots": 1, "heartbeat": 5.0}
        sock.send_multipart(protocol.worker_message(protocol.READY, ready))
        wait_until(lambda: m.workers(), what="the worker to register")
        for bad in ({"slots": -1, "prefetch": 0}, {"slots": 1}, {"slots": 1, "prefetch": 1.5}):
            sock.send_multipart(protocol.worker_message(protocol.CREDIT, bad))
        wait_until(lambda: "CREDIT: body must have slots and prefetch" in sqlite_cluster.server.log(),
                   what="the malformed CREDIT to be logged")  # fmt: skip
        assert (m.workers()[0]["slots"], m.workers()[0]["prefetch"]) == (1, 0), "malformed CREDIT changes nothing"
    finally:
        sock.close()


def test_a_process_that_dies_in_a_pipe_fails_only_its_task(sqlite_cluster: Cluster, tmp_path: Path) -> None:
    sqlite_cluster.start_worker("--concurrency", "1", "--prefetch", "8")
    m = sqlite_cluster.client
    _short_tasks_first(m)
    pids = tmp_path / "pids.txt"
    crash, *after = m.execute_many([({"name": "crash"}, {"path": str(pids), "how": "os._exit"})]
                                   + [({"name": "whoami"}, {})] * 3)  # fmt: skip
    failed = m.wait(crash, timeout=TIMEOUT)
    assert (failed["status"], failed["error"]) == (
        "failed",
        "the handler's process exited with status 7 while running the task",
    )
    done = [m.wait(task_id, timeout=TIMEOUT) for task_id in after]
    assert [t["status"] for t in done] == ["succeeded"] * 3, "the tasks behind it ran on a new process"
    assert {t["result"]["pid"] for t in done} != {int(pids.read_text())}
    assert all(t["attempts"] == 1 for t in done), "within their first delivery"


def test_a_task_lost_with_a_workers_old_socket_is_queued_again(sqlite_cluster: Cluster) -> None:
    m = sqlite_cluster.client
    ready = {"worker": "fake-worker", "host": "h", "pid": 1, "handlers": ["echo"], "slots": 1, "heartbeat": 1.0}
    old = _fake_worker(sqlite_cluster, b"fake-worker")
    old.send_multipart(protocol.worker_message(protocol.READY, ready))
    wait_until(lambda: m.workers(), what="the fake worker to register")
    task_id = m.execute({"name": "echo"}, {})
    wait_until(lambda: m.status(task_id)["status"] == "running", what="the task to be sent")
    old.close()  # the TASK, unread, is lost with the socket
    new = _fake_worker(sqlite_cluster, b"fake-worker")
    try:
        new.send_multipart(protocol.worker_message(protocol.READY, {**ready, "running": []}))
        # The worker's READY is the truth after a reconnect: it runs nothing, so nothing is held for it,
        # and the task, running in the store with no worker holding it, is queued again.
        wait_until(lambda: m.workers() and m.workers()[0]["busy"] == 0, what="the lost delivery's slot to be free")

        def sent_again() -> dict | None:
            new.send_multipart(protocol.worker_message(protocol.HEARTBEAT))  # alive, so only the task is orphaned
            task = m.status(task_id)
            return task if task["attempts"] == 2 else None

        task = wait_until(sent_again, what="the task to be re-queued and sent again")
        assert task["status"] == "running" and task["worker"] == "fake-worker"
    finally:
        new.close()

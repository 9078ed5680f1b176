"""Per-task policy end to end: options, server defaults, priority, retries with backoff, retry, cancelling."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from conftest import ROOT, TIMEOUT, Cluster, Server, martinet_cmd, wait_until
from martinet_app import config, protocol
from martinet_app.errors import InvalidRequest, InvalidTransition, TaskNotFound

POLICY = ("priority", "retries", "retry_delay", "timeout")


def ts(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def policy(record: dict) -> dict:
    return {key: record[key] for key in POLICY}


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    """``martinet ARGS`` against the cluster's server, with no MARTINET_* settings inherited."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MARTINET_")}
    argv = martinet_cmd(*args, "--client-port", str(cluster.server.client_port))
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


# --- options and defaults -----------------------------------------------------------------------------------------


def test_options_round_trip_into_status(cluster: Cluster) -> None:
    m = cluster.client
    given = {"priority": 3, "retries": 2, "retry_delay": 0.5, "timeout": 60.0}
    assert policy(m.status(m.execute({"name": "echo"}, {}, **given))) == given
    assert policy(m.status(m.schedule("in 1 hour", {"name": "echo"}, {}, retries=1, priority=-2))) == {
        "priority": -2, "retries": 1, "retry_delay": config.DEFAULT_RETRY_DELAY, "timeout": None,
    }  # fmt: skip
    plain = m.status(m.execute({"name": "echo"}, {}))
    assert policy(plain) == {"priority": 0, "retries": 0, "retry_delay": 1.0, "timeout": None}
    assert plain["errors"] == []

    rid = m.every("1 hour", {"name": "echo"}, {}, **given)  # no run_at: the first run is queued at once
    assert policy(next(r for r in m.recurring() if r["id"] == rid)) == given
    run = wait_until(lambda: [t for t in m.list(name="echo") if t["recurring_id"] == rid], what="the first run")[0]
    assert policy(run) == given


def test_bad_options_are_rejected_with_clear_messages(sqlite_cluster: Cluster) -> None:
    m = sqlite_cluster.client
    cases = [
        (dict(retries=-1), "option 'retries' must be an integer from 0 to 2147483647, got -1"),
        (dict(retries=1.5), "option 'retries' must be an integer from 0 to 2147483647, got 1.5"),
        (dict(retries=True), "option 'retries' must be an integer from 0 to 2147483647, got True"),
        (dict(retry_delay=-0.1), "option 'retry_delay' must be a number of seconds >= 0, got -0.1"),
        (dict(retry_delay="1"), "option 'retry_delay' must be a number of seconds >= 0, got '1'"),
        (dict(timeout=0), "option 'timeout' must be a number of seconds > 0, or null for none, got 0"),
        (dict(priority=2**31), "option 'priority' must be an integer from -2147483648 to 2147483647"),
    ]
    for options, message in cases:
        with pytest.raises(InvalidRequest) as raised:
            m.execute({"name": "echo"}, {}, **options)
        assert message in raised.value.message
    with pytest.raises(InvalidRequest, match="option 'timeout' must be"):
        m.schedule("in 1 hour", {"name": "echo"}, {}, timeout=-5)
    with pytest.raises(InvalidRequest, match="option 'priority' must be"):
        m.every("1 hour", {"name": "echo"}, {}, priority="high")
    for options, message in [
        (
            {"retires": 1},
            "unknown task option(s) retires: accepted options are limit_key, priority, retries, retry_delay, timeout",
        ),
        (
            [1],
            "task options must be an object with any of limit_key, priority, retries, retry_delay, timeout, got list",
        ),
    ]:
        reply = raw_request(sqlite_cluster, {"op": "execute", "task": {"name": "echo"}, "options": options})
        assert (reply["ok"], reply["error"]["type"], reply["error"]["message"]) == (False, "InvalidRequest", message)
    assert m.list() == [] and m.recurring() == [], "nothing was stored"


def test_cli_options_and_their_errors(sqlite_cluster: Cluster) -> None:
    proc = cli(sqlite_cluster, "execute", "echo", "--retries", "2", "--retry-delay", "0.5", "--task-timeout", "7",
               "--priority", "4", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    task_id = json.loads(proc.stdout)["task_id"]
    expected = {"priority": 4, "retries": 2, "retry_delay": 0.5, "timeout": 7.0}
    assert policy(sqlite_cluster.client.status(task_id)) == expected
    proc = cli(sqlite_cluster, "every", "1 day", "echo", "--run-at", "in 1 hour", "--priority", "9", "--json")
    assert proc.returncode == 0, proc.stderr
    assert sqlite_cluster.client.recurring()[0]["priority"] == 9

    proc = cli(sqlite_cluster, "schedule", "in 1 hour", "echo", "--priority", str(2**40))
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"Invalid value for '--priority': {2**40} is not in the range -2147483648<=x<=2147483647." in proc.stderr
    proc = cli(sqlite_cluster, "execute", "echo", "--retries", "-1")
    assert proc.returncode == 2
    assert "Invalid value for '--retries': -1 is not in the range 0<=x<=2147483647" in proc.stderr
    assert [t["id"] for t in sqlite_cluster.client.list()] == [task_id]


def test_server_defaults_fill_in_missing_options(tmp_path: Path) -> None:
    server = Server(
        f"sqlite:///{tmp_path / 'defaults.db'}", tmp_path / "server.log",
        "--default-retries", "2", "--default-retry-delay", "0.5", "--default-timeout", "9", "--retry-delay-max", "60",
    )  # fmt: skip
    server.env = {"MARTINET_DEFAULT_TIMEOUT": "99", "MARTINET_RETRY_DELAY_MAX": "7"}  # flags win over these
    server.start().wait_ready()
    m = server.client()
    try:
        assert policy(m.status(m.execute({"name": "echo"}, {}))) == {
            "priority": 0, "retries": 2, "retry_delay": 0.5, "timeout": 9.0,
        }  # fmt: skip
        mine = m.status(m.execute({"name": "echo"}, {}, retries=0, timeout=1.5, priority=1))
        assert policy(mine) == {"priority": 1, "retries": 0, "retry_delay": 0.5, "timeout": 1.5}
        assert "task defaults: retries 2, retry delay 0.5 s doubling up to 60 s, timeout 9 s" in server.log()
    finally:
        m.close()
        assert server.terminate() == 0


def test_server_defaults_from_the_environment(tmp_path: Path) -> None:
    server = Server(f"sqlite:///{tmp_path / 'env.db'}", tmp_path / "server.log")
    server.env = {"MARTINET_DEFAULT_RETRIES": "3", "MARTINET_DEFAULT_RETRY_DELAY": "0.25",
                  "MARTINET_DEFAULT_TIMEOUT": "4", "MARTINET_RETRY_DELAY_MAX": "2"}  # fmt: skip
    server.start().wait_ready()
    m = server.client()
    try:
        expected = {"priority": 0, "retries": 3, "retry_delay": 0.25, "timeout": 4.0}
        assert policy(m.status(m.execute({"name": "echo"}, {}))) == expected
        assert "retry delay 0.25 s doubling up to 2 s, timeout 4 s" in server.log()
    finally:
        m.close()
        assert server.terminate() == 0


# --- priority and retries -----------------------------------------------------------------------------------------


def test_higher_priority_tasks_run_first(cluster: Cluster, tmp_path: Path) -> None:
    m = cluster.client
    ledger = tmp_path / "ledger.txt"  # the order the handlers ran in (started_at has only millisecond precision)
    low = [m.execute({"name": "ledger"}, {"path": str(ledger)}) for _ in range(3)]
    high = [m.execute({"name": "ledger"}, {"path": str(ledger)}, priority=5) for _ in range(3)]
    cluster.start_worker("--concurrency", "1")
    done = [m.wait(task_id, timeout=TIMEOUT) for task_id in low + high]
    assert {t["status"] for t in done} == {"succeeded"}
    assert [int(line) for line in ledger.read_text().split()] == high + low


def test_failing_task_is_retried_with_exponential_backoff(cluster: Cluster) -> None:
    cluster.start_worker()
    m = cluster.client
    task_id = m.execute({"name": "explode"}, {"message": "again"}, retries=2, retry_delay=0.3)
    task = m.wait(task_id, timeout=TIMEOUT)
    assert (task["status"], task["attempts"], task["error"]) == ("failed", 3, "ValueError: again")
    assert [(e["attempt"], e["error"]) for e in task["errors"]] == [(n, "ValueError: again") for n in (1, 2, 3)]
    assert all(e["worker"] == task["worker"] for e in task["errors"])
    at = [ts(e["at"]) for e in task["errors"]]
    first, second = at[1] - at[0], at[2] - at[1]
    assert 0.25 <= first < 0.3 + 1.0, f"first retry {first:.3f} s after the failure, expected about 0.3 s"
    assert 0.55 <= second < 0.6 + 1.0, f"second retry {second:.3f} s after the failure, expected about 0.6 s"
    assert abs(ts(task["finished_at"]) - at[2]) < 0.01


def test_retry_runs_a_failed_task_again(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_worker()
    m = cluster.client
    folder = tmp_path / "not yet"
    task_id = m.execute({"name": "ledger"}, {"path": str(folder / "ledger.txt")})
    failed = m.wait(task_id, timeout=TIMEOUT)
    assert failed["status"] == "failed" and failed["error"].startswith("FileNotFoundError")
    with pytest.raises(InvalidTransition, match=f"task {task_id} is failed: only waiting, scheduled, queued"):
        m.cancel(task_id)

    folder.mkdir()  # what the task lacked is there now: run it again
    again = m.retry(task_id)
    assert (again["status"], again["error"], again["finished_at"]) == ("queued", None, None)
    assert [e["attempt"] for e in again["errors"]] == [1]
    done = m.wait(task_id, timeout=TIMEOUT)
    assert (done["status"], done["attempts"], len(done["errors"])) == ("succeeded", 2, 1)
    assert (folder / "ledger.txt").read_text() == f"{task_id}\n"
    with pytest.raises(InvalidTransition, match=f"task {task_id} is succeeded: only failed or cancelled tasks"):
        m.retry(task_id)
    with pytest.raises(TaskNotFound, match="no task with id 999999"):
        m.retry(999_999)


def test_retry_verb_on_the_command_line(sqlite_cluster: Cluster) -> None:
    m = sqlite_cluster.client
    task_id = m.schedule("in 1 hour", {"name": "echo"}, {})
    m.cancel(task_id)
    proc = cli(sqlite_cluster, "retry", str(task_id))
    assert (proc.returncode, proc.stdout) == (0, f"task {task_id} queued\n"), proc.stderr
    proc = cli(sqlite_cluster, "retry", str(task_id))
    assert proc.returncode == 1
    assert proc.stderr == f"martinet: error: task {task_id} is queued: only failed or cancelled tasks can be retried\n"


# --- cancelling running tasks -------------------------------------------------------------------------------------


def start_napping(cluster: Cluster, seconds: float, *worker_args: str) -> int:
    cluster.start_worker(*worker_args)
    m = cluster.client
    task_id = m.execute({"name": "nap"}, {"seconds": seconds})
    wait_until(lambda: m.status(task_id)["status"] == "running", what="the nap to start")
    return task_id


def test_cancel_running_task_is_final_at_once(cluster: Cluster) -> None:
    m = cluster.client
    task_id = start_napping(cluster, 30, "--concurrency", "1")
    before = time.time()
    task = m.cancel(task_id)
    assert (task["status"], task["attempts"]) == ("cancelled", 1)
    assert before - 1 <= ts(task["finished_at"]) <= time.time() + 1
    assert m.wait(task_id, timeout=1)["status"] == "cancelled"
    with pytest.raises(InvalidTransition, match=f"task {task_id} is cancelled"):
        m.cancel(task_id)


def test_worker_takes_new_tasks_after_a_cancel(sqlite_cluster: Cluster) -> None:
    m = sqlite_cluster.client
    task_id = start_napping(sqlite_cluster, 30, "--concurrency", "1")
    m.cancel(task_id)
    assert m.wait(m.execute({"name": "echo"}, {}), timeout=TIMEOUT)["status"] == "succeeded"
    task = m.status(task_id)
    assert (task["status"], task["result"]) == ("cancelled", None)


def test_cancelled_task_stays_cancelled_when_its_delivery_ends(sqlite_cluster: Cluster) -> None:
    m = sqlite_cluster.client
    task_id = start_napping(sqlite_cluster, 1.0, "--concurrency", "2")
    m.cancel(task_id)
    # Whatever the worker reports for the delivery (stopped, or finished), it frees the slot and changes nothing.
    wait_until(lambda: m.workers()[0]["busy"] == 0, what="the cancelled delivery to end")
    task = m.status(task_id)
    assert (task["status"], task["result"], task["errors"]) == ("cancelled", None, [])


@pytest.fixture
def fake_worker(sqlite_cluster: Cluster) -> Iterator[zmq.Socket]:
    """A hand-made worker with one slot, registered on the server's worker socket."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"fake-worker")
    sock.connect(f"tcp://127.0.0.1:{sqlite_cluster.server.worker_port}")
    # A heartbeat of 5 s: the fake worker, which never sends one, stays registered for 25 s.
    ready = {"worker": "fake-worker", "host": socket.gethostname(), "pid": os.getpid(), "handlers": ["echo"],
             "slots": 1, "heartbeat": 5.0, "running": []}  # fmt: skip
    sock.send_multipart(protocol.worker_message(protocol.READY, ready))
    wait_until(lambda: sqlite_cluster.client.workers(), what="the fake worker to register")
    try:
        yield sock
    finally:
        sock.close()


def receive(sock: zmq.Socket, command: bytes) -> dict:
    """The body of the next ``command`` from the broker, skipping heartbeats."""
    deadline = time.monotonic() + TIMEOUT
    while sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
        got, body = protocol.parse_worker_message(sock.recv_multipart(), protocol.BROKER_COMMANDS, 1 << 20)
        if got == command:
            return body
        assert got == protocol.HEARTBEAT, f"expected {command!r}, got {got!r}: {body}"
    pytest.fail(f"no {command.decode()} within {TIMEOUT} s")


def test_cancel_sends_cancel_to_the_worker_running_the_task(sqlite_cluster: Cluster, fake_worker: zmq.Socket) -> None:
    m = sqlite_cluster.client
    task_id = m.execute({"name": "echo"}, {"x": 1}, timeout=7.5)
    assert receive(fake_worker, protocol.TASK)["tasks"] == [
        {"task_id": task_id, "attempt": 1, "name": "echo", "args": {"x": 1}, "timeout": 7.5}
    ]
    assert m.cancel(task_id)["status"] == "cancelled"
    assert receive(fake_worker, protocol.CANCEL) == {"v": 1, "tasks": [{"task_id": task_id, "attempt": 1}]}
    assert m.workers()[0]["busy"] == 1, "the slot is held until the worker reports the delivery's end"

    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"tcp://127.0.0.1:{sqlite_cluster.server.status_port}")
    event = {"task_id": task_id, "attempt": 1, "event": "failed", "at": time.time(), "error": "cancelled"}
    push.send_multipart(protocol.status_batch("fake-worker", [event]))
    push.close()
    wait_until(lambda: m.workers()[0]["busy"] == 0, what="the slot to come back")
    task = m.status(task_id)
    assert (task["status"], task["error"], task["errors"]) == ("cancelled", None, [])

    second = m.execute({"name": "echo"}, {"x": 2})
    assert receive(fake_worker, protocol.TASK)["tasks"][0]["task_id"] == second, "the freed slot takes new tasks"


def raw_request(cluster: Cluster, request: dict) -> dict:
    """Send one request as JSON exactly as given (the Python client would check some of it itself)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{cluster.server.client_port}")
    try:
        sock.send_multipart([b"", json.dumps({"v": 1, "id": "raw", **request}).encode()])
        assert sock.poll(TIMEOUT * 1000), f"no reply to {request}"
        return protocol.parse_reply(sock.recv_multipart(), 1 << 20)
    finally:
        sock.close()

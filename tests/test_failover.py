"""Lists of servers (issue 12): clients and workers move to the next server when theirs fails.

Linux answers on all of 127.0.0.0/8, so servers bound to 127.0.0.1 and 127.0.0.2 share their ports,
as the servers of one list do. Fake servers are ROUTER sockets bound by the test that record what
they receive, and answer only when told to.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from conftest import ROOT, TEST_HANDLERS, Fleet, Process, free_port, martinet_cmd, wait_until
from martinet_app import Martinet
from martinet_app.errors import ConfigError, InvalidRequest, ServerUnavailable
from martinet_app.servers import parse
from martinet_app.worker import Worker

A, B, C = "127.0.0.1", "127.0.0.2", "127.0.0.3"
#: The reply timeout of clients that must move on at once: a move that waited for it could not be fast.
LONG_TIMEOUT = 10.0
#: What a move on a dropped connection may take, on a loaded machine: well under LONG_TIMEOUT.
FAST = LONG_TIMEOUT / 4


class FakeServer(threading.Thread):
    """A ROUTER on ``host:port`` that records every request; ``answer(request)`` gives the reply's result
    fields, None for no reply, or DROP to close the socket (dropping the connection) instead."""

    DROP: dict = {"drop": True}

    def __init__(self, host: str, port: int, answer: Callable[[dict], dict | None] = lambda request: None) -> None:
        super().__init__(daemon=True)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(f"tcp://{host}:{port}")
        self.answer = answer
        self.requests: list[dict] = []
        self.bodies: list[bytes] = []
        self.stopping = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stopping.is_set() and not self.socket.closed:
            if not self.socket.poll(20):
                continue
            *envelope, body = self.socket.recv_multipart()
            request = json.loads(body)
            self.bodies.append(body)
            self.requests.append(request)
            result = self.answer(request)
            if result is self.DROP:
                self.socket.close(linger=0)
            elif result is not None:
                reply = {"v": 1, "id": request["id"], "ok": True, **result}
                self.socket.send_multipart([*envelope, json.dumps(reply).encode()])

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture
def fakes() -> Iterator[list[FakeServer]]:
    """Fake servers the test starts (append them); stopped at teardown."""
    started: list[FakeServer] = []
    yield started
    for fake in started:
        fake.stop()


def ping_pid(client: Martinet) -> int:
    return client.ping()["pid"]


def registered(client: Martinet, worker: Process) -> bool:
    assert worker.running(), f"worker exited:\n{worker.log()}"
    return any(w["pid"] == worker.pid for w in client.workers())


# ---------------------------------------------------------------- (d) lists that cannot be used


def test_lists_are_parsed_the_same_everywhere() -> None:
    assert parse("tcp://h1/, h2 ,h3") == ("h1", "h2", "h3")
    assert parse(["h1", "tcp://h2"]) == parse(("h1", "h2")) == ("h1", "h2")
    assert parse("[::1]") == ("[::1]",)
    client = Martinet(f"{A}, {B}", 9999)
    assert client.endpoints == (f"tcp://{A}:9999", f"tcp://{B}:9999") and client.endpoint == client.endpoints[0]
    worker = Worker([A, B], 7001, 7002)
    assert (worker.worker_endpoint, worker.status_endpoint) == (f"tcp://{A}:7001", f"tcp://{A}:7002")


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "no server given"),
        (" , ", "no server given"),
        ([], "no server given"),
        ("h1,,h2", "entry 2 of the server list 'h1,,h2' is empty: remove the extra comma"),
        ("h1,", "entry 2 of the server list 'h1,' is empty"),
        (["h1", ""], "entry 2 of the server list ['h1', ''] is empty"),
        ("h1:8008,h2", "entry 1 of the server list 'h1:8008,h2' names a port: every server of a list listens on"),
        ("h1,tcp://h1", "lists h1 a second time: list each server once"),
        ("h1 h2", "entry 1 of the server list 'h1 h2' is not a host name or address"),
        ("h1/x", "is not a host name or address"),
        (["h1", 2], "the server list must be a string or a list of strings"),
        (None, "the server list must be a string or a list of strings"),
    ],
)
def test_unusable_lists_are_config_errors(value: Any, says: str) -> None:
    for make in (lambda: Martinet(value), lambda: Worker(value), lambda: parse(value)):
        with pytest.raises(ConfigError) as raised:
            make()
        assert says in raised.value.message


@pytest.mark.parametrize("verb", [["ping"], ["execute", "echo"], ["work", "--handlers", str(TEST_HANDLERS)]])
def test_the_command_line_refuses_unusable_lists(verb: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARTINET_")}
    for args, extra_env in (([*verb, "--url", "h1,,h2"], {}), (verb, {"MARTINET_URL": "h1,,h2"})):
        run_env = {**env, **extra_env}
        result = subprocess.run(martinet_cmd(*args), cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "Invalid value for '--url'" in result.stderr
        assert "entry 2 of the server list 'h1,,h2' is empty: remove the extra comma" in result.stderr
        assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- (e) request keys, through fake servers


def test_a_retried_request_carries_the_same_request_key(fleet: Fleet, fakes: list[FakeServer]) -> None:
    real = fleet.server(B)
    fakes += [FakeServer(A, real.client_port), FakeServer(C, real.client_port)]
    client = Martinet([A, C, B], real.client_port, timeout=1.0)

    task_id = client.execute({"name": "echo"}, {"n": 1})

    assert real.client().status(task_id)["args"] == {"n": 1}, "the third server stored it"
    assert client.endpoint == f"tcp://{B}:{real.client_port}"
    first, second = (fake.requests for fake in fakes)
    assert len(first) == len(second) == 1, "each server is asked once"
    assert fakes[0].bodies == fakes[1].bodies, "the same frames on every server"
    key = first[0]["request_key"]
    assert key == first[0]["id"] and len(key) <= 255 and len(key.split("-")[0]) == 32
    start = time.monotonic()
    other = client.execute({"name": "echo"}, {"n": 2})
    assert time.monotonic() - start < 0.9, "the client stays on the server that answered"
    assert other != task_id and len(first) == len(second) == 1


def test_only_requests_that_change_something_carry_a_request_key(fakes: list[FakeServer]) -> None:
    port = free_port()
    fakes.append(FakeServer(A, port, lambda request: {"task_id": 7, "task": {"id": 7, "status": "queued"}}))
    client = Martinet(A, port, timeout=5.0)
    client.ping()
    client.status(7)
    client.execute({"name": "echo"})
    client.cancel(7)
    ops = {request["op"]: request for request in fakes[0].requests}
    assert "request_key" not in ops["ping"] and "request_key" not in ops["status"]
    assert ops["execute"]["request_key"] != ops["cancel"]["request_key"]
    assert {ops[op]["request_key"] for op in ("execute", "cancel")} == {ops[op]["id"] for op in ("execute", "cancel")}


def test_no_server_answering_names_every_one_tried_once(fakes: list[FakeServer]) -> None:
    port = free_port()
    fakes += [FakeServer(A, port), FakeServer(B, port, lambda request: FakeServer.DROP)]
    client = Martinet([A, B], port, timeout=0.5)
    with pytest.raises(ServerUnavailable) as raised:
        client.execute({"name": "echo"})
    assert raised.value.message == (
        f"no Martinet server answered: tcp://{A}:{port} gave no reply within 0.5 s; tcp://{B}:{port} dropped the "
        "connection. Is `martinet serve` running on one of them, on that port?"
    )
    assert [len(fake.requests) for fake in fakes] == [1, 1]


def test_wait_is_asked_again_with_the_time_left(fakes: list[FakeServer]) -> None:
    port = free_port()
    done = {"task": {"id": 5, "status": "succeeded"}}
    fakes += [FakeServer(A, port, lambda request: FakeServer.DROP), FakeServer(B, port, lambda request: done)]
    client = Martinet([A, B], port, timeout=LONG_TIMEOUT)
    start = time.monotonic()
    assert client.wait(5, timeout=30)["status"] == "succeeded"
    assert time.monotonic() - start < FAST, "a dropped connection is not waited out"
    (first,), (second,) = (fake.requests for fake in fakes)
    assert first["id"] == second["id"] and first["op"] == second["op"] == "wait"
    assert 29 < first["timeout"] <= 30 and 30 - FAST < second["timeout"] < first["timeout"]


def test_key_goes_in_the_task_metadata(fakes: list[FakeServer]) -> None:
    port = free_port()
    fakes.append(FakeServer(A, port, lambda request: {"task_id": 7, "task_ids": [7, 8]}))
    client = Martinet(A, port, timeout=5.0)
    meta = {"name": "echo"}
    client.execute(meta, key="order-7")
    client.schedule("in 1 hour", meta, key="report-7")
    client.execute({"name": "echo", "key": "same"}, key="same")
    client.execute_many([({"name": "echo", "key": "a"}, {}), ({"name": "echo"}, {})])
    with pytest.raises(InvalidRequest, match="has key 'one' and key= is 'two': give the key once"):
        client.execute({"name": "echo", "key": "one"}, key="two")
    assert meta == {"name": "echo"}, "the caller's dict is not changed"
    tasks = [request.get("task") or request["tasks"] for request in fakes[0].requests]
    assert tasks == [
        {"name": "echo", "key": "order-7"},
        {"name": "echo", "key": "report-7"},
        {"name": "echo", "key": "same"},
        [{"task": {"name": "echo", "key": "a"}, "args": {}}, {"task": {"name": "echo"}, "args": {}}],
    ]


@pytest.mark.parametrize("verb", [["execute"], ["schedule", "in 1 hour"]])
def test_the_command_line_sends_key(fakes: list[FakeServer], verb: list[str]) -> None:
    port = free_port()
    fakes.append(FakeServer(A, port, lambda request: {"task_id": 7}))
    args = [*verb, "echo", "--key", "K-1", "--url", A, "--client-port", str(port), "--json"]
    result = subprocess.run(martinet_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"task_id": 7}
    assert fakes[0].requests[0]["task"] == {"name": "echo", "key": "K-1"}


def test_a_real_server_takes_a_key(fleet: Fleet) -> None:
    client = fleet.server(A).client()
    task_id = client.execute({"name": "echo"}, {"n": 1}, key="k-1")
    assert client.status(task_id)["args"] == {"n": 1}


# ---------------------------------------------------------------- (a) the client, real servers


def test_client_moves_on_at_once_when_its_server_is_killed(fleet: Fleet) -> None:
    a = fleet.server(A)
    b = fleet.server(B, like=a)
    client = Martinet([A, B], a.client_port, timeout=LONG_TIMEOUT)
    assert ping_pid(client) == a.pid

    a.kill()
    start = time.monotonic()
    assert ping_pid(client) == b.pid
    took = time.monotonic() - start
    assert took < FAST, f"took {took:.2f} s: the dropped connection should be noticed, not the timeout waited out"

    task_id = client.execute({"name": "echo"}, {"n": 1})
    assert b.client().status(task_id)["args"] == {"n": 1}
    a.restart()
    assert ping_pid(client) == b.pid, "stays on the server that answered while it answers"

    b.kill()
    start = time.monotonic()
    assert ping_pid(client) == a.pid, "wraps around to the first"
    assert time.monotonic() - start < FAST


# ---------------------------------------------------------------- (b, c) the worker, real servers


def test_worker_moves_to_the_next_server_when_its_server_is_killed(fleet: Fleet) -> None:
    a = fleet.server(A)
    b = fleet.server(B, like=a)
    # A heartbeat of 1 s: silence would take 5 s to notice, so a quick move is the dropped connection's.
    worker = fleet.worker(a, f"{A},{B}", "--heartbeat", "1")
    on_a, on_b = a.client(), b.client()
    wait_until(lambda: registered(on_a, worker), what="the worker to register with A")
    assert not registered(on_b, worker)

    a.kill()
    wait_until(lambda: registered(on_b, worker), timeout=4.5, what="the worker to register with B, before 5 s")
    task_id = on_b.execute({"name": "echo"}, {"n": 2})
    assert on_b.wait(task_id, timeout=20)["result"] == {"task_id": task_id, "args": {"n": 2}}
    assert (
        f"WARNING martinet_app.worker: server at tcp://{A}:{a.worker_port} dropped the connection: moving to the "
        f"server at tcp://{B}:{a.worker_port}"
    ) in worker.log()


def test_final_events_lost_with_a_server_are_sent_again_to_the_next(fleet: Fleet, db_url: str) -> None:
    # Heartbeats of 2 s: the servers' leases (5 heartbeats, then as long again for the workers to move) and
    # orphan sweeps wait far longer than the worker takes to reach B, so the task is not run again meanwhile.
    a = fleet.server(A, None, db_url, "--heartbeat", "2")
    # PostgreSQL: B runs beside A on the same database. SQLite takes one server at a time: B takes over A's
    # file once A is dead, on the same ports, as the next server of the list would.
    b = fleet.server(B, a, db_url, "--heartbeat", "2") if db_url.startswith("postgresql") else None
    worker = fleet.worker(a, f"{A},{B}", "--heartbeat", "1")
    on_a = a.client()
    wait_until(lambda: f"registered with the server at tcp://{A}:" in worker.log(), what="the worker to register")
    task_id = on_a.execute({"name": "nap"}, {"seconds": 1.0})
    wait_until(lambda: f"received task {task_id} " in worker.log(), what="the worker to receive the task")

    # A stops reading while the task runs: its final event goes to A and is never read. Then A dies.
    os.kill(a.pid, signal.SIGSTOP)
    wait_until(lambda: f"task {task_id} (nap) succeeded" in worker.log(), what="the task to finish")
    a.kill()
    if b is None:
        b = fleet.server(B, a, db_url, "--heartbeat", "2")
    on_b = b.client()

    record = wait_until(
        lambda: (r := on_b.status(task_id))["status"] != "running" and r, what="the task to leave running"
    )
    assert record["status"] == "succeeded" and record["result"] == {"slept": 1.0}
    assert record["attempts"] == 1, "the first delivery's result, not a second run"
    assert f"sending 1 final status event(s) again, to tcp://{B}:{a.status_port}" in worker.log()

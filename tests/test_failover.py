"""Lists of servers (issue 12): clients and workers move to the next server when theirs fails.

Linux answers on all of 127.0.0.0/8, so servers bound to 127.0.0.1 and 127.0.0.2 share their ports,
as the servers of one list do.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TEST_HANDLERS, Process, Server, wait_until
from martinet_app import Martinet
from martinet_app.errors import ConfigError
from martinet_app.worker import Worker

A, B = "127.0.0.1", "127.0.0.2"


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
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f.logs())


def registered(client: Martinet, worker: Process) -> bool:
    assert worker.running(), f"worker exited:\n{worker.log()}"
    return any(w["pid"] == worker.pid for w in client.workers())


# ---------------------------------------------------------------- lists that cannot be used


def test_a_worker_takes_a_list_of_servers() -> None:
    worker = Worker(f"tcp://{A}, {B}/", 7001, 7002)
    assert worker.servers == (A, B)
    assert (worker.worker_endpoint, worker.status_endpoint) == (f"tcp://{A}:7001", f"tcp://{A}:7002")
    with pytest.raises(ConfigError, match="entry 2 of the server list 'h1,,h2' is empty: remove the extra comma"):
        Worker("h1,,h2")


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

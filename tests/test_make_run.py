"""``make run`` for real (``make -s run``, its install step excepted): a stop signal stops the
worker first, then the server; a server that cannot start ends it at once with no worker
(packaging/run.sh).

``make -s run`` runs in a session of its own, so every process it starts (make, the script, the
server, the worker and its handler processes, whatever their process groups) can be found by
session id and none can outlive the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, Server, free_port, print_if_failed, wait_until
from martinet_app import Martinet
from martinet_app.errors import ServerUnavailable

#: Longest `make run` may take to stop once signalled: the task's remaining 1.5 s, then two clean exits.
STOP_BOUND = 6.0
#: Longest `make run` may take to give up on a server that cannot bind.
FAIL_BOUND = 10.0
#: The Makefile's stamp of an installed virtualenv.
STAMP = ".venv/.installed"
MAKE_VARIABLES = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every live process in session ``sid`` (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == sid and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found


class MakeRun:
    """``make -s run`` with MARTINET_* settings on free ports and a temporary SQLite file."""

    def __init__(self, tmp_path: Path, ports: tuple[int, int, int] | None = None) -> None:
        self.client_port, self.worker_port, self.status_port = ports or (free_port(), free_port(), free_port())
        self.http_port = free_port()
        self.db_url = f"sqlite:///{tmp_path / 'martinet.db'}"
        self.log_path = tmp_path / "make-run.log"
        # Nothing from the caller's settings, nor from a make that runs the tests (`make test`).
        env = {k: v for k, v in os.environ.items() if not k.startswith("MARTINET_") and k not in MAKE_VARIABLES}
        env.update(
            PYTHONUNBUFFERED="1",
            MARTINET_BIND="127.0.0.1",
            MARTINET_CLIENT_PORT=str(self.client_port),
            MARTINET_WORKER_PORT=str(self.worker_port),
            MARTINET_STATUS_PORT=str(self.status_port),
            MARTINET_HTTP_PORT=str(self.http_port),
            MARTINET_DB=self.db_url,
            MARTINET_CONCURRENCY="1",
        )
        with open(self.log_path, "wb") as log:
            # -o: never the install step, even if the virtualenv's stamp is older than what it installs
            # (the tests run in that virtualenv; `make test` has brought it up to date).
            self.proc = subprocess.Popen(
                ["make", "-s", "-o", str(STAMP), "run"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.sid = self.proc.pid

    def client(self, timeout: float = 5.0) -> Martinet:
        return Martinet("127.0.0.1", self.client_port, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_exit(self, bound: float) -> tuple[int, float]:
        """Wait for make to exit, at most ``bound`` seconds; its status and how long it took."""
        started = time.monotonic()
        try:
            code = self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"make run still running {bound} s on:\n{self.log()}")
        return code, time.monotonic() - started

    def assert_nothing_left(self) -> None:
        wait_until(lambda: not session_processes(self.sid), timeout=5, what="every process of make run to exit")

    def kill_all(self) -> None:
        for pid in session_processes(self.sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(5)


@pytest.fixture
def make_runs(request: pytest.FixtureRequest) -> Iterator[list[MakeRun]]:
    """The runs a test starts; whatever they leave is killed, and their log shown if the test failed."""
    runs: list[MakeRun] = []
    yield runs
    for run in runs:
        run.kill_all()
        print_if_failed(request, lambda run=run: f"----- make run\n{run.log()[-6000:]}")


def registered_workers(run: MakeRun, client: Martinet) -> list[dict]:
    assert run.proc.poll() is None, f"make run exited with {run.proc.returncode}:\n{run.log()}"
    try:
        return client.workers()
    except ServerUnavailable:
        return []


@pytest.mark.parametrize("how", ["SIGINT to the group", "SIGTERM to make"])
def test_a_stop_signal_lets_the_running_task_finish_and_report_before_the_server_stops(
    tmp_path: Path, make_runs: list[MakeRun], how: str
):
    run = MakeRun(tmp_path)
    make_runs.append(run)
    client = run.client(timeout=0.5)
    wait_until(lambda: registered_workers(run, client), what="make run's worker to register")
    client.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{run.http_port}/api/v1/workers", timeout=10) as response:
        assert len(json.load(response)["workers"]) == 1, "the dashboard's API sees the worker"
    assert f"make run: dashboard on http://127.0.0.1:{run.http_port}/" in run.log()

    with run.client() as client:
        task_id = client.execute({"name": "sleep"}, {"seconds": 1.5})
        # Not its status: "running" starts at the delivery, and a delivery the worker has not started when
        # it is told to stop goes back to the server. The handler's first progress message says it runs.
        wait_until(lambda: client.status(task_id)["progress_message"], what="the task's handler to start")
    if how == "SIGINT to the group":  # what Ctrl-C in a terminal does
        os.killpg(run.sid, signal.SIGINT)
    else:
        run.proc.send_signal(signal.SIGTERM)
    code, _ = run.wait_exit(STOP_BOUND)
    run.assert_nothing_left()

    log = run.log()
    # make re-raises the signal it got once its recipe is done; the recipe itself ended cleanly.
    assert code in (0, -signal.SIGINT, -signal.SIGTERM), log
    assert "Error" not in log and "Traceback" not in log, log
    assert "for 1 running task(s)" in log, "the worker was stopped while the task ran"
    worker_stopped = re.search(r"martinet_app\.worker: worker \S+ stopped", log)
    assert worker_stopped and worker_stopped.start() < log.index("martinet_app.server: stopping"), log
    # The task's record, read back by a server on the same database.
    server = Server(run.db_url, tmp_path / "server-after.log").start()
    try:
        server.wait_ready()  # type: ignore[union-attr]
        with server.client() as after:  # type: ignore[union-attr]
            record = after.status(task_id)
    finally:
        server.terminate()
    assert (record["status"], record["attempts"]) == ("succeeded", 1), record


@pytest.mark.parametrize("taken_by", ["a plain socket", "another martinet server"])
def test_a_server_that_cannot_bind_ends_make_run_at_once_with_no_worker(
    tmp_path: Path, make_runs: list[MakeRun], taken_by: str
):
    other = None
    holder = socket.socket()
    try:
        if taken_by == "a plain socket":
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            ports = (holder.getsockname()[1], free_port(), free_port())
        else:  # a first `make run`'s server, say: it answers pings on the client port
            other = Server(f"sqlite:///{tmp_path / 'other.db'}", tmp_path / "other.log").start().wait_ready()  # type: ignore[union-attr]
            ports = (other.client_port, other.worker_port, other.status_port)
        run = MakeRun(tmp_path, ports)
        make_runs.append(run)
        code, _ = run.wait_exit(FAIL_BOUND)
        run.assert_nothing_left()
        log = run.log()
        assert code != 0, log
        # 3: the server's exit status when a port is taken.
        assert "the server exited with status 3 before it answered; no worker started" in log, log
        assert "martinet_app.worker" not in log, log
        if other is not None:
            with other.client() as client:
                assert client.workers() == []
    finally:
        holder.close()
        if other is not None:
            other.terminate()

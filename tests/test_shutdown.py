"""SIGTERM to the server at random moments: it always exits 0, cleanly, and loses no accepted task (#17)."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time

import gevent
import gevent.event
import pytest

from conftest import PG_URL, Cluster, Server, scrape, wait_until
from martinet_app import Martinet
from martinet_app.errors import MartinetError, StoreUnavailable
from martinet_app.loops import forever
from martinet_app.server import STOP_TIMEOUT, _kill

#: Server starts, each stopped by SIGTERM at a random moment of its first second, during a burst.
RUNS = 20
#: Tasks per request of the burst.
BATCH = 5


class Burst(threading.Thread):
    """Submits echo tasks until stopped, across server restarts; keeps the ids the server gave back."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        # Short: a request in flight when the server stops gets no reply, and holds the burst that long.
        self.client = Martinet("127.0.0.1", server.client_port, timeout=0.5)
        self.stopping = threading.Event()
        self.accepted: set[int] = set()

    def run(self) -> None:
        with self.client:
            while not self.stopping.is_set():
                try:
                    self.accepted.update(self.client.execute_many([({"name": "echo"}, {})] * BATCH))
                except MartinetError:
                    pass  # the server is stopping or starting: only what it accepted counts

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        assert not self.is_alive(), "the burst did not end"


def test_sigterm_soon_after_start_and_during_a_burst(cluster: Cluster):
    seed = int(os.environ.get("SHUTDOWN_SEED") or random.randrange(2**32))
    print(f"seed {seed} (SHUTDOWN_SEED={seed} replays it)")
    rng = random.Random(seed)
    server = cluster.server
    worker = cluster.start_worker()  # one worker for every run: it registers again with each new server
    stop_and_check(server, "the fixture's server")
    burst = Burst(server)
    burst.start()
    for run in range(RUNS):
        server.log_path = cluster.tmp_path / f"server-{run}.log"
        server.restart()
        delay = rng.uniform(0, 1)
        time.sleep(delay)  # the moment of the signal is what the test varies, not a wait for something
        stop_and_check(server, f"run {run} (SIGTERM {delay:.3f} s after start, seed {seed})")
    burst.stop()
    print(f"{len(burst.accepted)} tasks accepted")

    server.log_path = cluster.tmp_path / "server-last.log"
    server.restart()
    m = cluster.client
    assert burst.accepted, "the burst got no task accepted"
    stored = {task["id"] for task in m.iter_tasks()}
    lost = sorted(burst.accepted - stored)
    assert not lost, f"{len(lost)} accepted task(s) not stored (seed {seed}): {lost[:20]}"
    wait_until(
        lambda: not unfinished(m, burst.accepted),
        interval=0.2,
        what=f"the {len(burst.accepted)} accepted tasks to succeed (seed {seed})",
    )
    assert worker.running()


def test_a_second_signal_while_stopping_changes_nothing(sqlite_cluster: Cluster):
    sqlite_cluster.start_worker()
    m, server = sqlite_cluster.client, sqlite_cluster.server
    ids = m.execute_many([({"name": "nap"}, {"seconds": 0.2})] * 8)
    wait_until(lambda: "stopping" not in server.log() and m.status(ids[0])["status"] == "running", what="a task to run")
    os.kill(server.pid, signal.SIGTERM)
    wait_until(lambda: "stopping: no new requests" in server.log(), what="the stop to begin")
    os.kill(server.pid, signal.SIGINT)
    assert server.proc.wait(timeout=3 * STOP_TIMEOUT) == 0
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_loop_stuck_in_a_query_is_stopped_there_and_the_events_in_hand_are_still_written(cluster: Cluster):
    import psycopg2

    cluster.start_worker()
    m = cluster.client
    task_id = m.execute({"name": "nap"}, {"seconds": 0.5})
    wait_until(lambda: m.status(task_id)["status"] == "running", what="the task to start")
    # Its started event written first (then only the result is left to write).
    url = cluster.server.http_url
    started = ("martinet_task_queue_wait_seconds_count", frozenset({("name", "nap")}))
    wait_until(lambda: scrape(url).get(started) == 1, what="its started event to be written")
    blocker = psycopg2.connect(PG_URL)
    try:
        # The server's next query waits on this lock inside the store: a loop is stuck there, and the
        # task's result waits behind it, in the sink.
        blocker.cursor().execute("LOCK TABLE task IN ACCESS EXCLUSIVE MODE")
        wait_until(lambda: f"task {task_id} attempt 1 succeeded" in cluster.server.log(), what="the task's result")
        os.kill(cluster.server.pid, signal.SIGTERM)
        wait_until(lambda: "stopping the loops there" in cluster.server.log(), what="the server to give up waiting")
    finally:
        blocker.close()  # the kill broke the server's connection: the last write needs a fresh one
    assert cluster.server.proc.wait(timeout=3 * STOP_TIMEOUT) == 0
    log = cluster.server.log()
    assert "Traceback" not in log
    assert "could not write the last status events" not in log
    cluster.server.restart()
    task = m.status(task_id)
    assert (task["status"], task["attempts"]) == ("succeeded", 1), "its result was written, it did not run again"


def test_a_failure_while_stopping_ends_the_loop():
    stopping = gevent.event.Event()
    turns = []

    def broken_by_the_stop() -> None:
        turns.append(1)
        stopping.set()
        raise StoreUnavailable("the database is unavailable (connection already closed)")

    gevent.spawn(forever, broken_by_the_stop, "test loop", stopping).join(timeout=1)
    assert turns == [1], "not retried as an outage"


def test_a_loop_that_does_not_end_in_time_is_named_and_left_behind(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr("martinet_app.server.STOP_TIMEOUT", 0.1)
    released = gevent.event.Event()

    def stubborn() -> None:
        while not released.is_set():
            try:
                released.wait()
            except gevent.GreenletExit:
                pass

    loops = {"stubborn": gevent.spawn(stubborn), "idle": gevent.spawn(gevent.sleep, 10)}
    gevent.sleep(0)  # let them start: a greenlet killed before it starts never runs
    with caplog.at_level(logging.ERROR, logger="martinet_app.server"):
        _kill(loops)
    released.set()
    assert "left behind: stubborn" in caplog.text
    assert loops["idle"].dead


def stop_and_check(server: Server, run: str) -> None:
    """SIGTERM the server: it exits 0, in time, with no traceback, having said it stopped."""
    started = time.monotonic()
    code = server.terminate()
    took = time.monotonic() - started
    log = server.log()
    assert code == 0, f"{run}: exit code {code}"
    assert "Traceback" not in log, f"{run}: a traceback in {server.log_path}"
    assert "stopped" in log, f"{run}: no 'stopped' in {server.log_path}"
    assert took < STOP_TIMEOUT, f"{run}: took {took:.1f} s to stop"


def unfinished(m: Martinet, task_ids: set[int]) -> set[int]:
    """Those of ``task_ids`` that have not succeeded on a worker."""
    return task_ids - {task["id"] for task in m.iter_tasks(status="succeeded") if task["worker"] is not None}

"""The status sink in process, on a real store and real ZeroMQ sockets: what it holds, and what it writes at once.

A server answers a ``wait`` as soon as the task's final event is committed. The sink holds events that nobody
waits on (sink.HOLD); these tests give it a hold of a minute, so that an event written within seconds was
written because a client waits, not because the hold ran out.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import pytest
import zmq.green as zmq

from conftest import TIMEOUT
from martinet_app import clock, config, protocol
from martinet_app.broker import Broker
from martinet_app.scheduler import Scheduler
from martinet_app.sink import StatusSink
from martinet_app.store import Store

HOLD = 60.0
WORKER = "w-1"


def within(predicate: Callable[[], object], seconds: float) -> bool:
    """Whether ``predicate`` holds within ``seconds``, polled with gevent's sleep so that the sink's greenlet runs
    meanwhile (conftest.wait_until sleeps the whole thread)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(0.01)
    return False


class Rig:
    """A sink on a SQLite store with one task running on WORKER, and the PUSH socket a worker reports on."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = Store.open(f"sqlite:///{tmp_path / 'sink.db'}")
        self.context = zmq.Context()
        address = f"inproc://sink-{id(self)}"
        pull, self.push = self.context.socket(zmq.PULL), self.context.socket(zmq.PUSH)
        pull.bind(address)
        self.push.connect(address)
        routed = self.context.socket(zmq.ROUTER)
        self.sockets = [pull, self.push, routed]
        options = {"max_bytes": config.MAX_MESSAGE_BYTES, "batch_max": config.BATCH_MAX, "rejected": lambda _: None}
        broker = Broker(routed, self.store, heartbeat=1.0, liveness=3, **options)
        scheduler = Scheduler(self.store, broker, tz=datetime.UTC, max_sleep=1.0, clock=clock.from_environment({}))
        self.waited: set[int] = set()
        self.finished: list[int] = []
        self.sink = StatusSink(
            pull, self.store, broker, scheduler, self.finished.extend, waited=self.waited.__contains__, hold=HOLD,
            **options,
        )  # fmt: skip
        now = time.time()
        self.task_id = self.store.add_task({"name": "job"}, {}, run_at=now, now=now)
        (claimed,) = self.store.claim(WORKER, 1, now)
        assert claimed["task_id"] == self.task_id
        self.loop = gevent.spawn(self._serve)

    def _serve(self) -> None:
        while True:
            self.sink.loop_once()

    def succeed(self) -> None:
        """The worker reports the task succeeded; return once the sink has it in hand."""
        event = {"task_id": self.task_id, "attempt": 1, "event": protocol.SUCCEEDED, "at": time.time(), "result": 7}
        self.push.send_multipart(protocol.status_batch(WORKER, [event]))
        assert within(lambda: self.sink.held, TIMEOUT), "the sink never received the event"

    def status(self) -> str:
        return self.store.get_task(self.task_id)["status"]

    def close(self) -> None:
        self.loop.kill()
        for sock in self.sockets:
            sock.close(linger=0)
        self.context.term()
        self.store.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def written_within(rig: Rig, seconds: float) -> bool:
    """Whether the task's final event is committed (and the finish announced) within ``seconds``."""
    return within(lambda: rig.finished and rig.status() == "succeeded", seconds)


def test_an_event_nobody_waits_on_is_held(rig: Rig) -> None:
    rig.succeed()
    assert not written_within(rig, 0.5), "written before its hold ended, with nobody waiting"
    assert rig.status() == "running"


def test_a_wait_that_comes_after_the_final_event_has_it_written_at_once(rig: Rig) -> None:
    rig.succeed()
    rig.waited.add(rig.task_id)  # the endpoint parks the wait, then hurries the sink
    rig.sink.hurry()
    assert written_within(rig, TIMEOUT), f"still held {HOLD:g} s for a client that waits"
    assert rig.finished == [rig.task_id] and rig.store.get_task(rig.task_id)["result"] == 7


def test_hurry_without_a_waited_final_event_writes_nothing(rig: Rig) -> None:
    rig.succeed()
    rig.sink.hurry()  # a wait on some other task
    assert not written_within(rig, 0.5)
    assert rig.status() == "running"

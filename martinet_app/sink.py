"""The status sink: workers PUSH started/progress/succeeded/failed events; each is written to the store.

Everything readable is drained and written in one transaction, which also hands the slots
the finished deliveries freed to queued tasks (group commit: one commit per loop turn). Then
the scheduler learns of tasks scheduled for a retry, and the client endpoint answers whoever
waits on tasks made final.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq.green as zmq

from . import protocol
from .broker import Broker
from .errors import ProtocolError
from .scheduler import Scheduler
from .store import Store

log = logging.getLogger(__name__)


class StatusSink:
    """Owns the status PULL socket."""

    def __init__(
        self,
        socket: Any,
        store: Store,
        broker: Broker,
        scheduler: Scheduler,
        on_finished: Callable[[list[int]], None],
        *,
        max_bytes: int,
        batch_max: int,
    ) -> None:
        self.socket = socket
        self.store = store
        self.broker = broker
        self.scheduler = scheduler
        self.on_finished = on_finished
        self.max_bytes = max_bytes
        self.batch_max = batch_max
        self.rejections = protocol.Rejections(log, "status socket")
        # Events received but not yet written: kept across a failed write, so none is lost.
        self._pending: list[tuple[str, dict]] = []

    def loop_once(self) -> None:
        """Block for one message, drain the rest that is readable, write them all in one transaction."""
        if not self._pending:
            self._receive(self.socket.recv_multipart())
        self._drain(self.batch_max)
        self._write()

    def flush(self) -> None:
        """Write everything in hand, received or waiting in the socket (when the server stops: no dispatch)."""
        self._drain(None)
        self._write(dispatch=False)

    def _drain(self, limit: int | None) -> None:
        """Receive what is readable without waiting, until ``limit`` events are pending (None: all)."""
        while limit is None or len(self._pending) < limit:
            try:
                self._receive(self.socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return

    def _write(self, dispatch: bool = True) -> None:
        """Write the pending events and refill the slots they free, in one transaction."""
        if not self._pending:
            return
        batch = self._pending
        released: dict[str, list[tuple[int, int]]] = {}
        for worker, event in batch:
            if event["event"] in protocol.FINAL_EVENTS:
                released.setdefault(worker, []).append((event["task_id"], event["attempt"]))
                log.debug("task %s attempt %s %s on %s", event["task_id"], event["attempt"], event["event"], worker)
        # The worker has finished these deliveries whatever the store says: their slots are free.
        for worker, refs in released.items():
            self.broker.release(worker, refs)
        with self.store.transaction():
            applied = self.store.apply_events(batch)
            if dispatch:
                self.broker.dispatch()
        self._pending = []
        if applied.retrying:
            self.scheduler.wake()
        if applied.finished:
            self.on_finished(applied.finished)

    def _receive(self, frames: list[bytes]) -> None:
        try:
            worker, events = protocol.parse_status_batch(frames, self.max_bytes)
        except ProtocolError as exc:
            self.rejections.reject(exc)
            return
        self._pending.extend((worker, event) for event in events)

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

from . import config, protocol, security
from .broker import Broker
from .errors import MartinetError, ProtocolError
from .scheduler import Scheduler
from .security import Inbox
from .store import Applied, Store

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
        rejected: Callable[[str], None],
        inbox: Inbox | None = None,
    ) -> None:
        """``rejected`` counts a message refused, by reason (metrics.Metrics.rejected)."""
        self.socket = socket
        self.inbox = inbox or Inbox(socket)
        self.store = store
        self.broker = broker
        self.scheduler = scheduler
        self.on_finished = on_finished
        self.max_bytes = max_bytes
        self.batch_max = batch_max
        self.rejections = protocol.Rejections(log, "status socket", rejected)
        # Events received but not yet written: kept across a failed write, so none is lost.
        self._pending: list[tuple[str, dict]] = []

    def loop_once(self) -> None:
        """Block for one message, drain the rest that is readable, write them all in one transaction."""
        if not self._pending:
            self._receive(*self.inbox.recv())
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
                self._receive(*self.inbox.recv(zmq.NOBLOCK))
            except zmq.Again:
                return

    def _write(self, dispatch: bool = True) -> None:
        """Write the pending events and refill the slots they free, in one transaction.

        A batch the database refuses (not an outage: a value no statement takes) is split until
        the event at fault is alone (:meth:`_refused`); the others are written as usual.
        """
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
        applied = self._apply(batch, dispatch)
        self._pending = []
        if applied.retrying:
            self.scheduler.wake()
        if applied.finished:
            self.on_finished(applied.finished)

    def _apply(self, batch: list[tuple[str, dict]], dispatch: bool) -> Applied:
        """Write ``batch`` in one transaction, or in halves if the database refuses it.

        Raises:
            StoreUnavailable: the database is away; the events stay pending (writing them again
                is harmless: an event whose delivery it already ended is stale).
        """
        try:
            with self.store.transaction():
                applied = self.store.apply_events(batch)
                if dispatch:
                    self.broker.dispatch()
            return applied
        except MartinetError:
            raise
        except Exception as exc:  # a value the database refused; which event holds it is not known
            if len(batch) == 1:
                return self._refused(*batch[0], exc)
        half = len(batch) // 2
        first, second = self._apply(batch[:half], False), self._apply(batch[half:], False)
        if dispatch:
            self.broker.wake()
        return Applied(first.finished + second.finished, first.retrying + second.retrying)

    def _refused(self, worker: str, event: dict, exc: Exception) -> Applied:
        """An event the database refused: logged and dropped; a final one fails its delivery instead."""
        reason = _reason(exc)
        kind, task_id, attempt = event["event"], event["task_id"], event["attempt"]
        log.error(
            "could not store the %s event of task %s attempt %s from %s: %s", kind, task_id, attempt, worker, reason
        )
        if kind not in protocol.FINAL_EVENTS:
            return Applied()
        error = f"the worker's {kind} event could not be stored ({reason})"
        try:
            failed = self.store.fail_delivery(task_id, attempt, worker, at=event["at"], error=error)
        except MartinetError:
            raise
        except Exception as second:  # never retried unchanged: the orphan sweep re-queues the task
            log.error("could not fail task %s attempt %s either: %s", task_id, attempt, _reason(second))
            return Applied()
        return Applied(finished=[task_id]) if failed else Applied()

    def _receive(self, frames: list[bytes], user_id: str | None) -> None:
        try:
            worker, events = protocol.parse_status_batch(frames, self.max_bytes)
            if not security.bound_to_key(worker, user_id):
                raise ProtocolError(
                    f"status: worker {worker!r} is not the worker of the key that sent it", "unauthenticated"
                )
        except ProtocolError as exc:
            self.rejections.reject(exc)
            return
        self._pending.extend((worker, event) for event in events)


def _reason(exc: Exception) -> str:
    """An exception as a log line and a task's error can carry it."""
    return protocol.safe_text(f"{type(exc).__name__}: {exc}", config.MAX_ERROR_CHARS)

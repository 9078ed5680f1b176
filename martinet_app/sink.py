"""The status sink: workers PUSH started/progress/succeeded/failed events; each is written to the store.

Everything readable is drained and written in one transaction, which also hands the slots
the finished deliveries freed to queued tasks (group commit: one commit per loop turn). Then
the scheduler learns of tasks scheduled for a retry, and the client endpoint answers whoever
waits on tasks made final.

Events that nobody waits on are held up to HOLD seconds first: a client request's turn, which
commits anyway, carries them in its own transaction (:meth:`StatusSink.carry`), so a producer
submitting while its earlier tasks finish pays one fsync per task instead of two. A final event
that a client waits on is written at once, also when the ``wait`` comes after it (:meth:`StatusSink.hurry`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import zmq.green as zmq

from . import config, protocol, security
from .broker import Broker
from .errors import MartinetError, ProtocolError
from .scheduler import Scheduler
from .security import Inbox
from .store import Applied, Store

log = logging.getLogger(__name__)

#: Longest that events nobody waits on are held for a client turn to carry them, seconds: then the sink
#: writes them itself. Short beside any prefetch, so the slots they free are refilled as soon.
HOLD = 0.005


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
        waited: Callable[[int], bool] = lambda task_id: False,
        hold: float = HOLD,
    ) -> None:
        """``rejected`` counts a message refused, by reason (metrics.Metrics.rejected); ``waited(task_id)``
        says whether a client waits on that task (its final event is written at once, not held)."""
        self.socket = socket
        self.inbox = inbox or Inbox(socket)
        self.store = store
        self.broker = broker
        self.scheduler = scheduler
        self.on_finished = on_finished
        self.max_bytes = max_bytes
        self.batch_max = batch_max
        self.rejections = protocol.Rejections(log, "status socket", rejected)
        self.waited = waited
        self.hold = hold
        # Events received but not yet written: kept across a failed write, so none is lost.
        self._pending: list[tuple[str, dict]] = []
        # When the oldest of them arrived (time.monotonic()).
        self._since = 0.0
        # How many of the first pending events a write in progress holds: the sink's own, or a client turn's.
        self._carried = 0
        self._settled = gevent.event.Event()
        # The write that :meth:`hurry` started, while it runs.
        self._hurried: gevent.Greenlet | None = None

    @property
    def held(self) -> int:
        """Status events received and not yet committed to the store (they wait here while the database is away)."""
        return len(self._pending)

    def loop_once(self) -> None:
        """Block for one message, drain the rest that is readable; write them all in one transaction once they
        are due (:meth:`_due`), else wait for more until they are (a client turn may carry them meanwhile)."""
        if not self._pending:
            self._receive(*self.inbox.recv())
        self._drain(self.batch_max)
        if self._carried:  # a client turn is committing them: its outcome decides
            self._settled.wait(self.hold)
        elif self._due():
            self._write()
        else:
            self.socket.poll(max(1, round((self._since + self.hold - time.monotonic()) * 1000)))

    def carry(self) -> bool:
        """Write the pending events in the caller's write transaction (a client turn's), so that its commit
        serves them too; True if they freed slots (the caller then dispatches).

        A savepoint keeps them apart: if the database refuses one of them, none is written here and the
        turn goes on; the sink writes them itself when they are due, and finds the event at fault.
        """
        if self._carried or not self._pending:
            return False
        batch = self._pending[:]
        released = self._release(batch)
        try:
            with self.store.savepoint():
                applied = self.store.apply_events(batch)
        except MartinetError:
            raise
        except Exception as exc:  # a value the database refused: the sink's own write finds which
            log.debug("a client turn could not carry %d status events: %s", len(batch), _reason(exc))
            return False
        self._carried = len(batch)
        self._settled.clear()
        self.store.after_commit(lambda: self._written(applied))
        self.store.on_rollback(self._dropped)
        return released

    def hurry(self) -> None:
        """A client has just begun to wait on a task: if a final event it waits for is held here, have it written
        now rather than when the hold ends. In a greenlet of its own, as the caller is inside its own turn."""
        if self._hurried is None and self._pending and not self._carried and self._due():
            self._hurried = gevent.spawn(self._write_hurried)

    def _write_hurried(self) -> None:
        try:
            self._write()
        except MartinetError as exc:  # the events stay pending: the sink's loop writes them once it can
            log.warning("could not write the status events a client waits on: %s", exc.message)
        finally:
            self._hurried = None

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

    def _due(self) -> bool:
        """Whether the pending events are to be written now: held long enough, a full batch, or a final event
        that a client waits on."""
        if len(self._pending) >= self.batch_max or time.monotonic() - self._since >= self.hold:
            return True
        final = protocol.FINAL_EVENTS
        return any(event["event"] in final and self.waited(event["task_id"]) for _, event in self._pending)

    def _write(self, dispatch: bool = True) -> None:
        """Write the pending events and refill the slots they free, in one transaction.

        A batch the database refuses (not an outage: a value no statement takes) is split until
        the event at fault is alone (:meth:`_refused`); the others are written as usual.
        """
        if not self._pending or self._carried:
            return
        batch = self._pending[:]
        self._release(batch)
        self._carried = len(batch)
        self._settled.clear()  # the loop waits on it while a write runs in another greenlet (hurry's)
        try:
            applied = self._apply(batch, dispatch)
        except BaseException:
            self._dropped()
            raise
        self._written(applied)

    def _release(self, batch: list[tuple[str, dict]]) -> bool:
        """Free the slots of the batch's finished deliveries (the worker has finished them whatever the store
        says); True if there were any."""
        released: dict[str, list[tuple[int, int]]] = {}
        for worker, event in batch:
            if event["event"] in protocol.FINAL_EVENTS:
                released.setdefault(worker, []).append((event["task_id"], event["attempt"]))
                log.debug("task %s attempt %s %s on %s", event["task_id"], event["attempt"], event["event"], worker)
        for worker, refs in released.items():
            self.broker.release(worker, refs)
        return bool(released)

    def _written(self, applied: Applied) -> None:
        """The carried events are committed: forget them, and tell who acts on them."""
        del self._pending[: self._carried]
        self._carried = 0
        self._settled.set()
        self._since = time.monotonic()
        if applied.retrying:
            self.scheduler.wake()
        if applied.finished:
            self.on_finished(applied.finished)

    def _dropped(self) -> None:
        """The write of the carried events did not commit: they stay pending, to be written again."""
        self._carried = 0
        self._settled.set()

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
        if not self._pending:
            self._since = time.monotonic()
        self._pending.extend((worker, event) for event in events)


def _reason(exc: Exception) -> str:
    """An exception as a log line and a task's error can carry it."""
    return protocol.safe_text(f"{type(exc).__name__}: {exc}", config.MAX_ERROR_CHARS)

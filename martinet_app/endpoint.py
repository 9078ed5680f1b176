"""The client endpoint: one JSON request in, one JSON reply out, on a ROUTER socket.

Every request that creates something is committed to the store before the reply is
sent: the requests readable at once share one transaction (group commit), with the status
events the sink holds (sink.StatusSink.carry), and the tasks they queue are claimed for free
worker slots in that same transaction, once per turn. A turn
that only reads runs beside the store's writer (db.Pool). A ``wait`` request is parked until its
task becomes final or its timeout passes, without blocking other clients.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
import zmq.green as zmq

from . import __version__, config, errors, protocol, stats, timespec
from .broker import Broker
from .errors import InvalidRequest, MartinetError, ProtocolError, StoreConflict
from .scheduler import Scheduler
from .security import Inbox
from .status import TaskStatus
from .store import Store

log = logging.getLogger(__name__)

_STATUSES = frozenset(s.value for s in TaskStatus)
#: Longest a single ``wait`` request is parked, seconds (the client asks again after it).
WAIT_MAX = 300.0
#: Times a turn of requests runs again after the database rolled it back to break a deadlock, and the seconds
#: paused before the first of them (longer before each next).
CONFLICT_RETRIES = 3
CONFLICT_PAUSE = 0.02
#: Requests that may queue tasks: a turn that has any hands the queue to free slots once, at its end.
_QUEUING_OPS = frozenset({"execute", "execute_many", "chain", "retry", "bulk", "resume"})
#: What a ``bulk`` request may do to each task it selects.
_BULK_ACTIONS = frozenset({"cancel", "retry"})


class _Unexpected(Exception):
    """A request failed unexpectedly; ``error`` is its reply's error object."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.error = MartinetError(message).to_wire()


@dataclass
class _Request:
    """One received request: its routing envelope and id, and its body, or why it cannot be run."""

    envelope: list[bytes]
    id: Any
    body: dict | None = None
    error: dict | None = None


@dataclass(eq=False)
class _Waiter:
    """A ``wait`` request parked until its task is final, and the timer that answers it otherwise."""

    envelope: list[bytes]
    request_id: Any
    timer: gevent.Greenlet | None = None
    answered: bool = False  # its reply is sent (or being sent)


class ClientEndpoint:
    """Owns the client ROUTER socket and answers requests from the store.

    ``defaults`` has a value for every task option (protocol.TASK_OPTION_KEYS): what a task gets
    for the options it does not give, so every stored task has concrete values.
    """

    def __init__(
        self,
        socket: Any,
        store: Store,
        broker: Broker,
        scheduler: Scheduler,
        *,
        tz: datetime.tzinfo,
        defaults: dict,
        max_bytes: int,
        list_limit_max: int,
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
        self.tz = tz
        self.defaults = defaults
        self.max_bytes = max_bytes
        self.list_limit_max = list_limit_max
        self.batch_max = batch_max
        self.rejections = protocol.Rejections(log, "client socket", rejected)
        self._waiters: dict[int, list[_Waiter]] = {}
        #: Writes the status events waiting in the sink in the current transaction; True if that freed slots
        #: (sink.StatusSink.carry, set by the server): a turn that commits anyway carries them.
        self.carry: Callable[[], bool] = lambda: False
        #: Has a final status event that a ``wait`` just parked on written at once, if the sink holds one
        #: (sink.StatusSink.hurry, set by the server).
        self.hurry: Callable[[], None] = lambda: None
        self._ops: dict[str, Callable[[dict, list[bytes]], dict | None]] = {
            "ping": self._ping,
            "execute": self._execute,
            "execute_many": self._execute_many,
            "chain": self._chain,
            "schedule": self._schedule,
            "every": self._every,
            "status": lambda r, _: {"task": self.store.get_task(protocol.check_id(r.get("task_id"), "task_id"))},
            "wait": self._wait,
            "list": self._list,
            "workers": self._workers,
            "cancel": self._cancel,
            "retry": self._retry,
            "bulk": self._bulk,
            "recurring": lambda r, _: {"recurring": self.store.list_recurring()},
            "purge": self._purge,
            "stats": lambda r, _: stats.summary(self.store, time.time()),
            "revoke": lambda r, _: {
                "recurring": self.store.revoke(protocol.check_id(r.get("recurring_id"), "recurring_id"))
            },
            "pause": self._pause,
            "resume": self._resume,
        }

    def loop_once(self) -> None:
        """Answer the readable requests (up to ``batch_max``) with one transaction for all they store.

        Replies go out after the commit; if the transaction fails, nothing of the turn was stored
        and every request of it gets the error. A request that fails unexpectedly (a statement the
        database refused) rolls the turn back, and the others are then answered one by one, each in
        its own transaction, so that it costs no other request.
        """
        frames = [self.inbox.recv()[0]]
        while len(frames) < self.batch_max:
            try:
                frames.append(self.inbox.recv(zmq.NOBLOCK)[0])
            except zmq.Again:
                break
        requests = [request for request in map(self._parse, frames) if request is not None]
        # A purge deletes a batch of tasks: it goes last, in a turn of its own, so that the requests read
        # with it are answered first instead of waiting for its deletes.
        purges = [request for request in requests if request.body is not None and request.body["op"] == "purge"]
        others = [request for request in requests if request.body is None or request.body["op"] != "purge"]
        for turn in (others, *([purge] for purge in purges)):
            if turn:
                self._answer_turn(turn)

    def _answer_turn(self, requests: list[_Request]) -> None:
        """Run ``requests`` in one transaction (:meth:`loop_once`) and send their replies."""
        try:
            replies = self._turn(requests)
        except _Unexpected as failure:
            if len(requests) == 1:
                replies = [(requests[0], None, failure.error)]
            else:
                replies = [reply for request in requests for reply in self._alone(request)]
        for request, result, error in replies:
            self._send(protocol.reply(request.envelope, request.id, result, error))

    def _turn(self, requests: list[_Request]) -> list[tuple[_Request, dict | None, dict | None]]:
        """Run ``requests`` in one transaction: their (request, result, error) replies, once it has committed.

        A turn the database rolled back to break a deadlock (StoreConflict) runs again, up to
        CONFLICT_RETRIES times, after a short random pause: the other transaction then finishes first.

        Raises:
            _Unexpected: a request failed unexpectedly; the transaction was rolled back.
        """
        # A turn that only reads (status, list, wait...) runs beside the writer on PostgreSQL.
        read_only = all(request.body is None or request.body["op"] not in protocol.MUTATING_OPS for request in requests)
        attempt = 0
        while True:
            try:
                return self._run(requests, read_only)
            except StoreConflict as exc:
                attempt += 1
                if attempt > CONFLICT_RETRIES:
                    return [(request, None, exc.to_wire()) for request in requests]
                log.warning("a turn of %d request(s) lost a deadlock: running it again (%d of %d)",
                            len(requests), attempt, CONFLICT_RETRIES)  # fmt: skip
                gevent.sleep(random.uniform(0.5, 1.5) * CONFLICT_PAUSE * attempt)
            except MartinetError as exc:
                return [(request, None, exc.to_wire()) for request in requests]

    def _run(self, requests: list[_Request], read_only: bool) -> list[tuple[_Request, dict | None, dict | None]]:
        """One attempt of :meth:`_turn`."""
        replies: list[tuple[_Request, dict | None, dict | None]] = []
        with self.store.transaction(read_only=read_only):
            for request in requests:
                reply = self._answer(request)
                if reply is not None:
                    replies.append((request, *reply))
            freed = not read_only and self.carry()
            if freed or any(r.body is not None and r.body["op"] in _QUEUING_OPS for r in requests):
                self.broker.dispatch()
        return replies

    def call(self, request: dict, size: int = 0) -> dict:
        """Run one request from inside the server (the HTTP API) as a ZeroMQ one runs: checked the same way
        (``size``: its encoded bytes), in its own transaction, committed before this returns. Its result, or
        the typed error it failed with.

        ``wait`` is not taken here (it parks on a socket): the API reads the task instead.
        """
        if request.get("op") == "wait":
            raise InvalidRequest("wait is not available inside the server: read the task instead")
        protocol.check_client_request(request, size, self.max_bytes)
        # Every operation but ``wait`` (refused above) is answered in its turn: one reply.
        ((_, result, error),) = self._alone(_Request([], None, body=request))
        if error is not None:
            raise errors.from_wire(error)
        return result

    def _alone(self, request: _Request) -> list[tuple[_Request, dict | None, dict | None]]:
        """Run one request in its own transaction; an unexpected failure is its own reply."""
        try:
            return self._turn([request])
        except _Unexpected as failure:
            return [(request, None, failure.error)]

    def _parse(self, frames: list[bytes]) -> _Request | None:
        """Check one request's frames; None for malformed frames that cannot be answered (dropped and counted)."""
        try:
            envelope, body = protocol.split_envelope(frames)
            if len(envelope) < 2:
                raise ProtocolError("client: no routing id before the empty delimiter")
        except ProtocolError as exc:
            self.rejections.reject(exc)
            return None
        try:
            request = protocol.parse_client_request(body)
        except ProtocolError as exc:
            self.rejections.reject(exc)
            return _Request(envelope, None, error=InvalidRequest(exc.message).to_wire())
        try:
            protocol.check_client_request(request, len(body[0]), self.max_bytes)
        except MartinetError as exc:
            return _Request(envelope, protocol.request_id(request), error=exc.to_wire())
        return _Request(envelope, protocol.request_id(request), body=request)

    def _answer(self, request: _Request) -> tuple[dict | None, dict | None] | None:
        """Run one checked request: its (result, error), or None for a ``wait`` that is parked.

        Raises:
            _Unexpected: a bug, or a statement the database refused, which may have aborted the
                transaction: the turn must not commit.
        """
        if request.body is None:
            return None, request.error
        try:
            result = self._ops[request.body["op"]](request.body, request.envelope)
        except MartinetError as exc:
            log.debug("request %s failed: %s", request.id, exc.message)
            return None, exc.to_wire()
        except Exception as exc:
            log.exception("request %r failed unexpectedly", request.id)
            error = MartinetError(f"server error: {type(exc).__name__}: {exc}; see the server log")
            raise _Unexpected(protocol.safe_text(error.message, config.MAX_ERROR_CHARS)) from exc
        return None if result is None else (result, None)

    def waits_on(self, task_id: int) -> bool:
        """Whether a ``wait`` request is parked on the task."""
        return task_id in self._waiters

    def answer_finished(self) -> None:
        """Answer the parked ``wait`` requests whose tasks the store has as final (a lost notice's safety net)."""
        if self._waiters:
            self.notify_finished(sorted(self.store.finished(list(self._waiters))))

    def notify_finished(self, task_ids: list[int]) -> None:
        """Answer the ``wait`` requests parked on tasks that just became final."""
        for task_id in task_ids:
            waiters = self._waiters.pop(task_id, None)
            if not waiters:
                continue
            for waiter in waiters:
                waiter.answered = True
                waiter.timer.kill(block=False)
            task = self.store.get_task(task_id)
            for waiter in waiters:
                self._send(protocol.reply(waiter.envelope, waiter.request_id, {"task": task}))

    # ------------------------------------------------------------ operations

    def _ping(self, request: dict, envelope: list[bytes]) -> dict:
        return {"version": __version__, "protocol": protocol.VERSION, "pid": os.getpid()}

    def _execute(self, request: dict, envelope: list[bytes]) -> dict:
        meta, args, options = self._submission(request, recurring=False)
        after = protocol.check_after(request.get("after"))
        now = time.time()
        task_id = self.store.add_task(
            meta, args, run_at=now, now=now, options=options, request_key=_key(request), after=after
        )
        return {"task_id": task_id}

    def _execute_many(self, request: dict, envelope: list[bytes]) -> dict:
        tasks = protocol.check_many(request.get("tasks"), config.SUBMIT_MANY_MAX)
        options = self._options(request)
        now = time.time()
        task_ids = self.store.add_tasks(tasks, run_at=now, now=now, options=options, request_key=_key(request))
        return {"task_ids": task_ids}

    def _chain(self, request: dict, envelope: list[bytes]) -> dict:
        """Tasks that each wait for the one before (the first for ``after``), in one transaction."""
        tasks = protocol.check_many(request.get("tasks"), config.CHAIN_MAX)
        after = protocol.check_after(request.get("after"))
        options = self._options(request)
        now = time.time()
        task_ids = self.store.add_tasks(
            tasks, run_at=now, now=now, options=options, request_key=_key(request), after=after, chain=True
        )
        return {"task_ids": task_ids}

    def _schedule(self, request: dict, envelope: list[bytes]) -> dict:
        meta, args, options = self._submission(request, recurring=False)
        after = protocol.check_after(request.get("after"))
        now = self.scheduler.clock.now()
        when = timespec.parse_when(
            protocol.check_string(request, "when", required=True), now=_utc(now), tz=self._zone(request)[0]
        )
        task_id = self.store.add_task(
            meta, args, run_at=when.timestamp(), now=now, options=options, request_key=_key(request), after=after
        )
        self.scheduler.wake()
        return {"task_id": task_id}

    def _every(self, request: dict, envelope: list[bytes]) -> dict:
        meta, args, options = self._submission(request, recurring=True)
        now = self.scheduler.clock.now()
        recurrence = timespec.parse_interval(
            protocol.check_string(request, "interval", required=True, max_chars=config.MAX_NAME_CHARS)
        )
        zone, zone_name = self._zone(request)
        first = recurrence.first_run(now=_utc(now), run_at=meta.get("run_at"), tz=zone)
        recurring_id = self.store.add_recurring(
            meta,
            args,
            interval=recurrence.text,
            tz=zone_name,
            next_run_at=first.timestamp(),
            now=now,
            options=options,
            request_key=_key(request),
        )
        self.scheduler.wake()
        return {"recurring_id": recurring_id}

    def _zone(self, request: dict) -> tuple[datetime.tzinfo, str | None]:
        """The zone a request's wall times are in: its ``tz`` (an IANA name, BadTimeSpec otherwise) and that
        name, or the server's zone (``--tz``) and None."""
        name = protocol.check_string(request, "tz", required=False, max_chars=config.MAX_NAME_CHARS)
        if name is None:
            return self.tz, None
        zone = timespec.parse_zone(name)
        return zone, zone.key

    def _wait(self, request: dict, envelope: list[bytes]) -> dict | None:
        task_id = protocol.check_id(request.get("task_id"), "task_id")
        timeout = request.get("timeout", 0)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0:
            raise InvalidRequest(f"wait timeout must be a number of seconds >= 0, got {timeout!r}")
        if timeout == 0:
            return {"task": self.store.get_task(task_id)}
        # Parked before the task is read: a finish committed after the read then finds the waiter.
        waiter = _Waiter(envelope, request.get("id"))
        self._park(task_id, waiter, timeout)
        self.store.on_rollback(functools.partial(self._unpark, task_id, waiter))
        try:
            task = self.store.get_task(task_id)
        except MartinetError:
            self._unpark(task_id, waiter)
            raise
        if waiter.answered:  # the finish came meanwhile and answered it
            return None
        if task["status"] in protocol.FINAL_STATUSES:
            self._unpark(task_id, waiter)
            return {"task": task}
        self.hurry()  # its final event may have come before this wait, and be held in the sink
        return None

    def _park(self, task_id: int, waiter: _Waiter, timeout: float) -> None:
        """Hold a ``wait`` until its task is final or ``timeout`` passes."""
        waiter.timer = gevent.spawn_later(min(timeout, WAIT_MAX), self._expire_wait, task_id, waiter)
        self._waiters.setdefault(task_id, []).append(waiter)

    def _unpark(self, task_id: int, waiter: _Waiter) -> None:
        """Forget a parked ``wait`` that is answered otherwise (or whose turn did not commit)."""
        waiters = self._waiters.get(task_id, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiters.pop(task_id, None)
        waiter.timer.kill(block=False)

    def _expire_wait(self, task_id: int, waiter: _Waiter) -> None:
        """The parked ``wait`` timed out: answer it with the task as it is now."""
        waiters = self._waiters.get(task_id, [])
        if waiter in waiters:
            waiters.remove(waiter)
            waiter.answered = True
            self._send(protocol.reply(waiter.envelope, waiter.request_id, {"task": self.store.get_task(task_id)}))
        if not waiters:
            self._waiters.pop(task_id, None)

    def _list(self, request: dict, envelope: list[bytes]) -> dict:
        limit = _limit(request, "list", config.LIST_LIMIT, self.list_limit_max)
        before = request.get("before")
        if before is not None:
            protocol.check_id(before, "before")
        tasks = self.store.list_tasks(limit=limit, before=before, **_task_filters(request))
        return {"tasks": tasks, "next_before": tasks[-1]["id"] if len(tasks) == limit else None}

    def _submission(self, request: dict, *, recurring: bool) -> tuple[dict, dict, dict]:
        """The checked metadata, args and options of a submission; the server's defaults fill in options."""
        meta = protocol.check_task_meta(request.get("task"), recurring=recurring)
        args = protocol.check_args(request.get("args"))
        return meta, args, self._options(request)

    def _options(self, request: dict) -> dict:
        """The request's task options, the server's defaults filling in those not given."""
        return {**self.defaults, **protocol.check_options(request.get("options"))}

    def _workers(self, request: dict, envelope: list[bytes]) -> dict:
        """This server's workers as they are now, then the other live servers' as they last recorded them
        (a worker that just moved here may still be in its old server's record: this one's wins)."""
        here = self.broker.snapshot()
        ids = {worker["id"] for worker in here}
        return {"workers": here + [w for w in self.store.workers(time.time()) if w["id"] not in ids]}

    def _cancel(self, request: dict, envelope: list[bytes]) -> dict:
        task = self.store.cancel(protocol.check_id(request.get("task_id"), "task_id"), time.time())
        self._stop([task])
        return {"task": task}

    def _stop(self, cancelled: list[dict]) -> None:
        """Once the cancel of ``cancelled`` (each with its ``id``, ``worker`` and ``attempts``) commits, tell
        the workers of those that were running to stop them, and answer the ``wait`` requests parked on them."""
        running: dict[str, list[tuple[int, int]]] = {}
        for task in cancelled:
            if task["worker"] is not None:
                running.setdefault(task["worker"], []).append((task["id"], task["attempts"]))
        for worker, refs in running.items():
            self.store.after_commit(functools.partial(self.broker.cancel, worker, refs))
        self.store.after_commit(functools.partial(self.notify_finished, [task["id"] for task in cancelled]))

    def _retry(self, request: dict, envelope: list[bytes]) -> dict:
        return {"task": self.store.retry(protocol.check_id(request.get("task_id"), "task_id"), time.time())}

    def _bulk(self, request: dict, envelope: list[bytes]) -> dict:
        """``cancel`` or ``retry`` each task the filters select (newest first, at most ``limit``) as the single
        requests do, in this one transaction; a task that cannot move is listed in ``failed``."""
        action = request.get("action")
        if not isinstance(action, str) or action not in _BULK_ACTIONS:
            raise InvalidRequest(f"bulk action must be one of {', '.join(sorted(_BULK_ACTIONS))}, got {action!r:.80}")
        limit = _limit(request, "bulk", config.BULK_LIMIT, config.BULK_LIMIT_MAX)
        task_ids = self.store.task_ids(limit=limit, **_task_filters(request))
        if action == "cancel":
            cancelled, refused = self.store.cancel_many(task_ids, time.time())
            self._stop(cancelled)
            done = [task["id"] for task in cancelled]
        else:
            done, refused = self.store.retry_many(task_ids, time.time())
        failed = [{"id": task_id, "error": refused[task_id].to_wire()} for task_id in task_ids if task_id in refused]
        return {"done": done, "failed": failed}

    def _purge(self, request: dict, envelope: list[bytes]) -> dict:
        """Delete up to ``limit`` finished tasks of ``status`` that finished ``older_than`` seconds ago or more."""
        status = request.get("status")
        if not isinstance(status, str) or status not in protocol.FINAL_STATUSES:
            raise InvalidRequest(
                f"purge takes a final status ({', '.join(sorted(protocol.FINAL_STATUSES))}), got {status!r:.80}"
            )
        older_than = request.get("older_than")
        if not isinstance(older_than, (int, float)) or isinstance(older_than, bool) or not 0 <= older_than < 1e12:
            raise InvalidRequest(f"purge older_than must be a number of seconds >= 0, got {older_than!r:.80}")
        limit = _limit(request, "purge", config.PURGE_BATCH, config.PURGE_BATCH_MAX)
        return {"deleted": self.store.purge([status], finished_before=time.time() - older_than, limit=limit)}

    def _pause(self, request: dict, envelope: list[bytes]) -> dict:
        """Dispatch no more tasks of ``name`` until it is resumed: its queued tasks wait, its running ones finish."""
        name = protocol.check_name(request)
        changed = self.store.pause(name, time.time())
        return {"name": name, "paused": True, "changed": changed, "names": self.store.paused()}

    def _resume(self, request: dict, envelope: list[bytes]) -> dict:
        """Dispatch tasks of ``name`` again (the turn then hands its queued tasks to free slots)."""
        name = protocol.check_name(request)
        changed = self.store.resume(name)
        return {"name": name, "paused": False, "changed": changed, "names": self.store.paused()}

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("reply dropped, client gone: %s", exc)


def _limit(request: dict, op: str, default: int, maximum: int) -> int:
    """The request's ``limit``: an integer from 1 to ``maximum``, ``default`` if not given."""
    limit = request.get("limit", default)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= maximum:
        raise InvalidRequest(f"{op} limit must be an integer from 1 to {maximum}, got {limit!r:.80}")
    return limit


def _task_filters(request: dict) -> dict:
    """The task filters of a ``list`` or ``bulk`` request, checked: status, name, username, search."""
    status = request.get("status")
    if status is not None and (not isinstance(status, str) or status not in _STATUSES):
        raise InvalidRequest(f"unknown status {status!r:.80}: expected one of {', '.join(sorted(_STATUSES))}")
    filters = {key: protocol.check_string(request, key, required=False) for key in ("name", "username")}
    search = protocol.check_string(request, "search", required=False, max_chars=config.MAX_NAME_CHARS)
    return {"status": status, **filters, "search": search}


def _key(request: dict) -> str | None:
    """The request's ``request_key`` (checked by protocol.check_client_request): a repeat creates nothing twice."""
    return request.get("request_key")


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)

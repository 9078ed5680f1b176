"""The Python client: submit, inspect and cancel tasks over the client port.

The client never opens the database; every call is one request to the server's
client endpoint. It uses plain pyzmq, or ``zmq.green`` when the calling process has
been monkey-patched by gevent, so it never blocks a gevent hub.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import calls, config, protocol, security, servers
from .errors import ConfigError, InvalidRequest, ProtocolError, ServerUnavailable, from_wire
from .security import PeerKeys

log = logging.getLogger(__name__)

#: Longest single poll of the socket, seconds: ZeroMQ takes whole milliseconds in a C long, so
#: a longer timeout is waited out in steps of this.
_POLL_STEP = 60.0


def _zmq_module() -> Any:
    """zmq.green under a gevent-patched process, plain zmq otherwise."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        from zmq import green

        return green
    return zmq


class Martinet:
    """A connection to a Martinet server, or to one of several sharing a database. Safe to reuse and to
    share between threads.

    With several servers the client talks to one at a time, starting with the first. When it gives
    no reply within ``timeout``, or its connection drops, the same request (same id and
    ``request_key``) goes to the next one, wrapping around, each server at most once per call; the
    client then stays on the one that answered. Every request that changes something carries a
    ``request_key`` unique to the call, so a server that already ran it answers with the first reply.

    Args:
        martinet_url: host name or address of the server (``tcp://`` prefix optional), or several:
            ``"h1,h2"`` or ``["h1", "h2"]``, all listening on the same ports.
        client_port: the server's client port.
        timeout: seconds to wait for each reply (from each server tried) before raising ServerUnavailable.
        max_request_bytes: largest request sent, encoded; a larger one raises RequestTooLarge
            without being sent. Keep it equal to the server's ``--max-message-bytes``.
        secret_key, server_key: this client's ``NAME.key_secret`` and the server's public ``.key``,
            for a server with keys (CURVE); both or neither. A refused key, or keys on one side
            only, raise AuthenticationFailed at the first request.

    Raises:
        ConfigError: ``martinet_url`` is not a list of servers (servers.parse), ``timeout`` is not a finite
            number >= 0, ``max_request_bytes`` not an integer >= 1, or a key file is missing or unusable.
    """

    def __init__(
        self,
        martinet_url: str | Sequence[str] = config.HOST,
        client_port: int = config.CLIENT_PORT,
        *,
        timeout: float = config.CLIENT_TIMEOUT,
        max_request_bytes: int = config.MAX_MESSAGE_BYTES,
        secret_key: str | None = None,
        server_key: str | None = None,
    ) -> None:
        self._keys = PeerKeys.load(secret_key, server_key)
        #: The client endpoint of every server, in the order given, and the one in use.
        self.endpoints = tuple(f"tcp://{host}:{int(client_port)}" for host in servers.parse(martinet_url))
        self._current = 0
        self.endpoint = self.endpoints[0]
        self.timeout = calls.seconds(timeout, "the client timeout", ConfigError)
        self.max_request_bytes = calls.max_request_bytes(max_request_bytes, ConfigError)
        self._zmq = _zmq_module()
        self._context = self._zmq.Context.instance()
        self._socket: Any = None
        # The socket's handshake monitor, and a poller for both.
        self._monitor: Any = None
        self._poller: Any = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._ids = calls.RequestIds()

    # ------------------------------------------------------------ submitting

    def execute(
        self,
        task: dict,
        args: dict | None = None,
        *,
        retries: int | None = None,
        retry_delay: float | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        limit_key: str | None = None,
        key: str | None = None,
        after: Iterable[int] | None = None,
    ) -> int:
        """Queue a task to run now; returns its id once the server has committed it.

        Options left None take the server's defaults:

        - ``retries``: how many times a failing handler is run again (0: none);
        - ``retry_delay``: seconds before the first retry, doubling for each further one;
        - ``timeout``: seconds the handler may run before its worker stops it and it fails;
        - ``priority``: higher runs first among queued tasks (default 0);
        - ``limit_key``: the key the server's ``--limit`` and ``--rate`` count the task under, instead of its
          name (default): tasks of several names given one key share its limits.

        ``key`` (at most 255 characters; or ``task["key"]``) makes the task unique among those not yet
        final: while a task with that key is waiting, scheduled, queued or running, another execute or
        schedule with it returns that task's id instead of adding one.

        ``after`` (at most 100 task ids) makes it wait, ``waiting``, until each of those tasks has
        succeeded; if one fails for good or is cancelled, this one is cancelled with an error naming it
        (``dependency 12 failed``). The handler reads their results with
        ``martinet_app.dependency_results()``.

        Raises:
            InvalidRequest: ``args`` is not a dict or nests more than config.MAX_JSON_DEPTH levels,
                ``key`` differs from ``task["key"]``, or ``after`` is not a list of task ids.
            InvalidDependency: a task of ``after`` does not exist.
            RequestTooLarge: the request is larger than ``max_request_bytes``; nothing was sent.
        """
        fields = calls.submission(
            task,
            args,
            key,
            after,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            priority=priority,
            limit_key=limit_key,
        )
        return self._request("execute", **fields)["task_id"]

    def execute_many(
        self,
        tasks: Iterable[tuple[dict, dict | None]],
        *,
        retries: int | None = None,
        retry_delay: float | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        limit_key: str | None = None,
    ) -> list[int]:
        """Queue many tasks to run now in one request and one commit; returns their ids, in order.

        ``tasks`` holds ``(metadata, args)`` pairs as :meth:`execute` takes them, each metadata
        dict with its own ``key`` if it needs one; the options (as for :meth:`execute`) apply to
        every one. Nothing is stored if any entry is invalid.
        """
        fields = calls.submissions(
            tasks, retries=retries, retry_delay=retry_delay, timeout=timeout, priority=priority, limit_key=limit_key
        )
        return self._request("execute_many", **fields)["task_ids"]

    def chain(
        self,
        tasks: Iterable[tuple[dict, dict | None]],
        *,
        after: Iterable[int] | None = None,
        retries: int | None = None,
        retry_delay: float | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        limit_key: str | None = None,
    ) -> list[int]:
        """Queue ``(metadata, args)`` steps that each wait for the one before to succeed, in one request and one
        commit; returns their ids, in order. The first step waits for ``after``, if given. A step that fails
        for good (or is cancelled) cancels the steps after it. Options are as for :meth:`execute_many`.
        """
        fields = calls.submissions(
            tasks,
            config.CHAIN_MAX,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            priority=priority,
            limit_key=limit_key,
        )
        return self._request("chain", after=calls.dependencies(after), **fields)["task_ids"]

    def schedule(
        self,
        when: str,
        task: dict,
        args: dict | None = None,
        *,
        retries: int | None = None,
        retry_delay: float | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        limit_key: str | None = None,
        key: str | None = None,
        tz: str | None = None,
        after: Iterable[int] | None = None,
    ) -> int:
        """Run a task once at ``when`` (``'in 20 minutes'``, ``'17:30'``, ISO 8601...); returns its id.

        The options, ``key`` and ``after`` are as for :meth:`execute`: with ``after``, it runs at
        ``when`` or once its dependencies have succeeded, whichever is later. ``tz`` (an IANA name such as
        ``'Europe/Paris'``) is the zone of wall times in ``when``; without it, the server's (``serve --tz``).

        Raises:
            BadTimeSpec: ``when`` or ``tz`` cannot be read (the message quotes it).
        """
        fields = calls.submission(
            task,
            args,
            key,
            after,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            priority=priority,
            limit_key=limit_key,
        )
        return self._request("schedule", when=when, tz=tz, **fields)["task_id"]

    def every(
        self,
        interval: str,
        task: dict,
        args: dict | None = None,
        *,
        retries: int | None = None,
        retry_delay: float | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        tz: str | None = None,
        limit_key: str | None = None,
    ) -> int:
        """Run a task every ``interval``; returns the schedule's id.

        ``interval`` is an interval (``'30 minutes'``, ``'daily'``, ``'monday'``...), anchored at the first run,
        or a five-field cron expression (``'*/15 * * * *'``, ``'0 9 * * mon-fri'``, ``'@hourly'``, ``'@daily'``,
        ``'@weekly'``). ``task["run_at"]`` sets the first run (and, for day/week intervals, the time of day; for
        a cron expression, its first slot at or after it). ``tz`` (an IANA name such as ``'Europe/Paris'``) is
        the zone of the schedule's wall times, stored with it; without it, the server's (``serve --tz``).
        The options are as for :meth:`execute`; every run gets them.

        Raises:
            BadTimeSpec: ``interval``, ``run_at`` or ``tz`` cannot be read (the message quotes it).
        """
        fields = calls.submission(
            task,
            args,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            priority=priority,
            limit_key=limit_key,
        )
        return self._request("every", interval=interval, tz=tz, **fields)["recurring_id"]

    # ------------------------------------------------------------ inspecting

    def status(self, task_id: int) -> dict:
        """The task's current record (see docs/PROTOCOL.md for the fields)."""
        return self._request("status", task_id=task_id)["task"]

    def wait(self, task_id: int, timeout: float = 30.0) -> dict:
        """Block until the task is succeeded, failed or cancelled; return its record.

        Raises:
            WaitTimeout: the task did not finish within ``timeout`` seconds.
            InvalidRequest: ``timeout`` is not a finite number >= 0.
        """
        timeout = calls.seconds(timeout, "the wait timeout", InvalidRequest)
        deadline = time.monotonic() + timeout
        while True:
            task = self._request("wait", _deadline=deadline, task_id=task_id)["task"]
            unfinished = calls.unfinished(task_id, timeout, task)
            if unfinished is None:
                return task
            if time.monotonic() >= deadline:
                raise unfinished

    def list(
        self,
        status: str | None = None,
        name: str | None = None,
        username: str | None = None,
        limit: int = config.LIST_LIMIT,
        before: int | None = None,
        search: str | None = None,
    ) -> list[dict]:
        """Summaries of up to ``limit`` tasks, newest first, optionally filtered by status, name and username,
        and by ``search``: a substring of the description, in any case.

        ``before`` keeps tasks with a smaller id: the next page. A summary is a task's record
        without ``args``, ``result``, ``traceback`` and ``errors`` (``error`` may be shortened);
        :meth:`status` gives the whole record.
        """
        return self.list_page(status, name, username, limit, before, search)[0]

    def list_page(
        self,
        status: str | None = None,
        name: str | None = None,
        username: str | None = None,
        limit: int = config.LIST_LIMIT,
        before: int | None = None,
        search: str | None = None,
    ) -> tuple[list[dict], int | None]:
        """One page of :meth:`list` and the ``before`` of the next page, None on the last page."""
        reply = self._request(
            "list", status=status, name=name, username=username, search=search, limit=limit, before=before
        )
        return reply["tasks"], reply.get("next_before")

    def iter_tasks(
        self,
        status: str | None = None,
        name: str | None = None,
        username: str | None = None,
        page: int = calls.PAGE_SIZE,
        search: str | None = None,
    ) -> Iterator[dict]:
        """Summaries of every matching task, newest first, fetched ``page`` at a time (see :meth:`list`).

        Each page asks for tasks older than the last one seen, so tasks added meanwhile are not
        listed and none is listed twice.
        """
        before = None
        while True:
            tasks, before = self.list_page(status, name, username, page, before, search)
            yield from tasks
            if before is None:
                return

    def workers(self) -> list[dict]:
        """Workers connected now: id, host, pid, handlers, slots, busy, last_seen."""
        return self._request("workers")["workers"]

    def recurring(self) -> list[dict]:
        """Recurring schedules, with their next_run_at and zone (``tz``: null for the server's)."""
        return self._request("recurring")["recurring"]

    def stats(self) -> dict:
        """Task counts from the server's running tallies (no scan), as docs/PROTOCOL.md describes: ``counts`` by
        status, per minute (``minutes``) and per name (``names``) the tasks that ended in the last hour, the
        ``queue_lag`` (seconds the oldest queued task has waited, or None) and the server's time ``at``."""
        return calls.result(self._request("stats"))

    def ping(self) -> dict:
        """The server's version and protocol version; raises ServerUnavailable if none answers."""
        return calls.result(self._request("ping"))

    # ------------------------------------------------------------ stopping

    def cancel(self, task_id: int) -> dict:
        """Cancel a waiting, scheduled, queued or running task (its worker is told to stop it; its waiting dependants
        are cancelled too); returns its record."""
        return self._request("cancel", task_id=task_id)["task"]

    def retry(self, task_id: int) -> dict:
        """Queue a failed or cancelled task to run again now; returns its record (``errors`` keeps its history)."""
        return self._request("retry", task_id=task_id)["task"]

    def bulk(
        self,
        action: str,
        *,
        status: str | None = None,
        name: str | None = None,
        username: str | None = None,
        search: str | None = None,
        limit: int = config.BULK_LIMIT,
    ) -> dict:
        """``action`` (``"cancel"`` or ``"retry"``) on every task the filters select (as :meth:`list`'s, newest
        first, at most ``limit``), in one transaction on the server; running tasks' workers are told to stop them.

        Returns ``{"done": [ids], "failed": [{"id", "error": {"type", "message"}}]}``: a task that cannot
        move (retry of a succeeded one) is in ``failed`` and costs the others nothing.
        """
        reply = self._request(
            "bulk", action=action, status=status, name=name, username=username, search=search, limit=limit
        )
        return {"done": reply["done"], "failed": reply["failed"]}

    def revoke(self, recurring_id: int) -> dict:
        """Stop a recurring schedule; tasks it already created stay in history."""
        return self._request("revoke", recurring_id=recurring_id)["recurring"]

    def pause(self, name: str) -> dict:
        """Dispatch no more tasks named ``name``, on every server of the database, until :meth:`resume`: queued
        ones stay queued (also the runs its schedules fire meanwhile), running ones finish. The pause is stored,
        so it outlasts a restart. Returns ``{"name", "paused": True, "changed", "names"}``: ``changed`` is False
        if it was paused already, ``names`` every name paused now."""
        return calls.result(self._request("pause", name=name))

    def resume(self, name: str) -> dict:
        """Dispatch tasks named ``name`` again; returns ``{"name", "paused": False, "changed", "names"}``
        (``changed``: whether it was paused)."""
        return calls.result(self._request("resume", name=name))

    def purge(self, status: str, older_than: float | str, *, batch: int = config.PURGE_BATCH) -> int:
        """Delete the tasks in final ``status`` (succeeded, failed or cancelled) that finished at least
        ``older_than`` ago (seconds, or an age such as ``"1d"``); returns how many.

        The server deletes ``batch`` per request, each in its own short transaction, so that the work
        going on meanwhile is never held up for long.
        """
        seconds = calls.purge_age(older_than)
        deleted = 0
        while True:
            done = self._request("purge", status=status, older_than=seconds, limit=batch)["deleted"]
            deleted += done
            if done < batch:
                return deleted

    def close(self) -> None:
        """Close the socket; the next call opens a new one."""
        with self._lock:
            self._drop_socket()

    def __del__(self) -> None:
        # A client dropped without close() must not leave its sockets (three, with the handshake monitor)
        # in the process's shared context, which holds at most 1023. Not in a forked child: not its sockets.
        if getattr(self, "_socket", None) is not None and self._pid == os.getpid():
            self._drop_socket()

    def __enter__(self) -> Martinet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _request(self, op: str, _deadline: float | None = None, **params: Any) -> dict:
        """Send one request and return its reply, or raise the error the reply carries.

        ``_deadline`` (``wait``): the request's ``timeout`` is the time left until then, also when
        it is asked again on another server, and the reply is waited for that much longer.
        """
        if self._pid != os.getpid():
            self._after_fork()
        request_id, params = self._ids.next(op, params)
        timeout = self.timeout
        if _deadline is not None:
            params["timeout"] = left = max(_deadline - time.monotonic(), 0.0)
            timeout += left
        frames = self._encode(request_id, op, params)
        with self._lock:
            reply = self._exchange(frames, request_id, timeout, op, params, _deadline)
        if not reply.get("ok"):
            raise from_wire(reply.get("error") or {})
        return reply

    def _encode(self, request_id: str, op: str, params: dict) -> list[bytes]:
        """The request's frames (calls.encode, within ``max_request_bytes``)."""
        return calls.encode(request_id, op, params, self.max_request_bytes)

    def _exchange(
        self, frames: list[bytes], request_id: str, timeout: float, op: str, params: dict, deadline: float | None
    ) -> dict:
        """The reply from the server in use; the next server is asked whenever one gives no reply within
        ``timeout`` or drops the connection, until each was asked once (then ServerUnavailable)."""
        failed: tuple[str, ...] = ()
        while True:
            socket = self._socket if self._socket is not None else self._open_socket()
            socket.send_multipart(frames)
            until = time.monotonic() + timeout
            while True:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    why = f"gave no reply within {timeout:g} s"
                    break
                ready = dict(self._poller.poll(min(remaining, _POLL_STEP) * 1000))
                if socket in ready:
                    try:
                        reply_limit = calls.reply_limit(self.max_request_bytes)
                        reply = protocol.parse_reply(socket.recv_multipart(), reply_limit)
                    except ProtocolError as exc:
                        self._drop_socket()
                        raise ProtocolError(
                            f"unreadable reply from {self.endpoint}: {exc.message}; for a large list, ask for "
                            "fewer tasks (limit) or one at a time (status)"
                        ) from None
                    # Null: the server could not read this request's id. Replies to earlier requests cannot
                    # be waiting here: the socket is dropped whenever one is not read.
                    if reply.get("id") in (request_id, None):
                        return reply
                elif self._monitor in ready and self._dropped():
                    why = "dropped the connection"
                    break
            failed = self._fail_over(failed, why, timeout)
            if deadline is not None:  # a wait: asked again for the time left
                params["timeout"] = left = max(deadline - time.monotonic(), 0.0)
                frames, timeout = self._encode(request_id, op, params), left + self.timeout

    def _fail_over(self, failed: tuple[str, ...], why: str, timeout: float) -> tuple[str, ...]:
        """Leave the server in use, which failed (``why``), for the next; ServerUnavailable once each has failed.

        Returns the servers that failed so far, each with why.
        """
        # A late reply must not be read as the answer to the next request.
        self._drop_socket()
        if len(self.endpoints) == 1:
            raise calls.no_reply(self.endpoint, timeout)
        failed = (*failed, f"{self.endpoint} {why}")
        left = self.endpoint
        self._current = (self._current + 1) % len(self.endpoints)
        self.endpoint = self.endpoints[self._current]
        if len(failed) == len(self.endpoints):
            raise ServerUnavailable(
                f"no Martinet server answered: {'; '.join(failed)}. Is `martinet serve` running on one of "
                "them, on that port?"
            )
        log.warning("the Martinet server at %s %s: asking %s", left, why, self.endpoint)
        return failed

    def _after_fork(self) -> None:
        """In a forked child: a context, socket and request ids of its own (the parent's are not its to use)."""
        self._socket = self._monitor = self._poller = None
        self._context = self._zmq.Context()
        self._pid = os.getpid()
        self._ids = calls.RequestIds()

    def _open_socket(self) -> Any:
        """A socket to the server in use, and a poller for it and its monitor."""
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            self._keys.apply(socket)
        self._monitor = security.monitor(socket)
        self._poller = self._zmq.Poller()
        self._poller.register(socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        socket.connect(self.endpoint)
        self._socket = socket
        return socket

    def _dropped(self) -> bool:
        """Read the monitor's events; whether the connection is down (dropped, not made again) and another
        server can be asked. AuthenticationFailed (and a new socket next time) if a handshake failed."""
        down = False
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return down and len(self.endpoints) > 1
            kind = event["event"]
            if kind == zmq.EVENT_DISCONNECTED:
                down = True
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                down = False
            else:
                failure = security.handshake_failure(event, self.endpoint, keyed=self._keys is not None)
                if failure is not None:
                    self._drop_socket()
                    raise failure

    def _drop_socket(self) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._socket = self._monitor = self._poller = None

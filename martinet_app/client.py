"""The Python client: submit, inspect and cancel tasks over the client port.

The client never opens the database; every call is one request to the server's
client endpoint. It uses plain pyzmq, or ``zmq.green`` when the calling process has
been monkey-patched by gevent, so it never blocks a gevent hub.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import config, protocol, security
from .errors import (
    ConfigError,
    InvalidRequest,
    MartinetError,
    ProtocolError,
    RequestTooLarge,
    ServerUnavailable,
    WaitTimeout,
    from_wire,
)
from .security import PeerKeys

#: Longest single poll of the socket, seconds: ZeroMQ takes whole milliseconds in a C long, so
#: a longer timeout is waited out in steps of this.
_POLL_STEP = 60.0
#: Tasks asked for in each ``list`` request of :meth:`Martinet.iter_tasks`: few round trips, and
#: replies of summaries well under the message limit.
_PAGE_SIZE = 1_000


def _seconds(value: Any, what: str, error: type[MartinetError]) -> float:
    """``value`` as a float if it is a finite number of seconds >= 0, else ``error`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise error(f"{what} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _options(**given: Any) -> dict | None:
    """A request's ``options``: those not None, or None (the field left out) if none is given."""
    return {key: value for key, value in given.items() if value is not None} or None


def _zmq_module() -> Any:
    """zmq.green under a gevent-patched process, plain zmq otherwise."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        from zmq import green

        return green
    return zmq


class Martinet:
    """A connection to one Martinet server. Safe to reuse and to share between threads.

    Args:
        martinet_url: host name or address of the server (``tcp://`` prefix optional).
        client_port: the server's client port.
        timeout: seconds to wait for each reply before raising ServerUnavailable.
        max_request_bytes: largest request sent, encoded; a larger one raises RequestTooLarge
            without being sent. Keep it equal to the server's ``--max-message-bytes``.
        secret_key, server_key: this client's ``NAME.key_secret`` and the server's public ``.key``,
            for a server with keys (CURVE); both or neither. A refused key, or keys on one side
            only, raise AuthenticationFailed at the first request.

    Raises:
        ConfigError: ``timeout`` is not a finite number >= 0, ``max_request_bytes`` not an integer >= 1,
            or a key file is missing or unusable.
    """

    def __init__(
        self,
        martinet_url: str = config.HOST,
        client_port: int = config.CLIENT_PORT,
        *,
        timeout: float = config.CLIENT_TIMEOUT,
        max_request_bytes: int = config.MAX_MESSAGE_BYTES,
        secret_key: str | None = None,
        server_key: str | None = None,
    ) -> None:
        host = martinet_url.removeprefix("tcp://").rstrip("/")
        self._keys = PeerKeys.load(secret_key, server_key)
        self.endpoint = f"tcp://{host}:{int(client_port)}"
        self.timeout = _seconds(timeout, "the client timeout", ConfigError)
        if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) or max_request_bytes < 1:
            raise ConfigError(f"max_request_bytes must be an integer >= 1, got {max_request_bytes!r}")
        self.max_request_bytes = max_request_bytes
        self._zmq = _zmq_module()
        self._context = self._zmq.Context.instance()
        self._socket: Any = None
        # The socket's handshake monitor, and a poller for both.
        self._monitor: Any = None
        self._poller: Any = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._prefix = uuid.uuid4().hex[:12]
        self._counter = itertools.count(1)

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
    ) -> int:
        """Queue a task to run now; returns its id once the server has committed it.

        Options left None take the server's defaults:

        - ``retries``: how many times a failing handler is run again (0: none);
        - ``retry_delay``: seconds before the first retry, doubling for each further one;
        - ``timeout``: seconds the handler may run before its worker stops it and it fails;
        - ``priority``: higher runs first among queued tasks (default 0).

        Raises:
            InvalidRequest: ``args`` is not a dict or nests more than config.MAX_JSON_DEPTH levels.
            RequestTooLarge: the request is larger than ``max_request_bytes``; nothing was sent.
        """
        args = protocol.check_args(args)
        options = _options(retries=retries, retry_delay=retry_delay, timeout=timeout, priority=priority)
        return self._request("execute", task=task, args=args, options=options)["task_id"]

    def execute_many(
        self,
        tasks: Iterable[tuple[dict, dict | None]],
        *,
        retries: int | None = None,
        retry_delay: float | None = None,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> list[int]:
        """Queue many tasks to run now in one request and one commit; returns their ids, in order.

        ``tasks`` holds ``(metadata, args)`` pairs as :meth:`execute` takes them; the options
        (as for :meth:`execute`) apply to every one. Nothing is stored if any entry is invalid.
        """
        entries = [{"task": task, "args": args} for task, args in tasks]
        protocol.check_many(entries, config.SUBMIT_MANY_MAX)
        options = _options(retries=retries, retry_delay=retry_delay, timeout=timeout, priority=priority)
        return self._request("execute_many", tasks=entries, options=options)["task_ids"]

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
    ) -> int:
        """Run a task once at ``when`` (``'in 20 minutes'``, ``'17:30'``, ISO 8601...); returns its id.

        The options are as for :meth:`execute`.
        """
        args = protocol.check_args(args)
        options = _options(retries=retries, retry_delay=retry_delay, timeout=timeout, priority=priority)
        return self._request("schedule", when=when, task=task, args=args, options=options)["task_id"]

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
    ) -> int:
        """Run a task every ``interval`` (``'30 minutes'``, ``'monday'``...); returns the schedule's id.

        ``task["run_at"]`` sets the first run (and, for day/week intervals, the time of day).
        The options are as for :meth:`execute`; every run gets them.
        """
        args = protocol.check_args(args)
        options = _options(retries=retries, retry_delay=retry_delay, timeout=timeout, priority=priority)
        return self._request("every", interval=interval, task=task, args=args, options=options)["recurring_id"]

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
        timeout = _seconds(timeout, "the wait timeout", InvalidRequest)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            reply = self._request(
                "wait", task_id=task_id, timeout=max(remaining, 0.0), _timeout=max(remaining, 0.0) + self.timeout
            )
            task = reply["task"]
            if task["status"] in protocol.FINAL_STATUSES:
                return task
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"task {task_id} did not finish within {timeout:g} s (status {task['status']!r}); "
                    "wait longer or check that a worker is running"
                )

    def list(
        self,
        status: str | None = None,
        name: str | None = None,
        username: str | None = None,
        limit: int = config.LIST_LIMIT,
        before: int | None = None,
    ) -> list[dict]:
        """Summaries of up to ``limit`` tasks, newest first, optionally filtered by status, name and username.

        ``before`` keeps tasks with a smaller id: the next page. A summary is a task's record
        without ``args``, ``result``, ``traceback`` and ``errors`` (``error`` may be shortened);
        :meth:`status` gives the whole record.
        """
        return self.list_page(status, name, username, limit, before)[0]

    def list_page(
        self,
        status: str | None = None,
        name: str | None = None,
        username: str | None = None,
        limit: int = config.LIST_LIMIT,
        before: int | None = None,
    ) -> tuple[list[dict], int | None]:
        """One page of :meth:`list` and the ``before`` of the next page, None on the last page."""
        reply = self._request("list", status=status, name=name, username=username, limit=limit, before=before)
        return reply["tasks"], reply.get("next_before")

    def iter_tasks(
        self,
        status: str | None = None,
        name: str | None = None,
        username: str | None = None,
        page: int = _PAGE_SIZE,
    ) -> Iterator[dict]:
        """Summaries of every matching task, newest first, fetched ``page`` at a time (see :meth:`list`).

        Each page asks for tasks older than the last one seen, so tasks added meanwhile are not
        listed and none is listed twice.
        """
        before = None
        while True:
            tasks, before = self.list_page(status, name, username, page, before)
            yield from tasks
            if before is None:
                return

    def workers(self) -> list[dict]:
        """Workers connected now: id, host, pid, handlers, slots, busy, last_seen."""
        return self._request("workers")["workers"]

    def recurring(self) -> list[dict]:
        """Recurring schedules, with their next_run_at."""
        return self._request("recurring")["recurring"]

    def ping(self) -> dict:
        """The server's version and protocol version; raises ServerUnavailable if none answers."""
        reply = self._request("ping")
        return {key: value for key, value in reply.items() if key not in ("v", "id", "ok")}

    # ------------------------------------------------------------ stopping

    def cancel(self, task_id: int) -> dict:
        """Cancel a scheduled, queued or running task (its worker is told to stop it); returns its record."""
        return self._request("cancel", task_id=task_id)["task"]

    def retry(self, task_id: int) -> dict:
        """Queue a failed or cancelled task to run again now; returns its record (``errors`` keeps its history)."""
        return self._request("retry", task_id=task_id)["task"]

    def revoke(self, recurring_id: int) -> dict:
        """Stop a recurring schedule; tasks it already created stay in history."""
        return self._request("revoke", recurring_id=recurring_id)["recurring"]

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

    def _request(self, op: str, _timeout: float | None = None, **params: Any) -> dict:
        params = {k: v for k, v in params.items() if v is not None}
        request_id = f"{self._prefix}-{next(self._counter)}"
        frames = self._encode(request_id, op, params)
        timeout = self.timeout if _timeout is None else _timeout
        with self._lock:
            reply = self._exchange(frames, request_id, timeout)
        if not reply.get("ok"):
            raise from_wire(reply.get("error") or {})
        return reply

    def _encode(self, request_id: str, op: str, params: dict) -> list[bytes]:
        """The request's frames; InvalidRequest if it cannot be encoded, RequestTooLarge if it is too big to send."""
        try:
            frames = protocol.client_request(request_id, op, params)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"{op}: arguments are not JSON-serialisable ({exc})") from None
        except RecursionError:
            raise InvalidRequest(
                f"{op}: arguments nest too deeply to encode: flatten them (at most {config.MAX_JSON_DEPTH} levels)"
            ) from None
        size = len(frames[-1])
        if size > self.max_request_bytes:
            raise RequestTooLarge(
                f"{op}: the request is {size} bytes, more than the {self.max_request_bytes} bytes this client sends "
                "(max_request_bytes; the CLI's --max-message-bytes): keep large data elsewhere (a file, a "
                "database) and pass a reference to it, or raise the server's --max-message-bytes and this "
                "limit together"
            )
        return frames

    def _exchange(self, frames: list[bytes], request_id: str, timeout: float) -> dict:
        socket = self._ensure_socket()
        socket.send_multipart(frames)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # A late reply must not be read as the answer to the next request.
                self._drop_socket()
                raise ServerUnavailable(
                    f"no reply from the Martinet server at {self.endpoint} within {timeout:g} s: "
                    "is `martinet serve` running there, on that port?"
                )
            ready = dict(self._poller.poll(min(remaining, _POLL_STEP) * 1000))
            if self._monitor in ready:
                self._check_handshake()
            if socket not in ready:
                continue
            try:
                # A record holds what was submitted (up to max_request_bytes), a result, and texts.
                reply_limit = 2 * self.max_request_bytes + config.MAX_RESULT_BYTES
                reply = protocol.parse_reply(socket.recv_multipart(), reply_limit)
            except ProtocolError as exc:
                self._drop_socket()
                raise ProtocolError(
                    f"unreadable reply from {self.endpoint}: {exc.message}; for a large list, ask for fewer "
                    "tasks (limit) or one at a time (status)"
                ) from None
            # Null: the server could not read this request's id. Replies to earlier requests cannot be
            # waiting here: the socket is dropped whenever one is not read.
            if reply.get("id") in (request_id, None):
                return reply

    def _ensure_socket(self) -> Any:
        if self._pid != os.getpid():
            # Forked child: the parent's context and socket are not ours to use.
            self._socket = None
            self._context = self._zmq.Context()
            self._pid = os.getpid()
        if self._socket is None:
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
        return self._socket

    def _check_handshake(self) -> None:
        """Read the monitor's events; AuthenticationFailed (and a new socket next time) if a handshake failed."""
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
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

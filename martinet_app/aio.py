"""The asyncio client: the verbs of :class:`martinet_app.client.Martinet` as awaitables, for asyncio apps.

One ``zmq.asyncio`` DEALER socket carries every request of a client, many in flight at once: each
request has its own id, and one reader task hands each reply to the call waiting for that id.
A call given no reply within ``timeout`` raises ServerUnavailable on its own; the others carry on,
and a reply that comes later for it is dropped.

Scope, compared with the blocking client: one server only (the blocking client fails over between
several). A failed CURVE handshake (a refused key, keys on one side only) fails the calls in flight
with AuthenticationFailed, as the blocking client does. A client belongs to the event loop it was first
used in; in another loop, or after :meth:`Martinet.close`, it opens a new socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import calls, config, protocol, security, servers
from .errors import ConfigError, InvalidRequest, ProtocolError, from_wire
from .security import PeerKeys

log = logging.getLogger(__name__)


class Martinet:
    """An asyncio connection to one Martinet server; share one client between the tasks of an app.

    Every call may run concurrently with any other on the same client. Arguments, return values and
    typed errors (martinet_app.errors) are those of :class:`martinet_app.client.Martinet`, whose
    docstrings say what each verb does; requests that change something carry a ``request_key``.

    Args:
        martinet_url: host name or address of the server (``tcp://`` prefix optional).
        client_port: the server's client port.
        timeout: seconds to wait for each reply before that call raises ServerUnavailable.
        max_request_bytes: largest request sent, encoded; a larger one raises RequestTooLarge unsent.
        secret_key, server_key: this client's ``NAME.key_secret`` and the server's public ``.key``
            (CURVE), both or neither.

    Raises:
        ConfigError: ``martinet_url`` names several servers (use martinet_app.client.Martinet, which fails
            over between them), ``timeout`` or ``max_request_bytes`` is out of range, or a key file is unusable.
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
        hosts = servers.parse(martinet_url)
        if len(hosts) > 1:
            raise ConfigError(
                f"the asyncio client talks to one server, got {len(hosts)}: give one, or use the blocking "
                "martinet_app.client.Martinet, which fails over between several"
            )
        self._keys = PeerKeys.load(secret_key, server_key)
        self.endpoint = f"tcp://{hosts[0]}:{int(client_port)}"
        self.timeout = calls.seconds(timeout, "the client timeout", ConfigError)
        self.max_request_bytes = calls.max_request_bytes(max_request_bytes, ConfigError)
        self._ids = calls.RequestIds()
        self._socket: zmq.asyncio.Socket | None = None
        #: The socket's handshake monitor, and the tasks reading the two.
        self._monitor: zmq.asyncio.Socket | None = None
        self._readers: tuple[asyncio.Task, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The future of every request in flight, by id.
        self._pending: dict[str, asyncio.Future] = {}

    # ------------------------------------------------------------ submitting

    async def execute(
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
        """Queue a task to run now; returns its id once the server has committed it (see the blocking client)."""
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
        return (await self._request("execute", **fields))["task_id"]

    async def execute_many(
        self,
        tasks: Iterable[tuple[dict, dict | None]],
        *,
        retries: int | None = None,
        retry_delay: float | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        limit_key: str | None = None,
    ) -> list[int]:
        """Queue many ``(metadata, args)`` tasks in one request and one commit; returns their ids, in order."""
        fields = calls.submissions(
            tasks, retries=retries, retry_delay=retry_delay, timeout=timeout, priority=priority, limit_key=limit_key
        )
        return (await self._request("execute_many", **fields))["task_ids"]

    async def chain(
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
        """Queue ``(metadata, args)`` steps that each wait for the one before, in one request and one commit
        (see the blocking client); returns their ids, in order."""
        fields = calls.submissions(
            tasks,
            config.CHAIN_MAX,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            priority=priority,
            limit_key=limit_key,
        )
        return (await self._request("chain", after=calls.dependencies(after), **fields))["task_ids"]

    async def schedule(
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
        """Run a task once at ``when`` (``'in 20 minutes'``, ``'17:30'``, ISO 8601...) in the zone ``tz`` (or the
        server's); returns its id. As :meth:`martinet_app.client.Martinet.schedule`."""
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
        return (await self._request("schedule", when=when, tz=tz, **fields))["task_id"]

    async def every(
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
        """Run a task every ``interval`` (``'30 minutes'``, ``'monday'``, ``'0 9 * * mon-fri'``...) in the zone ``tz``
        (or the server's); returns the schedule's id. As :meth:`martinet_app.client.Martinet.every`."""
        fields = calls.submission(
            task,
            args,
            retries=retries,
            retry_delay=retry_delay,
            timeout=timeout,
            priority=priority,
            limit_key=limit_key,
        )
        return (await self._request("every", interval=interval, tz=tz, **fields))["recurring_id"]

    # ------------------------------------------------------------ inspecting

    async def status(self, task_id: int) -> dict:
        """The task's current record (see docs/PROTOCOL.md for the fields)."""
        return (await self._request("status", task_id=task_id))["task"]

    async def wait(self, task_id: int, timeout: float = 30.0) -> dict:
        """Until the task is succeeded, failed or cancelled; return its record. The server holds each ``wait``
        request (up to its own limit), so this asks again until the task is final or ``timeout`` is over.

        Raises:
            WaitTimeout: the task did not finish within ``timeout`` seconds.
            InvalidRequest: ``timeout`` is not a finite number >= 0.
        """
        timeout = calls.seconds(timeout, "the wait timeout", InvalidRequest)
        deadline = time.monotonic() + timeout
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            task = (await self._request("wait", _extra=left, task_id=task_id, timeout=left))["task"]
            unfinished = calls.unfinished(task_id, timeout, task)
            if unfinished is None:
                return task
            if time.monotonic() >= deadline:
                raise unfinished

    async def list(
        self,
        status: str | None = None,
        name: str | None = None,
        username: str | None = None,
        limit: int = config.LIST_LIMIT,
        before: int | None = None,
        search: str | None = None,
    ) -> list[dict]:
        """Summaries of up to ``limit`` tasks, newest first, filtered as the blocking client's ``list``."""
        return (await self.list_page(status, name, username, limit, before, search))[0]

    async def list_page(
        self,
        status: str | None = None,
        name: str | None = None,
        username: str | None = None,
        limit: int = config.LIST_LIMIT,
        before: int | None = None,
        search: str | None = None,
    ) -> tuple[list[dict], int | None]:
        """One page of :meth:`list` and the ``before`` of the next page, None on the last page."""
        reply = await self._request(
            "list", status=status, name=name, username=username, search=search, limit=limit, before=before
        )
        return reply["tasks"], reply.get("next_before")

    async def iter_tasks(
        self,
        status: str | None = None,
        name: str | None = None,
        username: str | None = None,
        page: int = calls.PAGE_SIZE,
        search: str | None = None,
    ) -> AsyncIterator[dict]:
        """Summaries of every matching task, newest first, fetched ``page`` at a time (``async for``).

        Each page asks for tasks older than the last one seen: none added meanwhile, none twice.
        """
        before = None
        while True:
            tasks, before = await self.list_page(status, name, username, page, before, search)
            for task in tasks:
                yield task
            if before is None:
                return

    async def workers(self) -> list[dict]:
        """Workers connected now: id, host, pid, handlers, slots, busy, last_seen."""
        return (await self._request("workers"))["workers"]

    async def recurring(self) -> list[dict]:
        """Recurring schedules, with their next_run_at and zone (``tz``: null for the server's)."""
        return (await self._request("recurring"))["recurring"]

    async def stats(self) -> dict:
        """Task counts from the server's running tallies (counts, minutes, names, queue_lag, at)."""
        return calls.result(await self._request("stats"))

    async def ping(self) -> dict:
        """The server's version and protocol version; raises ServerUnavailable if it does not answer."""
        return calls.result(await self._request("ping"))

    # ------------------------------------------------------------ stopping

    async def cancel(self, task_id: int) -> dict:
        """Cancel a waiting, scheduled, queued or running task; returns its record."""
        return (await self._request("cancel", task_id=task_id))["task"]

    async def retry(self, task_id: int) -> dict:
        """Queue a failed or cancelled task to run again now; returns its record."""
        return (await self._request("retry", task_id=task_id))["task"]

    async def bulk(
        self,
        action: str,
        *,
        status: str | None = None,
        name: str | None = None,
        username: str | None = None,
        search: str | None = None,
        limit: int = config.BULK_LIMIT,
    ) -> dict:
        """``action`` (``"cancel"`` or ``"retry"``) on every task the filters select; ``{"done", "failed"}``."""
        reply = await self._request(
            "bulk", action=action, status=status, name=name, username=username, search=search, limit=limit
        )
        return {"done": reply["done"], "failed": reply["failed"]}

    async def revoke(self, recurring_id: int) -> dict:
        """Stop a recurring schedule; tasks it already created stay in history."""
        return (await self._request("revoke", recurring_id=recurring_id))["recurring"]

    async def pause(self, name: str) -> dict:
        """Dispatch no more tasks named ``name`` until :meth:`resume`; ``{"name", "paused", "changed", "names"}``."""
        return calls.result(await self._request("pause", name=name))

    async def resume(self, name: str) -> dict:
        """Dispatch tasks named ``name`` again; ``{"name", "paused", "changed", "names"}``."""
        return calls.result(await self._request("resume", name=name))

    async def purge(self, status: str, older_than: float | str, *, batch: int = config.PURGE_BATCH) -> int:
        """Delete the tasks in final ``status`` that finished at least ``older_than`` ago (seconds, or an age
        such as ``"1d"``), ``batch`` per request; returns how many."""
        seconds = calls.purge_age(older_than)
        deleted = 0
        while True:
            done = (await self._request("purge", status=status, older_than=seconds, limit=batch))["deleted"]
            deleted += done
            if done < batch:
                return deleted

    async def close(self) -> None:
        """Close the socket; calls still in flight are cancelled, and the next call opens a new socket."""
        readers = self._readers
        self._drop()
        for reader in readers:
            try:
                await reader
            except asyncio.CancelledError:
                pass

    async def __aenter__(self) -> Martinet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ plumbing

    async def _request(self, op: str, _extra: float = 0.0, **params: Any) -> dict:
        """Send one request and return its reply, or raise the error the reply carries; ServerUnavailable if
        none comes within ``timeout`` (plus ``_extra``: the time a ``wait`` asks the server to hold it)."""
        request_id, params = self._ids.next(op, params)
        frames = calls.encode(request_id, op, params, self.max_request_bytes)
        socket = self._open()
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await socket.send_multipart(frames)
            reply = await asyncio.wait_for(future, self.timeout + _extra)
        except TimeoutError:
            raise calls.no_reply(self.endpoint, self.timeout + _extra) from None
        finally:
            # Whatever the outcome; a reply that comes later finds no future and is dropped.
            self._pending.pop(request_id, None)
        if not reply.get("ok"):
            raise from_wire(reply.get("error") or {})
        return reply

    def _open(self) -> zmq.asyncio.Socket:
        """The socket, opened with its reader tasks in the running loop if there is none there yet."""
        loop = asyncio.get_running_loop()
        if self._socket is not None and self._loop is loop:
            return self._socket
        self._drop()  # a socket left by another (perhaps closed) loop is not usable in this one
        socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            self._keys.apply(socket)
        self._monitor = security.monitor(socket)
        socket.connect(self.endpoint)
        self._socket, self._loop = socket, loop
        self._readers = (loop.create_task(self._read(socket)), loop.create_task(self._watch(self._monitor)))
        return socket

    def _drop(self) -> None:
        """Cancel the calls in flight and the reader tasks, and close the socket and its monitor."""
        for task in (*self._pending.values(), *self._readers):
            task.cancel()
        self._pending.clear()
        if self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
        self._socket = self._monitor = self._loop = None
        self._readers = ()

    def _fail_all(self, error: Exception) -> None:
        """Raise ``error`` in every call in flight."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Fail the calls in flight with AuthenticationFailed whenever a handshake fails (ZeroMQ tries again
        every 100 ms or so, so calls made meanwhile fail at the next try)."""
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            failure = security.handshake_failure(event, self.endpoint, keyed=self._keys is not None)
            if failure is not None:
                self._fail_all(failure)

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        """Hand every reply on ``socket`` to the call waiting for its id; drop those nobody waits for."""
        limit = calls.reply_limit(self.max_request_bytes)
        while True:
            frames = await socket.recv_multipart()
            try:
                reply = protocol.parse_reply(frames, limit)
            except ProtocolError as exc:
                # Its id cannot be read: every call in flight may be the one it answers.
                self._fail_all(
                    ProtocolError(
                        f"unreadable reply from {self.endpoint}: {exc.message}; for a large list, ask for fewer "
                        "tasks (limit) or one at a time (status)"
                    )
                )
                continue
            request_id = reply.get("id")
            if request_id is None and len(self._pending) == 1:  # the server could not read the id: ours
                request_id = next(iter(self._pending))
            future = self._pending.get(request_id)
            if future is None:
                # A reply for a call that timed out, or an unreadable id with several calls in flight.
                log.debug("dropped a reply nobody waits for (id %.80r)", reply.get("id"))
            elif not future.done():
                future.set_result(reply)

"""``martinet work``: run handlers for the tasks the broker sends, report status to the sink.

Importing this module monkey-patches the process with gevent, so that handlers' blocking
I/O (sockets, sleeps, subprocesses) yields to the other tasks instead of stalling them.
Handlers must therefore be imported after this module, which ``run_worker`` guarantees.

Greenlets: one owns the DEALER socket (READY, TASK, HEARTBEAT, DISCONNECT), one drains
status events into batched PUSH messages, and one per running task.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import logging
import os
import signal
import socket as pysocket
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.queue
import zmq.green as zmq

from . import config, protocol
from .errors import HandlerError, ProtocolError
from .registry import Handler, Registry, load_handlers

log = logging.getLogger(__name__)

#: Exit codes of ``martinet work``.
EXIT_OK = 0
EXIT_HANDLERS = 2

#: Seconds the status socket may keep flushing unsent events when the worker exits.
STATUS_LINGER = 5.0


class Worker:
    """Connects to a server and runs tasks with the handlers it was given.

    Args:
        url: the server's host (``tcp://`` prefix optional).
        concurrency: tasks run at once (the slots declared in READY).
        heartbeat: seconds between heartbeats; the server is presumed lost after
            ``config.HEARTBEAT_LIVENESS`` silent intervals, and the worker reconnects.
        grace: seconds running tasks get to finish after the first stop signal.
        registry: handlers to serve; more can be added with :meth:`on`.
    """

    def __init__(
        self,
        url: str = config.HOST,
        worker_port: int = config.WORKER_PORT,
        status_port: int = config.STATUS_PORT,
        *,
        concurrency: int = config.CONCURRENCY,
        heartbeat: float = config.HEARTBEAT_INTERVAL,
        grace: float = config.WORKER_GRACE,
        registry: Registry | None = None,
        worker_id: str | None = None,
    ) -> None:
        host = url.removeprefix("tcp://").rstrip("/")
        self.worker_endpoint = f"tcp://{host}:{int(worker_port)}"
        self.status_endpoint = f"tcp://{host}:{int(status_port)}"
        self.concurrency = concurrency
        self.heartbeat = heartbeat
        self.grace = grace
        self.registry = Registry()
        if registry is not None:
            self.registry.update(registry)
        self.id = worker_id or f"{pysocket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._running: dict[int, tuple[int, gevent.Greenlet]] = {}
        # Tasks received after stop() began: never started, handed back with DISCONNECT.
        self._declined: list[dict] = []
        self._events: gevent.queue.Queue = gevent.queue.Queue()
        self._stopping = gevent.event.Event()
        self._forced = gevent.event.Event()

    def on(self, name: str, fn: Handler | None = None) -> Any:
        """Register ``fn`` for task ``name``; without ``fn``, a decorator: ``@worker.on("name")``."""
        if fn is not None:
            return self.registry.add(name, fn)
        return lambda handler: self.registry.add(name, handler)

    def stop(self) -> None:
        """First call: finish running tasks (up to ``grace``) and leave. Second call: leave now."""
        if self._stopping.is_set():
            log.info("stopping now: unfinished tasks go back to the server")
            self._forced.set()
        else:
            log.info(
                "stopping: no new tasks; waiting up to %g s for %d running task(s)", self.grace, len(self._running)
            )
            self._stopping.set()

    def run(self) -> None:
        """Serve until :meth:`stop` (or SIGTERM/SIGINT when run from the main greenlet)."""
        if not len(self.registry):
            raise HandlerError("this worker has no handlers: register some with @task or Worker.on() first")
        context = zmq.Context()
        status = context.socket(zmq.PUSH)
        status.setsockopt(zmq.SNDHWM, 0)  # never block or drop a status event while the server is away
        status.setsockopt(zmq.LINGER, int(STATUS_LINGER * 1000))
        status.connect(self.status_endpoint)
        signals = [gevent.signal_handler(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)]
        pusher = gevent.spawn(self._push_status, status)
        log.info(
            "worker %s serving %s with %d slot(s) on %s",
            self.id,
            ", ".join(self.registry.names()),
            self.concurrency,
            self.worker_endpoint,
        )
        try:
            self._serve(context)
        finally:
            for handler in signals:
                handler.cancel()
            self._events.put(None)
            pusher.join(timeout=STATUS_LINGER)
            status.close()
            context.term()
            log.info("worker %s stopped", self.id)

    # ------------------------------------------------------------ the DEALER socket

    def _serve(self, context: Any) -> None:
        sock = self._connect(context, None)
        liveness = config.HEARTBEAT_LIVENESS * self.heartbeat
        heard = time.monotonic()
        next_beat = heard + self.heartbeat
        registered = False
        drain_until = None
        while not self._forced.is_set():
            if self._stopping.is_set():
                if drain_until is None:
                    drain_until = time.monotonic() + self.grace
                    self._send(sock, protocol.READY, self._ready_body(slots=0))
                if not self._running or time.monotonic() >= drain_until:
                    break
            wait = max(0.0, min(next_beat - time.monotonic(), 0.2 if self._stopping.is_set() else self.heartbeat))
            if sock.poll(wait * 1000):
                frames = sock.recv_multipart()
                heard = time.monotonic()
                if not registered:
                    log.info("registered with the server at %s", self.worker_endpoint)
                    registered = True
                if self._handle(frames) == protocol.DISCONNECT:
                    sock = self._connect(context, sock)
                    registered = False
            now = time.monotonic()
            if now >= next_beat:
                self._send(sock, protocol.HEARTBEAT)
                next_beat = now + self.heartbeat
            if now - heard > liveness:
                log.warning("server at %s silent for %g s: reconnecting", self.worker_endpoint, liveness)
                sock = self._connect(context, sock)
                heard = now
                registered = False
        self._leave(sock)

    def _connect(self, context: Any, old: Any) -> Any:
        if old is not None:
            old.close(linger=0)
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.id.encode())
        sock.setsockopt(zmq.MAXMSGSIZE, config.MAX_MESSAGE_BYTES)
        sock.connect(self.worker_endpoint)
        slots = 0 if self._stopping.is_set() else self.concurrency
        self._send(sock, protocol.READY, self._ready_body(slots=slots))
        return sock

    def _ready_body(self, slots: int) -> dict:
        return {
            "worker": self.id,
            "host": pysocket.gethostname(),
            "pid": os.getpid(),
            "handlers": self.registry.names(),
            "slots": slots,
            "heartbeat": self.heartbeat,
            "running": self._refs(),
        }

    def _refs(self) -> list[dict]:
        running = [{"task_id": task_id, "attempt": attempt} for task_id, (attempt, _) in self._running.items()]
        return running + self._declined

    def _handle(self, frames: list[bytes]) -> bytes | None:
        try:
            command, body = protocol.parse_worker_message(frames, protocol.BROKER_COMMANDS, config.MAX_MESSAGE_BYTES)
        except ProtocolError as exc:
            log.warning("ignored a malformed message from the server: %s", exc.message)
            return None
        if command == protocol.TASK:
            for task in body.get("tasks", []):
                self._start(task)
        elif command == protocol.DISCONNECT:
            log.info("server asked this worker to register again (%s)", body.get("reason", "no reason given"))
        return command

    def _leave(self, sock: Any) -> None:
        unfinished = self._refs()
        self._send(sock, protocol.DISCONNECT, {"running": unfinished})
        for _, greenlet in list(self._running.values()):
            greenlet.kill(block=False)
        if unfinished:
            log.warning("handed %d unfinished task(s) back to the server", len(unfinished))
        # Let the DISCONNECT leave before the socket closes, but do not wait long for an absent server.
        sock.close(linger=1000)

    def _send(self, sock: Any, command: bytes, body: dict | None = None) -> None:
        try:
            sock.send_multipart(protocol.worker_message(command, body), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("could not send %s: the server is not reading", command.decode())

    # ------------------------------------------------------------ running tasks

    def _start(self, task: dict) -> None:
        try:
            task_id, attempt, name, args = task["task_id"], task["attempt"], task["name"], task["args"]
        except (KeyError, TypeError):
            log.warning("ignored a malformed task from the server: %r", task)
            return
        if self._stopping.is_set():
            self._declined.append({"task_id": task_id, "attempt": attempt})
            return
        log.debug("running task %s (%s) attempt %s", task_id, name, attempt)
        greenlet = gevent.spawn(self._execute, task_id, attempt, name, args)
        self._running[task_id] = (attempt, greenlet)

    def _execute(self, task_id: int, attempt: int, name: str, args: dict) -> None:
        started = time.monotonic()
        self._emit(task_id, attempt, protocol.STARTED)
        try:
            handler = self.registry.get(name)
            if handler is None:
                raise LookupError(f"no handler for task {name!r} on worker {self.id}")
            result = handler(task_id, args, self._progress_callback(task_id, attempt))
            try:
                protocol.dumps(result)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"task {name!r} returned a result that is not JSON-serialisable: {exc}") from None
        except gevent.GreenletExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in a handler fails the task, not the worker
            error = exc.args[0] if isinstance(exc, LookupError) and exc.args else f"{type(exc).__name__}: {exc}"
            self._emit(task_id, attempt, protocol.FAILED, error=error, traceback=traceback.format_exc())
            log.debug("task %s (%s) failed after %.3f s: %s", task_id, name, time.monotonic() - started, error)
        else:
            self._emit(task_id, attempt, protocol.SUCCEEDED, result=result)
            log.debug("task %s (%s) succeeded in %.3f s", task_id, name, time.monotonic() - started)
        finally:
            self._running.pop(task_id, None)

    def _progress_callback(self, task_id: int, attempt: int) -> Callable[..., None]:
        def progress(fraction: float, message: str | None = None) -> None:
            """Report progress: ``fraction`` from 0 to 1 and an optional message."""
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
                raise ValueError(f"progress fraction must be a number from 0 to 1, got {fraction!r}")
            if message is not None and not isinstance(message, str):
                raise ValueError(f"progress message must be a string, got {type(message).__name__}")
            self._emit(task_id, attempt, protocol.PROGRESS, progress=float(fraction), message=message)

        return progress

    def _emit(self, task_id: int, attempt: int, event: str, **fields: Any) -> None:
        self._events.put({"task_id": task_id, "attempt": attempt, "event": event, "at": time.time(), **fields})

    def _push_status(self, sock: Any) -> None:
        """Send queued events, as many per message as are waiting; ``None`` ends it."""
        while True:
            event = self._events.get()
            batch = [] if event is None else [event]
            while len(batch) < config.BATCH_MAX and not self._events.empty():
                event = self._events.get_nowait()
                if event is None:
                    break
                batch.append(event)
            if batch:
                sock.send_multipart(protocol.status_batch(self.id, batch))
            if event is None:
                return


def run_worker(
    *,
    handlers_dir: str,
    url: str = config.HOST,
    worker_port: int = config.WORKER_PORT,
    status_port: int = config.STATUS_PORT,
    concurrency: int = config.CONCURRENCY,
    heartbeat: float = config.HEARTBEAT_INTERVAL,
    grace: float = config.WORKER_GRACE,
    paths: Sequence[str] = (),
) -> int:
    """Load the handlers in ``handlers_dir`` and serve until stopped; returns the exit code.

    ``paths`` are folders put first on ``sys.path``, where handlers find extra packages
    (e.g. ``pip install --target DIR``): the one-file executable bundles only Martinet's own.
    """
    sys.path[:0] = [os.path.abspath(path) for path in paths]
    try:
        registry = load_handlers(handlers_dir)
        if not len(registry):
            raise HandlerError(
                f"no handlers found in {handlers_dir!r}: add a module there with a function decorated "
                "with @task (from martinet_app import task)"
            )
    except HandlerError as exc:
        log.error("cannot start the worker: %s", exc.message)
        return EXIT_HANDLERS
    Worker(
        url, worker_port, status_port, concurrency=concurrency, heartbeat=heartbeat, grace=grace, registry=registry
    ).run()
    return EXIT_OK

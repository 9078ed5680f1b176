"""``martinet work``: run handlers for the tasks the broker sends, report status to the sink.

The worker process itself runs no handler code. Each of its slots is a handler process
(slots.py, runner.py) that loads the handlers and runs one task at a time, so the worker's
gevent loop is always free to heartbeat, and a task can be stopped on timeout or cancel by
killing its process. Greenlets: one owns the DEALER socket (READY, TASK, CANCEL, HEARTBEAT,
DISCONNECT), one drains status events into batched PUSH messages, and one per running task
waits on its slot.

Given several servers (sharing one database), the worker uses one at a time and moves to the
next, wrapping, when it falls silent or drops the connection: both sockets are opened anew to
that server, READY lists the running tasks, and the final status events sent in the last
RESEND_LIVENESSES liveness periods are sent again, since the old PUSH pipe may have lost them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket as pysocket
import sys
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import gevent.queue
import zmq.green as zmq
from zmq.utils.monitor import parse_monitor_message

from . import config, protocol, security, servers
from .errors import ConfigError, HandlerError, ProtocolError
from .registry import Handler, Registry
from .security import PeerKeys
from .slots import Slot

log = logging.getLogger(__name__)

#: Exit codes of ``martinet work``.
EXIT_OK = 0
EXIT_HANDLERS = 2

#: Bytes an event takes in a status message besides its result or traceback (an estimate, for batching).
_EVENT_BYTES = 200
#: Seconds the status socket may keep flushing unsent events when the worker exits.
STATUS_LINGER = 5.0
#: Seconds a ``started`` event is held back: if its task finishes meanwhile, the final event carries
#: ``started_at`` instead, so a short task costs the server one write, not two.
STARTED_HOLD = 0.05
#: Automatic prefetch: each slot holds about this many seconds of work waiting, judged by how long
#: recent tasks ran (none for tasks that run longer), up to PREFETCH_MAX tasks in all.
PREFETCH_HORIZON = 0.05
PREFETCH_MAX = 256
#: Weight of the latest task in the running average of task durations.
_DURATION_WEIGHT = 0.2
#: A slot's process is sent about PIPELINE_SECONDS of work at once, judged by the running average
#: of task durations, up to PIPELINE_MAX tasks (they still run one at a time, in order): a pipe
#: forms while tasks average under half of PIPELINE_SECONDS.
PIPELINE_SECONDS = 0.004
PIPELINE_MAX = 32
#: With several servers, final status events sent within this many liveness periods
#: (``config.HEARTBEAT_LIVENESS`` heartbeats) are kept, at most RESEND_MAX of them and about
#: RESEND_MAX_BYTES, and sent again to the next server after a move: the pipe to a server that
#: died loses what it held. A server ignores an event whose delivery is no longer current.
RESEND_LIVENESSES = 2
RESEND_MAX = 10_000
RESEND_MAX_BYTES = 64 * 1024 * 1024


@dataclass
class _Delivery:
    """A task this worker was given, and the slot running it once it has one."""

    task: dict
    slot: Slot | None = None
    cancelled: bool = False


class Worker:
    """Connects to a server and runs tasks with the handlers it was given.

    Args:
        url: the server's host (``tcp://`` prefix optional), or several sharing one database and
            listening on the same ports: ``"h1,h2"`` or ``["h1", "h2"]``. The worker uses the first and
            moves to the next, wrapping, when one falls silent or drops the connection.
        concurrency: tasks run at once (the slots declared in READY).
        prefetch: tasks held waiting for a slot beyond those running (declared in READY); None:
            automatic (PREFETCH_HORIZON), re-declared as task durations change.
        heartbeat: seconds between heartbeats; the server is presumed lost after
            ``config.HEARTBEAT_LIVENESS`` silent intervals, and the worker reconnects.
        grace: seconds running tasks get to finish after the first stop signal.
        handlers_dir: folder of handler modules the handler processes import (see registry.py);
            handlers can also be added with :meth:`on`.
        paths: folders put first on the handler processes' ``sys.path``.
        secret_key, server_key: this worker's ``NAME.key_secret`` and the server's public ``.key``,
            for a server with keys (both or neither); the worker's id then begins with its key's tag.

    Raises:
        ConfigError: ``url`` is not a list of servers (servers.parse), or a key file is unusable.
    """

    def __init__(
        self,
        url: str | Sequence[str] = config.HOST,
        worker_port: int = config.WORKER_PORT,
        status_port: int = config.STATUS_PORT,
        *,
        concurrency: int = config.CONCURRENCY,
        prefetch: int | None = config.PREFETCH,
        heartbeat: float = config.HEARTBEAT_INTERVAL,
        grace: float = config.WORKER_GRACE,
        handlers_dir: str | None = None,
        paths: Sequence[str] = (),
        worker_id: str | None = None,
        secret_key: str | None = None,
        server_key: str | None = None,
    ) -> None:
        self.servers = servers.parse(url)
        self._ports = (int(worker_port), int(status_port))
        self._server = 0
        self.worker_endpoint = self.status_endpoint = ""
        self._aim()
        self.concurrency = concurrency
        self.prefetch = prefetch
        # What READY declared last, and (automatic prefetch) what to declare next, if it differs enough.
        self._declared_prefetch = prefetch or 0
        self._wanted_prefetch: int | None = None
        self._task_seconds: float | None = None
        # The DEALER socket to the server, and whether the server has answered on it since it connected;
        # how many DEALERs were opened, and whether the latest one's connection dropped (several servers).
        self._sock: Any = None
        self._registered = False
        self._generation = 0
        self._dropped = False
        # The PUSH socket to the server's sink; with several servers, the final events sent lately
        # (when, event, estimated size) and their total size.
        self._status: Any = None
        self._sent_finals: deque[tuple[float, dict, int]] = deque()
        self._sent_bytes = 0
        self.heartbeat = heartbeat
        self.grace = grace
        self.handlers_dir = handlers_dir
        self.paths = [os.path.abspath(path) for path in paths]
        self.registry = Registry()
        self.handler_names: list[str] = []
        self.keys = PeerKeys.load(secret_key, server_key)
        self.id = worker_id or f"{pysocket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if self.keys is not None:  # the server accepts this id only from this key (security.py)
            self.id = f"{security.key_tag(self.keys.public)}/{self.id}"
        self._watchers: list[gevent.Greenlet] = []
        self._slots: list[Slot] = []
        self._slot_loops: list[gevent.Greenlet] = []
        # Deliveries not yet started, in arrival order; the slots' greenlets take them.
        self._pending: gevent.queue.Queue = gevent.queue.Queue()
        self._running: dict[tuple[int, int], _Delivery] = {}
        # Tasks received after stop() began: never started, handed back with DISCONNECT.
        self._declined: list[dict] = []
        # Status events not yet sent, with their estimated size; started events held back (STARTED_HOLD).
        self._outbox: list[tuple[dict, int]] = []
        self._held: dict[tuple[int, int], dict] = {}
        self._outbox_ready = gevent.event.Event()
        self._closing = False
        self._stopping = gevent.event.Event()
        self._forced = gevent.event.Event()

    def on(self, name: str, fn: Handler | None = None) -> Any:
        """Register ``fn`` for task ``name``; without ``fn``, a decorator: ``@worker.on("name")``.

        Handlers run in separate processes that import ``fn`` by module and name, so it must be
        a module-level function (in a script, keep ``worker.run()`` under ``if __name__ == "__main__"``).
        """
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
        """Serve until :meth:`stop` (or SIGTERM/SIGINT when run from the main greenlet).

        Raises:
            HandlerError: the handlers cannot be loaded, or there are none.
        """
        self._start_slots()
        context = zmq.Context()
        self._status = self._status_socket(context)
        signals = [gevent.signal_handler(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)]
        pusher = gevent.spawn(self._push_status)
        self._slot_loops = [gevent.spawn(self._slot_loop, slot) for slot in self._slots]
        log.info(
            "worker %s serving %s with %d slot(s) on %s%s",
            self.id,
            ", ".join(self.handler_names),
            self.concurrency,
            self.worker_endpoint,
            f" (servers: {', '.join(self.servers)})" if len(self.servers) > 1 else "",
        )
        try:
            self._serve(context)
        finally:
            for handler in signals:
                handler.cancel()
            gevent.killall(self._slot_loops)
            for slot in self._slots:
                slot.close()
            self._closing = True
            self._outbox_ready.set()
            pusher.join(timeout=STATUS_LINGER)
            self._status.close()
            gevent.killall(self._watchers)
            context.term()
            log.info("worker %s stopped", self.id)

    # ------------------------------------------------------------ the DEALER socket

    def _serve(self, context: Any) -> None:
        sock = self._connect(context, None)
        liveness = config.HEARTBEAT_LIVENESS * self.heartbeat
        heard = time.monotonic()
        next_beat = heard + self.heartbeat
        self._registered = False
        drain_until = None
        while not self._forced.is_set():
            if self._stopping.is_set():
                if drain_until is None:
                    drain_until = time.monotonic() + self.grace
                    self._send(sock, protocol.READY, self._ready_body(slots=0))
                if not self._running or time.monotonic() >= drain_until:
                    break
            wait = max(0.0, min(next_beat - time.monotonic(), 0.2 if self._stopping.is_set() else self.heartbeat))
            frames = _receive(sock, wait)
            if frames is not None:
                heard = time.monotonic()
                if not self._registered:
                    log.info("registered with the server at %s", self.worker_endpoint)
                    self._registered = True
                    self._declare_prefetch()
                if self._handle(frames) == protocol.DISCONNECT:
                    sock = self._connect(context, sock)
                    self._registered = False
            now = time.monotonic()
            if now >= next_beat:
                self._send(sock, protocol.HEARTBEAT)
                next_beat = now + self.heartbeat
            if now - heard > liveness or self._dropped:
                why = "dropped the connection" if self._dropped else f"silent for {liveness:g} s"
                sock = self._move(context, sock, why)
                heard = now
                self._registered = False
        self._leave(sock)

    def _aim(self) -> None:
        """Point the endpoints at the server in use."""
        host = self.servers[self._server]
        self.worker_endpoint = f"tcp://{host}:{self._ports[0]}"
        self.status_endpoint = f"tcp://{host}:{self._ports[1]}"

    def _move(self, context: Any, sock: Any, why: str) -> Any:
        """Leave a server that failed (``why``): reconnect to it if it is the only one, else move both
        sockets to the next and send it again the final events sent lately. Returns the new DEALER."""
        if len(self.servers) == 1:
            log.warning("server at %s %s: reconnecting", self.worker_endpoint, why)
            return self._connect(context, sock)
        left = self.worker_endpoint
        self._server = (self._server + 1) % len(self.servers)
        self._aim()
        log.warning("server at %s %s: moving to the server at %s", left, why, self.worker_endpoint)
        self._status.close(linger=0)
        self._status = self._status_socket(context)
        horizon = time.monotonic() - RESEND_LIVENESSES * config.HEARTBEAT_LIVENESS * self.heartbeat
        again = [(event, size) for sent_at, event, size in self._sent_finals if sent_at >= horizon]
        self._sent_finals.clear()
        self._sent_bytes = 0
        if again:
            log.info("sending %d final status event(s) again, to %s", len(again), self.status_endpoint)
            self._outbox[:0] = again
            self._outbox_ready.set()
        return self._connect(context, sock)

    def _status_socket(self, context: Any) -> Any:
        """A PUSH socket to the sink of the server in use."""
        status = self._socket(context, zmq.PUSH)
        status.setsockopt(zmq.SNDHWM, 0)  # never block or drop a status event while the server is away
        status.setsockopt(zmq.LINGER, int(STATUS_LINGER * 1000))
        status.connect(self.status_endpoint)
        return status

    def _connect(self, context: Any, old: Any) -> Any:
        """A new DEALER to the server in use (closing ``old``), with READY sent on it."""
        if old is not None:
            old.close(linger=0)
        self._generation += 1
        self._dropped = False
        sock = self._sock = self._socket(context, zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.id.encode())
        sock.connect(self.worker_endpoint)
        slots = 0 if self._stopping.is_set() else self.concurrency
        self._send(sock, protocol.READY, self._ready_body(slots=slots))
        return sock

    def _socket(self, context: Any, kind: int) -> Any:
        """A socket to the server: with this worker's keys, and a greenlet watching its connection."""
        sock = context.socket(kind)
        if self.keys is not None:
            self.keys.apply(sock)
        self._watchers = [watcher for watcher in self._watchers if not watcher.dead]
        generation = self._generation if kind == zmq.DEALER and len(self.servers) > 1 else None
        self._watchers.append(gevent.spawn(self._watch, security.monitor(sock), self.worker_endpoint, generation))
        return sock

    def _watch(self, monitor: Any, endpoint: str, generation: int | None) -> None:
        """Log why the server refused this worker (at most once a minute; it keeps trying, the key may be
        added). With ``generation`` (a DEALER, several servers): flag a connection that was made and then
        dropped, while that DEALER is the one in use, for the serve loop to move on."""
        next_log = 0.0
        made = False
        try:
            while True:
                event = parse_monitor_message(monitor.recv_multipart())
                kind = event["event"]
                if kind == zmq.EVENT_MONITOR_STOPPED:  # its socket was closed
                    return
                if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    made = True
                elif kind == zmq.EVENT_DISCONNECTED:
                    if made and generation == self._generation:
                        self._dropped = True
                    made = False
                    continue
                failure = security.handshake_failure(event, endpoint, keyed=self.keys is not None)
                if failure is not None and time.monotonic() >= next_log:
                    log.error("%s; retrying", failure.message)
                    next_log = time.monotonic() + 60
        finally:
            monitor.close(linger=0)

    def _ready_body(self, slots: int) -> dict:
        return {
            "worker": self.id,
            "host": pysocket.gethostname(),
            "pid": os.getpid(),
            "handlers": self.handler_names,
            "slots": slots,
            "prefetch": self._declared_prefetch if slots else 0,
            "heartbeat": self.heartbeat,
            "running": self._refs(),
        }

    def _refs(self) -> list[dict]:
        running = [{"task_id": task_id, "attempt": attempt} for task_id, attempt in self._running]
        return running + self._declined

    def _handle(self, frames: list[bytes]) -> bytes | None:
        try:
            # No size limit: this socket only talks to our server, whose limit bounds what clients submit.
            command, body = protocol.parse_worker_message(frames, protocol.BROKER_COMMANDS, None)
        except ProtocolError as exc:
            log.warning("ignored a malformed message from the server: %s", exc.message)
            return None
        if command == protocol.TASK:
            for task in body.get("tasks", []):
                self._start(task)
        elif command == protocol.CANCEL:
            for ref in body.get("tasks", []):
                self._cancel(ref)
        elif command == protocol.DISCONNECT:
            log.info("server asked this worker to register again (%s)", body.get("reason", "no reason given"))
        return command

    def _leave(self, sock: Any) -> None:
        unfinished = self._refs()
        self._send(sock, protocol.DISCONNECT, {"running": unfinished})
        # Handed back, not failed: stop waiting on them without reporting, then stop their processes.
        gevent.killall(self._slot_loops)
        for delivery in self._running.values():
            if delivery.slot is not None:
                delivery.slot.close()
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

    def _start_slots(self) -> None:
        """Start one handler process per slot; they all report the same task names."""
        spec = {
            "worker": self.id,
            "handlers_dir": self.handlers_dir,
            "paths": self.paths,
            "functions": [self._function_ref(name) for name in self.registry.names()],
            "max_result_bytes": config.MAX_RESULT_BYTES,
        }
        slots = [Slot(spec) for _ in range(self.concurrency)]

        def start(slot: Slot) -> list[str] | HandlerError:
            try:
                return slot.start()
            except HandlerError as exc:
                return exc

        outcomes = [greenlet.value for greenlet in gevent.joinall([gevent.spawn(start, slot) for slot in slots])]
        failure = next((outcome for outcome in outcomes if isinstance(outcome, HandlerError)), None)
        if failure is not None:
            for slot in slots:
                slot.close()
            raise failure
        self.handler_names = outcomes[0]
        self._slots = slots

    def _function_ref(self, name: str) -> dict:
        fn = self.registry.get(name)
        qualname = getattr(fn, "__qualname__", "")
        if "<" in qualname or not getattr(fn, "__module__", None):
            raise HandlerError(
                f"the handler for task {name!r} ({qualname or fn!r}) must be a module-level function: "
                "handlers run in separate processes that import them by name"
            )
        module = sys.modules.get(fn.__module__)
        script = getattr(module, "__file__", None) if fn.__module__ == "__main__" else None
        return {"name": name, "module": fn.__module__, "qualname": qualname, "file": script}

    def _start(self, task: dict) -> None:
        try:
            task_id, attempt, name = task["task_id"], task["attempt"], task["name"]
        except (KeyError, TypeError):
            log.warning("ignored a malformed task from the server: %r", task)
            return
        if self._stopping.is_set():
            self._declined.append({"task_id": task_id, "attempt": attempt})
            return
        log.debug("received task %s (%s) attempt %s", task_id, name, attempt)
        task.setdefault("args", {})
        delivery = _Delivery(task)
        self._running[(task_id, attempt)] = delivery
        self._pending.put(delivery)

    def _cancel(self, ref: dict) -> None:
        key = (ref.get("task_id"), ref.get("attempt"))
        delivery = self._running.get(key)
        if delivery is not None:
            log.debug("cancelling task %s attempt %s", *key)
            delivery.cancelled = True
            if delivery.slot is not None:
                delivery.slot.interrupt("cancelled", key)

    def _slot_loop(self, slot: Slot) -> None:
        """Run pending deliveries on one slot until the worker stops.

        One task runs at a time; while tasks are short, several are sent to the process at once
        (about PIPELINE_SECONDS of work), so it finds the next one waiting instead of being woken for each.
        """
        unstarted: list[_Delivery] = []
        while True:
            batch = unstarted or [self._pending.get()]
            depth = self._pipeline_depth()
            while len(batch) < depth and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            self._restart(slot)  # its process may have died while idle (e.g. killed by the OOM killer)
            unstarted = self._execute(slot, batch)
            if slot.dead:  # killed for a timeout or cancel, or it died: replace it before it is needed
                self._restart(slot)

    def _pipeline_depth(self) -> int:
        if self._task_seconds is None:
            return 1
        return max(1, min(PIPELINE_MAX, int(PIPELINE_SECONDS / max(self._task_seconds, 1e-6))))

    def _execute(self, slot: Slot, batch: list[_Delivery]) -> list[_Delivery]:
        """Run ``batch`` on ``slot``, in order; return the deliveries it never started (to run next)."""
        live: dict[tuple[int, int], _Delivery] = {}
        for delivery in batch:
            task_id, attempt = delivery.task["task_id"], delivery.task["attempt"]
            if self._stopping.is_set() and not delivery.cancelled:
                del self._running[(task_id, attempt)]  # never started: handed back with DISCONNECT
                self._declined.append({"task_id": task_id, "attempt": attempt})
            elif delivery.cancelled:
                self._emit(task_id, attempt, protocol.FAILED, error="cancelled", traceback=None)
                self._running.pop((task_id, attempt), None)
            else:
                delivery.slot = slot
                live[(task_id, attempt)] = delivery
        if not live:
            return []
        started: dict[tuple[int, int], float] = {}

        def on_start(task: dict) -> None:
            started[task["task_id"], task["attempt"]] = time.monotonic()
            self._emit(task["task_id"], task["attempt"], protocol.STARTED)

        def on_progress(task: dict, fraction: float, message: str | None) -> None:
            ref = task["task_id"], task["attempt"]
            self._emit(*ref, protocol.PROGRESS, size=slot.last_size, progress=fraction, message=message)

        def on_done(task: dict, outcome: dict) -> None:
            ref = (task["task_id"], task["attempt"])
            event = outcome.pop("event")
            self._emit(*ref, event, size=slot.last_size, **outcome)
            seconds = time.monotonic() - started[ref]
            self._observe(seconds)
            self._running.pop(ref, None)
            log.debug("task %s (%s) %s after %.3f s", ref[0], task["name"], event, seconds)

        unstarted = [live[t["task_id"], t["attempt"]] for t in slot.run([d.task for d in live.values()], on_start,
                                                                         on_progress, on_done)]  # fmt: skip
        for delivery in unstarted:
            delivery.slot = None
        return unstarted

    def _observe(self, seconds: float) -> None:
        """Count a task's duration; with automatic prefetch, ask for a new one when it is off by 2x or more."""
        average = self._task_seconds
        self._task_seconds = average = seconds if average is None else average + _DURATION_WEIGHT * (seconds - average)
        if self.prefetch is not None:
            return
        wanted = min(PREFETCH_MAX, int(self.concurrency * PREFETCH_HORIZON / max(average, 1e-6)))
        have = self._declared_prefetch
        if wanted == have or (wanted and have and have / 2 < wanted < have * 2):
            self._wanted_prefetch = None
        else:
            self._wanted_prefetch = wanted
            self._declare_prefetch()

    def _declare_prefetch(self) -> None:
        """Send the prefetch wanted in a CREDIT now, if registered (else once it is)."""
        if self._wanted_prefetch is None or not self._registered or self._stopping.is_set():
            return
        self._declared_prefetch, self._wanted_prefetch = self._wanted_prefetch, None
        log.debug("prefetch now %d (tasks take %.4f s)", self._declared_prefetch, self._task_seconds)
        self._send(self._sock, protocol.CREDIT, {"slots": self.concurrency, "prefetch": self._declared_prefetch})

    def _restart(self, slot: Slot) -> None:
        """Replace a slot's dead process, retrying until it starts (the handlers may be being fixed)."""
        delay = 1.0
        while not slot.ready() and not self._forced.is_set():
            try:
                slot.start()
            except HandlerError as exc:
                log.error("cannot restart a handler process, retrying in %g s: %s", delay, exc.message)
                gevent.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _emit(self, task_id: int, attempt: int, event: str, size: int = 0, **fields: Any) -> None:
        """Queue a status event; ``size`` is about what its fields weigh encoded (a result's bytes).

        A ``started`` event is held back for STARTED_HOLD; a final event of the same delivery
        that comes meanwhile replaces it, carrying its time as ``started_at``.
        """
        ref = (task_id, attempt)
        event_dict = {"task_id": task_id, "attempt": attempt, "event": event, "at": time.time(), **fields}
        if event == protocol.STARTED:
            if not self._held:  # the sender may be waiting for events with no timeout: it must release this one
                self._outbox_ready.set()
            self._held[ref] = event_dict
            return
        started = self._held.pop(ref, None)
        if started is not None:
            if event in protocol.FINAL_EVENTS:
                event_dict["started_at"] = started["at"]
            else:
                self._outbox.append((started, _EVENT_BYTES))
        self._outbox.append((event_dict, _EVENT_BYTES + size))
        self._outbox_ready.set()

    def _push_status(self) -> None:
        """Send queued events, as many per message as fit; release held ``started`` events as they come due.

        With several servers, the final events sent are remembered for a while (:meth:`_remember`).
        """
        remember = len(self.servers) > 1
        while not self._closing or self._outbox:
            self._outbox_ready.wait(STARTED_HOLD if self._held else None)
            self._outbox_ready.clear()
            due = time.time() - STARTED_HOLD
            for ref in [ref for ref, started in self._held.items() if started["at"] <= due]:
                self._outbox.append((self._held.pop(ref), _EVENT_BYTES))
            events, self._outbox = self._outbox, []
            batch: list[dict] = []
            size = 0
            for event, event_size in events:
                if batch and (len(batch) >= config.BATCH_MAX or size + event_size > config.MAX_RESULT_BYTES):
                    self._status.send_multipart(protocol.status_batch(self.id, batch))
                    batch, size = [], 0
                batch.append(event)
                size += event_size
            if batch:
                self._status.send_multipart(protocol.status_batch(self.id, batch))
            if remember:
                self._remember(events)

    def _remember(self, events: list[tuple[dict, int]]) -> None:
        """Keep the final ones of ``events``, just sent, for RESEND_LIVENESSES liveness periods (bounded)."""
        now = time.monotonic()
        sent = self._sent_finals
        for event, size in events:
            if event["event"] in protocol.FINAL_EVENTS:
                sent.append((now, event, size))
                self._sent_bytes += size
        horizon = now - RESEND_LIVENESSES * config.HEARTBEAT_LIVENESS * self.heartbeat
        while sent and (sent[0][0] < horizon or len(sent) > RESEND_MAX or self._sent_bytes > RESEND_MAX_BYTES):
            self._sent_bytes -= sent.popleft()[2]


def run_worker(
    *,
    handlers_dir: str,
    url: str | Sequence[str] = config.HOST,
    worker_port: int = config.WORKER_PORT,
    status_port: int = config.STATUS_PORT,
    concurrency: int = config.CONCURRENCY,
    prefetch: int | None = config.PREFETCH,
    heartbeat: float = config.HEARTBEAT_INTERVAL,
    grace: float = config.WORKER_GRACE,
    paths: Sequence[str] = (),
    secret_key: str | None = None,
    server_key: str | None = None,
) -> int:
    """Load the handlers in ``handlers_dir`` and serve until stopped; returns the exit code.

    ``url`` is one server's host or several (``"h1,h2"``), as :class:`Worker` takes it.

    ``paths`` are folders put first on ``sys.path`` of the handler processes, where handlers find
    extra packages (e.g. ``pip install --target DIR``): the executable bundles only Martinet's own.
    ``secret_key`` and ``server_key`` are this worker's ``*.key_secret`` and the server's ``.key``.
    """
    try:
        worker = Worker(
            url,
            worker_port,
            status_port,
            concurrency=concurrency,
            prefetch=prefetch,
            heartbeat=heartbeat,
            grace=grace,
            handlers_dir=handlers_dir,
            paths=paths,
            secret_key=secret_key,
            server_key=server_key,
        )
        worker.run()
    except (HandlerError, ConfigError) as exc:
        log.error("cannot start the worker: %s", exc.message)
        return EXIT_HANDLERS
    return EXIT_OK


def _receive(sock: Any, timeout: float) -> list[bytes] | None:
    """The next message on a green socket, or None after ``timeout`` seconds.

    Not ``sock.poll``: it waits on the socket's edge-triggered descriptor, whose edge a send
    from another greenlet (a CREDIT from a slot's loop) can consume, leaving the poll asleep with
    messages waiting. A green receive is woken by that send.
    """
    with gevent.Timeout(timeout, False):
        return sock.recv_multipart()
    return None

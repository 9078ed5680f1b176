"""The broker: workers register on a ROUTER socket and get queued tasks when they have free slots.

Flow control is by credit, as in the ZeroMQ guide's load-balancing broker: a worker
declares its slots in READY, every dispatched task takes one, every final status event
(received by the sink, see sink.py) gives it back. No task is ever sent to a worker
without a free slot, so nothing waits in a busy worker's socket buffer. What each claim may take
is the store's to decide (pauses, ``serve --limit`` and ``--rate``: store.Store.claim); when a rate
held tasks back, the dispatcher is woken again as its window opens.

Liveness: both sides send HEARTBEAT every interval; any message counts. A worker silent
for ``liveness`` intervals is lost and its running tasks are re-queued. A HEARTBEAT from an
unknown worker (e.g. after a server restart) is answered with DISCONNECT, upon which the
worker sends READY again, listing the tasks it is still running.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import zmq.green as zmq

from . import protocol, security
from .errors import ProtocolError
from .security import Inbox
from .store import Store, iso

log = logging.getLogger(__name__)

#: Seconds past a rate window's opening that the dispatcher looks again (Broker._wake_at).
_WINDOW_SLACK = 0.001


@dataclass
class WorkerInfo:
    """What the broker knows of one connected worker."""

    id: str
    host: str
    pid: int
    handlers: tuple[str, ...]
    slots: int
    prefetch: int
    heartbeat: float
    expires_at: float
    last_seen: float = field(default_factory=time.time)
    inflight: set[tuple[int, int]] = field(default_factory=set)
    #: The public key (z85) it connected with, and that key's name (file stem), on a server with keys.
    user_id: str | None = None
    key: str | None = None

    @property
    def free(self) -> int:
        """Deliveries it may be sent now: its slots, plus as many waiting in its memory as it asked for."""
        return (self.slots + self.prefetch if self.slots else 0) - len(self.inflight)

    def record(self) -> dict:
        """The worker as the store records it (``last_seen`` in epoch seconds)."""
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "handlers": list(self.handlers),
            "slots": self.slots,
            "prefetch": self.prefetch,
            "busy": len(self.inflight),
            "last_seen": self.last_seen,
            "key": self.key,
        }


class Broker:
    """Owns the worker ROUTER socket: registration, heartbeats and dispatch."""

    def __init__(
        self,
        socket: Any,
        store: Store,
        *,
        heartbeat: float,
        liveness: int,
        max_bytes: int,
        batch_max: int,
        inbox: Inbox | None = None,
        rejected: Callable[[str], None],
        poll: float | None = None,
        address: str = "",
    ) -> None:
        """``rejected`` counts a message refused, by reason (metrics.Metrics.rejected); ``poll``: longest the
        dispatcher sleeps without looking at the queue (None: until woken), the safety net for a lost
        wake-up from another server; ``address``: where this server is bound."""
        self.socket = socket
        self.inbox = inbox or Inbox(socket)
        self.inbox.on_refused = self._key_refused
        self.store = store
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.max_bytes = max_bytes
        self.batch_max = batch_max
        self.poll = poll
        self.address = address
        self.workers: OrderedDict[str, WorkerInfo] = OrderedDict()
        self.rejections = protocol.Rejections(log, "worker socket", rejected)
        self._wakeup = gevent.event.Event()
        #: Called with the ids of tasks the broker made final (given up after too many lost deliveries).
        self.on_finished: Callable[[list[int]], None] = lambda task_ids: None
        # Running tasks no connected worker holds, with when they were first seen so (see sweep_orphans).
        self._orphans: dict[tuple[int, int], float] = {}
        # The wake-up due when a rate's window has room again (store.Store.window_opens), and its time.
        self._window_timer: gevent.Greenlet | None = None
        self._window_at = 0.0

    # ------------------------------------------------------------ called by other greenlets

    def wake(self) -> None:
        """Ask the dispatcher to look for queued tasks and free slots."""
        self._wakeup.set()

    def release(self, worker_id: str, refs: Iterable[tuple[int, int]]) -> None:
        """Give back the slots of finished deliveries ``(task_id, attempt)``; the caller dispatches."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.inflight.difference_update(refs)

    def cancel(self, worker_id: str, refs: Iterable[tuple[int, int]]) -> None:
        """Tell a worker to stop deliveries ``(task_id, attempt)`` of cancelled (or otherwise final) tasks.

        Their slots stay held until the worker reports their final events, as for any delivery.
        """
        tasks = [{"task_id": task_id, "attempt": attempt} for task_id, attempt in refs]
        if worker_id not in self.workers:
            log.debug("not sending CANCEL for %s: worker %s is not connected", tasks, worker_id)
        elif self._send(worker_id.encode(), protocol.CANCEL, {"tasks": tasks}):
            log.debug("sent CANCEL for %s to %s", tasks, worker_id)
        else:
            log.warning("could not send CANCEL for %s to worker %s; it will run them to the end", tasks, worker_id)

    def snapshot(self) -> list[dict]:
        """Connected workers as ``m.workers()`` reports them, each with this server's id and address."""
        here = {"server": self.store.server_id, "server_address": self.address}
        return [{**w.record(), "last_seen": iso(w.last_seen), **here} for w in self.workers.values()]

    def records(self) -> list[dict]:
        """Connected workers as the store records them (store.Store.renew)."""
        return [w.record() for w in self.workers.values()]

    def cancel_finished(self) -> None:
        """Stop the deliveries of connected workers whose tasks are final in the store (cancelled through
        another server whose notice was lost)."""
        held = {ref: worker.id for worker in self.workers.values() for ref in worker.inflight}
        finished = self.store.finished(task_id for task_id, _ in held)
        by_worker: dict[str, list[tuple[int, int]]] = {}
        for ref, worker_id in held.items():
            if ref[0] in finished:
                by_worker.setdefault(worker_id, []).append(ref)
        for worker_id, refs in by_worker.items():
            self.cancel(worker_id, refs)

    def sweep_orphans(self) -> None:
        """Re-queue this server's deliveries that no connected worker has held for a liveness period.

        That covers tasks of a worker that left without reporting them; the grace lets a claim in
        progress finish. Deliveries of a server that is gone (a previous start of this one, or
        another of the cluster) are the cluster beat's (cluster.py), once that server's lease ran out.
        """
        now = time.monotonic()
        held = {ref for worker in self.workers.values() for ref in worker.inflight}
        running = self.store.running()
        self._orphans = {ref: self._orphans.get(ref, now) for ref in running - held}
        grace = self.liveness * max([self.heartbeat, *(w.heartbeat for w in self.workers.values())])
        due = [ref for ref, since in self._orphans.items() if now - since >= grace]
        if due:
            self._give_up(refs=due)
            ids = self.store.requeue(due)
            for ref in due:
                del self._orphans[ref]
            if ids:
                log.warning("re-queued %d running task(s) that no connected worker holds: %s", len(ids), _ids(ids))
                self.wake()

    # ------------------------------------------------------------ greenlets

    def receive_once(self) -> None:
        """Read worker messages: block for one, then drain what is readable before yielding."""
        frames, user_id = self.inbox.recv()
        for _ in range(self.batch_max):
            self._handle(frames, user_id)
            try:
                frames, user_id = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                break

    def dispatch_once(self) -> None:
        """Wait to be woken (or ``poll`` seconds), then hand queued tasks to workers with free slots."""
        self._wakeup.wait(self.poll)
        self._wakeup.clear()
        try:
            self.dispatch()
        except Exception:
            self.wake()  # try again after the caller's backoff
            raise

    def heartbeat_once(self) -> None:
        """Sleep one interval, send HEARTBEAT to every worker, expire the silent ones, sweep orphans.

        The interval is the shortest of the server's and the workers' own, so that no worker
        waits longer for a heartbeat than it expects to.
        """
        gevent.sleep(min([self.heartbeat, *(w.heartbeat for w in self.workers.values())]))
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.expires_at < now:
                self._lose(worker, f"silent for more than {self.liveness * worker.heartbeat:g} s")
            elif not self._send(worker.id.encode(), protocol.HEARTBEAT):
                self._lose(worker, "unreachable")
        self.sweep_orphans()

    # ------------------------------------------------------------ dispatch

    def dispatch(self) -> None:
        """Fill every worker's free slots from the queue, least recently served first.

        The claims join the caller's transaction if there is one (a sink batch, a submit): the
        tasks are sent once it has committed, so a worker never runs a claim that was not stored.
        """
        with self.store.transaction():
            now = time.time()
            for worker in list(self.workers.values()):
                if worker.free <= 0:
                    continue
                tasks = self.store.claim(worker.id, worker.free, now)
                self._wake_at(self.store.window_opens)
                if not tasks:
                    return
                refs = [(t["task_id"], t["attempt"]) for t in tasks]
                # Held from now on, so no other claim counts these slots as free.
                worker.inflight.update(refs)
                self.store.on_rollback(functools.partial(worker.inflight.difference_update, refs))
                self.store.after_commit(functools.partial(self._deliver, worker, tasks, refs))

    def _wake_at(self, at: float | None) -> None:
        """Wake the dispatcher at ``at`` (epoch seconds), when a rate held tasks back until then; None: no need.

        One wake-up is pending at a time, the earliest asked for. If the claim does not commit, it only costs
        a look at the queue.
        """
        if at is None or (self._window_timer is not None and self._window_at <= at):
            return
        if self._window_timer is not None:
            self._window_timer.kill(block=False)
        self._window_at = at
        # A little after the window opens: the claim then finds the oldest start out of it whatever the rounding.
        self._window_timer = gevent.spawn_later(max(0.0, at - time.time()) + _WINDOW_SLACK, self._window_opened)

    def _window_opened(self) -> None:
        self._window_timer = None
        self.wake()

    def _deliver(self, worker: WorkerInfo, tasks: list[dict], refs: list[tuple[int, int]]) -> None:
        """Send claimed tasks to their worker; if it cannot be reached, undo the claims and lose it."""
        if not self._send(worker.id.encode(), protocol.TASK, {"tasks": tasks}):
            worker.inflight.difference_update(refs)
            self.store.unclaim(refs)
            self._lose(worker, "unreachable")
            return
        if worker.id in self.workers:
            self.workers.move_to_end(worker.id)
        if log.isEnabledFor(logging.DEBUG):
            for task in tasks:
                log.debug("dispatched task %s (%s) attempt %s to %s", task["task_id"], task["name"], task["attempt"],
                          worker.id)  # fmt: skip

    # ------------------------------------------------------------ messages

    def _handle(self, frames: list[bytes], user_id: str | None = None) -> None:
        if len(frames) < 2:
            self.rejections.reject(ProtocolError("worker socket: message without a routing id"))
            return
        identity = frames[0]
        try:
            command, body = protocol.parse_worker_message(frames[1:], protocol.WORKER_COMMANDS, self.max_bytes)
            worker_id = _worker_id(identity)
            if not security.bound_to_key(worker_id, user_id):
                raise ProtocolError(
                    f"worker {worker_id!r} is not the worker of the key that sent it", "unauthenticated"
                )
            if command == protocol.READY:
                self._ready(worker_id, protocol.check_ready(body), user_id)
                return
            worker = self.workers.get(worker_id)
            if worker is None:
                # Valid command from a peer we do not know: tell it to register again.
                if command != protocol.DISCONNECT:
                    self._send(identity, protocol.DISCONNECT, {"reason": "unknown worker, send READY"})
                return
            worker.last_seen = time.time()
            worker.expires_at = time.monotonic() + self.liveness * worker.heartbeat
            if command == protocol.DISCONNECT:
                self._leave(worker, protocol.check_task_refs(body, "running"))
            elif command == protocol.CREDIT:
                credit = protocol.check_credit(body)
                worker.slots, worker.prefetch = credit["slots"], credit["prefetch"]
                self.wake()
        except ProtocolError as exc:
            self.rejections.reject(exc)

    def _ready(self, worker_id: str, body: dict, user_id: str | None = None) -> None:
        if body["worker"] != worker_id:
            raise ProtocolError(f"READY: worker {body['worker']!r} does not match routing id {worker_id!r}", "bad_body")
        known = self.workers.get(worker_id)
        running = {(r["task_id"], r["attempt"]) for r in body["running"]}
        worker = WorkerInfo(
            id=worker_id,
            host=body["host"],
            pid=body["pid"],
            handlers=tuple(sorted(set(body["handlers"]))),
            slots=body["slots"],
            prefetch=body["prefetch"],
            heartbeat=float(body["heartbeat"]),
            expires_at=time.monotonic() + self.liveness * float(body["heartbeat"]),
            # What it lists is the truth: a TASK in flight to its old socket was lost with it, and
            # left unheld, its task is re-queued by sweep_orphans.
            inflight=running,
            user_id=user_id,
            key=None if user_id is None or self.inbox.auth is None else self.inbox.auth.key_name(user_id),
        )
        if known is None:
            log.info(
                "worker %s joined (host %s, pid %s, %d slot(s), handlers: %s)",
                worker_id,
                worker.host,
                worker.pid,
                worker.slots,
                ", ".join(worker.handlers) or "none",
            )
            self._compare_handlers(worker)
        self.workers[worker_id] = worker
        # A worker that moved here from another server (dead, or out of its reach) brings its
        # deliveries along: this server owns them from now on.
        adopted = self.store.adopt(worker_id, sorted(running))  # a copy: the set is the worker's inflight from now on
        if adopted:
            log.info("worker %s brought %d running task(s) from another server: %s", worker_id, len(adopted),
                     _ids(adopted))  # fmt: skip
        # A worker back after a restart may still run tasks that were cancelled (or finished
        # by another delivery) meanwhile: stop them.
        finished = self.store.finished(task_id for task_id, _ in running)
        if finished:
            self.cancel(worker_id, [ref for ref in running if ref[0] in finished])
        self.wake()

    def _compare_handlers(self, joined: WorkerInfo) -> None:
        for other in self.workers.values():
            if set(other.handlers) != set(joined.handlers):
                missing = sorted(set(other.handlers) - set(joined.handlers))
                extra = sorted(set(joined.handlers) - set(other.handlers))
                log.warning(
                    "worker %s serves a different set of tasks from worker %s (missing: %s; extra: %s): "
                    "tasks it lacks will fail there; give every worker the same handlers",
                    joined.id,
                    other.id,
                    ", ".join(missing) or "none",
                    ", ".join(extra) or "none",
                )
                return

    def _leave(self, worker: WorkerInfo, handed_back: list[dict]) -> None:
        """DISCONNECT: re-queue the tasks the worker hands back; results of the others may still arrive."""
        self.workers.pop(worker.id, None)
        ids = self.store.requeue((r["task_id"], r["attempt"]) for r in handed_back)
        log.info("worker %s left, handing back %d task(s)%s", worker.id, len(ids), f": {_ids(ids)}" if ids else "")
        if ids:
            self.wake()

    def _key_refused(self, user_id: str) -> None:
        """A message came from a key no longer allowed: the workers of that key are lost, their tasks re-queued."""
        for worker in [w for w in self.workers.values() if w.user_id == user_id]:
            self._lose(worker, "its key is no longer allowed")

    def _lose(self, worker: WorkerInfo, why: str) -> None:
        self.workers.pop(worker.id, None)
        self._give_up(worker=worker.id)
        ids = self.store.requeue_worker(worker.id)
        log.warning("worker %s lost: %s", worker.id, why)
        if ids:
            log.warning("re-queued %d task(s) of worker %s: %s", len(ids), worker.id, _ids(ids))
            self.wake()

    def _give_up(self, **lost: Any) -> None:
        failed = self.store.give_up_lost(now=time.time(), **lost)
        if failed:
            log.warning("failed %d task(s) delivered %d times, each time to a worker that was lost: %s",
                        len(failed), self.store.max_deliveries, _ids(failed))  # fmt: skip
            self.on_finished(failed)

    def _send(self, identity: bytes, command: bytes, body: dict | None = None) -> bool:
        try:
            self.socket.send_multipart([identity, *protocol.worker_message(command, body)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            # EHOSTUNREACH (ROUTER_MANDATORY: the peer is gone) or EAGAIN (its pipe is full).
            log.debug("cannot send %s to %r: %s", command.decode(), identity, exc)
            return False


def _worker_id(identity: bytes) -> str:
    """A worker's routing id as text; ProtocolError if it is not UTF-8."""
    try:
        return identity.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"worker socket: routing id {identity[:32]!r} is not UTF-8") from None


def _ids(ids: list[int], shown: int = 20) -> str:
    text = ", ".join(map(str, ids[:shown]))
    return text + (f" and {len(ids) - shown} more" if len(ids) > shown else "")

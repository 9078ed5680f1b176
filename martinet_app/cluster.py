"""This server's membership of the cluster: its lease, its workers' rows, and what it hears from the others.

Every server runs this, on SQLite too (where it is the only one): the lease is how a restarted
server tells the deliveries of its dead predecessor from its own. On PostgreSQL, the listener
(listener.py) hands it the other servers' notices, and each beat is also the safety net for a
notice that was lost: it re-reads what a notice would have said.
"""

from __future__ import annotations

import logging
import os
import socket as pysocket
import time
import uuid

import gevent

from .broker import Broker
from .endpoint import ClientEndpoint
from .scheduler import Scheduler
from .store import Store

log = logging.getLogger(__name__)


def new_server_id() -> str:
    """A server id unique to this start: ``host-pid-random``."""
    return f"{pysocket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Cluster:
    """Holds this server's lease and reacts to the other servers' notices."""

    def __init__(
        self,
        store: Store,
        broker: Broker,
        endpoint: ClientEndpoint,
        scheduler: Scheduler,
        *,
        heartbeat: float,
        liveness: int,
        address: str,
    ) -> None:
        self.store = store
        self.broker = broker
        self.endpoint = endpoint
        self.scheduler = scheduler
        self.heartbeat = heartbeat
        #: Seconds a lease lasts unless renewed: as long as a worker's silence before it is lost.
        self.lease = liveness * heartbeat
        self.address = address
        self.started = time.time()

    def join(self) -> None:
        """Record this server and its first lease."""
        self.store.join(
            host=pysocket.gethostname(), pid=os.getpid(), address=self.address, now=time.time(), lease=self.lease
        )

    def leave(self) -> None:
        """End this server's lease now: its workers move on, and its deliveries are theirs to bring along."""
        self.store.leave(time.time())

    def beat_once(self) -> None:
        """Sleep one heartbeat, then renew the lease and re-queue what dead servers left behind."""
        gevent.sleep(self.heartbeat)
        now = time.time()
        self.store.renew(now=now, lease=self.lease, workers=self.broker.records())
        # A dead server's workers get a lease's length to bring their deliveries to another server.
        requeued = self.store.requeue_abandoned(now=now, grace=self.lease, unowned=now - self.started > self.lease)
        if requeued:
            log.warning("re-queued %d task(s) left running by servers that are gone: %s", len(requeued), requeued[:20])
            self.broker.wake()
        if self.store.peers:
            self.caught_up()

    def caught_up(self) -> None:
        """What a lost notice would have said, read from the store: finished tasks for parked ``wait``s,
        cancelled deliveries of this server's workers, queued tasks for free slots, due schedules."""
        self.endpoint.answer_finished()
        self.broker.cancel_finished()
        self.broker.wake()
        self.scheduler.wake()

    def hear(self, message: str) -> None:
        """One notice of another server (store.Store._notice): ``SERVER KIND [PARTS...]``."""
        sender, _, rest = message.partition(" ")
        if sender == self.store.server_id:
            return
        kind, *parts = rest.split()
        try:
            if kind == "queued":
                self.broker.wake()
            elif kind == "schedule":
                self.scheduler.wake()
            elif kind == "final":
                self.endpoint.notify_finished([int(part) for part in parts])
            elif kind == "cancel":
                worker, task_id, attempt = parts
                if worker in self.broker.workers:
                    self.broker.cancel(worker, [(int(task_id), int(attempt))])
            else:
                log.debug("ignored a notice of kind %r from %s", kind, sender)
        except ValueError:
            log.warning("ignored a malformed notice from %s: %.200r", sender, message)

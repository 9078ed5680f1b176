"""The scheduler: moves due one-off tasks to queued and fires recurring schedules.

It sleeps until the earliest due time in the store, or until woken because a new
schedule arrived, never on a fixed tick. Its time is the scheduling clock (clock.py).
"""

from __future__ import annotations

import datetime
import logging

import gevent.event

from . import timespec
from .broker import Broker
from .clock import Clock
from .errors import BadTimeSpec
from .store import Store

log = logging.getLogger(__name__)


class Scheduler:
    """Wakes at the next due time; one pass promotes tasks and fires schedules.

    ``tz`` is the zone of schedules that have none of their own (``serve --tz``); ``clock`` is its time, and
    that of the ``schedule`` and ``every`` requests (the endpoint reads it here).
    """

    def __init__(self, store: Store, broker: Broker, *, tz: datetime.tzinfo, max_sleep: float, clock: Clock) -> None:
        self.store = store
        self.broker = broker
        self.tz = tz
        self.max_sleep = max_sleep
        self.clock = clock
        self._wakeup = gevent.event.Event()

    def wake(self) -> None:
        """Re-read the next due time (a schedule was added)."""
        self._wakeup.set()

    def loop_once(self) -> None:
        """Fire what is due, then sleep until the next due time or a wake-up."""
        self._wakeup.clear()
        self.fire_due(self.clock.now())
        due = self.store.next_due()
        sleep = self.max_sleep if due is None else min(self.max_sleep, due - self.clock.now())
        if sleep > 0:
            self._wakeup.wait(sleep)

    def fire_due(self, now: float) -> None:
        """Promote due tasks, fire due schedules as of ``now`` and hand them to free slots, in one transaction."""
        runs = self._due_runs(now)
        with self.store.transaction():
            promoted = self.store.promote_due(now)
            fired = self.store.fire_recurring(runs, now)
            if promoted or fired:
                self.broker.dispatch()
        if promoted or fired:
            log.debug("scheduler: %d task(s) due, %d recurring run(s) fired", promoted, len(fired))

    def _due_runs(self, now: float) -> list[tuple[int, float, float]]:
        now_dt = datetime.datetime.fromtimestamp(now, datetime.UTC)
        runs = []
        for rec in self.store.due_recurring(now):
            planned = rec["next_run_at"]
            try:
                following = timespec.next_run(
                    rec["interval"],
                    planned=datetime.datetime.fromtimestamp(planned, datetime.UTC),
                    now=now_dt,
                    tz=timespec.parse_zone(rec["tz"]) if rec["tz"] else self.tz,
                    run_at=rec["run_at"],
                    created=datetime.datetime.fromtimestamp(rec["created_at"], datetime.UTC),
                )
            except BadTimeSpec as exc:
                # Left enabled, it would stay due and wake the scheduler in a loop.
                self.store.revoke(rec["id"])
                log.error("recurring schedule %s revoked: it has no next run: %s", rec["id"], exc.message)
                continue
            runs.append((rec["id"], planned, following.timestamp()))
        return runs

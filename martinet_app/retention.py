"""Retention: the server deletes finished tasks once they are older than it keeps them, a small batch at a time,
and the per-minute outcomes (tally.py) once they are older than stats.KEEP_OUTCOMES."""

from __future__ import annotations

import logging
import time

import gevent

from . import config, stats
from .store import Store

log = logging.getLogger(__name__)


class Retention:
    """Deletes succeeded tasks ``keep_succeeded`` seconds after they finished, failed and cancelled ones
    ``keep_failed`` seconds after (None: kept)."""

    def __init__(self, store: Store, *, keep_succeeded: float | None, keep_failed: float | None) -> None:
        self.store = store
        self.rules = [
            (statuses, keep)
            for statuses, keep in ((("succeeded",), keep_succeeded), (("failed", "cancelled"), keep_failed))
            if keep is not None
        ]
        #: Between two passes: often enough that nothing stays much longer than it is kept.
        self.interval = min([config.RETENTION_INTERVAL, *(max(0.5, keep / 2) for _, keep in self.rules)])

    def loop_once(self) -> None:
        """Sleep one interval, then delete what is due, one batch per transaction, yielding between batches."""
        gevent.sleep(self.interval)
        for statuses, keep in self.rules:
            deleted = 0
            while True:
                done = self.store.purge(statuses, finished_before=time.time() - keep, limit=config.PURGE_BATCH)
                deleted += done
                if done < config.PURGE_BATCH:
                    break
                gevent.sleep(0)  # the other loops go first between batches
            if deleted:
                log.info("deleted %d %s task(s) finished more than %g s ago", deleted, "/".join(statuses), keep)
        self.store.forget_outcomes(time.time() - stats.KEEP_OUTCOMES)

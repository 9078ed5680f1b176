"""Run a greenlet's ``loop_once`` forever, surviving failures with capped backoff."""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent

from .errors import MartinetError

log = logging.getLogger(__name__)

#: First and largest pause after a failed loop turn, seconds.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


def forever(loop_once: Callable[[], object], name: str) -> None:
    """Call ``loop_once`` until killed; an exception is logged and the next turn waits a little longer."""
    backoff = BACKOFF_FIRST
    while True:
        try:
            loop_once()
            backoff = BACKOFF_FIRST
            continue
        except MartinetError as exc:  # expected failures (e.g. the database is away): no traceback
            log.warning("%s: %s; retrying in %.1f s", name, exc.message, backoff)
        except Exception:
            log.exception("%s: unexpected error, retrying in %.1f s", name, backoff)
        gevent.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX)

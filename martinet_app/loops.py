"""Run a greenlet's ``loop_once`` until the server stops, surviving failures with capped backoff."""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent.event

from .errors import MartinetError

log = logging.getLogger(__name__)

#: First and largest pause after a failed loop turn, seconds.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


def forever(loop_once: Callable[[], object], name: str, stopping: gevent.event.Event) -> None:
    """Call ``loop_once`` until ``stopping`` is set (or the greenlet is killed); a failure is logged
    and the next turn waits a little longer.

    A failure once ``stopping`` is set ends the loop: it comes from the stop (e.g. a kill that
    broke the turn's query), not from an outage to wait out.
    """
    backoff = BACKOFF_FIRST
    while not stopping.is_set():
        try:
            loop_once()
        except Exception as exc:
            if stopping.is_set():
                _log_stopped_by(name, exc)
                return
            _log_failure(name, exc, backoff)
            stopping.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
        else:
            backoff = BACKOFF_FIRST


def _log_failure(name: str, exc: Exception, backoff: float) -> None:
    if isinstance(exc, MartinetError):  # expected failures (e.g. the database is away): no traceback
        log.warning("%s: %s; retrying in %.1f s", name, exc.message, backoff)
    else:
        log.error("%s: unexpected error, retrying in %.1f s", name, backoff, exc_info=exc)


def _log_stopped_by(name: str, exc: Exception) -> None:
    if isinstance(exc, MartinetError):
        log.info("%s: ended by a failure while stopping: %s", name, exc.message)
    else:
        log.warning("%s: ended by an unexpected error while stopping", name, exc_info=exc)

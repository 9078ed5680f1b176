"""The scheduling clock: the time the scheduler fires by, and that ``schedule`` and ``every`` read times against.

It is the system clock. A test of a date it cannot wait for (a daylight-saving change) sets the environment
variable MARTINET_TEST_CLOCK to an ISO 8601 instant with its offset: the server's scheduling clock then reads
that instant when the server starts and runs on at the real rate. Unset, as in production, it changes nothing;
set, the server logs a warning when it starts, and a value that is not such an instant keeps it from starting.
Everything else (leases, heartbeats, the times of task events and so the due time of a retry, retention,
``stats``, ``execute``) keeps the system clock.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from collections.abc import Mapping

from .errors import ConfigError

#: The environment variable of the test clock.
ENV = "MARTINET_TEST_CLOCK"


@dataclasses.dataclass(frozen=True)
class Clock:
    """The system clock moved by ``offset`` seconds (0 but under a test clock)."""

    offset: float = 0.0

    def now(self) -> float:
        """The scheduling time, epoch seconds."""
        return time.time() + self.offset


def from_environment(environ: Mapping[str, str] = os.environ) -> Clock:
    """The system clock, or the test clock MARTINET_TEST_CLOCK sets (starting now at its instant)."""
    value = environ.get(ENV)
    if not value:
        return Clock()
    try:
        start = datetime.datetime.fromisoformat(value)
    except ValueError:
        start = None
    if start is None or start.utcoffset() is None:
        raise ConfigError(
            f"{ENV}={value!r} is not an ISO 8601 instant with its offset (e.g. 2026-03-29T01:59:59+01:00); "
            "it is for tests only: leave it unset"
        )
    return Clock(offset=start.timestamp() - time.time())

"""LISTEN on PostgreSQL: the messages the other servers of a cluster send at their commits (store.py's notices).

A connection of its own (autocommit, outside the store's), read through the gevent hub. When it
breaks it is opened again, and ``on_gap`` is called once it listens: messages sent meanwhile are
lost, so the caller looks at everything again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gevent.socket import wait_read

from .db import NOTIFY_CHANNEL, connect, first_line
from .errors import StoreUnavailable

log = logging.getLogger(__name__)


class Listener:
    """Hears NOTIFY_CHANNEL and hands each message's payload to ``on_message``."""

    def __init__(self, url: str, on_message: Callable[[str], None], on_gap: Callable[[], None]) -> None:
        self.url = url
        self.on_message = on_message
        self.on_gap = on_gap
        self._conn: Any = None

    def loop_once(self) -> None:
        """Wait for messages and hand them on; connect (again) first if needed.

        Raises:
            StoreUnavailable: the connection failed; the caller's loop waits and calls again.
        """
        try:
            if self._conn is None:
                self._listen()
            wait_read(self._conn.fileno())
            self._conn.poll()
            messages, self._conn.notifies[:] = list(self._conn.notifies), []
        except Exception as exc:
            self.close()
            raise StoreUnavailable(f"cannot listen for the other servers ({first_line(exc)}): retrying") from exc
        for message in messages:
            self.on_message(message.payload)

    def _listen(self) -> None:
        database = connect(self.url, role="listener", pool_size=None)
        database.connect()
        conn = database.connection()
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
        self._conn = conn
        log.debug("listening on %s", NOTIFY_CHANNEL)
        self.on_gap()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - it is broken already; we only want it gone
                pass
            self._conn = None

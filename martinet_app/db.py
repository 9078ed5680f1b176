"""Connections to the database: opening one from a URL, and the transactions the store runs on it.

The server is a single gevent process. A :class:`Connection` is one database connection with a
gevent lock around every transaction, so no two greenlets ever interleave inside one (with
PostgreSQL the driver yields to the hub while it waits on the socket). A transaction's state
(its depth, whether a statement failed, what runs after the commit) belongs to the greenlet
holding the lock while it runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import gevent.lock
import peewee as pw

from .errors import ConfigError, StoreUnavailable

log = logging.getLogger(__name__)

#: Seconds SQLite waits for another process's write lock before an operation fails.
SQLITE_BUSY_TIMEOUT = 0.25
#: The PostgreSQL channel the servers of a cluster wake each other on (listener.py).
NOTIFY_CHANNEL = "martinet"


class Connection:
    """One connection to the store's database and the transactions run on it."""

    def __init__(self, database: pw.Database, url: str) -> None:
        self.db = database
        self.url = url
        self.postgres = isinstance(database, pw.PostgresqlDatabase)
        self._lock = gevent.lock.RLock()
        self._depth = 0  # 1 inside transaction(): nested calls join it
        self._doomed: Exception | None = None  # a statement of the current transaction failed
        self._after_commit: list[Callable[[], None]] = []
        self._on_rollback: list[Callable[[], None]] = []
        self._notices: dict[str, None] = {}  # in order, once each

    def close(self) -> None:
        with self._lock:
            if not self.db.is_closed():
                self.db.close()

    @contextmanager
    def exclusive(self, timeout: float) -> Iterator[bool]:
        """Keep the connection for the calling greenlet: no other enters meanwhile, the others wait at their next call.

        Yields True once held, or False if another greenlet was still inside after ``timeout``
        seconds (then nothing is held). Once held, a connection the driver has closed is dropped,
        so the next call opens a fresh one: psycopg2 closes it when a greenlet is killed in a query.
        """
        if not self._lock.acquire(timeout=timeout):
            yield False
            return
        try:
            if getattr(self.db._state.conn, "closed", False):  # psycopg2's; sqlite3 has no such attribute
                self._discard()
            yield True
        finally:
            self._lock.release()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction for everything done inside, committed on exit (group commit).

        Calls made inside join it instead of committing on their own, so a loop turn's state
        changes cost one commit. Raises StoreUnavailable as :meth:`read` does. See
        :meth:`after_commit` and :meth:`on_rollback`.
        """
        with self.read():
            if self._depth:
                yield
                return
            self._after_commit, self._on_rollback, self._notices = [], [], {}
            try:
                with self.db.atomic():
                    self._depth, self._doomed = 1, None
                    try:
                        yield
                        if self._doomed is not None:
                            # A statement failed and its caller carried on: commit none of the turn.
                            raise self._doomed
                        if self._notices:
                            self._send_notices()
                    finally:
                        self._depth = 0
            except BaseException:
                for undo in self._on_rollback:
                    undo()
                raise
        for then in self._after_commit:
            try:
                then()
            except Exception:  # the commit stands; the caller still has its own work to finish
                log.exception("an action after a commit failed")

    def after_commit(self, then: Callable[[], None]) -> None:
        """Run ``then`` once the current transaction has committed (outside the connection's lock)."""
        self._after_commit.append(then)

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` if the current transaction does not commit (in-memory state that assumed it would)."""
        self._on_rollback.append(undo)

    def notify(self, message: str) -> None:
        """Send ``message`` on PostgreSQL's NOTIFY_CHANNEL when the current transaction commits (and only then)."""
        self._notices[message] = None

    def withdraw(self, message: str) -> None:
        """Do not send ``message`` after all (what it announced is over before the commit)."""
        self._notices.pop(message, None)

    def _send_notices(self) -> None:
        # NOTIFY is transactional: listeners hear it once the commit is on disk, never for a rollback.
        self.db.execute_sql(
            "SELECT pg_notify(%s, message) FROM unnest(%s::text[]) AS message", (NOTIFY_CHANNEL, list(self._notices))
        )

    @contextmanager
    def read(self) -> Iterator[None]:
        """Hold the connection's lock; on a connection error, drop the connection so the next call reconnects.

        Inside a :meth:`transaction`, a failed statement raises StoreUnavailable to its caller
        too, and dooms the transaction: the outermost call rolls it back and raises again.

        Raises:
            StoreUnavailable: the database failed (connection lost, locked, disk full): nothing
                was committed by this call.
        """
        with self._lock:
            if self._depth:
                try:
                    yield
                except (pw.OperationalError, pw.InterfaceError) as exc:
                    self._doomed = exc
                    raise StoreUnavailable(f"the database is unavailable ({first_line(exc)}): try again") from exc
                return
            try:
                yield
            except (pw.OperationalError, pw.InterfaceError) as exc:
                self._discard()
                # The first failure is the one to report: e.g. SQLite rolls back on its own when the
                # disk is full, and peewee's ROLLBACK then fails with "no transaction is active".
                cause: BaseException = exc
                link = exc.__context__
                while link is not None:
                    if isinstance(link, pw.PeeweeException):
                        cause = link
                    link = link.__context__
                reason = first_line(cause)
                log.error("database error on %s: %s", redact(self.url), reason)
                raise StoreUnavailable(
                    f"the database is unavailable ({reason}): the request was not completed; try again"
                ) from exc

    def _discard(self) -> None:
        conn = self.db._state.conn
        try:
            if conn is not None:
                conn.close()
        except Exception:  # noqa: BLE001 - it is broken already; we only want it gone
            pass
        # peewee keeps the failed transaction on its stack; start from a clean state.
        self.db._state.reset()


def first_line(exc: BaseException) -> str:
    """An exception's message's first line, for logs and errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and messages."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def connect(url: str, role: str = "server") -> pw.Database:
    """A peewee database (not yet connected) for ``sqlite:///path`` or ``postgresql://user@host:port/db``.

    ``role`` names the connection in PostgreSQL's ``pg_stat_activity`` (``martinet-ROLE-PID``).
    """
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError(f"bad SQLite URL {url!r}: expected sqlite:///relative/path.db or sqlite:////abs/path.db")
        return pw.SqliteDatabase(
            path,
            thread_safe=False,
            pragmas={
                "journal_mode": "wal",
                # FULL: a committed task survives power loss, not only a process crash.
                "synchronous": "full",
                # SQLite's busy handler sleeps inside C, freezing every greenlet: wait briefly, then fail
                # (StoreUnavailable) and let the caller retry without blocking the loop.
                "busy_timeout": int(SQLITE_BUSY_TIMEOUT * 1000),
                "foreign_keys": 1,
            },
        )
    if parsed.scheme in ("postgres", "postgresql"):
        _install_gevent_wait_callback()
        if not parsed.path.strip("/"):
            raise ConfigError(f"bad PostgreSQL URL {redact(url)!r}: expected postgresql://user@host:port/dbname")
        return pw.PostgresqlDatabase(
            parsed.path.lstrip("/"),
            thread_safe=False,
            user=parsed.username,
            password=parsed.password,
            host=parsed.hostname,
            port=parsed.port or 5432,
            connect_timeout=5,
            # Lets a DBA (or a test) tell this server's connections from others in pg_stat_activity.
            application_name=f"martinet-{role}-{os.getpid()}",
        )
    raise ConfigError(
        f"unsupported database URL {redact(url)!r}: expected sqlite:///path.db or postgresql://user@host:port/dbname"
    )


def _install_gevent_wait_callback() -> None:
    """Make psycopg2 wait on its socket through the gevent hub instead of blocking the process."""
    import psycopg2.extensions
    from gevent.socket import wait_read, wait_write

    def wait(conn: Any, timeout: float | None = None) -> None:
        while True:
            state = conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            if state == psycopg2.extensions.POLL_READ:
                wait_read(conn.fileno(), timeout=timeout)
            elif state == psycopg2.extensions.POLL_WRITE:
                wait_write(conn.fileno(), timeout=timeout)
            else:
                raise psycopg2.OperationalError(f"bad state from poll: {state}")

    psycopg2.extensions.set_wait_callback(wait)

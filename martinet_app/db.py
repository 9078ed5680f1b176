"""Connections to the database: opening them from a URL, and the transactions the store runs on them.

The server is a single gevent process. A :class:`Pool` holds its connections and gives each
greenlet a :class:`Transaction` of its own (its depth, whether a statement failed, what runs
after the commit or a rollback, what to NOTIFY). Transactions that write run one at a time,
under the pool's writer lock: the broker's credit and the order of what runs after each commit
stay as simple as with one connection, and SQLite takes one writer anyway. On PostgreSQL and
MariaDB, reads outside a transaction (a ``status``, a ``list``, a heartbeat's look at running
tasks) run at the same time on connections of their own, each greenlet on the one it checked out
of the pool (at most POOL_SIZE), so a slow read never holds up a write. SQLite keeps one
connection, and reads take the lock as writes do. The listener (listener.py) has a connection
outside the pool.

What differs in the backends' SQL is decided in one place, the :class:`Dialect` of the database
(:func:`dialect_of`): the store and the schema ask it instead of testing the backend themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import gevent
import gevent.event
import gevent.local
import gevent.lock
import peewee as pw

from . import config
from .errors import ConfigError, StoreConflict, StoreUnavailable
from .tally import Tally

log = logging.getLogger(__name__)

#: Seconds SQLite waits for another process's write lock before an operation fails.
SQLITE_BUSY_TIMEOUT = 0.25
#: The PostgreSQL channel the servers of a cluster wake each other on (listener.py).
NOTIFY_CHANNEL = "martinet"
#: Most PostgreSQL (or MariaDB) connections one server's pool opens (the writer's and the readers').
POOL_SIZE = 8
#: Seconds a MariaDB statement waits for a row another server's transaction holds before it fails
#: (StoreUnavailable): InnoDB's own default, 50, would hold this server's writer that long.
MYSQL_LOCK_WAIT_TIMEOUT = 5
#: The oldest MariaDB the store runs on: 10.6 brought SKIP LOCKED; INSERT and DELETE ... RETURNING are 10.5's.
MARIADB_MIN_VERSION = (10, 6)
#: The session's SQL mode on MariaDB: strict, and double quotes name identifiers as in PostgreSQL and SQLite
#: (the raw SQL quotes ``"key"``, a reserved word there).
MYSQL_SQL_MODE = "ANSI_QUOTES,STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO"
#: Table options on MariaDB: utf8mb4 for any character, compared byte for byte as on PostgreSQL and SQLite
#: (names and keys that differ in case or accents are different names and keys).
MYSQL_TABLE_OPTIONS = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
#: peewee's errors that may mean the database is unavailable (for the dialect to decide: Dialect.unavailable).
_UNAVAILABLE = (pw.OperationalError, pw.InterfaceError)
#: MariaDB's error codes of a database that is unavailable rather than refusing a statement (PyMySQL makes every
#: other server error above 999 an OperationalError too, e.g. a trigger's SIGNAL): the connection refused, lost or
#: killed, the server shutting down, a lock wait timeout, a deadlock. Client-side codes (2000 and up) are all such.
_MYSQL_UNAVAILABLE = frozenset({1040, 1044, 1045, 1053, 1077, 1152, 1153, 1154, 1155, 1156, 1157, 1158, 1159, 1160,
                                1161, 1205, 1213, 1927, 4031})  # fmt: skip
#: MariaDB's "Deadlock found when trying to get lock", and PostgreSQL's deadlock_detected and serialization_failure.
_MYSQL_DEADLOCK = 1213
_PG_CONFLICTS = frozenset({"40P01", "40001"})


@dataclasses.dataclass(frozen=True)
class Dialect:
    """What one backend's SQL differs in; the store's and the schema's SQL ask it rather than test the backend."""

    name: str  # "sqlite", "postgresql" or "mysql" (MariaDB)
    #: SELECT ... FOR UPDATE [SKIP LOCKED]: what a transaction reads is locked against the other servers'.
    row_locks: bool = False
    #: UPDATE ... RETURNING (MariaDB has RETURNING for INSERT and DELETE only).
    update_returning: bool = True
    #: Several servers may serve the database at once (a cluster): not SQLite, whose file takes one.
    shared: bool = False
    #: The servers of a cluster wake each other with LISTEN/NOTIFY (PostgreSQL); else they poll.
    notify: bool = False

    @property
    def mysql(self) -> bool:
        return self.name == "mysql"

    def unavailable(self, exc: Exception) -> bool:
        """Whether ``exc`` (one of _UNAVAILABLE) means the database is unavailable (StoreUnavailable), not that
        it refused a statement (which the caller handles as any other failure of it)."""
        if not self.mysql or isinstance(exc, pw.InterfaceError):
            return True
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 2000
        return code >= 2000 or code in _MYSQL_UNAVAILABLE

    def conflict(self, exc: Exception) -> bool:
        """Whether ``exc`` (one of _UNAVAILABLE) is the database breaking a deadlock (or, on PostgreSQL, a
        serialization failure) by rolling this transaction back: running it again may well succeed."""
        if self.mysql:
            return bool(exc.args) and exc.args[0] == _MYSQL_DEADLOCK
        return getattr(getattr(exc, "orig", None), "pgcode", None) in _PG_CONFLICTS

    def insert_ignoring(self, rest: str) -> str:
        """``INSERT rest`` (``INTO table (columns) VALUES ...``) that skips the rows a unique key holds already."""
        return f"INSERT IGNORE {rest}" if self.mysql else f"INSERT {rest} ON CONFLICT DO NOTHING"

    def upsert_adding(self, table: str, key: str, columns: Sequence[str]) -> str:
        """The clause after ``INSERT INTO table ... VALUES ...`` that adds the ``columns`` of a row whose ``key``
        (its primary key's columns, comma-separated) is there already to that row's."""
        if self.mysql:
            return "ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = {table}.{c} + VALUES({c})" for c in columns)
        return f"ON CONFLICT ({key}) DO UPDATE SET " + ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in columns)

    def conflict_target(self, *fields: Any) -> dict[str, Any]:
        """peewee's ``on_conflict`` arguments naming the unique key: MySQL's ON DUPLICATE KEY takes none."""
        return {} if self.mysql else {"conflict_target": list(fields)}

    def transaction_lock(self, db: pw.Database, lock: int) -> None:
        """Hold ``lock`` (a 64-bit constant) to the end of the current transaction: another server's transaction
        taking it waits meanwhile. An advisory lock on PostgreSQL; on MariaDB the row ``lock:N`` of ``meta``
        (an upsert locks it); nothing on SQLite, whose file takes one writer anyway."""
        if self.name == "postgresql":
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (lock,))
        elif self.mysql:
            db.execute_sql(
                'INSERT INTO meta ("key", value) VALUES (%s, %s) ON DUPLICATE KEY UPDATE value = value',
                (f"lock:{lock}", ""),
            )

    @contextlib.contextmanager
    def session_lock(self, db: pw.Database, lock: int) -> Iterator[None]:
        """Hold ``lock`` while inside, also across DDL: a transaction-level lock on PostgreSQL (released at the
        end of the transaction), MariaDB's GET_LOCK (its DDL commits the transaction, and with it row locks)."""
        if not self.mysql:
            self.transaction_lock(db, lock)
            yield
            return
        name = f"martinet:{lock}"
        (held,) = db.execute_sql("SELECT GET_LOCK(%s, %s)", (name, 60)).fetchone()
        if held != 1:
            raise StoreUnavailable(f"another server held the lock {name} for 60 s: try again")
        try:
            yield
        finally:
            db.execute_sql("SELECT RELEASE_LOCK(%s)", (name,))


def dialect_of(db: pw.Database) -> Dialect:
    """The :class:`Dialect` of ``db``."""
    if isinstance(db, pw.PostgresqlDatabase):
        return Dialect("postgresql", row_locks=True, shared=True, notify=True)
    if isinstance(db, pw.MySQLDatabase):
        return Dialect("mysql", row_locks=True, update_returning=False, shared=True)
    return Dialect("sqlite")


@dataclasses.dataclass
class Transaction:
    """The state of one greenlet's transaction."""

    after_commit: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    on_rollback: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    notices: dict[str, None] = dataclasses.field(default_factory=dict)  # in order, once each
    doomed: Exception | None = None  # a statement failed and its caller carried on
    read_only: bool = False  # reads only, beside the writer (PostgreSQL)
    #: What the transaction changes in the task counts (tally.py), written just before it commits.
    tally: Tally = dataclasses.field(default_factory=lambda: Tally())


class Pool:
    """The store's connections to its database, and the transactions run on them."""

    def __init__(self, database: pw.Database, url: str) -> None:
        self.db = database
        self.url = url
        #: Writes a transaction's tally inside it, just before the commit (the store sets it).
        self.write_tally: Callable[[Tally], None] | None = None
        #: Given the seconds each commit took, the COMMIT itself: an fsync on SQLite (the store sets it).
        self.observe_commit: Callable[[float], None] = lambda seconds: None
        self.dialect = dialect_of(database)
        #: Reads outside a transaction run beside the writer, on their own connections (PostgreSQL, MariaDB).
        self.concurrent = isinstance(database, _Pooled)
        self._writer = gevent.lock.RLock()
        self._local = gevent.local.local()
        self._readers = 0
        self._no_readers = gevent.event.Event()
        self._no_readers.set()

    def close(self) -> None:
        with self._writer:
            self._release()
            if isinstance(self.db, _Pooled):
                self.db.close_idle()

    def _current(self) -> Transaction | None:
        return getattr(self._local, "transaction", None)

    @contextlib.contextmanager
    def exclusive(self, timeout: float) -> Iterator[bool]:
        """Keep the store for the calling greenlet: no other greenlet is inside a transaction or a read
        meanwhile, and the others wait at their next transaction.

        Yields True once held, or False if another greenlet was still inside after ``timeout``
        seconds (then nothing is held). Once held, a connection the driver has closed is dropped,
        so the next call opens a fresh one: the drivers close it when a greenlet is killed in a query.
        """
        if not self._writer.acquire(timeout=timeout):
            yield False
            return
        try:
            if not self._no_readers.wait(timeout):
                yield False
                return
            if _closed(self.db._state.conn):
                self._discard()
            yield True
        finally:
            self._writer.release()

    @contextlib.contextmanager
    def transaction(self, read_only: bool = False) -> Iterator[None]:
        """One transaction for everything the calling greenlet does inside, committed on exit (group commit).

        Calls made inside join it instead of committing on their own, so a loop turn's state
        changes cost one commit. Transactions run one at a time (the writer lock). ``read_only``:
        nothing inside writes, so on PostgreSQL it runs beside the writer, as :meth:`read` does
        (each statement sees what is committed when it runs); :meth:`after_commit` and
        :meth:`on_rollback` work the same. Raises StoreUnavailable as :meth:`read` does.
        """
        current = self._current()
        if current is not None:
            if current.read_only and not read_only:
                raise RuntimeError("a write inside a read-only transaction")
            with self._joined():
                yield
            return
        transaction = Transaction(read_only=read_only)
        try:
            with self._reading() if read_only else self._writer:
                self._local.transaction = transaction
                try:
                    with self._failures(), contextlib.nullcontext() if read_only else self.db.atomic():
                        yield
                        if transaction.doomed is not None:
                            # A statement failed and its caller carried on: commit none of the turn.
                            raise transaction.doomed
                        if transaction.tally and self.write_tally is not None:
                            self.write_tally(transaction.tally)
                        if transaction.notices:
                            self._send_notices(transaction.notices)
                        committing = time.perf_counter()
                    if not read_only:
                        self.observe_commit(time.perf_counter() - committing)
                finally:
                    self._local.transaction = None
                    self._release()
        except BaseException:
            for undo in transaction.on_rollback:
                undo()
            raise
        for then in transaction.after_commit:
            try:
                then()
            except Exception:  # the commit stands; the caller still has its own work to finish
                log.exception("an action after a commit failed")

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside the calling greenlet's write transaction: if what runs inside raises, it alone is undone (an SQL
        SAVEPOINT), with the transaction's tally, notices and hooks as they were before it, and the transaction
        goes on. A connection failure inside still dooms the whole transaction (:meth:`read`)."""
        transaction = self._open()
        if transaction.read_only:
            raise RuntimeError("a savepoint inside a read-only transaction")
        tally, notices = transaction.tally.copy(), dict(transaction.notices)
        hooks = len(transaction.after_commit), len(transaction.on_rollback)
        try:
            with self.db.atomic():  # nested in the transaction's own: a savepoint
                yield
        except BaseException:
            transaction.tally, transaction.notices = tally, notices
            del transaction.after_commit[hooks[0] :], transaction.on_rollback[hooks[1] :]
            raise

    def after_commit(self, then: Callable[[], None]) -> None:
        """Run ``then`` once the calling greenlet's transaction has committed (outside the writer lock)."""
        self._open().after_commit.append(then)

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` if the calling greenlet's transaction does not commit (memory that assumed it would)."""
        self._open().on_rollback.append(undo)

    def tally(self) -> Tally:
        """The calling greenlet's transaction's changes to the task counts (tally.py)."""
        return self._open().tally

    def notify(self, message: str) -> None:
        """Send ``message`` on PostgreSQL's NOTIFY_CHANNEL when the current transaction commits (and only then)."""
        self._open().notices[message] = None

    def withdraw(self, message: str) -> None:
        """Do not send ``message`` after all (what it announced is over before the commit)."""
        self._open().notices.pop(message, None)

    def _open(self) -> Transaction:
        transaction = self._current()
        if transaction is None:
            raise RuntimeError("not inside a transaction")
        return transaction

    def _send_notices(self, notices: dict[str, None]) -> None:
        # NOTIFY is transactional: listeners hear it once the commit is on disk, never for a rollback.
        self.db.execute_sql(
            "SELECT pg_notify(%s, message) FROM unnest(%s::text[]) AS message", (NOTIFY_CHANNEL, list(notices))
        )

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """Read (or, inside a transaction, do anything) on the calling greenlet's connection.

        Inside a :meth:`transaction`, a failed statement raises StoreUnavailable to its caller
        too, and dooms the transaction: the outermost call rolls it back and raises again.
        Outside one, on PostgreSQL, the read runs beside the writer and the others on a pooled
        connection, given back when it ends; on SQLite it takes the writer lock.

        Raises:
            StoreUnavailable: the database failed (connection lost, locked, disk full): nothing
                was committed by this call.
        """
        if self._current() is not None:
            with self._joined():
                yield
            return
        with self._reading():
            try:
                with self._failures():
                    yield
            finally:
                self._release()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Beside the writer and the other readers on PostgreSQL (counted, for :meth:`exclusive`); under the
        writer lock on SQLite."""
        if not self.concurrent:
            with self._writer:
                yield
            return
        self._readers += 1
        self._no_readers.clear()
        try:
            yield
        finally:
            self._readers -= 1
            if not self._readers:
                self._no_readers.set()

    @contextlib.contextmanager
    def _joined(self) -> Iterator[None]:
        """Inside the calling greenlet's transaction: a failed statement dooms it."""
        try:
            yield
        except _UNAVAILABLE as exc:
            if not self.dialect.unavailable(exc):
                raise
            self._open().doomed = exc
            if self.dialect.conflict(exc):
                raise StoreConflict(f"the database broke a deadlock ({first_line(exc)}): try again") from exc
            raise StoreUnavailable(f"the database is unavailable ({first_line(exc)}): try again") from exc

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """On a connection error, drop the connection (the next call opens another) and raise StoreUnavailable."""
        try:
            yield
        except _UNAVAILABLE as exc:
            if not self.dialect.unavailable(exc):
                raise
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
            if self.dialect.conflict(exc):
                # Not a failure of the database: it chose this transaction to roll back; the caller runs it again.
                log.warning("deadlock on %s, rolled back: %s", redact(self.url), reason)
                message = f"the database broke a deadlock ({reason}): nothing was committed; try again"
                raise StoreConflict(message) from exc
            log.error("database error on %s: %s", redact(self.url), reason)
            raise StoreUnavailable(
                f"the database is unavailable ({reason}): the request was not completed; try again"
            ) from exc

    def _release(self) -> None:
        """Give the calling greenlet's connection back to the pool (PostgreSQL, MariaDB; SQLite keeps its one)."""
        if self.concurrent and not self.db.is_closed():
            self.db.close()

    def _discard(self) -> None:
        conn = self.db._state.conn
        try:
            if conn is not None:
                conn.close()
        except Exception:  # noqa: BLE001 - it is broken already; we only want it gone
            pass
        if isinstance(self.db, _Pooled) and conn is not None:
            self.db.forget(conn)
        # peewee keeps the failed transaction on its stack; start from a clean state.
        self.db._state.reset()


class _GreenletState(pw._ConnectionState, gevent.local.local):
    """peewee's connection state, one per greenlet: each greenlet works on the connection it checked out."""


class _Pooled(pw.Database):
    """A database with each greenlet on a connection of its own, taken from at most ``pool_size``.

    peewee's own pool (playhouse.pool) waits with threading primitives, which would stop the
    whole hub; this one waits on a gevent semaphore. Mixed into each server backend's class.
    """

    def __init__(self, *args: Any, pool_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state = _GreenletState()
        self._idle: list[Any] = []
        self._slots = gevent.lock.BoundedSemaphore(pool_size)

    def _connect(self) -> Any:
        self._slots.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                if not _closed(conn):
                    return conn
            return super()._connect()
        except BaseException:
            self._slots.release()
            raise

    def _close(self, conn: Any) -> None:
        try:
            if _closed(conn) or self._in_transaction(conn):
                super()._close(conn)
            else:
                self._idle.append(conn)
        finally:
            self._slots.release()

    def _in_transaction(self, conn: Any) -> bool:
        """Whether ``conn`` is inside a transaction (then it is closed rather than given to another greenlet)."""
        raise NotImplementedError

    def forget(self, conn: Any) -> None:
        """``conn`` (closed already) is no longer checked out."""
        self._slots.release()

    def close_idle(self) -> None:
        """Close the connections no greenlet holds."""
        while self._idle:
            self._idle.pop().close()


class _PooledPostgresqlDatabase(_Pooled, pw.PostgresqlDatabase):
    """PostgreSQL, pooled."""

    def _in_transaction(self, conn: Any) -> bool:
        import psycopg2.extensions

        return conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE


class _MariaDBDatabase(pw.MySQLDatabase):
    """MariaDB (PyMySQL): refuses a server it cannot run on, and stores TEXT as LONGTEXT (TEXT takes 64 KiB)."""

    field_types = {**pw.MySQLDatabase.field_types, "TEXT": "LONGTEXT"}
    # peewee's ILIKE is a plain LIKE on MySQL: with the tables' binary collation, that would tell case apart.
    operations = {**pw.MySQLDatabase.operations, "ILIKE": "COLLATE utf8mb4_unicode_ci LIKE"}

    def _connect(self) -> Any:
        conn = super()._connect()
        try:
            check_mariadb(conn.get_server_info(), self.connect_params.get("host"))
        except ConfigError:
            conn.close()
            raise
        return conn


def check_mariadb(info: str, host: str | None) -> None:
    """Refuse (ConfigError) a server whose version string ``info`` is not MariaDB 10.6 or newer: that of MySQL
    (no INSERT ... RETURNING, which the store's inserts need), or of an older MariaDB."""
    # "10.11.19-MariaDB-...", or "5.5.5-10.11.19-MariaDB-..." (what an old client protocol shows)
    found = re.search(r"(\d+)\.(\d+)\.\d+-MariaDB", info, re.IGNORECASE)
    if found is None:
        raise ConfigError(
            f"the server at {host} runs MySQL {info}: Martinet supports MariaDB 10.6 or newer only "
            "(its store needs INSERT ... RETURNING, which MySQL lacks); use MariaDB, PostgreSQL or SQLite"
        )
    if (int(found[1]), int(found[2])) < MARIADB_MIN_VERSION:
        raise ConfigError(
            f"the server at {host} runs MariaDB {found[1]}.{found[2]}: Martinet needs MariaDB 10.6 or newer "
            "(SKIP LOCKED); upgrade it, or use PostgreSQL or SQLite"
        )


class _PooledMariaDBDatabase(_Pooled, _MariaDBDatabase):
    """MariaDB, pooled."""

    def _in_transaction(self, conn: Any) -> bool:
        from pymysql.constants import SERVER_STATUS

        return bool((conn.server_status or 0) & SERVER_STATUS.SERVER_STATUS_IN_TRANS)


def _closed(conn: Any) -> bool:
    """Whether the driver has closed ``conn`` (psycopg2's ``closed``, PyMySQL's ``open``; sqlite3 has neither)."""
    return conn is not None and (bool(getattr(conn, "closed", False)) or getattr(conn, "open", True) is False)


def first_line(exc: BaseException) -> str:
    """An exception's message's first line, for logs and errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and messages."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def connect(
    url: str, role: str = "server", pool_size: int | None = POOL_SIZE, durability: str = config.DURABILITY
) -> pw.Database:
    """A peewee database (not yet connected) for ``sqlite:///path``, ``postgresql://user@host:port/db`` or
    ``mysql://user[:password]@host[:port]/db`` (``mariadb://`` too).

    ``role`` names the connections in PostgreSQL's ``pg_stat_activity`` (``martinet-ROLE-PID``);
    ``pool_size``: at most that many, one per greenlet (None: one connection, not pooled);
    ``durability``: one of config.DURABILITIES.
    """
    if durability not in config.DURABILITIES:
        raise ConfigError(f"unknown durability {durability!r}: expected one of {', '.join(config.DURABILITIES)}")
    full = durability == "full"
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
                # FULL: a committed task survives power loss, not only a process crash. NORMAL (durability
                # "process") syncs the WAL only at checkpoints: a commit survives a crash of this process only.
                "synchronous": "full" if full else "normal",
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
        pooled: dict[str, Any] = {} if pool_size is None else {"pool_size": pool_size}
        return (pw.PostgresqlDatabase if pool_size is None else _PooledPostgresqlDatabase)(
            parsed.path.lstrip("/"),
            **pooled,
            thread_safe=False,
            user=parsed.username,
            password=parsed.password,
            host=parsed.hostname,
            port=parsed.port or 5432,
            connect_timeout=5,
            # Lets a DBA (or a test) tell this server's connections from others in pg_stat_activity.
            application_name=f"martinet-{role}-{os.getpid()}",
            # "process": PostgreSQL answers a commit before its WAL reaches the disk.
            **({} if full else {"options": "-c synchronous_commit=off"}),
        )
    if parsed.scheme in ("mysql", "mariadb"):
        if not full:
            raise ConfigError(
                "--durability process is not available on MariaDB: a commit's durability is the server's own "
                "innodb_flush_log_at_trx_commit (2 there is the same trade); serve with --durability full"
            )
        _install_gevent_sockets()
        if not parsed.path.strip("/") or not parsed.hostname:
            raise ConfigError(f"bad MariaDB URL {redact(url)!r}: expected mysql://user[:password]@host[:port]/dbname")
        pooled = {} if pool_size is None else {"pool_size": pool_size}
        return (_MariaDBDatabase if pool_size is None else _PooledMariaDBDatabase)(
            parsed.path.lstrip("/"),
            **pooled,
            thread_safe=False,
            user=parsed.username,
            password=parsed.password or "",
            host=parsed.hostname,
            port=parsed.port or 3306,
            connect_timeout=5,
            charset="utf8mb4",
            sql_mode=MYSQL_SQL_MODE,
            # READ COMMITTED: each statement sees what is committed when it runs, as on PostgreSQL, and the
            # claims' locking reads take no gap locks (REPEATABLE READ's would block other servers' inserts).
            init_command=(
                "SET SESSION tx_isolation = 'READ-COMMITTED', "
                f"SESSION innodb_lock_wait_timeout = {MYSQL_LOCK_WAIT_TIMEOUT}"
            ),
        )
    raise ConfigError(
        f"unsupported database URL {redact(url)!r}: expected sqlite:///path.db, postgresql://user@host:port/dbname "
        "or mysql://user@host:port/dbname"
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


def _install_gevent_sockets() -> None:
    """Make PyMySQL (pure Python) talk over gevent's sockets, which wait through the hub: a query then never
    blocks the process. The server does not monkey-patch the standard library; only PyMySQL's module is."""
    import gevent.socket
    import pymysql.connections

    pymysql.connections.socket = gevent.socket

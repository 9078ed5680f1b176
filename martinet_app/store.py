"""The durable store: every task and recurring schedule, in SQLite or PostgreSQL (peewee).

All SQL lives here. Each public method is one transaction that is committed before it
returns, so whoever acts on a state change acts on something already on disk.

Task lifecycle (TRANSITIONS below is the table; docs/ARCHITECTURE.md draws it)::

    scheduled --(due)--> queued --(claim)--> running --> succeeded | failed
        |                  |  ^                 |
        +--> cancelled <---+  +----(requeue)----+

The server is a single gevent process. The store keeps one connection and a gevent
lock around every transaction, so no two greenlets ever interleave inside one (with
PostgreSQL the driver yields to the hub while it waits on the socket).
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any
from urllib.parse import urlparse

import gevent.lock
import peewee as pw

from .errors import ConfigError, InvalidTransition, StoreUnavailable, TaskNotFound

log = logging.getLogger(__name__)

#: Version of the schema below; recorded in the ``meta`` table for later migrations.
SCHEMA_VERSION = 1


class TaskStatus(str, Enum):
    """Where a task is in its lifecycle."""

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = TaskStatus
#: Allowed transitions; every UPDATE below checks its source state in its WHERE clause.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    S.SCHEDULED: frozenset({S.QUEUED, S.CANCELLED}),
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.SUCCEEDED, S.FAILED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.QUEUED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
FINAL = frozenset(s for s, targets in TRANSITIONS.items() if not targets)

_db = pw.DatabaseProxy()


class _Model(pw.Model):
    class Meta:
        database = _db
        legacy_table_names = False


class Task(_Model):
    """One execution of a handler: the row ``status()`` returns."""

    name = pw.CharField(max_length=255)
    username = pw.CharField(max_length=255, null=True)
    description = pw.TextField(null=True)
    args = pw.TextField(default="{}")
    status = pw.CharField(max_length=16)
    progress = pw.FloatField(default=0.0)
    progress_message = pw.TextField(null=True)
    result = pw.TextField(null=True)
    error = pw.TextField(null=True)
    traceback = pw.TextField(null=True)
    attempts = pw.IntegerField(default=0)
    worker = pw.CharField(max_length=255, null=True)
    created_at = pw.DoubleField()
    run_at = pw.DoubleField()
    started_at = pw.DoubleField(null=True)
    finished_at = pw.DoubleField(null=True)
    recurring_id = pw.IntegerField(null=True, index=True)

    class Meta:
        # "next due" (scheduled by run_at) and "next queued" (queued by run_at, id) are index range scans.
        indexes = ((("status", "run_at", "id"), False),)


class Recurring(_Model):
    """A recurring schedule; the scheduler creates one Task per run."""

    name = pw.CharField(max_length=255)
    username = pw.CharField(max_length=255, null=True)
    description = pw.TextField(null=True)
    args = pw.TextField(default="{}")
    interval = pw.CharField(max_length=255)
    run_at = pw.CharField(max_length=255, null=True)
    next_run_at = pw.DoubleField()
    last_run_at = pw.DoubleField(null=True)
    enabled = pw.BooleanField(default=True)
    created_at = pw.DoubleField()

    class Meta:
        indexes = ((("enabled", "next_run_at"), False),)


class Meta(_Model):
    """Key/value facts about the store itself (``schema_version``)."""

    key = pw.CharField(max_length=64, primary_key=True)
    value = pw.TextField()


TASK_FIELDS = (
    "id", "name", "username", "description", "args", "status", "progress", "progress_message", "result",
    "error", "traceback", "attempts", "worker", "created_at", "run_at", "started_at", "finished_at",
    "recurring_id",
)  # fmt: skip
RECURRING_FIELDS = (
    "id", "name", "username", "description", "args", "interval", "run_at", "next_run_at", "last_run_at",
    "enabled", "created_at",
)  # fmt: skip
_TASK_TIMES = frozenset({"created_at", "run_at", "started_at", "finished_at"})
# A schedule's run_at is the user's text ("midnight"), not a time.
_RECURRING_TIMES = frozenset({"created_at", "next_run_at", "last_run_at"})


def iso(ts: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC string (``...+00:00``), None stays None."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")


class Store:
    """The database behind one server. Open with :meth:`open`; close with :meth:`close`.

    The models are bound to the store opened last: one store per process (the server's).
    """

    def __init__(self, database: pw.Database, url: str) -> None:
        self.db = database
        self.url = url
        self._lock = gevent.lock.RLock()

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect to ``sqlite:///path`` or ``postgresql://user@host:port/db`` and create the schema."""
        database = _connect(url)
        _db.initialize(database)
        store = cls(database, url)
        try:
            with store._tx():
                database.create_tables([Task, Recurring, Meta], safe=True)
                found = Meta.get_or_none(Meta.key == "schema_version")
                if found is None:
                    Meta.create(key="schema_version", value=str(SCHEMA_VERSION))
                elif int(found.value) > SCHEMA_VERSION:
                    raise ConfigError(
                        f"the database at {redact(url)} has schema version {found.value}, newer than this "
                        f"Martinet's {SCHEMA_VERSION}: upgrade Martinet"
                    )
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            if not self.db.is_closed():
                self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One transaction, committed on exit; see :meth:`_read` for connection errors."""
        with self._read(), self.db.atomic():
            yield

    @contextmanager
    def _read(self) -> Iterator[None]:
        """Hold the store's lock; on a connection error, drop the connection so the next call reconnects.

        Raises:
            StoreUnavailable: the database failed (connection lost, locked, disk full): nothing
                was committed by this call.
        """
        with self._lock:
            try:
                yield
            except (pw.OperationalError, pw.InterfaceError) as exc:
                self._discard_connection()
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                log.error("database error on %s: %s", redact(self.url), reason)
                raise StoreUnavailable(
                    f"the database is unavailable ({reason}): the request was not completed; try again"
                ) from exc

    def _discard_connection(self) -> None:
        conn = self.db._state.conn
        try:
            if conn is not None:
                conn.close()
        except Exception:  # noqa: BLE001 - it is broken already; we only want it gone
            pass
        # peewee keeps the failed transaction on its stack; start from a clean state.
        self.db._state.reset()

    # ------------------------------------------------------------ accepting

    def add_task(self, meta: dict, args: dict, *, run_at: float, now: float, recurring_id: int | None = None) -> int:
        """Insert a task: ``queued`` when due (run_at <= now), else ``scheduled``. Returns its id."""
        status = S.QUEUED if run_at <= now else S.SCHEDULED
        with self._tx():
            return Task.insert(
                name=meta["name"],
                username=meta.get("username"),
                description=meta.get("description"),
                args=json.dumps(args),
                status=status.value,
                created_at=now,
                run_at=run_at,
                recurring_id=recurring_id,
            ).execute()

    def add_recurring(self, meta: dict, args: dict, *, interval: str, next_run_at: float, now: float) -> int:
        """Insert an enabled recurring schedule whose first run is ``next_run_at``. Returns its id."""
        with self._tx():
            return Recurring.insert(
                name=meta["name"],
                username=meta.get("username"),
                description=meta.get("description"),
                args=json.dumps(args),
                interval=interval,
                run_at=meta.get("run_at"),
                next_run_at=next_run_at,
                created_at=now,
            ).execute()

    # ------------------------------------------------------------ scheduling

    def next_due(self) -> float | None:
        """The earliest run_at of a scheduled task or next_run_at of an enabled schedule."""
        with self._read():
            task = Task.select(pw.fn.MIN(Task.run_at)).where(Task.status == S.SCHEDULED.value).scalar()
            rec = Recurring.select(pw.fn.MIN(Recurring.next_run_at)).where(Recurring.enabled == True).scalar()  # noqa: E712
        due = [t for t in (task, rec) if t is not None]
        return min(due) if due else None

    def promote_due(self, now: float) -> int:
        """scheduled -> queued for every task whose run_at has come. Returns how many moved."""
        with self._tx():
            return (
                Task.update(status=S.QUEUED.value)
                .where((Task.status == S.SCHEDULED.value) & (Task.run_at <= now))
                .execute()
            )

    def due_recurring(self, now: float) -> list[dict]:
        """Enabled schedules whose next_run_at has come."""
        with self._read():
            query = Recurring.select().where((Recurring.enabled == True) & (Recurring.next_run_at <= now))  # noqa: E712
            return [_recurring_dict(r, raw=True) for r in query]

    def fire_recurring(self, runs: Iterable[tuple[int, float, float]], now: float) -> list[int]:
        """For each ``(recurring_id, planned, next_run_at)``: queue one task and advance the schedule.

        Both happen in one transaction, so a crash can neither lose a run nor fire it twice.
        A schedule revoked or already advanced meanwhile is skipped. Returns the new task ids.
        """
        ids = []
        with self._tx():
            for recurring_id, planned, next_run_at in runs:
                advanced = (
                    Recurring.update(next_run_at=next_run_at, last_run_at=planned)
                    .where(
                        (Recurring.id == recurring_id)
                        & (Recurring.enabled == True)  # noqa: E712
                        & (Recurring.next_run_at == planned)
                    )
                    .execute()
                )
                if not advanced:
                    continue
                rec = Recurring.get_by_id(recurring_id)
                ids.append(
                    Task.insert(
                        name=rec.name,
                        username=rec.username,
                        description=rec.description,
                        args=rec.args,
                        status=S.QUEUED.value,
                        created_at=now,
                        run_at=planned,
                        recurring_id=recurring_id,
                    ).execute()
                )
        return ids

    # ------------------------------------------------------------ dispatching

    def claim(self, worker: str, limit: int, now: float) -> list[dict]:
        """queued -> running for up to ``limit`` oldest queued tasks, assigned to ``worker``.

        Each claim counts as a delivery (``attempts`` + 1). Returns id, name, args, attempt.
        """
        if limit <= 0:
            return []
        with self._tx():
            pick = Task.select(Task.id).where(Task.status == S.QUEUED.value).order_by(Task.run_at, Task.id).limit(limit)
            if self.db.for_update:
                pick = pick.for_update("FOR UPDATE SKIP LOCKED")
            ids = [row.id for row in pick]
            if not ids:
                return []
            rows = (
                Task.update(status=S.RUNNING.value, worker=worker, attempts=Task.attempts + 1, started_at=now)
                .where(Task.id.in_(ids) & (Task.status == S.QUEUED.value))
                .returning(Task.id, Task.name, Task.args, Task.attempts)
                .execute()
            )
            claimed = [
                {"task_id": r.id, "name": r.name, "args": json.loads(r.args), "attempt": r.attempts} for r in rows
            ]
        order = {task_id: position for position, task_id in enumerate(ids)}
        claimed.sort(key=lambda t: order[t["task_id"]])
        return claimed

    def unclaim(self, refs: Iterable[tuple[int, int]]) -> int:
        """running -> queued for claims that were never delivered (``attempts`` - 1)."""
        count = 0
        with self._tx():
            for task_id, attempt in refs:
                count += (
                    Task.update(status=S.QUEUED.value, worker=None, attempts=Task.attempts - 1, started_at=None)
                    .where((Task.id == task_id) & (Task.status == S.RUNNING.value) & (Task.attempts == attempt))
                    .execute()
                )
        return count

    def requeue(self, refs: Iterable[tuple[int, int]]) -> list[int]:
        """running -> queued for each ``(task_id, attempt)`` still running at that attempt.

        For tasks handed back by a leaving worker, or running with no live worker to own them.
        The next delivery counts as a new attempt. Returns the requeued ids.
        """
        ids = []
        with self._tx():
            for task_id, attempt in refs:
                if (
                    Task.update(status=S.QUEUED.value, worker=None)
                    .where((Task.id == task_id) & (Task.status == S.RUNNING.value) & (Task.attempts == attempt))
                    .execute()
                ):
                    ids.append(task_id)
        return ids

    def requeue_worker(self, worker: str) -> list[int]:
        """running -> queued for every task of a worker declared lost. Returns the requeued ids."""
        with self._tx():
            ids = [
                row.id
                for row in Task.select(Task.id)
                .where((Task.status == S.RUNNING.value) & (Task.worker == worker))
                .order_by(Task.id)
            ]
            if ids:
                Task.update(status=S.QUEUED.value, worker=None).where(
                    Task.id.in_(ids) & (Task.status == S.RUNNING.value)
                ).execute()
        return ids

    def running(self) -> list[dict]:
        """Every running task's id, worker and attempt."""
        with self._read():
            query = Task.select(Task.id, Task.worker, Task.attempts).where(Task.status == S.RUNNING.value)
            return [{"task_id": r.id, "worker": r.worker, "attempt": r.attempts} for r in query]

    # ------------------------------------------------------------ status events

    def apply_events(self, batch: list[tuple[str, dict]]) -> list[int]:
        """Write ``(worker, event)`` status events (see protocol.py) in one transaction.

        ``started``/``progress`` apply only to the current delivery (running, same worker and
        attempt). A final event applies if the task is not final yet, whichever delivery sent
        it: the first final result wins, later ones are ignored. Returns the ids made final.
        """
        finished = []
        with self._tx():
            for worker, event in batch:
                task_id, attempt, kind = event["task_id"], event["attempt"], event["event"]
                current = (
                    (Task.id == task_id)
                    & (Task.status == S.RUNNING.value)
                    & (Task.worker == worker)
                    & (Task.attempts == attempt)
                )
                if kind == "started":
                    changed = Task.update(started_at=event["at"]).where(current).execute()
                elif kind == "progress":
                    changed = (
                        Task.update(progress=event["progress"], progress_message=event.get("message"))
                        .where(current)
                        .execute()
                    )
                else:
                    fields: dict[Any, Any] = {"finished_at": event["at"], "worker": worker}
                    if kind == "succeeded":
                        fields.update(status=S.SUCCEEDED.value, result=json.dumps(event.get("result")), progress=1.0)
                    else:
                        fields.update(status=S.FAILED.value, error=event["error"], traceback=event.get("traceback"))
                    changed = (
                        Task.update(fields)
                        .where(
                            (Task.id == task_id)
                            & Task.status.in_([S.QUEUED.value, S.RUNNING.value])
                            & (Task.attempts >= attempt)
                        )
                        .execute()
                    )
                    if changed:
                        finished.append(task_id)
                if not changed:
                    log.debug("ignored stale %s event for task %s attempt %s from %s", kind, task_id, attempt, worker)
        return finished

    # ------------------------------------------------------------ client requests

    def get_task(self, task_id: int) -> dict:
        """The task's record, or TaskNotFound."""
        with self._read():
            row = Task.get_or_none(Task.id == task_id)
        if row is None:
            raise TaskNotFound(f"no task with id {task_id!r}; `martinet list` shows existing tasks")
        return task_dict(row)

    def list_tasks(self, *, status: str | None, name: str | None, username: str | None, limit: int) -> list[dict]:
        """Tasks newest first, filtered by the given fields."""
        query = Task.select().order_by(Task.id.desc()).limit(limit)
        for field, value in ((Task.status, status), (Task.name, name), (Task.username, username)):
            if value is not None:
                query = query.where(field == value)
        with self._read():
            return [task_dict(row) for row in query]

    def cancel(self, task_id: int, now: float) -> dict:
        """scheduled|queued -> cancelled. InvalidTransition for any other state."""
        with self._tx():
            changed = (
                Task.update(status=S.CANCELLED.value, finished_at=now)
                .where((Task.id == task_id) & Task.status.in_([S.SCHEDULED.value, S.QUEUED.value]))
                .execute()
            )
            task = self.get_task(task_id)
        if not changed:
            raise InvalidTransition(
                f"task {task_id} is {task['status']}: only scheduled or queued tasks can be cancelled"
            )
        return task

    def list_recurring(self) -> list[dict]:
        """Every recurring schedule, enabled or revoked, oldest first."""
        with self._read():
            return [_recurring_dict(r) for r in Recurring.select().order_by(Recurring.id)]

    def revoke(self, recurring_id: int) -> dict:
        """Disable a schedule; its past runs stay. InvalidTransition if already revoked."""
        with self._tx():
            row = Recurring.get_or_none(Recurring.id == recurring_id)
            if row is None:
                raise TaskNotFound(f"no recurring schedule with id {recurring_id!r}; `martinet recurring` lists them")
            if not row.enabled:
                raise InvalidTransition(f"recurring schedule {recurring_id} is already revoked")
            row.enabled = False
            row.save()
        return _recurring_dict(row)


def task_dict(row: Task) -> dict:
    """A task row as the client sees it: JSON decoded, times as ISO 8601 UTC."""
    out = {}
    for field in TASK_FIELDS:
        value = getattr(row, field)
        if field in ("args", "result"):
            value = None if value is None else json.loads(value)
        elif field in _TASK_TIMES:
            value = iso(value)
        out[field] = value
    return out


def _recurring_dict(row: Recurring, raw: bool = False) -> dict:
    out = {field: getattr(row, field) for field in RECURRING_FIELDS}
    out["args"] = json.loads(out["args"])
    if not raw:
        for field in _RECURRING_TIMES:
            out[field] = iso(out[field])
    return out


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and messages."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def _connect(url: str) -> pw.Database:
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
                "busy_timeout": 5000,
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

"""The durable store: every task and recurring schedule, in SQLite or PostgreSQL (peewee).

All SQL lives here. Each public method is one transaction that is committed before it
returns, so whoever acts on a state change acts on something already on disk.

Task lifecycle (TRANSITIONS below is the table; docs/ARCHITECTURE.md draws it)::

    scheduled --(due)--> queued --(claim)--> running --> succeeded | failed
    scheduled | queued | running --(cancel)--> cancelled
    running --(handler failed, retries left)--> scheduled
    running --(worker lost or handed the task back)--> queued
    failed | cancelled --(retry)--> queued

The server is a single gevent process. The store keeps one connection and a gevent
lock around every transaction, so no two greenlets ever interleave inside one (with
PostgreSQL the driver yields to the hub while it waits on the socket).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any
from urllib.parse import urlparse

import gevent.lock
import peewee as pw

from . import config, protocol
from .errors import ConfigError, InvalidTransition, StoreUnavailable, TaskNotFound

log = logging.getLogger(__name__)

#: Rows per INSERT statement (SQLite allows 32,766 parameters per statement).
_INSERT_CHUNK = 500
#: Seconds SQLite waits for another process's write lock before an operation fails.
SQLITE_BUSY_TIMEOUT = 0.25
#: Version of the schema below; recorded in the ``meta`` table. 2 added the per-task policy columns,
#: 3 the count of failures (``errors`` keeps only the latest ERRORS_KEPT).
SCHEMA_VERSION = 3
#: PostgreSQL advisory lock taken while the schema is created or migrated (any constant, Martinet's own).
_SCHEMA_LOCK = 0x4D54_4E57_5343_4845
#: Failures a task's ``errors`` keeps, the latest; ``failures`` counts them all.
ERRORS_KEPT = 20
#: Characters of a task's ``error`` that a ``list`` summary carries.
SUMMARY_ERROR_CHARS = 200


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
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED}),
    # running -> scheduled: the handler failed and the task has retries left.
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.QUEUED, S.SCHEDULED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    # failed|cancelled -> queued: a manual retry.
    S.FAILED: frozenset({S.QUEUED}),
    S.CANCELLED: frozenset({S.QUEUED}),
}
#: Statuses a task stays in unless someone retries it; ``wait`` returns on them.
FINAL = frozenset(TaskStatus(status) for status in protocol.FINAL_STATUSES)

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
    priority = pw.IntegerField(default=config.DEFAULT_PRIORITY)
    retries = pw.IntegerField(default=config.DEFAULT_RETRIES)
    retry_delay = pw.DoubleField(default=config.DEFAULT_RETRY_DELAY)
    timeout = pw.DoubleField(null=True)
    errors = pw.TextField(null=True)  # JSON list of {attempt, error, at, worker}: the latest ERRORS_KEPT failures
    # Every failure, also those no longer in errors; a DEFAULT in the schema too, for the raw INSERT of add_tasks.
    failures = pw.IntegerField(default=0, constraints=[pw.SQL("DEFAULT 0")])

    class Meta:
        # "next due" (scheduled by run_at) is a range scan of this index.
        indexes = ((("status", "run_at", "id"), False),)


# "next queued" (queued by priority, highest first, then run_at and id) is a range scan of this one.
Task.add_index(
    Task.index(Task.status, Task.priority.desc(), Task.run_at, Task.id, name="task_status_priority_run_at_id")
)
# `list --status S`, newest first, reads the newest rows of this one instead of sorting every task in S.
Task.add_index(Task.index(Task.status, Task.id, name="task_status_id"))


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
    priority = pw.IntegerField(default=config.DEFAULT_PRIORITY)
    retries = pw.IntegerField(default=config.DEFAULT_RETRIES)
    retry_delay = pw.DoubleField(default=config.DEFAULT_RETRY_DELAY)
    timeout = pw.DoubleField(null=True)

    class Meta:
        indexes = ((("enabled", "next_run_at"), False),)


class Meta(_Model):
    """Key/value facts about the store itself (``schema_version``)."""

    key = pw.CharField(max_length=64, primary_key=True)
    value = pw.TextField()


TASK_FIELDS = (
    "id", "name", "username", "description", "args", "status", "progress", "progress_message", "result",
    "error", "traceback", "attempts", "worker", "created_at", "run_at", "started_at", "finished_at",
    "recurring_id", "priority", "retries", "retry_delay", "timeout", "errors", "failures",
)  # fmt: skip
#: What a ``list`` reply carries of each task: the record without its bulky values (``status`` has them).
SUMMARY_FIELDS = tuple(f for f in TASK_FIELDS if f not in ("args", "result", "traceback", "errors"))
#: A task's policy (see protocol.TASK_OPTION_KEYS): columns of both tables, copied from a schedule to its runs.
OPTION_FIELDS = ("priority", "retries", "retry_delay", "timeout")
RECURRING_FIELDS = (
    "id", "name", "username", "description", "args", "interval", "run_at", "next_run_at", "last_run_at",
    "enabled", "created_at", *OPTION_FIELDS,
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

    def __init__(self, database: pw.Database, url: str, *, retry_delay_max: float, max_deliveries: int) -> None:
        self.db = database
        self.url = url
        self.retry_delay_max = retry_delay_max
        self.max_deliveries = max_deliveries
        self._lock = gevent.lock.RLock()
        self._depth = 0  # 1 inside transaction(): nested calls join it
        self._doomed: Exception | None = None  # a statement of the current transaction failed
        self._after_commit: list[Callable[[], None]] = []
        self._on_rollback: list[Callable[[], None]] = []
        self._sql = _Statements(database.param, skip_locked=bool(database.for_update))

    # ------------------------------------------------------------ opening

    @classmethod
    def open(
        cls, url: str, *, retry_delay_max: float = config.RETRY_DELAY_MAX, max_deliveries: int = config.MAX_DELIVERIES
    ) -> Store:
        """Connect to ``sqlite:///path`` or ``postgresql://user@host:port/db``; create or migrate the schema.

        ``retry_delay_max`` caps the backoff between retries of a failing task, seconds;
        ``max_deliveries`` is how many lost deliveries a task may have (:meth:`give_up_lost`).
        """
        database = _connect(url)
        _db.initialize(database)
        store = cls(database, url, retry_delay_max=retry_delay_max, max_deliveries=max_deliveries)
        try:
            with store.transaction():
                store._create_or_migrate()
        except BaseException:
            store.close()
            raise
        return store

    def _create_or_migrate(self) -> None:
        """Create missing tables, bring an older schema up to SCHEMA_VERSION, refuse a newer one.

        On PostgreSQL, under a lock held to the end of the transaction: servers starting together
        on one database create or migrate the schema one after the other (without it, both try to
        create the same tables and one fails on PostgreSQL's own catalog).
        """
        if isinstance(self.db, pw.PostgresqlDatabase):
            self.db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        found = Meta.get_or_none(Meta.key == "schema_version") if self.db.table_exists("meta") else None
        version = None if found is None else int(found.value)
        if version is not None and version > SCHEMA_VERSION:
            raise ConfigError(
                f"the database at {redact(self.url)} has schema version {version}, newer than this "
                f"Martinet's {SCHEMA_VERSION}: upgrade Martinet"
            )
        if version is not None:
            for target in range(version + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[target](self.db)
                log.info("migrated the database at %s to schema version %d", redact(self.url), target)
        self.db.create_tables([Task, Recurring, Meta], safe=True)
        if found is None:
            Meta.create(key="schema_version", value=str(SCHEMA_VERSION))
        elif version != SCHEMA_VERSION:
            Meta.update(value=str(SCHEMA_VERSION)).where(Meta.key == "schema_version").execute()

    def close(self) -> None:
        with self._lock:
            if not self.db.is_closed():
                self.db.close()

    @contextmanager
    def exclusive(self, timeout: float) -> Iterator[bool]:
        """Keep the store for the calling greenlet: no other is inside it meanwhile, the others wait at their next call.

        Yields True once held, or False if another greenlet was still inside after ``timeout``
        seconds (then nothing is held). Once held, a connection the driver has closed is dropped,
        so the next call opens a fresh one: psycopg2 closes it when a greenlet is killed in a query.
        """
        if not self._lock.acquire(timeout=timeout):
            yield False
            return
        try:
            if getattr(self.db._state.conn, "closed", False):  # psycopg2's; sqlite3 has no such attribute
                self._discard_connection()
            yield True
        finally:
            self._lock.release()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction for everything done inside, committed on exit (group commit).

        Store calls made inside join it instead of committing on their own, so a loop turn's
        state changes cost one commit. Raises StoreUnavailable as :meth:`_read` does. See
        :meth:`after_commit` and :meth:`on_rollback`.
        """
        with self._read():
            if self._depth:
                yield
                return
            self._after_commit, self._on_rollback = [], []
            try:
                with self.db.atomic():
                    self._depth, self._doomed = 1, None
                    try:
                        yield
                        if self._doomed is not None:
                            # A statement failed and its caller carried on: commit none of the turn.
                            raise self._doomed
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
        """Run ``then`` once the current transaction has committed (outside the store's lock)."""
        self._after_commit.append(then)

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` if the current transaction does not commit (in-memory state that assumed it would)."""
        self._on_rollback.append(undo)

    @contextmanager
    def _read(self) -> Iterator[None]:
        """Hold the store's lock; on a connection error, drop the connection so the next call reconnects.

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
                    raise StoreUnavailable(f"the database is unavailable ({_first_line(exc)}): try again") from exc
                return
            try:
                yield
            except (pw.OperationalError, pw.InterfaceError) as exc:
                self._discard_connection()
                # The first failure is the one to report: e.g. SQLite rolls back on its own when the
                # disk is full, and peewee's ROLLBACK then fails with "no transaction is active".
                cause: BaseException = exc
                link = exc.__context__
                while link is not None:
                    if isinstance(link, pw.PeeweeException):
                        cause = link
                    link = link.__context__
                reason = _first_line(cause)
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

    def add_tasks(
        self, tasks: Sequence[tuple[dict, dict]], *, run_at: float, now: float, options: dict | None = None
    ) -> list[int]:
        """Insert tasks in one transaction: ``queued`` when due (run_at <= now), else ``scheduled``.

        Returns their ids in the order given. ``options``: any of OPTION_FIELDS (checked by
        protocol.check_options), shared by all; the others take the column default.
        """
        status = (S.QUEUED if run_at <= now else S.SCHEDULED).value
        shared = (status, now, run_at, 0.0, 0, *_options(options).values())
        rows = [
            (meta["name"], meta.get("username"), meta.get("description"), protocol.json_text(args), *shared)
            for meta, args in tasks
        ]
        ids: list[int] = []
        with self.transaction():
            for start in range(0, len(rows), _INSERT_CHUNK):
                chunk = rows[start : start + _INSERT_CHUNK]
                params = [value for row in chunk for value in row]
                inserted = self.db.execute_sql(self._sql.insert_tasks(len(chunk)), params).fetchall()
                # One INSERT takes increasing ids in row order, but RETURNING may list them in any order.
                ids += sorted(row[0] for row in inserted)
        return ids

    def add_task(self, meta: dict, args: dict, *, run_at: float, now: float, options: dict | None = None) -> int:
        """Insert one task (see :meth:`add_tasks`); returns its id."""
        return self.add_tasks([(meta, args)], run_at=run_at, now=now, options=options)[0]

    def add_recurring(
        self, meta: dict, args: dict, *, interval: str, next_run_at: float, now: float, options: dict | None = None
    ) -> int:
        """Insert an enabled recurring schedule whose first run is ``next_run_at``. Returns its id.

        ``options`` are as for :meth:`add_task`, and every run gets them.
        """
        with self.transaction():
            return Recurring.insert(
                name=meta["name"],
                username=meta.get("username"),
                description=meta.get("description"),
                args=protocol.json_text(args),
                interval=interval,
                run_at=meta.get("run_at"),
                next_run_at=next_run_at,
                created_at=now,
                **_options(options),
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
        with self.transaction():
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
        with self.transaction():
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
                        **{key: getattr(rec, key) for key in OPTION_FIELDS},
                    ).execute()
                )
        return ids

    # ------------------------------------------------------------ dispatching

    def claim(self, worker: str, limit: int, now: float) -> list[dict]:
        """queued -> running for up to ``limit`` queued tasks, assigned to ``worker``.

        Highest priority first, then oldest run_at, then lowest id. Each claim counts as a
        delivery (``attempts`` + 1). Returns task_id, name, args, attempt and timeout.
        """
        if limit <= 0:
            return []
        with self.transaction():
            rows = self.db.execute_sql(self._sql.claim, (worker, now, limit)).fetchall()
        # RETURNING lists rows in no particular order: restore the queue's.
        rows.sort(key=lambda r: (-r[5], r[6], r[0]))
        return [
            {
                "task_id": task_id,
                "name": name,
                "args": protocol.json_value(args),
                "attempt": attempt,
                "timeout": timeout,
            }
            for task_id, name, args, attempt, timeout, _, _ in rows
        ]

    def unclaim(self, refs: Iterable[tuple[int, int]]) -> int:
        """running -> queued for claims that were never delivered (``attempts`` - 1)."""
        count = 0
        with self.transaction():
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
        with self.transaction():
            for task_id, attempt in refs:
                if (
                    Task.update(status=S.QUEUED.value, worker=None)
                    .where((Task.id == task_id) & (Task.status == S.RUNNING.value) & (Task.attempts == attempt))
                    .execute()
                ):
                    ids.append(task_id)
        return ids

    def give_up_lost(self, *, now: float, worker: str | None = None, refs: Iterable[tuple[int, int]] = ()) -> list[int]:
        """running -> failed for lost deliveries (of ``worker``, or the ``refs``) of tasks delivered
        ``max_deliveries`` times already: each one took its worker down, so the next would too.

        Call it before re-queueing lost deliveries; returns the ids it failed.
        """
        wanted = set(refs)
        failed = []
        with self.transaction():
            query = Task.select(Task.id, Task.attempts, Task.worker, Task.errors, Task.failures).where(
                (Task.status == S.RUNNING.value) & (Task.attempts >= self.max_deliveries)
            )
            if worker is not None:
                query = query.where(Task.worker == worker)
            for row in query:
                if worker is None and (row.id, row.attempts) not in wanted:
                    continue
                error = (
                    f"delivered {row.attempts} times and its worker was lost each time (it died or went silent): "
                    "not delivered again; `martinet retry` runs it once more"
                )
                _fail_running(row, row.attempts, row.worker, at=now, error=error)
                failed.append(row.id)
        return failed

    def fail_delivery(self, task_id: int, attempt: int, worker: str, *, at: float, error: str) -> bool:
        """running -> failed for the current delivery ``(task_id, attempt)`` on ``worker``, with ``error``
        and no retry (its worker's own final event could not be stored). Whether it applied."""
        with self.transaction():
            current = (Task.id == task_id) & (Task.status == S.RUNNING.value) & (Task.attempts == attempt)
            row = Task.get_or_none(current & (Task.worker == worker))
            if row is None:
                return False
            _fail_running(row, attempt, worker, at=at, error=error)
        return True

    def requeue_worker(self, worker: str) -> list[int]:
        """running -> queued for every task of a worker declared lost. Returns the requeued ids."""
        with self.transaction():
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

    def finished(self, task_ids: Iterable[int]) -> set[int]:
        """Those of ``task_ids`` that are final (succeeded, failed or cancelled)."""
        task_ids = list(task_ids)
        if not task_ids:
            return set()
        with self._read():
            query = Task.select(Task.id).where(Task.id.in_(task_ids) & Task.status.in_([f.value for f in FINAL]))
            return {row.id for row in query}

    # ------------------------------------------------------------ status events

    def apply_events(self, batch: list[tuple[str, dict]]) -> Applied:
        """Write ``(worker, event)`` status events (see protocol.py) in one transaction.

        An event applies only to the task's current delivery: the task is running, on the event's
        worker, at the event's attempt (the fence). An event of a delivery superseded since (the
        task was cancelled, re-queued, retried or finished) changes nothing. A ``failed`` event that
        applies counts in ``failures`` and is added to ``errors`` (which keeps the latest
        ERRORS_KEPT); while ``failures`` is at most ``retries``, the task is scheduled again after
        its backoff (:func:`backoff`) instead of failing.
        """
        applied = Applied()
        if not batch:
            return applied
        with self.transaction():
            targets = self._event_targets({event["task_id"] for _, event in batch})
            writes: dict[str, list[tuple]] = {kind: [] for kind in self._sql.events}
            for worker, event in batch:
                target = targets.get(event["task_id"])
                outcome = None if target is None else self._apply_event(target, worker, event, writes)
                if outcome is None:
                    log.debug(
                        "ignored stale %s event for task %s attempt %s from %s",
                        event["event"],
                        event["task_id"],
                        event["attempt"],
                        worker,
                    )
                elif outcome == S.SCHEDULED:
                    applied.retrying.append(event["task_id"])
                elif outcome in FINAL:
                    applied.finished.append(event["task_id"])
            cursor = self.db.cursor()
            # In this order: a started or progress event that applies always comes before its task's final one.
            for kind, sql in self._sql.events.items():
                if writes[kind]:
                    with pw.__exception_wrapper__:  # driver errors as peewee's, as execute_sql raises them
                        cursor.executemany(sql, writes[kind])
        return applied

    def _event_targets(self, task_ids: set[int]) -> dict[int, _Target]:
        """The current state of the events' tasks (locked on PostgreSQL until the transaction ends)."""
        found: dict[int, _Target] = {}
        ids = sorted(task_ids)
        for start in range(0, len(ids), _INSERT_CHUNK):
            chunk = ids[start : start + _INSERT_CHUNK]
            for task_id, status, worker, attempts, retries, retry_delay, errors, failures in self.db.execute_sql(
                self._sql.event_targets(len(chunk)), chunk
            ):
                history = protocol.json_value(errors) if errors else []
                found[task_id] = _Target(task_id, S(status), worker, attempts, retries, retry_delay, history, failures)
        return found

    def _apply_event(self, task: _Target, worker: str, event: dict, writes: dict[str, list[tuple]]) -> S | None:
        """Decide what ``event`` does to ``task`` (updated in place) and queue the write; None if stale.

        The rules are :meth:`apply_events`'; events are decided in batch order against the
        state the earlier ones left.
        """
        kind, attempt, at = event["event"], event["attempt"], event["at"]
        # The fence: only the task's current delivery (running, that attempt, on that worker) changes it.
        if task.status != S.RUNNING or task.worker != worker or task.attempts != attempt:
            return None
        if kind == protocol.STARTED:
            writes["started"].append((at, task.id))
            return S.RUNNING
        if kind == protocol.PROGRESS:
            writes["progress"].append((event["progress"], event.get("message"), task.id))
            return S.RUNNING
        started_at = event.get("started_at")
        if kind == protocol.SUCCEEDED:
            task.status = S.SUCCEEDED
            writes["succeeded"].append((protocol.json_text(event.get("result")), at, started_at, task.id))
            return task.status
        task.failures += 1
        task.errors = _kept(task.errors, {"attempt": attempt, "error": event["error"], "at": at, "worker": worker})
        failure = (protocol.json_text(task.errors), task.failures, event["error"], event.get("traceback"))
        if task.failures <= task.retries:
            task.status = S.SCHEDULED
            retry_at = at + backoff(task.retry_delay, task.failures, self.retry_delay_max)
            writes["retry"].append((*failure, retry_at, task.id))
        else:
            task.status = S.FAILED
            writes["failed"].append((*failure, at, started_at, task.id))
        return task.status

    # ------------------------------------------------------------ client requests

    def get_task(self, task_id: int) -> dict:
        """The task's record, or TaskNotFound."""
        _check_id(task_id, _no_task)
        with self._read():
            row = Task.get_or_none(Task.id == task_id)
        if row is None:
            raise _no_task(task_id)
        return task_dict(row)

    def list_tasks(
        self, *, status: str | None, name: str | None, username: str | None, limit: int, before: int | None = None
    ) -> list[dict]:
        """Summaries (SUMMARY_FIELDS) of tasks newest first, filtered by the given fields; ``before``: ids below it."""
        query = Task.select(*(getattr(Task, f) for f in SUMMARY_FIELDS)).order_by(Task.id.desc()).limit(limit)
        for field, value in ((Task.status, status), (Task.name, name), (Task.username, username)):
            if value is not None:
                query = query.where(field == value)
        if before is not None and before <= config.MAX_ID:
            query = query.where(Task.id < before)
        with self._read():
            return [task_summary(row) for row in query]

    def cancel(self, task_id: int, now: float) -> dict:
        """scheduled|queued|running -> cancelled; returns the record. InvalidTransition for a final task.

        A running task keeps its ``worker`` and ``attempts``, so the caller can tell that worker
        to stop the delivery; the delivery's own final event is then ignored.
        """
        _check_id(task_id, _no_task)
        with self.transaction():
            changed = (
                Task.update(status=S.CANCELLED.value, finished_at=now)
                .where((Task.id == task_id) & Task.status.in_([S.SCHEDULED.value, S.QUEUED.value, S.RUNNING.value]))
                .execute()
            )
            task = self.get_task(task_id)
        if not changed:
            raise InvalidTransition(
                f"task {task_id} is {task['status']}: only scheduled, queued or running tasks can be cancelled"
            )
        return task

    def retry(self, task_id: int, now: float) -> dict:
        """failed|cancelled -> queued, due now; returns the record. InvalidTransition for any other state.

        The task keeps its ``attempts`` and ``errors`` history; its last outcome (result, error,
        traceback, progress, times of the last run, worker) is cleared.
        """
        _check_id(task_id, _no_task)
        with self.transaction():
            changed = (
                Task.update(
                    status=S.QUEUED.value,
                    run_at=now,
                    result=None,
                    error=None,
                    traceback=None,
                    progress=0.0,
                    progress_message=None,
                    started_at=None,
                    finished_at=None,
                    worker=None,
                )
                .where((Task.id == task_id) & Task.status.in_([S.FAILED.value, S.CANCELLED.value]))
                .execute()
            )
            task = self.get_task(task_id)
        if not changed:
            raise InvalidTransition(
                f"task {task_id} is {task['status']}: only failed or cancelled tasks can be retried"
            )
        return task

    def list_recurring(self) -> list[dict]:
        """Every recurring schedule, enabled or revoked, oldest first."""
        with self._read():
            return [_recurring_dict(r) for r in Recurring.select().order_by(Recurring.id)]

    def revoke(self, recurring_id: int) -> dict:
        """Disable a schedule; its past runs stay. InvalidTransition if already revoked."""
        _check_id(recurring_id, _no_schedule)
        with self.transaction():
            row = Recurring.get_or_none(Recurring.id == recurring_id)
            if row is None:
                raise _no_schedule(recurring_id)
            if not row.enabled:
                raise InvalidTransition(f"recurring schedule {recurring_id} is already revoked")
            row.enabled = False
            row.save()
        return _recurring_dict(row)


@dataclasses.dataclass
class Applied:
    """What :meth:`Store.apply_events` changed: tasks made final, and tasks scheduled for a retry."""

    finished: list[int] = dataclasses.field(default_factory=list)
    retrying: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Target:
    """A task as :meth:`Store.apply_events` needs it, updated as the batch's events are decided."""

    id: int
    status: TaskStatus
    worker: str | None
    attempts: int
    retries: int
    retry_delay: float
    errors: list[dict]
    failures: int


class _Statements:
    """The SQL of the hot paths, written once per store: building it with peewee per call costs more than running it.

    ``param`` is the driver's placeholder (``?`` for SQLite, ``%s`` for psycopg2).
    """

    def __init__(self, param: str, *, skip_locked: bool) -> None:
        self.param = param
        lock = " FOR UPDATE SKIP LOCKED" if skip_locked else ""
        p = param
        self.claim = (
            f"UPDATE task SET status = 'running', worker = {p}, attempts = attempts + 1, started_at = {p} "
            f"WHERE id IN (SELECT id FROM task WHERE status = 'queued' ORDER BY priority DESC, run_at, id "
            f"LIMIT {p}{lock}) RETURNING id, name, args, attempts, timeout, priority, run_at"
        )
        self._event_targets = (
            "SELECT id, status, worker, attempts, retries, retry_delay, errors, failures FROM task WHERE id IN ({})"
            + (" FOR UPDATE" if skip_locked else "")
        )
        self._insert_tasks = f"INSERT INTO task ({', '.join(_INSERT_COLUMNS)}) VALUES {{}} RETURNING id"
        self._insert_row = "(" + ", ".join([p] * len(_INSERT_COLUMNS)) + ")"
        self.events = {
            "started": f"UPDATE task SET started_at = {p} WHERE id = {p}",
            "progress": f"UPDATE task SET progress = {p}, progress_message = {p} WHERE id = {p}",
            "succeeded": (
                f"UPDATE task SET status = 'succeeded', result = {p}, progress = 1.0, finished_at = {p}, "
                f"started_at = COALESCE({p}, started_at) WHERE id = {p}"
            ),
            "retry": (
                f"UPDATE task SET status = 'scheduled', errors = {p}, failures = {p}, error = {p}, traceback = {p}, "
                f"run_at = {p}, worker = NULL, progress = 0.0, progress_message = NULL WHERE id = {p}"
            ),
            "failed": (
                f"UPDATE task SET status = 'failed', errors = {p}, failures = {p}, error = {p}, traceback = {p}, "
                f"finished_at = {p}, started_at = COALESCE({p}, started_at) WHERE id = {p}"
            ),
        }

    def event_targets(self, count: int) -> str:
        return self._event_targets.format(", ".join([self.param] * count))

    def insert_tasks(self, count: int) -> str:
        return self._insert_tasks.format(", ".join([self._insert_row] * count))


#: Columns :meth:`Store.add_tasks` fills: the task's own, then the shared status and times, then its policy.
_INSERT_COLUMNS = (
    "name", "username", "description", "args", "status", "created_at", "run_at", "progress", "attempts",
    *OPTION_FIELDS,
)  # fmt: skip


def _first_line(exc: BaseException) -> str:
    """An exception's message's first line, for logs and errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _fail_running(row: Task, attempt: int, worker: str | None, *, at: float, error: str) -> None:
    """running -> failed for good (no retry), ``error`` recorded as the delivery's failure (inside a transaction)."""
    history = protocol.json_value(row.errors) if row.errors else []
    errors = _kept(history, {"attempt": attempt, "error": error, "at": at, "worker": worker})
    Task.update(
        status=S.FAILED.value,
        error=error,
        traceback=None,
        errors=protocol.json_text(errors),
        failures=row.failures + 1,
        finished_at=at,
    ).where((Task.id == row.id) & (Task.status == S.RUNNING.value)).execute()


def _kept(errors: list[dict], failure: dict) -> list[dict]:
    """``errors`` with ``failure`` added, the latest ERRORS_KEPT: a failure costs the same however many came before."""
    return [*errors, failure][-ERRORS_KEPT:]


def backoff(retry_delay: float, failures: int, cap: float) -> float:
    """Seconds before the retry after failure number ``failures``: ``retry_delay``, doubling, at most ``cap``."""
    # 2.0 ** 1024 overflows; far below that the cap applies anyway.
    return min(retry_delay * 2.0 ** min(failures - 1, 1023), cap)


def _options(options: dict | None) -> dict:
    """A task's policy in OPTION_FIELDS order: the given values (only those keys, so nothing stray reaches
    the SQL), the column defaults for the rest."""
    given = options or {}
    defaults = {"priority": config.DEFAULT_PRIORITY, "retries": config.DEFAULT_RETRIES,
                "retry_delay": config.DEFAULT_RETRY_DELAY, "timeout": None}  # fmt: skip
    return {key: given.get(key, defaults[key]) for key in OPTION_FIELDS}


def task_dict(row: Task) -> dict:
    """A task row as the client sees it: JSON decoded (``errors`` as a list), times (also in errors) as ISO 8601 UTC."""
    out = {}
    for field in TASK_FIELDS:
        value = getattr(row, field)
        if field in ("args", "result"):
            value = None if value is None else protocol.json_value(value)
        elif field == "errors":
            value = [{**error, "at": iso(error["at"])} for error in (protocol.json_value(value) if value else [])]
        elif field in _TASK_TIMES:
            value = iso(value)
        out[field] = value
    return out


def task_summary(row: Task) -> dict:
    """A task as a ``list`` reply shows it: SUMMARY_FIELDS, times as ISO 8601 UTC, ``error`` clipped."""
    out = {field: getattr(row, field) for field in SUMMARY_FIELDS}
    for field in _TASK_TIMES:
        out[field] = iso(out[field])
    if out["error"] is not None:
        out["error"] = protocol.clip(out["error"], SUMMARY_ERROR_CHARS)
    return out


def _no_task(task_id: int) -> TaskNotFound:
    return TaskNotFound(f"no task with id {task_id!r}; `martinet list` shows existing tasks")


def _no_schedule(recurring_id: int) -> TaskNotFound:
    return TaskNotFound(f"no recurring schedule with id {recurring_id!r}; `martinet recurring` lists them")


def _check_id(row_id: int, not_found: Callable[[int], TaskNotFound]) -> None:
    """An id no 64-bit column can hold names nothing (and must not reach the driver, which would overflow)."""
    if not 1 <= row_id <= config.MAX_ID:
        raise not_found(row_id)


def _recurring_dict(row: Recurring, raw: bool = False) -> dict:
    out = {field: getattr(row, field) for field in RECURRING_FIELDS}
    out["args"] = protocol.json_value(out["args"])
    if not raw:
        for field in _RECURRING_TIMES:
            out[field] = iso(out[field])
    return out


def _add_policy_columns(database: pw.Database) -> None:
    """Schema 1 -> 2: the policy columns of both tables (and the task's ``errors``); existing ones are kept."""
    double = "DOUBLE PRECISION" if isinstance(database, pw.PostgresqlDatabase) else "REAL"
    policy = (
        ("priority", f"INTEGER NOT NULL DEFAULT {config.DEFAULT_PRIORITY}"),
        ("retries", f"INTEGER NOT NULL DEFAULT {config.DEFAULT_RETRIES}"),
        ("retry_delay", f"{double} NOT NULL DEFAULT {config.DEFAULT_RETRY_DELAY!r}"),
        ("timeout", double),
    )
    for table, columns in (("task", (*policy, ("errors", "TEXT"))), ("recurring", policy)):
        present = {column.name for column in database.get_columns(table)}
        for name, definition in columns:
            if name not in present:
                database.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "{name}" {definition}')


def _add_failures(database: pw.Database) -> None:
    """Schema 2 -> 3: ``failures``, counted from each task's ``errors`` (which until now kept every one)."""
    if "failures" not in {column.name for column in database.get_columns("task")}:
        database.execute_sql('ALTER TABLE "task" ADD COLUMN "failures" INTEGER NOT NULL DEFAULT 0')
    for task_id, errors in database.execute_sql("SELECT id, errors FROM task WHERE errors IS NOT NULL").fetchall():
        history = protocol.json_value(errors)
        database.execute_sql(
            f"UPDATE task SET failures = {database.param}, errors = {database.param} WHERE id = {database.param}",
            (len(history), protocol.json_text(history[-ERRORS_KEPT:]), task_id),
        )


#: Schema migrations: the function that brings a database from version N - 1 to N.
_MIGRATIONS = {2: _add_policy_columns, 3: _add_failures}


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
            application_name=f"martinet-server-{os.getpid()}",
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

"""The durable store: every task and recurring schedule, and the cluster's servers and workers (peewee).

All SQL of the lifecycle lives here; the tables are schema.py's, the connection db.py's. Each
public method is one transaction that is committed before it returns, so whoever acts on a
state change acts on something already on disk. Every status change is a status.Move, allowed
by status.TRANSITIONS: the UPDATEs take their source states from it (status.sql_sources) and
the events are decided by status.decide.

In a cluster (several servers on one PostgreSQL or MariaDB), each server holds a lease (its ``server``
row, renewed every heartbeat) and owns the deliveries it made (``task.server``) while the lease
is current. A server re-queues only its own lost deliveries, and those of a server whose lease
ran out. Changes that another server should act on (tasks queued, tasks final, a running task
cancelled, a schedule added) are announced with NOTIFY at commit (listener.py hears them) on
PostgreSQL; on MariaDB the other servers find them by polling. What differs per backend, the SQL
asks db.Dialect (``self.dialect``).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import peewee as pw

from . import config, protocol, schema
from .db import Dialect, Pool, connect
from .errors import InvalidDependency, InvalidTransition, MartinetError, TaskNotFound
from .limits import Limits
from .metrics import Metrics, Observed
from .schema import ERRORS_KEPT, SCHEMA_VERSION, Paused, Recurring, Server, Task, TaskDependency, TaskMinute, Worker
from .status import FINAL, Move, TaskStatus, decide, initial, sources, sql_final, sql_sources, target
from .tally import Tally

__all__ = ["FINAL", "SCHEMA_VERSION", "Applied", "Store", "TaskStatus", "backoff"]

log = logging.getLogger(__name__)

#: Rows per INSERT statement (SQLite allows 32,766 parameters per statement).
_INSERT_CHUNK = 500
#: Characters of a task's ``error`` that a ``list`` summary carries.
SUMMARY_ERROR_CHARS = 200
#: Task ids per NOTIFY message (PostgreSQL takes at most 8,000 bytes each).
_NOTICE_IDS = 400
#: Lock (db.Dialect.transaction_lock) a claim holds to the end of its transaction while limits apply (any constant,
#: Martinet's own): the servers sharing a database count and claim limited tasks one at a time.
LIMIT_LOCK = 0x4D54_4E57_4C49_4D54
#: The key a task's limits count under (limits.py): its limit_key, or its name.
_LIMIT_KEY = "COALESCE(limit_key, name)"

S, M = TaskStatus, Move


TASK_FIELDS = (
    "id", "name", "username", "description", "args", "status", "progress", "progress_message", "result",
    "error", "traceback", "attempts", "worker", "created_at", "run_at", "started_at", "finished_at",
    "recurring_id", "priority", "retries", "retry_delay", "timeout", "errors", "failures", "server", "key", "after",
    "limit_key", "paused",
)  # fmt: skip
#: What a ``list`` reply carries of each task: the record without its bulky values (``status`` has them).
SUMMARY_FIELDS = tuple(f for f in TASK_FIELDS if f not in ("args", "result", "traceback", "errors"))
#: A task's policy (see protocol.TASK_OPTION_KEYS): columns of both tables, copied from a schedule to its runs.
OPTION_FIELDS = ("priority", "retries", "retry_delay", "timeout", "limit_key")
RECURRING_FIELDS = (
    "id", "name", "username", "description", "args", "interval", "tz", "run_at", "next_run_at", "last_run_at",
    "enabled", "created_at", *OPTION_FIELDS, "paused",
)  # fmt: skip
#: Fields of records that no column holds: whether the task's (or schedule's) name is paused.
_COMPUTED = frozenset({"paused"})
_TASK_TIMES = frozenset({"created_at", "run_at", "started_at", "finished_at"})
# A schedule's run_at is the user's text ("midnight"), not a time.
_RECURRING_TIMES = frozenset({"created_at", "next_run_at", "last_run_at"})
#: The ``worker`` table's columns after its id, in the order :meth:`Store.workers` reads them.
_WORKER_COLUMNS = ("server", "host", "pid", "handlers", "slots", "prefetch", "busy", "last_seen", "key_name")


def iso(ts: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC string (``...+00:00``), None stays None."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")


class Store:
    """The database behind one server. Open with :meth:`open`; close with :meth:`close`.

    The models are bound to the store opened last: one store per process (the server's).
    ``server_id`` names this server in the cluster: its lease, and the deliveries it makes. ``metrics``
    counts what its transactions did once they commit: tasks finished, run times, queue waits, the
    scheduler's lateness, commit times. ``limits`` (limits.py) bound what :meth:`claim` takes.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        retry_delay_max: float,
        max_deliveries: int,
        metrics: Metrics,
        server_id: str = "local",
        limits: Limits | None = None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        pool.observe_commit = metrics.observe_commit
        self.db = pool.db
        self.url = pool.url
        self.retry_delay_max = retry_delay_max
        self.max_deliveries = max_deliveries
        self.server_id = server_id
        self.limits = limits or Limits()
        #: When a rate's window next has room for a key it held back, as the last :meth:`claim` found (None:
        #: none held back): the dispatcher looks again then.
        self.window_opens: float | None = None
        #: Other servers whose lease was current at the last heartbeat: none, no NOTIFY is worth sending.
        self.peers = 0
        self.transaction: Callable[[], AbstractContextManager[None]] = pool.transaction
        self.after_commit = pool.after_commit
        self.on_rollback = pool.on_rollback
        self.savepoint = pool.savepoint
        self.exclusive = pool.exclusive
        self._read = pool.read
        self._tally = pool.tally
        pool.write_tally = self._write_tally
        self.dialect = pool.dialect
        self._sql = _Statements(self.db.param, self.dialect)
        #: Called after a commit with the tasks it cancelled because a dependency failed or was cancelled
        #: (the server answers the ``wait`` requests parked on them), and when it released dependants to run
        #: later (the server wakes its scheduler).
        self.on_final: Callable[[list[int]], None] = lambda task_ids: None
        self.on_scheduled: Callable[[], None] = lambda: None

    # ------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        url: str,
        *,
        retry_delay_max: float = config.RETRY_DELAY_MAX,
        max_deliveries: int = config.MAX_DELIVERIES,
        server_id: str = "local",
        metrics: Metrics | None = None,
        durability: str = config.DURABILITY,
        limits: Limits | None = None,
    ) -> Store:
        """Connect to ``sqlite:///path``, ``postgresql://user@host:port/db`` or ``mysql://user@host:port/db``
        (MariaDB); create or migrate the schema.

        ``retry_delay_max`` caps the backoff between retries of a failing task, seconds;
        ``max_deliveries`` is how many lost deliveries a task may have (:meth:`give_up_lost`);
        ``metrics``: the server's (None: metrics of this store's own); ``durability``: config.DURABILITY;
        ``limits``: what :meth:`claim` may take of each limited key (None: no limits).
        """
        database = connect(url, durability=durability)
        schema.database.initialize(database)
        store = cls(Pool(database, url), retry_delay_max=retry_delay_max, max_deliveries=max_deliveries,
                    metrics=metrics or Metrics(), server_id=server_id, limits=limits)  # fmt: skip
        try:
            with store.transaction():
                schema.create_or_migrate(database, url)
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.pool.close()

    def _notice(self, kind: str, *parts: object) -> None:
        """Tell the other servers of the cluster, at commit, that ``kind`` happened (listener.py)."""
        if self.peers and self.dialect.notify:
            self.pool.notify(self._notice_text(kind, *parts))

    def _notice_text(self, kind: str, *parts: object) -> str:
        return " ".join((self.server_id, kind, *map(str, parts)))

    def _notice_final(self, task_ids: Sequence[int]) -> None:
        for start in range(0, len(task_ids), _NOTICE_IDS):
            self._notice("final", *task_ids[start : start + _NOTICE_IDS])

    def _count(self, observed: Observed) -> None:
        """Have the metrics count ``observed`` once the current transaction commits (never if it rolls back)."""
        if observed:
            self.after_commit(functools.partial(self.metrics.record, observed))

    # ------------------------------------------------------------ accepting

    def add_tasks(
        self,
        tasks: Sequence[tuple[dict, dict]],
        *,
        run_at: float,
        now: float,
        options: dict | None = None,
        request_key: str | None = None,
        after: Sequence[int] = (),
        chain: bool = False,
    ) -> list[int]:
        """Insert tasks in one transaction: ``queued`` when due (run_at <= now), else ``scheduled``.

        Returns their ids in the order given. ``options``: any of OPTION_FIELDS (checked by
        protocol.check_options), shared by all; the others take the column default.

        ``after``: the ids of tasks each waits for (InvalidDependency names one that does not exist,
        and nothing is stored); with ``chain``, only the first task waits for them and each of the
        others for the one before it. A task with dependencies is inserted ``waiting`` and, in the
        same transaction, released if they have all succeeded already, or cancelled if one of them
        failed or was cancelled (:meth:`_settle`).

        Idempotent twice over: a task whose metadata has a ``key`` that a task not yet final
        holds is not inserted, that task's id is returned instead (the database's partial unique
        index decides, also between servers inserting at the same moment); and a request
        (``request_key``, the client's) that was stored already returns the ids it created. Neither
        gets the dependencies of the submission.
        """
        status = initial(due=run_at <= now, waiting=False)
        waits = [bool(after) or (chain and index > 0) for index in range(len(tasks))]
        shared = (now, run_at, 0.0, 0, *_options(options).values())
        rows = [
            (
                meta["name"], meta.get("username"), meta.get("description"), protocol.json_text(args),
                (initial(due=True, waiting=True) if waits[index] else status).value, *shared,
                meta.get("key"), _row_key(request_key, index, len(tasks)),
            )
            for index, (meta, args) in enumerate(tasks)
        ]  # fmt: skip
        ids: list[int] = []
        fresh: set[int] = set()
        with self.transaction():
            if after:
                self._check_dependencies(after)
            for start in range(0, len(rows), _INSERT_CHUNK):
                ids += self._insert_tasks(rows[start : start + _INSERT_CHUNK], fresh)
            if any(waits):
                wanted = {
                    task_id: list(after) if index == 0 or not chain else [ids[index - 1]]
                    for index, task_id in enumerate(ids)
                    if waits[index] and task_id in fresh
                }
                self._depend(wanted, now)
            if not all(waits):
                self._notice("queued" if status == S.QUEUED else "schedule")
        return ids

    def _check_dependencies(self, after: Sequence[int]) -> None:
        """InvalidDependency unless every task of ``after`` exists; they are locked to the end of the transaction
        (PostgreSQL), so that one ending meanwhile, through any server, finds its new dependants."""
        found = self._locked([task_id for task_id in after if task_id <= config.MAX_ID])
        missing = [task_id for task_id in after if task_id not in found]
        if missing:
            raise InvalidDependency(
                f"dependency {missing[0]} does not exist: a task can only wait for tasks already submitted "
                "(`martinet list` shows them), so dependencies never form a cycle"
            )

    def _depend(self, wanted: dict[int, list[int]], now: float) -> None:
        """Record that each new task of ``wanted`` (all ``waiting``) waits for its list of tasks, then release or
        cancel those whose dependencies have ended already."""
        if not wanted:
            return
        p = self.db.param
        cursor = self.db.cursor()
        with pw.__exception_wrapper__:
            cursor.executemany(
                f"UPDATE task SET dependencies = {p} WHERE id = {p}",
                [(protocol.json_text(deps), task_id) for task_id, deps in wanted.items()],
            )
            cursor.executemany(
                self.dialect.insert_ignoring(f"INTO task_dependency (task_id, depends_on) VALUES ({p}, {p})"),
                [(task_id, dep) for task_id, deps in wanted.items() for dep in deps],
            )
        for chunk in _chunks(sorted({dep for deps in wanted.values() for dep in deps})):
            Task.update(dependants=True).where(Task.id.in_(chunk) & (Task.dependants == False)).execute()  # noqa: E712
        self._settle(list(wanted), now)

    def _ended(self, task_ids: Sequence[int], now: float) -> None:
        """Tasks that became final in this transaction: release or cancel the dependants waiting for them."""
        dependants = self._dependants_of(task_ids)
        if dependants:
            self._settle(dependants, now)

    def _dependants_of(self, task_ids: Sequence[int]) -> list[int]:
        """The tasks that depend on any of ``task_ids`` (a range scan of task_dependency's index)."""
        found: set[int] = set()
        for chunk in _chunks(task_ids):
            query = TaskDependency.select(TaskDependency.task_id).where(TaskDependency.depends_on.in_(chunk))
            found.update(task_id for (task_id,) in query.tuples())
        return sorted(found)

    def _settle(self, candidates: list[int], now: float) -> None:
        """Move on those of ``candidates`` that are waiting and whose dependencies have ended (inside a transaction).

        Each is locked first (PostgreSQL): two dependencies ending at once through two servers then
        settle it one after the other, the second seeing the first's outcome. One whose dependency
        failed or was cancelled is cancelled with an error naming it (the lowest such id), and so on
        down its own dependants; one whose dependencies have all succeeded (or were purged since) is
        released: queued with ``run_at`` now, or scheduled if its ``run_at`` is still ahead.
        """
        cancelled_all: list[int] = []
        released = {M.RELEASE: 0, M.RELEASE_LATER: 0}
        while candidates:
            waiting = self._lock_waiting(candidates)
            ended = self._dependency_statuses(list(waiting))
            blocked: dict[str, list[int]] = {}
            moves: dict[Move, list[int]] = {M.RELEASE: [], M.RELEASE_LATER: []}
            for task_id, run_at in waiting.items():
                deps = ended.get(task_id, [])
                blocker = _blocker(deps)
                if blocker is not None:
                    how = "failed" if blocker[1] == S.FAILED else "was cancelled"
                    blocked.setdefault(f"dependency {blocker[0]} {how}", []).append(task_id)
                elif all(status == S.SUCCEEDED for _, status in deps):
                    moves[M.RELEASE if run_at <= now else M.RELEASE_LATER].append(task_id)
            for move, ids in moves.items():
                released[move] += self._release(ids, move, now)
            cancelled: list[int] = []
            for error, ids in blocked.items():
                cancelled += self._cancel_waiting(ids, error, now)
            cancelled_all += cancelled
            candidates = self._dependants_of(cancelled)
        if released[M.RELEASE]:
            self._notice("queued")
        if released[M.RELEASE_LATER]:
            self._notice("schedule")
            self.after_commit(self.on_scheduled)
        if cancelled_all:
            self._notice_final(cancelled_all)
            self.after_commit(functools.partial(self.on_final, cancelled_all))

    def _lock_waiting(self, task_ids: Sequence[int]) -> dict[int, float]:
        """The ``run_at`` of those of ``task_ids`` that are waiting, locked until the transaction ends (PostgreSQL,
        MariaDB)."""
        found: dict[int, float] = {}
        lock = " FOR UPDATE" if self.dialect.row_locks else ""
        for chunk in _chunks(sorted(task_ids)):
            marks = ", ".join([self.db.param] * len(chunk))
            rows = self.db.execute_sql(
                f"SELECT id, run_at FROM task WHERE id IN ({marks}) AND status = '{S.WAITING.value}'{lock}", chunk
            )
            found.update(rows.fetchall())
        return found

    def _dependency_statuses(self, task_ids: Sequence[int]) -> dict[int, list[tuple[int, S]]]:
        """Each task's dependencies still in the store, with their status (a purged one is not listed)."""
        found: dict[int, list[tuple[int, S]]] = {}
        for chunk in _chunks(task_ids):
            query = (
                TaskDependency.select(TaskDependency.task_id, TaskDependency.depends_on, Task.status)
                .join(Task, on=(Task.id == TaskDependency.depends_on))
                .where(TaskDependency.task_id.in_(chunk))
                .tuples()
            )
            for task_id, dep, status in query:
                found.setdefault(task_id, []).append((dep, S(status)))
        return found

    def _release(self, task_ids: list[int], move: Move, now: float) -> int:
        """waiting -> queued (``run_at`` now) or scheduled for ``task_ids``, whose dependencies have all succeeded."""
        if not task_ids:
            return 0
        moved = target(move)
        fields = {"status": moved.value, **({"run_at": now} if move == M.RELEASE else {})}
        count = Task.update(**fields).where(Task.id.in_(task_ids) & _in(move)).execute()
        self._tally().move(S.WAITING, moved, count)
        return count

    def _cancel_waiting(self, task_ids: list[int], error: str, now: float) -> list[int]:
        """waiting -> cancelled for ``task_ids``, with ``error`` (the dependency that failed or was cancelled)."""
        cancelled = decide(S.WAITING, M.CANCEL)
        changes = {"status": cancelled.value, "error": error, "finished_at": now}
        ids = []
        where = Task.id.in_(task_ids) & (Task.status == S.WAITING.value)
        for task_id, name in self._update_returning(where, changes, Task.name):
            ids.append(task_id)
            self._tally().move(S.WAITING, cancelled)
            self._tally().end(name, cancelled)
        return sorted(ids)

    def _insert_tasks(self, rows: list[tuple], fresh: set[int], tries: int = 3) -> list[int]:
        """Insert ``rows`` (one statement); the ids in row order, a conflicting row's the existing task's.
        The ids of the rows inserted are added to ``fresh``."""
        params = [value for row in rows for value in row]
        inserted = sorted(self.db.execute_sql(self._sql.insert_tasks(len(rows)), params).fetchall())
        # One INSERT takes increasing ids in row order (RETURNING lists them in any order): the
        # inserted rows are, in order, those whose keys match the next inserted id's.
        ids: list[int | None] = []
        pending = iter(inserted)
        following = next(pending, None)
        column = _INSERT_COLUMNS.index("status")
        added: Counter[str] = Counter()
        for row in rows:
            if following is not None and following[1:] == row[-2:]:
                ids.append(following[0])
                fresh.add(following[0])
                added[row[column]] += 1
                following = next(pending, None)
            else:
                ids.append(None)
        for status, count in added.items():
            self._tally().move(None, S(status), count)
        missing = [index for index, task_id in enumerate(ids) if task_id is None]
        if missing:
            found = self._existing([rows[index][-2:] for index in missing])
            again = [index for index in missing if found.get(rows[index][-2:]) is None]
            for index in missing:
                ids[index] = found.get(rows[index][-2:])
            if again:
                # Its key's task became final between the INSERT and the look-up: the key is free again.
                if tries <= 1:
                    raise InvalidTransition("a task key changed hands too often while submitting: try again")
                retried = self._insert_tasks([rows[i] for i in again], fresh, tries - 1)
                for index, task_id in zip(again, retried, strict=True):
                    ids[index] = task_id
        return [task_id for task_id in ids if task_id is not None]

    def _existing(self, keys: list[tuple[str | None, str | None]]) -> dict[tuple[str | None, str | None], int]:
        """The tasks holding ``(idempotency_key, request_key)`` pairs: by request key, else a live task's key."""
        found: dict[tuple[str | None, str | None], int] = {}
        by_request = {rk: pair for pair in keys if (rk := pair[1]) is not None}
        if by_request:
            query = Task.select(Task.id, Task.request_key).where(Task.request_key.in_(list(by_request)))
            for task_id, rk in query.tuples():
                found[by_request[rk]] = task_id
        by_key = {pair[0]: pair for pair in keys if pair not in found and pair[0] is not None}
        if by_key:
            live = Task.idempotency_key.in_(list(by_key)) & pw.SQL(f"status NOT IN ({sql_final()})")
            for task_id, ik in Task.select(Task.id, Task.idempotency_key).where(live).tuples():
                for pair in keys:
                    if pair[0] == ik and pair not in found:
                        found[pair] = task_id
        return found

    def add_task(
        self,
        meta: dict,
        args: dict,
        *,
        run_at: float,
        now: float,
        options: dict | None = None,
        request_key: str | None = None,
        after: Sequence[int] = (),
    ) -> int:
        """Insert one task (see :meth:`add_tasks`); returns its id."""
        return self.add_tasks(
            [(meta, args)], run_at=run_at, now=now, options=options, request_key=request_key, after=after
        )[0]

    def add_recurring(
        self,
        meta: dict,
        args: dict,
        *,
        interval: str,
        next_run_at: float,
        now: float,
        tz: str | None = None,
        options: dict | None = None,
        request_key: str | None = None,
    ) -> int:
        """Insert an enabled recurring schedule whose first run is ``next_run_at``. Returns its id.

        ``tz`` is the IANA name of the zone its wall times are in, None for the server's (``serve --tz``).

        ``options`` are as for :meth:`add_task`, and every run gets them. A ``request_key`` stored
        already returns the schedule it created.
        """
        with self.transaction():
            if request_key is not None:
                existing = Recurring.get_or_none(Recurring.request_key == request_key)
                if existing is not None:
                    return existing.id
            recurring_id = (
                Recurring.insert(
                    name=meta["name"],
                    username=meta.get("username"),
                    description=meta.get("description"),
                    args=protocol.json_text(args),
                    interval=interval,
                    tz=tz,
                    run_at=meta.get("run_at"),
                    next_run_at=next_run_at,
                    created_at=now,
                    request_key=request_key,
                    **_options(options),
                )
                .on_conflict_ignore()
                .execute()
            )
            if not recurring_id:  # another server stored this request meanwhile (None, or MariaDB's 0)
                return Recurring.get(Recurring.request_key == request_key).id
            self._notice("schedule")
            return recurring_id

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
            due = self._update_returning(
                _in(M.DUE) & (Task.run_at <= now), {"status": target(M.DUE).value}, Task.run_at
            )
            planned = [run_at for _, run_at in due]
            self._tally().move(S.SCHEDULED, target(M.DUE), len(planned))
            if planned:
                self._notice("queued")
                self._count(Observed(late=[now - run_at for run_at in planned]))
            return len(planned)

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
        observed = Observed()
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
                observed.late.append(now - planned)
            self._tally().move(None, S.QUEUED, len(ids))
            if ids:
                self._notice("queued")
            self._count(observed)
        return ids

    # ------------------------------------------------------------ dispatching

    def claim(self, worker: str, limit: int, now: float) -> list[dict]:
        """queued -> running for up to ``limit`` queued tasks, delivered by this server to ``worker``.

        Highest priority first, then oldest run_at, then lowest id. Each claim counts as a
        delivery (``attempts`` + 1). Returns task_id, name, args, attempt and timeout, and for a
        task with dependencies their results (``dependencies``: id as text -> result; a dependency
        purged since is left out).

        Tasks whose name is paused are left queued, and so are those of a key at its limit (limits.py):
        the claim takes the next ones instead. :attr:`window_opens` says when a rate held some back.
        """
        self.window_opens = None
        if limit <= 0:
            return []
        with self.transaction():
            if self.limits:
                rows = self._claim_limited(worker, limit, now)
            else:
                rows = self._sql.claimed(self.db, (worker, self.server_id, now), None, limit)
            self._tally().move(S.QUEUED, target(M.CLAIM), len(rows))
            if len(rows) < limit:  # nothing is left queued: the other servers need not look
                self.pool.withdraw(self._notice_text("queued"))
        # RETURNING lists rows in no particular order: restore the queue's.
        rows.sort(key=lambda r: (-r[5], r[6], r[0]))
        tasks = [
            {
                "task_id": task_id,
                "name": name,
                "args": protocol.json_value(args),
                "attempt": attempt,
                "timeout": timeout,
            }
            for task_id, name, args, attempt, timeout, _, _, _ in rows
        ]
        waited = {row[0]: protocol.json_value(row[7]) for row in rows if row[7] is not None}
        if waited:
            results = self._results({dep for deps in waited.values() for dep in deps})
            for task in tasks:
                if task["task_id"] in waited:
                    deps = waited[task["task_id"]]
                    task["dependencies"] = {str(dep): results[dep] for dep in deps if dep in results}
        return tasks

    def _results(self, task_ids: set[int]) -> dict[int, Any]:
        """The results of the tasks of ``task_ids`` still in the store."""
        found: dict[int, Any] = {}
        with self._read():
            for chunk in _chunks(sorted(task_ids)):
                query = Task.select(Task.id, Task.result).where(Task.id.in_(chunk)).tuples()
                found.update((task_id, None if text is None else protocol.json_value(text)) for task_id, text in query)
        return found

    def _claim_limited(self, worker: str, limit: int, now: float) -> list[tuple]:
        """:meth:`claim`'s rows when limits apply (inside its transaction): the budget of each limited key is
        counted from the store, under LIMIT_LOCK (another server's claim waits for this transaction, then
        counts what it claimed), and no key gets more than its budget."""
        self.dialect.transaction_lock(self.db, LIMIT_LOCK)
        budgets = self.limits.budgets(self._running_by_key(), self._started_by_key(now))
        chosen = self._pick(limit, budgets)
        rows: list[tuple] = []
        for chunk in _chunks(list(chosen)):
            rows += self._sql.claimed(self.db, (worker, self.server_id, now), chunk)
        started: dict[str, int] = {}
        for task_id, *_ in rows:
            if chosen[task_id] in self.limits.rates:
                started[chosen[task_id]] = started.get(chosen[task_id], 0) + 1
        self._record_starts(started, now)
        self._watch_windows(budgets, started, now)
        return rows

    def _running_by_key(self) -> dict[str, int]:
        """How many tasks of each key with a --limit are running (delivered), in the whole store."""
        keys = sorted(self.limits.running)
        if not keys:
            return {}
        marks = ", ".join([self.db.param] * len(keys))
        query = (
            f"SELECT {_LIMIT_KEY}, COUNT(*) FROM task WHERE status = '{S.RUNNING.value}' "
            f"AND {_LIMIT_KEY} IN ({marks}) GROUP BY {_LIMIT_KEY}"
        )
        return {key: int(n) for key, n in self.db.execute_sql(query, keys).fetchall()}

    def _started_by_key(self, now: float) -> dict[str, int]:
        """How many tasks of each key with a --rate were delivered within its window (the last ``per`` seconds)."""
        rates = sorted(self.limits.rates.items())
        if not rates:
            return {}
        p = self.db.param
        windows = " OR ".join([f'("key" = {p} AND at > {p})'] * len(rates))
        params = [value for key, rate in rates for value in (key, now - rate.per)]
        query = f'SELECT "key", SUM(n) FROM rate_start WHERE {windows} GROUP BY "key"'
        return {key: int(n) for key, n in self.db.execute_sql(query, params).fetchall()}

    def _pick(self, limit: int, budgets: dict[str, int]) -> dict[int, str]:
        """Up to ``limit`` queued tasks, in the queue's order, that no pause or limit holds back: their ids, each
        with its key. Each look at the queue skips the keys out of budget; one that runs out while taken from
        makes the next look skip it too, so there are at most as many looks as limited keys, plus one."""
        left = dict(budgets)
        chosen: dict[int, str] = {}
        while len(chosen) < limit:
            blocked = sorted(key for key, budget in left.items() if budget <= 0)
            want = limit - len(chosen)
            rows = self.db.execute_sql(self._sql.pick(len(blocked), len(chosen)), (*blocked, *chosen, want))
            rows = rows.fetchall()
            for task_id, key in rows:
                if key in left:
                    if left[key] <= 0:
                        continue
                    left[key] -= 1
                chosen[task_id] = key
            if len(rows) < want:
                break
        return chosen

    def _record_starts(self, started: dict[str, int], now: float) -> None:
        """Note the deliveries of rate-limited keys made at ``now``, and forget those that left their window."""
        if not started:
            return
        p = self.db.param
        self.db.execute_sql(
            f'INSERT INTO rate_start ("key", at, n) VALUES {", ".join([f"({p}, {p}, {p})"] * len(started))} '
            + self.dialect.upsert_adding("rate_start", '"key", at', ("n",)),
            [value for key, n in sorted(started.items()) for value in (key, now, n)],
        )
        for key in sorted(started):
            self.db.execute_sql(
                f'DELETE FROM rate_start WHERE "key" = {p} AND at <= {p}', (key, now - self.limits.rates[key].per)
            )

    def _watch_windows(self, budgets: dict[str, int], started: dict[str, int], now: float) -> None:
        """Set :attr:`window_opens` to when the first rate window that this claim found (or left) full has room."""
        p = self.db.param
        opens = []
        for key, rate in sorted(self.limits.rates.items()):
            if budgets[key] > started.get(key, 0):
                continue
            window = self.db.execute_sql(
                f'SELECT at, n FROM rate_start WHERE "key" = {p} AND at > {p} ORDER BY at', (key, now - rate.per)
            ).fetchall()
            at = self.limits.opens_at(key, window)
            if at is not None:
                opens.append(at)
        self.window_opens = min(opens, default=None)

    def unclaim(self, refs: Iterable[tuple[int, int]]) -> int:
        """running -> queued for claims that were never delivered (``attempts`` - 1)."""
        count = 0
        with self.transaction():
            for task_id, attempt in refs:
                count += (
                    Task.update(**_requeued(), attempts=Task.attempts - 1, started_at=None)
                    .where(_delivery(task_id, attempt))
                    .execute()
                )
            self._tally().move(S.RUNNING, target(M.REQUEUE), count)
            if count:
                self._notice("queued")
        return count

    def requeue(self, refs: Iterable[tuple[int, int]]) -> list[int]:
        """running -> queued for each ``(task_id, attempt)`` still running at that attempt.

        For tasks handed back by a leaving worker, or running with no live worker to own them.
        The next delivery counts as a new attempt. Returns the requeued ids.
        """
        ids = []
        with self.transaction():
            for task_id, attempt in refs:
                if Task.update(**_requeued()).where(_delivery(task_id, attempt)).execute():
                    ids.append(task_id)
            self._tally().move(S.RUNNING, target(M.REQUEUE), len(ids))
            if ids:
                self._notice("queued")
        return ids

    def give_up_lost(self, *, now: float, worker: str | None = None, refs: Iterable[tuple[int, int]] = ()) -> list[int]:
        """running -> failed for lost deliveries (this server's of ``worker``, or the ``refs``) of tasks
        delivered ``max_deliveries`` times already: each one took its worker down, so the next would too.

        Call it before re-queueing lost deliveries; returns the ids it failed.
        """
        wanted = set(refs)
        failed = []
        with self.transaction():
            query = Task.select(Task.id, Task.name, Task.attempts, Task.worker, Task.errors, Task.failures).where(
                _in(M.FAIL) & (Task.attempts >= self.max_deliveries)
            )
            if worker is not None:
                query = query.where((Task.worker == worker) & (Task.server == self.server_id))
            for row in query:
                if worker is None and (row.id, row.attempts) not in wanted:
                    continue
                error = (
                    f"delivered {row.attempts} times and its worker was lost each time (it died or went silent): "
                    "not delivered again; `martinet retry` runs it once more"
                )
                if self._fail_running(row, row.attempts, row.worker, at=now, error=error):
                    failed.append(row.id)
            self._notice_final(failed)
        return failed

    def fail_delivery(self, task_id: int, attempt: int, worker: str, *, at: float, error: str) -> bool:
        """running -> failed for the current delivery ``(task_id, attempt)`` on ``worker``, with ``error``
        and no retry (its worker's own final event could not be stored). Whether it applied."""
        with self.transaction():
            row = Task.get_or_none(_delivery(task_id, attempt) & (Task.worker == worker))
            if row is None or not self._fail_running(row, attempt, worker, at=at, error=error, started=row.started_at):
                return False
            self._notice_final([task_id])
        return True

    def _fail_running(
        self, row: Task, attempt: int, worker: str | None, *, at: float, error: str, started: float | None = None
    ) -> bool:
        """running -> failed for good (no retry), ``error`` recorded as the delivery's failure (inside a
        transaction). Whether it applied (the task was still running)."""
        history = protocol.json_value(row.errors) if row.errors else []
        errors = _kept(history, {"attempt": attempt, "error": error, "at": at, "worker": worker, "started_at": started})
        failed = decide(S.RUNNING, M.FAIL)
        changed = (
            Task.update(
                status=failed.value,
                error=error,
                traceback=None,
                errors=protocol.json_text(errors),
                failures=row.failures + 1,
                finished_at=at,
            )
            .where((Task.id == row.id) & (Task.status == S.RUNNING.value))
            .execute()
        )
        if changed:
            self._tally().move(S.RUNNING, failed)
            self._tally().end(row.name, failed, None if started is None else at - started)
            self._ended([row.id], at)
        return bool(changed)

    def requeue_worker(self, worker: str) -> list[int]:
        """running -> queued for every delivery this server made to a worker it declared lost.

        A delivery that another server has adopted since (the worker moved there) is not this
        server's to re-queue. Returns the requeued ids.
        """
        with self.transaction():
            mine = _in(M.REQUEUE) & (Task.worker == worker) & (Task.server == self.server_id)
            ids = [row.id for row in Task.select(Task.id).where(mine).order_by(Task.id)]
            if ids:
                moved = Task.update(**_requeued()).where(Task.id.in_(ids) & mine).execute()
                self._tally().move(S.RUNNING, target(M.REQUEUE), moved)
                self._notice("queued")
        return ids

    def running(self) -> set[tuple[int, int]]:
        """The deliveries (task id, attempt) of every running task this server delivered.

        Read every heartbeat (broker.Broker.sweep_orphans), so on the raw cursor: with 300 tasks running it takes
        0.17 ms of the hub's time a call, where peewee's model objects took 1.4 ms.
        """
        sql = f"SELECT id, attempts FROM task WHERE status = '{S.RUNNING.value}' AND server = {self.db.param}"
        with self._read():
            return set(self.db.execute_sql(sql, (self.server_id,)).fetchall())

    def finished(self, task_ids: Iterable[int]) -> set[int]:
        """Those of ``task_ids`` that are final (succeeded, failed or cancelled)."""
        task_ids = list(task_ids)
        if not task_ids:
            return set()
        with self._read():
            query = Task.select(Task.id).where(Task.id.in_(task_ids) & Task.status.in_([f.value for f in FINAL]))
            return {row.id for row in query}

    # ------------------------------------------------------------ the cluster

    def join(self, *, host: str, pid: int, address: str, now: float, lease: float) -> None:
        """Record this server and its first lease of ``lease`` seconds (its id is new at every start).

        With no other server running, the tasks are counted afresh (a scan, once): the count table then
        holds this server's rows only, whatever changed the store while no server ran.
        """
        with self.transaction():
            if not Server.select().where((Server.lease_until > now) & (Server.id != self.server_id)).exists():
                schema.recount(self.db, self.server_id)
            Server.insert(
                id=self.server_id, host=host, pid=pid, address=address, started_at=now, lease_until=now + lease
            ).on_conflict(**self.dialect.conflict_target(Server.id), preserve=[Server.lease_until]).execute()

    def renew(self, *, now: float, lease: float, workers: list[dict]) -> int:
        """A heartbeat: extend this server's lease by ``lease`` seconds from ``now``, record its connected
        ``workers`` (dicts as broker.WorkerInfo.record() gives them), and count the other live servers.

        Also the cluster's housekeeping: the worker rows of servers whose lease has run out are deleted.
        """
        with self.transaction():
            Server.update(lease_until=now + lease).where(Server.id == self.server_id).execute()
            live = Server.select(Server.id).where(Server.lease_until > now)
            Worker.delete().where((Worker.server == self.server_id) | Worker.server.not_in(live)).execute()
            rows = [
                {
                    "id": w["id"], "server": self.server_id, "host": w["host"], "pid": w["pid"],
                    "handlers": protocol.json_text(w["handlers"]), "slots": w["slots"], "prefetch": w["prefetch"],
                    "busy": w["busy"], "last_seen": w["last_seen"], "key_name": w["key"],
                }
                for w in workers
            ]  # fmt: skip
            for start in range(0, len(rows), _INSERT_CHUNK):
                # A worker that moved here may still have a row of its old server's.
                Worker.insert_many(rows[start : start + _INSERT_CHUNK]).on_conflict(
                    **self.dialect.conflict_target(Worker.id),
                    preserve=[getattr(Worker, column) for column in _WORKER_COLUMNS],
                ).execute()
            self.peers = live.where(Server.id != self.server_id).count()
        return self.peers

    def leave(self, now: float) -> None:
        """This server stops: its lease ends now, its workers' rows go (they move to another server)."""
        with self.transaction():
            Server.update(lease_until=now).where(Server.id == self.server_id).execute()
            Worker.delete().where(Worker.server == self.server_id).execute()

    def workers(self, now: float) -> list[dict]:
        """The workers of the other live servers, as their servers last recorded them, with each one's server."""
        with self._read():
            query = (
                Worker.select(*(getattr(Worker, column) for column in ("id", *_WORKER_COLUMNS)), Server.address)
                .join(Server, on=(Worker.server == Server.id))
                .where((Server.lease_until > now) & (Worker.server != self.server_id))
                .order_by(Worker.id)
                .tuples()
            )
            rows = list(query)
        workers = []
        for worker_id, server, host, pid, handlers, slots, prefetch, busy, last_seen, key, address in rows:
            workers.append(
                {
                    "id": worker_id, "host": host, "pid": pid, "handlers": protocol.json_value(handlers),
                    "slots": slots, "prefetch": prefetch, "busy": busy, "last_seen": iso(last_seen), "key": key,
                    "server": server, "server_address": address,
                }
            )  # fmt: skip
        return workers

    def adopt(self, worker: str, refs: Iterable[tuple[int, int]]) -> list[int]:
        """Make this server the owner of ``worker``'s running deliveries ``(task_id, attempt)``: the worker
        moved here from another server, which may be dead. Returns the ids adopted."""
        ids = []
        with self.transaction():
            for task_id, attempt in refs:
                if (
                    Task.update(server=self.server_id)
                    .where(_delivery(task_id, attempt) & (Task.worker == worker) & (Task.server != self.server_id))
                    .execute()
                ):
                    ids.append(task_id)
        return ids

    def requeue_abandoned(self, *, now: float, grace: float, unowned: bool) -> list[int]:
        """running -> queued for deliveries whose server's lease ran out more than ``grace`` seconds ago,
        their worker not having brought them to another server meanwhile; with ``unowned``, also those no
        server owns (made before servers held leases: schema 3).

        Those already delivered ``max_deliveries`` times fail instead (:meth:`give_up_lost`).
        Returns the requeued ids.
        """
        with self.transaction():
            alive = Server.select(Server.id).where(Server.lease_until > now - grace)
            gone = Task.server.not_in(alive)
            abandoned = (Task.status == S.RUNNING.value) & ((Task.server.is_null() | gone) if unowned else gone)
            refs = [(r.id, r.attempts) for r in Task.select(Task.id, Task.attempts).where(abandoned).order_by(Task.id)]
            if not refs:
                return []
            self.give_up_lost(now=now, refs=refs)
            return self.requeue(refs)

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
        observed = Observed()
        awaited: list[int] = []  # tasks made final that other tasks depend on
        settled_at = 0.0
        with self.transaction():
            targets = self._event_targets({event["task_id"] for _, event in batch})
            writes: dict[str, list[tuple]] = {kind: [] for kind in self._sql.events}
            for worker, event in batch:
                target = targets.get(event["task_id"])
                outcome = None if target is None else self._apply_event(target, worker, event, writes, observed)
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
                    self._tally().move(S.RUNNING, outcome)
                elif outcome in FINAL:
                    applied.finished.append(event["task_id"])
                    self._tally().move(S.RUNNING, outcome)
                    self._tally().end(target.name, outcome, event["at"] - target.started_at)
                    if target.dependants:
                        awaited.append(event["task_id"])
                        settled_at = max(settled_at, event["at"])
            self._notice_final(applied.finished)
            if applied.retrying:
                self._notice("schedule")
            ended = (targets[task_id].key for task_id in (*applied.finished, *applied.retrying))
            if any(key in self.limits.running for key in ended):  # room under a limit, for any server's workers
                self._notice("queued")
            self._count(observed)
            cursor = self.db.cursor()
            # In this order: a started or progress event that applies always comes before its task's final one.
            for kind in self._sql.events:
                if writes[kind]:
                    with pw.__exception_wrapper__:  # driver errors as peewee's, as execute_sql raises them
                        self._sql.write_events(cursor, kind, writes[kind])
            if awaited:  # after the writes: their dependants are settled on the outcomes just written
                self._ended(awaited, settled_at)
        return applied

    def _event_targets(self, task_ids: set[int]) -> dict[int, _Target]:
        """The current state of the events' tasks (locked on PostgreSQL until the transaction ends)."""
        found: dict[int, _Target] = {}
        ids = sorted(task_ids)
        for start in range(0, len(ids), _INSERT_CHUNK):
            chunk = ids[start : start + _INSERT_CHUNK]
            for (
                task_id,
                name,
                status,
                worker,
                attempts,
                retries,
                retry_delay,
                errors,
                failures,
                started,
                run_at,
                key,
                dependants,
            ) in self.db.execute_sql(self._sql.event_targets(len(chunk)), chunk):
                history = protocol.json_value(errors) if errors else []
                found[task_id] = _Target(
                    task_id, name, S(status), worker, attempts, retries, retry_delay, history, failures, started,
                    run_at, key, bool(dependants),
                )  # fmt: skip
        return found

    def _apply_event(
        self, task: _Target, worker: str, event: dict, writes: dict[str, list[tuple]], observed: Observed
    ) -> S | None:
        """Decide what ``event`` does to ``task`` (updated in place), queue the write and note the delivery's
        queue wait and run time for the metrics; None if stale.

        The rules are :meth:`apply_events`'; events are decided in batch order against the
        state the earlier ones left.
        """
        kind, attempt, at = event["event"], event["attempt"], event["at"]
        # The fence: only the task's current delivery (running, that attempt, on that worker) changes it.
        if task.status != S.RUNNING or task.worker != worker or task.attempts != attempt:
            return None
        delivery = (task.id, attempt, worker)
        if kind == protocol.STARTED:
            writes["started"].append((at, *delivery))
            observed.wait.append((task.name, at - task.run_at))
            task.started_at = at
            return S.RUNNING
        if kind == protocol.PROGRESS:
            writes["progress"].append((event["progress"], event.get("message"), *delivery))
            return S.RUNNING
        started_at = event.get("started_at")
        if started_at is not None:  # the worker held its started event back: the start comes with the end
            task.started_at = started_at
            observed.wait.append((task.name, started_at - task.run_at))
        observed.run.append((task.name, at - task.started_at))
        if kind == protocol.SUCCEEDED:
            task.status = decide(task.status, M.SUCCEED)
            writes["succeeded"].append((protocol.json_text(event.get("result")), at, started_at, *delivery))
            return task.status
        task.failures += 1
        failed = {
            "attempt": attempt,
            "error": event["error"],
            "at": at,
            "worker": worker,
            "started_at": task.started_at,
        }
        task.errors = _kept(task.errors, failed)
        failure = (protocol.json_text(task.errors), task.failures, event["error"], event.get("traceback"))
        if task.failures <= task.retries:
            task.status = decide(task.status, M.RETRY_LATER)
            retry_at = at + backoff(task.retry_delay, task.failures, self.retry_delay_max)
            writes["retry"].append((*failure, retry_at, *delivery))
        else:
            task.status = decide(task.status, M.FAIL)
            writes["failed"].append((*failure, at, started_at, *delivery))
        return task.status

    # ------------------------------------------------------------ client requests

    def get_task(self, task_id: int) -> dict:
        """The task's record, or TaskNotFound."""
        _check_id(task_id, _no_task)
        paused = pw.fn.EXISTS(Paused.select(pw.SQL("1")).where(Paused.name == Task.name)).alias("name_paused")
        with self._read():
            row = Task.select(Task, paused).where(Task.id == task_id).first()
        if row is None:
            raise _no_task(task_id)
        return task_dict(row, bool(row.name_paused))

    def list_tasks(
        self,
        *,
        status: str | None,
        name: str | None,
        username: str | None,
        limit: int,
        before: int | None = None,
        search: str | None = None,
    ) -> list[dict]:
        """Summaries (SUMMARY_FIELDS) of tasks newest first, filtered by the given fields; ``before``: ids below it;
        ``search``: a substring of the description, in any case (only ASCII letters fold on SQLite)."""
        columns = [getattr(Task, _column(f)) for f in SUMMARY_FIELDS if f not in _COMPUTED]
        query = _filtered(Task.select(*columns), status, name, username, search, limit, before)
        with self._read():
            rows = list(query)
            paused = self._paused_among({row.name for row in rows})
        return [task_summary(row, row.name in paused) for row in rows]

    def task_ids(
        self, *, status: str | None, name: str | None, username: str | None, search: str | None, limit: int
    ) -> list[int]:
        """The ids of the tasks :meth:`list_tasks` lists for these filters, newest first."""
        query = _filtered(Task.select(Task.id), status, name, username, search, limit)
        with self._read():
            return [task_id for (task_id,) in query.tuples()]

    def cancel(self, task_id: int, now: float) -> dict:
        """waiting|scheduled|queued|running -> cancelled; returns the record. InvalidTransition for a final task.

        Its waiting dependants are cancelled too, and theirs, each with an error naming the dependency.

        A running task keeps its ``worker`` and ``attempts``, so the caller can tell that worker
        to stop the delivery; the delivery's own final event is then ignored. In a cluster, the
        server the worker is connected to hears of it too (a ``cancel`` notice).
        """
        _check_id(task_id, _no_task)
        with self.transaction():
            _, refused = self.cancel_many([task_id], now)
            if refused:
                raise refused[task_id]
            return self.get_task(task_id)

    def cancel_many(self, task_ids: Sequence[int], now: float) -> tuple[list[dict], dict[int, MartinetError]]:
        """:meth:`cancel` of each of ``task_ids``, in one transaction and a statement per 500: the tasks
        cancelled as ``{id, worker, attempts}`` (``worker`` not null: it was running), and why each other
        was not (InvalidTransition, TaskNotFound)."""
        moved: dict[int, dict] = {}
        with self.transaction():
            before = self._locked(task_ids)
            for chunk in _chunks(task_ids):
                changes = {"status": target(M.CANCEL).value, "finished_at": now}
                query = self._update_returning(Task.id.in_(chunk) & _in(M.CANCEL), changes, Task.worker, Task.attempts)
                moved.update((i, {"id": i, "worker": w, "attempts": a}) for i, w, a in query)
            cancelled = target(M.CANCEL)
            freed = False  # room under a limit, for any server's workers
            for task_id in moved:
                status, name, key, _ = before[task_id]
                self._tally().move(status, cancelled)
                self._tally().end(name, cancelled)
                freed = freed or (status == S.RUNNING and key in self.limits.running)
            if moved:
                self._notice_final(list(moved))
                for task in moved.values():
                    if task["worker"] is not None:
                        self._notice("cancel", task["worker"], task["id"], task["attempts"])
                self._ended(sorted(moved), now)
            if freed:
                self._notice("queued")
            refused = self._refusals(task_ids, set(moved), M.CANCEL, "cancelled")
        return [moved[task_id] for task_id in _in_order(moved, task_ids)], refused

    def retry(self, task_id: int, now: float) -> dict:
        """failed|cancelled -> queued, due now; returns the record. InvalidTransition for any other state,
        or when another task not yet final holds this one's ``key``.

        A task with dependencies is queued if they have all succeeded (or were purged since), waits
        again (cancelled -> waiting) while one has not ended, and is refused while one is failed or
        cancelled (retry that one first). Retrying a dependency does not retry its cancelled dependants.

        The task keeps its ``attempts`` and ``errors`` history; its last outcome (result, error,
        traceback, progress, times of the last run, worker) is cleared.
        """
        _check_id(task_id, _no_task)
        with self.transaction():
            _, refused = self.retry_many([task_id], now)
            if refused:
                raise refused[task_id]
            return self.get_task(task_id)

    def retry_many(self, task_ids: Sequence[int], now: float) -> tuple[list[int], dict[int, MartinetError]]:
        """:meth:`retry` of each of ``task_ids``, in one transaction and a statement per 500: the ids
        retried, and why each other was not (InvalidTransition, TaskNotFound)."""
        with self.transaction():
            # Dependencies before dependants, the order in which every path locks them (no deadlock).
            statuses = self._locked(self._dependencies_of(task_ids))
            before = self._locked(task_ids)
            moves, blocked = self._retry_moves(before, statuses)
            wanted = [task_id for task_id in task_ids if task_id not in blocked]
            try:
                with self.db.atomic():  # a savepoint: a key taken leaves the transaction usable
                    moved = [
                        task_id
                        for move in (M.RETRY, M.REWAIT)
                        for chunk in _chunks([t for t in wanted if moves.get(t, M.RETRY) == move])
                        for task_id in self._retry_rows(chunk, now, move)
                    ]
                taken: dict[int, MartinetError] = {**blocked}
            except pw.IntegrityError:  # a key held by a task not yet final: one at a time, to find whose
                moved, taken = [], {**blocked}
                for task_id in wanted:
                    try:
                        with self.db.atomic():
                            moved += self._retry_rows([task_id], now, moves.get(task_id, M.RETRY))
                    except pw.IntegrityError:
                        holder = next(iter(self._existing([(self.get_task(task_id)["key"], None)]).values()), "?")
                        taken[task_id] = InvalidTransition(
                            f"task {task_id} cannot be retried: its key is held by task {holder}, which is not final "
                            "yet; wait for it, or cancel it first"
                        )
            for task_id in moved:
                self._tally().move(before[task_id].status, target(moves.get(task_id, M.RETRY)))
            if moved:
                self._notice("queued")
            refused = self._refusals(task_ids, {*moved, *taken}, M.RETRY, "retried")
        return _in_order(moved, task_ids), {**taken, **refused}

    def _dependencies_of(self, task_ids: Sequence[int]) -> list[int]:
        """The tasks that any of ``task_ids`` depends on (read without a lock: a task's dependencies never change)."""
        found: set[int] = set()
        for chunk in _chunks(task_ids):
            query = Task.select(Task.dependencies).where(Task.id.in_(chunk) & Task.dependencies.is_null(False))
            found.update(dep for (deps,) in query.tuples() for dep in protocol.json_value(deps))
        return sorted(found)

    @staticmethod
    def _retry_moves(
        before: dict[int, _Locked], statuses: dict[int, _Locked]
    ) -> tuple[dict[int, Move], dict[int, MartinetError]]:
        """For the retriable tasks with dependencies among ``before`` (:meth:`_locked`'s, as ``statuses`` is of their
        dependencies), those a retry makes wait again (REWAIT: a dependency has not ended; the others take
        RETRY), and why some may not move (a dependency failed or was cancelled)."""
        retriable = sources(M.RETRY)
        waited = {
            task_id: protocol.json_value(row.dependencies) for task_id, row in before.items()
            if row.dependencies and row.status in retriable
        }  # fmt: skip
        moves: dict[int, Move] = {}
        blocked: dict[int, MartinetError] = {}
        for task_id, deps in waited.items():
            ended = [(dep, statuses[dep].status) for dep in deps if dep in statuses]
            blocker = _blocker(ended)
            if blocker is not None:
                blocked[task_id] = InvalidTransition(
                    f"task {task_id} cannot be retried: its dependency {blocker[0]} is {blocker[1].value}; "
                    "retry that first"
                )
            elif any(status != S.SUCCEEDED for _, status in ended):
                moves[task_id] = M.REWAIT
        return moves, blocked

    def _retry_rows(self, task_ids: Sequence[int], now: float, move: Move = M.RETRY) -> list[int]:
        """The UPDATE of a retry (``move``: RETRY, or REWAIT for a task to wait for its dependencies again), for
        those of ``task_ids`` that may move: their ids."""
        if not task_ids:
            return []
        changes = {
            "status": target(move).value, "run_at": now, "result": None, "error": None, "traceback": None,
            "progress": 0.0, "progress_message": None, "started_at": None, "finished_at": None, "worker": None,
            "server": None,
        }  # fmt: skip
        return [task_id for (task_id,) in self._update_returning(Task.id.in_(list(task_ids)) & _in(move), changes)]

    def _update_returning(self, where: Any, changes: dict[str, Any], *columns: Any) -> list[tuple]:
        """UPDATE the tasks ``where`` holds with ``changes``: each one's id, then its ``columns`` (none of them
        among the changes). Where UPDATE has no RETURNING (MariaDB), the rows are read first, locked, then
        updated by id."""
        if self.dialect.update_returning:
            return list(Task.update(**changes).where(where).returning(Task.id, *columns).tuples().execute())
        rows = list(Task.select(Task.id, *columns).where(where).order_by(Task.id).for_update().tuples())
        for chunk in _chunks([row[0] for row in rows]):
            Task.update(**changes).where(Task.id.in_(chunk)).execute()
        return rows

    def _refusals(self, task_ids: Sequence[int], moved: set[int], move: Move, done: str) -> dict[int, MartinetError]:
        """Why each of ``task_ids`` not in ``moved`` did not move: its status (InvalidTransition), or TaskNotFound."""
        rest = [task_id for task_id in task_ids if task_id not in moved]
        statuses: dict[int, str] = {}
        for chunk in _chunks(rest):
            statuses.update(Task.select(Task.id, Task.status).where(Task.id.in_(chunk)).tuples())
        return {
            task_id: InvalidTransition(
                f"task {task_id} is {statuses[task_id]}: only {_names(move)} tasks can be {done}"
            )
            if task_id in statuses
            else _no_task(task_id)
            for task_id in rest
        }

    # ------------------------------------------------------------ pauses

    def pause(self, name: str, now: float) -> bool:
        """Dispatch no more tasks named ``name`` (queued ones stay queued, running ones finish), on every server
        of the database, until :meth:`resume`. Whether it was not paused already."""
        with self.transaction():
            p = self.db.param
            insert = self.dialect.insert_ignoring(f"INTO paused (name, paused_at) VALUES ({p}, {p})")
            return bool(self.db.execute_sql(insert, (name, now)).rowcount)

    def resume(self, name: str) -> bool:
        """Dispatch tasks named ``name`` again; whether it was paused. The other servers hear of it (``queued``)."""
        with self.transaction():
            resumed = bool(Paused.delete().where(Paused.name == name).execute())
            if resumed:
                self._notice("queued")
        return resumed

    def paused(self) -> list[str]:
        """Every paused task name, sorted."""
        with self._read():
            return [name for (name,) in Paused.select(Paused.name).order_by(Paused.name).tuples()]

    def _paused_among(self, names: set[str]) -> set[str]:
        """Those of ``names`` that are paused (inside a read)."""
        found: set[str] = set()
        ordered = sorted(names)
        for start in range(0, len(ordered), _INSERT_CHUNK):
            chunk = ordered[start : start + _INSERT_CHUNK]
            found.update(name for (name,) in Paused.select(Paused.name).where(Paused.name.in_(chunk)).tuples())
        return found

    def purge(self, statuses: Sequence[str], *, finished_before: float, limit: int) -> int:
        """Delete at most ``limit`` tasks in ``statuses`` (final ones only) that finished before ``finished_before``,
        the earliest finished first, in one transaction; returns how many. Callers delete in small batches, so
        that no transaction holds the writer long; finding them is a range scan of ``task_status_finished_at``."""
        wanted = [status for status in statuses if TaskStatus(status) in FINAL]
        if not wanted or limit < 1:
            return 0
        with self.transaction():
            query = (
                Task.select(Task.id)
                .where(Task.status.in_(wanted) & (Task.finished_at < finished_before))
                .order_by(Task.finished_at)
                .limit(limit)
            )
            doomed = [row.id for row in query]
            if not doomed:
                return 0
            marks = ", ".join([self.db.param] * len(doomed))
            gone = self.db.execute_sql(f"DELETE FROM task WHERE id IN ({marks}) RETURNING status", doomed).fetchall()
            for column in ("task_id", "depends_on"):  # each a scan of one of task_dependency's indexes
                self.db.execute_sql(f"DELETE FROM task_dependency WHERE {column} IN ({marks})", doomed)
            for (status,) in gone:
                self._tally().move(S(status), None)
            return len(gone)

    def _locked(self, task_ids: Sequence[int]) -> dict[int, _Locked]:
        """The status, name, limit key and dependencies of each of the tasks that exist, their rows locked to the
        end of the transaction (PostgreSQL, MariaDB), so that a change made next is counted from the status it
        changed."""
        found: dict[int, _Locked] = {}
        lock = " FOR UPDATE" if self.dialect.row_locks else ""
        for chunk in _chunks(task_ids):
            marks = ", ".join([self.db.param] * len(chunk))
            query = f"SELECT id, status, name, {_LIMIT_KEY}, dependencies FROM task WHERE id IN ({marks}){lock}"
            rows = self.db.execute_sql(query, list(chunk))
            found.update((task_id, _Locked(S(status), name, key, deps)) for task_id, status, name, key, deps in rows)
        return found

    # ------------------------------------------------------------ counts

    def _write_tally(self, tally: Tally) -> None:
        """Add a transaction's changes to this server's rows of the count tables (db.Pool, before the commit);
        the metrics count the tasks it made final once it has committed."""
        if tally.outcomes:
            self.after_commit(functools.partial(self.metrics.finished, tally.outcomes))
        p = self.db.param
        rows = [(self.server_id, status, change) for status, change in tally.statuses.items() if change]
        if rows:
            self.db.execute_sql(
                f"INSERT INTO task_count (server, status, n) VALUES {', '.join([f'({p}, {p}, {p})'] * len(rows))} "
                + self.dialect.upsert_adding("task_count", "server, status", ("n",)),
                [value for row in rows for value in row],
            )
        if tally.outcomes:
            minute = int(time.time() // 60 * 60)
            outcomes = [(minute, self.server_id, *key, n, run) for key, (n, run) in tally.outcomes.items()]
            self.db.execute_sql(
                "INSERT INTO task_minute (minute, server, name, outcome, n, run_seconds) VALUES "
                + ", ".join([f"({p}, {p}, {p}, {p}, {p}, {p})"] * len(outcomes))
                + " "
                + self.dialect.upsert_adding("task_minute", "minute, server, name, outcome", ("n", "run_seconds")),
                [value for row in outcomes for value in row],
            )

    def counts(self) -> dict[str, int]:
        """How many tasks are in each status (every status, 0 included), from the count table: never a scan."""
        with self._read():
            rows = self.db.execute_sql("SELECT status, SUM(n) FROM task_count GROUP BY status").fetchall()
        found = {status: int(n) for status, n in rows}
        return {status.value: found.get(status.value, 0) for status in S}

    def outcomes(self, since: float) -> list[tuple[int, str, str, int, float]]:
        """``(minute, name, outcome, count, run_seconds)`` of the tasks that ended from the minute of ``since`` on,
        summed over servers, by minute."""
        with self._read():
            rows = self.db.execute_sql(
                "SELECT minute, name, outcome, SUM(n), SUM(run_seconds) FROM task_minute WHERE minute >= "
                f"{self.db.param} GROUP BY minute, name, outcome ORDER BY minute",
                (int(since // 60 * 60),),
            ).fetchall()
        return [(int(minute), name, outcome, int(n), float(run)) for minute, name, outcome, n, run in rows]

    def oldest_queued(self) -> float | None:
        """The earliest ``run_at`` of a queued task (a range scan of the (status, run_at) index)."""
        with self._read():
            return Task.select(pw.fn.MIN(Task.run_at)).where(Task.status == S.QUEUED.value).scalar()

    def forget_outcomes(self, before: float) -> int:
        """Delete the per-minute outcomes older than ``before``; returns how many rows went."""
        with self.transaction():
            return TaskMinute.delete().where(TaskMinute.minute < before).execute()

    def list_recurring(self) -> list[dict]:
        """Every recurring schedule, enabled or revoked, oldest first."""
        with self._read():
            rows = list(Recurring.select().order_by(Recurring.id))
            paused = self._paused_among({row.name for row in rows})
        return [_recurring_dict(row, paused=row.name in paused) for row in rows]

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
            paused = bool(self._paused_among({row.name}))
        return _recurring_dict(row, paused=paused)


@dataclasses.dataclass
class Applied:
    """What :meth:`Store.apply_events` changed: tasks made final, and tasks scheduled for a retry."""

    finished: list[int] = dataclasses.field(default_factory=list)
    retrying: list[int] = dataclasses.field(default_factory=list)


class _Locked(NamedTuple):
    """A task's row as :meth:`Store._locked` reads it under its lock."""

    status: TaskStatus
    name: str
    key: str  # what its limits count under: its limit_key, or its name
    dependencies: str | None  # JSON list of the ids it waits for; null: none


@dataclasses.dataclass
class _Target:
    """A task as :meth:`Store.apply_events` needs it, updated as the batch's events are decided."""

    id: int
    name: str
    status: TaskStatus
    worker: str | None
    attempts: int
    retries: int
    retry_delay: float
    errors: list[dict]
    failures: int
    started_at: float  # the claim's time, until the worker says when the handler started
    run_at: float  # when it became due: its queue wait runs from there to its start
    key: str  # what its limits count under: its limit_key, or its name
    dependants: bool  # some task depends on it: its end settles them


class _Statements:
    """The SQL of the hot paths, written once per store: building it with peewee per call costs more than running it.

    ``param`` is the driver's placeholder (``?`` for SQLite, ``%s`` for psycopg2 and PyMySQL); ``dialect`` the
    backend's (db.Dialect).
    """

    def __init__(self, param: str, dialect: Dialect) -> None:
        self.param = param
        self.dialect = dialect
        skip_locked = dialect.row_locks
        lock = " FOR UPDATE SKIP LOCKED" if skip_locked else ""
        p = param
        claimed, queued = target(M.CLAIM).value, sql_sources(M.CLAIM)
        # Queued tasks a claim may take, in the queue's order: those of a paused name stay where they are.
        claimable = f"status IN ({queued}) AND name NOT IN (SELECT name FROM paused)"
        self._queue_order = f"ORDER BY priority DESC, run_at, id LIMIT {p}{lock}"
        self._claimable = claimable
        update = (
            f"UPDATE task SET status = '{claimed}', worker = {p}, server = {p}, attempts = attempts + 1, "
            f"started_at = {p} WHERE id IN "
        )
        claimed_columns = "id, name, args, attempts, timeout, priority, run_at, dependencies"
        returning = f" RETURNING {claimed_columns}"
        self._claim = f"{update}(SELECT id FROM task WHERE {claimable} {self._queue_order}){returning}"
        # The claim of tasks picked already (Store._pick), ids in the braces: still queued, as picked.
        self._claim_ids = update + "({}) AND status IN (" + queued + ")" + returning
        # Without UPDATE ... RETURNING (MariaDB): the claimed rows are read, locked, then updated by id.
        self._claim_select = f"SELECT {claimed_columns} FROM task WHERE {claimable} {self._queue_order}"
        self._claim_ids_select = (
            f"SELECT {claimed_columns} FROM task WHERE id IN ({{}}) AND status IN ({queued}) FOR UPDATE"
        )
        self._claim_update = update + "({})"
        self._event_targets = (
            "SELECT id, name, status, worker, attempts, retries, retry_delay, errors, failures, started_at, run_at, "
            f"{_LIMIT_KEY}, dependants FROM task WHERE id IN ({{}})" + (" FOR UPDATE" if skip_locked else "")
        )
        self._insert_tasks = (
            dialect.insert_ignoring(f"INTO task ({', '.join(_INSERT_COLUMNS)}) VALUES {{}}")
            + " RETURNING id, idempotency_key, request_key"
        )
        self._insert_row = "(" + ", ".join([p] * len(_INSERT_COLUMNS)) + ")"
        # Each event's UPDATE holds the fence itself (the delivery, running at that attempt on that worker):
        # what Store._apply_event decided is applied only to the state it decided on.
        fence = f"WHERE id = {p} AND attempts = {p} AND worker = {p} AND status = '{S.RUNNING.value}'"
        succeeded, retried, failed = (target(move).value for move in (M.SUCCEED, M.RETRY_LATER, M.FAIL))
        self.events = {
            "started": f"UPDATE task SET started_at = {p} {fence}",
            "progress": f"UPDATE task SET progress = {p}, progress_message = {p} {fence}",
            "succeeded": (
                f"UPDATE task SET status = '{succeeded}', result = {p}, progress = 1.0, finished_at = {p}, "
                f"started_at = COALESCE({p}, started_at) {fence}"
            ),
            "retry": (
                f"UPDATE task SET status = '{retried}', errors = {p}, failures = {p}, error = {p}, traceback = {p}, "
                f"run_at = {p}, worker = NULL, server = NULL, progress = 0.0, progress_message = NULL {fence}"
            ),
            "failed": (
                f"UPDATE task SET status = '{failed}', errors = {p}, failures = {p}, error = {p}, traceback = {p}, "
                f"finished_at = {p}, started_at = COALESCE({p}, started_at) {fence}"
            ),
        }

        # PostgreSQL: one statement per kind of event, UPDATE ... FROM (VALUES ...), where executemany
        # would make a round trip per event. Each row's columns are those of the kind's executemany
        # parameters, typed (an all-NULL column of VALUES would be text).
        self._batched = {
            kind: (
                f"UPDATE task SET {assignments} FROM (VALUES %s) AS v({', '.join(name for name, _ in columns)}) "
                f"WHERE task.id = v.id AND task.attempts = v.attempt AND task.worker = v.worker "
                f"AND task.status = '{S.RUNNING.value}'",
                "(" + ", ".join(f"%s::{kind_of}" for _, kind_of in columns) + ")",
            )
            for kind, assignments, columns in (
                ("started", "started_at = v.at", (("at", "float8"), *_DELIVERY)),
                ("progress", "progress = v.progress, progress_message = v.message",
                 (("progress", "float8"), ("message", "text"), *_DELIVERY)),
                ("succeeded", f"status = '{succeeded}', result = v.result, progress = 1.0, finished_at = v.at, "
                 "started_at = COALESCE(v.started_at, task.started_at)",
                 (("result", "text"), ("at", "float8"), ("started_at", "float8"), *_DELIVERY)),
                ("retry", f"status = '{retried}', errors = v.errors, failures = v.failures, error = v.error, "
                 "traceback = v.traceback, run_at = v.run_at, worker = NULL, server = NULL, progress = 0.0, "
                 "progress_message = NULL", (*_FAILURE, ("run_at", "float8"), *_DELIVERY)),
                ("failed", f"status = '{failed}', errors = v.errors, failures = v.failures, error = v.error, "
                 "traceback = v.traceback, finished_at = v.at, started_at = COALESCE(v.started_at, task.started_at)",
                 (*_FAILURE, ("at", "float8"), ("started_at", "float8"), *_DELIVERY)),
            )
        } if dialect.name == "postgresql" else None  # fmt: skip

    def claimed(self, db: pw.Database, delivery: tuple, ids: Sequence[int] | None, limit: int = 0) -> list[tuple]:
        """Claim the tasks ``ids`` if still queued, or (None) the next ``limit`` claimable ones, for ``delivery``
        (worker, server, now): the rows claimed (id, name, args, attempts counting this delivery, timeout, priority,
        run_at)."""
        marks = ", ".join([self.param] * len(ids or ()))
        if self.dialect.update_returning:
            if ids is None:
                return db.execute_sql(self._claim, (*delivery, limit)).fetchall()
            return db.execute_sql(self._claim_ids.format(marks), (*delivery, *ids)).fetchall()
        if ids is None:
            rows = db.execute_sql(self._claim_select, (limit,)).fetchall()
        else:
            rows = db.execute_sql(self._claim_ids_select.format(marks), list(ids)).fetchall()
        if not rows:
            return []
        marks = ", ".join([self.param] * len(rows))
        db.execute_sql(self._claim_update.format(marks), (*delivery, *(row[0] for row in rows)))
        return [(task_id, name, args, attempts + 1, *rest) for task_id, name, args, attempts, *rest in rows]

    def write_events(self, cursor: Any, kind: str, rows: list[tuple]) -> None:
        """Apply the ``kind`` writes ``rows`` (parameters of ``events[kind]``, each ending with its delivery)."""
        if self._batched is None:
            cursor.executemany(self.events[kind], rows)
            return
        from psycopg2.extras import execute_values

        # Several rows for one task would update it once, with any of them: keep the last, as executemany would.
        latest = list({row[-3]: row for row in rows}.values())
        sql, template = self._batched[kind]
        execute_values(cursor, sql, latest, template=template, page_size=len(latest))

    def pick(self, blocked: int, chosen: int) -> str:
        """The next claimable tasks' ids and keys, skipping ``blocked`` keys and ``chosen`` ids (parameters in that
        order, then how many)."""
        where = self._claimable
        if blocked:
            where += f" AND {_LIMIT_KEY} NOT IN ({', '.join([self.param] * blocked)})"
        if chosen:
            where += f" AND id NOT IN ({', '.join([self.param] * chosen)})"
        return f"SELECT id, {_LIMIT_KEY} FROM task WHERE {where} {self._queue_order}"

    def event_targets(self, count: int) -> str:
        return self._event_targets.format(", ".join([self.param] * count))

    def insert_tasks(self, count: int) -> str:
        return self._insert_tasks.format(", ".join([self._insert_row] * count))


#: The last columns of every event write: the delivery it applies to (the fence), and a failure's first ones.
_DELIVERY = (("id", "bigint"), ("attempt", "integer"), ("worker", "text"))
_FAILURE = (("errors", "text"), ("failures", "integer"), ("error", "text"), ("traceback", "text"))

#: Columns :meth:`Store.add_tasks` fills: the task's own, then the shared status and times, its policy, its keys.
_INSERT_COLUMNS = (
    "name", "username", "description", "args", "status", "created_at", "run_at", "progress", "attempts",
    *OPTION_FIELDS, "idempotency_key", "request_key",
)  # fmt: skip


def _blocker(deps: Iterable[tuple[int, S]]) -> tuple[int, S] | None:
    """Of a task's dependencies ``(id, status)``, the lowest-numbered that ended otherwise than succeeded (it
    cancels the task, or stops its retry); None if there is none."""
    return min(((dep, status) for dep, status in deps if status in FINAL and status != S.SUCCEEDED), default=None)


def _names(move: Move) -> str:
    """The statuses ``move`` applies to, for a message: ``scheduled, queued or running``."""
    names = [s.value for s in sources(move)]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _filtered(
    query: Any,
    status: str | None,
    name: str | None,
    username: str | None,
    search: str | None,
    limit: int,
    before: int | None = None,
) -> Any:
    """``query`` of tasks, newest first, at most ``limit``, narrowed by the filters of a ``list``."""
    for field, value in ((Task.status, status), (Task.name, name), (Task.username, username)):
        if value is not None:
            query = query.where(field == value)
    if search:
        query = query.where(Task.description.contains(search))  # ILIKE (LIKE on SQLite), % and _ escaped
    if before is not None and before <= config.MAX_ID:
        query = query.where(Task.id < before)
    return query.order_by(Task.id.desc()).limit(limit)


def _in_order(ids: Iterable[int], task_ids: Sequence[int]) -> list[int]:
    """``ids`` (some of ``task_ids``) in the order of ``task_ids``: RETURNING gives rows in any order."""
    position = {task_id: index for index, task_id in enumerate(task_ids)}
    return sorted(ids, key=position.__getitem__)


def _chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    """``ids`` a statement's worth at a time (SQLite takes 32,766 parameters per statement)."""
    for start in range(0, len(ids), _INSERT_CHUNK):
        yield list(ids[start : start + _INSERT_CHUNK])


def _in(move: Move) -> Any:
    """WHERE the task's status is one ``move`` applies to (status.TRANSITIONS)."""
    return pw.SQL(f"status IN ({sql_sources(move)})")


def _delivery(task_id: int, attempt: int) -> Any:
    """WHERE the task is still running the delivery ``(task_id, attempt)``."""
    return (Task.id == task_id) & (Task.status == S.RUNNING.value) & (Task.attempts == attempt)


def _requeued() -> dict:
    """The columns a delivery that ended without an outcome sets: queued again, no worker, no owner."""
    return {"status": target(M.REQUEUE).value, "worker": None, "server": None}


def _row_key(request_key: str | None, index: int, count: int) -> str | None:
    """The request key of the ``index``-th of ``count`` tasks a request submits: ``KEY/INDEX``, a key too long
    for that in the column's 255 characters replaced by its SHA-256 (the same on every server)."""
    if request_key is None or count == 1:
        return request_key
    suffix = f"/{index}"
    if len(request_key) + len(suffix) > config.MAX_NAME_CHARS:
        request_key = "sha256:" + hashlib.sha256(request_key.encode()).hexdigest()
    return request_key + suffix


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
                "retry_delay": config.DEFAULT_RETRY_DELAY, "timeout": None, "limit_key": None}  # fmt: skip
    return {key: given.get(key, defaults[key]) for key in OPTION_FIELDS}


def _column(field: str) -> str:
    """The ``task`` column behind a record's field: its ``key`` is the column ``idempotency_key``, its ``after``
    the column ``dependencies``."""
    return _COLUMNS.get(field, field)


_COLUMNS = {"key": "idempotency_key", "after": "dependencies"}


def task_dict(row: Task, paused: bool) -> dict:
    """A task row as the client sees it: JSON decoded (``errors`` as a list), times (also in errors) as ISO 8601 UTC;
    ``paused``: whether its name is."""
    out: dict[str, Any] = {}
    for field in TASK_FIELDS:
        if field == "paused":
            out[field] = paused
            continue
        value = getattr(row, _column(field))
        if field in ("args", "result"):
            value = None if value is None else protocol.json_value(value)
        elif field == "after":
            value = protocol.json_value(value) if value else []
        elif field == "errors":
            value = [
                {**error, "at": iso(error["at"]), "started_at": iso(error.get("started_at"))}
                for error in (protocol.json_value(value) if value else [])
            ]
        elif field in _TASK_TIMES:
            value = iso(value)
        out[field] = value
    return out


def task_summary(row: Task, paused: bool) -> dict:
    """A task as a ``list`` reply shows it: SUMMARY_FIELDS, times as ISO 8601 UTC, ``error`` clipped; ``paused``:
    whether its name is."""
    out = {field: paused if field == "paused" else getattr(row, _column(field)) for field in SUMMARY_FIELDS}
    for field in _TASK_TIMES:
        out[field] = iso(out[field])
    out["after"] = protocol.json_value(out["after"]) if out["after"] else []
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


def _recurring_dict(row: Recurring, raw: bool = False, paused: bool = False) -> dict:
    """A schedule row as the client sees it (``raw``: times as epoch seconds); ``paused``: whether its name is."""
    out = {field: paused if field == "paused" else getattr(row, field) for field in RECURRING_FIELDS}
    out["args"] = protocol.json_value(out["args"])
    if not raw:
        for field in _RECURRING_TIMES:
            out[field] = iso(out[field])
    return out

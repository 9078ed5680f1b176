"""The tables (peewee models), their version, and the migrations that bring an older database up to it.

Tables: ``task`` (every execution of a handler), ``task_dependency`` (which task waits for which),
``recurring`` (schedules), ``server`` (the servers of a cluster and their leases), ``worker`` (the
workers connected to each of them), ``paused`` (task names not dispatched), ``rate_start`` (recent
starts of rate-limited keys) and ``meta`` (the schema version).
"""

from __future__ import annotations

import logging

import peewee as pw

from . import config, protocol
from .db import MYSQL_TABLE_OPTIONS, dialect_of, redact
from .errors import ConfigError
from .status import sql_final

log = logging.getLogger(__name__)

#: Version of the schema below; recorded in the ``meta`` table. 2 added the per-task policy columns,
#: 3 the count of failures (``errors`` keeps only the latest ERRORS_KEPT), 4 the cluster: the
#: ``server`` and ``worker`` tables, each task's delivering ``server``, and the keys that make a
#: submission idempotent (``idempotency_key``, ``request_key``); 5 the counts (``task_count``, ``task_minute``);
#: 6 each schedule's own zone (``recurring.tz``); 7 the limits and pauses: ``limit_key`` of tasks and
#: schedules, the ``paused`` and ``rate_start`` tables; 8 dependencies (``task_dependency``,
#: ``task.dependencies``, ``task.dependants``).
SCHEMA_VERSION = 8
#: Lock taken while the schema is created or migrated (any constant, Martinet's own): db.Dialect.session_lock.
SCHEMA_LOCK = 0x4D54_4E57_5343_4845
#: Failures a task's ``errors`` keeps, the latest; ``failures`` counts them all.
ERRORS_KEPT = 20
#: Tasks whose ``key`` is still taken: a key is unique among these (a partial unique index).
LIVE_KEY = f"idempotency_key IS NOT NULL AND status NOT IN ({sql_final()})"

database = pw.DatabaseProxy()


class _Model(pw.Model):
    class Meta:
        database = database
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
    # The server that made the current delivery, and owns it while its lease is current.
    server = pw.CharField(max_length=255, null=True)
    # The submitter's ``key``: unique among tasks not yet final (LIVE_KEY).
    idempotency_key = pw.CharField(max_length=255, null=True)
    # The client's key of the request that created it: a request retried on another server creates nothing twice.
    request_key = pw.CharField(max_length=255, null=True)
    # The key its limits are counted under (limits.py): this, or its name when null.
    limit_key = pw.CharField(max_length=255, null=True)
    # The tasks it waits for (JSON list of ids, as given; null: none), read with the claim that delivers it
    # (their results travel with it) without a look at task_dependency.
    dependencies = pw.TextField(null=True)
    # Whether some task depends on this one: only then does its end look for dependants to release or cancel.
    dependants = pw.BooleanField(default=False, constraints=[pw.SQL("DEFAULT FALSE")])

    class Meta:
        # "next due" (scheduled by run_at) is a range scan of this index.
        indexes = ((("status", "run_at", "id"), False),)


# "next queued" (queued by priority, highest first, then run_at and id) is a range scan of this one.
Task.add_index(
    Task.index(Task.status, Task.priority.desc(), Task.run_at, Task.id, name="task_status_priority_run_at_id")
)
# `list --status S`, newest first, reads the newest rows of this one instead of sorting every task in S.
Task.add_index(Task.index(Task.status, Task.id, name="task_status_id"))
# Retention's "finished before T" is a range scan of this one; partial, so only a finished row version costs it.
Task.add_index(
    Task.index(Task.status, Task.finished_at, name="task_status_finished_at", where=pw.SQL("finished_at IS NOT NULL"))
)
# The database, not Martinet, keeps a key to one live task, also between servers racing to insert it.
Task.add_index(Task.index(Task.idempotency_key, unique=True, name="task_live_key", where=pw.SQL(LIVE_KEY)))
# Partial, so that the many tasks without a request key cost these indexes nothing: every UPDATE of a task
# (claim, events) writes a new row version, and a full index would take an entry for each.
Task.add_index(
    Task.index(Task.request_key, unique=True, name="task_request_key", where=pw.SQL("request_key IS NOT NULL"))
)


class TaskDependency(_Model):
    """Task ``task_id`` waits for task ``depends_on`` to succeed (one row per pair; ``task.dependencies`` lists
    the same ids in the order given)."""

    task_id = pw.BigIntegerField()
    # "Who depends on X", asked when X ends, is a range scan of this index.
    depends_on = pw.BigIntegerField(index=True)

    class Meta:
        primary_key = pw.CompositeKey("task_id", "depends_on")


class Recurring(_Model):
    """A recurring schedule; the scheduler creates one Task per run."""

    name = pw.CharField(max_length=255)
    username = pw.CharField(max_length=255, null=True)
    description = pw.TextField(null=True)
    args = pw.TextField(default="{}")
    interval = pw.CharField(max_length=255)
    tz = pw.CharField(max_length=255, null=True)  # IANA name of the zone of its wall times; null: the server's
    run_at = pw.CharField(max_length=255, null=True)
    next_run_at = pw.DoubleField()
    last_run_at = pw.DoubleField(null=True)
    enabled = pw.BooleanField(default=True)
    created_at = pw.DoubleField()
    priority = pw.IntegerField(default=config.DEFAULT_PRIORITY)
    retries = pw.IntegerField(default=config.DEFAULT_RETRIES)
    retry_delay = pw.DoubleField(default=config.DEFAULT_RETRY_DELAY)
    timeout = pw.DoubleField(null=True)
    request_key = pw.CharField(max_length=255, null=True)
    limit_key = pw.CharField(max_length=255, null=True)

    class Meta:
        indexes = ((("enabled", "next_run_at"), False),)


Recurring.add_index(
    Recurring.index(
        Recurring.request_key, unique=True, name="recurring_request_key", where=pw.SQL("request_key IS NOT NULL")
    )
)


class Server(_Model):
    """A ``martinet serve`` of the cluster: alive while ``lease_until`` is ahead of the clock."""

    id = pw.CharField(max_length=255, primary_key=True)
    host = pw.CharField(max_length=255)
    pid = pw.IntegerField()
    address = pw.CharField(max_length=255)  # where its ports are bound
    started_at = pw.DoubleField()
    lease_until = pw.DoubleField()


class Worker(_Model):
    """A worker as the server it is connected to last reported it (every heartbeat)."""

    id = pw.CharField(max_length=255, primary_key=True)
    server = pw.CharField(max_length=255, index=True)
    host = pw.CharField(max_length=255)
    pid = pw.IntegerField()
    handlers = pw.TextField()  # JSON list of names
    slots = pw.IntegerField()
    prefetch = pw.IntegerField()
    busy = pw.IntegerField()
    last_seen = pw.DoubleField()
    key_name = pw.CharField(max_length=255, null=True)  # the name of its CURVE key, on a server with keys


class TaskCount(_Model):
    """How many tasks are in each status, as the sum over servers of each one's changes (tally.py)."""

    server = pw.CharField(max_length=255)
    status = pw.CharField(max_length=16)
    n = pw.BigIntegerField()

    class Meta:
        primary_key = pw.CompositeKey("server", "status")


class TaskMinute(_Model):
    """Tasks of ``name`` that ended in ``outcome`` (a final status) during the minute starting at ``minute``
    (epoch seconds), as each server recorded them, with their total run time (tally.py)."""

    minute = pw.BigIntegerField()
    server = pw.CharField(max_length=255)
    name = pw.CharField(max_length=255)
    outcome = pw.CharField(max_length=16)
    n = pw.BigIntegerField()
    run_seconds = pw.DoubleField()

    class Meta:
        primary_key = pw.CompositeKey("minute", "server", "name", "outcome")


class Paused(_Model):
    """A task name whose queued tasks are not dispatched until it is resumed (``martinet pause NAME``)."""

    name = pw.CharField(max_length=255, primary_key=True)
    paused_at = pw.DoubleField()


class RateStart(_Model):
    """``n`` deliveries of tasks of a rate-limited ``key`` made at ``at`` (epoch seconds): the claims decide
    whether a rate's window has room from these (limits.py), and delete those that left every window."""

    key = pw.CharField(max_length=255)
    at = pw.DoubleField()
    n = pw.IntegerField()

    class Meta:
        primary_key = pw.CompositeKey("key", "at")


class Meta(_Model):
    """Key/value facts about the store itself (``schema_version``)."""

    key = pw.CharField(max_length=64, primary_key=True)
    value = pw.TextField()


TABLES = (Task, TaskDependency, Recurring, Server, Worker, TaskCount, TaskMinute, Paused, RateStart, Meta)


def create_or_migrate(db: pw.Database, url: str) -> None:
    """Create missing tables, bring an older schema up to SCHEMA_VERSION, refuse a newer one (in a transaction).

    On PostgreSQL and MariaDB, under SCHEMA_LOCK: servers starting together on one database
    create or migrate the schema one after the other (without it, both try to create the same
    tables and one fails on the database's own catalog). MariaDB's DDL is not transactional: each
    statement commits, so a migration cut short is taken up again at the next start (each step
    adds only what is missing).
    """
    with dialect_of(db).session_lock(db, SCHEMA_LOCK):
        _create_or_migrate(db, url)


def _create_or_migrate(db: pw.Database, url: str) -> None:
    found = Meta.get_or_none(Meta.key == "schema_version") if db.table_exists("meta") else None
    version = None if found is None else int(found.value)
    if version is not None and version > SCHEMA_VERSION:
        raise ConfigError(
            f"the database at {redact(url)} has schema version {version}, newer than this "
            f"Martinet's {SCHEMA_VERSION}: upgrade Martinet"
        )
    if version is not None:
        for target in range(version + 1, SCHEMA_VERSION + 1):
            _MIGRATIONS[target](db)
            log.info("migrated the database at %s to schema version %d", redact(url), target)
    if dialect_of(db).mysql:
        _create_mysql_tables(db)
    else:
        db.create_tables(TABLES, safe=True)
    if found is None:
        Meta.create(key="schema_version", value=str(SCHEMA_VERSION))
    elif version != SCHEMA_VERSION:
        Meta.update(value=str(SCHEMA_VERSION)).where(Meta.key == "schema_version").execute()


#: MariaDB has no partial indexes: there, the live key's unique index is on a generated column that holds the
#: key while the task is live (NULL otherwise, and NULLs do not collide). The others are kept whole: their
#: NULLs do not collide either, and only finished tasks have a ``finished_at``.
_MYSQL_LIVE_KEY = ("live_key", f"VARCHAR(255) AS (IF({LIVE_KEY}, idempotency_key, NULL)) STORED")


def _create_mysql_tables(db: pw.Database) -> None:
    """MariaDB's CREATE TABLE (utf8mb4 tables) and indexes: those missing, also on the tables of an older schema
    (peewee's own ``create_tables`` skips a table that exists, its new indexes with it)."""
    for model in TABLES:
        table = model._meta.table_name
        if not db.table_exists(table):
            sql, params = model._schema._create_table(safe=True).query()
            db.execute_sql(f"{sql} {MYSQL_TABLE_OPTIONS}", params)
        if model is Task:
            _add_columns(db, table, (_MYSQL_LIVE_KEY,))
        present = {index.name for index in db.get_indexes(table)}
        for index in model._meta.fields_to_index():
            if index._name in present:
                continue
            if index._name == "task_live_key":
                db.execute_sql(f'CREATE UNIQUE INDEX task_live_key ON task ("{_MYSQL_LIVE_KEY[0]}")')
                continue
            whole = index.clone()
            whole._where = None
            sql, params = model._schema._create_index(whole, safe=False).query()
            db.execute_sql(sql, params)


def _add_columns(db: pw.Database, table: str, columns: tuple[tuple[str, str], ...]) -> None:
    """Add the ``(name, definition)`` columns ``table`` lacks; existing ones are kept."""
    present = {column.name for column in db.get_columns(table)}
    for name, definition in columns:
        if name not in present:
            db.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "{name}" {definition}')


def _add_policy_columns(db: pw.Database) -> None:
    """Schema 1 -> 2: the policy columns of both tables (and the task's ``errors``)."""
    double = "DOUBLE PRECISION" if isinstance(db, pw.PostgresqlDatabase) else "REAL"
    policy = (
        ("priority", f"INTEGER NOT NULL DEFAULT {config.DEFAULT_PRIORITY}"),
        ("retries", f"INTEGER NOT NULL DEFAULT {config.DEFAULT_RETRIES}"),
        ("retry_delay", f"{double} NOT NULL DEFAULT {config.DEFAULT_RETRY_DELAY!r}"),
        ("timeout", double),
    )
    _add_columns(db, "task", (*policy, ("errors", db._field_types["TEXT"])))  # LONGTEXT on MariaDB
    _add_columns(db, "recurring", policy)


def _add_failures(db: pw.Database) -> None:
    """Schema 2 -> 3: ``failures``, counted from each task's ``errors`` (which until now kept every one)."""
    _add_columns(db, "task", (("failures", "INTEGER NOT NULL DEFAULT 0"),))
    for task_id, errors in db.execute_sql("SELECT id, errors FROM task WHERE errors IS NOT NULL").fetchall():
        history = protocol.json_value(errors)
        db.execute_sql(
            f"UPDATE task SET failures = {db.param}, errors = {db.param} WHERE id = {db.param}",
            (len(history), protocol.json_text(history[-ERRORS_KEPT:]), task_id),
        )


def _add_cluster(db: pw.Database) -> None:
    """Schema 3 -> 4: each task's delivering ``server`` and the submission keys (the new tables and the
    keys' indexes are created with the others)."""
    text = "VARCHAR(255)"
    _add_columns(db, "task", (("server", text), ("idempotency_key", text), ("request_key", text)))
    _add_columns(db, "recurring", (("request_key", text),))


def recount(db: pw.Database, server: str) -> None:
    """Set ``task_count`` to the tasks in the store, counted (a scan), as ``server``'s rows: at a start with no
    other server running, and when schema 5 brings the table. Outcomes of the past are not recounted."""
    db.execute_sql("DELETE FROM task_count")
    db.execute_sql(
        f"INSERT INTO task_count (server, status, n) SELECT {db.param}, status, COUNT(*) FROM task GROUP BY status",
        (server,),
    )


def _add_counts(db: pw.Database) -> None:
    """Schema 4 -> 5: the count tables, and the tasks there are counted."""
    db.create_tables([TaskCount, TaskMinute], safe=True)
    recount(db, "migrated")


def _add_zone(db: pw.Database) -> None:
    """Schema 5 -> 6: each schedule's zone; existing schedules keep the server's (null)."""
    _add_columns(db, "recurring", (("tz", "VARCHAR(255)"),))


def _add_limits(db: pw.Database) -> None:
    """Schema 6 -> 7: ``limit_key`` of tasks and schedules (null: their name); the ``paused`` and
    ``rate_start`` tables are created with the others."""
    for table in ("task", "recurring"):
        _add_columns(db, table, (("limit_key", "VARCHAR(255)"),))


def _add_dependencies(db: pw.Database) -> None:
    """Schema 7 -> 8: each task's ``dependencies`` and ``dependants`` (``task_dependency`` is created with the
    other tables); no task of an older database has any."""
    text = db._field_types["TEXT"]  # LONGTEXT on MariaDB
    _add_columns(db, "task", (("dependencies", text), ("dependants", "BOOLEAN NOT NULL DEFAULT FALSE")))


#: Schema migrations: the function that brings a database from version N - 1 to N.
_MIGRATIONS = {
    2: _add_policy_columns,
    3: _add_failures,
    4: _add_cluster,
    5: _add_counts,
    6: _add_zone,
    7: _add_limits,
    8: _add_dependencies,
}

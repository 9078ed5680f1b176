"""Contract tests for martinet_app.store, run in-process against SQLite and PostgreSQL (``db_url``).

No mocks, no sleeps: every call that needs a clock gets an explicit ``now``.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterator

import pytest

from conftest import mysql_connect
from martinet_app import db, limits, schema
from martinet_app.errors import ConfigError, InvalidDependency, InvalidTransition, StoreUnavailable, TaskNotFound
from martinet_app.status import FINAL, NEXT, TaskStatus
from martinet_app.store import SCHEMA_VERSION, Applied, Store, backoff

NOW = 1_700_000_000.0
NOW_ISO = "2023-11-14T22:13:20.000+00:00"
PRIORITY_INDEX = "task_status_priority_run_at_id"


def iso(ts: float) -> str:
    """Expected ISO form of ``ts`` (whole seconds after 2023-11-14T22:13:20Z)."""
    s = int(ts - NOW) + 22 * 3600 + 13 * 60 + 20
    return f"2023-11-14T{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}.000+00:00"


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A store on each backend; after each test, the counts it kept (tally.py) must be the tasks it holds."""
    s = Store.open(db_url)
    try:
        yield s
        assert s.counts() == counted(s), "the count table drifted from the tasks in the store"
    finally:
        s.close()


def counted(store: Store) -> dict[str, int]:
    """The tasks in each status, counted by a scan."""
    found = dict(store.db.execute_sql("SELECT status, COUNT(*) FROM task GROUP BY status").fetchall())
    return {s.value: found.get(s.value, 0) for s in TaskStatus}


def add(
    store: Store, name: str = "job", *, run_at: float = NOW, now: float = NOW, options: dict | None = None, **meta: str
) -> int:
    return store.add_task({"name": name, **meta}, {"n": 1}, run_at=run_at, now=now, options=options)


def status(store: Store, task_id: int) -> str:
    return store.get_task(task_id)["status"]


def ev(task_id: int, attempt: int, kind: str, at: float = NOW + 10, **fields: object) -> dict:
    return {"task_id": task_id, "attempt": attempt, "event": kind, "at": at, **fields}


# --- opening ------------------------------------------------------------------------------------------------------


def test_open_is_idempotent_and_stamps_schema_version(db_url: str) -> None:
    first = Store.open(db_url)
    task_id = add(first)
    first.close()
    second = Store.open(db_url)
    try:
        assert second.get_task(task_id)["status"] == "queued"  # the data survived the second open
        rows = second.db.execute_sql("SELECT value FROM meta WHERE \"key\" = 'schema_version'").fetchall()
        assert [int(r[0]) for r in rows] == [SCHEMA_VERSION]
        assert PRIORITY_INDEX in {index.name for index in second.db.get_indexes("task")}
    finally:
        second.close()


def test_newer_schema_version_is_refused(db_url: str) -> None:
    s = Store.open(db_url)
    with s.db.atomic():
        s.db.execute_sql("UPDATE meta SET value = %s WHERE \"key\" = 'schema_version'" % (SCHEMA_VERSION + 1))
    s.close()
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        Store.open(db_url)


# The tables as schema version 1 created them (peewee's DDL); {id}, {double}, {bool} and {true} differ per backend.
V1_SCHEMA = """
CREATE TABLE "task" ("id" {id} NOT NULL PRIMARY KEY, "name" VARCHAR(255) NOT NULL, "username" VARCHAR(255),
    "description" TEXT, "args" TEXT NOT NULL, "status" VARCHAR(16) NOT NULL, "progress" REAL NOT NULL,
    "progress_message" TEXT, "result" TEXT, "error" TEXT, "traceback" TEXT, "attempts" INTEGER NOT NULL,
    "worker" VARCHAR(255), "created_at" {double} NOT NULL, "run_at" {double} NOT NULL, "started_at" {double},
    "finished_at" {double}, "recurring_id" INTEGER);
CREATE INDEX "task_recurring_id" ON "task" ("recurring_id");
CREATE INDEX "task_status_run_at_id" ON "task" ("status", "run_at", "id");
CREATE TABLE "recurring" ("id" {id} NOT NULL PRIMARY KEY, "name" VARCHAR(255) NOT NULL, "username" VARCHAR(255),
    "description" TEXT, "args" TEXT NOT NULL, "interval" VARCHAR(255) NOT NULL, "run_at" VARCHAR(255),
    "next_run_at" {double} NOT NULL, "last_run_at" {double}, "enabled" {bool} NOT NULL, "created_at" {double} NOT NULL);
CREATE INDEX "recurring_enabled_next_run_at" ON "recurring" ("enabled", "next_run_at");
CREATE TABLE "meta" ("key" VARCHAR(64) NOT NULL PRIMARY KEY, "value" TEXT NOT NULL);
INSERT INTO "meta" VALUES ('schema_version', '1');
INSERT INTO "task" ("name", "username", "args", "status", "progress", "attempts", "created_at", "run_at")
    VALUES ('old', 'ann', '{{"k": 1}}', 'queued', 0.0, 0, 1700000000.0, 1700000000.0);
INSERT INTO "task" ("name", "args", "status", "progress", "attempts", "worker", "error", "created_at", "run_at",
    "finished_at") VALUES ('broke', '{{}}', 'failed', 0.0, 1, 'w1', 'E', 1700000000.0, 1700000000.0, 1700000005.0);
INSERT INTO "recurring" ("name", "args", "interval", "next_run_at", "enabled", "created_at")
    VALUES ('tick', '{{}}', 'every minute', 1700000060.0, {true}, 1700000000.0);
"""


def create_v1_database(db_url: str) -> None:
    """A database exactly as Martinet with schema version 1 left it, holding two tasks and a schedule."""
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        conn.executescript(V1_SCHEMA.format(id="INTEGER", double="REAL", bool="INTEGER", true=1))
    elif db_url.startswith("mysql"):
        conn = mysql_connect()
        with conn.cursor() as cur:
            v1 = V1_SCHEMA.format(id="INTEGER AUTO_INCREMENT", double="DOUBLE", bool="BOOLEAN", true="TRUE")
            for statement in v1.split(";"):
                if statement.strip():
                    cur.execute(statement)
    else:
        import psycopg2

        conn = psycopg2.connect(db_url)
        with conn, conn.cursor() as cur:
            cur.execute(V1_SCHEMA.format(id="SERIAL", double="DOUBLE PRECISION", bool="BOOLEAN", true="TRUE"))
    conn.close()


def test_version_1_database_is_migrated(db_url: str) -> None:
    create_v1_database(db_url)
    for _ in range(2):  # the second open finds the current version and changes nothing
        s = Store.open(db_url)
        try:
            rows = s.db.execute_sql("SELECT value FROM meta WHERE \"key\" = 'schema_version'").fetchall()
            assert [int(r[0]) for r in rows] == [SCHEMA_VERSION] == [8]
            assert s.counts() == {**dict.fromkeys(s.counts(), 0), "queued": 1, "failed": 1}  # counted in migrating
            assert PRIORITY_INDEX in {index.name for index in s.db.get_indexes("task")}
            listed = s.list_tasks(status=None, name=None, username=None, limit=10)
            old, broke = (s.get_task(t["id"]) for t in listed[::-1])
            assert [old[f] for f in ("name", "username", "args", "status", "created_at")] == [
                "old", "ann", {"k": 1}, "queued", NOW_ISO
            ]  # fmt: skip
            policy = ("priority", "retries", "retry_delay", "timeout", "errors", "failures", "limit_key", "paused")
            assert [old[f] for f in policy] == [broke[f] for f in policy] == [0, 0, 1.0, None, [], 0, None, False]
            assert (broke["status"], broke["error"], broke["worker"]) == ("failed", "E", "w1")
            [rec] = s.list_recurring()
            fields = ("name", "enabled", "priority", "retries", "retry_delay", "timeout", "tz", "limit_key", "paused")
            # an old schedule keeps the server's zone
            assert [rec[f] for f in fields] == ["tick", True, 0, 0, 1.0, None, None, None, False]
        finally:
            s.close()
    s = Store.open(db_url)
    try:  # the migrated tables take the new columns and the priority index, and pauses
        zoned = s.add_recurring({"name": "z"}, {}, interval="1 day", tz="Europe/Paris", next_run_at=NOW, now=NOW)
        assert [r["tz"] for r in s.list_recurring() if r["id"] == zoned] == ["Europe/Paris"]
        high = add(s, options={"priority": 9, "retries": 1, "limit_key": "k"})
        assert s.pause("job", NOW) and s.resume("job")
        assert [t["task_id"] for t in s.claim("w1", 2, NOW)] == [high, old["id"]]
        assert s.get_task(high)["limit_key"] == "k"
        assert s.retry(broke["id"], NOW)["status"] == "queued"
        assert s.counts() == counted(s)
    finally:
        s.close()


@pytest.mark.parametrize(
    "url",
    ["mysql://x", "mariadb://root@127.0.0.1:3306/", "sqlite://", "postgresql://postgres@127.0.0.1:5432/", "x://y"],
)
def test_unopenable_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        Store.open(url)


# --- adding and reading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset, expected", [(-5.0, "queued"), (0.0, "queued"), (60.0, "scheduled")])
def test_add_task_status_depends_on_run_at(store: Store, offset: float, expected: str) -> None:
    assert status(store, add(store, run_at=NOW + offset)) == expected


@pytest.mark.parametrize("call", [
    lambda s: s.get_task(999_999), lambda s: s.cancel(999_999, NOW), lambda s: s.revoke(999_999),
], ids=["get_task", "cancel", "revoke"])  # fmt: skip
def test_missing_id_is_task_not_found(store: Store, call: Callable[[Store], object]) -> None:
    with pytest.raises(TaskNotFound, match="999999"):
        call(store)


def test_add_task_round_trips_through_get_task(store: Store) -> None:
    args = {"x": [1, 2.5, None], "nested": {"s": "é"}, "flag": True}
    meta = {"name": "report", "username": "ann", "description": "monthly"}
    options = {"priority": -3, "retries": 2, "retry_delay": 0.25, "timeout": 30.5, "limit_key": "reports"}
    task_id = store.add_task(meta, args, run_at=NOW + 3600, now=NOW, options=options)
    assert store.get_task(task_id) == {
        "id": task_id,
        "name": "report",
        "username": "ann",
        "description": "monthly",
        "args": args,
        "status": "scheduled",
        "progress": 0.0,
        "progress_message": None,
        "result": None,
        "error": None,
        "traceback": None,
        "attempts": 0,
        "worker": None,
        "created_at": NOW_ISO,
        "run_at": "2023-11-14T23:13:20.000+00:00",
        "started_at": None,
        "finished_at": None,
        "recurring_id": None,
        "priority": -3,
        "retries": 2,
        "retry_delay": 0.25,
        "timeout": 30.5,
        "errors": [],
        "failures": 0,
        "server": None,
        "key": None,
        "after": [],
        "limit_key": "reports",
        "paused": False,
    }  # fmt: skip (literal ISO strings here, so the iso() helper is itself checked)


def test_options_left_out_take_the_column_defaults(store: Store) -> None:
    task = store.get_task(add(store, options={"retries": 1}))
    assert [task[f] for f in ("priority", "retries", "retry_delay", "timeout", "errors")] == [0, 1, 1.0, None, []]


# --- scheduling ---------------------------------------------------------------------------------------------------


def test_next_due_and_promote_due(store: Store) -> None:
    assert store.next_due() is None
    later, soon = add(store, run_at=NOW + 100), add(store, run_at=NOW + 50)
    add(store, run_at=NOW)  # queued: not considered
    assert store.next_due() == NOW + 50
    rec = store.add_recurring({"name": "r"}, {}, interval="every 10 seconds", next_run_at=NOW + 20, now=NOW)
    assert store.next_due() == NOW + 20
    store.revoke(rec)
    assert store.next_due() == NOW + 50  # revoked schedules are ignored

    assert store.promote_due(NOW + 49) == 0
    assert store.promote_due(NOW + 50) == 1
    assert (status(store, soon), status(store, later)) == ("queued", "scheduled")
    assert store.next_due() == NOW + 100
    assert store.promote_due(NOW + 1000) == 1
    assert store.next_due() is None


def test_fire_recurring_once_per_planned_time(store: Store) -> None:
    rec = store.add_recurring(
        {"name": "tick", "username": "bob"}, {"k": "v"}, interval="every minute", next_run_at=NOW + 60, now=NOW
    )
    assert store.due_recurring(NOW + 59) == []
    [due] = store.due_recurring(NOW + 60)
    assert (due["id"], due["next_run_at"], due["args"]) == (rec, NOW + 60, {"k": "v"})

    [task_id] = store.fire_recurring([(rec, NOW + 60, NOW + 120)], now=NOW + 61)
    assert store.fire_recurring([(rec, NOW + 60, NOW + 120)], now=NOW + 62) == []  # double fire
    task = store.get_task(task_id)
    fields = ("status", "recurring_id", "name", "username", "args", "run_at", "created_at")
    assert [task[f] for f in fields] == ["queued", rec, "tick", "bob", {"k": "v"}, iso(NOW + 60), iso(NOW + 61)]
    assert [t["id"] for t in store.list_tasks(status=None, name=None, username=None, limit=10)] == [task_id]
    [row] = store.list_recurring()
    assert (row["next_run_at"], row["last_run_at"]) == (iso(NOW + 120), iso(NOW + 60))
    assert store.next_due() == NOW + 120

    store.revoke(rec)
    assert store.due_recurring(NOW + 1000) == []
    assert store.fire_recurring([(rec, NOW + 120, NOW + 180)], now=NOW + 121) == []
    assert len(store.list_tasks(status=None, name=None, username=None, limit=10)) == 1


# --- dispatching --------------------------------------------------------------------------------------------------


def test_claim_oldest_first_with_limit(store: Store) -> None:
    assert store.claim("w1", 5, NOW) == []
    c = add(store, "c", run_at=NOW - 10)
    a = add(store, "a", run_at=NOW - 30)
    b1 = store.add_task({"name": "b"}, {"i": 1}, run_at=NOW - 20, now=NOW)
    b2 = store.add_task({"name": "b"}, {"i": 2}, run_at=NOW - 20, now=NOW)  # same run_at: id breaks the tie
    add(store, "later", run_at=NOW + 60)  # scheduled: never claimed
    assert store.claim("w1", 0, NOW) == []

    first = store.claim("w1", 2, NOW + 1)
    assert first == [
        {"task_id": a, "name": "a", "args": {"n": 1}, "attempt": 1, "timeout": None},
        {"task_id": b1, "name": "b", "args": {"i": 1}, "attempt": 1, "timeout": None},
    ]
    second = store.claim("w2", 10, NOW + 2)
    assert [t["task_id"] for t in second] == [b2, c]
    assert store.claim("w3", 10, NOW + 3) == []

    task = store.get_task(a)
    assert [task[f] for f in ("status", "worker", "attempts", "started_at")] == ["running", "w1", 1, iso(NOW + 1)]
    assert store.running() == {(a, 1), (b1, 1), (b2, 1), (c, 1)}
    assert [store.get_task(i)["worker"] for i in (a, b1, b2, c)] == ["w1", "w1", "w2", "w2"]


def test_unclaim_reverts_a_claim(store: Store) -> None:
    task_id = add(store)
    [claim] = store.claim("w1", 1, NOW)
    assert store.unclaim([(task_id, 2)]) == 0  # wrong attempt: not this claim
    assert store.unclaim([(task_id, claim["attempt"])]) == 1
    task = store.get_task(task_id)
    assert (task["status"], task["attempts"], task["worker"], task["started_at"]) == ("queued", 0, None, None)
    assert store.running() == set()
    assert store.claim("w2", 1, NOW)[0]["attempt"] == 1


def test_requeue_by_worker_and_by_delivery(store: Store) -> None:
    ids = [add(store, run_at=NOW - 10 + i) for i in range(4)]
    store.claim("w1", 2, NOW)
    store.claim("w2", 2, NOW)
    assert store.requeue_worker("w1") == ids[:2]
    assert [status(store, i) for i in ids] == ["queued", "queued", "running", "running"]
    assert store.get_task(ids[0])["attempts"] == 1  # kept: the next delivery is a new attempt
    assert store.requeue_worker("nobody") == []
    assert store.requeue([(ids[3], 2), (ids[0], 1)]) == []  # wrong attempt, or not running: untouched
    assert store.requeue([(ids[3], 1)]) == [ids[3]]
    assert store.running() == {(ids[2], 1)} and store.get_task(ids[2])["worker"] == "w2"
    again = store.claim("w3", 10, NOW + 1)
    assert [(t["task_id"], t["attempt"]) for t in again] == [(ids[0], 2), (ids[1], 2), (ids[3], 2)]


# --- status events ------------------------------------------------------------------------------------------------


def test_started_and_progress_apply_only_to_current_delivery(store: Store) -> None:
    task_id = add(store)
    store.claim("w1", 1, NOW)
    assert store.apply_events([
        ("w1", ev(task_id, 1, "started", at=NOW + 5)),
        ("w1", ev(task_id, 1, "progress", progress=0.5, message="half")),
        ("w2", ev(task_id, 1, "progress", progress=0.9, message="stale worker")),
        ("w1", ev(task_id, 2, "progress", progress=0.8, message="wrong attempt")),
        ("w2", ev(task_id, 1, "started", at=NOW + 99)),
    ]).finished == []  # fmt: skip
    task = store.get_task(task_id)
    assert (task["status"], task["progress"], task["progress_message"]) == ("running", 0.5, "half")
    assert task["started_at"] == iso(NOW + 5)


def test_succeeded_and_failed_are_stored(store: Store) -> None:
    ok, bad = add(store), add(store)
    store.claim("w1", 2, NOW)
    done = store.apply_events([
        ("w1", ev(ok, 1, "succeeded", at=NOW + 7, result={"rows": [1, 2]})),
        ("w1", ev(bad, 1, "failed", at=NOW + 8, error="ValueError: boom", traceback="Traceback ...",
                  started_at=NOW + 2)),
    ])  # fmt: skip
    assert done == Applied(finished=[ok, bad], retrying=[])
    fields = ("status", "result", "progress", "finished_at", "error", "traceback", "errors")
    t = store.get_task(ok)
    assert [t[f] for f in fields] == ["succeeded", {"rows": [1, 2]}, 1.0, iso(NOW + 7), None, None, []]
    t = store.get_task(bad)
    failure = {
        "attempt": 1,
        "error": "ValueError: boom",
        "at": iso(NOW + 8),
        "worker": "w1",
        "started_at": iso(NOW + 2),
    }
    assert [t[f] for f in fields] == ["failed", None, 0.0, iso(NOW + 8), "ValueError: boom", "Traceback ...", [failure]]
    assert store.running() == set()


def test_a_delivery_ends_once(store: Store) -> None:
    task_id = add(store)
    store.claim("w1", 1, NOW)
    assert store.apply_events([("w1", ev(task_id, 1, "succeeded", result="first"))]).finished == [task_id]
    assert store.apply_events([
        ("w1", ev(task_id, 1, "succeeded", result="second")),
        ("w1", ev(task_id, 1, "failed", error="late")),
        ("w1", ev(task_id, 1, "progress", progress=0.1)),
    ]).finished == []  # fmt: skip
    t = store.get_task(task_id)
    assert (t["status"], t["result"], t["error"], t["progress"]) == ("succeeded", "first", None, 1.0)
    other = add(store)  # within one batch too
    store.claim("w1", 1, NOW)
    batch = [("w1", ev(other, 1, "failed", error="first")), ("w1", ev(other, 1, "succeeded", result=1))]
    assert store.apply_events(batch).finished == [other]
    assert (status(store, other), store.get_task(other)["error"]) == ("failed", "first")


def test_events_of_a_superseded_delivery_change_nothing(store: Store) -> None:
    task_id = add(store)
    store.claim("w1", 1, NOW)
    store.requeue_worker("w1")
    store.claim("w2", 1, NOW + 1)  # attempt 2 is running on w2
    for kind, fields in (("progress", {"progress": 0.7}), ("succeeded", {"result": "w1"}), ("failed", {"error": "x"})):
        assert store.apply_events([("w1", ev(task_id, 1, kind, **fields))]) == Applied()
    t = store.get_task(task_id)
    assert (t["status"], t["progress"], t["worker"], t["attempts"], t["errors"]) == ("running", 0.0, "w2", 2, [])
    assert store.apply_events([("w2", ev(task_id, 2, "succeeded", result="from w2"))]).finished == [task_id]
    assert store.get_task(task_id)["result"] == "from w2"


def test_events_of_a_requeued_delivery_change_nothing(store: Store) -> None:
    task_id = add(store)
    assert store.apply_events([("w1", ev(task_id, 1, "succeeded", result=1))]).finished == []  # never delivered
    store.claim("w1", 1, NOW)
    assert store.apply_events([("w1", ev(task_id, 2, "succeeded", result=1))]).finished == []  # attempt from the future
    assert store.apply_events([("w2", ev(task_id, 1, "succeeded", result=1))]).finished == []  # another worker's
    assert store.requeue([(task_id, 1)]) == [task_id]
    assert store.apply_events([("w1", ev(task_id, 1, "failed", error="lost"))]).finished == []
    assert (status(store, task_id), store.get_task(task_id)["errors"]) == ("queued", [])
    assert [t["attempt"] for t in store.claim("w2", 1, NOW)] == [2]


def test_cancel_then_retry_is_not_failed_by_the_killed_delivery(store: Store) -> None:
    task_id = add(store)
    store.claim("w1", 1, NOW)
    store.cancel(task_id, NOW + 1)
    store.retry(task_id, NOW + 2)
    [claim] = store.claim("w1", 1, NOW + 2)
    assert claim["attempt"] == 2
    killed = ev(task_id, 1, "failed", error="cancelled")  # the killed delivery's late report
    assert store.apply_events([("w1", killed)]) == Applied()
    assert store.apply_events([("w1", ev(task_id, 2, "succeeded", result="retried"))]).finished == [task_id]
    t = store.get_task(task_id)
    assert (t["status"], t["result"], t["errors"], t["failures"]) == ("succeeded", "retried", [], 0)


def test_final_event_may_carry_when_the_handler_started(store: Store) -> None:
    folded, plain = add(store), add(store)
    store.claim("w1", 2, NOW + 1)
    store.apply_events([
        ("w1", ev(folded, 1, "succeeded", at=NOW + 9, result=1, started_at=NOW + 4)),
        ("w1", ev(plain, 1, "failed", at=NOW + 9, error="no")),
    ])  # fmt: skip
    assert store.get_task(folded)["started_at"] == iso(NOW + 4), "the worker folded its started event in"
    assert store.get_task(plain)["started_at"] == iso(NOW + 1), "no started_at: the claim's time stays"


def test_list_by_status_reads_an_index_instead_of_sorting_the_backlog(sqlite_url: str) -> None:
    store = Store.open(sqlite_url)
    try:
        ids = [add(store, run_at=NOW + 60) for _ in range(3)]
        assert [t["id"] for t in store.list_tasks(status="scheduled", name=None, username=None, limit=2)] == ids[:0:-1]
        sql = 'EXPLAIN QUERY PLAN SELECT * FROM "task" WHERE "status" = ? ORDER BY "id" DESC LIMIT 50'
        plan = " ".join(str(row[-1]) for row in store.db.execute_sql(sql, ("scheduled",)))
        assert "task_status_id" in plan and "TEMP B-TREE" not in plan, plan
    finally:
        store.close()


# --- transactions: group commit -----------------------------------------------------------------------------------


def test_transaction_groups_calls_and_runs_hooks_after_commit(store: Store) -> None:
    done: list[str] = []
    with store.transaction():
        task_id = add(store)
        [claimed] = store.claim("w1", 5, NOW)
        store.after_commit(lambda: done.append(status(store, task_id)))
        store.on_rollback(lambda: done.append("rolled back"))
        assert done == [], "nothing runs before the commit"
    assert claimed["task_id"] == task_id
    assert done == ["running"], "after the commit, which holds both the insert and the claim"


def test_transaction_that_fails_stores_nothing_and_undoes(store: Store) -> None:
    done: list[str] = []
    with pytest.raises(RuntimeError), store.transaction():
        add(store)
        store.after_commit(lambda: done.append("committed"))
        store.on_rollback(lambda: done.append("rolled back"))
        raise RuntimeError("a bug in the caller")
    assert done == ["rolled back"]
    assert store.list_tasks(status=None, name=None, username=None, limit=10) == []


def test_a_savepoint_that_fails_undoes_only_itself(store: Store) -> None:
    """What the sink carries in a client turn (sink.StatusSink.carry): its writes, tally and hooks are undone
    alone, and the rest of the transaction commits."""
    done: list[str] = []
    with store.transaction():
        kept = add(store)
        with pytest.raises(RuntimeError), store.savepoint():
            add(store)
            store.after_commit(lambda: done.append("the savepoint's hook"))
            raise RuntimeError("a value the database refused")
        store.after_commit(lambda: done.append("committed"))
    assert done == ["committed"]
    assert [t["id"] for t in store.list_tasks(status=None, name=None, username=None, limit=10)] == [kept]


def test_a_failed_statement_dooms_the_whole_transaction(sqlite_url: str) -> None:
    store = Store.open(sqlite_url)
    path = sqlite_url.removeprefix("sqlite:///")
    try:
        with store.transaction():
            add(store)  # the write lock is now this connection's
        locker = sqlite3.connect(path, isolation_level=None, timeout=10)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailable, match="database is locked"), store.transaction():
                with pytest.raises(StoreUnavailable, match="database is locked"):
                    add(store)  # the caller is told, and carries on
                store.after_commit(lambda: pytest.fail("a doomed transaction does not commit"))
        finally:
            locker.execute("COMMIT")
            locker.close()
        assert len(store.list_tasks(status=None, name=None, username=None, limit=10)) == 1
        add(store)  # the store works again once the lock is gone
        assert len(store.list_tasks(status=None, name=None, username=None, limit=10)) == 2
    finally:
        store.close()


# --- per-task policy: priority, retries, manual retry -------------------------------------------------------------


def test_lifecycle_table() -> None:
    S = TaskStatus
    assert FINAL == {S.SUCCEEDED, S.FAILED, S.CANCELLED}
    assert S.SCHEDULED in NEXT[S.RUNNING] and S.CANCELLED in NEXT[S.RUNNING]
    assert NEXT[S.FAILED] == {S.QUEUED} and NEXT[S.CANCELLED] == {S.QUEUED, S.WAITING}
    assert NEXT[S.SUCCEEDED] == set()


def test_claim_highest_priority_first_then_oldest(store: Store) -> None:
    low_old = add(store, run_at=NOW - 30)
    high_new = add(store, run_at=NOW - 10, options={"priority": 5})
    high_old = add(store, run_at=NOW - 20, options={"priority": 5})
    negative = add(store, run_at=NOW - 40, options={"priority": -1})
    low_new = add(store, run_at=NOW - 5)
    urgent = add(store, run_at=NOW, options={"priority": 100})
    first = [t["task_id"] for t in store.claim("w1", 3, NOW)]
    assert first == [urgent, high_old, high_new]
    assert [t["task_id"] for t in store.claim("w1", 10, NOW)] == [low_old, low_new, negative]


def test_claim_returns_the_task_timeout(store: Store) -> None:
    task_id = add(store, options={"timeout": 2.5})
    assert store.claim("w1", 1, NOW) == [
        {"task_id": task_id, "name": "job", "args": {"n": 1}, "attempt": 1, "timeout": 2.5}
    ]


@pytest.mark.parametrize("delay, failures, cap, expected", [
    (0.3, 1, 3600, 0.3), (0.3, 2, 3600, 0.6), (0.3, 3, 3600, 1.2), (1.0, 4, 5.0, 5.0),
    (0.0, 9, 3600, 0.0), (2.0, 10_000, 60.0, 60.0),  # no overflow however many failures
])  # fmt: skip
def test_backoff_doubles_up_to_the_cap(delay: float, failures: int, cap: float, expected: float) -> None:
    assert backoff(delay, failures, cap) == pytest.approx(expected)


def test_failures_are_retried_with_backoff_then_fail(store: Store) -> None:
    task_id = add(store, options={"retries": 2, "retry_delay": 2.0})
    expected_errors = []
    for attempt, at, retry_at in ((1, NOW + 10, NOW + 12), (2, NOW + 20, NOW + 24)):
        store.promote_due(at)
        [claim] = store.claim(f"w{attempt}", 1, at - 1)
        assert claim["attempt"] == attempt
        store.apply_events([(f"w{attempt}", ev(task_id, attempt, "progress", progress=0.5, message="half"))])
        applied = store.apply_events([(f"w{attempt}", ev(task_id, attempt, "failed", at=at, error=f"E{attempt}"))])
        assert applied == Applied(finished=[], retrying=[task_id])
        failure = {
            "attempt": attempt,
            "error": f"E{attempt}",
            "at": iso(at),
            "worker": f"w{attempt}",
            "started_at": iso(at - 1),  # the claim's time: no started event
        }
        expected_errors.append(failure)
        t = store.get_task(task_id)
        assert [t[f] for f in ("status", "run_at", "worker", "error", "errors", "progress", "finished_at")] == [
            "scheduled", iso(retry_at), None, f"E{attempt}", expected_errors, 0.0, None
        ]  # fmt: skip
        assert store.next_due() == retry_at
        assert store.promote_due(retry_at - 0.5) == 0
    store.promote_due(NOW + 24)
    store.claim("w3", 1, NOW + 24)
    applied = store.apply_events([("w3", ev(task_id, 3, "failed", at=NOW + 30, error="E3", traceback="tb3"))])
    assert applied == Applied(finished=[task_id], retrying=[])
    expected_errors.append(
        {"attempt": 3, "error": "E3", "at": iso(NOW + 30), "worker": "w3", "started_at": iso(NOW + 24)}
    )
    t = store.get_task(task_id)
    assert [t[f] for f in ("status", "attempts", "worker", "error", "traceback", "errors", "finished_at")] == [
        "failed", 3, "w3", "E3", "tb3", expected_errors, iso(NOW + 30)
    ]  # fmt: skip


def test_retry_delay_is_capped(store: Store) -> None:
    store.retry_delay_max = 5.0
    task_id = add(store, options={"retries": 5, "retry_delay": 4.0})
    store.claim("w1", 1, NOW)
    store.apply_events([("w1", ev(task_id, 1, "failed", at=NOW + 10, error="E"))])
    assert store.get_task(task_id)["run_at"] == iso(NOW + 14)
    store.promote_due(NOW + 14)
    store.claim("w1", 1, NOW + 14)
    store.apply_events([("w1", ev(task_id, 2, "failed", at=NOW + 20, error="E"))])
    assert store.get_task(task_id)["run_at"] == iso(NOW + 25)  # 8 s capped to 5


def test_lost_worker_does_not_use_up_a_retry(store: Store) -> None:
    task_id = add(store, options={"retries": 1, "retry_delay": 0.0})
    store.claim("w1", 1, NOW)
    store.requeue_worker("w1")  # no failure: re-queued as before
    store.claim("w2", 1, NOW)
    assert store.apply_events([("w2", ev(task_id, 2, "failed", error="E"))]).retrying == [task_id]
    assert status(store, task_id) == "scheduled"
    # A late failure of a retrying task is ignored, like any final event of a task neither queued nor running.
    assert store.apply_events([("w1", ev(task_id, 1, "failed", error="late"))]) == Applied()
    assert [e["attempt"] for e in store.get_task(task_id)["errors"]] == [2]


def test_retry_requeues_failed_and_cancelled_tasks(store: Store) -> None:
    failed, cancelled = add(store), add(store, run_at=NOW + 60)
    store.claim("w1", 1, NOW)
    store.apply_events([("w1", ev(failed, 1, "progress", progress=0.4, message="m"))])
    store.apply_events([("w1", ev(failed, 1, "failed", at=NOW + 7, error="E", traceback="tb"))])
    store.cancel(cancelled, NOW + 8)
    task = store.retry(failed, NOW + 9)
    fields = ("status", "run_at", "attempts", "error", "traceback", "progress", "progress_message", "result")
    assert [task[f] for f in fields] == ["queued", iso(NOW + 9), 1, None, None, 0.0, None, None]
    assert (task["worker"], task["started_at"], task["finished_at"]) == (None, None, None)
    assert task["errors"] == [
        {"attempt": 1, "error": "E", "at": iso(NOW + 7), "worker": "w1", "started_at": iso(NOW)}
    ]  # history kept
    assert store.retry(cancelled, NOW + 9)["status"] == "queued"
    assert [(t["task_id"], t["attempt"]) for t in store.claim("w2", 5, NOW + 10)] == [(failed, 2), (cancelled, 1)]
    store.apply_events([("w2", ev(failed, 2, "succeeded", result="second time"))])
    task = store.get_task(failed)
    assert (task["status"], task["result"], len(task["errors"])) == ("succeeded", "second time", 1)


@pytest.mark.parametrize("state", ["scheduled", "queued", "running", "succeeded"])
def test_retry_refused_unless_failed_or_cancelled(store: Store, state: str) -> None:
    task_id = add(store, run_at=NOW + 60 if state == "scheduled" else NOW)
    if state in ("running", "succeeded"):
        store.claim("w1", 1, NOW)
    if state == "succeeded":
        store.apply_events([("w1", ev(task_id, 1, "succeeded", result=None))])
    with pytest.raises(
        InvalidTransition, match=f"task {task_id} is {state}: only failed or cancelled tasks can be retried"
    ):
        store.retry(task_id, NOW)
    assert status(store, task_id) == state
    with pytest.raises(TaskNotFound):
        store.retry(999_999, NOW)


def test_recurring_runs_get_the_schedule_options(store: Store) -> None:
    options = {"priority": 7, "retries": 4, "retry_delay": 0.5, "timeout": 12.0, "limit_key": "ticks"}
    rec = store.add_recurring({"name": "tick"}, {}, interval="every minute", next_run_at=NOW, now=NOW, options=options)
    [row] = store.list_recurring()
    assert {f: row[f] for f in options} == options
    [task_id] = store.fire_recurring([(rec, NOW, NOW + 60)], now=NOW)
    task = store.get_task(task_id)
    assert {f: task[f] for f in options} == options
    plain = store.add_recurring({"name": "plain"}, {}, interval="every minute", next_run_at=NOW, now=NOW)
    [task_id] = store.fire_recurring([(plain, NOW, NOW + 60)], now=NOW)
    task = store.get_task(task_id)
    assert [task[f] for f in options] == [0, 0, 1.0, None, None]


# --- client requests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_at", [NOW, NOW + 60], ids=["queued", "scheduled"])
def test_cancel_pending(store: Store, run_at: float) -> None:
    task_id = add(store, run_at=run_at)
    task = store.cancel(task_id, NOW + 5)
    assert (task["status"], task["finished_at"]) == ("cancelled", iso(NOW + 5))
    assert status(store, task_id) == "cancelled"
    assert store.claim("w1", 1, NOW + 100) == [] and store.promote_due(NOW + 100) == 0
    with pytest.raises(InvalidTransition, match="is cancelled"):
        store.cancel(task_id, NOW + 6)


def test_cancel_running_keeps_its_delivery_and_ignores_its_final_event(store: Store) -> None:
    task_id = add(store, options={"retries": 3})
    store.claim("w1", 1, NOW)
    task = store.cancel(task_id, NOW + 5)
    # The worker and attempt stay, so the caller can tell that worker which delivery to stop.
    assert [task[f] for f in ("status", "finished_at", "worker", "attempts")] == ["cancelled", iso(NOW + 5), "w1", 1]
    assert store.running() == set()
    stopped = store.apply_events([("w1", ev(task_id, 1, "failed", error="cancelled"))])
    assert stopped == Applied(finished=[], retrying=[])  # final already: neither failed nor retried
    assert store.apply_events([("w1", ev(task_id, 1, "succeeded", result=1))]).finished == []
    task = store.get_task(task_id)
    assert [task[f] for f in ("status", "error", "errors", "result")] == ["cancelled", None, [], None]


@pytest.mark.parametrize("final", ["succeeded", "failed", "cancelled"])
def test_cancel_refused_for_final_tasks(store: Store, final: str) -> None:
    task_id = add(store)
    store.claim("w1", 1, NOW)
    if final == "cancelled":
        store.cancel(task_id, NOW + 1)
    else:
        store.apply_events([("w1", ev(task_id, 1, final, result=None, error="e"))])
    with pytest.raises(InvalidTransition, match=f"task {task_id} is {final}: only waiting, scheduled, queued or"):
        store.cancel(task_id, NOW + 5)
    assert status(store, task_id) == final


def test_revoke_and_list_recurring(store: Store) -> None:
    a = store.add_recurring({"name": "a"}, {"x": 1}, interval="every day", next_run_at=NOW + 9, now=NOW)
    b = store.add_recurring({"name": "b"}, {}, interval="every hour", next_run_at=NOW + 3600, now=NOW)
    revoked = store.revoke(a)
    assert (revoked["id"], revoked["enabled"]) == (a, False)
    with pytest.raises(InvalidTransition, match="already revoked"):
        store.revoke(a)
    rows = store.list_recurring()
    assert [(r["id"], r["name"], r["enabled"]) for r in rows] == [(a, "a", False), (b, "b", True)]
    assert (rows[0]["interval"], rows[0]["run_at"], rows[0]["args"], rows[0]["tz"]) == (
        "every day",
        None,
        {"x": 1},
        None,
    )
    assert (rows[0]["next_run_at"], rows[0]["last_run_at"], rows[0]["created_at"]) == (iso(NOW + 9), None, NOW_ISO)


def test_recurring_zone_round_trips(store: Store) -> None:
    rec = store.add_recurring({"name": "a"}, {}, interval="0 9 * * mon-fri", tz="Asia/Tokyo", next_run_at=NOW, now=NOW)
    assert [(r["interval"], r["tz"]) for r in store.list_recurring()] == [("0 9 * * mon-fri", "Asia/Tokyo")]
    assert store.due_recurring(NOW)[0]["tz"] == "Asia/Tokyo"
    assert store.revoke(rec)["tz"] == "Asia/Tokyo"


def test_recurring_run_at_string_round_trips(store: Store) -> None:
    """Regression: Recurring.run_at is the user's time-of-day string, not an epoch, and must not go through iso()."""
    rec = store.add_recurring({"name": "a", "run_at": "09:00"}, {}, interval="every day", next_run_at=NOW, now=NOW)
    assert [r["run_at"] for r in store.list_recurring()] == ["09:00"]
    assert store.revoke(rec)["run_at"] == "09:00"


def test_list_tasks_filters_newest_first(store: Store) -> None:
    t1 = add(store, "build", username="ann")
    t2 = add(store, "build", username="bob", run_at=NOW + 60)
    t3 = add(store, "deploy", username="ann")
    t4 = add(store, "build", username="ann")

    def ids(status: str | None = None, name: str | None = None, username: str | None = None, limit: int = 100):
        return [t["id"] for t in store.list_tasks(status=status, name=name, username=username, limit=limit)]

    assert ids() == [t4, t3, t2, t1]
    assert ids(limit=2) == [t4, t3]
    assert ids(status=TaskStatus.SCHEDULED.value) == [t2]
    assert ids(status="queued") == [t4, t3, t1]
    assert ids(name="build") == [t4, t2, t1]
    assert ids(username="ann") == [t4, t3, t1]
    assert ids(status="queued", name="build", username="ann", limit=1) == [t4]
    assert ids(status="failed") == []


def test_give_up_lost_fails_tasks_out_of_deliveries(store: Store) -> None:
    store.max_deliveries = 2
    first, second = add(store, run_at=NOW - 2), add(store, run_at=NOW - 1)
    store.claim("w1", 2, NOW)
    assert store.give_up_lost(now=NOW, worker="w1") == [], "one delivery each: not out of deliveries yet"
    store.requeue_worker("w1")
    store.claim("w2", 2, NOW + 1)  # the second delivery of both
    assert store.give_up_lost(now=NOW + 2, refs=[(second, 2)]) == [second]
    assert store.give_up_lost(now=NOW + 3, worker="w2") == [first]
    task = store.get_task(first)
    assert (task["status"], task["attempts"]) == ("failed", 2)
    assert task["error"].startswith("delivered 2 times and its worker was lost each time")
    assert task["errors"][-1]["worker"] == "w2"
    assert store.requeue_worker("w2") == [], "nothing left running to re-queue"


# --- every operation from every state --------------------------------------------------------------------------------


def _in_state(store: Store, state: TaskStatus, retries: int) -> int:
    """A new task brought to ``state`` through the store's own operations.

    A waiting task (and, with ``retries``, a cancelled one) waits for a queued task, the only other one in
    the store; with ``retries`` a waiting task is due a minute after its dependency's events.
    """
    store.db.execute_sql("DELETE FROM task")
    store.db.execute_sql("DELETE FROM task_dependency")
    waits = state == TaskStatus.WAITING or (state == TaskStatus.CANCELLED and retries)
    after = [add(store, "dep")] if waits else []
    later = state == TaskStatus.SCHEDULED or (state == TaskStatus.WAITING and retries)
    task_id = store.add_task(
        {"name": "job"}, {}, run_at=NOW + (60 if later else 0), now=NOW, options={"retries": retries}, after=after
    )
    if state in (TaskStatus.RUNNING, TaskStatus.SUCCEEDED, TaskStatus.FAILED):
        store.claim("w1", 1, NOW)
    if state == TaskStatus.SUCCEEDED:
        store.apply_events([("w1", ev(task_id, 1, "succeeded", result=1))])
    if state == TaskStatus.FAILED:
        store.fail_delivery(task_id, 1, "w1", at=NOW, error="E")
    if state == TaskStatus.CANCELLED:
        store.cancel(task_id, NOW)
    assert status(store, task_id) == state.value
    return task_id


_OPERATIONS = {
    "promote_due": lambda s, t, a: s.promote_due(NOW + 3600),
    "claim": lambda s, t, a: s.claim("w2", 10, NOW),
    "unclaim": lambda s, t, a: s.unclaim([(t, a)]),
    "requeue": lambda s, t, a: s.requeue([(t, a)]),
    "requeue_worker": lambda s, t, a: s.requeue_worker("w1"),
    "give_up_lost": lambda s, t, a: s.give_up_lost(now=NOW, worker="w1"),
    "fail_delivery": lambda s, t, a: s.fail_delivery(t, a, "w1", at=NOW, error="lost"),
    "cancel": lambda s, t, a: s.cancel(t, NOW),
    "retry": lambda s, t, a: s.retry(t, NOW),
    "started event": lambda s, t, a: _event(s, "w1", ev(t, a, "started")),
    "progress event": lambda s, t, a: _event(s, "w1", ev(t, a, "progress", progress=0.5)),
    "succeeded event": lambda s, t, a: _event(s, "w1", ev(t, a, "succeeded", result=1)),
    "failed event": lambda s, t, a: _event(s, "w1", ev(t, a, "failed", error="E")),
    "another worker's failed event": lambda s, t, a: _event(s, "w9", ev(t, a, "failed", error="E")),
    "its dependency succeeds": lambda s, t, a: _dependency_ends(s, t, ev(0, 0, "succeeded", result=1)),
    "its dependency fails": lambda s, t, a: _dependency_ends(s, t, ev(0, 0, "failed", error="E")),
}


def _dependency_ends(store: Store, task_id: int, event: dict) -> None:
    """The task's dependency, if it has one, is claimed and ends with ``event``."""
    for dep in store.get_task(task_id)["after"]:
        store.claim("w3", 10, NOW)
        _event(store, "w3", {**event, "task_id": dep, "attempt": store.get_task(dep)["attempts"]})


def _event(store: Store, worker: str, event: dict) -> Applied:
    return store.apply_events([(worker, event)])


def test_every_operation_from_every_state_follows_the_transitions_table(db_url: str) -> None:
    store = Store.open(db_url, max_deliveries=1)
    seen: set[tuple[TaskStatus, TaskStatus]] = set()
    try:
        for state in TaskStatus:
            for retries in (0, 1):
                for name, operation in _OPERATIONS.items():
                    task_id = _in_state(store, state, retries)
                    try:
                        operation(store, task_id, max(1, store.get_task(task_id)["attempts"]))
                    except InvalidTransition:
                        pass
                    after = TaskStatus(status(store, task_id))
                    if after != state:
                        assert after in NEXT[state], f"{name} moved a {state.value} task to {after.value}"
                        seen.add((state, after))
    finally:
        store.close()
    allowed = {(source, target) for source, targets in NEXT.items() for target in targets}
    assert seen == allowed, f"transitions in the table that no operation makes: {allowed - seen}"


# --- idempotency: a task's key, a request's key -----------------------------------------------------------------------


def test_key_is_unique_among_tasks_not_yet_final(store: Store) -> None:
    first = add(store, key="order-7")
    assert add(store, key="order-7") == first, "a live task holds its key"
    assert add(store, key="order-8") != first
    store.claim("w1", 10, NOW)
    store.apply_events([("w1", ev(first, 1, "succeeded", result=1))])
    second = add(store, key="order-7")
    assert second != first, "a final task frees its key"
    assert store.get_task(second)["key"] == "order-7"


def test_keys_within_one_submission(store: Store) -> None:
    held = add(store, key="k1")
    tasks = [({"name": "job", "key": key}, {"i": i}) for i, key in enumerate(["k1", None, "k2", "k2", None])]
    ids = store.add_tasks(tasks, run_at=NOW, now=NOW)
    assert ids[0] == held and ids[2] == ids[3], "a held key, and one key twice in one submission"
    assert len({ids[1], ids[2], ids[4], held}) == 4
    assert sorted(t["id"] for t in store.list_tasks(status=None, name="job", username=None, limit=10)) == sorted(
        {held, *ids}
    )


def test_retry_refused_while_another_task_holds_the_key(store: Store) -> None:
    first = add(store, key="nightly")
    store.cancel(first, NOW)
    second = add(store, key="nightly")
    with pytest.raises(InvalidTransition, match=f"held by task {second}"):
        store.retry(first, NOW)
    assert status(store, first) == "cancelled"
    store.cancel(second, NOW)
    assert store.retry(first, NOW)["status"] == "queued"


def test_a_repeated_request_with_the_longest_key_creates_nothing_twice(store: Store) -> None:
    tasks = [({"name": "job"}, {"i": i}) for i in range(12)]
    key = "k" * 255  # the longest a request_key may be: KEY/11 would not fit the column
    ids = store.add_tasks(tasks, run_at=NOW, now=NOW, request_key=key)
    assert store.add_tasks(tasks, run_at=NOW, now=NOW, request_key=key) == ids and len(set(ids)) == 12
    assert store.add_tasks(tasks, run_at=NOW, now=NOW, request_key="k" * 254) != ids


def test_search_finds_a_substring_of_the_description_in_any_case_wildcards_literal(store: Store) -> None:
    ids = {text: add(store, description=text) for text in ("Backup 50% DONE", "backup 50 done", "a_b", "axb", "c\\d")}
    add(store)  # no description

    def found(search: str) -> set[str]:
        rows = store.list_tasks(status=None, name=None, username=None, search=search, limit=50)
        return {text for text, task_id in ids.items() if task_id in {row["id"] for row in rows}}

    assert found("BACKUP") == {"Backup 50% DONE", "backup 50 done"}
    assert found("50%") == {"Backup 50% DONE"}, "% is a character, not a wildcard"
    assert found("a_b") == {"a_b"}, "_ is a character, not a wildcard"
    assert found("c\\d") == {"c\\d"}
    assert found("") == set(ids) and found("nothing like it") == set()
    assert store.task_ids(status="queued", name=None, username=None, search="done", limit=1) == [ids["backup 50 done"]]


def test_cancel_many_and_retry_many_move_what_can_move_and_say_why_not_for_the_rest(store: Store) -> None:
    running, done, scheduled, queued = add(store), add(store), add(store, run_at=NOW + 60), add(store)
    assert [t["task_id"] for t in store.claim("w1", 1, NOW) + store.claim("w2", 1, NOW)] == [running, done]
    store.apply_events([("w2", ev(done, 1, "succeeded", result=None))])
    order = [done, queued, 999_999, running, scheduled]
    cancelled, refused = store.cancel_many(order, NOW + 1)
    assert cancelled == [
        {"id": queued, "worker": None, "attempts": 0},
        {"id": running, "worker": "w1", "attempts": 1},
        {"id": scheduled, "worker": None, "attempts": 0},
    ], "in the order asked, a running one with its delivery"
    why = "only waiting, scheduled, queued or running tasks can be cancelled"
    assert refused[done].message == f"task {done} is succeeded: {why}"
    assert isinstance(refused[999_999], TaskNotFound) and set(refused) == {done, 999_999}
    retried, refused = store.retry_many(order, NOW + 2)
    assert retried == [queued, running, scheduled] and set(refused) == {done, 999_999}
    assert {status(store, task_id) for task_id in retried} == {"queued"}


def test_retry_many_refuses_only_the_tasks_whose_key_is_held(store: Store) -> None:
    first, free = add(store, key="nightly"), add(store)
    store.cancel_many([first, free], NOW)
    holder = add(store, key="nightly")
    retried, refused = store.retry_many([first, free], NOW)
    assert retried == [free] and list(refused) == [first]
    assert f"held by task {holder}" in refused[first].message and status(store, first) == "cancelled"


def test_a_repeated_request_creates_nothing_twice(store: Store) -> None:
    tasks = [({"name": "job"}, {"i": i}) for i in range(3)]
    ids = store.add_tasks(tasks, run_at=NOW, now=NOW, request_key="req-1")
    assert store.add_tasks(tasks, run_at=NOW, now=NOW, request_key="req-1") == ids
    assert store.add_tasks(tasks, run_at=NOW, now=NOW, request_key="req-2") != ids
    one = store.add_task({"name": "job"}, {}, run_at=NOW + 60, now=NOW, request_key="req-3")
    assert store.add_task({"name": "job"}, {}, run_at=NOW + 60, now=NOW, request_key="req-3") == one
    rec = store.add_recurring({"name": "job"}, {}, interval="1 hour", next_run_at=NOW, now=NOW, request_key="req-4")
    again = store.add_recurring({"name": "job"}, {}, interval="1 hour", next_run_at=NOW, now=NOW, request_key="req-4")
    assert again == rec and len(store.list_recurring()) == 1
    assert len(store.list_tasks(status=None, name="job", username=None, limit=100)) == 7


# --- the cluster: leases and who owns a delivery ---------------------------------------------------------------------


def _as(store: Store, server_id: str) -> Store:
    """The store acting for server ``server_id`` (one process plays several servers, one call at a time)."""
    store.server_id = server_id
    return store


def test_a_server_requeues_only_its_own_lost_deliveries(store: Store) -> None:
    mine, theirs = add(store), add(store)
    _as(store, "A").claim("w1", 1, NOW)
    _as(store, "B").claim("w1", 1, NOW)  # the same worker id through another server: its delivery is B's
    assert _as(store, "A").requeue_worker("w1") == [mine]
    assert status(store, theirs) == "running" and store.get_task(theirs)["server"] == "B"
    assert _as(store, "B").running() == {(theirs, 1)} and _as(store, "A").running() == set()


def test_deliveries_of_an_expired_server_are_requeued_after_a_grace(store: Store) -> None:
    _as(store, "A").join(host="h", pid=1, address="127.0.0.1", now=NOW, lease=5)
    _as(store, "B").join(host="h", pid=2, address="127.0.0.2", now=NOW, lease=5)
    task_id = add(store)
    _as(store, "A").claim("w1", 1, NOW)
    b = _as(store, "B")
    assert b.renew(now=NOW + 1, lease=5, workers=[]) == 1, "A is B's live peer"
    assert b.requeue_abandoned(now=NOW + 8, grace=5, unowned=True) == [], "A's lease ended 3 s ago: within the grace"
    assert b.requeue_abandoned(now=NOW + 11, grace=5, unowned=True) == [task_id]
    assert status(store, task_id) == "queued" and store.get_task(task_id)["server"] is None


def test_a_worker_that_moved_brings_its_deliveries(store: Store) -> None:
    task_id = add(store)
    _as(store, "A").claim("w1", 1, NOW)
    assert _as(store, "B").adopt("w1", [(task_id, 2)]) == [], "not the current delivery"
    assert _as(store, "B").adopt("w9", [(task_id, 1)]) == [], "not that worker's"
    assert _as(store, "B").adopt("w1", [(task_id, 1)]) == [task_id]
    assert _as(store, "A").requeue_worker("w1") == [], "no longer A's to requeue"
    b = _as(store, "B")
    b.apply_events([("w1", ev(task_id, 1, "succeeded", result="moved"))])
    assert store.get_task(task_id)["result"] == "moved"


def test_workers_of_live_servers_are_listed_with_their_server(store: Store) -> None:
    record = {"id": "w1", "host": "h", "pid": 7, "handlers": ["echo"], "slots": 4, "prefetch": 0, "busy": 1,
              "last_seen": NOW, "key": None}  # fmt: skip
    _as(store, "A").join(host="h", pid=1, address="127.0.0.1", now=NOW, lease=5)
    store.renew(now=NOW, lease=5, workers=[record])
    _as(store, "B").join(host="h", pid=2, address="127.0.0.2", now=NOW, lease=5)
    listed = store.workers(NOW + 1)
    assert [(w["id"], w["server"], w["server_address"], w["handlers"], w["busy"]) for w in listed] == [
        ("w1", "A", "127.0.0.1", ["echo"], 1)
    ]
    assert store.workers(NOW + 6) == [], "A's lease ran out"
    _as(store, "A").leave(NOW + 2)
    assert _as(store, "B").workers(NOW + 2) == []


# --- the pool: a transaction per greenlet; reads beside the writer on PostgreSQL and MariaDB -----------------------


def _sleep(store: Store, seconds: float) -> None:
    """A statement that takes ``seconds`` in the database server (waiting on its socket, for the driver)."""
    sleep = "pg_sleep" if store.dialect.name == "postgresql" else "SLEEP"
    store.db.execute_sql(f"SELECT {sleep}({seconds})")


@pytest.mark.parametrize("db_url", ["postgres", "mysql"], indirect=True)
def test_a_read_runs_beside_an_open_transaction_on_its_own_connection(store: Store) -> None:
    import gevent
    import gevent.event

    inside = gevent.event.Event()
    go_on = gevent.event.Event()
    order: list[str] = []

    def writer() -> None:
        with store.transaction():
            add(store, "uncommitted")
            inside.set()
            go_on.wait(10)
        order.append("committed")

    def reader() -> None:
        inside.wait(10)
        seen = store.list_tasks(status=None, name="uncommitted", username=None, limit=10)
        order.append(f"read {len(seen)}")
        go_on.set()

    gevent.joinall([gevent.spawn(writer), gevent.spawn(reader)], timeout=20, raise_error=True)
    assert order == ["read 0", "committed"], "the read neither waited for the writer nor saw its uncommitted task"
    assert len(store.list_tasks(status=None, name="uncommitted", username=None, limit=10)) == 1


@pytest.mark.parametrize("db_url", ["postgres", "mysql"], indirect=True)
def test_a_slow_read_does_not_hold_up_a_write_and_the_stop_waits_for_it(store: Store) -> None:
    import gevent

    order: list[str] = []

    def slow_read() -> None:
        with store._read():
            _sleep(store, 0.5)
        order.append("read")

    def write() -> None:
        gevent.sleep(0.05)  # let the read begin first
        add(store)
        order.append("write")

    reading = gevent.spawn(slow_read)
    gevent.joinall([gevent.spawn(write)], timeout=20, raise_error=True)
    assert order == ["write"], "the write committed while the read went on"
    with store.exclusive(10) as alone:
        assert alone and order == ["write", "read"], "exclusive() waited for the read to end"
    reading.join(10)


def test_each_greenlet_has_its_own_transaction(store: Store) -> None:
    import gevent

    failures: list[BaseException] = []

    def submit(n: int) -> None:
        try:
            with store.transaction():
                for _ in range(n):
                    add(store, f"g{n}")
                    gevent.sleep(0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    gevent.joinall([gevent.spawn(submit, n) for n in (3, 5, 7)], timeout=20)
    assert not failures
    for n in (3, 5, 7):
        assert len(store.list_tasks(status=None, name=f"g{n}", username=None, limit=100)) == n


@pytest.mark.parametrize("db_url", ["postgres", "mysql"], indirect=True)
def test_a_read_only_transaction_runs_beside_the_writer_and_refuses_writes(store: Store) -> None:
    import gevent
    import gevent.event

    inside = gevent.event.Event()
    order: list[str] = []

    def writer() -> None:
        with store.transaction():
            add(store, "slow")
            inside.set()
            _sleep(store, 0.3)
        order.append("write committed")

    def reader() -> None:
        inside.wait(10)
        with store.transaction(read_only=True):
            store.after_commit(lambda: order.append("after the read"))
            order.append(f"read {len(store.list_tasks(status=None, name='slow', username=None, limit=10))}")

    gevent.joinall([gevent.spawn(writer), gevent.spawn(reader)], timeout=20, raise_error=True)
    assert order == ["read 0", "after the read", "write committed"]
    with pytest.raises(RuntimeError, match="read-only"), store.transaction(read_only=True):
        add(store)


# --- counts (tally.py) --------------------------------------------------------------------------------------------


def test_outcomes_are_kept_per_minute_and_name_with_their_run_time(store: Store) -> None:
    ok, bad, plain, gone = add(store, "a"), add(store, "b", options={"retries": 1}), add(store, "c"), add(store, "a")
    store.claim("w1", 3, NOW)
    store.apply_events([("w1", ev(ok, 1, "succeeded", at=NOW + 3, result=1, started_at=NOW + 1))])
    store.apply_events([("w1", ev(plain, 1, "started", at=NOW + 2)), ("w1", ev(plain, 1, "succeeded", at=NOW + 6))])
    store.apply_events([("w1", ev(bad, 1, "failed", error="E", started_at=NOW))])  # a retry is no outcome
    store.cancel(gone, NOW)
    before = time.time()
    outcomes = store.outcomes(before - 60)
    assert {(name, outcome): (n, run) for _, name, outcome, n, run in outcomes} == {
        ("a", "succeeded"): (1, 2.0),
        ("c", "succeeded"): (1, 4.0),  # from its started event: the final one does not say
        ("a", "cancelled"): (1, 0.0),
    }
    assert {minute for minute, *_ in outcomes} <= {int(before // 60 * 60), int(before // 60 * 60) - 60}
    assert store.outcomes(before + 120) == []
    assert store.forget_outcomes(before + 120) == len(outcomes)
    assert store.outcomes(0) == []


def test_a_server_starting_alone_counts_the_tasks_afresh(db_url: str) -> None:
    first = Store.open(db_url, server_id="one")
    try:
        add(first), add(first), add(first, run_at=NOW + 60)
        first.db.execute_sql("UPDATE task_count SET n = n + 40")  # as if another version had left it wrong
        assert first.counts()["queued"] == 42
        first.join(host="h", pid=1, address="127.0.0.1", now=time.time(), lease=5.0)
        assert first.counts() == counted(first) == {**dict.fromkeys(counted(first), 0), "queued": 2, "scheduled": 1}
        second = Store.open(db_url, server_id="two")
        try:  # with "one" alive, "two" keeps the counts as they are and adds its own changes
            second.join(host="h", pid=2, address="127.0.0.2", now=time.time(), lease=5.0)
            add(second)
            assert second.counts() == counted(second)
            rows = second.db.execute_sql("SELECT DISTINCT server FROM task_count ORDER BY server").fetchall()
            assert [server for (server,) in rows] == ["one", "two"]
        finally:
            second.close()
    finally:
        first.close()


# --- limits and pauses ----------------------------------------------------------------------------------------------


def _finish(store: Store, task_id: int, worker: str = "w1") -> None:
    attempt = store.get_task(task_id)["attempts"]
    assert store.apply_events([(worker, ev(task_id, attempt, "succeeded", result=None))]).finished == [task_id]


def test_a_claim_takes_no_more_of_a_limited_key_than_its_limit_and_the_next_tasks_instead(store: Store) -> None:
    store.limits = limits.parse(["job=2"])
    jobs = [add(store, run_at=NOW - 10 + i) for i in range(4)]  # the head of the queue
    others = [add(store, "other") for _ in range(3)]
    assert [t["task_id"] for t in store.claim("w1", 8, NOW)] == [*jobs[:2], *others]
    assert store.claim("w2", 8, NOW) == [], "the limit holds for another worker too"
    _finish(store, jobs[0])
    assert [t["task_id"] for t in store.claim("w2", 8, NOW)] == [jobs[2]], "a finished one makes room for one"
    store.cancel(jobs[1], NOW)
    assert [t["task_id"] for t in store.claim("w2", 8, NOW)] == [jobs[3]]
    assert store.window_opens is None


def test_tasks_of_several_names_share_a_limit_key(store: Store) -> None:
    store.limits = limits.parse(["gpu=1", "plain=1"])
    a = store.add_task({"name": "train"}, {}, run_at=NOW - 2, now=NOW, options={"limit_key": "gpu"})
    b = store.add_task({"name": "render"}, {}, run_at=NOW - 1, now=NOW, options={"limit_key": "gpu"})
    named = [add(store, "gpu") for _ in range(2)]  # no limit_key: counted under their name, the key too
    plain = store.add_task({"name": "plain"}, {}, run_at=NOW, now=NOW, options={"limit_key": "elsewhere"})
    assert store.get_task(a)["limit_key"] == "gpu" and store.get_task(plain)["limit_key"] == "elsewhere"
    assert [t["task_id"] for t in store.claim("w1", 8, NOW)] == [a, plain]
    _finish(store, a)
    assert [t["task_id"] for t in store.claim("w1", 8, NOW)] == [b]
    _finish(store, b)
    assert [t["task_id"] for t in store.claim("w1", 8, NOW)] == [named[0]]


def test_a_rate_lets_so_many_start_per_window_and_says_when_it_opens(store: Store) -> None:
    store.limits = limits.parse([], ["job=3/s"])
    ids = [add(store) for _ in range(8)]
    other = add(store, "other")
    assert [t["task_id"] for t in store.claim("w1", 2, NOW)] == ids[:2]
    assert store.window_opens is None, "one more may start"
    assert [t["task_id"] for t in store.claim("w1", 8, NOW + 0.5)] == [ids[2], other]
    assert store.window_opens == NOW + 1, "the window has room once the first two starts are a second old"
    assert store.claim("w1", 8, NOW + 0.99) == []
    assert [t["task_id"] for t in store.claim("w1", 8, NOW + 1)] == ids[3:5], "the two of NOW left the window"
    assert store.window_opens == NOW + 1.5
    assert [t["task_id"] for t in store.claim("w1", 8, NOW + 1.5)] == [ids[5]]
    remembered = store.db.execute_sql("SELECT at, n FROM rate_start WHERE \"key\" = 'job' ORDER BY at").fetchall()
    assert list(remembered) == [(NOW + 1, 2), (NOW + 1.5, 1)], "starts that left the window are forgotten"


def test_a_limit_and_a_rate_on_one_key_both_hold(store: Store) -> None:
    store.limits = limits.parse(["job=1"], ["job=2/m"])
    ids = [add(store) for _ in range(3)]
    assert [t["task_id"] for t in store.claim("w1", 8, NOW)] == ids[:1]
    _finish(store, ids[0])
    assert [t["task_id"] for t in store.claim("w1", 8, NOW + 1)] == ids[1:2]
    _finish(store, ids[1])
    assert store.claim("w1", 8, NOW + 2) == [], "room under the limit, none under the rate"
    assert store.window_opens == NOW + 60
    assert [t["task_id"] for t in store.claim("w1", 8, NOW + 60)] == ids[2:]


def test_a_paused_name_stays_queued_and_is_shown_until_resumed(db_url: str) -> None:
    s = Store.open(db_url)
    try:
        held = [add(s, "held") for _ in range(2)]
        other = add(s, "other")
        rec = s.add_recurring({"name": "held"}, {}, interval="1 hour", next_run_at=NOW + 60, now=NOW)
        assert s.pause("held", NOW) is True and s.pause("held", NOW + 1) is False
        assert s.paused() == ["held"]
        assert [t["task_id"] for t in s.claim("w1", 8, NOW)] == [other]
        assert [t["paused"] for t in s.list_tasks(status=None, name=None, username=None, limit=10)] == [
            False, True, True
        ]  # fmt: skip
        assert s.get_task(held[0])["paused"] and not s.get_task(other)["paused"]
        assert [(r["id"], r["paused"]) for r in s.list_recurring()] == [(rec, True)]
        assert s.revoke(rec)["paused"] is True
    finally:
        s.close()
    s = Store.open(db_url)  # the pause is in the database: it outlasts the server
    try:
        assert s.paused() == ["held"] and s.claim("w1", 8, NOW) == []
        assert s.resume("held") is True and s.resume("held") is False
        assert [t["task_id"] for t in s.claim("w1", 8, NOW)] == held
        assert not s.get_task(held[0])["paused"] and s.paused() == []
        assert s.counts() == counted(s)
    finally:
        s.close()


@pytest.mark.parametrize("db_url", ["postgres", "mysql"], indirect=True)
def test_a_limit_holds_between_servers_claiming_at_once(store: Store, db_url: str) -> None:
    """Two servers' claims on one database: the second waits for the first's transaction, then counts its claims."""
    import gevent
    import gevent.event

    other = Store.open(db_url, server_id="B")  # connections of its own: another server
    try:
        store.limits = other.limits = limits.parse(["job=2"])
        ids = [add(store) for _ in range(4)]
        claimed: dict[str, list[int]] = {}
        inside = gevent.event.Event()
        go_on = gevent.event.Event()

        def first() -> None:
            with store.transaction():
                claimed["A"] = [t["task_id"] for t in store.claim("w1", 4, NOW)]
                inside.set()
                go_on.wait(10)

        def second() -> None:
            inside.wait(10)
            claimed["B"] = [t["task_id"] for t in other.claim("w2", 4, NOW)]

        greenlets = [gevent.spawn(first), gevent.spawn(second)]

        def waiting() -> int:
            """Claims of this database waiting for the limits' lock."""
            query = (
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                if store.dialect.name == "postgresql"
                # MariaDB: the statement that takes its lock, running (innodb_trx is a cache, refreshed when unread).
                else "SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE 'INSERT INTO meta %%lock:%%'"
            )
            with store._read():
                return store.db.execute_sql(query).fetchone()[0]

        deadline = time.monotonic() + 10
        while not waiting() and "B" not in claimed:
            assert time.monotonic() < deadline, "the second claim neither waited for the first's lock nor ended"
            gevent.sleep(0.01)
        assert "B" not in claimed, f"the second claim did not wait for the first's transaction: {claimed}"
        go_on.set()
        gevent.joinall(greenlets, timeout=20, raise_error=True)
        assert claimed == {"A": ids[:2], "B": []}
    finally:
        other.close()
        schema.database.initialize(store.db)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_room_under_a_limit_is_announced_to_the_other_servers(store: Store, db_url: str) -> None:
    """A limited task that ends, or is cancelled while running, wakes the other servers' dispatchers (``queued``)."""
    import psycopg2

    store.limits = limits.parse(["job=1"])
    done, cancelled, other = add(store), add(store), add(store, "other")
    store.claim("w1", 1, NOW)
    listener = psycopg2.connect(db_url)  # from here on: what the submissions announced is not heard
    listener.autocommit = True
    listener.cursor().execute("LISTEN martinet")
    store.peers = 1  # as if another server were alive: notices are sent

    def heard_with(kind: str) -> list[str]:
        """The kinds of the notices heard until one of ``kind`` (a commit's notices are one pg_notify)."""
        kinds: list[str] = []
        deadline = time.monotonic() + 10
        while kind not in kinds:
            assert time.monotonic() < deadline, f"no {kind!r} notice, heard {kinds}"
            listener.poll()
            kinds += [notice.payload.split()[1] for notice in listener.notifies]
            listener.notifies.clear()
        return kinds

    try:
        _finish(store, done)
        assert "queued" in heard_with("final"), "a limited task ended"
        store.claim("w1", 2, NOW)  # the second job, and the other task
        store.cancel(cancelled, NOW)
        assert "queued" in heard_with("cancel"), "a running limited task was cancelled"
        _finish(store, other)
        assert heard_with("final") == ["final"], "the other task is under no limit"
    finally:
        listener.close()


# --- dependencies -----------------------------------------------------------------------------------------------------


def after(store: Store, *deps: int, run_at: float = NOW, now: float = NOW, **meta: str) -> int:
    """A task that waits for ``deps``."""
    return store.add_task({"name": "job", **meta}, {}, run_at=run_at, now=now, after=list(deps))


def end(store: Store, task_id: int, kind: str = "succeeded", at: float = NOW + 10, **fields: object) -> Applied:
    """Claim the queued tasks, then end ``task_id``'s delivery with ``kind`` (the others stay running)."""
    store.claim("w1", 100, NOW)
    fields = {"result": {"from": task_id}} if kind == "succeeded" and not fields else fields or {"error": "E"}
    return store.apply_events([("w1", ev(task_id, store.get_task(task_id)["attempts"], kind, at=at, **fields))])


def test_a_dependant_waits_for_every_dependency_then_is_queued_with_their_results(store: Store) -> None:
    a, b = add(store), add(store)
    c = after(store, b, a)
    assert (status(store, c), store.get_task(c)["after"]) == ("waiting", [b, a])
    assert [t["after"] for t in store.list_tasks(status="waiting", name=None, username=None, limit=5)] == [[b, a]]
    assert {t["task_id"] for t in store.claim("w1", 10, NOW)} == {a, b}, "a waiting task is not claimed"
    end(store, a)
    assert status(store, c) == "waiting", "one dependency is still running"
    end(store, b, at=NOW + 20)
    task = store.get_task(c)
    assert (task["status"], task["run_at"]) == ("queued", iso(NOW + 20)), "due from its release"
    [claimed] = store.claim("w2", 10, NOW + 21)
    assert claimed["dependencies"] == {str(b): {"from": b}, str(a): {"from": a}}
    assert list(claimed["dependencies"]) == [str(b), str(a)], "in the order given"


def test_dependencies_ended_already_settle_the_dependant_at_submission(store: Store) -> None:
    done = add(store)
    end(store, done)
    assert status(store, after(store, done)) == "queued"
    assert store.get_task(after(store, done, run_at=NOW + 60))["status"] == "scheduled", "then its run_at decides"
    failed = add(store)
    end(store, failed, "failed")
    late = after(store, done, failed)
    assert (status(store, late), store.get_task(late)["error"]) == ("cancelled", f"dependency {failed} failed")


def test_the_release_is_in_the_transaction_that_records_the_success(store: Store) -> None:
    dep = add(store)
    task_id = after(store, dep)
    store.claim("w1", 1, NOW)
    with pytest.raises(RuntimeError), store.transaction():
        store.apply_events([("w1", ev(dep, 1, "succeeded", result=1))])
        assert status(store, task_id) == "queued", "released inside the transaction"
        raise RuntimeError("the commit never happens")
    assert (status(store, dep), status(store, task_id)) == ("running", "waiting"), "both undone together"
    store.apply_events([("w1", ev(dep, 1, "succeeded", result=1))])
    assert status(store, task_id) == "queued"


def test_a_dependant_released_before_its_run_at_is_scheduled_for_then(store: Store) -> None:
    dep = add(store)
    task_id = after(store, dep, run_at=NOW + 60)
    end(store, dep)
    task = store.get_task(task_id)
    assert (task["status"], task["run_at"]) == ("scheduled", iso(NOW + 60))
    assert store.promote_due(NOW + 60) == 1 and status(store, task_id) == "queued"


def test_a_failure_or_a_cancel_cancels_the_dependants_down_the_line(store: Store) -> None:
    told: list[int] = []
    store.on_final = told.extend
    x = add(store)
    y, other = after(store, x), after(store, x)
    z = after(store, y)
    untouched = add(store)
    applied = end(store, x, "failed")
    assert applied.finished == [x]
    for task_id, error in ((y, f"dependency {x} failed"), (other, f"dependency {x} failed"),
                           (z, f"dependency {y} was cancelled")):  # fmt: skip
        task = store.get_task(task_id)
        assert (task["status"], task["error"], task["attempts"], task["started_at"]) == ("cancelled", error, 0, None)
        assert task["finished_at"] == iso(NOW + 10)
    assert sorted(told) == [y, other, z], "told once committed: their parked waits are answered"
    assert status(store, untouched) == "running"

    later = add(store, run_at=NOW + 60)
    waiting = after(store, later)
    store.cancel(later, NOW + 5)
    assert store.get_task(waiting)["error"] == f"dependency {later} was cancelled"


def test_a_failure_with_a_retry_left_keeps_the_dependants_waiting(store: Store) -> None:
    flaky = add(store, options={"retries": 1})
    task_id = after(store, flaky)
    assert end(store, flaky, "failed").retrying == [flaky]
    assert status(store, task_id) == "waiting"
    store.promote_due(NOW + 3600)
    end(store, flaky)
    assert status(store, task_id) == "queued"


def test_a_dependency_given_up_as_lost_cancels_its_dependants(store: Store) -> None:
    store.max_deliveries = 1
    lost = add(store)
    task_id = after(store, lost)
    store.claim("w1", 1, NOW)
    assert store.give_up_lost(now=NOW + 1, worker="w1") == [lost]
    assert store.get_task(task_id)["error"] == f"dependency {lost} failed"


def test_an_unknown_dependency_is_refused_and_nothing_is_stored(store: Store) -> None:
    known = add(store)
    for unknown in (known + 1000, 2**63):
        with pytest.raises(InvalidDependency, match=f"dependency {unknown} does not exist: a task can only wait"):
            after(store, known, unknown)
        with pytest.raises(InvalidDependency, match=f"dependency {unknown} does not exist"):
            steps = [({"name": "a"}, {}), ({"name": "b"}, {})]
            store.add_tasks(steps, run_at=NOW, now=NOW, after=[unknown], chain=True)
    assert [t["id"] for t in store.list_tasks(status=None, name=None, username=None, limit=10)] == [known]


def test_a_chain_waits_step_by_step_and_is_stored_in_one_commit(store: Store) -> None:
    first = add(store)
    commits: list[float] = []
    store.pool.observe_commit = commits.append
    steps = [({"name": f"step{i}"}, {"i": i}) for i in range(3)]
    ids = store.add_tasks(steps, run_at=NOW, now=NOW, chain=True)
    assert len(commits) == 1, "one commit for the whole chain"
    assert [(store.get_task(i)["status"], store.get_task(i)["after"]) for i in ids] == [
        ("queued", []), ("waiting", [ids[0]]), ("waiting", [ids[1]])
    ]  # fmt: skip
    end(store, ids[0])
    assert [status(store, i) for i in ids] == ["succeeded", "queued", "waiting"]
    end(store, ids[1], "failed")
    assert store.get_task(ids[2])["error"] == f"dependency {ids[1]} failed"
    behind = store.add_tasks(steps[:2], run_at=NOW, now=NOW, chain=True, after=[first])
    assert [store.get_task(i)["after"] for i in behind] == [[first], [behind[0]]]
    assert [status(store, i) for i in behind] == ["waiting", "waiting"]


def test_retry_of_a_dependant_waits_again_or_is_refused_while_a_dependency_failed(store: Store) -> None:
    x = add(store)
    y = after(store, x)
    end(store, x, "failed")
    with pytest.raises(InvalidTransition, match=f"task {y} cannot be retried: its dependency {x} is failed"):
        store.retry(y, NOW + 11)
    assert store.retry(x, NOW + 12)["status"] == "queued", "its cancelled dependants stay cancelled"
    assert status(store, y) == "cancelled"
    task = store.retry(y, NOW + 13)
    assert (task["status"], task["error"], task["finished_at"]) == ("waiting", None, None)
    end(store, x, at=NOW + 14)
    assert status(store, y) == "queued"
    end(store, y, "failed")
    assert store.retry(y, NOW + 15)["status"] == "queued", "its dependencies succeeded: it runs again at once"
    waiting = after(store, add(store, run_at=NOW + 60))
    store.cancel(waiting, NOW)
    assert store.get_task(waiting)["error"] is None, "cancelled by hand"
    assert store.retry_many([waiting], NOW)[0] == [waiting] and status(store, waiting) == "waiting"


def test_a_key_held_returns_the_holder_without_the_new_dependencies(store: Store) -> None:
    dep = add(store)
    holder = add(store, key="k")
    assert after(store, dep, key="k") == holder
    assert store.get_task(holder)["after"] == [] and status(store, holder) == "queued"


def test_purge_forgets_dependencies_and_a_purged_one_counts_as_met(store: Store) -> None:
    dep = add(store)
    task_id = after(store, dep)
    end(store, dep)
    end(store, task_id, "failed")
    assert store.purge(["succeeded"], finished_before=NOW + 100, limit=10) == 1
    rows = store.db.execute_sql("SELECT COUNT(*) FROM task_dependency").fetchone()[0]
    assert rows == 0, "the purged task's rows went with it"
    assert store.retry(task_id, NOW + 20)["status"] == "queued"
    [claimed] = store.claim("w2", 10, NOW + 21)
    assert claimed["dependencies"] == {}, "the purged dependency's result is gone"


def test_version_7_database_gets_dependencies(db_url: str) -> None:
    s = Store.open(db_url)
    try:
        old = add(s)
        with s.transaction():  # back to schema 7, as Martinet left it before dependencies
            for sql in ("DROP TABLE task_dependency", "ALTER TABLE task DROP COLUMN dependencies",
                        "ALTER TABLE task DROP COLUMN dependants",
                        "UPDATE meta SET value = '7' WHERE \"key\" = 'schema_version'"):  # fmt: skip
                s.db.execute_sql(sql)
    finally:
        s.close()
    s = Store.open(db_url)
    try:
        version = s.db.execute_sql("SELECT value FROM meta WHERE \"key\" = 'schema_version'").fetchone()[0]
        assert int(version) == SCHEMA_VERSION == 8
        assert s.get_task(old)["after"] == [] and status(s, old) == "queued"
        task_id = after(s, old)
        end(s, old)
        assert status(s, task_id) == "queued"
        assert s.counts() == counted(s)
    finally:
        s.close()


def test_any_character_round_trips(store: Store) -> None:
    """Names, descriptions, keys, args and results in any script come back as they went in (utf8mb4 on MariaDB),
    and keys that differ only in case or accents are different keys."""
    text = "émoji 🚀🎉 中文字符 日本語 한국어 العربية ∑"
    meta = {"name": "名前🚀", "username": "ユーザー", "description": text, "key": "鍵🔑"}
    task_id = store.add_task(meta, {"text": text, "nested": ["😀", {"字": "🀄"}]}, run_at=NOW, now=NOW)
    assert store.add_task({**meta, "key": "鍵🔑"}, {}, run_at=NOW, now=NOW) == task_id, "the same key"
    for other in ("鍵🗝", "KEY", "key", "kéy"):
        other_task = store.add_task({**meta, "key": other, "description": "x"}, {}, run_at=NOW, now=NOW)
        assert other_task != task_id, f"{other!r} is another key"
    record = store.get_task(task_id)
    assert [record[f] for f in ("name", "username", "description", "key")] == [*list(meta.values())]
    assert record["args"] == {"text": text, "nested": ["😀", {"字": "🀄"}]}
    [claimed] = [t for t in store.claim("w1", 10, NOW) if t["task_id"] == task_id]
    store.apply_events([("w1", {"event": "succeeded", "task_id": task_id, "attempt": claimed["attempt"],
                                "at": NOW + 1, "result": {"答え": text}})])  # fmt: skip
    assert store.get_task(task_id)["result"] == {"答え": text}
    assert [t["id"] for t in store.list_tasks(status=None, name=None, username=None, limit=10, search="中文")] == [
        task_id
    ]
    assert [t["id"] for t in store.list_tasks(status=None, name=None, username=None, limit=10, search="MOJI 🚀")] == [
        task_id
    ], "a search ignores case"


@pytest.mark.parametrize("db_url", ["postgres", "mysql"], indirect=True)
def test_a_row_held_by_another_server_past_the_lock_timeout_is_store_unavailable(store: Store, db_url: str) -> None:
    """Another server's transaction holds a task's row: a change to it waits (the lock wait timeout), then fails with
    StoreUnavailable naming the cause, and the store goes on working."""
    task_id = add(store)
    other = Store.open(db_url, server_id="B")  # connections of its own: another server
    schema.database.initialize(store.db)  # the models stay this store's
    try:
        other.db.execute_sql("BEGIN")
        other.db.execute_sql(f"SELECT id FROM task WHERE id = {task_id} FOR UPDATE")
        timeout = "SET LOCAL lock_timeout = '300ms'" if store.dialect.name == "postgresql" else None
        with pytest.raises(StoreUnavailable, match="(?i)lock") as raised, store.transaction():
            if timeout:
                store.db.execute_sql(timeout)
            else:
                store.db.execute_sql("SET SESSION innodb_lock_wait_timeout = 1")
            store.cancel(task_id, NOW)
        assert "try again" in str(raised.value)
        other.db.execute_sql("ROLLBACK")
        assert store.cancel(task_id, NOW)["status"] == "cancelled"
    finally:
        other.close()
        schema.database.initialize(store.db)


@pytest.mark.parametrize(
    ("info", "refused"),
    [
        ("10.11.6-MariaDB-0+deb12u1", None),
        ("5.5.5-10.6.18-MariaDB-log", None),  # as an old client protocol shows the version
        ("11.4.2-MariaDB", None),
        ("8.0.36", "runs MySQL 8.0.36: Martinet supports MariaDB 10.6 or newer only"),
        ("10.5.23-MariaDB", "runs MariaDB 10.5: Martinet needs MariaDB 10.6 or newer"),
    ],
)
def test_only_mariadb_10_6_or_newer_is_served(info: str, refused: str | None) -> None:
    """The version string a server greets with decides: MySQL is refused by name (the store needs INSERT ...
    RETURNING, which MySQL lacks), and so is a MariaDB older than 10.6 (SKIP LOCKED)."""
    if refused is None:
        db.check_mariadb(info, "db.example")
        return
    with pytest.raises(ConfigError, match=re.escape(f"the server at db.example {refused}")):
        db.check_mariadb(info, "db.example")

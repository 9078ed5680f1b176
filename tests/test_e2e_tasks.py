"""Every client verb from Python, against a real server and worker, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import datetime
import time

import pytest

from conftest import TEST_HANDLER_NAMES, wait_until
from martinet_app.errors import BadTimeSpec, InvalidRequest, InvalidTransition, TaskNotFound, WaitTimeout


def ts(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def test_execute_stores_progress_and_result(cluster):
    cluster.start_worker()
    m = cluster.client
    meta = {"username": "ana", "name": "steps", "description": "three steps"}
    args = {"steps": 3}
    before_meta, before_args = copy.deepcopy(meta), copy.deepcopy(args)
    task_id = m.execute(meta, args)
    assert (meta, args) == (before_meta, before_args), "the caller's dicts must not be modified"
    task = m.wait(task_id, timeout=15)
    assert task["status"] == "succeeded"
    assert task["result"] == {"done": 3}
    assert task["progress"] == 1.0 and task["progress_message"] == "step 3"
    assert (task["name"], task["username"], task["description"], task["args"]) == ("steps", "ana", "three steps", args)
    assert task["attempts"] == 1 and task["worker"]
    assert ts(task["created_at"]) <= ts(task["started_at"]) <= ts(task["finished_at"])
    assert set(task) == {
        "id", "name", "username", "description", "args", "status", "progress", "progress_message", "result",
        "error", "traceback", "attempts", "worker", "created_at", "run_at", "started_at", "finished_at",
        "recurring_id", "priority", "retries", "retry_delay", "timeout", "errors", "failures", "server", "key",
        "after", "limit_key", "paused",
    }  # fmt: skip


def test_failure_stores_error_and_traceback(cluster):
    cluster.start_worker()
    task = cluster.client.wait(cluster.client.execute({"name": "explode"}, {"message": "kaput"}), timeout=15)
    assert task["status"] == "failed"
    assert task["error"] == "ValueError: kaput"
    assert "Traceback" in task["traceback"] and "raise ValueError" in task["traceback"]


def test_unknown_handler_fails_naming_task_and_worker(sqlite_cluster):
    sqlite_cluster.start_worker()
    m = sqlite_cluster.client
    task = m.wait(m.execute({"name": "no_such_task"}, {}), timeout=15)
    worker_id = m.workers()[0]["id"]
    assert task["status"] == "failed"
    assert task["error"] == f"no handler for task 'no_such_task' on worker {worker_id}"


@pytest.mark.parametrize(
    "name, error",
    [
        ("bad_result", "not JSON-serialisable"),
        ("bad_progress", "progress fraction must be a number from 0 to 1, got 1.5"),
    ],
)
def test_handler_mistakes_fail_the_task_not_the_worker(sqlite_cluster, name, error):
    worker = sqlite_cluster.start_worker()
    m = sqlite_cluster.client
    task = m.wait(m.execute({"name": name}, {}), timeout=15)
    assert task["status"] == "failed" and error in task["error"]
    assert m.wait(m.execute({"name": "echo"}, {"x": 1}), timeout=15)["result"]["args"] == {"x": 1}
    assert worker.running()


def test_schedule_fires_close_to_its_time(cluster):
    cluster.start_worker()
    m = cluster.client
    task_id = m.schedule("in 2 seconds", {"name": "echo"}, {})
    task = m.status(task_id)
    assert task["status"] == "scheduled"
    due = ts(task["run_at"])
    assert abs(due - (ts(task["created_at"]) + 2)) < 0.01
    task = m.wait(task_id, timeout=15)
    assert task["status"] == "succeeded"
    lateness = ts(task["started_at"]) - due
    assert 0 <= lateness < 1.0, f"started {lateness:.3f} s after its due time"


def test_every_fires_on_its_grid(cluster):
    cluster.start_worker()
    m = cluster.client
    rid = m.every("1 second", {"name": "echo"}, {})

    def three_runs() -> list[dict] | None:
        done = [t for t in m.list(name="echo") if t["recurring_id"] == rid and t["status"] == "succeeded"]
        return done if len(done) >= 3 else None

    runs = wait_until(three_runs, what="three successful runs")
    planned = sorted(ts(t["run_at"]) for t in runs)
    steps = [b - a for a, b in zip(planned, planned[1:], strict=False)]
    # Anchored: each planned time is exactly the previous one plus the interval (no drift).
    assert all(abs(step - 1.0) < 1e-3 for step in steps), steps
    schedule = next(r for r in m.recurring() if r["id"] == rid)
    assert schedule["enabled"] and schedule["interval"] == "1 second"
    assert ts(schedule["next_run_at"]) > planned[-1]
    m.revoke(rid)
    assert next(r for r in m.recurring() if r["id"] == rid)["enabled"] is False
    with pytest.raises(InvalidTransition, match="already revoked"):
        m.revoke(rid)
    assert len(m.list(name="echo")) >= 3, "past runs stay in history"


def test_every_with_run_at_starts_then(sqlite_cluster):
    m = sqlite_cluster.client
    rid = m.every("30 minutes", {"name": "echo", "run_at": "in 1 hour"}, {})
    schedule = next(r for r in m.recurring() if r["id"] == rid)
    assert schedule["run_at"] == "in 1 hour"
    assert abs(ts(schedule["next_run_at"]) - (time.time() + 3600)) < 5
    assert m.list() == []


def test_cancel_scheduled_and_queued_but_not_finished(cluster):
    m = cluster.client
    scheduled = m.schedule("in 1 hour", {"name": "echo"}, {})
    queued = m.execute({"name": "echo"}, {})  # no worker yet: stays queued
    assert m.status(queued)["status"] == "queued"
    assert m.cancel(scheduled)["status"] == "cancelled"
    assert m.cancel(queued)["status"] == "cancelled"
    with pytest.raises(InvalidTransition, match="is cancelled"):
        m.cancel(queued)
    cluster.start_worker()
    done = m.wait(m.execute({"name": "echo"}, {}), timeout=15)
    with pytest.raises(InvalidTransition, match="is succeeded"):
        m.cancel(done["id"])
    assert m.wait(queued, timeout=1)["status"] == "cancelled"
    assert m.status(queued)["attempts"] == 0, "a cancelled task never ran"


def test_list_filters_newest_first(sqlite_cluster):
    m = sqlite_cluster.client
    ids = [m.execute({"name": n, "username": u}, {}) for n, u in [("a", "ana"), ("b", "bob"), ("a", "bob")]]
    assert [t["id"] for t in m.list()] == ids[::-1]
    assert [t["id"] for t in m.list(name="a")] == [ids[2], ids[0]]
    assert [t["id"] for t in m.list(username="bob", name="a")] == [ids[2]]
    assert [t["id"] for t in m.list(limit=1)] == [ids[2]]
    assert [t["id"] for t in m.list(status="queued")] == ids[::-1]
    assert m.list(status="succeeded") == []


def test_workers_lists_the_connected_worker(sqlite_cluster):
    worker = sqlite_cluster.start_worker("--concurrency", "3")
    (info,) = sqlite_cluster.client.workers()
    assert info["pid"] == worker.pid
    assert info["slots"] == 3 and info["busy"] == 0
    assert info["handlers"] == TEST_HANDLER_NAMES
    assert worker.terminate() == 0
    wait_until(lambda: sqlite_cluster.client.workers() == [], what="the worker to leave")


def test_wait_times_out_with_a_clear_error(sqlite_cluster):
    m = sqlite_cluster.client
    task_id = m.execute({"name": "echo"}, {})
    with pytest.raises(WaitTimeout, match=f"task {task_id} did not finish within 0.3 s"):
        m.wait(task_id, timeout=0.3)
    assert isinstance(WaitTimeout("x"), TimeoutError)


def test_concurrency_runs_sleeping_tasks_together(sqlite_cluster):
    sqlite_cluster.start_worker("--concurrency", "4")
    m = sqlite_cluster.client
    ids = [m.execute({"name": "nap"}, {"seconds": 1.0}) for _ in range(4)]
    tasks = [m.wait(i, timeout=15) for i in ids]
    starts = [ts(t["started_at"]) for t in tasks]
    ends = [ts(t["finished_at"]) for t in tasks]
    # All four overlap: each started before any finished (one handler process per slot).
    assert max(starts) < min(ends)


def test_load_is_balanced_by_free_slots(sqlite_cluster):
    first = sqlite_cluster.start_worker("--concurrency", "1")
    second = sqlite_cluster.start_worker("--concurrency", "1")
    m = sqlite_cluster.client
    ids = [m.execute({"name": "nap"}, {"seconds": 0.5}) for _ in range(2)]
    wait_until(lambda: all(m.status(i)["status"] == "running" for i in ids), what="both tasks running")
    assert {w["busy"] for w in m.workers()} == {1}, "one task per single-slot worker, none buffered"
    assert {m.wait(i, timeout=15)["worker"] for i in ids} == {w["id"] for w in m.workers()}
    assert first.running() and second.running()


BAD_REQUESTS = [
    (lambda m: m.execute({"username": "ana"}, {}), InvalidRequest, "'name' is required"),
    (lambda m: m.execute({"name": ""}, {}), InvalidRequest, "'name' is required"),
    (lambda m: m.execute({"name": "echo", "colour": "red"}, {}), InvalidRequest, "unknown task field(s) colour"),
    (lambda m: m.execute({"name": "echo", "run_at": "noon"}, {}), InvalidRequest, "only accepted by every"),
    (lambda m: m.execute({"name": "echo"}, [1, 2]), InvalidRequest, "args must be a JSON object, got list"),
    (lambda m: m.execute({"name": "echo"}, {"x": object()}), InvalidRequest, "not JSON-serialisable"),
    (lambda m: m.execute("echo", {}), InvalidRequest, "task metadata must be an object"),
    (lambda m: m.schedule("in 20 minuts", {"name": "echo"}, {}), BadTimeSpec, "'in 20 minuts'"),
    (lambda m: m.schedule("", {"name": "echo"}, {}), BadTimeSpec, "''"),
    (lambda m: m.every("fortnightly-ish", {"name": "echo"}, {}), BadTimeSpec, "'fortnightly-ish'"),
    (lambda m: m.every("0 minutes", {"name": "echo"}, {}), BadTimeSpec, "'0 minutes'"),
    (lambda m: m.every("1 hour", {"name": "echo", "run_at": "later"}, {}), BadTimeSpec, "'later'"),
    (lambda m: m.status(999999), TaskNotFound, "no task with id 999999"),
    (lambda m: m.status("7"), InvalidRequest, "task_id must be a positive integer"),
    (lambda m: m.cancel(999999), TaskNotFound, "no task with id 999999"),
    (lambda m: m.revoke(999999), TaskNotFound, "no recurring schedule with id 999999"),
    (lambda m: m.list(status="done"), InvalidRequest, "unknown status 'done'"),
    (lambda m: m.list(limit=0), InvalidRequest, "list limit must be an integer"),
    (lambda m: m.list(search="x" * 256), InvalidRequest, "'search' has 256 characters"),
    (lambda m: m.purge({"not": "a status"}, 1), InvalidRequest, "purge takes a final status"),
    (lambda m: m.bulk({"not": "an action"}), InvalidRequest, "bulk action must be one of cancel, retry"),
    (lambda m: m.bulk("cancel", limit=10_001), InvalidRequest, "bulk limit must be an integer from 1 to 10000"),
]


@pytest.mark.parametrize("call, error, message", BAD_REQUESTS)
def test_bad_input_gets_a_typed_error(sqlite_cluster, call, error, message):
    m = sqlite_cluster.client
    with pytest.raises(error) as raised:
        call(m)
    assert message in raised.value.message
    assert m.list() == [], "nothing was stored"
    assert m.ping()["protocol"] == 1, "the server keeps serving"


def test_execute_many_submits_in_one_request(cluster):
    m = cluster.client
    entries = [({"name": "echo", "username": "bulk"}, {"i": i}) for i in range(1200)]
    ids = m.execute_many(entries, priority=3)
    assert len(ids) == 1200 and ids == sorted(ids) and len(set(ids)) == 1200
    assert [m.status(ids[i])["args"] for i in (0, 599, 1199)] == [{"i": 0}, {"i": 599}, {"i": 1199}]
    assert m.status(ids[0])["priority"] == 3
    cluster.start_worker("--concurrency", "4")
    wait_until(lambda: len(m.list(status="succeeded", limit=2000)) == 1200, what="every task to succeed")


def test_execute_many_stores_nothing_when_one_entry_is_bad(sqlite_cluster):
    m = sqlite_cluster.client
    with pytest.raises(InvalidRequest, match=r"tasks\[1\]: task 'name' is required"):
        m.execute_many([({"name": "echo"}, {}), ({"username": "ana"}, {}), ({"name": "echo"}, {})])
    with pytest.raises(InvalidRequest, match="'tasks' must be a list of 1 to 10000"):
        m.execute_many([])
    assert m.list() == []

"""Crashes and restarts: nothing in the store is lost, nothing runs twice, workers come back."""

from __future__ import annotations

import datetime
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import HEARTBEAT, Cluster, Process, wait_until


def ts(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def executions(ledger: Path) -> Counter:
    """How many times each task id ran, from the ledger handler's file."""
    return Counter(int(line) for line in ledger.read_text().split()) if ledger.exists() else Counter()


def recurring_runs(m, rid: int) -> list[dict]:
    return [t for t in m.list(name="ledger", limit=1000) if t["recurring_id"] == rid]


def test_scheduled_recurring_and_queued_tasks_survive_a_server_crash(cluster: Cluster, tmp_path: Path):
    m = cluster.client
    ledger = tmp_path / "ledger.txt"
    args = {"path": str(ledger)}
    queued = [m.execute({"name": "ledger"}, args) for _ in range(3)]
    scheduled = [m.schedule("in 1 second", {"name": "ledger"}, args) for _ in range(2)]
    rid = m.every("1 second", {"name": "ledger"}, args)
    # Without run_at, the first run is planned at creation, then every second on that grid.
    first_run = ts(next(r for r in m.recurring() if r["id"] == rid)["created_at"])

    cluster.server.kill()
    # Let the scheduled time and several recurring runs pass while the server is down.
    wait_until(lambda: time.time() > first_run + 3.5, what="runs to be missed")
    cluster.server.restart()
    cluster.start_worker()

    wait_until(lambda: all(m.status(t)["status"] == "succeeded" for t in queued + scheduled), what="one-off tasks")
    wait_until(lambda: len(recurring_runs(m, rid)) >= 5, what="five recurring runs")
    m.revoke(rid)
    runs = recurring_runs(m, rid)
    wait_until(
        lambda: all(t["status"] in ("succeeded", "failed") for t in m.list(name="ledger", limit=1000)),
        what="every run to finish",
    )
    planned = sorted(ts(t["run_at"]) for t in runs)
    assert len(planned) == len(set(planned)), "no recurring run fired twice"
    assert planned[0] == first_run
    # Every planned time is on the grid, and the downtime's missed runs were fired once, not one by one.
    assert all(abs((p - first_run) - round(p - first_run)) < 1e-3 for p in planned)
    gaps = [b - a for a, b in zip(planned, planned[1:], strict=False)]
    assert max(gaps) >= 3, f"missed runs should collapse into one: gaps {gaps}"
    counts = executions(ledger)
    all_ids = [t["id"] for t in m.list(name="ledger", limit=1000)]
    assert sorted(counts) == sorted(all_ids), "every task ran"
    assert set(counts.values()) == {1}, f"none ran twice: {counts}"


def test_worker_started_before_the_server(sqlite_cluster: Cluster):
    sqlite_cluster.server.kill()
    worker = sqlite_cluster.start_worker(wait=False)
    wait_until(lambda: "serving" in worker.log(), what="the worker to start")
    sqlite_cluster.server.restart()
    sqlite_cluster.wait_worker(worker)
    m = sqlite_cluster.client
    assert m.wait(m.execute({"name": "echo"}, {"n": 1}), timeout=15)["status"] == "succeeded"


def test_worker_reregisters_after_a_server_restart(cluster: Cluster):
    worker = cluster.start_worker()
    m = cluster.client
    cluster.server.kill()
    cluster.server.restart()
    cluster.wait_worker(worker)
    assert m.wait(m.execute({"name": "echo"}, {}), timeout=15)["status"] == "succeeded"
    assert worker.running()


def test_task_running_across_a_server_restart_finishes_once(sqlite_cluster: Cluster, tmp_path: Path):
    worker = sqlite_cluster.start_worker()
    m = sqlite_cluster.client
    ledger = tmp_path / "ledger.txt"
    task_id = m.execute({"name": "ledger"}, {"path": str(ledger), "seconds": 3 * HEARTBEAT * 5})
    wait_until(lambda: executions(ledger)[task_id] == 1, what="the task to start")
    sqlite_cluster.server.kill()
    sqlite_cluster.server.restart()
    task = m.wait(task_id, timeout=20)
    assert task["status"] == "succeeded"
    assert task["attempts"] == 1, "the worker reported the task in READY, so it was not re-queued"
    assert executions(ledger)[task_id] == 1
    assert worker.running()


def test_task_of_a_dead_worker_is_requeued_after_a_server_restart(sqlite_cluster: Cluster, tmp_path: Path):
    first = sqlite_cluster.start_worker()
    m = sqlite_cluster.client
    ledger = tmp_path / "ledger.txt"
    task_id = m.execute({"name": "ledger"}, {"path": str(ledger), "seconds": 60})
    wait_until(lambda: executions(ledger)[task_id] == 1, what="the task to start")
    sqlite_cluster.server.kill()
    first.kill()
    sqlite_cluster.server.restart()
    assert m.status(task_id)["status"] == "running"
    m.execute({"name": "echo"}, {})  # the store is usable meanwhile
    ledger.write_text("")
    second = sqlite_cluster.start_worker()
    wait_until(lambda: executions(ledger)[task_id] == 1, what="the task to be delivered again")
    task = m.status(task_id)
    assert task["attempts"] == 2 and task["status"] == "running"
    assert task["worker"] == next(w["id"] for w in m.workers() if w["pid"] == second.pid)
    assert "left running by servers that are gone" in sqlite_cluster.server.log()


@pytest.mark.parametrize(
    "how, why",
    [
        (signal.SIGKILL, "lost: unreachable"),  # its connection closes: noticed at the next heartbeat
        (signal.SIGSTOP, "lost: silent"),  # frozen, connection open: noticed when heartbeats stop
    ],
)
def test_task_of_a_lost_worker_is_requeued(sqlite_cluster: Cluster, tmp_path: Path, how: int, why: str):
    first = sqlite_cluster.start_worker()
    m = sqlite_cluster.client
    ledger = tmp_path / "ledger.txt"
    task_id = m.execute({"name": "ledger"}, {"path": str(ledger), "seconds": 60})
    wait_until(lambda: executions(ledger)[task_id] == 1, what="the task to start")
    os.kill(first.pid, how)
    try:
        wait_until(lambda: m.workers() == [], what="the server to declare the worker lost")
        assert m.status(task_id)["status"] == "queued"
        assert why in sqlite_cluster.server.log()
        ledger.write_text("")
        sqlite_cluster.start_worker()
        wait_until(lambda: executions(ledger)[task_id] == 1, what="the task to be delivered again")
        assert m.status(task_id)["attempts"] == 2
    finally:
        first.kill()


def test_server_and_worker_stop_cleanly_on_sigterm(sqlite_cluster: Cluster):
    worker: Process = sqlite_cluster.start_worker()
    assert worker.terminate() == 0
    assert sqlite_cluster.server.terminate() == 0
    for proc in (worker, sqlite_cluster.server):
        assert "Traceback" not in proc.log()
        assert "stopped" in proc.log()

"""/metrics: what a real server serves, read with prometheus_client's own parser, agrees with the store
and with the workload that ran (real server and worker processes, on SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime
import sqlite3
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from conftest import TIMEOUT, Cluster, RawClient, Samples, Server, scrape, value, wait_until
from martinet_app import __version__, protocol
from martinet_app.status import TaskStatus


def scrape_until(url: str, done: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until ``done`` holds for what /metrics says (failing the test after conftest.TIMEOUT)."""
    return wait_until(lambda: done(samples := scrape(url)) and samples, what=what)


def labelled(samples: Samples, name: str) -> list[dict[str, str]]:
    """The label sets of every sample named ``name``."""
    return [dict(labels) for sample, labels in samples if sample == name]


def epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def test_metrics_agree_with_the_store_after_a_known_workload(cluster: Cluster) -> None:
    m = cluster.client
    url = cluster.server.http_url
    cluster.start_worker("--concurrency", "2")
    ran = [m.wait(m.execute({"name": "echo"}, {"n": n})) for n in range(3)]
    ran += [m.wait(m.execute({"name": "explode"})) for _ in range(2)]
    ran.append(m.wait(m.schedule("in 1 second", {"name": "echo"}), timeout=20))
    m.every("1 hour", {"name": "echo"})  # its first run is due now
    ran.append(wait_until(lambda: [t for t in m.list(status="succeeded") if t["recurring_id"]], what="the run")[0])
    assert [t["status"] for t in ran] == ["succeeded"] * 3 + ["failed"] * 2 + ["succeeded"] * 2
    m.cancel(m.schedule("in 1 hour", {"name": "echo"}))

    # A running task: its start is counted, and it holds a slot until cancelled.
    nap = m.execute({"name": "nap"}, {"seconds": 30})
    during = scrape_until(
        url, lambda s: s.get(("martinet_task_queue_wait_seconds_count", frozenset({("name", "nap")}))) == 1, "its start"
    )
    workers = m.workers()
    assert value(during, "martinet_slots_busy") == sum(min(w["busy"], w["slots"]) for w in workers) == 1
    assert value(during, "martinet_workers_busy") == 1
    assert value(during, "martinet_tasks", status="running") == 1
    m.cancel(nap)
    wait_until(lambda: not any(w["busy"] for w in m.workers()), what="the cancelled nap's slot to be free")

    # Rejected messages, by port and reason: a client request that is not JSON, a status event of no known kind.
    raw = RawClient(cluster.server.client_port)
    try:
        raw.send(b"not json")
        assert raw.replies(1)[0]["error"]["type"] == "InvalidRequest"
    finally:
        raw.close()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"tcp://127.0.0.1:{cluster.server.status_port}")
    push.send_multipart(protocol.status_batch("w1", [{"task_id": 1, "attempt": 1, "event": "exploded", "at": 0}]))
    push.close()
    samples = scrape_until(
        url, lambda s: value(s, "martinet_rejected_messages_total", port="status", reason="bad_event") == 1, "it"
    )
    assert value(samples, "martinet_rejected_messages_total", port="client", reason="malformed") == 1
    assert value(samples, "martinet_rejected_messages_total", port="http", reason="unknown_path") == 0

    # Tasks by status: every status, equal to what the store lists.
    assert sorted(labels["status"] for labels in labelled(samples, "martinet_tasks")) == sorted(
        s.value for s in TaskStatus
    )
    for status in TaskStatus:
        assert value(samples, "martinet_tasks", status=status.value) == len(m.list(status=status.value, limit=1000))
    assert value(samples, "martinet_tasks", status="succeeded") == 5
    assert value(samples, "martinet_tasks", status="cancelled") == 2

    finished = {
        (labels["name"], labels["outcome"]): samples["martinet_tasks_finished_total", frozenset(labels.items())]
        for labels in labelled(samples, "martinet_tasks_finished_total")
    }
    assert {key: count for key, count in finished.items() if count} == {
        ("echo", "succeeded"): 5, ("explode", "failed"): 2, ("echo", "cancelled"): 1, ("nap", "cancelled"): 1
    }  # fmt: skip
    assert finished["echo", "failed"] == 0  # every outcome of a name is there from its first task

    # Run time: each delivery that ran to its final event (not the cancelled nap's), as long as the store says.
    records = [m.status(t["id"]) for t in ran] + [m.status(nap)]
    for name in ("echo", "explode"):
        mine = [r for r in records if r["name"] == name]
        assert value(samples, "martinet_task_run_seconds_count", name=name) == len(mine)
        expected = sum(epoch(r["finished_at"]) - epoch(r["started_at"]) for r in mine)
        assert value(samples, "martinet_task_run_seconds_sum", name=name) == pytest.approx(
            expected, abs=0.002 * len(mine)
        )
    assert value(samples, "martinet_task_run_seconds_count", name="nap") == 0
    # Queue wait: each delivery that started, the nap too, from its due time.
    for name in ("echo", "explode", "nap"):
        mine = [r for r in records if r["name"] == name]
        assert value(samples, "martinet_task_queue_wait_seconds_count", name=name) == len(mine)
        expected = sum(epoch(r["started_at"]) - epoch(r["run_at"]) for r in mine)
        assert value(samples, "martinet_task_queue_wait_seconds_sum", name=name) == pytest.approx(
            expected, abs=0.002 * len(mine)
        )
    assert value(samples, "martinet_task_queue_wait_seconds_bucket", name="nap", le="+Inf") == 1
    # Every histogram's buckets are cumulative, and its +Inf bucket is its count.
    buckets: dict[tuple[str, frozenset], list[tuple[float, float]]] = {}
    for (sample, labels), count in samples.items():
        if sample.endswith("_bucket"):
            le = dict(labels)["le"]
            series = (sample.removesuffix("_bucket"), frozenset(pair for pair in labels if pair[0] != "le"))
            buckets.setdefault(series, []).append((float(le), count))
    assert len(buckets) == 2 * 3 + 2  # run time and queue wait of echo, explode and nap; lateness; commits
    for (histogram, labels), counts in buckets.items():
        counts.sort()
        assert [count for _, count in counts] == sorted(count for _, count in counts), histogram
        assert counts[-1] == (float("inf"), samples[f"{histogram}_count", labels]), histogram

    # The scheduler fired the task due in 1 second and the schedule's first run, each a little late.
    assert value(samples, "martinet_scheduler_lateness_seconds_count") == 2
    assert 0 <= value(samples, "martinet_scheduler_lateness_seconds_sum") < 5

    workers = m.workers()
    assert value(samples, "martinet_workers") == len(workers) == 1
    assert value(samples, "martinet_slots") == sum(w["slots"] for w in workers) == 2
    assert value(samples, "martinet_slots_busy") == value(samples, "martinet_workers_busy") == 0
    assert value(samples, "martinet_store_commit_seconds_count") >= len(records)

    backend = {"sqlite": "sqlite", "postgresql": "postgresql", "mysql": "mysql"}[cluster.server.db_url.split(":")[0]]
    [info] = labelled(samples, "martinet_server_info")
    assert info == {"version": __version__, "server_id": workers[0]["server"], "backend": backend}
    assert m.ping()["version"] == __version__


def test_a_result_the_store_cannot_take_waits_in_the_servers_memory(sqlite_cluster: Cluster) -> None:
    """While another process holds SQLite's write lock, a task's result is held by the server, counted in
    martinet_status_events_held, and written once the lock is released: the task succeeds."""
    m, url = sqlite_cluster.client, sqlite_cluster.server.http_url
    sqlite_cluster.start_worker()
    assert value(scrape(url), "martinet_status_events_held") == 0
    task_id = m.execute({"name": "nap"}, {"seconds": 3.0})
    wait_until(lambda: m.status(task_id)["status"] == "running", what="the nap to be delivered")
    lock = sqlite3.connect(sqlite_cluster.server.db_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        # From here on the server can write nothing: the nap's result, when it comes, must wait.
        assert lock.execute("SELECT status FROM task WHERE id = ?", (task_id,)).fetchone() == ("running",)
        held = scrape_until(url, lambda s: value(s, "martinet_status_events_held") >= 1, "the result to be held")
        assert value(held, "martinet_tasks", status="running") == 1, "not written while the lock is held"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    scrape_until(url, lambda s: value(s, "martinet_status_events_held") == 0, "the held result to be written")
    assert m.wait(task_id, timeout=TIMEOUT)["status"] == "succeeded"


def test_metrics_need_the_token_when_the_server_has_one(tmp_path: Path) -> None:
    token, read_token = "metrics-admin-token", "metrics-read-token"
    server = Server(
        f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "server.log", "--http-token", token, "--http-read-token",
        read_token, http=True,
    )  # fmt: skip
    server.start().wait_ready()
    try:
        for wrong in (None, "not-the-token"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                scrape(server.http_url, wrong)
            assert refused.value.code == 401
        assert value(scrape(server.http_url, read_token), "martinet_rejected_messages_total", port="http",
                     reason="unauthenticated") == 2  # fmt: skip
        assert value(scrape(server.http_url, token), "martinet_tasks", status="queued") == 0
    except BaseException:
        print(server.log())
        raise
    finally:
        server.terminate()

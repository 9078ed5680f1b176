"""Retention and purge (issue 13): finished tasks are deleted in small batches, by age and status."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, TEST_HANDLERS, Process, Server, martinet_cmd, wait_until
from martinet_app.errors import BadTimeSpec, TaskNotFound
from martinet_app.store import Store

NOW = 1_700_000_000.0


def _finished(store: Store, count: int, outcome: str, at: float) -> list[int]:
    """``count`` tasks brought to ``outcome`` (succeeded, failed or cancelled) at time ``at``."""
    ids = store.add_tasks([({"name": outcome}, {}) for _ in range(count)], run_at=at, now=at)
    if outcome == "cancelled":
        for task_id in ids:
            store.cancel(task_id, at)
        return ids
    store.claim("w1", count, at)
    event = {"event": outcome, "error": "E"} if outcome == "failed" else {"event": outcome, "result": 1}
    store.apply_events([("w1", {"task_id": i, "attempt": 1, "at": at, **event}) for i in ids])
    return ids


def test_purge_deletes_only_finished_tasks_of_that_status_older_than_the_cutoff(db_url: str) -> None:
    store = Store.open(db_url)
    try:
        old = _finished(store, 7, "succeeded", NOW)
        recent = _finished(store, 2, "succeeded", NOW + 100)
        failed = _finished(store, 3, "failed", NOW)
        cancelled = _finished(store, 2, "cancelled", NOW)
        queued = store.add_task({"name": "waiting"}, {}, run_at=NOW, now=NOW)
        assert store.purge(["succeeded"], finished_before=NOW + 50, limit=5) == 5, "at most limit at a time"
        assert store.purge(["succeeded"], finished_before=NOW + 50, limit=5) == 2
        assert store.purge(["succeeded"], finished_before=NOW + 50, limit=5) == 0
        assert store.purge(["queued", "running"], finished_before=NOW + 10**9, limit=100) == 0, "never unfinished"
        assert store.purge(["failed", "cancelled"], finished_before=NOW + 50, limit=100) == 5
        for task_id in [*old, *failed, *cancelled]:
            with pytest.raises(TaskNotFound):
                store.get_task(task_id)
        assert [store.get_task(i)["status"] for i in recent] == ["succeeded"] * 2
        assert store.get_task(queued)["status"] == "queued"
        assert store.counts() == {**dict.fromkeys(store.counts(), 0), "succeeded": 2, "queued": 1}, "purged uncounted"
    finally:
        store.close()


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("MARTINET_")}
    argv = martinet_cmd(*args, "--client-port", str(server.client_port))
    return subprocess.run(argv, cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)


def test_server_keeps_finished_tasks_as_long_as_told_and_purge_deletes_on_demand(tmp_path: Path) -> None:
    server = Server(f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "server.log", "--keep-succeeded", "1s",
                    "--keep-failed", "forever")  # fmt: skip
    worker = Process(server.worker_args(TEST_HANDLERS), tmp_path / "worker.log")
    try:
        server.start().wait_ready()
        worker.start()
        m = server.client(timeout=10)
        done = m.execute({"name": "echo"}, {})
        failed = m.execute({"name": "explode"}, {})
        assert m.wait(done, timeout=20)["status"] == "succeeded"
        assert m.wait(failed, timeout=20)["status"] == "failed"

        def gone() -> bool:
            try:
                m.status(done)
                return False
            except TaskNotFound:
                return True

        wait_until(gone, what="the server to delete the succeeded task after 1 s")
        assert m.status(failed)["status"] == "failed", "failed tasks kept (forever)"
        assert "deleted 1 succeeded task(s) finished more than 1 s ago" in server.log()

        proc = _cli(server, "purge", "--status", "failed", "--older-than", "0s")
        assert proc.returncode == 0 and proc.stdout.strip() == "deleted 1 failed task(s)", proc
        with pytest.raises(TaskNotFound):
            m.status(failed)
        proc = _cli(server, "purge", "--status", "cancelled", "--older-than", "1d", "--json")
        assert proc.returncode == 0 and json.loads(proc.stdout) == {"deleted": 0}
        proc = _cli(server, "purge", "--status", "failed", "--older-than", "soon")
        assert proc.returncode != 0 and "bad age 'soon'" in proc.stderr and "Traceback" not in proc.stderr
        with pytest.raises(BadTimeSpec):
            m.purge("failed", "soon")
        m.close()
    finally:
        for proc in (worker, server):
            if proc.running():
                proc.terminate()

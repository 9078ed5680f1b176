"""Handler processes: what a handler starts dies with it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import Cluster, wait_until

#: Seconds the children of the hostile handlers sleep: far longer than any test waits.
CHILD_SECONDS = 40


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited: no such process, or a zombie (an orphan's reaper may never reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def child_pid(path: Path) -> int:
    """The pid a hostile handler noted in ``path``, once it has."""
    return int(wait_until(lambda: path.exists() and path.read_text().strip(), what=f"a pid in {path}"))


def test_a_timeout_kills_what_the_handler_started(sqlite_cluster: Cluster, tmp_path: Path):
    sqlite_cluster.start_worker("--concurrency", "1")
    m = sqlite_cluster.client
    path = tmp_path / "child.txt"
    task_id = m.execute({"name": "spawn_sleep"}, {"seconds": CHILD_SECONDS, "path": str(path)}, timeout=1)
    child = child_pid(path)
    task = m.wait(task_id, timeout=20)
    assert (task["status"], task["error"]) == ("failed", "timed out after 1 s")
    wait_until(lambda: gone(child), timeout=5, what=f"the handler's child {child} to be killed")
    assert m.wait(m.execute({"name": "echo"}, {}), timeout=20)["status"] == "succeeded"


def test_a_cancel_kills_what_the_handler_started(sqlite_cluster: Cluster, tmp_path: Path):
    sqlite_cluster.start_worker("--concurrency", "1")
    m = sqlite_cluster.client
    path = tmp_path / "child.txt"
    task_id = m.execute({"name": "spawn_sleep"}, {"seconds": CHILD_SECONDS, "path": str(path)})
    child = child_pid(path)
    assert m.cancel(task_id)["status"] == "cancelled"
    wait_until(lambda: gone(child), timeout=5, what=f"the handler's child {child} to be killed")
    assert m.wait(m.execute({"name": "echo"}, {}), timeout=20)["status"] == "succeeded"


def test_a_stopping_worker_kills_what_its_handlers_started(sqlite_cluster: Cluster, tmp_path: Path):
    worker = sqlite_cluster.start_worker("--concurrency", "1")
    m = sqlite_cluster.client
    path = tmp_path / "child.txt"
    m.execute({"name": "spawn_sleep"}, {"seconds": CHILD_SECONDS, "path": str(path)})
    child = child_pid(path)
    assert worker.terminate() == 0  # its grace (1 s) ends first: the task is handed back, its slot closed
    wait_until(lambda: gone(child), timeout=5, what=f"the handler's child {child} to be killed")


def test_a_handler_that_forks_and_exits_fails_at_once(sqlite_cluster: Cluster, tmp_path: Path):
    sqlite_cluster.start_worker("--concurrency", "1")
    m = sqlite_cluster.client
    path = tmp_path / "child.txt"
    began = time.monotonic()
    task = m.wait(m.execute({"name": "fork_exit"}, {"seconds": CHILD_SECONDS, "path": str(path)}), timeout=20)
    assert time.monotonic() - began < 10, "reported when the handler's process died, not when its child did"
    assert task["status"] == "failed"
    assert task["error"] == "the handler's process exited with status 5 while running the task"
    child = child_pid(path)
    wait_until(lambda: gone(child), timeout=5, what=f"the forked child {child} to be killed")
    assert m.wait(m.execute({"name": "echo"}, {}), timeout=20)["status"] == "succeeded"

"""Handler processes: what a handler starts dies with it, and what a handler sends is kept small and readable."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from conftest import Cluster, wait_until
from martinet_app import config, protocol, runner
from martinet_app.registry import Registry
from martinet_app.worker import Worker, _Delivery

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
    except (FileNotFoundError, ProcessLookupError):  # reaped between the two looks (ESRCH from the read)
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


def test_long_error_and_progress_texts_are_clipped(sqlite_cluster: Cluster):
    sqlite_cluster.start_worker("--concurrency", "1")
    m = sqlite_cluster.client
    text = "e" * 100_000
    task = m.wait(m.execute({"name": "poison"}, {"text": text, "progress": True}), timeout=20)
    assert task["status"] == "failed"
    assert task["error"] == protocol.clip(f"RuntimeError: {text}", config.MAX_ERROR_CHARS)
    assert "characters cut ...]" in task["error"] and len(task["error"]) <= config.MAX_ERROR_CHARS
    assert task["progress_message"] == protocol.clip(text, config.MAX_PROGRESS_CHARS)
    assert "characters cut ...]" in task["traceback"] and len(task["traceback"]) <= config.MAX_TRACEBACK_CHARS
    assert task["traceback"].startswith("Traceback (most recent call last):")


def test_the_handler_process_clips_and_escapes_texts_itself():
    text = "\udce9\x00" + "e" * 100_000

    def poison(task_id, data, progress):
        progress(0.5, text)
        raise RuntimeError(text)

    registry = Registry()
    registry.add("poison", poison)
    stream = io.BytesIO()
    task = {"task_id": 1, "attempt": 1, "name": "poison", "args": {}}
    final = protocol.json_value(runner._run(registry, task, stream, "w", config.MAX_RESULT_BYTES))
    sent = protocol.json_value(stream.getvalue())
    escaped = "\\udce9\\x00" + "e" * 100_000
    assert sent["message"] == protocol.clip(escaped, config.MAX_PROGRESS_CHARS)
    assert final["error"] == protocol.clip(f"RuntimeError: {escaped}", config.MAX_ERROR_CHARS)
    assert len(final["traceback"]) <= config.MAX_TRACEBACK_CHARS and "characters cut ...]" in final["traceback"]
    assert "\\udce9\\x00" in final["traceback"]


def test_a_too_deep_result_fails_clearly_and_the_slot_runs_on(sqlite_cluster: Cluster):
    sqlite_cluster.start_worker("--concurrency", "1")
    m = sqlite_cluster.client
    pid = m.wait(m.execute({"name": "whoami"}, {}), timeout=20)["result"]["pid"]
    limit = config.MAX_JSON_DEPTH
    # Checked; too deep to encode at all (RecursionError); tuples, encoded as arrays, alike.
    for args in ({"depth": limit + 1}, {"depth": 100_000}, {"depth": limit + 1, "tuples": True}):
        task = m.wait(m.execute({"name": "deep"}, args), timeout=20)
        assert (task["status"], task["error"]) == ("failed", runner._too_deep("deep")), args
        assert f"more than {limit} levels deep" in task["error"]
    fine = m.wait(m.execute({"name": "deep"}, {"depth": limit}), timeout=20)
    assert fine["status"] == "succeeded" and not protocol.too_deep(fine["result"], limit)
    assert protocol.too_deep(fine["result"], limit - 1)
    # The same process ran them all: a result it could not send did not bring it down.
    assert m.wait(m.execute({"name": "whoami"}, {}), timeout=20)["result"]["pid"] == pid


class _ReplayingSlot:
    """A slot whose process sends the given lines, sized as :meth:`Slot._read` sizes them."""

    def __init__(self, lines: dict[int, list[bytes]]) -> None:
        self.lines = lines
        self.last_size = 0

    def run(self, tasks: list[dict], on_start, on_progress, on_done) -> list[dict]:
        for task in tasks:
            on_start(task)
            for line in self.lines[task["task_id"]]:
                self.last_size = len(line)
                message = protocol.json_value(line)
                if message["event"] == "progress":
                    on_progress(task, message["progress"], message["message"])
                else:
                    on_done(task, message)
        return []


class _Recorder:
    """A status socket that keeps what is sent."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def send_multipart(self, frames: list[bytes]) -> None:
        (frame,) = frames
        self.messages.append(frame)


def test_status_messages_stay_within_the_result_limit():
    # Progress messages at their largest (1,024 characters of 12 JSON bytes each) around a result near the limit.
    message = "\U0001f600" * config.MAX_PROGRESS_CHARS
    reports = [runner._line({"event": "progress", "progress": 0.5, "message": message})] * 300
    done = runner._succeeded("steps", {"ok": True}, config.MAX_RESULT_BYTES)
    big = runner._succeeded("big", "x" * (config.MAX_RESULT_BYTES - 50_000), config.MAX_RESULT_BYTES)
    slot = _ReplayingSlot({1: [*reports, done], 2: [big], 3: [*reports, done]})
    worker = Worker(worker_id="w")
    worker._execute(slot, [_Delivery({"task_id": n, "attempt": 1, "name": "x", "args": {}}) for n in (1, 2, 3)])
    worker._closing = True
    sock = worker._status = _Recorder()
    worker._push_status()
    assert max(map(len, sock.messages)) <= config.MAX_RESULT_BYTES + 1024 < config.MAX_MESSAGE_BYTES
    events = [e for frame in sock.messages for e in protocol.parse_status_batch([frame], config.MAX_MESSAGE_BYTES)[1]]
    one = ["started", *["progress"] * 300, "succeeded"]
    assert [e["event"] for e in events] == [*one, "succeeded", *one]

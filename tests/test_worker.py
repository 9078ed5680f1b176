"""The worker process: loading handlers, refusing bad folders, programmatic registration, re-registration."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gevent
import pytest
import zmq.green as zmq

from conftest import ROOT, TEST_HANDLER_NAMES, Cluster, Process, martinet_cmd, wait_until
from martinet_app.errors import HandlerError
from martinet_app.registry import Registry
from martinet_app.worker import PIPELINE_MAX, Worker, _receive


def run_worker(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess:
    folder = tmp_path / "handlers"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    return subprocess.run(
        martinet_cmd("work", "--handlers", str(folder), "--worker-port", "1", "--status-port", "1"),
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_worker_without_handlers_refuses_to_start(tmp_path):
    result = run_worker(tmp_path, {"notes.txt": "not python", "_private.py": "from martinet_app import task\n"})
    assert result.returncode == 2
    assert "no handlers found in" in result.stderr and "@task" in result.stderr
    assert "Traceback" not in result.stderr


def test_handler_file_that_fails_to_import_is_named(tmp_path):
    result = run_worker(
        tmp_path,
        {
            "good.py": "from martinet_app import task\n@task\ndef ok(t, d, p): pass\n",
            "broken.py": "import no_such_module_here\n",
        },
    )
    assert result.returncode == 2
    assert "broken.py" in result.stderr and "(line 1)" in result.stderr
    assert "ModuleNotFoundError" in result.stderr and "Traceback" not in result.stderr


def test_two_handlers_for_one_name_is_an_error(tmp_path):
    body = "from martinet_app import task\n@task('same')\ndef f{n}(t, d, p): pass\n"
    result = run_worker(tmp_path, {"a.py": body.format(n=1), "b.py": body.format(n=2)})
    assert result.returncode == 2
    assert "two handlers for task 'same'" in result.stderr
    assert "martinet_handlers.a.f1" in result.stderr and "martinet_handlers.b.f2" in result.stderr


def test_registry_rejects_bad_registrations():
    registry = Registry()
    with pytest.raises(HandlerError, match="non-empty string"):
        registry.add("", print)
    with pytest.raises(HandlerError, match="not callable"):
        registry.add("x", 42)
    registry.add("x", print)
    registry.add("x", print)  # the same function twice is harmless (a module imported twice)
    assert registry.names() == ["x"]


def test_handlers_import_helpers_and_skip_underscore_files(sqlite_cluster: Cluster, tmp_path):
    folder = tmp_path / "handlers"
    folder.mkdir()
    (folder / "_shared.py").write_text("FACTOR = 3\n")
    (folder / "triple.py").write_text(
        "from martinet_app import task\nfrom _shared import FACTOR\n\n"
        "@task()\ndef triple(task_id, data, progress):\n    return data['n'] * FACTOR\n"
    )
    sqlite_cluster.start_worker(handlers=folder)
    m = sqlite_cluster.client
    assert m.workers()[0]["handlers"] == ["triple"]
    assert m.wait(m.execute({"name": "triple"}, {"n": 5}), timeout=15)["result"] == 15


def test_programmatic_worker_with_on(sqlite_cluster: Cluster, tmp_path):
    script = tmp_path / "my_worker.py"
    script.write_text(
        textwrap.dedent(f"""
        from martinet_app.worker import Worker

        worker = Worker("127.0.0.1", {sqlite_cluster.server.worker_port}, {sqlite_cluster.server.status_port},
                        concurrency=2, heartbeat=0.2)

        @worker.on("shout")
        def shout(task_id, data, progress):
            return data["text"].upper()

        def whisper(task_id, data, progress):
            return data["text"].lower()

        worker.on("whisper", whisper)

        if __name__ == "__main__":
            worker.run()
    """)
    )
    proc = Process([sys.executable, str(script)], tmp_path / "my_worker.log").start()
    sqlite_cluster.workers.append(proc)
    sqlite_cluster.wait_worker(proc)
    m = sqlite_cluster.client
    assert m.wait(m.execute({"name": "shout"}, {"text": "hi"}), timeout=15)["result"] == "HI"
    assert m.wait(m.execute({"name": "whisper"}, {"text": "HI"}), timeout=15)["result"] == "hi"
    assert proc.terminate() == 0


def test_programmatic_handlers_must_be_importable(tmp_path):
    script = tmp_path / "lambda_worker.py"
    script.write_text(
        "from martinet_app.worker import Worker\n"
        "worker = Worker('127.0.0.1', 1, 1)\n"
        "worker.on('nope', lambda task_id, data, progress: None)\n"
        "worker.run()\n"
    )
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "the handler for task 'nope' ('<lambda>') must be a module-level function" in result.stderr


def test_different_handler_sets_are_logged(sqlite_cluster: Cluster, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "one.py").write_text("from martinet_app import task\n@task\ndef echo(t, d, p): return d\n")
    sqlite_cluster.start_worker()
    sqlite_cluster.start_worker(handlers=folder)
    log = wait_until(
        lambda: "serves a different set of tasks" in sqlite_cluster.server.log() and sqlite_cluster.server.log(),
        what="the warning",
    )
    missing = ", ".join(name for name in TEST_HANDLER_NAMES if name != "echo")
    assert f"missing: {missing}; extra: none" in log


def test_sigterm_lets_running_tasks_finish_and_takes_no_more(sqlite_cluster: Cluster, tmp_path):
    worker = sqlite_cluster.start_worker("--grace", "20")
    m = sqlite_cluster.client
    ledger = tmp_path / "ledger.txt"
    running = m.execute({"name": "ledger"}, {"path": str(ledger), "seconds": 1.5})
    wait_until(lambda: ledger.exists() and ledger.read_text().strip() == str(running), what="the task to start")
    worker.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping: no new tasks" in worker.log(), what="the worker to begin stopping")
    later = m.execute({"name": "echo"}, {})
    assert worker.proc.wait(20) == 0
    assert m.status(running)["status"] == "succeeded" and m.status(running)["attempts"] == 1
    assert m.status(later)["status"] == "queued", "a stopping worker takes no new task"
    assert "Traceback" not in worker.log()


@pytest.mark.parametrize("signals, grace", [(1, "0.3"), (2, "30")])
def test_unfinished_tasks_are_handed_back_at_once(sqlite_cluster: Cluster, tmp_path, signals, grace):
    worker = sqlite_cluster.start_worker("--grace", grace)
    m = sqlite_cluster.client
    ledger = tmp_path / "ledger.txt"
    task_id = m.execute({"name": "ledger"}, {"path": str(ledger), "seconds": 60})
    wait_until(lambda: ledger.exists(), what="the task to start")
    for _ in range(signals):  # the second signal skips the grace period
        worker.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping" in worker.log(), what="the worker to begin stopping")
    assert worker.proc.wait(10) == 0
    wait_until(
        lambda: m.status(task_id)["status"] == "queued",
        timeout=2,
        what="the task to be re-queued without waiting for a heartbeat timeout",
    )
    assert "handing back 1 task(s)" in sqlite_cluster.server.log()
    ledger.write_text("")
    sqlite_cluster.start_worker()
    wait_until(lambda: ledger.read_text().strip() == str(task_id), what="the task to run again")
    assert m.status(task_id)["attempts"] == 2


def test_worker_receive_wakes_after_another_greenlet_sent_on_its_socket():
    # A CREDIT sent from a slot's greenlet while the message loop waits must not hide a TASK that
    # arrived meanwhile: zmq's descriptor is edge-triggered, and the send consumes its edge.
    context = zmq.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hello")
        identity, _ = router.recv_multipart()
        waiting = gevent.spawn(_receive, dealer, 30.0)
        gevent.sleep(0.05)
        router.send_multipart([identity, b"TASK"])
        time.sleep(0.1)  # without yielding: the message reaches the DEALER before the hub looks
        dealer.send(b"CREDIT")
        assert waiting.get(timeout=1.0) == [b"TASK"]
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        context.term()


def test_pipes_hold_a_few_milliseconds_of_work():
    worker = Worker(prefetch=0)
    assert worker._pipeline_depth() == 1, "no pipe before a task has run"
    depths = {}
    for seconds in (0.00002, 0.0005, 0.0019, 0.0021, 0.5):
        worker._task_seconds = seconds
        depths[seconds] = worker._pipeline_depth()
    assert depths == {0.00002: PIPELINE_MAX, 0.0005: 8, 0.0019: 2, 0.0021: 1, 0.5: 1}

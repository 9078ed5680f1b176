"""``--log-format json``: every line a server and a worker write is one JSON object (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TEST_HANDLERS, Process, Server, martinet_cmd


def _lines(text: str) -> list[dict]:
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    for line in lines:
        assert {"time", "level", "logger", "message", "pid"} <= set(line), line
        assert line["time"].endswith("+00:00")
    return lines


def test_server_and_worker_log_json_lines(tmp_path: Path) -> None:
    server = Server(f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "server.log", "--log-format", "json")
    worker = Process(server.worker_args(TEST_HANDLERS, "--log-format", "json"), tmp_path / "worker.log")
    try:
        server.start().wait_ready()
        worker.start()
        client = server.client()
        task_id = client.execute({"name": "echo"}, {"x": 1})
        assert client.wait(task_id, timeout=20)["status"] == "succeeded"
        client.close()
        worker.terminate()
        assert server.terminate() == 0
    finally:
        for proc in (worker, server):
            if proc.running():
                proc.kill()
    served = _lines(server.log())
    assert any(line["message"].startswith("martinet ") and "serving as" in line["message"] for line in served)
    assert any(line["message"] == "stopped" and line["logger"] == "martinet_app.server" for line in served)
    worked = _lines(worker.log())
    assert any(f"task {task_id} (echo) succeeded" in line["message"] for line in worked), worked[-5:]


def test_a_server_that_cannot_start_says_why_in_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        martinet_cmd("serve", "--db", "oracle://nowhere/x", "--log-format", "json"),
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    (line,) = [line for line in _lines(proc.stderr) if line["level"] == "ERROR"]
    assert "unsupported database URL" in line["message"]


def test_a_traceback_stays_inside_its_line() -> None:
    import logging

    from martinet_app.logs import JsonFormatter

    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s", ("caf\udce9",), sys.exc_info())
    text = JsonFormatter().format(record)
    assert "\n" not in text
    line = json.loads(text)
    assert line["message"] == "failed: caf\udce9" and "ValueError: broken" in line["exception"]

"""The README's examples, run as written against real servers and workers.

Every fenced ``python`` block is one of four kinds, each run the way the README says to:
a handler file (``# handlers/NAME.py``), each loaded by a worker from a folder of its own; a worker
script (``Worker(...)`` and ``worker.run()``), run as a script; the client tour
(``Martinet()``), run against a worker on handlers/; and the asyncio script
(``martinet_app.aio``), run as a script against a worker on handlers/. The client constructors get the test
server's ports (the README's use the default ones), nothing else is changed. The shell commands
to try with ``make run`` going run too, their port given by MARTINET_CLIENT_PORT.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, Cluster, Process, wait_until
from martinet_app import Martinet

README = (ROOT / "README.md").read_text()
HANDLERS = ROOT / "handlers"
FINAL = {"succeeded", "failed", "cancelled"}
#: Data for the tasks a README handler file registers: what the README's commands give them.
HANDLER_FILE_ARGS = {"resize_image": {"w": 640}, "publish": {}}


def fenced(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


def handler_file(block: str) -> str | None:
    """``NAME.py`` if the block is a handler file (its first line ``# handlers/NAME.py``)."""
    match = re.match(r"# handlers/(\w+\.py)\n", block)
    return match.group(1) if match else None


def is_worker_script(block: str) -> bool:
    return "Worker(" in block and "worker.run()" in block


def is_client_tour(block: str) -> bool:
    return "Martinet()" in block


def is_asyncio_script(block: str) -> bool:
    return "from martinet_app.aio import Martinet" in block and "asyncio.run(" in block


PYTHON = fenced("python")


def the_block(kind) -> str:
    blocks = [block for block in PYTHON if kind(block)]
    assert len(blocks) == 1, f"expected one README block of kind {kind.__name__}, found {len(blocks)}"
    return blocks[0]


def with_ports(code: str, call: str, ports: str) -> str:
    """``code`` with the keyword arguments ``ports`` added to its one call ``call(...)`` (on one line)."""
    pattern = re.compile(rf"\b{re.escape(call)}\(([^()\n]*)\)")
    assert len(pattern.findall(code)) == 1, f"expected one {call}(...) call in:\n{code}"
    return pattern.sub(lambda m: f"{call}({m.group(1)}{', ' if m.group(1) else ''}{ports})", code)


def wait_final(client: Martinet, task_ids: list[int]) -> dict[int, dict]:
    records: dict[int, dict] = {}

    def done() -> bool:
        records.update({t: client.status(t) for t in task_ids})
        return all(r["status"] in FINAL for r in records.values())

    wait_until(done, what=f"tasks {task_ids} to finish")
    return records


def cli_env(cluster: Cluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARTINET_")}
    return {**env, "MARTINET_CLIENT_PORT": str(cluster.server.client_port)}


def run_shell(cluster: Cluster, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=cli_env(cluster), capture_output=True, text=True, timeout=60
    )


def test_every_python_block_is_one_the_tests_run():
    assert PYTHON
    for block in PYTHON:
        kinds = [
            handler_file(block) is not None,
            is_worker_script(block),
            is_client_tour(block),
            is_asyncio_script(block),
        ]
        assert sum(kinds) == 1, f"a README block this test does not know how to run:\n{block}"


@pytest.mark.parametrize("block", [block for block in PYTHON if handler_file(block)], ids=handler_file)
def test_the_handler_file_serves_its_tasks_from_a_handlers_folder(sqlite_cluster: Cluster, tmp_path: Path, block: str):
    folder = tmp_path / "handlers"
    folder.mkdir()
    (folder / handler_file(block)).write_text(block)  # type: ignore[operator]
    worker = sqlite_cluster.start_worker(handlers=folder)
    names = next(w["handlers"] for w in sqlite_cluster.client.workers() if w["pid"] == worker.pid)
    assert names and set(names) <= set(HANDLER_FILE_ARGS), names
    m = sqlite_cluster.client
    records = wait_final(m, [m.execute({"name": name}, HANDLER_FILE_ARGS[name]) for name in names])
    assert all(r["status"] == "succeeded" for r in records.values()), records


def test_the_worker_script_runs_its_handlers(sqlite_cluster: Cluster, tmp_path: Path):
    server = sqlite_cluster.server
    script = tmp_path / "my_worker.py"
    ports = f"worker_port={server.worker_port}, status_port={server.status_port}"
    script.write_text(with_ports(the_block(is_worker_script), "Worker", ports))
    worker = Process([sys.executable, str(script)], tmp_path / "my_worker.log").start()
    sqlite_cluster.workers.append(worker)
    sqlite_cluster.wait_worker(worker)

    # The command the README gives to try it, as written.
    command = re.search(r"`(\.venv/bin/martinet execute shout [^`]*)`", README)
    assert command, "the README says how to try the worker script"
    proc = run_shell(sqlite_cluster, command.group(1))
    assert proc.returncode == 0, proc
    assert re.search(r"^result:\s+HI$", proc.stdout, re.MULTILINE), proc.stdout


def test_the_client_tour_runs_and_every_task_it_makes_succeeds(sqlite_cluster: Cluster):
    sqlite_cluster.start_worker(handlers=HANDLERS)
    code = with_ports(the_block(is_client_tour), "Martinet", f"client_port={sqlite_cluster.server.client_port}")
    namespace: dict = {"__name__": "readme_client_tour"}
    exec(compile(code, "README.md (Python client)", "exec"), namespace)
    namespace["m"].close()

    m = sqlite_cluster.client
    # What the tour leaves for later runs now: tasks scheduled ahead, and one run of every schedule.
    for task in m.list(status="scheduled", limit=1000):
        m.cancel(task["id"])
        m.retry(task["id"])
    for schedule in m.recurring():
        m.execute({"name": schedule["name"]}, schedule["args"])
    records = wait_final(m, [task["id"] for task in m.list(limit=1000)])
    assert all(r["status"] == "succeeded" for r in records.values()), records
    names = set(re.findall(r'"name": "(\w+)"', code))
    assert {r["name"] for r in records.values()} == names, "every handler the tour names ran"


def test_the_asyncio_script_runs_its_tasks_at_once(sqlite_cluster: Cluster, tmp_path: Path):
    sqlite_cluster.start_worker(handlers=HANDLERS)
    code = with_ports(the_block(is_asyncio_script), "Martinet", f"client_port={sqlite_cluster.server.client_port}")
    script = tmp_path / "readme_asyncio.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc
    lines = proc.stdout.splitlines()
    assert [line.split(" ", 2)[1] for line in lines] == ["succeeded"] * 3, proc.stdout
    assert [line.split(" ", 2)[2] for line in lines] == [
        str({"width": w // 2, "height": w // 2}) for w in (320, 640, 1280)
    ], proc.stdout


def test_the_commands_to_try_with_make_run_going(sqlite_cluster: Cluster):
    sqlite_cluster.start_worker(handlers=HANDLERS)
    section = README.split("With `make run` going, in another terminal:", 1)[1]
    block = re.search(r"```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert block
    for line in block.group(1).splitlines():
        if line.strip():
            proc = run_shell(sqlite_cluster, line)
            assert proc.returncode == 0, f"{line}\n{proc}"

    m = sqlite_cluster.client
    [failing] = m.list(name="fail")
    record = wait_final(m, [failing["id"]])[failing["id"]]
    assert (record["status"], record["attempts"]) == ("failed", 3), "fails three times, as the comment says"
    resized = m.list(name="resize_image")
    assert [t["status"] for t in resized] == ["succeeded"]

"""The one-file executable, copied alone into an empty folder and run with no Python on PATH.

``make test`` builds ``dist/martinet`` first (``make build``). Without a current build these tests
skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PG_URL, ROOT, Process, _postgres_available, free_port, reset_postgres, wait_until

BUILT = ROOT / "dist" / "martinet"
#: What packaging/selfextract.sh runs.
SHELL_TOOLS = ("sh", "mkdir", "mktemp", "tail", "tar", "gzip", "mv", "rm")

HANDLER = """
import asyncio, csv, ctypes, decimal, email.message, hashlib, http.client, io, logging.handlers, smtplib
import sqlite3, ssl, uuid, xml.etree.ElementTree as ET, zoneinfo

import vendored_greeting
from martinet_app import task


@task("stdlib_tour")
def tour(task_id, data, progress):
    progress(0.5, "half way")
    root = ET.fromstring("<a><b>x</b></a>")
    rows = list(csv.reader(io.StringIO("1,2\\n3,4")))
    db = sqlite3.connect(":memory:")
    message = email.message.EmailMessage()
    message["Subject"] = "hi"
    return {
        "xml": root.find("b").text,
        "csv": rows,
        "sqlite": db.execute("select 6 * 7").fetchone()[0],
        "decimal": str(decimal.Decimal("0.1") + decimal.Decimal("0.2")),
        "sha": hashlib.sha256(b"martinet").hexdigest()[:8],
        "asyncio": asyncio.run(asyncio.sleep(0, result="ok")),
        "ctypes": ctypes.sizeof(ctypes.c_int),
        "subject": message["Subject"],
        "smtp_port": smtplib.SMTP_PORT,
        "ssl": ssl.OPENSSL_VERSION.split()[0],
        "handler": logging.handlers.RotatingFileHandler.__name__,
        "tz": str(zoneinfo.ZoneInfo("UTC")),
        "http": http.client.OK,
        "uuid": len(str(uuid.uuid4())),
        "vendored": vendored_greeting.greet(data["name"]),
    }


@task
def snooze(task_id, data, progress):
    import time
    time.sleep(data["seconds"])
"""

EXPECTED_TOUR = {
    "xml": "x",
    "csv": [["1", "2"], ["3", "4"]],
    "sqlite": 42,
    "decimal": "0.3",
    "sha": hashlib.sha256(b"martinet").hexdigest()[:8],
    "asyncio": "ok",
    "ctypes": 4,
    "subject": "hi",
    "smtp_port": 25,
    "ssl": "OpenSSL",
    "handler": "RotatingFileHandler",
    "tz": "UTC",
    "http": 200,
    "uuid": 36,
    "vendored": "hello, ana",
}


@pytest.fixture(scope="module")
def binary_source() -> Path:
    """dist/martinet, current with the sources."""
    problem = None
    if not BUILT.exists():
        problem = "dist/martinet is missing: run `make build`"
    else:
        sources = [*ROOT.glob("martinet_app/*.py"), *ROOT.glob("martinet_app/static/*"), ROOT / "build.spec"]
        if max(p.stat().st_mtime for p in sources) > BUILT.stat().st_mtime:
            problem = "dist/martinet is older than the sources: run `make build`"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem} (CI=true: the executable must be tested)")
        pytest.skip(problem)
    return BUILT


class Box:
    """An empty folder holding only a copy of the executable, a handlers folder and a vendored package."""

    def __init__(self, root: Path, source: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        self.exe = self.bin / "martinet"
        shutil.copy2(source, self.exe)
        self.cache = root / ".cache" / "martinet"  # where the executable unpacks itself, once
        self.handlers = root / "handlers"
        self.handlers.mkdir()
        (self.handlers / "tour.py").write_text(HANDLER)
        self.vendor = root / "vendor"
        (self.vendor / "vendored_greeting").mkdir(parents=True)
        (self.vendor / "vendored_greeting" / "__init__.py").write_text(
            "def greet(name):\n    return f'hello, {name}'\n"
        )
        self.ports = {"client": free_port(), "worker": free_port(), "status": free_port(), "http": free_port()}
        self.processes: list[Process] = []
        # No Python on PATH: only the executable's folder and the tools its sh header uses.
        tools = root / "tools"
        tools.mkdir()
        for tool in SHELL_TOOLS:
            (tools / tool).symlink_to(shutil.which(tool))
        self.env = {"PATH": f"{self.bin}:{tools}", "HOME": str(root), "LANG": "C.UTF-8"}

    def run(self, *args: str, client: bool = True) -> subprocess.CompletedProcess:
        """Run a command of the copied executable; client verbs get this box's client port."""
        port = ("--client-port", str(self.ports["client"])) if client else ()
        return subprocess.run(
            ["martinet", *args, *port], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=60
        )

    def json(self, *args: str) -> object:
        result = self.run(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def start(self, *args: str, name: str) -> Process:
        proc = Process(["martinet", *args], self.root / f"{name}.log", env=self.env, inherit_env=False).start()
        self.processes.append(proc)
        return proc

    def stop(self) -> None:
        """Kill whatever a test left running (a test that passed has stopped its processes itself)."""
        for proc in self.processes:
            if proc.running():
                proc.kill()

    def serve(self, db_url: str) -> Process:
        server = self.start(
            "serve", "--db", db_url, "--client-port", str(self.ports["client"]), "--worker-port",
            str(self.ports["worker"]), "--status-port", str(self.ports["status"]),
            "--http-port", str(self.ports["http"]), "--heartbeat", "0.2", name="server",
        )  # fmt: skip
        wait_until(lambda: self.run("ping", "--timeout", "0.5").returncode == 0, what="the frozen server")
        return server

    def work(self) -> Process:
        worker = self.start(
            "work", "--handlers", str(self.handlers), "--path", str(self.vendor), "--worker-port",
            str(self.ports["worker"]), "--status-port", str(self.ports["status"]), "--heartbeat", "0.2",
            "--grace", "5", name="worker",
        )  # fmt: skip
        wait_until(lambda: any(w["pid"] for w in self.json("workers")), what="the frozen worker to register")
        return worker


@pytest.fixture
def box(tmp_path: Path, binary_source: Path) -> Iterator[Box]:
    box = Box(tmp_path, binary_source)
    yield box
    box.stop()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_help_and_version_without_python(box: Box):
    assert shutil.which("python3", path=box.env["PATH"]) is None
    help_text = box.run("--help", client=False)
    assert help_text.returncode == 0 and "serve" in help_text.stdout and "work" in help_text.stdout
    version = box.run("--version", client=False)
    assert version.returncode == 0 and "martinet, version" in version.stdout


def test_everything_from_the_executable_alone(box: Box, tmp_path: Path):
    server = box.serve(f"sqlite:///{tmp_path / 'frozen.db'}")
    worker = box.work()
    try:
        record = box.json("execute", "stdlib_tour", "--args", '{"name": "ana"}', "--username", "ana", "--wait")
        assert record["status"] == "succeeded", record
        assert record["result"] == EXPECTED_TOUR
        assert (record["progress"], record["progress_message"]) == (1.0, "half way")

        scheduled = box.json("schedule", "in 1 second", "stdlib_tour", "--args", '{"name": "bo"}')["task_id"]
        rid = box.json("every", "1 second", "stdlib_tour", "--args", '{"name": "cy"}')["recurring_id"]
        wait_until(lambda: box.json("status", str(scheduled))["status"] == "succeeded", what="the scheduled task")
        runs = lambda: [t for t in box.json("list", "--limit", "100") if t["recurring_id"] == rid]  # noqa: E731
        wait_until(lambda: len(runs()) >= 2, what="two recurring runs")
        assert box.run("revoke", str(rid)).returncode == 0
        wait_until(lambda: all(t["status"] == "succeeded" for t in runs()), what="the recurring runs to finish")
        assert "succeeded" in box.run("status", str(scheduled)).stdout
        cron = box.json("every", "0 9 * * mon-fri", "stdlib_tour", "--tz", "Europe/Paris")["recurring_id"]
        [zoned] = [s for s in box.json("recurring") if s["id"] == cron]  # croniter and the zones are bundled
        assert (zoned["interval"], zoned["tz"], zoned["next_run_at"][11:16]) in (
            ("0 9 * * mon-fri", "Europe/Paris", "07:00"), ("0 9 * * mon-fri", "Europe/Paris", "08:00")
        )  # fmt: skip
        assert_dashboard(f"http://127.0.0.1:{box.ports['http']}")
    finally:
        statuses = {name: proc.terminate() for name, proc in (("worker", worker), ("server", server))}
    assert statuses == {"worker": 0, "server": 0}
    for proc in (server, worker):
        assert "Traceback" not in proc.log()
    assert "martinet 0.1.0 serving" in server.log() and f"127.0.0.1:{box.ports['client']}" in server.log()
    (build,) = box.cache.iterdir()
    assert (build / "martinet").is_file(), "unpacked once, into one folder, and run from there"


def assert_dashboard(url: str) -> None:
    """The executable serves the dashboard's page and the assets it names (packed from martinet_app/static)."""
    with urllib.request.urlopen(url + "/", timeout=10) as response:
        page = response.read().decode()
    assert response.headers["Content-Type"].startswith("text/html") and "<title>Martinet</title>" in page
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    assert {asset.split("?")[0] for asset in assets} == {"/static/app.js", "/static/app.css", "/static/logo.svg"}
    for asset in assets:
        with urllib.request.urlopen(url + asset, timeout=10) as response:
            assert response.status == 200 and response.read()


def test_postgresql_from_the_executable(box: Box):
    missing = _postgres_available()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    reset_postgres()
    server = box.serve(PG_URL)
    worker = box.work()
    try:
        record = box.json("execute", "stdlib_tour", "--args", '{"name": "pg"}', "--wait")
        assert record["status"] == "succeeded" and record["result"]["vendored"] == "hello, pg"
    finally:
        assert worker.terminate() == 0 and server.terminate() == 0


@pytest.mark.parametrize("role", ["server", "worker"])
def test_kill_9_of_the_visible_pid_ends_martinet(box: Box, tmp_path: Path, role: str):
    server = box.serve(f"sqlite:///{tmp_path / 'killed.db'}")
    worker = box.work()
    victim = server if role == "server" else worker
    # The pid a user sees is the program itself: the sh header exec'd it. A worker's only children
    # are its handler processes, which must die with it.
    assert Path(f"/proc/{victim.pid}/exe").resolve().parent.parent == box.cache
    children = [int(pid) for pid in Path(f"/proc/{victim.pid}/task/{victim.pid}/children").read_text().split()]
    assert len(children) == (0 if role == "server" else 4)
    assert all("_slot" in Path(f"/proc/{pid}/cmdline").read_text() for pid in children)
    task_id = box.json("execute", "snooze", "--args", '{"seconds": 60}')["task_id"]
    wait_until(lambda: box.json("status", str(task_id))["status"] == "running", what="the task to run")
    os.kill(victim.pid, signal.SIGKILL)
    victim.proc.wait()
    assert not alive(victim.pid)
    wait_until(lambda: not any(alive(pid) for pid in children), timeout=5, what="the handler processes to die")
    if role == "server":
        # The ports are free at once: a new server starts on them and finds the task in the store.
        server = box.serve(f"sqlite:///{tmp_path / 'killed.db'}")
        assert box.json("status", str(task_id))["status"] in ("running", "queued")
        assert worker.terminate() == 0
    else:
        wait_until(lambda: box.json("status", str(task_id))["status"] == "queued", what="the lost worker's task")
        assert box.json("workers") == []
    assert server.terminate() == 0


def test_handler_folder_without_python_errors_cleanly(box: Box):
    (box.handlers / "tour.py").write_text(textwrap.dedent("import definitely_not_installed\n"))
    result = subprocess.run(
        ["martinet", "work", "--handlers", str(box.handlers), "--worker-port", "1", "--status-port", "1"],
        cwd=box.root, env=box.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "definitely_not_installed" in result.stderr and "Traceback" not in result.stderr


def test_keys_from_the_executable(box: Box, tmp_path: Path):
    for name, role in (("server", None), ("cli", "client"), ("w", "worker")):
        made = box.run("keygen", name, "--dir", "own", client=False)
        assert made.returncode == 0, made.stderr
        if role is not None:
            (box.root / role).mkdir()
            shutil.copy(box.root / "own" / f"{name}.key", box.root / role)
    assert box.run("keygen", "w", "--dir", "own", client=False).returncode == 2, "never overwrites a key"
    own = box.root / "own"  # absolute: the processes run in the repository, the commands in the box
    peer = lambda name: ("--secret-key", f"{own}/{name}.key_secret", "--server-key", f"{own}/server.key")  # noqa: E731
    ports = ("--worker-port", str(box.ports["worker"]), "--status-port", str(box.ports["status"]))
    server = box.start("serve", "--db", f"sqlite:///{tmp_path / 'keys.db'}", "--client-port", str(box.ports["client"]),
                       *ports, "--secret-key", f"{own}/server.key_secret", "--client-keys", str(box.root / "client"),
                       "--worker-keys", str(box.root / "worker"), "--heartbeat", "0.2", name="server")  # fmt: skip
    wait_until(lambda: box.run("ping", "--timeout", "0.5", *peer("cli")).returncode == 0, what="the frozen server")
    worker = box.start("work", "--handlers", str(box.handlers), "--path", str(box.vendor), *ports, *peer("w"),
                       "--heartbeat", "0.2", name="worker")  # fmt: skip
    try:
        done = box.run("execute", "stdlib_tour", "--args", '{"name": "key"}', "--wait", "--json", *peer("cli"))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["result"]["vendored"] == "hello, key"
        refused = box.run("ping", "--timeout", "5")
        assert refused.returncode == 6 and "the server uses keys" in refused.stderr
    finally:
        assert worker.terminate() == 0 and server.terminate() == 0

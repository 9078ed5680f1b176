"""One benchmark run of one system and one workload; bench/compare.py starts it and reads its JSON.

    python bench/drive.py martinet WORKLOAD    (the product's .venv)
    python bench/drive.py huey-sqlite WORKLOAD (bench/.venv)
    python bench/drive.py huey-redis WORKLOAD  (bench/.venv)

WORKLOAD is drain, stream, bulk (Martinet only) or latency. Each run starts its own server and
worker (or consumer) as subprocesses, on free ports and a fresh temporary SQLite file (or a fresh
Redis queue name), and stops them before it prints one JSON object on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
N = int(os.environ.get("N", "2000"))
LATENCY_N = int(os.environ.get("LATENCY_N", "300"))
CONCURRENCY = int(os.environ.get("CONCURRENCY", "16"))
CHUNK = 1000  # execute_many chunk for drain
BULK_CHUNK = 10_000  # the server's SUBMIT_MANY_MAX
POLL = 0.01  # seconds between completion checks
HUEY_CONSUMER = (
    "from gevent import monkey; monkey.patch_all(); from huey.bin.huey_consumer import consumer_main; consumer_main()"
)
DEADLINE = float(os.environ.get("BENCH_TIMEOUT", "600"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_kb(pid: int) -> int:
    """VmHWM of a live process, kB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def until(check, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(POLL)


# ------------------------------------------------------------------ Martinet


class MartinetSide:
    def __init__(self, tmp: str) -> None:
        from martinet_app.client import Martinet

        self.ports = [free_port() for _ in range(3)]
        self.db = f"sqlite:///{tmp}/martinet.db"
        python = str(ROOT / ".venv" / "bin" / "python")
        client, worker, status = (str(p) for p in self.ports)
        self.server = subprocess.Popen(
            [python, "-m", "martinet_app", "serve", "--client-port", client, "--worker-port", worker,
             "--status-port", status, "--db", self.db, "--log-level", "warning"],
            cwd=ROOT,
        )  # fmt: skip
        self.worker_cmd = [
            python, "-m", "martinet_app", "work", "--handlers", str(BENCH / "handlers"),
            "--concurrency", str(CONCURRENCY), "--worker-port", worker, "--status-port", status,
            "--log-level", "warning",
        ]  # fmt: skip
        self.worker: subprocess.Popen | None = None
        self.m = Martinet("127.0.0.1", self.ports[0], timeout=60)
        until(self._pings, "the Martinet server")

    def _pings(self) -> bool:
        from martinet_app.errors import ServerUnavailable

        try:
            self.m.ping()
            return True
        except ServerUnavailable:
            return False

    def start_worker(self) -> None:
        self.worker = subprocess.Popen(self.worker_cmd, cwd=ROOT)

    def worker_ready(self) -> None:
        """Start the worker if needed and wait for it to run one task (outside any timing)."""
        if self.worker is None:
            self.start_worker()
        until(lambda: self.m.workers(), "the Martinet worker")
        self.m.wait(self.m.execute({"name": "noop"}), timeout=60)

    def all_done(self) -> bool:
        return not self.m.list(status="queued", limit=1) and not self.m.list(status="running", limit=1)

    def wait_all(self, ids: list[int]) -> None:
        self.m.wait(ids[-1], timeout=DEADLINE)
        until(self.all_done, "all Martinet tasks")

    def submit_many(self, count: int, chunk: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < count:
            size = min(chunk, count - len(ids))
            ids += self.m.execute_many([({"name": "noop"}, None)] * size)
        return ids

    def rss(self) -> dict:
        slots = children(self.worker.pid) if self.worker else []
        return {
            "server_rss_kb": peak_rss_kb(self.server.pid),
            "worker_rss_kb": peak_rss_kb(self.worker.pid) if self.worker else 0,
            "slots_rss_kb": sum(peak_rss_kb(pid) for pid in slots),
            "slots": len(slots),
        }

    def check(self, expected: int) -> None:
        failed = self.m.list(status="failed", limit=1)
        if failed:
            raise SystemExit(f"a Martinet task failed: {failed[0]}")
        done = len(self.m.list(status="succeeded", limit=10_000))
        if expected <= 10_000 and done != expected:
            raise SystemExit(f"Martinet: {done} tasks succeeded, expected {expected}")

    def close(self) -> None:
        self.m.close()
        if self.worker is not None:
            stop(self.worker)
        stop(self.server)


def martinet(workload: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="martinet-bench-") as tmp:
        side = MartinetSide(tmp)
        try:
            result = run_martinet(side, workload)
            result.update(side.rss())
            return result
        finally:
            side.close()


def _submit_and_finish(side: MartinetSide, submit: Callable[[], list[int]]) -> dict:
    """Time ``submit`` (N tasks, worker running) and the run until all N succeeded."""
    started = time.perf_counter()
    ids = submit()
    submitted = time.perf_counter() - started
    side.wait_all(ids)
    elapsed = time.perf_counter() - started
    side.check(N + 1)
    return {"tasks_per_s": N / elapsed, "submit_per_s": N / submitted, "seconds": elapsed}


def run_martinet(side: MartinetSide, workload: str) -> dict:
    m = side.m
    if workload == "drain":
        ids = side.submit_many(N, CHUNK)
        started = time.perf_counter()
        side.start_worker()
        side.wait_all(ids)
        elapsed = time.perf_counter() - started
        side.check(N)
        return {"tasks_per_s": N / elapsed, "seconds": elapsed}
    side.worker_ready()
    if workload == "stream":
        return _submit_and_finish(side, lambda: [m.execute({"name": "noop"}) for _ in range(N)])
    if workload == "bulk":
        return _submit_and_finish(side, lambda: side.submit_many(N, BULK_CHUNK))
    if workload == "latency":
        times = []
        for _ in range(LATENCY_N):
            started = time.perf_counter()
            task = m.wait(m.execute({"name": "noop"}), timeout=60)
            times.append((time.perf_counter() - started) * 1000)
            if task["status"] != "succeeded":
                raise SystemExit(f"Martinet task ended {task['status']}")
        return {"p50_ms": percentile(times, 0.5), "p99_ms": percentile(times, 0.99)}
    raise SystemExit(f"unknown workload {workload!r}")


# ------------------------------------------------------------------ Huey


def huey(backend: str, workload: str) -> dict:
    if workload == "bulk":
        return {}
    with tempfile.TemporaryDirectory(prefix="huey-bench-") as tmp:
        env = dict(os.environ, BENCH_HUEY=backend, BENCH_HUEY_FILE=f"{tmp}/huey.db")
        env["BENCH_HUEY_NAME"] = f"martinet-bench-{uuid.uuid4().hex[:8]}"
        os.environ.update(env)
        sys.path.insert(0, str(BENCH))
        import huey_app

        app = huey_app.huey
        app.flush()
        # huey_consumer, with gevent's monkey-patching first, as Huey's docs ask for greenlet workers.
        consumer_cmd = [
            str(BENCH / ".venv" / "bin" / "python"), "-c", HUEY_CONSUMER, "huey_app.huey",
            "-k", "greenlet", "-w", str(CONCURRENCY), "-q",
        ]  # fmt: skip
        env["PYTHONPATH"] = str(BENCH)
        consumer = None
        try:
            if workload == "drain":
                for _ in range(N):
                    huey_app.noop()
                started = time.perf_counter()
                consumer = subprocess.Popen(consumer_cmd, cwd=BENCH, env=env)
                until(lambda: app.result_count() >= N, "all Huey results")
                elapsed = time.perf_counter() - started
                result = {"tasks_per_s": N / elapsed, "seconds": elapsed}
            else:
                consumer = subprocess.Popen(consumer_cmd, cwd=BENCH, env=env)
                huey_app.noop().get(blocking=True, timeout=60)  # consumer up; get() removes the result
                if workload == "stream":
                    started = time.perf_counter()
                    for _ in range(N):
                        huey_app.noop()
                    submitted = time.perf_counter() - started
                    until(lambda: app.result_count() >= N, "all Huey results")
                    elapsed = time.perf_counter() - started
                    result = {"tasks_per_s": N / elapsed, "submit_per_s": N / submitted, "seconds": elapsed}
                elif workload == "latency":
                    times = []
                    for _ in range(LATENCY_N):
                        started = time.perf_counter()
                        if huey_app.noop().get(blocking=True, timeout=60) is not True:
                            raise SystemExit("Huey task returned no result")
                        times.append((time.perf_counter() - started) * 1000)
                    result = {"p50_ms": percentile(times, 0.5), "p99_ms": percentile(times, 0.99)}
                else:
                    raise SystemExit(f"unknown workload {workload!r}")
            if workload in ("drain", "stream") and app.result_count() != N:
                raise SystemExit(f"Huey: {app.result_count()} results, expected {N}")
            result["consumer_rss_kb"] = peak_rss_kb(consumer.pid)
            return result
        finally:
            if consumer is not None:
                stop(consumer)
            app.flush()


def main() -> None:
    system, workload = sys.argv[1], sys.argv[2]
    if system == "martinet":
        sys.path.insert(0, str(ROOT))
        result = martinet(workload)
    elif system in ("huey-sqlite", "huey-redis"):
        result = huey(system.removeprefix("huey-"), workload)
    else:
        raise SystemExit(f"unknown system {system!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Start-up time of the `martinet` command: the one-file executable against the virtualenv's script.

Run with `make bench-startup` (after `make build`). It starts a server from the virtualenv on
free ports with a temporary SQLite file, submits one task, then times each command RUNS times
and prints the median, the fastest and the slowest, in milliseconds.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("RUNS", "30"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(command: list[str]) -> list[float]:
    subprocess.run(command, check=True, capture_output=True)  # warm the page cache
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    executable = ROOT / "dist" / "martinet"
    script = ROOT / ".venv" / "bin" / "martinet"
    if not executable.exists():
        sys.exit("dist/martinet is missing: run `make build` first")
    ports = [str(free_port()) for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [str(script), "serve", "--client-port", ports[0], "--worker-port", ports[1], "--status-port", ports[2],
             "--db", f"sqlite:///{tmp}/bench.db", "--log-level", "WARNING"],
        )  # fmt: skip
        try:
            client = ["--client-port", ports[0]]
            for _ in range(100):
                if subprocess.run([str(script), "ping", *client], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            task = subprocess.run(
                [str(script), "execute", "echo", *client], check=True, capture_output=True, text=True
            ).stdout.split()[1]
            print(f"martinet start-up, {RUNS} runs each; dist/martinet is {executable.stat().st_size / 1e6:.1f} MB")
            print(f"{'command':<40} {'median':>8} {'min':>8} {'max':>8}")
            for name, command in [
                ("dist/martinet --help", [str(executable), "--help"]),
                (f"dist/martinet status {task}", [str(executable), "status", task, *client]),
                (".venv/bin/martinet --help", [str(script), "--help"]),
                (f".venv/bin/martinet status {task}", [str(script), "status", task, *client]),
            ]:
                times = timed(command)
                print(f"{name:<40} {statistics.median(times):8.1f} {min(times):8.1f} {max(times):8.1f}")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()

"""Martinet against Huey (SqliteHuey and RedisHuey) on no-op workloads: `make bench`.

Runs every workload for every system REPS times, alternating the systems within each repetition
(the order rotates), each run a fresh bench/drive.py process in that system's virtualenv (Martinet:
.venv, Huey: bench/.venv). Prints a table of medians and the Martinet/Huey ratio of each row.
Settings (environment): REPS (3), N (2000), LATENCY_N (300), CONCURRENCY (16); a Redis server
must answer on 127.0.0.1:6379 (BENCH_REDIS_URL names another).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
REPS = int(os.environ.get("REPS", "3"))
SYSTEMS = {
    "martinet": ROOT / ".venv" / "bin" / "python",
    "huey-sqlite": BENCH / ".venv" / "bin" / "python",
    "huey-redis": BENCH / ".venv" / "bin" / "python",
}
WORKLOADS = ["drain", "stream", "bulk", "latency"]
# (label, workload, key, scale, higher is better)
ROWS = [
    ("drain, tasks/s", "drain", "tasks_per_s", 1, True),
    ("stream, tasks/s end to end", "stream", "tasks_per_s", 1, True),
    ("stream, submits/s", "stream", "submit_per_s", 1, True),
    ("bulk, tasks/s end to end", "bulk", "tasks_per_s", 1, True),
    ("bulk, submits/s", "bulk", "submit_per_s", 1, True),
    ("latency submit->result p50, ms", "latency", "p50_ms", 1, False),
    ("latency submit->result p99, ms", "latency", "p99_ms", 1, False),
    ("peak RSS server / Huey consumer, MB (stream)", "stream", "main_rss_kb", 1 / 1024, False),
    ("peak RSS worker, MB (stream)", "stream", "worker_rss_kb", 1 / 1024, False),
    ("peak RSS 16 handler processes, MB total (stream)", "stream", "slots_rss_kb", 1 / 1024, False),
]


def run(system: str, workload: str) -> dict:
    proc = subprocess.run(
        [str(SYSTEMS[system]), str(BENCH / "drive.py"), system, workload], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{system} {workload} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "server_rss_kb" in result or "consumer_rss_kb" in result:
        result["main_rss_kb"] = result.get("server_rss_kb", result.get("consumer_rss_kb"))
    return result


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def main() -> None:
    for python in SYSTEMS.values():
        if not python.exists():
            raise SystemExit(f"{python} is missing: run `make bench`, which creates it")
    results: dict[tuple[str, str], list[dict]] = {}
    names = list(SYSTEMS)
    started = time.monotonic()
    for rep in range(REPS):
        for workload in WORKLOADS:
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for system in order:
                result = run(system, workload)
                if result:
                    results.setdefault((system, workload), []).append(result)
                    shown = {k: round(v, 1) for k, v in result.items() if not k.endswith("_kb")}
                    print(f"rep {rep + 1}/{REPS} {workload:8} {system:12} {shown}", file=sys.stderr, flush=True)
    header = ["", "Martinet", "Huey SQLite", "Huey Redis", "Martinet/HueySQLite", "Martinet/HueyRedis"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, workload, key, scale, _higher in ROWS:
        medians = []
        for system in names:
            values = [r[key] for r in results.get((system, workload), []) if key in r]
            medians.append(statistics.median(values) * scale if values else None)
        ratios = [f"{medians[0] / other:.2f}" if medians[0] is not None and other else "-" for other in medians[1:]]
        lines.append("| " + " | ".join([label, *map(fmt, medians), *ratios]) + " |")
    n, latency_n = os.environ.get("N", "2000"), os.environ.get("LATENCY_N", "300")
    slots, took = os.environ.get("CONCURRENCY", "16"), time.monotonic() - started
    print(f"\nMedians of {REPS} repetitions; N={n}, latency over {latency_n} tasks, {slots} slots; {took:.0f} s.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Martinet against Huey (SqliteHuey and RedisHuey) on no-op workloads: `make bench`.

Runs every workload for every system REPS times, alternating the systems within each repetition
(the order rotates), each run a fresh bench/drive.py process in that system's virtualenv (Martinet:
.venv, Huey: bench/.venv). Prints a table of medians, one column per system that ran, and the
ratio of Martinet (the default: SQLite, durability full, no keys) to each Huey system for each row.
Martinet's variants run some workloads only: martinet-curve (CURVE keys on every socket)
CURVE_WORKLOADS, martinet-pg (PostgreSQL) PG_WORKLOADS, martinet-mysql (MariaDB; its CPU figures leave
MariaDB's out) MYSQL_WORKLOADS, martinet-process (SQLite with the opt-in
`serve --durability process`, not a target) PROCESS_WORKLOADS.
Settings (environment): REPS (3), WORKLOADS (drain stream bulk latency timing-spread timing-burst
producers monitor aio; MARTINET_ONLY run no Huey), SYSTEMS (all of them: a subset leaves the
others out), and drive.py's N (2000), DRAIN_N (20000), LATENCY_N (300), TIMING_N (500), PHASE_S
(10), PRODUCERS (8), SCALE_N (1000000), SLOTS (4), CONCURRENCY (16), BENCH_PG_URL,
BENCH_MYSQL_URL; a Redis server
must answer on 127.0.0.1:6379 (BENCH_REDIS_URL names another) when a Huey system runs, and
PostgreSQL at BENCH_PG_URL (default postgresql://postgres@127.0.0.1:5432/bench_pg) when martinet-pg does,
MariaDB at BENCH_MYSQL_URL (default mysql://root@127.0.0.1:3306/bench_mysql) when martinet-mysql does.

`make bench-scale` is WORKLOADS=scale with REPS=1 unless given: a second table, Martinet with an
empty store against Martinet with SCALE_N scheduled tasks (drive.py describes the figures).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import drive

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
REPS = int(os.environ.get("REPS", "3"))
#: Each system's interpreter and its column's heading, in the table's order.
SYSTEMS = {
    "martinet": (ROOT / ".venv" / "bin" / "python", "Martinet"),
    "martinet-curve": (ROOT / ".venv" / "bin" / "python", "Martinet, CURVE keys"),
    "martinet-pg": (ROOT / ".venv" / "bin" / "python", "Martinet, PostgreSQL"),
    "martinet-mysql": (ROOT / ".venv" / "bin" / "python", "Martinet, MariaDB"),
    "martinet-process": (ROOT / ".venv" / "bin" / "python", "Martinet durability=process (opt-in, not a target)"),
    "huey-sqlite": (BENCH / ".venv" / "bin" / "python", "Huey SQLite"),
    "huey-redis": (BENCH / ".venv" / "bin" / "python", "Huey Redis"),
}
CHOSEN = os.environ.get("SYSTEMS", " ".join(SYSTEMS)).split()
WORKLOADS = os.environ.get(
    "WORKLOADS", "drain stream bulk latency timing-spread timing-burst producers monitor aio"
).split()
MARTINET_ONLY = {"bulk", "scale", "monitor", "aio", "purge"}
#: Workloads Martinet also runs with CURVE keys on every socket (the keys' cost, beside the run without).
CURVE_WORKLOADS = {"drain", "latency"}
#: Workloads Martinet also runs on PostgreSQL (BENCH_PG_URL, emptied before each run).
PG_WORKLOADS = {"drain", "stream", "latency", "producers", "aio"}
#: Workloads Martinet also runs on MariaDB (BENCH_MYSQL_URL, dropped and created again before each run).
MYSQL_WORKLOADS = {"drain", "stream", "latency"}
#: Workloads Martinet also runs with `serve --durability process` (SQLite synchronous=NORMAL, the opt-in mode).
PROCESS_WORKLOADS = {"stream", "latency", "producers", "drain"}
#: The workloads of each variant of Martinet; the default and Huey run every other (Huey: but MARTINET_ONLY).
VARIANTS = {
    "martinet-curve": CURVE_WORKLOADS,
    "martinet-pg": PG_WORKLOADS,
    "martinet-mysql": MYSQL_WORKLOADS,
    "martinet-process": PROCESS_WORKLOADS,
}
#: The systems the default Martinet's figures are divided by, in the ratio columns.
HUEYS = ("huey-sqlite", "huey-redis")
# (label, workload, key, scale, higher is better)
ROWS = [
    ("drain, tasks/s", "drain", "tasks_per_s", 1, True),
    ("drain, worker start-up (spawn to first handler start), s", "drain", "startup_s", 1, False),
    ("drain, CPU s per 1000 tasks", "drain", "cpu_s_per_1000", 1, False),
    ("stream, tasks/s end to end", "stream", "tasks_per_s", 1, True),
    ("stream, submits/s", "stream", "submit_per_s", 1, True),
    ("stream, CPU s per 1000 tasks", "stream", "cpu_s_per_1000", 1, False),
    ("bulk, tasks/s end to end", "bulk", "tasks_per_s", 1, True),
    ("bulk, submits/s", "bulk", "submit_per_s", 1, True),
    (f"producers, {drive.PRODUCERS} processes, submits/s in all", "producers", "submits_per_s", 1, True),
    ("producers, tasks/s end to end", "producers", "tasks_per_s", 1, True),
    ("producers, execute (enqueue) p50, ms", "producers", "submit_p50_ms", 1, False),
    ("producers, execute (enqueue) p99, ms", "producers", "submit_p99_ms", 1, False),
    ("producers, CPU s per 1000 tasks", "producers", "cpu_s_per_1000", 1, False),
    ("producers, enqueues retried after SQLite's busy timeout (Huey SQLite)", "producers", "retries", 1, False),
    ("latency submit->result p50, ms", "latency", "p50_ms", 1, False),
    ("latency submit->result p99, ms", "latency", "p99_ms", 1, False),
    ("latency submit->handler start p50, ms", "latency", "start_p50_ms", 1, False),
    ("latency submit->handler start p99, ms", "latency", "start_p99_ms", 1, False),
    ("timing spread, lateness p50, ms", "timing-spread", "lateness_p50_ms", 1, False),
    ("timing spread, lateness p99, ms", "timing-spread", "lateness_p99_ms", 1, False),
    ("timing spread, lateness max, ms", "timing-spread", "lateness_max_ms", 1, False),
    ("timing burst, lateness p50, ms", "timing-burst", "lateness_p50_ms", 1, False),
    ("timing burst, lateness p99, ms", "timing-burst", "lateness_p99_ms", 1, False),
    ("timing burst, lateness max, ms", "timing-burst", "lateness_max_ms", 1, False),
    ("peak RSS server / Huey consumer, MB (stream)", "stream", "main_rss_kb", 1 / 1024, False),
    ("peak RSS worker, MB (stream)", "stream", "worker_rss_kb", 1 / 1024, False),
    (f"peak RSS {drive.SLOTS} handler processes, MB total (stream)", "stream", "slots_rss_kb", 1 / 1024, False),
    ("monitor, submit p50, ms", "monitor", "quiet_submit_p50_ms", 1, False),
    ("monitor, submit p99, ms", "monitor", "quiet_submit_p99_ms", 1, False),
    ("monitor, submit p50 while the overview is polled every second, ms", "monitor", "polled_submit_p50_ms", 1, False),
    ("monitor, submit p99 while the overview is polled every second, ms", "monitor", "polled_submit_p99_ms", 1, False),
    ("monitor, one overview poll (stats + workers), p50, ms", "monitor", "poll_p50_ms", 1, False),
    (f"aio, {drive.AIO_INFLIGHT} executes in flight on one asyncio client, submits/s", "aio", "submits_per_s", 1, True),
    ("aio, execute p50, ms", "aio", "submit_p50_ms", 1, False),
    ("aio, execute p99, ms", "aio", "submit_p99_ms", 1, False),
    (f"purge {drive.PURGE_N} finished tasks, s", "purge", "purge_s", 1, False),
    ("purge, submit p50 before it, ms", "purge", "quiet_submit_p50_ms", 1, False),
    ("purge, submit p99 before it, ms", "purge", "quiet_submit_p99_ms", 1, False),
    ("purge, submit p50 while it runs, ms", "purge", "purging_submit_p50_ms", 1, False),
    ("purge, submit p99 while it runs, ms", "purge", "purging_submit_p99_ms", 1, False),
]
# (label, key, scale) of the scale table, whose columns are the empty store and the backlog.
SCALE_ROWS = [
    ("server start-up (spawn to first ping), s", "startup_s", 1),
    ("server RSS after start-up, MB", "rss_start_kb", 1 / 1024),
    ("server RSS after the measurements, MB", "rss_end_kb", 1 / 1024),
    ("server peak RSS (VmHWM) at the end, MB", "hwm_end_kb", 1 / 1024),
    ("status(id) p50, ms", "status_p50_ms", 1),
    ("status(id) p99, ms", "status_p99_ms", 1),
    ("list(limit=50) p50, ms", "list_p50_ms", 1),
    ("list(limit=50) p99, ms", "list_p99_ms", 1),
    ("list(status='scheduled', limit=50) p50, ms", "list_scheduled_p50_ms", 1),
    ("list(status='scheduled', limit=50) p99, ms", "list_scheduled_p99_ms", 1),
    ("list(status='queued', limit=50) p50, ms", "list_queued_p50_ms", 1),
    ("list(status='queued', limit=50) p99, ms", "list_queued_p99_ms", 1),
    ("overview data (stats + workers) over HTTP p50, ms", "overview_p50_ms", 1),
    ("overview data (stats + workers) over HTTP p99, ms", "overview_p99_ms", 1),
    ("/metrics p50, ms", "metrics_p50_ms", 1),
    ("/metrics p99, ms", "metrics_p99_ms", 1),
    ("dashboard page p99, ms", "page_p99_ms", 1),
    ("one due task: handler start after due, p50, ms", "lateness_p50_ms", 1),
    ("one due task: handler start after due, p99, ms", "lateness_p99_ms", 1),
    ("server CPU per fired task, with the 0.3 s idle between them, ms", "server_cpu_ms_per_task", 1),
]


def run(system: str, workload: str) -> dict | None:
    """One drive.py run's figures; None if a peer's run failed (a Martinet failure stops the benchmark)."""
    proc = subprocess.run(
        [str(SYSTEMS[system][0]), str(BENCH / "drive.py"), system, workload], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        if system not in HUEYS:
            raise SystemExit(f"{system} {workload} failed (exit {proc.returncode})")
        print(f"{system} {workload} failed (exit {proc.returncode}): counted, left out of the medians", file=sys.stderr)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "server_rss_kb" in result or "consumer_rss_kb" in result:
        result["main_rss_kb"] = result.get("server_rss_kb", result.get("consumer_rss_kb"))
    return result


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def median(values: list[float], scale: float) -> float | None:
    return statistics.median(values) * scale if values else None


def runs(system: str, workload: str) -> bool:
    if system in VARIANTS:
        return workload in VARIANTS[system]
    return system == "martinet" or workload not in MARTINET_ONLY


def systems_for(workload: str) -> list[str]:
    return [system for system in SYSTEMS if system in CHOSEN and runs(system, workload)]


def table(results: dict[tuple[str, str], list[dict]]) -> list[str]:
    """The main table: one row per ROWS entry that was run, the medians of each system that ran (a column each),
    and the default Martinet's ratio to each Huey system that ran."""
    ran = [system for system in SYSTEMS if any(s == system for s, _ in results)]
    hueys = [system for system in HUEYS if system in ran] if "martinet" in ran else []
    header = ["", *(SYSTEMS[s][1] for s in ran), *(f"Martinet/{SYSTEMS[h][1].replace(' ', '')}" for h in hueys)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, workload, key, scale, _higher in ROWS:
        if workload not in WORKLOADS:
            continue
        medians = {s: median([r[key] for r in results.get((s, workload), []) if key in r], scale) for s in ran}
        base = medians.get("martinet")
        ratios = [f"{base / medians[h]:.2f}" if base is not None and medians[h] else "-" for h in hueys]
        lines.append("| " + " | ".join([label, *(fmt(medians[s]) for s in ran), *ratios]) + " |")
    return lines


def scale_table(runs: list[dict]) -> list[str]:
    """The scale workload's figures: fill rate, then the empty store against the backlog, medians."""
    fill = median([r["fill_s"] for r in runs], 1)
    rate = median([r["fill_rows_per_s"] for r in runs], 1)
    size = median([r["db_mb"] for r in runs], 1)
    lines = [
        f"Filled a fresh SQLite file with {drive.SCALE_N} scheduled tasks in {fmt(fill)} s ({fmt(rate)} rows/s, "
        f"{fmt(size)} MB).",
        "",
        f"| Martinet | empty store | {drive.SCALE_N} scheduled |",
        "|---|---|---|",
    ]
    for label, key, scale in SCALE_ROWS:
        cells = [median([r[store][key] for r in runs if key in r[store]], scale) for store in ("empty", "backlog")]
        lines.append("| " + " | ".join([label, *map(fmt, cells)]) + " |")
    return lines


def main() -> None:
    unknown = set(CHOSEN) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown SYSTEMS {sorted(unknown)}: choose among {list(SYSTEMS)}")
    needed = {system for workload in WORKLOADS for system in systems_for(workload)}
    for system in needed:
        if not SYSTEMS[system][0].exists():
            raise SystemExit(f"{SYSTEMS[system][0]} is missing: run `make bench`, which creates it")
    results: dict[tuple[str, str], list[dict]] = {}
    failures: dict[tuple[str, str], int] = {}
    started = time.monotonic()
    for rep in range(REPS):
        for workload in WORKLOADS:
            names = systems_for(workload)
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for system in order:
                result = run(system, workload)
                if result is None:
                    failures[system, workload] = failures.get((system, workload), 0) + 1
                    continue
                results.setdefault((system, workload), []).append(result)
                shown = {k: round(v, 1) for k, v in result.items() if isinstance(v, float)}
                print(f"rep {rep + 1}/{REPS} {workload:13} {system:16} {shown}", file=sys.stderr, flush=True)
    print(f"\nMedians of {REPS} repetitions; {time.monotonic() - started:.0f} s.\n")
    if set(WORKLOADS) - {"scale"}:
        print(
            f"N={drive.N} (stream), DRAIN_N={drive.DRAIN_N} (drain, bulk), latency over {drive.LATENCY_N} tasks, "
            f"timing over {drive.TIMING_N}, PHASE_S={drive.PHASE_S:g} (producers, monitor, aio), "
            f"PRODUCERS={drive.PRODUCERS}; Martinet worker: {drive.SLOTS} slots, automatic prefetch; "
            f"Huey consumer: {drive.CONCURRENCY} greenlets.\n"
        )
        print("\n".join(table(results)) + "\n")
        for (system, workload), n in failures.items():
            label = SYSTEMS[system][1]
            print(f"{label}, {workload}: {n} of {REPS} runs failed (their output above); medians of the rest.")
    if "scale" in WORKLOADS:
        print("\n".join(scale_table(results[("martinet", "scale")])))


if __name__ == "__main__":
    main()

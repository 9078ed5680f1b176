"""What ``martinet stats``, the dashboard's overview and ``GET /api/v1/stats`` show: tasks by status, the
outcomes of each of the last 60 minutes, per-name throughput over the last hour, and the queue's lag.

All of it comes from the count tables (tally.py) and one index look-up, never a scan of the tasks.
"""

from __future__ import annotations

from .status import FINAL, TaskStatus
from .store import Store

#: How far back the per-minute outcomes and per-name throughput look, seconds.
WINDOW = 3600
#: Per-minute outcomes are kept this long (retention.py deletes older ones), seconds.
KEEP_OUTCOMES = 25 * 3600
_OUTCOMES = tuple(s.value for s in TaskStatus if s in FINAL)


def summary(store: Store, now: float) -> dict:
    """The stats reply (docs/PROTOCOL.md, ``stats``) as of ``now``."""
    current = int(now // 60 * 60)
    first = current - WINDOW + 60
    minutes = {minute: dict.fromkeys(_OUTCOMES, 0) for minute in range(first, current + 60, 60)}
    names: dict[str, dict] = {}
    for minute, name, outcome, count, run_seconds in store.outcomes(first):
        if minute in minutes:
            minutes[minute][outcome] += count
        entry = names.setdefault(name, {"name": name, **dict.fromkeys(_OUTCOMES, 0), "run_seconds": 0.0})
        entry[outcome] += count
        entry["run_seconds"] += run_seconds
    oldest = store.oldest_queued()
    return {
        "counts": store.counts(),
        "minutes": [{"minute": minute, **counts} for minute, counts in minutes.items()],
        "names": sorted(names.values(), key=lambda entry: entry["name"]),
        "queue_lag": None if oldest is None else max(0.0, now - oldest),
        "at": now,
    }

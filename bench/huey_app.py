"""The Huey side of bench/compare.py: one Huey instance and a no-op task that returns when it started.

BENCH_HUEY selects the storage: ``sqlite`` (SqliteHuey on the file BENCH_HUEY_FILE) or ``redis``
(RedisHuey on BENCH_REDIS_URL, default redis://127.0.0.1:6379/0). BENCH_HUEY_NAME names the queue,
so that runs do not share keys. Both huey_consumer and the driver import this module.
"""

from __future__ import annotations

import os
import time

from huey import RedisHuey, SqliteHuey

_backend = os.environ.get("BENCH_HUEY", "sqlite")
_name = os.environ.get("BENCH_HUEY_NAME", "martinet-bench")

if _backend == "sqlite":
    huey = SqliteHuey(_name, filename=os.environ["BENCH_HUEY_FILE"])
elif _backend == "redis":
    # notify_result: a blocking get() waits with BLPOP instead of polling.
    huey = RedisHuey(_name, url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"), notify_result=True)
else:
    raise SystemExit(f"BENCH_HUEY must be sqlite or redis, got {_backend!r}")


@huey.task()
def noop():
    # The time the handler started, so the driver can measure submit -> handler start; also a value (Huey
    # stores no result for None) that lets the driver count finished tasks in the result store.
    return time.time()

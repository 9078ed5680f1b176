"""The counts the overview, /metrics and `martinet stats` read (tally.py, stats.py), against a real server
and worker on both backends: they must equal what the store holds, after every kind of change and a restart."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter

from conftest import Cluster, wait_until


def get_stats(cluster: Cluster) -> dict:
    with urllib.request.urlopen(cluster.server.http_url + "/api/v1/stats", timeout=10) as response:
        return json.load(response)


def listed(cluster: Cluster) -> Counter:
    """Tasks by status, as the client lists them (a scan, for the check)."""
    return Counter(task["status"] for task in cluster.client.list(limit=1000))


def test_stats_follow_every_change_and_a_restart(cluster: Cluster) -> None:
    m = cluster.client
    queued = [m.execute({"name": "echo"}, {"n": i}) for i in range(3)]
    later = m.schedule("in 1 hour", {"name": "echo"})
    waiting = get_stats(cluster)
    assert (waiting["counts"]["queued"], waiting["counts"]["scheduled"]) == (3, 1)
    assert waiting["queue_lag"] is not None and waiting["queue_lag"] >= 0
    cluster.start_worker()
    failed = m.execute({"name": "explode"})
    long = m.execute({"name": "nap"}, {"seconds": 30})
    for task_id in [*queued, failed]:
        m.wait(task_id, timeout=15)
    wait_until(lambda: m.status(long)["status"] == "running", what="the nap to start")
    m.cancel(long)
    m.cancel(later)
    m.retry(failed)
    m.wait(failed, timeout=15)
    m.purge("cancelled", 0)
    expected = listed(cluster)
    assert expected == {"succeeded": 3, "failed": 1}

    def settled() -> dict | None:
        stats = get_stats(cluster)
        return stats if {k: v for k, v in stats["counts"].items() if v} == expected else None

    stats = wait_until(settled, what=f"the counts to be {dict(expected)}")
    assert set(stats["counts"]) == {"waiting", "scheduled", "queued", "running", "succeeded", "failed", "cancelled"}
    assert stats["queue_lag"] is None, "nothing is queued"
    by_name = {entry["name"]: entry for entry in stats["names"]}
    assert (by_name["echo"]["succeeded"], by_name["echo"]["failed"], by_name["echo"]["cancelled"]) == (3, 0, 1)
    assert (by_name["explode"]["failed"], by_name["nap"]["cancelled"]) == (2, 1), "each ending counts, retried too"
    assert by_name["echo"]["run_seconds"] >= 0
    assert len(stats["minutes"]) == 60 and stats["minutes"] == sorted(stats["minutes"], key=lambda m: m["minute"])
    assert stats["minutes"][-1]["minute"] <= stats["at"] < stats["minutes"][-1]["minute"] + 60
    ended = Counter()
    for minute in stats["minutes"]:
        ended.update({k: minute[k] for k in ("succeeded", "failed", "cancelled")})
    assert ended == {"succeeded": 3, "failed": 2, "cancelled": 2}

    cluster.server.terminate()
    cluster.server.restart()
    after = get_stats(cluster)
    assert {k: v for k, v in after["counts"].items() if v} == expected, "counted afresh at the restart"
    assert after["names"] == stats["names"], "the outcomes of the hour survive a restart"


def test_the_queue_lag_is_the_age_of_the_oldest_queued_task(cluster: Cluster) -> None:
    m = cluster.client
    submitted = time.time()
    m.execute({"name": "echo"})
    time.sleep(0.3)  # the lag must grow with the task's age; no worker takes it
    m.execute({"name": "echo"})
    lag = get_stats(cluster)["queue_lag"]
    assert 0.3 <= lag <= time.time() - submitted + 0.05

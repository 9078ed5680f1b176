"""Limits and pauses (issue 15): the options' parsing, and real servers and workers on both backends.

The ``stamp`` handler (tests/handlers) returns when it started and ended, so what ran at once is read from
the handlers' own clocks, not from the server's records.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Cluster, Server, martinet_cmd, print_if_failed, wait_until
from martinet_app import aio, limits
from martinet_app.errors import ConfigError, InvalidRequest

# --- parsing ----------------------------------------------------------------------------------------------------------


def test_limits_and_rates_are_parsed_by_key() -> None:
    parsed = limits.parse(["resize=2", " a=b = 7"], ["resize=10/s", "mail=5/m", "report=1/H"])
    assert parsed.running == {"resize": 2, "a=b": 7}, "a key may hold '=': the last one splits"
    assert parsed.rates == {
        "resize": limits.Rate(10, 1.0), "mail": limits.Rate(5, 60.0), "report": limits.Rate(1, 3600.0)
    }  # fmt: skip
    assert parsed.keys() == ["a=b", "mail", "report", "resize"]
    assert parsed.describe() == "a=b: 7 running; mail: 5/m; report: 1/h; resize: 2 running, 10/s"
    assert not limits.parse() and limits.parse().describe() == "none"


@pytest.mark.parametrize("flag, value", [
    ("--limit", "resize"), ("--limit", "=2"), ("--limit", "resize=0"), ("--limit", "resize=-1"),
    ("--limit", "resize=2.5"), ("--limit", "resize=two"), ("--limit", "resize=1000001"), ("--limit", "x" * 256 + "=1"),
    ("--rate", "resize=10"), ("--rate", "resize=10/d"), ("--rate", "resize=0/s"), ("--rate", "resize=/s"),
    ("--rate", "resize=1.5/s"), ("--rate", "resize"),
])  # fmt: skip
def test_a_value_of_another_form_is_refused_saying_the_form(flag: str, value: str) -> None:
    args = ([value], []) if flag == "--limit" else ([], [value])
    expected = "KEY=N " if flag == "--limit" else "KEY=N/s, KEY=N/m or KEY=N/h"
    with pytest.raises(ConfigError, match=f"bad {flag} .*expected {expected}"):
        limits.parse(*args)


def test_a_key_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="--limit 'a' is given twice"):
        limits.parse(["a=1", "a=2"])
    with pytest.raises(ConfigError, match="--rate 'a' is given twice"):
        limits.parse([], ["a=1/s", "a=2/m"])


def test_budgets_take_the_tighter_of_a_limit_and_a_rate() -> None:
    parsed = limits.parse(["a=3", "b=1"], ["a=5/s", "c=2/m"])
    assert parsed.budgets({"a": 1, "b": 4}, {"a": 4}) == {"a": 1, "b": 0, "c": 2}
    assert parsed.opens_at("c", [(10.0, 1), (20.0, 1)]) == 70.0
    assert parsed.opens_at("c", [(10.0, 1)]) is None, "room now"
    assert parsed.opens_at("b", [(10.0, 5)]) is None, "no rate"


# --- servers and workers ------------------------------------------------------------------------------------------


@pytest.fixture
def start(request: pytest.FixtureRequest, tmp_path: Path, db_url: str) -> Iterator[Callable[..., Cluster]]:
    """Start a server with the given options (and no worker) on each backend."""
    made: list[Cluster] = []

    def start(*options: str) -> Cluster:
        cluster = Cluster(tmp_path, db_url)
        cluster.server = Server(db_url, tmp_path / "server.log", *options)
        made.append(cluster)
        cluster.server.start_ready()
        return cluster

    try:
        yield start
    finally:
        for cluster in made:
            cluster.stop()
            print_if_failed(request, cluster.logs)


def spans(cluster: Cluster, task_ids: list[int]) -> list[tuple[float, float]]:
    """Each task's (start, end) as its handler saw them, once all have succeeded."""
    records = [cluster.client.wait(task_id, timeout=60) for task_id in task_ids]
    assert [r["status"] for r in records] == ["succeeded"] * len(records), records
    return [(r["result"]["start"], r["result"]["end"]) for r in records]


def most_at_once(periods: list[tuple[float, float]]) -> int:
    """The most periods that overlap at any moment (an end and a start at the same instant do not)."""
    edges = sorted([(start, 1) for start, _ in periods] + [(end, -1) for _, end in periods], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_a_limit_of_2_on_8_slots_never_runs_more_than_2(start: Callable[..., Cluster]) -> None:
    cluster = start("--limit", "stamp=2")
    cluster.start_worker("--concurrency", "8")
    ids = cluster.client.execute_many([({"name": "stamp"}, {"seconds": 0.3}) for _ in range(8)])
    periods = spans(cluster, ids)
    assert most_at_once(periods) == 2, periods
    assert "limits (running at once, starts per interval): stamp: 2 running" in cluster.server.log()


def test_a_limit_does_not_block_other_names_and_a_limit_key_is_shared_by_names(start: Callable[..., Cluster]) -> None:
    cluster = start("--limit", "gpu=1")
    cluster.start_worker("--concurrency", "8")
    m = cluster.client
    shared = [m.execute({"name": name}, {"seconds": 0.5}, limit_key="gpu") for name in ("stamp", "stamp_too") * 2]
    free = m.execute_many([({"name": "stamp"}, {"seconds": 0.1}) for _ in range(4)])  # behind them in the queue
    assert m.status(shared[0])["limit_key"] == "gpu"
    held, others = spans(cluster, shared), spans(cluster, free)
    assert most_at_once(held) == 1, f"one at a time across both names: {held}"
    second = sorted(held)[1][0]
    assert all(started < second for started, _ in others), "the other tasks ran while the limited ones waited"


def test_a_rate_of_5_per_second_spreads_50_starts_over_9_seconds(start: Callable[..., Cluster]) -> None:
    cluster = start("--rate", "stamp=5/s")
    cluster.start_worker("--concurrency", "8")
    submitted = time.time()
    ids = cluster.client.execute_many([({"name": "stamp"}, {}) for _ in range(50)])
    starts = sorted(start for start, _ in spans(cluster, ids))
    assert starts[-1] - submitted >= 9.0, "ten windows of five: the last starts 9 s after the first ones"
    # The server counts a delivery at its claim's time; the handler starts once the claim is committed and sent,
    # which on a busy machine may take a few hundred ms more for one claim than for the next. So the starts are
    # checked as bursts, one per claim: those of one claim start together, more than 0.4 s after the previous.
    bursts = [[starts[0]]]
    for before, after in itertools.pairwise(starts):
        if after - before > 0.4:
            bursts.append([])
        bursts[-1].append(after)
    assert max(map(len, bursts)) == 5 and len(bursts) >= 10, f"at most 5 at a time, and the rate is reached: {starts}"


def test_pause_and_resume_hold_across_a_restart_and_show_in_list_and_recurring(cluster: Cluster) -> None:
    worker = cluster.start_worker()
    m = cluster.client
    server = cluster.server
    connect = ["--url", "127.0.0.1", "--client-port", str(server.client_port)]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(martinet_cmd(*args, *connect), capture_output=True, text=True, timeout=30)

    shown = cli("pause", "stamp")
    assert (shown.returncode, shown.stdout.strip()) == (0, "stamp paused; paused now: stamp"), shown.stderr
    assert m.pause("stamp") == {"name": "stamp", "paused": True, "changed": False, "names": ["stamp"]}
    held = [m.execute({"name": "stamp"}, {}) for _ in range(3)]
    rid = m.every("1 hour", {"name": "stamp"}, {})  # its first run is due now, and waits too
    assert m.wait(m.execute({"name": "echo"}, {}), timeout=15)["status"] == "succeeded", "other names run"
    wait_until(lambda: len(m.list(name="stamp")) == 4, what="the schedule's first run")
    assert all(t["status"] == "queued" and t["paused"] for t in m.list(name="stamp"))
    assert [r["paused"] for r in m.recurring() if r["id"] == rid] == [True]
    listed = cli("list", "--name", "stamp")
    assert listed.stdout.count("stamp (paused)") == 4, listed.stdout

    server.kill()
    server.restart()
    cluster.wait_worker(worker)
    assert m.status(held[0])["paused"] and m.status(held[0])["status"] == "queued", "the pause is in the database"

    async def resume() -> dict:
        async with aio.Martinet("127.0.0.1", server.client_port) as client:
            return await client.resume("stamp")

    assert asyncio.run(resume()) == {"name": "stamp", "paused": False, "changed": True, "names": []}
    ran = [m.wait(task["id"], timeout=15) for task in m.list(name="stamp")]
    assert [(t["status"], t["paused"]) for t in ran] == [("succeeded", False)] * 4
    assert [r["paused"] for r in m.recurring() if r["id"] == rid] == [False]
    with pytest.raises(InvalidRequest, match="'name' is required"):
        m.pause("  ")


def test_a_bad_limit_or_rate_stops_the_server_at_start_and_the_environment_sets_them(
    tmp_path: Path, sqlite_url: str
) -> None:
    bad = Server(sqlite_url, tmp_path / "bad.log", "--rate", "stamp=5/d")
    bad.start()
    wait_until(lambda: not bad.running(), what="the server to refuse to start")
    assert bad.proc.returncode == 2
    assert "cannot start: bad --rate 'stamp=5/d': expected KEY=N/s, KEY=N/m or KEY=N/h" in bad.log()
    good = Server(sqlite_url, tmp_path / "good.log")
    good.env = {"MARTINET_LIMIT": "stamp=2 mail=1", "MARTINET_RATE": "mail=3/m"}
    try:
        good.start_ready()
        assert "limits (running at once, starts per interval): mail: 1 running, 3/m; stamp: 2 running" in good.log()
    finally:
        good.terminate()

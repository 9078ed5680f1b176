"""Cron schedules, per-schedule zones and daylight saving, through real servers and a worker on each backend.

The dates that matter (a Wednesday's 09:00, the spring-forward gap, the fall-back hour) cannot be waited
for, so each server runs under the test clock (MARTINET_TEST_CLOCK, clock.py), the seam the scheduler and
the ``schedule`` and ``every`` requests read the time through: each phase restarts the server with its clock
just before the moment under test. The schedule is created once, in the first phase, so a phase that starts
late only fires late, on the planned time all the same. The server's zone is ``--tz Europe/Paris``.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Cluster, Server, print_if_failed, wait_until
from martinet_app.clock import ENV

UTC = datetime.UTC


def utc(iso: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(iso).astimezone(UTC)


@pytest.fixture
def paris(request: pytest.FixtureRequest, tmp_path: Path, db_url: str) -> Iterator[Cluster]:
    """A server under ``--tz Europe/Paris`` on each backend, started by the test (``at``), and a worker."""
    c = Cluster(tmp_path, db_url)
    c.server.args += ["--tz", "Europe/Paris"]
    try:
        yield c
    finally:
        c.stop()
        print_if_failed(request, c.logs)


def at(cluster: Cluster, instant: str) -> None:
    """(Re)start the cluster's server with its scheduling clock at ``instant``; a worker once it first runs."""
    server = cluster.server
    if server.running():
        assert server.terminate() == 0
    server.env = {ENV: instant}
    server.start().wait_ready()
    assert f"{ENV}={instant} is set: the scheduling clock started there" in server.log()
    if not cluster.workers:
        cluster.start_worker()


def runs(cluster: Cluster, rid: int, count: int) -> list[datetime.datetime]:
    """The planned times of the schedule's runs once there are ``count`` of them, each succeeded; no more."""

    def fired() -> list[dict] | None:
        found = [t for t in cluster.client.list(limit=100) if t["recurring_id"] == rid]
        return found if len(found) >= count and all(t["status"] == "succeeded" for t in found) else None

    found = wait_until(fired, what=f"{count} succeeded run(s) of schedule {rid}")
    assert len(found) == count, found
    return sorted(utc(t["run_at"]) for t in found)


def next_run(cluster: Cluster, rid: int) -> datetime.datetime:
    return utc(next(r for r in cluster.client.recurring() if r["id"] == rid)["next_run_at"])


def test_cron_fires_on_its_slots_in_its_own_zone_and_missed_slots_once(paris: Cluster) -> None:
    at(paris, "2026-06-10T08:00:00-04:00")  # a Wednesday, in New York
    rid = paris.client.every("0 9 * * MON-FRI", {"name": "echo"}, tz="America/New_York")
    [schedule] = paris.client.recurring()
    assert (schedule["interval"], schedule["tz"]) == ("0 9 * * mon-fri", "America/New_York")
    assert next_run(paris, rid) == utc("2026-06-10T09:00:00-04:00")  # not 09:00 in Paris, the server's zone

    at(paris, "2026-06-10T08:59:59-04:00")
    assert runs(paris, rid, 1) == [utc("2026-06-10T09:00:00-04:00")]
    assert next_run(paris, rid) == utc("2026-06-11T09:00:00-04:00")

    at(paris, "2026-06-13T12:00:00-04:00")  # Saturday: Thursday's and Friday's slots were missed
    assert runs(paris, rid, 2) == [utc("2026-06-10T09:00:00-04:00"), utc("2026-06-11T09:00:00-04:00")]
    assert next_run(paris, rid) == utc("2026-06-15T09:00:00-04:00")  # Monday, after the weekend


@pytest.mark.parametrize("spec, run_at", [("daily", "02:30"), ("30 2 * * *", None)], ids=["interval", "cron"])
def test_a_daily_run_in_the_spring_gap_runs_at_its_end_then_back_at_its_time(
    paris: Cluster, spec: str, run_at: str | None
) -> None:
    at(paris, "2026-03-28T12:00:00+01:00")  # the clocks jump from 02:00 CET to 03:00 CEST on the 29th
    rid = paris.client.every(spec, {"name": "echo", "run_at": run_at})
    assert next_run(paris, rid) == utc("2026-03-29T03:00:00+02:00")

    at(paris, "2026-03-29T01:59:59+01:00")
    assert runs(paris, rid, 1) == [utc("2026-03-29T03:00:00+02:00")]
    assert next_run(paris, rid) == utc("2026-03-30T02:30:00+02:00")

    at(paris, "2026-03-30T02:29:59+02:00")
    assert runs(paris, rid, 2) == [utc("2026-03-29T03:00:00+02:00"), utc("2026-03-30T02:30:00+02:00")]
    assert next_run(paris, rid) == utc("2026-03-31T02:30:00+02:00")


@pytest.mark.parametrize("spec, run_at", [("daily", "02:30"), ("30 2 * * *", None)], ids=["interval", "cron"])
def test_a_daily_run_in_the_fall_back_hour_runs_once(paris: Cluster, spec: str, run_at: str | None) -> None:
    at(paris, "2026-10-24T12:00:00+02:00")  # the clocks go back from 03:00 CEST to 02:00 CET on the 25th
    rid = paris.client.every(spec, {"name": "echo", "run_at": run_at})
    assert next_run(paris, rid) == utc("2026-10-25T02:30:00+02:00")

    at(paris, "2026-10-25T02:29:59+02:00")  # the first 02:30
    assert runs(paris, rid, 1) == [utc("2026-10-25T02:30:00+02:00")]
    assert next_run(paris, rid) == utc("2026-10-26T02:30:00+01:00")

    at(paris, "2026-10-25T02:29:58+01:00")  # an hour later the clocks show 02:30 again
    marker = paris.client.schedule("in 3 seconds", {"name": "echo"})
    assert utc(paris.client.status(marker)["run_at"]) > utc("2026-10-25T02:30:00+01:00")
    wait_until(lambda: paris.client.status(marker)["status"] == "succeeded", what="the second 02:30 to pass")
    assert runs(paris, rid, 1) == [utc("2026-10-25T02:30:00+02:00")]
    assert next_run(paris, rid) == utc("2026-10-26T02:30:00+01:00")


@pytest.mark.parametrize("value", ["yesterday", "2026-03-29T01:59:59", "1700000000"])
def test_a_test_clock_that_is_not_an_instant_stops_the_start(tmp_path: Path, sqlite_url: str, value: str) -> None:
    server = Server(sqlite_url, tmp_path / "server.log")
    server.env = {ENV: value}
    server.start()
    try:
        assert server.proc.wait(timeout=20) == 2
    finally:
        server.terminate()
    assert f"{ENV}={value!r} is not an ISO 8601 instant with its offset" in server.log()


def test_without_the_test_clock_the_server_says_nothing_of_it(sqlite_cluster: Cluster) -> None:
    assert "serving as" in sqlite_cluster.server.log() and ENV not in sqlite_cluster.server.log()

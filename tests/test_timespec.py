"""Tests for martinet_app.timespec: one-off times, intervals and zones, all with a fixed ``now``."""

from __future__ import annotations

import datetime
import re
import time
from zoneinfo import ZoneInfo

import pytest

from martinet_app.errors import BadTimeSpec, ConfigError, InvalidRequest
from martinet_app.timespec import Cron, Interval, next_run, parse_interval, parse_tz, parse_when, parse_zone

UTC = datetime.UTC
PARIS = ZoneInfo("Europe/Paris")
NOW = datetime.datetime(2026, 6, 10, 14, 0, tzinfo=UTC)  # a Wednesday; 16:00 in Paris


def at(*args: int, tz: datetime.tzinfo = UTC) -> datetime.datetime:
    """An aware datetime in UTC for the wall time ``args`` in ``tz``."""
    return datetime.datetime(*args, tzinfo=tz).astimezone(UTC)


# --- parse_when ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("now", NOW),
        ("in 20 minutes", NOW + datetime.timedelta(minutes=20)),
        ("20 minutes", NOW + datetime.timedelta(minutes=20)),
        ("  IN   20\tMinutes ", NOW + datetime.timedelta(minutes=20)),
        ("in 1.5 hours", NOW + datetime.timedelta(minutes=90)),
        ("in 0 minutes", NOW),
        ("in 2 days", NOW + datetime.timedelta(days=2)),
        ("in 1 hour and 30 minutes", NOW + datetime.timedelta(minutes=90)),
        ("in 1h 30m", NOW + datetime.timedelta(minutes=90)),
        ("1h30m", NOW + datetime.timedelta(minutes=90)),
        ("in 1 hour, 30 minutes, 15 s", NOW + datetime.timedelta(minutes=90, seconds=15)),
        # time of day: later today, or tomorrow when already past or exactly now
        ("15:00", at(2026, 6, 10, 15)),
        ("14:00:01", at(2026, 6, 10, 14, 0, 1)),
        ("14:00", at(2026, 6, 11, 14)),
        ("13:59:59", at(2026, 6, 11, 13, 59, 59)),
        ("9:05", at(2026, 6, 11, 9, 5)),
        ("midnight", at(2026, 6, 11)),
        ("noon", at(2026, 6, 11, 12)),
        ("5pm", at(2026, 6, 10, 17)),
        ("5 PM", at(2026, 6, 10, 17)),
        ("5:30am", at(2026, 6, 11, 5, 30)),
        ("11:45 pm", at(2026, 6, 10, 23, 45)),
        ("12am", at(2026, 6, 11, 0)),
        ("12pm", at(2026, 6, 11, 12)),
        ("12:30pm", at(2026, 6, 11, 12, 30)),
        # tomorrow
        ("tomorrow", at(2026, 6, 11)),
        ("tomorrow at 9am", at(2026, 6, 11, 9)),
        ("Tomorrow 09:30", at(2026, 6, 11, 9, 30)),
        ("tomorrow at noon", at(2026, 6, 11, 12)),
        # weekdays (NOW is Wednesday 14:00)
        ("thursday", at(2026, 6, 11)),
        ("thu at 8:15", at(2026, 6, 11, 8, 15)),
        ("wed at 15:00", at(2026, 6, 10, 15)),
        ("wednesday at 14:00", at(2026, 6, 17, 14)),
        ("wednesday", at(2026, 6, 17)),
        ("Monday", at(2026, 6, 15)),
        ("tue 9pm", at(2026, 6, 16, 21)),
        ("sun at midnight", at(2026, 6, 14)),
        # ISO 8601: naive means tz (here UTC); past ones are allowed
        ("2026-12-01T09:00:00", at(2026, 12, 1, 9)),
        ("2026-12-01 09:00", at(2026, 12, 1, 9)),
        ("2026-12-01T09:00:00+02:00", at(2026, 12, 1, 7)),
        ("2026-12-01T09:00Z", at(2026, 12, 1, 9)),
        ("2026-12-01", at(2026, 12, 1)),
        ("2020-01-01T00:00:00Z", at(2020, 1, 1)),
    ],
)
def test_parse_when_utc(text: str, expected: datetime.datetime) -> None:
    result = parse_when(text, now=NOW, tz=UTC)
    assert result == expected
    assert result.tzinfo is UTC


@pytest.mark.parametrize(
    "alias, seconds",
    [(a, 1) for a in ("s", "sec", "secs", "second", "seconds")]
    + [(a, 60) for a in ("m", "min", "mins", "minute", "minutes")]
    + [(a, 3600) for a in ("h", "hr", "hrs", "hour", "hours")]
    + [(a, 86400) for a in ("d", "day", "days")]
    + [(a, 604800) for a in ("w", "wk", "wks", "week", "weeks")],
)
def test_parse_when_unit_aliases(alias: str, seconds: int) -> None:
    assert parse_when(f"in 2 {alias}", now=NOW, tz=UTC) == NOW + datetime.timedelta(seconds=2 * seconds)
    assert parse_when(f"2{alias}", now=NOW, tz=UTC) == NOW + datetime.timedelta(seconds=2 * seconds)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("17:00", at(2026, 6, 10, 17, tz=PARIS)),  # 16:00 in Paris: still ahead today
        ("15:00", at(2026, 6, 11, 15, tz=PARIS)),
        ("tomorrow", at(2026, 6, 11, tz=PARIS)),
        ("2026-12-01T09:00:00", at(2026, 12, 1, 8)),  # CET, UTC+1
        ("2026-07-01 09:00", at(2026, 7, 1, 7)),  # CEST, UTC+2
        ("2026-12-01", at(2026, 11, 30, 23)),
        ("2026-12-01T09:00:00+02:00", at(2026, 12, 1, 7)),
    ],
)
def test_parse_when_in_zone(text: str, expected: datetime.datetime) -> None:
    assert parse_when(text, now=NOW, tz=PARIS) == expected
    # `now` may be given in any zone
    assert parse_when(text, now=NOW.astimezone(ZoneInfo("America/New_York")), tz=PARIS) == expected


@pytest.mark.parametrize(
    "now, text, expected",
    [
        # 2026-03-29 02:00 CET -> 03:00 CEST: a wall time in the gap means the first valid time, 03:00 CEST
        (at(2026, 3, 28, 12), "tomorrow at 02:30", at(2026, 3, 29, 3, 0, tz=PARIS)),
        (at(2026, 3, 28, 12), "tomorrow at 02:00", at(2026, 3, 29, 1)),
        (at(2026, 3, 28, 12), "tomorrow at 01:59:59", at(2026, 3, 29, 0, 59, 59)),
        (at(2026, 3, 28, 12), "tomorrow at 09:00", at(2026, 3, 29, 7)),
        (at(2026, 3, 28, 12), "2026-03-29T02:30", at(2026, 3, 29, 1)),
        (at(2026, 3, 29, 0, 30), "02:30", at(2026, 3, 29, 1)),
        (at(2026, 3, 29, 1), "02:30", at(2026, 3, 30, 0, 30)),  # the gap's end has come: tomorrow's 02:30 CEST
        # 2026-10-25 03:00 CEST -> 02:00 CET: an ambiguous wall time means its first occurrence
        (at(2026, 10, 24, 12), "tomorrow at 02:30", at(2026, 10, 25, 0, 30)),
        (at(2026, 10, 24, 12), "tomorrow at 09:00", at(2026, 10, 25, 8)),
        # a duration is elapsed time, not wall-clock time
        (at(2026, 3, 28, 12), "in 1 day", at(2026, 3, 29, 12)),
    ],
)
def test_parse_when_dst(now: datetime.datetime, text: str, expected: datetime.datetime) -> None:
    assert parse_when(text, now=now, tz=PARIS) == expected


@pytest.mark.parametrize(
    "text",
    [
        "in 20 minuts",
        "",
        "   ",
        "tomorow",
        "25:00",
        "24:00",
        "13pm",
        "0am",
        "12:60",
        "9:00:60",
        "in -5 minutes",
        "-5 minutes",
        "in 5",
        "in minutes",
        "in 1 hour and",
        "in",
        "now please",
        "someday",
        "next monday",
        "monday at lunch",
        "tomorrow at 25:00",
        "tomorrow at",
        "5 am 6",
        "2026-13-01",
        "2026-12-01T25:00",
        "in 99999999999 weeks",
        "in 1.5.2 hours",
        "9.30",
        None,
        123,
        1.5,
        ["in 5 minutes"],
    ],
)
def test_parse_when_rejects(text: object) -> None:
    with pytest.raises(BadTimeSpec) as info:
        parse_when(text, now=NOW, tz=UTC)  # type: ignore[arg-type]
    assert isinstance(info.value, InvalidRequest)
    assert f"bad time {text!r}:" in info.value.message
    assert "'HH:MM[:SS]'" in info.value.message and "units: seconds, minutes" in info.value.message


@pytest.mark.parametrize(
    "text, reason",
    [("in 20 minuts", "unknown unit 'minuts'"), ("25:00", "hour 25"), ("13pm", "hour 13"), ("", "empty")],
)
def test_parse_when_rejection_reason(text: str, reason: str) -> None:
    with pytest.raises(BadTimeSpec, match=reason):
        parse_when(text, now=NOW, tz=UTC)


def test_parse_when_needs_aware_now() -> None:
    with pytest.raises(ValueError):
        parse_when("now", now=datetime.datetime(2026, 1, 1), tz=UTC)


# --- parse_tz -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["UTC", "Europe/Paris", "America/New_York"])
def test_parse_tz_names(name: str) -> None:
    assert parse_tz(name) == ZoneInfo(name)


@pytest.mark.parametrize("name", [None, ""])
def test_parse_tz_local(name: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TZ", raising=False)
    tz = parse_tz(name)
    instant = datetime.datetime.now(UTC)
    assert instant.astimezone(tz).utcoffset() == instant.astimezone().utcoffset()


def test_parse_tz_local_follows_tz_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Paris")
    tz = parse_tz(None)
    assert datetime.datetime(2026, 1, 1, tzinfo=tz).utcoffset() == datetime.timedelta(hours=1)
    assert datetime.datetime(2026, 7, 1, tzinfo=tz).utcoffset() == datetime.timedelta(hours=2)


@pytest.mark.parametrize("name", ["Nowhere/Land", "Europe", "../etc/passwd", "CEST"])
def test_parse_tz_unknown(name: str) -> None:
    with pytest.raises(ConfigError, match=repr(name).replace(".", r"\.")):
        parse_tz(name)


# --- parse_interval -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "texts, expected",
    [
        (["30 minutes", "every 30 minutes", "30m", "30 mins", "0.5 hours", "1800 s"], Interval("30 minutes", 1800)),
        (
            ["1 hour and 30 minutes", "1h30m", "1 hour, 30 minutes", "90 min", "1.5 hours", "every 1h 30m"],
            Interval("1 hour 30 minutes", 5400),
        ),
        (["second", "1 second", "1s"], Interval("1 second", 1)),
        (["2.5 seconds"], Interval("2.5 seconds", 2.5)),
        (["minute", "every minute"], Interval("1 minute", 60)),
        (["hour", "hourly", "60 minutes"], Interval("1 hour", 3600)),
        (["24 hours"], Interval("24 hours", 86400)),  # hours are elapsed time, not calendar days
        (["1 day 12 hours", "1.5 days"], Interval("36 hours", 129600)),
        (["1 day, 1 second"], Interval("24 hours 1 second", 86401)),
        (["day", "daily", "every day", "1 day", "1d"], Interval("1 day", days=1)),
        (["3 days", "every 3 days"], Interval("3 days", days=3)),
        (["week", "weekly", "1 week", "7 days"], Interval("1 week", days=7)),
        (["2 weeks", "14 days", "1 week and 7 days"], Interval("2 weeks", days=14)),
        (["1 week 2 days", "9 d"], Interval("9 days", days=9)),
        (["0.5 weeks 0.5 days"], Interval("4 days", days=4)),
        (["monday", "Mon", "every monday"], Interval("monday", days=7, weekday=0)),
        (["sun", "SUNDAY"], Interval("sunday", days=7, weekday=6)),
    ],
)
def test_parse_interval(texts: list[str], expected: Interval) -> None:
    for text in texts:
        interval = parse_interval(text)
        assert interval == expected, text
        assert parse_interval(interval.text) == interval


@pytest.mark.parametrize(
    "text",
    [
        "0 minutes",
        "0 days",
        "-5 minutes",
        "0.5 seconds",
        "30 minuts",
        "every",
        "",
        "  ",
        "fortnight",
        "in 5 minutes",
        "every 5",
        "minutes",
        "monday at 9am",
        "36526 days",
        "99999999 weeks",
        "1 hour and",
        None,
        30,
    ],
)
def test_parse_interval_rejects(text: object) -> None:
    with pytest.raises(BadTimeSpec) as info:
        parse_interval(text)  # type: ignore[arg-type]
    assert f"bad interval {text!r}:" in info.value.message
    assert "'daily'" in info.value.message and "units: seconds, minutes" in info.value.message


# --- Interval.first_run -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, run_at, tz, expected",
    [
        ("30 minutes", None, UTC, NOW),
        ("day", None, PARIS, NOW),
        ("30 minutes", "in 5 minutes", UTC, NOW + datetime.timedelta(minutes=5)),
        ("day", "09:00", PARIS, at(2026, 6, 11, 9, tz=PARIS)),
        ("2 weeks", "2026-12-01T09:00", PARIS, at(2026, 12, 1, 9, tz=PARIS)),
        ("day", "2020-01-01T09:00Z", UTC, at(2020, 1, 1, 9)),  # in the past: due now
        ("monday", None, PARIS, at(2026, 6, 15, tz=PARIS)),
        ("wednesday", None, PARIS, at(2026, 6, 17, tz=PARIS)),  # today's 00:00 has passed
        ("monday", "9am", PARIS, at(2026, 6, 15, 9, tz=PARIS)),
        ("wed", "17:00", PARIS, at(2026, 6, 10, 17, tz=PARIS)),  # today, still ahead
        ("wed", "16:00", PARIS, at(2026, 6, 17, 16, tz=PARIS)),  # exactly now: next week
        ("friday", "noon", UTC, at(2026, 6, 12, 12)),
        ("friday", "midnight", UTC, at(2026, 6, 12)),
    ],
)
def test_first_run(spec: str, run_at: str | None, tz: datetime.tzinfo, expected: datetime.datetime) -> None:
    result = parse_interval(spec).first_run(now=NOW, run_at=run_at, tz=tz)
    assert result == expected
    assert result.tzinfo is UTC


@pytest.mark.parametrize("run_at", ["in 5 minutes", "tomorrow", "monday at 9am", "2026-12-01T09:00", "now", "", 9])
def test_first_run_weekday_needs_time_of_day(run_at: object) -> None:
    with pytest.raises(BadTimeSpec) as info:
        parse_interval("monday").first_run(now=NOW, run_at=run_at, tz=UTC)  # type: ignore[arg-type]
    assert f"run_at {run_at!r}" in info.value.message and "time of day" in info.value.message


@pytest.mark.parametrize("run_at", ["25:00", "in 5 minuts"])
def test_first_run_bad_run_at(run_at: str) -> None:
    with pytest.raises(BadTimeSpec, match=repr(run_at)):
        parse_interval("1 hour").first_run(now=NOW, run_at=run_at, tz=UTC)
    with pytest.raises(BadTimeSpec, match=repr(run_at)):
        parse_interval("tuesday").first_run(now=NOW, run_at=run_at, tz=UTC)


# --- Interval.next_after ------------------------------------------------------------------------------------------

PLANNED = at(2026, 6, 10, 9)


@pytest.mark.parametrize(
    "spec, now, expected",
    [
        ("1 hour", PLANNED, at(2026, 6, 10, 10)),  # just fired
        ("1 hour", at(2026, 6, 10, 9, 0, 7), at(2026, 6, 10, 10)),  # fired late: no drift
        ("1 hour", at(2026, 6, 10, 12, 30), at(2026, 6, 10, 13)),  # missed runs skipped
        ("1 hour", at(2026, 6, 10, 13), at(2026, 6, 10, 14)),  # strictly after now
        ("1 hour", at(2026, 6, 10, 8), at(2026, 6, 10, 10)),  # k >= 1 even if now < planned
        ("1h30m", at(2026, 6, 10, 13), at(2026, 6, 10, 13, 30)),
        ("2.5 seconds", at(2026, 6, 10, 9, 0, 6), at(2026, 6, 10, 9, 0, 7, 500000)),
        ("day", at(2026, 6, 10, 9, 0, 3), at(2026, 6, 11, 9)),
        ("day", at(2026, 6, 20, 8, 59), at(2026, 6, 20, 9)),
        ("day", at(2026, 6, 20, 9), at(2026, 6, 21, 9)),
        ("3 days", at(2026, 6, 20, 12), at(2026, 6, 22, 9)),
        ("2 weeks", at(2026, 6, 10, 9, 1), at(2026, 6, 24, 9)),
        ("wednesday", at(2026, 7, 1, 9), at(2026, 7, 8, 9)),
    ],
)
def test_next_after(spec: str, now: datetime.datetime, expected: datetime.datetime) -> None:
    result = parse_interval(spec).next_after(PLANNED, now=now, tz=UTC)
    assert result == expected
    assert result.tzinfo is UTC


@pytest.mark.parametrize(
    "first, days",
    [
        (at(2026, 3, 25, 9, tz=PARIS), range(25, 32)),  # across 2026-03-29 (spring forward)
        (at(2026, 10, 21, 9, tz=PARIS), range(21, 29)),  # across 2026-10-25 (fall back)
    ],
)
def test_next_after_daily_keeps_wall_time_across_dst(first: datetime.datetime, days: range) -> None:
    interval, planned = parse_interval("every day"), first
    runs = [planned]
    for _ in days[1:]:
        planned = interval.next_after(planned, now=planned, tz=PARIS)
        runs.append(planned)
    local = [run.astimezone(PARIS) for run in runs]
    assert [(t.day, t.hour, t.minute) for t in local] == [(d, 9, 0) for d in days]
    assert len({run.astimezone(PARIS).utcoffset() for run in runs}) == 2  # the offset did change


def test_first_run_then_next_after_across_spring_forward() -> None:
    interval = parse_interval("daily")
    first = interval.first_run(now=at(2026, 3, 28, 12), run_at="09:00", tz=PARIS)
    assert first == at(2026, 3, 29, 7)  # 09:00 CEST
    assert interval.next_after(first, now=first, tz=PARIS) == at(2026, 3, 30, 7)


def test_next_after_weekday_across_dst() -> None:
    monday = parse_interval("monday")
    planned = monday.first_run(now=at(2026, 3, 20), run_at="09:00", tz=PARIS)
    assert planned == at(2026, 3, 23, 9, tz=PARIS)
    assert monday.next_after(planned, now=planned, tz=PARIS) == at(2026, 3, 30, 9, tz=PARIS)


def test_next_after_fixed_ignores_wall_clock() -> None:
    hourly = parse_interval("1 hour")
    assert hourly.next_after(at(2026, 3, 29, 0, 30), now=at(2026, 3, 29, 0, 30), tz=PARIS) == at(2026, 3, 29, 1, 30)


def test_next_after_skips_missed_calendar_runs_in_zone() -> None:
    daily, planned = parse_interval("day"), at(2026, 1, 5, 9, tz=PARIS)
    assert daily.next_after(planned, now=at(2026, 6, 10, 12), tz=PARIS) == at(2026, 6, 11, 9, tz=PARIS)
    assert daily.next_after(planned, now=at(2026, 6, 10, 6, 59), tz=PARIS) == at(2026, 6, 10, 9, tz=PARIS)
    assert daily.next_after(planned, now=at(2026, 6, 10, 7), tz=PARIS) == at(2026, 6, 11, 9, tz=PARIS)


@pytest.mark.parametrize(
    "spec, expected",
    [("1 second", NOW + datetime.timedelta(seconds=1)), ("day", at(2026, 6, 11, 9, 0, 0, 123456, tz=PARIS))],
)
def test_next_after_planned_years_ago_is_fast(spec: str, expected: datetime.datetime) -> None:
    planned = at(2000, 1, 1, 9, 0, 0, 123456, tz=PARIS) if spec == "day" else at(2000, 1, 1)
    start = time.perf_counter()
    result = parse_interval(spec).next_after(planned, now=NOW, tz=PARIS)
    assert time.perf_counter() - start < 0.05
    assert result == expected


# --- daylight saving: the gap (spring forward) and the repeated hour (fall back) ----------------------------------

SYDNEY = ZoneInfo("Australia/Sydney")  # 2026-10-04 02:00 AEST -> 03:00 AEDT; 2026-04-05 03:00 AEDT -> 02:00 AEST
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")  # half-hour DST: 2026-10-04 02:00 -> 02:30


def plan(spec: str, run_at: str | None, created: datetime.datetime, tz: ZoneInfo, runs: int) -> list[str]:
    """The first ``runs`` runs of a schedule as the server plans them (first_run, then next_run as the scheduler
    calls it when each run fires on time), as local wall times with their UTC offset."""
    planned = parse_interval(spec).first_run(now=created, run_at=run_at, tz=tz)
    out = [planned]
    for _ in range(runs - 1):
        planned = next_run(spec, planned=planned, now=planned, tz=tz, run_at=run_at, created=created)
        out.append(planned)
    return [run.astimezone(tz).strftime("%m-%d %H:%M%z") for run in out]


@pytest.mark.parametrize("spec, run_at", [("daily", "02:30"), ("30 2 * * *", None), ("daily", "tomorrow at 02:30")])
def test_a_daily_run_in_the_gap_runs_at_its_end_then_back_at_its_own_time(spec: str, run_at: str | None) -> None:
    assert plan(spec, run_at, at(2026, 3, 28, 12), PARIS, 3) == [
        "03-29 03:00+0200",
        "03-30 02:30+0200",
        "03-31 02:30+0200",
    ]


@pytest.mark.parametrize("spec, run_at", [("daily", "02:30"), ("30 2 * * *", None)])
def test_a_daily_run_across_the_gap_from_before_and_after_it(spec: str, run_at: str | None) -> None:
    # into the gap from the days before it, and out of it on the days after, in both hemispheres
    assert plan(spec, run_at, at(2026, 3, 26, 12), PARIS, 5) == [
        "03-27 02:30+0100", "03-28 02:30+0100", "03-29 03:00+0200", "03-30 02:30+0200", "03-31 02:30+0200"
    ]  # fmt: skip
    assert plan(spec, run_at, at(2026, 10, 1, 12, tz=SYDNEY), SYDNEY, 5) == [
        "10-02 02:30+1000", "10-03 02:30+1000", "10-04 03:00+1100", "10-05 02:30+1100", "10-06 02:30+1100"
    ]  # fmt: skip


def test_a_half_hour_gap_ends_at_the_half_hour() -> None:
    assert plan("daily", "02:10", at(2026, 10, 3, 12, tz=LORD_HOWE), LORD_HOWE, 2) == [
        "10-04 02:30+1100", "10-05 02:10+1100"
    ]  # fmt: skip


def test_a_weekly_run_in_the_gap_is_back_at_its_time_the_week_after() -> None:
    assert plan("sunday", "02:15", at(2026, 3, 25, 12), PARIS, 3) == [
        "03-29 03:00+0200",
        "04-05 02:15+0200",
        "04-12 02:15+0200",
    ]


def test_a_daily_run_created_without_run_at_keeps_its_creation_time() -> None:
    created = at(2026, 3, 27, 2, 30, tz=PARIS)  # daily from now: 02:30, which the gap of the 29th skips
    assert plan("daily", None, created, PARIS, 4) == [
        "03-27 02:30+0100", "03-28 02:30+0100", "03-29 03:00+0200", "03-30 02:30+0200"
    ]  # fmt: skip


@pytest.mark.parametrize("spec, run_at", [("daily", "02:30"), ("30 2 * * *", None)])
def test_a_daily_run_in_the_fall_back_hour_runs_once(spec: str, run_at: str | None) -> None:
    assert plan(spec, run_at, at(2026, 10, 23, 12), PARIS, 4) == [
        "10-24 02:30+0200", "10-25 02:30+0200", "10-26 02:30+0100", "10-27 02:30+0100"
    ]  # fmt: skip
    assert plan(spec, run_at, at(2026, 4, 3, 12, tz=SYDNEY), SYDNEY, 3) == [
        "04-04 02:30+1100", "04-05 02:30+1100", "04-06 02:30+1000"
    ]  # fmt: skip


@pytest.mark.parametrize("spec, run_at", [("daily", "02:30"), ("30 2 * * *", None)])
def test_the_second_pass_of_the_fall_back_hour_does_not_fire_again(spec: str, run_at: str | None) -> None:
    fired = at(2026, 10, 25, 2, 30, tz=PARIS)  # 00:30 UTC, its first occurrence
    second_pass = at(2026, 10, 25, 1, 30)  # the clocks show 02:30 again, CET
    for now in (fired, second_pass, second_pass + datetime.timedelta(minutes=1)):
        following = next_run(spec, planned=fired, now=now, tz=PARIS, run_at=run_at, created=at(2026, 10, 20))
        assert following == at(2026, 10, 26, 2, 30, tz=PARIS)


def test_a_cron_step_through_the_repeated_hour_fires_each_wall_time_once() -> None:
    assert plan("*/30 * * * *", None, at(2026, 10, 25, 1, 45, tz=PARIS), PARIS, 6) == [
        "10-25 02:00+0200", "10-25 02:30+0200", "10-25 03:00+0100", "10-25 03:30+0100", "10-25 04:00+0100",
        "10-25 04:30+0100",
    ]  # fmt: skip


def test_cron_slots_in_the_gap_fire_once_at_its_end() -> None:
    assert plan("*/20 * * * *", None, at(2026, 3, 29, 1, 30, tz=PARIS), PARIS, 4) == [
        "03-29 01:40+0100", "03-29 03:00+0200", "03-29 03:20+0200", "03-29 03:40+0200"
    ]  # fmt: skip


def test_fixed_intervals_are_elapsed_time_across_the_gap() -> None:
    assert plan("1 hour", "01:30", at(2026, 3, 28, 12), PARIS, 3) == [
        "03-29 01:30+0100",
        "03-29 03:30+0200",
        "03-29 04:30+0200",
    ]


def test_next_run_skips_missed_runs_and_keeps_the_meant_time() -> None:
    planned = at(2026, 3, 29, 1)  # the gap's end, where the 02:30 of the 29th ran
    created = at(2026, 3, 28, 12)
    following = next_run("1 day", planned=planned, now=at(2026, 4, 2, 12), tz=PARIS, run_at="02:30", created=created)
    assert following == at(2026, 4, 3, 2, 30, tz=PARIS)


# --- cron expressions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "texts, text",
    [
        (["*/15 * * * *", "  */15  *\t* * * "], "*/15 * * * *"),
        (["0 9 * * MON-FRI", "0 9 * * mon-fri"], "0 9 * * mon-fri"),
        (["@hourly", "@HOURLY"], "@hourly"),
        (["@daily"], "@daily"),
        (["@weekly"], "@weekly"),
        (["0 0 1 jan,jul *"], "0 0 1 jan,jul *"),
        (["0 0 l * *"], "0 0 l * *"),  # croniter's last day of the month
    ],
)
def test_parse_cron(texts: list[str], text: str) -> None:
    for given in texts:
        assert parse_interval(given) == Cron(text)
    assert parse_interval(text) == Cron(text)


def test_words_are_intervals_and_macros_are_cron() -> None:
    assert parse_interval("hourly") == Interval("1 hour", 3600)
    assert parse_interval("daily") == Interval("1 day", days=1)
    assert parse_interval("weekly") == Interval("1 week", days=7)
    # an interval is anchored at its first run; a macro at the hour, midnight, Sunday midnight
    assert parse_interval("hourly").first_run(now=NOW + datetime.timedelta(minutes=7), run_at=None, tz=UTC) == at(
        2026, 6, 10, 14, 7
    )
    assert parse_interval("@hourly").first_run(now=NOW + datetime.timedelta(minutes=7), run_at=None, tz=UTC) == at(
        2026, 6, 10, 15
    )


@pytest.mark.parametrize(
    "spec, tz, slots",
    [
        ("*/15 * * * *", UTC, ["06-10 14:00", "06-10 14:15", "06-10 14:30", "06-10 14:45", "06-10 15:00"]),
        ("0 9 * * mon-fri", PARIS, ["06-11 09:00", "06-12 09:00", "06-15 09:00", "06-16 09:00", "06-17 09:00"]),
        ("30 8 1,15 * *", UTC, ["06-15 08:30", "07-01 08:30", "07-15 08:30", "08-01 08:30", "08-15 08:30"]),
        ("@hourly", UTC, ["06-10 14:00", "06-10 15:00", "06-10 16:00", "06-10 17:00", "06-10 18:00"]),
        ("@daily", PARIS, ["06-11 00:00", "06-12 00:00", "06-13 00:00", "06-14 00:00", "06-15 00:00"]),
        ("@weekly", UTC, ["06-14 00:00", "06-21 00:00", "06-28 00:00", "07-05 00:00", "07-12 00:00"]),
        ("0 12 * * 7", UTC, ["06-14 12:00", "06-21 12:00", "06-28 12:00", "07-05 12:00", "07-12 12:00"]),
    ],
)
def test_cron_slot_sequences(spec: str, tz: ZoneInfo, slots: list[str]) -> None:
    # NOW is Wednesday 2026-06-10 14:00 UTC, 16:00 in Paris; a slot at now is the first run
    assert [s[:11] for s in plan(spec, None, NOW, tz, 5)] == slots


def test_cron_first_run_is_the_first_slot_at_or_after_run_at() -> None:
    cron = parse_interval("0 9 * * mon-fri")
    assert cron.first_run(now=NOW, run_at="2026-07-01", tz=UTC) == at(2026, 7, 1, 9)
    assert cron.first_run(now=NOW, run_at="2026-07-01T09:00", tz=UTC) == at(2026, 7, 1, 9)
    assert cron.first_run(now=NOW, run_at="2026-07-04T12:00", tz=UTC) == at(2026, 7, 6, 9)  # a Saturday
    assert cron.first_run(now=NOW, run_at="2020-01-01", tz=UTC) == at(2020, 1, 1, 9)  # in the past: due now


def test_cron_next_after_skips_missed_slots_without_drift() -> None:
    cron = parse_interval("*/15 * * * *")
    planned = at(2026, 6, 10, 9)
    assert cron.next_after(planned, now=planned, tz=UTC) == at(2026, 6, 10, 9, 15)
    assert cron.next_after(planned, now=at(2026, 6, 10, 9, 0, 7), tz=UTC) == at(2026, 6, 10, 9, 15)  # fired late
    assert cron.next_after(planned, now=at(2026, 6, 10, 12, 31), tz=UTC) == at(2026, 6, 10, 12, 45)  # missed
    assert cron.next_after(planned, now=at(2026, 6, 10, 12, 45), tz=UTC) == at(2026, 6, 10, 13)  # strictly after
    assert cron.next_after(planned, now=at(2026, 6, 10, 8), tz=UTC) == at(2026, 6, 10, 9, 15)  # after planned too


def test_cron_zone_moves_the_slots() -> None:
    cron = parse_interval("0 9 * * *")
    assert cron.first_run(now=NOW, run_at=None, tz=ZoneInfo("America/New_York")) == at(2026, 6, 11, 13)
    assert cron.first_run(now=NOW, run_at=None, tz=ZoneInfo("Asia/Tokyo")) == at(2026, 6, 11, 0)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("61 * * * *", "out of range"),
        ("0 25 * * *", "out of range"),
        ("0 9 32 * *", "out of range"),
        ("0 9 * 13 *", "out of range"),
        ("0 9 * * 8", "out of range"),
        ("*/0 * * * *", "step '0'"),
        ("0 9 * * xyz", "not acceptable"),
        ("* * * *", "it has 4 field(s)"),
        ("0 * * * * *", "it has 6 field(s) (seconds and years are not supported)"),
        ("0 0 1 1 * 2030 x", "it has 7 field(s)"),
        ("@reboot", "unknown macro '@reboot'"),
        ("@every 5m", "unknown macro '@every 5m'"),
        ("h * * * *", "hashed (H) and random (R) values are not supported"),
        ("0 9 ** * *", "not acceptable"),
    ],
)
def test_bad_cron_expressions_are_quoted(text: str, reason: str) -> None:
    with pytest.raises(BadTimeSpec) as info:
        parse_interval(text)
    assert isinstance(info.value, InvalidRequest)
    assert info.value.message.startswith(f"bad cron expression {text!r}: ")
    assert reason in info.value.message
    assert "'0 9 * * mon-fri'" in info.value.message and "@daily" in info.value.message


@pytest.mark.parametrize("text", ["0 0 31 2 *", "0 0 30 2 *"])
def test_a_cron_expression_naming_no_date_is_refused_at_its_first_run(text: str) -> None:
    cron = parse_interval(text)
    with pytest.raises(BadTimeSpec, match=rf"bad cron expression {re.escape(repr(text))}: it names no time"):
        cron.first_run(now=NOW, run_at=None, tz=UTC)


def test_a_bad_interval_mentions_cron_too() -> None:
    with pytest.raises(BadTimeSpec) as info:
        parse_interval("every fortnight")
    assert info.value.message.startswith("bad interval 'every fortnight': ")
    assert "cron expression ('*/15 * * * *'" in info.value.message


# --- parse_zone: a schedule's own zone ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Etc/GMT+5"])
def test_parse_zone_names(name: str) -> None:
    assert parse_zone(name) == ZoneInfo(name)
    assert parse_zone(name).key == name


@pytest.mark.parametrize(
    "name",
    ["Europe/Pariss", "Nowhere/Land", "Europe", "europe/paris", "CEST", "localtime", "../etc/passwd", "", " UTC"],
)
def test_parse_zone_refuses_what_is_not_an_iana_name(name: str) -> None:
    with pytest.raises(BadTimeSpec) as info:
        parse_zone(name)
    assert isinstance(info.value, InvalidRequest)
    assert info.value.message.startswith(f"unknown time zone {name!r}: expected an IANA name such as 'UTC'")
    assert "leave tz out for the server's" in info.value.message


def test_parse_tz_refuses_localtime_too() -> None:
    with pytest.raises(ConfigError, match="'localtime'"):
        parse_tz("localtime")

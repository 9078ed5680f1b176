"""Tests for martinet_app.timespec: one-off times, intervals and zones, all with a fixed ``now``."""

from __future__ import annotations

import datetime
import time
from zoneinfo import ZoneInfo

import pytest

from martinet_app.errors import BadTimeSpec, ConfigError, InvalidRequest
from martinet_app.timespec import Interval, parse_interval, parse_tz, parse_when

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
        # 2026-03-29 02:00 CET -> 03:00 CEST: a wall time in the gap moves forward by the gap
        (at(2026, 3, 28, 12), "tomorrow at 02:30", at(2026, 3, 29, 3, 30, tz=PARIS)),
        (at(2026, 3, 28, 12), "tomorrow at 09:00", at(2026, 3, 29, 7)),
        (at(2026, 3, 28, 12), "2026-03-29T02:30", at(2026, 3, 29, 1, 30)),
        (at(2026, 3, 29, 0, 30), "02:30", at(2026, 3, 29, 1, 30)),
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

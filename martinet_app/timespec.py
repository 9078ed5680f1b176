"""Time strings for one-off runs (``parse_when``), recurring intervals (``parse_interval``) and zones (``parse_tz``).

Every function takes ``now`` explicitly and returns aware UTC datetimes, so it is pure and testable.

Wall-clock times are resolved in the configured zone with zoneinfo's ``fold=0`` semantics, normalised
by a round trip through UTC: an ambiguous time (autumn fall-back) means its first occurrence, and a time
that does not exist (spring-forward gap) is moved forward by the gap, e.g. 02:30 on 2026-03-29 in
Europe/Paris becomes 03:30 CEST. A calendar interval steps the wall-clock time of the previous planned
run, so a daily run resolved out of a gap keeps that later time afterwards: the intended wall time
is not recoverable from the planned instant alone.

The ``schedule`` package is not used: it computes next runs only from ``datetime.now()`` as naive local
times (its zone support needs pytz) and cannot anchor a run to a stored planned time, and its ``at()``
check accepts only a subset of the time-of-day forms parsed here.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import BadTimeSpec, ConfigError

UTC = datetime.UTC

_UNIT_NAMES = ("seconds", "minutes", "hours", "days", "weeks")
_UNIT_SECONDS = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400, "weeks": 604800}
_UNIT_ALIASES = {
    alias: unit
    for unit, aliases in {
        "seconds": ("s", "sec", "secs", "second", "seconds"),
        "minutes": ("m", "min", "mins", "minute", "minutes"),
        "hours": ("h", "hr", "hrs", "hour", "hours"),
        "days": ("d", "day", "days"),
        "weeks": ("w", "wk", "wks", "week", "weeks"),
    }.items()
    for alias in aliases
}
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_WEEKDAY_INDEX = {name: i for i, name in enumerate(_WEEKDAYS)} | {name[:3]: i for i, name in enumerate(_WEEKDAYS)}
_INTERVAL_WORDS = {"hourly": "1 hour", "daily": "1 day", "weekly": "1 week"} | {
    unit[:-1]: f"1 {unit}" for unit in _UNIT_NAMES
}
_MIN_INTERVAL = Decimal(1)
_MAX_INTERVAL_DAYS = 36525  # 100 years: keeps every grid step far from datetime's limits

_UNITS_HINT = f"(units: {', '.join(_UNIT_NAMES)})"
_WHEN_FORMS = (
    "expected 'now', 'in N <unit>', 'N <unit>', 'midnight', 'noon', 'HH:MM[:SS]', '5pm', '5:30am', "
    f"'tomorrow [at TIME]', '<weekday> [at TIME]' or an ISO 8601 date-time {_UNITS_HINT}"
)
_INTERVAL_FORMS = (
    "expected '[every] N <unit>' (e.g. '30 minutes', '1.5 hours', '1h30m', '1 hour and 30 minutes'), 'second', "
    f"'minute', 'hour', 'day', 'week', 'hourly', 'daily', 'weekly' or a weekday ('monday', 'mon') {_UNITS_HINT}"
)
_CLOCK_FORMS = "'HH:MM[:SS]', '5pm', '5:30am', 'noon' or 'midnight'"

_TERM = r"(\d+(?:\.\d+)?) ?([a-z]+)"
_DURATION_RE = re.compile(rf"{_TERM}(?:(?: ?, ?(?:and )?| and | ?){_TERM})*")
_CLOCK_24_RE = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")
_CLOCK_12_RE = re.compile(r"(\d{1,2})(?::(\d{2}))? ?([ap]m)")
_DAY_AT_RE = re.compile(r"([a-z]+)(?: (?:at )?(.+))?")
_ISO_RE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[t ].*)?")


class _Reject(Exception):
    """A reason why a string was refused; the public functions wrap it into BadTimeSpec."""


def parse_tz(name: str | None) -> datetime.tzinfo:
    """Return the zone called ``name`` (IANA name such as 'UTC'), or the machine's local zone for None / ''."""
    if not name:
        return _local_zone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"unknown time zone {name!r}: expected an IANA name such as 'UTC' or 'Europe/Paris', "
            "or nothing for the machine's local zone"
        ) from None


def _local_zone() -> datetime.tzinfo:
    """The zone the C library uses: $TZ, else /etc/localtime, else the current fixed UTC offset."""
    env = os.environ.get("TZ", "").lstrip(":")
    if env:
        try:
            return ZoneInfo(env)
        except (ZoneInfoNotFoundError, ValueError):
            pass  # a POSIX rule string such as 'CET-1CEST' is not a zoneinfo key; fall through
    try:
        with open("/etc/localtime", "rb") as f:
            # usually a symlink into the zoneinfo tree: keep the IANA name for display
            key = os.path.realpath("/etc/localtime").partition("/zoneinfo/")[2] or "localtime"
            return ZoneInfo.from_file(f, key=key)
    except (OSError, ValueError):
        return datetime.datetime.now().astimezone().tzinfo  # type: ignore[return-value]


def parse_when(text: str, *, now: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
    """Return the UTC instant a one-off time string means, relative to the aware ``now``; wall times are in ``tz``."""
    try:
        return _when(_normalise(text), _utc(now), tz)
    except _Reject as exc:
        raise BadTimeSpec(_message(f"time {text!r}", exc, _WHEN_FORMS)) from None
    except OverflowError:
        raise BadTimeSpec(_message(f"time {text!r}", "out of range", _WHEN_FORMS)) from None


def _when(s: str, now: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
    if s == "now":
        return now
    if _ISO_RE.fullmatch(s):
        try:
            dt = datetime.datetime.fromisoformat(s.upper())
        except ValueError:
            raise _Reject("not a valid ISO 8601 date-time") from None
        return dt.astimezone(UTC) if dt.tzinfo else _localise(dt, tz)
    clock = _parse_clock(s)
    if clock is not None:
        return _next_at(clock, now, tz)
    seconds = _parse_duration(s.removeprefix("in "))
    if seconds is not None:
        return now + datetime.timedelta(seconds=float(seconds))
    m = _DAY_AT_RE.fullmatch(s)
    if m and (m[1] == "tomorrow" or m[1] in _WEEKDAY_INDEX):
        clock = _parse_clock(m[2]) if m[2] else datetime.time()
        if clock is None:
            raise _Reject(f"{m[2]!r} is not a time of day")
        if m[1] == "tomorrow":
            tomorrow = now.astimezone(tz).date() + datetime.timedelta(days=1)
            return _localise(datetime.datetime.combine(tomorrow, clock), tz)
        return _next_at(clock, now, tz, _WEEKDAY_INDEX[m[1]])
    raise _Reject("")


def _message(subject: str, reason: object, forms: str) -> str:
    """'bad <subject>: [<reason>; ]<forms>'."""
    return f"bad {subject}: {f'{reason}; ' if str(reason) else ''}{forms}"


def _normalise(text: object) -> str:
    """Lower-case ``text`` and collapse its whitespace; refuse non-strings and blank strings."""
    if not isinstance(text, str):
        raise _Reject(f"not a string but {type(text).__name__}")
    s = " ".join(text.lower().split())
    if not s:
        raise _Reject("empty")
    return s


def _utc(dt: datetime.datetime) -> datetime.datetime:
    """``dt`` in UTC; a naive datetime is a caller bug, not a user error."""
    if dt.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got {dt!r}")
    return dt.astimezone(UTC)


def _localise(wall: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
    """The UTC instant of the naive wall time ``wall`` in ``tz`` (fold=0; gap times move forward by the gap)."""
    return wall.replace(tzinfo=tz, fold=0).astimezone(UTC)


def _parse_clock(s: str) -> datetime.time | None:
    """The time of day ``s`` names, None if it is not shaped like one; _Reject if a field is out of range."""
    if s in ("midnight", "noon"):
        return datetime.time(0 if s == "midnight" else 12)
    if m := _CLOCK_24_RE.fullmatch(s):
        hour, minute, second = int(m[1]), int(m[2]), int(m[3] or 0)
        if hour > 23:
            raise _Reject(f"hour {hour} is out of range (0-23)")
    elif m := _CLOCK_12_RE.fullmatch(s):
        hour, minute, second = int(m[1]), int(m[2] or 0), 0
        if not 1 <= hour <= 12:
            raise _Reject(f"hour {hour} is out of range for {m[3]} (1-12)")
        hour = hour % 12 + (12 if m[3] == "pm" else 0)
    else:
        return None
    if minute > 59 or second > 59:
        raise _Reject("minutes and seconds must be 00-59")
    return datetime.time(hour, minute, second)


def _parse_duration(s: str) -> Decimal | None:
    """Total seconds of a duration such as '1h 30m', None if ``s`` is not shaped like one."""
    if not _DURATION_RE.fullmatch(s):
        return None
    return sum((Decimal(n) * _UNIT_SECONDS[_unit(u)] for n, u in re.findall(_TERM, s)), Decimal(0))


def _unit(alias: str) -> str:
    try:
        return _UNIT_ALIASES[alias]
    except KeyError:
        raise _Reject(f"unknown unit {alias!r}") from None


def _next_at(
    clock: datetime.time, now: datetime.datetime, tz: datetime.tzinfo, weekday: int | None = None
) -> datetime.datetime:
    """The first instant strictly after ``now`` whose wall time in ``tz`` is ``clock`` (on ``weekday`` if given)."""
    today = now.astimezone(tz).date()
    ahead = 0 if weekday is None else (weekday - today.weekday()) % 7
    candidate = _localise(datetime.datetime.combine(today + datetime.timedelta(days=ahead), clock), tz)
    if candidate <= now:
        ahead += 1 if weekday is None else 7
        candidate = _localise(datetime.datetime.combine(today + datetime.timedelta(days=ahead), clock), tz)
    return candidate


@dataclasses.dataclass(frozen=True)
class Interval:
    """A recurring interval: ``seconds`` (fixed) or ``days`` (calendar steps in wall-clock time), one of them 0.

    ``weekday`` (0 = Monday) is set for weekday intervals, which step 7 days. ``text`` is the normalised spec.
    """

    text: str
    seconds: float = 0
    days: int = 0
    weekday: int | None = None

    def first_run(self, *, now: datetime.datetime, run_at: str | None, tz: datetime.tzinfo) -> datetime.datetime:
        """The UTC instant of the first run: ``now`` (or ``run_at``, any one-off form) for fixed and day/week
        intervals; the next such weekday at 00:00 (or at the time of day ``run_at``) for weekday intervals."""
        if self.weekday is None:
            return _utc(now) if run_at is None else parse_when(run_at, now=now, tz=tz)
        if run_at is None:
            return _next_at(datetime.time(), _utc(now), tz, self.weekday)
        try:
            clock = _parse_clock(_normalise(run_at))
            if clock is None:
                raise _Reject("")
        except _Reject as exc:
            subject = f"run_at {run_at!r} for interval {self.text!r}"
            raise BadTimeSpec(_message(subject, exc, f"expected a time of day, {_CLOCK_FORMS}")) from None
        return _next_at(clock, _utc(now), tz, self.weekday)

    def next_after(
        self, planned: datetime.datetime, *, now: datetime.datetime, tz: datetime.tzinfo
    ) -> datetime.datetime:
        """The smallest ``planned + k * step`` (k >= 1) strictly after ``now``, in UTC.

        Runs missed while the server was down are skipped, and the grid never drifts. Calendar steps add whole
        days to the wall-clock time of ``planned`` in ``tz``, so a daily 09:00 run stays at 09:00 across DST.
        """
        planned, now = _utc(planned), _utc(now)
        if self.seconds:
            step = datetime.timedelta(seconds=self.seconds)
            return planned + max(1, (now - planned) // step + 1) * step
        wall = planned.astimezone(tz).replace(tzinfo=None)
        elapsed_days = (now.astimezone(tz).replace(tzinfo=None) - wall).days

        def run(k: int) -> datetime.datetime:
            return _localise(wall + datetime.timedelta(days=k * self.days), tz)

        # Wall-clock and real elapsed time differ by at most a few DST hours, so each loop turns once or twice at most.
        k = max(1, elapsed_days // self.days)
        while run(k) <= now:
            k += 1
        while k > 1 and run(k - 1) > now:
            k -= 1
        return run(k)


def parse_age(text: str) -> float:
    """Seconds of an age such as '7d', '12 hours', '1h30m' (how long finished tasks are kept); BadTimeSpec otherwise."""
    try:
        seconds = _parse_duration(_normalise(text))
    except _Reject as exc:
        raise BadTimeSpec(_message(f"age {text!r}", exc, _AGE_FORMS)) from None
    if seconds is None:
        raise BadTimeSpec(_message(f"age {text!r}", "", _AGE_FORMS))
    return float(seconds)


_AGE_FORMS = "a duration such as '7d', '12 hours', '1h30m' or '0s'"


def parse_interval(text: str) -> Interval:
    """Parse a recurring interval ('30 minutes', 'every 1h30m', 'daily', '2 weeks', 'monday'...)."""
    try:
        return _interval(_normalise(text))
    except _Reject as exc:
        raise BadTimeSpec(_message(f"interval {text!r}", exc, _INTERVAL_FORMS)) from None


def _interval(s: str) -> Interval:
    s = s.removeprefix("every ")
    s = _INTERVAL_WORDS.get(s, s)
    if s in _WEEKDAY_INDEX:
        weekday = _WEEKDAY_INDEX[s]
        return Interval(text=_WEEKDAYS[weekday], days=7, weekday=weekday)
    seconds = _parse_duration(s)
    if seconds is None:
        raise _Reject("")
    if seconds < _MIN_INTERVAL:
        raise _Reject(f"an interval must be at least {_MIN_INTERVAL} second")
    if seconds > _MAX_INTERVAL_DAYS * 86400:
        raise _Reject(f"an interval must be at most {_MAX_INTERVAL_DAYS} days")
    days, rest = divmod(seconds, 86400)
    if not rest and all(_unit(u) in ("days", "weeks") for _, u in re.findall(_TERM, s)):
        text = _plural(days // 7, "week") if days % 7 == 0 else _plural(days, "day")
        return Interval(text=text, days=int(days))
    # Fixed intervals are spelled without days or weeks so that their text never reads back as a calendar one.
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [_plural(n, unit) for n, unit in ((hours, "hour"), (minutes, "minute"), (secs, "second")) if n]
    return Interval(text=" ".join(parts), seconds=float(seconds))


def _plural(n: Decimal, unit: str) -> str:
    return f"{n.normalize():f} {unit}{'' if n == 1 else 's'}"

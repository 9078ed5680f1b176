"""Time strings for one-off runs (``parse_when``), what ``every`` repeats (``parse_interval``: an interval or a cron
expression) and zones (``parse_tz`` for the server's, ``parse_zone`` for a schedule's).

Every function takes ``now`` explicitly and returns aware UTC datetimes, so it is pure and testable.

Which library computes what: timespec itself steps intervals (a fixed step is elapsed time, a day or week step
is wall-clock time); croniter lists the wall-clock times a cron expression names (on naive datetimes only, so
that its own daylight-saving handling never decides anything); zoneinfo turns every wall-clock time into an
instant, through ``_localise`` alone, which holds the two daylight-saving rules of every schedule and one-off
time: an ambiguous wall time (autumn fall-back) means its first occurrence, so a run there happens once, and a
wall time that does not exist (spring-forward gap) means the first valid time after it, the instant the clocks
jump (02:30 on 2026-03-29 in Europe/Paris becomes 03:00 CEST). A day or week interval keeps its intended time
of day (``Interval.time_of_day``, read again from the schedule's ``run_at`` and creation time), not the wall
time of its previous run, so a daily 02:30 moved to 03:00 by a gap is back at 02:30 the next day.

The ``schedule`` package is not used: it computes next runs only from ``datetime.now()`` as naive local
times (its zone support needs pytz) and cannot anchor a run to a stored planned time, and its ``at()``
check accepts only a subset of the time-of-day forms parsed here.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import re
import zoneinfo
from decimal import Decimal
from zoneinfo import ZoneInfo

import croniter

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
_CRON_EXAMPLES = "'*/15 * * * *', '0 9 * * mon-fri', '@hourly', '@daily', '@weekly'"
_INTERVAL_FORMS = (
    "expected '[every] N <unit>' (e.g. '30 minutes', '1.5 hours', '1h30m', '1 hour and 30 minutes'), 'second', "
    f"'minute', 'hour', 'day', 'week', 'hourly', 'daily', 'weekly', a weekday ('monday', 'mon') {_UNITS_HINT} "
    f"or a cron expression ({_CRON_EXAMPLES})"
)
_CRON_MACROS = ("@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually")
_CRON_FORMS = (
    "expected five fields, minute (0-59) hour (0-23) day-of-month (1-31) month (1-12, jan-dec) day-of-week "
    "(0-7 with 0 and 7 Sunday, sun-sat), each '*', a number or name, a range 'a-b', a step '*/n' or 'a-b/n' "
    f"or a list of those ({_CRON_EXAMPLES}), or one of {', '.join(_CRON_MACROS)}"
)
_CLOCK_FORMS = "'HH:MM[:SS]', '5pm', '5:30am', 'noon' or 'midnight'"
_ZONE_FORMS = "expected an IANA name such as 'UTC', 'Europe/Paris' or 'America/New_York'"

_TERM = r"(\d+(?:\.\d+)?) ?([a-z]+)"
_DURATION_RE = re.compile(rf"{_TERM}(?:(?: ?, ?(?:and )?| and | ?){_TERM})*")
_CLOCK_24_RE = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")
_CLOCK_12_RE = re.compile(r"(\d{1,2})(?::(\d{2}))? ?([ap]m)")
_DAY_AT_RE = re.compile(r"([a-z]+)(?: (?:at )?(.+))?")
_ISO_RE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[t ].*)?")
# Shaped like a cron expression rather than an interval: a macro, a '*', or minute and hour fields of digits.
_CRON_LIKE_RE = re.compile(r"@.*|.*\*.*|[\d,/-]+ [\d,/-]+(?: .*)?")
# croniter's hashed ('H') and random ('R') values, which need an id this scheduler does not give.
_CRON_HASHED_RE = re.compile(r"[hr](?:\(.*\))?(?:/\d+)?")
# Slots a cron expression may name in one repeated (fall-back) hour, each mapped to an instant already past.
_CRON_MAX_SKIPPED = 3 * 60


class _Reject(Exception):
    """A reason why a string was refused; the public functions wrap it into BadTimeSpec."""


def parse_tz(name: str | None) -> datetime.tzinfo:
    """The server's zone (``--tz``): the IANA zone ``name``, or the machine's local zone for None / ''."""
    if not name:
        return _local_zone()
    zone = _iana_zone(name)
    if zone is None:
        raise ConfigError(f"unknown time zone {name!r}: {_ZONE_FORMS}, or nothing for the machine's local zone")
    return zone


def parse_zone(name: str) -> ZoneInfo:
    """A schedule's own zone (``tz`` of ``schedule`` and ``every``): the IANA zone ``name``, else BadTimeSpec."""
    zone = _iana_zone(name)
    if zone is None:
        raise BadTimeSpec(f"unknown time zone {name!r}: {_ZONE_FORMS}; leave tz out for the server's (serve --tz)")
    return zone


@functools.cache
def _iana_names() -> frozenset[str]:
    # Read once: available_timezones() walks the zoneinfo folders. 'localtime' there is the machine's zone, not a name.
    return frozenset(zoneinfo.available_timezones() - {"localtime"})


def _iana_zone(name: str) -> ZoneInfo | None:
    """The zone of IANA name ``name``; None if it names none."""
    return ZoneInfo(name) if name in _iana_names() else None


def _local_zone() -> datetime.tzinfo:
    """The zone the C library uses: $TZ, else /etc/localtime, else the current fixed UTC offset."""
    env = os.environ.get("TZ", "").lstrip(":")
    if env:
        try:
            return ZoneInfo(env)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
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
    return _instant(_wall_or_instant(text, now, tz), tz)


def _wall_or_instant(text: str, now: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
    """What ``text`` means: a naive wall time in ``tz`` ('17:30', 'tomorrow', a naive ISO time) or an aware
    instant ('now', 'in 5 minutes', an ISO time with its offset); BadTimeSpec if it means neither."""
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
        return dt.astimezone(UTC) if dt.tzinfo else dt
    clock = _parse_clock(s)
    if clock is not None:
        return _next_wall(clock, now, tz)
    seconds = _parse_duration(s.removeprefix("in "))
    if seconds is not None:
        return now + datetime.timedelta(seconds=float(seconds))
    m = _DAY_AT_RE.fullmatch(s)
    if m and (m[1] == "tomorrow" or m[1] in _WEEKDAY_INDEX):
        clock = _parse_clock(m[2]) if m[2] else datetime.time()
        if clock is None:
            raise _Reject(f"{m[2]!r} is not a time of day")
        if m[1] == "tomorrow":
            return datetime.datetime.combine(now.astimezone(tz).date() + datetime.timedelta(days=1), clock)
        return _next_wall(clock, now, tz, _WEEKDAY_INDEX[m[1]])
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


def _instant(dt: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
    """``dt`` as a UTC instant: localised in ``tz`` if it is a naive wall time."""
    return _localise(dt, tz) if dt.tzinfo is None else _utc(dt)


def _localise(wall: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
    """The UTC instant of the naive wall time ``wall`` in ``tz``: its first occurrence if the clocks show it twice
    (fall-back), the end of the gap if they skip it (spring-forward: the first valid time after it)."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    return _gap_end(wall, tz)


def _gap_end(wall: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
    """The instant the clocks jump over the gap that holds ``wall``, a wall time that does not exist in ``tz``."""
    # Read with the offsets before (fold=0) and after (fold=1) the jump, ``wall`` names two instants that the
    # jump lies between; zones change offsets on whole seconds, so a bisection of the seconds between finds it.
    one, other = (int(wall.replace(tzinfo=tz, fold=fold).timestamp()) for fold in (0, 1))
    before, after = min(one, other), max(one, other) + 1
    offset_after = datetime.datetime.fromtimestamp(after, tz).utcoffset()
    while after - before > 1:
        middle = (before + after) // 2
        if datetime.datetime.fromtimestamp(middle, tz).utcoffset() == offset_after:
            after = middle
        else:
            before = middle
    return datetime.datetime.fromtimestamp(after, UTC)


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


def _next_wall(
    clock: datetime.time, now: datetime.datetime, tz: datetime.tzinfo, weekday: int | None = None
) -> datetime.datetime:
    """The first wall time in ``tz`` at ``clock`` (on ``weekday`` if given) whose instant is strictly after ``now``."""
    today = now.astimezone(tz).date()
    ahead = 0 if weekday is None else (weekday - today.weekday()) % 7
    candidate = datetime.datetime.combine(today + datetime.timedelta(days=ahead), clock)
    if _localise(candidate, tz) <= now:
        candidate += datetime.timedelta(days=1 if weekday is None else 7)
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
        return _instant(self._first(now, run_at, tz), tz)

    def time_of_day(self, *, now: datetime.datetime, run_at: str | None, tz: datetime.tzinfo) -> datetime.time | None:
        """The wall time of day in ``tz`` every run of a day or week interval is meant at: that of the first run
        :meth:`first_run` gives for the same arguments (before a gap moved it); None for a fixed interval."""
        if self.seconds:
            return None
        first = self._first(now, run_at, tz)
        return (first if first.tzinfo is None else first.astimezone(tz)).time()

    def _first(self, now: datetime.datetime, run_at: str | None, tz: datetime.tzinfo) -> datetime.datetime:
        """The first run as a naive wall time in ``tz`` or an aware instant (see :func:`_wall_or_instant`)."""
        if self.weekday is None:
            return _utc(now) if run_at is None else _wall_or_instant(run_at, now, tz)
        if run_at is None:
            return _next_wall(datetime.time(), _utc(now), tz, self.weekday)
        try:
            clock = _parse_clock(_normalise(run_at))
            if clock is None:
                raise _Reject("")
        except _Reject as exc:
            subject = f"run_at {run_at!r} for interval {self.text!r}"
            raise BadTimeSpec(_message(subject, exc, f"expected a time of day, {_CLOCK_FORMS}")) from None
        return _next_wall(clock, _utc(now), tz, self.weekday)

    def next_after(
        self,
        planned: datetime.datetime,
        *,
        now: datetime.datetime,
        tz: datetime.tzinfo,
        at: datetime.time | None = None,
    ) -> datetime.datetime:
        """The smallest ``planned + k * step`` (k >= 1) strictly after ``now``, in UTC.

        Runs missed while the server was down are skipped, and the grid never drifts. Calendar steps add whole
        days to the wall-clock time of ``planned`` in ``tz``, so a daily 09:00 run stays at 09:00 across DST;
        ``at`` (:meth:`time_of_day`) is the time of day meant, which ``planned`` lost if a gap moved it.
        """
        planned, now = _utc(planned), _utc(now)
        if self.seconds:
            step = datetime.timedelta(seconds=self.seconds)
            return planned + max(1, (now - planned) // step + 1) * step
        wall = _meant(planned, tz, at)
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


def _meant(planned: datetime.datetime, tz: datetime.tzinfo, at: datetime.time | None) -> datetime.datetime:
    """The naive wall time in ``tz`` that the run planned at ``planned`` was meant at: its day at ``at`` if that
    is where ``_localise`` put it (a gap may have moved it, even past midnight), else ``planned``'s own wall time."""
    wall = planned.astimezone(tz).replace(tzinfo=None)
    if at is not None:
        for day in (wall.date(), wall.date() - datetime.timedelta(days=1)):
            meant = datetime.datetime.combine(day, at)
            if _localise(meant, tz) == planned:
                return meant
    return wall


@dataclasses.dataclass(frozen=True)
class Cron:
    """A cron expression (``text``, normalised): runs at the wall-clock times in the zone that its five fields
    name (croniter lists them), each mapped to an instant by ``_localise``.

    Every slot fires once: a slot in a fall-back hour at its first occurrence, those in a spring-forward gap
    together at the gap's end. The grid is the expression's own, so a run late or missed never moves it.
    """

    text: str

    def first_run(self, *, now: datetime.datetime, run_at: str | None, tz: datetime.tzinfo) -> datetime.datetime:
        """The first slot at or after ``now``, or after the one-off time ``run_at`` if it is given."""
        start = _utc(now) if run_at is None else parse_when(run_at, now=now, tz=tz)
        return self._slot_after(start - datetime.timedelta(microseconds=1), tz)

    def time_of_day(self, *, now: datetime.datetime, run_at: str | None, tz: datetime.tzinfo) -> None:
        """None: a cron expression names its times itself."""
        return None

    def next_after(
        self,
        planned: datetime.datetime,
        *,
        now: datetime.datetime,
        tz: datetime.tzinfo,
        at: datetime.time | None = None,
    ) -> datetime.datetime:
        """The first slot strictly after both ``planned`` and ``now`` (missed slots are skipped), in UTC."""
        return self._slot_after(max(_utc(planned), _utc(now)), tz)

    def _slot_after(self, after: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
        # Slots are listed from the wall time of ``after``: an earlier slot cannot be later as an instant.
        # In a repeated hour the first slots listed may be past (their first occurrence is), hence the loop.
        slots = croniter.croniter(self.text, after.astimezone(tz).replace(tzinfo=None), ret_type=datetime.datetime)
        try:
            for _ in range(_CRON_MAX_SKIPPED):
                instant = _localise(slots.get_next(), tz)
                if instant > after:
                    return instant
        except (croniter.CroniterBadDateError, OverflowError):
            pass
        raise BadTimeSpec(
            _message(f"cron expression {self.text!r}", "it names no time in the next 50 years", _CRON_FORMS)
        )


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


def parse_interval(text: str) -> Interval | Cron:
    """Parse what ``every`` repeats: an interval ('30 minutes', 'every 1h30m', 'daily', '2 weeks', 'monday'...)
    or a cron expression ('*/15 * * * *', '0 9 * * mon-fri', '@hourly'...).

    The words 'hourly', 'daily' and 'weekly' are intervals, anchored at the first run; the macros '@hourly',
    '@daily' and '@weekly' are cron expressions, on the hour, at midnight and on Sunday at midnight.
    """
    try:
        s = _normalise(text)
        if _CRON_LIKE_RE.fullmatch(s):
            return _cron(s, text)
        return _interval(s)
    except _Reject as exc:
        raise BadTimeSpec(_message(f"interval {text!r}", exc, _INTERVAL_FORMS)) from None


def _cron(s: str, text: str) -> Cron:
    """The cron expression ``s`` (normalised from ``text``), checked by croniter; BadTimeSpec quoting ``text``."""
    fields = s.split(" ")
    if s.startswith("@"):
        reason = "" if s in _CRON_MACROS else f"unknown macro {s!r}"
    elif len(fields) != 5:
        reason = f"it has {len(fields)} field(s) (seconds and years are not supported)"
    elif any(_CRON_HASHED_RE.fullmatch(field) for field in fields):
        reason = "hashed (H) and random (R) values are not supported"
    else:
        reason = ""
    if not reason:
        try:
            croniter.croniter(s)
            return Cron(text=s)
        except (croniter.CroniterError, ValueError) as exc:
            reason = str(exc)
    raise BadTimeSpec(_message(f"cron expression {text!r}", reason, _CRON_FORMS))


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


def next_run(
    text: str,
    *,
    planned: datetime.datetime,
    now: datetime.datetime,
    tz: datetime.tzinfo,
    run_at: str | None,
    created: datetime.datetime,
) -> datetime.datetime:
    """The run after ``planned`` of a stored schedule (its ``interval`` text, ``run_at`` and creation time
    ``created``) in ``tz``, strictly after ``now``; BadTimeSpec if the stored text no longer parses."""
    recurrence = parse_interval(text)
    at = recurrence.time_of_day(now=created, run_at=run_at, tz=tz)
    return recurrence.next_after(planned, now=now, tz=tz, at=at)

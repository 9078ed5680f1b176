"""Limits on dispatch: at most N tasks of a key running at once (``serve --limit KEY=N``), at most N starts of
a key per second, minute or hour (``serve --rate KEY=N/s``).

A task counts under one key: its ``limit_key`` option if it has one, else its name. So ``--limit resize=2``
limits the tasks named ``resize`` (without a ``limit_key``) and every task given ``limit_key="resize"``,
whatever its name. The store decides each claim against the database (store.Store.claim), so a limit holds
across workers and across the servers sharing one database; this module parses the options and does the
arithmetic on what the store counted.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from . import config
from .errors import ConfigError

#: Seconds in each unit of a rate.
RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
#: Largest N of a limit or a rate: more running at once, or more starts per window, than any fleet runs is a typo.
LIMIT_MAX = 1_000_000

_LIMIT_FORM = "KEY=N (a task name or limit key, and an integer from 1 to {max}), e.g. resize=2"
_RATE_FORM = "KEY=N/s, KEY=N/m or KEY=N/h (a task name or limit key, and an integer from 1 to {max}), e.g. resize=10/s"
_NUMBER = re.compile(r"[0-9]+")


@dataclasses.dataclass(frozen=True)
class Rate:
    """At most ``starts`` deliveries of a key in any ``per`` seconds."""

    starts: int
    per: float

    def __str__(self) -> str:
        unit = next(unit for unit, seconds in RATE_UNITS.items() if seconds == self.per)
        return f"{self.starts}/{unit}"


@dataclasses.dataclass(frozen=True)
class Limits:
    """The server's limits, by key: ``running`` (most running at once) and ``rates``."""

    running: Mapping[str, int] = dataclasses.field(default_factory=dict)
    rates: Mapping[str, Rate] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.running or self.rates)

    def keys(self) -> list[str]:
        """Every key with a limit or a rate, sorted."""
        return sorted({*self.running, *self.rates})

    def budgets(self, running: Mapping[str, int], started: Mapping[str, int]) -> dict[str, int]:
        """How many more tasks of each key may be claimed now (0 or more), given how many are ``running`` and
        how many were ``started`` within each rate's window (keys missing: none)."""
        budgets = {}
        for key in self.keys():
            room = []
            if key in self.running:
                room.append(self.running[key] - running.get(key, 0))
            if key in self.rates:
                room.append(self.rates[key].starts - started.get(key, 0))
            budgets[key] = max(0, min(room))
        return budgets

    def opens_at(self, key: str, starts: Iterable[tuple[float, int]]) -> float | None:
        """When ``key``'s rate window has room again: ``starts`` are its window's ``(at, how many)``, oldest
        first; None if it has room now (or no rate)."""
        rate = self.rates.get(key)
        if rate is None:
            return None
        window = list(starts)
        inside = sum(count for _, count in window)
        if inside < rate.starts:
            return None
        for at, count in window:
            inside -= count
            if inside < rate.starts:  # once this start has left the window (at + per), there is room
                return at + rate.per
        return None

    def describe(self) -> str:
        """The limits for the server's log: ``resize: 2 running, 10/s; mail: 5/m``."""
        parts = []
        for key in self.keys():
            shown = [f"{self.running[key]} running"] if key in self.running else []
            shown += [str(self.rates[key])] if key in self.rates else []
            parts.append(f"{key}: {', '.join(shown)}")
        return "; ".join(parts) or "none"


def parse(limits: Iterable[str] = (), rates: Iterable[str] = ()) -> Limits:
    """``--limit KEY=N`` and ``--rate KEY=N/UNIT`` values as Limits; ConfigError saying the expected form for a
    value that does not fit it, or for a key given twice."""
    running: dict[str, int] = {}
    for text in limits:
        key, count = _split(text, "--limit", _LIMIT_FORM)
        running[_new(key, running, "--limit")] = _count(count, text, "--limit", _LIMIT_FORM)
    per_key: dict[str, Rate] = {}
    for text in rates:
        key, value = _split(text, "--rate", _RATE_FORM)
        count, slash, unit = value.partition("/")
        if not slash or unit.strip().lower() not in RATE_UNITS:
            raise _bad("--rate", text, _RATE_FORM)
        rate = Rate(_count(count, text, "--rate", _RATE_FORM), RATE_UNITS[unit.strip().lower()])
        per_key[_new(key, per_key, "--rate")] = rate
    return Limits(running, per_key)


def _split(text: str, flag: str, form: str) -> tuple[str, str]:
    """``KEY=VALUE`` at its last ``=`` (a key may hold one), the key stripped; ConfigError if either is missing."""
    key, equals, value = text.rpartition("=")
    key = key.strip()
    if not equals or not key or len(key) > config.MAX_NAME_CHARS or "\x00" in key:
        raise _bad(flag, text, form)
    return key, value


def _count(text: str, whole: str, flag: str, form: str) -> int:
    text = text.strip()
    if not _NUMBER.fullmatch(text) or not 1 <= int(text) <= LIMIT_MAX:
        raise _bad(flag, whole, form)
    return int(text)


def _new(key: str, seen: Mapping[str, object], flag: str) -> str:
    if key in seen:
        raise ConfigError(f"{flag} {key!r} is given twice: give each task name or limit key once")
    return key


def _bad(flag: str, text: str, form: str) -> ConfigError:
    return ConfigError(f"bad {flag} {text!r:.300}: expected {form.format(max=f'{LIMIT_MAX:,}')}")

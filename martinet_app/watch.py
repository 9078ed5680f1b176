"""``martinet watch``: follow tasks until they are final, as live progress bars or one line per change.

What is followed: the tasks given by id, or those a filter (a name, a status, or both) matches. The
filter is asked again at every poll, so a task that comes to match it while the watch runs joins it;
the watch ends once every task it follows is final and no other matches. Without a status, a filter
matches the queued and running tasks: those scheduled for later are not waited for.

Polling goes through the Python client: one ``status`` per unfinished task followed by id; for a
filter, ``list`` of each status it matches (pages of 1,000 summaries) and one ``status`` for each
followed task that left them. Polls start POLL_INTERVAL apart, or further apart when polls take long,
so that a watch's requests keep the server busy at most 1/POLL_SHARE of the time: how long they take
is the lower median of the last PACE_POLLS, lest one slow poll freeze the display for ten times as long.

rich is imported only for the bars, when stdout is a terminal: a plain watch starts as fast as any verb.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import click

from . import protocol
from .errors import WaitTimeout

if TYPE_CHECKING:
    from .client import Martinet

#: Seconds between the starts of two polls, at least.
POLL_INTERVAL = 0.3
#: Polls that take t seconds (the lower median of the latest) start at least POLL_SHARE * t apart.
POLL_SHARE = 10
#: How many of the latest polls' durations set the pace.
PACE_POLLS = 3
#: What a filter without a status matches: the tasks that are due.
DUE_STATUSES = ("queued", "running")
#: The statuses a filter may name: final tasks would leave nothing to wait for.
WATCHABLE_STATUSES = ("waiting", "scheduled", "queued", "running")


class Watch:
    """The tasks followed, by id, each as its latest record (or summary), kept up to date by :meth:`poll`."""

    def __init__(
        self, client: Martinet, ids: Sequence[int] = (), name: str | None = None, status: str | None = None
    ) -> None:
        self._client = client
        self._ids = tuple(dict.fromkeys(ids))
        self._name = name
        self._statuses: tuple[str, ...] = () if self._ids else ((status,) if status else DUE_STATUSES)
        self.records: dict[int, dict] = {}

    def poll(self) -> None:
        """Bring every unfinished task's record up to date, and add the tasks that came to match the filter.

        Raises TaskNotFound (from the first poll) if a task given by id does not exist.
        """
        fresh: dict[int, dict] = {}
        for status in self._statuses:
            fresh.update((task["id"], task) for task in self._client.iter_tasks(status, self._name))
        for task_id in self.unfinished() if self.records else self._ids:
            if task_id not in fresh:
                fresh[task_id] = self._client.status(task_id)
        # By id, the first poll's tasks in the order given or oldest first; those that join come last.
        self.records.update(fresh if self._ids else sorted(fresh.items()))

    def unfinished(self) -> list[int]:
        return [task_id for task_id, record in self.records.items() if record["status"] not in protocol.FINAL_STATUSES]

    def run(self, display: Display, timeout: float | None = None) -> list[dict]:
        """Poll and show the tasks until every one is final; return their records (none if nothing matched).

        The first poll comes before anything is shown, so that an unknown id is only an error. Raises
        WaitTimeout if some tasks are not final after ``timeout`` seconds (None: no limit).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        took = deque([self._timed_poll()], maxlen=PACE_POLLS)
        if not self.records:
            return []
        with display:
            while True:
                display.show(self.records.values(), datetime.now(UTC))
                left = self.unfinished()
                if not left:
                    return list(self.records.values())
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(
                        f"{len(left)} task(s) did not finish within {timeout:g} s "
                        f"({', '.join(map(str, left[:10]))}{', ...' if len(left) > 10 else ''}); "
                        "watch longer or check that a worker is running"
                    )
                time.sleep(pause(took))
                took.append(self._timed_poll())

    def _timed_poll(self) -> float:
        """:meth:`poll`; the seconds it took."""
        started = time.monotonic()
        self.poll()
        return time.monotonic() - started


def pause(took: Sequence[float]) -> float:
    """Seconds to wait before the next poll, given the latest polls' durations (the last one just ended)."""
    typical = sorted(took)[(len(took) - 1) // 2]
    return max(0.0, max(POLL_INTERVAL, POLL_SHARE * typical) - took[-1])


# ---------------------------------------------------------------- what is shown of a task


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def timing(record: dict, now: datetime) -> tuple[float | None, float | None]:
    """Seconds since the task started (until it finished, if it did) and the ETA of a running task: the
    time its progress so far says is left. None where unknown."""
    started = _time(record.get("started_at"))
    if started is None:
        return None, None
    finished = _time(record.get("finished_at"))
    elapsed = max(((finished or now) - started).total_seconds(), 0.0)
    progress = record.get("progress")
    if record["status"] != "running" or not progress:
        return elapsed, None
    return elapsed, elapsed * (1 - progress) / progress


def clock(seconds: float | None) -> str:
    """``H:MM:SS``, or ``-`` for None."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def percent(record: dict) -> str:
    progress = 1.0 if record["status"] == "succeeded" else record.get("progress")
    return "-" if progress is None else f"{progress * 100:.0f}%"


def message(record: dict) -> str:
    """A failed task's error, else its progress message ('' if none)."""
    return (record.get("error") if record["status"] == "failed" else record.get("progress_message")) or ""


# ---------------------------------------------------------------- displays


class Display(Protocol):
    """Shows the followed tasks after each poll, between ``__enter__`` and ``__exit__``."""

    def __enter__(self) -> Display: ...

    def __exit__(self, *exc: object) -> None: ...

    def show(self, records: Iterable[dict], now: datetime) -> None: ...


class Changes:
    """Prints one line, made by ``render(record, now)``, for each task whose status, progress or message changed
    since the last poll: for a pipe or a log."""

    def __init__(self, render: Callable[[dict, datetime], str]) -> None:
        self._render = render
        self._shown: dict[int, tuple] = {}

    def __enter__(self) -> Changes:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def show(self, records: Iterable[dict], now: datetime) -> None:
        for record in records:
            change = (record["status"], record.get("progress"), message(record))
            if self._shown.get(record["id"]) != change:
                self._shown[record["id"]] = change
                click.echo(self._render(record, now))


def plain_line(record: dict, now: datetime) -> str:
    """``task 7 (steps) running 40% elapsed 0:00:01 eta 0:00:02: step 2``"""
    elapsed, eta = timing(record, now)
    text = message(record)
    return (
        f"task {record['id']} ({record['name']}) {record['status']} {percent(record)} "
        f"elapsed {clock(elapsed)} eta {clock(eta)}{': ' + text if text else ''}"
    )


def json_line(record: dict, now: datetime) -> str:
    """A JSON object: id, name, status, progress, message (or null), elapsed and eta (seconds, or null)."""
    fields: dict[str, Any] = {key: record.get(key) for key in ("id", "name", "status", "progress")}
    elapsed, eta = (None if seconds is None else round(seconds, 3) for seconds in timing(record, now))
    fields.update(message=message(record) or None, elapsed=elapsed, eta=eta)
    return json.dumps(fields, sort_keys=True)


class Bars:
    """rich progress bars redrawn in place: a task's id and name, bar, percent, status, elapsed, ETA, message."""

    _STYLES = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
        from rich.table import Column

        def text(template: str, markup: bool = False, **column: Any) -> TextColumn:
            return TextColumn(template, markup=markup, table_column=Column(no_wrap=True, **column))

        self._progress = Progress(
            text("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            text("{task.fields[status]}", markup=True),
            text("{task.fields[elapsed]}"),
            text("eta {task.fields[eta]}"),
            text("{task.fields[message]}", overflow="ellipsis"),
            refresh_per_second=4,
        )
        self._bars: dict[int, Any] = {}

    def __enter__(self) -> Bars:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def show(self, records: Iterable[dict], now: datetime) -> None:
        for record in records:
            elapsed, eta = timing(record, now)
            status = record["status"]
            fields = {
                "status": f"[{self._STYLES.get(status, 'default')}]{status}[/]",
                "elapsed": clock(elapsed),
                "eta": clock(eta),
                "message": message(record),
                "completed": 1.0 if status == "succeeded" else record.get("progress") or 0.0,
            }
            if record["id"] in self._bars:
                self._progress.update(self._bars[record["id"]], **fields)
            else:
                label = f"{record['id']} {record['name']}"
                self._bars[record["id"]] = self._progress.add_task(label, total=1.0, **fields)

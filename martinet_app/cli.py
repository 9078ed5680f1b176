"""The ``martinet`` command: client verbs mirroring :class:`Martinet`, plus ``serve`` and ``work``.

Start-up time matters, so nothing heavy is imported at module level: the client (and
with it zmq) is imported when a client verb runs, the server and worker (gevent, peewee)
only inside ``serve`` and ``work``.
"""

from __future__ import annotations

import functools
import json
import math
import shlex
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

import martinet_app
from martinet_app import config, logs, protocol, servers, timespec, watch
from martinet_app.errors import (
    AuthenticationFailed,
    ConfigError,
    InvalidRequest,
    MartinetError,
    ServerUnavailable,
    TaskNotFound,
)
from martinet_app.status import TaskStatus

if TYPE_CHECKING:
    from martinet_app.client import Martinet

#: A MartinetError with no more specific code (including InvalidTransition and WaitTimeout).
EXIT_ERROR = 1
#: Bad command line or request: click usage errors, InvalidRequest, BadTimeSpec, ConfigError (e.g. a key file).
EXIT_USAGE = 2
#: No server answered within --timeout (ServerUnavailable).
EXIT_UNAVAILABLE = 3
#: No task or recurring schedule has the given id (TaskNotFound).
EXIT_NOT_FOUND = 4
#: ``execute --wait`` or ``wait``: the task ended failed or cancelled.
EXIT_TASK_FAILED = 5
#: The server refused this client's keys, or one side uses keys and the other not (AuthenticationFailed).
EXIT_AUTH = 6

_EXIT_CODES: tuple[tuple[type[MartinetError], int], ...] = (
    (AuthenticationFailed, EXIT_AUTH),
    (ServerUnavailable, EXIT_UNAVAILABLE),
    (TaskNotFound, EXIT_NOT_FOUND),
    (InvalidRequest, EXIT_USAGE),
    (ConfigError, EXIT_USAGE),
)
_UNSUCCESSFUL = protocol.FINAL_STATUSES - {"succeeded"}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Longest time span any option takes, seconds (a year): longer is a mistake, and every deadline
#: made from one stays a date the store and the records can show.
_SECONDS_MAX = 365 * 24 * 3600
#: Most worker slots or prefetched tasks: more processes or held tasks than any machine runs is a typo.
_SLOTS_MAX = 10_000
#: Largest --max-message-bytes (1 GiB): a larger message is a mistake, whatever the sockets take.
_MESSAGE_BYTES_MAX = 2**30


class _Group(click.Group):
    """A group that reports any MartinetError as one stderr line and a named exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MartinetError as exc:
            click.echo(f"martinet: error: {exc.message}", err=True)
            ctx.exit(next((code for cls, code in _EXIT_CODES if isinstance(exc, cls)), EXIT_ERROR))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(version=martinet_app.__version__, prog_name="martinet")
def main() -> None:
    """Martinet: a persistent, ZeroMQ-based distributed task manager."""


# ---------------------------------------------------------------- options shared by several commands


class _Seconds(click.FloatRange):
    """Seconds from ``min`` to _SECONDS_MAX. Unlike FloatRange, NaN (which no bound compares with) is refused."""

    def __init__(self, min: float = 0, *, min_open: bool = False) -> None:
        super().__init__(min, _SECONDS_MAX, min_open=min_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail(f"{value} is not in the range {self._describe_range()}.", param, ctx)
        return seconds


def _setting(flag: str, *decls: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A click option that can also be set by its environment variable: ``--client-port``, MARTINET_CLIENT_PORT."""
    envvar = "MARTINET_" + flag.lstrip("-").replace("-", "_").upper()
    return click.option(flag, *decls, envvar=envvar, show_envvar=True, **kwargs)


def _parse_keep(value: str, param: click.Parameter) -> float | None:
    """--keep-succeeded, --keep-failed: an age in seconds (timespec.parse_age), or None for 'forever'."""
    if value.strip().lower() == "forever":
        return None
    try:
        return timespec.parse_age(value)
    except MartinetError as exc:
        raise click.BadParameter(f"{exc.message}, or 'forever'", param=param) from None


def _parse_url(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    """--url: one server's host, or several sharing a database, separated by commas (servers.parse)."""
    try:
        return servers.parse(value)
    except ConfigError as exc:
        raise click.BadParameter(exc.message) from None


_url_option = _setting(
    "--url",
    default=config.HOST,
    callback=_parse_url,
    help="Host name or address of the server, or of several sharing one database, separated by commas: "
    "one is used at a time, the next when it fails.",
)
_client_port_option = _setting(
    "--client-port",
    type=click.IntRange(1, 65535),
    default=config.CLIENT_PORT,
    help="The server's client port.",
)
_worker_port_option = _setting(
    "--worker-port",
    type=click.IntRange(1, 65535),
    default=config.WORKER_PORT,
    help="The server's worker port.",
)
_status_port_option = _setting(
    "--status-port",
    type=click.IntRange(1, 65535),
    default=config.STATUS_PORT,
    help="The server's status port.",
)
_heartbeat_option = _setting(
    "--heartbeat",
    type=_Seconds(0, min_open=True),
    default=config.HEARTBEAT_INTERVAL,
    help="Seconds between heartbeats.",
)
_log_level_option = _setting(
    "--log-level",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    default="INFO",
    help="Log messages of this level and above to stderr.",
)
_log_format_option = _setting(
    "--log-format",
    type=click.Choice(logs.FORMATS),
    default="text",
    help="text: time, level, logger and message; json: one JSON object per line, for log shippers.",
)
_wait_timeout_option = click.option(
    "--wait-timeout", type=_Seconds(0), default=30.0, help="Seconds to wait for the task to finish."
)
_max_message_bytes_option = _setting(
    "--max-message-bytes",
    type=click.IntRange(1024, _MESSAGE_BYTES_MAX),
    default=config.MAX_MESSAGE_BYTES,
    help="Largest message serve accepts on any socket, or a client verb sends: raise both together.",
)


def _id_argument(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A task's or recurring schedule's id: an integer >= 1 (the server says which exist, however large)."""
    return click.argument(name, type=click.IntRange(min=1))


_secret_key_option = _setting(
    "--secret-key",
    type=click.Path(dir_okay=False),
    help="This peer's own NAME.key_secret (martinet keygen NAME), for a server with keys.",
)
_server_key_option = _setting(
    "--server-key",
    type=click.Path(dir_okay=False),
    help="The server's public .key, for a server with keys.",
)


def _client_command(func: Callable[..., None]) -> Callable[..., None]:
    """Add the connection and --json options to a client verb and call it with a Martinet.

    Put it last, right above the ``def``; the verb is called as ``func(client, as_json, **params)``.
    """

    @_url_option
    @_client_port_option
    @click.option(
        "--timeout",
        type=_Seconds(0, min_open=True),
        default=config.CLIENT_TIMEOUT,
        help="Seconds to wait for each reply from the server.",
    )
    @_max_message_bytes_option
    @_secret_key_option
    @_server_key_option
    @click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON instead of text.")
    @functools.wraps(func)
    def command(
        url: tuple[str, ...],
        client_port: int,
        timeout: float,
        max_message_bytes: int,
        secret_key: str | None,
        server_key: str | None,
        as_json: bool,
        **params: Any,
    ) -> None:
        from martinet_app.client import Martinet

        connection = {"timeout": timeout, "max_request_bytes": max_message_bytes}
        with Martinet(url, client_port, secret_key=secret_key, server_key=server_key, **connection) as client:
            func(client, as_json, **params)

    return command


def _parse_args(ctx: click.Context, param: click.Parameter, value: str | None) -> dict:
    """Decode --args: a JSON object of finite numbers, at most config.MAX_JSON_DEPTH levels deep; ``{}`` if absent."""
    return _args_of(value)


def _args_of(value: str | None) -> dict:
    """A task's args from their JSON text (:func:`_parse_args`); click.BadParameter says what is wrong."""
    if value is None:
        return {}
    try:
        args = protocol.json_value(value)
    except RecursionError:
        depth = config.MAX_JSON_DEPTH
        raise click.BadParameter(f"nests too deeply to read: at most {depth} levels of arrays and objects") from None
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})") from None
    try:
        return protocol.check_args(args)
    except InvalidRequest as exc:
        raise click.BadParameter(exc.message) from None


def _task_options(func: Callable[..., None]) -> Callable[..., None]:
    """Add --args, --username, --description and the task's policy, shared by execute, schedule and every."""
    return click.option(
        "--args",
        callback=_parse_args,
        metavar="JSON",
        help="The handler's data argument, as a JSON object (default {}).",
    )(_shared_options(func))


def _shared_options(func: Callable[..., None]) -> Callable[..., None]:
    """Add --username, --description and the task's policy (every task of a chain gets them).

    The policy reaches the verb as ``retries``, ``retry_delay``, ``task_timeout``, ``priority`` and
    ``limit_key`` (--timeout is the reply timeout already); :func:`_policy` makes the client's arguments of them.
    """
    func = click.option(
        "--limit-key",
        metavar="K",
        help="Count the task under the server's --limit K / --rate K instead of its name, to share them among "
        "tasks of several names.",
    )(func)
    func = click.option(
        "--priority",
        type=click.IntRange(protocol.INT_MIN, protocol.INT_MAX),
        metavar="N",
        help="Higher priorities run first. Default: 0.",
    )(func)
    func = click.option(
        "--task-timeout",
        type=_Seconds(0, min_open=True),
        metavar="S",
        help="Seconds the handler may run before its worker stops it and the task fails. Default: the server's.",
    )(func)
    func = click.option(
        "--retry-delay",
        type=_Seconds(0),
        metavar="S",
        help="Seconds before the first retry, doubling for each further one. Default: the server's.",
    )(func)
    func = click.option(
        "--retries",
        type=click.IntRange(0, protocol.INT_MAX),
        metavar="N",
        help="Times a failing handler is run again. Default: the server's.",
    )(func)
    func = click.option("--description", help="Free text stored with the task.")(func)
    return click.option("--username", help="Who the task is run for (list can filter on it).")(func)


def _parse_after(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """Decode --after: task ids separated by commas (``12,13``); None if absent."""
    if value is None:
        return None
    try:
        after = [int(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected task ids separated by commas (12,13), got {value!r}") from None
    try:
        return protocol.check_after(after)
    except InvalidRequest as exc:
        raise click.BadParameter(exc.message) from None


_after_option = click.option(
    "--after",
    callback=_parse_after,
    metavar="IDS",
    help="Wait until these tasks (ids separated by commas) have all succeeded; cancelled if one fails for good.",
)


def _parse_step(text: str) -> tuple[dict, dict]:
    """A chain step, ``NAME`` or ``NAME=JSON`` (its args), as the client takes it."""
    name, _, args = text.partition("=")
    try:
        return {"name": name}, _args_of(args or None)
    except click.BadParameter as exc:
        raise click.BadParameter(f"step {text!r:.80}: {exc.message}") from None


def _policy(
    retries: int | None,
    retry_delay: float | None,
    task_timeout: float | None,
    priority: int | None,
    limit_key: str | None,
) -> dict:
    """The client's option arguments from the command line's (None: the server's default)."""
    return {
        "retries": retries, "retry_delay": retry_delay, "timeout": task_timeout, "priority": priority,
        "limit_key": limit_key,
    }  # fmt: skip


_tz_option = click.option(
    "--tz",
    metavar="ZONE",
    help="IANA zone of the wall times given (e.g. Europe/Paris). Default: the server's (serve --tz).",
)

_key_option = click.option(
    "--key",
    metavar="K",
    help="Idempotency key: while a task with this key is not yet final, its id is printed instead of adding one.",
)


def _meta(**fields: str | None) -> dict:
    """Task metadata for the client, without the fields left unset."""
    return {key: value for key, value in fields.items() if value is not None}


# ---------------------------------------------------------------- human output


def _echo(as_json: bool, value: Any, render: Callable[[Any], str]) -> None:
    """Print ``value`` as indented JSON, or as the text ``render`` makes of it."""
    click.echo(json.dumps(value, indent=2, sort_keys=True) if as_json else render(value))


def _cell(value: Any) -> str:
    """One value as text: None as ``-``, dicts and lists as JSON."""
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _record_text(record: dict) -> str:
    """Aligned ``field: value`` lines; multi-line strings (tracebacks) come last, indented."""
    blocks = {key: value for key, value in record.items() if isinstance(value, str) and "\n" in value}
    width = max((len(key) for key in record), default=0) + 1
    lines = [f"{key + ':':<{width}} {_cell(value)}" for key, value in record.items() if key not in blocks]
    for key, value in blocks.items():
        lines.append(f"{key}:")
        lines.extend(f"    {line}" for line in value.rstrip("\n").splitlines())
    return "\n".join(lines)


def _table(headers: tuple[str, ...], rows: list[list[str]], empty: str) -> str:
    """Rows under a header, in columns as wide as their widest cell; ``empty`` when there are none."""
    if not rows:
        return empty
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=False)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in [headers, *rows]
    )


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.0f}%"


def _tasks_text(tasks: list[dict]) -> str:
    headers = ("ID", "STATUS", "NAME", "USERNAME", "PROGRESS", "RUN_AT", "FINISHED_AT")
    rows = [
        [
            _cell(t.get("id")),
            _cell(t.get("status")),
            _paused_name(t),
            _cell(t.get("username")),
            _percent(t.get("progress")),
            _cell(t.get("run_at")),
            _cell(t.get("finished_at")),
        ]
        for t in tasks
    ]
    return _table(headers, rows, "no tasks")


def _workers_text(workers: list[dict]) -> str:
    headers = ("ID", "KEY", "HOST", "PID", "SLOTS", "BUSY", "HANDLERS", "LAST_SEEN", "SERVER")
    rows = [
        [
            _cell(w.get("id")),
            _cell(w.get("key")),
            _cell(w.get("host")),
            _cell(w.get("pid")),
            _cell(w.get("slots")),
            _cell(w.get("busy")),
            ",".join(w.get("handlers") or []) or "-",
            _cell(w.get("last_seen")),
            _cell(w.get("server_address")),
        ]
        for w in workers
    ]
    return _table(headers, rows, "no workers")


def _paused_name(record: dict) -> str:
    """A task's or schedule's name, marked ``(paused)`` while its name is paused."""
    return _cell(record.get("name")) + (" (paused)" if record.get("paused") else "")


def _recurring_text(schedules: list[dict]) -> str:
    headers = ("ID", "NAME", "USERNAME", "INTERVAL", "TZ", "NEXT_RUN_AT", "LAST_RUN_AT", "ENABLED")
    keys = ("username", "interval", "tz", "next_run_at", "last_run_at", "enabled")
    rows = [[_cell(s.get("id")), _paused_name(s), *(_cell(s.get(key)) for key in keys)] for s in schedules]
    return _table(headers, rows, "no recurring schedules")


def _stats_text(stats: dict) -> str:
    """Tasks by status, the queue lag, and per name what finished in the last hour."""
    counts = [[status.value, _cell(stats["counts"].get(status.value, 0))] for status in TaskStatus]
    lag = stats["queue_lag"]
    rows = []
    for entry in stats["names"]:
        outcomes = [entry[key] for key in ("succeeded", "failed", "cancelled")]
        ran = outcomes[0] + outcomes[1]  # cancelled tasks add no run time: most never started
        mean = f"{entry['run_seconds'] / ran:.3f}s" if ran else "-"
        rows.append([_cell(entry["name"]), *map(str, outcomes), f"{sum(outcomes) / 60:.2f}", mean])
    return "\n".join(
        [
            _table(("STATUS", "TASKS"), counts, ""),
            f"queue lag: {'-' if lag is None else f'{lag:.1f}s'}",
            "",
            "finished in the last hour:",
            _table(("NAME", "SUCCEEDED", "FAILED", "CANCELLED", "PER_MIN", "MEAN_RUN"), rows, "no task finished"),
        ]
    )


def _exit_for(records: Iterable[dict]) -> None:
    """End as ``wait`` and ``watch`` do: EXIT_TASK_FAILED if any of the tasks ended failed or cancelled."""
    if any(record.get("status") in _UNSUCCESSFUL for record in records):
        sys.exit(EXIT_TASK_FAILED)


def _finish(as_json: bool, record: dict) -> None:
    """Print a finished task's record; exit EXIT_TASK_FAILED if it failed or was cancelled."""
    _echo(as_json, record, _record_text)
    _exit_for([record])


# ---------------------------------------------------------------- client verbs


@main.command()
@click.argument("name")
@_task_options
@_key_option
@_after_option
@click.option("--wait", is_flag=True, help="Wait for the task to finish and print its record (alone, with --json).")
@_wait_timeout_option
@_client_command
def execute(
    client: Martinet,
    as_json: bool,
    name: str,
    args: dict,
    username: str | None,
    description: str | None,
    key: str | None,
    after: list[int] | None,
    wait: bool,
    wait_timeout: float,
    **policy: Any,
) -> None:
    """Queue task NAME to run now (with --after, once those tasks have succeeded) and print its id."""
    meta = _meta(name=name, username=username, description=description, key=key)
    task_id = client.execute(meta, args, after=after, **_policy(**policy))
    if not (wait and as_json):
        _echo(as_json, {"task_id": task_id}, lambda reply: f"task {reply['task_id']} queued{_after_text(after)}")
    if wait:
        _finish(as_json, client.wait(task_id, wait_timeout))


def _after_text(after: list[int] | None) -> str:
    """`` after 12, 13`` for a task submitted with dependencies, else nothing."""
    return f" after {', '.join(map(str, after))}" if after else ""


@main.command()
@click.argument("steps", nargs=-1, required=True, metavar="STEP...")
@_shared_options
@_after_option
@click.option("--wait", is_flag=True, help="Wait for the last step to finish and print its record.")
@_wait_timeout_option
@_client_command
def chain(
    client: Martinet,
    as_json: bool,
    steps: tuple[str, ...],
    username: str | None,
    description: str | None,
    after: list[int] | None,
    wait: bool,
    wait_timeout: float,
    **policy: Any,
) -> None:
    """Queue tasks that each run once the one before has succeeded, in one commit, and print their ids.

    Each STEP is a task NAME, or NAME=JSON with its args: martinet chain fetch 'resize={"w": 640}' publish.
    A step that fails for good cancels the steps after it.
    """
    tasks = [_parse_step(step) for step in steps]
    meta = _meta(username=username, description=description)
    task_ids = client.chain([({**task, **meta}, args) for task, args in tasks], after=after, **_policy(**policy))
    if not (wait and as_json):
        _echo(as_json, {"task_ids": task_ids}, lambda reply: f"tasks {', '.join(map(str, task_ids))} chained")
    if wait:
        _finish(as_json, client.wait(task_ids[-1], wait_timeout))


@main.command()
@click.argument("when")
@click.argument("name")
@_task_options
@_key_option
@_tz_option
@_after_option
@_client_command
def schedule(
    client: Martinet,
    as_json: bool,
    when: str,
    name: str,
    args: dict,
    username: str | None,
    description: str | None,
    key: str | None,
    tz: str | None,
    after: list[int] | None,
    **policy: Any,
) -> None:
    """Run task NAME once at WHEN ('in 20 minutes', '17:30', ISO 8601...) and print its id; with --after, not
    before those tasks have succeeded."""
    meta = _meta(name=name, username=username, description=description, key=key)
    task_id = client.schedule(when, meta, args, tz=tz, after=after, **_policy(**policy))
    _echo(
        as_json,
        {"task_id": task_id},
        lambda reply: f"task {task_id} scheduled for {_cell(client.status(task_id).get('run_at'))}",
    )


@main.command()
@click.argument("interval")
@click.argument("name")
@click.option("--run-at", metavar="WHEN", help="First run (and, for day or week intervals, the time of day).")
@_task_options
@_tz_option
@_client_command
def every(
    client: Martinet,
    as_json: bool,
    interval: str,
    name: str,
    run_at: str | None,
    args: dict,
    username: str | None,
    description: str | None,
    tz: str | None,
    **policy: Any,
) -> None:
    """Run task NAME every INTERVAL ('30 minutes', 'monday', or cron: '0 9 * * mon-fri', '@daily'...) and print
    the schedule's id."""
    meta = _meta(name=name, username=username, description=description, run_at=run_at)
    recurring_id = client.every(interval, meta, args, tz=tz, **_policy(**policy))

    def render(reply: dict) -> str:
        mine = [s for s in client.recurring() if s.get("id") == recurring_id]
        next_run = _cell(mine[0].get("next_run_at")) if mine else "-"
        return f"recurring {recurring_id} created, next run {next_run}"

    _echo(as_json, {"recurring_id": recurring_id}, render)


@main.command()
@_id_argument("task_id")
@_client_command
def status(client: Martinet, as_json: bool, task_id: int) -> None:
    """Print the record of task TASK_ID."""
    _echo(as_json, client.status(task_id), _record_text)


@main.command()
@_id_argument("task_id")
@_wait_timeout_option
@_client_command
def wait(client: Martinet, as_json: bool, task_id: int, wait_timeout: float) -> None:
    """Wait for task TASK_ID to finish and print its record; exit 5 if it failed or was cancelled."""
    _finish(as_json, client.wait(task_id, wait_timeout))


@main.command("watch")
@click.argument("task_ids", metavar="[ID]...", nargs=-1, type=click.IntRange(min=1))
@click.option("--name", help="Follow the tasks of this handler name, also those that come while it runs.")
@click.option(
    "--status",
    type=click.Choice(watch.WATCHABLE_STATUSES),
    help="Follow the tasks in this status (with --name: of that name), also those that come to it. "
    "Default with --name: queued and running.",
)
@click.option(
    "--wait-timeout",
    type=_Seconds(0),
    metavar="S",
    help="Give up (exit 1) if the tasks are not all finished after S seconds. Default: no limit.",
)
@_client_command
def watch_tasks(
    client: Martinet,
    as_json: bool,
    task_ids: tuple[int, ...],
    name: str | None,
    status: str | None,
    wait_timeout: float | None,
) -> None:
    """Show tasks' progress live until they finish; exit 5 if any failed or was cancelled, as wait does.

    Follow tasks ID..., or those --name and --status select: asked again at every poll (about every
    0.3 s), so that matching tasks that come meanwhile join, until no matching task is left unfinished.
    Progress bars with message, elapsed time and ETA on a terminal; else (and with --json, as JSON)
    one line each time a task's status, progress or message changes.
    """
    if bool(task_ids) == bool(name or status):
        raise click.UsageError("give task ids, or --name and/or --status, not both")
    if as_json:
        display: watch.Display = watch.Changes(watch.json_line)
    else:
        display = watch.Bars() if sys.stdout.isatty() else watch.Changes(watch.plain_line)
    records = watch.Watch(client, task_ids, name, status).run(display, wait_timeout)
    if not records and not as_json:
        click.echo("no tasks to watch")
    _exit_for(records)


@main.command()
@_client_command
def stats(client: Martinet, as_json: bool) -> None:
    """Print tasks by status, the queue lag and, per task name, what finished in the last hour: how many
    succeeded, failed and were cancelled, tasks per minute and the mean run time (of those that ran)."""
    _echo(as_json, client.stats(), _stats_text)


@main.command("list")
@click.option("--status", help="Only tasks in this status (waiting, scheduled, queued, running, succeeded...).")
@click.option("--name", help="Only tasks with this handler name.")
@click.option("--username", help="Only tasks run for this user.")
@click.option("--search", metavar="TEXT", help="Only tasks whose description contains TEXT, in any case.")
@click.option("--limit", type=click.IntRange(1, config.LIST_LIMIT_MAX), default=config.LIST_LIMIT, help="Most rows.")
@click.option(
    "--before",
    type=click.IntRange(min=1),
    metavar="ID",
    help="Only tasks with a smaller id: a full page prints the command for the next one on stderr.",
)
@_client_command
def list_tasks(client: Martinet, as_json: bool, **query: Any) -> None:
    """List tasks, newest first, a page at a time."""
    tasks, next_before = client.list_page(**query)
    _echo(as_json, tasks, _tasks_text)
    if next_before is not None:
        click.echo(f"more: {_with_before(click.get_current_context(), next_before)}", err=True)


def _with_before(ctx: click.Context, before: int) -> str:
    """This command line with ``--before before``: the options typed on it, the others left to their defaults."""
    words = ["martinet", str(ctx.info_name), "--before", str(before)]
    for param in ctx.command.params:
        if param.name == "before" or ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        words += [param.opts[0]] if getattr(param, "is_flag", False) else [param.opts[0], str(value)]
    return shlex.join(words)


@main.command()
@_id_argument("task_id")
@_client_command
def cancel(client: Martinet, as_json: bool, task_id: int) -> None:
    """Cancel waiting, scheduled, queued or running task TASK_ID (its worker is told to stop it; the tasks waiting
    for it are cancelled too)."""
    _echo(as_json, client.cancel(task_id), lambda record: f"task {task_id} {_cell(record.get('status'))}")


@main.command()
@_id_argument("task_id")
@_client_command
def retry(client: Martinet, as_json: bool, task_id: int) -> None:
    """Queue failed or cancelled task TASK_ID to run again now."""
    _echo(as_json, client.retry(task_id), lambda record: f"task {task_id} {_cell(record.get('status'))}")


@main.command()
@_client_command
def recurring(client: Martinet, as_json: bool) -> None:
    """List recurring schedules."""
    _echo(as_json, client.recurring(), _recurring_text)


@main.command()
@_id_argument("recurring_id")
@_client_command
def revoke(client: Martinet, as_json: bool, recurring_id: int) -> None:
    """Stop recurring schedule RECURRING_ID; the tasks it created stay in history."""
    _echo(as_json, client.revoke(recurring_id), lambda record: f"recurring {recurring_id} revoked")


def _pause_text(reply: dict) -> str:
    """What a pause or resume did, and every name paused now."""
    state = "paused" if reply["paused"] else "resumed"
    done = f"{reply['name']} {state}" if reply["changed"] else f"{reply['name']} was {state} already"
    return f"{done}; paused now: {', '.join(reply['names']) or 'none'}"


@main.command()
@click.argument("name")
@_client_command
def pause(client: Martinet, as_json: bool, name: str) -> None:
    """Stop dispatching tasks named NAME, on every server of the database, until resume: queued ones stay
    queued, running ones finish."""
    _echo(as_json, client.pause(name), _pause_text)


@main.command()
@click.argument("name")
@_client_command
def resume(client: Martinet, as_json: bool, name: str) -> None:
    """Dispatch tasks named NAME again after a pause."""
    _echo(as_json, client.resume(name), _pause_text)


@main.command()
@click.option(
    "--status",
    "status",
    type=click.Choice(sorted(protocol.FINAL_STATUSES)),
    required=True,
    help="Delete tasks in this final status.",
)
@click.option(
    "--older-than",
    required=True,
    help="...that finished at least this long ago: '1d', '12 hours', '0s' (all of them).",
)
@_client_command
def purge(client: Martinet, as_json: bool, status: str, older_than: str) -> None:
    """Delete finished tasks now, in small batches, and print how many."""
    deleted = client.purge(status, timespec.parse_age(older_than))
    _echo(as_json, {"deleted": deleted}, lambda reply: f"deleted {deleted} {status} task(s)")


@main.command()
@_client_command
def workers(client: Martinet, as_json: bool) -> None:
    """List the workers connected now, to this server and (in a cluster) to the others."""
    _echo(as_json, client.workers(), _workers_text)


@main.command()
@_client_command
def ping(client: Martinet, as_json: bool) -> None:
    """Check that the server answers and print its version."""
    _echo(as_json, client.ping(), lambda reply: f"server at {client.endpoint} is up\n{_record_text(reply)}")


# ---------------------------------------------------------------- keys


@main.command()
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=".",
    help="Directory to write the two files to (made if missing).",
)
def keygen(name: str, directory: str) -> None:
    """Make a CURVE key pair: NAME.key (public) and NAME.key_secret (secret, readable only by you)."""
    from martinet_app import keys

    public, secret = keys.generate(name, directory)
    click.echo(f"public key: {public}\nsecret key: {secret}")
    click.echo(
        f"Copy {public.name} to the server's --client-keys or --worker-keys directory (if this is the server's "
        f"own key: to every client and worker, as --server-key); {secret.name} stays here (--secret-key)."
    )


# ---------------------------------------------------------------- server and worker


@main.command()
@_setting("--bind", default=config.HOST, help="Address to listen on.")
@_client_port_option
@_worker_port_option
@_status_port_option
@_setting(
    "--db",
    "db_url",
    default=config.DB_URL,
    help="Database URL: sqlite:///path.db, postgresql://user@host/db or mysql://user@host/db (MariaDB).",
)
@_setting(
    "--durability",
    type=click.Choice(config.DURABILITIES),
    default=config.DURABILITY,
    help="What a commit survives before the server answers: 'full', an OS crash or power loss; 'process' "
    "(opt-in, faster), only a crash of Martinet.",
)
@_setting("--tz", help="Time zone for schedules (default: local time).")
@_heartbeat_option
@_setting(
    "--default-retries",
    type=click.IntRange(0, protocol.INT_MAX),
    default=config.DEFAULT_RETRIES,
    help="Retries of a task that does not give its own.",
)
@_setting(
    "--default-retry-delay",
    type=_Seconds(0),
    default=config.DEFAULT_RETRY_DELAY,
    help="Seconds before the first retry of a task that does not give its own; doubling for each further one.",
)
@_setting(
    "--default-timeout",
    type=_Seconds(0, min_open=True),
    default=config.DEFAULT_TIMEOUT,
    help="Seconds a handler may run, for a task that does not give its own (default: no limit).",
)
@_setting(
    "--retry-delay-max",
    type=_Seconds(0),
    default=config.RETRY_DELAY_MAX,
    help="Longest wait before a retry, seconds: the cap of the doubling.",
)
@_setting(
    "--max-deliveries",
    type=click.IntRange(1, protocol.INT_MAX),
    default=config.MAX_DELIVERIES,
    help="Deliveries lost with their worker after which a task fails instead of being delivered again.",
)
@_setting(
    "--keep-succeeded",
    default="7d",
    callback=lambda ctx, param, value: _parse_keep(value, param),
    help="Delete succeeded tasks this long after they finished ('7d', '12 hours'), or 'forever' to keep them.",
)
@_setting(
    "--keep-failed",
    default="30d",
    callback=lambda ctx, param, value: _parse_keep(value, param),
    help="The same for failed and cancelled tasks.",
)
@_max_message_bytes_option
@_secret_key_option
@_setting(
    "--client-keys",
    type=click.Path(file_okay=False),
    help="Directory of the public keys (*.key) allowed on the client port; with --secret-key.",
)
@_setting(
    "--worker-keys",
    type=click.Path(file_okay=False),
    help="Directory of the public keys (*.key) allowed on the worker and status ports; with --secret-key.",
)
@_setting(
    "--http-port",
    type=click.IntRange(0, 65535),
    default=config.HTTP_PORT,
    help="Port of the dashboard, the HTTP API and /metrics, on the --bind address; 0 turns it off.",
)
@_setting(
    "--http-token",
    help="Token the HTTP port asks for (a bearer header, or the dashboard's login); needed off loopback.",
)
@_setting(
    "--http-read-token",
    help="A second token that may read the HTTP port but take no action; with --http-token.",
)
@_setting(
    "--insecure",
    is_flag=True,
    help="Serve without keys or HTTP token on an address off loopback, open to whoever reaches the ports, on purpose.",
)
@_setting(
    "--limit",
    "limit",
    multiple=True,
    metavar="KEY=N",
    help="At most N tasks of KEY running at once, across workers and servers (repeatable; MARTINET_LIMIT "
    "separates several with spaces). KEY is a task name, or the limit key that tasks give with --limit-key.",
)
@_setting(
    "--rate",
    "rate",
    multiple=True,
    metavar="KEY=N/s|m|h",
    help="At most N starts of tasks of KEY per second, minute or hour, across workers and servers (repeatable; "
    "MARTINET_RATE separates several with spaces).",
)
@_log_level_option
@_log_format_option
def serve(
    bind: str,
    client_port: int,
    worker_port: int,
    status_port: int,
    db_url: str,
    durability: str,
    tz: str | None,
    heartbeat: float,
    default_retries: int,
    default_retry_delay: float,
    default_timeout: float | None,
    retry_delay_max: float,
    max_deliveries: int,
    max_message_bytes: int,
    secret_key: str | None,
    client_keys: str | None,
    worker_keys: str | None,
    http_port: int,
    http_token: str | None,
    http_read_token: str | None,
    insecure: bool,
    keep_succeeded: float | None,
    keep_failed: float | None,
    limit: tuple[str, ...],
    rate: tuple[str, ...],
    log_level: str,
    log_format: str,
) -> None:
    """Run the server: store tasks, schedule them and dispatch them to workers."""
    logs.setup(log_level, log_format)
    from martinet_app.server import run_server

    sys.exit(
        run_server(
            bind=bind,
            client_port=client_port,
            worker_port=worker_port,
            status_port=status_port,
            db_url=db_url,
            durability=durability,
            tz=tz,
            heartbeat=heartbeat,
            default_retries=default_retries,
            default_retry_delay=default_retry_delay,
            default_timeout=default_timeout,
            retry_delay_max=retry_delay_max,
            max_message_bytes=max_message_bytes,
            max_deliveries=max_deliveries,
            secret_key=secret_key,
            client_keys=client_keys,
            worker_keys=worker_keys,
            http_port=http_port,
            http_token=http_token,
            http_read_token=http_read_token,
            insecure=insecure,
            keep_succeeded=keep_succeeded,
            keep_failed=keep_failed,
            limit=limit,
            rate=rate,
        )
    )


@main.command()
@_setting(
    "--handlers",
    "handlers_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Directory of handler modules to load.",
)
@_url_option
@_worker_port_option
@_status_port_option
@_setting(
    "--concurrency",
    type=click.IntRange(1, _SLOTS_MAX),
    default=config.CONCURRENCY,
    help="Tasks run at once.",
)
@_setting(
    "--prefetch",
    type=click.IntRange(0, _SLOTS_MAX),
    default=config.PREFETCH,
    help="Tasks held waiting for a free slot beyond those running (they wait behind this worker's running ones). "
    "Default: automatic, about 50 ms of work per slot by recent task durations, none for long tasks.",
)
@_setting(
    "--path",
    "paths",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Folder of extra Python packages for handlers (repeatable; MARTINET_PATH separates them with ':').",
)
@_heartbeat_option
@_setting(
    "--grace",
    type=_Seconds(0),
    default=config.WORKER_GRACE,
    help="Seconds running tasks get to finish after SIGTERM/SIGINT before they are handed back.",
)
@_secret_key_option
@_server_key_option
@_log_level_option
@_log_format_option
def work(
    handlers_dir: str,
    url: tuple[str, ...],
    worker_port: int,
    status_port: int,
    concurrency: int,
    prefetch: int | None,
    paths: tuple[str, ...],
    heartbeat: float,
    grace: float,
    secret_key: str | None,
    server_key: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run a worker: load the handlers and run the tasks the server sends."""
    logs.setup(log_level, log_format)
    from martinet_app.worker import run_worker

    sys.exit(
        run_worker(
            handlers_dir=handlers_dir,
            url=url,
            worker_port=worker_port,
            status_port=status_port,
            concurrency=concurrency,
            prefetch=prefetch,
            heartbeat=heartbeat,
            grace=grace,
            paths=paths,
            secret_key=secret_key,
            server_key=server_key,
        )
    )

"""The ``martinet`` command run as a real subprocess, with no server: help, version, usage and connection errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import martinet_app
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
VERBS = (
    "execute",
    "chain",
    "schedule",
    "every",
    "status",
    "wait",
    "watch",
    "list",
    "cancel",
    "retry",
    "recurring",
    "revoke",
    "pause",
    "resume",
    "purge",
    "workers",
    "stats",
    "ping",
    "serve",
    "work",
    "keygen",
)


def run(
    *args: str, env: dict[str, str] | None = None, python_flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run ``python -m martinet_app ARGS`` with no MARTINET_* settings inherited from the caller."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("MARTINET_")}
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "martinet_app", *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int) -> None:
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("martinet: error: "), proc.stderr


def test_help_lists_every_verb() -> None:
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_help(verb: str) -> None:
    proc = run(verb, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"Usage: martinet {verb}" in proc.stdout


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"martinet, version {martinet_app.__version__}"


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2 with click's usage message: nothing on stdout, no traceback, every needle on stderr."""
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


HANDLERS = str(ROOT / "tests" / "handlers")
SECONDS = "0<=x<=31536000"
POSITIVE_SECONDS = "0<x<=31536000"
INT32 = "0<=x<=2147483647"


@pytest.mark.parametrize(
    ("args", "option", "accepted"),
    [
        (("wait", "1", "--wait-timeout", "1e308"), "--wait-timeout", SECONDS),
        (("execute", "x", "--wait", "--wait-timeout", "inf"), "--wait-timeout", SECONDS),
        (("wait", "1", "--wait-timeout", "nan"), "--wait-timeout", SECONDS),
        (("ping", "--timeout", "inf"), "--timeout", POSITIVE_SECONDS),
        (("ping", "--timeout", "nan"), "--timeout", POSITIVE_SECONDS),
        (("ping", "--timeout", "0"), "--timeout", POSITIVE_SECONDS),
        (("execute", "x", "--task-timeout", "nan"), "--task-timeout", POSITIVE_SECONDS),
        (("schedule", "in 1 hour", "x", "--task-timeout", "inf"), "--task-timeout", POSITIVE_SECONDS),
        (("every", "1 hour", "x", "--retry-delay", "-inf"), "--retry-delay", SECONDS),
        (("execute", "x", "--retry-delay", "1e999"), "--retry-delay", SECONDS),
        (("execute", "x", "--retries", str(2**31)), "--retries", INT32),
        (("execute", "x", "--priority", str(-(2**31) - 1)), "--priority", "-2147483648<=x<=2147483647"),
        (("execute", "x", "--priority", str(2**63)), "--priority", "-2147483648<=x<=2147483647"),
        (("list", "--limit", "0"), "--limit", "1<=x<=10000"),
        (("list", "--limit", "10001"), "--limit", "1<=x<=10000"),
        (("list", "--before", "0"), "--before", "x>=1"),
        (("status", "0"), "TASK_ID", "x>=1"),
        (("wait", "0"), "TASK_ID", "x>=1"),
        (("watch", "1", "0"), "[ID]...", "x>=1"),
        (("watch", "1", "--wait-timeout", "nan"), "--wait-timeout", SECONDS),
        (("cancel", "0"), "TASK_ID", "x>=1"),
        (("retry", "0"), "TASK_ID", "x>=1"),
        (("revoke", "0"), "RECURRING_ID", "x>=1"),
        (("ping", "--max-message-bytes", "1000"), "--max-message-bytes", "1024<=x<=1073741824"),
        (("serve", "--heartbeat", "nan"), "--heartbeat", POSITIVE_SECONDS),
        (("serve", "--default-timeout", "inf"), "--default-timeout", POSITIVE_SECONDS),
        (("serve", "--default-retry-delay", "1e308"), "--default-retry-delay", SECONDS),
        (("serve", "--retry-delay-max", "nan"), "--retry-delay-max", SECONDS),
        (("serve", "--default-retries", str(2**31)), "--default-retries", INT32),
        (("serve", "--max-deliveries", "0"), "--max-deliveries", "1<=x<=2147483647"),
        (("serve", "--max-message-bytes", str(2**63)), "--max-message-bytes", "1024<=x<=1073741824"),
        (("work", "--handlers", HANDLERS, "--heartbeat", "inf"), "--heartbeat", POSITIVE_SECONDS),
        (("work", "--handlers", HANDLERS, "--grace", "nan"), "--grace", SECONDS),
        (("work", "--handlers", HANDLERS, "--concurrency", "10001"), "--concurrency", "1<=x<=10000"),
        (("work", "--handlers", HANDLERS, "--prefetch", "10001"), "--prefetch", "0<=x<=10000"),
    ],
)
def test_out_of_range_numbers_are_usage_errors(args: tuple[str, ...], option: str, accepted: str) -> None:
    assert_usage_error(run(*args), f"Invalid value for '{option}'", accepted)


def test_out_of_range_number_from_the_environment_is_a_usage_error() -> None:
    proc = run("serve", env={"MARTINET_HEARTBEAT": "nan"})
    assert_usage_error(proc, "'--heartbeat' (env var: 'MARTINET_HEARTBEAT')", POSITIVE_SECONDS)


def deep(levels: int) -> str:
    """A JSON object whose one value nests ``levels`` - 1 arrays: ``levels`` levels in all."""
    return '{"a": ' + "[" * (levels - 1) + "]" * (levels - 1) + "}"


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("{not json", "not valid JSON (Expecting property name"),
        ("[1, 2]", "task args must be a JSON object, got list"),
        ('{"x": NaN}', "not valid JSON (NaN is not a JSON value)"),
        ('{"x": -Infinity}', "not valid JSON (-Infinity is not a JSON value)"),
        ('{"x": 1e400}', "not valid JSON (1e400 is out of the range of a double)"),
        (deep(101), "nest more than 100 levels of arrays and objects"),
        ("[" * 2000, "nests too deeply to read: at most 100 levels of arrays and objects"),
        (deep(2000), "nests too deeply to read: at most 100 levels of arrays and objects"),
    ],
)
def test_bad_args_are_usage_errors(value: str, needle: str) -> None:
    assert_usage_error(run("execute", "add", "--args", value), "Invalid value for '--args'", needle)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("execute", "echo", "--after", "12,x"), "expected task ids separated by commas (12,13), got '12,x'"),
        (("schedule", "now", "echo", "--after", "0"), "'after' must be a list of at most 100 task ids"),
        (("execute", "echo", "--after", ",".join(map(str, range(1, 102)))), "at most 100 task ids"),
        (("chain", "echo", "resize={w"), "step 'resize={w': not valid JSON"),
    ],
)
def test_bad_dependencies_and_steps_are_usage_errors(args: tuple[str, ...], needle: str) -> None:
    assert_usage_error(run(*args), needle)


def test_args_at_the_depth_limit_reach_the_server() -> None:
    port = free_port()
    proc = run("execute", "add", "--args", deep(100), "--client-port", str(port), "--timeout", "0.3")
    assert_one_line_error(proc, 3)
    assert f":{port}" in proc.stderr


@pytest.mark.parametrize("verb", [("ping",), ("status", "1"), ("list", "--json"), ("watch", "1"), ("stats",)])
def test_unreachable_server_exits_3_with_one_line(verb: tuple[str, ...]) -> None:
    port = free_port()
    proc = run(*verb, "--client-port", str(port), "--timeout", "0.3")
    assert_one_line_error(proc, 3)
    assert f":{port}" in proc.stderr


def test_client_port_from_environment() -> None:
    port = free_port()
    proc = run("workers", "--timeout", "0.3", env={"MARTINET_CLIENT_PORT": str(port)})
    assert_one_line_error(proc, 3)
    assert f":{port}" in proc.stderr


def test_work_requires_an_existing_handlers_directory() -> None:
    proc = run("work", "--handlers", "/nonexistent")
    assert proc.returncode == 2
    assert "/nonexistent" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [("--help",), ("serve", "--help"), ("work", "--help")])
def test_help_does_not_import_gevent_or_peewee(args: tuple[str, ...]) -> None:
    proc = run(*args, python_flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr
    assert "gevent" not in proc.stderr
    assert "peewee" not in proc.stderr


def test_client_verb_does_not_import_gevent_or_peewee() -> None:
    proc = run("status", "1", "--client-port", str(free_port()), "--timeout", "0.1", python_flags=("-X", "importtime"))
    assert proc.returncode == 3, proc.stderr
    assert "gevent" not in proc.stderr
    assert "peewee" not in proc.stderr

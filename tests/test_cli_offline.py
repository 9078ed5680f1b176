"""The ``martinet`` command run as a real subprocess, with no server: help, version, usage and connection errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import martinet_app

ROOT = Path(__file__).resolve().parents[1]
VERBS = (
    "execute",
    "schedule",
    "every",
    "status",
    "wait",
    "list",
    "cancel",
    "retry",
    "recurring",
    "revoke",
    "workers",
    "ping",
    "serve",
    "work",
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


def free_port() -> int:
    """A TCP port nothing listens on (bound to port 0, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def test_execute_rejects_invalid_json_args() -> None:
    proc = run("execute", "add", "--args", "{not json")
    assert_one_line_error(proc, 2)
    assert "--args is not valid JSON" in proc.stderr


def test_execute_rejects_non_object_args() -> None:
    proc = run("execute", "add", "--args", "[1, 2]")
    assert_one_line_error(proc, 2)
    assert "--args must be a JSON object, got list" in proc.stderr


@pytest.mark.parametrize("verb", [("ping",), ("status", "1"), ("list", "--json")])
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

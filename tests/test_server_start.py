"""Servers starting at once on one database (#12, first part): PostgreSQL and MariaDB create the schema once;
SQLite takes one server."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest

from conftest import Server, reset_mysql, reset_postgres, wait_until


@pytest.mark.parametrize("db_url", ["postgres", "mysql"], indirect=True)
def test_servers_started_together_on_a_fresh_database_all_serve(db_url: str, tmp_path: Path) -> None:
    for round_ in range(3):  # a fresh database each round: the race is in creating the tables
        if round_:
            (reset_mysql if db_url.startswith("mysql") else reset_postgres)()
        servers = [Server(db_url, tmp_path / f"server-{round_}-{n}.log") for n in range(3)]
        try:
            for server in servers:
                server.start()
            for server in servers:
                server.wait_ready()
        finally:
            statuses = [server.terminate() for server in servers if server.proc is not None]
        assert statuses == [0, 0, 0], "\n".join(server.log() for server in servers)


def test_a_second_server_on_one_sqlite_file_refuses_to_start(sqlite_url: str, tmp_path: Path) -> None:
    first = Server(sqlite_url, tmp_path / "first.log").start().wait_ready()
    second = Server(sqlite_url, tmp_path / "second.log").start()
    try:
        assert second.proc.wait(timeout=20) == 2
        path = sqlite_url.removeprefix("sqlite:///")
        assert f"the SQLite database {path} is served by another martinet serve (pid {first.pid})" in second.log()
        assert first.running()
    finally:
        assert first.terminate() == 0
    third = Server(sqlite_url, tmp_path / "third.log").start().wait_ready()  # the lock went with the first
    assert third.terminate() == 0
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()


def test_the_sqlite_lock_goes_with_a_killed_server(sqlite_url: str, tmp_path: Path) -> None:
    first = Server(sqlite_url, tmp_path / "first.log").start().wait_ready()
    first.kill()
    second = Server(sqlite_url, tmp_path / "second.log").start()
    try:
        wait_until(lambda: second.running() and "serving" in second.log(), what="the second server to serve")
    finally:
        assert second.terminate() == 0


def test_a_taken_http_port_stops_the_start_with_exit_3(sqlite_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Server(sqlite_url, tmp_path / "server.log", "--http-port", str(port)).start()
        try:
            assert server.proc.wait(timeout=20) == 3
        finally:
            server.terminate()
    assert f"cannot bind HTTP on 127.0.0.1:{port}" in server.log() and "--http-port" in server.log()
    restarted = Server(sqlite_url, tmp_path / "again.log").start().wait_ready()  # the SQLite lock went with it
    assert restarted.terminate() == 0

"""``serve --durability``: ``full`` (the default) syncs every commit to the disk; ``process``, an opt-in,
leaves it to the OS (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit=off)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Process, Server, martinet_cmd
from martinet_app.errors import ConfigError
from martinet_app.store import Store

# What each backend reports for each durability: SQLite's PRAGMA synchronous (2 FULL, 1 NORMAL),
# PostgreSQL's synchronous_commit, MariaDB's innodb_flush_log_at_trx_commit (the server's: "process" is refused).
_SETTING = {
    "sqlite": ("PRAGMA synchronous", {"full": 2, "process": 1}),
    "postgresql": ("SHOW synchronous_commit", {"full": "on", "process": "off"}),
    "mysql": ("SELECT @@innodb_flush_log_at_trx_commit", {"full": 1}),
}


@pytest.mark.parametrize("durability", ["full", "process"])
def test_the_store_commits_as_its_durability_says(db_url: str, durability: str) -> None:
    query, expected = _SETTING[db_url.split(":")[0]]
    if durability not in expected:
        with pytest.raises(ConfigError, match="innodb_flush_log_at_trx_commit"):
            Store.open(db_url, durability=durability)
        return
    store = Store.open(db_url, durability=durability)
    try:
        with store.transaction():
            (value,) = store.db.execute_sql(query).fetchone()
    finally:
        store.close()
    assert value == expected[durability]


def test_full_is_the_default(sqlite_url: str) -> None:
    store = Store.open(sqlite_url)
    try:
        with store.transaction():
            assert store.db.execute_sql("PRAGMA synchronous").fetchone() == (2,)
    finally:
        store.close()


def test_an_unknown_durability_is_a_config_error(sqlite_url: str) -> None:
    with pytest.raises(ConfigError, match="unknown durability 'fast': expected one of full, process"):
        Store.open(sqlite_url, durability="fast")


def test_a_server_with_durability_process_says_so_and_runs_tasks(sqlite_url: str, tmp_path: Path) -> None:
    server = Server(sqlite_url, tmp_path / "server.log", "--durability", "process").start_ready()
    worker = Process(server.worker_args(), tmp_path / "worker.log").start()
    try:
        assert "(durability process)" in server.log()
        with server.client() as m:
            task = m.wait(m.execute({"name": "echo"}, {"x": 1}), timeout=30)
        assert task["status"] == "succeeded", task
    finally:
        worker.terminate()
        assert server.terminate() == 0


def test_serve_refuses_an_unknown_durability(tmp_path: Path) -> None:
    proc = Process(martinet_cmd("serve", "--durability", "fast"), tmp_path / "serve.log").start()
    assert proc.proc.wait(timeout=30) == 2
    assert "Invalid value for '--durability'" in proc.log()

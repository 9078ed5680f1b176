"""The Python client against a real server: oversized and deep requests, huge timeouts, ids, iter_tasks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import Cluster
from martinet_app import Martinet, config
from martinet_app.errors import ConfigError, InvalidRequest, RequestTooLarge, TaskNotFound

ECHO = {"name": "echo"}
#: Seconds the client waits for a reply in these tests; a refusal must come far sooner.
REPLY_TIMEOUT = 5.0


def nested(levels: int) -> dict:
    """An object ``levels`` levels deep (``{}`` is one): ``{"a": [[...]]}``, built without recursion."""
    inner: list = []
    for _ in range(levels - 2):
        inner = [inner]
    return {"a": inner}


SUBMISSIONS: dict[str, Callable[[Martinet, dict], Any]] = {
    "execute": lambda client, args: client.execute(ECHO, args),
    "schedule": lambda client, args: client.schedule("in 1 hour", ECHO, args),
    "every": lambda client, args: client.every("1 hour", ECHO, args),
    "execute_many": lambda client, args: client.execute_many([(ECHO, {}), (ECHO, args)]),
}


def refused_fast(call: Callable[[], Any], error: type[Exception]) -> str:
    """Run ``call``, which must raise ``error`` well within REPLY_TIMEOUT; its message."""
    start = time.monotonic()
    with pytest.raises(error) as caught:
        call()
    assert time.monotonic() - start < REPLY_TIMEOUT / 5, "refused only after waiting for a reply"
    return caught.value.message


def assert_nothing_stored(cluster: Cluster, client: Martinet) -> None:
    """The server still answers, and holds no task and no recurring schedule."""
    assert client.ping()["version"]
    assert client.list() == [] and client.recurring() == []


@pytest.mark.parametrize("op", sorted(SUBMISSIONS))
def test_request_too_large_is_refused_before_sending(sqlite_cluster: Cluster, op: str) -> None:
    client = sqlite_cluster.server.client(timeout=REPLY_TIMEOUT)
    big = {"blob": "x" * (17 * 1024 * 1024)}
    message = refused_fast(lambda: SUBMISSIONS[op](client, big), RequestTooLarge)
    size = int(message.split(" bytes")[0].rsplit(" ", 1)[1])
    assert size > 17 * 1024 * 1024
    assert message.startswith(f"{op}: the request is {size} bytes, more than the {config.MAX_MESSAGE_BYTES} bytes ")
    assert "pass a reference" in message and "--max-message-bytes" in message and "max_request_bytes" in message
    assert_nothing_stored(sqlite_cluster, client)
    assert client.execute(ECHO, {"small": True}) >= 1  # the next request is answered


def test_max_request_bytes_sets_the_limit(sqlite_cluster: Cluster) -> None:
    client = Martinet("127.0.0.1", sqlite_cluster.server.client_port, timeout=REPLY_TIMEOUT, max_request_bytes=2048)
    task_id = client.execute(ECHO, {"x": "y" * 1000})
    message = refused_fast(lambda: client.execute(ECHO, {"x": "y" * 3000}), RequestTooLarge)
    assert "more than the 2048 bytes" in message
    assert [t["id"] for t in client.list()] == [task_id]


@pytest.mark.parametrize("value", [0, -1, 1.5, "16", True, None])
def test_max_request_bytes_must_be_a_positive_integer(value: Any) -> None:
    with pytest.raises(ConfigError, match="max_request_bytes must be an integer >= 1"):
        Martinet(max_request_bytes=value)


@pytest.mark.parametrize("op", sorted(SUBMISSIONS))
@pytest.mark.parametrize("levels", [config.MAX_JSON_DEPTH + 1, 5_000])
def test_deep_args_are_refused_before_encoding(sqlite_cluster: Cluster, op: str, levels: int) -> None:
    client = sqlite_cluster.server.client(timeout=REPLY_TIMEOUT)
    message = refused_fast(lambda: SUBMISSIONS[op](client, nested(levels)), InvalidRequest)
    assert f"more than {config.MAX_JSON_DEPTH} levels" in message
    if op == "execute_many":
        assert message.startswith("tasks[1]: ")
    assert_nothing_stored(sqlite_cluster, client)


def test_args_at_the_depth_limit_are_stored(sqlite_cluster: Cluster) -> None:
    client = sqlite_cluster.client
    args = nested(config.MAX_JSON_DEPTH)
    assert client.status(client.execute(ECHO, args))["args"] == args


def test_too_deep_to_encode_anywhere_is_an_invalid_request(sqlite_cluster: Cluster) -> None:
    client = sqlite_cluster.server.client(timeout=REPLY_TIMEOUT)
    deep_name = {**ECHO, "description": nested(5_000)}  # not args: only the encoder meets it
    message = refused_fast(lambda: client.execute(deep_name, {}), InvalidRequest)
    assert message.startswith("execute: arguments nest too deeply to encode")
    assert_nothing_stored(sqlite_cluster, client)


def test_huge_timeouts_do_not_overflow(sqlite_cluster: Cluster) -> None:
    port = sqlite_cluster.server.client_port
    client = Martinet("127.0.0.1", port, timeout=1e300)
    assert client.ping()["version"]
    task_id = client.schedule("in 1 hour", ECHO)
    client.cancel(task_id)
    assert client.wait(task_id, 1e308)["status"] == "cancelled"


def test_wait_for_a_running_task_with_a_huge_timeout(sqlite_cluster: Cluster) -> None:
    sqlite_cluster.start_worker()
    client = sqlite_cluster.client
    task_id = client.execute({"name": "nap"}, {"seconds": 0.3})
    assert client.wait(task_id, 1e308)["status"] == "succeeded"


@pytest.mark.parametrize("value", [math.nan, math.inf, -1, "5", True])
def test_unusable_timeouts_are_refused(value: Any) -> None:
    with pytest.raises(ConfigError, match="the client timeout must be a finite number of seconds >= 0"):
        Martinet(timeout=value)
    with pytest.raises(InvalidRequest, match="the wait timeout must be a finite number of seconds >= 0"):
        Martinet().wait(1, value)


def test_ids_beyond_64_bits_are_not_found(cluster: Cluster) -> None:
    client = cluster.client
    for call in (client.status, client.cancel, client.retry, lambda task_id: client.wait(task_id, 1)):
        with pytest.raises(TaskNotFound, match=f"no task with id {config.MAX_ID + 1}"):
            call(config.MAX_ID + 1)
    with pytest.raises(TaskNotFound, match=f"no recurring schedule with id {config.MAX_ID + 1}"):
        client.revoke(config.MAX_ID + 1)


def test_iter_tasks_pages_through_every_match(cluster: Cluster) -> None:
    client = cluster.client
    mine = client.execute_many([({**ECHO, "username": "pager"}, {"n": n}) for n in range(25)])
    client.execute_many([({**ECHO, "username": "other"}, {}) for _ in range(7)])  # interleaved below
    mine += client.execute_many([({**ECHO, "username": "pager"}, {}) for _ in range(3)])

    tasks = list(client.iter_tasks(username="pager", page=10))
    ids = [t["id"] for t in tasks]
    assert ids == sorted(mine, reverse=True)  # strictly decreasing, none missing, none repeated
    assert all(not {"args", "result", "traceback", "errors"} & set(t) for t in tasks)
    assert {t["username"] for t in tasks} == {"pager"} and {t["status"] for t in tasks} == {"queued"}

    first, next_before = client.list_page(username="pager", limit=10)
    assert [t["id"] for t in first] == ids[:10] and next_before == ids[9]
    assert [t["id"] for t in client.list(username="pager", limit=10, before=next_before)] == ids[10:20]
    assert client.list_page(username="pager", limit=10, before=ids[19]) == (tasks[20:], None)
    assert [t["id"] for t in client.iter_tasks(username="pager", page=len(ids))] == ids  # a full last page


def test_iter_tasks_does_not_list_tasks_added_meanwhile(cluster: Cluster) -> None:
    client = cluster.client
    ids = client.execute_many([(ECHO, {}) for _ in range(12)])
    pages = client.iter_tasks(page=5)
    seen = [next(pages)["id"] for _ in range(5)]
    added = client.execute(ECHO, {})
    seen += [t["id"] for t in pages]
    assert seen == sorted(ids, reverse=True) and added not in seen
    assert list(client.iter_tasks(status="running")) == []


def test_clients_dropped_without_close_leave_no_sockets(sqlite_cluster: Cluster) -> None:
    # More clients than a ZeroMQ context holds sockets (1023), each with its handshake monitor.
    for _ in range(1200):
        Martinet("127.0.0.1", sqlite_cluster.server.client_port, timeout=REPLY_TIMEOUT).ping()

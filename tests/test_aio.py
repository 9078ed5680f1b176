"""The asyncio client (martinet_app.aio) against a real server and worker.

pytest has no asyncio plugin here: each test runs its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import zmq

from conftest import free_port
from martinet_app import aio
from martinet_app.errors import (
    BadTimeSpec,
    ConfigError,
    InvalidRequest,
    InvalidTransition,
    ServerUnavailable,
    TaskNotFound,
    WaitTimeout,
)


def client(cluster, timeout: float = 5.0) -> aio.Martinet:
    return aio.Martinet("127.0.0.1", cluster.server.client_port, timeout=timeout)


def test_every_verb(cluster):
    cluster.start_worker()

    async def run() -> int:
        async with client(cluster) as m:
            assert (await m.ping())["protocol"] == 1
            task_id = await m.execute({"name": "echo", "description": "first"}, {"n": 1}, retries=1)
            done = await m.wait(task_id, timeout=30)
            assert done["status"] == "succeeded" and done["result"] == {"task_id": task_id, "args": {"n": 1}}
            assert (await m.status(task_id))["retries"] == 1
            many = await m.execute_many([({"name": "echo"}, {"i": i}) for i in range(3)], priority=2)
            assert len(set(many)) == 3 and task_id not in many
            later = await m.schedule("in 1 hour", {"name": "echo"}, key="later-1")
            assert await m.schedule("in 2 hours", {"name": "echo"}, key="later-1") == later, "the key dedupes"
            assert (await m.status(later))["status"] == "scheduled"
            assert (await m.cancel(later))["status"] == "cancelled"
            assert (await m.retry(later))["status"] == "queued"
            recurring_id = await m.every("1 hour", {"name": "echo", "run_at": "in 1 hour"})
            assert [r["id"] for r in await m.recurring()] == [recurring_id]
            assert (await m.revoke(recurring_id))["id"] == recurring_id
            assert [w["pid"] for w in await m.workers()] == [cluster.workers[0].pid]
            for each in many:
                await m.wait(each, timeout=30)
            await m.wait(later, timeout=30)
            listed = await m.list(name="echo", limit=2)
            assert [t["id"] for t in listed] == [later, many[2]]
            page, before = await m.list_page(limit=2)
            assert [t["id"] for t in page] == [later, many[2]] and before == many[2]
            assert [t["id"] for t in await m.list(search="FIRST")] == [task_id]
            stats = await m.stats()
            assert stats["counts"]["succeeded"] == 5 and "queue_lag" in stats
            bulk = await m.bulk("retry", status="succeeded", limit=2)
            assert bulk["done"] == [] and [f["id"] for f in bulk["failed"]] == [later, many[2]]
            assert {f["error"]["type"] for f in bulk["failed"]} == {"InvalidTransition"}
            pending = await m.schedule("in 1 hour", {"name": "echo"})
            assert await m.bulk("cancel", status="scheduled") == {"done": [pending], "failed": []}
            assert await m.purge("succeeded", "0s", batch=2) == 5
            return pending

    pending = asyncio.run(run())
    assert [(t["id"], t["status"]) for t in cluster.client.list()] == [(pending, "cancelled")], "as the sync one sees"


def test_cron_and_zones(sqlite_cluster):
    async def run() -> None:
        async with client(sqlite_cluster) as m:
            rid = await m.every("@daily", {"name": "echo"}, tz="Asia/Tokyo")
            [schedule] = await m.recurring()
            assert (schedule["id"], schedule["interval"], schedule["tz"]) == (rid, "@daily", "Asia/Tokyo")
            assert schedule["next_run_at"].endswith("T15:00:00.000+00:00")  # midnight in Tokyo
            task_id = await m.schedule("tomorrow at 9am", {"name": "echo"}, tz="America/Los_Angeles")
            assert (await m.status(task_id))["run_at"][11:13] in ("16", "17")  # 09:00 PDT or PST
            with pytest.raises(BadTimeSpec, match="unknown time zone 'Pacific/Atlantis'"):
                await m.every("1 hour", {"name": "echo"}, tz="Pacific/Atlantis")
            with pytest.raises(BadTimeSpec, match="unknown time zone 'Mars'"):
                await m.schedule("in 1 hour", {"name": "echo"}, tz="Mars")
            with pytest.raises(BadTimeSpec, match=r"bad cron expression '\*/15 \* \* \*'"):
                await m.every("*/15 * * *", {"name": "echo"})

    asyncio.run(run())
    assert len(sqlite_cluster.client.recurring()) == 1 and len(sqlite_cluster.client.list()) == 1


def test_many_executes_in_flight_on_one_client(cluster):
    cluster.start_worker()

    async def run() -> list[int]:
        async with client(cluster) as m:
            return await asyncio.gather(*(m.execute({"name": "echo"}, {"i": i}) for i in range(64)))

    ids = asyncio.run(run())
    assert len(set(ids)) == 64
    sync = cluster.client
    for i, task_id in enumerate(ids):
        task = sync.wait(task_id, timeout=30)
        assert task["status"] == "succeeded" and task["args"] == {"i": i}, "each reply went to its own call"
    assert len(sync.list(limit=100)) == 64


def test_concurrent_waits(sqlite_cluster):
    """Waits in flight together: the one on a short task returns while the one on a long task is still parked."""
    sqlite_cluster.start_worker("--concurrency", "4")

    async def run() -> None:
        async with client(sqlite_cluster) as m:
            seconds = [1.5, 0.1, 0.1, 0.1]
            ids = [await m.execute({"name": "nap"}, {"seconds": s}) for s in seconds]
            ended: dict[int, float] = {}

            async def wait(task_id: int) -> dict:
                task = await m.wait(task_id, timeout=30)
                ended[task_id] = time.monotonic()
                return task

            tasks = await asyncio.gather(*(wait(task_id) for task_id in ids))
            assert [t["status"] for t in tasks] == ["succeeded"] * 4 and [t["id"] for t in tasks] == ids
            assert max(ended[i] for i in ids[1:]) < ended[ids[0]] - 0.5, "the short waits did not queue behind"
            with pytest.raises(WaitTimeout, match="did not finish within 0.2 s"):
                await m.wait(await m.execute({"name": "nap"}, {"seconds": 5}), timeout=0.2)

    asyncio.run(run())


def test_iter_tasks_pages(sqlite_cluster):
    ids = sqlite_cluster.client.execute_many([({"name": "echo"}, None)] * 7)

    async def run() -> list[int]:
        async with client(sqlite_cluster) as m:
            return [task["id"] async for task in m.iter_tasks(page=3)]

    assert asyncio.run(run()) == ids[::-1]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: m.status(999999), TaskNotFound, "no task with id 999999"),
        (lambda m: m.list(status="done"), InvalidRequest, "unknown status 'done'"),
        (lambda m: m.execute("echo", {}), InvalidRequest, "task metadata must be an object"),
        (lambda m: m.execute({"name": "echo"}, {"x": object()}), InvalidRequest, "not JSON-serialisable"),
        (lambda m: m.schedule("in 20 minuts", {"name": "echo"}), BadTimeSpec, "'in 20 minuts'"),
        (lambda m: m.purge("succeeded", "soon"), BadTimeSpec, "'soon'"),
    ],
)
def test_typed_errors(sqlite_cluster, call, error, message):
    async def run() -> None:
        async with client(sqlite_cluster) as m:
            with pytest.raises(error) as raised:
                await call(m)
            assert message in raised.value.message
            assert (await m.ping())["protocol"] == 1, "the client and server carry on"

    asyncio.run(run())


def test_invalid_transition(sqlite_cluster):
    sqlite_cluster.start_worker()

    async def run() -> None:
        async with client(sqlite_cluster) as m:
            task_id = await m.execute({"name": "echo"})
            await m.wait(task_id, timeout=30)
            with pytest.raises(InvalidTransition):
                await m.retry(task_id)

    asyncio.run(run())


def test_no_reply_raises_server_unavailable_for_that_call_only(sqlite_cluster):
    """A server that reads and never answers: each call times out; a late reply to a timed-out id is dropped."""
    context = zmq.Context.instance()
    silent = context.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")

    async def run() -> None:
        m = aio.Martinet("127.0.0.1", port, timeout=0.3)
        started = time.monotonic()
        results = await asyncio.gather(m.ping(), m.execute({"name": "echo"}), return_exceptions=True)
        assert time.monotonic() - started < 3.0
        assert all(isinstance(r, ServerUnavailable) and "within 0.3 s" in r.message for r in results)
        # Answer the timed-out ping now: nobody waits for it, and the next call is not given it.
        assert silent.poll(1000), "the requests reached the silent server"
        peer, _, body = silent.recv_multipart()
        late = {"v": 1, "id": json.loads(body)["id"], "ok": True, "version": "late", "protocol": 1}
        silent.send_multipart([peer, b"", json.dumps(late).encode()])
        with pytest.raises(ServerUnavailable):
            await m.status(1)
        await m.close()

    try:
        asyncio.run(run())
    finally:
        silent.close(linger=0)

    async def fast_and_slow() -> None:
        """One call timing out does not disturb another answered meanwhile."""
        async with client(sqlite_cluster, timeout=0.5) as m:
            assert (await m.ping())["protocol"] == 1
            dead = aio.Martinet("127.0.0.1", free_port(), timeout=0.3)
            results = await asyncio.gather(dead.ping(), m.ping(), return_exceptions=True)
            assert isinstance(results[0], ServerUnavailable) and results[1]["protocol"] == 1
            await dead.close()

    asyncio.run(fast_and_slow())


def test_a_list_of_servers_is_refused():
    with pytest.raises(ConfigError, match="martinet_app.client.Martinet"):
        aio.Martinet("h1,h2")


def test_a_client_serves_one_loop_after_another(sqlite_cluster):
    """A client belongs to the loop it is used in: in the next one (asyncio.run again), it opens a new socket."""
    m = client(sqlite_cluster)
    assert asyncio.run(m.ping())["protocol"] == 1
    assert asyncio.run(m.execute({"name": "echo"})) == sqlite_cluster.client.list()[0]["id"]
    asyncio.run(m.close())

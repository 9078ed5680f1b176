"""Dependencies (``after``, ``chain``) with real servers, workers and clients, on SQLite and PostgreSQL.

A dependant waits (``waiting``) until every task it names has succeeded, then runs with their results
(``dependency_results()`` in the handler); a dependency that fails for good or is cancelled cancels
it, and so on down the line. The release and the cascade are made in the transaction that records
the dependency's outcome, so they survive a restart and hold whichever server records it.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import urllib.error
import urllib.request

import pytest
from test_cluster import Servers
from test_e2e_cli import ok, ok_json, one_line_error, run

from conftest import TIMEOUT, Cluster, Fleet, wait_until
from martinet_app import aio
from martinet_app.errors import InvalidDependency, InvalidRequest, InvalidTransition


def ts(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def test_a_dependant_runs_once_all_its_dependencies_succeeded_and_reads_their_results(cluster: Cluster) -> None:
    cluster.start_worker("--concurrency", "3")
    m = cluster.client
    slow, fast = m.execute({"name": "nap"}, {"seconds": 1.0}), m.execute({"name": "nap"}, {"seconds": 0.2})
    dependant = m.execute({"name": "gather"}, after=[slow, fast])
    seen, slow_then = m.status(dependant)["status"], m.status(slow)["status"]
    if slow_then != "succeeded":  # else this machine stalled for a second: nothing to say about "before"
        assert seen == "waiting"
    task = m.wait(dependant, timeout=TIMEOUT)
    assert task["status"] == "succeeded" and task["after"] == [slow, fast]
    deps = [m.status(dep) for dep in (slow, fast)]
    assert ts(task["started_at"]) >= max(ts(dep["finished_at"]) for dep in deps), "started after both finished"
    assert task["result"] == {"order": [slow, fast], "results": {str(slow): {"slept": 1.0}, str(fast): {"slept": 0.2}}}


def test_a_failed_dependency_cancels_its_dependants_down_the_line(cluster: Cluster) -> None:
    cluster.start_worker()
    m = cluster.client
    broken = m.execute({"name": "explode"}, {"message": "no input"})
    first = m.execute({"name": "echo"}, after=[broken])
    second, third = m.chain([({"name": "echo"}, {}), ({"name": "echo"}, {})], after=[first])
    last = m.wait(third, timeout=TIMEOUT)  # parked while it waits: the cascade answers it
    assert (last["status"], last["error"]) == ("cancelled", f"dependency {second} was cancelled")
    for task_id, error in ((first, f"dependency {broken} failed"), (second, f"dependency {first} was cancelled")):
        task = m.status(task_id)
        assert (task["status"], task["error"], task["attempts"], task["started_at"]) == ("cancelled", error, 0, None)
    with pytest.raises(InvalidTransition, match=f"its dependency {broken} is failed; retry that first"):
        m.retry(first)


def test_cancelling_a_dependency_cancels_its_dependants_and_a_waiting_task_can_be_cancelled(cluster: Cluster) -> None:
    m = cluster.client
    later = m.schedule("in 1 hour", {"name": "echo"})
    dependant = m.execute({"name": "echo"}, after=[later])
    alone = m.execute({"name": "echo"}, after=[later])
    assert m.cancel(alone)["status"] == "cancelled" and m.status(dependant)["status"] == "waiting"
    assert m.cancel(later)["status"] == "cancelled"
    task = m.status(dependant)
    assert (task["status"], task["error"]) == ("cancelled", f"dependency {later} was cancelled")
    with pytest.raises(InvalidTransition, match=f"task {alone} cannot be retried: its dependency {later} is cancelled"):
        m.retry(alone)


def test_a_chain_runs_step_after_step_each_with_the_result_before(cluster: Cluster) -> None:
    cluster.start_worker("--concurrency", "4")
    m = cluster.client
    ids = m.chain([({"name": "nap"}, {"seconds": 0.3}), ({"name": "gather"}, {}), ({"name": "gather"}, {})])
    tasks = [m.wait(task_id, timeout=TIMEOUT) for task_id in ids]
    assert [t["status"] for t in tasks] == ["succeeded"] * 3
    assert [t["after"] for t in tasks] == [[], [ids[0]], [ids[1]]]
    for before, step in zip(tasks, tasks[1:], strict=False):
        assert ts(step["started_at"]) >= ts(before["finished_at"])
        assert step["result"]["order"] == [before["id"]]
        assert step["result"]["results"] == {str(before["id"]): before["result"]}


def test_unknown_dependencies_and_bad_after_are_refused_and_nothing_is_stored(cluster: Cluster) -> None:
    m = cluster.client
    known = m.execute({"name": "echo"})
    with pytest.raises(InvalidDependency, match=f"dependency {known + 500} does not exist: a task can only wait"):
        m.execute({"name": "echo"}, after=[known, known + 500])
    with pytest.raises(InvalidDependency, match=f"dependency {known + 501} does not exist"):
        m.chain([({"name": "echo"}, {}), ({"name": "echo"}, {})], after=[known + 501])
    with pytest.raises(InvalidDependency, match=f"dependency {known + 1} does not exist"):
        m.schedule("in 1 hour", {"name": "echo"}, after=[known + 1])  # its own id-to-be: no cycle can form
    for bad in ([0], ["1"], list(range(1, 102)), "12"):
        with pytest.raises(InvalidRequest, match="after must be a list|'after' must be a list"):
            m.execute({"name": "echo"}, after=bad)
    assert [t["id"] for t in m.list()] == [known], "nothing else was stored"


def test_the_cli_submits_after_and_chains(cluster: Cluster) -> None:
    cluster.start_worker()
    first = ok_json(cluster, "execute", "echo", "--args", '{"n": 1}')["task_id"]
    out = ok(cluster, "execute", "gather", "--after", f"{first}", "--wait")
    assert f"queued after {first}" in out and re.search(r"^status:\s+succeeded$", out, re.MULTILINE), out
    chained = ok_json(cluster, "chain", "echo", 'gather={"x": 1}', "--after", str(first))["task_ids"]
    last = json.loads(ok(cluster, "wait", str(chained[-1]), "--json"))
    assert (last["status"], last["after"], last["args"]) == ("succeeded", [chained[0]], {"x": 1})
    usage = run(cluster, "execute", "echo", "--after", "1,x")
    assert usage.returncode == 2 and "Invalid value for '--after'" in usage.stderr, usage.stderr
    assert "task ids separated by commas" in usage.stderr, usage.stderr
    one_line_error(run(cluster, "execute", "echo", "--after", "999999"), 2, "dependency 999999 does not exist")
    waiting = ok_json(cluster, "schedule", "in 1 hour", "echo")["task_id"]
    held = ok_json(cluster, "execute", "echo", "--after", str(waiting))["task_id"]
    listed = ok_json(cluster, "list", "--status", "waiting")
    assert [t["id"] for t in listed] == [held]


def test_the_asyncio_client_submits_after_and_chains(cluster: Cluster) -> None:
    cluster.start_worker()

    async def main() -> list[dict]:
        async with aio.Martinet("127.0.0.1", cluster.server.client_port) as m:
            first = await m.execute({"name": "echo"}, {"n": 1})
            ids = await m.chain([({"name": "gather"}, {})], after=[first])
            later = await m.schedule("in 1 second", {"name": "gather"}, after=ids)
            return [await m.wait(task_id, timeout=TIMEOUT) for task_id in (*ids, later)]

    chained, later = asyncio.run(main())
    assert chained["status"] == later["status"] == "succeeded"
    assert later["result"]["results"] == {str(chained["id"]): chained["result"]}


def test_the_http_api_submits_after_and_chains(cluster: Cluster) -> None:
    cluster.start_worker()

    def post(path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            cluster.server.http_url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    status, first = post("/api/v1/tasks", {"name": "echo", "args": {"n": 1}})
    assert status == 201
    status, chained = post("/api/v1/tasks/chain", {"tasks": [{"name": "gather"}, {"name": "gather"}],
                                                   "after": [first["task_id"]]})  # fmt: skip
    assert status == 201
    ids = chained["task_ids"]
    status, last = post("/api/v1/tasks", {"name": "gather", "after": ids})
    records = [cluster.client.wait(task_id, timeout=TIMEOUT) for task_id in (*ids, last["task_id"])]
    assert [r["after"] for r in records] == [[first["task_id"]], [ids[0]], ids]
    assert {r["status"] for r in records} == {"succeeded"}
    status, refused = post("/api/v1/tasks", {"name": "echo", "after": [10**6]})
    assert status == 400 and refused["error"]["type"] == "InvalidDependency", refused


def test_dependencies_hold_across_a_server_crash(cluster: Cluster) -> None:
    m = cluster.client
    ok_dep, broken = m.execute({"name": "echo"}, {"n": 7}), m.execute({"name": "explode"})
    released, cancelled = m.execute({"name": "gather"}, after=[ok_dep]), m.execute({"name": "echo"}, after=[broken])
    running = m.execute({"name": "nap"}, {"seconds": 1.0})
    behind = m.execute({"name": "gather"}, after=[running])
    assert {m.status(t)["status"] for t in (released, cancelled, behind)} == {"waiting"}
    cluster.server.kill()  # SIGKILL: only what was committed remains
    cluster.server.restart()
    worker = cluster.start_worker()
    wait_until(lambda: m.status(running)["status"] == "running", what="the nap to start")
    cluster.server.kill()  # while a dependency runs: its worker reports it to the restarted server
    cluster.server.restart()
    cluster.wait_worker(worker)
    task = m.wait(released, timeout=TIMEOUT)
    assert task["status"] == "succeeded"
    assert task["result"]["results"] == {str(ok_dep): {"task_id": ok_dep, "args": {"n": 7}}}
    assert m.wait(cancelled, timeout=TIMEOUT)["error"] == f"dependency {broken} failed"
    last = m.wait(behind, timeout=TIMEOUT)
    assert last["status"] == "succeeded" and ts(last["started_at"]) >= ts(m.status(running)["finished_at"])


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_dependants_are_released_by_whichever_server_records_the_outcome(fleet: Fleet, db_url: str) -> None:
    servers = Servers(fleet, 2, db_url)
    servers.start_worker(0, "--concurrency", "4")
    servers.start_worker(1, "--concurrency", "4")
    a, b = servers.client(0), servers.client(1)
    # Diamonds whose two sides end at about the same time, each on either server's worker.
    diamonds = []
    for i in range(15):
        left, right = a.execute({"name": "nap"}, {"seconds": 0.05}), b.execute({"name": "nap"}, {"seconds": 0.05})
        diamonds.append((left, right, (a if i % 2 else b).execute({"name": "gather"}, after=[left, right])))
    for left, right, bottom in diamonds:
        task = b.wait(bottom, timeout=TIMEOUT)
        assert task["status"] == "succeeded", task
        assert task["result"]["order"] == [left, right]
    servers_seen = {a.status(t)["server"] for diamond in diamonds for t in diamond}
    assert len(servers_seen) == 2, "both servers delivered tasks and recorded outcomes"
    failing = a.execute({"name": "explode"})
    dependant = b.execute({"name": "echo"}, after=[failing])
    assert b.wait(dependant, timeout=TIMEOUT)["error"] == f"dependency {failing} failed", "a wait on B answered"
    # Dependants submitted on one server while their dependency ends through either: none is left waiting.
    pairs = []
    for i in range(30):
        dep = (a, b)[i % 2].execute({"name": "nap"}, {"seconds": 0.01})
        pairs.append((dep, (b, a)[i % 2].execute({"name": "gather"}, after=[dep])))
    for dep, task_id in pairs:
        task = a.wait(task_id, timeout=TIMEOUT)
        assert task["status"] == "succeeded" and task["result"]["order"] == [dep], task

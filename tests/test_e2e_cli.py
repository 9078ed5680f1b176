"""The ``martinet`` client verbs run as real subprocesses against a real server and worker."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from datetime import datetime

import martinet_app
from conftest import ROOT, Cluster, martinet_cmd, wait_until


def run(
    cluster: Cluster, *args: str, env: dict[str, str] | None = None, port: bool = True
) -> subprocess.CompletedProcess:
    """``martinet ARGS --client-port PORT`` with no MARTINET_* settings inherited from the caller."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("MARTINET_")}
    argv = martinet_cmd(*args, *(("--client-port", str(cluster.server.client_port)) if port else ()))
    return subprocess.run(argv, cwd=ROOT, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60)


def ok(cluster: Cluster, *args: str, **kwargs) -> str:
    proc = run(cluster, *args, **kwargs)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc.stdout


def ok_json(cluster: Cluster, *args: str) -> object:
    return json.loads(ok(cluster, *args, "--json"))


def one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("martinet: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], proc.stderr


def fields(text: str) -> dict[str, str]:
    """The ``key: value`` lines of a record printed by the CLI (indented block lines skipped)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s*(.*)$", line)
        if m:
            out[m[1]] = m[2]
    return out


def test_execute_then_status_human_and_json(cluster: Cluster) -> None:
    cluster.start_worker()
    out = ok(cluster, "execute", "echo", "--args", '{"x": 1}', "--username", "alice", "--description", "first one")
    m = re.fullmatch(r"task (\d+) queued\n", out)
    assert m, out
    task_id = int(m[1])
    record = cluster.client.wait(task_id, 15)
    assert record["status"] == "succeeded"

    human = fields(ok(cluster, "status", str(task_id)))
    assert human["status"] == "succeeded"
    assert json.loads(human["result"]) == {"task_id": task_id, "args": {"x": 1}}
    assert (human["id"], human["name"], human["username"]) == (str(task_id), "echo", "alice")
    assert human["description"] == "first one"

    assert ok_json(cluster, "status", str(task_id)) == cluster.client.status(task_id)

    reply = ok_json(cluster, "execute", "echo", "--username", "bob")
    assert set(reply) == {"task_id"} and reply["task_id"] > task_id
    assert cluster.client.wait(reply["task_id"], 15)["username"] == "bob"


def test_execute_wait_prints_the_final_record(sqlite_cluster: Cluster) -> None:
    sqlite_cluster.start_worker()
    out = ok(sqlite_cluster, "execute", "steps", "--args", '{"steps": 3}', "--wait", "--wait-timeout", "15")
    first, rest = out.split("\n", 1)
    task_id = int(re.fullmatch(r"task (\d+) queued", first)[1])
    record = fields(rest)
    assert record["status"] == "succeeded" and json.loads(record["result"]) == {"done": 3}
    assert record["id"] == str(task_id)

    record = ok_json(sqlite_cluster, "execute", "echo", "--args", '{"y": [1, 2]}', "--username", "carol", "--wait")
    assert record["status"] == "succeeded"
    assert record["result"] == {"task_id": record["id"], "args": {"y": [1, 2]}}
    assert record == sqlite_cluster.client.status(record["id"])


def test_execute_wait_on_failing_task_exits_5(sqlite_cluster: Cluster) -> None:
    sqlite_cluster.start_worker()
    proc = run(sqlite_cluster, "execute", "explode", "--args", '{"message": "kaboom"}', "--wait")
    assert proc.returncode == 5, proc.stderr
    assert "Traceback" not in proc.stderr
    record = fields(proc.stdout)
    assert record["status"] == "failed" and record["error"] == "ValueError: kaboom"
    assert "traceback:\n    Traceback (most recent call last):" in proc.stdout  # the handler's, as an indented block

    proc = run(sqlite_cluster, "execute", "explode", "--wait", "--json")
    assert proc.returncode == 5, proc.stderr
    record = json.loads(proc.stdout)
    assert record["status"] == "failed" and record["error"] == "ValueError: boom"
    assert record == sqlite_cluster.client.status(record["id"])

    proc = run(sqlite_cluster, "wait", str(record["id"]), "--json")  # the `wait` verb agrees
    assert proc.returncode == 5 and json.loads(proc.stdout)["status"] == "failed"


def test_unknown_handler_fails_the_task(sqlite_cluster: Cluster) -> None:
    sqlite_cluster.start_worker()
    proc = run(sqlite_cluster, "execute", "no_such_handler", "--wait", "--wait-timeout", "15")
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "no handler for task 'no_such_handler'" in proc.stdout
    assert fields(proc.stdout)["status"] == "failed"


def test_schedule_runs_once_at_the_given_time(sqlite_cluster: Cluster) -> None:
    sqlite_cluster.start_worker()
    out = ok(sqlite_cluster, "schedule", "in 1 second", "echo", "--args", '{"z": 3}', "--username", "dave")
    m = re.fullmatch(r"task (\d+) scheduled for (\S+)\n", out)
    assert m, out
    task_id = int(m[1])
    record = sqlite_cluster.client.status(task_id)
    assert record["run_at"] == m[2] and record["username"] == "dave"
    assert record["status"] in ("scheduled", "queued", "running", "succeeded")
    delay = datetime.fromisoformat(record["run_at"]) - datetime.fromisoformat(record["created_at"])
    assert 0.9 <= delay.total_seconds() <= 1.5, record

    record = sqlite_cluster.client.wait(task_id, 15)
    assert record["status"] == "succeeded" and record["result"] == {"task_id": task_id, "args": {"z": 3}}
    assert record["started_at"] >= record["run_at"]  # ISO 8601 UTC strings compare in time order

    reply = ok_json(sqlite_cluster, "schedule", "in 1 hour", "echo")
    assert sqlite_cluster.client.status(reply["task_id"])["status"] == "scheduled"


def test_schedule_bad_time_is_a_one_line_usage_error(sqlite_cluster: Cluster) -> None:
    proc = run(sqlite_cluster, "schedule", "in 20 minuts", "echo")
    one_line_error(proc, 2, "'in 20 minuts'")
    assert sqlite_cluster.client.list() == []
    one_line_error(run(sqlite_cluster, "every", "20 minuts", "echo"), 2, "'20 minuts'")
    assert sqlite_cluster.client.recurring() == []


def test_every_recurring_and_revoke(sqlite_cluster: Cluster) -> None:
    client = sqlite_cluster.client
    sqlite_cluster.start_worker()
    out = ok(sqlite_cluster, "every", "1 second", "echo", "--args", '{"tick": true}', "--username", "cron")
    m = re.fullmatch(r"recurring (\d+) created, next run (\S+)\n", out)
    assert m, out
    rid = int(m[1])

    (schedule,) = ok_json(sqlite_cluster, "recurring")
    assert schedule["id"] == rid and schedule["enabled"] is True and schedule["name"] == "echo"
    assert schedule["next_run_at"] and schedule == next(s for s in client.recurring() if s["id"] == rid)
    table = ok(sqlite_cluster, "recurring").splitlines()
    assert table[0].split() == ["ID", "NAME", "USERNAME", "INTERVAL", "TZ", "NEXT_RUN_AT", "LAST_RUN_AT", "ENABLED"]
    assert table[1].split()[:6] == [str(rid), "echo", "cron", "1", "second", "-"]  # no zone of its own

    def runs() -> list[dict]:
        return [t for t in client.list(name="echo", limit=1000) if t["recurring_id"] == rid]

    wait_until(lambda: sum(t["status"] == "succeeded" for t in runs()) >= 2, timeout=10, what="two recurring runs")

    assert ok(sqlite_cluster, "revoke", str(rid)) == f"recurring {rid} revoked\n"
    seen: list[int] = []

    def stable() -> bool:  # polled once per interval: no new run between two consecutive reads
        seen.append(len(runs()))
        return len(seen) >= 2 and seen[-1] == seen[-2]

    wait_until(stable, timeout=8, interval=1.2, what="revoked schedule to stop creating tasks")
    assert ok_json(sqlite_cluster, "recurring")[0]["enabled"] is False
    one_line_error(run(sqlite_cluster, "revoke", str(rid)), 1, "already revoked")
    one_line_error(run(sqlite_cluster, "revoke", "987654"), 4, "no recurring schedule with id 987654")


def test_every_cron_and_schedule_in_a_zone(sqlite_cluster: Cluster) -> None:
    client = sqlite_cluster.client
    out = ok(sqlite_cluster, "every", "0 9 * * MON-FRI", "echo", "--tz", "America/New_York")
    m = re.fullmatch(r"recurring (\d+) created, next run (\S+)\n", out)
    assert m, out
    (schedule,) = client.recurring()
    assert (schedule["id"], schedule["interval"], schedule["tz"]) == (int(m[1]), "0 9 * * mon-fri", "America/New_York")
    first = datetime.fromisoformat(m[2])
    assert schedule["next_run_at"] == m[2] and first.weekday() < 5
    assert (first.hour, first.minute) in ((13, 0), (14, 0))  # 09:00 in New York is 13:00 or 14:00 UTC
    row = ok(sqlite_cluster, "recurring").splitlines()[1].split()
    assert row[1:9] == ["echo", "-", "0", "9", "*", "*", "mon-fri", "America/New_York"]

    reply = ok_json(sqlite_cluster, "schedule", "09:00", "echo", "--tz", "Asia/Tokyo")
    run_at = datetime.fromisoformat(client.status(reply["task_id"])["run_at"])
    assert (run_at.hour, run_at.minute) == (0, 0)  # 09:00 in Tokyo (UTC+9, no daylight saving)

    one_line_error(run(sqlite_cluster, "every", "@daily", "echo", "--tz", "Mars/Olympus"), 2, "'Mars/Olympus'", "IANA")
    one_line_error(run(sqlite_cluster, "schedule", "09:00", "echo", "--tz", "CEST"), 2, "unknown time zone 'CEST'")
    one_line_error(run(sqlite_cluster, "every", "0 25 * * *", "echo"), 2, "bad cron expression '0 25 * * *'")
    assert len(client.recurring()) == 1 and len(client.list()) == 1


def test_status_of_unknown_task_exits_4(sqlite_cluster: Cluster) -> None:
    one_line_error(run(sqlite_cluster, "status", "987654"), 4, "no task with id 987654")
    one_line_error(run(sqlite_cluster, "status", "987654", "--json"), 4, "no task with id 987654")
    one_line_error(run(sqlite_cluster, "cancel", "987654"), 4, "no task with id 987654")


def test_list_filters_human_and_json(cluster: Cluster) -> None:
    client = cluster.client
    cluster.start_worker()
    alice = [ok_json(cluster, "execute", "echo", "--username", "alice")["task_id"] for _ in range(2)]
    bob = ok_json(cluster, "execute", "nap", "--username", "bob", "--args", '{"seconds": 0}')["task_id"]
    later = ok_json(cluster, "schedule", "in 1 hour", "echo", "--username", "alice", "--description", "Weekly 50%")[
        "task_id"
    ]
    for task_id in (*alice, bob):
        assert client.wait(task_id, 15)["status"] == "succeeded"

    def ids(*args: str) -> list[int]:
        tasks = ok_json(cluster, "list", *args)
        return [t["id"] for t in tasks]

    assert ids() == [later, bob, *reversed(alice)]  # newest first
    assert ids("--username", "alice") == [later, *reversed(alice)]
    assert ids("--status", "scheduled") == [later]
    assert ids("--name", "echo", "--limit", "2") == [later, alice[1]]
    assert ids("--name", "nap", "--status", "succeeded") == [bob]
    assert ids("--search", "weekly 50%") == [later] and ids("--search", "weekly 5_") == []
    assert ok_json(cluster, "list", "--username", "alice") == client.list(username="alice")

    table = ok(cluster, "list", "--username", "bob").splitlines()
    assert table[0].split() == ["ID", "STATUS", "NAME", "USERNAME", "PROGRESS", "RUN_AT", "FINISHED_AT"]
    assert len(table) == 2 and table[1].split()[:4] == [str(bob), "succeeded", "nap", "bob"]
    assert ok(cluster, "list", "--status", "running") == "no tasks\n"
    assert ok_json(cluster, "list", "--username", "nobody") == []


def test_cancel_scheduled_task(sqlite_cluster: Cluster) -> None:
    client = sqlite_cluster.client
    first = ok_json(sqlite_cluster, "schedule", "in 1 hour", "echo")["task_id"]
    second = ok_json(sqlite_cluster, "schedule", "in 1 hour", "echo")["task_id"]

    assert ok(sqlite_cluster, "cancel", str(first)) == f"task {first} cancelled\n"
    assert client.status(first)["status"] == "cancelled"
    record = ok_json(sqlite_cluster, "cancel", str(second))
    assert record["id"] == second and record["status"] == "cancelled" and record["finished_at"]
    assert record == client.status(second)

    one_line_error(run(sqlite_cluster, "cancel", str(first)), 1, f"task {first} is cancelled")
    proc = run(sqlite_cluster, "wait", str(first))
    assert proc.returncode == 5 and fields(proc.stdout)["status"] == "cancelled"


def test_workers_shows_the_running_worker(sqlite_cluster: Cluster) -> None:
    assert ok(sqlite_cluster, "workers") == "no workers\n"
    worker = sqlite_cluster.start_worker()
    table = ok(sqlite_cluster, "workers").splitlines()
    assert table[0].split() == ["ID", "KEY", "HOST", "PID", "SLOTS", "BUSY", "HANDLERS", "LAST_SEEN", "SERVER"]
    row = table[1].split()
    assert len(table) == 2 and (row[1], row[3]) == ("-", str(worker.pid)), "no key on an open server"
    assert row[-1] == "127.0.0.1", "the server it is connected to"
    (info,) = ok_json(sqlite_cluster, "workers")
    assert info["pid"] == worker.pid
    assert {"echo", "steps", "explode", "nap", "ledger"} <= set(info["handlers"])
    assert info["id"] == sqlite_cluster.client.workers()[0]["id"]


def test_ping(sqlite_cluster: Cluster) -> None:
    port = sqlite_cluster.server.client_port
    out = ok(sqlite_cluster, "ping")
    assert out.startswith(f"server at tcp://127.0.0.1:{port} is up\n")
    assert fields(out)["version"] == martinet_app.__version__
    reply = ok_json(sqlite_cluster, "ping")
    assert reply == sqlite_cluster.client.ping() and reply["version"] == martinet_app.__version__


def test_client_port_from_environment(sqlite_cluster: Cluster) -> None:
    env = {"MARTINET_CLIENT_PORT": str(sqlite_cluster.server.client_port)}
    task_id = json.loads(ok(sqlite_cluster, "schedule", "in 1 hour", "echo", "--json", env=env, port=False))["task_id"]
    assert sqlite_cluster.client.status(task_id)["status"] == "scheduled"
    assert "is up" in ok(sqlite_cluster, "ping", env=env, port=False)
    # The flag beats the variable: a variable naming a dead port is ignored when --client-port is given.
    start = time.monotonic()
    assert json.loads(ok(sqlite_cluster, "list", "--json", "--timeout", "5", env={"MARTINET_CLIENT_PORT": "1"}))
    assert time.monotonic() - start < 5


def test_list_pages_with_before_and_prints_the_next_command(cluster: Cluster) -> None:
    client = cluster.client
    mine = client.execute_many([({"name": "echo", "username": "pager"}, {"n": n}) for n in range(25)])
    client.execute({"name": "echo", "username": "other"})
    port = cluster.server.client_port
    pages, hints = [], []
    argv = ["list", "--username", "pager", "--limit", "10", "--client-port", str(port), "--json"]
    while argv:  # each hint is the next page's command line, as typed
        proc = run(cluster, *argv, port=False)
        assert proc.returncode == 0, proc.stderr
        pages.append([t["id"] for t in json.loads(proc.stdout)])
        hints.append(proc.stderr)
        argv = shlex.split(proc.stderr.removeprefix("more: "))[1:] if proc.stderr else []
    assert [len(page) for page in pages] == [10, 10, 5]
    assert [i for page in pages for i in page] == sorted(mine, reverse=True)
    assert hints == [
        f"more: martinet list --before {pages[0][-1]} --username pager --limit 10 --client-port {port} --json\n",
        f"more: martinet list --before {pages[1][-1]} --username pager --limit 10 --client-port {port} --json\n",
        "",
    ]

    proc = run(cluster, "list", "--before", str(pages[0][-1]), "--limit", "3", "--name", "echo")
    rows = proc.stdout.splitlines()
    assert proc.returncode == 0 and [int(row.split()[0]) for row in rows[1:]] == pages[1][:3]
    assert proc.stderr == f"more: martinet list --before {pages[1][2]} --name echo --limit 3 --client-port {port}\n"
    assert ok(cluster, "list", "--before", "1") == "no tasks\n"
    assert ok_json(cluster, "list", "--before", "9223372036854775808", "--limit", "1")[0]["username"] == "other"


def test_ids_beyond_64_bits_are_not_found(cluster: Cluster) -> None:
    huge = "9223372036854775808"
    for verb in ("status", "wait", "cancel", "retry"):
        one_line_error(run(cluster, verb, huge), 4, f"no task with id {huge}")
    one_line_error(run(cluster, "revoke", huge), 4, f"no recurring schedule with id {huge}")


def test_request_too_large_is_a_one_line_usage_error(sqlite_cluster: Cluster) -> None:
    args = json.dumps({"x": "y" * 2000})
    proc = run(sqlite_cluster, "execute", "echo", "--args", args, "--max-message-bytes", "1024", "--timeout", "5")
    one_line_error(proc, 2, "bytes, more than the 1024 bytes this client sends", "pass a reference")
    assert sqlite_cluster.client.list() == []
    assert ok_json(sqlite_cluster, "execute", "echo", "--args", args)["task_id"]

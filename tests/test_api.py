"""The HTTP JSON API (/api/v1) end to end: a real server on each backend, real workers, plain HTTP requests.

What goes in over HTTP comes out through the Python client and the other way round; errors carry the
client's types with their HTTP statuses; tokens, cross-site requests and idempotency; the OpenAPI
document covers every route, and schemathesis finds no server error and no answer outside it.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import TEST_HANDLER_NAMES, TIMEOUT, Cluster, Process, Server, print_if_failed, wait_until
from martinet_app import api, openapi, store

TOKEN, READ_TOKEN = "admin-token-4417", "read-token-0713"


def http(
    server: Server,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """One request to ``server``'s HTTP port: its status, decoded JSON body and headers.

    ``body`` is sent as JSON, and with no ``raw`` the request says it is JSON (Content-Type), as every change
    request without a bearer token must; ``raw`` is sent as it is, with only the ``headers`` given.
    """
    sent = dict(headers or {})
    data = raw
    if raw is None:
        data = None if body is None else json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(server.http_url + path, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, payload, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, payload, got = error.code, error.read(), dict(error.headers)
    return status, json.loads(payload) if payload else None, got


def ok(server: Server, method: str, path: str, body: Any = None, *, status: int = 200, **kwargs: Any) -> Any:
    """The JSON answer of a request that must succeed with ``status``."""
    got, answer, _ = http(server, method, path, body, **kwargs)
    assert got == status, f"{method} {path}: {got} {answer}"
    return answer


def error_of(server: Server, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, str, str]:
    """The status, error type and message of a request that must fail."""
    status, answer, _ = http(server, method, path, body, **kwargs)
    assert status >= 400 and set(answer) == {"error"}, f"{method} {path}: {status} {answer}"
    return status, answer["error"]["type"], answer["error"]["message"]


def test_what_goes_in_over_http_comes_out_through_the_client_and_back(cluster: Cluster) -> None:
    worker = cluster.start_worker()
    server, m = cluster.server, cluster.client
    task_id = ok(server, "POST", "/api/v1/tasks", {"name": "echo", "args": {"x": 1}, "username": "ann",
                 "description": "from HTTP", "options": {"priority": 5}}, status=201)["task_id"]  # fmt: skip
    task = m.wait(task_id, timeout=TIMEOUT)
    assert (task["status"], task["result"], task["username"], task["description"], task["priority"]) == (
        "succeeded", {"task_id": task_id, "args": {"x": 1}}, "ann", "from HTTP", 5
    )  # fmt: skip

    theirs = m.execute({"name": "echo", "username": "bob"}, {"y": [1, 2]})
    m.wait(theirs, timeout=TIMEOUT)
    record = ok(server, "GET", f"/api/v1/tasks/{theirs}")["task"]
    assert record == m.status(theirs) and record["result"] == {"task_id": theirs, "args": {"y": [1, 2]}}
    assert record["status"] == "succeeded" and record["finished_at"].endswith("+00:00")

    later = ok(server, "POST", "/api/v1/tasks", {"name": "echo", "when": "in 1 hour"}, status=201)["task_id"]
    scheduled = m.status(later)
    assert scheduled["status"] == "scheduled"
    delay = _epoch(scheduled["run_at"]) - _epoch(scheduled["created_at"])
    assert 3599 <= delay <= 3601, delay

    ids = ok(server, "POST", "/api/v1/tasks/batch", {"tasks": [{"name": "echo", "args": {"i": i}} for i in range(3)]
             + [{"name": "echo", "key": "once"}, {"name": "echo", "key": "once"}], "options": {"retries": 2}},
             status=201)["task_ids"]  # fmt: skip
    assert len(ids) == 5 and ids[3] == ids[4], "one key, one task"
    done = [m.wait(task_id, timeout=TIMEOUT) for task_id in ids[:4]]
    assert [t["result"]["args"] for t in done] == [{"i": 0}, {"i": 1}, {"i": 2}, {}]
    assert {t["retries"] for t in done} == {2}

    [listed] = ok(server, "GET", "/api/v1/workers")["workers"]
    assert (listed["pid"], sorted(listed["handlers"]), listed["slots"]) == (worker.pid, TEST_HANDLER_NAMES, 4)
    assert listed == {**m.workers()[0], "last_seen": listed["last_seen"], "busy": listed["busy"]}
    assert ok(server, "GET", "/api/v1/ping")["version"] == m.ping()["version"]


def _epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def test_list_filters_search_and_pages(cluster: Cluster) -> None:
    server, m = cluster.server, cluster.client
    made = [
        m.schedule("in 1h", {"name": "report", "username": "ann", "description": "Nightly BACKUP of 50% of it"}, {}),
        m.schedule("in 1h", {"name": "report", "username": "bob", "description": "nightly backup, all of it"}, {}),
        m.schedule("in 1h", {"name": "mail", "username": "ann", "description": "send_it"}, {}),
        m.schedule("in 1h", {"name": "mail", "username": "ann", "description": "sendXit"}, {}),
        m.execute({"name": "mail", "username": "ann"}, {}),  # queued: no worker
    ]

    def ids(query: str) -> list[int]:
        return [task["id"] for task in ok(server, "GET", "/api/v1/tasks" + query)["tasks"]]

    assert ids("") == made[::-1], "newest first"
    assert ids("?name=report") == [made[1], made[0]]
    assert ids("?name=mail&username=ann&status=scheduled") == [made[3], made[2]]
    assert ids("?search=backup") == [made[1], made[0]] == [t["id"] for t in m.list(search="BACKUP")]
    assert ids("?search=50%25") == [made[0]], "% is the character"
    assert ids("?search=send_it") == [made[2]], "_ is the character"
    assert ids("?search=nightly&username=ann") == [made[0]]
    summary = ok(server, "GET", "/api/v1/tasks?status=queued")["tasks"]
    assert [t["id"] for t in summary] == [made[4]] and "args" not in summary[0]

    seen, before = [], ""
    while True:
        page = ok(server, "GET", f"/api/v1/tasks?limit=2{before}")
        seen += [task["id"] for task in page["tasks"]]
        if page["next_before"] is None:
            break
        assert len(page["tasks"]) == 2
        before = f"&before={page['next_before']}"
    assert seen == made[::-1]
    assert error_of(server, "GET", "/api/v1/tasks?status=lost")[:2] == (400, "InvalidRequest")
    assert error_of(server, "GET", "/api/v1/tasks?limit=many")[:2] == (400, "InvalidRequest")
    assert error_of(server, "GET", "/api/v1/tasks?limit=0")[:2] == (400, "InvalidRequest")


def test_cancel_over_http_stops_a_running_task_and_retry_runs_a_failed_one_again(cluster: Cluster) -> None:
    cluster.start_worker("--concurrency", "1")
    server, m = cluster.server, cluster.client
    task_id = ok(server, "POST", "/api/v1/tasks", {"name": "nap", "args": {"seconds": 60}}, status=201)["task_id"]
    wait_until(lambda: m.status(task_id)["status"] == "running", what="the nap to start")
    cancelled = ok(server, "POST", f"/api/v1/tasks/{task_id}/cancel")["task"]
    assert cancelled["status"] == "cancelled" and cancelled["worker"] is not None
    began = time.monotonic()
    # The worker's only slot is free again long before the nap would have ended.
    assert m.wait(m.execute({"name": "echo"}, {}), timeout=TIMEOUT)["status"] == "succeeded"
    assert time.monotonic() - began < 30 and m.status(task_id)["status"] == "cancelled"
    assert error_of(server, "POST", f"/api/v1/tasks/{task_id}/cancel")[:2] == (409, "InvalidTransition")

    broke = m.execute({"name": "explode"}, {"message": "bad luck"})
    assert m.wait(broke, timeout=TIMEOUT)["status"] == "failed"
    assert ok(server, "POST", f"/api/v1/tasks/{broke}/retry")["task"]["status"] == "queued"
    again = wait_until(lambda: (t := m.status(broke))["status"] == "failed" and t, what="the retry to fail again")
    assert again["attempts"] == 2 and [e["error"] for e in again["errors"]] == ["ValueError: bad luck"] * 2
    done = m.execute({"name": "echo"}, {})
    m.wait(done, timeout=TIMEOUT)
    status, kind, message = error_of(server, "POST", f"/api/v1/tasks/{done}/retry")
    assert (status, kind) == (409, "InvalidTransition") and "is succeeded" in message


def test_bulk_cancel_and_retry_of_a_filtered_list(cluster: Cluster) -> None:
    cluster.start_worker("--concurrency", "1")
    server, m = cluster.server, cluster.client
    night = {"username": "ops", "description": "Nightly batch"}
    running = m.execute({"name": "nap", **night}, {"seconds": 60})
    wait_until(lambda: m.status(running)["status"] == "running", what="the nap to start")
    first, second = (m.schedule("in 1h", {"name": "echo", **night}, {"n": n}) for n in (1, 2))
    other = m.schedule("in 1h", {"name": "echo", "username": "dev", "description": "nightly batch"}, {})
    finished = m.execute({"name": "echo", **night, "description": "NIGHTLY BATCH"}, {})  # waits for the slot

    answer = ok(server, "POST", "/api/v1/tasks/bulk", {"action": "cancel", "username": "ops", "search": "nightly b"})
    assert answer["done"] == [finished, second, first, running], "newest first; the queued one not run yet"
    assert answer["failed"] == []
    assert m.wait(m.execute({"name": "echo"}, {}), timeout=TIMEOUT)["status"] == "succeeded", "the nap stopped"
    assert m.status(other)["status"] == "scheduled"
    answer = ok(server, "POST", "/api/v1/tasks/bulk", {"action": "cancel", "username": "ops"})
    assert answer["done"] == [] and [f["id"] for f in answer["failed"]] == [finished, second, first, running]
    assert {f["error"]["type"] for f in answer["failed"]} == {"InvalidTransition"}

    retried = m.bulk("retry", username="ops", search="NIGHTLY", limit=2)
    assert retried == {"done": [finished, second], "failed": []}
    assert [m.wait(task_id, timeout=TIMEOUT)["status"] for task_id in (finished, second)] == ["succeeded"] * 2
    answer = m.bulk("retry", username="ops")
    assert answer["done"] == [first, running], "the two still cancelled"
    assert [(f["id"], f["error"]["type"]) for f in answer["failed"]] == [
        (finished, "InvalidTransition"), (second, "InvalidTransition")
    ]  # fmt: skip
    assert "is succeeded: only failed or cancelled tasks can be retried" in answer["failed"][0]["error"]["message"]
    m.cancel(running)
    for body in ({"action": "delete"}, {"action": "cancel", "limit": 0}, {"action": "cancel", "status": "lost"},
                 {"action": "cancel", "colour": "red"}, {}):  # fmt: skip
        assert error_of(server, "POST", "/api/v1/tasks/bulk", body)[:2] == (400, "InvalidRequest"), body


def test_recurring_create_list_run_now_and_revoke(cluster: Cluster) -> None:
    cluster.start_worker()
    server, m = cluster.server, cluster.client
    body = {"name": "echo", "interval": "every 1 hour", "args": {"r": 1}, "description": "hourly", "options":
            {"priority": 3}}  # fmt: skip
    recurring_id = ok(server, "POST", "/api/v1/recurring", body, status=201)["recurring_id"]
    # Its first run fires at once and moves next_run_at: compare the two reads once it has.
    wait_until(lambda: m.recurring()[0]["last_run_at"] is not None, what="the schedule's first run")
    [schedule] = ok(server, "GET", "/api/v1/recurring")["recurring"]
    assert schedule == m.recurring()[0]
    assert (schedule["id"], schedule["interval"], schedule["enabled"], schedule["priority"]) == (
        recurring_id, "1 hour", True, 3
    )  # fmt: skip
    task_id = ok(server, "POST", f"/api/v1/recurring/{recurring_id}/run", status=201)["task_id"]
    task = m.wait(task_id, timeout=TIMEOUT)
    assert (task["status"], task["result"]["args"], task["priority"], task["description"]) == (
        "succeeded", {"r": 1}, 3, "hourly"
    )  # fmt: skip
    revoked = ok(server, "POST", f"/api/v1/recurring/{recurring_id}/revoke")["recurring"]
    assert revoked["enabled"] is False and m.recurring()[0]["enabled"] is False
    assert error_of(server, "POST", f"/api/v1/recurring/{recurring_id}/revoke")[:2] == (409, "InvalidTransition")
    assert error_of(server, "POST", "/api/v1/recurring/999999/run")[:2] == (404, "TaskNotFound")
    assert error_of(server, "POST", "/api/v1/recurring/999999/revoke")[:2] == (404, "TaskNotFound")
    bad = {"name": "echo", "interval": "every blue moon"}
    assert error_of(server, "POST", "/api/v1/recurring", bad)[:2] == (400, "BadTimeSpec")


def test_cron_schedules_and_zones_over_http(sqlite_cluster: Cluster) -> None:
    server, m = sqlite_cluster.server, sqlite_cluster.client
    body = {"name": "echo", "interval": "30 8 * * 1-5", "tz": "Europe/Paris"}
    recurring_id = ok(server, "POST", "/api/v1/recurring", body, status=201)["recurring_id"]
    [schedule] = ok(server, "GET", "/api/v1/recurring")["recurring"]
    assert (schedule["id"], schedule["interval"], schedule["tz"]) == (recurring_id, "30 8 * * 1-5", "Europe/Paris")
    assert schedule["next_run_at"][11:16] in ("06:30", "07:30")  # 08:30 CEST or CET
    task_id = ok(server, "POST", "/api/v1/tasks", {"name": "echo", "when": "noon", "tz": "Asia/Kolkata"}, status=201)
    assert m.status(task_id["task_id"])["run_at"][11:16] == "06:30"  # UTC+5:30
    for bad in ({"name": "echo", "interval": "daily", "tz": "Paris"}, {"name": "echo", "interval": "0 9 * *"}):
        status, kind, message = error_of(server, "POST", "/api/v1/recurring", bad)
        assert (status, kind) == (400, "BadTimeSpec") and repr(bad.get("tz", bad["interval"])) in message
    status, kind, message = error_of(server, "POST", "/api/v1/tasks", {"name": "echo", "tz": "UTC"})
    assert (status, kind) == (400, "InvalidRequest") and "give it with 'when'" in message
    assert len(m.recurring()) == 1 and len(m.list()) == 1


def test_pause_and_resume_over_http(sqlite_cluster: Cluster) -> None:
    server, m = sqlite_cluster.server, sqlite_cluster.client
    task_id = m.execute({"name": "echo"}, {}, limit_key="shared")
    paused = ok(server, "POST", "/api/v1/pause", {"name": "echo"})
    assert paused == {"name": "echo", "paused": True, "changed": True, "names": ["echo"]}
    task = ok(server, "GET", f"/api/v1/tasks/{task_id}")["task"]
    assert (task["paused"], task["limit_key"]) == (True, "shared")
    sqlite_cluster.start_worker()
    assert m.status(task_id)["status"] == "queued"
    assert ok(server, "POST", "/api/v1/resume", {"name": "echo"})["names"] == []
    assert m.wait(task_id, timeout=TIMEOUT)["status"] == "succeeded"
    assert error_of(server, "POST", "/api/v1/pause", {"name": "echo", "extra": 1})[:2] == (400, "InvalidRequest")


def test_errors_are_typed_with_their_http_statuses(cluster: Cluster) -> None:
    server, m = cluster.server, cluster.client
    json_headers = {"Content-Type": "application/json"}
    status, kind, message = error_of(server, "POST", "/api/v1/tasks", raw=b'{"name": "echo",', headers=json_headers)
    assert (status, kind) == (400, "InvalidRequest") and "not valid JSON" in message
    status, kind, message = error_of(server, "POST", "/api/v1/tasks", {"name": "echo", "colour": "red"})
    assert (status, kind) == (400, "InvalidRequest") and "colour" in message
    status, kind, message = error_of(server, "POST", "/api/v1/tasks", {"name": "echo", "when": "next blue moon"})
    assert (status, kind) == (400, "BadTimeSpec") and "next blue moon" in message
    assert error_of(server, "POST", "/api/v1/tasks", {"name": "echo", "options": {"retries": -1}})[:2] == (
        400, "InvalidRequest"
    )  # fmt: skip
    status, kind, message = error_of(server, "GET", "/api/v1/tasks/999999")
    assert (status, kind) == (404, "TaskNotFound") and "999999" in message
    assert error_of(server, "GET", "/api/v1/tasks/abc")[:2] == (400, "InvalidRequest")
    assert error_of(server, "GET", "/api/v1/nothing/here")[:2] == (404, "TaskNotFound")
    scheduled = m.schedule("in 1h", {"name": "echo"}, {})
    m.cancel(scheduled)
    status, kind, message = error_of(server, "POST", f"/api/v1/tasks/{scheduled}/cancel")
    assert (status, kind) == (409, "InvalidTransition") and "is cancelled" in message

    status, answer, headers = http(server, "DELETE", "/api/v1/tasks")
    assert (status, answer["error"]["type"], headers["Allow"]) == (405, "InvalidRequest", "GET, POST")
    status, answer, headers = http(server, "GET", "/api/v1/tasks/bulk")
    assert (status, headers["Allow"]) == (405, "POST"), "a literal path is not a task id"
    assert [t["id"] for t in m.list()] == [scheduled], "none of the refused requests created a task"


def test_a_request_larger_than_the_server_takes_is_413(tmp_path: Path, sqlite_url: str) -> None:
    server = Server(sqlite_url, tmp_path / "server.log", "--max-message-bytes", "4096", http=True)
    server.start().wait_ready()
    try:
        big = {"name": "echo", "args": {"blob": "x" * 5000}}
        status, kind, message = error_of(server, "POST", "/api/v1/tasks", big)
        assert (status, kind) == (413, "RequestTooLarge") and "4096" in message
        assert ok(server, "POST", "/api/v1/tasks", {"name": "echo", "args": {"blob": "x" * 100}}, status=201)
    finally:
        server.terminate()


def test_an_idempotency_key_sent_twice_creates_one_task(cluster: Cluster) -> None:
    server, m = cluster.server, cluster.client
    once = {"Idempotency-Key": "req-7f3a"}
    first = ok(server, "POST", "/api/v1/tasks", {"name": "echo"}, status=201, headers=once)
    assert ok(server, "POST", "/api/v1/tasks", {"name": "echo"}, status=201, headers=once) == first
    batch = {"tasks": [{"name": "echo"}, {"name": "echo"}]}
    ids = ok(server, "POST", "/api/v1/tasks/batch", batch, status=201, headers={"Idempotency-Key": "req-b"})
    assert ok(server, "POST", "/api/v1/tasks/batch", batch, status=201, headers={"Idempotency-Key": "req-b"}) == ids
    body = {"name": "echo", "interval": "daily"}
    schedule = ok(server, "POST", "/api/v1/recurring", body, status=201, headers={"Idempotency-Key": "req-r"})
    assert ok(server, "POST", "/api/v1/recurring", body, status=201, headers={"Idempotency-Key": "req-r"}) == schedule
    assert len([t for t in m.list() if t["recurring_id"] is None]) == 3 and len(m.recurring()) == 1
    assert ok(server, "POST", "/api/v1/tasks", {"name": "echo"}, status=201) != first, "no key: a new task"


@pytest.fixture
def guarded(request: pytest.FixtureRequest, tmp_path: Path, sqlite_url: str) -> Iterator[Server]:
    """A server whose HTTP port asks for TOKEN (everything) or READ_TOKEN (reading)."""
    server = Server(sqlite_url, tmp_path / "server.log", "--http-token", TOKEN, "--http-read-token", READ_TOKEN,
                    http=True)  # fmt: skip
    server.start().wait_ready()
    try:
        yield server
    finally:
        server.terminate()
        print_if_failed(request, server.log)


def test_tokens_none_is_401_the_read_token_only_reads_the_token_does_all(guarded: Server) -> None:
    submit = {"name": "echo", "when": "in 1h"}
    for method, path, body in (("GET", "/api/v1/tasks", None), ("GET", "/api/v1/openapi.json", None),
                               ("POST", "/api/v1/tasks", submit)):  # fmt: skip
        assert error_of(guarded, method, path, body)[:2] == (401, "Denied")
        assert error_of(guarded, method, path, body, token="wrong")[:2] == (401, "Denied")
    assert ok(guarded, "GET", "/api/v1/openapi.json", token=READ_TOKEN)["openapi"].startswith("3.")
    status, kind, message = error_of(guarded, "POST", "/api/v1/tasks", submit, token=READ_TOKEN)
    assert (status, kind) == (403, "Denied") and "read-only" in message
    assert error_of(guarded, "POST", "/api/v1/tasks/bulk", {"action": "cancel"}, token=READ_TOKEN)[0] == 403
    task_id = ok(guarded, "POST", "/api/v1/tasks", submit, status=201, token=TOKEN)["task_id"]
    assert ok(guarded, "GET", f"/api/v1/tasks/{task_id}", token=READ_TOKEN)["task"]["status"] == "scheduled"
    assert error_of(guarded, "POST", f"/api/v1/tasks/{task_id}/cancel", token=READ_TOKEN)[0] == 403
    assert ok(guarded, "POST", "/api/v1/tasks/bulk", {"action": "cancel"}, token=TOKEN)["done"] == [task_id]
    assert ok(guarded, "GET", "/api/v1/tasks", token=TOKEN)["tasks"][0]["status"] == "cancelled"


def test_cross_site_and_non_json_posts_without_a_bearer_are_refused(cluster: Cluster) -> None:
    server, m = cluster.server, cluster.client
    body = {"name": "echo", "when": "in 1h"}
    status, kind, message = error_of(server, "POST", "/api/v1/tasks", body, headers={"Origin": "http://evil.example"})
    assert (status, kind) == (403, "Denied") and "evil.example" in message
    cross = {"Sec-Fetch-Site": "cross-site"}
    assert error_of(server, "POST", "/api/v1/tasks", body, headers=cross)[:2] == (403, "Denied")
    form = {"Content-Type": "text/plain"}
    status, kind, message = error_of(server, "POST", "/api/v1/tasks", raw=json.dumps(body).encode(), headers=form)
    assert (status, kind) == (403, "Denied") and "JSON" in message
    assert error_of(server, "POST", "/api/v1/tasks/1/cancel", raw=b"")[:2] == (403, "Denied"), "not said to be JSON"
    assert m.list() == [], "nothing was created"
    same_site = {"Origin": server.http_url, "Sec-Fetch-Site": "same-origin"}
    assert ok(server, "POST", "/api/v1/tasks", body, status=201, headers=same_site)["task_id"] >= 1


def test_the_openapi_document_has_every_route_and_nothing_else(sqlite_cluster: Cluster) -> None:
    routes = api.routes(endpoint=None)  # type: ignore[arg-type]  # the handlers are not called here
    assert set(openapi.OPERATIONS) == {(route.method, route.pattern) for route in routes}
    document = ok(sqlite_cluster.server, "GET", api.OPENAPI_PATH)
    assert document == json.loads(json.dumps(openapi.document(routes)))
    served = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert served == set(openapi.OPERATIONS)
    schemas = document["components"]["schemas"]
    assert list(schemas["Task"]["properties"]) == list(store.TASK_FIELDS)
    assert list(schemas["TaskSummary"]["properties"]) == list(store.SUMMARY_FIELDS)
    assert set(schemas["Submission"]["properties"]) == api._TASK_BODY
    paths = document["paths"]
    bodies = {
        "/api/v1/recurring": api._RECURRING_BODY,
        "/api/v1/tasks/bulk": api._BULK_BODY,
        "/api/v1/tasks/batch": {"tasks", "options"},
        "/api/v1/pause": {"name"},
        "/api/v1/resume": {"name"},
        "/api/v1/tasks/chain": {"tasks", "options", "after"},
    }
    for path, fields in bodies.items():
        assert set(paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]) == fields
    query = {p["name"] for p in paths["/api/v1/tasks"]["get"]["parameters"] if p["in"] == "query"}
    assert query == {*api._LIST_QUERY, *api._LIST_NUMBERS}
    admin = {(route.method, route.pattern) for route in routes if route.role == api.Role.ADMIN}
    for method, pattern in openapi.OPERATIONS:
        responses = paths[pattern][method.lower()]["responses"]
        assert "401" in responses and ("403" in responses) == ((method, pattern) in admin), (method, pattern)


#: Test cases schemathesis makes per operation and phase: enough to reach every route's checks, well under a minute.
SCHEMATHESIS_EXAMPLES = 12


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(
    request: pytest.FixtureRequest, tmp_path: Path, db_url: str
) -> None:
    server = Server(db_url, tmp_path / "server.log", "--http-token", TOKEN, http=True)
    server.start().wait_ready()
    worker = Process(server.worker_args(), tmp_path / "worker.log").start()
    report = tmp_path / "schemathesis.xml"
    try:
        run = subprocess.run(
            [
                sys.executable, "-m", "schemathesis.cli", "run", server.http_url + api.OPENAPI_PATH,
                "--header", f"Authorization: Bearer {TOKEN}",
                "--checks", "all",
                # A string the document allows may still be no time ("when": ""): a 400 is right for it.
                "--exclude-checks", "positive_data_acceptance",
                "--max-examples", str(SCHEMATHESIS_EXAMPLES),
                "--seed", os.environ.get("SCHEMATHESIS_SEED", "13"),
                "--generation-allow-x00", "false",  # the API refuses NUL in every string (documented)
                "--request-timeout", "10",
                "--report", "junit", "--report-junit-path", str(report),
                "--no-color",
            ],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert run.returncode == 0, f"schemathesis failed:\n{run.stdout[-20000:]}\n{run.stderr[-4000:]}"
        # Every operation but the one serving the document, which schemathesis leaves out.
        tested = re.search(r"Tested: (\d+)", run.stdout)
        assert tested and int(tested[1]) == len(openapi.OPERATIONS) - 1, run.stdout[-4000:]
        assert worker.running() and server.running()
    finally:
        worker.terminate()
        server.terminate()
        print_if_failed(request, lambda: f"{server.log()[-8000:]}\n{worker.log()[-4000:]}")

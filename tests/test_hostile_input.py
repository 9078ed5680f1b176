"""Bad input costs nothing else: poison values, refused statements, superseded deliveries, out-of-range ids.

Each test runs real server and worker processes over real sockets, on SQLite and PostgreSQL
where storage is involved. The database's own refusals are provoked with a trigger, not mocked.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from conftest import PG_URL, Cluster, RawClient, mysql_connect, wait_until
from martinet_app import config, protocol
from martinet_app.errors import InvalidRequest, MartinetError, TaskNotFound


def unexpected(log: str) -> list[str]:
    """Lines of a server log that say a loop or a request failed in a way nobody planned for."""
    return [line for line in log.splitlines() if "unexpected" in line or "Traceback" in line]


def final(m, task_id: int) -> dict:
    return m.wait(task_id, timeout=20)


@pytest.fixture
def raw(cluster: Cluster) -> Iterator[RawClient]:
    client = RawClient(cluster.server.client_port)
    yield client
    client.close()


def refuse(db_url: str, when: str, sqlite_sql: str, pg_sql: str) -> None:
    """Make the real database refuse some statement: a trigger named ``refuse_<when>``."""
    if db_url.startswith("sqlite:///"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=10)
        conn.execute(sqlite_sql)
        conn.commit()
        conn.close()
        return
    if db_url.startswith("mysql"):
        conn = mysql_connect()
        with conn.cursor() as cur:
            cur.execute(f"""CREATE TRIGGER refuse_{when} BEFORE {when.upper()} ON task FOR EACH ROW BEGIN
                            IF {pg_sql} THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by the test'; END IF;
                            END""")  # fmt: skip
        conn.close()
        return
    import psycopg2

    conn = psycopg2.connect(PG_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"""CREATE OR REPLACE FUNCTION refuse_{when}() RETURNS trigger AS $$
                        BEGIN IF {pg_sql} THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END;
                        $$ LANGUAGE plpgsql""")
        cur.execute(f"CREATE TRIGGER refuse_{when} BEFORE {when.upper()} ON task FOR EACH ROW EXECUTE FUNCTION "
                    f"refuse_{when}()")  # fmt: skip
    conn.close()


# --- poison values from handlers ----------------------------------------------------------------------------------


def test_poison_text_from_a_handler_costs_no_other_task(cluster: Cluster) -> None:
    cluster.start_worker("--concurrency", "2")
    m = cluster.client
    surrogate = m.execute({"name": "poison"}, {"text": "cannot process caf", "fs_hex": "e92e747874"})
    nul = m.execute({"name": "poison"}, {"text": "bad\x00byte"})
    progress = m.execute({"name": "poison"}, {"text": "at caf", "fs_hex": "e9", "progress": True, "fail": False})
    fine = [m.execute({"name": "echo"}, {"n": n}) for n in range(20)]
    assert final(m, surrogate)["error"] == "RuntimeError: cannot process caf\\udce9.txt"
    assert final(m, nul)["error"] == "RuntimeError: bad\\x00byte"
    task = final(m, progress)
    assert (task["status"], task["progress_message"]) == ("succeeded", "at caf\\udce9")
    assert [final(m, t)["result"]["args"]["n"] for t in fine] == list(range(20))
    assert unexpected(cluster.server.log()) == []


def test_a_deeply_nested_status_message_is_rejected_alone(sqlite_cluster: Cluster) -> None:
    sqlite_cluster.start_worker()
    m, server = sqlite_cluster.client, sqlite_cluster.server
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(f"tcp://127.0.0.1:{server.status_port}")
    deep = '{"v":1,"worker":"w","events":[' + "[" * 5000 + "]" * 5000 + "]}"
    ids = []
    for n in range(10):
        push.send(deep.encode())
        ids.append(m.execute({"name": "echo"}, {"n": n}))
    push.close()
    assert [final(m, t)["status"] for t in ids] == ["succeeded"] * 10
    wait_until(lambda: "JSON nested too deeply" in server.log(), what="the rejection to be logged")
    assert unexpected(server.log()) == []


# --- one bad request or event never costs another ------------------------------------------------------------------


def test_a_bad_request_among_others_costs_none_of_them(cluster: Cluster, raw: RawClient) -> None:
    task = {"name": "job"}
    raw.request("execute", "a", task=task)
    raw.request("execute", "b", task={"name": "x" * 300})
    raw.request("execute", "c", task=task)
    replies = {r["id"]: r for r in raw.replies(3)}
    assert replies["b"]["error"]["type"] == "InvalidRequest" and "at most 255" in replies["b"]["error"]["message"]
    for key in "ac":
        assert cluster.client.status(replies[key]["task_id"])["name"] == "job"


def test_a_statement_the_database_refuses_costs_no_other_request(cluster: Cluster, raw: RawClient) -> None:
    refuse(
        cluster.server.db_url,
        "insert",
        "CREATE TRIGGER refuse_insert BEFORE INSERT ON task WHEN NEW.name = 'refused' "
        "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        "NEW.name = 'refused'",
    )
    for round_ in range(3):
        raw.request("execute", f"a{round_}", task={"name": "job"})
        raw.request("execute", f"b{round_}", task={"name": "refused"})
        raw.request("execute", f"c{round_}", task={"name": "job"})
        replies = {r["id"]: r for r in raw.replies(3)}
        assert "refused by the test" in replies[f"b{round_}"]["error"]["message"]
        for key in "ac":
            assert cluster.client.status(replies[f"{key}{round_}"]["task_id"])["name"] == "job"
    assert cluster.client.ping()["protocol"] == protocol.VERSION


def test_a_status_write_the_database_refuses_fails_only_its_task(cluster: Cluster) -> None:
    refuse(
        cluster.server.db_url,
        "update",
        "CREATE TRIGGER refuse_update BEFORE UPDATE ON task WHEN NEW.result LIKE '%refused%' "
        "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        "NEW.result LIKE '%refused%'",
    )
    cluster.start_worker("--concurrency", "4")
    m = cluster.client
    ids = m.execute_many([({"name": "echo"}, {"n": n, "word": "refused" if n == 7 else "fine"}) for n in range(40)])
    tasks = [final(m, t) for t in ids]
    assert [t["status"] for t in tasks] == ["failed" if n == 7 else "succeeded" for n in range(40)]
    assert "succeeded event could not be stored" in tasks[7]["error"]
    assert "refused by the test" in tasks[7]["error"]
    assert m.workers()[0]["busy"] == 0, "the refused event's slot came back"
    assert "Traceback" not in cluster.server.log()


def test_concurrent_producers_and_a_bad_one_lose_no_acknowledged_task(cluster: Cluster) -> None:
    acknowledged: list[int] = []
    refused: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        with cluster.server.client(timeout=20) as m:
            for _ in range(100):
                acknowledged.append(m.execute({"name": "job"}))

    def saboteur() -> None:
        with cluster.server.client(timeout=20) as m:
            while not stop.is_set():
                try:
                    m.execute({"name": "job", "username": "u" * 300})
                except InvalidRequest as exc:
                    refused.append(exc.message)

    threads = [threading.Thread(target=produce) for _ in range(4)]
    bad = threading.Thread(target=saboteur)
    bad.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    bad.join(20)
    assert len(acknowledged) == 400 and refused
    stored = {t["id"] for t in cluster.client.list(name="job", limit=1000)}
    assert set(acknowledged) <= stored, f"{len(set(acknowledged) - stored)} acknowledged tasks do not exist"


# --- fencing ---------------------------------------------------------------------------------------------------------


def test_cancel_then_retry_of_a_running_task_ends_with_the_retried_run(cluster: Cluster) -> None:
    cluster.start_worker("--concurrency", "1")
    m = cluster.client
    task_id = m.execute({"name": "nap"}, {"seconds": 1.5})
    wait_until(lambda: m.status(task_id)["status"] == "running", what="the task to run")
    assert m.cancel(task_id)["status"] == "cancelled"
    assert m.retry(task_id)["status"] == "queued"
    task = final(m, task_id)
    assert (task["status"], task["result"], task["attempts"], task["errors"]) == (
        "succeeded", {"slept": 1.5}, 2, []
    )  # fmt: skip


# --- typed errors at the edge ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("task_id", [2**63, 2**63 - 1, 2**64 + 5])
def test_ids_out_of_any_column_are_not_found(cluster: Cluster, task_id: int) -> None:
    m = cluster.client
    for call in (m.status, m.cancel, m.retry, m.revoke, lambda i: m.wait(i, timeout=1)):
        with pytest.raises(TaskNotFound):
            call(task_id)


@pytest.mark.parametrize("task, args, expected", [
    ({"name": "a\x00b"}, {}, "NUL"),
    ({"name": "café\udce9"}, {}, "lone surrogate"),
    ({"name": "job", "username": "u\x00"}, {}, "NUL"),
    ({"name": "job", "username": "u" * 256}, {}, "at most 255"),
    ({"name": "n" * 256}, {}, "at most 255"),
    ({"name": "job", "description": "d\x00"}, {}, "NUL"),
    ({"name": "job"}, {"deep": json.loads("[" * 101 + "]" * 101)}, "task args nest more than 100"),
    ({"name": "job"}, {"deep": json.loads("[" * 150 + "]" * 150)}, "request nests more than 103"),
])  # fmt: skip
def test_bad_strings_and_deep_args_are_invalid_requests(raw: RawClient, task: dict, args: dict, expected: str) -> None:
    body = protocol.json_text({"v": 1, "id": 1, "op": "execute", "task": task, "args": args}).encode()
    raw.send(body)
    [reply] = raw.replies(1)
    assert (reply["id"], reply["error"]["type"]) == (1, "InvalidRequest") and expected in reply["error"]["message"]


def test_requests_too_deep_or_too_large_are_answered(cluster: Cluster, raw: RawClient) -> None:
    raw.send(b'{"v":1,"id":"deep","op":"ping","x":' + b"[" * 500 + b"]" * 500 + b"}")
    raw.send(b'{"v":1,"id":' + b"[" * 500 + b"]" * 500 + b',"op":"ping"}')
    raw.send(b'{"v":1,"id":"huge","op":"ping","pad":"' + b"x" * (config.MAX_MESSAGE_BYTES + 10) + b'"}')
    raw.send(b'{"v":1,"id":"inf","op":"execute","task":{"name":"job"},"args":{"x":1e400}}')
    deep, deep_id, huge, inf = raw.replies(4)
    assert (inf["error"]["type"], cluster.client.list()) == ("InvalidRequest", [])
    assert "out of the range of a double" in inf["error"]["message"]
    assert (deep["id"], deep["error"]["type"]) == ("deep", "InvalidRequest") and "nests more" in deep["error"][
        "message"
    ]
    assert (deep_id["id"], deep_id["error"]["type"]) == (None, "InvalidRequest")
    assert (huge["id"], huge["error"]["type"]) == ("huge", "RequestTooLarge")
    assert cluster.client.ping()["protocol"] == protocol.VERSION


# --- bounded work and bounded replies --------------------------------------------------------------------------------


def test_errors_keep_the_latest_failures_and_count_them_all(sqlite_cluster: Cluster) -> None:
    sqlite_cluster.start_worker("--concurrency", "1")
    m = sqlite_cluster.client
    task = final(m, m.execute({"name": "explode"}, {"message": "again"}, retries=30, retry_delay=0))
    assert (task["status"], task["attempts"], task["failures"]) == ("failed", 31, 31)
    assert [e["attempt"] for e in task["errors"]] == list(range(12, 32))


def test_list_carries_summaries_whatever_the_tasks_weigh(sqlite_cluster: Cluster) -> None:
    m = sqlite_cluster.server.client(timeout=30)
    heavy = [m.execute({"name": "big"}, {"blob": "x" * size}) for size in (9_000_000, 6_000_000)]
    light = m.execute({"name": "echo"}, {"n": 1})
    listed = m.list()
    assert [t["id"] for t in listed] == [light, *heavy[::-1]]
    assert all("args" not in t and "result" not in t for t in listed)
    assert len(m.status(heavy[0])["args"]["blob"]) == 9_000_000
    m.close()


# --- generated input on every port while real tasks run -----------------------------------------------------------


def hostile_text(rng: random.Random) -> str:
    pieces = ["ok", "\x00", "\udce9", "\ud800", "é", "🙂", "'", '"', "\\", "%s", "\n", "x" * rng.randint(0, 400)]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return hostile_text(rng)
    if kind == 1:
        return rng.choice([0, -1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**70])
    if kind == 2:
        return rng.choice([0.5, -1e308, 1e-320, 3.0])
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return json.loads("[" * (n := rng.choice([2, 99, 101, 400])) + "]" * n)
    if kind == 5:
        return "x" * rng.choice([255, 256, 70_000])
    if kind == 6:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {hostile_text(rng): hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def hostile_request(rng: random.Random) -> dict:
    op = rng.choice([*protocol.CLIENT_OPS, "nope", ["execute"], {"op": 1}])
    fields = {}
    for key in sorted(protocol.CLIENT_OPS.get(op, frozenset({"x"})) if isinstance(op, str) else ()):
        if rng.random() < 0.7:
            fields[key] = hostile_value(rng)
    if "task" in fields and rng.random() < 0.6:
        fields["task"] = {"name": hostile_text(rng) or "job", "username": hostile_value(rng)}
    return {"v": 1, "id": hostile_value(rng), "op": op, **fields}


def hostile_worker_frames(rng: random.Random) -> list[bytes]:
    body = {"v": 1, **{key: hostile_value(rng) for key in ("worker", "host", "pid", "slots", "running", "tasks")}}
    command = rng.choice([b"READY", b"CREDIT", b"HEARTBEAT", b"DISCONNECT"])
    return [protocol.WORKER_HEADER, command, protocol.json_text(body).encode()]


def hostile_status(rng: random.Random, real: list[int]) -> bytes:
    events = []
    for _ in range(rng.randint(1, 4)):
        event = {"task_id": rng.choice([*real[-5:], 2**63, 0, hostile_value(rng)]), "attempt": rng.choice([1, 2**40])}
        event.update(event=rng.choice(["started", "progress", "succeeded", "failed", ["failed"]]), at=1.0e9)
        event["progress"] = rng.choice([0.5, 2.0, "half"])
        event.update(message=hostile_text(rng), error=hostile_text(rng), traceback=hostile_text(rng))
        event["result"] = hostile_value(rng)
        events.append(event)
    worker = rng.choice(["w", hostile_text(rng), "w" * 300])
    return protocol.json_text({"v": 1, "worker": worker, "events": events}).encode()


def test_generated_hostile_input_on_every_port_costs_no_real_task(cluster: Cluster) -> None:
    seed = int(os.environ.get("HOSTILE_SEED", "20261201"))
    print(f"\nHOSTILE_SEED={seed}")
    rng = random.Random(seed)
    cluster.start_worker("--concurrency", "4")
    server, m = cluster.server, cluster.client
    context = zmq.Context.instance()
    raw = RawClient(server.client_port)
    worker_sock = context.socket(zmq.DEALER)
    status_sock = context.socket(zmq.PUSH)
    for sock, port in ((worker_sock, server.worker_port), (status_sock, server.status_port)):
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(f"tcp://127.0.0.1:{port}")
    real: dict[int, Any] = {}
    poison: list[int] = []
    try:
        for round_ in range(300):
            if round_ % 3 == 0:
                payload = {"n": round_, "text": hostile_text(rng).encode("utf-8", "surrogatepass").hex()}
                real[m.execute({"name": "echo"}, payload)] = payload
            texts = {"text": hostile_text(rng), "repeat": rng.randint(1, 50), "fail": rng.random() < 0.5}
            poison.append(m.execute({"name": "poison"}, {**texts, "progress": rng.random() < 0.5}))
            try:
                raw.send(protocol.json_text(hostile_request(rng)).encode())
            except (ValueError, TypeError, RecursionError):
                pass
            worker_sock.send_multipart(hostile_worker_frames(rng))
            status_sock.send(hostile_status(rng, list(real)))
        for task_id, payload in real.items():
            task = final(m, task_id)
            assert (task["status"], task["result"]["args"]) == ("succeeded", payload), task
        for task_id in poison:
            assert final(m, task_id)["status"] in ("succeeded", "failed")
    finally:
        raw.close()
        worker_sock.close()
        status_sock.close()
    print(f"{len(real)} real tasks succeeded beside {len(poison)} poison tasks and 300 hostile messages on each port")
    assert m.ping()["protocol"] == protocol.VERSION
    assert unexpected(server.log()) == []
    with pytest.raises(MartinetError):  # the server still tells bad input apart
        m.status(2**63)

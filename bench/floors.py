"""What this machine allows one synchronous producer, whatever the task manager: `make bench-floors`.

Prints one JSON object: the floors under the stream and latency figures of `make bench`, each
measured with FLOOR_N (2000) requests from one client, one in flight, after 100 to warm up:

- zmq_plain: a DEALER -> ROUTER echo over TCP on 127.0.0.1, both ends plain pyzmq;
- zmq_green: the same with the server on zmq.green in a gevent loop, as Martinet's server is;
- commit: one small row INSERTed and COMMITted (raw sqlite3, no server), with Martinet's
  SQLite settings (WAL, synchronous=FULL): the price of "committed before it answers";
- durable_submit: a plain pyzmq ROUTER that inserts and commits one row per request, then
  answers: the fastest durable submit one synchronous producer can get here, with nothing else
  (no JSON, no validation, no dispatch) in the way;
- martinet_ping, martinet_execute: Martinet's server (no worker), ping and execute.

Each gives per_s (requests per second, one after another) and p50_us / p99_us of one request.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import drive

N = int(os.environ.get("FLOOR_N", "2000"))
WARMUP = 100
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL")
ROW = ("noop", json.dumps({"name": "noop", "args": {}}))


def _open(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in PRAGMAS:
        db.execute(pragma)
    db.execute("CREATE TABLE IF NOT EXISTS task (id INTEGER PRIMARY KEY, name TEXT, body TEXT)")
    return db


def _insert(db: sqlite3.Connection) -> int:
    db.execute("BEGIN")
    task_id = db.execute("INSERT INTO task (name, body) VALUES (?, ?)", ROW).lastrowid
    db.execute("COMMIT")
    return task_id


def serve(kind: str, port: int, path: str) -> None:
    """The echo (plain, green) or durable server of a floor, until killed."""
    if kind == "green":
        import zmq.green as zmq
    else:
        import zmq
    db = _open(path) if kind == "durable" else None
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while True:
        identity, body = sock.recv_multipart()
        if db is not None:
            body = str(_insert(db)).encode()
        sock.send_multipart([identity, body])


def timed(call: Callable[[], object]) -> dict:
    """per_s, p50_us and p99_us of N calls made one after another."""
    for _ in range(WARMUP):
        call()
    took = []
    started = time.perf_counter()
    for _ in range(N):
        before = time.perf_counter()
        call()
        took.append((time.perf_counter() - before) * 1e6)
    return {
        "per_s": N / (time.perf_counter() - started),
        "p50_us": drive.percentile(took, 0.5),
        "p99_us": drive.percentile(took, 0.99),
    }


def against(kind: str, tmp: str) -> dict:
    """Time a plain DEALER client against one of this script's servers."""
    import zmq

    port = drive.free_port()
    server = subprocess.Popen([sys.executable, __file__, "serve", kind, str(port), f"{tmp}/{kind}.db"])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")

    def request() -> None:
        sock.send(b"x")
        if not sock.poll(30_000):
            raise SystemExit(f"the {kind} floor server did not answer")
        sock.recv()

    try:
        return timed(request)
    finally:
        sock.close()
        drive.stop(server)


def martinet(tmp: str) -> dict:
    sys.path.insert(0, str(drive.ROOT))
    side = drive.MartinetSide(tmp)
    try:
        return {
            "martinet_ping": timed(side.m.ping),
            "martinet_execute": timed(lambda: side.m.execute(drive.NOOP)),
        }
    finally:
        side.close()


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    result: dict = {"n": N}
    with tempfile.TemporaryDirectory(prefix="martinet-floors-") as tmp:
        result["zmq_plain"] = against("plain", tmp)
        result["zmq_green"] = against("green", tmp)
        db = _open(f"{tmp}/commit.db")
        result["commit"] = timed(lambda: _insert(db))
        db.close()
        result["durable_submit"] = against("durable", tmp)
        result |= martinet(tmp)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

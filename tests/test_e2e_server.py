"""The server process: hostile input on every socket, time zones, settings from the environment, clients."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap

import pytest
import zmq

from conftest import ROOT, Cluster, Process, Server, free_port, martinet_cmd, wait_until
from martinet_app import Martinet, protocol
from martinet_app.errors import ServerUnavailable

GARBAGE = [
    [os.urandom(64)],
    [b""],
    [b"", b"", b""],
    [b"", b"not json"],
    [b"", b"[1, 2, 3]"],
    [b"", json.dumps({"v": 99, "id": "x", "op": "ping"}).encode()],
    [b"", json.dumps({"v": 1, "id": "x", "op": "explode"}).encode()],
    [b"", json.dumps({"v": 1, "id": "x", "op": "status", "task_id": "DROP TABLE task"}).encode()],
    [protocol.WORKER_HEADER, b"READY", b"{}"],
    [protocol.WORKER_HEADER, b"READY", json.dumps({"v": 1, "worker": 5}).encode()],
    [protocol.WORKER_HEADER, b"HEARTBEAT"],
    [b"MTNW99", b"HEARTBEAT", b'{"v": 1}'],
    [protocol.WORKER_HEADER, b"\xff\xfe", b'{"v": 1}'],
    [json.dumps({"v": 1, "worker": "w", "events": [{"task_id": 1, "attempt": 1, "event": "succeeded"}]}).encode()],
    [json.dumps({"v": 1, "worker": "w", "events": "all of them"}).encode()],
    [
        json.dumps(
            {
                "v": 1,
                "worker": "w",
                "events": [{"task_id": 1, "attempt": 1, "event": "progress", "at": 1.0, "progress": 7}],
            }
        ).encode()
    ],
]


def test_garbage_on_every_socket_is_rejected_and_the_server_keeps_serving(sqlite_cluster: Cluster):
    sqlite_cluster.start_worker()
    server, m = sqlite_cluster.server, sqlite_cluster.client
    before = m.execute({"name": "nap"}, {"seconds": 0.5})
    context = zmq.Context.instance()
    for kind, port in (
        (zmq.DEALER, server.client_port),
        (zmq.DEALER, server.worker_port),
        (zmq.PUSH, server.status_port),
    ):
        sock = context.socket(kind)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        for _ in range(20):
            for frames in GARBAGE:
                sock.send_multipart(frames)
        sock.close()
    task = m.wait(before, timeout=15)
    assert task["status"] == "succeeded", "a task in flight during the garbage finished normally"
    assert m.wait(m.execute({"name": "echo"}, {"ok": True}), timeout=15)["result"]["args"] == {"ok": True}
    log = wait_until(
        lambda: all(f"{name} socket: rejected" in server.log() for name in ("client", "worker", "status"))
        and server.log(),
        what="rejections logged on all three sockets",
    )
    assert "Traceback" not in log
    assert len(m.workers()) == 1, "garbage READY messages registered no worker"


def test_malformed_requests_get_an_error_reply(sqlite_cluster: Cluster):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{sqlite_cluster.server.client_port}")
    try:
        for body, message in [
            (b"not json", "not valid JSON"),
            (b'{"v": 2, "id": "a", "op": "ping"}', "unsupported protocol version 2"),
            (b'{"v": 1, "id": "b", "op": "explode"}', "unknown operation 'explode'"),
            (b'{"v": 1, "id": "c", "op": "ping", "extra": 1}', "unknown field(s) for 'ping': extra"),
        ]:
            sock.send_multipart([b"", body])
            assert sock.poll(5000), f"no reply to {body!r}"
            reply = protocol.parse_reply(sock.recv_multipart(), 1 << 20)
            assert reply["ok"] is False and reply["error"]["type"] == "InvalidRequest"
            assert message in reply["error"]["message"]
    finally:
        sock.close()


def test_named_times_use_the_server_time_zone(tmp_path):
    server = Server(f"sqlite:///{tmp_path / 'tz.db'}", tmp_path / "server.log", "--tz", "Asia/Tokyo").start()
    try:
        server.wait_ready()
        m = server.client()
        run_at = datetime.datetime.fromisoformat(m.status(m.schedule("09:00", {"name": "echo"}, {}))["run_at"])
        assert (run_at.hour, run_at.minute) == (0, 0), "09:00 in Tokyo is 00:00 UTC"
        assert run_at.utcoffset() == datetime.timedelta(0)
        m.close()
    finally:
        assert server.terminate() == 0


def test_bad_settings_stop_the_server_with_a_clear_message(tmp_path):
    for args, message in [
        (["--tz", "Mars/Olympus"], "Mars/Olympus"),
        (["--db", "oracle://localhost/x"], "unsupported database URL"),
    ]:
        result = subprocess.run(
            martinet_cmd("serve", "--client-port", str(free_port()), *args),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_port_in_use_is_reported(sqlite_cluster: Cluster):
    taken = sqlite_cluster.server.client_port
    result = subprocess.run(
        martinet_cmd(
            "serve",
            "--client-port",
            str(taken),
            "--worker-port",
            str(free_port()),
            "--status-port",
            str(free_port()),
            "--db",
            "sqlite:///:memory:",
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert "cannot bind" in result.stderr and "Traceback" not in result.stderr
    assert not (ROOT / ":memory:.lock").exists(), "an in-memory database needs no lock file"


def test_settings_come_from_the_environment(tmp_path):
    ports = {
        "MARTINET_CLIENT_PORT": free_port(),
        "MARTINET_WORKER_PORT": free_port(),
        "MARTINET_STATUS_PORT": free_port(),
    }
    env = {key: str(value) for key, value in ports.items()}
    env["MARTINET_DB"] = f"sqlite:///{tmp_path / 'env.db'}"
    server = Process(martinet_cmd("serve"), tmp_path / "server.log", env=env).start()
    try:
        wait_until(lambda: "serving" in server.log(), what="the server to start")
        log = server.log()
        assert f"clients on 127.0.0.1:{ports['MARTINET_CLIENT_PORT']}" in log
        assert f"workers on 127.0.0.1:{ports['MARTINET_WORKER_PORT']}" in log
        assert f"status on 127.0.0.1:{ports['MARTINET_STATUS_PORT']}" in log
        assert (tmp_path / "env.db").exists()
    finally:
        assert server.terminate() == 0


def test_client_recovers_once_a_server_appears(tmp_path):
    server = Server(f"sqlite:///{tmp_path / 'late.db'}", tmp_path / "server.log")
    m = Martinet("127.0.0.1", server.client_port, timeout=0.3)
    with pytest.raises(ServerUnavailable) as raised:
        m.ping()
    assert f"127.0.0.1:{server.client_port}" in raised.value.message and "martinet serve" in raised.value.message
    server.start()
    try:
        server.wait_ready()
        assert m.ping()["protocol"] == protocol.VERSION, "the same client works once the server is up"
    finally:
        m.close()
        assert server.terminate() == 0


def test_client_in_a_gevent_patched_process(sqlite_cluster: Cluster, tmp_path):
    script = textwrap.dedent(f"""
        from gevent import monkey
        monkey.patch_all()
        import gevent
        from martinet_app import Martinet

        m = Martinet("127.0.0.1", {sqlite_cluster.server.client_port})
        ticks = []
        ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(20)])
        ids = [m.execute({{"name": "echo"}}, {{"i": i}}) for i in range(3)]
        print(len(ids), type(m._socket).__module__)
        ticker.join()
        print(len(ticks))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    count, module, ticks = result.stdout.split()
    assert count == "3" and module.startswith("zmq.green") and ticks == "20"

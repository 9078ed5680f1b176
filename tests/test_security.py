"""CurveZMQ end to end (#11): keys on every socket, roles apart, identities bound to keys, safe default.

Real servers, workers and clients over real sockets, with keys made by ``martinet keygen``'s code.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from conftest import TEST_HANDLERS, Cluster, Process, Server, free_port, martinet_cmd, print_if_failed, wait_until
from martinet_app import Martinet, aio, keys, protocol, security
from martinet_app.errors import AuthenticationFailed

SECRET = "correct-horse-battery-staple-4417"


@dataclass
class Keys:
    """A key directory per role, as an operator lays them out."""

    root: Path

    def make(self, name: str, *allowed_in: str) -> tuple[Path, Path]:
        """A key pair in root/own, its public key copied into each of ``allowed_in`` (client, worker)."""
        public, secret = keys.generate(name, self.root / "own")
        for role in allowed_in:
            (self.root / role).mkdir(exist_ok=True)
            (self.root / role / public.name).write_bytes(public.read_bytes())
        return public, secret

    def server_args(self) -> list[str]:
        return ["--secret-key", str(self.root / "own" / "server.key_secret"),
                "--client-keys", str(self.root / "client"), "--worker-keys", str(self.root / "worker")]  # fmt: skip

    def peer_args(self, name: str) -> list[str]:
        return ["--secret-key", str(self.root / "own" / f"{name}.key_secret"),
                "--server-key", str(self.root / "own" / "server.key")]  # fmt: skip

    def client(self, server: Server, name: str, timeout: float = 5.0) -> Martinet:
        secret, server_key = self.peer_args(name)[1::2]
        return Martinet("127.0.0.1", server.client_port, timeout=timeout, secret_key=secret, server_key=server_key)


@pytest.fixture
def curve(tmp_path: Path) -> Keys:
    k = Keys(tmp_path / "keys")
    k.make("server")
    k.make("alice", "client")
    k.make("w1", "worker")
    k.make("w2", "worker")
    k.make("mallory")  # allowed nowhere
    return k


@pytest.fixture
def secured(request: pytest.FixtureRequest, tmp_path: Path, curve: Keys) -> Iterator[Cluster]:
    """A server with keys on SQLite; its cluster's client is alice."""
    cluster = Cluster(tmp_path, f"sqlite:///{tmp_path / 'martinet.db'}")
    cluster.server = Server(cluster.server.db_url, tmp_path / "server.log", *curve.server_args())
    cluster._client = curve.client(cluster.server, "alice")
    try:
        cluster.server.start()
        wait_until(lambda: _answers(cluster._client), what="the server to answer alice")
        yield cluster
    finally:
        cluster.stop()
        print_if_failed(request, cluster.logs)


def _answers(m: Martinet) -> bool:
    try:
        m.ping()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def test_with_keys_tasks_run_end_to_end(secured: Cluster, curve: Keys) -> None:
    secured.start_worker(*curve.peer_args("w1"))
    m = secured.client
    done = m.wait(m.execute({"name": "steps"}, {"steps": 3}), timeout=15)
    assert (done["status"], done["result"], done["progress_message"]) == ("succeeded", {"done": 3}, "step 3")
    later = m.wait(m.schedule("in 1 second", {"name": "echo"}, {"x": 1}), timeout=15)
    assert later["status"] == "succeeded"
    long = m.execute({"name": "nap"}, {"seconds": 30})
    wait_until(lambda: m.status(long)["status"] == "running", what="the long task to run")
    assert m.cancel(long)["status"] == "cancelled"
    [worker] = m.workers()
    tag = security.key_tag(keys.load_public(curve.root / "own" / "w1.key"))
    assert (worker["key"], worker["id"].split("/")[0]) == ("w1", tag)


def test_an_unknown_key_and_no_keys_are_refused_clearly(secured: Cluster, curve: Keys) -> None:
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed, match="refused this peer's key"):
        curve.client(secured.server, "mallory").execute({"name": "echo"})
    with pytest.raises(AuthenticationFailed, match="the server uses keys"):
        Martinet("127.0.0.1", secured.server.client_port, timeout=5.0).execute({"name": "echo"})
    assert time.monotonic() - started < 5, "refused at the handshake, not after a timeout"
    assert secured.client.list() == []
    wait_until(lambda: "refused a CURVE key on the client port" in secured.server.log(), what="the refusal logged")


def test_the_asyncio_client_with_keys(secured: Cluster, curve: Keys) -> None:
    """martinet_app.aio takes the same key files; a refused key, or none, is an AuthenticationFailed, not a timeout."""

    def client(name: str, timeout: float) -> aio.Martinet:
        secret, server_key = curve.peer_args(name)[1::2]
        return aio.Martinet("127.0.0.1", secured.server.client_port, timeout=timeout, secret_key=secret,
                            server_key=server_key)  # fmt: skip

    async def run() -> None:
        async with client("alice", 5.0) as alice:
            assert len(set(await asyncio.gather(*(alice.execute({"name": "echo"}) for _ in range(8))))) == 8
        started = time.monotonic()
        async with client("mallory", 5.0) as mallory:
            with pytest.raises(AuthenticationFailed, match="refused this peer's key"):
                await mallory.execute({"name": "echo"})
        async with aio.Martinet("127.0.0.1", secured.server.client_port, timeout=5.0) as keyless:
            with pytest.raises(AuthenticationFailed, match="the server uses keys"):
                await asyncio.gather(keyless.execute({"name": "echo"}), keyless.ping())
        assert time.monotonic() - started < 5, "refused at the handshake, not after a timeout"

    asyncio.run(run())
    assert len(secured.client.list()) == 8


def test_a_refused_worker_gets_no_task_until_an_allowed_one_comes(secured: Cluster, curve: Keys) -> None:
    m = secured.client
    task_id = m.execute({"name": "echo"}, {"n": 1})
    bad = secured.start_worker(*curve.peer_args("mallory"), wait=False)
    wait_until(lambda: "refused this peer's key" in bad.log(), what="the worker to log its refusal")
    wait_until(lambda: "refused a CURVE key on the worker or status port" in secured.server.log(), what="the server's")
    assert m.status(task_id)["status"] == "queued" and m.workers() == []
    secured.start_worker(*curve.peer_args("w2"))
    assert m.wait(task_id, timeout=15)["status"] == "succeeded"


def test_roles_stay_apart(secured: Cluster, curve: Keys) -> None:
    as_worker = secured.start_worker(*curve.peer_args("alice"), wait=False)
    wait_until(lambda: "refused this peer's key" in as_worker.log(), what="a client key refused as a worker")
    with pytest.raises(AuthenticationFailed):
        curve.client(secured.server, "w1").execute({"name": "echo"})
    assert secured.client.workers() == [] and secured.client.list() == []


def test_a_worker_cannot_report_for_another_workers_delivery(secured: Cluster, curve: Keys) -> None:
    secured.start_worker(*curve.peer_args("w1"), "--concurrency", "1")
    m = secured.client
    task_id = m.execute({"name": "nap"}, {"seconds": 1.0})
    wait_until(lambda: m.status(task_id)["status"] == "running", what="the task to run on w1")
    owner = m.status(task_id)["worker"]
    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    security.PeerKeys.load(*curve.peer_args("w2")[1::2]).apply(push)
    push.connect(f"tcp://127.0.0.1:{secured.server.status_port}")
    forged = {"task_id": task_id, "attempt": 1, "event": "succeeded", "at": time.time(), "result": "forged"}
    tag = security.key_tag(keys.load_public(curve.root / "own" / "w2.key"))
    for worker_id in (owner, f"{tag}/impostor"):  # w1's id from w2's key; w2's own id
        push.send_multipart(protocol.status_batch(worker_id, [forged]))
    push.close()
    task = m.wait(task_id, timeout=15)
    assert (task["status"], task["result"]) == ("succeeded", {"slept": 1.0})
    wait_until(lambda: "is not the worker of the key that sent it" in secured.server.log(), what="the rejection")


class Relay(threading.Thread):
    """A TCP relay from a local port to the server's, recording every byte that crosses it."""

    def __init__(self, target: int) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.recorded = bytearray()
        self.lock = threading.Lock()

    def run(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            outbound = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self.lock:
                    self.recorded += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()

    def close(self) -> None:
        self.listener.close()


def _recorded_through_relays(cluster: Cluster, worker_args: list[str]) -> bytes:
    relays = [Relay(cluster.server.worker_port), Relay(cluster.server.status_port)]
    for relay in relays:
        relay.start()
    args = martinet_cmd("work", "--handlers", str(TEST_HANDLERS), "--worker-port", str(relays[0].port),
                        "--status-port", str(relays[1].port), "--heartbeat", "0.2", *worker_args)  # fmt: skip
    worker = Process(args, cluster.tmp_path / f"relayed-{len(cluster.workers)}.log").start()
    cluster.workers.append(worker)
    m = cluster.client
    task = m.wait(m.execute({"name": "echo"}, {"secret": SECRET}), timeout=20)
    assert task["result"]["args"]["secret"] == SECRET
    worker.terminate()
    for relay in relays:
        relay.close()
    return bytes(relays[0].recorded + relays[1].recorded)


def test_a_relay_sees_nothing_readable_with_keys(secured: Cluster, curve: Keys) -> None:
    recorded = _recorded_through_relays(secured, curve.peer_args("w1"))
    assert len(recorded) > 1000, "the relay carried the traffic"
    assert SECRET.encode() not in recorded


def test_a_relay_sees_the_secret_without_keys(sqlite_cluster: Cluster) -> None:
    recorded = _recorded_through_relays(sqlite_cluster, [])
    assert SECRET.encode() in recorded, "without keys the relay sees the task: the test above proves something"


def test_a_removed_key_is_refused_at_its_next_message(secured: Cluster, curve: Keys) -> None:
    worker = secured.start_worker(*curve.peer_args("w1"))
    m = secured.client
    (curve.root / "worker" / "w1.key").unlink()
    os.kill(secured.server.pid, signal.SIGHUP)
    wait_until(lambda: m.workers() == [], what="the worker to lose its slots")
    assert "its key is no longer allowed" in secured.server.log()
    task_id = m.execute({"name": "echo"})
    # It hears nothing more, reconnects, and its handshake is refused: still no task for it.
    wait_until(lambda: "refused this peer's key" in worker.log(), what="the worker to be refused at the handshake")
    assert m.status(task_id)["status"] == "queued" and worker.running()


def _non_loopback_address() -> str | None:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        address = line.split()[3].split("/")[0]
        if not address.startswith("127."):
            return address
    return None


@pytest.mark.parametrize("where", ["0.0.0.0", "this machine's address"])
def test_serving_off_loopback_without_keys_is_refused(tmp_path: Path, where: str) -> None:
    bind = "0.0.0.0" if where == "0.0.0.0" else _non_loopback_address()
    if bind is None:
        pytest.skip("this machine has no address off loopback")
    db = f"sqlite:///{tmp_path / 'm.db'}"
    refused = subprocess.run(martinet_cmd("serve", "--bind", bind, "--db", db, "--client-port", str(free_port())),
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    assert refused.returncode == 2
    assert f"refusing to serve on {bind} without keys" in refused.stderr and "--insecure" in refused.stderr
    server = Server(db, tmp_path / "open.log", "--insecure")
    server.args[server.args.index("--bind") + 1] = bind
    server.start()
    try:
        with Martinet("127.0.0.1" if bind == "0.0.0.0" else bind, server.client_port, timeout=0.5) as m:
            wait_until(lambda: _answers(m), what=f"the open server on {bind} to answer")
    finally:
        status = server.terminate()
    assert status == 0


def test_hostile_input_against_a_server_with_keys(secured: Cluster, curve: Keys) -> None:
    secured.start_worker(*curve.peer_args("w1"))
    server, m = secured.server, secured.client
    rng = random.Random(20261201)
    for port in (server.client_port, server.worker_port, server.status_port):  # raw TCP garbage, no keys
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(rng.randbytes(20_000))
    context = zmq.Context.instance()
    for kind, port, name in ((zmq.DEALER, server.client_port, "alice"), (zmq.DEALER, server.worker_port, "w2"),
                             (zmq.PUSH, server.status_port, "w2")):  # fmt: skip
        sock = context.socket(kind)
        sock.setsockopt(zmq.LINGER, 2000)
        security.PeerKeys.load(*curve.peer_args(name)[1::2]).apply(sock)
        sock.connect(f"tcp://127.0.0.1:{port}")
        for _ in range(500):
            sock.send_multipart([rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(1, 4))])
        sock.send_multipart([b"", json.dumps({"v": 1, "op": "ping", "pad": "x" * 17_000_000}).encode()])
        sock.close()
    ids = [m.execute({"name": "echo"}, {"n": n}) for n in range(20)]
    assert [m.wait(t, timeout=20)["status"] for t in ids] == ["succeeded"] * 20
    assert server.running() and "Traceback" not in server.log()


def test_http_off_loopback_needs_a_token_even_with_keys(tmp_path: Path, curve: Keys) -> None:
    db = f"sqlite:///{tmp_path / 'm.db'}"
    http_port = free_port()
    ports = ["--client-port", str(free_port()), "--worker-port", str(free_port()), "--status-port", str(free_port())]
    argv = martinet_cmd("serve", "--bind", "0.0.0.0", "--db", db, *ports, *curve.server_args())
    refused = subprocess.run([*argv, "--http-port", str(http_port)], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2, refused.stderr
    assert f"refusing to serve HTTP on 0.0.0.0:{http_port} without a token" in refused.stderr
    assert "--http-token" in refused.stderr and "--http-port 0" in refused.stderr
    for extra in (["--http-port", "0"], ["--http-port", str(http_port), "--http-token", SECRET]):
        server = Server(db, tmp_path / "keyed.log", *curve.server_args(), *extra)
        server.args[server.args.index("--bind") + 1] = "0.0.0.0"
        server.start()
        try:
            with curve.client(server, "alice", timeout=0.5) as m:
                wait_until(lambda m=m: _answers(m), what="the server with keys on 0.0.0.0 to answer")
            if "--http-token" in extra:
                with pytest.raises(urllib.error.HTTPError) as refused_http:
                    urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/v1/tasks", timeout=10)
                assert refused_http.value.code == 401, "the HTTP port is served, and asks for the token"
        finally:
            assert server.terminate() == 0

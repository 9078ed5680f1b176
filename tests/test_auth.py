"""auth.py: the ZAP handler on real zmq.green CURVE sockets, in this process under gevent.

Nothing here is monkey-patched, so every wait yields to the hub (gevent.sleep, green poll);
time.sleep would stop the handler being tested.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import pytest
import zmq as plain_zmq
import zmq.green as zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from martinet_app import keys
from martinet_app.auth import ZAP_ENDPOINT, Authenticator
from martinet_app.errors import ConfigError
from martinet_app.keys import KeyDir

#: Longest any test waits for a condition, seconds.
TIMEOUT = 10.0
_HANDSHAKE_EVENTS = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
}


def wait_for(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "") -> Any:
    """Poll ``predicate``, yielding to the hub, until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        gevent.sleep(0.01)
    return value


def handshake(monitor: Any) -> dict:
    """The first handshake event a monitor reports, within TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        if monitor.poll(left * 1000):
            event = recv_monitor_message(monitor)
            if event["event"] in _HANDSHAKE_EVENTS:
                return event
    pytest.fail(f"no handshake event within {TIMEOUT} s")


@dataclass
class Rig:
    """A context with an Authenticator and CURVE ROUTERs, one per ZAP domain, on 127.0.0.1."""

    context: Any
    auth: Authenticator
    dirs: dict[str, Path]
    #: Peers' (public, secret) z85 keys by name: alice is a client key, w1 a worker key.
    pairs: dict[str, tuple[bytes, bytes]]
    server_keys: tuple[bytes, bytes] = field(default_factory=plain_zmq.curve_keypair)
    servers: dict[str, Any] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=dict)
    sockets: list[Any] = field(default_factory=list)

    def serve(self, domain: str, curve: bool = True, enforce: bool = False) -> Any:
        server = self._socket(zmq.ROUTER)
        server.zap_domain = domain.encode()
        server.zap_enforce_domain = enforce
        if curve:
            server.curve_server = True
            server.curve_secretkey = self.server_keys[1]
        port = server.bind_to_random_port("tcp://127.0.0.1")
        self.servers[domain], self.endpoints[domain] = server, f"tcp://127.0.0.1:{port}"
        return server

    def connect(self, domain: str, pair: tuple[bytes, bytes] | None, monitor: bool = True) -> tuple[Any, Any]:
        """A DEALER connected to ``domain``'s ROUTER with the keys ``pair`` (None: no CURVE), and its monitor."""
        dealer = self._socket(zmq.DEALER)
        dealer.reconnect_ivl = -1  # one handshake per socket, so that refusals can be counted
        watching = dealer.get_monitor_socket() if monitor else None
        if watching is not None:
            self.sockets.append(watching)
        if pair is not None:
            dealer.curve_publickey, dealer.curve_secretkey = pair
            dealer.curve_serverkey = self.server_keys[0]
        dealer.connect(self.endpoints[domain])
        return dealer, watching

    def _socket(self, kind: int) -> Any:
        sock = self.context.socket(kind)
        sock.linger = 0
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in reversed(self.sockets):
            sock.close(linger=0)
        self.auth.stop()
        self.context.term()


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(rescan: float = 5.0) -> Rig:
        dirs = {"client": tmp_path / "client-keys", "worker": tmp_path / "worker-keys"}
        pairs = {}
        for name, domain in (("alice", "client"), ("w1", "worker")):
            public_path, secret_path = keys.generate(name, tmp_path / "pairs")
            dirs[domain].mkdir()
            shutil.copy(public_path, dirs[domain])
            pairs[name] = keys.load_secret(secret_path)
        context = zmq.Context()
        auth = Authenticator(context, {domain: KeyDir(path) for domain, path in dirs.items()}, rescan=rescan)
        auth.start()
        rig = Rig(context, auth, dirs, pairs)
        rigs.append(rig)
        for domain in dirs:
            rig.serve(domain)
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


def _receive(server: Any) -> list[Any]:
    assert server.poll(TIMEOUT * 1000), "the server received nothing"
    return server.recv_multipart(copy=False)


def _refusals(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "martinet_app.auth" and r.levelno == level]


# ---------------------------------------------------------------- handshakes


@pytest.mark.parametrize(("name", "domain"), [("alice", "client"), ("w1", "worker")])
def test_allowed_key_gets_through_with_its_key_as_user_id(rig: Rig, name: str, domain: str) -> None:
    public = rig.pairs[name][0]
    dealer, monitor = rig.connect(domain, rig.pairs[name])
    assert handshake(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    dealer.send(b"hello")
    frames = _receive(rig.servers[domain])
    assert frames[-1].bytes == b"hello"
    user_id = frames[-1].get("User-Id")
    assert user_id == public.decode("ascii")
    assert rig.auth.allowed(domain, user_id)
    assert rig.auth.key_name(user_id) == name
    other = {"client": "worker", "worker": "client"}[domain]
    assert not rig.auth.allowed(other, user_id)
    assert rig.auth.refused == 0


def test_unknown_key_is_refused(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    stranger = plain_zmq.curve_keypair()
    dealer, monitor = rig.connect("client", stranger)
    dealer.send(b"let me in")
    event = handshake(monitor)
    assert (event["event"], event["value"]) == (zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400)
    assert rig.auth.refused == 1
    assert rig.servers["client"].poll(0) == 0
    key = stranger[0].decode()
    assert _refusals(caplog) == [
        f"refused a CURVE key on the client port from 127.0.0.1: {key} (not in {rig.dirs['client']})"
    ]
    assert not rig.auth.allowed("client", key) and rig.auth.key_name(key) is None


def test_plain_client_is_refused(rig: Rig) -> None:
    """A client without keys fails the handshake before ZAP: libzmq sees the mechanisms differ."""
    dealer, monitor = rig.connect("client", None)
    dealer.send(b"let me in")
    event = handshake(monitor)
    assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    assert event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
    assert rig.servers["client"].poll(0) == 0


def test_non_curve_mechanism_is_refused(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """A socket without CURVE but with a ZAP domain asks ZAP about NULL connections: refused."""
    rig.serve("client", curve=False)
    dealer, monitor = rig.connect("client", None)
    dealer.send(b"let me in")
    event = handshake(monitor)
    assert (event["event"], event["value"]) == (zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400)
    assert rig.auth.refused == 1
    assert _refusals(caplog) == [
        "refused a NULL connection on the client port from 127.0.0.1: only CURVE keys are accepted"
    ]


def test_key_of_one_domain_is_refused_in_the_other(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    for name, domain in (("alice", "worker"), ("w1", "client")):
        _dealer, monitor = rig.connect(domain, rig.pairs[name])
        assert handshake(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert rig.auth.refused == 2
    alice, w1 = rig.pairs["alice"][0].decode(), rig.pairs["w1"][0].decode()
    assert _refusals(caplog) == [
        f'refused a CURVE key on the worker or status port from 127.0.0.1: {alice} (client key "alice", '
        f"not in {rig.dirs['worker']})",
        f'refused a CURVE key on the client port from 127.0.0.1: {w1} (worker key "w1", not in {rig.dirs["client"]})',
    ]


def test_removed_key_is_refused_after_reload(rig: Rig) -> None:
    dealer, monitor = rig.connect("client", rig.pairs["alice"])
    dealer.send(b"before")
    user_id = _receive(rig.servers["client"])[-1].get("User-Id")
    assert rig.auth.allowed("client", user_id)
    (rig.dirs["client"] / "alice.key").unlink()
    assert rig.auth.reload() is True
    # The connection stays open: the server refuses its messages by asking allowed() on each.
    assert not rig.auth.allowed("client", user_id)
    assert rig.auth.key_name(user_id) is None
    _dealer, monitor = rig.connect("client", rig.pairs["alice"])
    assert handshake(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert rig.auth.reload() is False


def test_rescan_follows_the_directories(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    rig = make_rig(rescan=0.05)
    public_path, secret_path = keys.generate("bob", tmp_path / "pairs")
    bob = keys.load_secret(secret_path)
    assert not rig.auth.allowed("client", bob[0])
    shutil.copy(public_path, rig.dirs["client"])
    wait_for(lambda: rig.auth.allowed("client", bob[0]), what="bob's key to be allowed")
    _dealer, monitor = rig.connect("client", bob)
    assert handshake(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    (rig.dirs["client"] / "bob.key").unlink()
    wait_for(lambda: not rig.auth.allowed("client", bob[0]), what="bob's key to be refused")


def test_refusals_of_one_key_are_logged_once_a_minute(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    stranger, other = plain_zmq.curve_keypair(), plain_zmq.curve_keypair()
    with caplog.at_level(logging.DEBUG, logger="martinet_app.auth"):
        for pair in (stranger, stranger, other):
            _dealer, monitor = rig.connect("client", pair)
            assert handshake(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert rig.auth.refused == 3
    warnings, debug = _refusals(caplog), _refusals(caplog, logging.DEBUG)
    assert [stranger[0].decode() in line for line in warnings] == [True, False]
    assert [other[0].decode() in line for line in warnings] == [False, True]
    assert len(debug) == 1 and stranger[0].decode() in debug[0]


def test_without_a_handler_only_zap_enforce_domain_keeps_strangers_out(rig: Rig) -> None:
    """Before start() and after stop(), libzmq lets any CURVE key in, unless the socket sets ZAP_ENFORCE_DOMAIN."""
    rig.auth.stop()
    _dealer, monitor = rig.connect("client", plain_zmq.curve_keypair())
    assert handshake(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    rig.serve("client", enforce=True)
    _dealer, monitor = rig.connect("client", plain_zmq.curve_keypair())
    assert handshake(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


# ---------------------------------------------------------------- ZAP requests sent by hand


def _ask(rig: Rig, *frames: bytes) -> list[bytes]:
    """Send one ZAP request to the handler as libzmq would, and return its reply."""
    requester = rig._socket(zmq.REQ)
    requester.connect(ZAP_ENDPOINT)
    requester.send_multipart(list(frames))
    assert requester.poll(TIMEOUT * 1000), "the ZAP handler did not answer"
    reply = requester.recv_multipart()
    requester.close(linger=0)
    return reply


def _curve(request_id: bytes, domain: bytes, key: bytes) -> tuple[bytes, ...]:
    return b"1.0", request_id, domain, b"192.0.2.1", b"", b"CURVE", key


def test_malformed_requests_are_refused_and_the_handler_goes_on(rig: Rig) -> None:
    alice = z85.decode(rig.pairs["alice"][0])
    malformed = [
        (b"1.0",),
        (b"0.9", *_curve(b"2", b"client", alice)[1:]),
        _curve(b"3", b"client", alice)[:-1],
        _curve(b"4", b"client", alice[:31]),
        (*_curve(b"5", b"client", alice), b"one too many"),
        _curve(b"6", b"\xff\xfe", alice),
        _curve(b"7", b"nowhere", alice),
        (b"1.0", b"8", b"client", b"192.0.2.1", b"", b"PLAIN", b"user", b"password"),
    ]
    for request in malformed:
        request_id = request[1] if len(request) > 1 else b""
        assert _ask(rig, *request) == [b"1.0", request_id, b"400", b"Not allowed", b"", b""], request
    assert rig.auth.refused == len(malformed)
    user_id = rig.pairs["alice"][0]
    assert _ask(rig, *_curve(b"9", b"client", alice)) == [b"1.0", b"9", b"200", b"OK", user_id, b""]


def test_unexpected_error_answers_500_and_the_handler_goes_on(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    alice = z85.decode(rig.pairs["alice"][0])

    def broken(public_z85: bytes | str) -> str | None:
        raise RuntimeError("broken")

    with monkeypatch.context() as patch:
        patch.setattr(rig.auth.domains["client"], "name", broken)
        assert _ask(rig, *_curve(b"1", b"client", alice))[2:4] == [b"500", b"Internal error"]
    assert _ask(rig, *_curve(b"2", b"client", alice))[2] == b"200"


def test_needs_a_green_context_and_a_rescan_interval(rig: Rig) -> None:
    domains = rig.auth.domains
    with plain_zmq.Context() as context, pytest.raises(TypeError, match="needs a zmq.green Context"):
        Authenticator(context, domains)
    for rescan in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="rescan interval"):
            Authenticator(rig.context, domains, rescan=rescan)


# ---------------------------------------------------------------- under load


def test_200_handshakes_never_block_the_hub(rig: Rig) -> None:
    """A behaviour check, not a benchmark: the hub keeps ticking while ZAP answers a burst."""
    server = rig.servers["client"]
    gaps: list[float] = []
    received = 0

    def tick() -> None:
        last = time.monotonic()
        while True:
            gevent.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    def receive() -> None:
        nonlocal received
        while True:
            server.recv_multipart()
            received += 1

    greenlets = [gevent.spawn(tick), gevent.spawn(receive)]
    try:
        for batch in range(4):
            dealers = []
            for i in range(50):
                pair = rig.pairs["alice"] if i % 2 else plain_zmq.curve_keypair()
                dealer, _ = rig.connect("client", pair, monitor=False)
                dealer.send(b"x")
                dealers.append(dealer)
            done = 25 * (batch + 1)
            wait_for(lambda done=done: received == done and rig.auth.refused == done, what=f"batch {batch}")
            for dealer in dealers:
                dealer.close(linger=0)
                rig.sockets.remove(dealer)
    finally:
        gevent.killall(greenlets)
    assert (received, rig.auth.refused) == (100, 100)
    assert len(gaps) > 10 and max(gaps) < 0.2, f"the hub stalled {max(gaps):.3f} s"

"""CurveZMQ on every socket: the server's keys and its refusal to run open off loopback, each peer's
options, who sent each message, and what a refused handshake means to the peer.

The ZAP handler that decides which keys may connect is auth.py; the key files are keys.py. The
server's sockets are CURVE servers whose ZAP domain names the role: ``client`` for the client
port, ``worker`` for the worker and status ports. ZAP answers with the peer's public key (z85) as
the User-Id of every message it sends, and :class:`Inbox` checks that key against the current
key directory on every message, so a key removed while connected is refused at its next message.

A worker's identity is bound to its key: its id begins with :func:`key_tag` of its public key, and
the server accepts READY and status events only from a key whose tag begins the worker id they
name. Fencing (store.py) then ties every delivery to that id, so one key cannot report for
another's deliveries, across server restarts too.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket as pysocket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils import z85

from .errors import AuthenticationFailed, ConfigError, ProtocolError
from .protocol import Rejections

log = logging.getLogger(__name__)

#: ZAP domains of the server's sockets.
CLIENT_DOMAIN = "client"
WORKER_DOMAIN = "worker"
#: Bytes of a public key that make its tag (64 bits: no one makes a key with a chosen tag).
_TAG_BYTES = 8
_HANDSHAKE_FAILED = (
    zmq.Event.HANDSHAKE_FAILED_AUTH | zmq.Event.HANDSHAKE_FAILED_PROTOCOL | zmq.Event.HANDSHAKE_FAILED_NO_DETAIL
)


@dataclass(frozen=True)
class PeerKeys:
    """A client's or worker's CURVE keys: its own pair and the server's public key (z85)."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, secret_key: str | None, server_key: str | None) -> PeerKeys | None:
        """The keys from their files; None when neither is given. ConfigError if only one is."""
        if secret_key is None and server_key is None:
            return None
        if secret_key is None or server_key is None:
            raise ConfigError(
                "keys need both --secret-key (this peer's NAME.key_secret) and --server-key (the server's "
                "public .key), or neither"
            )
        from . import keys

        public, secret = keys.load_secret(secret_key)
        return cls(public, secret, keys.load_public(server_key))

    def apply(self, sock: Any) -> None:
        """Make ``sock`` a CURVE client of the server (before it connects)."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


@functools.lru_cache(maxsize=1024)  # asked on every worker message: one decode per key, not per message
def key_tag(public: bytes | str) -> str:
    """The tag a worker id begins with: hex of the first bytes of its public key (z85)."""
    text = public.decode() if isinstance(public, bytes) else public
    return z85.decode(text)[:_TAG_BYTES].hex()


def bound_to_key(worker_id: str, user_id: str | None) -> bool:
    """Whether ``worker_id`` may be used by the peer whose key is ``user_id`` (always, on an open server)."""
    return user_id is None or worker_id.startswith(key_tag(user_id) + "/")


def check_bind(bind: str, secured: bool, insecure: bool) -> None:
    """Refuse to serve off loopback without keys (ConfigError), unless ``insecure`` says it is on purpose."""
    if secured or insecure or is_loopback(bind):
        return
    raise ConfigError(
        f"refusing to serve on {bind} without keys: anyone who reaches its ports could submit tasks, pose as a "
        "worker or forge results. Make keys (martinet keygen server --dir keys; martinet keygen NAME for each "
        "client and worker) and start with --secret-key keys/server.key_secret --client-keys DIR --worker-keys DIR, "
        "or pass --insecure to run open on purpose (on a network you trust)"
    )


def is_loopback(bind: str) -> bool:
    """Whether every address ``bind`` stands for is a loopback one (a host name is resolved)."""
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:  # a host name, or * for every interface
        try:
            addresses = {info[4][0] for info in pysocket.getaddrinfo(bind, None)}
        except (OSError, UnicodeError):
            return False
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def serve_curve(sock: Any, secret: bytes, domain: str) -> None:
    """Make a server socket a CURVE server whose peers ZAP checks in ``domain`` (before it binds)."""
    sock.zap_domain = domain.encode()
    # Without it, libzmq lets every key in while no ZAP handler is bound (before start, after stop).
    sock.zap_enforce_domain = True
    sock.curve_server = True
    sock.curve_secretkey = secret


class Inbox:
    """The messages of one server socket, each with the public key (z85) that sent it: None on an open server.

    A message whose key is no longer allowed in the socket's domain is dropped and counted
    (``rejected``, with the reason ``unauthenticated``; a warning at most every 5 s), and
    ``on_refused`` is called with the key.
    """

    def __init__(
        self, sock: Any, auth: Any = None, domain: str = "", rejected: Callable[[str], None] = lambda reason: None
    ) -> None:
        self.socket = sock
        self.auth = auth
        self.domain = domain
        self.on_refused: Callable[[str], None] = lambda user_id: None
        self._refusals = Rejections(log, f"{domain} keys", rejected)

    def recv(self, flags: int = 0) -> tuple[list[bytes], str | None]:
        """The next message allowed in, and its key; raises zmq.Again with NOBLOCK when none is waiting."""
        if self.auth is None:
            return self.socket.recv_multipart(flags), None
        while True:
            parts = self.socket.recv_multipart(flags, copy=False)
            try:
                user_id = parts[-1].get("User-Id")
            except zmq.ZMQError:  # no ZAP answer behind it: nothing vouches for this message
                user_id = ""
            if self.auth.allowed(self.domain, user_id):
                return [part.bytes for part in parts], user_id
            self._refusals.reject(
                ProtocolError(f"a message from a key no longer allowed: {user_id}", "unauthenticated")
            )
            self.on_refused(user_id)


def monitor(sock: Any) -> Any:
    """A PAIR socket reporting ``sock``'s handshakes, failed (:func:`handshake_failure` reads them) and
    succeeded, its dropped connections (EVENT_DISCONNECTED: a server list moves on), then
    MONITOR_STOPPED once it is closed.

    A fresh address each time: pyzmq's own names it after the file descriptor, which the next socket
    may get while the old monitor is still being torn down.
    """
    address = f"inproc://martinet-monitor-{uuid.uuid4().hex}"
    events = _HANDSHAKE_FAILED | zmq.Event.HANDSHAKE_SUCCEEDED | zmq.Event.DISCONNECTED | zmq.Event.MONITOR_STOPPED
    sock.monitor(address, events)
    pair = sock.context.socket(zmq.PAIR)
    pair.connect(address)
    return pair


def handshake_failure(event: dict, endpoint: str, keyed: bool) -> AuthenticationFailed | None:
    """What a monitor event (``zmq.utils.monitor.parse_monitor_message``) means to a peer: None if not a failure."""
    kind = event["event"]
    if kind == zmq.Event.HANDSHAKE_FAILED_AUTH:
        return AuthenticationFailed(
            f"the server at {endpoint} refused this peer's key (ZAP status {event['value']}): ask its operator to "
            "put your public NAME.key in its --client-keys (clients) or --worker-keys (workers) directory"
        )
    if kind & (zmq.Event.HANDSHAKE_FAILED_PROTOCOL | zmq.Event.HANDSHAKE_FAILED_NO_DETAIL):
        if keyed:
            why = "this peer uses keys and the server does not, or its --server-key is not the server's"
        else:
            why = "the server uses keys (CURVE): pass --secret-key and --server-key (or their MARTINET_* variables)"
        return AuthenticationFailed(f"the handshake with the server at {endpoint} failed: {why}")
    return None

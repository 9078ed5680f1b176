"""The server's ZAP handler (RFC 27): which CURVE keys may connect to each of its sockets.

libzmq asks the socket bound to ``inproc://zeromq.zap.01`` in a socket's own context about every
handshake on it; the server names the socket's role in its ZAP domain (``client`` for the client
port, ``worker`` for the worker and status ports), and each domain allows the keys of one
:class:`~martinet_app.keys.KeyDir`. An allowed connection gets its public key (z85) as the
User-Id of every message it sends, and :meth:`Authenticator.allowed` answers in O(1) whether that
key is allowed now, so the server can refuse a message from a key removed while it was connected.

The handler is a greenlet, not pyzmq's ThreadAuthenticator: that one runs an asyncio loop in an
OS thread, while the handler must share the server's zmq.green context, where a greenlet is
native. Its work is in-memory lookups, so it never blocks the hub; the keys are re-read by a
second greenlet every few seconds: a listdir and a stat per file, reading only the files that changed.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import gevent
import gevent.event
import zmq.green as zmq
from zmq.utils import z85

from .errors import ConfigError
from .keys import KeyDir
from .loops import forever

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: Seconds between two warnings about the same refused key (or address); the others go to DEBUG.
LOG_EVERY = 60.0
_VERSION = b"1.0"
_KEY_BYTES = 32
_PLACES = {"client": "the client port", "worker": "the worker or status port"}


class Authenticator:
    """Answers ZAP requests for CURVE on ``context`` (a zmq.green Context) from one KeyDir per ZAP domain.

    A request whose domain has no KeyDir, whose mechanism is not CURVE, whose key its KeyDir does
    not hold, or that is malformed, is refused (status 400) and counted in :attr:`refused`.
    """

    def __init__(self, context: zmq.Context, domains: dict[str, KeyDir], *, rescan: float = 5.0) -> None:
        if not isinstance(context, zmq.Context):
            raise TypeError(f"the Authenticator needs a zmq.green Context, not {type(context).__name__}")
        if not (isinstance(rescan, (int, float)) and rescan > 0 and math.isfinite(rescan)):
            raise ConfigError(f"the key directories' rescan interval must be a number of seconds > 0, got {rescan!r}")
        self.context = context
        self.domains = dict(domains)
        self.rescan = rescan
        #: Requests refused since start.
        self.refused = 0
        self._socket: zmq.Socket | None = None
        self._stopping = gevent.event.Event()
        self._greenlets: list[gevent.Greenlet] = []
        #: What a warning was about (a key, or a mechanism and address) -> when it was logged (monotonic).
        self._warned: dict[str, float] = {}

    def start(self) -> None:
        """Bind the ZAP socket and spawn the handler and the rescan greenlets.

        Call it before the server's sockets bind: a handshake that finds no handler bound is let
        through unchecked, unless the socket sets ZAP_ENFORCE_DOMAIN.
        """
        socket = self.context.socket(zmq.REP)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError:
            socket.close()
            raise
        self._socket = socket
        self._stopping.clear()
        self._greenlets = [
            gevent.spawn(forever, functools.partial(self._answer_once, socket), "ZAP handler", self._stopping),
            gevent.spawn(forever, self._rescan_once, "key rescan", self._stopping),
        ]

    def stop(self) -> None:
        """Kill the greenlets and close the ZAP socket (after the server's sockets, for the reason in start)."""
        self._stopping.set()
        gevent.killall(self._greenlets)
        self._greenlets = []
        if self._socket is not None:
            # Unbinding an inproc endpoint takes effect at once, while close() lets the reaper
            # unbind it later: a handshake meanwhile would send its ZAP request to a closing socket
            # and wait forever for the answer.
            self._socket.unbind(ZAP_ENDPOINT)
            self._socket.close(linger=0)
            self._socket = None

    def reload(self) -> bool:
        """Re-read every key directory now (the server's SIGHUP); whether any set of keys changed."""
        return any([keys.refresh() for keys in self.domains.values()])

    def allowed(self, domain: str, user_id: str | bytes | None) -> bool:
        """Whether the key ``user_id`` (z85, a message's User-Id) is allowed in ``domain`` now."""
        keys = self.domains.get(domain)
        return keys is not None and user_id is not None and keys.name(user_id) is not None

    def key_name(self, user_id: str | bytes) -> str | None:
        """The name (file stem) of this key in whichever domain allows it, else None."""
        return next((name for keys in self.domains.values() if (name := keys.name(user_id)) is not None), None)

    def _answer_once(self, socket: zmq.Socket) -> None:
        socket.send_multipart(self._reply(socket.recv_multipart()))

    def _rescan_once(self) -> None:
        if not self._stopping.wait(self.rescan):
            self.reload()
            self._forget_old_warnings()

    def _reply(self, request: list[bytes]) -> list[bytes]:
        """The reply to one ZAP request. Never raises: a REP socket that leaves a request unanswered takes no other."""
        request_id = request[1] if len(request) > 1 else b""
        try:
            user_id = self._authenticate(request)
        except Exception:
            log.exception("ZAP handler: unexpected error; the connection is refused")
            self.refused += 1
            return [_VERSION, request_id, b"500", b"Internal error", b"", b""]
        if user_id is None:
            self.refused += 1
            return [_VERSION, request_id, b"400", b"Not allowed", b"", b""]
        return [_VERSION, request_id, b"200", b"OK", user_id, b""]

    def _authenticate(self, request: list[bytes]) -> bytes | None:
        """The User-Id (the client's public key, z85) if the request's key is allowed; else log why not, None."""
        if len(request) < 6 or request[0] != _VERSION:
            version = request[0][:8] if request else b""
            self._warn("malformed", "refused a malformed ZAP request: %d frame(s), version %r", len(request), version)
            return None
        domain_bytes, address_bytes, _routing_id, mechanism, *credentials = request[2:]
        domain = domain_bytes.decode("utf-8", "replace")
        address = address_bytes.decode("utf-8", "replace")
        place = _PLACES.get(domain, f"ZAP domain {domain!r}")
        if mechanism != b"CURVE":
            kind = mechanism.decode("ascii", "replace")
            self._warn(
                f"{kind} {address}",
                "refused a %s connection on %s from %s: only CURVE keys are accepted",
                kind,
                place,
                address,
            )
            return None
        if len(credentials) != 1 or len(credentials[0]) != _KEY_BYTES:
            self._warn(
                "malformed", "refused a malformed ZAP request: CURVE credentials are not one %d-byte key", _KEY_BYTES
            )
            return None
        key = z85.encode(credentials[0])
        if self.allowed(domain, key):
            return key
        text = key.decode("ascii")
        self._warn(text, "refused a CURVE key on %s from %s: %s (%s)", place, address, text, self._why(domain, text))
        return None

    def _why(self, domain: str, key: str) -> str:
        """Why a key was refused: the directory that lacks it, and its name where another domain has it."""
        keys = self.domains.get(domain)
        where = f"no key directory for ZAP domain {domain!r}" if keys is None else f"not in {keys.path}"
        known = ((other, name) for other, keydir in self.domains.items() if (name := keydir.name(key)) is not None)
        elsewhere = next(known, None)
        return where if elsewhere is None else f'{elsewhere[0]} key "{elsewhere[1]}", {where}'

    def _warn(self, subject: str, message: str, *args: object) -> None:
        """Log a refusal as a warning, unless one about ``subject`` was logged less than LOG_EVERY ago."""
        now = time.monotonic()
        last = self._warned.get(subject)
        if last is not None and now - last < LOG_EVERY:
            log.debug(message, *args)
            return
        self._warned[subject] = now
        log.warning(message, *args)

    def _forget_old_warnings(self) -> None:
        """Drop the warning times past LOG_EVERY, so that refusals of ever new keys do not grow memory."""
        now = time.monotonic()
        self._warned = {subject: at for subject, at in self._warned.items() if now - at < LOG_EVERY}

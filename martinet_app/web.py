"""The HTTP port: a small WSGI app on the server's own gevent hub (gevent.pywsgi).

It serves the dashboard's pages and assets (dashboard.py), the JSON API under ``/api/v1``
(api.py) and ``/metrics`` (metrics.py). Each of those modules gives a list of :class:`Route`;
this module matches a request to one, checks access (access.py) and turns a typed
:class:`~martinet_app.errors.MartinetError` into a JSON error with a fitting HTTP status.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from . import protocol
from .access import Access, Denied, Role
from .errors import (
    AuthenticationFailed,
    BadTimeSpec,
    InvalidRequest,
    InvalidTransition,
    MartinetError,
    ProtocolError,
    RequestTooLarge,
    StoreUnavailable,
    TaskNotFound,
)

log = logging.getLogger(__name__)

#: Most HTTP requests served at once; more wait for a free place (each is a greenlet of the hub).
MAX_CONNECTIONS = 64
#: Largest request body read, bytes (a task's args travel in it).
MAX_BODY_BYTES = 16 * 1024 * 1024
#: HTTP status of each typed error; a MartinetError not listed here is a 500.
STATUS_OF: dict[type[MartinetError], int] = {
    RequestTooLarge: 413,
    BadTimeSpec: 400,
    InvalidRequest: 400,
    TaskNotFound: 404,
    InvalidTransition: 409,
    StoreUnavailable: 503,
    AuthenticationFailed: 401,
}
_REASONS = {
    200: "OK",
    201: "Created",
    303: "See Other",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
]


@dataclass
class Response:
    """What a route answers."""

    body: bytes = b""
    status: int = 200
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Request:
    """One HTTP request, with the path parameters of the route it matched and the caller's role.

    ``rejected`` counts a body refused as it is read, by reason (``too_large``, ``malformed``).
    """

    environ: dict
    method: str
    path: str
    params: dict[str, str]
    role: Role
    rejected: Callable[[str], None]

    @property
    def query(self) -> dict[str, str]:
        """The query string, the first value of each name."""
        return {name: values[0] for name, values in parse_qs(self.environ.get("QUERY_STRING", "")).items()}

    def header(self, name: str) -> str | None:
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"))

    def body(self) -> bytes:
        """The request body, at most MAX_BODY_BYTES (RequestTooLarge beyond)."""
        try:
            length = int(self.environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise InvalidRequest("Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            self.rejected("too_large")
            raise RequestTooLarge(f"the request body has {length} bytes; at most {MAX_BODY_BYTES} are accepted")
        return self.environ["wsgi.input"].read(length) if length > 0 else b""

    def json(self) -> dict:
        """The body as a JSON object, parsed as strictly as a ZeroMQ request (InvalidRequest otherwise)."""
        kind = (self.environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
        if kind != "application/json":
            self.rejected("malformed")
            raise InvalidRequest(f"send the body as JSON with Content-Type: application/json, not {kind or 'none'!r}")
        try:
            return protocol.json_object(self.body(), "request body")
        except ProtocolError as exc:
            self.rejected("malformed")
            raise InvalidRequest(exc.message) from None


Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class Route:
    """``pattern`` is a path with ``{name}`` parts (one path segment each); ``role`` the least role it needs."""

    method: str
    pattern: str
    handler: Handler
    role: Role = Role.READ


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(protocol.dumps(obj), status)


def error_response(exc: MartinetError) -> Response:
    """A typed error as the body ``{"error": {"type", "message"}}``, the same object as a ZeroMQ reply's."""
    status = exc.status if isinstance(exc, Denied) else _status_of(exc)
    return json_response({"error": exc.to_wire()}, status)


def _status_of(exc: MartinetError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500


class WebApp:
    """The WSGI callable: routing, access and errors for every route.

    ``rejected`` counts the requests refused, by reason: ``unauthenticated`` (401), ``forbidden`` (403),
    ``unknown_path`` (404: no route), ``bad_method`` (405), and bodies ``too_large`` or ``malformed``.
    """

    def __init__(self, routes: Iterable[Route], access: Access, rejected: Callable[[str], None]) -> None:
        self.access = access
        self.rejected = rejected
        self._routes = [(route, _compile(route.pattern)) for route in routes]

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        response = self._respond(environ)
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body)))]
        headers += _SECURITY_HEADERS + response.headers
        start_response(f"{response.status} {_REASONS.get(response.status, 'Unknown')}", headers)
        return [response.body] if environ["REQUEST_METHOD"] != "HEAD" else []

    def _respond(self, environ: dict) -> Response:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO") or "/"
        matches = [(route, match) for route, regex in self._routes if (match := regex.fullmatch(path)) is not None]
        if any(not match.groupdict() for _, match in matches):  # a literal path wins: POST-only /tasks/bulk is no {id}
            matches = [(route, match) for route, match in matches if not match.groupdict()]
        allowed: list[str] = []
        for route, match in matches:
            if route.method != method and not (route.method == "GET" and method == "HEAD"):
                allowed.append(route.method)
                continue
            try:
                role = self.access.check(environ, route.role, page=not path.startswith(("/api/", "/metrics")))
                return route.handler(Request(environ, method, path, match.groupdict(), role, self.rejected))
            except MartinetError as exc:
                if isinstance(exc, Denied):
                    self.rejected("unauthenticated" if exc.status == 401 else "forbidden")
                if isinstance(exc, Denied) and exc.status == 401 and self.access.wants_login(environ, path):
                    return Response(b"", 303, "text/plain", [("Location", "/login?next=" + path)])
                return error_response(exc)
            except Exception as exc:
                log.exception("HTTP %s %s failed unexpectedly", method, path)
                return error_response(MartinetError(f"server error: {type(exc).__name__}; see the server log"))
        if allowed:
            self.rejected("bad_method")
            response = error_response(InvalidRequest(f"{method} is not allowed on {path}: use {', '.join(allowed)}"))
            response.status = 405
            response.headers.append(("Allow", ", ".join(sorted(set(allowed)))))
            return response
        self.rejected("unknown_path")
        return error_response(TaskNotFound(f"no such page or API path: {path}"))


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(pattern)))


def serve(app: WebApp, host: str, port: int) -> WSGIServer:
    """Start serving ``app`` on ``host:port`` in a greenlet of the hub; OSError if the port cannot be bound."""
    server = _Server((host, port), app, spawn=Pool(MAX_CONNECTIONS), log=None, error_log=_ErrorLog())
    server.start()
    return server


class _Server(WSGIServer):
    """gevent.pywsgi's server, with two changes.

    Its connections go without Nagle's delay: it sends a response's headers and body in two writes,
    and on a kept-alive connection the second waited for the client's delayed ACK (40 ms).
    Its stop closes at once the connections waiting for their next request: a browser keeps one open
    between the dashboard's polls, and stopping would wait its whole timeout for it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, handler_class=_Handler, **kwargs)
        self.idle: set[Any] = set()

    def handle(self, sock: socket.socket, address: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)

    def stop(self, timeout: float | None = None) -> None:
        self.close()
        for connection in list(self.idle):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone
        super().stop(timeout)


class _Handler(WSGIHandler):
    def read_requestline(self) -> str:
        connection = self.socket
        self.server.idle.add(connection)
        try:
            return super().read_requestline()
        finally:
            self.server.idle.discard(connection)


class _ErrorLog:
    """gevent.pywsgi's error log, into ours (a client that hangs up is not worth a traceback)."""

    def write(self, text: str) -> None:
        text = text.strip()
        if text:
            log.debug("http: %s", text)

    def flush(self) -> None:
        return None

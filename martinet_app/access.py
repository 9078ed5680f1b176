"""Who may use the HTTP port: tokens, the dashboard's session cookie, and the cross-site request check.

With no token the port is open, which the server allows only on loopback (or with ``--insecure``).
With ``--http-token`` every route but the login page needs it: as ``Authorization: Bearer TOKEN``
(the API, ``/metrics``), or as the session cookie the login form sets (the pages). The cookie holds
an HMAC of the token, never the token, so changing the token ends every session.
``--http-read-token`` gives the same routes read-only: no action.

A request that changes something and does not carry a bearer header (a browser's) must come from
the dashboard itself: not cross-site by its Origin or Sec-Fetch-Site headers, and sent as JSON,
which a cross-site page cannot send without a CORS preflight that this server never grants.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit

from .errors import ConfigError, MartinetError
from .security import is_loopback

#: The dashboard's session cookie.
COOKIE = "martinet_session"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Role(enum.IntEnum):
    """What a caller may do; a route names the least it needs."""

    PUBLIC = 0  # anyone: the login page and its assets
    READ = 1  # every page and GET, no action
    ADMIN = 2  # everything


class Denied(MartinetError):
    """The request may not do what it asks: ``status`` 401 without a valid token, 403 otherwise."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def check_http(bind: str, port: int, token: str | None, read_token: str | None, insecure: bool) -> None:
    """Refuse an HTTP port off loopback with no token (ConfigError), and a read token without a full one."""
    if read_token and not token:
        raise ConfigError("--http-read-token needs --http-token too: the token that may also act")
    if read_token and token and hmac.compare_digest(read_token, token):
        raise ConfigError("--http-read-token must differ from --http-token")
    if port == 0 or token or insecure or is_loopback(bind):
        return
    raise ConfigError(
        f"refusing to serve HTTP on {bind}:{port} without a token: anyone who reaches it could see every task and "
        "cancel or submit them. Give --http-token TOKEN (MARTINET_HTTP_TOKEN; make one with: python -c "
        "'import secrets; print(secrets.token_urlsafe(32))'), turn the port off with --http-port 0, or pass "
        "--insecure to run it open on purpose"
    )


class Access:
    """Decides each request's role from its bearer header or session cookie."""

    def __init__(self, token: str | None, read_token: str | None) -> None:
        self._tokens = [(t, role) for t, role in ((token, Role.ADMIN), (read_token, Role.READ)) if t]

    @property
    def open(self) -> bool:
        """No token: everyone may do everything (loopback, or --insecure)."""
        return not self._tokens

    def login(self, token: str) -> tuple[Role, str] | None:
        """The role ``token`` gives and the ``Set-Cookie`` value of its session; None for a wrong token."""
        role = self._role_of(token)
        if role is None:
            return None
        return role, f"{COOKIE}={self._session(role)}; Path=/; HttpOnly; SameSite=Strict"

    def check(self, environ: dict, needed: Role, *, page: bool) -> Role:
        """The caller's role, if it is at least ``needed``; Denied otherwise, or for a cross-site change."""
        bearer = _bearer(environ)
        role = Role.ADMIN if self.open else self._caller(environ, bearer)
        if role < needed and role == Role.PUBLIC:
            how = "log in" if page else "send Authorization: Bearer TOKEN"
            raise Denied(f"this needs the HTTP token (--http-token or --http-read-token): {how}", 401)
        if environ["REQUEST_METHOD"] not in _SAFE_METHODS and bearer is None and needed > Role.PUBLIC:
            _same_site(environ)
        if role < needed:
            raise Denied("the read-only token cannot do this: it needs the token given with --http-token", 403)
        return role

    def wants_login(self, environ: dict, path: str) -> bool:
        """Whether a refused request is a browser's page load, which goes to the login form instead."""
        return environ["REQUEST_METHOD"] in ("GET", "HEAD") and not path.startswith(("/api/", "/metrics"))

    def _caller(self, environ: dict, bearer: str | None) -> Role:
        if bearer is not None:
            return self._role_of(bearer) or Role.PUBLIC
        session = _cookie(environ)
        if session:
            for _, role in self._tokens:
                if hmac.compare_digest(session, self._session(role)):
                    return role
        return Role.PUBLIC

    def _role_of(self, token: str) -> Role | None:
        for known, role in self._tokens:
            if hmac.compare_digest(token.encode(), known.encode()):
                return role
        return None

    def _session(self, role: Role) -> str:
        token = next(known for known, r in self._tokens if r == role)
        return hmac.new(token.encode(), f"martinet-session:{role.name}".encode(), hashlib.sha256).hexdigest()


def _bearer(environ: dict) -> str | None:
    header = environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _cookie(environ: dict) -> str | None:
    try:
        morsel = SimpleCookie(environ.get("HTTP_COOKIE", "")).get(COOKIE)
    except CookieError:
        return None
    return morsel.value if morsel is not None else None


def _same_site(environ: dict) -> None:
    """Denied unless a browser's change request comes from this server's own pages, as JSON."""
    if environ.get("HTTP_SEC_FETCH_SITE", "same-origin") not in ("same-origin", "none"):
        raise Denied("cross-site request refused: actions come from the dashboard's own pages", 403)
    origin = environ.get("HTTP_ORIGIN")
    if origin and origin != "null" and urlsplit(origin).netloc != environ.get("HTTP_HOST"):
        raise Denied(f"cross-site request refused: Origin {origin[:80]} is not this server", 403)
    if origin == "null":
        raise Denied("cross-site request refused: Origin null", 403)
    kind = (environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise Denied("send actions as JSON (Content-Type: application/json): a cross-site form cannot", 403)

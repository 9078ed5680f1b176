"""The dashboard: its pages and assets (shipped in ``martinet_app/static``), the login form and ``whoami``.

The pages are one hand-written single-page app (``static/index.html``, ``app.js``, ``app.css``) that
reads everything from the JSON API under ``/api/v1`` and polls it for live updates. Every page path
serves the same ``index.html``; the script draws the page the path names. The assets are read once
from the package (importlib.resources, so they are found inside the PyInstaller executable too) and
served with a content hash in their URL, which lets a browser keep them until the next release.
"""

from __future__ import annotations

import hashlib
import html
from importlib import resources
from urllib.parse import parse_qs, quote

from .access import COOKIE, Access, Role
from .errors import TaskNotFound
from .web import Request, Response, Route, json_response

#: Content type of each asset, by suffix; a file of another kind is not served.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
#: The paths of the single-page app, each served ``index.html`` (``{id}``: a task's page).
PAGES = ("/", "/tasks", "/tasks/{id}", "/recurring", "/workers")
_IMMUTABLE = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"
_PRIVATE = "no-store"


def routes(access: Access) -> list[Route]:
    """The dashboard's routes: its pages, assets, login and logout, and ``GET /api/v1/whoami``."""
    assets = _load_assets()
    version = hashlib.sha256(b"".join(body for _, body in sorted(assets.items()))).hexdigest()[:12]
    index = assets.pop("index.html").replace(b"{{version}}", version.encode())
    index_etag = f'"{hashlib.sha256(index).hexdigest()[:16]}"'

    def page(request: Request) -> Response:
        return _cached(request, index, CONTENT_TYPES[".html"], index_etag, _REVALIDATE)

    def asset(request: Request) -> Response:
        name = request.params["name"]
        body = assets.get(name)
        if body is None:
            raise TaskNotFound(f"no such dashboard asset: {name}")
        versioned = request.query.get("v") == version
        return _cached(request, body, _content_type(name), f'"{version}"', _IMMUTABLE if versioned else _REVALIDATE)

    def login_form(request: Request) -> Response:
        target = _local_path(request.query.get("next"))
        if access.open:
            return _redirect(target)
        return _login_page(target, None, 200)

    def login(request: Request) -> Response:
        form = {name: values[0] for name, values in parse_qs(request.body().decode("utf-8", "replace")).items()}
        target = _local_path(form.get("next"))
        if access.open:
            return _redirect(target)
        session = access.login(form.get("token", "").strip())
        if session is None:
            return _login_page(target, "That token is not valid for this server. Check it and try again.", 401)
        return _redirect(target, ("Set-Cookie", session[1]))

    def logout(request: Request) -> Response:
        gone = f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
        return _redirect("/" if access.open else "/login", ("Set-Cookie", gone))

    def whoami(request: Request) -> Response:
        """The caller's role, so that the pages show only the actions it may take."""
        return json_response({"role": request.role.name.lower(), "open": access.open})

    return [
        *(Route("GET", path, page) for path in PAGES),
        Route("GET", "/static/{name}", asset, Role.PUBLIC),
        Route("GET", "/login", login_form, Role.PUBLIC),
        Route("POST", "/login", login, Role.PUBLIC),
        Route("GET", "/logout", logout, Role.PUBLIC),
        Route("GET", "/api/v1/whoami", whoami),
    ]


def _load_assets() -> dict[str, bytes]:
    """Every servable file of ``martinet_app/static``, by name."""
    folder = resources.files("martinet_app") / "static"
    return {item.name: item.read_bytes() for item in folder.iterdir() if _content_type(item.name)}


def _content_type(name: str) -> str | None:
    suffix = name[name.rfind(".") :] if "." in name else ""
    return CONTENT_TYPES.get(suffix)


def _cached(request: Request, body: bytes, content_type: str, etag: str, cache_control: str) -> Response:
    """``body``, or 304 Not Modified when the browser holds it already (If-None-Match)."""
    headers = [("Cache-Control", cache_control), ("ETag", etag)]
    if request.header("If-None-Match") == etag:
        return Response(b"", 304, content_type, headers)
    return Response(body, 200, content_type, headers)


def _local_path(target: str | None) -> str:
    """Where to go after logging in: a path of this server only (never another site: no open redirect)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    if any(ord(char) < 0x20 or char == "\\" for char in target):
        return "/"
    return target


def _redirect(target: str, *headers: tuple[str, str]) -> Response:
    location = quote(target, safe="/?&=%#:@!$'()*+,;-._~")
    return Response(b"", 303, "text/plain", [("Location", location), ("Cache-Control", _PRIVATE), *headers])


def _login_page(target: str, error: str | None, status: int) -> Response:
    """The login form (plain HTML: it works before any script, and with none)."""
    alert = f'<p class="login-error" role="alert">{html.escape(error)}</p>' if error else ""
    body = _LOGIN_PAGE.format(next=html.escape(target, quote=True), alert=alert)
    return Response(body.encode(), status, CONTENT_TYPES[".html"], [("Cache-Control", _PRIVATE)])


_LOGIN_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in · Martinet</title>
<link rel="icon" href="/static/logo.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/app.css">
</head>
<body class="login-body">
<main class="login-card">
<h1 class="login-title"><img src="/static/logo.svg" alt="" width="32" height="32"> Martinet</h1>
<p class="login-lead">This dashboard needs the server's HTTP token
(<code>--http-token</code>, or <code>--http-read-token</code> to look without acting).</p>
{alert}
<form method="post" action="/login">
<input type="hidden" name="next" value="{next}">
<label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit" class="button primary">Log in</button>
</form>
</main>
</body>
</html>
"""

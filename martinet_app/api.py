"""The JSON API under ``/api/v1``: the client's verbs over HTTP, for any language.

Each route builds the same request a ZeroMQ client sends and runs it through the client endpoint
(:meth:`ClientEndpoint.call`), so it is checked, committed and answered exactly as there: every
accepted task is committed before the response, and errors carry the same types and messages
(web.STATUS_OF gives their HTTP statuses). An ``Idempotency-Key`` header on a request that
changes something is its ``request_key``: sent again, it creates nothing twice. The OpenAPI document
of every route (openapi.py) is served at ``OPENAPI_PATH``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import openapi, protocol
from .access import Role
from .endpoint import ClientEndpoint
from .errors import InvalidRequest, TaskNotFound
from .web import Request, Response, Route, json_response

#: Fields of a task submission (POST /api/v1/tasks) and of a schedule (POST /api/v1/recurring).
_TASK_BODY = frozenset({"name", "args", "username", "description", "key", "options", "when", "tz", "after"})
_RECURRING_BODY = frozenset({"name", "args", "username", "description", "options", "interval", "run_at", "tz"})
#: Fields of a batch (POST /api/v1/tasks/batch) and of a chain (POST /api/v1/tasks/chain).
_BATCH_BODY = frozenset({"tasks", "options"})
_CHAIN_BODY = _BATCH_BODY | {"after"}
#: Fields of a bulk action (POST /api/v1/tasks/bulk): the action and the filters of the tasks it moves.
_BULK_BODY = frozenset({"action", "status", "name", "username", "search", "limit"})
#: Query parameters of GET /api/v1/tasks: text filters, and integers.
_LIST_QUERY = ("status", "name", "username", "search")
_LIST_NUMBERS = ("limit", "before")
#: Where the API's OpenAPI document is served.
OPENAPI_PATH = "/api/v1/openapi.json"


def routes(endpoint: ClientEndpoint) -> list[Route]:
    """The API's routes over ``endpoint``."""

    def call(request: Request, op: str, **fields: Any) -> dict:
        body = {"op": op, **{key: value for key, value in fields.items() if value is not None}}
        key = request.header("Idempotency-Key")
        if key is not None and op in protocol.MUTATING_OPS:
            body["request_key"] = key
        return endpoint.call(body, int(request.environ.get("CONTENT_LENGTH") or 0))

    def on_task(op: str) -> Callable[[Request], Response]:
        return lambda request: json_response(call(request, op, task_id=_id(request.params["id"])))

    def submit(request: Request) -> Response:
        body = _fields(request.json(), _TASK_BODY, "a task")
        meta = {key: body.get(key) for key in ("name", "username", "description", "key")}
        fields = {"task": meta, "args": body.get("args"), "options": body.get("options"), "after": body.get("after")}
        if "when" in body:
            return json_response(call(request, "schedule", when=body["when"], tz=body.get("tz"), **fields), 201)
        if body.get("tz") is not None:
            raise InvalidRequest("'tz' is the zone of 'when': give it with 'when', or leave it out")
        return json_response(call(request, "execute", **fields), 201)

    def submit_many(request: Request, op: str = "execute_many", fields: frozenset[str] = _BATCH_BODY) -> Response:
        body = _fields(request.json(), fields, "a batch" if op == "execute_many" else "a chain")
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise InvalidRequest(f"'tasks' must be a list of {{name, args, ...}} objects, got {tasks!r:.80}")
        entries = [_entry(index, task) for index, task in enumerate(tasks)]
        extra = {"after": body.get("after")} if op == "chain" else {}
        return json_response(call(request, op, tasks=entries, options=body.get("options"), **extra), 201)

    def submit_chain(request: Request) -> Response:
        return submit_many(request, "chain", _CHAIN_BODY)

    def list_tasks(request: Request) -> Response:
        query = request.query
        fields: dict[str, Any] = {key: query.get(key) for key in _LIST_QUERY}
        for key in _LIST_NUMBERS:
            if key in query:
                fields[key] = _int(query[key], key)
        return json_response(call(request, "list", **fields))

    def bulk(request: Request) -> Response:
        return json_response(call(request, "bulk", **_fields(request.json(), _BULK_BODY, "a bulk action")))

    def every(request: Request) -> Response:
        body = _fields(request.json(), _RECURRING_BODY, "a schedule")
        meta = {key: body.get(key) for key in ("name", "username", "description", "run_at")}
        fields = {"task": meta, "args": body.get("args"), "options": body.get("options")}
        return json_response(call(request, "every", interval=body.get("interval"), tz=body.get("tz"), **fields), 201)

    def revoke(request: Request) -> Response:
        return json_response(call(request, "revoke", recurring_id=_id(request.params["id"])))

    def run_now(request: Request) -> Response:
        """One run of a schedule now, with its name, args and options: a task like its planned runs."""
        recurring_id = _id(request.params["id"])
        found = [r for r in call(request, "recurring")["recurring"] if r["id"] == recurring_id]
        if not found:
            raise TaskNotFound(f"no recurring schedule with id {recurring_id}; GET /api/v1/recurring lists them")
        schedule = found[0]
        meta = {key: schedule[key] for key in ("name", "username", "description")}
        options = {key: schedule[key] for key in protocol.TASK_OPTION_KEYS}
        return json_response(call(request, "execute", task=meta, args=schedule["args"], options=options), 201)

    def pausing(op: str) -> Callable[[Request], Response]:
        """``pause`` or ``resume`` of the body's task ``name``."""
        return lambda request: json_response(
            call(request, op, **_fields(request.json(), frozenset({"name"}), f"a {op}"))
        )

    def simple(op: str) -> Callable[[Request], Response]:
        return lambda request: json_response(call(request, op))

    table = [
        Route("GET", "/api/v1/ping", simple("ping")),
        Route("POST", "/api/v1/tasks", submit, Role.ADMIN),
        Route("POST", "/api/v1/tasks/batch", submit_many, Role.ADMIN),
        Route("POST", "/api/v1/tasks/chain", submit_chain, Role.ADMIN),
        Route("POST", "/api/v1/tasks/bulk", bulk, Role.ADMIN),
        Route("GET", "/api/v1/tasks", list_tasks),
        Route("GET", "/api/v1/tasks/{id}", on_task("status")),
        Route("POST", "/api/v1/tasks/{id}/cancel", on_task("cancel"), Role.ADMIN),
        Route("POST", "/api/v1/tasks/{id}/retry", on_task("retry"), Role.ADMIN),
        Route("GET", "/api/v1/recurring", simple("recurring")),
        Route("POST", "/api/v1/recurring", every, Role.ADMIN),
        Route("POST", "/api/v1/recurring/{id}/revoke", revoke, Role.ADMIN),
        Route("POST", "/api/v1/recurring/{id}/run", run_now, Role.ADMIN),
        Route("POST", "/api/v1/pause", pausing("pause"), Role.ADMIN),
        Route("POST", "/api/v1/resume", pausing("resume"), Role.ADMIN),
        Route("GET", "/api/v1/workers", simple("workers")),
        Route("GET", "/api/v1/stats", simple("stats")),
    ]
    table.append(Route("GET", OPENAPI_PATH, lambda request: Response(document)))
    document = protocol.dumps(openapi.document(table))  # of every route, its own too; built once
    return table


def _fields(body: dict, allowed: frozenset[str], what: str) -> dict:
    """``body``, refused (InvalidRequest) if it has a field not in ``allowed``."""
    unknown = set(body) - allowed
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) in {what}: {', '.join(sorted(unknown)):.200}; accepted: {', '.join(sorted(allowed))}"
        )
    return body


def _entry(index: int, task: Any) -> dict:
    """One task of a batch, as execute_many's ``{task, args}``."""
    if not isinstance(task, dict):
        raise InvalidRequest(f"tasks[{index}]: expected an object with a 'name', got {task!r:.80}")
    _fields(task, frozenset({"name", "args", "username", "description", "key"}), f"tasks[{index}]")
    return {"task": {key: value for key, value in task.items() if key != "args"}, "args": task.get("args")}


def _id(text: str) -> int | str:
    """A path's id: an int when it is digits, else the text itself, which the request check then refuses."""
    return int(text) if text.isdigit() and len(text) < 20 else text


def _int(text: str, what: str) -> int:
    """A query parameter that must be an integer (its range is the request check's)."""
    try:
        return int(text)
    except ValueError:
        raise InvalidRequest(f"{what} must be an integer, got {text[:80]!r}") from None

"""The OpenAPI 3.0 document of the JSON API (api.py), served at ``/api/v1/openapi.json``.

:func:`document` builds it from the API's own route list: each route's method and pattern find
its operation in :data:`OPERATIONS` (parameters, body, responses), its role says whether it
needs the full token (403), and its ``{name}`` parts are its path parameters. A route without an
entry is still listed, bare, and tests/test_api.py fails until it has one. Field lists, enums and
limits come from the modules that check them (protocol, config, store), so the document says
what the server does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import __version__, config, protocol, store
from .access import Role
from .status import FINAL, TaskStatus
from .web import Route

#: What each error status means, and the error types behind it (web.STATUS_OF).
ERROR_STATUSES = {
    400: "InvalidRequest (malformed body or parameter, unknown field) or BadTimeSpec (a time or interval string)",
    401: "Denied: the server has --http-token and the request has no valid `Authorization: Bearer TOKEN`",
    403: "Denied: the read-only token cannot act, or a change request without a bearer token came cross-site "
    "or not as JSON",
    404: "TaskNotFound: no task or schedule has that id",
    409: "InvalidTransition: the task or schedule cannot move so (cancel a finished task, retry a running one)",
    413: "RequestTooLarge: the body is larger than the server accepts (--max-message-bytes, at most 16 MiB)",
    503: "StoreUnavailable: the database failed; nothing was committed, try again",
}


@dataclass(frozen=True)
class Operation:
    """One route's entry: ``ok`` is its success status and result schema; ``errors`` the error statuses
    it can give besides 401 (every route) and 403 (every route that needs the full token)."""

    id: str
    summary: str
    ok: tuple[int, dict]
    errors: tuple[int, ...] = ()
    body: dict | None = None
    query: tuple[dict, ...] = ()
    description: str = ""
    tags: tuple[str, ...] = field(default=("tasks",))
    #: Operations whose ``{id}`` is a value of the success answer: (operationId, JSON pointer into the answer).
    links: tuple[tuple[str, str], ...] = ()


def _null(schema: dict) -> dict:
    """``schema``, or null."""
    if "enum" in schema:
        return {**schema, "nullable": True, "enum": [*schema["enum"], None]}
    return {**schema, "nullable": True}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict, *required: str, closed: bool = False, description: str = "") -> dict:
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    if description:
        out["description"] = description
    return out


_TEXT = {"type": "string"}
_NAME = {"type": "string", "maxLength": config.MAX_NAME_CHARS}
_TIME = {"type": "string", "format": "date-time", "description": "ISO 8601, UTC"}
_ZONE = {**_NAME, "description": "IANA name of the zone of the wall times; null: the server's (`serve --tz`)"}
_COUNT = {"type": "integer", "minimum": 0}
#: The final statuses, each a count in the stats' minutes and names.
_OUTCOMES = tuple(s.value for s in TaskStatus if s in FINAL)
_ID = {"type": "integer", "minimum": 1}
_ANY = {"description": "any JSON value"}
_STATUS = {"type": "string", "enum": [s.value for s in TaskStatus]}
_INT32 = {"type": "integer", "minimum": protocol.INT_MIN, "maximum": protocol.INT_MAX}

#: Every field of a task record (store.TASK_FIELDS): a field added there without a schema here fails at import.
_TASK_FIELDS = {
    "id": _ID,
    "name": _TEXT,
    "username": _null(_TEXT),
    "description": _null(_TEXT),
    "args": {"type": "object"},
    "status": _STATUS,
    "progress": {"type": "number", "minimum": 0, "maximum": 1},
    "progress_message": _null(_TEXT),
    "result": {"description": "the handler's JSON value; null until it succeeded"},
    "error": _null(_TEXT),
    "traceback": _null(_TEXT),
    "attempts": _COUNT,
    "worker": _null(_TEXT),
    "created_at": _TIME,
    "run_at": _TIME,
    "started_at": _null(_TIME),
    "finished_at": _null(_TIME),
    "recurring_id": _null(_ID),
    "priority": _INT32,
    "retries": _COUNT,
    "retry_delay": {"type": "number", "minimum": 0},
    "timeout": _null({"type": "number"}),
    "errors": {
        "type": "array",
        "description": f"the latest {store.ERRORS_KEPT} failed deliveries, oldest first",
        "items": _object(
            {"attempt": _ID, "error": _TEXT, "at": _TIME, "worker": _null(_TEXT)}, "attempt", "error", "at"
        ),
    },
    "failures": _COUNT,
    "server": _null(_TEXT),
    "key": _null(_TEXT),
    "limit_key": _null(_TEXT),
    "paused": {"type": "boolean", "description": "whether its name is paused (martinet pause): it is not dispatched"},
    "after": {"type": "array", "items": _ID, "description": "the tasks it waits for (or waited for) to succeed"},
}
_RECURRING_FIELDS = {
    "id": _ID,
    "name": _TEXT,
    "username": _null(_TEXT),
    "description": _null(_TEXT),
    "args": {"type": "object"},
    "interval": _TEXT,
    "tz": _null(_ZONE),
    "run_at": _null(_TEXT),
    "next_run_at": _TIME,
    "last_run_at": _null(_TIME),
    "enabled": {"type": "boolean"},
    "created_at": _TIME,
    "priority": _INT32,
    "retries": _COUNT,
    "retry_delay": {"type": "number", "minimum": 0},
    "timeout": _null({"type": "number"}),
    "limit_key": _null(_TEXT),
    "paused": {"type": "boolean", "description": "whether its name is paused: its runs wait queued"},
}
_WORKER_FIELDS = {
    "id": _TEXT,
    "host": _TEXT,
    "pid": {"type": "integer"},
    "handlers": {"type": "array", "items": _TEXT},
    "slots": _COUNT,
    "prefetch": _COUNT,
    "busy": _COUNT,
    "last_seen": _TIME,
    "key": _null(_TEXT),
    "server": _TEXT,
    "server_address": _TEXT,
}

_OPTIONS = _null(
    _object(
        {
            "retries": {"type": "integer", "minimum": 0, "maximum": protocol.INT_MAX},
            "retry_delay": {"type": "number", "minimum": 0},
            "timeout": _null({"type": "number", "minimum": 0, "exclusiveMinimum": True}),
            "priority": _INT32,
            "limit_key": _null(
                {
                    **_NAME,
                    "pattern": r"\S",
                    "description": "count it under this key of the server's --limit and --rate instead of its name",
                }
            ),
        },
        closed=True,
        description="the task's policy; the server's defaults fill in what is not given",
    )
)
#: A task's metadata, as a submission, a batch entry and a schedule give it.
_META = {
    "name": {"type": "string", "minLength": 1, "maxLength": config.MAX_NAME_CHARS, "pattern": r"\S", "example": "echo"},
    "args": _null({"type": "object", "description": "the handler's arguments"}),
    "username": _null(_NAME),
    "description": _null(_TEXT),
}
_KEY = _null({**_NAME, "description": "while a task with this key is not final, submitting it again creates none"})

_SCHEMAS = {
    "Error": _object(
        {"error": _object({"type": _TEXT, "message": _TEXT}, "type", "message")},
        "error",
        description="a typed error: `type` names a class of martinet_app/errors.py (or Denied)",
    ),
    "Task": _object({name: _TASK_FIELDS[name] for name in store.TASK_FIELDS}, *store.TASK_FIELDS),
    "TaskSummary": _object({name: _TASK_FIELDS[name] for name in store.SUMMARY_FIELDS}, *store.SUMMARY_FIELDS),
    "Recurring": _object({name: _RECURRING_FIELDS[name] for name in store.RECURRING_FIELDS}, *store.RECURRING_FIELDS),
    "Worker": _object(_WORKER_FIELDS, *_WORKER_FIELDS),
    "Options": _OPTIONS,
    "Submission": _object(
        {
            **_META,
            "key": _KEY,
            "options": _ref("Options"),
            "when": {**_TEXT, "description": "schedule it for then", "example": "in 1 hour"},
            "tz": _null({**_ZONE, "description": "IANA name of the zone of `when` (only with it)", "example": "UTC"}),
            "after": _ref("After"),
        },
        "name",
        closed=True,
    ),
    "BatchEntry": _object({**_META, "key": _KEY}, "name", closed=True),
    "After": _null(
        {
            "type": "array",
            "items": _ID,
            "maxItems": config.AFTER_MAX,
            "description": "run only once these tasks have all succeeded; cancelled if one fails for good",
        }
    ),
}


def _pausing(operation: str, summary: str) -> Operation:
    """The operation of ``POST /api/v1/pause`` or ``/resume``: a task name in, the pauses after it out."""
    return Operation(
        operation,
        summary,
        (
            200,
            _object(
                {
                    "name": _TEXT,
                    "paused": {"type": "boolean", "description": "whether the name is paused now"},
                    "changed": {"type": "boolean", "description": "false if it was so already"},
                    "names": {"type": "array", "items": _TEXT, "description": "every name paused now, sorted"},
                },
                "name",
                "paused",
                "changed",
                "names",
            ),
        ),
        (400, 413, 503),
        body=_object({"name": _META["name"]}, "name", closed=True),
        tags=("server",),
    )


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "schema": schema, "description": description, "allowEmptyValue": True}


def _filters(nullable: bool) -> dict:
    """The task filters of a list and a bulk action."""
    wrap = _null if nullable else dict
    return {
        "status": wrap(_STATUS),
        "name": wrap(_TEXT),
        "username": wrap(_TEXT),
        "search": wrap({**_NAME, "description": "a substring of the description, in any case"}),
    }


_LIST_FILTERS = _filters(nullable=False)
#: What a new task's id leads to.
_TASK_LINKS = (("getTask", "/task_id"), ("cancelTask", "/task_id"), ("retryTask", "/task_id"))

#: Every route of api.py, by (method, pattern).
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/api/v1/ping"): Operation(
        "ping",
        "The server's version",
        (
            200,
            _object(
                {"version": _TEXT, "protocol": {"type": "integer"}, "pid": {"type": "integer"}},
                "version",
                "protocol",
                "pid",
            ),
        ),  # fmt: skip
        tags=("server",),
    ),
    ("POST", "/api/v1/tasks"): Operation(
        "submitTask",
        "Submit a task: it runs now, or at `when` (a time such as `in 5m` or `2030-01-01 09:00`)",
        (201, _object({"task_id": _ID}, "task_id")),
        (400, 413, 503),
        body=_ref("Submission"),
        description="Committed before the answer. An `Idempotency-Key` header makes a repeat create nothing.",
        links=_TASK_LINKS,
    ),
    ("POST", "/api/v1/tasks/batch"): Operation(
        "submitTasks",
        "Submit many tasks in one transaction",
        (201, _object({"task_ids": {"type": "array", "items": _ID}}, "task_ids")),
        (400, 413, 503),
        body=_object(
            {
                "tasks": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": config.SUBMIT_MANY_MAX,
                    "items": _ref("BatchEntry"),
                },
                "options": _ref("Options"),
            },
            "tasks",
            closed=True,
        ),
        links=tuple((operation, "/task_ids/0") for operation, _ in _TASK_LINKS),
    ),
    ("POST", "/api/v1/tasks/chain"): Operation(
        "submitChain",
        "Submit tasks that each run once the one before has succeeded (the first after `after`), in one transaction",
        (201, _object({"task_ids": {"type": "array", "items": _ID}}, "task_ids")),
        (400, 413, 503),
        body=_object(
            {
                "tasks": {"type": "array", "minItems": 1, "maxItems": config.CHAIN_MAX, "items": _ref("BatchEntry")},
                "options": _ref("Options"),
                "after": _ref("After"),
            },
            "tasks",
            closed=True,
        ),
        links=tuple((operation, "/task_ids/0") for operation, _ in _TASK_LINKS),
    ),
    ("POST", "/api/v1/tasks/bulk"): Operation(
        "bulkAction",
        "Cancel or retry every task the filters select, newest first, in one transaction",
        (
            200,
            _object(
                {
                    "done": {"type": "array", "items": _ID},
                    "failed": {
                        "type": "array",
                        "items": _object({"id": _ID, "error": _SCHEMAS["Error"]["properties"]["error"]}, "id", "error"),
                    },
                },
                "done",
                "failed",
            ),
        ),
        (400, 413, 503),
        body=_object(
            {
                "action": {"type": "string", "enum": ["cancel", "retry"]},
                **_filters(nullable=True),
                "limit": _null({"type": "integer", "minimum": 1, "maximum": config.BULK_LIMIT_MAX}),
            },
            "action",
            closed=True,
        ),
        description=f"At most `limit` tasks (default {config.BULK_LIMIT}). A task that cannot move (a retry of a "
        "succeeded one) is listed in `failed` and costs the others nothing; running ones' workers are told to stop.",
    ),
    ("GET", "/api/v1/tasks"): Operation(
        "listTasks",
        "Task summaries, newest first, a page at a time",
        (
            200,
            _object(
                {"tasks": {"type": "array", "items": _ref("TaskSummary")}, "next_before": _null(_ID)},
                "tasks",
                "next_before",
            ),
        ),  # fmt: skip
        (400, 503),
        query=(
            *(_query(name, schema, f"only tasks with this {name}") for name, schema in _LIST_FILTERS.items()),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": config.LIST_LIMIT_MAX}, "most tasks"),
            _query("before", _ID, "only tasks with a smaller id: the `next_before` of the previous page"),
        ),
    ),
    ("GET", "/api/v1/tasks/{id}"): Operation(
        "getTask", "A task's whole record", (200, _object({"task": _ref("Task")}, "task")), (400, 404, 503)
    ),
    ("POST", "/api/v1/tasks/{id}/cancel"): Operation(
        "cancelTask",
        "Cancel a scheduled, queued or running task (its worker is told to stop it)",
        (200, _object({"task": _ref("Task")}, "task")),
        (400, 404, 409, 413, 503),
    ),
    ("POST", "/api/v1/tasks/{id}/retry"): Operation(
        "retryTask",
        "Queue a failed or cancelled task to run again now",
        (200, _object({"task": _ref("Task")}, "task")),
        (400, 404, 409, 413, 503),
    ),
    ("GET", "/api/v1/recurring"): Operation(
        "listRecurring",
        "Every recurring schedule, enabled or revoked",
        (200, _object({"recurring": {"type": "array", "items": _ref("Recurring")}}, "recurring")),
        (503,),
        tags=("recurring",),
    ),
    ("POST", "/api/v1/recurring"): Operation(
        "createRecurring",
        "Create a recurring schedule (`interval` such as `every 5m`, `daily` or a cron expression `0 9 * * mon-fri`)",
        (201, _object({"recurring_id": _ID}, "recurring_id")),
        (400, 413, 503),
        body=_object(
            {
                **_META,
                "options": _ref("Options"),
                "interval": {**_NAME, "example": "every 5 minutes"},
                "run_at": _null({**_NAME, "description": "the time of day of the runs", "example": "09:00"}),
                "tz": _null({**_ZONE, "example": "Europe/Paris"}),
            },
            "name",
            "interval",
            closed=True,
        ),
        tags=("recurring",),
        links=(("runRecurring", "/recurring_id"), ("revokeRecurring", "/recurring_id")),
    ),
    ("POST", "/api/v1/recurring/{id}/revoke"): Operation(
        "revokeRecurring",
        "Stop a schedule; the tasks it created stay",
        (200, _object({"recurring": _ref("Recurring")}, "recurring")),
        (400, 404, 409, 413, 503),
        tags=("recurring",),
    ),
    ("POST", "/api/v1/recurring/{id}/run"): Operation(
        "runRecurring",
        "Run a schedule once now: a task with its name, args and options",
        (201, _object({"task_id": _ID}, "task_id")),
        (400, 404, 413, 503),
        tags=("recurring",),
        links=_TASK_LINKS,
    ),
    ("POST", "/api/v1/pause"): _pausing(
        "pauseName", "Dispatch no more tasks of a name, on every server, until it is resumed: queued ones wait"
    ),
    ("POST", "/api/v1/resume"): _pausing("resumeName", "Dispatch the tasks of a paused name again"),
    ("GET", "/api/v1/workers"): Operation(
        "listWorkers",
        "The workers of every live server",
        (200, _object({"workers": {"type": "array", "items": _ref("Worker")}}, "workers")),
        (503,),
        tags=("server",),
    ),
    ("GET", "/api/v1/stats"): Operation(
        "stats",
        "Tasks by status, the last hour's outcomes by minute and by name, and the queue's lag",
        (
            200,
            _object(
                {
                    "counts": _object({s.value: _COUNT for s in TaskStatus}, *(s.value for s in TaskStatus)),
                    "minutes": {
                        "type": "array",
                        "items": _object(
                            {"minute": {"type": "integer"}, **{o: _COUNT for o in _OUTCOMES}}, "minute", *_OUTCOMES
                        ),
                    },
                    "names": {
                        "type": "array",
                        "items": _object(
                            {
                                "name": _TEXT,
                                **{o: _COUNT for o in _OUTCOMES},
                                "run_seconds": {"type": "number", "minimum": 0},
                            },
                            "name",
                            *_OUTCOMES,
                            "run_seconds",
                        ),
                    },
                    "queue_lag": _null({"type": "number", "minimum": 0}),
                    "at": {"type": "number"},
                },
                "counts",
                "minutes",
                "names",
                "queue_lag",
                "at",
            ),
        ),
        (503,),
        tags=("server",),
    ),
    ("GET", "/api/v1/openapi.json"): Operation("openapi", "This document", (200, {"type": "object"}), tags=("server",)),
}


def document(routes: Iterable[Route]) -> dict:
    """The OpenAPI document of ``routes``, every one of them."""
    paths: dict[str, dict] = {}
    for route in routes:
        paths.setdefault(route.pattern, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Martinet",
            "version": __version__,
            "description": "The client's verbs over HTTP: submit, list, cancel and retry tasks, manage schedules, "
            'see workers. Errors are `{"error": {"type", "message"}}` with the client\'s error types. With no '
            "--http-token (loopback only) no token is needed, but a change request without an Authorization "
            "header must be sent as JSON from the same origin. No string may hold NUL (U+0000).",
        },
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "responses": {str(status): _error(status) for status in ERROR_STATUSES},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _operation(route: Route) -> dict:
    spec = OPERATIONS.get((route.method, route.pattern))
    if spec is None:
        spec = Operation(route.pattern.strip("/").replace("/", "_"), f"{route.method} {route.pattern}", (200, {}))
    statuses = {401, *spec.errors, *((403,) if route.role >= Role.ADMIN else ())}
    status, schema = spec.ok
    success: dict[str, Any] = {"description": "OK", "content": {"application/json": {"schema": schema}}}
    if spec.links:
        success["links"] = {
            operation: {"operationId": operation, "parameters": {"id": f"$response.body#{pointer}"}}
            for operation, pointer in spec.links
        }
    responses: dict[str, Any] = {str(status): success}
    responses.update({str(code): {"$ref": f"#/components/responses/{code}"} for code in sorted(statuses)})
    out: dict[str, Any] = {"operationId": spec.id, "summary": spec.summary, "tags": list(spec.tags)}
    if spec.description:
        out["description"] = spec.description
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {**_ID, "maximum": config.MAX_ID}}
        for name in re.findall(r"\{(\w+)\}", route.pattern)
    ]
    parameters += spec.query
    if route.method == "POST" or spec.body is not None:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "schema": _NAME,
                "description": "the request's key: sent again, it creates nothing twice",
            }
        )
    if parameters:
        out["parameters"] = parameters
    if spec.body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": spec.body}}}
    out["responses"] = responses
    return out


def _error(status: int) -> dict:
    return {"description": ERROR_STATUSES[status], "content": {"application/json": {"schema": _ref("Error")}}}

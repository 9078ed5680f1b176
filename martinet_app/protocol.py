"""Frames and JSON bodies of every Martinet socket (docs/PROTOCOL.md is the spec).

Three sockets:

- client endpoint (ROUTER, server binds): ``[b"", json request]`` -> ``[b"", json reply]``
- worker socket (ROUTER, server binds; workers connect a DEALER):
  ``[WORKER_HEADER, command, json body]`` in both directions
- status sink (PULL, server binds; workers connect a PUSH): ``[json batch]``

Everything here is pure: encode to frames, decode frames to checked dicts, and raise
:class:`ProtocolError` (or :class:`InvalidRequest` for client requests) on anything else.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from . import config, status
from .errors import InvalidRequest, ProtocolError, RequestTooLarge

#: Version carried by every message; a peer speaking another version is rejected.
VERSION = 1
#: First frame of every message on the worker socket: protocol id and version.
WORKER_HEADER = b"MTNW01"

# Worker socket commands.
READY = b"READY"
TASK = b"TASK"
HEARTBEAT = b"HEARTBEAT"
DISCONNECT = b"DISCONNECT"
CANCEL = b"CANCEL"
CREDIT = b"CREDIT"
WORKER_COMMANDS = frozenset({READY, CREDIT, HEARTBEAT, DISCONNECT})
BROKER_COMMANDS = frozenset({TASK, CANCEL, HEARTBEAT, DISCONNECT})

# Status events a worker pushes to the sink.
STARTED = "started"
PROGRESS = "progress"
SUCCEEDED = "succeeded"
FAILED = "failed"
EVENTS = frozenset({STARTED, PROGRESS, SUCCEEDED, FAILED})
FINAL_EVENTS = frozenset({SUCCEEDED, FAILED})
#: Task statuses a task ends in (``retry`` may queue a failed or cancelled task again).
FINAL_STATUSES = frozenset(s.value for s in status.FINAL)

# Client operations and the request fields each one accepts (besides v, id, op).
#: Requests that change the store: each may carry a ``request_key``, and a second request with the same
#: key (a client retrying on another server after a timeout) gets the first one's reply instead of running again.
MUTATING_OPS = frozenset(
    {
        "execute",
        "execute_many",
        "chain",
        "schedule",
        "every",
        "cancel",
        "retry",
        "bulk",
        "revoke",
        "purge",
        "pause",
        "resume",
    }
)
CLIENT_OPS: dict[str, frozenset[str]] = {
    "ping": frozenset(),
    "execute": frozenset({"task", "args", "options", "after"}),
    "execute_many": frozenset({"tasks", "options"}),
    "chain": frozenset({"tasks", "options", "after"}),
    "schedule": frozenset({"when", "tz", "task", "args", "options", "after"}),
    "every": frozenset({"interval", "tz", "task", "args", "options"}),
    "status": frozenset({"task_id"}),
    "wait": frozenset({"task_id", "timeout"}),
    "list": frozenset({"status", "name", "username", "search", "limit", "before"}),
    "workers": frozenset(),
    "cancel": frozenset({"task_id"}),
    "retry": frozenset({"task_id"}),
    "bulk": frozenset({"action", "status", "name", "username", "search", "limit"}),
    "recurring": frozenset(),
    "revoke": frozenset({"recurring_id"}),
    "purge": frozenset({"status", "older_than", "limit"}),
    "stats": frozenset(),
    "pause": frozenset({"name"}),
    "resume": frozenset({"name"}),
}
CLIENT_OPS = {op: fields | {"request_key"} if op in MUTATING_OPS else fields for op, fields in CLIENT_OPS.items()}

#: Keys allowed in a task's metadata dict: ``key`` (idempotency: unique among tasks not yet final) only
#: for one-off tasks, ``run_at`` only for ``every``.
TASK_META_KEYS = frozenset({"name", "username", "description", "key"})
RECURRING_META_KEYS = TASK_META_KEYS - {"key"} | {"run_at"}
#: Keys allowed in a task's ``options``: its retry, timeout and priority policy, and the key its limits count under.
TASK_OPTION_KEYS = frozenset({"retries", "retry_delay", "timeout", "priority", "limit_key"})
# Integer options are stored in 32-bit INTEGER columns (PostgreSQL).
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def _refuse_constant(name: str) -> None:
    # Python's json reads NaN and Infinity, which are not JSON and that no database column takes.
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON that Python reads as infinity, which could not be written back.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of the range of a double")
    return value


# Built once: json.dumps and json.loads with options build a new encoder or decoder per call.
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_decode = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float).decode


def json_text(obj: Any) -> str:
    """Compact JSON text; NaN and infinities are refused (ValueError), as are other types (TypeError)."""
    return _encode(obj)


def json_value(text: str | bytes) -> Any:
    """The value of JSON text (UTF-8 if bytes); NaN and Infinity are refused (ValueError)."""
    return _decode(text if isinstance(text, str) else text.decode())


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes; NaN and infinities are refused rather than sent."""
    return _encode(obj).encode()


def too_deep(value: Any, limit: int = config.MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests arrays and objects more than ``limit`` levels deep (``{}`` is one level)."""
    if not isinstance(value, _NESTS):
        return False
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, _NESTS))
    return False


#: What JSON encodes as an array or object (a handler may return tuples).
_NESTS = (dict, list, tuple)


def clean_text(value: str, what: str, max_chars: int | None = None) -> str:
    """A request's string, as the store can keep it; InvalidRequest for NUL, lone surrogates or too many characters."""
    if max_chars is not None and len(value) > max_chars:
        raise InvalidRequest(f"{what} has {len(value)} characters: at most {max_chars} are accepted")
    if "\x00" in value:
        raise InvalidRequest(f"{what} contains a NUL character (\\u0000), which no database column takes")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidRequest(
                f"{what} contains a lone surrogate (e.g. from a file name that is not UTF-8): send valid Unicode"
            ) from None
    return value


def safe_text(text: str, max_chars: int) -> str:
    """A handler's text (error, traceback, progress message) made storable: lone surrogates and NUL
    escaped as ``\\udce9`` and ``\\x00``, and clipped to ``max_chars`` (see :func:`clip`)."""
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode()
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return clip(text, max_chars)


def clip(text: str, max_chars: int) -> str:
    """``text`` if it fits in ``max_chars``, else its start and end around a marker saying how much was cut."""
    if len(text) <= max_chars:
        return text
    keep = max(0, max_chars - len(f"\n[... {len(text)} characters cut ...]\n"))
    marker = f"\n[... {len(text) - keep} characters cut ...]\n"
    head = keep - keep // 2
    return text[:head] + marker + text[len(text) - keep // 2 :]


def loads_object(data: bytes, max_bytes: int | None, what: str) -> dict:
    """Decode one JSON object frame of this protocol version, or raise ProtocolError saying what was wrong
    (None: no size limit)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ProtocolError(f"{what}: message of {len(data)} bytes exceeds the limit of {max_bytes}", "too_large")
    obj = json_object(data, what)
    if obj.get("v") != VERSION:
        raise ProtocolError(f"{what}: unsupported protocol version {obj.get('v')!r}, expected {VERSION}", "bad_version")
    return obj


def json_object(data: bytes, what: str) -> dict:
    """Decode a JSON object as strictly as every message is (no NaN or Infinity), or raise ProtocolError."""
    try:
        obj = json_value(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{what}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ProtocolError(f"{what}: JSON nested too deeply to read") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------- client socket


def client_request(request_id: str, op: str, params: dict) -> list[bytes]:
    """Frames a client sends: an empty delimiter (REQ-compatible) and the request."""
    return [b"", dumps({"v": VERSION, "id": request_id, "op": op, **params})]


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Split ROUTER frames into the routing envelope (up to the empty delimiter) and the body."""
    try:
        cut = frames.index(b"")
    except ValueError:
        raise ProtocolError("client: no empty delimiter frame after the routing id") from None
    return frames[: cut + 1], frames[cut + 1 :]


def parse_client_request(body: list[bytes]) -> dict:
    """Decode one client request's body; ProtocolError if it is not a JSON object of this version.

    The request is not yet checked (:func:`check_client_request`): whatever is wrong with it
    is answered under its ``id``.
    """
    if len(body) != 1:
        raise ProtocolError(f"client: expected 1 body frame, got {len(body)}")
    return loads_object(body[0], None, "client")


def request_id(request: dict) -> Any:
    """The ``id`` a reply echoes: the request's, unless it nests too deeply to send back (then null)."""
    value = request.get("id")
    return None if too_deep(value, _ID_DEPTH) else value


#: Deepest an echoed request id may nest.
_ID_DEPTH = 8
#: Deepest a whole request may nest: args as deep as allowed, inside ``execute_many``'s ``tasks``.
_REQUEST_DEPTH = config.MAX_JSON_DEPTH + 3


def check_client_request(request: dict, size: int, max_bytes: int) -> None:
    """Raise InvalidRequest for an unknown operation or field, RequestTooLarge past ``max_bytes``."""
    if size > max_bytes:
        raise RequestTooLarge(
            f"a request of {size} bytes is larger than this server accepts ({max_bytes} bytes, "
            "martinet serve --max-message-bytes): keep large data elsewhere and pass a reference to it"
        )
    if too_deep(request, _REQUEST_DEPTH):
        raise InvalidRequest(
            f"the request nests more than {_REQUEST_DEPTH} levels of arrays and objects "
            f"(task args may nest {config.MAX_JSON_DEPTH}): flatten it"
        )
    op = request.get("op")
    if not isinstance(op, str) or op not in CLIENT_OPS:
        raise InvalidRequest(f"unknown operation {op!r:.80}: expected one of {', '.join(sorted(CLIENT_OPS))}")
    unknown = set(request) - CLIENT_OPS[op] - {"v", "id", "op"}
    if unknown:
        raise InvalidRequest(f"unknown field(s) for {op!r}: {', '.join(sorted(unknown)):.200}")
    if request.get("request_key") is not None:
        check_string(request, "request_key", required=True, max_chars=config.MAX_NAME_CHARS)


def reply(envelope: list[bytes], request_id: Any, result: dict | None = None, error: dict | None = None) -> list[bytes]:
    """Frames answering one request: ``ok`` with the result fields, or the error object."""
    body: dict[str, Any] = {"v": VERSION, "id": request_id, "ok": error is None}
    if error is None:
        body.update(result or {})
    else:
        body["error"] = error
    return [*envelope, dumps(body)]


def parse_reply(frames: list[bytes], max_bytes: int) -> dict:
    """Decode a reply as the client receives it (``[b"", json]``)."""
    if len(frames) != 2 or frames[0] != b"":
        raise ProtocolError(f"client: malformed reply of {len(frames)} frame(s)")
    return loads_object(frames[1], max_bytes, "reply")


def check_task_meta(meta: Any, *, recurring: bool) -> dict:
    """Validate a task metadata dict and return a cleaned copy (the caller's dict is untouched)."""
    if not isinstance(meta, dict):
        raise InvalidRequest(f"task metadata must be an object with a 'name', got {type(meta).__name__}")
    allowed = RECURRING_META_KEYS if recurring else TASK_META_KEYS
    unknown = set(meta) - allowed
    if unknown:
        hint = " ('run_at' is only accepted by every)" if "run_at" in unknown else ""
        raise InvalidRequest(
            f"unknown task field(s) {', '.join(sorted(map(str, unknown)))}{hint}: "
            f"accepted fields are {', '.join(sorted(allowed))}"
        )
    name = meta.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest(f"task 'name' is required and must be a non-empty string, got {name!r:.80}")
    clean = {"name": clean_text(name.strip(), "task 'name'", config.MAX_NAME_CHARS)}
    for key in sorted(allowed - {"name"}):
        value = meta.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"task {key!r} must be a string, got {type(value).__name__}")
        bound = config.MAX_NAME_CHARS if key in _BOUNDED_META else None
        clean[key] = None if value is None else clean_text(value, f"task {key!r}", bound)
    return clean


#: Metadata kept in VARCHAR(255) columns (the others are TEXT).
_BOUNDED_META = frozenset({"username", "run_at", "key"})


def check_many(entries: Any, limit: int) -> list[tuple[dict, dict]]:
    """``execute_many``'s (and ``chain``'s) ``tasks``: a list of ``{"task": metadata, "args": object}``, checked
    one by one."""
    if not isinstance(entries, list) or not 1 <= len(entries) <= limit:
        raise InvalidRequest(f"'tasks' must be a list of 1 to {limit} {{task, args}} objects, got {entries!r:.80}")
    checked = []
    for index, entry in enumerate(entries):
        try:
            if not isinstance(entry, dict) or set(entry) - {"task", "args"}:
                raise InvalidRequest(f"expected an object with 'task' and optional 'args', got {entry!r:.80}")
            checked.append((check_task_meta(entry.get("task"), recurring=False), check_args(entry.get("args"))))
        except InvalidRequest as exc:
            raise InvalidRequest(f"tasks[{index}]: {exc.message}") from None
    return checked


def check_after(after: Any) -> list[int]:
    """A request's ``after``: the ids of the tasks it waits for, a list of at most config.AFTER_MAX positive
    integers (None means none; a repeated id counts once, the first time)."""
    if after is None:
        return []
    limit = config.AFTER_MAX
    if not isinstance(after, list) or len(after) > limit or not all(_is_int(i) and i >= 1 for i in after):
        raise InvalidRequest(
            f"'after' must be a list of at most {limit} task ids (positive integers), got {after!r:.80}"
        )
    return list(dict.fromkeys(after))


def check_args(args: Any) -> dict:
    """Task arguments must be a JSON object (a dict); None means ``{}``."""
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise InvalidRequest(f"task args must be a JSON object, got {type(args).__name__}")
    if too_deep(args):
        raise InvalidRequest(
            f"task args nest more than {config.MAX_JSON_DEPTH} levels of arrays and objects: flatten them"
        )
    return args


def check_id(value: Any, what: str) -> int:
    """A positive integer id from a request; InvalidRequest otherwise (an id past config.MAX_ID is the
    store's TaskNotFound)."""
    if not _is_int(value) or value < 1:
        raise InvalidRequest(f"{what} must be a positive integer, got {value!r:.80}")
    return value


def check_string(request: dict, key: str, *, required: bool, max_chars: int | None = None) -> str | None:
    """A request's string field, checked as :func:`clean_text` does; None if absent and not required."""
    value = request.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{key!r} {'is required and ' if required else ''}must be a string, got {value!r:.80}")
    return clean_text(value, repr(key), max_chars)


def check_options(options: Any) -> dict:
    """Validate a task's ``options`` and return a cleaned copy holding only the keys given (None means ``{}``).

    ``timeout`` may be given as null: no time limit, whatever the server's default.
    """
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidRequest(
            f"task options must be an object with any of {', '.join(sorted(TASK_OPTION_KEYS))}, "
            f"got {type(options).__name__}"
        )
    unknown = set(options) - TASK_OPTION_KEYS
    if unknown:
        raise InvalidRequest(
            f"unknown task option(s) {', '.join(sorted(map(str, unknown)))}: "
            f"accepted options are {', '.join(sorted(TASK_OPTION_KEYS))}"
        )
    return {key: _OPTION_CHECKS[key](value) for key, value in options.items()}


def _check_retries(value: Any) -> int:
    if not _is_int(value) or not 0 <= value <= INT_MAX:
        raise InvalidRequest(f"option 'retries' must be an integer from 0 to {INT_MAX}, got {value!r}")
    return value


def _check_retry_delay(value: Any) -> float:
    if not _is_number(value) or value < 0:
        raise InvalidRequest(f"option 'retry_delay' must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _check_timeout(value: Any) -> float | None:
    if value is not None and (not _is_number(value) or value <= 0):
        raise InvalidRequest(f"option 'timeout' must be a number of seconds > 0, or null for none, got {value!r}")
    return None if value is None else float(value)


def _check_priority(value: Any) -> int:
    if not _is_int(value) or not INT_MIN <= value <= INT_MAX:
        raise InvalidRequest(
            f"option 'priority' must be an integer from {INT_MIN} to {INT_MAX} (higher runs first), got {value!r}"
        )
    return value


def _check_limit_key(value: Any) -> str | None:
    """A task's ``limit_key``: the name its limits count under instead of its own (limits.py); null: its name."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(
            f"option 'limit_key' must be a non-empty string (the key of a server's --limit or --rate), "
            f"or null for the task's name, got {value!r:.80}"
        )
    return clean_text(value.strip(), "option 'limit_key'", config.MAX_NAME_CHARS)


_OPTION_CHECKS = {
    "retries": _check_retries,
    "retry_delay": _check_retry_delay,
    "timeout": _check_timeout,
    "priority": _check_priority,
    "limit_key": _check_limit_key,
}


def check_name(request: dict) -> str:
    """The task ``name`` of a ``pause`` or ``resume`` request, as check_task_meta takes a task's name."""
    name = request.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest(f"'name' is required and must be a non-empty task name, got {name!r:.80}")
    return clean_text(name.strip(), "'name'", config.MAX_NAME_CHARS)


# ---------------------------------------------------------------- worker socket


def worker_message(command: bytes, body: dict | None = None) -> list[bytes]:
    """Frames on the worker socket, in either direction (the ROUTER adds the identity)."""
    return [WORKER_HEADER, command, dumps({"v": VERSION, **(body or {})})]


def parse_worker_message(frames: list[bytes], commands: frozenset[bytes], max_bytes: int | None) -> tuple[bytes, dict]:
    """Check ``[header, command, body]`` and return the command and decoded body."""
    if len(frames) != 3:
        raise ProtocolError(f"worker socket: expected 3 frames, got {len(frames)}")
    header, command, body = frames
    if header != WORKER_HEADER:
        raise ProtocolError(f"worker socket: bad protocol header {header[:16]!r}, expected {WORKER_HEADER!r}")
    if command not in commands:
        raise ProtocolError(f"worker socket: unknown command {command[:32]!r}", "unknown_command")
    return command, loads_object(body, max_bytes, command.decode())


def check_ready(body: dict) -> dict:
    """Validate a READY body: worker id, host, pid, handlers, slots, prefetch, heartbeat, running."""
    handlers = body.get("handlers")
    body.setdefault("prefetch", 0)
    running = body.setdefault("running", [])
    ok = (
        _is_name(body.get("worker"))
        and isinstance(body.get("host"), str)
        and _is_int(body.get("pid"))
        and isinstance(handlers, list)
        and all(isinstance(h, str) for h in handlers)
        and _is_int(body.get("slots"))
        and body["slots"] >= 0
        and _is_int(body["prefetch"])
        and body["prefetch"] >= 0
        and _is_number(body.get("heartbeat"))
        and body["heartbeat"] > 0
        and isinstance(running, list)
        and all(_is_task_ref(r) for r in running)
    )
    if not ok:
        raise ProtocolError(
            "READY: body must have worker, host, pid, handlers, slots, heartbeat and running (prefetch optional)",
            "bad_body",
        )
    return body


def check_credit(body: dict) -> dict:
    """Validate a CREDIT body: the worker's new slots and prefetch."""
    if not all(_is_int(body.get(key)) and body[key] >= 0 for key in ("slots", "prefetch")):
        raise ProtocolError("CREDIT: body must have slots and prefetch, integers >= 0", "bad_body")
    return body


def check_task_refs(body: dict, key: str) -> list[dict]:
    """A list of ``{"task_id": int, "attempt": int}`` under ``key`` (DISCONNECT's ``running``)."""
    refs = body.get(key, [])
    if not isinstance(refs, list) or not all(_is_task_ref(r) for r in refs):
        raise ProtocolError(f"{key!r} must be a list of {{task_id, attempt}} objects", "bad_body")
    return refs


# ---------------------------------------------------------------- status sink


def status_batch(worker_id: str, events: list[dict]) -> list[bytes]:
    """One PUSH message carrying one or more status events from a worker."""
    return [dumps({"v": VERSION, "worker": worker_id, "events": events})]


def parse_status_batch(frames: list[bytes], max_bytes: int) -> tuple[str, list[dict]]:
    """Decode a status batch; events that are malformed are dropped by raising on the whole batch."""
    if len(frames) != 1:
        raise ProtocolError(f"status: expected 1 frame, got {len(frames)}")
    batch = loads_object(frames[0], max_bytes, "status")
    worker, events = batch.get("worker"), batch.get("events")
    if not _is_name(worker) or not isinstance(events, list):
        raise ProtocolError(
            f"status: body must have a worker id (1 to {config.MAX_NAME_CHARS} characters) and an events list",
            "bad_body",
        )
    for event in events:
        _check_event(event)
    return worker, events


def _check_event(event: Any) -> None:
    if not isinstance(event, dict) or not _is_task_ref(event) or not isinstance(event.get("event"), str):
        raise ProtocolError("status: each event needs task_id, attempt and a known event name", "bad_event")
    if event["event"] not in EVENTS:
        raise ProtocolError("status: each event needs task_id, attempt and a known event name", "bad_event")
    if not _is_number(event.get("at")):
        raise ProtocolError("status: each event needs a numeric 'at' timestamp", "bad_event")
    kind = event["event"]
    if kind == PROGRESS:
        fraction = event.get("progress")
        if not _is_number(fraction) or not 0.0 <= fraction <= 1.0:
            raise ProtocolError("status: progress must be a number from 0 to 1", "bad_event")
        if event.get("message") is not None and not isinstance(event["message"], str):
            raise ProtocolError("status: progress message must be a string", "bad_event")
    if kind == FAILED and not isinstance(event.get("error"), str):
        raise ProtocolError("status: a failed event needs an error string", "bad_event")
    if kind == FAILED and event.get("traceback") is not None and not isinstance(event["traceback"], str):
        raise ProtocolError("status: a traceback must be a string", "bad_event")
    if kind in FINAL_EVENTS and event.get("started_at") is not None and not _is_number(event["started_at"]):
        raise ProtocolError("status: started_at must be a numeric timestamp", "bad_event")
    _make_safe(event)


def _make_safe(event: dict) -> None:
    """Bring a checked event's handler-made values within what the store keeps (docs/PROTOCOL.md, Limits):
    texts escaped and clipped, a result nesting too deeply turned into the failure it is."""
    if event["event"] == SUCCEEDED and too_deep(event.get("result")):
        depth = config.MAX_JSON_DEPTH
        event.update(
            event=FAILED, result=None, error=f"the result nests more than {depth} levels of arrays and objects"
        )
    for key, limit in _TEXT_LIMITS:
        if isinstance(event.get(key), str):
            event[key] = safe_text(event[key], limit)


#: Texts of status events and the characters the store keeps of each.
_TEXT_LIMITS = (
    ("error", config.MAX_ERROR_CHARS),
    ("traceback", config.MAX_TRACEBACK_CHARS),
    ("message", config.MAX_PROGRESS_CHARS),
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _is_task_ref(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and _is_int(value.get("task_id"))
        and 1 <= value["task_id"] <= config.MAX_ID
        and _is_int(value.get("attempt"))
        and 1 <= value["attempt"] <= INT_MAX
    )


def _is_name(value: Any) -> bool:
    """A worker id or host: a non-empty string the store can keep in a VARCHAR(255) column."""
    if not isinstance(value, str) or not value or len(value) > config.MAX_NAME_CHARS:
        return False
    try:
        clean_text(value, "name")
    except InvalidRequest:
        return False
    return True


class Rejections:
    """Counts the messages one socket rejects and logs them without flooding the log.

    ``count`` is given each rejection's reason (ProtocolError.reason: metrics.Metrics.rejected). The
    first rejection in each ``every`` seconds is a WARNING carrying the count since the last one; the
    rest go to DEBUG.
    """

    def __init__(self, log: logging.Logger, socket_name: str, count: Callable[[str], None], every: float = 5.0) -> None:
        self.log = log
        self.socket_name = socket_name
        self.count = count
        self.every = every
        self._since_warning = 0
        self._next_warning = 0.0

    def reject(self, error: ProtocolError) -> None:
        """Count and log one rejected message; ``error`` says why."""
        self.count(error.reason)
        self._since_warning += 1
        now = time.monotonic()
        if now >= self._next_warning:
            self.log.warning(
                "%s: rejected %d malformed message(s), latest (%s): %s",
                self.socket_name,
                self._since_warning,
                error.reason,
                error,
            )
            self._since_warning = 0
            self._next_warning = now + self.every
        else:
            self.log.debug("%s: rejected malformed message (%s): %s", self.socket_name, error.reason, error)

"""What both clients (client.py, blocking; aio.py, asyncio) build a request and read its reply with.

Checks of the caller's arguments, request ids and ``request_key``, encoding within the size limit,
and the texts of the errors the clients raise themselves, so that the two clients cannot drift apart.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Iterable
from typing import Any

from . import config, protocol, timespec
from .errors import InvalidRequest, MartinetError, RequestTooLarge, ServerUnavailable, WaitTimeout

#: Tasks asked for in each ``list`` request of ``iter_tasks``: few round trips, and replies of
#: summaries well under the message limit.
PAGE_SIZE = 1_000


def seconds(value: Any, what: str, error: type[MartinetError]) -> float:
    """``value`` as a float if it is a finite number of seconds >= 0, else ``error`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise error(f"{what} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def max_request_bytes(value: Any, error: type[MartinetError]) -> int:
    """``value`` if it is an integer >= 1 (a client's ``max_request_bytes``), else ``error``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"max_request_bytes must be an integer >= 1, got {value!r}")
    return value


def reply_limit(max_request: int) -> int:
    """Largest reply a client reads: a record holds what was submitted (up to ``max_request``), a result, and texts."""
    return 2 * max_request + config.MAX_RESULT_BYTES


def options(**given: Any) -> dict | None:
    """A request's ``options``: those not None, or None (the field left out) if none is given."""
    return {key: value for key, value in given.items() if value is not None} or None


def keyed(task: Any, key: str | None) -> Any:
    """``task`` with ``key`` in it (a copy: the caller's dict stays as it is); ``task`` itself without one."""
    if key is None:
        return task
    if not isinstance(task, dict):
        return task  # the server says what is wrong with it
    if task.get("key") not in (None, key):
        raise InvalidRequest(
            f"the task's metadata has key {task['key']!r:.80} and key= is {key!r:.80}: give the key once"
        )
    return {**task, "key": key}


def submission(task: Any, args: Any, key: str | None = None, after: Iterable[int] | None = None, **policy: Any) -> dict:
    """The ``task``, ``args``, ``options`` and ``after`` fields of an execute, schedule or every request, checked."""
    fields = {"task": keyed(task, key), "args": protocol.check_args(args), "options": options(**policy)}
    return {**fields, "after": dependencies(after)}


def submissions(tasks: Iterable[tuple[dict, dict | None]], limit: int = config.SUBMIT_MANY_MAX, **policy: Any) -> dict:
    """The ``tasks`` and ``options`` fields of an execute_many (or, with ``limit`` config.CHAIN_MAX, chain)
    request, checked."""
    entries = [{"task": task, "args": args} for task, args in tasks]
    protocol.check_many(entries, limit)
    return {"tasks": entries, "options": options(**policy)}


def dependencies(after: Iterable[int] | None) -> list[int] | None:
    """A request's ``after``: the ids as a list, checked (protocol.check_after); None (left out) for none."""
    if after is None:
        return None
    if isinstance(after, (str, bytes, dict)):
        raise InvalidRequest(f"after must be a list of task ids, got {after!r:.80}")
    return protocol.check_after(list(after)) or None


def result(reply: dict) -> dict:
    """A reply's result fields, without its envelope (``v``, ``id``, ``ok``)."""
    return {key: value for key, value in reply.items() if key not in ("v", "id", "ok")}


def purge_age(older_than: float | str) -> float | str:
    """``purge``'s ``older_than`` in seconds: an age such as ``"1d"`` parsed (BadTimeSpec if it is not one)."""
    return timespec.parse_age(older_than) if isinstance(older_than, str) else older_than


class RequestIds:
    """Request ids, also the ``request_key`` of requests that change something: unique to one client
    (122 random bits) and call."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex
        self._counter = itertools.count(1)

    def next(self, op: str, params: dict) -> tuple[str, dict]:
        """A new id, and ``params`` without its None fields and with the id as ``request_key`` if ``op`` changes
        something (the same on every server the call is sent to)."""
        request_id = f"{self._prefix}-{next(self._counter)}"
        params = {k: v for k, v in params.items() if v is not None}
        if op in protocol.MUTATING_OPS:
            params["request_key"] = request_id
        return request_id, params


def encode(request_id: str, op: str, params: dict, max_request: int) -> list[bytes]:
    """The request's frames; InvalidRequest if it cannot be encoded, RequestTooLarge if it is over ``max_request``
    bytes (then nothing is sent)."""
    try:
        frames = protocol.client_request(request_id, op, params)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{op}: arguments are not JSON-serialisable ({exc})") from None
    except RecursionError:
        raise InvalidRequest(
            f"{op}: arguments nest too deeply to encode: flatten them (at most {config.MAX_JSON_DEPTH} levels)"
        ) from None
    size = len(frames[-1])
    if size > max_request:
        raise RequestTooLarge(
            f"{op}: the request is {size} bytes, more than the {max_request} bytes this client sends "
            "(max_request_bytes; the CLI's --max-message-bytes): keep large data elsewhere (a file, a "
            "database) and pass a reference to it, or raise the server's --max-message-bytes and this "
            "limit together"
        )
    return frames


def unfinished(task_id: int, timeout: float, task: dict) -> WaitTimeout | None:
    """None if ``task`` (a ``wait`` reply's record) is final, else the WaitTimeout to raise once the wait is over."""
    if task["status"] in protocol.FINAL_STATUSES:
        return None
    return WaitTimeout(
        f"task {task_id} did not finish within {timeout:g} s (status {task['status']!r}); "
        "wait longer or check that a worker is running"
    )


def no_reply(endpoint: str, timeout: float) -> ServerUnavailable:
    """The error of a request to the one server at ``endpoint`` that gave no reply within ``timeout`` seconds."""
    return ServerUnavailable(
        f"no reply from the Martinet server at {endpoint} within {timeout:g} s: "
        "is `martinet serve` running there, on that port?"
    )

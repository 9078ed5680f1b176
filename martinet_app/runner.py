"""The handler process: loads the handlers and runs one task at a time for one worker slot.

A worker (worker.py) starts one of these per slot (slots.py) as ``martinet _slot``, so that
a handler that burns CPU, blocks in C code, hangs, calls ``os._exit`` or crashes never stops
the worker from heartbeating, and can be stopped by killing its process.

It speaks JSON lines over the socket whose file descriptor it is given:

    runner -> worker: {"hello": [task names]} or {"error": "why the handlers could not load"}
    worker -> runner: {"task_id", "attempt", "name", "args"[, "dependencies"]}, one or more (a pipe: they run
                      in order); "dependencies" (id as text -> result) is what context.dependency_results() gives
    worker -> runner: {"skip": [task_id, attempt]}: do not start that task if it is still waiting
    runner -> worker: per task, in order: {"event": "progress", "progress", "message"} (any
                      number), then {"event": "succeeded", "result"} or {"event": "failed", "error",
                      "traceback"} ("error": "cancelled" for a skipped task)

Texts (error, traceback, progress message) are sent storable and clipped (``protocol.safe_text``,
config.MAX_*_CHARS), so that every status message the worker builds from them stays small.

The process ignores SIGINT and SIGTERM (its worker decides when it stops) and dies with its
worker (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import socket
import sys
import traceback
from collections import deque
from typing import Any, BinaryIO

from . import config, context, protocol
from .errors import HandlerError
from .registry import Registry, load_handlers

_PR_SET_PDEATHSIG = 1
#: Name a worker script is imported under in the runner, so its ``if __name__ == "__main__"`` part stays out.
SCRIPT_MODULE = "__martinet_script__"


def main(fd: int, spec: dict) -> None:
    """Run tasks from the worker until it closes the socket. Never returns."""
    _detach_from_signals()
    conn = socket.socket(fileno=fd)
    stream = conn.makefile("rwb")
    try:
        registry = _load(spec)
        if not len(registry):
            where = spec.get("handlers_dir")
            raise HandlerError(
                f"no handlers found in {where!r}: add a module there with a function decorated with @task "
                "(from martinet_app import task)"
                if where
                else "no handlers: give a handlers folder, or register functions with Worker.on() before run()"
            )
    except HandlerError as exc:
        _send(stream, _line({"error": exc.message}))
        os._exit(2)
    _send(stream, _line({"hello": registry.names()}))
    lines = _Lines(conn)
    waiting: deque[dict] = deque()
    while True:
        # Read what has arrived before each task (skips included), waiting only when there is nothing to run.
        received = lines.read(block=not waiting)
        if received is None:
            os._exit(0)  # the worker closed the socket
        for message in map(protocol.json_value, received):
            if "skip" in message:
                for task in waiting:
                    if [task["task_id"], task["attempt"]] == message["skip"]:
                        task["skip"] = True
            else:
                waiting.append(message)
        if waiting:
            task = waiting.popleft()
            if task.get("skip"):
                _send(stream, _line({"event": "failed", "error": "cancelled", "traceback": None}))
            else:
                _send(stream, _run(registry, task, stream, spec["worker"], spec["max_result_bytes"]))


class _Lines:
    """Newline-delimited messages from a socket, read whole or without waiting."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""

    def read(self, block: bool) -> list[bytes] | None:
        """The complete lines received so far; with ``block``, wait until there is one. None at EOF."""
        while True:
            try:
                data: bytes | None = self.conn.recv(1 << 16, 0 if block else socket.MSG_DONTWAIT)
            except BlockingIOError:
                data = None
            if data == b"":
                return None
            self.buffer += data or b""
            *lines, self.buffer = self.buffer.split(b"\n")
            if lines or data is None:
                return lines


def _run(registry: Registry, task: dict, stream: BinaryIO, worker_id: str, max_result_bytes: int) -> bytes:
    """Run one task; return its final event, encoded (the result is encoded once, checked and sent)."""
    name = task["name"]

    def progress(fraction: float, message: str | None = None) -> None:
        """Report progress: ``fraction`` from 0 to 1 and an optional message."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"progress fraction must be a number from 0 to 1, got {fraction!r}")
        if message is not None and not isinstance(message, str):
            raise ValueError(f"progress message must be a string, got {type(message).__name__}")
        if message is not None:
            message = protocol.safe_text(message, config.MAX_PROGRESS_CHARS)
        _send(stream, _line({"event": "progress", "progress": float(fraction), "message": message}))

    handler = registry.get(name)
    if handler is None:
        return _failed(f"no handler for task {name!r} on worker {worker_id}")
    context.enter(task.get("dependencies"))
    try:
        result = handler(task["task_id"], task["args"], progress)
    except BaseException as exc:  # noqa: BLE001 - sys.exit() or KeyboardInterrupt in a handler fails the task
        return _failed(f"{type(exc).__name__}: {exc}", traceback.format_exc())
    finally:
        context.leave()
    return _succeeded(name, result, max_result_bytes)


def _succeeded(name: str, result: Any, max_result_bytes: int) -> bytes:
    """The final event of a task that returned ``result``: succeeded, or failed if the result cannot be sent."""
    try:
        encoded = protocol.dumps(result)
    except RecursionError:
        return _failed(_too_deep(name))
    except (TypeError, ValueError) as exc:
        return _failed(f"task {name!r} returned a result that is not JSON-serialisable: {exc}")
    if len(encoded) > max_result_bytes:
        return _failed(
            f"task {name!r} returned a result of {len(encoded)} bytes, more than the {max_result_bytes} allowed: "
            "store large results elsewhere (a file, a database) and return a reference to them"
        )
    # Each level opens a bracket: with few brackets (the usual result) it cannot be too deep, and is not walked.
    if encoded.count(b"[") + encoded.count(b"{") > config.MAX_JSON_DEPTH and protocol.too_deep(result):
        return _failed(_too_deep(name))
    return b'{"event":"succeeded","result":' + encoded + b"}\n"


def _too_deep(name: str) -> str:
    return (
        f"task {name!r} returned a result nested more than {config.MAX_JSON_DEPTH} levels deep "
        "(arrays and objects): flatten it"
    )


def _failed(error: str, trace: str | None = None) -> bytes:
    if trace is not None:
        trace = protocol.safe_text(trace, config.MAX_TRACEBACK_CHARS)
    return _line({"event": "failed", "error": protocol.safe_text(error, config.MAX_ERROR_CHARS), "traceback": trace})


def _load(spec: dict) -> Registry:
    """The handlers of the folder, plus functions registered with ``Worker.on``, found by module and name."""
    sys.path[:0] = spec.get("paths", [])
    registry = Registry()
    if spec.get("handlers_dir"):
        registry.update(load_handlers(spec["handlers_dir"]))
    for ref in spec.get("functions", []):
        registry.add(ref["name"], _resolve(ref))
    return registry


def _resolve(ref: dict) -> Any:
    """Import a function registered with ``Worker.on`` by its module (or script file) and qualified name."""
    try:
        if ref.get("file"):
            module = sys.modules.get(SCRIPT_MODULE)
            if module is None:
                module_spec = importlib.util.spec_from_file_location(SCRIPT_MODULE, ref["file"])
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[SCRIPT_MODULE] = module
                module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(ref["module"])
        target: Any = module
        for part in ref["qualname"].split("."):
            target = getattr(target, part)
        return target
    except Exception as exc:  # noqa: BLE001 - any failure to find it is the same user-facing error
        where = ref.get("file") or ref["module"]
        raise HandlerError(
            f"cannot import the handler for task {ref['name']!r} ({ref['qualname']} in {where}): "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _line(message: dict) -> bytes:
    return protocol.dumps(message) + b"\n"


def _send(stream: BinaryIO, line: bytes) -> None:
    stream.write(line)
    stream.flush()


def _detach_from_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the worker died before prctl took effect
        os._exit(1)

"""Worker slots: one handler process (runner.py) per slot, driven from the worker's gevent loop.

A slot runs one task at a time in its own process (the worker may send several at once, which
the process runs in order: a pipe). The worker's loop only waits on the
process's socket, so heartbeats keep flowing whatever the handler does; a task that runs past
its timeout, or is cancelled, is stopped by killing the process (SIGKILL), and a process that
dies for any reason is replaced before the slot takes another task.

Each process leads its own process group, and the slot kills the whole group, so what a handler
started dies with it: on a timeout, a cancel, :meth:`Slot.close`, and as soon as the process
exits by itself (a child it forked would otherwise keep the socket open, and the task waiting).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import gevent
from gevent import socket, subprocess

from . import protocol
from .errors import HandlerError

log = logging.getLogger(__name__)

#: Seconds a new handler process gets to import the handlers and say hello.
START_TIMEOUT = 60.0
#: The fields of a task the handler process gets (``dependencies`` only if the task has any).
_SENT = ("task_id", "attempt", "name", "args", "dependencies")


class _Expired(Exception):
    """The task ran past its timeout."""


def runner_command() -> list[str]:
    """How to start a handler process: the frozen executable or this Python."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "_slot"]
    return [sys.executable, "-m", "martinet_app", "_slot"]


class Slot:
    """One handler process and the task it runs.

    Args:
        spec: what the process loads (see runner.py): handlers_dir, paths, functions, worker.
    """

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.conn: Any = None
        self.stream: Any = None
        self.dead = True
        #: Bytes of the last message read from the process: what its event weighs, without encoding it again.
        self.last_size = 0
        self._pipe: deque[dict] = deque()
        self._interrupted: str | None = None
        self._victim: tuple[int, int] | None = None
        # The process's group until it is killed, and the greenlet waiting for the process to exit.
        self._group: int | None = None
        self._watcher: gevent.Greenlet | None = None

    def start(self) -> list[str]:
        """Start the process and wait for its hello; return the task names it serves.

        Raises:
            HandlerError: the handlers did not load (the message says why).
        """
        self.close()
        ours, theirs = socket.socketpair()
        os.set_blocking(theirs.fileno(), True)
        env = dict(os.environ)
        if not getattr(sys, "frozen", False):
            # The process must import martinet_app and the handlers from where this one does.
            env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        self.proc = subprocess.Popen(
            [*runner_command(), str(theirs.fileno()), json.dumps(self.spec)],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
            process_group=0,
        )
        self._group = self.proc.pid
        theirs.close()
        self.conn = ours
        self.stream = ours.makefile("rwb")
        self._watcher = gevent.spawn(self._watch, self.proc, ours)
        try:
            hello = self._read(START_TIMEOUT)
        except _Expired:
            self.close()
            raise HandlerError(
                f"the handler process did not answer within {START_TIMEOUT:g} s: does a handler module "
                "block or loop when it is imported?"
            ) from None
        if hello is None or "hello" not in hello:
            self.close()
            if hello is not None:
                raise HandlerError(hello["error"])
            raise HandlerError(
                f"the handler process exited with status {self.proc.returncode} before loading the handlers: "
                "see its output above"
            )
        self.dead = False
        return hello["hello"]

    def run(
        self,
        tasks: list[dict],
        on_start: Callable[[dict], None],
        on_progress: Callable[[dict, float, str | None], None],
        on_done: Callable[[dict, dict], None],
    ) -> list[dict]:
        """Run ``tasks`` in order in the process, all sent in one write; return those it never started.

        Each task starts when the one before it ends (``on_start``), may report progress
        (``on_progress``) and ends with its final event, ``succeeded`` or ``failed`` (``on_done``).
        A task's ``timeout`` counts from its start. A timeout or :meth:`interrupt` kills the
        process: the slot is then ``dead`` and must be started again, and the tasks after the one
        stopped come back unstarted, for the caller to run elsewhere.
        """
        self._interrupted = self._victim = None
        self._pipe = deque(tasks)
        try:
            if self.stream is None:
                raise OSError("it is not running")
            lines = (protocol.dumps({key: t[key] for key in _SENT if key in t}) + b"\n" for t in tasks)
            self.stream.write(b"".join(lines))
            self.stream.flush()
        except OSError as exc:  # its process was gone before the tasks reached it
            self.close()
            on_start(tasks[0])
            on_done(tasks[0], {"event": "failed", "error": f"the handler's process was lost: {exc}", "traceback": None})
            return tasks[1:]
        while self._pipe and not self.dead:
            task = self._pipe[0]
            on_start(task)
            outcome = self._await(task, on_progress)
            if outcome is None:  # killed for a task after it, which the process had already reached
                break
            self._pipe.popleft()
            on_done(task, outcome)
        unstarted, self._pipe = list(self._pipe), deque()
        return unstarted

    def interrupt(self, reason: str, ref: tuple[int, int]) -> None:
        """Stop delivery ``ref``: skip it if it is still waiting in the pipe, else kill the process.

        A killed process's task ends ``failed`` with ``reason``, and the slot is ``dead``. A task
        the process reaches before the skip does runs to its end.
        """
        waiting = [(t["task_id"], t["attempt"]) for t in list(self._pipe)[1:]]
        if ref in waiting:
            log.debug("skipping task %s attempt %s, waiting in a slot's pipe", *ref)
            try:
                self.stream.write(protocol.dumps({"skip": list(ref)}) + b"\n")
                self.stream.flush()
            except OSError:  # the process is gone: its tasks come back unstarted
                pass
            return
        self._interrupted, self._victim = reason, ref
        self.dead = True
        self._kill_group()

    def alive(self) -> bool:
        """Whether the process is running (it may have been killed between tasks)."""
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """Whether an idle slot can take tasks: its process runs and has not closed its socket.

        An idle process writes nothing, so a readable socket means it has died, even if the
        worker has not yet been told (SIGCHLD is handled a loop turn later).
        """
        return not self.dead and self.alive() and not select.select([self.conn], [], [], 0)[0]

    def close(self) -> None:
        """Kill the process and its group (if not done yet) and release the socket."""
        self.dead = True
        if self._watcher is not None:
            self._watcher.kill()
            self._watcher = None
        self._kill_group()
        if self.proc is not None:
            self.proc.wait()
        if self.conn is not None:
            try:
                self.stream.close()
            except OSError:  # unflushed data to a process that is gone
                pass
            self.conn.close()
            self.conn = self.stream = None

    def _kill_group(self) -> None:
        """SIGKILL the process and everything in its group, once.

        Once only: the group's id is the process's pid, which the system may give to another
        process when the group is empty and the process reaped. Until then the id stays taken.
        """
        group, self._group = self._group, None
        if group is not None:
            with suppress(ProcessLookupError, PermissionError):  # all gone, or only others' (setuid) left
                os.killpg(group, signal.SIGKILL)

    def _watch(self, proc: subprocess.Popen, conn: Any) -> None:
        """When the process exits, kill what it left in its group, and end the reading of its socket.

        A child the process forked holds the socket too: without this, a task whose process died
        would wait for that child to exit.
        """
        proc.wait()
        self._kill_group()
        # A descendant that left the group (setsid) may still hold the socket: end of stream all the same.
        conn.shutdown(socket.SHUT_RD)

    def _await(self, task: dict, on_progress: Callable[[dict, float, str | None], None]) -> dict | None:
        """Read the head task's messages up to its final event; None if it was killed for another task."""
        timeout = task.get("timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        self.last_size = 0
        try:
            while True:
                message = self._read(None if deadline is None else max(0.0, deadline - time.monotonic()))
                if message is None:
                    return self._died(task)
                if message.get("event") == "progress":
                    on_progress(task, message["progress"], message.get("message"))
                else:
                    return message
        except _Expired:
            self.close()
            return {"event": "failed", "error": f"timed out after {timeout:g} s", "traceback": None}

    def _died(self, task: dict) -> dict | None:
        assert self.proc is not None
        code = self.proc.wait()
        self.close()
        if self._victim is not None and self._victim != (task["task_id"], task["attempt"]):
            return None
        if self._interrupted:
            return {"event": "failed", "error": self._interrupted, "traceback": None}
        if code < 0:
            how = f"was killed by signal {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        return {"event": "failed", "error": f"the handler's process {how} while running the task", "traceback": None}

    def _read(self, timeout: float | None) -> dict | None:
        """The process's next message; None if it is gone (end of stream, or reset: it died with input unread)."""
        try:
            if timeout is None:
                line = self.stream.readline()
            else:
                with gevent.Timeout(timeout, _Expired):
                    line = self.stream.readline()
        except OSError:
            line = b""
        self.last_size = len(line)
        return protocol.json_value(line) if line else None

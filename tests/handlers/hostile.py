"""Handlers that misbehave on purpose, for the reliability tests."""

import ctypes
import os
import sys
import time

from martinet_app import task


@task
def spin(task_id, data, progress):
    """Hold the CPU (no I/O, no sleep) for data["seconds"]."""
    deadline = time.monotonic() + data["seconds"]
    count = 0
    while time.monotonic() < deadline:
        count += 1
    return {"pid": os.getpid(), "loops": count}


@task
def crash(task_id, data, progress):
    """Leave in the way data["how"] says, after noting this process's pid in data["path"]."""
    with open(data["path"], "a") as f:
        f.write(f"{os.getpid()}\n")
    how = data["how"]
    if how == "sys.exit":
        sys.exit(3)
    if how == "os._exit":
        os._exit(7)
    if how == "segfault":
        ctypes.string_at(0)
    if how == "hang":
        while True:
            time.sleep(1)
    raise ValueError(f"unknown way to crash: {how!r}")


@task
def whoami(task_id, data, progress):
    return {"pid": os.getpid()}


@task
def big(task_id, data, progress):
    """Return a string of data["bytes"] characters, and the size of the args it was given."""
    return {"blob": "x" * data["bytes"], "args_size": len(data.get("blob", ""))}

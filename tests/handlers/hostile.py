"""Handlers that misbehave on purpose, for the reliability tests."""

import ctypes
import os
import subprocess
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


@task
def poison(task_id, data, progress):
    """Report progress and/or fail with text built from data: "text", then "fs_hex" decoded as a
    file name is (undecodable bytes become lone surrogates), repeated data.get("repeat", 1) times."""
    text = (data.get("text", "") + os.fsdecode(bytes.fromhex(data.get("fs_hex", "")))) * data.get("repeat", 1)
    if data.get("progress"):
        progress(0.5, text)
    if data.get("fail", True):
        raise RuntimeError(text)
    return {"ok": True}


@task
def spawn_sleep(task_id, data, progress):
    """Start `sleep data["seconds"]` as a child process, note its pid in data["path"], and wait for it."""
    child = subprocess.Popen(["sleep", str(data["seconds"])])
    with open(data["path"], "a") as f:
        f.write(f"{child.pid}\n")
    child.wait()
    return {"child": child.pid}


@task
def fork_exit(task_id, data, progress):
    """Fork a child that sleeps data["seconds"] (noting its pid in data["path"]), then leave with os._exit(5)."""
    pid = os.fork()
    if pid == 0:
        time.sleep(data["seconds"])
        os._exit(0)
    with open(data["path"], "a") as f:
        f.write(f"{pid}\n")
    os._exit(5)


@task
def deep(task_id, data, progress):
    """Return lists (tuples if data["tuples"]) nested data["depth"] levels deep."""
    kind = tuple if data.get("tuples") else list
    result = kind()
    for _ in range(data["depth"] - 1):
        result = kind([result])
    return result

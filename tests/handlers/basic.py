"""Handlers the end-to-end tests run."""

import os
import time

from martinet_app import dependency_results, task


@task
def echo(task_id, data, progress):
    return {"task_id": task_id, "args": data}


@task("steps")
def report_progress(task_id, data, progress):
    """Report progress data["steps"] times, "step N", data.get("seconds", 0) apart (the last once the work is done)."""
    for step in range(1, data["steps"] + 1):
        if step > 1:
            time.sleep(data.get("seconds", 0))
        progress(step / data["steps"], f"step {step}")
    return {"done": data["steps"]}


@task
def explode(task_id, data, progress):
    raise ValueError(data.get("message", "boom"))


@task
def nap(task_id, data, progress):
    time.sleep(data.get("seconds", 0.1))
    return {"slept": data.get("seconds", 0.1)}


@task
def ledger(task_id, data, progress):
    """Append this task's id to a file, so tests can count every execution."""
    with open(data["path"], "a") as f:  # a killed process's writes survive: no fsync needed
        f.write(f"{task_id}\n")
    time.sleep(data.get("seconds", 0))
    return {"pid": os.getpid()}


@task
def bad_result(task_id, data, progress):
    return {"not json": object()}


@task
def bad_progress(task_id, data, progress):
    progress(1.5)


def _stamp(task_id, data, progress):
    """Sleep data.get("seconds", 0); return when the handler started and ended (epoch seconds), for tests of limits."""
    start = time.time()
    time.sleep(data.get("seconds", 0))
    return {"start": start, "end": time.time()}


# One handler under two names: tasks of different names that share a limit key.
task("stamp")(_stamp)
task("stamp_too")(_stamp)


@task
def gather(task_id, data, progress):
    """The results of this task's dependencies, as dependency_results() gives them (ids in order, and results)."""
    results = dependency_results()
    return {"order": list(results), "results": {str(dep): result for dep, result in results.items()}}

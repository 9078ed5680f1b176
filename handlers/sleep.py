"""Example handler that sleeps: the worker's other slots run other tasks meanwhile."""

import time

from martinet_app import task


@task
def sleep(task_id, data, progress):
    """Sleep ``data["seconds"]`` (default 1), saying so in the task's progress message, and return how long it
    really took."""
    seconds = float(data.get("seconds", 1))
    progress(0.0, f"sleeping {seconds:g} s")
    started = time.monotonic()
    time.sleep(seconds)
    return {"slept": round(time.monotonic() - started, 3)}

"""Example handler that fails on purpose: its error and traceback are stored on the task."""

from martinet_app import task


class DeliberateFailure(Exception):
    """Raised by the ``fail`` task, to show how failures are recorded."""


@task
def fail(task_id, data, progress):
    """Always fails, with ``data["reason"]`` as the message."""
    raise DeliberateFailure(data.get("reason", "failed on purpose"))

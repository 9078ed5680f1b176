"""The benchmark's no-op handler (bench/compare.py runs a worker on this folder)."""

from martinet_app import task


@task
def noop(task_id, data, progress):
    return None

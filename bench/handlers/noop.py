"""The benchmark's no-op handler (bench/compare.py runs a worker on this folder).

It returns the time it started (time.time()), so the driver can measure submit -> handler start.
"""

import time

from martinet_app import task


@task
def noop(task_id, data, progress):
    return time.time()

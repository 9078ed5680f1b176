"""Example handler for a recurring task: bring a local copy up to date, and say what it did."""

import time
from datetime import UTC, datetime

from martinet_app import task


@task
def sync(task_id, data, progress):
    """Sync ``data["source"]`` (default ``"crm"``): a stand-in that takes a moment and reports when it ran."""
    started = time.monotonic()
    time.sleep(0.1)
    return {
        "source": data.get("source", "crm"),
        "synced_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 3),
    }

"""Example handler for a task scheduled ahead: build the report of one weekday, section by section."""

import time

from martinet_app import task

DAYS = {"mon": "Monday", "tue": "Tuesday", "wed": "Wednesday", "thu": "Thursday", "fri": "Friday",
        "sat": "Saturday", "sun": "Sunday"}  # fmt: skip
SECTIONS = ("orders", "refunds", "stock")


@task
def report(task_id, data, progress):
    """Report on ``data["day"]`` (``mon``..``sun``); an unknown day fails the task, saying which days exist."""
    day = str(data.get("day", "mon")).lower()[:3]
    if day not in DAYS:
        raise ValueError(f"no such day {data.get('day')!r}: use one of {', '.join(DAYS)}")
    for done, section in enumerate(SECTIONS, 1):
        time.sleep(0.05)  # a stand-in for the queries a real report would make
        progress(done / len(SECTIONS), f"{section} done")
    return {"title": f"{DAYS[day]} report", "sections": list(SECTIONS)}

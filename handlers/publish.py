"""Example handler for a task with dependencies: publish what the resize tasks it waited for made."""

from martinet_app import dependency_results, task


@task
def publish(task_id, data, progress):
    """Collect the sizes of the images resized by this task's dependencies (``after`` or the chain step before)."""
    resized = dependency_results()  # {task id: its result}, in the order of `after`; {} without dependencies
    sizes = [result for result in resized.values() if isinstance(result, dict) and "width" in result]
    return {"published": len(sizes), "widths": [size["width"] for size in sizes], "from": list(resized)}

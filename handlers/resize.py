"""Example handler that reports progress: 'resize' an image by halving its size in steps."""

import time

from martinet_app import task


@task("resize_image")
def resize(task_id, data, progress):
    """Halve ``w`` (and ``h`` if given), reporting progress at each step."""
    width, height = int(data["w"]), int(data.get("h", data["w"]))
    steps = int(data.get("steps", 4))
    for step in range(1, steps + 1):
        time.sleep(float(data.get("step_seconds", 0.05)))
        progress(step / steps, f"step {step} of {steps}")
    return {"width": width // 2, "height": height // 2}

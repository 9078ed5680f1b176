"""What a running handler can ask about its task beyond its arguments: the results of its dependencies.

A task submitted with ``after=[...]`` (or a step of ``chain``) runs once every task it waits for has
succeeded, and their results travel with it to its worker. Inside the handler::

    from martinet_app import dependency_results, task

    @task("publish")
    def publish(task_id, data, progress):
        for dep_id, result in dependency_results().items():   # {task id: its result}, in the order of `after`
            ...

The handler process (runner.py) sets them for each task it runs, and only for its duration.
"""

from __future__ import annotations

from typing import Any

from .errors import HandlerError

#: The dependencies' results of the task running in this process; None when no handler runs.
_current: dict[int, Any] | None = None


def dependency_results() -> dict[int, Any]:
    """The results of the running task's dependencies, by task id in the order they were given (``{}`` for a task
    without any; a dependency purged since it succeeded is left out). HandlerError outside a running handler."""
    if _current is None:
        raise HandlerError(
            "dependency_results() is only available inside a handler while it runs a task (martinet work)"
        )
    return dict(_current)


def enter(dependencies: dict[str, Any] | None) -> None:
    """The handler process starts a task whose TASK entry carried ``dependencies`` (id as text -> result)."""
    global _current
    _current = {int(task_id): result for task_id, result in (dependencies or {}).items()}


def leave() -> None:
    """The task's handler has returned or raised."""
    global _current
    _current = None

"""What a transaction changes in the task counts: tasks per status, and outcomes per minute and name.

Counting a million tasks is a scan (about 60 ms on SQLite, during which the hub stands still), so
the overview, ``/metrics`` and ``martinet stats`` never count. They read two small tables that the
store keeps exact in the same transaction as every change (schema.TaskCount, schema.TaskMinute):
each store method that moves tasks records the move here, and the pool writes the sum of the
transaction's moves just before it commits (db.Pool.write_tally). Each server writes rows of its
own, so the servers of a cluster never wait on each other's row locks; a count is the sum over them.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from .status import TaskStatus


@dataclasses.dataclass
class Tally:
    """One transaction's changes: ``statuses`` by how much each status's count moves, ``outcomes`` by
    (name, final status) the tasks that ended and their run time in seconds."""

    statuses: Counter[str] = dataclasses.field(default_factory=Counter)
    outcomes: dict[tuple[str, str], list[float]] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.outcomes) or any(self.statuses.values())

    def copy(self) -> Tally:
        """An independent copy (a savepoint's, db.Pool.savepoint)."""
        return Tally(Counter(self.statuses), {key: list(entry) for key, entry in self.outcomes.items()})

    def move(self, source: TaskStatus | None, target: TaskStatus | None, count: int = 1) -> None:
        """``count`` tasks went from ``source`` (None: new) to ``target`` (None: deleted)."""
        if count:
            if source is not None:
                self.statuses[source.value] -= count
            if target is not None:
                self.statuses[target.value] += count

    def end(self, name: str, status: TaskStatus, run_seconds: float | None = None) -> None:
        """A task of ``name`` became final in ``status`` (after running ``run_seconds``, if it ran)."""
        entry = self.outcomes.setdefault((name, status.value), [0, 0.0])
        entry[0] += 1
        entry[1] += max(0.0, run_seconds or 0.0)

"""The task lifecycle: its statuses, the moves between them, and the one table that allows each move.

Every change of a task's status in the store is one :class:`Move`, and :data:`TRANSITIONS`
decides it: :func:`decide` for a change worked out in Python, :func:`sql_sources` for the
``WHERE status IN (...)`` of a change made by one UPDATE. Nothing else names a source state.
Importable without peewee: the client and the CLI use it too::

    waiting --release--> queued        waiting --release_later--> scheduled
    scheduled --due--> queued --claim--> running --succeed--> succeeded
                                         running --fail--> failed
                                         running --retry_later--> scheduled
                                         running --requeue--> queued
    waiting | scheduled | queued | running --cancel--> cancelled
    failed | cancelled --retry--> queued
    cancelled --rewait--> waiting

A task submitted with dependencies (``after``) starts ``waiting`` (:func:`initial`); the transaction that
records a dependency's success releases it once all of them have succeeded, and the one that records a
dependency's failure or cancel cancels it (store.py).
"""

from __future__ import annotations

from enum import Enum

from .errors import InvalidTransition


class TaskStatus(str, Enum):
    """Where a task is in its lifecycle."""

    WAITING = "waiting"  # for its dependencies to succeed
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Move(str, Enum):
    """One change a store operation makes to a task."""

    DUE = "due"  # its run_at has come
    CLAIM = "claim"  # a server delivers it to a worker (a new attempt)
    SUCCEED = "succeed"  # the handler returned
    FAIL = "fail"  # the handler failed with no retries left, or the task was given up
    RETRY_LATER = "retry_later"  # the handler failed with retries left: due again after its backoff
    REQUEUE = "requeue"  # the delivery ended without an outcome: never sent, handed back, or its worker lost
    CANCEL = "cancel"
    RETRY = "retry"  # someone asked for one more run
    RELEASE = "release"  # its dependencies have all succeeded, and it is due
    RELEASE_LATER = "release_later"  # its dependencies have all succeeded; due at its run_at
    REWAIT = "rewait"  # someone asked for one more run of a task whose dependencies have not all succeeded yet


S, M = TaskStatus, Move
#: (status, move) -> the status after it. A pair missing here is an invalid transition.
TRANSITIONS: dict[tuple[TaskStatus, Move], TaskStatus] = {
    (S.WAITING, M.RELEASE): S.QUEUED,
    (S.WAITING, M.RELEASE_LATER): S.SCHEDULED,
    (S.WAITING, M.CANCEL): S.CANCELLED,
    (S.SCHEDULED, M.DUE): S.QUEUED,
    (S.SCHEDULED, M.CANCEL): S.CANCELLED,
    (S.QUEUED, M.CLAIM): S.RUNNING,
    (S.QUEUED, M.CANCEL): S.CANCELLED,
    (S.RUNNING, M.SUCCEED): S.SUCCEEDED,
    (S.RUNNING, M.FAIL): S.FAILED,
    (S.RUNNING, M.RETRY_LATER): S.SCHEDULED,
    (S.RUNNING, M.REQUEUE): S.QUEUED,
    (S.RUNNING, M.CANCEL): S.CANCELLED,
    (S.FAILED, M.RETRY): S.QUEUED,
    (S.CANCELLED, M.RETRY): S.QUEUED,
    # Only a cancelled task can wait again: a dependant that ran (and failed) had all its dependencies succeeded.
    (S.CANCELLED, M.REWAIT): S.WAITING,
}
#: Moves only a person makes: a status that nothing else leaves is final.
MANUAL = frozenset({M.RETRY, M.REWAIT})
#: Statuses a task stays in unless someone retries it; ``wait`` returns on them.
FINAL = frozenset(s for s in S if all(move in MANUAL for (source, move) in TRANSITIONS if source == s))
#: Each status's possible next statuses.
NEXT: dict[TaskStatus, frozenset[TaskStatus]] = {
    s: frozenset(target for (source, _), target in TRANSITIONS.items() if source == s) for s in S
}


def initial(*, due: bool, waiting: bool) -> TaskStatus:
    """The status a task is inserted in: ``waiting`` with dependencies to wait for, else ``queued`` when
    ``due``, else ``scheduled``. A task whose dependencies have succeeded already is then released (or one
    of them has failed: cancelled) in the same transaction, through the table."""
    if waiting:
        return S.WAITING
    return S.QUEUED if due else S.SCHEDULED


def decide(status: TaskStatus, move: Move) -> TaskStatus:
    """The status a task in ``status`` has after ``move``; InvalidTransition if the table has no such move."""
    try:
        return TRANSITIONS[status, move]
    except KeyError:
        raise InvalidTransition(f"a {status.value} task cannot {move.value.replace('_', ' ')}") from None


def sources(move: Move) -> tuple[TaskStatus, ...]:
    """The statuses ``move`` applies to, in lifecycle order."""
    return tuple(s for s in S if (s, move) in TRANSITIONS)


def target(move: Move) -> TaskStatus:
    """The status ``move`` leads to (each move has one)."""
    (only,) = {TRANSITIONS[s, move] for s in sources(move)}
    return only


def sql_sources(move: Move) -> str:
    """``sources(move)`` as the list inside an SQL ``IN (...)``: ``'scheduled', 'queued'``."""
    return ", ".join(f"'{s.value}'" for s in sources(move))


def sql_final() -> str:
    """The final statuses as the list inside an SQL ``IN (...)``."""
    return ", ".join(f"'{s.value}'" for s in S if s in FINAL)

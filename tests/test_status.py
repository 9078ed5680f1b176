"""The lifecycle table (martinet_app.status): every (status, move) pair, and what is derived from it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from martinet_app import protocol
from martinet_app.errors import InvalidTransition
from martinet_app.status import (
    FINAL,
    MANUAL,
    NEXT,
    TRANSITIONS,
    Move,
    TaskStatus,
    decide,
    initial,
    sources,
    sql_final,
    sql_sources,
    target,
)

S, M = TaskStatus, Move

#: The lifecycle as docs/ARCHITECTURE.md draws it, written out independently of the table.
EXPECTED = {
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
    (S.CANCELLED, M.REWAIT): S.WAITING,
}


@pytest.mark.parametrize("status", list(S), ids=lambda s: s.value)
@pytest.mark.parametrize("move", list(M), ids=lambda m: m.value)
def test_decide_every_pair(status: TaskStatus, move: Move) -> None:
    if (status, move) in EXPECTED:
        assert decide(status, move) == EXPECTED[status, move]
    else:
        with pytest.raises(InvalidTransition, match=f"a {status.value} task cannot"):
            decide(status, move)


def test_table_is_the_drawn_lifecycle() -> None:
    assert TRANSITIONS == EXPECTED


def test_final_is_what_only_a_manual_move_leaves() -> None:
    assert FINAL == {S.SUCCEEDED, S.FAILED, S.CANCELLED}
    assert MANUAL == {M.RETRY, M.REWAIT}
    assert protocol.FINAL_STATUSES == {s.value for s in FINAL}
    assert sql_final() == "'succeeded', 'failed', 'cancelled'"
    assert NEXT[S.SUCCEEDED] == frozenset() and NEXT[S.RUNNING] == {S.SUCCEEDED, S.FAILED, S.SCHEDULED, S.QUEUED,
                                                                   S.CANCELLED}  # fmt: skip


def test_waiting_is_left_by_its_dependencies_or_a_cancel_and_entered_by_submit_or_rewait() -> None:
    assert NEXT[S.WAITING] == {S.QUEUED, S.SCHEDULED, S.CANCELLED}
    assert {source for (source, _), goal in TRANSITIONS.items() if goal == S.WAITING} == {S.CANCELLED}
    assert S.WAITING not in FINAL
    assert sql_sources(M.CANCEL) == "'waiting', 'scheduled', 'queued', 'running'"


@pytest.mark.parametrize("due", [True, False])
@pytest.mark.parametrize("waiting", [True, False])
def test_initial_status(due: bool, waiting: bool) -> None:
    expected = S.WAITING if waiting else S.QUEUED if due else S.SCHEDULED
    assert initial(due=due, waiting=waiting) == expected


@pytest.mark.parametrize("move", list(M), ids=lambda m: m.value)
def test_each_move_has_its_sources_and_one_target(move: Move) -> None:
    expected_sources = tuple(s for s in S if (s, move) in EXPECTED)
    assert sources(move) == expected_sources and expected_sources
    assert sql_sources(move) == ", ".join(f"'{s.value}'" for s in expected_sources)
    assert target(move) == {EXPECTED[s, move] for s in expected_sources}.pop()


def test_importable_without_peewee() -> None:
    """The client and the status table load where peewee is not installed (a client-only install)."""
    code = "import sys; sys.modules['peewee'] = None; import martinet_app.status, martinet_app.client; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr

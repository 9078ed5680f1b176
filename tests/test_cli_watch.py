"""``martinet watch`` and ``martinet stats`` run as real subprocesses against a real server and worker."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_e2e_cli import ok, ok_json, one_line_error, run

from conftest import ROOT, TIMEOUT, Cluster, martinet_cmd, wait_until
from martinet_app.watch import pause

#: A line of a watch whose stdout is not a terminal.
LINE = re.compile(r"task (\d+) \((\w+)\) (\w+) (\S+) elapsed (\S+) eta (\S+)(?:: (.*))?")


def lines(out: str) -> list[tuple]:
    """The lines of a plain watch as (id, name, status, percent, elapsed, eta, message or None)."""
    parsed = []
    for line in out.splitlines():
        match = LINE.fullmatch(line)
        assert match, f"not a watch line: {line!r} in\n{out}"
        parsed.append((int(match[1]), *match.groups()[1:]))
    return parsed


def clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("MARTINET_")}


class Background:
    """A ``martinet watch`` running while the test goes on, its stdout in a file."""

    def __init__(self, cluster: Cluster, path: Path, *args: str) -> None:
        self.path = path
        argv = martinet_cmd("watch", *args, "--client-port", str(cluster.server.client_port))
        with open(path, "w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=clean_env(), stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.path.read_text()

    def wait_for(self, text: str) -> None:
        def shown() -> bool:
            assert self.proc.poll() is None, f"watch exited {self.proc.returncode}:\n{self.output()}"
            return text in self.output()

        wait_until(shown, what=f"{text!r} in the watch's output")

    def finish(self) -> int:
        return self.proc.wait(TIMEOUT)


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Callable[..., Background]]:
    """Start a Background watch; every one still running at teardown is killed."""
    started: list[Background] = []

    def start(cluster: Cluster, *args: str) -> Background:
        started.append(Background(cluster, tmp_path / f"watch{len(started)}.out", *args))
        return started[-1]

    yield start
    for watch in started:
        if watch.proc.poll() is None:
            watch.proc.kill()
            watch.proc.wait()


def submit(cluster: Cluster, name: str, args: dict | None = None) -> int:
    return cluster.client.execute({"name": name}, args or {})


# ---------------------------------------------------------------- watch


def test_watch_shows_progress_advancing_with_its_message_and_exits_0(
    sqlite_cluster: Cluster, background: Callable[..., Background]
) -> None:
    # Each watch is up (it shows the task queued) before a worker starts it: it sees every step however
    # long it took to start.
    task_id = submit(sqlite_cluster, "steps", {"steps": 5, "seconds": 1})
    json_id = submit(sqlite_cluster, "steps", {"steps": 4, "seconds": 1})
    plain = background(sqlite_cluster, str(task_id))
    as_json = background(sqlite_cluster, str(json_id), "--json")
    plain.wait_for(f"task {task_id} (steps) queued 0% elapsed - eta -\n")
    as_json.wait_for('"status": "queued"')
    sqlite_cluster.start_worker("--concurrency", "2")
    assert plain.finish() == 0, plain.output()
    shown = lines(plain.output())
    assert {row[:2] for row in shown} == {(task_id, "steps")}
    assert len(set(shown)) == len(shown), "one line per change"
    running = [row for row in shown if row[2] == "running" and row[3] != "0%"]
    percents = [int(row[3].rstrip("%")) for row in running]
    assert len(set(percents)) >= 3 and percents == sorted(percents), f"progress advances:\n{plain.output()}"
    for _, _, _, percent, _, eta, message in running:
        assert message == f"step {int(percent.rstrip('%')) // 20}", "each line carries the message of its progress"
        assert re.fullmatch(r"\d+:\d\d:\d\d", eta), "a running task with progress has an ETA"
    assert shown[-1][2:4] == ("succeeded", "100%") and shown[-1][5] == "-"
    assert shown[-1][4] in ("0:00:04", "0:00:05"), "elapsed: from the handler's start to its end, 4 x 1 s"

    # --json: the same changes, as objects.
    assert as_json.finish() == 0, as_json.output()
    changes = [json.loads(line) for line in as_json.output().splitlines()]
    assert changes[-1]["status"] == "succeeded" and changes[-1]["message"] == "step 4" and changes[-1]["eta"] is None
    progress = [change["progress"] for change in changes if change["status"] == "running"]
    assert len(set(progress)) >= 2 and progress == sorted(progress), as_json.output()
    assert set(changes[-1]) == {"id", "name", "status", "progress", "message", "elapsed", "eta"}
    assert 3 <= changes[-1]["elapsed"] < 6


def test_watch_on_a_terminal_draws_bars(sqlite_cluster: Cluster) -> None:
    task_id = submit(sqlite_cluster, "steps", {"steps": 4, "seconds": 0.6})
    argv = martinet_cmd("watch", str(task_id), "--client-port", str(sqlite_cluster.server.client_port))
    leader, follower = pty.openpty()
    env = {**clean_env(), "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "30"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the watch exited and closed the terminal
            break
        if not chunk:
            break
        if b"queued" in chunk and not sqlite_cluster.workers:  # the watch is up: now the task may run
            sqlite_cluster.start_worker()
        screen += chunk
    os.close(leader)
    assert proc.wait(TIMEOUT) == 0, screen.decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode())  # without the colours and cursor moves
    assert "\r" in text and "\x1b[2K" in screen.decode(), "the bars are redrawn in place"
    frames = [frame for frame in re.split(r"[\r\n]+", text) if frame.strip()]
    assert any(re.search(rf"{task_id} steps .*running .*eta \d:\d\d:\d\d step [1-3]", f) for f in frames), text
    assert re.search(rf"{task_id} steps .*━+ +100% succeeded 0:00:0[23] eta - step 4", frames[-1]), frames[-1]
    assert "task " not in text, "bars, not the plain lines"


@pytest.mark.parametrize(
    "took, expected",
    [
        ([0.01], 0.29),  # quick polls start POLL_INTERVAL apart
        ([0.01, 0.01, 0.3], 0.0),  # one slow poll: the next follows at once, not 2.7 s later
        ([0.01, 0.3], 0.0),
        ([0.1, 0.1, 0.1], 0.9),  # slow polls: the server is busy with them a tenth of the time
        ([0.3, 0.01], 0.29),  # the first poll's connection made it slow
        ([0.2, 0.2, 0.01], 1.99),
        ([0.5], 4.5),
    ],
)
def test_a_watch_paces_its_polls_by_how_long_the_latest_took(took: list[float], expected: float) -> None:
    assert pause(took) == pytest.approx(expected)


def test_watch_of_a_failing_task_exits_as_wait_does(sqlite_cluster: Cluster) -> None:
    sqlite_cluster.start_worker()
    good = submit(sqlite_cluster, "echo")
    bad = submit(sqlite_cluster, "explode", {"message": "kaboom"})
    proc = run(sqlite_cluster, "watch", str(good), str(bad))
    waited = run(sqlite_cluster, "wait", str(bad))
    assert proc.returncode == waited.returncode == 5, proc.stdout + proc.stderr
    final = {row[0]: row for row in lines(proc.stdout)}
    assert final[good][2] == "succeeded"
    assert final[bad][2] == "failed" and final[bad][6] == "ValueError: kaboom", "a failed task shows its error"
    assert run(sqlite_cluster, "watch", str(good)).returncode == run(sqlite_cluster, "wait", str(good)).returncode == 0


def test_watch_of_an_unknown_task_fails_as_wait_does(sqlite_cluster: Cluster) -> None:
    known = sqlite_cluster.client.schedule("in 1 hour", {"name": "echo"})
    waited = run(sqlite_cluster, "wait", "987654")
    one_line_error(waited, 4, "no task with id 987654")
    for ids in (["987654"], [str(known), "987654"]):
        proc = run(sqlite_cluster, "watch", *ids)
        one_line_error(proc, 4)
        assert proc.stderr == waited.stderr, "nothing shown before the error, and the same error"


def test_watch_timeout_fails_as_wait_does(sqlite_cluster: Cluster) -> None:
    task_id = submit(sqlite_cluster, "echo")  # no worker: it stays queued
    waited = run(sqlite_cluster, "wait", str(task_id), "--wait-timeout", "0.5")
    proc = run(sqlite_cluster, "watch", str(task_id), "--wait-timeout", "0.5")
    assert proc.returncode == waited.returncode == 1
    assert lines(proc.stdout) == [(task_id, "echo", "queued", "0%", "-", "-", None)]
    assert proc.stderr == (
        f"martinet: error: 1 task(s) did not finish within 0.5 s ({task_id}); "
        "watch longer or check that a worker is running\n"
    )


def test_watch_by_name_follows_the_tasks_of_that_name_that_come_while_it_runs(
    sqlite_cluster: Cluster, background: Callable[..., Background]
) -> None:
    sqlite_cluster.start_worker("--concurrency", "4")
    first = submit(sqlite_cluster, "nap", {"seconds": 3})
    other = submit(sqlite_cluster, "steps", {"steps": 2, "seconds": 30})  # another name: not waited for
    later = sqlite_cluster.client.schedule("in 1 hour", {"name": "nap"})  # not due: not waited for
    watch = background(sqlite_cluster, "--name", "nap")
    watch.wait_for(f"task {first} (nap) running")
    joined = submit(sqlite_cluster, "nap", {"seconds": 2})
    assert watch.finish() == 0, watch.output()
    shown = lines(watch.output())
    assert {row[0] for row in shown} == {first, joined}, "the task that came while it ran joined; no other"
    assert [row[2] for row in shown if row[0] == joined][-1] == "succeeded"
    assert sqlite_cluster.client.status(joined)["status"] == "succeeded", "it waited for the one that joined"
    assert sqlite_cluster.client.status(other)["status"] == "running" and later not in {row[0] for row in shown}


def test_watch_status_running_follows_the_running_tasks(
    sqlite_cluster: Cluster, background: Callable[..., Background]
) -> None:
    assert ok(sqlite_cluster, "watch", "--status", "running") == "no tasks to watch\n"
    assert ok(sqlite_cluster, "watch", "--status", "running", "--json") == ""
    client = sqlite_cluster.client
    sqlite_cluster.start_worker("--concurrency", "2")
    client.wait(submit(sqlite_cluster, "echo"), TIMEOUT)  # finished before: not shown
    naps = [submit(sqlite_cluster, "nap", {"seconds": 3}) for _ in range(2)]
    wait_until(lambda: all(client.status(t)["status"] == "running" for t in naps), what="both naps to run")
    watch = background(sqlite_cluster, "--status", "running")
    for task_id in naps:
        watch.wait_for(f"task {task_id} (nap) running")
    client.cancel(naps[1])
    assert watch.finish() == 5, "one was cancelled: wait's exit code\n" + watch.output()
    shown = lines(watch.output())
    assert {row[0] for row in shown} == set(naps), "the running ones only"
    assert {row[0]: row[2] for row in shown} == {naps[0]: "succeeded", naps[1]: "cancelled"}, "their last lines"


def test_watch_usage_errors(sqlite_cluster: Cluster) -> None:
    for args in ((), ("1", "--name", "echo"), ("1", "--status", "running")):
        proc = run(sqlite_cluster, "watch", *args)
        assert proc.returncode == 2 and "give task ids, or --name and/or --status, not both" in proc.stderr
    proc = run(sqlite_cluster, "watch", "--status", "succeeded")
    expected = "'succeeded' is not one of 'waiting', 'scheduled', 'queued', 'running'"
    assert proc.returncode == 2 and expected in proc.stderr


# ---------------------------------------------------------------- stats


def test_stats_counts_a_known_workload(cluster: Cluster) -> None:
    client = cluster.client
    cluster.start_worker("--concurrency", "4")
    finished = [submit(cluster, "echo") for _ in range(3)] + [submit(cluster, "explode") for _ in range(2)]
    finished.append(client.schedule("in 1 hour", {"name": "nap"}))
    client.cancel(finished[-1])
    client.schedule("in 1 hour", {"name": "echo"})
    for task_id in finished:
        client.wait(task_id, TIMEOUT)

    stats = ok_json(cluster, "stats")
    assert stats["counts"] == {
        "waiting": 0, "scheduled": 1, "queued": 0, "running": 0, "succeeded": 3, "failed": 2, "cancelled": 1,
    }  # fmt: skip
    names = {entry["name"]: entry for entry in stats["names"]}
    assert set(names) == {"echo", "explode", "nap"}
    outcomes = ("succeeded", "failed", "cancelled")
    assert {name: tuple(entry[key] for key in outcomes) for name, entry in names.items()} == {
        "echo": (3, 0, 0),
        "explode": (0, 2, 0),
        "nap": (0, 0, 1),
    }
    assert names["nap"]["run_seconds"] == 0 and names["echo"]["run_seconds"] >= 0
    assert [sum(minute[key] for minute in stats["minutes"]) for key in outcomes] == [3, 2, 1]
    assert len(stats["minutes"]) == 60 and stats["queue_lag"] is None
    assert set(stats) == set(client.stats()) == {"counts", "minutes", "names", "queue_lag", "at"}

    text = ok(cluster, "stats").splitlines()
    assert text[0].split() == ["STATUS", "TASKS"]
    assert [row.split() for row in text[1:8]] == [
        ["waiting", "0"], ["scheduled", "1"], ["queued", "0"], ["running", "0"], ["succeeded", "3"], ["failed", "2"],
        ["cancelled", "1"],
    ]  # fmt: skip
    assert text[8:11] == ["queue lag: -", "", "finished in the last hour:"]
    assert text[11].split() == ["NAME", "SUCCEEDED", "FAILED", "CANCELLED", "PER_MIN", "MEAN_RUN"]
    rows = {row.split()[0]: row.split()[1:] for row in text[12:]}
    assert rows["echo"][:4] == ["3", "0", "0", "0.05"] and re.fullmatch(r"\d+\.\d{3}s", rows["echo"][4])
    assert rows["explode"][:4] == ["0", "2", "0", "0.03"]
    assert rows["nap"] == ["0", "0", "1", "0.02", "-"], "a cancelled task that never ran has no run time"


def test_stats_with_queued_tasks_shows_the_queue_lag(sqlite_cluster: Cluster) -> None:
    assert "no task finished" in ok(sqlite_cluster, "stats")
    submit(sqlite_cluster, "echo")  # no worker: it waits
    wait_until(lambda: (ok_json(sqlite_cluster, "stats")["queue_lag"] or 0) > 0.3, what="the queue lag to grow")
    text = ok(sqlite_cluster, "stats")
    assert re.search(r"^queue lag: \d+\.\ds$", text, re.MULTILINE), text
    assert re.search(r"^queued +1$", text, re.MULTILINE), text

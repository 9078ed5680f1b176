"""The server's Prometheus metrics, and ``GET /metrics``, which serves them in Prometheus' text format.

prometheus_client keeps and formats them (the official exposition format, which its parser reads back
in the tests), in a registry of this server's own, not the library's global one. What the server does
is counted once it is committed (``Store.after_commit``), so a transaction rolled back counts nothing:
the tasks made final (from the transaction's tally, tally.py), the run times and queue waits of
deliveries, and the scheduler's lateness. The pool times each commit (db.Pool); every port counts the
messages it rejects, by a reason from a fixed vocabulary (REJECTED), never the error's text. A scrape
reads no table: tasks by status come from ``Store.counts()``, workers and slots from the broker's memory.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from . import __version__
from .access import Role
from .status import TaskStatus
from .web import Request, Response, Route

if TYPE_CHECKING:
    from .broker import Broker
    from .store import Store

#: How a task can finish (the ``outcome`` label).
OUTCOMES = ("succeeded", "failed", "cancelled")
#: Task names that get series of their own; the tasks of any further name are counted as OTHER_NAME, so
#: that a client submitting ever new names cannot make the metrics grow without bound.
MAX_NAMES = 1000
OTHER_NAME = "_other"
#: Why each port rejects a message (the ``reason`` label): ProtocolError.reason on the ZeroMQ ports,
#: web.py's refusals on the HTTP port.
REJECTED: dict[str, tuple[str, ...]] = {
    "client": ("malformed", "bad_version", "unauthenticated"),
    "worker": ("malformed", "too_large", "bad_version", "unknown_command", "bad_body", "unauthenticated"),
    "status": ("malformed", "too_large", "bad_version", "bad_body", "bad_event", "unauthenticated"),
    "http": ("unauthenticated", "forbidden", "unknown_path", "bad_method", "malformed", "too_large"),
}
#: Histogram buckets, seconds: task run times and queue waits, the scheduler's lateness, commits.
_TASK_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
_LATENESS_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_COMMIT_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclasses.dataclass
class Observed:
    """What one transaction did that the histograms count, recorded once it has committed (:meth:`Metrics.record`)."""

    #: (name, seconds from its start to its worker's final event) of each delivery that ran to the end.
    run: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    #: (name, seconds from its run_at to its start) of each delivery that started.
    wait: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    #: Seconds after its planned time that the scheduler queued each due task or fired each recurring run.
    late: list[float] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.run or self.wait or self.late)


@dataclasses.dataclass
class _Named:
    """The series of one task name: its finished counters by outcome, its run time and queue wait histograms."""

    finished: dict[str, Any]
    run: _Series
    wait: _Series


class _Series:
    """One histogram series: how many observations fell in each bucket (not cumulative; +Inf last), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1  # a bucket holds what is <= its bound
        self.sum += amount


class _Histogram:
    """A histogram, by one label or none, that prometheus_client exposes (a HistogramMetricFamily per scrape).

    Kept as plain counts because it is observed for every task event: prometheus_client.Histogram takes
    a lock for each count and scans its bounds, about four times what this bisect costs. No lock is
    needed: the server is one thread, and a scrape reads the counts without yielding to another greenlet.
    """

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...], label: str | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = bounds
        self.label = label
        self._series: dict[str, _Series] = {}
        self._les = [floatToGoString(bound) for bound in bounds] + ["+Inf"]
        if label is None:
            self.series()

    def series(self, value: str = "") -> _Series:
        """The series of label value ``value`` (the only one without a label), made at its first use."""
        found = self._series.get(value)
        if found is None:
            found = self._series[value] = _Series(self.bounds)
        return found

    def observe(self, amount: float) -> None:
        """Observe ``amount`` in the histogram without a label."""
        self._series[""].observe(amount)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[] if self.label is None else [self.label])
        for value, series in self._series.items():
            buckets = list(zip(self._les, itertools.accumulate(series.counts), strict=True))
            family.add_metric([] if self.label is None else [value], buckets, series.sum)
        yield family


class Metrics:
    """Every metric of one server, in its own registry (``registry``)."""

    def __init__(self) -> None:
        # The _created series (when each series began) would double the series, for no use here.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        registry = self.registry
        self._finished = Counter(
            "martinet_tasks_finished", "Tasks this server made final, by name and outcome", ["name", "outcome"],
            registry=registry,
        )  # fmt: skip
        self._run = _Histogram(
            "martinet_task_run_seconds", "Run time of each delivery, from its start to its worker's final event",
            _TASK_BUCKETS, "name",
        )  # fmt: skip
        self._wait = _Histogram(
            "martinet_task_queue_wait_seconds", "Queue wait of each delivery, from its task's due time to its start",
            _TASK_BUCKETS, "name",
        )  # fmt: skip
        self._late = _Histogram(
            "martinet_scheduler_lateness_seconds",
            "How long after their planned time the scheduler queued due tasks and fired recurring runs",
            _LATENESS_BUCKETS,
        )
        self._rejected = Counter(
            "martinet_rejected_messages", "Messages refused on each port, by reason", ["port", "reason"],
            registry=registry,
        )  # fmt: skip
        self._commit = _Histogram(
            "martinet_store_commit_seconds", "Time each store transaction took to commit", _COMMIT_BUCKETS
        )
        for histogram in (self._run, self._wait, self._late, self._commit):
            registry.register(histogram)
        self._info = Info("martinet_server", "This server: its version, id and database", registry=registry)
        #: Time one commit took, seconds (db.Pool calls it).
        self.observe_commit: Callable[[float], None] = self._commit.observe
        self._named: dict[str, _Named] = {}
        # Every known reason shows from the start, at 0, so that a rate over it has a beginning.
        for port, reasons in REJECTED.items():
            for reason in reasons:
                self._rejected.labels(port, reason)

    def collect_from(self, store: Store, broker: Broker, held: Callable[[], int]) -> None:
        """Read at each scrape: tasks by status from ``store`` (cluster-wide), this server's workers from
        ``broker``, the status events its sink holds unwritten (``held``); and this server's info."""
        backend = store.pool.dialect.name
        self._info.info({"version": __version__, "server_id": store.server_id, "backend": backend})
        self.registry.register(_Scraped(store, broker, held))

    def rejected(self, port: str) -> Callable[[str], None]:
        """What counts a message ``port`` rejects, called with the reason (one of REJECTED[port])."""
        children = {reason: self._rejected.labels(port, reason) for reason in REJECTED[port]}
        return lambda reason: children[reason].inc()

    def finished(self, outcomes: dict[tuple[str, str], list[float]]) -> None:
        """Count the tasks a committed transaction made final: a tally's outcomes, (name, outcome) -> [count, ...]."""
        for (name, outcome), (count, _) in outcomes.items():
            self._series(name).finished[outcome].inc(count)

    def record(self, observed: Observed) -> None:
        """Count what a committed transaction did. Times below 0 (a worker's clock behind the server's) count as 0."""
        for name, seconds in observed.run:
            self._series(name).run.observe(max(seconds, 0.0))
        for name, seconds in observed.wait:
            self._series(name).wait.observe(max(seconds, 0.0))
        for seconds in observed.late:
            self._late.observe(max(seconds, 0.0))

    def _series(self, name: str) -> _Named:
        """The series of task ``name`` (those of OTHER_NAME past MAX_NAMES names), made at its first sight."""
        if name not in self._named and len(self._named) >= MAX_NAMES:
            name = OTHER_NAME
        series = self._named.get(name)
        if series is None:
            finished = {outcome: self._finished.labels(name, outcome) for outcome in OUTCOMES}
            series = self._named[name] = _Named(finished, self._run.series(name), self._wait.series(name))
        return series


class _Scraped:
    """The metrics read when scraped: tasks by status, this server's workers and slots, and its sink's backlog."""

    def __init__(self, store: Store, broker: Broker, held: Callable[[], int]) -> None:
        self.store = store
        self.broker = broker
        self.held = held

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.counts()
        tasks = GaugeMetricFamily(
            "martinet_tasks", "Tasks in the store by status (the whole cluster's)", labels=["status"]
        )
        for status in TaskStatus:
            tasks.add_metric([status.value], counts.get(status.value, 0))
        yield tasks
        workers = self.broker.records()
        # A worker's deliveries beyond its slots wait in its memory (prefetch): they keep no slot busy.
        busy = [min(worker["busy"], worker["slots"]) for worker in workers]
        for name, text, value in (
            ("martinet_workers", "Workers connected to this server", len(workers)),
            ("martinet_workers_busy", "Workers connected to this server running at least one task",
             sum(1 for slots in busy if slots)),
            ("martinet_slots", "Slots of the workers connected to this server", sum(w["slots"] for w in workers)),
            ("martinet_slots_busy", "Slots of the workers connected to this server running a task", sum(busy)),
            ("martinet_status_events_held", "Status events this server received and has not yet stored "
             "(they wait in its memory while the database is away)", self.held()),
        ):  # fmt: skip
            yield GaugeMetricFamily(name, text, value=value)


def routes(metrics: Metrics) -> list[Route]:
    """``GET /metrics``: the server's metrics in Prometheus' text format."""

    def scrape(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    return [Route("GET", "/metrics", scrape, Role.READ)]

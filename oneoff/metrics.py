"""Prometheus metrics: counters derived from the event log, gauges read when scraped.

Built by the daemon (one :class:`Metrics` per process, over a registry of its own) and
served by the API at ``/metrics``. It sits beside the scheduler and the worker pool and
never hooks their hot paths: every execution transition is already one row of the event
log, written in the transaction of the change, so the counters and histograms of runs
come from tailing that log (:func:`store.metric_events`) from the last ``seq`` seen — on
every scrape, and every few seconds by :meth:`Metrics.run`. A process starts at the log's
end, with counters at zero, as Prometheus expects of a restarted process (``rate()`` and
``increase()`` handle the reset).

Gauges (queue depth, jobs by state, busy and idle workers, the state file's size) are
read from the store and the pool at scrape time. Every read goes through a read-only
connection of its own (WAL readers never block the writer), so a scrape of 100,000 jobs
never holds the lock the scheduler and the workers write under. Reconcile passes and purges reach it
through the daemon's callbacks (:meth:`observe_reconcile`, :meth:`observe_purge`), API
requests through :class:`ApiRequests`, an ASGI middleware that labels a request with its
route template, never its raw path.

Labels are bounded: namespaces, executor types, statuses, priorities (1-10), source names
(one per manifest directory; every API field manager is ``api``), route templates. No job
name or run id is ever a label, and no label is called ``job`` (Prometheus would rename
it to ``exported_job``).

Webhook deliveries are counted from events ``delivery.<result>`` (``succeeded``,
``failed``, ``retrying``, ``dropped``), the contract for the webhooks module.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import threading
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oneoff.records import RunStatus
from oneoff.store import (
    MetricEvent,
    Store,
    job_state_counts,
    metric_events,
    queue_depth,
    state_file_bytes,
)

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

FINAL_STATUSES = (*(status.value for status in RunStatus if status.final), RunStatus.LOST.value)
"""What a run ends as; ``lost`` too, though an idempotent job retries it."""
JOB_STATES = ("suspended", "running", "waiting", "done")
PRIORITIES = range(1, 11)
DELIVERY_RESULTS = ("succeeded", "failed", "retrying", "dropped")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60, 300)
"""Dispatch lateness: a run on time starts within milliseconds of its time."""
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800,
                    3600, 7200, 21600)
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

TAIL_BATCH = 5000
"""Event seqs read per query."""
TAIL_SECONDS = 5.0


def source_label(source: str) -> str:
    """A reconcile source as a label: directories by name, every API field manager as
    ``api`` (field managers are chosen per request, so they are not bounded)."""
    return "api" if source.startswith("api:") else source


class Metrics:
    """Every OneOff metric, over one store; thread-safe (scrapes run in a thread pool).
    :meth:`close` it (it holds a read-only connection to the state file)."""

    def __init__(
        self,
        store: Store,
        workers: Callable[[], tuple[int, int]] = lambda: (0, 0),
        *,
        version: str | None = None,
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.store = Store(store.path, readonly=True)
        """Its own read-only connection to the state file."""
        self.workers = workers
        """(busy, pool size) of the worker pool."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._seq = self.store.last_event_seq()
        self._seen_types: set[tuple[str, str]] = set()
        r = self.registry
        self.executions = Counter(
            "oneoff_executions", "Executions that reached a final status.",
            ["namespace", "type", "status"], registry=r)
        self.duration = Histogram(
            "oneoff_execution_duration_seconds", "How long finished attempts ran.",
            ["type"], buckets=DURATION_BUCKETS, registry=r)
        self.lateness = Histogram(
            "oneoff_dispatch_lateness_seconds",
            "From a run's scheduled time to its first start.", buckets=LATENCY_BUCKETS,
            registry=r)
        self.missed = Counter(
            "oneoff_runs_missed", "Runs not started within their startingDeadlineSeconds.",
            registry=r)
        self.lost = Counter(
            "oneoff_runs_lost", "Runs that were running when the server stopped.", registry=r)
        self.retries = Counter(
            "oneoff_execution_retries", "Attempts that failed and will be retried.",
            ["type"], registry=r)
        self.reconcile_duration = Histogram(
            "oneoff_reconcile_duration_seconds", "Reconcile passes (read, plan, apply).",
            ["source"], buckets=RECONCILE_BUCKETS, registry=r)
        self.reconcile_errors = Counter(
            "oneoff_reconcile_errors", "Reconcile passes that ended with errors.",
            ["source"], registry=r)
        self.prune_blocked = Counter(
            "oneoff_prune_blocked", "Reconciles refused because they would prune too much.",
            ["source"], registry=r)
        self.deliveries = Counter(
            "oneoff_webhook_deliveries", "Webhook deliveries by result.", ["result"],
            registry=r)
        self.requests = Counter(
            "oneoff_api_requests", "API requests by method, route template and status.",
            ["method", "route", "status"], registry=r)
        self.purged = Counter(
            "oneoff_purged", "Rows deleted by retention (retention days, historyLimit).",
            ["what"], registry=r)
        self.build = Info("oneoff_build", "The running OneOff.", registry=r)
        self.build.info({"version": version or _version(),
                         "python": platform.python_version()})
        for result in DELIVERY_RESULTS:
            self.deliveries.labels(result)
        for what in ("executions", "events", "audit"):
            self.purged.labels(what)
        r.register(_Gauges(self))

    def close(self) -> None:
        self.store.close()

    # --- the event log -------------------------------------------------------------

    def tail(self) -> int:
        """Count the events written since the last call; returns the rows counted."""
        counted = 0
        with self._lock:
            last = self.store.last_event_seq()
            while self._seq < last:
                upto = min(self._seq + TAIL_BATCH, last)
                events = metric_events(self.store, self._seq, upto)
                self._observe(events)
                counted += len(events)
                self._seq = upto
        return counted

    def _observe(self, events: list[MetricEvent]) -> None:
        for event in events:
            if event.type.startswith("delivery."):
                result = event.type.removeprefix("delivery.")
                self.deliveries.labels(result if result in DELIVERY_RESULTS else "other").inc()
                continue
            status = event.type.removeprefix("execution.")
            type_ = event.run_type or "unknown"
            if status == "running":
                if event.attempt == 1 and event.lateness is not None:
                    self.lateness.observe(max(event.lateness, 0.0))
                continue
            if event.seconds is not None:  # the end of an attempt that ran
                self.duration.labels(type_).observe(max(event.seconds, 0.0))
            if status == "retrying":
                if event.attempt is not None:  # not an idempotent job's lost run
                    self.retries.labels(type_).inc()
                continue
            if event.namespace is None:
                continue
            self._known(event.namespace, type_)
            self.executions.labels(event.namespace, type_, status).inc()
            if status == RunStatus.MISSED:
                self.missed.inc()
            elif status == RunStatus.LOST:
                self.lost.inc()

    def _known(self, namespace: str, type_: str) -> None:
        """Every status of a (namespace, type) exists from its first run on, at zero, so
        ``increase()`` sees the first failure of a kind as a change."""
        if (namespace, type_) in self._seen_types:
            return
        self._seen_types.add((namespace, type_))
        for status in FINAL_STATUSES:
            self.executions.labels(namespace, type_, status)

    async def run(self, stop: asyncio.Event) -> None:
        """Tail the event log every few seconds until stopped, so a scrape stays short
        and nothing is lost to retention between scrapes."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.tail)
            except Exception:
                log.exception("reading the event log for metrics failed",
                              extra={"action": "metrics"})
            try:
                await asyncio.wait_for(stop.wait(), TAIL_SECONDS)
            except TimeoutError:
                pass

    # --- callbacks -----------------------------------------------------------------

    def observe_reconcile(self, source: str, seconds: float, *, failed: bool,
                          refused: bool) -> None:
        """After every reconcile pass (the daemon's ``on_applied``): how long it took,
        whether it ended with errors, whether a prune was refused."""
        source = source_label(source)
        self.reconcile_duration.labels(source).observe(seconds)
        if refused:
            self.prune_blocked.labels(source).inc()
        if failed:
            self.reconcile_errors.labels(source).inc()
        else:
            self.reconcile_errors.labels(source)
            self.prune_blocked.labels(source)

    def observe_purge(self, executions: int, events: int, audit: int) -> None:
        self.purged.labels("executions").inc(executions)
        self.purged.labels("events").inc(events)
        self.purged.labels("audit").inc(audit)

    def count_request(self, method: str, route: str, status: int) -> None:
        self.requests.labels(method if method in METHODS else "OTHER", route,
                             str(status)).inc()

    # --- exposition ----------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format, after catching up with the event log."""
        self.tail()
        return generate_latest(self.registry)


class _Gauges(Collector):
    """The gauges, read when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # read at scrape time; registering must not query the store

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        depth = GaugeMetricFamily("oneoff_queue_depth", "Runs due and waiting for a worker.",
                                  labels=["priority"])
        found = queue_depth(metrics.store)
        for priority in PRIORITIES:
            depth.add_metric([str(priority)], found.get(priority, 0))
        yield depth
        busy, size = metrics.workers()
        workers = GaugeMetricFamily("oneoff_workers", "Worker pool slots.", labels=["state"])
        workers.add_metric(["busy"], busy)
        workers.add_metric(["idle"], max(size - busy, 0))
        yield workers
        jobs = GaugeMetricFamily(
            "oneoff_jobs", "Jobs by state: suspended, running, waiting (a run is pending or "
            "queued), done (nothing left to run).", labels=["state"])
        counts = job_state_counts(metrics.store)
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("oneoff_state_file_bytes",
                                "The SQLite state file and its write-ahead log.",
                                value=state_file_bytes(metrics.store))


class ApiRequests:
    """ASGI middleware counting requests by method, route template and status.

    The router writes the matched route into the request's scope, so the label is the
    template (``/api/v1/executions/{run_id}``), never the raw path; a path no route
    matches is ``unmatched``.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.count_request(scope.get("method", "OTHER"), _route(scope), status)


def _route(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def _version() -> str:
    try:
        return metadata.version("oneoff")
    except metadata.PackageNotFoundError:
        return "unknown"

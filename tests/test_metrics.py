"""``/metrics`` in process: counters and histograms derived from the event log of a real
store (runs driven through the store's own transactions at chosen instants, so lateness
and durations are exact), gauges read at scrape time, request counts by route template,
and Debian's ``promtool check metrics`` on a real scrape."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import job_yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from oneoff.api import create_app
from oneoff.auth import KeyRing
from oneoff.daemon import sync_changed_jobs
from oneoff.metrics import Metrics
from oneoff.reconciler import DirectorySource, Reconciler
from oneoff.records import ObjectKey, RunStatus, Stored, isoformat
from oneoff.scheduler import Scheduler
from oneoff.store import Finish, Store

T0 = datetime(2026, 12, 24, 12, 0, tzinfo=UTC)

SHELL_JOB = """apiVersion: oneoff.dev/v1
kind: Job
metadata: {{name: {name}}}
spec:
  schedule: {{at: '2030-01-01T00:00:00Z'}}
  priority: {priority}
  suspend: {suspend}
  shell: {{command: [/bin/true]}}
"""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


@dataclass
class Harness:
    store: Store
    root: Path
    reconciler: Reconciler
    source: DirectorySource

    def job(self, name: str, priority: int = 5, suspend: bool = False) -> Stored:
        (self.root / f"{name}.yaml").write_text(SHELL_JOB.format(
            name=name, priority=priority, suspend=str(suspend).lower()))
        report = self.reconciler.reconcile(self.source)
        assert not report.issues, report.issues
        job = self.store.get(ObjectKey("Job", "default", name))
        assert job is not None
        return job

    def slot(self, job: Stored, at: datetime, deadline: float = 3600) -> str:
        with self.store.transaction(at - timedelta(minutes=1)) as tx:
            run_id = tx.add_run(job, isoformat(at), isoformat(at),
                                isoformat(at + timedelta(seconds=deadline)), "schedule")
        assert run_id is not None
        return run_id

    def queue(self, at: datetime) -> None:
        with self.store.transaction(at) as tx:
            tx.promote_due(isoformat(at))

    def run(self, job: Stored, at: datetime, late: float, ran: float, status: RunStatus
            ) -> str:
        """A run due at ``at``, started ``late`` s after, finished ``ran`` s later."""
        run_id = self.slot(job, at)
        start = at + timedelta(seconds=late)
        self.queue(start)
        with self.store.transaction(start) as tx:
            assert [c.id for c in tx.claim_many([run_id])] == [run_id]
        with self.store.transaction(start + timedelta(seconds=ran)) as tx:
            tx.finish_many([Finish(run_id, job.key.namespace, job.key.name, 1, status,
                                   0 if status is RunStatus.SUCCEEDED else 1, None, "", "",
                                   False, None)])
        return run_id


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    root = tmp_path / "jobs.d"
    root.mkdir()
    store = Store(str(tmp_path / "state.db"))
    source = DirectorySource(str(root))
    yield Harness(store, root, Reconciler(store, [source]), source)
    store.close()


def test_run_outcomes_lateness_and_durations_come_from_the_event_log(harness: Harness) -> None:
    job = harness.job("nightly")
    harness.run(job, T0, late=0.5, ran=2.0, status=RunStatus.SUCCEEDED)  # before the process
    metrics = Metrics(harness.store)
    harness.run(job, T0 + timedelta(hours=1), late=0.25, ran=3.0, status=RunStatus.SUCCEEDED)
    harness.run(job, T0 + timedelta(hours=2), late=1.5, ran=0.5, status=RunStatus.FAILED)
    harness.run(job, T0 + timedelta(hours=3), late=0.0, ran=7.0, status=RunStatus.TIMED_OUT)
    text = metrics.render().decode()

    def runs(status: str) -> float:
        return value(text, "oneoff_executions_total", namespace="default", type="shell",
                     status=status)

    # counted from the state at process start, as Prometheus expects of a new process
    assert (runs("succeeded"), runs("failed"), runs("timed_out")) == (1, 1, 1)
    assert runs("cancelled") == runs("missed") == runs("lost") == 0  # present, at zero
    assert value(text, "oneoff_dispatch_lateness_seconds_count") == 3
    assert value(text, "oneoff_dispatch_lateness_seconds_sum") == pytest.approx(1.75, abs=0.01)
    assert value(text, "oneoff_dispatch_lateness_seconds_bucket", le="0.25") == 2
    assert value(text, "oneoff_execution_duration_seconds_count", type="shell") == 3
    assert value(text, "oneoff_execution_duration_seconds_sum", type="shell") == pytest.approx(
        10.5, abs=0.01)
    # a second scrape counts nothing twice
    again = metrics.render().decode()
    assert value(again, "oneoff_executions_total", namespace="default", type="shell",
                 status="succeeded") == 1


def test_missed_and_lost_runs_are_counted(harness: Harness) -> None:
    job = harness.job("report")
    metrics = Metrics(harness.store)
    harness.slot(job, T0, deadline=10)
    harness.queue(T0 + timedelta(minutes=5))  # past its starting deadline: missed
    running = harness.slot(job, T0 + timedelta(hours=1))
    harness.queue(T0 + timedelta(hours=1))
    with harness.store.transaction(T0 + timedelta(hours=1)) as tx:
        tx.claim_many([running])
    with harness.store.transaction(T0 + timedelta(hours=2)) as tx:
        tx.recover_running()  # the server died while it ran
    text = metrics.render().decode()
    assert value(text, "oneoff_runs_missed_total") == 1
    assert value(text, "oneoff_runs_lost_total") == 1
    assert value(text, "oneoff_executions_total", namespace="default", type="shell",
                 status="missed") == 1
    assert value(text, "oneoff_executions_total", namespace="default", type="shell",
                 status="lost") == 1


def test_gauges_show_the_queue_by_priority_jobs_by_state_and_workers(harness: Harness) -> None:
    urgent = harness.job("urgent", priority=9)
    harness.job("paused", suspend=True)
    finished = harness.job("finished")
    harness.run(finished, T0, late=0, ran=1, status=RunStatus.SUCCEEDED)
    harness.slot(urgent, T0 + timedelta(minutes=1))
    harness.slot(urgent, T0 + timedelta(minutes=2))
    harness.queue(T0 + timedelta(minutes=3))
    text = Metrics(harness.store, lambda: (3, 8)).render().decode()
    assert value(text, "oneoff_queue_depth", priority="9") == 2
    assert value(text, "oneoff_queue_depth", priority="5") == 0
    assert value(text, "oneoff_workers", state="busy") == 3
    assert value(text, "oneoff_workers", state="idle") == 5
    assert value(text, "oneoff_jobs", state="waiting") == 1
    assert value(text, "oneoff_jobs", state="suspended") == 1
    assert value(text, "oneoff_jobs", state="done") == 1
    assert value(text, "oneoff_jobs", state="running") == 0
    assert value(text, "oneoff_state_file_bytes") > 0
    (info,) = [labels for (name, labels) in samples(text) if name == "oneoff_build_info"]
    assert dict(info)["version"] == "0.1.0"


def test_reconcile_and_purge_callbacks_are_counted_per_source(harness: Harness) -> None:
    metrics = Metrics(harness.store)
    metrics.observe_reconcile("dir:/srv/jobs.d", 0.02, failed=False, refused=False)
    metrics.observe_reconcile("dir:/srv/jobs.d", 0.03, failed=True, refused=True)
    metrics.observe_reconcile("api:tenant-4711", 0.01, failed=False, refused=False)
    metrics.observe_purge(12, 40, 3)
    text = metrics.render().decode()
    assert value(text, "oneoff_reconcile_duration_seconds_count", source="dir:/srv/jobs.d") == 2
    assert value(text, "oneoff_reconcile_errors_total", source="dir:/srv/jobs.d") == 1
    assert value(text, "oneoff_prune_blocked_total", source="dir:/srv/jobs.d") == 1
    # field managers are chosen per request: every one of them is the one source "api"
    assert value(text, "oneoff_reconcile_duration_seconds_count", source="api") == 1
    assert not any("tenant" in str(labels) for _, labels in samples(text))
    assert value(text, "oneoff_purged_total", what="executions") == 12
    assert value(text, "oneoff_purged_total", what="events") == 40
    assert value(text, "oneoff_purged_total", what="audit") == 3


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, Store, Path]]:
    root = tmp_path / "jobs.d"
    root.mkdir()
    (root / "ping.yaml").write_text(job_yaml("ping"))
    store = Store(str(tmp_path / "state.db"))
    scheduler = Scheduler(store, lambda item: None, lambda: 0, lambda uid: [],
                          lambda run_id: False)
    reconciler = Reconciler(store, [DirectorySource(str(root))],
                            on_applied=lambda report: sync_changed_jobs(store, scheduler, report))
    reconciler.reconcile(reconciler.sources[0])
    app = create_app(store, reconciler=reconciler, scheduler=scheduler, keys=KeyRing(store),
                     metrics=Metrics(store))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client, store, root
    store.close()


ALLOWED_LABELS = {"namespace", "type", "status", "priority", "state", "source", "result",
                  "method", "route", "what", "le", "version", "python"}


def test_api_requests_are_labelled_with_route_templates_never_raw_paths(
        client: tuple[TestClient, Store, Path]) -> None:
    api, _, _ = client
    for run_id in ("0123456789abcdef0001", "0123456789abcdef0002", "0123456789abcdef0003"):
        assert api.get(f"/api/v1/executions/{run_id}").status_code == 404
    assert api.post("/api/v1/namespaces/default/jobs/ping/run").status_code == 201
    assert api.get("/no/such/thing/4711").status_code == 404
    text = api.get("/metrics").text
    assert value(text, "oneoff_api_requests_total", method="GET",
                 route="/api/v1/executions/{run_id}", status="404") == 3
    assert value(text, "oneoff_api_requests_total", method="POST",
                 route="/api/v1/namespaces/{ns}/jobs/{name}/run", status="201") == 1
    assert value(text, "oneoff_api_requests_total", method="GET", route="unmatched",
                 status="404") == 1
    assert "0123456789abcdef" not in text and "4711" not in text and 'ping"' not in text
    labels = {name for (_, found) in samples(text) for name, _ in found}
    assert labels <= ALLOWED_LABELS and "job" not in labels


def test_metrics_route_answers_in_the_prometheus_text_format(
        client: tuple[TestClient, Store, Path]) -> None:
    api, _, _ = client
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE oneoff_executions_total counter" in response.text


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is missing (Debian package prometheus; scripts/test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_a_real_scrape_passes_promtool_check_metrics(
        client: tuple[TestClient, Store, Path]) -> None:
    api, _, _ = client
    api.post("/api/v1/namespaces/default/jobs/ping/run")
    api.get("/api/v1/executions/nope")
    scrape = api.get("/metrics").text
    result = subprocess.run([promtool(), "check", "metrics"], input=scrape, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr)

"""Retention: exactly what is older than the retention period (or beyond a job's
historyLimit) is purged, across the boundary, with a fake clock; audit rows and events
under the same period; purged counts exported; and the state file gives the space back."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families

from oneoff.daemon import Daemon
from oneoff.metrics import Metrics
from oneoff.reconciler import DirectorySource, Reconciler
from oneoff.records import ObjectKey, RunStatus, Stored, isoformat
from oneoff.scheduler import Scheduler
from oneoff.settings import Settings
from oneoff.store import (
    Finish,
    Store,
    page_audit,
    reclaim_space,
    record_audit,
    use_incremental_vacuum,
)

NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
BOUNDARY = NOW - timedelta(days=30)
MS = timedelta(milliseconds=1)

JOB = """apiVersion: oneoff.dev/v1
kind: Job
metadata: {{name: {name}}}
spec:
  schedule: {{at: '2030-01-01T00:00:00Z'}}
  shell: {{command: [/bin/true]}}{extra}
"""


@dataclass
class Clock:
    now: datetime = NOW

    def __call__(self) -> datetime:
        return self.now


@dataclass
class State:
    store: Store
    path: Path
    root: Path
    reconciler: Reconciler
    clock: Clock
    daemon: Daemon
    scheduler: Scheduler
    metrics: Metrics

    def job(self, name: str, extra: str = "") -> Stored:
        (self.root / f"{name}.yaml").write_text(JOB.format(name=name, extra=extra))
        assert not self.reconciler.reconcile(self.reconciler.sources[0]).issues
        job = self.store.get(ObjectKey("Job", "default", name))
        assert job is not None
        return job

    def finished(self, job: Stored, at: datetime, status: RunStatus = RunStatus.SUCCEEDED,
                 output: str = "") -> str:
        """A run that ran and finished at ``at`` (its events are written at ``at`` too)."""
        with self.store.transaction(at) as tx:
            run_id = tx.add_run(job, isoformat(at), isoformat(at),
                                isoformat(at + timedelta(hours=1)), "schedule")
            assert run_id is not None
            tx.promote_due(isoformat(at))
            tx.claim_many([run_id])
            tx.finish_many([Finish(run_id, "default", job.key.name, 1, status, 0, None, "",
                                   output, False, None)])
        return run_id

    def purge(self) -> None:
        self.daemon.purge(self.scheduler, self.store, self.metrics)

    def run_ids(self) -> set[str]:
        return {run.id for run in self.store.executions(limit=100_000)}


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    root = tmp_path / "jobs.d"
    root.mkdir()
    path = tmp_path / "state.db"
    store = Store(str(path))
    use_incremental_vacuum(store)
    clock = Clock()
    scheduler = Scheduler(store, lambda item: None, lambda: 0, lambda uid: [],
                          lambda run_id: False, clock=clock)
    reconciler = Reconciler(store, [DirectorySource(str(root))], clock=clock)
    daemon = Daemon(Settings(state=str(path), retention_days=30))
    yield State(store, path, root, reconciler, clock, daemon, scheduler, Metrics(store))
    store.close()


def test_purge_removes_exactly_what_is_older_than_the_retention_period(state: State) -> None:
    job = state.job("nightly", extra="\n  historyLimit: {succeeded: 100, failed: 100}")
    too_old = state.finished(job, BOUNDARY - MS)
    on_the_boundary = state.finished(job, BOUNDARY)
    just_inside = state.finished(job, BOUNDARY + MS)
    failed_too_old = state.finished(job, BOUNDARY - timedelta(days=1), RunStatus.FAILED)
    with state.store.transaction(BOUNDARY - timedelta(days=5)) as tx:  # never ran: kept
        waiting = tx.add_run(job, isoformat(BOUNDARY - timedelta(days=5)), isoformat(NOW),
                             "9999-12-31T00:00:00.000Z", "manual")
    for at, target in ((BOUNDARY - MS, "old"), (BOUNDARY, "edge"), (BOUNDARY + MS, "new")):
        record_audit(state.store, at, "alice", "cancel", target, {}, "127.0.0.1")
    events_before = {event.at for event in state.store.events(limit=100_000)}
    assert isoformat(BOUNDARY - MS) in events_before

    state.purge()

    assert state.run_ids() == {on_the_boundary, just_inside, waiting}
    assert too_old not in state.run_ids() and failed_too_old not in state.run_ids()
    entries, total = page_audit(state.store)
    assert total == 2 and {entry.target for entry in entries} == {"edge", "new"}
    kept = [event.at for event in state.store.events(limit=100_000)]
    assert kept and min(kept) >= isoformat(BOUNDARY)
    assert state.store.execution(too_old) is None

    # one more millisecond of time moves the boundary past the next run and audit row
    state.clock.now = NOW + MS
    state.purge()
    assert state.run_ids() == {just_inside, waiting}
    assert [entry.target for entry in page_audit(state.store)[0]] == ["new"]

    text = state.metrics.render().decode()
    purged = {s.labels["what"]: s.value for family in text_string_to_metric_families(text)
              for s in family.samples if s.name == "oneoff_purged_total"}
    assert purged["executions"] == 3 and purged["audit"] == 2 and purged["events"] > 0


def test_history_limit_keeps_the_newest_runs_of_each_outcome(state: State) -> None:
    job = state.job("chatty", extra="\n  historyLimit: {succeeded: 2, failed: 1}")
    ok = [state.finished(job, NOW - timedelta(hours=10 - i)) for i in range(5)]
    failed = [state.finished(job, NOW - timedelta(hours=5 - i), RunStatus.FAILED)
              for i in range(3)]
    state.purge()
    assert state.run_ids() == {*ok[-2:], failed[-1]}


def test_the_state_file_shrinks_after_purging_many_runs(state: State) -> None:
    job = state.job("bulky", extra="\n  historyLimit: {succeeded: 100000, failed: 100000}")
    for i in range(1500):
        state.finished(job, BOUNDARY - timedelta(days=1, minutes=i), output="x" * 4000)
    state.finished(job, NOW - timedelta(hours=1))
    checkpoint = sqlite3.connect(state.path)
    checkpoint.execute("PRAGMA busy_timeout=10000")  # the store checkpoints beside it

    def copy_log_back() -> None:  # retried: a checkpoint of the store's may be under way
        wait_until(lambda: checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                   == 0, timeout=10, every=0.05)

    copy_log_back()
    full = os.path.getsize(state.path)
    assert full > 6_000_000

    state.purge()  # purges, then gives the free pages back (incremental vacuum)
    copy_log_back()
    checkpoint.close()
    after = os.path.getsize(state.path)
    assert len(state.run_ids()) == 1
    assert after < full / 5, (full, after)
    assert reclaim_space(state.store) == 0  # nothing left to give back


def test_an_existing_state_file_is_switched_to_incremental_vacuum_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with Store(str(path)) as store:
        record_audit(store, NOW, "alice", "run", "Job default/ping", {"run": "r1"}, None)
    assert sqlite3.connect(path).execute("PRAGMA auto_vacuum").fetchone() == (0,)
    with Store(str(path)) as store:
        assert use_incremental_vacuum(store) is True
        assert use_incremental_vacuum(store) is False
        assert page_audit(store)[1] == 1  # the rewrite keeps everything
    assert sqlite3.connect(path).execute("PRAGMA auto_vacuum").fetchone() == (2,)

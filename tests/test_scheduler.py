"""Scheduler decisions against a real store, with a fake clock and a recording dispatcher."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from oneoff import scheduler as scheduler_module
from oneoff.manifests import Retry
from oneoff.reconciler import DirectorySource, Reconciler
from oneoff.records import RunStatus, Stored
from oneoff.scheduler import CLAIM_AHEAD, Scheduler
from oneoff.store import Dispatch, Finish, Store
from oneoff.worker import decide_retry

T0 = datetime(2026, 12, 24, 12, 0, tzinfo=UTC)


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class Harness:
    store: Store
    root: Path
    clock: Clock
    scheduler: Scheduler
    reconciler: Reconciler
    dispatched: list[Dispatch] = field(default_factory=list)
    active: dict[str, list[str]] = field(default_factory=dict)
    free: int = 8
    cancelled: list[str] = field(default_factory=list)

    def apply(self, name: str, text: str) -> None:
        (self.root / f"{name}.yaml").write_text(text)
        self.reconcile()

    def reconcile(self) -> None:
        report = self.reconciler.reconcile(self.reconciler.sources[0])
        assert not report.issues, report.issues
        changed: list[Stored] = []
        deleted: list[Stored] = []
        assert report.plan is not None
        for change in report.plan.changes:
            if change.action.value == "delete" and change.stored:
                deleted.append(change.stored)
            elif change.action.value in ("create", "update"):
                job = self.store.get(change.key)
                assert job is not None
                changed.append(job)
        self.scheduler.sync(changed, deleted)

    def runs(self, name: str) -> list[tuple[RunStatus, str]]:
        return [(run.status, run.scheduled_at) for run in
                reversed(self.store.executions("default", name))]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    root = tmp_path / "jobs.d"
    root.mkdir()
    clock = Clock()
    with Store(str(tmp_path / "state.db")) as store:
        reconciler = Reconciler(store, [DirectorySource(str(root))], clock=clock,
                                prune_max_share=1)
        holder: list[Harness] = []
        scheduler = Scheduler(
            store,
            dispatch=lambda item: holder[0].dispatched.append(item),
            capacity=lambda: holder[0].free - len(holder[0].dispatched),
            active_runs=lambda uid: holder[0].active.get(uid, []),
            cancel_running=lambda run_id: holder[0].cancelled.append(run_id) is None,
            clock=clock,
        )
        harness = Harness(store, root, clock, scheduler, reconciler)
        holder.append(harness)
        yield harness


def job(name: str, schedule: str, extra: str = "") -> str:
    return (
        "apiVersion: oneoff.dev/v1\nkind: Job\n"
        f"metadata: {{name: {name}}}\n"
        f"spec:\n  schedule: {schedule}\n  shell: {{script: 'true'}}\n{extra}"
    )


def tick(h: Harness) -> list[str]:
    items = h.scheduler.tick()
    h.dispatched.extend(items)
    return [item.run.name for item in items]


def test_an_at_job_gets_exactly_one_slot_however_often_it_is_synced(h: Harness) -> None:
    h.apply("ping", job("ping", "{at: '2026-12-24T13:00:00+01:00'}"))
    h.scheduler.sync()
    h.scheduler.sync()
    assert h.runs("ping") == [(RunStatus.PENDING, "2026-12-24T12:00:00.000Z")]


def test_a_due_run_is_dispatched_and_a_future_one_is_not(h: Harness) -> None:
    h.apply("now", job("now", "{at: now}"))
    h.apply("later", job("later", "{at: '2026-12-24T13:00:00Z'}"))
    assert tick(h) == ["now"]
    assert h.dispatched[0].run.attempt == 1
    assert h.runs("now")[0][0] is RunStatus.RUNNING
    assert h.scheduler._seconds_to_next_due() == 3600 - CLAIM_AHEAD.total_seconds()


def test_after_counts_from_first_seen_and_does_not_move(h: Harness) -> None:
    h.apply("later", job("later", "{after: 10m}"))
    h.clock.advance(minutes=5)
    h.apply("later", job("later", "{after: 10m}", "  priority: 7\n"))  # an edit
    assert h.runs("later") == [(RunStatus.PENDING, "2026-12-24T12:10:00.000Z")]


def test_dispatch_order_is_priority_then_due_time_then_creation(h: Harness) -> None:
    h.free = 3
    for name, priority, at in (("low", 1, "11:00"), ("high", 10, "11:59"), ("mid-b", 5, "11:30"),
                               ("mid-a", 5, "11:10")):
        h.apply(name, job(name, f"{{at: '2026-12-24T{at}:00Z'}}",
                          f"  priority: {priority}\n  startingDeadlineSeconds: 7200\n"))
    assert tick(h) == ["high", "mid-a", "mid-b"]
    h.free = 4
    assert tick(h) == ["low"]


def drain(h: Harness, free: int) -> list[str]:
    """Tick with ``free`` workers (runs never finish) until nothing more is dispatched."""
    names: list[str] = []
    while True:
        h.free = len(h.dispatched) + free
        got = tick(h)
        if not got:
            return names
        names += got


def test_a_burst_queued_over_several_passes_still_starts_in_priority_order(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler_module, "PROMOTE_BATCH", 4)
    docs = [job(f"b{i:02d}", "{at: '2026-12-24T11:59:00Z'}") for i in range(20)]
    docs.append(job("urgent", "{at: '2026-12-24T11:59:00Z'}", "  priority: 10\n"))
    h.apply("burst", "---\n".join(docs))
    names = drain(h, free=2)
    # the priority-10 run, created last, is not held back behind the first batch queued
    assert names == ["urgent"] + [f"b{i:02d}" for i in range(20)]  # each exactly once
    assert {h.runs(name)[0][0] for name in names} == {RunStatus.RUNNING}
    assert len({item.run.id for item in h.dispatched}) == 21


def test_a_run_due_meanwhile_overtakes_the_queue_when_its_priority_is_higher(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler_module, "PROMOTE_BATCH", 4)
    h.apply("burst", "---\n".join(job(f"b{i:02d}", "{at: '2026-12-24T11:59:00Z'}")
                                   for i in range(10)))
    h.free = 2
    assert tick(h) == ["b00", "b01"]
    h.apply("late", job("late", "{at: '2026-12-24T12:00:00Z'}", "  priority: 6\n"))
    assert drain(h, free=2) == ["late"] + [f"b{i:02d}" for i in range(2, 10)]


def test_more_missed_runs_than_one_pass_records_are_all_missed_and_none_starts(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler_module, "PROMOTE_BATCH", 3)
    docs = [job(f"old{i}", "{at: '2026-12-24T11:00:00Z'}", "  startingDeadlineSeconds: 60\n")
            for i in range(10)]
    h.apply("old", "---\n".join(docs))
    h.apply("now", job("now", "{at: now}"))
    assert tick(h) == ["now"]  # claimed in the first pass, with 7 still to be marked missed
    passes = 1
    while h.scheduler._seconds_to_next_due() == 0:  # what the loop does: pass again at once
        assert tick(h) == []
        passes += 1
    assert passes == 4
    assert [h.runs(f"old{i}") for i in range(10)] == [
        [(RunStatus.MISSED, "2026-12-24T11:00:00.000Z")]] * 10
    assert h.scheduler._seconds_to_next_due() is None


def test_a_due_run_of_a_suspended_job_lets_the_scheduler_sleep_until_its_deadline(
    h: Harness,
) -> None:
    h.apply("ping", job("ping", "{at: now}", "  suspend: true\n  startingDeadlineSeconds: 600\n"))
    assert tick(h) == []
    # not 0, which would make the loop pass again and again while the job stays suspended
    assert h.scheduler._seconds_to_next_due() == 600 - CLAIM_AHEAD.total_seconds()
    h.clock.advance(seconds=601)
    assert tick(h) == []
    assert h.runs("ping")[0][0] is RunStatus.MISSED


def test_store_work_runs_in_place_unless_another_thread_holds_the_store(h: Harness) -> None:
    ran_on: list[str] = []

    def work() -> None:
        h.store.next_due()  # needs the store
        ran_on.append(threading.current_thread().name)

    async def main() -> None:
        await h.store.call(work)  # nobody else holds it: right here, on the loop's thread
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with h.store.transaction(h.clock()):
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(10)
        beats = 0

        async def heartbeat() -> None:
            nonlocal beats
            while not release.is_set():
                beats += 1
                await asyncio.sleep(0.01)

        beating = asyncio.create_task(heartbeat())
        waiting = asyncio.create_task(h.store.call(work))  # a reconcile holds it: a thread
        await asyncio.sleep(0.1)
        assert not waiting.done()
        release.set()
        await waiting
        await beating
        holder.join()
        assert beats > 1  # the loop kept running while the work waited for the store

    asyncio.run(main())
    assert ran_on[0] == threading.main_thread().name
    assert ran_on[1] != threading.main_thread().name


def test_a_run_later_than_its_starting_deadline_is_missed(h: Harness) -> None:
    h.apply("old", job("old", "{at: '2026-12-24T11:00:00Z'}", "  startingDeadlineSeconds: 60\n"))
    assert tick(h) == []
    assert h.runs("old")[0][0] is RunStatus.MISSED


def test_editing_the_time_retimes_the_pending_run(h: Harness) -> None:
    h.apply("ping", job("ping", "{at: '2026-12-24T13:00:00Z'}"))
    h.apply("ping", job("ping", "{at: '2026-12-24T14:00:00Z'}"))
    assert h.runs("ping") == [
        (RunStatus.CANCELLED, "2026-12-24T13:00:00.000Z"),
        (RunStatus.PENDING, "2026-12-24T14:00:00.000Z"),
    ]


def test_deleting_a_job_cancels_its_pending_runs(h: Harness) -> None:
    h.apply("keep", job("keep", "{at: '2026-12-24T13:00:00Z'}"))
    h.apply("ping", job("ping", "{at: '2026-12-24T13:00:00Z'}"))
    (h.root / "ping.yaml").unlink()
    h.reconcile()
    assert h.runs("ping") == [(RunStatus.CANCELLED, "2026-12-24T13:00:00.000Z")]
    assert h.runs("keep")[0][0] is RunStatus.PENDING


def test_a_suspended_job_is_not_started(h: Harness) -> None:
    h.apply("ping", job("ping", "{at: now}", "  suspend: true\n"))
    assert tick(h) == []
    h.apply("ping", job("ping", "{at: now}", "  suspend: false\n"))
    assert tick(h) == ["ping"]


def test_each_new_run_requested_value_makes_exactly_one_run(h: Harness) -> None:
    def requested(value: str) -> str:
        return job("ping", "{at: '2026-12-25T00:00:00Z'}").replace(
            "metadata: {name: ping}",
            f"metadata: {{name: ping, annotations: {{oneoff.dev/run-requested-at: '{value}'}}}}")

    def requested_runs() -> int:
        return len([r for r in h.store.executions("default", "ping")
                    if r.reason == "run-requested"])

    h.apply("ping", requested("first"))  # present from the start: the baseline, no run
    assert requested_runs() == 0
    h.clock.advance(seconds=1)
    h.apply("ping", requested("second"))
    h.scheduler.sync()
    assert requested_runs() == 1
    h.clock.advance(seconds=1)
    h.apply("ping", requested("second"))
    h.scheduler.sync()
    assert requested_runs() == 1
    h.clock.advance(seconds=1)
    h.apply("ping", requested("third"))
    assert requested_runs() == 2


def test_cron_keeps_one_pending_slot_and_moves_on_after_dispatch(h: Harness) -> None:
    h.apply("tick", job("tick", "{cron: '*/15 * * * *'}"))
    assert h.runs("tick") == [(RunStatus.PENDING, "2026-12-24T12:15:00.000Z")]
    h.clock.advance(minutes=15)
    assert tick(h) == ["tick"]
    assert h.runs("tick") == [(RunStatus.RUNNING, "2026-12-24T12:15:00.000Z"),
                              (RunStatus.PENDING, "2026-12-24T12:30:00.000Z")]


def test_overlap_skip_records_a_skipped_run(h: Harness) -> None:
    h.apply("ping", job("ping", "{at: now}", "  overlapPolicy: Skip\n"))
    uid = h.store.objects("Job")[0].uid
    h.active[uid] = ["other-run"]
    assert tick(h) == []
    assert h.runs("ping")[0][0] is RunStatus.SKIPPED


def test_overlap_allow_all_runs_alongside(h: Harness) -> None:
    h.apply("ping", job("ping", "{at: now}", "  overlapPolicy: AllowAll\n"))
    h.active[h.store.objects("Job")[0].uid] = ["other-run"]
    assert tick(h) == ["ping"]


def test_overlap_cancel_other_cancels_the_active_run_first(h: Harness) -> None:
    h.apply("ping", job("ping", "{at: now}", "  overlapPolicy: CancelOther\n"))
    h.active[h.store.objects("Job")[0].uid] = ["other-run"]
    assert tick(h) == []
    assert h.cancelled == ["other-run"]
    h.active.clear()
    assert tick(h) == ["ping"]


def test_cancel_a_pending_run(h: Harness) -> None:
    h.apply("ping", job("ping", "{at: '2026-12-24T13:00:00Z'}"))
    run_id = h.store.executions("default", "ping")[0].id
    assert h.scheduler.cancel(run_id)
    assert h.runs("ping")[0][0] is RunStatus.CANCELLED
    assert not h.scheduler.cancel(run_id)  # already final


def test_crash_recovery_marks_running_lost_and_retries_only_idempotent(h: Harness) -> None:
    h.apply("plain", job("plain", "{at: now}"))
    h.apply("safe", job("safe", "{at: now}", "  idempotent: true\n"))
    assert sorted(tick(h)) == ["plain", "safe"]

    lost, retried = h.scheduler.recover()
    assert (len(lost), retried) == (2, 1)

    assert h.runs("plain")[0][0] is RunStatus.LOST
    assert h.runs("safe")[0][0] is RunStatus.PENDING
    h.dispatched.clear()
    assert tick(h) == ["safe"]
    assert h.dispatched[0].run.attempt == 2


def test_queued_runs_survive_recovery(h: Harness) -> None:
    h.free = 0
    h.apply("ping", job("ping", "{at: now}"))
    tick(h)
    assert h.runs("ping")[0][0] is RunStatus.QUEUED
    assert h.scheduler.recover() == ([], 0)
    h.free = 1
    assert tick(h) == ["ping"]


def test_retention_purges_what_is_past_history_limit(h: Harness) -> None:
    h.apply("ping", job("ping", "{at: now}", "  historyLimit: {succeeded: 1, failed: 1}\n"))
    for _ in range(3):
        h.scheduler.run_now(h.store.objects("Job")[0])
        h.dispatched.clear()
        h.clock.advance(seconds=1)
        tick(h)
        with h.store.transaction(h.clock()) as tx:
            tx.finish_many([
                Finish(item.run.id, item.run.namespace, item.run.name, item.run.attempt,
                       RunStatus.SUCCEEDED, 0, None, "", "", False, None)
                for item in h.dispatched
            ])
    finished = [r for r in h.store.executions("default", "ping") if r.finished_at]
    assert len(finished) >= 3
    h.scheduler.purge(retention_days=90)
    succeeded = [r for r in h.store.executions("default", "ping")
                 if r.status is RunStatus.SUCCEEDED]
    assert len(succeeded) == 1

    h.clock.advance(days=91)
    h.scheduler.purge(retention_days=90)
    assert [r for r in h.store.executions("default", "ping") if r.finished_at] == []


# --- the retry decision is pure -------------------------------------------------------


def retry_policy(**fields: float | bool) -> Retry:
    return Retry.model_validate({"limit": 3, "backoffSeconds": 10, "factor": 2,
                                 "maxBackoffSeconds": 25, "jitter": False, **fields})


def test_retry_backs_off_exponentially_up_to_the_cap() -> None:
    policy = retry_policy()
    delays = [decide_retry(RunStatus.FAILED, attempt, policy, 0, None).delay
              for attempt in (1, 2, 3)]
    assert delays == [10, 20, 25]
    assert not decide_retry(RunStatus.FAILED, 4, policy, 0, None).retry


def test_retry_jitter_stays_within_half_either_side() -> None:
    policy = retry_policy(jitter=True)
    low = decide_retry(RunStatus.FAILED, 1, policy, 0, None, rand=lambda: 0.0)
    high = decide_retry(RunStatus.FAILED, 1, policy, 0, None, rand=lambda: 1.0)
    assert (low.delay, high.delay) == (5, 15)


def test_cancelled_and_succeeded_runs_are_never_retried() -> None:
    policy = retry_policy()
    for status in (RunStatus.CANCELLED, RunStatus.SUCCEEDED):
        assert not decide_retry(status, 1, policy, 0, None).retry


def test_active_deadline_beats_retries() -> None:
    decision = decide_retry(RunStatus.TIMED_OUT, 1, retry_policy(), 55, 60)
    assert not decision.retry and "activeDeadlineSeconds" in decision.reason


def test_two_ad_hoc_runs_in_the_same_millisecond_both_run(h: Harness) -> None:
    h.apply("ping", job("ping", "{at: '2030-01-01T00:00:00Z'}", "  overlapPolicy: AllowAll\n"))
    stored = h.store.objects("Job")[0]
    first = h.scheduler.run_now(stored)
    second = h.scheduler.run_now(stored)  # the fake clock has not moved
    assert first != second
    slots = sorted(datetime.fromisoformat(run.scheduled_at)
                   for run in h.store.executions("default", "ping") if run.id in (first, second))
    assert slots[1] - slots[0] == timedelta(milliseconds=1)
    tick(h)
    assert sorted(item.run.id for item in h.dispatched) == sorted([first, second])

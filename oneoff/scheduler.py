"""Jobs → run slots → queued runs → claimed runs handed to the worker pool.

Called by the daemon: :meth:`Scheduler.sync` after every reconcile that changed objects
(and once on start), :meth:`Scheduler.run` as a task until stopped. It hands each claimed
run to the ``dispatch`` callback (the worker pool) and learns from ``capacity`` how many
more it may claim.

Run identity is the (job uid, scheduled time) slot, unique in the store, so syncing,
re-applying or restarting never creates a slot twice. The loop keeps nothing but the
earliest due time in memory: it asks the store (an index on status and due time) for
``MIN(due_at)``, sleeps exactly until then, and wakes early when a sync adds an earlier
run, a worker frees up, or it is stopped — there is no fixed polling tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from enum import StrEnum

from oneoff import triggers
from oneoff.errors import StoreError
from oneoff.manifests import RUN_REQUESTED_ANNOTATION, JobSpec, OverlapPolicy
from oneoff.records import RunStatus, Stored, isoformat, utcnow
from oneoff.store import Dispatch, JobState, Store, Transaction

log = logging.getLogger(__name__)

FAR_FUTURE = "9999-12-31T00:00:00.000Z"

CLAIM_AHEAD = timedelta(milliseconds=5)
"""Runs are claimed this much before their time and their worker waits for it: the
claim's write is done when the moment comes, so the start is on time."""

AD_HOC_SHIFTS = 1000
"""Milliseconds an ad-hoc run may move forward to find a slot no other run of its job holds."""

LONG_SLEEP = 0.05
EARLY_WAKE = 0.01
"""Sleeps longer than LONG_SLEEP seconds end this share early, then the rest is slept."""

PROMOTE_BATCH = 256
"""Due runs queued per pass at most. A burst of 10,000 is queued over a few dozen passes
that already claim, instead of in one transaction before the first claim."""

SPEC_CACHE = 8192
"""Validated job specs kept (about 2 KB each)."""

OVERLAP_LOOKAHEAD = 64
"""Queued runs a pass may look past when their overlap policy holds them back."""


class Scheduler:
    """Creates run slots from job schedules and dispatches due runs by priority."""

    def __init__(
        self,
        store: Store,
        dispatch: Callable[[Dispatch], None],
        capacity: Callable[[], int],
        active_runs: Callable[[str], list[str]],
        cancel_running: Callable[[str], bool],
        *,
        clock: Callable[[], datetime] = utcnow,
        recurring: bool = True,
    ) -> None:
        self.store = store
        self.dispatch = dispatch
        self.capacity = capacity
        self.active_runs = active_runs
        self.cancel_running = cancel_running
        self.clock = clock
        self.recurring = recurring
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._specs: dict[tuple[str, str], JobSpec] = {}

    def _spec(self, job: Stored) -> JobSpec:
        """The job's validated spec, cached by spec digest (dispatch reads it per run)."""
        key = (job.uid, job.spec_digest)
        spec = self._specs.get(key)
        if spec is None:
            if len(self._specs) >= SPEC_CACHE:
                # Drop the newest entry: a start syncs the jobs in the order their runs are
                # then dispatched, so what was cached first is what is asked for first.
                self._specs.popitem()
            spec = self._specs[key] = JobSpec.model_validate_json(job.spec_json)
        return spec

    def wake(self) -> None:
        """Look again now (a run was added, a worker freed up); safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    # --- slots -------------------------------------------------------------------------

    def sync(self, jobs: list[Stored] | None = None, deleted: Sequence[Stored] = ()) -> int:
        """Make sure every job's next slot exists and waiting runs match the job's spec.

        ``jobs`` defaults to every Job in the store (start); ``deleted`` jobs have their
        waiting runs cancelled. Returns how many runs were created. Blocking.
        """
        now = self.clock()
        created = 0
        if deleted:
            with self.store.transaction(now) as tx:
                for job in deleted:
                    for waiting in self.store.waiting_of_job(job.uid):
                        tx.set_run_status(waiting.id, waiting.status, RunStatus.CANCELLED,
                                          "the job was deleted")
                    tx.drop_job_state(job.uid)
        batches = (self.store.jobs_needing_sync() if jobs is None else
                   (jobs[i:i + 1000] for i in range(0, len(jobs), 1000)))
        for batch in batches:
            states = self.store.job_states(job.uid for job in batch)
            with self.store.transaction(now) as tx:
                for job in batch:
                    created += self._sync_job(tx, job, states.get(job.uid), now)
        if created:
            self.wake()
        return created

    def _sync_job(
        self, tx: Transaction, job: Stored, state: JobState | None, now: datetime
    ) -> int:
        spec = self._spec(job)
        requested = job.annotations.get(RUN_REQUESTED_ANNOTATION)
        if state is None:
            # a value present when the job first appears is the baseline, not a request
            state = JobState(job.uid, isoformat(now), run_requested_at=requested)
        first_seen = datetime.fromisoformat(state.first_seen_at)
        deadline = timedelta(seconds=spec.starting_deadline_seconds)
        waiting = self.store.waiting_of_job(job.uid)
        created = 0
        wanted: str | None = None
        if spec.schedule is not None and spec.schedule.cron is None:
            slot = triggers.one_time_slot(spec.schedule, first_seen)
            if slot is not None:
                wanted = isoformat(slot)
        elif spec.schedule is not None and spec.schedule.cron is not None and self.recurring:
            after = max(
                datetime.fromisoformat(state.last_slot) if state.last_slot else now,
                now - deadline,
            )
            slot = triggers.next_cron_slot(spec.schedule.cron, spec.schedule.time_zone, after)
            if not any(w.status is RunStatus.PENDING and w.reason == "schedule"
                       for w in waiting):
                wanted = isoformat(slot)
                state = replace(state, last_slot=wanted)
        for run in waiting:
            if run.attempt > 0:
                continue  # a retry waits for its backoff; the schedule does not move it
            if (wanted is not None and run.scheduled_at != wanted and run.reason == "schedule"
                    and spec.schedule is not None and spec.schedule.cron is None
                    and run.status is RunStatus.PENDING):
                # the one-time schedule changed: the old slot is replaced by the new one
                tx.set_run_status(run.id, run.status, RunStatus.CANCELLED,
                                  f"re-timed to {wanted} by generation {job.generation}")
            else:
                tx.retime_run(run.id, job, run.scheduled_at, isoformat(
                    datetime.fromisoformat(run.scheduled_at) + deadline))
        if wanted is not None:
            due = datetime.fromisoformat(wanted)
            if tx.add_run(job, wanted, wanted, isoformat(due + deadline), "schedule"):
                created += 1
        if triggers.run_request_slot(requested, state.run_requested_at, now) is not None:
            if tx.add_run(job, isoformat(now), isoformat(now), isoformat(now + deadline),
                          "run-requested"):
                created += 1
            state = replace(state, run_requested_at=requested)
        tx.set_job_state(replace(state, generation=job.generation))
        return created

    def run_now(self, job: Stored, reason: str = "manual",
                also: Callable[[Transaction, str], None] | None = None) -> str:
        """An ad-hoc run of ``job``, due now (``oneoff run``); the caller has checked its
        overlapPolicy. ``also`` writes more (the audit row) in the same transaction.

        An ad-hoc run has no slot of its own: when another run of the job already holds
        this millisecond (two requests at once), it takes the next free one."""
        now = self.clock()
        spec = self._spec(job)
        deadline = timedelta(seconds=spec.starting_deadline_seconds)
        with self.store.transaction(now) as tx:
            for shift in range(AD_HOC_SHIFTS):
                at = now + timedelta(milliseconds=shift)
                run_id = tx.add_run(job, isoformat(at), isoformat(at),
                                    isoformat(at + deadline), reason)
                if run_id is not None:
                    break
            else:
                raise StoreError(f"no free slot for an ad-hoc run of {job.key} within "
                                 f"{AD_HOC_SHIFTS} ms of {isoformat(now)}")
            if also is not None:
                also(tx, run_id)
        self.wake()
        return run_id

    def cancel(self, run_id: str) -> bool:
        """Cancel a pending, queued or running run; False if it had already finished."""
        found = self.store.execution(run_id)
        if found is None:
            return False
        status = found[0].status
        if status in (RunStatus.PENDING, RunStatus.QUEUED):
            with self.store.transaction(self.clock()) as tx:
                if tx.set_run_status(run_id, status, RunStatus.CANCELLED, "cancelled"):
                    return True
            found = self.store.execution(run_id)  # it moved on meanwhile
            status = found[0].status if found else status
        return status is RunStatus.RUNNING and self.cancel_running(run_id)

    def recover(self) -> tuple[list[str], int]:
        """On start: runs left running by a crash become lost; idempotent jobs retry them.

        Queued runs stay queued (they never started). Returns (lost run ids, retried).
        """
        retried = 0
        with self.store.transaction(self.clock()) as tx:
            lost = tx.recover_running()
            for run_id, job_uid, _ in lost:
                job = self.store.by_uid(job_uid)
                if job is not None and self._spec(job).idempotent:
                    tx.retry_lost(run_id)
                    retried += 1
        if lost:
            log.warning("%d run(s) were running when the server stopped: marked lost, %d "
                        "retried (idempotent jobs)", len(lost), retried,
                        extra={"action": "recover"})
        return [run_id for run_id, _, _ in lost], retried

    def purge(self, retention_days: float) -> tuple[int, int]:
        """Drop finished runs beyond retention or their job's historyLimit, and old events."""
        now = self.clock()
        with self.store.transaction(now) as tx:
            runs, events = tx.purge(isoformat(now - timedelta(days=retention_days)))
        if runs or events:
            log.info("purged %d execution(s) and %d event(s)", runs, events,
                     extra={"action": "purge", "executions": runs, "events": events})
        return runs, events

    # --- the loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Queue due runs and dispatch them, sleeping until the next due time."""
        self._loop = asyncio.get_running_loop()
        while not stop.is_set():
            self._wake.clear()
            try:
                dispatched, delay = await self.store.call(self._pass)
                for item in dispatched:
                    self.dispatch(item)  # on the loop thread: the pool starts tasks
            except Exception:
                log.exception("scheduler tick failed", extra={"action": "schedule"})
                delay = 1.0
            if delay == 0:
                await asyncio.sleep(0)  # the pass may have run right here: let others run
                continue
            if delay is not None and delay > LONG_SLEEP:
                # wake a little early and sleep the rest again: a timer overshoots in
                # proportion to its length (1.2 ms a second on the benchmark's VM)
                delay -= max(0.001, delay * EARLY_WAKE)
            waiters = [asyncio.ensure_future(self._wake.wait()),
                       asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    def _pass(self) -> tuple[list[Dispatch], float | None]:
        """One tick and the time to sleep after it, in one trip to the store's thread."""
        return self.tick(), self._seconds_to_next_due()

    def _seconds_to_next_due(self) -> float | None:
        """Seconds until the earliest pending run, or None if there is none.

        Queued runs waiting for a worker are looked at again when a worker frees up.
        """
        due = self.store.next_due()
        if due is None:
            return None
        wait = datetime.fromisoformat(due) - self.clock() - CLAIM_AHEAD
        return max(0.0, wait.total_seconds())

    def tick(self) -> list[Dispatch]:
        """One pass: due runs → queued (or missed), then claim as many as workers are free.

        Returns the claimed runs; the caller hands them to ``dispatch``. Blocking.
        """
        now = self.clock()
        free = self.capacity()
        dispatched: list[Dispatch] = []
        with self.store.transaction(now) as tx:
            missed, queued = tx.promote_due(tx.now, isoformat(now + CLAIM_AHEAD),
                                            limit=PROMOTE_BATCH)
            if missed:
                log.warning("%d run(s) missed their starting deadline", missed,
                            extra={"action": "schedule"})
            if free <= 0:
                return []
            selected: list[tuple[str, Stored, JobSpec]] = []
            looked = kept = 0  # candidates looked at; those of them still queued
            while len(selected) < free and looked < free + OVERLAP_LOOKAHEAD:
                # Only as many jobs as could start are read: usually exactly ``free``.
                want = free - len(selected)
                candidates = self.store.queued_candidates(tx.now, want, offset=kept)
                for run_id, _, job in candidates:
                    looked += 1
                    if job is None:
                        tx.set_run_status(run_id, RunStatus.QUEUED, RunStatus.CANCELLED,
                                          "the job was deleted")
                        continue
                    spec = self._spec(job)
                    admission = self._admit(tx, run_id, job, spec, [s[1].uid for s in selected])
                    if admission is Admission.START:
                        selected.append((run_id, job, spec))
                    if admission is not Admission.SKIPPED:
                        kept += 1  # still in the queue, where the next read starts
                if len(candidates) < want:
                    break  # the queue is empty
            by_run = {run_id: (job, spec) for run_id, job, spec in selected}
            dispatched = [
                Dispatch(claimed, *by_run[claimed.id])
                for claimed in tx.claim_many([run_id for run_id, _, _ in selected])
            ]
            if queued or dispatched:
                cron_jobs = {d.job.uid: d.job for d in dispatched if d.spec.schedule is not None
                             and d.spec.schedule.cron is not None}
                states = self.store.job_states(cron_jobs) if cron_jobs else {}
                for uid, job in cron_jobs.items():
                    self._sync_job(tx, job, states.get(uid), now)
        return dispatched

    def _admit(
        self, tx: Transaction, run_id: str, job: Stored, spec: JobSpec,
        selected_jobs: list[str],
    ) -> Admission:
        """Whether ``run_id`` may start now; records a skip or cancels per overlapPolicy.

        ``selected_jobs`` are the job uids already chosen in this pass (they count as
        active).
        """
        active = self.active_runs(job.uid) + ["(starting)" for uid in selected_jobs
                                              if uid == job.uid]
        if not active or spec.overlap_policy is OverlapPolicy.ALLOW_ALL:
            return Admission.START
        policy = spec.overlap_policy
        if policy is OverlapPolicy.SKIP:
            tx.set_run_status(run_id, RunStatus.QUEUED, RunStatus.SKIPPED,
                              f"skipped: run {active[0]} of this job was still active "
                              "(overlapPolicy Skip)")
            return Admission.SKIPPED
        if policy is OverlapPolicy.CANCEL_OTHER:
            for other in active:
                self.cancel_running(other)
        elif policy is OverlapPolicy.BUFFER_ONE:
            waiting = [w.id for w in self.store.waiting_of_job(job.uid)
                       if w.status is RunStatus.QUEUED and w.id != run_id]
            if waiting and min(waiting) < run_id:
                tx.set_run_status(run_id, RunStatus.QUEUED, RunStatus.SKIPPED,
                                  "skipped: one run is already buffered (overlapPolicy BufferOne)")
                return Admission.SKIPPED
        return Admission.WAIT


class Admission(StrEnum):
    """What a pass does with a queued run, given its job's overlapPolicy."""

    START = "start"
    WAIT = "wait"
    """Stays queued until the job's active run is over."""
    SKIPPED = "skipped"

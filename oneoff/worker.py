"""The priority worker pool: runs claimed attempts, decides retries, records outcomes.

Called by the daemon: the scheduler hands each claimed run to :meth:`WorkerPool.start`
(in priority order, only as many as :meth:`WorkerPool.capacity` allows), and the pool
tells the scheduler through ``on_free`` when a slot frees up. An attempt runs in its own
asyncio task, so cancelling the task is cancelling the run: the executor stops the work
completely (see ``executors``) and the pool records ``cancelled``.

The retry policy is a pure decision (:func:`decide_retry`) returning a
:class:`RetryDecision`; a retry sends the run back to ``pending`` with its next due time
and the scheduler picks it up again. ``activeDeadlineSeconds`` bounds all attempts
together and beats retries; cancelled runs are never retried.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from oneoff.executors import (
    Cancelled,
    Executor,
    Outcome,
    OutcomeStatus,
    RunContext,
    ValueSourceError,
    resolve_env,
)
from oneoff.manifests import Retry
from oneoff.records import RunStatus, isoformat, utcnow
from oneoff.store import Dispatch, Finish, Store

log = logging.getLogger(__name__)

OUTPUT_LIMITS = {"http": 64 * 1024}
DEFAULT_OUTPUT_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Whether a finished attempt gets another one, and after how long."""

    retry: bool
    delay: float = 0.0
    reason: str = ""


def decide_retry(
    status: RunStatus,
    attempt: int,
    policy: Retry,
    elapsed: float,
    active_deadline: float | None,
    rand: Callable[[], float] = random.random,
) -> RetryDecision:
    """Pure: should attempt number ``attempt`` (1-based), which ended in ``status``, retry?"""
    if status not in (RunStatus.FAILED, RunStatus.TIMED_OUT):
        return RetryDecision(False, reason=f"{status} is not retried")
    if attempt > policy.limit:
        return RetryDecision(False, reason=f"retry limit {policy.limit} reached")
    delay = min(policy.backoff_seconds * policy.factor ** (attempt - 1),
                policy.max_backoff_seconds)
    if policy.jitter:
        delay *= 0.5 + rand()  # ±50%
    if active_deadline is not None and elapsed + delay >= active_deadline:
        return RetryDecision(False, reason="activeDeadlineSeconds would pass before a retry")
    return RetryDecision(True, delay, f"attempt {attempt + 1} in {delay:.1f}s")


_STATUS = {
    OutcomeStatus.SUCCEEDED: RunStatus.SUCCEEDED,
    OutcomeStatus.FAILED: RunStatus.FAILED,
    OutcomeStatus.TIMED_OUT: RunStatus.TIMED_OUT,
}


class WorkerPool:
    """At most ``size`` attempts at once, each in its own task."""

    def __init__(
        self,
        store: Store,
        size: int,
        executors: Mapping[str, Executor],
        *,
        on_free: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = utcnow,
        kill_grace: float = 10.0,
        environ: Mapping[str, str] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.size = size
        self.executors = executors
        self.on_free = on_free
        self.clock = clock
        self.kill_grace = kill_grace
        self.environ = environ
        self.rand = rand
        self._tasks: dict[str, tuple[asyncio.Task[None], str]] = {}
        self._by_job: dict[str, dict[str, None]] = {}
        """Run ids in ``_tasks`` by job uid (the scheduler asks for each run it claims)."""
        self._cancel_reasons: dict[str, str] = {}
        self._finished: list[tuple[_Finished, asyncio.Future[None]]] = []
        self._writing = False
        self._writer: asyncio.Task[None] | None = None
        self._live: dict[str, bytearray] = {}
        """Output of running attempts so far, by run id (``live_output``)."""
        self._unrecorded: set[asyncio.Task[None]] = set()
        """Attempt tasks until their outcome is committed (what shutdown waits for)."""

    def capacity(self) -> int:
        return self.size - len(self._tasks)

    def busy(self) -> int:
        return len(self._tasks)

    def active_runs(self, job_uid: str) -> list[str]:
        return list(self._by_job.get(job_uid, ()))

    def live_output(self, run_id: str) -> str | None:
        """What a running attempt has printed so far; None if it is not running here."""
        buffer = self._live.get(run_id)
        return None if buffer is None else buffer.decode("utf-8", errors="replace")

    def start(self, item: Dispatch) -> None:
        task = asyncio.create_task(self._execute(item), name=f"run {item.run.id}")
        self._tasks[item.run.id] = (task, item.job.uid)
        self._by_job.setdefault(item.job.uid, {})[item.run.id] = None
        self._unrecorded.add(task)
        task.add_done_callback(self._unrecorded.discard)

    def cancel(self, run_id: str, reason: str = "cancelled") -> bool:
        """Cancel a running attempt; thread-safe. False if this pool is not running it."""
        entry = self._tasks.get(run_id)
        if entry is None:
            return False
        self._cancel_reasons.setdefault(run_id, reason)
        task = entry[0]
        task.get_loop().call_soon_threadsafe(task.cancel)
        return True

    async def shutdown(self, grace: float) -> None:
        """Let running attempts finish for up to ``grace`` seconds, then cancel the rest.

        Returns once every attempt, finished or cancelled, is recorded.
        """
        if self._tasks:
            log.info("waiting up to %.0fs for %d running job(s)", grace, len(self._tasks),
                     extra={"action": "shutdown"})
            await asyncio.wait([task for task, _ in self._tasks.values()], timeout=grace)
        for run_id, (task, _) in list(self._tasks.items()):
            self._cancel_reasons.setdefault(run_id, "cancelled: the server shut down")
            task.cancel()
        if self._unrecorded:
            await asyncio.wait(list(self._unrecorded))

    # --- one attempt ---------------------------------------------------------------

    async def _execute(self, item: Dispatch) -> None:
        run, spec = item.run, item.spec
        early = (datetime.fromisoformat(run.due_at) - self.clock()).total_seconds()
        if early > 0:
            await asyncio.sleep(early)  # claimed a moment ahead (scheduler.CLAIM_AHEAD)
        started = datetime.fromisoformat(run.started_at)
        elapsed = (self.clock() - started).total_seconds()
        remaining = (spec.active_deadline_seconds - elapsed
                     if spec.active_deadline_seconds is not None else None)
        timeout = _min(spec.timeout_seconds, remaining)
        extra = {"action": "run", "job": run.name, "namespace": run.namespace,
                 "run_id": run.id, "attempt": run.attempt}
        log.debug("started", extra=extra)
        status: RunStatus
        try:
            outcome = await self._attempt(item, timeout)
            status = _STATUS[outcome.status]
        except asyncio.CancelledError as exc:
            partial = exc.outcome if isinstance(exc, Cancelled) else Outcome(OutcomeStatus.FAILED)
            outcome = Outcome(OutcomeStatus.FAILED, output=partial.output,
                              truncated=partial.truncated,
                              error=self._cancel_reasons.pop(run.id, "cancelled"))
            status = RunStatus.CANCELLED
        except Exception as exc:  # a bug in an executor must not kill the pool
            log.exception("executor crashed", extra=extra)
            outcome = Outcome(OutcomeStatus.FAILED, error=f"internal error: {exc}")
            status = RunStatus.FAILED
        try:
            elapsed = (self.clock() - started).total_seconds()
            decision = decide_retry(status, run.attempt, spec.retry, elapsed,
                                    spec.active_deadline_seconds, self.rand)
            if (status is RunStatus.TIMED_OUT and remaining is not None
                    and timeout == remaining and not outcome.error.startswith("active")):
                outcome = Outcome(outcome.status, outcome.exit_code, outcome.http_status,
                                  outcome.output, outcome.truncated,
                                  "activeDeadlineSeconds reached")
                decision = RetryDecision(False, reason="activeDeadlineSeconds reached")
            retry_at = (isoformat(self.clock() + timedelta(seconds=decision.delay))
                        if decision.retry else None)
            # The slot is free once the attempt is over; the write joins the next group
            # commit while the scheduler already claims the next run.
            self._release(run.id)
            await self._record(_Finished(item, status, outcome, retry_at))
            log.info("%s%s", status, f", retry: {decision.reason}" if decision.retry else "",
                     extra={**extra, "status": status.value, "error": outcome.error})
        finally:
            self._cancel_reasons.pop(run.id, None)
            self._release(run.id)

    def _release(self, run_id: str) -> None:
        """Free the slot of ``run_id`` (once) and tell the scheduler."""
        entry = self._tasks.pop(run_id, None)
        if entry is None:
            return
        runs = self._by_job[entry[1]]
        del runs[run_id]
        if not runs:
            del self._by_job[entry[1]]
        self.on_free()

    async def _attempt(self, item: Dispatch, limit: float | None) -> Outcome:
        run, spec = item.run, item.spec
        executor = self.executors.get(run.type)
        if executor is None:
            return Outcome(OutcomeStatus.FAILED,
                           error=f"the {run.type} executor is not available in this server")
        try:
            env = resolve_env(spec.env, self.environ)
        except ValueSourceError as exc:
            return Outcome(OutcomeStatus.FAILED, error=f"env {exc}")
        ctx = RunContext(
            run_id=run.id, job=run.name, namespace=run.namespace,
            scheduled_at=datetime.fromisoformat(run.scheduled_at), attempt=run.attempt,
            env=env, timeout=limit, kill_grace=self.kill_grace,
            output_limit=OUTPUT_LIMITS.get(run.type, DEFAULT_OUTPUT_LIMIT),
            on_output=self._live.setdefault(run.id, bytearray()).extend,
        )
        try:
            return await executor.run(getattr(spec, run.type), ctx)
        finally:
            self._live.pop(run.id, None)

    async def _record(self, finished: _Finished) -> None:
        """Record an attempt's end; returns once it is committed.

        Attempts that end while a write is in progress are committed together in the next
        transaction (group commit): one commit per batch instead of one per run.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._finished.append((finished, future))
        if not self._writing:
            self._writing = True
            self._writer = asyncio.create_task(self._write_batches())
        await future

    async def _write_batches(self) -> None:
        try:
            while self._finished:
                batch, self._finished = self._finished, []
                try:
                    await self.store.call(functools.partial(self._write, [f for f, _ in batch]))
                except Exception as exc:
                    for _, future in batch:
                        future.set_exception(exc)
                else:
                    for _, future in batch:
                        future.set_result(None)
        finally:
            self._writing = False

    def _write(self, batch: list[_Finished]) -> None:
        with self.store.transaction(self.clock()) as tx:
            tx.finish_many([
                Finish(
                    run_id=done.item.run.id, namespace=done.item.run.namespace,
                    name=done.item.run.name, attempt=done.item.run.attempt,
                    status=done.status, exit_code=done.outcome.exit_code,
                    http_status=done.outcome.http_status, error=done.outcome.error,
                    output=done.outcome.output, truncated=done.outcome.truncated,
                    retry_at=done.retry_at,
                )
                for done in batch
            ])


@dataclass(frozen=True, slots=True)
class _Finished:
    """An ended attempt waiting to be written."""

    item: Dispatch
    status: RunStatus
    outcome: Outcome
    retry_at: str | None


def _min(a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return max(0.0, min(values)) if values else None


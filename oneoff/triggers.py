"""When a job is due: ``at`` / ``after`` / ``cron`` and the run-requested annotation → UTC slots.

Called by the scheduler (and by ``diff`` / the UI to show next fire times); hands back
plain UTC instants that the scheduler turns into run slots keyed by (job, scheduled time).
Pure: no I/O and no clock reads; "now" and the moment a job was first seen are always
parameters, so every decision here is reproducible in a test.

One-time triggers count from fixed instants: ``at`` is its own instant, ``at: now`` and
``after`` count from ``first_seen``, which the scheduler records in the job's status the
first time it sees the job, so a restart or resync never moves the run.

Cron and daylight saving time
-----------------------------
A cron expression is evaluated on the wall clock of the job's ``timeZone`` (default
UTC) and each fire time is mapped to one UTC instant:

* A wall-clock time that occurs twice (clocks go back, e.g. 02:00-02:59 on
  2026-10-25 in Europe/Berlin) runs **once, at its first occurrence** (``fold=0``).
  No slot fires during the second pass of the repeated hour: ``30 2 * * *`` runs at
  02:30 CEST (00:30 UTC) only; ``30 * * * *`` runs at 02:30 CEST and next at 03:30 CET,
  two real hours later; ``*/15 * * * *`` runs 02:45 CEST (00:45 UTC), then 03:00 CET
  (02:00 UTC).
* A wall-clock time that does not exist (clocks go forward, e.g. 02:00-02:59 on
  2026-03-29 in Europe/Berlin) runs at **the next valid instant**, the moment the clocks
  jump (03:00 local). Every slot inside the gap maps to that instant and they count as
  one run: ``30 2 * * *`` runs at 03:00 CEST (01:00 UTC) that day and at 02:30 the next;
  ``*/15 * * * *`` runs once at 03:00 and then at 03:15.

So the UTC fire times of a cron job are strictly increasing and never repeat. croniter
alone (7.x, given an aware start) fires a repeated time twice, once per occurrence; it
already moves a skipped time to the jump. This module therefore iterates croniter on
*naive* wall-clock times and does the mapping to UTC itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

from oneoff.manifests import Schedule, parse_duration

__all__ = [
    "CronRule",
    "cron_slots_between",
    "describe",
    "next_cron_slot",
    "one_time_slot",
    "run_request_slot",
    "starting_deadline_passed",
]


def _require_aware(moment: datetime, name: str) -> datetime:
    """``moment`` in UTC; a naive datetime is a programming error, not a local time."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {moment.isoformat()}")
    return moment.astimezone(UTC)


# --- one-time triggers ---------------------------------------------------------------


def one_time_slot(schedule: Schedule, first_seen: datetime) -> datetime | None:
    """The single due instant (UTC) of an ``at`` or ``after`` schedule; None for cron.

    ``at: <instant>`` is that instant, ``at: now`` is ``first_seen``, ``after: <d>`` is
    ``first_seen + d``. ``first_seen`` is the moment the scheduler first saw the object,
    as recorded in its status.
    """
    first_seen = _require_aware(first_seen, "first_seen")
    if schedule.at == "now":
        return first_seen
    if schedule.at is not None:
        return schedule.at.astimezone(UTC)
    if schedule.after is not None:
        return first_seen + parse_duration(schedule.after)
    return None


# --- cron ----------------------------------------------------------------------------


def _wall_clock_fires(expression: str, start: datetime) -> Iterator[datetime]:
    """Naive wall-clock fire times of ``expression`` strictly after naive ``start``.

    The only place croniter is touched. Ends when croniter finds no match within its
    search window (50 years), i.e. for an expression such as ``0 0 30 2 *``.
    """
    iterator = croniter(expression, start)
    while True:
        try:
            fire = iterator.get_next(datetime)
        except CroniterBadDateError:
            return
        if not isinstance(fire, datetime):  # pragma: no cover - croniter contract
            raise TypeError(f"croniter returned {fire!r}")
        yield fire


def _transition_instant(zone: ZoneInfo, before: datetime, after: datetime) -> datetime:
    """The first UTC instant in (before, after] whose offset is that of ``after``.

    Used to find where the clocks jump forward: zoneinfo exposes no transition list,
    and a gap is at most a few hours, so bisection to the second takes ~15 steps.
    """
    target = after.astimezone(zone).utcoffset()
    low, high = int(before.timestamp()), int(after.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, UTC).astimezone(zone).utcoffset() == target:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


def _wall_to_utc(wall: datetime, zone: ZoneInfo) -> datetime:
    """Map a naive wall-clock time in ``zone`` to UTC by the DST rule of this module."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first  # exists once, or twice and fold=0 is the first occurrence
    # The wall time falls in a gap: fold=0 reads it with the offset before the jump,
    # fold=1 with the offset after; the jump lies between the two readings.
    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    return _transition_instant(zone, min(first, second), max(first, second))


@lru_cache(maxsize=4096)
def _is_five_field_cron(cron: str) -> bool:
    """Cached: croniter's own check costs as much as finding the next slot."""
    return len(cron.split()) == 5 and bool(croniter.is_valid(cron))


@dataclass(frozen=True, slots=True)
class CronRule:
    """A five-field cron expression bound to the IANA zone it is evaluated in."""

    expression: str
    zone: ZoneInfo

    @classmethod
    def parse(cls, cron: str, time_zone: str = "UTC") -> CronRule:
        """Check ``cron`` and ``time_zone``; ``ValueError`` with a readable message if bad."""
        if not _is_five_field_cron(cron):
            raise ValueError(
                f"{cron!r} is not a five-field cron expression (minute hour day month weekday)"
            )
        try:
            zone = ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{time_zone!r} is not an IANA time zone") from None
        return cls(cron, zone)

    def slots_after(self, after: datetime) -> Iterator[datetime]:
        """Fire times in UTC strictly after ``after``, strictly increasing, unbounded.

        Ends only if the expression never fires again (then the iterator is empty).
        """
        last = _require_aware(after, "after")
        # Starting at the wall-clock reading of ``after`` cannot skip a slot: the
        # mapping wall → UTC is non-decreasing, and earlier walls map to <= ``after``.
        start = last.astimezone(self.zone).replace(tzinfo=None, fold=0)
        try:
            for wall in _wall_clock_fires(self.expression, start):
                slot = _wall_to_utc(wall, self.zone)
                if slot > last:  # drops the repeated hour's second pass and gap duplicates
                    last = slot
                    yield slot
        except CroniterBadCronError as error:  # pragma: no cover - parse() checked it
            raise ValueError(f"{self.expression!r}: {error}") from None


def next_cron_slot(cron: str, time_zone: str, after: datetime) -> datetime:
    """The first fire time of ``cron`` in ``time_zone`` strictly after ``after``, in UTC.

    Raises ``ValueError`` for a bad expression or zone, or for an expression that never
    fires again (e.g. ``0 0 30 2 *``).
    """
    for slot in CronRule.parse(cron, time_zone).slots_after(after):
        return slot
    raise ValueError(f"cron {cron!r} never fires after {after.isoformat()}")


def cron_slots_between(
    cron: str, time_zone: str, start: datetime, end: datetime, limit: int
) -> list[datetime]:
    """Fire times in UTC with ``start < slot <= end``, oldest first, at most ``limit``.

    The half-open window chains: pass the last slot handled as ``start`` and "now" as
    ``end`` to catch up after downtime without handling a slot twice.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    end = _require_aware(end, "end")
    slots: list[datetime] = []
    if limit == 0:
        return slots
    for slot in CronRule.parse(cron, time_zone).slots_after(start):
        if slot > end:
            break
        slots.append(slot)
        if len(slots) >= limit:
            break
    return slots


# --- run requests and deadlines ------------------------------------------------------


def run_request_slot(
    annotation_value: str | None, previous: str | None, now: datetime
) -> datetime | None:
    """One new run due ``now`` when ``oneoff.dev/run-requested-at`` has a new value.

    The value is an opaque token (a timestamp is conventional, but it is never read as a
    due time): any non-empty value different from ``previous`` asks for exactly one run,
    due at ``now``; an unchanged, empty or missing value asks for nothing. Surrounding
    whitespace is ignored. The caller must persist the value it acted on and pass it as
    ``previous`` next time, in the same transaction as the run it creates; deduplicating
    the slot itself (run identity = job + scheduled time) is also the caller's job.
    """
    now = _require_aware(now, "now")
    value = (annotation_value or "").strip()
    if not value or value == (previous or "").strip():
        return None
    return now


def starting_deadline_passed(due: datetime, now: datetime, deadline_seconds: int) -> bool:
    """True if a run due at ``due`` is more than ``deadline_seconds`` late at ``now``.

    Exactly at the deadline is still in time; such a run is started, a later one is
    recorded as missed.
    """
    lateness = _require_aware(now, "now") - _require_aware(due, "due")
    return lateness > timedelta(seconds=deadline_seconds)


# --- display -------------------------------------------------------------------------


def describe(schedule: Schedule) -> str:
    """A short human description: ``at 2026-12-24 14:00 UTC``, ``after 10m``, ``cron …``."""
    if schedule.at == "now":
        return "now (when first seen)"
    if schedule.at is not None:
        moment = schedule.at.astimezone(UTC)
        shape = "%Y-%m-%d %H:%M:%S" if moment.second or moment.microsecond else "%Y-%m-%d %H:%M"
        return f"at {moment.strftime(shape)} UTC"
    if schedule.after is not None:
        return f"after {schedule.after.strip()}"
    if schedule.cron is not None:
        return f"cron {' '.join(schedule.cron.split())} ({schedule.time_zone})"
    return "no schedule"

"""Triggers: when a job's runs are due, in UTC, including across daylight saving time.

Pure functions, so no store and no clock: every test passes the moment the job was first
seen, or "now", and checks the instant a user would see as the run's scheduled time.
DST cases use the real zoneinfo rules of Europe/Berlin (last Sundays of March and
October 2026) and America/New_York (2026-03-08 and 2026-11-01).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise
from typing import Any

import pytest

from oneoff.manifests import Schedule
from oneoff.triggers import (
    CronRule,
    cron_slots_between,
    describe,
    next_cron_slot,
    one_time_slot,
    run_request_slot,
    starting_deadline_passed,
)

BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"
FIRST_SEEN = datetime(2026, 5, 4, 9, 15, 30, tzinfo=UTC)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def schedule(**fields: Any) -> Schedule:
    return Schedule.model_validate(fields)


def slots(cron: str, zone: str, start: datetime, end: datetime) -> list[datetime]:
    return cron_slots_between(cron, zone, start, end, limit=10_000)


# --- at / after ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("2026-12-24T15:00:00+01:00", utc(2026, 12, 24, 14, 0)),
        ("2026-12-24T09:00:00-05:00", utc(2026, 12, 24, 14, 0)),
        ("2026-12-24T14:00:00Z", utc(2026, 12, 24, 14, 0)),
        ("2026-07-01T05:30:00+05:30", utc(2026, 7, 1, 0, 0)),
    ],
)
def test_at_with_an_offset_is_due_at_that_instant_in_utc(written: str, expected: datetime) -> None:
    due = one_time_slot(schedule(at=written), FIRST_SEEN)
    assert due == expected
    assert due is not None and due.utcoffset() == timedelta(0)


def test_at_ignores_when_the_job_was_first_seen() -> None:
    at = schedule(at="2026-12-24T14:00:00Z")
    assert one_time_slot(at, FIRST_SEEN) == one_time_slot(at, FIRST_SEEN + timedelta(days=3))


def test_at_now_is_due_when_the_job_was_first_seen() -> None:
    assert one_time_slot(schedule(at="now"), FIRST_SEEN) == FIRST_SEEN


def test_first_seen_in_another_offset_is_returned_in_utc() -> None:
    seen = datetime(2026, 5, 4, 11, 15, 30, tzinfo=timezone(timedelta(hours=2)))
    due = one_time_slot(schedule(at="now"), seen)
    assert due == FIRST_SEEN
    assert due is not None and due.tzinfo is UTC


@pytest.mark.parametrize(
    ("after", "delay"),
    [
        ("10m", timedelta(minutes=10)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("90s", timedelta(seconds=90)),
        ("2d", timedelta(days=2)),
    ],
)
def test_after_counts_from_first_seen(after: str, delay: timedelta) -> None:
    assert one_time_slot(schedule(after=after), FIRST_SEEN) == FIRST_SEEN + delay


def test_after_does_not_move_when_the_scheduler_restarts() -> None:
    # The scheduler passes the recorded first_seen again after a restart, not "now".
    after = schedule(after="1h")
    assert one_time_slot(after, FIRST_SEEN) == one_time_slot(after, FIRST_SEEN)


def test_cron_has_no_one_time_slot() -> None:
    assert one_time_slot(schedule(cron="0 3 * * *"), FIRST_SEEN) is None


def test_naive_first_seen_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        one_time_slot(schedule(after="10m"), datetime(2026, 5, 4, 9, 0))


# --- cron: simple cases and time zones -----------------------------------------------


def test_cron_next_slot_is_strictly_after_the_given_instant() -> None:
    assert next_cron_slot("0 3 * * *", "UTC", utc(2026, 5, 4, 2, 59)) == utc(2026, 5, 4, 3, 0)
    assert next_cron_slot("0 3 * * *", "UTC", utc(2026, 5, 4, 3, 0)) == utc(2026, 5, 5, 3, 0)


def test_cron_next_slot_rounds_up_from_seconds() -> None:
    after = datetime(2026, 5, 4, 3, 0, 0, 1, tzinfo=UTC)
    assert next_cron_slot("* * * * *", "UTC", after) == utc(2026, 5, 4, 3, 1)


def test_cron_weekdays_skip_the_weekend() -> None:
    friday = utc(2026, 5, 8, 4, 0)
    assert next_cron_slot("0 3 * * 1-5", "UTC", friday) == utc(2026, 5, 11, 3, 0)  # Monday


def test_cron_every_fifteen_minutes() -> None:
    got = slots("*/15 * * * *", "UTC", utc(2026, 5, 4, 10, 7), utc(2026, 5, 4, 11, 0))
    assert got == [utc(2026, 5, 4, 10, 15), utc(2026, 5, 4, 10, 30), utc(2026, 5, 4, 10, 45),
                   utc(2026, 5, 4, 11, 0)]  # fmt: skip


def test_cron_is_evaluated_in_the_job_time_zone() -> None:
    after = utc(2026, 1, 10, 0, 0)
    assert next_cron_slot("0 3 * * *", "UTC", after) == utc(2026, 1, 10, 3, 0)
    assert next_cron_slot("0 3 * * *", BERLIN, after) == utc(2026, 1, 10, 2, 0)  # CET +1
    assert next_cron_slot("0 3 * * *", NEW_YORK, after) == utc(2026, 1, 10, 8, 0)  # EST -5


def test_cron_follows_summer_time_offset() -> None:
    after = utc(2026, 7, 10, 0, 0)
    assert next_cron_slot("0 3 * * *", BERLIN, after) == utc(2026, 7, 10, 1, 0)  # CEST +2
    assert next_cron_slot("0 3 * * *", NEW_YORK, after) == utc(2026, 7, 10, 7, 0)  # EDT -4


def test_cron_local_day_differs_from_the_utc_day() -> None:
    # Monday 00:30 in Berlin is still Sunday in UTC.
    got = next_cron_slot("30 0 * * 1", BERLIN, utc(2026, 5, 9, 0, 0))
    assert got == utc(2026, 5, 10, 22, 30)


def test_cron_slot_is_returned_in_utc() -> None:
    got = next_cron_slot("0 3 * * *", BERLIN, utc(2026, 1, 10, 0, 0))
    assert got.tzinfo is UTC


def test_cron_after_given_in_another_offset_is_the_same_instant() -> None:
    after = datetime(2026, 1, 10, 1, 0, tzinfo=timezone(timedelta(hours=1)))  # 00:00 UTC
    assert next_cron_slot("0 3 * * *", BERLIN, after) == utc(2026, 1, 10, 2, 0)


def test_cron_crosses_the_year_boundary() -> None:
    assert next_cron_slot("0 0 1 1 *", "UTC", utc(2026, 12, 31, 23, 59)) == utc(2027, 1, 1)
    assert next_cron_slot("59 23 31 12 *", "UTC", utc(2027, 1, 1)) == utc(2027, 12, 31, 23, 59)


def test_cron_new_year_in_berlin_is_the_previous_day_in_utc() -> None:
    assert next_cron_slot("0 0 1 1 *", BERLIN, utc(2026, 6, 1)) == utc(2026, 12, 31, 23, 0)


def test_cron_on_february_29_finds_the_next_leap_year() -> None:
    assert next_cron_slot("0 0 29 2 *", "UTC", utc(2026, 1, 1)) == utc(2028, 2, 29)
    assert next_cron_slot("0 0 29 2 *", "UTC", utc(2028, 2, 29)) == utc(2032, 2, 29)


def test_cron_that_never_fires_is_an_error() -> None:
    with pytest.raises(ValueError, match="never fires"):
        next_cron_slot("0 0 30 2 *", "UTC", utc(2026, 1, 1))
    assert slots("0 0 30 2 *", "UTC", utc(2026, 1, 1), utc(2030, 1, 1)) == []


@pytest.mark.parametrize("cron", ["0 3 * *", "0 3 * * * 0", "61 3 * * *", "@daily", "nope"])
def test_bad_cron_expression_is_refused(cron: str) -> None:
    with pytest.raises(ValueError, match="five-field cron"):
        next_cron_slot(cron, "UTC", utc(2026, 1, 1))


def test_unknown_time_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="IANA"):
        next_cron_slot("0 3 * * *", "Mars/Olympus", utc(2026, 1, 1))


# --- cron: daylight saving time ------------------------------------------------------


def test_spring_forward_skipped_time_runs_at_the_jump_in_berlin() -> None:
    # 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 does not exist.
    got = slots("30 2 * * *", BERLIN, utc(2026, 3, 28, 12), utc(2026, 3, 30, 12))
    assert got == [
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST, the next valid instant
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST the next day, as usual
    ]


def test_spring_forward_slots_inside_the_gap_run_once() -> None:
    got = slots("*/15 * * * *", BERLIN, utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 30))
    assert got == [
        utc(2026, 3, 29, 0, 45),  # 01:45 CET
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST: the gap's 02:00..02:45 and 03:00 itself, once
        utc(2026, 3, 29, 1, 15),
        utc(2026, 3, 29, 1, 30),
    ]


def test_spring_forward_hourly_job_runs_at_the_jump_and_on_schedule() -> None:
    got = slots("30 * * * *", BERLIN, utc(2026, 3, 29, 0, 0), utc(2026, 3, 29, 2, 0))
    assert got == [
        utc(2026, 3, 29, 0, 30),  # 01:30 CET
        utc(2026, 3, 29, 1, 0),  # 02:30 does not exist -> 03:00 CEST
        utc(2026, 3, 29, 1, 30),  # 03:30 CEST
    ]


def test_fall_back_repeated_time_runs_once_at_the_first_occurrence_in_berlin() -> None:
    # 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
    got = slots("30 2 * * *", BERLIN, utc(2026, 10, 24, 12), utc(2026, 10, 26, 12))
    assert got == [
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST, the first occurrence; not 01:30 UTC too
        utc(2026, 10, 26, 1, 30),  # 02:30 CET the next day
    ]


def test_fall_back_next_slot_from_inside_the_second_pass_goes_to_the_next_day() -> None:
    # After the first 02:30 has run, the second 02:30 (01:30 UTC) is not a slot.
    next_day = utc(2026, 10, 26, 1, 30)  # 02:30 CET
    assert next_cron_slot("30 2 * * *", BERLIN, utc(2026, 10, 25, 0, 30)) == next_day
    assert next_cron_slot("30 2 * * *", BERLIN, utc(2026, 10, 25, 1, 0)) == next_day


def test_fall_back_hourly_job_does_not_repeat_the_wall_clock_hour() -> None:
    got = slots("30 * * * *", BERLIN, utc(2026, 10, 24, 23, 0), utc(2026, 10, 25, 3, 0))
    assert got == [
        utc(2026, 10, 24, 23, 30),  # 01:30 CEST
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 2, 30),  # 03:30 CET: the second 02:30 (01:30 UTC) is not run
    ]


def test_fall_back_every_fifteen_minutes_has_no_duplicates_and_increases() -> None:
    got = slots("*/15 * * * *", BERLIN, utc(2026, 10, 24, 22, 0), utc(2026, 10, 25, 4, 0))
    assert got == sorted(set(got))
    assert all(earlier < later for earlier, later in pairwise(got))
    local = [slot.astimezone(CronRule.parse("* * * * *", BERLIN).zone) for slot in got]
    walls = [moment.strftime("%H:%M") for moment in local]
    assert len(walls) == len(set(walls))  # every wall-clock slot once
    assert utc(2026, 10, 25, 0, 45) in got  # 02:45 CEST
    assert utc(2026, 10, 25, 1, 0) not in got  # second 02:00 (CET)
    assert utc(2026, 10, 25, 1, 45) not in got  # second 02:45 (CET)
    assert utc(2026, 10, 25, 2, 0) in got  # 03:00 CET
    assert len(got) == 6 * 4 - 4  # six UTC hours minus the second pass of 02:xx


def test_new_york_spring_forward_skipped_time_runs_at_three() -> None:
    # 2026-03-08: 02:00 EST becomes 03:00 EDT.
    got = slots("30 2 * * *", NEW_YORK, utc(2026, 3, 7, 12), utc(2026, 3, 9, 12))
    assert got == [
        utc(2026, 3, 8, 7, 0),  # 03:00 EDT
        utc(2026, 3, 9, 6, 30),  # 02:30 EDT
    ]


def test_new_york_fall_back_repeated_time_runs_once() -> None:
    # 2026-11-01: 02:00 EDT becomes 01:00 EST; 01:30 happens twice.
    got = slots("30 1 * * *", NEW_YORK, utc(2026, 10, 31, 12), utc(2026, 11, 2, 12))
    assert got == [
        utc(2026, 11, 1, 5, 30),  # 01:30 EDT, the first occurrence
        utc(2026, 11, 2, 6, 30),  # 01:30 EST
    ]


def test_new_york_fall_back_every_minute_is_strictly_increasing() -> None:
    got = slots("* * * * *", NEW_YORK, utc(2026, 11, 1, 4, 0), utc(2026, 11, 1, 8, 0))
    assert all(earlier < later for earlier, later in pairwise(got))
    assert len(got) == 4 * 60 - 60  # the repeated hour runs once


def test_time_zone_without_dst_is_unaffected() -> None:
    got = slots("30 2 * * *", "Asia/Tokyo", utc(2026, 3, 28), utc(2026, 3, 30))
    assert got == [utc(2026, 3, 28, 17, 30), utc(2026, 3, 29, 17, 30)]


# --- cron_slots_between --------------------------------------------------------------


def test_slots_between_is_half_open() -> None:
    got = slots("0 * * * *", "UTC", utc(2026, 5, 4, 1), utc(2026, 5, 4, 3))
    assert got == [utc(2026, 5, 4, 2), utc(2026, 5, 4, 3)]


def test_slots_between_stops_at_the_limit() -> None:
    got = cron_slots_between("* * * * *", "UTC", utc(2026, 5, 4), utc(2026, 5, 5), limit=3)
    assert got == [utc(2026, 5, 4, 0, 1), utc(2026, 5, 4, 0, 2), utc(2026, 5, 4, 0, 3)]
    assert cron_slots_between("* * * * *", "UTC", utc(2026, 5, 4), utc(2026, 5, 5), 0) == []


def test_slots_between_chained_windows_cover_each_slot_once() -> None:
    start, middle, end = utc(2026, 10, 24, 22), utc(2026, 10, 25, 0, 40), utc(2026, 10, 25, 4)
    first, second = (
        slots("*/15 * * * *", BERLIN, start, middle),
        slots("*/15 * * * *", BERLIN, middle, end),
    )
    assert first + second == slots("*/15 * * * *", BERLIN, start, end)


def test_slots_between_agrees_with_next_slot() -> None:
    after = utc(2026, 3, 28, 22)
    got = slots("*/20 * * * *", BERLIN, after, utc(2026, 3, 29, 3))
    chained: list[datetime] = []
    moment = after
    for _ in got:
        moment = next_cron_slot("*/20 * * * *", BERLIN, moment)
        chained.append(moment)
    assert chained == got


def test_slots_between_refuses_a_negative_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        cron_slots_between("* * * * *", "UTC", utc(2026, 5, 4), utc(2026, 5, 5), -1)


# --- run-requested-at ----------------------------------------------------------------

NOW = utc(2026, 5, 4, 12, 0)


def test_run_request_with_a_new_value_is_one_run_due_now() -> None:
    assert run_request_slot("2026-05-04T11:00:00Z", None, NOW) == NOW
    assert run_request_slot("2", "1", NOW) == NOW


def test_run_request_value_is_not_read_as_a_due_time() -> None:
    assert run_request_slot("2030-01-01T00:00:00+00:00", "old", NOW) == NOW


def test_run_request_unchanged_value_asks_for_nothing() -> None:
    assert run_request_slot("2026-05-04T11:00:00Z", "2026-05-04T11:00:00Z", NOW) is None
    assert run_request_slot(" v1 ", "v1", NOW) is None


@pytest.mark.parametrize("value", [None, "", "   "])
def test_run_request_empty_or_missing_value_asks_for_nothing(value: str | None) -> None:
    assert run_request_slot(value, None, NOW) is None
    assert run_request_slot(value, "v1", NOW) is None


# --- starting deadline ---------------------------------------------------------------


def test_starting_deadline_exactly_reached_is_not_missed() -> None:
    due = utc(2026, 5, 4, 12, 0)
    assert not starting_deadline_passed(due, due + timedelta(seconds=3600), 3600)
    assert starting_deadline_passed(due, due + timedelta(seconds=3600, microseconds=1), 3600)


def test_starting_deadline_on_time_or_early_is_not_missed() -> None:
    due = utc(2026, 5, 4, 12, 0)
    assert not starting_deadline_passed(due, due, 0)
    assert not starting_deadline_passed(due, due - timedelta(minutes=5), 0)
    assert starting_deadline_passed(due, due + timedelta(seconds=1), 0)


def test_starting_deadline_compares_instants_across_offsets() -> None:
    due = utc(2026, 5, 4, 12, 0)
    now = datetime(2026, 5, 4, 14, 30, tzinfo=timezone(timedelta(hours=2)))  # 12:30 UTC
    assert not starting_deadline_passed(due, now, 1800)
    assert starting_deadline_passed(due, now, 1799)


# --- describe ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"at": "2026-12-24T15:00:00+01:00"}, "at 2026-12-24 14:00 UTC"),
        ({"at": "2026-12-24T15:00:05+01:00"}, "at 2026-12-24 14:00:05 UTC"),
        ({"at": "now"}, "now (when first seen)"),
        ({"after": "10m"}, "after 10m"),
        ({"cron": "0 3 * * 1-5", "timeZone": BERLIN}, "cron 0 3 * * 1-5 (Europe/Berlin)"),
        ({"cron": "*/5 * * * *"}, "cron */5 * * * * (UTC)"),
    ],
)
def test_describe_reads_like_the_manifest(fields: dict[str, str], text: str) -> None:
    assert describe(schedule(**fields)) == text

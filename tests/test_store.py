"""The state file: a real SQLite database in a temporary directory.

Checks what an operator relies on: the schema is created and upgraded on open (and a file
from a newer OneOff is refused), writes land together or not at all with their events,
``generation`` moves only with the spec, read-only opens cannot write, and a source's
last reconcile is remembered. Label selectors (``-l team=a``) are checked at the end.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from oneoff.errors import Issue, StoreError
from oneoff.records import Desired, ObjectKey, parse_selector, selector_matches
from oneoff.store import Store

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SOURCE = "dir:/srv/jobs.d"


def desired(
    name: str,
    url: str = "https://example.com/ping",
    labels: dict[str, str] | None = None,
    line: int = 1,
) -> Desired:
    return Desired(
        key=ObjectKey("Job", "default", name),
        spec={"http": {"url": url}},
        labels=labels or {},
        annotations={},
        file="jobs.yaml",
        line=line,
    )


def state(tmp_path: Path) -> str:
    return str(tmp_path / "state.db")


def pragma(path: str, name: str) -> object:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        db.close()


# --- opening, schema and migrations ---------------------------------------------------


def test_fresh_state_file_gets_the_schema_in_wal_mode(tmp_path: Path) -> None:
    with Store(state(tmp_path)) as store:
        assert store.objects() == []
        assert store.sources() == []
        assert store.events() == []

    version = pragma(state(tmp_path), "user_version")
    assert isinstance(version, int) and version > 0
    assert pragma(state(tmp_path), "journal_mode") == "wal"


def test_reopening_a_state_file_keeps_its_schema_and_objects(tmp_path: Path) -> None:
    with Store(state(tmp_path)) as store, store.transaction(NOW) as tx:
        uid = tx.create(desired("kept"), SOURCE, {})
    version = pragma(state(tmp_path), "user_version")

    with Store(state(tmp_path)) as store:
        objects = store.objects()
    with Store(state(tmp_path)) as store:
        again = store.objects()

    assert [obj.uid for obj in objects] == [uid]
    assert again == objects
    assert pragma(state(tmp_path), "user_version") == version


def test_state_file_from_a_newer_oneoff_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(state(tmp_path))
    db.execute("PRAGMA user_version = 999")
    db.close()

    with pytest.raises(StoreError) as raised:
        Store(state(tmp_path))

    message = str(raised.value)
    assert state(tmp_path) in message
    assert "schema version 999" in message
    assert "newer" in message


def test_file_that_is_not_sqlite_is_a_store_error_naming_it(tmp_path: Path) -> None:
    Path(state(tmp_path)).write_text("this is not a database, just text\n" * 100)

    with pytest.raises(StoreError) as raised:
        Store(state(tmp_path))

    assert f"cannot open state file {state(tmp_path)}" in str(raised.value)


# --- writing objects and events ---------------------------------------------------------


def test_create_update_delete_in_one_transaction_log_events_in_order(tmp_path: Path) -> None:
    with Store(state(tmp_path)) as store:
        with store.transaction(NOW) as tx:
            gone_uid = tx.create(desired("gone"), SOURCE, {})
        gone = store.get(ObjectKey("Job", "default", "gone"))
        assert gone is not None
        later = NOW + timedelta(minutes=1)

        with store.transaction(later) as tx:
            uid = tx.create(desired("job"), SOURCE, {"phase": "new"})
            tx.update(uid, desired("job", "https://example.com/v2"), SOURCE, {})
            tx.delete(gone)

        events = store.events()
        objects = store.objects()

    assert [(e.type, e.key.name if e.key else None, e.uid) for e in events] == [
        ("object.created", "gone", gone_uid),
        ("object.created", "job", uid),
        ("object.updated", "job", uid),
        ("object.deleted", "gone", gone_uid),
    ]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert [e.at for e in events[1:]] == ["2026-01-01T12:01:00.000Z"] * 3
    assert events[2].data == {"source": SOURCE, "generation": 2}
    assert [(obj.key.name, obj.spec["http"]["url"]) for obj in objects] == [
        ("job", "https://example.com/v2")
    ]


def test_created_object_reads_back_as_written(tmp_path: Path) -> None:
    want = desired("job", labels={"team": "a"}, line=7)

    with Store(state(tmp_path)) as store:
        with store.transaction(NOW) as tx:
            uid = tx.create(want, SOURCE, {"conditions": []})
        got = store.get(want.key)

    assert got is not None
    assert (got.uid, got.key, got.generation) == (uid, want.key, 1)
    assert (got.spec, got.labels, got.annotations) == (want.spec, {"team": "a"}, {})
    assert (got.source, got.file, got.line) == (SOURCE, "jobs.yaml", 7)
    assert got.spec_digest == want.spec_digest
    assert got.created_at == got.updated_at == "2026-01-01T12:00:00.000Z"
    assert got.status == {"conditions": []}


def test_generation_moves_only_when_the_spec_changes(tmp_path: Path) -> None:
    with Store(state(tmp_path)) as store:
        with store.transaction(NOW) as tx:
            uid = tx.create(desired("job"), SOURCE, {})
        with store.transaction(NOW + timedelta(seconds=1)) as tx:
            after_label = tx.update(uid, desired("job", labels={"team": "b"}), SOURCE, {})
        with store.transaction(NOW + timedelta(seconds=2)) as tx:
            after_spec = tx.update(uid, desired("job", "https://example.com/v2"), SOURCE, {})
        got = store.get(ObjectKey("Job", "default", "job"))

    assert (after_label, after_spec) == (1, 2)
    assert got is not None and got.generation == 2
    assert got.created_at == "2026-01-01T12:00:00.000Z"
    assert got.updated_at == "2026-01-01T12:00:02.000Z"


def test_relocate_records_the_new_line_without_a_new_generation(tmp_path: Path) -> None:
    with Store(state(tmp_path)) as store:
        with store.transaction(NOW) as tx:
            uid = tx.create(desired("job"), SOURCE, {})
            tx.relocate(uid, "moved.yaml", 12)
        got = store.get(ObjectKey("Job", "default", "job"))
        events = store.events()

    assert got is not None
    assert (got.file, got.line, got.generation) == ("moved.yaml", 12, 1)
    assert [e.type for e in events] == ["object.created"]


def test_exception_inside_a_transaction_rolls_everything_back(tmp_path: Path) -> None:
    with Store(state(tmp_path)) as store:
        with pytest.raises(RuntimeError, match="half way"), store.transaction(NOW) as tx:
            tx.create(desired("job"), SOURCE, {})
            tx.set_source(SOURCE, True, 1, "applied", [])
            raise RuntimeError("half way")

        assert store.objects() == []
        assert store.events() == []
        assert store.sources() == []

        with store.transaction(NOW) as tx:  # the store is still usable afterwards
            tx.create(desired("job"), SOURCE, {})
        assert [obj.key.name for obj in store.objects()] == ["job"]


def test_creating_an_object_twice_is_a_store_error_and_rolls_back(tmp_path: Path) -> None:
    with Store(state(tmp_path)) as store:
        with pytest.raises(StoreError, match="insert_object"), store.transaction(NOW) as tx:
            tx.create(desired("first"), SOURCE, {})
            tx.create(desired("twice"), SOURCE, {})
            tx.create(desired("twice"), SOURCE, {})

        assert store.objects() == []
        assert store.events() == []


# --- read-only opens --------------------------------------------------------------------


def test_read_only_store_reads_what_the_writer_committed(tmp_path: Path) -> None:
    with Store(state(tmp_path)) as writer:
        with writer.transaction(NOW) as tx:
            tx.create(desired("job"), SOURCE, {})
        with Store(state(tmp_path), readonly=True) as reader:
            assert [obj.key.name for obj in reader.objects()] == ["job"]
            with writer.transaction(NOW) as tx:
                tx.create(desired("second"), SOURCE, {})
            assert [obj.key.name for obj in reader.objects()] == ["job", "second"]
            assert [e.type for e in reader.events()] == ["object.created"] * 2


def test_read_only_store_refuses_to_write(tmp_path: Path) -> None:
    Store(state(tmp_path)).close()

    with Store(state(tmp_path), readonly=True) as reader:
        with pytest.raises(StoreError, match="read-only"), reader.transaction(NOW) as tx:
            tx.create(desired("job"), SOURCE, {})
        assert reader.objects() == []


def test_read_only_open_of_a_missing_file_says_to_start_the_server(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as raised:
        Store(state(tmp_path), readonly=True)

    assert state(tmp_path) in str(raised.value)
    assert "oneoff serve" in str(raised.value)
    assert not Path(state(tmp_path)).exists()


def test_read_only_open_of_an_unmigrated_file_asks_for_an_upgrade(tmp_path: Path) -> None:
    sqlite3.connect(state(tmp_path)).close()
    Path(state(tmp_path)).touch()

    with pytest.raises(StoreError) as raised:
        Store(state(tmp_path), readonly=True)

    assert "needs a schema upgrade" in str(raised.value)
    assert "oneoff serve" in str(raised.value)


# --- sources ---------------------------------------------------------------------------


def test_source_status_roundtrips_with_its_issues(tmp_path: Path) -> None:
    issues = [
        Issue("bad.yaml", "YAML syntax: oops", line=3, column=5),
        Issue("job.yaml", "unknown field 'x'", line=8, column=3, field="spec.x"),
    ]

    with Store(state(tmp_path)) as store:
        with store.transaction(NOW) as tx:
            tx.set_source(SOURCE, False, 2, "2 issues", issues)
        (status,) = store.sources()

    assert status.name == SOURCE
    assert status.ok is False
    assert (status.objects, status.message) == (2, "2 issues")
    assert status.issues == tuple(issues)
    assert status.last_attempt_at == "2026-01-01T12:00:00.000Z"
    assert status.last_sync_at is None


def test_failed_reconcile_keeps_the_time_of_the_last_good_sync(tmp_path: Path) -> None:
    later = NOW + timedelta(minutes=5)

    with Store(state(tmp_path)) as store:
        with store.transaction(NOW) as tx:
            tx.set_source(SOURCE, True, 3, "applied", [])
        with store.transaction(later) as tx:
            tx.set_source(SOURCE, False, 3, "1 issue", [Issue("a.yaml", "broken", line=1)])
        (status,) = store.sources()

    assert status.ok is False
    assert status.last_sync_at == "2026-01-01T12:00:00.000Z"
    assert status.last_attempt_at == "2026-01-01T12:05:00.000Z"
    assert [str(issue) for issue in status.issues] == ["a.yaml:1: broken"]


# --- label selectors ---------------------------------------------------------------------


def test_selector_combines_equal_not_equal_exists_and_not_exists() -> None:
    selector = parse_selector("team=a,env!=prod,tier,!legacy")

    assert selector_matches(selector, {"team": "a", "env": "dev", "tier": "web"})
    assert selector_matches(selector, {"team": "a", "tier": "web"})  # no env is not prod
    assert not selector_matches(selector, {"team": "b", "env": "dev", "tier": "web"})
    assert not selector_matches(selector, {"team": "a", "env": "prod", "tier": "web"})
    assert not selector_matches(selector, {"team": "a", "env": "dev"})
    assert not selector_matches(selector, {"team": "a", "tier": "web", "legacy": "yes"})


def test_selector_accepts_double_equals_and_spaces() -> None:
    selector = parse_selector(" team == a , tier ")

    assert selector_matches(selector, {"team": "a", "tier": ""})
    assert not selector_matches(selector, {"team": "a"})


def test_empty_selector_matches_everything() -> None:
    assert parse_selector("") == ()
    assert selector_matches(parse_selector(""), {})


@pytest.mark.parametrize("text", ["team in (a,b)", "=a", "!", "a b=c", "x<y"])
def test_bad_selector_is_a_value_error_quoting_it(text: str) -> None:
    with pytest.raises(ValueError, match="is not a label selector"):
        parse_selector(text)

"""The pure plan: what a source declares against what is stored, and the safety rules.

No files and no database: ``Desired`` objects are built as the loader would, ``Stored``
ones as the store would hand them back, and each test checks the decision a user sees in
``oneoff diff`` or in a refused reconcile.
"""

from __future__ import annotations

from typing import Any

from oneoff.errors import Issue
from oneoff.plan import Action, FieldDiff, Plan, plan
from oneoff.records import Desired, ObjectKey, Stored

SOURCE = "dir:/srv/jobs.d"
OTHER = "api:cli"


def key(name: str) -> ObjectKey:
    return ObjectKey("Job", "default", name)


def desired(
    name: str,
    url: str = "https://example.com/ping",
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    file: str = "jobs.yaml",
    line: int = 1,
    spec: dict[str, Any] | None = None,
) -> Desired:
    return Desired(
        key=key(name),
        spec=spec if spec is not None else {"http": {"url": url}},
        labels=labels or {},
        annotations=annotations or {},
        file=file,
        line=line,
    )


def stored(want: Desired, source: str = SOURCE, generation: int = 1) -> Stored:
    """How the store would hold ``want`` after applying it for ``source``."""
    return Stored(
        uid=f"uid-{want.key.name}",
        key=want.key,
        generation=generation,
        spec_json=want.spec_json,
        meta_json=want.meta_json,
        spec_digest=want.spec_digest,
        source=source,
        file=want.file,
        line=want.line,
        created_at="2026-01-01T00:00:00.000Z",
        updated_at="2026-01-01T00:00:00.000Z",
        status={},
    )


def only(result: Plan) -> Any:
    assert len(result.changes) == 1, result.changes
    return result.changes[0]


def actions(result: Plan) -> dict[str, Action]:
    return {change.key.name: change.action for change in result.changes}


def diffs(change: Any) -> dict[str, FieldDiff]:
    return {diff.path: diff for diff in change.diffs}


# --- create / update / unchanged / delete --------------------------------------------


def test_new_object_is_created() -> None:
    want = desired("new")

    result = plan(SOURCE, [want], [])

    change = only(result)
    assert change.action is Action.CREATE
    assert change.desired is want
    assert result.counts[Action.CREATE] == 1
    assert result.has_changes
    assert result.summary() == "1 to create, 0 to update, 0 to delete, 0 unchanged"


def test_same_object_as_stored_is_unchanged() -> None:
    want = desired("same")

    result = plan(SOURCE, [want], [stored(want)])

    change = only(result)
    assert change.action is Action.UNCHANGED
    assert change.note == ""
    assert not change.moved
    assert not result.has_changes


def test_changed_spec_is_an_update_that_changes_the_spec() -> None:
    old = desired("job", "https://example.com/old")
    new = desired("job", "https://example.com/new")

    change = only(plan(SOURCE, [new], [stored(old)]))

    assert change.action is Action.UPDATE
    assert change.spec_changed
    assert diffs(change) == {
        "spec.http.url": FieldDiff(
            "spec.http.url", "https://example.com/old", "https://example.com/new"
        )
    }


def test_label_only_change_is_an_update_without_spec_change() -> None:
    old = desired("job", labels={"team": "a"})
    new = desired("job", labels={"team": "b"})

    change = only(plan(SOURCE, [new], [stored(old)]))

    assert change.action is Action.UPDATE
    assert not change.spec_changed
    assert diffs(change) == {"metadata.labels.team": FieldDiff("metadata.labels.team", "a", "b")}


def test_added_and_removed_fields_are_marked_as_such() -> None:
    old = desired("job", spec={"http": {"url": "https://x.example", "method": "POST"}})
    new = desired("job", spec={"http": {"url": "https://x.example"}, "priority": 9})

    change = only(plan(SOURCE, [new], [stored(old)]))

    assert diffs(change) == {
        "spec.http.method": FieldDiff("spec.http.method", "POST", None, removed=True),
        "spec.priority": FieldDiff("spec.priority", None, 9, added=True),
    }


def test_changed_list_element_is_named_by_its_index() -> None:
    old = desired("job", spec={"shell": {"command": ["echo", "a"]}})
    new = desired("job", spec={"shell": {"command": ["echo", "b"]}})

    change = only(plan(SOURCE, [new], [stored(old)]))

    assert list(diffs(change)) == ["spec.shell.command.1"]


def test_added_annotation_is_a_diff_under_metadata_annotations() -> None:
    old = desired("job")
    new = desired("job", annotations={"oneoff.dev/run-requested-at": "now"})

    change = only(plan(SOURCE, [new], [stored(old)]))

    assert change.action is Action.UPDATE
    assert not change.spec_changed
    assert diffs(change) == {
        "metadata.annotations.oneoff.dev/run-requested-at": FieldDiff(
            "metadata.annotations.oneoff.dev/run-requested-at", None, "now", added=True
        )
    }


def test_object_no_longer_declared_is_deleted() -> None:
    keep, gone = desired("keep"), desired("gone")
    other = [desired(f"other-{i}") for i in range(2)]

    result = plan(SOURCE, [keep, *other], [stored(keep), stored(gone), *map(stored, other)])

    assert actions(result)["gone"] is Action.DELETE
    assert result.of(Action.DELETE)[0].stored.uid == "uid-gone"
    assert result.refused is None
    assert result.owned == 4


def test_moved_declaration_is_unchanged_but_marked_moved() -> None:
    before = desired("job", file="a.yaml", line=1)
    after = desired("job", file="a.yaml", line=12)

    change = only(plan(SOURCE, [after], [stored(before)]))

    assert change.action is Action.UNCHANGED
    assert change.moved
    assert change.diffs == ()


def test_loader_issues_are_carried_in_the_plan() -> None:
    problem = Issue("bad.yaml", "YAML syntax: oops", line=3, column=1)

    result = plan(SOURCE, [], [], issues=[problem])

    assert result.issues == (problem,)


# --- ownership -------------------------------------------------------------------------


def test_object_owned_by_another_source_is_a_conflict_and_not_changed() -> None:
    theirs = desired("shared", "https://example.com/theirs", file="api.yaml", line=4)
    mine = desired("shared", "https://example.com/mine", file="mine.yaml", line=7)

    result = plan(SOURCE, [mine], [stored(theirs, source=OTHER)])

    assert result.changes == ()
    assert len(result.issues) == 1
    issue = result.issues[0]
    assert (issue.file, issue.line, issue.field) == ("mine.yaml", 7, "metadata.name")
    assert "Job default/shared already belongs to api:cli (api.yaml:4)" in issue.message
    assert "--force" in issue.message


def test_object_owned_by_another_source_is_never_deleted() -> None:
    theirs = desired("theirs")

    result = plan(SOURCE, [], [stored(theirs, source=OTHER)])

    assert result.changes == ()
    assert result.owned == 0
    assert result.refused is None


def test_force_takes_over_an_object_owned_by_another_source() -> None:
    theirs = desired("shared")

    change = only(plan(SOURCE, [theirs], [stored(theirs, source=OTHER)], force=True))

    assert change.action is Action.UPDATE
    assert change.stored.source == OTHER
    assert change.diffs == ()


# --- what is kept although it is not declared -----------------------------------------


def test_object_whose_declaration_failed_validation_is_kept() -> None:
    broken, fine = desired("broken"), desired("fine")

    result = plan(SOURCE, [fine], [stored(broken), stored(fine)], kept_keys=[broken.key])

    change = next(c for c in result.changes if c.key == broken.key)
    assert change.action is Action.UNCHANGED
    assert "kept" in change.note and "errors" in change.note
    assert result.counts[Action.DELETE] == 0


def test_objects_of_a_file_that_failed_to_load_are_kept() -> None:
    lost = [desired(f"in-bad-{i}", file="bad.yaml") for i in range(3)]
    fine = desired("fine", file="good.yaml")

    result = plan(SOURCE, [fine], [stored(fine), *map(stored, lost)], kept_files=["bad.yaml"])

    kept = [c for c in result.changes if c.key.name.startswith("in-bad")]
    assert [c.action for c in kept] == [Action.UNCHANGED] * 3
    assert all(c.note == "kept: bad.yaml could not be loaded" for c in kept)
    assert result.refused is None


def test_without_prune_nothing_is_deleted() -> None:
    gone = [desired(f"gone-{i}") for i in range(3)]

    result = plan(SOURCE, [], list(map(stored, gone)), prune=False)

    assert result.counts[Action.DELETE] == 0
    assert result.changes == ()
    assert result.refused is None


def test_prune_disabled_annotation_keeps_an_undeclared_object() -> None:
    pinned = desired("pinned", annotations={"oneoff.dev/prune": "disabled"})
    others = [desired(f"other-{i}") for i in range(3)]

    result = plan(SOURCE, others, [stored(pinned), *map(stored, others)])

    change = next(c for c in result.changes if c.key == pinned.key)
    assert change.action is Action.UNCHANGED
    assert "oneoff.dev/prune is disabled" in change.note
    assert result.counts[Action.DELETE] == 0


# --- mass prune ------------------------------------------------------------------------


def _owned(count: int) -> list[Desired]:
    return [desired(f"job-{i}") for i in range(count)]


def test_deleting_every_object_of_a_source_is_refused() -> None:
    everything = _owned(4)

    result = plan(SOURCE, [], list(map(stored, everything)))

    assert result.counts[Action.DELETE] == 4
    assert result.refused is not None
    assert "refused" in result.refused
    assert "all 4 of its objects" in result.refused
    assert SOURCE in result.refused


def test_deleting_the_only_object_is_refused_as_deleting_everything() -> None:
    (single,) = _owned(1)

    result = plan(SOURCE, [], [stored(single)], max_prune_share=0.9)

    assert result.refused is not None and "all 1 of its objects" in result.refused


def test_deleting_more_than_the_allowed_share_is_refused() -> None:
    four = _owned(4)

    result = plan(SOURCE, four[:1], list(map(stored, four)), max_prune_share=0.5)

    assert result.counts[Action.DELETE] == 3
    assert result.refused is not None
    assert "refused" in result.refused
    assert "3 of its 4 objects (more than 50%)" in result.refused


def test_deleting_within_the_allowed_share_is_allowed() -> None:
    four = _owned(4)

    result = plan(SOURCE, four[:3], list(map(stored, four)), max_prune_share=0.5)

    assert result.counts[Action.DELETE] == 1
    assert result.refused is None


def test_share_of_one_allows_deleting_everything() -> None:
    four = _owned(4)

    result = plan(SOURCE, [], list(map(stored, four)), max_prune_share=1)

    assert result.counts[Action.DELETE] == 4
    assert result.refused is None

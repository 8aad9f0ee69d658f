"""Pure: desired and stored → :class:`Plan` (creates, updates, deletes, field-level diffs).

Called by the reconciler (which applies the plan in one transaction) and by ``oneoff
diff`` (which only prints it). All of the reconcile safety rules of DESIGN.md §2 are
decided here, as values, so they are tested without a database:

- only objects this source owns are updated or deleted; declaring an object another
  source owns is a conflict, reported and not applied;
- objects whose file failed to load, or whose document failed validation, are kept;
- ``oneoff.dev/prune: disabled`` keeps an object whose declaration is gone;
- a plan that would delete all, or more than ``max_prune_share``, of the source's objects
  is *refused* as a whole (nothing of it is applied), since that is what an unmounted or
  emptied directory looks like.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from oneoff.errors import Issue
from oneoff.manifests import PRUNE_ANNOTATION
from oneoff.records import Desired, ObjectKey, Stored


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    UNCHANGED = "unchanged"


_ABSENT: Any = object()


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """One changed field: ``path`` like ``spec.http.url``; a side is ``None`` if absent."""

    path: str
    before: Any
    after: Any
    added: bool = False
    removed: bool = False


@dataclass(frozen=True, slots=True)
class Change:
    """What happens to one object."""

    action: Action
    key: ObjectKey
    desired: Desired | None = None
    stored: Stored | None = None
    diffs: tuple[FieldDiff, ...] = ()
    note: str = ""
    """Why an object that looks gone is kept, or that only its file:line moved."""

    @property
    def spec_changed(self) -> bool:
        return any(diff.path.startswith("spec") for diff in self.diffs)

    @property
    def moved(self) -> bool:
        """The declaration moved (file or line) without changing content."""
        return (
            self.desired is not None
            and self.stored is not None
            and (self.desired.file, self.desired.line) != (self.stored.file, self.stored.line)
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one source's reconcile would do, and whether it may be done."""

    source: str
    changes: tuple[Change, ...]
    issues: tuple[Issue, ...] = ()
    refused: str | None = None
    """Why the plan must not be applied at all (a mass prune); ``None`` if it may."""
    owned: int = 0
    """How many objects the source owned before this plan."""
    counts: dict[Action, int] = field(default_factory=dict)

    def of(self, action: Action) -> list[Change]:
        return [change for change in self.changes if change.action is action]

    @property
    def has_changes(self) -> bool:
        return any(change.action is not Action.UNCHANGED for change in self.changes)

    def summary(self) -> str:
        return ", ".join(
            f"{self.counts.get(action, 0)} to {action.value}"
            for action in (Action.CREATE, Action.UPDATE, Action.DELETE)
        ) + (f", {self.counts.get(Action.UNCHANGED, 0)} unchanged")


def plan(
    source: str,
    desired: Iterable[Desired],
    stored: Iterable[Stored],
    *,
    kept_keys: Iterable[ObjectKey] = (),
    kept_files: Iterable[str] = (),
    issues: Iterable[Issue] = (),
    prune: bool = True,
    max_prune_share: float = 0.5,
    force: bool = False,
) -> Plan:
    """Compare what ``source`` declares with what is stored.

    ``stored`` must hold every object the source owns and every stored object whose key
    is declared (whoever owns it), so ownership conflicts are seen. ``force`` lets the
    source take over objects another source owns (``apply --force``).
    """
    by_key = {obj.key: obj for obj in stored}
    kept_keys, kept_files = set(kept_keys), set(kept_files)
    changes: list[Change] = []
    found: list[Issue] = list(issues)
    declared: set[ObjectKey] = set()

    for want in desired:
        declared.add(want.key)
        have = by_key.get(want.key)
        if have is None:
            changes.append(Change(Action.CREATE, want.key, desired=want))
        elif have.source != source and not force:
            found.append(
                Issue(
                    want.file,
                    f"{want.key} already belongs to {have.source}"
                    + (f" ({have.location})" if have.location else "")
                    + "; remove one of the two declarations"
                    + " (or apply with --force to take it over)",
                    line=want.line,
                    field="metadata.name",
                )
            )
        elif (
            have.spec_digest == want.spec_digest
            and have.meta_json == want.meta_json
            and (have.source == source)
        ):
            changes.append(Change(Action.UNCHANGED, want.key, desired=want, stored=have))
        else:
            changes.append(
                Change(
                    Action.UPDATE,
                    want.key,
                    desired=want,
                    stored=have,
                    diffs=tuple(_diff_objects(have, want)),
                )
            )

    owned = [obj for obj in by_key.values() if obj.source == source]
    for have in owned:
        if have.key in declared:
            continue
        if have.key in kept_keys:
            note = "kept: its declaration has errors"
        elif have.file in kept_files:
            note = f"kept: {have.file} could not be loaded"
        elif not prune:
            continue
        elif have.annotations.get(PRUNE_ANNOTATION) == "disabled":
            note = f"kept: no longer declared, but {PRUNE_ANNOTATION} is disabled"
        else:
            changes.append(Change(Action.DELETE, have.key, stored=have))
            continue
        changes.append(Change(Action.UNCHANGED, have.key, stored=have, note=note))

    counts = dict.fromkeys(Action, 0)
    for change in changes:
        counts[change.action] += 1
    refused = _mass_prune(source, counts[Action.DELETE], len(owned), max_prune_share)
    return Plan(source, tuple(changes), tuple(found), refused, len(owned), counts)


def _mass_prune(source: str, deletes: int, owned: int, max_share: float) -> str | None:
    if deletes == 0 or max_share >= 1:
        return None
    if deletes == owned:
        what = f"all {owned} of its objects"
    elif deletes > max_share * owned:
        what = f"{deletes} of its {owned} objects (more than {max_share:.0%})"
    else:
        return None
    return (
        f"refused to prune: {source} would delete {what}; this is what an empty or unmounted "
        "directory looks like, so nothing was changed. If the deletion is intended, raise "
        "ONEOFF_PRUNE_MAX_SHARE to 1 (oneoff serve --prune-max-share 1) for this reconcile, "
        f"or keep single objects with the annotation {PRUNE_ANNOTATION}: disabled"
    )


def _diff_objects(have: Stored, want: Desired) -> Iterator[FieldDiff]:
    yield from _diff(have.spec, want.spec, "spec")
    yield from _diff(have.labels, want.labels, "metadata.labels")
    yield from _diff(have.annotations, want.annotations, "metadata.annotations")


def _diff(before: Any, after: Any, path: str) -> Iterator[FieldDiff]:
    if isinstance(before, dict) and isinstance(after, dict):
        for name in sorted(before.keys() | after.keys()):
            yield from _diff(before.get(name, _ABSENT), after.get(name, _ABSENT), f"{path}.{name}")
    elif isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for index, (old, new) in enumerate(zip(before, after, strict=True)):
            yield from _diff(old, new, f"{path}.{index}")
    elif before is _ABSENT and after is not _ABSENT:
        yield FieldDiff(path, None, after, added=True)
    elif after is _ABSENT and before is not _ABSENT:
        yield FieldDiff(path, before, None, removed=True)
    elif json.dumps(before, sort_keys=True) != json.dumps(after, sort_keys=True):
        yield FieldDiff(path, before, after)


def plan_document(the_plan: Plan) -> dict[str, Any]:
    """The JSON view of a plan: what ``POST /api/v1/apply`` returns and ``diff`` renders."""
    changes = []
    for change in the_plan.changes:
        where = change.desired or change.stored
        changes.append({
            "action": change.action.value,
            "kind": change.key.kind,
            "namespace": change.key.namespace,
            "name": change.key.name,
            "location": where.location if where is not None else "",
            "specChanged": change.spec_changed,
            "note": change.note,
            "diffs": [
                {"path": d.path, "op": "add" if d.added else "remove" if d.removed else "change",
                 "before": d.before, "after": d.after}
                for d in change.diffs
            ],
        })
    return {
        "source": the_plan.source,
        "summary": the_plan.summary(),
        "counts": {action.value: the_plan.counts.get(action, 0) for action in Action},
        "refused": the_plan.refused,
        "changes": changes,
        "issues": [issue.to_dict() for issue in the_plan.issues],
    }

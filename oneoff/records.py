"""Plain values that flow between layers: object keys, desired and stored objects.

The loader produces :class:`Desired` objects, the store hands back :class:`Stored`
ones, ``plan`` compares the two; the CLI (and later the API) render a ``Stored`` as a
Kubernetes-style document with :func:`to_document`. Frozen, slotted, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

from oneoff.manifests import API_VERSION


class ObjectKey(NamedTuple):
    """Identity of an object: unique per (kind, namespace, name)."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
"""One encoder for every call: json.dumps with options builds a new one each time, which
costs about as much as encoding a small spec (an apply encodes three per object)."""


def canonical_json(value: Any) -> str:
    """Stable JSON text of a value: sorted keys, no spaces (digests and storage)."""
    return _CANONICAL.encode(value)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, millisecond precision, as stored and shown."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Desired:
    """One validated manifest document as a source declares it."""

    key: ObjectKey
    spec: dict[str, Any]
    """The spec as written (JSON-normalised, defaults not filled in)."""
    labels: dict[str, str]
    annotations: dict[str, str]
    file: str
    """Path of the file, as the source names it (relative to the source root for dirs)."""
    line: int
    spec_json: str = field(init=False)
    meta_json: str = field(init=False)
    spec_digest: str = field(init=False)

    def __post_init__(self) -> None:
        spec_json = canonical_json(self.spec)
        object.__setattr__(self, "spec_json", spec_json)
        object.__setattr__(self, "meta_json", canonical_json([self.labels, self.annotations]))
        object.__setattr__(self, "spec_digest", digest(spec_json))

    @property
    def location(self) -> str:
        """``file:line``; empty for objects sent through the API as JSON (no file)."""
        return f"{self.file}:{self.line}" if self.file else ""


@dataclass(frozen=True, slots=True)
class Stored:
    """An object as the state file holds it."""

    uid: str
    key: ObjectKey
    generation: int
    spec_json: str
    meta_json: str
    spec_digest: str
    source: str
    file: str | None
    line: int | None
    created_at: str
    updated_at: str
    status: dict[str, Any]

    @property
    def spec(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.spec_json)
        return result

    @property
    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = json.loads(self.meta_json)[0]
        return labels

    @property
    def annotations(self) -> dict[str, str]:
        annotations: dict[str, str] = json.loads(self.meta_json)[1]
        return annotations

    @property
    def location(self) -> str:
        if self.file is None:
            return ""
        return f"{self.file}:{self.line}" if self.line else self.file


def condition(
    type_: str,
    ok: bool | None,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
    previous: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A Kubernetes-style condition; the transition time moves only when status flips."""
    status = "Unknown" if ok is None else ("True" if ok else "False")
    since = isoformat(now)
    for old in previous or []:
        if old.get("type") == type_ and old.get("status") == status:
            since = old.get("lastTransitionTime", since)
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def to_document(obj: Stored) -> dict[str, Any]:
    """The Kubernetes-shaped view of a stored object (``get -o json|yaml``, the API)."""
    metadata: dict[str, Any] = {
        "name": obj.key.name,
        "namespace": obj.key.namespace,
        "uid": obj.uid,
        "generation": obj.generation,
        "creationTimestamp": obj.created_at,
    }
    if obj.labels:
        metadata["labels"] = obj.labels
    if obj.annotations:
        metadata["annotations"] = obj.annotations
    status = dict(obj.status)
    status["source"] = {"name": obj.source, "file": obj.file, "line": obj.line}
    return {
        "apiVersion": API_VERSION,
        "kind": obj.key.kind,
        "metadata": metadata,
        "spec": obj.spec,
        "status": status,
    }


@dataclass(frozen=True, slots=True)
class Requirement:
    """One term of a label selector: ``key=value``, ``key!=value``, ``key`` or ``!key``."""

    key: str
    op: str
    """One of ``=``, ``!=``, ``exists``, ``!exists``."""
    value: str = ""

    def matches(self, labels: dict[str, str]) -> bool:
        if self.op == "=":
            return labels.get(self.key) == self.value
        if self.op == "!=":
            return labels.get(self.key) != self.value
        if self.op == "exists":
            return self.key in labels
        return self.key not in labels


def parse_selector(text: str) -> tuple[Requirement, ...]:
    """Parse a Kubernetes-style equality selector such as ``team=billing,env!=prod,tier``."""
    requirements = []
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            continue
        if "!=" in term:
            key, value = term.split("!=", 1)
            requirements.append(Requirement(key.strip(), "!=", value.strip()))
        elif "=" in term:
            key, value = term.split("==", 1) if "==" in term else term.split("=", 1)
            requirements.append(Requirement(key.strip(), "=", value.strip()))
        elif term.startswith("!"):
            requirements.append(Requirement(term[1:].strip(), "!exists"))
        else:
            requirements.append(Requirement(term, "exists"))
    for requirement in requirements:
        if not requirement.key or any(c in requirement.key for c in " ()!=<>"):
            raise ValueError(f"{text!r} is not a label selector (e.g. team=billing,env!=prod)")
    return tuple(requirements)


def selector_matches(selector: tuple[Requirement, ...], labels: dict[str, str]) -> bool:
    return all(requirement.matches(labels) for requirement in selector)


class RunStatus(StrEnum):
    """Where an execution is; transitions are checked against :data:`TRANSITIONS`."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    MISSED = "missed"
    SKIPPED = "skipped"
    LOST = "lost"

    @property
    def final(self) -> bool:
        return not TRANSITIONS[self]


TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.PENDING: frozenset({RunStatus.QUEUED, RunStatus.CANCELLED, RunStatus.MISSED,
                                  RunStatus.SKIPPED}),
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED, RunStatus.MISSED,
                                 RunStatus.SKIPPED}),
    # a retry sends a running execution back to pending with its next due time
    RunStatus.RUNNING: frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.TIMED_OUT,
                                  RunStatus.CANCELLED, RunStatus.LOST, RunStatus.PENDING}),
    # an idempotent job's lost run is retried: it goes back to pending
    RunStatus.LOST: frozenset({RunStatus.PENDING}),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.TIMED_OUT: frozenset(),
    RunStatus.CANCELLED: frozenset(),
    RunStatus.MISSED: frozenset(),
    RunStatus.SKIPPED: frozenset(),
}
"""Every allowed status change; the store refuses any other (drawn in docs/runs.md)."""


def check_transition(before: RunStatus, after: RunStatus) -> None:
    if after not in TRANSITIONS[before]:
        raise ValueError(f"execution cannot go from {before} to {after}")


@dataclass(frozen=True, slots=True)
class Execution:
    """One run of a job: a (job, scheduled time) slot and its attempts."""

    seq: int
    id: str
    job_uid: str
    namespace: str
    name: str
    type: str
    scheduled_at: str
    due_at: str
    priority: int
    status: RunStatus
    reason: str
    attempt: int
    generation: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    exit_code: int | None
    http_status: int | None
    error: str
    truncated: bool
    output: str | None = None
    """Only filled when one execution is read with its output."""


def execution_document(run: Execution, attempts: list[dict[str, Any]] | None = None
                       ) -> dict[str, Any]:
    """The Kubernetes-shaped view of an execution (``kind: Execution``)."""
    status: dict[str, Any] = {
        "phase": run.status.value,
        "attempt": run.attempt,
        "startedAt": run.started_at,
        "finishedAt": run.finished_at,
        "exitCode": run.exit_code,
        "httpStatus": run.http_status,
        "error": run.error,
        "outputTruncated": run.truncated,
    }
    if attempts is not None:
        status["attempts"] = attempts
    return {
        "apiVersion": API_VERSION,
        "kind": "Execution",
        "metadata": {"name": run.id, "namespace": run.namespace,
                     "creationTimestamp": run.created_at},
        "spec": {"job": run.name, "jobUid": run.job_uid, "type": run.type,
                 "scheduledAt": run.scheduled_at, "dueAt": run.due_at,
                 "priority": run.priority, "reason": run.reason,
                 "generation": run.generation},
        "status": status,
    }

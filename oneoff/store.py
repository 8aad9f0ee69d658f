"""The only module that touches SQLite: schema, migrations and named queries.

The daemon opens the state file writable and is its only writer (one connection, WAL,
``BEGIN IMMEDIATE`` for every write); CLI verbs without a server open it read-only. The
reconciler applies a plan through one :class:`Transaction`, so objects, their events and
the source's status change together or not at all.

SQL lives in ``sql/queries.sql`` (named blocks) and ``sql/migrations/NNNN_*.sql``, applied
in order on open and tracked in ``PRAGMA user_version``.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

from oneoff.errors import Issue, StoreError
from oneoff.records import Desired, ObjectKey, Stored, canonical_json, isoformat


def _read_sql(name: str) -> str:
    return resources.files("oneoff").joinpath("sql", name).read_text(encoding="utf-8")


def _named_queries() -> dict[str, str]:
    text = _read_sql("queries.sql")
    parts = re.split(r"^-- name: (\w+)\s*$", text, flags=re.MULTILINE)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("oneoff").joinpath("sql", "migrations")
    found = [
        (int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found)


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """How the last reconcile of one source went."""

    name: str
    last_attempt_at: str | None
    last_sync_at: str | None
    ok: bool
    objects: int
    message: str
    issues: tuple[Issue, ...]


@dataclass(frozen=True, slots=True)
class Event:
    """One row of the ordered event log."""

    seq: int
    at: str
    type: str
    key: ObjectKey | None
    uid: str | None
    data: dict[str, Any]


class Store:
    """An open state file. Thread-safe: one connection guarded by a lock."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._lock = threading.RLock()
        self._queries = _named_queries()
        try:
            if readonly:
                if not os.path.exists(path):
                    raise StoreError(
                        f"no state file at {path}: start 'oneoff serve' (or pass --state)"
                    )
                self._db = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, check_same_thread=False
                )
            else:
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state file {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        migrations = _migrations()
        latest = migrations[-1][0]
        if version > latest:
            raise StoreError(
                f"state file {self.path} is at schema version {version}, written by a newer "
                f"OneOff; this one knows up to {latest}"
            )
        pending = [(number, sql) for number, sql in migrations if number > version]
        if not pending:
            return
        if self.readonly:
            raise StoreError(
                f"state file {self.path} needs a schema upgrade; start 'oneoff serve' once"
            )
        for number, sql in pending:
            self._db.executescript(
                f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {number};\nCOMMIT;"
            )

    def _run(self, query: str, params: Mapping[str, Any] | None = None) -> sqlite3.Cursor:
        try:
            return self._db.execute(self._queries[query], params or {})
        except sqlite3.Error as exc:
            raise StoreError(f"state file {self.path}: {query} failed: {exc}") from exc

    # --- reads ---------------------------------------------------------------------

    def objects(
        self,
        kind: str | None = None,
        namespace: str | None = None,
        source: str | None = None,
        name: str | None = None,
    ) -> list[Stored]:
        params = {"kind": kind, "namespace": namespace, "source": source, "name": name}
        with self._lock:
            rows = self._run("select_objects", params).fetchall()
        return [_stored(row) for row in rows]

    def get(self, key: ObjectKey) -> Stored | None:
        found = self.objects(key.kind, key.namespace, name=key.name)
        return found[0] if found else None

    def sources(self) -> list[SourceStatus]:
        with self._lock:
            rows = self._run("select_sources").fetchall()
        return [
            SourceStatus(
                name=row[0],
                last_attempt_at=row[1],
                last_sync_at=row[2],
                ok=bool(row[3]),
                objects=row[4],
                message=row[5],
                issues=tuple(Issue(**issue) for issue in json.loads(row[6])),
            )
            for row in rows
        ]

    def events(self, after: int = 0, limit: int = 1000) -> list[Event]:
        with self._lock:
            rows = self._run("select_events", {"after": after, "limit": limit}).fetchall()
        return [
            Event(
                seq=row[0],
                at=row[1],
                type=row[2],
                key=ObjectKey(row[3], row[4], row[5]) if row[3] else None,
                uid=row[6],
                data=json.loads(row[7]),
            )
            for row in rows
        ]

    # --- writes --------------------------------------------------------------------

    @contextmanager
    def transaction(self, now: datetime) -> Iterator[Transaction]:
        """One write transaction (``BEGIN IMMEDIATE``); everything in it lands or nothing."""
        if self.readonly:
            raise StoreError(f"state file {self.path} is open read-only")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"state file {self.path}: cannot start a write: {exc}") from exc
            try:
                yield Transaction(self, isoformat(now))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    self._db.execute("ROLLBACK")
                    raise StoreError(f"state file {self.path}: commit failed: {exc}") from exc


class Transaction:
    """Writes inside one open transaction; obtained from :meth:`Store.transaction`."""

    def __init__(self, store: Store, now: str) -> None:
        self._store = store
        self.now = now

    def create(self, desired: Desired, source: str, status: dict[str, Any]) -> str:
        uid = str(uuid.uuid4())
        self._store._run(
            "insert_object",
            {
                **_object_params(desired, source, self.now, status),
                "uid": uid,
            },
        )
        self.event("object.created", desired.key, uid, {"source": source, "generation": 1})
        return uid

    def update(self, uid: str, desired: Desired, source: str, status: dict[str, Any]) -> int:
        (generation,) = self._store._run(
            "update_object",
            {
                **_object_params(desired, source, self.now, status),
                "uid": uid,
            },
        ).fetchone()
        self.event("object.updated", desired.key, uid, {"source": source, "generation": generation})
        return int(generation)

    def relocate(self, uid: str, file: str, line: int) -> None:
        """Record a new file:line for an object whose content did not change."""
        self._store._run("relocate_object", {"uid": uid, "file": file, "line": line})

    def delete(self, stored: Stored) -> None:
        self._store._run("delete_object", {"uid": stored.uid})
        self.event("object.deleted", stored.key, stored.uid, {"source": stored.source})

    def set_source(
        self, name: str, ok: bool, objects: int, message: str, issues: list[Issue]
    ) -> None:
        self._store._run(
            "upsert_source",
            {
                "name": name,
                "now": self.now,
                "ok": ok,
                "objects": objects,
                "message": message,
                "issues": json.dumps([issue.to_dict() for issue in issues]),
            },
        )

    def event(
        self, type_: str, key: ObjectKey | None, uid: str | None, data: dict[str, Any]
    ) -> None:
        self._store._run(
            "insert_event",
            {
                "at": self.now,
                "type": type_,
                "kind": key.kind if key else None,
                "namespace": key.namespace if key else None,
                "name": key.name if key else None,
                "uid": uid,
                "data": canonical_json(data),
            },
        )


def _object_params(
    desired: Desired, source: str, now: str, status: dict[str, Any]
) -> dict[str, Any]:
    return {
        "kind": desired.key.kind,
        "namespace": desired.key.namespace,
        "name": desired.key.name,
        "spec": desired.spec_json,
        "meta": desired.meta_json,
        "spec_digest": desired.spec_digest,
        "source": source,
        "file": desired.file,
        "line": desired.line,
        "now": now,
        "status": canonical_json(status),
    }


def _stored(row: tuple[Any, ...]) -> Stored:
    return Stored(
        uid=row[0],
        key=ObjectKey(row[1], row[2], row[3]),
        generation=row[4],
        spec_json=row[5],
        meta_json=row[6],
        spec_digest=row[7],
        source=row[8],
        file=row[9],
        line=row[10],
        created_at=row[11],
        updated_at=row[12],
        status=json.loads(row[13]),
    )

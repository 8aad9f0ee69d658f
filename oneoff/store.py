"""The only module that touches SQLite: schema, migrations and named queries.

The daemon opens the state file writable and is its only writer (one connection, WAL,
``BEGIN IMMEDIATE`` for every write); CLI verbs without a server open it read-only. The
reconciler applies a plan through one :class:`Transaction`, so objects, their events and
the source's status change together or not at all.

SQL lives in ``sql/queries.sql`` (named blocks) and ``sql/migrations/NNNN_*.sql``, applied
in order on open and tracked in ``PRAGMA user_version``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, NamedTuple, TypeVar

from oneoff.errors import Issue, StoreError
from oneoff.manifests import JobSpec
from oneoff.records import (
    Desired,
    Execution,
    ObjectKey,
    RunStatus,
    Stored,
    canonical_json,
    check_transition,
    isoformat,
)

T = TypeVar("T")


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
                # Checkpoints run beside the writer (see _Checkpointer); SQLite's own, inside
                # a commit, only once the log is 10x its default size.
                self._db.execute(f"PRAGMA wal_autocheckpoint={10 * CHECKPOINT_PAGES}")
                self._db.execute(f"PRAGMA journal_size_limit={CHECKPOINT_PAGES * 4096}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state file {path}: {exc}") from exc
        self._checkpointer = None if readonly else _Checkpointer(path)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
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
        *,
        with_status: bool = True,
    ) -> list[Stored]:
        """Objects matching the filters; ``with_status=False`` skips decoding each status
        (the reconciler's plan never reads it, and 10,000 decodes are most of a pass)."""
        params = {"kind": kind, "namespace": namespace, "source": source, "name": name}
        # a query per leading filter, so the index on it is used (an "IS NULL OR" term
        # would make SQLite scan every object)
        query = ("select_objects_of_source" if source is not None else
                 "select_objects_of_kind" if kind is not None else "select_objects")
        with self._lock:
            rows = self._run(query, params).fetchall()
        return [_stored(row, with_status) for row in rows]

    def objects_revision(self) -> int:
        """Moves whenever any object is created, updated, moved or deleted."""
        with self._lock:
            (revision,) = self._run("objects_revision").fetchone()
        return int(revision)

    def by_uid(self, uid: str) -> Stored | None:
        with self._lock:
            row = self._run("select_object_by_uid", {"uid": uid}).fetchone()
        return _stored(row) if row else None

    def by_keys(self, keys: Iterable[ObjectKey]) -> dict[ObjectKey, Stored]:
        """The stored objects among ``keys`` (without status), whoever owns them."""
        found: dict[ObjectKey, Stored] = {}
        batch = [list(key) for key in keys]
        for start in range(0, len(batch), 10_000):
            params = {"keys": json.dumps(batch[start:start + 10_000])}
            with self._lock:
                rows = self._run("select_objects_by_key", params).fetchall()
            found.update((obj.key, obj) for obj in (_stored(row, False) for row in rows))
        return found

    def by_uids(self, uids: Iterable[str]) -> dict[str, Stored]:
        with self._lock:
            rows = self._run("select_objects_by_uid", {"uids": json.dumps(list(uids))}).fetchall()
        return {row[0]: _stored(row) for row in rows}

    def get(self, key: ObjectKey) -> Stored | None:
        params = {"kind": key.kind, "namespace": key.namespace, "name": key.name}
        with self._lock:
            row = self._run("select_object", params).fetchone()
        return _stored(row) if row else None

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
        return [_event(row) for row in rows]

    # --- API reads: filtered, sorted, paged --------------------------------------

    def page_objects(
        self, kind: str, *, namespace: str | None = None,
        namespaces: Iterable[str] | None = None, selector: list[dict[str, str]] | None = None,
        sort: str = "namespace", limit: int = 100, offset: int = 0,
    ) -> tuple[list[Stored], int]:
        """One page of ``kind`` and the number of all matches (``sort`` from OBJECT_ORDERS)."""
        params = {
            "kind": kind, "namespace": namespace,
            "namespaces": None if namespaces is None else json.dumps(list(namespaces)),
            "selector": None if selector is None else json.dumps(selector),
            "limit": limit, "offset": offset,
        }
        rows, total = self._page("objects", OBJECT_ORDERS[sort], params)
        return [_stored(row) for row in rows], total

    def page_executions(
        self, *, namespace: str | None = None, namespaces: Iterable[str] | None = None,
        job: str | None = None, statuses: Iterable[str] | None = None,
        type_: str | None = None, since: str | None = None, until: str | None = None,
        sort: str = "-createdAt", limit: int = 100, offset: int = 0, count: bool = True,
    ) -> tuple[list[Execution], int]:
        """One page of executions and the number of all matches (``sort`` from
        EXECUTION_ORDERS; ``count=False`` skips counting and returns -1)."""
        params = {
            "namespace": namespace,
            "namespaces": None if namespaces is None else json.dumps(list(namespaces)),
            "name": job, "statuses": None if statuses is None else json.dumps(list(statuses)),
            "type": type_, "since": since, "until": until, "limit": limit, "offset": offset,
        }
        rows, total = self._page("executions", EXECUTION_ORDERS[sort], params, count)
        return [_execution(row) for row in rows], total

    def _page(self, table: str, order: str, params: dict[str, Any], count: bool = True
              ) -> tuple[list[Any], int]:
        """Rows of ``page_<table>`` and ``count_<table>`` with the filters that are set."""
        where = " AND ".join(fragment for name, fragment in PAGE_FILTERS[table].items()
                             if name == "*" or params.get(name) is not None) or "1"
        used = {k: v for k, v in params.items() if v is not None}
        try:
            with self._lock:
                rows = self._db.execute(
                    self._queries[f"page_{table}"].format(where=where, order=order), used
                ).fetchall()
                total = -1
                if count:
                    counted = {k: v for k, v in used.items() if k not in ("limit", "offset")}
                    (total,) = self._db.execute(
                        self._queries[f"count_{table}"].format(where=where), counted
                    ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"state file {self.path}: page_{table} failed: {exc}") from exc
        return rows, int(total)

    def events_for(self, after: int, namespaces: Iterable[str] | None = None,
                   limit: int = 500) -> list[Event]:
        """Events after ``seq``, limited to ``namespaces`` (events without one included)."""
        params = {"after": after, "limit": limit,
                  "namespaces": None if namespaces is None else json.dumps(list(namespaces))}
        with self._lock:
            rows = self._run("select_events_filtered", params).fetchall()
        return [_event(row) for row in rows]

    def last_event_seq(self) -> int:
        with self._lock:
            (seq,) = self._run("last_event_seq").fetchone()
        return int(seq)

    # --- runs: reads ---------------------------------------------------------------

    def job_states(self, uids: Iterable[str]) -> dict[str, JobState]:
        with self._lock:
            rows = self._run("select_job_state", {"uids": json.dumps(list(uids))}).fetchall()
        return {row[0]: JobState(*row) for row in rows}

    def jobs_needing_sync(self, batch: int = 1000) -> Iterator[list[Stored]]:
        """Jobs the scheduler must look at again, in batches (never all in memory)."""
        with self._lock:
            rows = self._run("jobs_needing_sync").fetchall()
        for start in range(0, len(rows), batch):
            yield [_stored(row) for row in rows[start:start + batch]]

    def waiting_of_job(self, job_uid: str) -> list[Waiting]:
        """The job's pending and queued runs."""
        with self._lock:
            rows = self._run("waiting_of_job", {"job_uid": job_uid}).fetchall()
        return [Waiting(row[0], RunStatus(row[1]), row[2], row[3], row[4]) for row in rows]

    def next_due(self) -> str | None:
        with self._lock:
            (due,) = self._run("next_due").fetchone()
        return str(due) if due is not None else None

    def queued_candidates(
        self, now: str, limit: int, offset: int = 0
    ) -> list[tuple[str, str, Stored | None]]:
        """(id, job uid, job or None if deleted) of queued runs still within their starting
        deadline at ``now``, in dispatch order; the jobs come without status."""
        params = {"now": now, "limit": limit, "offset": offset}
        with self._lock:
            rows = self._run("queued_candidates", params).fetchall()
        return [(row[0], row[1], _stored(row[2:], False) if row[2] else None) for row in rows]

    def executions(
        self, namespace: str | None = None, name: str | None = None,
        status: str | None = None, limit: int = 100,
    ) -> list[Execution]:
        params = {"namespace": namespace, "name": name, "status": status, "limit": limit}
        with self._lock:
            rows = self._run("select_executions", params).fetchall()
        return [_execution(row) for row in rows]

    def execution(self, run_id: str) -> tuple[Execution, list[dict[str, Any]]] | None:
        """One execution with its output, and its attempts."""
        with self._lock:
            row = self._run("select_execution", {"id": run_id}).fetchone()
            attempts = self._run("select_attempts", {"id": run_id}).fetchall()
        if row is None:
            return None
        return _execution(row[:-1], output=row[-1]), [
            {"attempt": a[0], "startedAt": a[1], "finishedAt": a[2], "status": a[3],
             "exitCode": a[4], "httpStatus": a[5], "error": a[6]}
            for a in attempts
        ]

    def job_run_summary(self, job_uid: str) -> tuple[str | None, str | None]:
        """('<run id> <status> <finished>' of the last finished run, next due time)."""
        with self._lock:
            last, upcoming = self._run("job_run_summary", {"job_uid": job_uid}).fetchone()
        return last, upcoming

    async def call(self, work: Callable[[], T]) -> T:
        """Run ``work`` (blocking calls on this store) for the event loop: right there when
        no other thread is using the store, as the dispatch path's reads and writes take a
        fraction of a millisecond and a hop to a thread costs as much; in a worker thread
        when another thread holds the store (a reconcile), so the loop never waits for it.
        """
        if self._lock.acquire(blocking=False):
            try:
                return work()
            finally:
                self._lock.release()
        return await asyncio.to_thread(work)

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
                if self._checkpointer is not None:
                    self._checkpointer.committed()


CHECKPOINT_PAGES = 1000
"""SQLite's default threshold of log pages for a checkpoint."""


class _Checkpointer:
    """Copies the write-ahead log back into the database from a connection and thread of
    its own, so that no commit waits for it.

    SQLite's automatic checkpoint runs inside the commit that crosses its threshold, two
    fsyncs included: several milliseconds, about once a second while runs are dispatched,
    added to whichever claim crosses it. A PASSIVE checkpoint from another connection
    never blocks the writer. While the writer never pauses (a long burst), the log cannot
    restart from its beginning; SQLite's own checkpoint, at a higher threshold, bounds it.
    """

    def __init__(self, path: str, every: int = 32) -> None:
        self._path = path
        self._every = every
        self._commits = 0
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def committed(self) -> None:
        """Called by the writer after each commit (under the store's lock)."""
        self._commits += 1
        if self._commits < self._every:
            return
        self._commits = 0
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="oneoff-checkpoint",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        db = sqlite3.connect(self._path, check_same_thread=False)
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._closed:
                    return
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    pass  # busy or failing: the next nudge, or SQLite's own, checkpoints
        finally:
            db.close()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()


class Transaction:
    """Writes inside one open transaction; obtained from :meth:`Store.transaction`."""

    def __init__(self, store: Store, now: str) -> None:
        self._store = store
        self.now = now
        self._bumped = False

    def _objects_changed(self) -> None:
        if not self._bumped:
            self._store._run("bump_objects_revision")
            self._bumped = True

    def create(self, desired: Desired, source: str, status: dict[str, Any]) -> str:
        self._objects_changed()
        uid = str(uuid.uuid4())
        self._store._run(
            "insert_object",
            {
                **_object_params(desired, source, self.now, canonical_json(status)),
                "uid": uid,
            },
        )
        self.event("object.created", desired.key, uid, {"source": source, "generation": 1})
        return uid

    def create_many(
        self, objects: list[tuple[Desired, dict[str, Any]]], source: str
    ) -> list[str]:
        """Insert many new objects (and their events) in two statements; returns uids."""
        if objects:
            self._objects_changed()
        uids = [str(uuid.uuid4()) for _ in objects]
        encoded: dict[int, str] = {}  # new objects mostly share one status: encode it once
        rows = []
        for (desired, status), uid in zip(objects, uids, strict=True):
            if (text := encoded.get(id(status))) is None:
                text = encoded[id(status)] = canonical_json(status)
            rows.append({**_object_params(desired, source, self.now, text), "uid": uid})
        try:
            db = self._store._db
            db.executemany(self._store._queries["insert_object"], rows)
            data = canonical_json({"source": source, "generation": 1})
            db.executemany(self._store._queries["insert_event"], [
                {"at": self.now, "type": "object.created", "kind": desired.key.kind,
                 "namespace": desired.key.namespace, "name": desired.key.name, "uid": uid,
                 "data": data}
                for (desired, _), uid in zip(objects, uids, strict=True)
            ])
        except sqlite3.Error as exc:
            raise StoreError(f"state file {self._store.path}: insert failed: {exc}") from exc
        return uids

    def update(self, uid: str, desired: Desired, source: str, status: dict[str, Any]) -> int:
        self._objects_changed()
        (generation,) = self._store._run(
            "update_object",
            {
                **_object_params(desired, source, self.now, canonical_json(status)),
                "uid": uid,
            },
        ).fetchone()
        self.event("object.updated", desired.key, uid, {"source": source, "generation": generation})
        return int(generation)

    def relocate(self, uid: str, file: str, line: int) -> None:
        """Record a new file:line for an object whose content did not change."""
        self._objects_changed()
        self._store._run("relocate_object", {"uid": uid, "file": file, "line": line})

    def set_status(self, uid: str, status: dict[str, Any]) -> None:
        """Replace an object's status (no generation or revision change: status is the
        server's, not the declaration)."""
        self._store._run("update_object_status", {"uid": uid, "status": canonical_json(status)})

    def delete(self, stored: Stored) -> None:
        self._objects_changed()
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

    def audit(self, key: str | None, action: str, target: str, detail: Mapping[str, Any],
              remote: str | None) -> None:
        """One audit row, landing with the change it records."""
        self._store._run("insert_audit", {
            "at": self.now, "key": key, "action": action, "target": target,
            "detail": canonical_json(dict(detail)), "remote": remote})

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


    # --- runs ----------------------------------------------------------------------

    def add_run(
        self, job: Stored, scheduled_at: str, due_at: str, deadline_at: str, reason: str,
        run_id: str | None = None,
    ) -> str | None:
        """Create the run of a slot; ``None`` if that (job, scheduled time) already exists."""
        spec = job.spec
        run_id = run_id or new_run_id()
        row = self._store._run("insert_execution", {
            "id": run_id, "job_uid": job.uid, "namespace": job.key.namespace,
            "name": job.key.name, "type": _executor_type(spec),
            "scheduled_at": scheduled_at, "due_at": due_at, "deadline_at": deadline_at,
            "priority": spec.get("priority", 5), "status": RunStatus.PENDING.value,
            "reason": reason, "generation": job.generation, "now": self.now,
        }).fetchone()
        if row is None:
            return None
        self.event("execution.pending", job.key, run_id, {
            "run": run_id, "scheduledAt": scheduled_at, "reason": reason})
        return run_id

    def retime_run(self, run_id: str, job: Stored, due_at: str, deadline_at: str) -> None:
        self._store._run("retime_execution", {
            "id": run_id, "due_at": due_at, "deadline_at": deadline_at,
            "priority": job.spec.get("priority", 5), "generation": job.generation,
        })

    def set_run_status(
        self, run_id: str, before: RunStatus, after: RunStatus, error: str | None = None
    ) -> bool:
        """Move one run between statuses if it is still in ``before``; False if it was not."""
        check_transition(before, after)
        row = self._store._run("set_execution_status", {
            "id": run_id, "from_status": before.value, "status": after.value, "error": error,
            "final": after.final, "now": self.now,
        }).fetchone()
        if row is None:
            return False
        self.event(f"execution.{after.value}", ObjectKey("Job", row[1], row[2]), run_id, {
            "run": run_id, "from": before.value, "error": error or ""})
        return True

    def promote_due(
        self, now: str, soon: str | None = None, limit: int | None = None
    ) -> tuple[int, int]:
        """Waiting runs past their deadline → missed; pending ones due by ``soon`` (default
        ``now``) → queued, in dispatch order. At most ``limit`` of each (default all): the
        rest is left for the next call, and runs past their deadline are never claimed
        meanwhile. Returns the counts."""
        bound = -1 if limit is None else limit
        missed = self._store._run("due_to_missed", {"now": now, "limit": bound}).fetchall()
        queued = self._store._run("due_to_queued", {
            "now": now, "soon": soon or now, "limit": bound}).fetchall()
        try:
            self._store._db.executemany(self._store._queries["insert_event"], [
                {"at": self.now, "type": f"execution.{status}", "kind": "Job",
                 "namespace": namespace, "name": name, "uid": run_id,
                 "data": canonical_json({"run": run_id})}
                for rows in (missed, queued) for run_id, _, namespace, name, status in rows])
        except sqlite3.Error as exc:
            raise StoreError(f"state file {self._store.path}: recording runs failed: {exc}"
                             ) from exc
        return len(missed), len(queued)

    def claim_many(self, run_ids: list[str]) -> list[Claimed]:
        """queued → running for many runs in one statement, in the order given."""
        if not run_ids:
            return []
        rows = self._store._run("claim_executions", {
            "ids": json.dumps(run_ids), "now": self.now}).fetchall()
        claimed = {row[0]: Claimed(*row) for row in rows}
        ordered = [claimed[run_id] for run_id in run_ids if run_id in claimed]
        db, queries = self._store._db, self._store._queries
        db.executemany(queries["insert_attempt"], [
            {"id": c.id, "attempt": c.attempt, "now": self.now} for c in ordered])
        db.executemany(queries["insert_event"], [
            {"at": self.now, "type": "execution.running", "kind": "Job",
             "namespace": c.namespace, "name": c.name, "uid": c.id,
             "data": canonical_json({"run": c.id, "attempt": c.attempt})}
            for c in ordered])
        return ordered

    def finish_many(self, finished: list[Finish]) -> None:
        """Record the end of many attempts at once (the worker pool's group commit)."""
        attempts, executions, events = [], [], []
        for f in finished:
            after = RunStatus.PENDING if f.retry_at else f.status
            check_transition(RunStatus.RUNNING, after)
            common = {"id": f.run_id, "now": self.now, "exit_code": f.exit_code,
                      "http_status": f.http_status, "error": f.error}
            attempts.append({**common, "attempt": f.attempt, "status": f.status.value})
            executions.append({**common, "status": after.value, "final": after.final,
                               "due_at": f.retry_at or self.now, "output": f.output,
                               "truncated": f.truncated})
            events.append({
                "at": self.now,
                "type": "execution.retrying" if f.retry_at else f"execution.{f.status.value}",
                "kind": "Job", "namespace": f.namespace, "name": f.name, "uid": f.run_id,
                "data": canonical_json({
                    "run": f.run_id, "attempt": f.attempt, "status": f.status.value,
                    "error": f.error, "exitCode": f.exit_code, "httpStatus": f.http_status,
                    **({"retryAt": f.retry_at} if f.retry_at else {})}),
            })
        db, queries = self._store._db, self._store._queries
        try:
            db.executemany(queries["finish_attempt"], attempts)
            db.executemany(queries["finish_execution"], executions)
            db.executemany(queries["insert_event"], events)
        except sqlite3.Error as exc:
            raise StoreError(f"state file {self._store.path}: recording runs failed: {exc}"
                             ) from exc

    def recover_running(self) -> list[tuple[str, str, int]]:
        """Runs left running by a crash become lost; returns (id, job_uid, attempt)."""
        rows = self._store._run("running_to_lost", {"now": self.now}).fetchall()
        for run_id, _, namespace, name, attempt in rows:
            self._store._run("finish_attempt", {
                "id": run_id, "now": self.now, "exit_code": None, "http_status": None,
                "error": "the server stopped during this attempt", "status": "lost",
                "attempt": attempt})
            self.event("execution.lost", ObjectKey("Job", namespace, name), run_id,
                       {"run": run_id})
        return [(row[0], row[1], row[4]) for row in rows]

    def retry_lost(self, run_id: str) -> None:
        """An idempotent job's lost run goes back to pending, due now."""
        check_transition(RunStatus.LOST, RunStatus.PENDING)
        self._store._run("lost_to_pending", {"id": run_id, "now": self.now})
        self.event("execution.retrying", None, run_id, {"run": run_id, "after": "lost"})

    def set_job_state(self, state: JobState) -> None:
        self._store._run("upsert_job_state", {
            "job_uid": state.job_uid, "first_seen_at": state.first_seen_at,
            "last_slot": state.last_slot, "run_requested_at": state.run_requested_at,
            "generation": state.generation})

    def drop_job_state(self, job_uid: str) -> None:
        self._store._run("delete_job_state", {"job_uid": job_uid})

    def purge(self, before: str) -> tuple[int, int]:
        """Delete finished runs past retention or their job's historyLimit, old events."""
        runs = len(self._store._run("purge_history", {"before": before}).fetchall())
        self._store._run("purge_orphan_attempts")
        events = self._store._run("purge_events", {"before": before}).rowcount
        return runs, events


def job_status_extras(store: Store, jobs: Iterable[Stored]) -> dict[str, dict[str, Any]]:
    """``job_status_extra`` of many jobs in one query (a page of the API), by uid."""
    with store._lock:
        rows = store._run("job_run_summaries",
                          {"uids": json.dumps([job.uid for job in jobs])}).fetchall()
    return {uid: _status_extra(first_seen, last, upcoming)
            for uid, last, upcoming, first_seen in rows}


def _status_extra(first_seen: str | None, last: str | None, upcoming: str | None
                  ) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if first_seen is not None:
        extra["firstSeenAt"] = first_seen
    if last:
        run_id, status, finished = [*last.split(" "), "", ""][:3]
        extra["lastRun"] = {"id": run_id, "status": status, "finishedAt": finished}
    if upcoming:
        extra["nextRunAt"] = upcoming
    return extra


def job_status_extra(store: Store, job: Stored) -> dict[str, Any]:
    """When the scheduler first saw a job, its last and next run (``describe``, ``get -o``)."""
    last, upcoming = store.job_run_summary(job.uid)
    state = store.job_states([job.uid]).get(job.uid)
    return _status_extra(state.first_seen_at if state else None, last, upcoming)


def new_run_id() -> str:
    """A run id that sorts by creation time: 12 hex digits of milliseconds, 8 random."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def _executor_type(spec: dict[str, Any]) -> str:
    return next((t for t in ("http", "shell", "docker", "kubernetes") if t in spec), "?")


@dataclass(frozen=True, slots=True)
class JobState:
    """The scheduler's bookkeeping of one job (kept apart from the declared object)."""

    job_uid: str
    first_seen_at: str
    last_slot: str | None = None
    run_requested_at: str | None = None
    generation: int = 0
    """The job generation this state was last synced at."""


class Waiting(NamedTuple):
    """A pending or queued run of a job, as the scheduler re-times it."""

    id: str
    status: RunStatus
    scheduled_at: str
    reason: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Finish:
    """The end of one attempt, as the worker pool records it."""

    run_id: str
    namespace: str
    name: str
    attempt: int
    status: RunStatus
    exit_code: int | None
    http_status: int | None
    error: str
    output: str
    truncated: bool
    retry_at: str | None


@dataclass(frozen=True, slots=True)
class Claimed:
    """A run a worker now owns."""

    id: str
    job_uid: str
    namespace: str
    name: str
    type: str
    scheduled_at: str
    attempt: int
    generation: int
    reason: str
    started_at: str
    due_at: str
    """When it may start; a run is claimed up to a few ms before, and waits for it."""


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A claimed run and the job it belongs to: what the scheduler hands the workers."""

    run: Claimed
    job: Stored
    spec: JobSpec


PAGE_FILTERS: dict[str, dict[str, str]] = {
    "objects": {
        "kind": "o.kind = :kind",
        "namespace": "o.namespace = :namespace",
        "namespaces": "o.namespace IN (SELECT value FROM json_each(:namespaces))",
        "selector": """NOT EXISTS (
            SELECT 1 FROM json_each(:selector) AS r
            WHERE NOT (CASE json_extract(r.value, '$.op')
              WHEN '=' THEN coalesce((SELECT l.value FROM json_each(o.meta, '$[0]') AS l
                                      WHERE l.key = json_extract(r.value, '$.key'))
                                     = json_extract(r.value, '$.value'), 0)
              WHEN '!=' THEN coalesce((SELECT l.value FROM json_each(o.meta, '$[0]') AS l
                                       WHERE l.key = json_extract(r.value, '$.key'))
                                      != json_extract(r.value, '$.value'), 1)
              WHEN 'exists' THEN EXISTS (SELECT 1 FROM json_each(o.meta, '$[0]') AS l
                                         WHERE l.key = json_extract(r.value, '$.key'))
              ELSE NOT EXISTS (SELECT 1 FROM json_each(o.meta, '$[0]') AS l
                               WHERE l.key = json_extract(r.value, '$.key'))
            END))""",
    },
    "executions": {
        "namespace": "namespace = :namespace",
        "namespaces": "namespace IN (SELECT value FROM json_each(:namespaces))",
        "name": "name = :name",
        "statuses": "status IN (SELECT value FROM json_each(:statuses))",
        "type": "type = :type",
        "since": "scheduled_at >= :since",
        "until": "scheduled_at < :until",
    },
}
"""The WHERE fragments of the paged reads, used when their parameter is set. A label
selector is JSON ``[{"key", "op" (=, !=, exists, !exists), "value"}]``, checked with
``json_each`` over the labels, so any label key is safe."""

OBJECT_ORDERS = {
    "namespace": "namespace, name",
    "name": "name, namespace",
    "-name": "name DESC, namespace DESC",
    "creationTimestamp": "created_at, namespace, name",
    "-creationTimestamp": "created_at DESC, namespace, name",
    "generation": "generation, namespace, name",
    "-generation": "generation DESC, namespace, name",
}
"""The sort orders the API allows for objects (``sort=`` → ORDER BY)."""

EXECUTION_ORDERS = {
    "-createdAt": "seq DESC",
    "createdAt": "seq",
    "-scheduledAt": "scheduled_at DESC, seq DESC",
    "scheduledAt": "scheduled_at, seq",
    "-finishedAt": "finished_at DESC, seq DESC",
    "finishedAt": "finished_at, seq",
    "-priority": "priority DESC, seq",
    "priority": "priority, seq",
}
"""The sort orders the API allows for executions."""


def _event(row: tuple[Any, ...]) -> Event:
    return Event(
        seq=row[0], at=row[1], type=row[2],
        key=ObjectKey(row[3], row[4], row[5]) if row[3] else None,
        uid=row[6], data=json.loads(row[7]),
    )


def _execution(row: tuple[Any, ...], output: str | None = None) -> Execution:
    return Execution(
        seq=row[0], id=row[1], job_uid=row[2], namespace=row[3], name=row[4], type=row[5],
        scheduled_at=row[6], due_at=row[7], priority=row[8], status=RunStatus(row[9]),
        reason=row[10], attempt=row[11], generation=row[12], created_at=row[13],
        started_at=row[14], finished_at=row[15], exit_code=row[16], http_status=row[17],
        error=row[18], truncated=bool(row[19]), output=output,
    )


def _object_params(desired: Desired, source: str, now: str, status_json: str
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
        "status": status_json,
    }


def _stored(row: tuple[Any, ...], with_status: bool = True) -> Stored:
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
        status=json.loads(row[13]) if with_status else {},
    )


# --- audit log and metrics -------------------------------------------------------------
# Module functions (as job_status_extras above) so that this part stays apart from the
# run queries; each takes the store's lock as its methods do.


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One mutating action: who (the key's name), what, on what, when, from where."""

    seq: int
    at: str
    key: str | None
    action: str
    target: str
    detail: dict[str, Any]
    remote: str | None


def record_audit(store: Store, now: datetime, key: str | None, action: str, target: str,
                 detail: Mapping[str, Any], remote: str | None) -> None:
    """Write one audit row in a transaction of its own."""
    with store.transaction(now) as tx:
        tx.audit(key, action, target, detail, remote)


def page_audit(
    store: Store, *, action: str | None = None, key: str | None = None,
    target: str | None = None, since: str | None = None, until: str | None = None,
    limit: int = 100, offset: int = 0,
) -> tuple[list[AuditEntry], int]:
    """One page of the audit log, newest first, and the number of all matches
    (``target``: text found in the target or the detail, e.g. a run id)."""
    if target is not None:
        target = target.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    params = {"action": action, "key": key, "target": target, "since": since, "until": until}
    with store._lock:
        rows = store._run("page_audit", {**params, "limit": limit, "offset": offset}).fetchall()
        (total,) = store._run("count_audit", params).fetchone()
    return [AuditEntry(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6])
            for row in rows], int(total)


def purge_audit(store: Store, now: datetime, before: str) -> int:
    """Delete audit rows older than ``before``; returns how many."""
    with store.transaction(now):
        return int(store._run("purge_audit", {"before": before}).rowcount)


def use_incremental_vacuum(store: Store) -> bool:
    """Make the file one that can give free pages back (``auto_vacuum=INCREMENTAL``).

    SQLite switches an existing file only by rewriting it with ``VACUUM``, which cannot
    run inside a transaction, so this is not a migration: the daemon calls it once on
    start, before anything else writes. A file already switched costs one PRAGMA read.
    Returns whether the file was rewritten.
    """
    with store._lock:
        (mode,) = store._run("auto_vacuum_mode").fetchone()
        if mode == 2:
            return False
        store._run("set_incremental_auto_vacuum")
        store._run("vacuum")
    return True


def reclaim_space(store: Store) -> int:
    """Give the free pages (left by a purge) back to the file system; returns how many."""
    with store._lock:
        (free,) = store._run("freelist_count").fetchone()
        if free:
            # run to completion: through execute(), Python's sqlite3 steps it once (a page)
            try:
                store._db.executescript(store._queries["incremental_vacuum"])
            except sqlite3.Error as exc:
                raise StoreError(f"state file {store.path}: incremental_vacuum failed: {exc}"
                                 ) from exc
    return int(free)


def state_file_bytes(store: Store) -> int:
    """The state file and its write-ahead log, in bytes."""
    total = 0
    for path in (store.path, store.path + "-wal"):
        try:
            total += os.path.getsize(path)
        except OSError:
            pass  # no log right after a checkpoint
    return total


class MetricEvent(NamedTuple):
    """One event the metrics collector counts, with what it needs of its run."""

    type: str
    namespace: str | None
    attempt: int | None
    run_type: str | None
    """The run's executor type; None if the run was purged since."""
    lateness: float | None
    """Seconds from the run's scheduled time to its first start."""
    seconds: float | None
    """Seconds the event's attempt ran, if it names a finished attempt."""


def metric_events(store: Store, after: int, upto: int) -> list[MetricEvent]:
    """The counted events with ``after < seq <= upto``, in order (see ``metric_events``
    in queries.sql): one query per batch, no event decoded in Python."""
    with store._lock:
        rows = store._run("metric_events", {"after": after, "upto": upto}).fetchall()
    return [MetricEvent(*row) for row in rows]


def queue_depth(store: Store) -> dict[int, int]:
    """Queued runs by priority."""
    with store._lock:
        return dict(store._run("metric_queue_depth").fetchall())


def job_state_counts(store: Store) -> dict[str, int]:
    """Jobs by state: suspended, running, waiting, done."""
    with store._lock:
        return dict(store._run("metric_job_states").fetchall())

-- Objects declared by sources, their status, and the event log.
CREATE TABLE objects (
    uid          TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    namespace    TEXT NOT NULL,
    name         TEXT NOT NULL,
    generation   INTEGER NOT NULL,
    spec         TEXT NOT NULL,           -- canonical JSON, as written (no defaults)
    meta         TEXT NOT NULL,           -- canonical JSON [labels, annotations]
    spec_digest  TEXT NOT NULL,           -- sha256 of spec; generation moves with it
    source       TEXT NOT NULL,           -- dir:<absolute path> or api:<field manager>
    file         TEXT,
    line         INTEGER,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT '{}',
    UNIQUE (kind, namespace, name)
);
CREATE INDEX objects_by_source ON objects (source);

CREATE TABLE sources (
    name            TEXT PRIMARY KEY,
    last_attempt_at TEXT,
    last_sync_at    TEXT,                 -- last reconcile that applied cleanly
    ok              INTEGER NOT NULL DEFAULT 0,
    objects         INTEGER NOT NULL DEFAULT 0,
    message         TEXT NOT NULL DEFAULT '',
    issues          TEXT NOT NULL DEFAULT '[]'   -- JSON list of {file,line,column,field,message}
);

CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         TEXT NOT NULL,
    type       TEXT NOT NULL,             -- object.created, object.updated, reconcile.failed, ...
    kind       TEXT,
    namespace  TEXT,
    name       TEXT,
    uid        TEXT,
    data       TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX events_by_at ON events (at);

-- The audit log: one row per mutating action through the API (apply, create, delete, run,
-- cancel; API keys are created and revoked as objects), kept under the same retention as
-- executions (ONEOFF_RETENTION_DAYS).
CREATE TABLE audit (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,                -- RFC 3339 UTC, as every stored instant
    key     TEXT,                         -- the API key's name; NULL when no key is declared
    action  TEXT NOT NULL,                -- apply, create, delete, run, cancel
    target  TEXT NOT NULL,                -- "Job default/ping", "run 019ae2...", "apply api:ci"
    detail  TEXT NOT NULL DEFAULT '{}',   -- JSON: run ids, plan counts, ...
    remote  TEXT                          -- the client's address as the server saw it
);
CREATE INDEX audit_by_at ON audit (at);
CREATE INDEX audit_by_action ON audit (action, seq);

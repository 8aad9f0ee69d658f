-- Runs: one row per (job, scheduled time) slot, its attempts, and the scheduler's
-- per-job bookkeeping.
CREATE TABLE executions (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,   -- creation order
    id           TEXT NOT NULL UNIQUE,                -- the run id users see
    job_uid      TEXT NOT NULL,
    namespace    TEXT NOT NULL,
    name         TEXT NOT NULL,                       -- the job's name (it may be deleted later)
    type         TEXT NOT NULL,                       -- executor: http, shell, docker, kubernetes
    scheduled_at TEXT NOT NULL,                       -- the slot; (job_uid, scheduled_at) is unique
    due_at       TEXT NOT NULL,                       -- when it may start (a retry moves it)
    deadline_at  TEXT NOT NULL,                       -- later than this it is missed, not started
    priority     INTEGER NOT NULL,
    status       TEXT NOT NULL,
    reason       TEXT NOT NULL,                       -- schedule, manual, run-requested
    attempt      INTEGER NOT NULL DEFAULT 0,
    generation   INTEGER NOT NULL,                    -- the job generation it was made for
    created_at   TEXT NOT NULL,
    started_at   TEXT,                                -- first attempt
    finished_at  TEXT,
    exit_code    INTEGER,
    http_status  INTEGER,
    error        TEXT NOT NULL DEFAULT '',
    output       TEXT NOT NULL DEFAULT '',            -- the last attempt's output (capped)
    truncated    INTEGER NOT NULL DEFAULT 0,
    UNIQUE (job_uid, scheduled_at)
);
CREATE INDEX executions_waiting ON executions (status, due_at)
    WHERE status IN ('pending', 'queued');
CREATE INDEX executions_by_job ON executions (job_uid, seq);
CREATE INDEX executions_by_name ON executions (namespace, name, seq);
CREATE INDEX executions_running ON executions (status) WHERE status = 'running';

CREATE TABLE attempts (
    execution_id TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    status       TEXT NOT NULL,
    exit_code    INTEGER,
    http_status  INTEGER,
    error        TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (execution_id, attempt)
);

CREATE TABLE job_state (
    job_uid          TEXT PRIMARY KEY,
    first_seen_at    TEXT NOT NULL,                   -- 'after' and 'at: now' count from here
    last_slot        TEXT,                            -- the last cron slot created
    run_requested_at TEXT                             -- last seen oneoff.dev/run-requested-at
);

-- Named queries: every SQL statement OneOff runs. Loaded by store.py; a block starts
-- with "-- name: <query name>" and runs until the next one.

-- name: select_object_by_uid
SELECT uid, kind, namespace, name, generation, spec, meta, spec_digest, source, file, line,
       created_at, updated_at, status
FROM objects WHERE uid = :uid;

-- name: select_object
SELECT uid, kind, namespace, name, generation, spec, meta, spec_digest, source, file, line,
       created_at, updated_at, status
FROM objects WHERE kind = :kind AND namespace = :namespace AND name = :name;

-- name: select_objects
SELECT uid, kind, namespace, name, generation, spec, meta, spec_digest, source, file, line,
       created_at, updated_at, status
FROM objects
WHERE (:kind IS NULL OR kind = :kind)
  AND (:namespace IS NULL OR namespace = :namespace)
  AND (:source IS NULL OR source = :source)
  AND (:name IS NULL OR name = :name)
ORDER BY kind, namespace, name;

-- name: select_objects_of_kind
SELECT uid, kind, namespace, name, generation, spec, meta, spec_digest, source, file, line,
       created_at, updated_at, status
FROM objects
WHERE kind = :kind
  AND (:namespace IS NULL OR namespace = :namespace)
  AND (:source IS NULL OR source = :source)
  AND (:name IS NULL OR name = :name)
ORDER BY kind, namespace, name;

-- name: select_objects_of_source
SELECT uid, kind, namespace, name, generation, spec, meta, spec_digest, source, file, line,
       created_at, updated_at, status
FROM objects
WHERE source = :source
  AND (:kind IS NULL OR kind = :kind)
  AND (:namespace IS NULL OR namespace = :namespace)
  AND (:name IS NULL OR name = :name)
ORDER BY kind, namespace, name;

-- name: insert_object
INSERT INTO objects (uid, kind, namespace, name, generation, spec, meta, spec_digest, source,
                     file, line, created_at, updated_at, status)
VALUES (:uid, :kind, :namespace, :name, 1, :spec, :meta, :spec_digest, :source,
        :file, :line, :now, :now, :status);

-- name: update_object
UPDATE objects
SET generation = generation + (spec_digest != :spec_digest),
    spec = :spec, meta = :meta, spec_digest = :spec_digest, source = :source,
    file = :file, line = :line, updated_at = :now, status = :status
WHERE uid = :uid
RETURNING generation;

-- name: relocate_object
UPDATE objects SET file = :file, line = :line WHERE uid = :uid;

-- name: delete_object
DELETE FROM objects WHERE uid = :uid;

-- name: upsert_source
INSERT INTO sources (name, last_attempt_at, last_sync_at, ok, objects, message, issues)
VALUES (:name, :now, CASE WHEN :ok THEN :now END, :ok, :objects, :message, :issues)
ON CONFLICT (name) DO UPDATE SET
    last_attempt_at = excluded.last_attempt_at,
    last_sync_at = COALESCE(excluded.last_sync_at, sources.last_sync_at),
    ok = excluded.ok, objects = excluded.objects, message = excluded.message,
    issues = excluded.issues;

-- name: select_sources
SELECT name, last_attempt_at, last_sync_at, ok, objects, message, issues
FROM sources ORDER BY name;

-- name: insert_event
INSERT INTO events (at, type, kind, namespace, name, uid, data)
VALUES (:at, :type, :kind, :namespace, :name, :uid, :data);

-- name: select_events
SELECT seq, at, type, kind, namespace, name, uid, data
FROM events WHERE seq > :after ORDER BY seq LIMIT :limit;

-- name: insert_execution
INSERT INTO executions (id, job_uid, namespace, name, type, scheduled_at, due_at, deadline_at,
                        priority, status, reason, generation, created_at)
VALUES (:id, :job_uid, :namespace, :name, :type, :scheduled_at, :due_at, :deadline_at,
        :priority, :status, :reason, :generation, :now)
ON CONFLICT (job_uid, scheduled_at) DO NOTHING
RETURNING seq;

-- name: select_job_state
SELECT job_uid, first_seen_at, last_slot, run_requested_at, generation FROM job_state
WHERE job_uid IN (SELECT value FROM json_each(:uids));

-- name: upsert_job_state
INSERT INTO job_state (job_uid, first_seen_at, last_slot, run_requested_at, generation)
VALUES (:job_uid, :first_seen_at, :last_slot, :run_requested_at, :generation)
ON CONFLICT (job_uid) DO UPDATE SET
    last_slot = excluded.last_slot, run_requested_at = excluded.run_requested_at,
    generation = excluded.generation;

-- name: jobs_needing_sync
-- Jobs the scheduler has not synced at their current generation, whose run-request
-- annotation moved, or cron jobs without a waiting slot (what a crash can leave behind).
SELECT o.uid, o.kind, o.namespace, o.name, o.generation, o.spec, o.meta, o.spec_digest,
       o.source, o.file, o.line, o.created_at, o.updated_at, o.status
FROM objects o LEFT JOIN job_state s ON s.job_uid = o.uid
WHERE o.kind = 'Job'
  AND (s.job_uid IS NULL
       OR s.generation != o.generation
       OR COALESCE(json_extract(o.meta, '$[1]."oneoff.dev/run-requested-at"'), '')
          != COALESCE(s.run_requested_at, '')
       OR (json_extract(o.spec, '$.schedule.cron') IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM executions e
                           WHERE e.job_uid = o.uid AND e.status IN ('pending', 'queued'))));

-- name: delete_job_state
DELETE FROM job_state WHERE job_uid = :job_uid;

-- name: waiting_of_job
SELECT id, status, scheduled_at, reason, attempt FROM executions
WHERE job_uid = :job_uid AND status IN ('pending', 'queued');

-- name: retime_execution
UPDATE executions
SET due_at = :due_at, deadline_at = :deadline_at, priority = :priority, generation = :generation
WHERE id = :id AND status IN ('pending', 'queued');

-- name: set_execution_status
UPDATE executions
SET status = :status, error = COALESCE(:error, error),
    finished_at = CASE WHEN :final THEN :now ELSE finished_at END
WHERE id = :id AND status = :from_status
RETURNING job_uid, namespace, name;

-- name: due_to_missed
-- At most :limit a call (-1: all), earliest deadline first; the rest waits for the next
-- call, and is neither queued nor claimed meanwhile (both check the deadline).
UPDATE executions SET status = 'missed', finished_at = :now,
    error = 'not started within startingDeadlineSeconds of its time'
WHERE seq IN (SELECT seq FROM executions INDEXED BY executions_deadline
              WHERE status IN ('pending', 'queued') AND deadline_at < :now
              ORDER BY deadline_at LIMIT :limit)
RETURNING id, job_uid, namespace, name, status;

-- name: due_to_queued
-- At most :limit a call (-1: all), in dispatch order, so a burst's first claim does not
-- wait until all of it is queued, and what is queued first is what a claim takes first.
UPDATE executions SET status = 'queued'
WHERE seq IN (
    SELECT seq FROM executions INDEXED BY executions_waiting
    -- the first term repeats the partial index's condition so SQLite may use the index
    WHERE status IN ('pending', 'queued') AND status = 'pending' AND due_at <= :soon
      AND deadline_at >= :now
      AND NOT EXISTS (SELECT 1 FROM objects o INDEXED BY objects_suspended
                      WHERE o.uid = executions.job_uid AND json_extract(o.spec, '$.suspend') = 1)
    ORDER BY priority DESC, due_at, seq LIMIT :limit)
RETURNING id, job_uid, namespace, name, status;

-- name: queued_candidates
-- Queued runs within their starting deadline, in dispatch order, each with its job
-- (without status; NULL columns if the job was deleted).
SELECT e.id, e.job_uid,
       o.uid, o.kind, o.namespace, o.name, o.generation, o.spec, o.meta, o.spec_digest,
       o.source, o.file, o.line, o.created_at, o.updated_at, '{}'
FROM executions e INDEXED BY executions_queue LEFT JOIN objects o ON o.uid = e.job_uid
WHERE e.status = 'queued' AND e.deadline_at >= :now
ORDER BY e.priority DESC, e.due_at, e.seq LIMIT :limit OFFSET :offset;

-- name: insert_attempt
INSERT INTO attempts (execution_id, attempt, started_at, status)
VALUES (:id, :attempt, :now, 'running');

-- name: finish_attempt
UPDATE attempts SET finished_at = :now, status = :status, exit_code = :exit_code,
    http_status = :http_status, error = :error
WHERE execution_id = :id AND attempt = :attempt;

-- name: running_to_lost
UPDATE executions SET status = 'lost', finished_at = :now,
    error = 'the server stopped while this run was running'
WHERE status = 'running'
RETURNING id, job_uid, namespace, name, attempt;

-- name: next_due
-- When the scheduler must look again: the earliest pending run it may queue (runs of a
-- suspended job wait), or the earliest starting deadline of a waiting run.
SELECT min(coalesce(due, deadline), coalesce(deadline, due)) FROM (SELECT
  (SELECT due_at FROM executions INDEXED BY executions_waiting
   WHERE status IN ('pending', 'queued') AND status = 'pending'
     AND NOT EXISTS (SELECT 1 FROM objects o INDEXED BY objects_suspended
                     WHERE o.uid = executions.job_uid AND json_extract(o.spec, '$.suspend') = 1)
   ORDER BY due_at LIMIT 1) AS due,
  (SELECT MIN(deadline_at) FROM executions INDEXED BY executions_deadline
   WHERE status IN ('pending', 'queued')) AS deadline);

-- name: count_queued
SELECT COUNT(*) FROM executions WHERE status = 'queued';

-- name: select_executions
SELECT seq, id, job_uid, namespace, name, type, scheduled_at, due_at, priority, status, reason,
       attempt, generation, created_at, started_at, finished_at, exit_code, http_status, error,
       truncated
FROM executions
WHERE (:namespace IS NULL OR namespace = :namespace)
  AND (:name IS NULL OR name = :name)
  AND (:status IS NULL OR status = :status)
ORDER BY seq DESC LIMIT :limit;

-- name: select_execution
SELECT seq, id, job_uid, namespace, name, type, scheduled_at, due_at, priority, status, reason,
       attempt, generation, created_at, started_at, finished_at, exit_code, http_status, error,
       truncated, output
FROM executions WHERE id = :id;

-- name: select_attempts
SELECT attempt, started_at, finished_at, status, exit_code, http_status, error
FROM attempts WHERE execution_id = :id ORDER BY attempt;

-- name: job_run_summary
SELECT
  (SELECT id || ' ' || status || ' ' || COALESCE(finished_at, '') FROM executions
     WHERE job_uid = :job_uid AND finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1),
  (SELECT MIN(due_at) FROM executions WHERE job_uid = :job_uid AND status = 'pending');

-- name: job_run_summaries
SELECT j.value,
  (SELECT id || ' ' || status || ' ' || COALESCE(finished_at, '') FROM executions
     WHERE job_uid = j.value AND finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1),
  (SELECT MIN(due_at) FROM executions WHERE job_uid = j.value AND status = 'pending'),
  (SELECT first_seen_at FROM job_state WHERE job_uid = j.value)
FROM json_each(:uids) AS j;

-- name: purge_history
DELETE FROM executions
WHERE finished_at IS NOT NULL
  AND (finished_at < :before
       OR seq IN (SELECT seq FROM (
            SELECT seq, job_uid,
                   status = 'succeeded' AS ok,
                   ROW_NUMBER() OVER (PARTITION BY job_uid, status = 'succeeded'
                                      ORDER BY seq DESC) AS n
            FROM executions WHERE finished_at IS NOT NULL) ranked
          JOIN (SELECT uid, COALESCE(json_extract(spec, '$.historyLimit.succeeded'), 10) AS ks,
                       COALESCE(json_extract(spec, '$.historyLimit.failed'), 10) AS kf
                FROM objects WHERE kind = 'Job') limits ON limits.uid = ranked.job_uid
          WHERE n > CASE WHEN ok THEN ks ELSE kf END))
RETURNING id;

-- name: purge_orphan_attempts
DELETE FROM attempts WHERE execution_id NOT IN (SELECT id FROM executions);

-- name: purge_events
DELETE FROM events WHERE at < :before;

-- name: lost_to_pending
UPDATE executions SET status = 'pending', due_at = :now, finished_at = NULL,
    deadline_at = '9999-12-31T00:00:00.000Z'
WHERE id = :id AND status = 'lost';

-- name: bump_objects_revision
UPDATE counters SET value = value + 1 WHERE name = 'objects';

-- name: objects_revision
SELECT value FROM counters WHERE name = 'objects';

-- name: claim_executions
UPDATE executions
SET status = 'running', attempt = attempt + 1,
    -- a run claimed a few ms ahead of its time starts at its time
    started_at = COALESCE(started_at, MAX(:now, due_at))
WHERE status = 'queued' AND id IN (SELECT value FROM json_each(:ids))
RETURNING id, job_uid, namespace, name, type, scheduled_at, attempt, generation, reason,
          started_at, due_at;

-- name: finish_execution
-- the starting deadline is about the first start; a retry is bounded by the job's
-- activeDeadlineSeconds instead
UPDATE executions
SET status = :status, finished_at = CASE WHEN :final THEN :now END, due_at = :due_at,
    deadline_at = CASE WHEN :status = 'pending' THEN '9999-12-31T00:00:00.000Z'
                       ELSE deadline_at END,
    exit_code = :exit_code, http_status = :http_status, error = :error, output = :output,
    truncated = :truncated
WHERE id = :id AND status = 'running';

-- name: select_objects_by_uid
SELECT uid, kind, namespace, name, generation, spec, meta, spec_digest, source, file, line,
       created_at, updated_at, status
FROM objects WHERE uid IN (SELECT value FROM json_each(:uids));

-- name: select_objects_by_key
-- The stored objects among the given [kind, namespace, name] keys (a JSON list).
SELECT o.uid, o.kind, o.namespace, o.name, o.generation, o.spec, o.meta, o.spec_digest,
       o.source, o.file, o.line, o.created_at, o.updated_at, '{}'
FROM json_each(:keys) AS k
JOIN objects o ON o.kind = json_extract(k.value, '$[0]')
              AND o.namespace = json_extract(k.value, '$[1]')
              AND o.name = json_extract(k.value, '$[2]');

-- --- API reads: filtered, sorted, paged ---------------------------------------------
-- {where} and {order} are replaced by fixed fragments chosen in store.py (PAGE_FILTERS,
-- OBJECT_ORDERS, EXECUTION_ORDERS), never by request text; the values are parameters.
-- The page is chosen on narrow rows (uid or seq and the sort columns), then read whole.

-- name: page_objects
SELECT uid, kind, namespace, name, generation, spec, meta, spec_digest, source, file, line,
       created_at, updated_at, status
FROM objects
WHERE uid IN (SELECT uid FROM objects AS o WHERE {where} ORDER BY {order}
              LIMIT :limit OFFSET :offset)
ORDER BY {order};

-- name: count_objects
SELECT COUNT(*) FROM objects AS o WHERE {where};

-- name: page_executions
SELECT seq, id, job_uid, namespace, name, type, scheduled_at, due_at, priority, status, reason,
       attempt, generation, created_at, started_at, finished_at, exit_code, http_status, error,
       truncated
FROM executions
WHERE seq IN (SELECT seq FROM executions WHERE {where} ORDER BY {order}
              LIMIT :limit OFFSET :offset)
ORDER BY {order};

-- name: count_executions
SELECT COUNT(*) FROM executions WHERE {where};

-- name: select_events_filtered
SELECT seq, at, type, kind, namespace, name, uid, data
FROM events
WHERE seq > :after
  AND (:namespaces IS NULL OR namespace IN (SELECT value FROM json_each(:namespaces)))
ORDER BY seq LIMIT :limit;

-- name: last_event_seq
SELECT coalesce(max(seq), 0) FROM events;

-- name: update_object_status
UPDATE objects SET status = :status WHERE uid = :uid;

-- --- audit log and metrics (oneoff.metrics, GET /api/v1/audit) -----------------------

-- name: insert_audit
INSERT INTO audit (at, key, action, target, detail, remote)
VALUES (:at, :key, :action, :target, :detail, :remote);

-- name: page_audit
-- Newest first; every filter optional (NULL: not filtered); :target is text found in the
-- target or the detail (a run id finds its run, its cancel, its job's cancel).
SELECT seq, at, key, action, target, detail, remote FROM audit
WHERE (:action IS NULL OR action = :action)
  AND (:key IS NULL OR key = :key)
  AND (:target IS NULL OR target LIKE '%' || :target || '%' ESCAPE '\'
       OR detail LIKE '%' || :target || '%' ESCAPE '\')
  AND (:since IS NULL OR at >= :since)
  AND (:until IS NULL OR at < :until)
ORDER BY seq DESC LIMIT :limit OFFSET :offset;

-- name: count_audit
SELECT COUNT(*) FROM audit
WHERE (:action IS NULL OR action = :action)
  AND (:key IS NULL OR key = :key)
  AND (:target IS NULL OR target LIKE '%' || :target || '%' ESCAPE '\'
       OR detail LIKE '%' || :target || '%' ESCAPE '\')
  AND (:since IS NULL OR at >= :since)
  AND (:until IS NULL OR at < :until);

-- name: purge_audit
DELETE FROM audit WHERE at < :before;

-- name: metric_events
-- The events of (:after, :upto] the metrics collector counts, each with what it needs of
-- its run: the executor type, the seconds from the slot's time to the first start
-- (lateness), and the seconds the event's attempt ran (the first attempt from its real
-- start: it may be claimed a few ms early). Instants are stored to the millisecond and
-- julianday() is exact to ~50 us, hence round(, 3). Runs purged since have NULLs.
SELECT ev.type, ev.namespace, json_extract(ev.data, '$.attempt'), e.type,
       round((julianday(e.started_at) - julianday(e.scheduled_at)) * 86400.0, 3),
       round((julianday(a.finished_at)
              - julianday(CASE WHEN a.attempt = 1 THEN e.started_at ELSE a.started_at END))
             * 86400.0, 3)
FROM events ev
LEFT JOIN executions e ON e.id = ev.uid
LEFT JOIN attempts a ON a.execution_id = ev.uid
                    AND a.attempt = json_extract(ev.data, '$.attempt')
WHERE ev.seq > :after AND ev.seq <= :upto
  AND (ev.type IN ('execution.running', 'execution.retrying', 'execution.succeeded',
                   'execution.failed', 'execution.timed_out', 'execution.cancelled',
                   'execution.missed', 'execution.skipped', 'execution.lost')
       OR ev.type LIKE 'delivery.%')
ORDER BY ev.seq;

-- name: metric_queue_depth
SELECT priority, COUNT(*) FROM executions INDEXED BY executions_queue
WHERE status = 'queued' GROUP BY priority;

-- name: metric_job_states
-- Every job in one state: suspended, running (a run is running), waiting (a run is pending
-- or queued), done (nothing left to run).
SELECT state, COUNT(*) FROM (
  SELECT CASE
    WHEN json_extract(o.spec, '$.suspend') = 1 THEN 'suspended'
    WHEN EXISTS (SELECT 1 FROM executions e
                 WHERE e.job_uid = o.uid AND e.status = 'running') THEN 'running'
    WHEN EXISTS (SELECT 1 FROM executions e
                 WHERE e.job_uid = o.uid AND e.status IN ('pending', 'queued')) THEN 'waiting'
    ELSE 'done' END AS state
  FROM objects o WHERE o.kind = 'Job')
GROUP BY state;

-- name: auto_vacuum_mode
PRAGMA auto_vacuum;

-- name: set_incremental_auto_vacuum
-- Takes effect on a file with tables only through the VACUUM that follows it.
PRAGMA auto_vacuum = INCREMENTAL;

-- name: vacuum
VACUUM;

-- name: freelist_count
PRAGMA freelist_count;

-- name: incremental_vacuum
-- Hands every free page back to the file system (the file shrinks at the next checkpoint).
PRAGMA incremental_vacuum;

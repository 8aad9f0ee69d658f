-- Named queries: every SQL statement OneOff runs. Loaded by store.py; a block starts
-- with "-- name: <query name>" and runs until the next one.

-- name: select_objects
SELECT uid, kind, namespace, name, generation, spec, meta, spec_digest, source, file, line,
       created_at, updated_at, status
FROM objects
WHERE (:kind IS NULL OR kind = :kind)
  AND (:namespace IS NULL OR namespace = :namespace)
  AND (:source IS NULL OR source = :source)
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

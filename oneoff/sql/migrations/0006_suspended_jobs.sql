-- Suspended jobs, so the scheduler's "is this run's job suspended?" check is an index probe
-- instead of parsing the job's spec for every due run (a burst of 10,000 parsed 10,000).
CREATE INDEX objects_suspended ON objects (uid) WHERE json_extract(spec, '$.suspend') = 1;

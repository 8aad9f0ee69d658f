-- The job generation and run-request annotation the scheduler last synced, so a start
-- only looks again at jobs that changed (or cron jobs without a waiting slot).
ALTER TABLE job_state ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;

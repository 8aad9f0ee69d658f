-- Dispatch order and deadline checks without sorting or scanning the whole queue:
-- a burst of 10,000 due runs is claimed a few dozen at a time, in priority order.
CREATE INDEX executions_queue ON executions (priority DESC, due_at, seq)
    WHERE status = 'queued';
CREATE INDEX executions_deadline ON executions (deadline_at)
    WHERE status IN ('pending', 'queued');

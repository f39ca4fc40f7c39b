-- The oldest pending recipient, for the queue-age gauge and alert, without scanning the queue.
CREATE INDEX recipients_pending_age_idx ON recipients (queued_at) WHERE state IN ('queued', 'deferred');

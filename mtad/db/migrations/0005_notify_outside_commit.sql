-- NOTIFY inside every submission's transaction serialises all commits on PostgreSQL's notification queue
-- lock (measured: most submission inserts waited on it under load). The daemon now wakes its own claimer
-- directly and tells other nodes with a separate, rate-limited NOTIFY (mtad.queue.wakeup.ArrivalSignal).
DROP TRIGGER recipients_notify ON recipients;
DROP FUNCTION mtad_notify_queue();

-- When each queued message was published (a retry: published again), for the queue-wait
-- metric. Rows queued before this migration have none and are not measured.
ALTER TABLE queue ADD COLUMN published_at INTEGER;

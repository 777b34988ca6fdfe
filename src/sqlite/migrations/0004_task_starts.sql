-- Every start of a task (a first run, a retry, a run again after its worker died), so that
-- `workflows show` counts attempts as they happened, not only as retries.
ALTER TABLE task_meta ADD COLUMN starts INTEGER NOT NULL DEFAULT 0;

-- Upload logs (spec C.5.1, E.5): one per dataset created by upload. `metadata` stays NULL until
-- something is merged in, and `updated_at` changes only with `status` or `retry_count`, as the
-- API's do: the stalled and expired listings measure from it.
CREATE TABLE upload_logs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id  INTEGER NOT NULL UNIQUE REFERENCES datasets (id),
    status      TEXT    NOT NULL,
    process_id  TEXT,
    retry_count INTEGER NOT NULL DEFAULT 0,
    metadata    TEXT,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX upload_logs_by_status ON upload_logs (status, updated_at);

-- Worker processes and their log lines (the API's `worker_process` and `log`): what a task
-- that runs a check or a tool printed, kept for operators to read.
CREATE TABLE worker_processes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    workflow_id TEXT,
    step        TEXT    NOT NULL,
    task_id     TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    hostname    TEXT    NOT NULL,
    start_time  INTEGER NOT NULL,
    tags        TEXT    NOT NULL
);
CREATE INDEX worker_processes_by_task ON worker_processes (task_id);

CREATE TABLE worker_logs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    process_id INTEGER NOT NULL REFERENCES worker_processes (id),
    timestamp  INTEGER NOT NULL,
    level      TEXT    NOT NULL,
    message    TEXT    NOT NULL
);
CREATE INDEX worker_logs_by_process ON worker_logs (process_id, id);

-- The scheduler's records: job runs, the last slot handled per job, the lease that lets only
-- one scheduler fire jobs; and the registry's metric records.

CREATE TABLE job_runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job         TEXT    NOT NULL,
    -- schedule, misfire, queued or manual
    trigger     TEXT    NOT NULL,
    slot        INTEGER,
    started_at  INTEGER NOT NULL,
    ended_at    INTEGER,
    -- running, success, failed or skipped
    outcome     TEXT    NOT NULL,
    error       TEXT,
    counters    TEXT    NOT NULL DEFAULT '{}',
    host        TEXT    NOT NULL,
    dry_run     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX job_runs_by_job ON job_runs (job, id);

CREATE TABLE job_slots (
    job  TEXT    PRIMARY KEY,
    slot INTEGER NOT NULL
);

CREATE TABLE leases (
    name       TEXT    PRIMARY KEY,
    holder     TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE TABLE metrics (
    timestamp   INTEGER NOT NULL,
    measurement TEXT    NOT NULL,
    subject     TEXT    NOT NULL,
    usage       INTEGER NOT NULL,
    "limit"     INTEGER NOT NULL,
    tags        TEXT    NOT NULL DEFAULT '[]',
    PRIMARY KEY (timestamp, measurement, subject)
);

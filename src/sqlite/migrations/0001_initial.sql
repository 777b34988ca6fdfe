-- The embedded backends: dataset registry, workflow store and step queue in one file.
-- Times are integer milliseconds since the Unix epoch (UTC).

-- Registry (the Bioloop API's dataset tables, spec E.3).
CREATE TABLE datasets (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT    NOT NULL,
    type            TEXT    NOT NULL,
    origin_path     TEXT,
    archive_path    TEXT,
    staged_path     TEXT,
    description     TEXT,
    du_size         INTEGER,
    size            INTEGER,
    bundle_size     INTEGER,
    num_files       INTEGER,
    num_directories INTEGER,
    is_deleted      INTEGER NOT NULL DEFAULT 0,
    is_staged       INTEGER NOT NULL DEFAULT 0,
    metadata        TEXT    NOT NULL DEFAULT '{}',
    create_method   TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (name, type, is_deleted)
);

CREATE TABLE dataset_states (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id INTEGER NOT NULL REFERENCES datasets (id),
    state      TEXT    NOT NULL,
    timestamp  INTEGER NOT NULL,
    metadata   TEXT
);
CREATE INDEX dataset_states_by_dataset ON dataset_states (dataset_id, seq);

CREATE TABLE dataset_files (
    dataset_id INTEGER NOT NULL REFERENCES datasets (id),
    path       TEXT    NOT NULL,
    md5        TEXT,
    size       INTEGER NOT NULL,
    filetype   TEXT    NOT NULL,
    PRIMARY KEY (dataset_id, path)
) WITHOUT ROWID;

CREATE TABLE bundles (
    dataset_id INTEGER PRIMARY KEY REFERENCES datasets (id),
    name       TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    md5        TEXT    NOT NULL
);

-- The API's `workflow` table: which workflows belong to which dataset.
CREATE TABLE dataset_workflows (
    workflow_id TEXT    PRIMARY KEY,
    dataset_id  INTEGER NOT NULL REFERENCES datasets (id),
    created_at  INTEGER NOT NULL
);
CREATE INDEX dataset_workflows_by_dataset ON dataset_workflows (dataset_id);

-- Workflow store (sca-rhythm's workflow_meta and Celery's celery_taskmeta, spec F.2 and F.3).
CREATE TABLE workflows (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL,
    app_id      TEXT    NOT NULL,
    description TEXT,
    status      TEXT    NOT NULL,
    resume_lock INTEGER,
    start_args  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER
);
CREATE INDEX workflows_by_status ON workflows (status);

CREATE TABLE workflow_steps (
    workflow_id TEXT    NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    name        TEXT    NOT NULL,
    task        TEXT    NOT NULL,
    queue       TEXT,
    kwargs      TEXT,
    priority    INTEGER,
    PRIMARY KEY (workflow_id, position)
) WITHOUT ROWID;

CREATE TABLE task_runs (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id     TEXT    NOT NULL UNIQUE,
    workflow_id TEXT    NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    date_start  INTEGER NOT NULL
);
CREATE INDEX task_runs_by_workflow ON task_runs (workflow_id, position, seq);

CREATE TABLE task_meta (
    task_id   TEXT    PRIMARY KEY,
    status    TEXT    NOT NULL,
    result    TEXT,
    traceback TEXT,
    date_done INTEGER,
    name      TEXT,
    args      TEXT,
    kwargs    TEXT,
    worker    TEXT,
    retries   INTEGER NOT NULL DEFAULT 0,
    queue     TEXT
);

-- The durable queue of runnable steps (the broker of the embedded profile).
CREATE TABLE queue (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id     TEXT    NOT NULL UNIQUE,
    task        TEXT    NOT NULL,
    args        TEXT    NOT NULL,
    kwargs      TEXT    NOT NULL,
    priority    INTEGER NOT NULL,
    eta         INTEGER NOT NULL,
    retries     INTEGER NOT NULL,
    root_id     TEXT    NOT NULL,
    parent_id   TEXT,
    queue       TEXT    NOT NULL,
    lease_owner TEXT,
    lease_until INTEGER
);
CREATE INDEX queue_by_order ON queue (priority DESC, seq);

-- What `watch` has seen in each source directory (spec C.1's known set and scan counter).
CREATE TABLE watch_state (
    source_dir TEXT    PRIMARY KEY,
    scan_count INTEGER NOT NULL,
    known      TEXT    NOT NULL
);

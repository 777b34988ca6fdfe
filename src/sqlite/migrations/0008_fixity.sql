-- Fixity checks: one row per copy of a dataset re-read against its record (`workers verify`,
-- the `fixity` job). Times in milliseconds, like every other column.
CREATE TABLE fixity_checks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id INTEGER NOT NULL,
    copy TEXT NOT NULL,
    checked_at INTEGER NOT NULL,
    result TEXT NOT NULL,
    files INTEGER NOT NULL,
    bytes_read INTEGER NOT NULL,
    differences INTEGER NOT NULL,
    detail TEXT NOT NULL,
    by TEXT NOT NULL
);
CREATE INDEX fixity_checks_by_dataset ON fixity_checks (dataset_id, checked_at);

-- Messages of the embedded queue that can never run (arguments that are not JSON, a step
-- message without its workflow or dataset), kept aside with the reason instead of being
-- retried forever or dropped; `workers queue dead-letters` shows them.
CREATE TABLE dead_letters (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The queue row as it was, columns unchanged (args and kwargs may not be JSON).
    task_id   TEXT    NOT NULL,
    task      TEXT    NOT NULL,
    args      TEXT    NOT NULL,
    kwargs    TEXT    NOT NULL,
    priority  INTEGER NOT NULL,
    eta       INTEGER NOT NULL,
    retries   INTEGER NOT NULL,
    root_id   TEXT    NOT NULL,
    parent_id TEXT,
    queue     TEXT    NOT NULL,
    reason    TEXT    NOT NULL,
    dead_at   INTEGER NOT NULL
);

-- The leased rows, for finding claims held by processes of this host that died.
CREATE INDEX queue_leased ON queue (lease_owner) WHERE lease_owner IS NOT NULL;

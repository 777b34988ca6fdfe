-- Remote control of the workers of the embedded profile, and the revoked task ids every worker
-- remembers (Celery's state db).

-- Task ids revoked by an operator: a message of one of them is not run when it arrives.
CREATE TABLE revoked_tasks (
    task_id TEXT PRIMARY KEY,
    revoked_at INTEGER NOT NULL -- milliseconds since the epoch
);
CREATE INDEX revoked_tasks_by_time ON revoked_tasks (revoked_at);

-- The mailbox: a command sent to every worker (or those named in `destination`), and their
-- replies. Workers read the requests newer than the last one they saw.
CREATE TABLE control_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL, -- the request as Celery's pidbox carries it (JSON)
    sent_at INTEGER NOT NULL
);
CREATE TABLE control_replies (
    ticket TEXT NOT NULL,
    hostname TEXT NOT NULL,
    reply TEXT NOT NULL, -- JSON
    sent_at INTEGER NOT NULL,
    PRIMARY KEY (ticket, hostname)
);

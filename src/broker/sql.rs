//! The broker of the embedded and postgres profiles: the `queue` table of the SQL database,
//! shared safely by every process on the host (SQLite) or on every host (PostgreSQL). A claim
//! is a lease that the consumer renews while it works; a lease that runs out, or whose owner
//! process on this host is gone, makes the message claimable again. Leases are timed by the
//! database's clock. A message that can never run (a row that is not a message, or one the
//! engine cannot place) moves to the `dead_letters` table, kept for an operator to look at.
//!
//! On PostgreSQL consumers take rows with `FOR UPDATE SKIP LOCKED`, so that they never queue
//! behind each other's claims, and idle consumers wait for a `NOTIFY` from the publisher
//! rather than polling. There, a step's acknowledgement also claims, in the same statement,
//! the message its slot will ask for next (one round trip fewer per step, as a Celery worker
//! prefetches one message per slot): kept for the next `next`, reported by `waiting`, given
//! back when the consumer stops, and claimed afresh when it was kept longer than half a
//! lease. A process that dies with such a claim leaves it as it leaves the claims of its
//! running steps: taken at once by a process of the same host, elsewhere when its lease ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tracing::{error, warn};

use super::{Broker, Consume, DeadLetter, Delivery, QueueDepth, TaskMessage};
use crate::args;
use crate::identity::Identity;
use crate::sql::{Conn, Database, Engine, Row, Value, json_list};
use crate::sqlite::{from_millis, to_millis};

/// How long an idle consumer of the SQLite queue waits before looking again; messages
/// published by other processes are seen at most this late.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The same on PostgreSQL, where a publisher's `NOTIFY` wakes idle consumers: only a fallback,
/// for a notification lost while the listening connection was away.
const POLL_INTERVAL_NOTIFIED: Duration = Duration::from_secs(5);

/// How long a list of the dead owners of claims is used before it is looked up again.
const DEAD_OWNERS_EVERY: Duration = Duration::from_secs(1);

/// The channel publishers notify on PostgreSQL.
const CHANNEL: &str = "workers_queue";

pub struct SqlBroker {
    db: Database,
    consumer: Identity,
    lease: Duration,
    published: Arc<Notify>,
    /// The queues `next` takes from, as a JSON list; `None` takes from every queue.
    queues: Arc<std::sync::Mutex<Option<String>>>,
    /// Claims taken ahead (PostgreSQL): each by the acknowledgement of a step, in the same
    /// statement, for the slot that ran it and is about to ask `next` for another.
    ahead: Arc<std::sync::Mutex<Vec<Claimed>>>,
    poll: Duration,
    /// The dead owners last looked up, and when.
    dead: std::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl SqlBroker {
    pub fn new(db: impl Into<Database>, consumer: Identity, lease: Duration) -> SqlBroker {
        let db = db.into();
        let (published, poll) = match &db {
            Database::Sqlite(_) => (Arc::new(Notify::new()), POLL_INTERVAL),
            Database::Postgres(pg) => (pg.listen(CHANNEL), POLL_INTERVAL_NOTIFIED),
        };
        SqlBroker {
            db,
            consumer,
            lease,
            published,
            queues: Arc::new(std::sync::Mutex::new(None)),
            ahead: Arc::new(std::sync::Mutex::new(Vec::new())),
            poll,
            dead: std::sync::Mutex::new(None),
        }
    }

    /// Claims the best runnable message, if any; otherwise returns the earliest future eta.
    /// A row that cannot be read as a message is moved to the dead letters on the way.
    /// A claim's owner is this process plus a unique part: two slots of one process never
    /// share a claim, so a slot whose lease lapsed and was taken by another slot finds out.
    async fn try_claim(&self) -> anyhow::Result<Result<Claimed, Option<DateTime<Utc>>>> {
        let consumer = self.consumer.clone();
        let lease_ms = self.lease.as_millis() as i64;
        let queues = self
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // The claim is committed on a blocking thread whatever becomes of this future: a
        // caller that stops waiting (a worker going idle or stopping, racing `next` against
        // its stop) must not leave a claimed message leased to nobody for a whole lease. The
        // claim therefore runs in a task of its own, which gives the message back when the
        // caller is gone.
        let dead = self.dead_owners().await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let db = self.db.clone();
        let published = Arc::clone(&self.published);
        tokio::spawn(async move {
            let claimed = claim(&db, consumer, lease_ms, queues, dead).await;
            if let Err(Ok(Ok(claimed))) = tx.send(claimed) {
                give_back(&db, &claimed.message.id, &claimed.owner).await;
                published.notify_one();
            }
        });
        rx.await
            .map_err(|_| anyhow::format_err!("the claim of a queued message was abandoned"))?
    }

    /// The delivery of a claim of this consumer's.
    fn delivery(&self, claimed: Claimed) -> SqlDelivery {
        SqlDelivery {
            db: self.db.clone(),
            owner: claimed.owner,
            lease: self.lease,
            message: claimed.message,
            published_at: claimed.published_at,
            renewed: std::sync::Mutex::new(claimed.sent),
            published: Arc::clone(&self.published),
            claim_ahead: (self.db.engine() == Engine::Postgres).then(|| ClaimAhead {
                holder: self.consumer.holder(),
                queues: Arc::clone(&self.queues),
                stash: Arc::clone(&self.ahead),
            }),
        }
    }

    /// A claim taken ahead that is still surely held, if any; one held too long to be sure of
    /// is given back.
    async fn take_ahead(&self) -> Option<Claimed> {
        loop {
            let claimed = self.ahead.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if claimed.sent.elapsed() < self.lease / 2 {
                return Some(claimed);
            }
            give_back(&self.db, &claimed.message.id, &claimed.owner).await;
        }
    }

    /// Gives back every claim taken ahead (a consumer that stops, or changes its queues).
    async fn give_back_ahead(&self) {
        let stashed = std::mem::take(&mut *self.ahead.lock().unwrap_or_else(|e| e.into_inner()));
        for claimed in &stashed {
            give_back(&self.db, &claimed.message.id, &claimed.owner).await;
        }
        if !stashed.is_empty() {
            self.published.notify_one();
        }
    }

    /// `dead_owners` as a JSON list, looked up at most once every `DEAD_OWNERS_EVERY`: a
    /// process that died is noticed that much later, and claims cost one statement.
    async fn dead_owners(&self) -> anyhow::Result<String> {
        if let Some((at, list)) = &*self.dead.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < DEAD_OWNERS_EVERY
        {
            return Ok(list.clone());
        }
        let consumer = self.consumer.clone();
        let list = json_list(
            &self
                .db
                .read(move |conn| dead_owners(conn, &consumer))
                .await?,
        );
        *self.dead.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), list.clone()));
        Ok(list)
    }
}

/// A message claimed for a consumer.
struct Claimed {
    message: TaskMessage,
    /// The claim's owner in the queue row.
    owner: String,
    published_at: Option<DateTime<Utc>>,
    /// When the claim was sent: it is held for at least a lease after.
    sent: Instant,
}

/// Makes a claim no consumer will use claimable again at once, rather than when its lease
/// runs out.
async fn give_back(db: &Database, task_id: &str, owner: &str) {
    let values = args![task_id, owner].to_vec();
    let released = db
        .write(move |tx| {
            tx.execute(RELEASE, &values)?;
            notify_consumers(tx)
        })
        .await;
    if let Err(err) = released {
        warn!(task_id, error = %format!("{err:#}"), "Could not give back a message claimed for a consumer that no longer waits for it; it is handed out again when its lease ends.");
    }
}

/// Leases the best claimable message from queues ?1 (a JSON list, or NULL for all) to owner
/// ?3 for ?4 ms, taking over claims of the dead owners ?2; returns its `QUEUE_COLUMNS`.
static CLAIM: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE queue SET lease_owner = ?3, lease_until = {{now_ms}} + ?4
         WHERE seq = (
             SELECT seq FROM queue WHERE eta <= {{now_ms}}
             AND (CAST(?1 AS TEXT) IS NULL OR queue IN {{text_list ?1}})
             AND (lease_owner IS NULL OR lease_until IS NULL OR lease_until < {{now_ms}}
                  OR lease_owner IN {{text_list ?2}})
             ORDER BY priority DESC, seq LIMIT 1 {{skip_locked}})
         AND {{unflushed_commit}}
         RETURNING {QUEUE_COLUMNS}"
    )
});

/// Claims the next runnable message: `Ok` with it and its owner, or `Err` with the time the
/// next one becomes due.
async fn claim(
    db: &Database,
    consumer: Identity,
    lease_ms: i64,
    queues: Option<String>,
    dead: String,
) -> anyhow::Result<Result<Claimed, Option<DateTime<Utc>>>> {
    loop {
        let owner = format!("{}/{}", consumer.holder(), uuid::Uuid::new_v4().simple());
        let (queues_now, dead_now, owner_now) = (queues.clone(), dead.clone(), owner.clone());
        let sent = Instant::now();
        // One statement: the best claimable row is chosen and leased at once. Claimability is
        // decided in the query, so that no number of leased messages ahead of a runnable one
        // can hide it; rows another consumer is claiming at this moment are passed over, not
        // waited for. Its commit does not wait for a disk flush: nothing runs under the claim
        // before the engine records STARTED (or settles the message), which does.
        let row = db
            .write_alone(move |tx| {
                tx.query_opt(&CLAIM, args![queues_now, dead_now, owner_now, lease_ms])
            })
            .await?;
        let Some(row) = row.map(|r| QueueRow::read(&r)).transpose()? else {
            let queues = queues.clone();
            let next_eta: Option<i64> = db
                .read(move |conn| {
                    conn.query_one(
                        "SELECT MIN(eta) FROM queue WHERE eta > {now_ms}
                         AND (CAST(?1 AS TEXT) IS NULL OR queue IN {text_list ?1})",
                        args![queues],
                    )?
                    .get(0)
                })
                .await?;
            return Ok(Err(next_eta.map(from_millis)));
        };
        match row.message() {
            Ok(message) => {
                return Ok(Ok(Claimed {
                    message,
                    owner,
                    published_at: row.published_at.map(from_millis),
                    sent,
                }));
            }
            Err(reason) => {
                let (task_id, why) = (row.task_id.clone(), reason.clone());
                db.write(move |tx| move_to_dead_letters(tx, &task_id, Some(&owner), &why))
                    .await?;
                error!(task_id = %row.task_id, task = %row.task, reason = %reason,
                    "Moved a queued message that cannot be read to the dead letters (`workers queue dead-letters`).");
            }
        }
    }
}

/// The owners of live leases that are processes of this host which died: their claims are
/// void at once rather than when their leases run out. Few processes hold leases, and whether
/// one is alive is known only here, so they are looked at one by one.
fn dead_owners(tx: &mut dyn Conn, consumer: &Identity) -> anyhow::Result<Vec<String>> {
    let host = format!("{}:", consumer.hostname);
    let found = tx.query(
        "SELECT DISTINCT lease_owner FROM queue WHERE lease_owner IS NOT NULL
         AND lease_until >= {now_ms}
         AND substr(lease_owner, 1, length(CAST(?1 AS TEXT))) = CAST(?1 AS TEXT)",
        args![host],
    )?;
    let mut dead = Vec::new();
    for row in &found {
        let owner: String = row.get(0)?;
        if consumer.is_dead_owner(&owner) {
            dead.push(owner);
        }
    }
    Ok(dead)
}

/// Wakes idle consumers of other processes (PostgreSQL: when the transaction commits); those
/// of this process are woken by the broker's own `Notify`.
fn notify_consumers(tx: &mut dyn Conn) -> anyhow::Result<()> {
    if tx.engine() == Engine::Postgres {
        tx.query("SELECT pg_notify(?1, '')", args![CHANNEL])?;
    }
    Ok(())
}

/// Moves the queue row of `task_id` (only while `owner` holds it, when given) to the dead
/// letters; false if there was no such row.
fn move_to_dead_letters(
    tx: &mut dyn Conn,
    task_id: &str,
    owner: Option<&str>,
    reason: &str,
) -> anyhow::Result<bool> {
    let copied = tx.execute(
        "INSERT INTO dead_letters
            (task_id, task, args, kwargs, priority, eta, retries, root_id, parent_id, queue, reason, dead_at)
         SELECT task_id, task, args, kwargs, priority, eta, retries, root_id, parent_id, queue,
                CAST(?3 AS TEXT), {now_ms}
         FROM queue WHERE task_id = ?1 AND (CAST(?2 AS TEXT) IS NULL OR lease_owner = ?2)",
        args![task_id, owner, reason],
    )?;
    tx.execute(
        "DELETE FROM queue WHERE task_id = ?1 AND (CAST(?2 AS TEXT) IS NULL OR lease_owner = ?2)",
        args![task_id, owner],
    )?;
    Ok(copied > 0)
}

/// Queues a message (parameters: `queue_values`) unless its task id is queued already.
const INSERT_MESSAGE: &str = "INSERT INTO queue
        (task_id, task, args, kwargs, priority, eta, retries, root_id, parent_id, queue, published_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
    ON CONFLICT (task_id) DO NOTHING";

/// The parameters of `INSERT_MESSAGE` for `message`, published now.
fn queue_values(message: &TaskMessage) -> Vec<Value> {
    args![
        message.id,
        message.task,
        serde_json::Value::from(message.args.clone()).to_string(),
        serde_json::Value::Object(message.kwargs.clone()).to_string(),
        i64::from(message.priority.min(9)),
        message.eta.map(to_millis).unwrap_or(0),
        i64::from(message.retries),
        message.root_id,
        message.parent_id,
        message.queue,
        to_millis(Utc::now())
    ]
    .to_vec()
}

/// Makes the message of task ?1 claimable again while owner ?2 holds it.
const RELEASE: &str = "UPDATE queue SET lease_owner = NULL, lease_until = NULL WHERE task_id = ?1 AND lease_owner = ?2";

/// Removes the message of task ?1 while owner ?2 holds it.
const ACK: &str = "DELETE FROM queue WHERE task_id = ?1 AND lease_owner = ?2";

/// `INSERT_MESSAGE` (?1 to ?11) and `ACK` (?12, ?13) in one statement, which also notifies
/// channel ?14; returns how many messages were acknowledged.
static ACK_PUBLISHING_POSTGRES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH next AS ({INSERT_MESSAGE}),
              done AS (DELETE FROM queue WHERE task_id = ?12 AND lease_owner = ?13 RETURNING 1)
         SELECT (SELECT COUNT(*) FROM done), pg_notify(?14, '')"
    )
});

/// On PostgreSQL, `ACK` of task ?A held by ?A+1 and, in the same statement, a claim of the
/// best other claimable message for owner ?A+2, leased for ?A+3 ms, from queues ?A+4 (a JSON
/// list, or NULL for all). With `publishing`, the statement first queues the message of
/// `INSERT_MESSAGE` (?1 to ?11, so ?A is ?12) and notifies channel ?A+5, as
/// `ACK_PUBLISHING_POSTGRES` does. Returns how many messages were acknowledged, a column to
/// skip, then the claimed row's `QUEUE_COLUMNS` (NULL when none was claimable). Claims of dead
/// owners are left to `claim`, which looks them up.
fn ack_claiming_statement(publishing: bool) -> String {
    let a = if publishing { 12 } else { 1 };
    let (next, notify) = if publishing {
        (
            format!("next AS ({INSERT_MESSAGE}),"),
            format!("pg_notify(?{}, '')", a + 5),
        )
    } else {
        (String::new(), "0".to_owned())
    };
    format!(
        "WITH {next}
              done AS (DELETE FROM queue WHERE task_id = ?{a} AND lease_owner = ?{a1} RETURNING 1),
              ahead AS (
                  UPDATE queue SET lease_owner = ?{a2}, lease_until = {{now_ms}} + ?{a3}
                  WHERE seq = (
                      SELECT seq FROM queue WHERE eta <= {{now_ms}} AND task_id <> ?{a}
                      AND (CAST(?{a4} AS TEXT) IS NULL OR queue IN {{text_list ?{a4}}})
                      AND (lease_owner IS NULL OR lease_until IS NULL OR lease_until < {{now_ms}})
                      ORDER BY priority DESC, seq LIMIT 1 {{skip_locked}})
                  RETURNING {QUEUE_COLUMNS})
         SELECT (SELECT COUNT(*) FROM done), {notify}, ahead.*
         FROM (SELECT 1) AS one LEFT JOIN ahead ON TRUE",
        a1 = a + 1,
        a2 = a + 2,
        a3 = a + 3,
        a4 = a + 4,
    )
}

/// `ack_claiming_statement`, without and with publishing.
static ACK_CLAIMING_POSTGRES: std::sync::LazyLock<[String; 2]> =
    std::sync::LazyLock::new(|| [ack_claiming_statement(false), ack_claiming_statement(true)]);

/// The columns `QueueRow::read` reads, in its order.
const QUEUE_COLUMNS: &str =
    "task_id, task, args, kwargs, priority, eta, retries, root_id, parent_id, queue, published_at";

/// The message an `ack_claiming_statement` claimed for `owner`, if any: `Err` with its
/// task id when the row is not a message.
fn claimed_ahead(
    row: &Row,
    owner: String,
    sent: Instant,
) -> anyhow::Result<Option<Result<Claimed, (String, String)>>> {
    if row.get::<Option<String>>(2)?.is_none() {
        return Ok(None);
    }
    let queued = QueueRow::read(&Row(row.0[2..].to_vec()))?;
    Ok(Some(match queued.message() {
        Ok(message) => Ok(Claimed {
            message,
            owner,
            published_at: queued.published_at.map(from_millis),
            sent,
        }),
        Err(_) => Err((queued.task_id, owner)),
    }))
}

/// A queue row as stored.
struct QueueRow {
    task_id: String,
    task: String,
    args: String,
    kwargs: String,
    priority: i64,
    eta: i64,
    retries: i64,
    root_id: String,
    parent_id: Option<String>,
    queue: String,
    published_at: Option<i64>,
}

impl QueueRow {
    fn read(r: &Row) -> anyhow::Result<QueueRow> {
        Ok(QueueRow {
            task_id: r.get(0)?,
            task: r.get(1)?,
            args: r.get(2)?,
            kwargs: r.get(3)?,
            priority: r.get(4)?,
            eta: r.get(5)?,
            retries: r.get(6)?,
            root_id: r.get(7)?,
            parent_id: r.get(8)?,
            queue: r.get(9)?,
            published_at: r.get(10)?,
        })
    }

    /// The message, or why the row cannot be one.
    fn message(&self) -> Result<TaskMessage, String> {
        let args: Vec<serde_json::Value> = serde_json::from_str(&self.args)
            .map_err(|err| format!("its args are not a JSON list: {err}"))?;
        let kwargs: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&self.kwargs)
            .map_err(|err| format!("its kwargs are not a JSON object: {err}"))?;
        Ok(TaskMessage {
            id: self.task_id.clone(),
            task: self.task.clone(),
            args,
            kwargs,
            priority: self.priority.clamp(0, 9) as u8,
            eta: (self.eta > 0).then(|| from_millis(self.eta)),
            retries: u32::try_from(self.retries).unwrap_or(0),
            root_id: self.root_id.clone(),
            parent_id: self.parent_id.clone(),
            queue: self.queue.clone(),
            // Steps of the embedded profile are limited by the configuration.
            time_limits: Default::default(),
        })
    }
}

#[async_trait]
impl Broker for SqlBroker {
    async fn publish(&self, message: &TaskMessage) -> anyhow::Result<()> {
        self.publish_many(std::slice::from_ref(message)).await
    }

    async fn publish_many(&self, messages: &[TaskMessage]) -> anyhow::Result<()> {
        let rows: Vec<Vec<Value>> = messages.iter().map(queue_values).collect();
        self.db
            .write(move |tx| {
                for row in &rows {
                    tx.execute(INSERT_MESSAGE, row)?;
                }
                notify_consumers(tx)
            })
            .await?;
        self.published.notify_one();
        Ok(())
    }

    async fn next(&self) -> anyhow::Result<Box<dyn Delivery>> {
        loop {
            // Register interest before looking, so a publish between the look and the wait
            // is not missed.
            let notified = self.published.notified();
            if let Some(claimed) = self.take_ahead().await {
                return Ok(Box::new(self.delivery(claimed)));
            }
            match self.try_claim().await? {
                Ok(claimed) => {
                    // Idle consumers are woken one at a time: the one that gets a message
                    // wakes the next, which looks for another, and so on until one finds the
                    // queue empty; waking them all for one message would send every one of
                    // them to the database for nothing.
                    self.published.notify_one();
                    return Ok(Box::new(self.delivery(claimed)));
                }
                Err(next_eta) => {
                    let mut wait = self.poll;
                    if let Some(eta) = next_eta {
                        let until = (eta - Utc::now()).to_std().unwrap_or_default();
                        wait = wait.min(until.max(Duration::from_millis(10)));
                    }
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn holds(&self, task_id: &str) -> anyhow::Result<Option<bool>> {
        let task_id = task_id.to_owned();
        self.db
            .read(move |conn| {
                let found =
                    conn.query_opt("SELECT 1 FROM queue WHERE task_id = ?1", args![task_id])?;
                Ok(Some(found.is_some()))
            })
            .await
    }

    async fn has_due_messages(&self, tasks: &[&str]) -> anyhow::Result<Option<bool>> {
        let tasks = serde_json::to_string(tasks)?;
        self.db
            .read(move |conn| {
                let due = conn.query_opt(
                    "SELECT 1 FROM queue WHERE eta <= {now_ms} AND task IN {text_list ?1} LIMIT 1",
                    args![tasks],
                )?;
                Ok(Some(due.is_some()))
            })
            .await
    }

    async fn start_consuming(&self, consume: &Consume) -> anyhow::Result<()> {
        let queues = consume
            .queues
            .as_ref()
            .map(|q| serde_json::Value::from(q.clone()).to_string());
        *self.queues.lock().unwrap_or_else(|e| e.into_inner()) = queues;
        self.give_back_ahead().await;
        Ok(())
    }

    async fn stop_consuming(&self) -> anyhow::Result<()> {
        // No queue at all: `next` claims nothing until `start_consuming` names queues again.
        *self.queues.lock().unwrap_or_else(|e| e.into_inner()) = Some("[]".to_owned());
        self.give_back_ahead().await;
        Ok(())
    }

    async fn waiting(&self) -> Vec<TaskMessage> {
        self.ahead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|claimed| claimed.message.clone())
            .collect()
    }

    async fn queued(&self) -> anyhow::Result<Option<QueueDepth>> {
        self.db
            .read(|conn| {
                let row = conn.query_one(
                    "SELECT COUNT(*), MIN(COALESCE(published_at, eta)) FROM queue
                     WHERE lease_owner IS NULL OR lease_until IS NULL OR lease_until < {now_ms}",
                    args![],
                )?;
                let (waiting, oldest): (i64, Option<i64>) = (row.get(0)?, row.get(1)?);
                Ok(Some(QueueDepth {
                    waiting: waiting.max(0) as u64,
                    oldest: oldest.filter(|ms| *ms > 0).map(from_millis),
                }))
            })
            .await
    }

    async fn dead_letters(&self) -> anyhow::Result<Option<Vec<DeadLetter>>> {
        self.db
            .read(|conn| {
                let letters = conn
                    .query(
                        "SELECT task_id, task, queue, args, kwargs, priority, eta, retries, root_id,
                                parent_id, reason, dead_at
                         FROM dead_letters ORDER BY id",
                        args![],
                    )?
                    .iter()
                    .map(|r| {
                        let eta: i64 = r.get(6)?;
                        Ok(DeadLetter {
                            task_id: r.get(0)?,
                            task: r.get(1)?,
                            queue: r.get(2)?,
                            args: r.get(3)?,
                            kwargs: r.get(4)?,
                            priority: r.get(5)?,
                            eta: (eta > 0).then(|| from_millis(eta)),
                            retries: r.get(7)?,
                            root_id: r.get(8)?,
                            parent_id: r.get(9)?,
                            reason: r.get(10)?,
                            dead_at: from_millis(r.get(11)?),
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok(Some(letters))
            })
            .await
    }
}

struct SqlDelivery {
    db: Database,
    owner: String,
    lease: Duration,
    message: TaskMessage,
    published_at: Option<DateTime<Utc>>,
    published: Arc<Notify>,
    /// When the claim or its last renewal was sent.
    renewed: std::sync::Mutex<Instant>,
    /// Where the acknowledgement claims the consumer's next message (PostgreSQL).
    claim_ahead: Option<ClaimAhead>,
}

/// What an acknowledgement needs to claim the next message for the slot that sends it.
struct ClaimAhead {
    /// The consumer's process (`hostname:pid`), which the claim's owner starts with.
    holder: String,
    queues: Arc<std::sync::Mutex<Option<String>>>,
    stash: Arc<std::sync::Mutex<Vec<Claimed>>>,
}

impl SqlDelivery {
    /// Runs `sql` (parameters: task id, owner, then `extra`) and fails if the lease was lost;
    /// with `wake`, wakes idle consumers (the message is claimable again).
    async fn update_owned(
        &self,
        sql: &'static str,
        extra: Vec<i64>,
        wake: bool,
    ) -> anyhow::Result<()> {
        let mut values = vec![
            Value::Text(self.message.id.clone()),
            Value::Text(self.owner.clone()),
        ];
        values.extend(extra.into_iter().map(Value::Int));
        let changed = if wake {
            self.db
                .write(move |tx| {
                    let changed = tx.execute(sql, &values)?;
                    notify_consumers(tx)?;
                    Ok(changed)
                })
                .await?
        } else {
            self.db
                .write_alone(move |tx| tx.execute(sql, &values))
                .await?
        };
        self.lost_unless(changed as i64)
    }

    /// An error unless the statement that needed this delivery's claim found it (`changed`).
    fn lost_unless(&self, changed: i64) -> anyhow::Result<()> {
        if changed == 0 {
            anyhow::bail!(
                "the claim on task {} was lost to another consumer",
                self.message.id
            );
        }
        Ok(())
    }

    /// On PostgreSQL, acknowledges the message (queueing `next` first, if any) and claims in
    /// the same statement the message the slot asks for next, which `SqlBroker::next` then
    /// hands out: one round trip fewer for every step. Returns how many messages were
    /// acknowledged, or `None` where this is not done (SQLite, whose statements cost no round
    /// trip, or a consumer that is stopping).
    async fn ack_claiming(&self, next: Option<&TaskMessage>) -> anyhow::Result<Option<i64>> {
        let Some(ahead) = &self.claim_ahead else {
            return Ok(None);
        };
        let queues = ahead
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if queues.as_deref() == Some("[]") {
            return Ok(None);
        }
        let owner = format!("{}/{}", ahead.holder, uuid::Uuid::new_v4().simple());
        let mut values = next.map(queue_values).unwrap_or_default();
        values.extend(
            args![
                self.message.id,
                self.owner,
                owner,
                self.lease.as_millis() as i64,
                queues
            ]
            .iter()
            .cloned(),
        );
        if next.is_some() {
            values.push(Value::Text(CHANNEL.to_owned()));
        }
        let publishing = usize::from(next.is_some());
        let sent = Instant::now();
        let row = self
            .db
            .write_alone(move |tx| tx.query_one(&ACK_CLAIMING_POSTGRES[publishing], &values))
            .await?;
        let unused = match claimed_ahead(&row, owner, sent)? {
            Some(Ok(claimed)) => {
                // Kept unless the consumer stopped meanwhile. Decided under the lock that
                // `stop_consuming` takes the kept claims under, after it has cleared the
                // queues: either this claim is kept before and given back by it, or it sees
                // the consumer stopped here.
                let mut stash = ahead.stash.lock().unwrap_or_else(|e| e.into_inner());
                let stopped = ahead
                    .queues
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_deref()
                    == Some("[]");
                if stopped {
                    Some((claimed.message.id, claimed.owner))
                } else {
                    stash.push(claimed);
                    None
                }
            }
            // A row that is not a message: `claim` moves it to the dead letters.
            Some(Err(unreadable)) => Some(unreadable),
            None => None,
        };
        if let Some((task_id, owner)) = unused {
            give_back(&self.db, &task_id, &owner).await;
        }
        Ok(Some(row.get(0)?))
    }
}

#[async_trait]
impl Delivery for SqlDelivery {
    fn message(&self) -> &TaskMessage {
        &self.message
    }

    fn published_at(&self) -> Option<DateTime<Utc>> {
        self.published_at
    }

    fn exclusive(&self) -> bool {
        // One row per task id, claimed under a lease renewed by `keep_alive`: the claim the
        // engine would otherwise take in the store.
        true
    }

    fn surely_held(&self) -> bool {
        // Nobody can take the message before its lease, counted from when the claim or its
        // renewal was sent, runs out.
        self.renewed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            < self.lease / 2
    }

    async fn keep_alive(&self) -> anyhow::Result<()> {
        let sent = Instant::now();
        self.update_owned(
            "UPDATE queue SET lease_until = {now_ms} + ?3 WHERE task_id = ?1 AND lease_owner = ?2",
            vec![self.lease.as_millis() as i64],
            false,
        )
        .await?;
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = sent;
        Ok(())
    }

    async fn ack(self: Box<Self>) -> anyhow::Result<()> {
        match self.ack_claiming(None).await? {
            Some(acked) => self.lost_unless(acked),
            None => self.update_owned(ACK, vec![], false).await,
        }
    }

    async fn ack_publishing(
        self: Box<Self>,
        _broker: &dyn Broker,
        next: Option<&TaskMessage>,
    ) -> anyhow::Result<()> {
        let Some(next) = next else {
            return self.ack().await;
        };
        // The next step queued and this one removed in one transaction: no moment where a
        // crash leaves both or neither.
        let acked = match self.ack_claiming(Some(next)).await? {
            Some(acked) => acked,
            None => {
                let mut values = queue_values(next);
                values.extend(args![self.message.id, self.owner, CHANNEL].iter().cloned());
                match self.db.engine() {
                    // One statement (with the notification of idle consumers): no BEGIN and
                    // COMMIT round trips on the path of every step.
                    Engine::Postgres => {
                        self.db
                            .write_alone(move |tx| {
                                tx.query_one(&ACK_PUBLISHING_POSTGRES, &values)?.get(0)
                            })
                            .await?
                    }
                    Engine::Sqlite => {
                        self.db
                            .write(move |tx| {
                                tx.execute(INSERT_MESSAGE, &values[..11])?;
                                Ok(tx.execute(ACK, &values[11..13])? as i64)
                            })
                            .await?
                    }
                }
            }
        };
        self.published.notify_one();
        self.lost_unless(acked)
    }

    async fn retry_later(self: Box<Self>, eta: DateTime<Utc>, retries: u32) -> anyhow::Result<()> {
        // Queued again now: its wait starts over (from its eta, which is later).
        self.update_owned(
            "UPDATE queue SET eta = ?3, retries = ?4, published_at = ?5, lease_owner = NULL,
                lease_until = NULL
             WHERE task_id = ?1 AND lease_owner = ?2",
            vec![to_millis(eta), i64::from(retries), to_millis(Utc::now())],
            true,
        )
        .await?;
        self.published.notify_one();
        Ok(())
    }

    async fn decline(self: Box<Self>, delay: std::time::Duration) -> anyhow::Result<()> {
        // Deferred in place (same retry count), so no slot is held while it waits.
        let eta = Utc::now() + chrono::Duration::from_std(delay)?;
        let retries = self.message.retries;
        self.retry_later(eta, retries).await
    }

    async fn release(self: Box<Self>) -> anyhow::Result<()> {
        self.update_owned(RELEASE, vec![], true).await?;
        self.published.notify_one();
        Ok(())
    }

    async fn dead_letter(self: Box<Self>, reason: &str) -> anyhow::Result<()> {
        let (task_id, owner, why) = (
            self.message.id.clone(),
            self.owner.clone(),
            reason.to_owned(),
        );
        let moved = self
            .db
            .write(move |tx| move_to_dead_letters(tx, &task_id, Some(&owner), &why))
            .await?;
        if !moved {
            anyhow::bail!(
                "the claim on task {} was lost to another consumer",
                self.message.id
            );
        }
        error!(task_id = %self.message.id, task = %self.message.task, reason,
            "Moved a message that cannot run to the dead letters (`workers queue dead-letters`).");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn broker(dir: &tempfile::TempDir) -> SqlBroker {
        let db = crate::sqlite::Db::open(&dir.path().join("q.db"), Duration::from_secs(5)).unwrap();
        SqlBroker::new(db, Identity::current(), Duration::from_secs(30))
    }

    /// Runs one statement on the broker's database.
    async fn execute(broker: &SqlBroker, sql: &'static str, values: Vec<Value>) {
        broker
            .db
            .write(move |conn| conn.execute(sql, &values))
            .await
            .unwrap();
    }

    fn message(id: &str, priority: u8) -> TaskMessage {
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("workflow_id".into(), json!("wf"));
        kwargs.insert("step".into(), json!("s"));
        TaskMessage {
            id: id.to_owned(),
            task: "noop".into(),
            args: vec![json!(1)],
            kwargs,
            priority,
            eta: None,
            retries: 0,
            root_id: id.to_owned(),
            parent_id: None,
            queue: "q".into(),
            time_limits: Default::default(),
        }
    }

    /// Leases every queued message whose id starts with `prefix` to `owner` for an hour.
    async fn lease(broker: &SqlBroker, prefix: &str, owner: &str) {
        let until = to_millis(Utc::now()) + 3_600_000;
        execute(
            broker,
            "UPDATE queue SET lease_owner = ?2, lease_until = ?3
             WHERE substr(task_id, 1, length(?1)) = ?1",
            args![prefix, owner, until].to_vec(),
        )
        .await;
    }

    async fn next(broker: &SqlBroker) -> Box<dyn Delivery> {
        tokio::time::timeout(Duration::from_secs(5), broker.next())
            .await
            .expect("a runnable message is found")
            .unwrap()
    }

    fn dead_pid_owner() -> String {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        format!("{}:{gone}", Identity::current().hostname)
    }

    #[tokio::test]
    async fn a_runnable_message_is_found_behind_a_hundred_leased_ones() {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(&dir);
        for i in 0..100 {
            broker
                .publish(&message(&format!("leased-{i:03}"), 9))
                .await
                .unwrap();
        }
        // A live process of another host holds them all, ahead of the runnable one.
        lease(&broker, "leased-", "elsewhere.example:1").await;
        broker.publish(&message("runnable", 1)).await.unwrap();
        let delivery = next(&broker).await;
        assert_eq!(delivery.message().id, "runnable");
    }

    #[tokio::test]
    async fn a_claim_of_a_dead_process_of_this_host_is_taken_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(&dir);
        for i in 0..100 {
            broker
                .publish(&message(&format!("leased-{i:03}"), 9))
                .await
                .unwrap();
        }
        lease(
            &broker,
            "leased-",
            &format!("{}:1", Identity::current().hostname),
        )
        .await;
        broker.publish(&message("orphan", 9)).await.unwrap();
        lease(&broker, "orphan", &dead_pid_owner()).await;
        broker.publish(&message("runnable", 1)).await.unwrap();
        // The orphan's lease has an hour to go, but its owner is gone; it outranks the
        // runnable one by priority.
        assert_eq!(next(&broker).await.message().id, "orphan");
        assert_eq!(next(&broker).await.message().id, "runnable");
    }

    #[tokio::test]
    async fn a_row_that_is_not_a_message_goes_to_the_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(&dir);
        broker.publish(&message("good", 1)).await.unwrap();
        for (id, args, kwargs) in [
            ("bad-args", "not json", "{}"),
            ("bad-kwargs", "[1]", "[\"a list\"]"),
        ] {
            execute(
                &broker,
                "INSERT INTO queue (task_id, task, args, kwargs, priority, eta, retries, root_id, queue)
                 VALUES (?1, 'noop', ?2, ?3, 9, 0, 2, ?1, 'q')",
                args![id, args, kwargs].to_vec(),
            )
            .await;
        }
        let delivery = next(&broker).await;
        assert_eq!(delivery.message().id, "good", "the bad rows were passed by");
        delivery.ack().await.unwrap();
        let letters = broker.dead_letters().await.unwrap().unwrap();
        let summary: Vec<_> = letters
            .iter()
            .map(|l| {
                (
                    l.task_id.as_str(),
                    l.args.as_str(),
                    l.kwargs.as_str(),
                    l.retries,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("bad-args", "not json", "{}", 2),
                ("bad-kwargs", "[1]", "[\"a list\"]", 2)
            ]
        );
        assert!(letters[0].reason.contains("args"), "{}", letters[0].reason);
        assert!(
            letters[1].reason.contains("kwargs"),
            "{}",
            letters[1].reason
        );
        for id in ["bad-args", "bad-kwargs", "good"] {
            assert_eq!(broker.holds(id).await.unwrap(), Some(false), "{id}");
        }
    }

    #[tokio::test]
    async fn a_delivery_knows_when_its_message_was_published_or_retried() {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(&dir);
        let before = Utc::now();
        broker.publish(&message("timed", 1)).await.unwrap();
        let delivery = next(&broker).await;
        let published = delivery.published_at().expect("the queue records it");
        assert!(before - chrono::Duration::milliseconds(1) <= published && published <= Utc::now());
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A retry is published again: its wait starts over.
        delivery.retry_later(Utc::now(), 1).await.unwrap();
        let again = next(&broker).await;
        assert_eq!(again.message().retries, 1);
        assert!(again.published_at().unwrap() > published);
    }

    #[tokio::test]
    async fn a_delivery_that_cannot_run_is_kept_as_a_dead_letter() {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(&dir);
        let mut sent = message("orphan-step", 4);
        sent.retries = 1;
        sent.parent_id = Some("parent".into());
        broker.publish(&sent).await.unwrap();
        let delivery = next(&broker).await;
        let before = Utc::now();
        delivery.dead_letter("no dataset id").await.unwrap();
        assert_eq!(broker.holds("orphan-step").await.unwrap(), Some(false));
        let letters = broker.dead_letters().await.unwrap().unwrap();
        assert_eq!(letters.len(), 1);
        let letter = &letters[0];
        assert_eq!(letter.reason, "no dataset id");
        assert_eq!(letter.task, "noop");
        assert_eq!(letter.priority, 4);
        assert_eq!(letter.retries, 1);
        assert_eq!(letter.parent_id.as_deref(), Some("parent"));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&letter.kwargs).unwrap(),
            serde_json::Value::Object(sent.kwargs.clone())
        );
        assert!(letter.dead_at >= before - chrono::Duration::seconds(1));
    }
}

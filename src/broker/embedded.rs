//! The embedded broker: the `queue` table of the SQLite database, shared safely by every
//! process on the host. A claim is a lease that the consumer renews while it works; a lease
//! that runs out, or whose owner process on this host is gone, makes the message claimable
//! again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use tokio::sync::Notify;

use super::{Broker, Consume, Delivery, TaskMessage};
use crate::identity::Identity;
use crate::sqlite::{Db, from_millis, to_millis};

/// How long an idle consumer waits before looking again; messages published by other
/// processes are seen at most this late.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

pub struct EmbeddedBroker {
    db: Db,
    consumer: Identity,
    lease: Duration,
    published: Arc<Notify>,
    /// The queues `next` takes from, as a JSON list; `None` takes from every queue.
    queues: std::sync::Mutex<Option<String>>,
}

impl EmbeddedBroker {
    pub fn new(db: Db, consumer: Identity, lease: Duration) -> EmbeddedBroker {
        EmbeddedBroker {
            db,
            consumer,
            lease,
            published: Arc::new(Notify::new()),
            queues: std::sync::Mutex::new(None),
        }
    }

    /// Claims the best runnable message, if any; otherwise returns the earliest future eta.
    async fn try_claim(&self) -> anyhow::Result<Result<TaskMessage, Option<DateTime<Utc>>>> {
        let consumer = self.consumer.clone();
        let lease_ms = self.lease.as_millis() as i64;
        let queues = self
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.db
            .write(move |tx| {
                let now = to_millis(Utc::now());
                let mut candidates = tx.prepare_cached(
                    "SELECT task_id, lease_owner, lease_until FROM queue WHERE eta <= ?1
                     AND (?2 IS NULL OR queue IN (SELECT value FROM json_each(?2)))
                     ORDER BY priority DESC, seq LIMIT 64",
                )?;
                let rows: Vec<(String, Option<String>, Option<i64>)> = candidates
                    .query_map(params![now, queues], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                let claimable = rows.into_iter().find(|(_, owner, until)| match (owner, until) {
                    (None, _) | (_, None) => true,
                    (Some(owner), Some(until)) => *until < now || consumer.is_dead_owner(owner),
                });
                let Some((task_id, _, _)) = claimable else {
                    let next_eta: Option<i64> = tx
                        .query_row(
                            "SELECT MIN(eta) FROM queue WHERE eta > ?1
                             AND (?2 IS NULL OR queue IN (SELECT value FROM json_each(?2)))",
                            params![now, queues],
                            |r| r.get(0),
                        )
                        .optional()?
                        .flatten();
                    return Ok(Err(next_eta.map(from_millis)));
                };
                tx.execute(
                    "UPDATE queue SET lease_owner = ?2, lease_until = ?3 WHERE task_id = ?1",
                    params![task_id, consumer.holder(), now + lease_ms],
                )?;
                let message = tx.query_row(
                    "SELECT task_id, task, args, kwargs, priority, eta, retries, root_id, parent_id, queue
                     FROM queue WHERE task_id = ?1",
                    [&task_id],
                    |r| {
                        let args: String = r.get(2)?;
                        let kwargs: String = r.get(3)?;
                        let eta: i64 = r.get(5)?;
                        Ok(TaskMessage {
                            id: r.get(0)?,
                            task: r.get(1)?,
                            args: serde_json::from_str(&args).unwrap_or_default(),
                            kwargs: serde_json::from_str(&kwargs).unwrap_or_default(),
                            priority: r.get::<_, i64>(4)?.clamp(0, 9) as u8,
                            eta: (eta > 0).then(|| from_millis(eta)),
                            retries: r.get::<_, i64>(6)? as u32,
                            root_id: r.get(7)?,
                            parent_id: r.get(8)?,
                            queue: r.get(9)?,
                            // Steps of the embedded profile are limited by the configuration.
                            time_limits: Default::default(),
                        })
                    },
                )?;
                Ok(Ok(message))
            })
            .await
    }
}

#[async_trait]
impl Broker for EmbeddedBroker {
    async fn publish(&self, message: &TaskMessage) -> anyhow::Result<()> {
        let message = message.clone();
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO queue (task_id, task, args, kwargs, priority, eta, retries, root_id, parent_id, queue)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (task_id) DO NOTHING",
                    params![
                        message.id,
                        message.task,
                        serde_json::Value::from(message.args.clone()).to_string(),
                        serde_json::Value::Object(message.kwargs.clone()).to_string(),
                        i64::from(message.priority.min(9)),
                        message.eta.map(to_millis).unwrap_or(0),
                        i64::from(message.retries),
                        message.root_id,
                        message.parent_id,
                        message.queue
                    ],
                )?;
                Ok(())
            })
            .await?;
        self.published.notify_waiters();
        Ok(())
    }

    async fn next(&self) -> anyhow::Result<Box<dyn Delivery>> {
        loop {
            // Register interest before looking, so a publish between the look and the wait
            // is not missed.
            let notified = self.published.notified();
            match self.try_claim().await? {
                Ok(message) => {
                    return Ok(Box::new(EmbeddedDelivery {
                        db: self.db.clone(),
                        owner: self.consumer.holder(),
                        lease: self.lease,
                        message,
                        published: Arc::clone(&self.published),
                    }));
                }
                Err(next_eta) => {
                    let mut wait = POLL_INTERVAL;
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
            .call(move |conn| {
                let found: Option<i64> = conn
                    .query_row("SELECT 1 FROM queue WHERE task_id = ?1", [task_id], |r| {
                        r.get(0)
                    })
                    .optional()?;
                Ok(Some(found.is_some()))
            })
            .await
    }

    async fn start_consuming(&self, consume: &Consume) -> anyhow::Result<()> {
        let queues = consume
            .queues
            .as_ref()
            .map(|q| serde_json::Value::from(q.clone()).to_string());
        *self.queues.lock().unwrap_or_else(|e| e.into_inner()) = queues;
        Ok(())
    }
}

struct EmbeddedDelivery {
    db: Db,
    owner: String,
    lease: Duration,
    message: TaskMessage,
    published: Arc<Notify>,
}

impl EmbeddedDelivery {
    /// Runs `sql` (parameters: task id, owner, then `extra`) and fails if the lease was lost.
    async fn update_owned(&self, sql: &'static str, extra: Vec<i64>) -> anyhow::Result<()> {
        let (task_id, owner) = (self.message.id.clone(), self.owner.clone());
        let changed = self
            .db
            .write(move |tx| {
                let mut values: Vec<&dyn rusqlite::ToSql> = vec![&task_id, &owner];
                for v in &extra {
                    values.push(v);
                }
                Ok(tx.execute(sql, values.as_slice())?)
            })
            .await?;
        if changed == 0 {
            anyhow::bail!(
                "the claim on task {} was lost to another consumer",
                self.message.id
            );
        }
        Ok(())
    }
}

#[async_trait]
impl Delivery for EmbeddedDelivery {
    fn message(&self) -> &TaskMessage {
        &self.message
    }

    fn exclusive(&self) -> bool {
        // One row per task id, claimed under a lease renewed by `keep_alive`: the claim the
        // engine would otherwise take in the store.
        true
    }

    async fn keep_alive(&self) -> anyhow::Result<()> {
        let until = to_millis(Utc::now()) + self.lease.as_millis() as i64;
        self.update_owned(
            "UPDATE queue SET lease_until = ?3 WHERE task_id = ?1 AND lease_owner = ?2",
            vec![until],
        )
        .await
    }

    async fn ack(self: Box<Self>) -> anyhow::Result<()> {
        self.update_owned(
            "DELETE FROM queue WHERE task_id = ?1 AND lease_owner = ?2",
            vec![],
        )
        .await
    }

    async fn retry_later(self: Box<Self>, eta: DateTime<Utc>, retries: u32) -> anyhow::Result<()> {
        self.update_owned(
            "UPDATE queue SET eta = ?3, retries = ?4, lease_owner = NULL, lease_until = NULL
             WHERE task_id = ?1 AND lease_owner = ?2",
            vec![to_millis(eta), i64::from(retries)],
        )
        .await?;
        self.published.notify_waiters();
        Ok(())
    }

    async fn release(self: Box<Self>) -> anyhow::Result<()> {
        self.update_owned(
            "UPDATE queue SET lease_owner = NULL, lease_until = NULL WHERE task_id = ?1 AND lease_owner = ?2",
            vec![],
        )
        .await?;
        self.published.notify_waiters();
        Ok(())
    }
}

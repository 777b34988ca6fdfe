//! The embedded profile's mailbox: requests and replies are rows of the database every worker
//! shares (`control_requests`, `control_replies`), the SQLite file of one host or a PostgreSQL
//! database, through one body of statements (`crate::sql`); workers look for new requests a
//! few times a second.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use serde_json::Value;
use tokio::sync::watch;
use tracing::warn;

use super::mailbox::{Collect, Mailbox, Reply, answer};
use super::{Request, WorkerControl};
use crate::args;
use crate::sql::{Database, Engine};
use crate::sqlite::to_millis;

/// How often a worker looks for new requests, and a sender for replies.
const POLL: Duration = Duration::from_millis(200);
/// The advisory lock senders of requests take on PostgreSQL.
const REQUEST_LOCK: i64 = 0x006d_6169_6c62_6f78; // "mailbox" in ASCII

/// Requests and replies older than this are removed.
const KEEP: chrono::Duration = chrono::Duration::minutes(10);

pub struct SqlMailbox {
    db: Database,
}

impl SqlMailbox {
    pub fn new(db: impl Into<Database>) -> SqlMailbox {
        SqlMailbox { db: db.into() }
    }

    async fn last_request(&self) -> anyhow::Result<i64> {
        self.db
            .read(|conn| {
                Ok(conn
                    .query_one("SELECT MAX(id) FROM control_requests", args![])?
                    .get::<Option<i64>>(0)?
                    .unwrap_or(0))
            })
            .await
    }

    async fn requests_after(&self, after: i64) -> anyhow::Result<Vec<(i64, String)>> {
        self.db
            .read(move |conn| {
                conn.query(
                    "SELECT id, body FROM control_requests WHERE id > ?1 ORDER BY id",
                    args![after],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?)))
                .collect()
            })
            .await
    }
}

#[async_trait]
impl Mailbox for SqlMailbox {
    async fn serve(&self, control: Arc<WorkerControl>, mut stop: watch::Receiver<bool>) {
        // Requests sent before this worker started are not for it.
        let mut last = loop {
            match self.last_request().await {
                Ok(last) => break last,
                Err(err) => {
                    warn!(error = %format!("{err:#}"), "Cannot read the control requests; trying again.");
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            let requests = match self.requests_after(last).await {
                Ok(requests) => requests,
                Err(err) => {
                    warn!(error = %format!("{err:#}"), "Cannot read the control requests.");
                    continue;
                }
            };
            for (id, body) in requests {
                last = id;
                let request: Request = match serde_json::from_str(&body) {
                    Ok(request) => request,
                    Err(err) => {
                        warn!(request = id, error = %err, "Ignored a control request that cannot be read.");
                        continue;
                    }
                };
                let Some(reply) = answer(&control, &request).await else {
                    continue;
                };
                let (ticket, node) = (
                    request.ticket.clone().unwrap_or_default(),
                    control.node().to_owned(),
                );
                let stored = self
                    .db
                    .write(move |tx| {
                        tx.execute(
                            "INSERT INTO control_replies (ticket, hostname, reply, sent_at)
                             VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (ticket, hostname) DO UPDATE SET reply = excluded.reply,
                                sent_at = excluded.sent_at",
                            args![ticket, node, reply.to_string(), to_millis(Utc::now())],
                        )?;
                        Ok(())
                    })
                    .await;
                if let Err(err) = stored {
                    warn!(error = %format!("{err:#}"), "Cannot store a control reply.");
                }
            }
        }
    }

    async fn broadcast(
        &self,
        mut request: Request,
        collect: Option<Collect>,
    ) -> anyhow::Result<Vec<Reply>> {
        let ticket = collect.map(|_| uuid::Uuid::new_v4().to_string());
        request.ticket = ticket.clone();
        let body = serde_json::to_string(&request)?;
        self.db
            .write(move |tx| {
                // Workers read the requests after the last id they saw, so ids must become
                // visible in order. PostgreSQL hands ids out at insert, not at commit: senders
                // take turns until their commit.
                if tx.engine() == Engine::Postgres {
                    tx.query("SELECT pg_advisory_xact_lock(?1)", args![REQUEST_LOCK])?;
                }
                // Measured on the database's clock.
                let keep = KEEP.num_milliseconds();
                tx.execute(
                    "DELETE FROM control_requests WHERE sent_at < {now_ms} - ?1",
                    args![keep],
                )?;
                tx.execute(
                    "DELETE FROM control_replies WHERE sent_at < {now_ms} - ?1",
                    args![keep],
                )?;
                tx.execute(
                    "INSERT INTO control_requests (body, sent_at) VALUES (?1, ?2)",
                    args![body, to_millis(Utc::now())],
                )?;
                Ok(())
            })
            .await?;
        let (Some(collect), Some(ticket)) = (collect, ticket) else {
            return Ok(Vec::new());
        };
        let deadline = tokio::time::Instant::now() + collect.timeout;
        loop {
            let ticket = ticket.clone();
            let rows: Vec<(String, String)> = self
                .db
                .read(move |conn| {
                    conn.query(
                        "SELECT hostname, reply FROM control_replies WHERE ticket = ?1 ORDER BY sent_at, hostname",
                        args![ticket],
                    )?
                    .iter()
                    .map(|r| Ok((r.get(0)?, r.get(1)?)))
                    .collect()
                })
                .await?;
            let replies: Vec<Reply> = rows
                .into_iter()
                .filter_map(|(node, reply)| {
                    let body: Value = serde_json::from_str(&reply).ok()?;
                    Some((
                        node.clone(),
                        body.get(&node).cloned().unwrap_or(Value::Null),
                    ))
                })
                .collect();
            let enough = collect.limit.is_some_and(|limit| replies.len() >= limit);
            if enough || tokio::time::Instant::now() >= deadline {
                return Ok(replies);
            }
            tokio::time::sleep(POLL.min(deadline - tokio::time::Instant::now())).await;
        }
    }
}

//! The mailbox seam: how control requests reach workers and their replies come back.
//! RabbitMQ carries them as Celery's pidbox does ([`super::amqp`]); the embedded profile keeps
//! them in its database ([`super::sql`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::watch;
use tracing::debug;

use super::{Answer, Request, WorkerControl};

/// How long a sender waits for replies, and for how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Collect {
    pub timeout: Duration,
    /// Stop once this many replies came (the number of destinations, when known).
    pub limit: Option<usize>,
}

/// One node's reply: its name and what it answered.
pub type Reply = (String, Value);

#[async_trait]
pub trait Mailbox: Send + Sync {
    /// Serves the requests addressed to `control`'s node until `stop` turns true. Errors of
    /// the transport are logged and retried here; it returns only when stopped.
    async fn serve(&self, control: Arc<WorkerControl>, stop: watch::Receiver<bool>);

    /// Sends `request` to the workers. With `collect`, waits for their replies (and sets the
    /// request's ticket and reply address); without, returns once the request is sent.
    async fn broadcast(
        &self,
        request: Request,
        collect: Option<Collect>,
    ) -> anyhow::Result<Vec<Reply>>;
}

/// What `control` answers to `request`, when it is addressed to it and the sender waits for a
/// reply: `{node: reply}` as kombu's `Node.dispatch` sends it.
pub async fn answer(control: &WorkerControl, request: &Request) -> Option<Value> {
    if !request.is_for(control.node()) {
        return None;
    }
    debug!(method = %request.method, node = %control.node(), "Control request.");
    let answer = control.handle(request).await;
    match answer {
        Answer::Reply(reply) if request.ticket.is_some() => {
            let mut body = serde_json::Map::new();
            body.insert(control.node().to_owned(), reply);
            Some(Value::Object(body))
        }
        _ => None,
    }
}

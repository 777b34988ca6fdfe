//! The broker seam: a durable queue of step messages (Celery's task messages, spec G.2).
//!
//! A message is handed to one consumer at a time and stays in the broker until that consumer
//! acknowledges it, so a consumer that dies mid-step loses nothing: the message is delivered
//! again. Acknowledging only after the step's result is stored and the next step published
//! makes every step run to a recorded end.

pub mod amqp;
pub mod celery;
pub mod saferepr;
pub mod sql;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tracing::error;

/// One step to run: the fields of a Celery protocol v2 message that the workers use.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    /// The task id; retries of the task keep it.
    pub id: String,
    /// The registered task name (`inspect_dataset`, ...).
    pub task: String,
    pub args: Vec<serde_json::Value>,
    /// Includes `workflow_id`, `step` and `app_id` for workflow steps.
    pub kwargs: serde_json::Map<String, serde_json::Value>,
    /// 0-9; higher runs first.
    pub priority: u8,
    /// Not to run before this time.
    pub eta: Option<DateTime<Utc>>,
    pub retries: u32,
    pub root_id: String,
    pub parent_id: Option<String>,
    pub queue: String,
    /// Celery's `timelimit` header.
    pub time_limits: TimeLimits,
}

/// Celery's `timelimit` header `[hard, soft]`, in seconds: a step still running past either
/// is stopped and fails.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TimeLimits {
    pub hard: Option<f64>,
    pub soft: Option<f64>,
}

impl TimeLimits {
    /// The earlier of the two limits, if any is a positive number of seconds.
    pub fn earliest(&self) -> Option<std::time::Duration> {
        [self.hard, self.soft]
            .into_iter()
            .flatten()
            .filter(|secs| secs.is_finite() && *secs > 0.0)
            .map(std::time::Duration::from_secs_f64)
            .min()
    }
}

impl TaskMessage {
    pub fn workflow_id(&self) -> Option<&str> {
        self.kwargs.get("workflow_id").and_then(|v| v.as_str())
    }

    pub fn step_name(&self) -> Option<&str> {
        self.kwargs.get("step").and_then(|v| v.as_str())
    }
}

/// Messages waiting in a queue (`Broker::queued`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub waiting: u64,
    /// When the oldest waiting message was published, where the broker records it.
    pub oldest: Option<DateTime<Utc>>,
}

/// A message that can never run, kept aside by a broker that has a place for it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub task_id: String,
    pub task: String,
    pub queue: String,
    /// The arguments and keyword arguments as they were stored; they may not be JSON.
    pub args: String,
    pub kwargs: String,
    pub priority: i64,
    pub eta: Option<DateTime<Utc>>,
    pub retries: i64,
    pub root_id: String,
    pub parent_id: Option<String>,
    /// Why it cannot run.
    pub reason: String,
    /// When it was put aside.
    pub dead_at: DateTime<Utc>,
}

/// What a worker consumes: which queues, and how many messages it takes at once (its slots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consume {
    /// `None`: the broker's own default (every queue for the embedded broker, the configured
    /// queues for RabbitMQ).
    pub queues: Option<Vec<String>>,
    pub prefetch: u16,
}

#[async_trait]
pub trait Broker: Send + Sync {
    /// Queues `message`; returns once the broker has it. Publishing a message whose id is
    /// still queued is a no-op for the embedded broker and a second copy for RabbitMQ: the
    /// engine's claims make either harmless.
    async fn publish(&self, message: &TaskMessage) -> anyhow::Result<()>;

    /// Queues every message, in order (the first steps of `engine::start_many`).
    async fn publish_many(&self, messages: &[TaskMessage]) -> anyhow::Result<()> {
        for message in messages {
            self.publish(message).await?;
        }
        Ok(())
    }

    /// Waits for the next runnable message (highest priority first, `eta` honoured) and
    /// claims it for this consumer. Cancel by dropping the future.
    async fn next(&self) -> anyhow::Result<Box<dyn Delivery>>;

    /// Whether a message with this id is queued or being worked on, when the broker can tell.
    async fn holds(&self, task_id: &str) -> anyhow::Result<Option<bool>>;

    /// Whether a message of one of `tasks` is due now (queued with no `eta` in the future,
    /// claimed or not), when the broker can tell: a worker that stops once idle waits for such
    /// messages even when no workflow is active (plain tasks belong to none). Messages of other
    /// tasks are for other workers and never keep it.
    async fn has_due_messages(&self, tasks: &[&str]) -> anyhow::Result<Option<bool>> {
        let _ = tasks;
        Ok(None)
    }

    /// The messages this consumer received and has not handed to a slot yet: due ones waiting
    /// for a slot, and ones held for their `eta` (Celery's `reserved` and `scheduled`). Empty
    /// for a broker that hands out messages only when a slot takes one.
    async fn waiting(&self) -> Vec<TaskMessage> {
        Vec::new()
    }

    /// Sets what `next` takes from; called by a worker before its first `next`.
    async fn start_consuming(&self, consume: &Consume) -> anyhow::Result<()> {
        let _ = consume;
        Ok(())
    }

    /// Stops taking messages (a worker draining before it exits). Deliveries already handed
    /// out stay valid and must still be ended.
    async fn stop_consuming(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Makes sure the broker can be reached now, for callers that cannot wait for it to come
    /// back (a worker that must end once idle).
    async fn check_reachable(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Declares the queues this process uses as the workers do, so that a queue that exists
    /// with other arguments (RabbitMQ's PRECONDITION_FAILED) is found before a worker trips on
    /// it (`workers doctor`). Nothing to do for a broker without such declarations.
    async fn check_queues(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// How many messages wait in the queues this process consumes (not held by a worker), and
    /// when the oldest of them was published where the broker keeps that; `None` when the
    /// broker cannot tell.
    async fn queued(&self) -> anyhow::Result<Option<QueueDepth>> {
        Ok(None)
    }

    /// The messages kept aside because they can never run, oldest first; `None` when this
    /// broker keeps none itself.
    async fn dead_letters(&self) -> anyhow::Result<Option<Vec<DeadLetter>>> {
        Ok(None)
    }

    /// Deletes the queue `name` from the broker, messages and all (spec C.9 `delete_queue`:
    /// the way out after the queue's arguments changed), and returns how many messages it
    /// held; `None` when this broker has no queue to delete (the embedded one keeps its
    /// messages in the database, declared by no one).
    async fn delete_queue(&self, name: &str) -> anyhow::Result<Option<u32>> {
        let _ = name;
        Ok(None)
    }
}

/// How a message's arguments read in Celery's headers and events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgsRepr {
    pub args: String,
    pub kwargs: String,
}

/// A claimed message. Exactly one of `ack`, `retry_later`, `release` or `dead_letter` ends
/// it; dropping it without one leaves the message to be delivered again (after its lease runs
/// out in the embedded queue, at once with RabbitMQ).
#[async_trait]
pub trait Delivery: Send + Sync {
    fn message(&self) -> &TaskMessage;

    /// When the message was published (a retry: when it was published again), if the broker
    /// knows: the embedded queue records it, and RabbitMQ carries it in the `timestamp`
    /// property that our publishers set (to the second; Celery's publishers set none). It
    /// measures the wait in the queue.
    fn published_at(&self) -> Option<DateTime<Utc>> {
        None
    }

    /// The arguments as the publisher wrote them for people (Celery's `argsrepr` and
    /// `kwargsrepr` headers), when the message carries them: a Celery worker reports these,
    /// not reprs of its own, in `task-received`. They can differ from the `saferepr` of the
    /// arguments: a list shows as `[7]`, and a caller may hide arguments behind its own text.
    fn reprs(&self) -> Option<&ArgsRepr> {
        None
    }

    /// Whether holding this delivery already keeps every other consumer from the same task id
    /// until it ends or its claim lapses (the embedded queue keys its claims by task id). The
    /// engine claims the task in the store only when it does not.
    fn exclusive(&self) -> bool {
        false
    }

    /// Renews the claim; an error means the claim was lost and another consumer may run the
    /// step, so the caller must stop and record nothing.
    async fn keep_alive(&self) -> anyhow::Result<()>;

    /// Whether this consumer certainly still holds the message without asking the broker: its
    /// claim was taken or renewed so recently that it cannot have lapsed. Only a broker whose
    /// claims lapse (`exclusive`) can say so.
    fn surely_held(&self) -> bool {
        false
    }

    /// The step is finished and recorded: remove the message.
    async fn ack(self: Box<Self>) -> anyhow::Result<()>;

    /// The step is finished and recorded and `next` follows it: publishes `next` and removes
    /// this message. This default publishes through `broker` (with its confirm) and then
    /// acknowledges, so that a crash in between delivers this message again, and its
    /// bookkeeping publishes the same `next` again (its task id follows from this one's). A
    /// broker whose queue is a database table does both in one transaction.
    async fn ack_publishing(
        self: Box<Self>,
        broker: &dyn Broker,
        next: Option<&TaskMessage>,
    ) -> anyhow::Result<()> {
        if let Some(next) = next {
            broker.publish(next).await?;
        }
        self.ack().await
    }

    /// Run the same task id again at `eta` with the given retry count.
    async fn retry_later(self: Box<Self>, eta: DateTime<Utc>, retries: u32) -> anyhow::Result<()>;

    /// Give the message back untouched (shutdown).
    async fn release(self: Box<Self>) -> anyhow::Result<()>;

    /// This worker cannot run the message (a task it does not implement): give it back for a
    /// worker that can, not before `delay` has passed, so that a worker alone on the queue does
    /// not take it again at once. This default holds the message for `delay`, then releases it;
    /// a broker with delayed delivery of its own defers it instead.
    async fn decline(self: Box<Self>, delay: std::time::Duration) -> anyhow::Result<()> {
        tokio::time::sleep(delay).await;
        self.release().await
    }

    /// The message can never run (`reason` says why): keep it aside where the broker has a
    /// place for that, so that an operator can see it. A broker without one can only log it
    /// and remove it, which is what this default does.
    async fn dead_letter(self: Box<Self>, reason: &str) -> anyhow::Result<()> {
        let message = self.message();
        error!(task_id = %message.id, task = %message.task, reason,
            "Dropped a message that cannot run; this broker has no place to keep it.");
        self.ack().await
    }
}

//! The RabbitMQ broker: Celery's queues and task messages (spec G.1, G.2), so that this program
//! and Python Celery producers and workers share one RabbitMQ.
//!
//! What it guarantees, and how:
//! - A publish returns only once RabbitMQ has the message (publisher confirms), so a step
//!   acknowledged after publishing its successor never loses it.
//! - A message is acknowledged only when the engine says so (acks late). One that cannot be
//!   read is rejected without requeue, so it cannot loop.
//! - A message whose `eta` lies ahead is held here, unacknowledged, until due; the prefetch is
//!   raised by one while it is held (as Celery does) so held messages do not take the slots,
//!   up to `max_held` held messages (see `prefetch_for`), so that a flood of `eta` messages
//!   cannot draw the whole queue into one worker.
//! - A message that can never run is acknowledged and logged (a Celery fleet has no
//!   dead-letter convention), or, when the queue is declared with a dead-letter exchange
//!   (`dead_letter_exchange`), rejected without requeue so that RabbitMQ moves it there.
//! - A lost connection, a broker restart or a channel closed by RabbitMQ (its delivery
//!   acknowledgement timeout, `consumer_timeout`) is followed by a reconnection with
//!   exponential backoff up to `reconnect_max`, a fresh declaration of the topology and new
//!   consumers. Steps running at that moment keep running; their acknowledgement on the dead
//!   channel is skipped and logged, and RabbitMQ delivers their message again.
//!
//! RabbitMQ delivers a message more than once in those cases, and a re-published message can
//! meet its original. The engine makes that harmless: it claims each task id in the store
//! before running it (see `workflow::engine`), so a duplicate is deferred while the original
//! runs and dropped once its result is stored. For the same reason, steps may run longer than
//! RabbitMQ's `consumer_timeout`: when it closes the channel, the consumer recovers on a new
//! channel, the running step finishes and records its result, and the copy RabbitMQ delivers
//! again is deferred, then dropped. The original deployment raises `consumer_timeout` to 24 h
//! (spec G.1) to avoid those redeliveries; with this broker that setting is an optimisation,
//! not a requirement.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Acker, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::celery::{self, Sender};
use super::{ArgsRepr, Broker, Consume, Delivery, QueueDepth, TaskMessage};
use crate::identity::Identity;

/// The priorities a Celery queue of the original supports (`task_queue_max_priority`).
pub const MAX_PRIORITY: i32 = 10;

/// Messages of one `publish_many` awaiting their confirms at once.
const PUBLISH_IN_FLIGHT: usize = 64;

/// The first wait before reconnecting; it doubles up to `reconnect_max`.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// A consumer that stayed up this long starts its next reconnection at `FIRST_RETRY` again.
const HEALTHY: Duration = Duration::from_secs(10);
/// How long opening a connection (TCP and AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The largest AMQP frame a connection asks for, unless its URI sets `frame_max`: RabbitMQ's
/// default, which Celery's client asks for too. Said up front because lapin sizes its send and
/// receive buffers (32 frames each, per connection) by what the URI asks: asking nothing, it
/// allocates them for the smallest frame and, once RabbitMQ offers 128 KiB, grows them by
/// writing zeros through 4 MiB each, 16 MiB resident in an idle worker. Sized at the start
/// they stay untouched until messages fill them.
const FRAME_MAX: u32 = 128 * 1024;

/// Parses an AMQP URI and applies what every connection of this client asks for (the
/// broker's, the remote control's and the events'): its `FRAME_MAX`.
pub(crate) fn parse_uri(uri: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = uri.parse()?;
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(FRAME_MAX);
    }
    Ok(uri)
}

/// How to reach RabbitMQ and what to consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost` (the password never appears in messages).
    pub uri: String,
    /// The queues consumed unless a worker names its own (`{app_id}.q`).
    pub queues: Vec<String>,
    /// Messages held unacknowledged at once unless a worker says otherwise (its slots).
    pub prefetch: u16,
    /// The AMQP heartbeat in seconds (0 disables it).
    pub heartbeat: u16,
    /// The longest wait between two reconnection attempts.
    pub reconnect_max: Duration,
    /// At most this many messages held for their `eta` raise the prefetch.
    pub max_held: u16,
    /// The dead-letter exchange the queues are declared with (`x-dead-letter-exchange`);
    /// messages that can never run are rejected to it. `None`: no such exchange.
    pub dead_letter_exchange: Option<String>,
}

/// The RabbitMQ broker. Connects on first use, not when built.
pub struct AmqpBroker {
    shared: Arc<Shared>,
}

struct Shared {
    config: AmqpConfig,
    uri: AMQPUri,
    /// The URI without credentials, for logs and errors.
    shown: String,
    connection_name: String,
    sender: Sender,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    inbox_tx: mpsc::UnboundedSender<Incoming>,
    inbox: tokio::sync::Mutex<mpsc::UnboundedReceiver<Incoming>>,
    consumer: Mutex<Option<ConsumerTask>>,
    /// The channel the consumers read from (for `close` and tests). Every message received
    /// also keeps its channel open until it is settled: closing a channel hands its
    /// unacknowledged messages to other workers, which must not happen to running steps when
    /// consumption stops or restarts.
    consume_channel: Mutex<Option<Channel>>,
    unsettled: Arc<AtomicUsize>,
    /// Messages received and not handed to a slot: held for their `eta` or waiting in the
    /// inbox (`Broker::waiting`).
    waiting: Arc<Mutex<WaitingList>>,
}

/// The messages received and not yet handed to a slot, by a sequence number of this process.
#[derive(Default)]
struct WaitingList {
    next: u64,
    messages: std::collections::BTreeMap<u64, TaskMessage>,
}

/// A message's place in the waiting list, left when it is dropped (handed to a slot, given
/// back, or forgotten with its channel).
struct Waiting {
    list: Arc<Mutex<WaitingList>>,
    seq: u64,
}

impl Waiting {
    fn new(list: &Arc<Mutex<WaitingList>>, message: &TaskMessage) -> Waiting {
        let mut waiting = list.lock().unwrap_or_else(|e| e.into_inner());
        let seq = waiting.next;
        waiting.next += 1;
        waiting.messages.insert(seq, message.clone());
        Waiting {
            list: Arc::clone(list),
            seq,
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.list
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .messages
            .remove(&self.seq);
    }
}

/// One connection with its publishing channel.
struct Link {
    connection: Connection,
    /// The arguments every queue is declared with.
    arguments: FieldTable,
    publisher: tokio::sync::Mutex<Option<Channel>>,
    /// Queues whose topology was declared on this connection.
    declared: Mutex<HashSet<String>>,
}

struct ConsumerTask {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

/// A message received and not yet handed to a slot.
struct Incoming {
    message: TaskMessage,
    reprs: Option<ArgsRepr>,
    /// The `timestamp` property, when the publisher set one.
    published_at: Option<DateTime<Utc>>,
    acker: Acker,
    delivery_tag: u64,
    channel: Channel,
    unsettled: Unsettled,
    _waiting: Waiting,
}

/// Counts a received message until it is acknowledged, released, rejected or forgotten.
struct Unsettled(Arc<AtomicUsize>);

impl Unsettled {
    fn new(count: &Arc<AtomicUsize>) -> Unsettled {
        count.fetch_add(1, Ordering::SeqCst);
        Unsettled(Arc::clone(count))
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AmqpBroker {
    /// Checks the configuration; connects on first use.
    pub fn new(config: AmqpConfig, identity: &Identity) -> anyhow::Result<AmqpBroker> {
        let mut uri = parse_uri(&config.uri).map_err(|err| {
            // The parser quotes a URL it cannot use, password included.
            let err = err.replace(&config.uri, &crate::config::redact_uri(&config.uri));
            anyhow::format_err!("amqp.uri is not an AMQP URI: {err}")
        })?;
        let shown = format!(
            "{}://{}:{}/{}",
            if matches!(uri.scheme, lapin::uri::AMQPScheme::AMQPS) {
                "amqps"
            } else {
                "amqp"
            },
            uri.authority.host,
            uri.authority.port,
            url::form_urlencoded::byte_serialize(uri.vhost.as_bytes()).collect::<String>()
        );
        uri.query.heartbeat = Some(config.heartbeat);
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = Some(CONNECT_TIMEOUT.as_millis() as u64);
        }
        for queue in &config.queues {
            name(queue)?;
        }
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        Ok(AmqpBroker {
            shared: Arc::new(Shared {
                config,
                uri,
                shown,
                connection_name: connection_name(identity),
                sender: Sender::new(&identity.hostname, identity.pid),
                link: tokio::sync::Mutex::new(None),
                inbox_tx,
                inbox: tokio::sync::Mutex::new(inbox),
                consumer: Mutex::new(None),
                consume_channel: Mutex::new(None),
                unsettled: Arc::new(AtomicUsize::new(0)),
                waiting: Arc::new(Mutex::new(WaitingList::default())),
            }),
        })
    }

    /// The broker's address without credentials.
    pub fn shown_uri(&self) -> &str {
        &self.shared.shown
    }

    /// Messages received and not yet acknowledged, released or rejected: held for their
    /// `eta`, waiting for a slot, or running.
    pub fn unsettled(&self) -> usize {
        self.shared.unsettled.load(Ordering::SeqCst)
    }

    /// Stops consuming and closes the connection; what was not acknowledged goes back to the
    /// queue.
    pub async fn close(&self) {
        let _ = self.stop_consuming().await;
        let channel = self.shared.consume_channel_slot().take();
        if let Some(channel) = channel
            && channel.status().connected()
        {
            let _ = channel.close(200, "OK".into()).await;
        }
        if let Some(link) = self.shared.link.lock().await.take()
            && let Err(err) = link.connection.close(200, "OK".into()).await
        {
            debug!(broker = %self.shared.shown, error = %err, "Closing the connection failed.");
        }
    }

    /// Makes RabbitMQ close the consumers' channel with 406 PRECONDITION_FAILED, the way it
    /// closes a channel whose delivery acknowledgement timed out (`consumer_timeout`), by
    /// acknowledging a delivery tag the channel never had. For tests of channel recovery:
    /// RabbitMQ 3.10 has no per-queue timeout that a test could lower.
    #[doc(hidden)]
    pub async fn provoke_consumer_channel_error(&self) -> anyhow::Result<()> {
        let channel = self
            .shared
            .consume_channel_slot()
            .clone()
            .context("not consuming")?;
        channel
            .basic_ack(u64::from(u32::MAX), BasicAckOptions::default())
            .await?;
        Ok(())
    }

    /// Starts consuming as `consume` says, in place of any consumer already running (unless
    /// `only_if_idle`).
    fn start(&self, consume: &Consume, only_if_idle: bool) {
        let mut slot = self.shared.consumer_slot();
        if only_if_idle && slot.is_some() {
            return;
        }
        let queues = consume
            .queues
            .clone()
            .unwrap_or_else(|| self.shared.config.queues.clone());
        let (stop, stopped) = watch::channel(false);
        let handle = tokio::spawn(consume_loop(
            Arc::clone(&self.shared),
            queues,
            consume.prefetch.max(1),
            stopped,
        ));
        if let Some(old) = slot.replace(ConsumerTask { stop, handle }) {
            let _ = old.stop.send(true);
        }
    }
}

impl Drop for AmqpBroker {
    fn drop(&mut self) {
        if let Some(task) = self.shared.consumer_slot().take() {
            let _ = task.stop.send(true);
        }
    }
}

/// `workers <hostname> <pid>`: how operators find this process among RabbitMQ's connections.
fn connection_name(identity: &Identity) -> String {
    format!("workers {} {}", identity.hostname, identity.pid)
}

/// A queue or exchange name as AMQP carries it (at most 255 bytes).
fn name(text: &str) -> anyhow::Result<ShortString> {
    ShortString::try_new(text)
        .map_err(|err| anyhow::format_err!("queue name `{text}` is not usable: {err}"))
}

impl Shared {
    fn consumer_slot(&self) -> std::sync::MutexGuard<'_, Option<ConsumerTask>> {
        self.consumer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn consume_channel_slot(&self) -> std::sync::MutexGuard<'_, Option<Channel>> {
        self.consume_channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The live connection, opened anew when there is none or it was lost.
    async fn link(&self) -> anyhow::Result<Arc<Link>> {
        let mut current = self.link.lock().await;
        if let Some(link) = current.as_ref()
            && link.connection.status().connected()
        {
            return Ok(Arc::clone(link));
        }
        let properties = ConnectionProperties::default()
            .with_connection_name(self.connection_name.clone().into());
        let connection = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect_uri(self.uri.clone(), properties),
        )
        .await
        .map_err(|_| {
            anyhow::format_err!(
                "cannot connect to RabbitMQ at {}: no answer within {} s",
                self.shown,
                CONNECT_TIMEOUT.as_secs()
            )
        })?
        .map_err(|err| {
            anyhow::format_err!("cannot connect to RabbitMQ at {}: {err}", self.shown)
        })?;
        info!(broker = %self.shown, connection = %self.connection_name, "Connected to RabbitMQ.");
        let link = Arc::new(Link {
            connection,
            arguments: queue_arguments(self.config.dead_letter_exchange.as_deref()),
            publisher: tokio::sync::Mutex::new(None),
            declared: Mutex::new(HashSet::new()),
        });
        *current = Some(Arc::clone(&link));
        Ok(link)
    }

    /// Publishes and waits for RabbitMQ's confirmation, reconnecting while the connection is
    /// down (within `reconnect_max`). An error RabbitMQ gives on a live connection (a queue
    /// declared with other arguments, say) is returned at once.
    async fn publish(&self, message: &TaskMessage) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut delay = FIRST_RETRY;
        loop {
            let link = self.link().await;
            let result = match &link {
                Ok(link) => self.publish_on(link, message).await,
                Err(err) => Err(anyhow::format_err!("{err:#}")),
            };
            let err = match result {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            let transient = link.map_or(true, |l| !l.connection.status().connected());
            if !transient || started.elapsed() + delay > self.config.reconnect_max {
                return Err(err.context(format!(
                    "cannot publish task {} to queue `{}` on {}",
                    message.id, message.queue, self.shown
                )));
            }
            warn!(task_id = %message.id, queue = %message.queue, error = %format!("{err:#}"),
                "Publishing failed; trying again in {:?}.", delay);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.config.reconnect_max);
        }
    }

    async fn publish_on(&self, link: &Link, message: &TaskMessage) -> anyhow::Result<()> {
        let queue = name(&message.queue)?;
        link.declare(&message.queue, &self.shown).await?;
        let channel = link.publisher().await?;
        let (properties, body) = celery::encode(message, &self.sender);
        // AMQP's own publication time (Celery sets none): how long the message waits in the
        // queue is measured from it.
        let properties = properties.with_timestamp(Utc::now().timestamp().max(0) as u64);
        let confirmation = channel
            .basic_publish(
                queue.clone(),
                queue,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await?
            .await?;
        if confirmation.is_nack() {
            anyhow::bail!("RabbitMQ refused the message (nack)");
        }
        if let Some(returned) = confirmation.take_message() {
            // Deleted behind our back, perhaps: declare it again next time.
            link.forget(&message.queue);
            anyhow::bail!(
                "RabbitMQ returned the message: {} (no queue is bound to exchange `{}` with key `{}`)",
                returned.reply_text,
                message.queue,
                message.queue
            );
        }
        debug!(task_id = %message.id, task = %message.task, queue = %message.queue, "Published.");
        Ok(())
    }

    /// Sets the prefetch for the slots and the held messages (`prefetch_for`). One update at
    /// a time, so the last value sent is the current one; an unchanged value is not sent.
    async fn set_qos(channel: &Channel, slots: u16, max_held: u16, held: &HeldCount) {
        let mut sent = held.sent.lock().await;
        let count = prefetch_for(slots, held.count.load(Ordering::SeqCst), max_held);
        if *sent == Some(count) {
            return;
        }
        match channel
            .basic_qos(count, BasicQosOptions { global: true })
            .await
        {
            Ok(()) => *sent = Some(count),
            Err(err) => {
                debug!(error = %err, "Could not change the prefetch (the channel is gone).")
            }
        }
    }
}

impl Link {
    /// Declares queue `queue` as Celery does (spec G.1): durable, arguments exactly
    /// `x-max-priority: 10` (and the dead-letter exchange when there is one), bound to the
    /// durable direct exchange of the same name with the same routing key. On a channel of its
    /// own, since a refused declaration closes it.
    async fn declare(&self, queue: &str, shown: &str) -> anyhow::Result<()> {
        if self
            .declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(queue)
        {
            return Ok(());
        }
        let amqp_name = name(queue)?;
        let context = || format!("cannot declare queue `{queue}` on {shown}");
        let channel = self
            .connection
            .create_channel()
            .await
            .with_context(context)?;
        channel
            .exchange_declare(
                amqp_name.clone(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(context)?;
        channel
            .queue_declare(
                amqp_name.clone(),
                QueueDeclareOptions::durable(),
                self.arguments.clone(),
            )
            .await
            .with_context(context)?;
        channel
            .queue_bind(
                amqp_name.clone(),
                amqp_name.clone(),
                amqp_name,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(context)?;
        let _ = channel.close(200, "OK".into()).await;
        self.declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(queue.to_owned());
        Ok(())
    }

    /// Makes the next `declare` of `queue` go to RabbitMQ again.
    fn forget(&self, queue: &str) {
        self.declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(queue);
    }

    /// The channel publishes go through, in confirm mode; reopened if RabbitMQ closed it.
    async fn publisher(&self) -> anyhow::Result<Channel> {
        let mut slot = self.publisher.lock().await;
        if let Some(channel) = slot.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }
}

/// `x-max-priority: 10`, typed as py-amqp types a Python int (a signed 32-bit integer):
/// RabbitMQ compares the type too, and refuses a declaration that differs. With a dead-letter
/// exchange, also `x-dead-letter-exchange` as a string (as py-amqp types a Python str): every
/// producer and consumer of the queue must then declare it with the same arguments.
pub fn queue_arguments(dead_letter_exchange: Option<&str>) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-priority".into(), AMQPValue::LongInt(MAX_PRIORITY));
    if let Some(exchange) = dead_letter_exchange {
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(exchange.into()),
        );
    }
    arguments
}

/// The prefetch of a channel with `slots` slots while `held` of its messages wait for their
/// `eta`: one more per held message, as Celery does, so that held messages do not take the
/// slots, but never more than `max_held` more, and never above what AMQP can carry.
///
/// Messages held beyond `max_held` stay held, unacknowledged, until their eta: RabbitMQ has
/// delivered them already, and giving them back (a nack with requeue) would only have it
/// deliver them again at once, a busy loop. They take the place of slots in the prefetch
/// window instead, so this worker takes fewer new messages until they come due. That is
/// safe: nothing runs before its eta, nothing is lost (an unacknowledged message goes back
/// to the queue when its channel closes) and the other workers go on taking messages from
/// the queue, while without the cap one worker would draw every `eta` message of the queue
/// into its memory.
fn prefetch_for(slots: u16, held: usize, max_held: u16) -> u16 {
    let extra = u16::try_from(held.min(usize::from(max_held))).unwrap_or(u16::MAX);
    slots.saturating_add(extra)
}

/// Held messages of one channel, and the prefetch last sent for it (its lock orders the
/// updates).
#[derive(Default)]
struct HeldCount {
    /// A `usize`, like the unacknowledged messages it counts, so it cannot wrap.
    count: AtomicUsize,
    sent: tokio::sync::Mutex<Option<u16>>,
}

/// Consumes until stopped, reconnecting with backoff whenever the consumers are lost.
async fn consume_loop(
    shared: Arc<Shared>,
    queues: Vec<String>,
    prefetch: u16,
    mut stop: watch::Receiver<bool>,
) {
    let mut delay = FIRST_RETRY;
    loop {
        let started = Instant::now();
        let err = match consume_session(&shared, &queues, prefetch, &mut stop).await {
            Ok(()) => return,
            Err(err) => err,
        };
        if *stop.borrow() {
            return;
        }
        if started.elapsed() > HEALTHY {
            delay = FIRST_RETRY;
        }
        warn!(broker = %shared.shown, error = %format!("{err:#}"),
            "Lost the RabbitMQ consumers; reconnecting in {:?}.", delay);
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(shared.config.reconnect_max);
    }
}

/// One connection's worth of consuming: declare, consume, dispatch. Returns `Ok` when
/// stopped, an error when the consumers were lost.
async fn consume_session(
    shared: &Arc<Shared>,
    queues: &[String],
    prefetch: u16,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let link = shared.link().await?;
    for queue in queues {
        // Declared anew for every session: RabbitMQ cancels consumers of a deleted queue.
        link.forget(queue);
        link.declare(queue, &shared.shown).await?;
    }
    let channel = link
        .connection
        .create_channel()
        .await
        .with_context(|| format!("cannot open a channel on {}", shared.shown))?;
    let held = Arc::new(HeldCount::default());
    channel
        .basic_qos(prefetch, BasicQosOptions { global: true })
        .await?;
    *held.sent.lock().await = Some(prefetch);
    let mut consumers = Vec::new();
    let mut tags = Vec::new();
    for queue in queues {
        let consumer = channel
            .basic_consume(
                name(queue)?,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot consume queue `{queue}` on {}", shared.shown))?;
        tags.push(consumer.tag());
        let queue = queue.clone();
        consumers.push(consumer.map(move |d| (queue.clone(), d)).boxed());
    }
    *shared.consume_channel_slot() = Some(channel.clone());
    info!(broker = %shared.shown, queues = %queues.join(","), prefetch, "Consuming.");
    let mut deliveries = futures_util::stream::select_all(consumers);
    // Dropped when this session ends: held messages of this channel are then forgotten
    // (RabbitMQ delivers them again on the next channel).
    let (_session, session_ended) = watch::channel(());
    let holds_stop = stop.clone();
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => None,
            next = deliveries.next() => Some(next),
        };
        let Some(next) = next else {
            for tag in tags {
                if let Err(err) = channel
                    .basic_cancel(tag, BasicCancelOptions::default())
                    .await
                {
                    debug!(error = %err, "Could not cancel a consumer.");
                }
            }
            info!(broker = %shared.shown, "Stopped consuming.");
            return Ok(());
        };
        let (queue, delivery) = match next {
            Some((queue, Ok(delivery))) => (queue, delivery),
            Some((queue, Err(err))) => {
                return Err(anyhow::Error::new(err)
                    .context(format!("the consumer of queue `{queue}` failed")));
            }
            None => anyhow::bail!("RabbitMQ cancelled the consumers"),
        };
        let unsettled = Unsettled::new(&shared.unsettled);
        let message = match celery::decode(&delivery.properties, &delivery.data, &queue) {
            Ok(message) => message,
            Err(err) => {
                error!(queue = %queue, delivery_tag = delivery.delivery_tag,
                    error = %format!("{err:#}"),
                    "Rejected a message that is not a Celery task message; it is dropped, not requeued.");
                if let Err(err) = delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await
                {
                    warn!(delivery_tag = delivery.delivery_tag, error = %err, "Could not reject the message.");
                }
                continue;
            }
        };
        let published_at = delivery
            .properties
            .timestamp()
            .and_then(|seconds| i64::try_from(seconds).ok())
            .and_then(|seconds| DateTime::from_timestamp(seconds, 0));
        let incoming = Incoming {
            _waiting: Waiting::new(&shared.waiting, &message),
            message,
            reprs: celery::header_reprs(&delivery.properties),
            published_at,
            acker: delivery.acker,
            delivery_tag: delivery.delivery_tag,
            channel: channel.clone(),
            unsettled,
        };
        match incoming.message.eta {
            Some(eta) if eta > Utc::now() => {
                let hold = Hold {
                    channel: channel.clone(),
                    prefetch,
                    max_held: shared.config.max_held,
                    held: Arc::clone(&held),
                    stop: holds_stop.clone(),
                    session_ended: session_ended.clone(),
                };
                hold.start(shared, incoming, eta).await;
            }
            _ => {
                let _ = shared.inbox_tx.send(incoming);
            }
        }
    }
}

/// Where a held message waits: its channel and that channel's prefetch and held count.
struct Hold {
    channel: Channel,
    prefetch: u16,
    max_held: u16,
    held: Arc<HeldCount>,
    stop: watch::Receiver<bool>,
    session_ended: watch::Receiver<()>,
}

enum Woke {
    Due,
    SessionEnded,
    Stopped,
}

impl Hold {
    /// Keeps a message until its `eta`, with the prefetch raised by one meanwhile (up to
    /// `max_held`). A stop gives it back at once; a lost channel forgets it (RabbitMQ has it
    /// again).
    async fn start(self, shared: &Arc<Shared>, incoming: Incoming, eta: DateTime<Utc>) {
        let Hold {
            channel,
            prefetch,
            max_held,
            held,
            mut stop,
            mut session_ended,
        } = self;
        held.count.fetch_add(1, Ordering::SeqCst);
        Shared::set_qos(&channel, prefetch, max_held, &held).await;
        debug!(task_id = %incoming.message.id, eta = %eta, "Holding a message until its eta.");
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            let wait = (eta - Utc::now()).to_std().unwrap_or_default();
            let woke = tokio::select! {
                _ = tokio::time::sleep(wait) => Woke::Due,
                _ = session_ended.changed() => Woke::SessionEnded,
                _ = stop.wait_for(|s| *s) => Woke::Stopped,
            };
            match woke {
                Woke::Due => {}
                Woke::SessionEnded => return,
                Woke::Stopped => {
                    let requeue = BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    };
                    let _ = incoming.acker.nack(requeue).await;
                    return;
                }
            }
            held.count.fetch_sub(1, Ordering::SeqCst);
            Shared::set_qos(&channel, prefetch, max_held, &held).await;
            if incoming.acker.usable() {
                let _ = shared.inbox_tx.send(incoming);
            }
        });
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn publish(&self, message: &TaskMessage) -> anyhow::Result<()> {
        self.shared.publish(message).await
    }

    /// Publishes on one channel without waiting for each confirm before the next message:
    /// a batch of up to `PUBLISH_IN_FLIGHT` costs about one round trip of confirms rather than
    /// one per message. Each
    /// message keeps its own retries; the first failure is returned once all have ended.
    async fn publish_many(&self, messages: &[TaskMessage]) -> anyhow::Result<()> {
        let mut first_error = None;
        for batch in messages.chunks(PUBLISH_IN_FLIGHT) {
            let mut pending = Vec::with_capacity(batch.len());
            for message in batch {
                pending.push(self.shared.publish(message));
            }
            for result in futures_util::future::join_all(pending).await {
                if let Err(err) = result {
                    first_error.get_or_insert(err);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn next(&self) -> anyhow::Result<Box<dyn Delivery>> {
        let defaults = Consume {
            queues: None,
            prefetch: self.shared.config.prefetch,
        };
        self.start(&defaults, true);
        let mut inbox = self.shared.inbox.lock().await;
        loop {
            let incoming = inbox
                .recv()
                .await
                .context("the RabbitMQ consumer is gone")?;
            if !incoming.acker.usable() {
                debug!(task_id = %incoming.message.id, delivery_tag = incoming.delivery_tag,
                    "Skipped a message of a lost channel; RabbitMQ delivers it again.");
                continue;
            }
            return Ok(Box::new(AmqpDelivery {
                message: incoming.message,
                reprs: incoming.reprs,
                published_at: incoming.published_at,
                acker: incoming.acker,
                delivery_tag: incoming.delivery_tag,
                shared: Arc::clone(&self.shared),
                settled: false,
                _channel: incoming.channel,
                _unsettled: incoming.unsettled,
            }));
        }
    }

    async fn holds(&self, _task_id: &str) -> anyhow::Result<Option<bool>> {
        // RabbitMQ cannot be asked whether it holds a message.
        Ok(None)
    }

    async fn waiting(&self) -> Vec<TaskMessage> {
        let waiting = self
            .shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        waiting.messages.values().cloned().collect()
    }

    async fn start_consuming(&self, consume: &Consume) -> anyhow::Result<()> {
        for queue in consume.queues.iter().flatten() {
            name(queue)?;
        }
        self.start(consume, false);
        Ok(())
    }

    async fn check_queues(&self) -> anyhow::Result<()> {
        let link = self.shared.link().await?;
        for queue in &self.shared.config.queues {
            if let Err(err) = link.declare(queue, &self.shared.shown).await {
                let text = format!("{err:#}");
                if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent arg") {
                    return Err(err.context(format!(
                        "the queue `{queue}` exists with other arguments than the workers declare \
                         (x-max-priority 10, durable): `workers queue delete --yes` deletes it, \
                         with the messages in it, and the workers declare it again"
                    )));
                }
                return Err(err);
            }
        }
        Ok(())
    }

    async fn queued(&self) -> anyhow::Result<Option<QueueDepth>> {
        let link = self.shared.link().await?;
        let channel = link.connection.create_channel().await.with_context(|| {
            format!("cannot open a channel to RabbitMQ at {}", self.shared.shown)
        })?;
        let mut waiting = 0u64;
        for queue in &self.shared.config.queues {
            // Passive: only asks; a queue nobody declared yet holds nothing.
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(queue) => waiting += u64::from(queue.message_count()),
                Err(_) => break,
            }
        }
        let _ = channel.close(200, "OK".into()).await;
        // RabbitMQ counts the ready messages; it keeps no publication time to report.
        Ok(Some(QueueDepth {
            waiting,
            oldest: None,
        }))
    }

    async fn delete_queue(&self, name: &str) -> anyhow::Result<Option<u32>> {
        let link = self.shared.link().await?;
        let channel = link.connection.create_channel().await.with_context(|| {
            format!("cannot open a channel to RabbitMQ at {}", self.shared.shown)
        })?;
        let messages = channel
            .queue_delete(name.into(), lapin::options::QueueDeleteOptions::default())
            .await
            .with_context(|| {
                format!("cannot delete the queue `{name}` at {}", self.shared.shown)
            })?;
        // This connection declared it, perhaps; it must declare it again before using it.
        link.declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let _ = channel.close(200, "queue deleted".into()).await;
        Ok(Some(messages))
    }

    async fn check_reachable(&self) -> anyhow::Result<()> {
        // As a publish would: through short outages (within `reconnect_max`), not longer.
        let started = Instant::now();
        let mut delay = FIRST_RETRY;
        loop {
            let err = match self.shared.link().await {
                Ok(_) => return Ok(()),
                Err(err) => err,
            };
            // The error names the broker by its address without credentials.
            if started.elapsed() + delay > self.shared.config.reconnect_max {
                return Err(err);
            }
            debug!(broker = %self.shared.shown, error = %format!("{err:#}"),
                "RabbitMQ cannot be reached; trying again in {:?}.", delay);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.shared.config.reconnect_max);
        }
    }

    async fn stop_consuming(&self) -> anyhow::Result<()> {
        let Some(task) = self.shared.consumer_slot().take() else {
            return Ok(());
        };
        let _ = task.stop.send(true);
        let _ = task.handle.await;
        // Messages received but not taken by a slot go back to the queue now rather than when
        // the connection closes. A slot still waiting in `next` keeps the inbox; what it holds
        // goes back when the process ends.
        if let Ok(mut inbox) = self.shared.inbox.try_lock() {
            while let Ok(incoming) = inbox.try_recv() {
                let _ = incoming
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            }
        }
        Ok(())
    }
}

struct AmqpDelivery {
    message: TaskMessage,
    reprs: Option<ArgsRepr>,
    published_at: Option<DateTime<Utc>>,
    acker: Acker,
    delivery_tag: u64,
    shared: Arc<Shared>,
    /// Acknowledged, released or re-published: nothing left to do on drop.
    settled: bool,
    /// Keeps the channel open until this delivery is settled.
    _channel: Channel,
    _unsettled: Unsettled,
}

impl AmqpDelivery {
    fn lost_channel(&self, what: &str, err: Option<&lapin::Error>) {
        warn!(task_id = %self.message.id, delivery_tag = self.delivery_tag,
            error = %err.map(ToString::to_string).unwrap_or_else(|| "channel closed".to_owned()),
            "Skipped the {what}: the channel the message came on is gone. RabbitMQ delivers it again; the copy finds the task's result stored.");
    }
}

#[async_trait]
impl Delivery for AmqpDelivery {
    fn message(&self) -> &TaskMessage {
        &self.message
    }

    fn published_at(&self) -> Option<DateTime<Utc>> {
        self.published_at
    }

    fn reprs(&self) -> Option<&ArgsRepr> {
        self.reprs.as_ref()
    }

    async fn keep_alive(&self) -> anyhow::Result<()> {
        // RabbitMQ keeps an unacknowledged message for as long as its channel lives; the
        // engine's claim in the store is what other workers see.
        Ok(())
    }

    async fn ack(mut self: Box<Self>) -> anyhow::Result<()> {
        self.settled = true;
        match self.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            Ok(false) => self.lost_channel("acknowledgement", None),
            Err(err) => self.lost_channel("acknowledgement", Some(&err)),
        }
        Ok(())
    }

    async fn retry_later(
        mut self: Box<Self>,
        eta: DateTime<Utc>,
        retries: u32,
    ) -> anyhow::Result<()> {
        let mut again = self.message.clone();
        again.eta = Some(eta);
        again.retries = retries;
        // Published (and confirmed) before the original is acknowledged: a crash in between
        // leaves two copies, never none.
        self.shared.publish(&again).await?;
        self.settled = true;
        match self.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            Ok(false) => self.lost_channel("acknowledgement", None),
            Err(err) => self.lost_channel("acknowledgement", Some(&err)),
        }
        Ok(())
    }

    async fn release(mut self: Box<Self>) -> anyhow::Result<()> {
        self.settled = true;
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        match self.acker.nack(requeue).await {
            Ok(true) => {}
            Ok(false) => self.lost_channel("release", None),
            Err(err) => self.lost_channel("release", Some(&err)),
        }
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> anyhow::Result<()> {
        self.settled = true;
        let Some(exchange) = self.shared.config.dead_letter_exchange.clone() else {
            error!(task_id = %self.message.id, task = %self.message.task, reason,
                "Dropped a message that cannot run: acknowledged and removed (its queue has no dead-letter exchange, amqp.dead_letter_exchange).");
            match self.acker.ack(BasicAckOptions::default()).await {
                Ok(true) => {}
                Ok(false) => self.lost_channel("acknowledgement", None),
                Err(err) => self.lost_channel("acknowledgement", Some(&err)),
            }
            return Ok(());
        };
        match self
            .acker
            .reject(BasicRejectOptions { requeue: false })
            .await
        {
            Ok(true) => {
                error!(task_id = %self.message.id, task = %self.message.task, reason, exchange = %exchange,
                    "Rejected a message that cannot run; RabbitMQ moves it to the dead-letter exchange.");
            }
            Ok(false) => self.lost_channel("rejection", None),
            Err(err) => self.lost_channel("rejection", Some(&err)),
        }
        Ok(())
    }
}

impl Drop for AmqpDelivery {
    /// A delivery dropped unsettled (its handling failed) goes back to the queue at once, as
    /// an embedded claim would once its lease ran out.
    fn drop(&mut self) {
        if self.settled || !self.acker.usable() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let acker = self.acker.clone();
        runtime.spawn(async move {
            let _ = acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(uri: &str) -> AmqpConfig {
        AmqpConfig {
            uri: uri.to_owned(),
            queues: vec!["app.q".into()],
            prefetch: 2,
            heartbeat: 30,
            reconnect_max: Duration::from_secs(5),
            max_held: 100,
            dead_letter_exchange: None,
        }
    }

    #[test]
    fn the_address_shown_has_no_credentials() {
        let identity = Identity::current();
        let broker = AmqpBroker::new(
            config("amqp://user:s3cret@rabbit.example:5673/%2f"),
            &identity,
        )
        .unwrap();
        assert_eq!(broker.shown_uri(), "amqp://rabbit.example:5673/%2F");
        assert!(!broker.shown_uri().contains("s3cret"));
        let err = AmqpBroker::new(config("http://user:s3cret@x/"), &identity)
            .err()
            .unwrap();
        assert!(!format!("{err:#}").contains("s3cret"), "{err:#}");
    }

    #[test]
    fn connections_say_their_frame_size_unless_the_uri_does() {
        let uri = parse_uri("amqp://guest:guest@rabbit.example:5672/%2f").unwrap();
        assert_eq!(uri.query.frame_max, Some(131_072));
        let uri = parse_uri("amqp://rabbit.example/%2f?frame_max=16384").unwrap();
        assert_eq!(uri.query.frame_max, Some(16_384));
        assert!(parse_uri("http://rabbit.example/").is_err());
    }

    #[test]
    fn connections_are_named_after_the_process() {
        let identity = Identity {
            hostname: "node1".into(),
            pid: 42,
        };
        assert_eq!(connection_name(&identity), "workers node1 42");
    }

    #[test]
    fn queues_are_declared_with_celerys_priority_argument() {
        let arguments = queue_arguments(None);
        assert_eq!(arguments.inner().len(), 1);
        assert_eq!(
            arguments.inner().get("x-max-priority"),
            Some(&AMQPValue::LongInt(10))
        );
        let arguments = queue_arguments(Some("app.dead"));
        assert_eq!(arguments.inner().len(), 2);
        assert_eq!(
            arguments.inner().get("x-dead-letter-exchange"),
            Some(&AMQPValue::LongString("app.dead".into()))
        );
    }

    #[test]
    fn held_messages_raise_the_prefetch_up_to_a_cap_without_wrapping() {
        assert_eq!(prefetch_for(2, 0, 100), 2);
        assert_eq!(prefetch_for(2, 3, 100), 5);
        assert_eq!(prefetch_for(2, 100, 100), 102);
        assert_eq!(prefetch_for(2, 5_000, 100), 102, "capped");
        assert_eq!(prefetch_for(2, usize::MAX, 100), 102);
        // A count that would wrap a u16 neither wraps nor lowers the prefetch.
        assert_eq!(prefetch_for(2, 65_535, u16::MAX), u16::MAX);
        assert_eq!(prefetch_for(u16::MAX, 1, 100), u16::MAX);
    }
}

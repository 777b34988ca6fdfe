//! Celery's pidbox on RabbitMQ, as kombu 5 lays it out: requests are published to the fanout
//! exchange `celery.pidbox` and reach every node's own queue `{node}.celery.pidbox`
//! (exclusive, auto-deleted, `x-expires` 10 s, `x-message-ttl` 300 s, consumed without
//! acknowledgements); a node replies `{node: reply}` through the direct exchange
//! `reply.celery.pidbox` with the request's `reply_to.routing_key`, the `ticket` header naming
//! the request. The mailbox has a connection of its own, so that a long step or a busy task
//! channel never delays a `revoke`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use super::mailbox::{Collect, Mailbox, Reply, answer};
use super::{Request, WorkerControl};
use crate::broker::celery::{headers_json, headers_table};

/// The fanout exchange requests go to (`{control_exchange}.pidbox`).
pub const EXCHANGE: &str = "celery.pidbox";
/// The direct exchange replies go to.
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";
/// kombu's `control_queue_expires` (10 s) and `control_queue_ttl` (300 s), in milliseconds.
const QUEUE_EXPIRES_MS: i32 = 10_000;
const QUEUE_TTL_MS: i32 = 300_000;
const CONTENT_TYPE: &str = "application/json";
const TRANSIENT: u8 = 1;
const PERSISTENT: u8 = 2;

/// The pidbox on the RabbitMQ at `uri`.
pub struct AmqpMailbox {
    uri: AMQPUri,
    /// The address without credentials, for logs and errors.
    shown: String,
    connection_name: String,
}

impl AmqpMailbox {
    pub fn new(uri: &str, shown: &str, connection_name: &str) -> anyhow::Result<AmqpMailbox> {
        let uri = crate::broker::amqp::parse_uri(uri)
            .map_err(|_| anyhow::format_err!("amqp.uri is not an AMQP URI: {shown}"))?;
        Ok(AmqpMailbox {
            uri,
            shown: shown.to_owned(),
            connection_name: connection_name.to_owned(),
        })
    }

    async fn connect(&self, purpose: &str) -> anyhow::Result<Connection> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("{} {purpose}", self.connection_name).into());
        tokio::time::timeout(
            Duration::from_secs(15),
            Connection::connect_uri(self.uri.clone(), properties),
        )
        .await
        .map_err(|_| {
            anyhow::format_err!(
                "cannot connect to RabbitMQ at {}: no answer within 15 s",
                self.shown
            )
        })?
        .with_context(|| format!("cannot connect to RabbitMQ at {}", self.shown))
    }

    /// One connection's worth of serving; `Ok` when stopped.
    async fn serve_session(
        &self,
        control: &Arc<WorkerControl>,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let connection = self.connect("pidbox").await?;
        let channel = connection.create_channel().await?;
        declare_exchanges(&channel).await?;
        let queue = format!("{}.celery.pidbox", control.node());
        declare_private_queue(&channel, &queue)
            .await
            .with_context(|| {
                format!(
                    "cannot declare the control queue `{queue}` (is another worker running with the node name {}?)",
                    control.node()
                )
            })?;
        channel
            .queue_bind(
                short(&queue)?,
                EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut consumer = channel
            .basic_consume(
                short(&queue)?,
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        info!(node = %control.node(), queue = %queue, "Listening for control requests.");
        let mut reply_exchanges: HashSet<String> = HashSet::from([REPLY_EXCHANGE.to_owned()]);
        loop {
            let delivery = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => None,
                delivery = consumer.next() => Some(delivery),
            };
            let Some(delivery) = delivery else {
                let _ = connection.close(200, "OK".into()).await;
                return Ok(());
            };
            let delivery = match delivery {
                Some(Ok(delivery)) => delivery,
                Some(Err(err)) => {
                    return Err(anyhow::Error::new(err).context("the control consumer failed"));
                }
                None => anyhow::bail!("RabbitMQ cancelled the control consumer"),
            };
            let headers = delivery
                .properties
                .headers()
                .as_ref()
                .map(headers_json)
                .unwrap_or_default();
            if let Some(clock) = headers.get("clock").and_then(Value::as_u64) {
                control.adjust_clock(clock);
            }
            let request: Request = match serde_json::from_slice(&delivery.data) {
                Ok(request) => request,
                Err(err) => {
                    warn!(queue = %queue, error = %err, body = %String::from_utf8_lossy(&delivery.data[..delivery.data.len().min(200)]),
                        "Ignored a control message that is not a kombu pidbox request.");
                    continue;
                }
            };
            let Some(body) = answer(control, &request).await else {
                continue;
            };
            let (Some(reply_to), Some(ticket)) = (&request.reply_to, &request.ticket) else {
                continue;
            };
            if !reply_exchanges.contains(&reply_to.exchange) {
                channel
                    .exchange_declare(
                        short(&reply_to.exchange)?,
                        ExchangeKind::Direct,
                        ExchangeDeclareOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                reply_exchanges.insert(reply_to.exchange.clone());
            }
            let mut headers = Map::new();
            headers.insert("ticket".into(), json!(ticket));
            headers.insert("clock".into(), json!(control.forward_clock()));
            let properties = BasicProperties::default()
                .with_content_type(CONTENT_TYPE.into())
                .with_content_encoding("utf-8".into())
                .with_delivery_mode(TRANSIENT)
                .with_headers(headers_table(&headers));
            channel
                .basic_publish(
                    short(&reply_to.exchange)?,
                    short(&reply_to.routing_key)?,
                    BasicPublishOptions::default(),
                    body.to_string().as_bytes(),
                    properties,
                )
                .await?;
        }
    }
}

/// The two exchanges, declared as kombu declares them (non-durable, not auto-deleted): a
/// declaration that differs from an existing one is refused by RabbitMQ.
async fn declare_exchanges(channel: &Channel) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("cannot declare the exchange celery.pidbox")?;
    channel
        .exchange_declare(
            REPLY_EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("cannot declare the exchange reply.celery.pidbox")?;
    Ok(())
}

/// A node's request queue or a sender's reply queue, as kombu declares both: exclusive to this
/// connection, deleted with it, expiring 10 s after its last use, messages kept 300 s.
async fn declare_private_queue(channel: &Channel, queue: &str) -> anyhow::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(QUEUE_EXPIRES_MS));
    arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(QUEUE_TTL_MS));
    channel
        .queue_declare(
            short(queue)?,
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    Ok(())
}

fn short(text: &str) -> anyhow::Result<ShortString> {
    ShortString::try_new(text)
        .map_err(|err| anyhow::format_err!("`{text}` is not usable as an AMQP name: {err}"))
}

#[async_trait]
impl Mailbox for AmqpMailbox {
    async fn serve(&self, control: Arc<WorkerControl>, mut stop: watch::Receiver<bool>) {
        let mut delay = Duration::from_millis(500);
        loop {
            let started = std::time::Instant::now();
            let err = match self.serve_session(&control, &mut stop).await {
                Ok(()) => return,
                Err(err) => err,
            };
            let stopped = *stop.borrow();
            if stopped {
                return;
            }
            if started.elapsed() > Duration::from_secs(30) {
                delay = Duration::from_millis(500);
            }
            warn!(broker = %self.shown, error = %format!("{err:#}"),
                "The control mailbox is down (steps still run; revokes and inspections do not reach this worker); trying again in {:?}.", delay);
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    async fn broadcast(
        &self,
        mut request: Request,
        collect: Option<Collect>,
    ) -> anyhow::Result<Vec<Reply>> {
        let connection = self.connect("control").await?;
        let channel = connection.create_channel().await?;
        declare_exchanges(&channel).await?;
        let ticket = uuid::Uuid::new_v4().to_string();
        let mut replies = None;
        if collect.is_some() {
            let oid = uuid::Uuid::new_v4().to_string();
            let queue = format!("{oid}.{REPLY_EXCHANGE}");
            declare_private_queue(&channel, &queue).await?;
            channel
                .queue_bind(
                    short(&queue)?,
                    REPLY_EXCHANGE.into(),
                    short(&oid)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            replies = Some(
                channel
                    .basic_consume(
                        short(&queue)?,
                        "".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?,
            );
            request.ticket = Some(ticket.clone());
            request.reply_to = Some(super::ReplyTo {
                exchange: REPLY_EXCHANGE.to_owned(),
                routing_key: oid,
            });
        }
        let timeout = collect.map_or(Duration::from_secs(1), |c| c.timeout);
        let mut headers = Map::new();
        headers.insert("clock".into(), json!(1));
        headers.insert(
            "expires".into(),
            json!(chrono::Utc::now().timestamp_millis() as f64 / 1000.0 + timeout.as_secs_f64()),
        );
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(PERSISTENT)
            .with_priority(0)
            .with_headers(headers_table(&headers));
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let confirmation = channel
            .basic_publish(
                EXCHANGE.into(),
                "".into(),
                BasicPublishOptions::default(),
                serde_json::to_string(&request)?.as_bytes(),
                properties,
            )
            .await?
            .await?;
        if confirmation.is_nack() {
            anyhow::bail!("RabbitMQ refused the control request (nack)");
        }
        let mut collected = Vec::new();
        if let (Some(collect), Some(mut replies)) = (collect, replies) {
            let deadline = tokio::time::Instant::now() + collect.timeout;
            while collect.limit.is_none_or(|limit| collected.len() < limit) {
                let delivery = match tokio::time::timeout_at(deadline, replies.next()).await {
                    Err(_) | Ok(None) => break,
                    Ok(Some(Err(err))) => return Err(err.into()),
                    Ok(Some(Ok(delivery))) => delivery,
                };
                let headers = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .map(headers_json)
                    .unwrap_or_default();
                if headers.get("ticket").and_then(Value::as_str) != Some(ticket.as_str()) {
                    continue;
                }
                let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&delivery.data)
                else {
                    warn!("Ignored a control reply that is not a JSON object.");
                    continue;
                };
                collected.extend(body);
            }
        }
        let _ = connection.close(200, "OK".into()).await;
        Ok(collected)
    }
}

//! Celery's monitoring events, as a Celery 5.2 worker sends them with `-E`, so that Flower and
//! `celery events` see this worker and the tasks it runs.
//!
//! Events go to the durable topic exchange `celeryev`: worker events (`worker-online`,
//! `worker-heartbeat` every 2 s, `worker-offline`) one per message with the routing key
//! `worker.online` and so on; task events (`task-received`, `-started`, `-succeeded`,
//! `-failed`, `-retried`, `-revoked`) as a list, routing key `task.multi`, as Celery 5 batches
//! them. Every event carries `hostname`, `utcoffset`, `pid`, `clock`, `timestamp` and `type`;
//! JSON, transient. Events are best effort, as in Celery: one that cannot be sent (RabbitMQ
//! out of reach) is dropped, never waited for, so that monitoring cannot slow a step down.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::broker::celery::headers_table;

/// The exchange events go to.
pub const EXCHANGE: &str = "celeryev";
/// How often a heartbeat is sent (Celery's `freq`).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Events waiting to be sent beyond this are dropped.
const BACKLOG: usize = 10_000;

/// One event to send.
#[derive(Debug)]
struct Event {
    routing_key: &'static str,
    body: Value,
}

/// Sends events for one worker node; cheap to call from any task.
pub struct EventSender {
    node: String,
    pid: u32,
    tx: mpsc::Sender<Event>,
}

impl EventSender {
    /// Starts the task that publishes events to the RabbitMQ at `uri`; it ends once every
    /// sender is dropped and what was queued is sent (see [`EventSender::close`]).
    pub fn start(
        uri: &str,
        shown: &str,
        connection_name: &str,
        node: &str,
        pid: u32,
    ) -> anyhow::Result<(EventSender, tokio::task::JoinHandle<()>)> {
        let uri = crate::broker::amqp::parse_uri(uri)
            .map_err(|_| anyhow::format_err!("amqp.uri is not an AMQP URI: {shown}"))?;
        let (tx, rx) = mpsc::channel(BACKLOG);
        let publisher = tokio::spawn(publish_events(
            uri,
            shown.to_owned(),
            format!("{connection_name} events"),
            rx,
        ));
        Ok((
            EventSender {
                node: node.to_owned(),
                pid,
                tx,
            },
            publisher,
        ))
    }

    /// Sends a worker event (`worker-online`, `worker-heartbeat`, `worker-offline`) with the
    /// given fields besides the common ones.
    pub fn worker(&self, kind: &'static str, clock: u64, fields: Map<String, Value>) {
        let routing_key = match kind {
            "worker-online" => "worker.online",
            "worker-offline" => "worker.offline",
            _ => "worker.heartbeat",
        };
        let body = self.event(kind, clock, fields);
        self.send(Event { routing_key, body });
    }

    /// Sends a task event about `task_id` with the given fields besides the common ones.
    pub fn task(
        &self,
        kind: &'static str,
        clock: u64,
        task_id: &str,
        mut fields: Map<String, Value>,
    ) {
        fields.insert("uuid".into(), json!(task_id));
        let body = self.event(kind, clock, fields);
        self.send(Event {
            routing_key: "task.multi",
            body: Value::Array(vec![body]),
        });
    }

    fn event(&self, kind: &str, clock: u64, fields: Map<String, Value>) -> Value {
        let mut body = Map::new();
        body.insert("hostname".into(), json!(self.node));
        body.insert("utcoffset".into(), json!(utcoffset()));
        body.insert("pid".into(), json!(self.pid));
        body.insert("clock".into(), json!(clock));
        body.extend(fields);
        body.insert("timestamp".into(), json!(unix_now()));
        body.insert("type".into(), json!(kind));
        Value::Object(body)
    }

    fn send(&self, event: Event) {
        if let Err(err) = self.tx.try_send(event) {
            debug!(error = %err, "Dropped an event: too many are waiting to be sent.");
        }
    }
}

/// Celery's `utcoffset()`: hours west of UTC, as `time.timezone // 3600`.
fn utcoffset() -> i32 {
    let east = chrono::Local::now().offset().local_minus_utc();
    (-east).div_euclid(3600)
}

fn unix_now() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}

/// The system load averages over 1, 5 and 15 minutes, rounded as Celery rounds them.
pub fn loadavg() -> Value {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loads: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse::<f64>().ok())
        .map(|v| (v * 100.0).round() / 100.0)
        .collect();
    json!(loads)
}

/// Publishes queued events, reconnecting when the connection is lost (events queued meanwhile
/// are kept, up to `BACKLOG`; one that fails to publish is dropped).
async fn publish_events(
    uri: AMQPUri,
    shown: String,
    connection_name: String,
    mut rx: mpsc::Receiver<Event>,
) {
    let mut warned = false;
    let mut next = None;
    loop {
        // Connect only once there is something to send: a worker with events off never does.
        if next.is_none() {
            match rx.recv().await {
                Some(event) => next = Some(event),
                None => return,
            }
        }
        let connected = async {
            let properties = ConnectionProperties::default()
                .with_connection_name(connection_name.clone().into());
            let connection = tokio::time::timeout(
                Duration::from_secs(15),
                Connection::connect_uri(uri.clone(), properties),
            )
            .await
            .map_err(|_| anyhow::format_err!("no answer within 15 s"))??;
            let channel = connection.create_channel().await?;
            channel
                .exchange_declare(
                    EXCHANGE.into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            anyhow::Ok((connection, channel))
        }
        .await;
        let (connection, channel) = match connected {
            Ok(link) => {
                warned = false;
                link
            }
            Err(err) => {
                if !warned {
                    warn!(broker = %shown, error = %format!("{err:#}"), "Cannot send events; trying again.");
                    warned = true;
                }
                if rx.is_closed() {
                    // The worker has stopped: what waits cannot be sent.
                    return;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        loop {
            let event = match next.take() {
                Some(event) => event,
                None => match rx.recv().await {
                    Some(event) => event,
                    None => {
                        let _ = connection.close(200, "OK".into()).await;
                        return;
                    }
                },
            };
            let headers = {
                let mut headers = Map::new();
                let node = match &event.body {
                    Value::Array(items) => items.first().and_then(|e| e.get("hostname")).cloned(),
                    body => body.get("hostname").cloned(),
                };
                headers.insert("hostname".into(), node.unwrap_or(Value::Null));
                headers_table(&headers)
            };
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("utf-8".into())
                .with_delivery_mode(1)
                .with_priority(0)
                .with_headers(headers);
            let published = channel
                .basic_publish(
                    EXCHANGE.into(),
                    event.routing_key.into(),
                    BasicPublishOptions::default(),
                    event.body.to_string().as_bytes(),
                    properties,
                )
                .await;
            if let Err(err) = published {
                debug!(error = %err, "Could not send an event; reconnecting.");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_carry_celerys_common_fields() {
        let (tx, mut rx) = mpsc::channel(4);
        let sender = EventSender {
            node: "w@h".into(),
            pid: 42,
            tx,
        };
        let mut fields = Map::new();
        fields.insert("runtime".into(), json!(1.5));
        sender.task("task-succeeded", 7, "t1", fields);
        let event = rx.recv().await.unwrap();
        assert_eq!(event.routing_key, "task.multi");
        let body = &event.body[0];
        assert_eq!(body["type"], "task-succeeded");
        assert_eq!(body["uuid"], "t1");
        assert_eq!(body["hostname"], "w@h");
        assert_eq!(body["pid"], 42);
        assert_eq!(body["clock"], 7);
        assert_eq!(body["runtime"], 1.5);
        assert!(body["timestamp"].as_f64().unwrap() > 1.7e9);
        assert!(body["utcoffset"].is_i64());
        sender.worker("worker-heartbeat", 8, Map::new());
        let event = rx.recv().await.unwrap();
        assert_eq!(event.routing_key, "worker.heartbeat");
        assert_eq!(event.body["type"], "worker-heartbeat");
    }
}

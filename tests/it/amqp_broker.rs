//! The RabbitMQ broker against a real RabbitMQ (`WORKERS_TEST_AMQP_URL`): Celery's topology
//! and wire format, priorities, eta, retries, undecodable messages, a connection cut in the
//! middle of a step (through a TCP proxy), a channel closed by RabbitMQ, a duplicate of a
//! running task, and graceful stops. Every test uses queues of its own and deletes them.

use crate::common;

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use chrono::Utc;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use workers::app::App;
use workers::broker::amqp::{AmqpBroker, AmqpConfig, queue_arguments};
use workers::broker::celery::{self, Sender};
use workers::broker::{ArgsRepr, Broker, Consume, TaskMessage, saferepr};
use workers::identity::Identity;
use workers::model::DatasetType;
use workers::store::{TaskClaim, TaskError, TaskStart, TaskStatus, WorkflowFilter};
use workers::ui::Display;
use workers::workflow::engine::{self, WorkflowView};
use workers::workflow::worker::{self, Until, WorkerOptions};

// ---------------------------------------------------------------------------------------
// Harness

/// The RabbitMQ URL, or `None` (with a note) when it is not set; with `CI=true` a missing
/// service fails the test instead.
fn amqp_url() -> Option<String> {
    logs();
    common::services::service_var("WORKERS_TEST_AMQP_URL")
}

/// A name no other test (or run) uses.
fn unique(what: &str) -> String {
    format!("workers-test-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// Deletes the test's queues and exchanges when dropped, even when the test panicked.
struct Cleanup {
    url: String,
    names: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, names) = (self.url.clone(), std::mem::take(&mut self.names));
        // A runtime of its own: the test's runtime may be the one unwinding.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await
                else {
                    return;
                };
                let Ok(channel) = conn.create_channel().await else {
                    return;
                };
                for name in &names {
                    let _ = channel
                        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                        .await;
                    let _ = channel
                        .exchange_delete(name.as_str().into(), Default::default())
                        .await;
                }
                let _ = conn.close(200, "OK".into()).await;
            });
        })
        .join();
    }
}

/// A plain lapin connection to look at RabbitMQ from outside the broker.
struct Rabbit {
    conn: Connection,
}

impl Rabbit {
    async fn connect(url: &str) -> Rabbit {
        Rabbit {
            conn: Connection::connect(url, ConnectionProperties::default())
                .await
                .unwrap(),
        }
    }

    /// Messages ready in `queue` (not counting those delivered and unacknowledged).
    async fn ready(&self, queue: &str) -> u32 {
        let channel = self.conn.create_channel().await.unwrap();
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        declared.message_count()
    }

    /// Declares `queue` as given; the AMQP reply code of a refusal.
    async fn declare(
        &self,
        queue: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    ) -> Result<(), u16> {
        let channel = self.conn.create_channel().await.unwrap();
        channel
            .queue_declare(queue.into(), options, arguments)
            .await
            .map(|_| ())
            .map_err(reply_code)
    }

    async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeDeclareOptions,
    ) -> Result<(), u16> {
        let channel = self.conn.create_channel().await.unwrap();
        channel
            .exchange_declare(name.into(), kind, options, FieldTable::default())
            .await
            .map_err(reply_code)
    }

    async fn publish(&self, exchange: &str, key: &str, properties: BasicProperties, body: &[u8]) {
        let channel = self.conn.create_channel().await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        let confirm = channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        assert!(
            confirm.take_message().is_none(),
            "unroutable: {exchange}/{key}"
        );
    }
}

fn reply_code(err: lapin::Error) -> u16 {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_id(),
        other => panic!("not a refusal by RabbitMQ: {other:?}"),
    }
}

fn config(uri: &str, queue: &str) -> AmqpConfig {
    AmqpConfig {
        uri: uri.to_owned(),
        queues: vec![queue.to_owned()],
        prefetch: 1,
        heartbeat: 10,
        reconnect_max: Duration::from_secs(2),
        max_held: 100,
        dead_letter_exchange: None,
    }
}

fn broker(uri: &str, queue: &str) -> Arc<AmqpBroker> {
    Arc::new(AmqpBroker::new(config(uri, queue), &Identity::current()).unwrap())
}

fn message(queue: &str, priority: u8) -> TaskMessage {
    let id = uuid::Uuid::new_v4().to_string();
    let mut kwargs = Map::new();
    kwargs.insert("workflow_id".into(), json!("wf-1"));
    kwargs.insert("step".into(), json!("await stability"));
    kwargs.insert("app_id".into(), json!("app"));
    TaskMessage {
        root_id: id.clone(),
        id,
        task: "noop".into(),
        args: vec![json!(7)],
        kwargs,
        priority,
        eta: None,
        retries: 0,
        parent_id: None,
        queue: queue.to_owned(),
        time_limits: Default::default(),
    }
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Log lines of this test process, to see what the engine did (how often a step started).
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Starts capturing the log (once per process); every test calls it before it does anything.
fn logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        struct Writer;
        impl Write for Writer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                LOGS.lock().unwrap().extend_from_slice(buf);
                std::io::stderr().write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .with_env_filter("warn,workers=info")
            .with_ansi(false)
            .with_writer(|| Writer)
            .init();
    });
}

/// Log lines that mention `needle` and `also`.
fn log_lines(needle: &str, also: &str) -> Vec<String> {
    let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned();
    logs.lines()
        .filter(|l| l.contains(needle) && l.contains(also))
        .map(str::to_owned)
        .collect()
}

/// A project whose workflow `slow` waits about `wait_seconds` in its first step (the
/// dataset must be that old before `await_stability` lets it through), then runs `noop`.
struct Slow {
    project: Project,
    queue: String,
    dataset: Option<std::path::PathBuf>,
}

impl Slow {
    fn new(wait_seconds: u64) -> Slow {
        let mut project = Project::new();
        let app_id = unique("app");
        project.set_env("WORKERS__APP_ID", &app_id);
        project.set_env("WORKERS__WORKER__LEASE_SECONDS", "3");
        std::fs::write(
            project.path("jobs/slow.toml"),
            format!(
                r#"name = "slow"

[[steps]]
name = "wait"
task = "await_stability"
kwargs = {{ recency_threshold = {wait_seconds}, wait_seconds = 1 }}

[[steps]]
name = "noop"
task = "noop"
"#
            ),
        )
        .unwrap();
        Slow {
            queue: format!("{app_id}.q"),
            project,
            dataset: None,
        }
    }

    /// Writes a fresh dataset and starts its `slow` workflow; returns the workflow id.
    async fn start(&mut self, app: &App) -> String {
        let origin = self
            .project
            .dataset(DatasetType::RawData, "slow_one", &[("a.txt", b"alpha")]);
        self.dataset = Some(origin.clone());
        let id = register_without_workflow(app, "slow_one", &origin).await;
        engine::start(app, "slow", id, Map::new()).await.unwrap()
    }
}

async fn view_of(app: &App, workflow_id: &str) -> WorkflowView {
    engine::view(app, app.store.workflow(workflow_id).await.unwrap().unwrap())
        .await
        .unwrap()
}

async fn step_status(app: &App, workflow_id: &str, position: usize) -> TaskStatus {
    view_of(app, workflow_id).await.derived.steps[position]
}

fn opts(concurrency: usize, queue: &str, grace: Duration) -> WorkerOptions {
    WorkerOptions {
        concurrency,
        until: Until::Shutdown,
        queues: Some(vec![queue.to_owned()]),
        shutdown_grace: grace,
        node_name: "workers@test".into(),
        send_events: false,
    }
}

/// Waits until the queue is empty and the broker holds nothing, steadily for a second: every
/// copy of every message has been dealt with.
async fn settled(rabbit: &Rabbit, broker: &AmqpBroker, queue: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet_since: Option<Instant> = None;
    loop {
        let quiet = rabbit.ready(queue).await == 0 && broker.unsettled() == 0;
        match (quiet, quiet_since) {
            (true, Some(since)) if since.elapsed() > Duration::from_secs(1) => return,
            (true, None) => quiet_since = Some(Instant::now()),
            (false, _) => quiet_since = None,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "queue `{queue}` never settled: {} ready, {} unsettled",
            rabbit.ready(queue).await,
            broker.unsettled()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TCP proxy between the broker and RabbitMQ whose connections a test can cut, as a
/// network failure would, without touching the shared RabbitMQ node.
struct Proxy {
    port: u16,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let sockets = Arc::clone(&open);
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                let Ok(outbound) = TcpStream::connect(&target) else {
                    continue;
                };
                {
                    let mut sockets = sockets.lock().unwrap();
                    sockets.push(inbound.try_clone().unwrap());
                    sockets.push(outbound.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, open }
    }

    /// The URL `url` with the proxy in place of RabbitMQ's address.
    fn url(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.port)).unwrap();
        url.to_string()
    }

    /// Cuts every open connection (both sides see it closed); new ones are let through.
    fn cut(&self) {
        for socket in self.open.lock().unwrap().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

fn rabbit_address(url: &str) -> String {
    let url = url::Url::parse(url).unwrap();
    format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5672))
}

// ---------------------------------------------------------------------------------------
// Topology and wire format

#[tokio::test(flavor = "multi_thread")]
async fn declares_celerys_topology_and_writes_protocol_v2_messages() {
    let Some(url) = amqp_url() else { return };
    let queue = unique("wire");
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![queue.clone()],
    };
    let broker = broker(&url, &queue);
    let rabbit = Rabbit::connect(&url).await;
    let mut sent = message(&queue, 3);
    sent.parent_id = Some("parent-task".into());
    sent.kwargs.insert("recency_threshold".into(), json!(5));
    broker.publish(&sent).await.unwrap();

    // The queue: durable, with exactly `x-max-priority: 10` (RabbitMQ refuses a declaration
    // that differs with 406 PRECONDITION_FAILED).
    let durable = QueueDeclareOptions::durable();
    assert_eq!(
        rabbit.declare(&queue, durable, queue_arguments(None)).await,
        Ok(())
    );
    let mut five = FieldTable::default();
    five.insert("x-max-priority".into(), AMQPValue::LongInt(5));
    assert_eq!(rabbit.declare(&queue, durable, five).await, Err(406));
    assert_eq!(
        rabbit.declare(&queue, durable, FieldTable::default()).await,
        Err(406)
    );
    let transient = QueueDeclareOptions::default();
    assert_eq!(
        rabbit
            .declare(&queue, transient, queue_arguments(None))
            .await,
        Err(406)
    );
    // The exchange: durable and direct, named as the queue.
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    assert_eq!(
        rabbit
            .declare_exchange(&queue, ExchangeKind::Direct, durable_exchange)
            .await,
        Ok(())
    );
    assert_eq!(
        rabbit
            .declare_exchange(&queue, ExchangeKind::Fanout, durable_exchange)
            .await,
        Err(406)
    );
    assert_eq!(
        rabbit
            .declare_exchange(&queue, ExchangeKind::Direct, Default::default())
            .await,
        Err(406)
    );
    // The binding: the exchange routes the queue's name to the queue (the publish below is
    // mandatory, so an unbound key would come back).
    rabbit
        .publish(
            &queue,
            &queue,
            BasicProperties::default(),
            b"through the exchange",
        )
        .await;
    assert_eq!(rabbit.ready(&queue).await, 2);

    // The message as it lies in the queue (highest priority first, so ours).
    let channel = rabbit.conn.create_channel().await.unwrap();
    let got = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got.delivery.exchange.as_str(),
        queue,
        "published to the queue's exchange"
    );
    assert_eq!(got.delivery.routing_key.as_str(), queue);
    let properties = Value::Object(celery::properties_json(&got.delivery.properties));
    assert_eq!(properties["content_type"], "application/json");
    assert_eq!(properties["content_encoding"], "utf-8");
    assert_eq!(properties["delivery_mode"], 2);
    assert_eq!(properties["priority"], 3);
    assert_eq!(properties["correlation_id"], json!(sent.id));
    let identity = Identity::current();
    assert_eq!(
        properties["reply_to"],
        json!(Sender::new(&identity.hostname, identity.pid).reply_to)
    );
    let headers = &properties["application_headers"];
    let expected = json!({
        "lang": "py",
        "task": "noop",
        "id": sent.id,
        "shadow": null,
        "eta": null,
        "expires": null,
        "group": null,
        "group_index": null,
        "retries": 0,
        "timelimit": [null, null],
        "root_id": sent.id,
        "parent_id": "parent-task",
        "argsrepr": "(7,)",
        "kwargsrepr": "{'workflow_id': 'wf-1', 'step': 'await stability', 'app_id': 'app', 'recency_threshold': 5}",
        "origin": format!("gen{}@{}", identity.pid, identity.hostname),
        "ignore_result": false,
    });
    assert_eq!(headers, &expected);
    let body: Value = serde_json::from_slice(&got.delivery.data).unwrap();
    assert_eq!(
        body,
        json!([
            [7],
            {"workflow_id": "wf-1", "step": "await stability", "app_id": "app", "recency_threshold": 5},
            {"callbacks": null, "errbacks": null, "chain": null, "chord": null}
        ])
    );
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_the_highest_priority_first_from_either_exchange() {
    let Some(url) = amqp_url() else { return };
    let queue = unique("priority");
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![queue.clone()],
    };
    let broker = broker(&url, &queue);
    let rabbit = Rabbit::connect(&url).await;
    let (low, high, middle) = (message(&queue, 1), message(&queue, 9), message(&queue, 5));
    for m in [&low, &high, &middle] {
        broker.publish(m).await.unwrap();
    }
    // Celery 5.2 publishes through the default exchange (the captured fixture): read too.
    let python = message(&queue, 7);
    let (properties, body) = celery::encode(&python, &Sender::new("py-host", 1));
    rabbit.publish("", &queue, properties, &body).await;

    broker
        .start_consuming(&Consume {
            queues: None,
            prefetch: 1,
        })
        .await
        .unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), broker.next())
            .await
            .unwrap()
            .unwrap();
        order.push(delivery.message().priority);
        delivery.ack().await.unwrap();
    }
    assert_eq!(order, [9, 7, 5, 1]);
    broker.close().await;
    assert_eq!(rabbit.ready(&queue).await, 0, "every message acknowledged");
}

/// A batch (the first steps of a batch of new workflows) is published with its confirms
/// awaited together: every message arrives once, whatever the batch size.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_published_at_once_arrives_whole() {
    let Some(url) = amqp_url() else { return };
    let queue = unique("batch");
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![queue.clone()],
    };
    let broker = broker(&url, &queue);
    let rabbit = Rabbit::connect(&url).await;
    assert_eq!(
        broker.queued().await.unwrap().map(|d| d.waiting),
        Some(0),
        "a queue not declared yet holds nothing"
    );
    let batch: Vec<TaskMessage> = (0..150).map(|_| message(&queue, 5)).collect();
    broker.publish_many(&batch).await.unwrap();
    assert_eq!(rabbit.ready(&queue).await, 150);
    // What `workers status` reports: the ready messages, as RabbitMQ counts them.
    let depth = broker.queued().await.unwrap().unwrap();
    assert_eq!((depth.waiting, depth.oldest), (150, None));
    broker.check_queues().await.unwrap();
    broker
        .start_consuming(&Consume {
            queues: None,
            prefetch: 50,
        })
        .await
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..150 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), broker.next())
            .await
            .unwrap()
            .unwrap();
        assert!(
            seen.insert(delivery.message().id.clone()),
            "delivered twice"
        );
        delivery.ack().await.unwrap();
    }
    let published: std::collections::BTreeSet<String> =
        batch.iter().map(|m| m.id.clone()).collect();
    assert_eq!(seen, published);
    broker.close().await;
    assert_eq!(rabbit.ready(&queue).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_of_many_frames_arrives_whole() {
    // A message larger than a frame (128 KiB), its keyword arguments partly characters of
    // four bytes in UTF-8, goes out and comes back intact: its body in several frames, its
    // headers (which cannot be split) small, as they carry only the first 1,024 characters
    // of the arguments' repr.
    let Some(url) = amqp_url() else { return };
    let queue = unique("frames");
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![queue.clone()],
    };
    let broker = broker(&url, &queue);
    let mut big = message(&queue, 5);
    let notes: String = (0..300_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    big.kwargs.insert("faces".into(), json!("🙂".repeat(5000)));
    big.kwargs.insert("notes".into(), json!(notes));
    broker.publish(&big).await.unwrap();
    broker
        .start_consuming(&Consume {
            queues: None,
            prefetch: 1,
        })
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), broker.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivery.message().id, big.id);
    assert_eq!(delivery.message().kwargs, big.kwargs);
    delivery.ack().await.unwrap();
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn holds_a_message_until_its_eta_without_taking_the_slot() {
    let Some(url) = amqp_url() else { return };
    let queue = unique("eta");
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![queue.clone()],
    };
    let broker = broker(&url, &queue);
    let rabbit = Rabbit::connect(&url).await;
    let mut later = message(&queue, 5);
    let eta = Utc::now() + chrono::Duration::seconds(2);
    later.eta = Some(eta);
    let now = message(&queue, 1);
    broker.publish(&later).await.unwrap();
    broker.publish(&now).await.unwrap();

    broker
        .start_consuming(&Consume {
            queues: None,
            prefetch: 1,
        })
        .await
        .unwrap();
    // One slot, and the message with the higher priority is held: the prefetch grows by one
    // while it is, so the other is delivered meanwhile.
    let first = tokio::time::timeout(Duration::from_secs(10), broker.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.message().id, now.id);
    assert!(
        Utc::now() < eta,
        "the first message waited for the held one"
    );
    assert_eq!(broker.unsettled(), 2, "one held, one handed out");
    // What `inspect scheduled` lists: the held one only, not the one handed out.
    let waiting: Vec<String> = broker.waiting().await.into_iter().map(|m| m.id).collect();
    assert_eq!(waiting, [later.id.clone()]);
    first.ack().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), broker.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.message().id, later.id);
    assert!(Utc::now() >= eta, "handed out before its eta");
    assert!(
        broker.waiting().await.is_empty(),
        "a running message is not waiting"
    );
    assert_eq!(
        second.message().eta.map(|e| e.timestamp_micros()),
        Some(eta.timestamp_micros())
    );
    second.ack().await.unwrap();
    broker.close().await;
    assert_eq!(rabbit.ready(&queue).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_eta_messages_raises_the_prefetch_only_up_to_its_cap() {
    let Some(url) = amqp_url() else { return };
    let queue = unique("eta-flood");
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![queue.clone()],
    };
    let broker = Arc::new(
        AmqpBroker::new(
            AmqpConfig {
                max_held: 4,
                ..config(&url, &queue)
            },
            &Identity::current(),
        )
        .unwrap(),
    );
    let rabbit = Rabbit::connect(&url).await;
    let eta = Utc::now() + chrono::Duration::seconds(4);
    let mut sent = Vec::new();
    for _ in 0..30 {
        let mut later = message(&queue, 5);
        later.eta = Some(eta);
        broker.publish(&later).await.unwrap();
        sent.push(later.id);
    }
    broker
        .start_consuming(&Consume {
            queues: None,
            prefetch: 1,
        })
        .await
        .unwrap();
    // One slot and four held messages raise the prefetch to five; the fifth message held
    // takes the slot's place, and nothing more is taken until they come due.
    eventually("the worker holds five", Duration::from_secs(10), || async {
        broker.unsettled() == 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        Utc::now() < eta,
        "the test was too slow to look before the eta"
    );
    assert_eq!(broker.unsettled(), 5, "held beyond the cap");
    assert_eq!(rabbit.ready(&queue).await, 25, "left to other workers");

    // Once due they run, and the rest follows; none before its eta.
    let mut got = Vec::new();
    for _ in 0..30 {
        let delivery = tokio::time::timeout(Duration::from_secs(20), broker.next())
            .await
            .unwrap()
            .unwrap();
        assert!(Utc::now() >= eta, "handed out before its eta");
        got.push(delivery.message().id.clone());
        delivery.ack().await.unwrap();
    }
    got.sort();
    sent.sort();
    assert_eq!(got, sent);
    broker.close().await;
    assert_eq!(rabbit.ready(&queue).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_republishes_the_same_id_with_one_more_retry() {
    let Some(url) = amqp_url() else { return };
    let queue = unique("retry");
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![queue.clone()],
    };
    let broker = broker(&url, &queue);
    let rabbit = Rabbit::connect(&url).await;
    let sent = message(&queue, 4);
    broker.publish(&sent).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), broker.next())
        .await
        .unwrap()
        .unwrap();
    let eta = Utc::now() + chrono::Duration::seconds(1);
    delivery.retry_later(eta, 1).await.unwrap();

    let again = tokio::time::timeout(Duration::from_secs(10), broker.next())
        .await
        .unwrap()
        .unwrap();
    assert!(Utc::now() >= eta, "the retry ran before its eta");
    let got = again.message().clone();
    assert_eq!(got.id, sent.id);
    assert_eq!(got.retries, 1);
    assert_eq!(got.priority, 4, "the original priority");
    assert_eq!(got.queue, queue, "the original queue");
    assert_eq!(
        (got.args.clone(), got.kwargs.clone()),
        (sent.args, sent.kwargs)
    );
    assert_eq!(got.root_id, sent.root_id);
    again.ack().await.unwrap();
    broker.close().await;
    assert_eq!(
        rabbit.ready(&queue).await,
        0,
        "the original was acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_undecodable_message_is_rejected_once_not_requeued() {
    let Some(url) = amqp_url() else { return };
    let queue = unique("garbage");
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![queue.clone()],
    };
    let broker = broker(&url, &queue);
    let rabbit = Rabbit::connect(&url).await;
    let good = message(&queue, 1);
    broker.publish(&good).await.unwrap(); // declares the queue
    rabbit
        .publish(
            "",
            &queue,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_priority(9),
            b"this is not a task",
        )
        .await;
    let (properties, body) = celery::encode(&message(&queue, 9), &Sender::new("h", 1));
    rabbit
        .publish(
            "",
            &queue,
            properties.with_content_type("application/x-python-serialize".into()),
            &body,
        )
        .await;

    let delivery = tokio::time::timeout(Duration::from_secs(10), broker.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        delivery.message().id,
        good.id,
        "the unreadable ones were skipped"
    );
    delivery.ack().await.unwrap();
    broker.close().await;
    // Closing gives back everything unacknowledged: had they been requeued or left
    // unacknowledged, they would be ready again now.
    assert_eq!(rabbit.ready(&queue).await, 0);
    assert_eq!(
        log_lines("Rejected a message", &queue).len(),
        2,
        "each rejected once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_cannot_run_goes_to_the_dead_letter_exchange_when_the_queue_has_one() {
    let Some(url) = amqp_url() else { return };
    let (queue, dead) = (unique("dlx-work"), unique("dlx-dead"));
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![queue.clone(), dead.clone()],
    };
    let rabbit = Rabbit::connect(&url).await;
    // The site's dead-letter exchange and a queue that collects what reaches it.
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    rabbit
        .declare_exchange(&dead, ExchangeKind::Fanout, durable)
        .await
        .unwrap();
    rabbit
        .declare(&dead, QueueDeclareOptions::durable(), FieldTable::default())
        .await
        .unwrap();
    let channel = rabbit.conn.create_channel().await.unwrap();
    channel
        .queue_bind(
            dead.as_str().into(),
            dead.as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let with_dlx = AmqpConfig {
        dead_letter_exchange: Some(dead.clone()),
        ..config(&url, &queue)
    };
    let broker = Arc::new(AmqpBroker::new(with_dlx, &Identity::current()).unwrap());
    let mut orphan = message(&queue, 3);
    orphan.kwargs.clear();
    broker.publish(&orphan).await.unwrap();
    // The queue was declared with the exchange, as every peer must then declare it.
    assert_eq!(
        rabbit
            .declare(
                &queue,
                QueueDeclareOptions::durable(),
                queue_arguments(Some(&dead))
            )
            .await,
        Ok(())
    );
    let delivery = tokio::time::timeout(Duration::from_secs(10), broker.next())
        .await
        .unwrap()
        .unwrap();
    delivery
        .dead_letter("no workflow_id and step")
        .await
        .unwrap();
    eventually(
        "the message reaches the dead letters",
        Duration::from_secs(10),
        || async { rabbit.ready(&dead).await == 1 },
    )
    .await;
    broker.close().await;
    assert_eq!(rabbit.ready(&queue).await, 0, "rejected, not requeued");
    let got = channel
        .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    let properties = Value::Object(celery::properties_json(&got.delivery.properties));
    assert_eq!(
        properties["correlation_id"],
        json!(orphan.id),
        "the message itself"
    );
    assert!(!log_lines("dead-letter exchange", &orphan.id).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_cannot_run_is_acknowledged_when_the_queue_has_no_dead_letter_exchange() {
    let Some(url) = amqp_url() else { return };
    let queue = unique("no-dlx");
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![queue.clone()],
    };
    let rabbit = Rabbit::connect(&url).await;
    let broker = broker(&url, &queue);
    let mut orphan = message(&queue, 3);
    orphan.kwargs.clear();
    broker.publish(&orphan).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), broker.next())
        .await
        .unwrap()
        .unwrap();
    delivery
        .dead_letter("no workflow_id and step")
        .await
        .unwrap();
    broker.close().await;
    assert_eq!(rabbit.ready(&queue).await, 0, "acknowledged, not requeued");
    assert!(!log_lines("acknowledged and removed", &orphan.id).is_empty());
}

// ---------------------------------------------------------------------------------------
// Failures in the middle of a step

/// What a lost channel must not change: each step ran once, the workflow succeeded, every
/// copy of every message was dealt with.
async fn assert_ran_once_and_settled(
    app: &App,
    broker: &AmqpBroker,
    rabbit: &Rabbit,
    queue: &str,
    workflow_id: &str,
) {
    eventually("the workflow succeeds", Duration::from_secs(60), || async {
        view_of(app, workflow_id).await.derived.status == TaskStatus::Success
    })
    .await;
    settled(rabbit, broker, queue).await;
    let view = view_of(app, workflow_id).await;
    for step in &view.workflow.steps {
        assert_eq!(
            step.runs.len(),
            1,
            "step `{}`: {:?}",
            step.spec.name,
            step.runs
        );
        let task_id = &step.runs[0].task_id;
        assert_eq!(
            log_lines("Step started.", task_id).len(),
            1,
            "step `{}` started more than once",
            step.spec.name
        );
        assert_eq!(view.metas[task_id].status, TaskStatus::Success);
    }
    let dataset = dataset_named(app, DatasetType::RawData, "slow_one").await;
    assert_eq!(state_names(&dataset), ["REGISTERED", "READY"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_that_succeeded_leaves_its_claim_to_lapse() {
    let Some(url) = amqp_url() else { return };
    let mut slow = Slow::new(1);
    // Long enough that the claims taken are certainly still live when looked at.
    slow.project
        .set_env("WORKERS__WORKER__LEASE_SECONDS", "120");
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![slow.queue.clone()],
    };
    let broker = broker(&url, &slow.queue);
    let app = App::with_broker(slow.project.settings(), broker.clone())
        .await
        .unwrap();
    let workflow_id = slow.start(&app).await;
    let (stop_tx, stop) = watch::channel(false);
    let running = tokio::spawn(worker::run(
        Arc::clone(&app),
        opts(2, &slow.queue, Duration::from_secs(30)),
        stop,
        Display::quiet(),
    ));
    eventually("the workflow succeeds", Duration::from_secs(60), || async {
        view_of(&app, &workflow_id).await.derived.status == TaskStatus::Success
    })
    .await;
    let _ = stop_tx.send(true);
    running.await.unwrap().unwrap();
    broker.close().await;
    // Giving back the claim of a task whose message is settled would only spend a write: it
    // is still held, by the run that succeeded, until it lapses.
    let view = view_of(&app, &workflow_id).await;
    for step in &view.workflow.steps {
        let task_id = &step.runs.last().unwrap().task_id;
        assert_eq!(view.metas[task_id].status, TaskStatus::Success);
        let claim = app
            .scheduler_store
            .lease(&format!("task/{task_id}"))
            .await
            .unwrap();
        assert!(
            claim.is_some(),
            "step `{}`: its claim was given back",
            step.spec.name
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_lost_mid_step_runs_the_step_once_and_the_workflow_goes_on() {
    let Some(url) = amqp_url() else { return };
    let mut slow = Slow::new(4);
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![slow.queue.clone()],
    };
    let proxy = Proxy::start(rabbit_address(&url));
    let broker = broker(&proxy.url(&url), &slow.queue);
    let app = App::with_broker(slow.project.settings(), broker.clone())
        .await
        .unwrap();
    let rabbit = Rabbit::connect(&url).await;
    let workflow_id = slow.start(&app).await;
    let (stop_tx, stop) = watch::channel(false);
    let running = tokio::spawn(worker::run(
        Arc::clone(&app),
        opts(2, &slow.queue, Duration::from_secs(30)),
        stop,
        Display::quiet(),
    ));
    eventually("the first step runs", Duration::from_secs(30), || async {
        step_status(&app, &workflow_id, 0).await == TaskStatus::Started
    })
    .await;
    proxy.cut();

    assert_ran_once_and_settled(&app, &broker, &rabbit, &slow.queue, &workflow_id).await;
    let first = engine::start_task_id(&workflow_id);
    assert!(
        !log_lines("Skipped the acknowledgement", &first).is_empty(),
        "the step's acknowledgement should have met the dead channel"
    );
    assert!(
        !log_lines("deferred", &first).is_empty(),
        "RabbitMQ's second delivery should have been deferred while the step ran"
    );
    let _ = stop_tx.send(true);
    running.await.unwrap().unwrap();
    broker.close().await;
    assert_eq!(rabbit.ready(&slow.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_whose_acknowledgement_was_lost_waits_for_its_delay_and_runs_once() {
    let Some(url) = amqp_url() else { return };
    let mut slow = Slow::new(0);
    // Long enough for the reconnection and the original's second delivery on a loaded machine.
    slow.project
        .set_env("WORKERS__RETRY__DEFAULT__DELAY_SECONDS", "8");
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![slow.queue.clone()],
    };
    let proxy = Proxy::start(rabbit_address(&url));
    let broker = broker(&proxy.url(&url), &slow.queue);
    let app = App::with_broker(slow.project.settings(), broker.clone())
        .await
        .unwrap();
    let rabbit = Rabbit::connect(&url).await;
    let workflow_id = slow.start(&app).await;

    // The first attempt failed and was retried as the engine retries: RETRY stored, the same
    // task id published again with one more retry and an eta...
    let delivery = tokio::time::timeout(Duration::from_secs(10), broker.next())
        .await
        .unwrap()
        .unwrap();
    let original = delivery.message().clone();
    assert_eq!(original.id, engine::start_task_id(&workflow_id));
    app.store
        .task_started(&TaskStart {
            workflow_id: Some(workflow_id.clone()),
            position: 0,
            task_id: original.id.clone(),
            task_name: original.task.clone(),
            args: original.args.clone(),
            kwargs: original.kwargs.clone(),
            hostname: "workers@test".into(),
            pid: std::process::id(),
            retries: 0,
            queue: original.queue.clone(),
            parent_id: None,
            resume_locked: true,
            start_counted: false,
        })
        .await
        .unwrap();
    let error = TaskError {
        exc_type: "RetryableException".into(),
        exc_message: "the disk was away".into(),
        exc_module: "workers.exceptions".into(),
    };
    app.store.task_retry(&original.id, &error, 0).await.unwrap();
    let eta = Utc::now() + chrono::Duration::seconds(8);
    let mut retry = original.clone();
    retry.eta = Some(eta);
    retry.retries = 1;
    broker.publish(&retry).await.unwrap();
    // ...but the connection dropped before the original's acknowledgement reached RabbitMQ,
    // which delivers the original again, as it was.
    proxy.cut();
    drop(delivery);

    let (stop_tx, stop) = watch::channel(false);
    let running = tokio::spawn(worker::run(
        Arc::clone(&app),
        opts(2, &slow.queue, Duration::from_secs(30)),
        stop,
        Display::quiet(),
    ));
    while Utc::now() < eta - chrono::Duration::milliseconds(300) {
        assert_eq!(
            step_status(&app, &workflow_id, 0).await,
            TaskStatus::Retry,
            "the step ran before its retry delay"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !log_lines("already ran and failed", &original.id).is_empty(),
        "the original came again and was deferred"
    );

    assert_ran_once_and_settled(&app, &broker, &rabbit, &slow.queue, &workflow_id).await;
    let view = view_of(&app, &workflow_id).await;
    assert_eq!(
        view.metas[&original.id].retries, 1,
        "ran as the second attempt"
    );
    let _ = stop_tx.send(true);
    running.await.unwrap().unwrap();
    broker.close().await;
    assert_eq!(rabbit.ready(&slow.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_channel_closed_by_rabbitmq_mid_step_is_reopened_and_the_step_runs_once() {
    // RabbitMQ closes a channel whose delivery acknowledgement times out (consumer_timeout)
    // with 406 PRECONDITION_FAILED. RabbitMQ 3.10 has no per-queue timeout and the shared
    // node's global one must not change, so RabbitMQ is made to close the channel with the
    // same code by acknowledging a tag it never delivered.
    let Some(url) = amqp_url() else { return };
    let mut slow = Slow::new(4);
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![slow.queue.clone()],
    };
    let broker = broker(&url, &slow.queue);
    let app = App::with_broker(slow.project.settings(), broker.clone())
        .await
        .unwrap();
    let rabbit = Rabbit::connect(&url).await;
    let workflow_id = slow.start(&app).await;
    let (stop_tx, stop) = watch::channel(false);
    let running = tokio::spawn(worker::run(
        Arc::clone(&app),
        opts(1, &slow.queue, Duration::from_secs(30)),
        stop,
        Display::quiet(),
    ));
    eventually("the first step runs", Duration::from_secs(30), || async {
        step_status(&app, &workflow_id, 0).await == TaskStatus::Started
    })
    .await;
    broker.provoke_consumer_channel_error().await.unwrap();

    // The second step runs only if the consumer came back on a new channel.
    assert_ran_once_and_settled(&app, &broker, &rabbit, &slow.queue, &workflow_id).await;
    let first = engine::start_task_id(&workflow_id);
    assert!(!log_lines("Skipped the acknowledgement", &first).is_empty());
    assert!(!log_lines("Lost the RabbitMQ consumers", "PRECONDITION_FAILED").is_empty());
    let _ = stop_tx.send(true);
    running.await.unwrap().unwrap();
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_of_a_running_task_is_deferred_not_run_twice() {
    let Some(url) = amqp_url() else { return };
    let mut slow = Slow::new(4);
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![slow.queue.clone()],
    };
    let broker = broker(&url, &slow.queue);
    let app = App::with_broker(slow.project.settings(), broker.clone())
        .await
        .unwrap();
    let rabbit = Rabbit::connect(&url).await;
    let workflow_id = slow.start(&app).await;
    let (stop_tx, stop) = watch::channel(false);
    let running = tokio::spawn(worker::run(
        Arc::clone(&app),
        opts(2, &slow.queue, Duration::from_secs(30)),
        stop,
        Display::quiet(),
    ));
    eventually("the first step runs", Duration::from_secs(30), || async {
        step_status(&app, &workflow_id, 0).await == TaskStatus::Started
    })
    .await;
    // A second copy of the running step's message, as RabbitMQ delivers after a timeout.
    let first = engine::start_task_id(&workflow_id);
    let meta = app
        .store
        .task_metas(std::slice::from_ref(&first))
        .await
        .unwrap()[&first]
        .clone();
    let copy = TaskMessage {
        id: first.clone(),
        task: meta.name.clone().unwrap(),
        args: meta.args.clone(),
        kwargs: meta.kwargs.clone(),
        priority: 1,
        eta: None,
        retries: 0,
        root_id: first.clone(),
        parent_id: None,
        queue: slow.queue.clone(),
        time_limits: Default::default(),
    };
    broker.publish(&copy).await.unwrap();
    eventually("the copy is deferred", Duration::from_secs(10), || async {
        !log_lines("deferred", &first).is_empty()
    })
    .await;
    assert_eq!(
        step_status(&app, &workflow_id, 0).await,
        TaskStatus::Started,
        "deferred while the original still runs"
    );

    assert_ran_once_and_settled(&app, &broker, &rabbit, &slow.queue, &workflow_id).await;
    assert_eq!(
        app.store
            .task_metas(std::slice::from_ref(&first))
            .await
            .unwrap()[&first]
            .worker
            .as_deref(),
        Some("workers@test")
    );
    let _ = stop_tx.send(true);
    running.await.unwrap().unwrap();
    broker.close().await;
}

// ---------------------------------------------------------------------------------------
// Stopping

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_lets_the_running_step_finish_and_takes_nothing_new() {
    let Some(url) = amqp_url() else { return };
    let mut slow = Slow::new(3);
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![slow.queue.clone()],
    };
    let broker = broker(&url, &slow.queue);
    let app = App::with_broker(slow.project.settings(), broker.clone())
        .await
        .unwrap();
    let rabbit = Rabbit::connect(&url).await;
    let workflow_id = slow.start(&app).await;
    let (stop_tx, stop) = watch::channel(false);
    let running = tokio::spawn(worker::run(
        Arc::clone(&app),
        opts(1, &slow.queue, Duration::from_secs(30)),
        stop,
        Display::quiet(),
    ));
    eventually("the first step runs", Duration::from_secs(30), || async {
        step_status(&app, &workflow_id, 0).await == TaskStatus::Started
    })
    .await;
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the worker stops once the step is done")
        .unwrap()
        .unwrap();

    let view = view_of(&app, &workflow_id).await;
    assert_eq!(
        view.derived.steps[0],
        TaskStatus::Success,
        "the running step finished"
    );
    assert_eq!(
        view.derived.steps[1],
        TaskStatus::Pending,
        "nothing new was taken"
    );
    broker.close().await;
    // The finished step was acknowledged; its successor waits in the queue.
    assert_eq!(rabbit.ready(&slow.queue).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_still_running_when_the_grace_ends_is_given_back() {
    let Some(url) = amqp_url() else { return };
    let mut slow = Slow::new(30);
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![slow.queue.clone()],
    };
    let broker = broker(&url, &slow.queue);
    let app = App::with_broker(slow.project.settings(), broker.clone())
        .await
        .unwrap();
    let rabbit = Rabbit::connect(&url).await;
    let workflow_id = slow.start(&app).await;
    let (stop_tx, stop) = watch::channel(false);
    let running = tokio::spawn(worker::run(
        Arc::clone(&app),
        opts(1, &slow.queue, Duration::from_secs(1)),
        stop,
        Display::quiet(),
    ));
    eventually("the first step runs", Duration::from_secs(30), || async {
        step_status(&app, &workflow_id, 0).await == TaskStatus::Started
    })
    .await;
    let stopped_at = Instant::now();
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the worker stops after the grace")
        .unwrap()
        .unwrap();
    assert!(
        stopped_at.elapsed() >= Duration::from_secs(1),
        "the step got its grace"
    );

    assert_eq!(
        step_status(&app, &workflow_id, 0).await,
        TaskStatus::Started,
        "nothing recorded for the interrupted step"
    );
    // The claim was released: another worker may take the task at once.
    let first = engine::start_task_id(&workflow_id);
    assert!(matches!(
        app.store
            .claim_task(&first, "another", Duration::from_secs(5), false)
            .await
            .unwrap(),
        TaskClaim::Held { .. }
    ));
    // The message went back (released, not acknowledged) while the connection was still up.
    // RabbitMQ handles the release after it is sent: on a loaded machine it shows as ready
    // a moment later.
    eventually(
        "the message is ready again",
        Duration::from_secs(5),
        || async { rabbit.ready(&slow.queue).await == 1 },
    )
    .await;
    broker.close().await;
    assert_eq!(rabbit.ready(&slow.queue).await, 1);
}

/// SIGTERM drains a `workers worker` process: the running step finishes and is
/// acknowledged, nothing new is taken, exit 0. The binary's broker comes from the
/// configuration (`broker.kind`), which is the embedded queue here; the drain path (stop
/// consuming, grace, interrupt) is the same for RabbitMQ, tested in process above.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_worker_process_finish_its_step_and_exit_0() {
    logs();
    let mut slow = Slow::new(3);
    let app = slow.project.app().await;
    let workflow_id = slow.start(&app).await;
    let mut child = slow
        .project
        .command(&["worker", "--concurrency", "1", "--hostname", "node-%n@%h"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _reap = Reap(child.id());
    eventually("the first step runs", Duration::from_secs(60), || async {
        step_status(&app, &workflow_id, 0).await == TaskStatus::Started
    })
    .await;
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the worker did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("no new steps"), "{stderr}");

    let view = view_of(&app, &workflow_id).await;
    assert_eq!(view.derived.steps[0], TaskStatus::Success, "{stderr}");
    assert_eq!(view.derived.steps[1], TaskStatus::Pending, "{stderr}");
    let first = engine::start_task_id(&workflow_id);
    let hostname = Identity::current().hostname;
    let short = hostname.split('.').next().unwrap();
    assert_eq!(
        view.metas[&first].worker.as_deref(),
        Some(format!("node-{short}@{hostname}").as_str())
    );
    assert_eq!(
        app.broker.holds(&first).await.unwrap(),
        Some(false),
        "acknowledged"
    );
    assert_eq!(
        app.broker
            .holds(&engine::next_task_id(&first))
            .await
            .unwrap(),
        Some(true),
        "the next step waits"
    );
    assert!(
        app.store
            .workflows(WorkflowFilter::Active, 10)
            .await
            .unwrap()
            .iter()
            .any(|w| w.id == workflow_id)
    );
}

/// A worker that is to end once idle cannot wait for an unreachable RabbitMQ: it fails,
/// naming the broker without its password, instead of finding nothing to do and exiting 0.
#[test]
fn a_worker_until_idle_fails_when_rabbitmq_cannot_be_reached() {
    logs();
    let mut project = Project::new();
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    project.set_env("WORKERS__BROKER__KIND", "amqp");
    project.set_env("WORKERS__AMQP__URL", &format!("127.0.0.1:{port}/%2f"));
    project.set_env("WORKERS__AMQP__USER", "operator");
    project.set_env("QUEUE_PASS", "s3cret-pass");
    project.set_env("WORKERS__AMQP__RECONNECT_MAX_SECONDS", "1");
    let started = Instant::now();
    let out = project.run(&["worker", "--until-idle"]);
    let stderr = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr.contains(&format!(
            "cannot connect to RabbitMQ at amqp://127.0.0.1:{port}/"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret-pass"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// Python Celery as the peer

/// Celery 5.2 (`WORKERS_TEST_PYTHON`): `read` takes one message from the queue, declaring
/// the queue as a Celery worker does, and prints what Celery's worker makes of it; `send`
/// sends a task the way sca-rhythm does and prints its id.
const CELERY_PEER: &str = r#"
import json, sys
from datetime import datetime, timedelta, timezone
from celery import Celery
from celery.worker.request import Request

mode, url, queue = sys.argv[1:4]
app = Celery("interop", broker=url)
app.conf.update(task_serializer="json", accept_content=["json"], task_default_queue=queue,
                task_queue_max_priority=10, task_default_priority=1)

@app.task(name="noop")
def noop(dataset_id, **kwargs):
    return (dataset_id,)

if mode == "read":
    with app.connection_for_read() as conn:
        bound = app.amqp.queues[queue](conn.default_channel)
        bound.declare()
        message = bound.get(no_ack=True)
        request = Request(message, app=app)
        info = request.request_dict
        print(json.dumps({
            "id": request.id, "name": request.name, "args": request.args,
            "kwargs": request.kwargs, "eta": request.eta.isoformat() if request.eta else None,
            "retries": info["retries"], "parent_id": request.parent_id,
            "root_id": request.root_id, "argsrepr": request.argsrepr,
            "priority": message.properties["priority"],
            "correlation_id": message.properties["correlation_id"],
            "content_type": message.content_type,
        }))
else:
    result = app.send_task("noop", args=[7], kwargs={"workflow_id": "wf", "step": "s", "app_id": "a"},
                           queue=queue, priority=5,
                           eta=datetime.now(timezone.utc) + timedelta(seconds=1))
    print(json.dumps({"id": result.id}))
"#;

fn celery_peer(python: &str, mode: &str, url: &str, queue: &str) -> Value {
    let out = std::process::Command::new(python)
        .args(["-c", CELERY_PEER, mode, url, queue])
        .output()
        .unwrap();
    assert!(out.status.success(), "Celery peer: {}", describe(&out));
    serde_json::from_slice(out.stdout.trim_ascii()).unwrap()
}

fn python() -> Option<String> {
    common::services::service_var("WORKERS_TEST_PYTHON")
}

/// Values that exercise every turn of `saferepr`: quotes, backslashes and newlines, text
/// beyond code points of one byte, cuts inside strings with and without spaces, inside long
/// lists and between keys, depth beyond three levels, numbers of each kind.
fn repr_corpus() -> Vec<Value> {
    let counts = [1, 2, 3].repeat(400);
    let mut corpus = vec![
        json!(null),
        json!([]),
        json!({}),
        json!([[]]),
        json!(7),
        json!(-0.0),
        json!(0.1),
        json!(1e100),
        json!(18446744073709551615u64),
        json!(true),
        json!("it's"),
        json!("say \"hi\" and it's \\ done\n\ttab"),
        json!("naïve café 🙂 ".repeat(120)),
        json!("x".repeat(1023)),
        json!("x".repeat(1024)),
        json!("a b ".repeat(600)),
        json!(counts),
        json!({ "k": counts }),
        json!([[[[1]]], {"a": {"b": {"c": {"d": 1}}}}]),
        json!({"it's": "key with a quote", "": "empty key"}),
        json!({"workflow_id": "0e1412df-b846-4d3b-9402-a10f96f520d7", "step": "await stability",
               "app_id": "bioloop-dev.sca.iu.edu", "notes": "ab cd ".repeat(400)}),
    ];
    // Pseudo-random nests of every kind of value, sized around the 1,024-character cut.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % n
    };
    fn random(next: &mut dyn FnMut(u64) -> u64, depth: u32) -> Value {
        match next(if depth > 4 { 5 } else { 8 }) {
            0 => Value::Null,
            1 => json!(next(2) == 1),
            2 => json!(next(1_000_000) as i64 - 500_000),
            3 => json!(next(1000) as f64 / 7.0),
            4 => {
                let words = ["a", "b'c", "d e", "f\\g", "h\ni", "jé", " "];
                let n = next(60);
                json!((0..n).map(|_| words[next(7) as usize]).collect::<String>())
            }
            5 | 6 => Value::Array((0..next(40)).map(|_| random(next, depth + 1)).collect()),
            _ => Value::Object(
                (0..next(12))
                    .map(|i| (format!("k{i}'{}", next(10)), random(next, depth + 1)))
                    .collect(),
            ),
        }
    }
    for _ in 0..300 {
        corpus.push(random(&mut next, 0));
    }
    corpus
}

#[test]
fn argsrepr_kwargsrepr_and_result_reprs_are_celerys_saferepr() {
    let Some(python) = python() else { return };
    let corpus = repr_corpus();
    let input: String = corpus.iter().map(|v| format!("{v}\n")).collect();
    let script = r#"
import json, sys
from celery.utils.saferepr import saferepr
for line in sys.stdin:
    value = json.loads(line)
    args = value if isinstance(value, list) else [value]
    print(json.dumps([saferepr(tuple(args), 1024), saferepr(value, 1024)]))
"#;
    let mut child = std::process::Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(input.as_bytes()).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "Celery's saferepr: {}",
        describe(&out)
    );
    let celerys: Vec<(String, String)> = out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).unwrap())
        .collect();
    assert_eq!(celerys.len(), corpus.len());
    for (value, (args_repr, value_repr)) in corpus.iter().zip(&celerys) {
        let args = match value {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        assert_eq!(&saferepr::args(&args), args_repr, "argsrepr of {value}");
        assert_eq!(&saferepr::value(value), value_repr, "repr of {value}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn celery_reads_our_messages_and_we_read_celerys() {
    let Some(url) = amqp_url() else { return };
    let Some(python) = python() else { return };
    let queue = unique("celery");
    let _cleanup = Cleanup {
        url: url.clone(),
        names: vec![queue.clone()],
    };
    let broker = broker(&url, &queue);

    // Ours, read by Celery's worker code (which also declares the queue its own way: any
    // difference in the queue's arguments would make RabbitMQ refuse it).
    let mut ours = message(&queue, 6);
    let eta = Utc::now() + chrono::Duration::seconds(30);
    ours.eta = Some(eta);
    ours.retries = 2;
    ours.parent_id = Some("parent-task".into());
    broker.publish(&ours).await.unwrap();
    let read = celery_peer(&python, "read", &url, &queue);
    assert_eq!(read["id"], json!(ours.id));
    assert_eq!(read["name"], "noop");
    assert_eq!(read["args"], json!([7]));
    assert_eq!(read["kwargs"], Value::Object(ours.kwargs.clone()));
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(read["eta"].as_str().unwrap())
            .unwrap()
            .timestamp_micros(),
        eta.timestamp_micros()
    );
    assert_eq!(read["retries"], 2);
    assert_eq!(read["parent_id"], "parent-task");
    assert_eq!(read["root_id"], json!(ours.root_id));
    assert_eq!(read["argsrepr"], "(7,)");
    assert_eq!(read["priority"], 6);
    assert_eq!(read["correlation_id"], json!(ours.id));
    assert_eq!(read["content_type"], "application/json");

    // Celery's, sent as sca-rhythm sends a step (through the default exchange), read here.
    let sent = celery_peer(&python, "send", &url, &queue);
    let delivery = tokio::time::timeout(Duration::from_secs(15), broker.next())
        .await
        .unwrap()
        .unwrap();
    let got = delivery.message().clone();
    assert_eq!(json!(got.id), sent["id"]);
    assert_eq!(got.task, "noop");
    assert_eq!(got.args, vec![json!(7)]);
    assert_eq!(got.kwargs["workflow_id"], "wf");
    assert_eq!(got.priority, 5);
    assert!(
        got.eta.is_some_and(|at| at <= Utc::now()),
        "held until its eta: {got:?}"
    );
    assert_eq!(got.retries, 0);
    assert_eq!(got.root_id, got.id);
    // The arguments as Celery showed them, kept for the `task-received` event: sent as a
    // list, they read `[7]`, where a tuple (as sca-rhythm and this worker send) reads `(7,)`.
    assert_eq!(
        delivery.reprs(),
        Some(&ArgsRepr {
            args: "[7]".into(),
            kwargs: "{'workflow_id': 'wf', 'step': 's', 'app_id': 'a'}".into(),
        })
    );
    delivery.ack().await.unwrap();
    broker.close().await;
    assert_eq!(Rabbit::connect(&url).await.ready(&queue).await, 0);
}

//! Remote control of workers, as Celery 5.2 workers answer it: `ping`, `revoke` (with
//! `terminate`), `shutdown`, `add_consumer` / `cancel_consumer` and the inspect commands, so
//! that `celery inspect`, `celery control`, Flower, sca-rhythm's `pause()` and the operator
//! commands (`workers control ...`) see Rust and Python workers alike.
//!
//! A request travels through a [`mailbox::Mailbox`]: Celery's pidbox on RabbitMQ
//! ([`amqp`]), or the database in the embedded profile ([`sql`]). Every worker process
//! serves it with one [`WorkerControl`], which knows the steps it runs, the revoked task ids
//! and how to stop the worker; its replies are the JSON documents a Celery worker sends.

pub mod amqp;
pub mod events;
pub mod mailbox;
pub mod revoked;
pub mod sql;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::app::App;
use crate::broker::{ArgsRepr, Consume, TaskMessage, saferepr};
use crate::cancel::CancellationToken;
use revoked::RevokedSet;

/// Where a reply goes: kombu's `reply_to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyTo {
    pub exchange: String,
    pub routing_key: String,
}

/// A remote-control request, as kombu's `Mailbox._publish` sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub method: String,
    #[serde(default)]
    pub arguments: Map<String, Value>,
    /// The node names that must answer; `None` (or empty): every node.
    #[serde(default)]
    pub destination: Option<Vec<String>>,
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub matcher: Option<String>,
    /// Set when the sender waits for replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyTo>,
}

impl Request {
    pub fn new(method: &str, arguments: Map<String, Value>) -> Request {
        Request {
            method: method.to_owned(),
            arguments,
            destination: None,
            pattern: None,
            matcher: None,
            ticket: None,
            reply_to: None,
        }
    }

    /// Whether the node `node` must handle this request (kombu's `Node.handle_message`: by
    /// destination, else by a glob pattern, else every node).
    pub fn is_for(&self, node: &str) -> bool {
        match (&self.destination, &self.pattern) {
            (Some(destination), _) if !destination.is_empty() => {
                destination.iter().any(|d| d == node)
            }
            // kombu's `glob` matcher; a `pcre` pattern (Python's regular expressions) is not
            // matched here, so such a request reaches no Rust worker.
            (_, Some(pattern)) if self.matcher.as_deref() == Some("glob") => {
                globset::Glob::new(pattern).is_ok_and(|g| g.compile_matcher().is_match(node))
            }
            (_, Some(_)) if self.matcher.is_some() => false,
            _ => true,
        }
    }
}

/// What the worker answers to a request: a reply, or nothing at all (`shutdown`, as Celery's
/// raises before it can reply).
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Reply(Value),
    Silent,
}

fn ok(text: impl Into<String>) -> Answer {
    Answer::Reply(json!({"ok": text.into()}))
}

fn nok(text: impl Into<String>) -> Answer {
    Answer::Reply(json!({"error": text.into()}))
}

/// A step running here, as `inspect active` shows it.
struct ActiveTask {
    message: TaskMessage,
    /// Seconds since the epoch.
    time_start: f64,
    /// Cancelled by `revoke(terminate=True)`.
    terminate: CancellationToken,
}

/// What `--queues` and `add_consumer` / `cancel_consumer` make the worker consume.
struct Consuming {
    queues: Vec<String>,
    prefetch: u16,
}

impl std::fmt::Debug for WorkerControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerControl")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The remote-control side of one worker process.
pub struct WorkerControl {
    app: Arc<App>,
    node: String,
    started: Instant,
    concurrency: usize,
    active: Mutex<BTreeMap<String, ActiveTask>>,
    /// Tasks run to an end here since the worker started, by task name (`stats.total`).
    processed: Mutex<BTreeMap<String, u64>>,
    revoked: RevokedSet,
    consuming: tokio::sync::Mutex<Consuming>,
    shutdown: watch::Sender<bool>,
    /// Where events go (RabbitMQ only); sent while `task_events` is on.
    events: Option<events::EventSender>,
    task_events: AtomicBool,
    /// Whether `worker-online` was sent (and `worker-offline` is due at the end).
    online: AtomicBool,
    /// Kombu's Lamport clock, carried in the `clock` header of every request and reply.
    clock: AtomicU64,
}

impl WorkerControl {
    /// The control of a worker named `node` running `concurrency` slots on `queues`; a remote
    /// `shutdown` turns `shutdown` true. With `events`, events are sent while they are on
    /// (`send_events`, or `enable_events` from the fleet).
    pub fn new(
        app: Arc<App>,
        node: &str,
        concurrency: usize,
        queues: Vec<String>,
        shutdown: watch::Sender<bool>,
        events: Option<(events::EventSender, bool)>,
    ) -> WorkerControl {
        let (events, send_events) = match events {
            Some((sender, on)) => (Some(sender), on),
            None => (None, false),
        };
        WorkerControl {
            app,
            node: node.to_owned(),
            started: Instant::now(),
            concurrency,
            active: Mutex::new(BTreeMap::new()),
            processed: Mutex::new(BTreeMap::new()),
            revoked: RevokedSet::new(),
            consuming: tokio::sync::Mutex::new(Consuming {
                queues,
                prefetch: u16::try_from(concurrency).unwrap_or(u16::MAX),
            }),
            shutdown,
            events,
            task_events: AtomicBool::new(send_events),
            online: AtomicBool::new(false),
            clock: AtomicU64::new(0),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Loads the revokes the store remembers (those of the last three hours), and has it forget
    /// the older ones.
    pub async fn load_revoked(&self) -> anyhow::Result<usize> {
        let since = Utc::now() - revoked::EXPIRES;
        self.app.store.forget_revoked_before(since).await?;
        let remembered = self.app.store.revoked_since(since).await?;
        for (id, at) in &remembered {
            self.revoked.insert([id.as_str()], *at);
        }
        Ok(remembered.len())
    }

    /// Whether `task_id` was revoked: its message must not run.
    pub fn is_revoked(&self, task_id: &str) -> bool {
        self.revoked.contains(task_id)
    }

    /// Whether task events are on (`enable_events` / `disable_events`).
    pub fn task_events(&self) -> bool {
        self.task_events.load(Ordering::SeqCst)
    }

    /// Advances the Lamport clock past `seen` (a request's `clock` header).
    pub fn adjust_clock(&self, seen: u64) {
        self.clock.fetch_max(seen, Ordering::SeqCst);
        self.clock.fetch_add(1, Ordering::SeqCst);
    }

    /// The next value of the Lamport clock, for a message sent.
    pub fn forward_clock(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Sends `worker-online` (once) and a `worker-heartbeat` when events are on; the worker
    /// calls it every [`events::HEARTBEAT`].
    pub fn heartbeat(&self) {
        let Some(events) = self.sending() else {
            return;
        };
        let kind = if self.online.swap(true, Ordering::SeqCst) {
            "worker-heartbeat"
        } else {
            "worker-online"
        };
        events.worker(kind, self.forward_clock(), self.worker_fields());
    }

    /// Sends `worker-offline` if `worker-online` was sent.
    pub fn offline(&self) {
        if let Some(events) = &self.events
            && self.online.swap(false, Ordering::SeqCst)
        {
            events.worker("worker-offline", self.forward_clock(), self.worker_fields());
        }
    }

    fn sending(&self) -> Option<&events::EventSender> {
        self.events.as_ref().filter(|_| self.task_events())
    }

    fn worker_fields(&self) -> Map<String, Value> {
        let processed: u64 = self
            .processed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum();
        let mut fields = Map::new();
        fields.insert("freq".into(), json!(events::HEARTBEAT.as_secs_f64()));
        fields.insert("active".into(), json!(self.running()));
        fields.insert("processed".into(), json!(processed));
        fields.insert("loadavg".into(), events::loadavg());
        fields.insert("sw_ident".into(), json!(SW_IDENT));
        fields.insert("sw_ver".into(), json!(env!("CARGO_PKG_VERSION")));
        fields.insert("sw_sys".into(), json!(sw_sys()));
        fields
    }

    /// Sends the task event `kind` about `task_id` when events are on.
    pub fn task_event(&self, kind: &'static str, task_id: &str, fields: Map<String, Value>) {
        if let Some(events) = self.sending() {
            events.task(kind, self.forward_clock(), task_id, fields);
        }
    }

    /// `task-received`, with the message's fields as Celery sends them: the arguments as its
    /// `argsrepr` and `kwargsrepr` headers (`reprs`), or as Celery would have written them
    /// where the message has none (the embedded queue keeps no headers).
    pub fn task_received(&self, message: &TaskMessage, reprs: Option<&ArgsRepr>) {
        if self.sending().is_none() {
            return;
        }
        let fields = json!({
            "name": message.task,
            "args": reprs.map_or_else(|| saferepr::args(&message.args), |r| r.args.clone()),
            "kwargs": reprs.map_or_else(
                || saferepr::value(&Value::Object(message.kwargs.clone())),
                |r| r.kwargs.clone(),
            ),
            "root_id": message.root_id,
            "parent_id": message.parent_id,
            "retries": message.retries,
            "eta": message.eta.map(|eta| eta.to_rfc3339()),
            "expires": null,
        });
        if let Value::Object(fields) = fields {
            self.task_event("task-received", &message.id, fields);
        }
    }

    /// Records that `message` started running here. The returned guard ends the record when
    /// dropped; its token is cancelled by `revoke(terminate=True)`.
    pub fn step_started(self: &Arc<Self>, message: &TaskMessage) -> RunningStep {
        let terminate = CancellationToken::new();
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        active.insert(
            message.id.clone(),
            ActiveTask {
                message: message.clone(),
                time_start: unix_now(),
                terminate: terminate.clone(),
            },
        );
        RunningStep {
            control: Arc::clone(self),
            task_id: message.id.clone(),
            task: message.task.clone(),
            terminate,
        }
    }

    fn running(&self) -> usize {
        self.active.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Handles one request addressed to this node.
    pub async fn handle(&self, request: &Request) -> Answer {
        let args = &request.arguments;
        match request.method.as_str() {
            "ping" => ok("pong"),
            "revoke" => self.revoke(args).await,
            "terminate" => {
                let mut args = args.clone();
                args.insert("terminate".into(), Value::Bool(true));
                self.revoke(&args).await
            }
            "shutdown" => {
                let msg = args
                    .get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or("Got shutdown from remote");
                warn!(node = %self.node, "{msg}: no new steps; the running ones finish first.");
                let _ = self.shutdown.send(true);
                Answer::Silent
            }
            "add_consumer" => self.add_consumer(args).await,
            "cancel_consumer" => self.cancel_consumer(args).await,
            "active" | "dump_active" => Answer::Reply(Value::Array(
                self.active
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .map(|task| self.request_info(&task.message, Some(task.time_start)))
                    .collect(),
            )),
            "reserved" | "dump_reserved" => Answer::Reply(self.waiting(false).await),
            "scheduled" | "dump_schedule" => Answer::Reply(self.waiting(true).await),
            "registered" | "dump_tasks" => Answer::Reply(json!(
                crate::steps::Task::ALL
                    .map(crate::steps::Task::name)
                    .into_iter()
                    .collect::<std::collections::BTreeSet<_>>()
            )),
            "stats" => Answer::Reply(self.stats().await),
            "active_queues" => Answer::Reply(self.active_queues().await),
            "revoked" | "dump_revoked" => Answer::Reply(json!(
                self.revoked
                    .entries()
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect::<Vec<_>>()
            )),
            "query_task" => {
                let ids = string_list(args.get("ids"));
                let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
                let found: Map<String, Value> = ids
                    .iter()
                    .filter_map(|id| active.get(id))
                    .map(|task| {
                        (
                            task.message.id.clone(),
                            json!([
                                "active",
                                self.request_info(&task.message, Some(task.time_start))
                            ]),
                        )
                    })
                    .collect();
                Answer::Reply(Value::Object(found))
            }
            "report" => ok(self.report()),
            "conf" | "dump_conf" => Answer::Reply(self.conf()),
            "clock" => Answer::Reply(json!({"clock": self.clock.load(Ordering::SeqCst)})),
            "hello" => self.hello(args).await,
            "enable_events" if self.events.is_none() => {
                nok("this worker sends events only with the RabbitMQ broker")
            }
            "enable_events" => {
                if self.task_events.swap(true, Ordering::SeqCst) {
                    ok("task events already enabled")
                } else {
                    info!("Task events enabled by remote.");
                    ok("task events enabled")
                }
            }
            "disable_events" => {
                if self.task_events.swap(false, Ordering::SeqCst) {
                    info!("Task events disabled by remote.");
                    ok("task events disabled")
                } else {
                    ok("task events already disabled")
                }
            }
            "heartbeat" => {
                self.heartbeat();
                Answer::Reply(Value::Null)
            }
            "election" => Answer::Reply(Value::Null),
            "rate_limit" | "time_limit" | "pool_grow" | "pool_shrink" | "autoscale"
            | "pool_restart" | "memsample" | "memdump" | "objgraph" => nok(format!(
                "{} is not supported by this worker (its slots and time limits come from its configuration)",
                request.method
            )),
            // What a Celery worker answers to a command it does not know.
            other => nok(format!("KeyError('{other}')")),
        }
    }

    /// `revoke`: remembers the ids (here and in the store); with `terminate`, stops the
    /// matching steps running here. The replies are Celery's, word for word.
    async fn revoke(&self, args: &Map<String, Value>) -> Answer {
        let mut ids = string_list(args.get("task_id"));
        ids.sort();
        ids.dedup();
        if ids.is_empty() {
            return nok("revoke needs task_id");
        }
        let now = Utc::now();
        self.revoked.insert(ids.iter().map(String::as_str), now);
        if let Err(err) = self.app.store.remember_revoked(&ids, now).await {
            warn!(error = %format!("{err:#}"), "Could not store the revoked task ids; this worker remembers them until it stops.");
        }
        let terminate = args.get("terminate").is_some_and(truthy);
        if !terminate {
            info!(tasks = %ids.join(", "), "Tasks flagged as revoked.");
            return ok(format!("tasks {} flagged as revoked", ids.join(", ")));
        }
        let signal = args
            .get("signal")
            .and_then(Value::as_str)
            .unwrap_or("SIGTERM");
        let mut terminated = Vec::new();
        {
            let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            for id in &ids {
                if let Some(task) = active.get(id) {
                    info!(task_id = %id, signal, "Terminating the step: it was revoked.");
                    task.terminate.cancel();
                    terminated.push(id.clone());
                }
            }
        }
        if terminated.is_empty() {
            ok("terminate: tasks unknown")
        } else {
            ok(format!("terminate: {}", terminated.join(", ")))
        }
    }

    async fn add_consumer(&self, args: &Map<String, Value>) -> Answer {
        let Some(queue) = args.get("queue").and_then(Value::as_str) else {
            return nok("add_consumer needs queue");
        };
        let mut consuming = self.consuming.lock().await;
        if !consuming.queues.iter().any(|q| q == queue) {
            let mut queues = consuming.queues.clone();
            queues.push(queue.to_owned());
            if let Err(err) = self.consume(&queues, consuming.prefetch).await {
                return nok(format!("cannot consume from {queue}: {err:#}"));
            }
            consuming.queues = queues;
            info!(queue, "Consuming from a new queue, by remote.");
        }
        ok(format!("add consumer {queue}"))
    }

    async fn cancel_consumer(&self, args: &Map<String, Value>) -> Answer {
        let Some(queue) = args.get("queue").and_then(Value::as_str) else {
            return nok("cancel_consumer needs queue");
        };
        let mut consuming = self.consuming.lock().await;
        if consuming.queues.iter().any(|q| q == queue) {
            let queues: Vec<String> = consuming
                .queues
                .iter()
                .filter(|q| *q != queue)
                .cloned()
                .collect();
            if let Err(err) = self.consume(&queues, consuming.prefetch).await {
                return nok(format!("cannot stop consuming from {queue}: {err:#}"));
            }
            consuming.queues = queues;
            info!(queue, "No longer consuming from the queue, by remote.");
        }
        ok(format!("no longer consuming from {queue}"))
    }

    async fn consume(&self, queues: &[String], prefetch: u16) -> anyhow::Result<()> {
        if queues.is_empty() {
            // Running steps go on; what was received and not started goes back to the queue.
            self.app.broker.stop_consuming().await
        } else {
            self.app
                .broker
                .start_consuming(&Consume {
                    queues: Some(queues.to_vec()),
                    prefetch,
                })
                .await
        }
    }

    /// Messages received and not running: due ones (`reserved`) or held for their `eta`
    /// (`scheduled`).
    async fn waiting(&self, scheduled: bool) -> Value {
        let now = Utc::now();
        let waiting = self.app.broker.waiting().await;
        let running = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let infos = waiting
            .iter()
            .filter(|m| !running.contains_key(&m.id))
            .filter(|m| m.eta.is_some_and(|eta| eta > now) == scheduled)
            .map(|m| {
                let info = self.request_info(m, None);
                if scheduled {
                    json!({
                        "eta": m.eta.map(|eta| eta.to_rfc3339()),
                        "priority": m.priority,
                        "request": info,
                    })
                } else {
                    info
                }
            })
            .collect();
        Value::Array(infos)
    }

    /// A task as Celery's `Request.info()` describes it.
    fn request_info(&self, message: &TaskMessage, time_start: Option<f64>) -> Value {
        json!({
            "id": message.id,
            "name": message.task,
            "args": message.args,
            "kwargs": message.kwargs,
            "type": message.task,
            "hostname": self.node,
            "time_start": time_start,
            // Acknowledged late: only once the step's result is recorded.
            "acknowledged": false,
            "delivery_info": {
                "exchange": "",
                "routing_key": message.queue,
                "priority": message.priority,
                "redelivered": false,
            },
            "worker_pid": time_start.map(|_| self.app.identity.pid),
        })
    }

    async fn stats(&self) -> Value {
        let pid = self.app.identity.pid;
        let prefetch = self.consuming.lock().await.prefetch;
        let total: Map<String, Value> = self
            .processed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(task, n)| (task.clone(), json!(n)))
            .collect();
        json!({
            "total": total,
            "pid": pid,
            "clock": self.clock.load(Ordering::SeqCst).to_string(),
            "uptime": self.started.elapsed().as_secs(),
            "pool": {
                "implementation": "workers:slots",
                "max-concurrency": self.concurrency,
                // One process runs every slot (tokio tasks over a rayon pool).
                "processes": [pid],
                "max-tasks-per-child": "N/A",
                "put-guarded-by-semaphore": false,
                // [soft, hard] limits in seconds (0: none).
                "timeouts": [
                    self.app.settings.worker.time_limit_seconds,
                    self.app.settings.worker.time_limit_seconds,
                ],
                "running": self.running(),
                "parallelism": self.app.settings.parallelism,
            },
            "broker": broker_info(&self.app),
            "prefetch_count": prefetch,
            "rusage": rusage(),
            "sw_ident": SW_IDENT,
            "sw_ver": env!("CARGO_PKG_VERSION"),
            "revoked": self.revoked.len(),
        })
    }

    async fn active_queues(&self) -> Value {
        let queues = self.consuming.lock().await.queues.clone();
        let amqp = matches!(
            self.app.settings.backends.broker,
            crate::config::BrokerKind::Amqp
        );
        Value::Array(
            queues
                .iter()
                .map(|queue| {
                    json!({
                        "name": queue,
                        "exchange": {
                            "name": if amqp { queue.as_str() } else { "" },
                            "type": "direct",
                            "arguments": null,
                            "durable": true,
                            "passive": false,
                            "auto_delete": false,
                            "delivery_mode": null,
                            "no_declare": false,
                        },
                        "routing_key": queue,
                        "queue_arguments": {"x-max-priority": crate::broker::amqp::MAX_PRIORITY},
                        "binding_arguments": null,
                        "consumer_arguments": null,
                        "durable": true,
                        "exclusive": false,
                        "auto_delete": false,
                        "no_ack": false,
                        "alias": null,
                        "bindings": [],
                        "no_declare": null,
                        "expires": null,
                        "message_ttl": null,
                        "max_length": null,
                        "max_length_bytes": null,
                        "max_priority": null,
                    })
                })
                .collect(),
        )
    }

    fn report(&self) -> String {
        let settings = &self.app.settings;
        format!(
            "\nsoftware -> workers:{} ({})\nplatform -> system:{} arch:{}\nsettings -> broker:{} store:{} registry:{}\nnode: {}\nconcurrency: {}\nparallelism: {}\n",
            env!("CARGO_PKG_VERSION"),
            SW_IDENT,
            std::env::consts::OS,
            std::env::consts::ARCH,
            broker_kind(&self.app),
            match settings.backends.store {
                crate::config::StoreKind::Sqlite => "sqlite".to_owned(),
                crate::config::StoreKind::Postgres => settings.postgres.display.clone(),
                crate::config::StoreKind::Mongo => settings.mongo.display.clone(),
            },
            match settings.backends.registry {
                crate::config::RegistryKind::Sqlite => "sqlite".to_owned(),
                crate::config::RegistryKind::Postgres => settings.postgres.display.clone(),
                crate::config::RegistryKind::Http => settings.api.base_url.to_string(),
            },
            self.node,
            self.concurrency,
            settings.parallelism,
        )
    }

    fn conf(&self) -> Value {
        let settings = &self.app.settings;
        json!({
            "broker_url": broker_kind(&self.app),
            "task_serializer": "json",
            "result_serializer": "json",
            "accept_content": ["json"],
            "task_acks_late": true,
            "task_track_started": true,
            "task_queue_max_priority": crate::broker::amqp::MAX_PRIORITY,
            "task_default_priority": 1,
            "task_time_limit": settings.worker.time_limit_seconds,
            "worker_concurrency": self.concurrency,
            "worker_prefetch_multiplier": 1,
            "app_id": settings.app_id,
        })
    }

    /// `hello` (Celery's mingle, sent by a worker as it starts): takes the sender's revokes
    /// and answers with ours, as `{id: [revoked at, id]}` like Celery's `LimitedSet`.
    async fn hello(&self, args: &Map<String, Value>) -> Answer {
        let from = args.get("from_node").and_then(Value::as_str).unwrap_or("");
        if from == self.node {
            return Answer::Reply(Value::Null);
        }
        if let Some(Value::Object(theirs)) = args.get("revoked") {
            let now = Utc::now();
            let ids: Vec<(String, DateTime<Utc>)> = theirs
                .iter()
                .map(|(id, entry)| {
                    let at = entry
                        .get(0)
                        .or(Some(entry))
                        .and_then(Value::as_f64)
                        .and_then(|secs| DateTime::from_timestamp_millis((secs * 1000.0) as i64))
                        .filter(|at| *at <= now)
                        .unwrap_or(now);
                    (id.clone(), at)
                })
                .collect();
            for (id, at) in &ids {
                self.revoked.insert([id.as_str()], *at);
            }
        }
        let ours: Map<String, Value> = self
            .revoked
            .entries()
            .into_iter()
            .map(|(id, at)| {
                let secs = at.timestamp_millis() as f64 / 1000.0;
                (id.clone(), json!([secs, id]))
            })
            .collect();
        Answer::Reply(json!({"revoked": ours, "clock": self.forward_clock()}))
    }
}

/// Revokes `task_ids` from the outside (an operator, a pause): remembers them in the store,
/// so that Rust workers started later know them, and broadcasts `revoke` to the workers
/// (`destination`: only those). With `collect`, returns the workers' replies.
pub async fn revoke(
    app: &App,
    task_ids: &[String],
    terminate: bool,
    destination: Option<Vec<String>>,
    collect: Option<mailbox::Collect>,
) -> anyhow::Result<Vec<mailbox::Reply>> {
    app.store.remember_revoked(task_ids, Utc::now()).await?;
    let mut arguments = Map::new();
    let ids = match task_ids {
        [one] => json!(one),
        many => json!(many),
    };
    arguments.insert("task_id".into(), ids);
    arguments.insert("terminate".into(), json!(terminate));
    arguments.insert("signal".into(), json!("SIGTERM"));
    let mut request = Request::new("revoke", arguments);
    request.destination = destination;
    app.mailbox.broadcast(request, collect).await
}

/// The operating system as Python's `platform.system()` names it.
fn sw_sys() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        other => other,
    }
}

/// Software identity in `stats` and events (Celery's `sw_ident` is `py-celery`).
pub const SW_IDENT: &str = "workers-rs";

/// A running step's place in the worker's control: removed from `active` when dropped.
pub struct RunningStep {
    control: Arc<WorkerControl>,
    task_id: String,
    task: String,
    terminate: CancellationToken,
}

impl RunningStep {
    /// Cancelled when the step is revoked with `terminate`.
    pub fn terminated(&self) -> CancellationToken {
        self.terminate.clone()
    }
}

impl Drop for RunningStep {
    fn drop(&mut self) {
        self.control
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.task_id);
        *self
            .control
            .processed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(self.task.clone())
            .or_insert(0) += 1;
    }
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        Value::String(s) => matches!(s.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"),
        _ => false,
    }
}

/// A string or a list of strings (Celery's variadic arguments accept either).
fn string_list(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn unix_now() -> f64 {
    Utc::now().timestamp_micros() as f64 / 1e6
}

fn broker_kind(app: &App) -> String {
    match app.settings.backends.broker {
        crate::config::BrokerKind::Amqp => app.settings.amqp.display.clone(),
        crate::config::BrokerKind::Embedded => {
            format!("sqlite:{}", app.settings.sqlite.path.display())
        }
        crate::config::BrokerKind::Postgres => app.settings.postgres.display.clone(),
    }
}

/// The broker as Celery's `stats.broker` describes it (no password).
fn broker_info(app: &App) -> Value {
    match app.settings.backends.broker {
        crate::config::BrokerKind::Amqp => {
            let uri = url::Url::parse(&app.settings.amqp.display).ok();
            json!({
                "hostname": uri.as_ref().and_then(|u| u.host_str().map(str::to_owned)),
                "userid": uri.as_ref().map(|u| u.username().to_owned()),
                "virtual_host": uri.as_ref().map(|u| {
                    let path = u.path().trim_start_matches('/');
                    let vhost = percent_encoding::percent_decode_str(path).decode_utf8_lossy().into_owned();
                    if vhost.is_empty() { "/".to_owned() } else { vhost }
                }),
                "port": uri.as_ref().and_then(url::Url::port_or_known_default).unwrap_or(5672),
                "insist": false,
                "ssl": uri.as_ref().is_some_and(|u| u.scheme() == "amqps"),
                "transport": "amqp",
                "heartbeat": app.settings.amqp.heartbeat,
                "transport_options": {},
                "login_method": "PLAIN",
                "uri_prefix": null,
                "failover_strategy": "round-robin",
                "alternates": [],
            })
        }
        crate::config::BrokerKind::Embedded => json!({
            "transport": "sqlite",
            "hostname": app.settings.sqlite.path.display().to_string(),
        }),
        crate::config::BrokerKind::Postgres => {
            let url = url::Url::parse(&app.settings.postgres.display).ok();
            json!({
                "transport": "postgres",
                "hostname": url.as_ref().and_then(|u| u.host_str().map(str::to_owned)),
                "port": url.as_ref().and_then(url::Url::port).unwrap_or(5432),
                "virtual_host": url.as_ref().map(|u| u.path().trim_start_matches('/').to_owned()),
            })
        }
    }
}

/// The process's resource use, in the fields of Celery's `stats.rusage` that Linux fills.
fn rusage() -> Value {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .map(|t| t / 100.0)
    };
    let maxrss = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    json!({
        // utime and stime are fields 14 and 15: 11 and 12 after the state.
        "utime": ticks(11),
        "stime": ticks(12),
        "maxrss": maxrss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_addressed_as_kombu_addresses_them() {
        let mut request = Request::new("ping", Map::new());
        assert!(request.is_for("a@h"));
        request.destination = Some(vec!["b@h".into()]);
        assert!(!request.is_for("a@h"));
        assert!(request.is_for("b@h"));
        request.destination = Some(vec![]);
        request.pattern = Some("a@*".into());
        request.matcher = Some("glob".into());
        assert!(request.is_for("a@h"));
        assert!(!request.is_for("b@h"));
    }

    #[test]
    fn a_request_reads_as_kombu_sends_it() {
        let body = r#"{"method": "revoke", "arguments": {"task_id": "t1", "terminate": true, "signal": "SIGTERM"},
            "destination": null, "pattern": null, "matcher": null}"#;
        let request: Request = serde_json::from_str(body).unwrap();
        assert_eq!(request.method, "revoke");
        assert_eq!(string_list(request.arguments.get("task_id")), ["t1"]);
        assert!(request.reply_to.is_none());
        let body = r#"{"method": "ping", "arguments": {}, "destination": ["w@h"], "pattern": null,
            "matcher": null, "ticket": "t", "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "oid"}}"#;
        let request: Request = serde_json::from_str(body).unwrap();
        assert_eq!(request.reply_to.unwrap().routing_key, "oid");
        assert_eq!(request.ticket.as_deref(), Some("t"));
    }

    #[test]
    fn truthy_values_are_celerys() {
        assert!(truthy(&json!(true)) && truthy(&json!(1)) && truthy(&json!("True")));
        assert!(!truthy(&json!(false)) && !truthy(&json!(0)) && !truthy(&json!(null)));
    }
}

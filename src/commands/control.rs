//! `workers control`: remote control of the workers (Python and Rust alike) through the
//! mailbox: ping, inspect, revoke, shutdown, consumers, and pause / resume of workflows.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{Failed, Usage};
use crate::app::App;
use crate::cli::{ControlCommand, ControlTarget, OutputFormat};
use crate::control::Request;
use crate::control::mailbox::{Collect, Reply};
use crate::workflow::engine::{self, Paused, Resumed};

pub(super) async fn run(app: &Arc<App>, cmd: ControlCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ControlCommand::Ping(target) => {
            let replies = call(app, "ping", Map::new(), &target).await?;
            print(&replies, target.format, text_of);
        }
        ControlCommand::Inspect { what, target } => {
            let replies = call(app, what.method(), Map::new(), &target).await?;
            print_inspection(what.method(), &replies, target.format);
        }
        ControlCommand::Revoke {
            task_ids,
            terminate,
            target,
        } => {
            let known = app.store.task_metas(&task_ids).await?;
            for id in task_ids.iter().filter(|id| !known.contains_key(*id)) {
                eprintln!(
                    "warning: no task {id} is recorded; it is remembered as revoked in case its message arrives"
                );
            }
            let replies = crate::control::revoke(
                app,
                &task_ids,
                terminate,
                destination(&target),
                Some(collect(&target)?),
            )
            .await?;
            // Revoking needs no worker to answer: it is remembered in the store either way.
            if replies.is_empty() {
                eprintln!(
                    "no worker answered within {} s; the revoke is remembered and applies when a message of the task arrives",
                    target.timeout
                );
            }
            print(&replies, target.format, text_of);
        }
        ControlCommand::Shutdown {
            hostname,
            queues,
            immediate,
            timeout,
        } => shutdown(app, &hostname, queues, immediate, timeout).await?,
        ControlCommand::AddConsumer { queue, target } => {
            let mut arguments = Map::new();
            arguments.insert("queue".into(), json!(queue));
            let replies = call(app, "add_consumer", arguments, &target).await?;
            print(&replies, target.format, text_of);
        }
        ControlCommand::CancelConsumer { queue, target } => {
            let mut arguments = Map::new();
            arguments.insert("queue".into(), json!(queue));
            let replies = call(app, "cancel_consumer", arguments, &target).await?;
            print(&replies, target.format, text_of);
        }
        ControlCommand::Pause { workflow_id } => match engine::pause(app, &workflow_id).await? {
            Paused::Paused {
                step,
                task,
                task_id,
            } => say!(
                "paused workflow {workflow_id}: revoked step `{step}` ({task}, task {task_id})"
            ),
            Paused::NotRunning(status) => {
                return Err(Usage(format!(
                    "workflow {workflow_id} is {status} and has no running step to pause"
                ))
                .into());
            }
        },
        ControlCommand::Resume { workflow_id } => match engine::resume(app, &workflow_id).await? {
            Resumed::Restarted { step, task_id } => {
                say!("resumed workflow {workflow_id} at step `{step}` (task {task_id})")
            }
            Resumed::NotFailed(status) => {
                return Err(Usage(format!(
                        "workflow {workflow_id} is {status}; only a paused or failed workflow can be resumed"
                    ))
                    .into());
            }
            Resumed::AlreadyResuming => {
                return Err(
                    Usage(format!("workflow {workflow_id} is being resumed already")).into(),
                );
            }
            Resumed::NoSuchStep(step) => {
                return Err(Usage(format!("workflow {workflow_id} has no step `{step}`")).into());
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn destination(target: &ControlTarget) -> Option<Vec<String>> {
    (!target.destination.is_empty()).then(|| target.destination.clone())
}

fn collect(target: &ControlTarget) -> anyhow::Result<Collect> {
    if !(target.timeout.is_finite() && target.timeout > 0.0) {
        return Err(Usage(format!(
            "--timeout must be a positive number of seconds, not {}",
            target.timeout
        ))
        .into());
    }
    Ok(Collect {
        timeout: Duration::from_secs_f64(target.timeout),
        limit: destination(target).map(|d| d.len()),
    })
}

/// Sends `method` and waits for the replies; no reply at all is a failure naming who was asked.
async fn call(
    app: &App,
    method: &str,
    arguments: Map<String, Value>,
    target: &ControlTarget,
) -> anyhow::Result<Vec<Reply>> {
    let collect = collect(target)?;
    let mut request = Request::new(method, arguments);
    request.destination = destination(target);
    let replies = app.mailbox.broadcast(request, Some(collect)).await?;
    if replies.is_empty() {
        let who = match &target.destination {
            d if d.is_empty() => "no worker".to_owned(),
            d => format!("none of {}", d.join(", ")),
        };
        return Err(Failed(format!(
            "{who} answered `{method}` within {} s (is a worker running? raise --timeout for busy ones)",
            target.timeout
        ))
        .into());
    }
    Ok(replies)
}

fn text_of(reply: &Value) -> String {
    match reply {
        Value::Object(map)
            if map.len() == 1 && (map.contains_key("ok") || map.contains_key("error")) =>
        {
            match (map.get("ok"), map.get("error")) {
                (Some(ok), _) => ok.as_str().map_or_else(|| ok.to_string(), str::to_owned),
                (_, Some(err)) => format!(
                    "error: {}",
                    err.as_str().map_or_else(|| err.to_string(), str::to_owned)
                ),
                _ => reply.to_string(),
            }
        }
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// Prints replies as `{node: reply}` (JSON) or one row per node.
fn print(replies: &[Reply], format: OutputFormat, cell: impl Fn(&Value) -> String) {
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&as_object(replies)).unwrap_or_default()
        ),
        OutputFormat::Table => {
            let mut table = super::table(["worker", "reply"]);
            for (node, reply) in sorted(replies) {
                table.add_row([node.clone(), cell(reply)]);
            }
            println!("{table}");
        }
    }
}

fn as_object(replies: &[Reply]) -> Value {
    Value::Object(replies.iter().cloned().collect())
}

fn sorted(replies: &[Reply]) -> Vec<&Reply> {
    let mut sorted: Vec<&Reply> = replies.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted
}

fn print_inspection(method: &str, replies: &[Reply], format: OutputFormat) {
    if format == OutputFormat::Json {
        return print(replies, format, text_of);
    }
    let str_of = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    match method {
        "active" | "reserved" | "scheduled" => {
            let mut table = super::table(["worker", "task id", "task", "args", "started / eta"]);
            for (node, reply) in sorted(replies) {
                for item in reply.as_array().into_iter().flatten() {
                    let request = item.get("request").unwrap_or(item);
                    let when = match item.get("eta") {
                        Some(eta) => str_of(eta),
                        None => request
                            .get("time_start")
                            .and_then(Value::as_f64)
                            .and_then(|t| {
                                chrono::DateTime::from_timestamp_millis((t * 1000.0) as i64)
                            })
                            .map_or_else(
                                || "-".to_owned(),
                                |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
                            ),
                    };
                    table.add_row([
                        node.clone(),
                        request.get("id").map(str_of).unwrap_or_default(),
                        request.get("name").map(str_of).unwrap_or_default(),
                        request
                            .get("args")
                            .map(|a| a.to_string())
                            .unwrap_or_default(),
                        when,
                    ]);
                }
            }
            println!("{table}");
            let total: usize = replies
                .iter()
                .map(|(_, r)| r.as_array().map_or(0, Vec::len))
                .sum();
            say!("{total} {method} task(s) on {} worker(s)", replies.len());
        }
        "registered" | "revoked" => {
            let mut table = super::table([
                "worker",
                if method == "registered" {
                    "tasks"
                } else {
                    "revoked task ids"
                },
            ]);
            for (node, reply) in sorted(replies) {
                let items: Vec<String> =
                    reply.as_array().into_iter().flatten().map(str_of).collect();
                table.add_row([
                    node.clone(),
                    if items.is_empty() {
                        "-".to_owned()
                    } else {
                        items.join("\n")
                    },
                ]);
            }
            println!("{table}");
        }
        "active_queues" => {
            let mut table = super::table(["worker", "queues"]);
            for (node, reply) in sorted(replies) {
                let names: Vec<String> = reply
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|q| q.get("name").map(str_of))
                    .collect();
                table.add_row([node.clone(), names.join(", ")]);
            }
            println!("{table}");
        }
        "stats" => {
            let mut table = super::table([
                "worker",
                "pid",
                "uptime (s)",
                "concurrency",
                "tasks run",
                "prefetch",
            ]);
            for (node, reply) in sorted(replies) {
                let processed: u64 = reply
                    .get("total")
                    .and_then(Value::as_object)
                    .map_or(0, |t| t.values().filter_map(Value::as_u64).sum());
                table.add_row([
                    node.clone(),
                    reply.get("pid").map(str_of).unwrap_or_default(),
                    reply.get("uptime").map(str_of).unwrap_or_default(),
                    reply
                        .pointer("/pool/max-concurrency")
                        .map(str_of)
                        .unwrap_or_default(),
                    processed.to_string(),
                    reply.get("prefetch_count").map(str_of).unwrap_or_default(),
                ]);
            }
            println!("{table}");
        }
        "report" => {
            for (node, reply) in sorted(replies) {
                say!("{node}:{}", text_of(reply));
            }
        }
        _ => print(replies, format, |reply| {
            serde_json::to_string_pretty(reply).unwrap_or_default()
        }),
    }
}

/// Spec C.9 `shutdown_worker`: warm, or immediate (stop consuming, terminate what runs, then
/// shut down).
async fn shutdown(
    app: &App,
    hostname: &str,
    queues: Vec<String>,
    immediate: bool,
    timeout: f64,
) -> anyhow::Result<()> {
    let target = ControlTarget {
        destination: vec![hostname.to_owned()],
        timeout,
        format: OutputFormat::Table,
    };
    if immediate {
        let queues = if queues.is_empty() {
            let replies = call(app, "active_queues", Map::new(), &target).await?;
            replies
                .iter()
                .flat_map(|(_, r)| r.as_array().cloned().unwrap_or_default())
                .filter_map(|q| q.get("name").and_then(Value::as_str).map(str::to_owned))
                .collect()
        } else {
            queues
        };
        for queue in &queues {
            let mut arguments = Map::new();
            arguments.insert("queue".into(), json!(queue));
            let replies = call(app, "cancel_consumer", arguments, &target).await?;
            for (node, reply) in &replies {
                say!("{node}: {}", text_of(reply));
            }
        }
        let active = call(app, "active", Map::new(), &target).await?;
        let ids: Vec<String> = active
            .iter()
            .flat_map(|(_, r)| r.as_array().cloned().unwrap_or_default())
            .filter_map(|t| t.get("id").and_then(Value::as_str).map(str::to_owned))
            .collect();
        if !ids.is_empty() {
            let replies = crate::control::revoke(
                app,
                &ids,
                true,
                Some(target.destination.clone()),
                Some(collect(&target)?),
            )
            .await?;
            for (node, reply) in &replies {
                say!("{node}: {}", text_of(reply));
            }
        }
    }
    let mut request = Request::new("shutdown", Map::new());
    request.destination = Some(target.destination.clone());
    app.mailbox.broadcast(request, None).await?;
    say!(
        "asked {hostname} to shut down{}",
        if immediate {
            " (its running steps were terminated)"
        } else {
            " (its running steps finish first)"
        }
    );
    Ok(())
}

//! `workers queue dead-letters`: the messages the embedded queue kept aside because they can
//! never run; `workers queue delete`: the queue deleted from RabbitMQ (spec C.9).

use std::process::ExitCode;

use serde_json::{Value, json};

use super::Usage;
use crate::app::App;
use crate::broker::DeadLetter;
use crate::cli::{OutputFormat, QueueCommand};

pub(super) async fn run(app: &App, cmd: QueueCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        QueueCommand::Delete { yes } => {
            let queue = format!("{}.q", app.settings.app_id);
            if !yes {
                return Err(Usage(format!(
                    "deleting the queue `{queue}` drops every message in it (the steps of \
                     running workflows: `workers jobs run reconcile` queues them again); run \
                     again with --yes to delete it"
                ))
                .into());
            }
            let Some(messages) = app.broker.delete_queue(&queue).await? else {
                return Err(Usage(format!(
                    "the `{}` broker has no queue to delete: its messages live in the database \
                     (sqlite.path), declared with no arguments that could change",
                    app.settings.backends.broker.as_str()
                ))
                .into());
            };
            say!(
                "deleted the queue `{queue}` ({messages} messages); workers declare it again when they start"
            );
        }
        QueueCommand::DeadLetters { format } => {
            let Some(letters) = app.broker.dead_letters().await? else {
                return Err(Usage(format!(
                    "the `{}` broker keeps no dead letters of its own: with RabbitMQ, a message \
                     that cannot run is logged and removed, or rejected to the queue's \
                     dead-letter exchange when amqp.dead_letter_exchange is set",
                    app.settings.backends.broker.as_str()
                ))
                .into());
            };
            match format {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&letters.iter().map(to_json).collect::<Vec<_>>())?
                ),
                OutputFormat::Table => {
                    let mut table = super::table([
                        "put aside",
                        "task id",
                        "task",
                        "queue",
                        "retries",
                        "reason",
                    ]);
                    for letter in &letters {
                        table.add_row([
                            letter.dead_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                            letter.task_id.clone(),
                            letter.task.clone(),
                            letter.queue.clone(),
                            letter.retries.to_string(),
                            letter.reason.clone(),
                        ]);
                    }
                    println!("{table}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The row as it was queued; args and kwargs as the text stored, since they may not be JSON.
fn to_json(letter: &DeadLetter) -> Value {
    json!({
        "task_id": letter.task_id,
        "task": letter.task,
        "queue": letter.queue,
        "args": letter.args,
        "kwargs": letter.kwargs,
        "priority": letter.priority,
        "eta": letter.eta.map(|t| t.to_rfc3339()),
        "retries": letter.retries,
        "root_id": letter.root_id,
        "parent_id": letter.parent_id,
        "reason": letter.reason,
        "dead_at": letter.dead_at.to_rfc3339(),
    })
}

//! `workers worker`: runs steps from the queue until stopped (or idle with --until-idle).
//! SIGTERM or SIGINT drains it: no new steps, running ones get a grace period, exit 0.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::stop_on_signals;
use crate::app::App;
use crate::cli::WorkerArgs;
use crate::ui::Display;
use crate::workflow::worker::{self, Until, WorkerOptions};

pub(super) async fn run(app: &Arc<App>, args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let concurrency = args
        .concurrency
        .unwrap_or(app.settings.worker.concurrency)
        .max(1);
    let until = if args.until_idle {
        Until::Idle
    } else {
        Until::Shutdown
    };
    let queues = args
        .queues
        .unwrap_or_else(|| app.settings.amqp.queues.clone());
    let node_name = worker::node_name(
        args.hostname.as_deref().unwrap_or("workers@%h"),
        &app.identity.hostname,
    );
    let shutdown_grace = Duration::from_secs(app.settings.worker.shutdown_grace_seconds);
    let _metrics = match app.settings.prometheus_listen {
        Some(addr) => Some(crate::metrics::serve(addr).await?),
        None => None,
    };
    info!(concurrency, queues = %queues.join(","), node = %node_name, pid = app.identity.pid, "Worker started.");
    let opts = WorkerOptions {
        concurrency,
        until,
        queues: Some(queues),
        shutdown_grace,
        node_name,
        send_events: args.events || app.settings.worker.send_events,
    };
    let stop = stop_on_signals(&format!(
        "Stopping: no new steps are taken; running steps get {} s to finish.",
        shutdown_grace.as_secs()
    ));
    worker::run(Arc::clone(app), opts, stop, Display::new(false)).await?;
    info!("Worker stopped.");
    Ok(ExitCode::SUCCESS)
}

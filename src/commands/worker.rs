//! `workers worker`: runs steps from the queue until stopped (or idle with --until-idle).

use std::process::ExitCode;
use std::sync::Arc;

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
    info!(concurrency, hostname = %app.identity.hostname, pid = app.identity.pid, "Worker started.");
    worker::run(
        Arc::clone(app),
        WorkerOptions { concurrency, until },
        stop_on_signals(),
        Display::new(false),
    )
    .await?;
    info!("Worker stopped.");
    Ok(ExitCode::SUCCESS)
}

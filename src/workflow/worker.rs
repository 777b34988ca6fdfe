//! The worker loop: a fixed number of slots, each taking one message from the broker and
//! running it through the engine.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info};

use super::engine;
use crate::app::App;
use crate::store::WorkflowFilter;
use crate::ui::Display;

/// When the loop ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Only on shutdown.
    Shutdown,
    /// When no workflow in the store is active and no step runs here (`--wait`).
    Idle,
}

#[derive(Debug, Clone, Copy)]
pub struct WorkerOptions {
    pub concurrency: usize,
    pub until: Until,
}

/// How often a `Until::Idle` loop looks for stalled workflows to repair.
const REPAIR_EVERY: Duration = Duration::from_secs(30);

/// Runs steps until `opts.until` or until `stop` turns true. A stop interrupts running steps;
/// their messages go back to the broker and run again later, here or elsewhere.
pub async fn run(
    app: Arc<App>,
    opts: WorkerOptions,
    mut stop: watch::Receiver<bool>,
    display: Display,
) -> anyhow::Result<()> {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = watch::channel(false);
    let mut slots = Vec::new();
    for slot in 0..opts.concurrency.max(1) {
        let (app, display, in_flight) = (Arc::clone(&app), display.clone(), Arc::clone(&in_flight));
        let (mut stop, mut done) = (stop.clone(), done_rx.clone());
        slots.push(tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    _ = done.wait_for(|d| *d) => break,
                    delivery = app.broker.next() => delivery,
                };
                let delivery = match delivery {
                    Ok(delivery) => delivery,
                    Err(err) => {
                        error!(slot, error = %format!("{err:#}"), "Could not take a step from the broker.");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                in_flight.fetch_add(1, Ordering::SeqCst);
                let handled = tokio::select! {
                    handled = engine::handle(&app, delivery, &display) => handled,
                    // Dropping the handler drops the delivery unacknowledged: it is delivered
                    // again once this process is gone.
                    _ = stop.wait_for(|s| *s) => Ok(()),
                };
                in_flight.fetch_sub(1, Ordering::SeqCst);
                if let Err(err) = handled {
                    error!(slot, error = %format!("{err:#}"), "Could not record a step; it will be delivered again.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }));
    }

    if opts.until == Until::Idle {
        let mut last_repair: Option<tokio::time::Instant> = None;
        loop {
            if last_repair.is_none_or(|t| t.elapsed() >= REPAIR_EVERY) {
                let repaired = engine::repair_stalled(&app).await?;
                if !repaired.is_empty() {
                    info!(workflows = repaired.len(), "Repaired stalled workflows.");
                }
                last_repair = Some(tokio::time::Instant::now());
            }
            let active = app.store.workflows(WorkflowFilter::Active, 1).await?;
            if active.is_empty() && in_flight.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        let _ = done_tx.send(true);
    }
    for slot in slots {
        let _ = slot.await;
    }
    Ok(())
}

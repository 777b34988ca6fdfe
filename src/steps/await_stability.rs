//! `await_stability` (spec B.1): waits until nothing under the dataset has changed for the
//! recency threshold, then marks the dataset READY.
//!
//! Unlike the original, a missing origin path fails the step instead of marking the dataset
//! READY, each check is a parallel, streaming walk on the CPU pool, and the wait always ends:
//! a file dated in the future (a wrong instrument clock) counts as changed when its time or the
//! number of such files was last seen to change, not at its own time; and a dataset still
//! changing after `registration.max_stability_wait_seconds` fails the step, naming its newest
//! file.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use serde_json::json;
use tracing::{debug, warn};

use super::{StepContext, StepError, StepResult, existing_origin, returns_dataset};
use crate::compute::walk::newest_change;
use crate::model::DatasetState;

/// Change times this far ahead of this host's clock are still taken as they are (clocks of
/// file servers and hosts differ by a little).
const CLOCK_TOLERANCE: Duration = Duration::from_secs(60);

fn timestamp(time: SystemTime) -> String {
    DateTime::<Utc>::from(time)
        .format("%Y-%m-%dT%H:%M:%S%.6f")
        .to_string()
}

pub async fn run(ctx: &StepContext) -> StepResult {
    let dataset = ctx.dataset().await?;
    let origin = existing_origin(&dataset, "ValidationFailed").await?;
    let settings = &ctx.env.settings.registration;
    // Start kwargs (`recency_threshold`, `wait_seconds`, `max_wait_seconds`) win over the
    // configuration.
    let threshold = ctx
        .kwarg_u64("recency_threshold")
        .map(Duration::from_secs)
        .unwrap_or(settings.recency_threshold);
    let wait = ctx
        .kwarg_u64("wait_seconds")
        .map(Duration::from_secs)
        .unwrap_or(settings.wait_between_stability_checks);
    let max_wait = match ctx.kwarg_u64("max_wait_seconds") {
        Some(0) => None,
        Some(secs) => Some(Duration::from_secs(secs)),
        None => settings.max_stability_wait,
    };
    let started = Instant::now();
    // Files dated in the future: their (newest time, count) when last seen to change, and when.
    let mut future_seen: Option<(SystemTime, u64)> = None;
    let mut future_changed_at = SystemTime::now();
    let mut warned: HashSet<PathBuf> = HashSet::new();
    loop {
        let root = origin.clone();
        let future_after = SystemTime::now() + CLOCK_TOLERANCE;
        let summary = ctx
            .compute(move |cancel| newest_change(&root, future_after, cancel))
            .await?
            .map_err(|err| {
                if crate::cancel::is_cancelled(&err) {
                    StepError::cancelled()
                } else if err.kind() == std::io::ErrorKind::NotFound {
                    StepError::permanent(
                        "ValidationFailed",
                        anyhow::format_err!(
                            "origin path `{}` disappeared while waiting for it to be stable",
                            origin.display()
                        ),
                    )
                } else {
                    StepError::retryable(
                        anyhow::Error::new(err)
                            .context(format!("cannot walk `{}`", origin.display())),
                    )
                }
            })?;
        if summary.unreadable > 0 {
            warn!(
                unreadable = summary.unreadable,
                "Some directories could not be read while checking for changes."
            );
        }
        let now = SystemTime::now();
        let mut newest = summary.newest.unwrap_or(now);
        let mut newest_path = summary.newest_path.clone();
        if let Some((time, path)) = &summary.future_newest {
            if warned.insert(path.clone()) {
                warn!(path = %path.display(), modified = %timestamp(*time),
                    "A file is dated in the future; the dataset counts as stable once such files stop changing.");
            }
            let signature = (*time, summary.future_entries);
            if future_seen != Some(signature) {
                future_seen = Some(signature);
                future_changed_at = now;
            }
            if future_changed_at >= newest {
                newest = future_changed_at;
                newest_path = Some(path.clone());
            }
        }
        let quiet_for = now.duration_since(newest).unwrap_or_default();
        let remaining = threshold.saturating_sub(quiet_for);
        ctx.progress.report_custom(json!({
            "name": timestamp(newest),
            "time_remaining_sec": remaining.as_secs_f64(),
        }));
        debug!(
            entries = summary.entries,
            quiet_seconds = quiet_for.as_secs_f64(),
            "Checked for changes."
        );
        if quiet_for > threshold {
            break;
        }
        if let Some(max_wait) = max_wait
            && started.elapsed() >= max_wait
        {
            return Err(StepError::permanent(
                "ValidationFailed",
                anyhow::format_err!(
                    "dataset {} (`{}`) was still changing after {} s of waiting \
                     (registration.max_stability_wait_seconds): the newest change is `{}` at {}",
                    dataset.id,
                    dataset.name,
                    max_wait.as_secs(),
                    newest_path.as_deref().unwrap_or(&origin).display(),
                    timestamp(newest),
                ),
            ));
        }
        // Sleeping past the point where the data would be old enough only delays the step.
        let mut pause = wait.min(remaining + Duration::from_millis(50));
        if let Some(max_wait) = max_wait {
            pause =
                pause.min(max_wait.saturating_sub(started.elapsed()) + Duration::from_millis(50));
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = ctx.cancel.cancelled() => return Err(StepError::cancelled()),
        }
    }
    ctx.env
        .registry
        .add_state(ctx.dataset_id, DatasetState::Ready)
        .await?;
    Ok(returns_dataset(ctx.dataset_id))
}

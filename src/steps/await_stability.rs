//! `await_stability` (spec B.1): waits until nothing under the dataset has changed for the
//! recency threshold, then marks the dataset READY.
//!
//! Unlike the original, a missing origin path fails the step instead of marking the dataset
//! READY, and each check is a parallel, streaming walk on the CPU pool.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde_json::json;
use tracing::{debug, warn};

use super::{StepContext, StepError, StepResult, existing_origin, returns_dataset};
use crate::compute::walk::newest_change;
use crate::model::DatasetState;

pub async fn run(ctx: &StepContext) -> StepResult {
    let dataset = ctx.dataset().await?;
    let origin = existing_origin(&dataset, "ValidationFailed")?;
    let settings = &ctx.app.settings.registration;
    // Start kwargs (`recency_threshold`, `wait_seconds`) win over the configuration.
    let threshold = ctx
        .kwarg_u64("recency_threshold")
        .map(Duration::from_secs)
        .unwrap_or(settings.recency_threshold);
    let wait = ctx
        .kwarg_u64("wait_seconds")
        .map(Duration::from_secs)
        .unwrap_or(settings.wait_between_stability_checks);
    loop {
        let root = origin.clone();
        let summary = ctx
            .app
            .pool
            .run(move || newest_change(&root))
            .await
            .map_err(|err| {
                if err.kind() == std::io::ErrorKind::NotFound {
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
        let newest = summary.newest.unwrap_or(now);
        let quiet_for = now.duration_since(newest).unwrap_or_default();
        let remaining = threshold.saturating_sub(quiet_for);
        ctx.progress.report_custom(json!({
            "name": DateTime::<Utc>::from(newest).format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
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
        // Sleeping past the point where the data would be old enough only delays the step.
        tokio::time::sleep(wait.min(remaining + Duration::from_millis(50))).await;
    }
    ctx.app
        .registry
        .add_state(ctx.dataset_id, DatasetState::Ready)
        .await?;
    Ok(returns_dataset(ctx.dataset_id))
}

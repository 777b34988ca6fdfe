//! Failure injection for the tests of how failures are handled, compiled only with the
//! `failpoints` feature (`scripts/test.sh` enables it): a release build has no such code path.
//! Hand-written rather than the `fail` crate because a job's injected sleep must end when the
//! job is cancelled, and `fail`'s sleep blocks the thread.

use std::time::Duration;

use crate::cancel::CancellationToken;
use crate::names::JobName;

/// Failure injection for testing how failures are handled, from `WORKERS_FAILPOINTS`, e.g.
/// `metrics=panic,watch=sleep(2000),reconcile=error`. Unset in normal operation.
pub async fn job(job: JobName, cancel: &CancellationToken) -> anyhow::Result<()> {
    let Ok(spec) = std::env::var("WORKERS_FAILPOINTS") else {
        return Ok(());
    };
    for entry in spec.split(',') {
        let Some((name, action)) = entry.trim().split_once('=') else {
            continue;
        };
        if name != job.name() {
            continue;
        }
        if action == "panic" {
            panic!("failpoint: {job} panics");
        } else if action == "error" {
            anyhow::bail!("failpoint: {job} fails");
        } else if let Some(ms) = action
            .strip_prefix("sleep(")
            .and_then(|a| a.strip_suffix(')'))
        {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))) => {}
                () = cancel.cancelled() => return Err(crate::jobs::Interrupted.into()),
            }
        }
    }
    Ok(())
}

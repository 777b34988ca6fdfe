//! `noop`: returns `[dataset_id]` and touches nothing else. It measures the cost of the
//! machinery around a step (benchmarks) and checks that Python and Rust workers exchange
//! messages (interoperability tests), as the `noop` task of the captured fixtures does. With a
//! number of seconds as its second argument it holds its step that long first, cancellably,
//! for drills and tests of pausing, revoking and stopping (`start(dataset_id, 30)`).

use std::time::Duration;

use super::{StepContext, StepError, StepResult, returns_dataset};

/// Longest hold `noop` accepts, so that a mistyped argument cannot hold a slot for days.
const MAX_HOLD: Duration = Duration::from_secs(24 * 3600);

pub async fn run(ctx: &StepContext) -> StepResult {
    if let Some(seconds) = ctx.args.get(1).and_then(serde_json::Value::as_f64)
        && seconds.is_finite()
        && seconds > 0.0
    {
        let hold = Duration::from_secs_f64(seconds).min(MAX_HOLD);
        tokio::select! {
            () = tokio::time::sleep(hold) => {}
            () = ctx.cancel.cancelled() => return Err(StepError::cancelled()),
        }
    }
    Ok(returns_dataset(ctx.dataset_id))
}

//! `noop`: returns `[dataset_id]` and touches nothing else. It measures the cost of the
//! machinery around a step (benchmarks) and checks that Python and Rust workers exchange
//! messages (interoperability tests), as the `noop` task of the captured fixtures does.

use super::{StepContext, StepResult, returns_dataset};

pub async fn run(ctx: &StepContext) -> StepResult {
    Ok(returns_dataset(ctx.dataset_id))
}

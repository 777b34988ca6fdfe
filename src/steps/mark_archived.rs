//! `mark_archived_and_delete` (spec B.8): records a dataset as archived at the path the
//! archive path formula gives (spec D.1), then removes its staged bundle and its origin
//! directory.
//!
//! The original hard-codes `archive/2023/raw_data/{name}.tar` whatever the year and type; here
//! the path is the one `archive_dataset` would have used. As in the original, a removal that
//! fails does not fail the step (the record is already written and true), but each one is
//! logged as a warning naming the path left behind.

use std::path::PathBuf;

use tracing::{info, warn};

use super::{StepContext, StepResult, returns_dataset, staged_bundle_path};
use crate::model::DatasetState;
use crate::registry::DatasetPatch;

pub async fn run(ctx: &StepContext) -> StepResult {
    let env = &ctx.env;
    let dataset = ctx.dataset().await?;
    let archive_path = super::archive::archive_path_of(ctx, &dataset);
    env.registry
        .update(
            dataset.id,
            &DatasetPatch {
                archive_path: Some(Some(archive_path.clone())),
                ..DatasetPatch::default()
            },
        )
        .await?;
    env.registry
        .add_state(dataset.id, DatasetState::Archived)
        .await?;
    info!(archive_path = %archive_path, "Recorded the dataset as archived.");

    let bundle = staged_bundle_path(env, &dataset);
    let origin = dataset.origin_path.clone().map(PathBuf::from);
    for path in std::iter::once(bundle).chain(origin) {
        // Symbolic links resolved as the original does (`Path.resolve`): the tree removed is
        // the one the origin path leads to.
        let shown = path.clone();
        let resolved = crate::compute::blocking(move || std::fs::canonicalize(&path)).await;
        let Ok(resolved) = resolved else {
            // Nothing there: already removed by an earlier attempt.
            continue;
        };
        let target = resolved.clone();
        match ctx
            .compute(move |cancel| crate::compute::remove_tree(&target, cancel))
            .await?
        {
            Ok(()) => info!(path = %resolved.display(), "Removed."),
            Err(_) if ctx.cancel.is_cancelled() => return Err(super::StepError::cancelled()),
            Err(err) => warn!(
                path = %shown.display(),
                error = %err,
                "Could not remove it; the dataset is recorded as archived and the files are left in place."
            ),
        }
    }
    Ok(returns_dataset(dataset.id))
}

//! `delete_dataset` (spec B.7, the `delete` workflow) and `delete_source` (spec B.8).

use tracing::info;

use super::{StepContext, StepResult, returns_dataset};
use crate::model::{DatasetName, DatasetState};
use crate::registry::DatasetPatch;

/// Removes the archived bundle, renames the dataset to `{name}-{id}` (freeing its name) and
/// marks it deleted.
pub async fn run_delete_dataset(ctx: &StepContext) -> StepResult {
    let env = &ctx.env;
    let dataset = ctx.dataset().await?;
    if let Some(archive_path) = &dataset.archive_path {
        let removed = env.archive.delete(archive_path).await?;
        info!(archive_path = %archive_path, removed, "Removed the archived bundle.");
    }
    let mut patch = DatasetPatch {
        archive_path: Some(None),
        is_deleted: Some(true),
        ..DatasetPatch::default()
    };
    // Run again after a crash, the rename must not append the id twice.
    if !dataset.is_deleted {
        patch.name = Some(DatasetName::from_stored(format!(
            "{}-{}",
            dataset.name, dataset.id
        )));
    }
    env.registry.update(dataset.id, &patch).await?;
    env.registry
        .add_state(dataset.id, DatasetState::Deleted)
        .await?;
    Ok(returns_dataset(dataset.id))
}

/// Removes the dataset's origin directory (symbolic links resolved, read-only directories
/// included), if it still exists.
pub async fn run_delete_source(ctx: &StepContext) -> StepResult {
    let dataset = ctx.dataset().await?;
    if let Some(origin) = dataset.origin_path.clone() {
        let resolved = crate::compute::blocking(move || std::fs::canonicalize(origin)).await;
        if let Ok(resolved) = resolved {
            let path = resolved.clone();
            ctx.compute(move |cancel| crate::compute::remove_tree(&path, cancel))
                .await?
                .map_err(|err| {
                    anyhow::Error::new(err)
                        .context(format!("cannot remove `{}`", resolved.display()))
                })?;
            info!(origin = %resolved.display(), "Removed the dataset's source directory.");
        }
    }
    Ok(returns_dataset(dataset.id))
}

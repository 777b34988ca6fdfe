//! `stage_dataset` (spec B.4): fetches the bundle from the archive, verifies its MD5 and
//! extracts it under the stage alias.
//!
//! The bundle's MD5 is computed while it is fetched. Extraction goes through a safety filter
//! (no absolute paths, no `..`, no links leaving the tree) into a temporary directory that is
//! renamed into place only when everything was extracted, so no partial tree is ever left.
//! A checksum mismatch or a hostile bundle fails at once: fetching the same bytes again would
//! not change the outcome (the original retried mismatches, spec J.11).

use anyhow::Context;
use tracing::info;

use super::{StepContext, StepError, StepResult, returns_dataset, stage_alias, staged_bundle_path};
use crate::compute::extract::extract_bundle;
use crate::model::DatasetState;
use crate::registry::DatasetPatch;

fn failed(err: anyhow::Error) -> StepError {
    StepError::permanent("ValidationFailed", err)
}

pub async fn run(ctx: &StepContext) -> StepResult {
    let app = &ctx.app;
    let dataset = ctx.dataset().await?;
    let (Some(archive_path), Some(bundle)) = (dataset.archive_path.clone(), dataset.bundle.clone())
    else {
        return Err(failed(anyhow::format_err!(
            "dataset {} (`{}`) has not been archived",
            dataset.id,
            dataset.name
        )));
    };
    // A recorded alias is reused, so download links stay stable across stagings.
    let alias = match dataset.stage_alias() {
        Some(alias) => alias.to_owned(),
        None => stage_alias(
            dataset.id,
            &dataset.name,
            app.settings.stage.alias_salt.expose(),
        ),
    };
    let paths = app.settings.paths.for_type(dataset.dataset_type);
    std::fs::create_dir_all(&paths.stage)
        .with_context(|| format!("cannot create `{}`", paths.stage.display()))?;
    let stage_root = std::fs::canonicalize(&paths.stage)
        .with_context(|| format!("cannot resolve `{}`", paths.stage.display()))?;
    let alias_dir = stage_root.join(&alias);
    let staging_dir = alias_dir.join(dataset.name.as_str());
    let local_bundle = staged_bundle_path(app, &dataset);
    if let Some(parent) = local_bundle.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create `{}`", parent.display()))?;
    }

    let fetched_md5 = app
        .archive
        .get(&archive_path, &local_bundle, &ctx.progress)
        .await?;
    if fetched_md5 != bundle.md5 {
        let _ = std::fs::remove_file(&local_bundle);
        return Err(failed(anyhow::format_err!(
            "checksum mismatch: `{archive_path}` has MD5 {fetched_md5}, but the bundle was archived with MD5 {}",
            bundle.md5
        )));
    }

    std::fs::create_dir_all(&alias_dir)
        .with_context(|| format!("cannot create `{}`", alias_dir.display()))?;
    if staging_dir.symlink_metadata().is_ok() {
        // A previous staging (or an interrupted one that got as far as the rename): removing a
        // large tree is disk work, so it runs on the pool.
        let previous = staging_dir.clone();
        app.pool
            .run(move || std::fs::remove_dir_all(&previous))
            .await
            .with_context(|| {
                format!(
                    "cannot remove the previous staging `{}`",
                    staging_dir.display()
                )
            })?;
    }
    ctx.progress.start("extract", "bytes", Some(bundle.size));
    let (source, dest, progress) = (
        local_bundle.clone(),
        staging_dir.clone(),
        ctx.progress.clone(),
    );
    let extracted = app
        .pool
        .run(move || extract_bundle(&source, &dest, &|n| progress.add(n)))
        .await;
    let summary = match extracted {
        Ok(summary) => summary,
        Err(err) => {
            let retryable = err.is_retryable();
            let err = anyhow::Error::new(err)
                .context(format!("cannot extract `{}`", local_bundle.display()));
            if retryable {
                return Err(StepError::retryable(err));
            }
            // A bundle that cannot be extracted safely must not stay up for download.
            let _ = std::fs::remove_file(&local_bundle);
            return Err(failed(err));
        }
    };

    ctx.progress.set_done(bundle.size);
    let staged_path = staging_dir.to_string_lossy().into_owned();
    app.registry
        .update(
            dataset.id,
            &DatasetPatch {
                staged_path: Some(Some(staged_path.clone())),
                metadata: Some(serde_json::json!({"stage_alias": alias})),
                ..DatasetPatch::default()
            },
        )
        .await?;
    app.registry
        .add_state(dataset.id, DatasetState::Fetched)
        .await?;
    info!(staged_path = %staged_path, files = summary.files, bytes = summary.bytes, "Staged the dataset.");
    Ok(returns_dataset(dataset.id))
}

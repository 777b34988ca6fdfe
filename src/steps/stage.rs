//! `stage_dataset` (spec B.4): fetches the bundle from the archive, verifies its MD5 and
//! extracts it under the stage alias.
//!
//! The bundle's MD5 is computed while it is fetched. Extraction goes through a safety filter
//! (no absolute paths, no `..`, no links leaving the tree) into a directory beside the staged
//! tree, unique to this attempt, which is synced and then swapped into place: until that swap
//! the previous staged copy and its download links stay exactly as they were, so a failed or
//! refused extraction leaves the dataset as it was recorded. The swap, the record (staged path,
//! FETCHED, and `is_staged` false until validate has checked the new copy) and the removal of
//! the replaced tree follow in that order. A checksum mismatch or a hostile bundle fails at
//! once: fetching the same bytes again would not change the outcome (the original retried
//! mismatches, spec J.11).

use std::path::PathBuf;

use anyhow::Context;
use tracing::{info, warn};

use super::{
    StepContext, StepError, StepResult, capacity, returns_dataset, stage_alias, staged_bundle_path,
};
use crate::compute::extract::{ExtractError, ExtractOptions, extract_bundle};
use crate::compute::{blocking, remove_tree};
use crate::model::DatasetState;
use crate::registry::DatasetPatch;

pub async fn run(ctx: &StepContext) -> StepResult {
    let env = &ctx.env;
    let dataset = ctx.dataset().await?;
    let (Some(archive_path), Some(bundle)) = (dataset.archive_path.clone(), dataset.bundle.clone())
    else {
        return Err(StepError::validation(anyhow::format_err!(
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
            env.settings.stage.alias_salt.expose(),
        ),
    };
    let paths = env.settings.paths.for_type(dataset.dataset_type);
    let local_bundle = staged_bundle_path(env, &dataset);
    // The fetched bundle stays beside the staged tree (setup_download links both); held until
    // the step ends, when both are in place and show in the free space.
    let tree = dataset.du_size.max(dataset.size).unwrap_or(bundle.size);
    let _space = capacity::admit(
        ctx,
        vec![
            capacity::Need {
                dir: local_bundle
                    .parent()
                    .map_or_else(|| paths.stage.clone(), PathBuf::from),
                bytes: bundle.size,
            },
            capacity::Need {
                dir: paths.stage.clone(),
                bytes: tree,
            },
        ],
        true,
    )
    .await?;
    let (stage_dir, alias_name, bundle_dir) = (
        paths.stage.clone(),
        alias.clone(),
        local_bundle.parent().map(PathBuf::from),
    );
    let alias_dir = blocking(move || -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(&stage_dir)
            .with_context(|| format!("cannot create `{}`", stage_dir.display()))?;
        let stage_root = std::fs::canonicalize(&stage_dir)
            .with_context(|| format!("cannot resolve `{}`", stage_dir.display()))?;
        if let Some(dir) = bundle_dir {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create `{}`", dir.display()))?;
        }
        let alias_dir = stage_root.join(alias_name);
        std::fs::create_dir_all(&alias_dir)
            .with_context(|| format!("cannot create `{}`", alias_dir.display()))?;
        Ok(alias_dir)
    })
    .await?;
    let staging_dir = alias_dir.join(dataset.name.as_str());

    let fetched_md5 = env
        .archive
        .get(&archive_path, &local_bundle, &ctx.progress, &ctx.cancel)
        .await?;
    if fetched_md5 != bundle.md5 {
        let fetched = local_bundle.clone();
        let _ = blocking(move || std::fs::remove_file(fetched)).await;
        return Err(StepError::validation(anyhow::format_err!(
            "checksum mismatch: `{archive_path}` has MD5 {fetched_md5}, but the bundle was archived with MD5 {}",
            bundle.md5
        )));
    }

    ctx.progress.start("extract", "bytes", Some(bundle.size));
    let opts = ExtractOptions {
        modes: env.settings.stage.modes,
        sync: true,
    };
    let (source, dest, progress) = (
        local_bundle.clone(),
        staging_dir.clone(),
        ctx.progress.clone(),
    );
    let extracted = ctx
        .compute(move |cancel| extract_bundle(&source, &dest, &opts, &|n| progress.add(n), cancel))
        .await?;
    let extracted = match extracted {
        Ok(extracted) => extracted,
        Err(ExtractError::Cancelled) => return Err(StepError::cancelled()),
        Err(err) => {
            let retryable = err.is_retryable();
            let err = anyhow::Error::new(err)
                .context(format!("cannot extract `{}`", local_bundle.display()));
            if retryable {
                return Err(StepError::retryable(err));
            }
            // A bundle that cannot be extracted safely must not stay up for download, unless a
            // previous staging still serves it (its tree is unchanged and its link points here).
            if !dataset.is_staged {
                let refused = local_bundle.clone();
                let _ = blocking(move || std::fs::remove_file(refused)).await;
            }
            return Err(StepError::validation(err));
        }
    };

    ctx.progress.set_done(bundle.size);
    let staged_path = staging_dir.to_string_lossy().into_owned();
    env.registry
        .update(
            dataset.id,
            &DatasetPatch {
                staged_path: Some(Some(staged_path.clone())),
                // The new copy is complete but not yet validated.
                is_staged: dataset.is_staged.then_some(false),
                metadata: Some(serde_json::json!({"stage_alias": alias})),
                ..DatasetPatch::default()
            },
        )
        .await?;
    env.registry
        .add_state(dataset.id, DatasetState::Fetched)
        .await?;
    if let Some(replaced) = extracted.replaced {
        let shown = replaced.display().to_string();
        let removed =
            blocking(move || remove_tree(&replaced, &crate::cancel::CancellationToken::new()))
                .await;
        if let Err(err) = removed {
            // A leftover of a dead attempt: the next staging of this dataset removes it.
            warn!(path = %shown, error = %err, "Could not remove the previous staged copy.");
        }
    }
    info!(staged_path = %staged_path, files = extracted.summary.files, bytes = extracted.summary.bytes, "Staged the dataset.");
    Ok(returns_dataset(dataset.id))
}

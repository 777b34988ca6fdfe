//! `archive_dataset` (spec B.3): writes the tar bundle, checks it against the inspection,
//! stores it in the archive and records it.
//!
//! The bundle is written by the `tar` crate and hashed while it is written, so it is never
//! read back to compute its MD5. Before anything is recorded, its members are compared with
//! the file rows inspect stored (count, paths and sizes; the total size where the registry
//! returns rows without sizes): a dataset that changed after it was inspected is not archived
//! under the old description.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use chrono::Datelike;
use tracing::info;

use super::{StepContext, StepError, StepResult, existing_origin, returns_dataset};
use crate::compute::bundle::{BundleSummary, write_bundle};
use crate::compute::walk::fingerprint_add;
use crate::model::{Bundle, DatasetState};
use crate::registry::{Dataset, DatasetPatch, FilePages};

/// Page size for reading file rows back from the registry.
const PAGE: usize = 10_000;

/// Differences listed when a bundle does not match the inspection.
const LISTED_DIFFERENCES: usize = 20;

fn failed(err: anyhow::Error) -> StepError {
    StepError::permanent("ValidationFailed", err)
}

pub async fn run(ctx: &StepContext) -> StepResult {
    let app = &ctx.app;
    let dataset = ctx.dataset().await?;
    let origin = existing_origin(&dataset, "ValidationFailed")?;
    let Some(num_files) = dataset.num_files else {
        return Err(failed(anyhow::format_err!(
            "dataset {} (`{}`) has not been inspected",
            dataset.id,
            dataset.name
        )));
    };
    let paths = app.settings.paths.for_type(dataset.dataset_type);
    let generate_dir = paths.bundle_generate.clone();
    std::fs::create_dir_all(&generate_dir)
        .with_context(|| format!("cannot create `{}`", generate_dir.display()))?;
    let bundle_path = generate_dir.join(dataset.name.bundle_file_name());

    ctx.progress.start("tar", "bytes", dataset.du_size);
    let (source, target, progress) = (origin.clone(), bundle_path.clone(), ctx.progress.clone());
    let summary = app
        .pool
        .run(move || write_bundle(&source, &target, &|n| progress.add(n)))
        .await
        .map_err(|err| {
            let retryable = err.is_retryable();
            let err =
                anyhow::Error::new(err).context(format!("cannot bundle `{}`", origin.display()));
            if retryable {
                StepError::retryable(err)
            } else {
                failed(err)
            }
        })?;

    if let Err(err) =
        check_against_inspection(ctx, &dataset, num_files, &summary, &bundle_path).await
    {
        let _ = std::fs::remove_file(&bundle_path);
        return Err(err);
    }

    // The year is taken when the bundle is archived, not when the process started (J.10).
    let archive_dir = paths
        .archive
        .replace("{year}", &chrono::Local::now().year().to_string());
    let archive_path = format!(
        "{}/{}",
        archive_dir.trim_end_matches('/'),
        dataset.name.bundle_file_name()
    );
    app.archive
        .put(&bundle_path, &archive_path, summary.md5, &ctx.progress)
        .await?;
    // The archive holds the bundle now; keeping the generated copy only fills the disk (J.10).
    if let Err(err) = std::fs::remove_file(&bundle_path)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %bundle_path.display(), error = %err, "Could not remove the generated bundle.");
    }

    let bundle = Bundle {
        name: dataset.name.bundle_file_name(),
        size: summary.size,
        md5: summary.md5,
    };
    app.registry
        .update(
            dataset.id,
            &DatasetPatch {
                archive_path: Some(Some(archive_path.clone())),
                bundle: Some(bundle),
                ..DatasetPatch::default()
            },
        )
        .await?;
    app.registry
        .add_state(dataset.id, DatasetState::Archived)
        .await?;
    info!(archive_path = %archive_path, bytes = summary.size, md5 = %summary.md5, "Archived the dataset.");
    Ok(returns_dataset(dataset.id))
}

/// Compares the bundle's members with the inspection: the counts, then an order-independent
/// fingerprint of every (path, size), so that no listing is held in memory. Only when they
/// differ are the details worked out, to name what changed.
///
/// A registry may return rows without sizes (the Bioloop API lists path and MD5 only). Then
/// the fingerprint covers the paths alone and the sizes are checked in total, against the
/// dataset's `size`, which inspect recorded as the sum of the same rows. Rows that carry their
/// sizes are always checked one by one.
async fn check_against_inspection(
    ctx: &StepContext,
    dataset: &Dataset,
    num_files: u64,
    summary: &BundleSummary,
    bundle_path: &Path,
) -> Result<(), StepError> {
    let mut rows = 0u64;
    let mut fingerprint = 0u64;
    let mut path_fingerprint = 0u64;
    let mut sizes_known = true;
    let mut pages = FilePages::new(ctx.app.registry.as_ref(), dataset.id, PAGE);
    while let Some(page) = pages.next().await? {
        for row in &page {
            match row.size {
                Some(size) => fingerprint = fingerprint_add(fingerprint, &row.path, size),
                None => sizes_known = false,
            }
            path_fingerprint = fingerprint_add(path_fingerprint, &row.path, 0);
        }
        rows += page.len() as u64;
    }
    let members = &summary.members;
    let directories = dataset.num_directories.unwrap_or(members.directories);
    let same_contents = if sizes_known {
        members.fingerprint == fingerprint
    } else {
        members.path_fingerprint == path_fingerprint && dataset.size == Some(members.bytes)
    };
    if rows == num_files
        && members.files == num_files
        && members.directories == directories
        && same_contents
    {
        return Ok(());
    }
    let differences = describe_differences(ctx, dataset, bundle_path).await;
    let bytes = if sizes_known {
        String::new()
    } else {
        format!(
            ", {} bytes of files against {} recorded",
            members.bytes,
            dataset
                .size
                .map_or_else(|| "none".to_owned(), |s| s.to_string())
        )
    };
    Err(failed(anyhow::format_err!(
        "bundle `{}` does not match the inspection of `{}`: the bundle has {} files and {} directories, \
         inspect recorded {} files ({} rows) and {} directories{bytes}{differences}; inspect the dataset again",
        bundle_path.display(),
        dataset.origin_path.as_deref().unwrap_or_default(),
        members.files,
        members.directories,
        num_files,
        rows,
        directories,
    )))
}

/// Names up to `LISTED_DIFFERENCES` paths whose presence or size differs between the bundle
/// and the inspection. Failure path only: it holds both listings in memory.
async fn describe_differences(ctx: &StepContext, dataset: &Dataset, bundle_path: &Path) -> String {
    let mut recorded: HashMap<String, Option<u64>> = HashMap::new();
    let mut pages = FilePages::new(ctx.app.registry.as_ref(), dataset.id, PAGE);
    while let Ok(Some(page)) = pages.next().await {
        recorded.extend(page.into_iter().map(|r| (r.path, r.size)));
    }
    let bundle = bundle_path.to_path_buf();
    let members = ctx
        .app
        .pool
        .run(move || crate::compute::bundle::list_members(&bundle))
        .await;
    let Ok(members) = members else {
        return String::new();
    };
    let mut notes = Vec::new();
    for (path, size) in &members {
        match recorded.remove(path) {
            None => notes.push(format!("`{path}` is new")),
            Some(Some(recorded_size)) if recorded_size != *size => notes.push(format!(
                "`{path}` is {size} bytes, inspect recorded {recorded_size}"
            )),
            Some(_) => {}
        }
    }
    notes.extend(recorded.keys().map(|path| format!("`{path}` is gone")));
    notes.sort();
    if notes.is_empty() {
        return String::new();
    }
    let more = notes.len().saturating_sub(LISTED_DIFFERENCES);
    let mut text = format!(
        " ({}",
        notes
            .into_iter()
            .take(LISTED_DIFFERENCES)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if more > 0 {
        text.push_str(&format!(", and {more} more"));
    }
    text.push(')');
    text
}

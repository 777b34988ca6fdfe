//! `validate_dataset` (spec B.5): re-hashes the staged copy against the recorded MD5s, in
//! parallel on the CPU pool, and marks the dataset STAGED.
//!
//! The file rows it checks against must be those of the dataset's inspection: they are first
//! compared with the inspection record (count and checksum fingerprint), waiting a while for
//! rows a registry has not shown yet. Rows still missing are restored from the staged bundle,
//! whose members archive checked against the same inspection (spec E.4: the Bioloop API can
//! lose rows it acknowledged). A staged copy that fails validation is not left in place: its
//! tree and download links are removed and the record says it is not staged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rayon::prelude::*;
use serde_json::json;
use tracing::{info, warn};

use super::{
    RowsSummary, StepContext, StepError, StepResult, inspection_of, staged_bundle_path,
    summarize_rows, wait_for_rows, withdraw_staged_copy,
};
use crate::cancel::CancellationToken;
use crate::compute::blocking;
use crate::compute::bundle::list_members;
use crate::compute::md5::md5_file;
use crate::compute::walk::checksum_fingerprint_add;
use crate::model::{DatasetState, FileRecord, FileType, InspectionRecord};
use crate::registry::{Dataset, DatasetPatch, FilePages};

/// Rows hashed per round trip to the pool.
const PAGE: usize = 10_000;

/// Problems named in the failure message; all are counted.
const LISTED_PROBLEMS: usize = 1_000;

/// Checks one row against the staged tree; `None` when it matches.
fn check(root: &Path, row: &FileRecord, cancel: &CancellationToken) -> Option<String> {
    let path = root.join(&row.path);
    // lstat: a recorded symbolic link (even a dangling one) only has to exist.
    let Ok(meta) = path.symlink_metadata() else {
        return Some(format!("`{}`: file does not exist", path.display()));
    };
    if row.file_type == FileType::SymbolicLink || meta.file_type().is_symlink() {
        return None;
    }
    match (row.md5, md5_file(&path, cancel)) {
        (Some(expected), Ok((actual, _))) if expected == actual => None,
        (Some(_), Ok(_)) => Some(format!("`{}`: checksum mismatch", path.display())),
        (None, Ok(_)) => None,
        (_, Err(err)) if crate::cancel::is_cancelled(&err) => None,
        (_, Err(err)) => Some(format!("`{}`: cannot read: {err}", path.display())),
    }
}

pub async fn run(ctx: &StepContext) -> StepResult {
    let env = &ctx.env;
    let dataset = ctx.dataset().await?;
    let Some(staged) = dataset.staged_path.clone() else {
        return Err(StepError::validation(anyhow::format_err!(
            "dataset {} (`{}`) has not been staged",
            dataset.id,
            dataset.name
        )));
    };
    let root = PathBuf::from(&staged);
    let probe = root.clone();
    if !blocking(move || probe.is_dir()).await {
        return Err(StepError::validation(anyhow::format_err!(
            "staged path `{staged}` does not exist"
        )));
    }
    if let Some(record) = inspection_of(&dataset) {
        ensure_rows_match(ctx, &dataset, &record).await?;
    }
    ctx.progress.start("validate", "files", dataset.num_files);
    let mut problems: Vec<String> = Vec::new();
    let mut problem_count = 0usize;
    let mut checked = 0u64;
    let mut pages = FilePages::new(env.registry.as_ref(), dataset.id, PAGE);
    while let Some(page) = pages.next().await? {
        checked += page.len() as u64;
        let (root, progress) = (root.clone(), ctx.progress.clone());
        let found: Vec<String> = ctx
            .compute(move |cancel| {
                page.par_iter()
                    .filter_map(|row| {
                        let problem = check(&root, row, cancel);
                        progress.add(1);
                        problem
                    })
                    .collect()
            })
            .await?;
        if ctx.cancel.is_cancelled() {
            return Err(StepError::cancelled());
        }
        problem_count += found.len();
        let room = LISTED_PROBLEMS.saturating_sub(problems.len());
        problems.extend(found.into_iter().take(room));
    }
    if problem_count > 0 {
        problems.sort();
        let mut listed = problems.join("; ");
        if problem_count > problems.len() {
            listed.push_str(&format!("; and {} more", problem_count - problems.len()));
        }
        // A copy that failed validation is not left up for download.
        let withdrawn = match withdraw_staged_copy(env, &dataset).await {
            Ok(()) => "the staged copy and its download links were removed".to_owned(),
            Err(err) => format!("{err:#}"),
        };
        return Err(StepError::validation(anyhow::format_err!(
            "{problem_count} of {checked} files in `{staged}` failed validation: {listed}; {withdrawn}"
        )));
    }
    env.registry
        .update(
            dataset.id,
            &DatasetPatch {
                is_staged: Some(true),
                ..DatasetPatch::default()
            },
        )
        .await?;
    env.registry
        .add_state(dataset.id, DatasetState::Staged)
        .await?;
    info!(files = checked, "Validated the staged copy.");
    Ok(json!([dataset.id, []]))
}

/// Makes sure the registry's rows are those of the inspection: waits for rows not shown yet,
/// then restores missing rows from the staged bundle (checked against the same inspection when
/// it was archived, and by its MD5 when it was fetched). Rows that contradict the inspection
/// fail the step: nothing would be validated against stale checksums.
async fn ensure_rows_match(
    ctx: &StepContext,
    dataset: &Dataset,
    record: &InspectionRecord,
) -> Result<(), StepError> {
    let want = record.checksums();
    let matches = |rows: &RowsSummary| rows.rows == record.files && Some(rows.checksums) == want;
    // Only missing rows can still show up; rows that contradict the inspection will not change.
    let rows = wait_for_rows(ctx, dataset.id, |rows| rows.rows >= record.files).await?;
    if matches(&rows) {
        return Ok(());
    }
    let bundle = staged_bundle_path(&ctx.env, dataset);
    let (restored, fingerprint) = ctx
        .compute(move |cancel| -> std::io::Result<(Vec<FileRecord>, u64)> {
            let restored: Vec<FileRecord> = list_members(&bundle, cancel)?
                .into_iter()
                .map(|member| FileRecord {
                    file_type: if member.md5.is_some() {
                        FileType::File
                    } else {
                        FileType::SymbolicLink
                    },
                    path: member.path,
                    md5: member.md5,
                    size: Some(member.size),
                })
                .collect();
            let fingerprint = restored.iter().fold(0u64, |acc, row| {
                checksum_fingerprint_add(acc, &row.path, row.md5.as_ref())
            });
            Ok((restored, fingerprint))
        })
        .await?
        .with_context(|| "cannot read the staged bundle to restore file rows".to_owned())
        .map_err(StepError::retryable_unless_cancelled)?;
    if restored.len() as u64 != record.files || Some(fingerprint) != want {
        return Err(StepError::validation(anyhow::format_err!(
            "the registry holds {} file rows of dataset {} (`{}`) that do not match its inspection ({} files), \
             and the staged bundle cannot restore them; inspect the dataset again",
            rows.rows,
            dataset.id,
            dataset.name,
            record.files
        )));
    }
    warn!(
        rows = rows.rows,
        expected = record.files,
        "File rows were missing; restoring them from the staged bundle."
    );
    ctx.env
        .registry
        .replace_files(dataset.id, Arc::new(restored))
        .await
        .map_err(|err| match err {
            crate::registry::RegistryError::Invalid(message) => {
                StepError::validation(anyhow::format_err!("{message}"))
            }
            other => other.into(),
        })?;
    let rows = summarize_rows(ctx, dataset.id).await?;
    if matches(&rows) {
        Ok(())
    } else {
        Err(StepError::retryable(anyhow::format_err!(
            "the file rows of dataset {} (`{}`) are still incomplete after restoring them ({} of {})",
            dataset.id,
            dataset.name,
            rows.rows,
            record.files
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::testing::{TestEnv, write};

    #[tokio::test(flavor = "multi_thread")]
    async fn a_changed_staged_file_fails_validation_naming_it_and_withdraws_the_copy() {
        let env = TestEnv::new();
        let files: &[(&str, &[u8])] = &[("a.txt", b"alpha"), ("deep/b.txt", b"beta")];
        let (id, _) = env.dataset("run2", files).await;
        crate::steps::inspect::run(&env.context(id))
            .await
            .expect("inspect");
        let staged = env.dir.path().join("staged/run2");
        for (path, content) in files {
            write(&staged.join(path), content);
        }
        let patch = DatasetPatch {
            staged_path: Some(Some(staged.to_str().expect("UTF-8").to_owned())),
            ..DatasetPatch::default()
        };
        env.env.registry.update(id, &patch).await.expect("stage");

        // Intact: validated, and the dataset becomes STAGED.
        run(&env.context(id)).await.expect("validate");
        let dataset = env.env.registry.get(id).await.expect("dataset");
        assert!(dataset.is_staged);
        assert_eq!(
            dataset.states.last().map(|s| s.state.as_str()),
            Some(DatasetState::Staged.as_str())
        );

        // One byte changed: the file is named, the copy withdrawn, the record says so.
        write(&staged.join("deep/b.txt"), b"betA");
        env.env.registry.update(id, &patch).await.expect("stage");
        let err = run(&env.context(id)).await.expect_err("mismatch");
        let message = format!("{err}");
        assert!(
            message.contains("deep/b.txt`: checksum mismatch"),
            "{message}"
        );
        assert!(message.contains("1 of 2 files"), "{message}");
        assert!(!staged.exists(), "the staged copy is removed");
        let dataset = env.env.registry.get(id).await.expect("dataset");
        assert!(!dataset.is_staged);
        assert_eq!(dataset.staged_path, None);
    }
}

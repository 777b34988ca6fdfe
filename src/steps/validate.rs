//! `validate_dataset` (spec B.5): re-hashes the staged copy against the recorded MD5s, in
//! parallel on the CPU pool, and marks the dataset STAGED.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::json;
use tracing::info;

use super::{StepContext, StepError, StepResult};
use crate::compute::md5::md5_file;
use crate::model::{DatasetState, FileRecord, FileType};
use crate::registry::{DatasetPatch, FilePages};

/// Rows hashed per round trip to the pool.
const PAGE: usize = 10_000;

/// Problems named in the failure message; all are counted.
const LISTED_PROBLEMS: usize = 1_000;

fn failed(err: anyhow::Error) -> StepError {
    StepError::permanent("ValidationFailed", err)
}

/// Checks one row against the staged tree; `None` when it matches.
fn check(root: &Path, row: &FileRecord) -> Option<String> {
    let path = root.join(&row.path);
    // lstat: a recorded symbolic link (even a dangling one) only has to exist.
    let Ok(meta) = path.symlink_metadata() else {
        return Some(format!("`{}`: file does not exist", path.display()));
    };
    if row.file_type == FileType::SymbolicLink || meta.file_type().is_symlink() {
        return None;
    }
    match (row.md5, md5_file(&path)) {
        (Some(expected), Ok((actual, _))) if expected == actual => None,
        (Some(_), Ok(_)) => Some(format!("`{}`: checksum mismatch", path.display())),
        (None, Ok(_)) => None,
        (_, Err(err)) => Some(format!("`{}`: cannot read: {err}", path.display())),
    }
}

pub async fn run(ctx: &StepContext) -> StepResult {
    let app = &ctx.app;
    let dataset = ctx.dataset().await?;
    let Some(staged) = dataset.staged_path.clone() else {
        return Err(failed(anyhow::format_err!(
            "dataset {} (`{}`) has not been staged",
            dataset.id,
            dataset.name
        )));
    };
    let root = PathBuf::from(&staged);
    if !root.is_dir() {
        return Err(failed(anyhow::format_err!(
            "staged path `{staged}` does not exist"
        )));
    }
    ctx.progress.start("validate", "files", dataset.num_files);
    let mut problems: Vec<String> = Vec::new();
    let mut problem_count = 0usize;
    let mut checked = 0u64;
    let mut pages = FilePages::new(app.registry.as_ref(), dataset.id, PAGE);
    while let Some(page) = pages.next().await? {
        checked += page.len() as u64;
        let (root, progress) = (root.clone(), ctx.progress.clone());
        let found: Vec<String> = app
            .pool
            .run(move || {
                page.par_iter()
                    .filter_map(|row| {
                        let problem = check(&root, row);
                        progress.add(1);
                        problem
                    })
                    .collect()
            })
            .await;
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
        return Err(failed(anyhow::format_err!(
            "{problem_count} of {checked} files in `{staged}` failed validation: {listed}"
        )));
    }
    app.registry
        .update(
            dataset.id,
            &DatasetPatch {
                is_staged: Some(true),
                ..DatasetPatch::default()
            },
        )
        .await?;
    app.registry
        .add_state(dataset.id, DatasetState::Staged)
        .await?;
    info!(files = checked, "Validated the staged copy.");
    Ok(json!([dataset.id, []]))
}

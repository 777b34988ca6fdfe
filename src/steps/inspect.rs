//! `inspect_dataset` (spec B.2): sizes, counts and one row per file with its MD5.
//!
//! The tree is walked once and streamed: files are hashed in parallel on the CPU pool as the
//! walk finds them, and rows go to a spool file in the scratch directory rather than to
//! memory. Only when the whole tree was read without error are the rows stored (in batches)
//! and the dataset's sizes recorded, so a failed inspection leaves no rows behind and a
//! recorded `num_files` always describes a complete inspection.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use super::{StepContext, StepError, StepResult, existing_origin, returns_dataset};
use crate::compute::md5::Md5Digest;
use crate::compute::walk::{
    InspectOptions, InspectRecord, RecordKind, count_non_directories, inspect_tree,
};
use crate::model::{FileRecord, FileType};
use crate::registry::DatasetPatch;

/// Inspection errors listed in the failure message; the rest are counted.
const LISTED_ERRORS: usize = 100;

/// One row in the spool file (JSON lines, so any file name survives).
#[derive(Serialize, Deserialize)]
struct SpoolRow {
    path: String,
    md5: Option<String>,
    size: u64,
    symlink: bool,
}

impl SpoolRow {
    fn into_record(self) -> anyhow::Result<FileRecord> {
        let md5 = match self.md5 {
            Some(text) => Some(
                text.parse::<Md5Digest>()
                    .map_err(|e| anyhow::format_err!("{e}"))?,
            ),
            None => None,
        };
        Ok(FileRecord {
            path: self.path,
            md5,
            size: Some(self.size),
            file_type: if self.symlink {
                FileType::SymbolicLink
            } else {
                FileType::File
            },
        })
    }
}

fn failed(err: anyhow::Error) -> StepError {
    StepError::permanent("InspectionFailed", err)
}

pub async fn run(ctx: &StepContext) -> StepResult {
    let dataset = ctx.dataset().await?;
    if dataset.is_deleted {
        return Err(failed(anyhow::format_err!(
            "dataset {} (`{}`) is deleted",
            dataset.id,
            dataset.name
        )));
    }
    let origin = existing_origin(&dataset, "InspectionFailed")?;
    check_readable(&origin).map_err(failed)?;

    let app = &ctx.app;
    let progress = ctx.progress.clone();
    progress.start("counting files", "files", None);
    let root = origin.clone();
    let total = app.pool.run(move || count_non_directories(&root)).await;
    progress.start("inspect", "files", Some(total));

    let scratch = app.settings.paths.scratch.clone();
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create `{}`", scratch.display()))?;
    let spool_path = scratch.join(format!("inspect-{}-{}.jsonl", dataset.id, ctx.task_id));
    let genome_file_types = app.settings.genome_file_types.clone();
    let (root, spool) = (origin.clone(), spool_path.clone());
    let walked =
        app.pool
            .run(move || -> anyhow::Result<_> {
                let writer = Mutex::new(BufWriter::with_capacity(1 << 20, File::create(&spool)?));
                let write_error = Mutex::new(None::<std::io::Error>);
                let on_record = |record: InspectRecord| {
                    let row = SpoolRow {
                        path: record.path,
                        md5: record.md5.map(|m| m.to_string()),
                        size: record.size,
                        symlink: record.kind == RecordKind::Symlink,
                    };
                    let mut line = serde_json::to_vec(&row).unwrap_or_default();
                    line.push(b'\n');
                    let mut writer = writer.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(err) = writer.write_all(&line) {
                        write_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(err);
                    }
                };
                let opts = InspectOptions {
                    genome_file_types: &genome_file_types,
                };
                let summary = inspect_tree(&root, &opts, &on_record, &|files, _bytes| {
                    progress.set_done(files)
                })
                .with_context(|| format!("cannot inspect `{}`", root.display()))?;
                if let Some(err) = write_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
                    return Err(anyhow::Error::new(err)
                        .context(format!("cannot write `{}`", spool.display())));
                }
                writer
                    .into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .flush()?;
                Ok(summary)
            })
            .await;
    let summary = match walked {
        Ok(summary) => summary,
        Err(err) => {
            let _ = std::fs::remove_file(&spool_path);
            return Err(StepError::retryable(err));
        }
    };
    if summary.error_count > 0 {
        let _ = std::fs::remove_file(&spool_path);
        let mut listed = summary
            .errors
            .iter()
            .take(LISTED_ERRORS)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if summary.error_count as usize > LISTED_ERRORS.min(summary.errors.len()) {
            listed.push_str(&format!(
                "; and {} more",
                summary.error_count as usize - LISTED_ERRORS.min(summary.errors.len())
            ));
        }
        return Err(failed(anyhow::format_err!(
            "{} problem(s) inspecting `{}`: {listed}",
            summary.error_count,
            origin.display()
        )));
    }

    let stored = store_rows(ctx, &spool_path).await;
    let _ = std::fs::remove_file(&spool_path);
    let stored = stored?;
    app.registry
        .update(
            dataset.id,
            &DatasetPatch {
                du_size: Some(summary.du_size),
                size: Some(summary.size),
                num_files: Some(summary.num_files),
                num_directories: Some(summary.num_directories),
                metadata: Some(json!({"num_genome_files": summary.num_genome_files})),
                ..DatasetPatch::default()
            },
        )
        .await?;
    info!(
        files = summary.num_files,
        directories = summary.num_directories,
        bytes = summary.size,
        rows = stored,
        "Inspected the dataset."
    );
    Ok(returns_dataset(dataset.id))
}

/// The original's readability test: a directory needs read and search permission.
fn check_readable(origin: &Path) -> anyhow::Result<()> {
    use rustix::fs::Access;
    let access = if origin.is_dir() {
        Access::READ_OK | Access::EXEC_OK
    } else {
        Access::READ_OK
    };
    rustix::fs::access(origin, access)
        .with_context(|| format!("`{}` is not readable", origin.display()))
}

/// Streams the spool into the registry in batches of `inspect.file_metadata_batch_size`.
async fn store_rows(ctx: &StepContext, spool: &Path) -> Result<u64, StepError> {
    let batch_size = ctx.app.settings.inspect.file_metadata_batch_size;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Vec<FileRecord>>>(2);
    let spool: PathBuf = spool.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || {
        let read = || -> anyhow::Result<()> {
            let file =
                File::open(&spool).with_context(|| format!("cannot read `{}`", spool.display()))?;
            let mut batch = Vec::with_capacity(batch_size);
            for line in BufReader::with_capacity(1 << 20, file).lines() {
                let row: SpoolRow = serde_json::from_str(&line?)?;
                batch.push(row.into_record()?);
                if batch.len() == batch_size {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
                    if tx.blocking_send(Ok(full)).is_err() {
                        return Ok(());
                    }
                }
            }
            if !batch.is_empty() {
                let _ = tx.blocking_send(Ok(batch));
            }
            Ok(())
        };
        if let Err(err) = read() {
            let _ = tx.blocking_send(Err(err));
        }
    });
    let mut stored = 0;
    while let Some(batch) = rx.recv().await {
        let batch = batch?;
        ctx.app.registry.add_files(ctx.dataset_id, &batch).await?;
        stored += batch.len() as u64;
    }
    reader.await.map_err(|e| StepError::retryable(e.into()))?;
    Ok(stored)
}

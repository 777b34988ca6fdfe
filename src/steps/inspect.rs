//! `inspect_dataset` (spec B.2): sizes, counts and one row per file with its MD5.
//!
//! The tree is walked once (no counting walk first) and streamed: files are hashed in parallel on the CPU pool as the
//! walk finds them, and rows go to a spool file in the scratch directory rather than to
//! memory. Only when the whole tree was read without error are the rows stored and the
//! dataset's sizes and inspection record (`metadata.inspection`: counts and fingerprints of the
//! rows) written, so a failed inspection leaves nothing behind and a recorded inspection always
//! describes complete, current rows: the rows of an earlier inspection are replaced, never kept
//! beside the new ones.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde_json::json;
use tracing::info;

use super::{StepContext, StepError, StepResult, existing_origin, returns_dataset};
use crate::compute::md5::Md5Digest;
use crate::compute::walk::{InspectOptions, InspectRecord, RecordKind, inspect_tree};
use crate::compute::{TempFile, attempt_sibling, blocking, remove_leftover_partials};
use crate::model::{FileRecord, FileType, InspectionRecord};
use crate::registry::{DatasetPatch, FileRowIter, FileRowSource, RegistryError};
use rustix::fs::Access;

/// Inspection errors listed in the failure message; the rest are counted.
const LISTED_ERRORS: usize = 100;

/// One row in the spool file: a kind byte (0 a file with its MD5, 1 a symbolic link), the size
/// (u64, little-endian), the MD5's 16 bytes for a file, the path's length (u32, little-endian)
/// and its bytes. Length-prefixed, so any file name survives, and with nothing to format or
/// parse: the spool is written as fast as the walk finds rows and read back as fast as the
/// registry stores them.
fn spool_row(record: &InspectRecord, out: &mut Vec<u8>) {
    match (&record.kind, &record.md5) {
        (RecordKind::File, Some(md5)) => {
            out.push(0);
            out.extend_from_slice(&record.size.to_le_bytes());
            out.extend_from_slice(md5.as_bytes());
        }
        _ => {
            out.push(1);
            out.extend_from_slice(&record.size.to_le_bytes());
        }
    }
    out.extend_from_slice(&(record.path.len() as u32).to_le_bytes());
    out.extend_from_slice(record.path.as_bytes());
}

/// Reads the next row of a spool; `None` at its end.
fn read_spool_row(reader: &mut impl Read) -> anyhow::Result<Option<FileRecord>> {
    let mut kind = [0u8; 1];
    match reader.read_exact(&mut kind) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    let mut size = [0u8; 8];
    reader.read_exact(&mut size)?;
    let md5 = match kind[0] {
        0 => {
            let mut md5 = [0u8; 16];
            reader.read_exact(&mut md5)?;
            Some(Md5Digest::from_bytes(md5))
        }
        1 => None,
        other => anyhow::bail!("unknown row kind {other}"),
    };
    let mut len = [0u8; 4];
    reader.read_exact(&mut len)?;
    let mut path = vec![0u8; u32::from_le_bytes(len) as usize];
    reader.read_exact(&mut path)?;
    Ok(Some(FileRecord {
        path: String::from_utf8(path)?,
        md5,
        size: Some(u64::from_le_bytes(size)),
        file_type: if kind[0] == 0 {
            FileType::File
        } else {
            FileType::SymbolicLink
        },
    }))
}

/// The spool file of one inspection, read back as the rows the registry stores; removed
/// whatever the outcome.
struct Spool(TempFile);

impl FileRowSource for Spool {
    fn rows(&self) -> anyhow::Result<FileRowIter> {
        let path = self.0.path().to_path_buf();
        let file =
            File::open(&path).with_context(|| format!("cannot read `{}`", path.display()))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        Ok(Box::new(std::iter::from_fn(move || {
            read_spool_row(&mut reader)
                .with_context(|| format!("cannot read `{}`", path.display()))
                .transpose()
        })))
    }
}

pub async fn run(ctx: &StepContext) -> StepResult {
    let dataset = ctx.dataset().await?;
    if dataset.is_deleted {
        return Err(StepError::inspection(anyhow::format_err!(
            "dataset {} (`{}`) is deleted",
            dataset.id,
            dataset.name
        )));
    }
    let origin = existing_origin(&dataset, "InspectionFailed").await?;
    let checked = origin.clone();
    blocking(move || check_readable(&checked))
        .await
        .map_err(StepError::inspection)?;

    let env = &ctx.env;
    let progress = ctx.progress.clone();
    // No walk runs first only to count: on a network file system listing is the slow part.
    // A dataset inspected before gives its last count as the expected total.
    progress.start("inspect", "files", dataset.num_files);

    let scratch = env.settings.paths.scratch.clone();
    let name = format!("inspect-{}.rows", dataset.id);
    let spool_path = blocking(move || -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("cannot create `{}`", scratch.display()))?;
        let target = scratch.join(name);
        remove_leftover_partials(&target)
            .with_context(|| format!("cannot remove leftovers next to `{}`", target.display()))?;
        Ok(attempt_sibling(&target))
    })
    .await?;
    let spool = Arc::new(Spool(TempFile::new(spool_path.clone())));
    let genome_file_types = env.settings.genome_file_types.clone();
    let root = origin.clone();
    let walked = ctx
        .compute(move |cancel| -> anyhow::Result<_> {
            let writer = Mutex::new(BufWriter::with_capacity(
                1 << 20,
                File::create_new(&spool_path)?,
            ));
            let write_error = Mutex::new(None::<std::io::Error>);
            let on_record = |record: InspectRecord| {
                let mut row = Vec::with_capacity(29 + record.path.len());
                spool_row(&record, &mut row);
                let mut writer = writer.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(err) = writer.write_all(&row) {
                    write_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(err);
                }
            };
            let opts = InspectOptions {
                genome_file_types: &genome_file_types,
                content_digests: true,
            };
            let summary = inspect_tree(
                &root,
                &opts,
                &on_record,
                &|files, _bytes| progress.set_done(files),
                cancel,
            )
            .with_context(|| format!("cannot inspect `{}`", root.display()))?;
            if let Some(err) = write_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
                return Err(anyhow::Error::new(err)
                    .context(format!("cannot write `{}`", spool_path.display())));
            }
            writer
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .flush()?;
            Ok(summary)
        })
        .await?
        .map_err(StepError::retryable_unless_cancelled)?;
    if summary_has_errors(&walked) {
        let mut listed = walked
            .errors
            .iter()
            .take(LISTED_ERRORS)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        let shown = LISTED_ERRORS.min(walked.errors.len());
        if walked.error_count as usize > shown {
            listed.push_str(&format!(
                "; and {} more",
                walked.error_count as usize - shown
            ));
        }
        return Err(StepError::inspection(anyhow::format_err!(
            "{} problem(s) inspecting `{}`: {listed}",
            walked.error_count,
            origin.display()
        )));
    }

    // The rows first, the record after: a dataset whose record describes this inspection always
    // has exactly its rows.
    let stored = env
        .registry
        .replace_files(dataset.id, Arc::clone(&spool) as Arc<dyn FileRowSource>)
        .await
        .map_err(|err| match err {
            // Rows the registry cannot replace are a fact about the dataset, not a hiccup.
            RegistryError::Invalid(message) => {
                StepError::inspection(anyhow::format_err!("{message}"))
            }
            other => other.into(),
        })?;
    if let Ok(Spool(spool)) = Arc::try_unwrap(spool) {
        spool
            .remove()
            .await
            .context("cannot remove the inspection's spool file")?;
    }
    let record = InspectionRecord {
        files: walked.num_files,
        directories: walked.num_directories,
        bytes: walked.size,
        sizes_fingerprint: InspectionRecord::fingerprint_text(walked.fingerprint),
        checksums_fingerprint: InspectionRecord::fingerprint_text(walked.checksum_fingerprint),
        contents_fingerprint: InspectionRecord::fingerprint_text(walked.content_fingerprint),
        task_id: ctx.task_id.clone(),
    };
    env.registry
        .update(
            dataset.id,
            &DatasetPatch {
                du_size: Some(walked.du_size),
                size: Some(walked.size),
                num_files: Some(walked.num_files),
                num_directories: Some(walked.num_directories),
                metadata: Some(json!({
                    "num_genome_files": walked.num_genome_files,
                    InspectionRecord::METADATA_KEY: record,
                })),
                ..DatasetPatch::default()
            },
        )
        .await?;
    info!(
        files = walked.num_files,
        directories = walked.num_directories,
        bytes = walked.size,
        rows = stored,
        "Inspected the dataset."
    );
    Ok(returns_dataset(dataset.id))
}

fn summary_has_errors(summary: &crate::compute::walk::InspectSummary) -> bool {
    summary.error_count > 0
}

/// The original's readability test: a directory needs read and search permission.
fn check_readable(origin: &Path) -> anyhow::Result<()> {
    let access = if origin.is_dir() {
        Access::READ_OK | Access::EXEC_OK
    } else {
        Access::READ_OK
    };
    rustix::fs::access(origin, access)
        .with_context(|| format!("`{}` is not readable", origin.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::md5::md5_bytes;
    use crate::registry::FilePages;
    use crate::steps::inspection_of;
    use crate::steps::testing::{TestEnv, write};

    async fn stored_rows(env: &TestEnv, id: crate::registry::DatasetId) -> Vec<FileRecord> {
        let mut pages = FilePages::new(env.env.registry.as_ref(), id, 1000);
        let mut rows = Vec::new();
        while let Some(page) = pages.next().await.expect("page") {
            rows.extend(page);
        }
        rows
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_step_records_rows_sizes_and_replaces_an_earlier_inspection() {
        let env = TestEnv::new();
        let (id, root) = env
            .dataset("run1", &[("a.txt", b"alpha"), ("sub/b.fastq.gz", b"bb")])
            .await;
        run(&env.context(id)).await.expect("inspect");
        let dataset = env.env.registry.get(id).await.expect("dataset");
        assert_eq!(dataset.num_files, Some(2));
        assert_eq!(dataset.size, Some(7));
        assert_eq!(dataset.metadata["num_genome_files"], 1);
        let record = inspection_of(&dataset).expect("inspection record");
        assert_eq!(record.files, 2);
        let rows = stored_rows(&env, id).await;
        assert_eq!(
            rows.iter()
                .map(|r| (r.path.as_str(), r.md5))
                .collect::<Vec<_>>(),
            [
                ("a.txt", Some(md5_bytes(b"alpha"))),
                ("sub/b.fastq.gz", Some(md5_bytes(b"bb")))
            ]
        );

        // Inspected again after a change: the rows are the new ones, none of the old kept.
        std::fs::remove_file(root.join("a.txt")).expect("rm");
        write(&root.join("c.txt"), b"gamma");
        run(&env.context(id)).await.expect("inspect again");
        let paths: Vec<String> = stored_rows(&env, id)
            .await
            .into_iter()
            .map(|r| r.path)
            .collect();
        assert_eq!(paths, ["c.txt", "sub/b.fastq.gz"]);
        assert_eq!(
            std::fs::read_dir(&env.env.settings.paths.scratch)
                .expect("scratch")
                .count(),
            0,
            "the spool is removed"
        );
    }

    #[test]
    fn spool_rows_read_back_as_written() {
        let records = [
            InspectRecord {
                path: "a.txt".to_owned(),
                md5: Some(md5_bytes(b"a")),
                content: None,
                size: 1,
                kind: RecordKind::File,
            },
            InspectRecord {
                path: "odd\nname é/with\ttabs".to_owned(),
                md5: Some(md5_bytes(b"")),
                content: None,
                size: 0,
                kind: RecordKind::File,
            },
            InspectRecord {
                path: "link".to_owned(),
                md5: None,
                content: None,
                size: 5_000_000_000,
                kind: RecordKind::Symlink,
            },
        ];
        let mut spool = Vec::new();
        for record in &records {
            spool_row(record, &mut spool);
        }
        let mut reader = spool.as_slice();
        let mut read = Vec::new();
        while let Some(row) = read_spool_row(&mut reader).expect("row") {
            read.push(row);
        }
        let expected: Vec<FileRecord> = records
            .iter()
            .map(|r| FileRecord {
                path: r.path.clone(),
                md5: r.md5,
                size: Some(r.size),
                file_type: match r.kind {
                    RecordKind::File => FileType::File,
                    RecordKind::Symlink => FileType::SymbolicLink,
                },
            })
            .collect();
        assert_eq!(read, expected);
        // A spool cut short is an error, never a shorter list of rows.
        let mut cut = &spool[..spool.len() - 2];
        let mut rows = 0;
        let err = loop {
            match read_spool_row(&mut cut) {
                Ok(Some(_)) => rows += 1,
                Ok(None) => panic!("a cut spool read to its end"),
                Err(err) => break err,
            }
        };
        assert_eq!(rows, 2, "{err}");
    }
}

//! `archive_dataset` (spec B.3): writes the tar bundle, checks it against the inspection,
//! stores it in the archive and records it.
//!
//! The bundle is written by the `tar` crate and hashed while it is written, so it is never
//! read back to compute its MD5; each member's content is hashed on the way too. Before
//! anything is stored, the members are compared with the inspection record that inspect kept
//! with the dataset (counts, bytes, and fingerprints of every path's size and MD5), never with
//! file rows read back from the registry (the Bioloop API may not show them yet, spec E.4): a
//! file that changed after it was inspected, even keeping its size, is never archived under the
//! old checksums. A dataset inspected before records were kept is compared with its file rows.
//!
//! The bundle is built under a name unique to this attempt and handed to the archive from
//! there, so a cancelled attempt still stopping and the next attempt never share a file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::Datelike;
use tracing::{info, warn};

use super::{
    RowsSummary, StepContext, StepError, StepResult, capacity, existing_origin, inspection_of,
    returns_dataset, wait_for_rows,
};
use crate::cancel::CancellationToken;
use crate::compute::bundle::{
    BundleError, ListedMember, MemberDigest, MemberSummary, list_members, write_bundle,
};
use crate::compute::{TempFile, attempt_sibling, blocking, remove_leftover_partials};
use crate::model::{Bundle, DatasetState, InspectionRecord};
use crate::registry::{Dataset, DatasetPatch, FilePages};

/// Differences listed when a bundle does not match the inspection.
const LISTED_DIFFERENCES: usize = 20;

/// Where the dataset's bundle is kept in the archive (spec D.1):
/// `{paths.<TYPE>.archive}/{name}.tar`, `{year}` being the year it is archived, not the year
/// the process started (J.10).
pub fn archive_path_of(ctx: &StepContext, dataset: &Dataset) -> String {
    let template = &ctx
        .env
        .settings
        .paths
        .for_type(dataset.dataset_type)
        .archive;
    let archive_dir = template.replace("{year}", &chrono::Local::now().year().to_string());
    format!(
        "{}/{}",
        archive_dir.trim_end_matches('/'),
        dataset.name.bundle_file_name()
    )
}

/// At most the size of the dataset's bundle: its recorded size when it was bundled before, else
/// the file bytes plus a tar header and block padding per entry and the end-of-archive blocks.
fn bundle_size_bound(dataset: &Dataset) -> u64 {
    if let Some(bundle) = &dataset.bundle {
        return bundle.size;
    }
    let entries = dataset.num_files.unwrap_or(0) + dataset.num_directories.unwrap_or(0) + 1;
    dataset
        .size
        .or(dataset.du_size)
        .unwrap_or(0)
        .saturating_add(entries.saturating_mul(1024))
        .saturating_add(10_240)
}

pub async fn run(ctx: &StepContext) -> StepResult {
    let env = &ctx.env;
    let dataset = ctx.dataset().await?;
    let origin = existing_origin(&dataset, "ValidationFailed").await?;
    let expected = Expected::of(ctx, &dataset).await?;
    let paths = env.settings.paths.for_type(dataset.dataset_type);
    let generate_dir = paths.bundle_generate.clone();
    // Held until the step ends: the bundle is written, put in the archive and removed.
    let _space = capacity::admit(
        ctx,
        vec![capacity::Need {
            dir: generate_dir.clone(),
            bytes: bundle_size_bound(&dataset),
        }],
        false,
    )
    .await?;
    let final_name = generate_dir.join(dataset.name.bundle_file_name());
    let bundle_path = blocking(move || -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(&generate_dir)
            .with_context(|| format!("cannot create `{}`", generate_dir.display()))?;
        remove_leftover_partials(&final_name).with_context(|| {
            format!("cannot remove leftovers next to `{}`", final_name.display())
        })?;
        Ok(attempt_sibling(&final_name))
    })
    .await?;

    ctx.progress.start("tar", "bytes", dataset.du_size);
    let (source, target, progress) = (origin.clone(), bundle_path.clone(), ctx.progress.clone());
    let digest = expected.digest;
    let written = ctx
        .compute(move |cancel| write_bundle(&source, &target, digest, &|n| progress.add(n), cancel))
        .await?;
    // Removed on every way out: after the archive took it, or on any failure.
    let generated = TempFile::new(bundle_path.clone());
    let summary = written.map_err(|err| match err {
        BundleError::Cancelled => StepError::cancelled(),
        err if err.is_retryable() => StepError::retryable(
            anyhow::Error::new(err).context(format!("cannot bundle `{}`", origin.display())),
        ),
        err => StepError::validation(
            anyhow::Error::new(err).context(format!("cannot bundle `{}`", origin.display())),
        ),
    })?;

    if let Some(mismatch) = expected.mismatch(&summary.members) {
        let differences = describe_differences(ctx, &dataset, &bundle_path).await;
        return Err(StepError::validation(anyhow::format_err!(
            "dataset {} (`{}`) changed after it was inspected: the bundle of `{}` does not match \
             the {} ({mismatch}){differences}; it was not archived. Inspect the dataset again: \
             `workers workflows resume WORKFLOW --from inspect`",
            dataset.id,
            dataset.name,
            origin.display(),
            expected.source,
        )));
    }

    let archive_path = archive_path_of(ctx, &dataset);
    env.archive
        .put(
            &bundle_path,
            &archive_path,
            summary.md5,
            &ctx.progress,
            &ctx.cancel,
        )
        .await?;
    // The archive holds the bundle now; keeping the generated copy only fills the disk (J.10).
    if let Err(err) = generated.remove().await {
        warn!(path = %bundle_path.display(), error = %err, "Could not remove the generated bundle.");
    }

    let bundle = Bundle {
        name: dataset.name.bundle_file_name(),
        size: summary.size,
        md5: summary.md5,
    };
    env.registry
        .update(
            dataset.id,
            &DatasetPatch {
                archive_path: Some(Some(archive_path.clone())),
                bundle: Some(bundle),
                ..DatasetPatch::default()
            },
        )
        .await?;
    env.registry
        .add_state(dataset.id, DatasetState::Archived)
        .await?;
    info!(archive_path = %archive_path, bytes = summary.size, md5 = %summary.md5, "Archived the dataset.");
    Ok(returns_dataset(dataset.id))
}

/// What the bundle must hold.
struct Expected {
    /// What it was taken from, for messages.
    source: &'static str,
    files: u64,
    directories: Option<u64>,
    bytes: Option<u64>,
    sizes: Option<u64>,
    paths: Option<u64>,
    /// The digest of each member's content to compute, and the fingerprint of (path, digest)
    /// expected of them.
    digest: MemberDigest,
    contents: u64,
}

impl Expected {
    /// The inspection record; for a dataset inspected before records were kept, its file rows
    /// (waiting a while for rows the registry has not shown yet).
    async fn of(ctx: &StepContext, dataset: &Dataset) -> Result<Expected, StepError> {
        if let Some(record) = inspection_of(dataset) {
            return Expected::from_record(&record).ok_or_else(|| {
                StepError::validation(anyhow::format_err!(
                    "the inspection record of dataset {} (`{}`) is damaged; inspect the dataset again",
                    dataset.id,
                    dataset.name
                ))
            });
        }
        let Some(num_files) = dataset.num_files else {
            return Err(StepError::validation(anyhow::format_err!(
                "dataset {} (`{}`) has not been inspected",
                dataset.id,
                dataset.name
            )));
        };
        let rows: RowsSummary =
            wait_for_rows(ctx, dataset.id, |rows| rows.rows >= num_files).await?;
        if rows.rows != num_files {
            return Err(StepError::retryable(anyhow::format_err!(
                "the registry shows {} file rows of dataset {} (`{}`), its inspection recorded {num_files}",
                rows.rows,
                dataset.id,
                dataset.name
            )));
        }
        Ok(Expected {
            source: "file rows of its inspection",
            files: num_files,
            directories: dataset.num_directories,
            bytes: dataset.size,
            sizes: rows.sizes,
            paths: Some(rows.paths),
            digest: MemberDigest::Md5,
            contents: rows.checksums,
        })
    }

    fn from_record(record: &InspectionRecord) -> Option<Expected> {
        Some(Expected {
            source: "inspection",
            files: record.files,
            directories: Some(record.directories),
            bytes: Some(record.bytes),
            sizes: Some(record.sizes()?),
            paths: None,
            digest: MemberDigest::Blake3,
            contents: record.contents()?,
        })
    }

    /// What differs between the bundle and the expectation, in words; `None` when it matches.
    fn mismatch(&self, members: &MemberSummary) -> Option<String> {
        let mut found = Vec::new();
        if members.files != self.files {
            found.push(format!("{} files, {} recorded", members.files, self.files));
        }
        if let Some(directories) = self.directories
            && members.directories != directories
        {
            found.push(format!(
                "{} directories, {directories} recorded",
                members.directories
            ));
        }
        if let Some(bytes) = self.bytes
            && members.bytes != bytes
        {
            found.push(format!(
                "{} bytes of files, {bytes} recorded",
                members.bytes
            ));
        }
        if self.sizes.is_some_and(|sizes| sizes != members.fingerprint)
            || self
                .paths
                .is_some_and(|paths| paths != members.path_fingerprint)
        {
            found.push("other paths or sizes".to_owned());
        }
        if self.contents != members.digest_fingerprint {
            found.push("other contents".to_owned());
        }
        if found.is_empty() {
            None
        } else {
            Some(found.join(", "))
        }
    }
}

/// Names up to `LISTED_DIFFERENCES` paths whose presence, size or content differs between the
/// bundle and the file rows of the inspection. Failure path only: it reads the bundle again
/// and holds both listings in memory; rows a registry does not show are simply not named.
async fn describe_differences(ctx: &StepContext, dataset: &Dataset, bundle_path: &Path) -> String {
    let mut recorded: HashMap<String, crate::model::FileRecord> = HashMap::new();
    let mut pages = FilePages::new(ctx.env.registry.as_ref(), dataset.id, 10_000);
    while let Ok(Some(page)) = pages.next().await {
        recorded.extend(page.into_iter().map(|r| (r.path.clone(), r)));
    }
    let bundle = bundle_path.to_path_buf();
    let members: Vec<ListedMember> = match ctx
        .compute(move |cancel: &CancellationToken| list_members(&bundle, cancel))
        .await
    {
        Ok(Ok(members)) => members,
        _ => return String::new(),
    };
    let mut notes = Vec::new();
    for member in &members {
        match recorded.remove(&member.path) {
            None => notes.push(format!("`{}` is new", member.path)),
            Some(row) if row.size.is_some_and(|size| size != member.size) => notes.push(format!(
                "`{}` is {} bytes, inspect recorded {}",
                member.path,
                member.size,
                row.size.unwrap_or_default()
            )),
            Some(row) if row.md5 != member.md5 => notes.push(format!(
                "`{}` has MD5 {}, inspect recorded {}",
                member.path,
                member
                    .md5
                    .map_or_else(|| "none".to_owned(), |m| m.to_string()),
                row.md5.map_or_else(|| "none".to_owned(), |m| m.to_string())
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
        ": {}",
        notes
            .into_iter()
            .take(LISTED_DIFFERENCES)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if more > 0 {
        text.push_str(&format!(", and {more} more"));
    }
    text
}

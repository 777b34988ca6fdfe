//! Fixity: re-reads a dataset's copies (its source directory, its staged tree, its archived
//! bundle) and compares them with its record (the MD5 and size of every file row, the bundle's
//! MD5 and size), naming each difference by path. It only reads: no copy and no record is
//! changed, whatever it finds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use serde::Serialize;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use tracing::{error, warn};

use crate::archive::{ArchiveError, ArchivedFile};
use crate::cancel::CancellationToken;
use crate::compute::blocking;
use crate::compute::md5::Md5Digest;
use crate::compute::walk::{InspectOptions, InspectRecord, RecordKind, inspect_tree};
use crate::config::RecallPolicy;
pub use crate::model::CopyKind;
use crate::model::{DatasetState, FileRecord, FileType};
use crate::progress::Progress;
use crate::registry::{Dataset, DatasetId, DatasetPatch, FilePages};
use crate::steps::StepEnv;
use crate::steps::capacity;
use crate::store::{FixityRecord, FixityResult, WorkflowStore};

/// File rows read from the registry per round trip.
const PAGE: usize = 10_000;

/// Differences listed per copy; all are counted.
const LISTED: usize = 1_000;

/// What checking one copy found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopyCheck {
    pub copy: CopyKind,
    /// The directory or archive path that was read.
    pub location: String,
    #[serde(flatten)]
    pub outcome: CheckOutcome,
    /// Files compared (1 for the bundle).
    pub files: u64,
    /// Bytes read to compare them; `None` when the archive answered with a checksum it holds.
    pub bytes_read: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum CheckOutcome {
    /// Every byte matches the record.
    Intact,
    /// The first `LISTED` differences in path order, and how many there are in all.
    Differences {
        count: u64,
        differences: Vec<Difference>,
    },
    /// The copy could not be compared (there is none, or nothing recorded to compare it with).
    NotChecked { reason: String },
}

/// One way a copy differs from the record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Difference {
    /// The content differs: another checksum, or another size.
    Changed {
        path: String,
        expected_md5: Option<String>,
        found_md5: Option<String>,
        expected_size: Option<u64>,
        found_size: u64,
    },
    /// A recorded file is not there.
    Missing { path: String },
    /// A file the record does not hold.
    Unexpected { path: String },
    /// Something could not be read; the walk went on.
    Unreadable { error: String },
}

impl Difference {
    /// One line for people.
    pub fn describe(&self) -> String {
        match self {
            Difference::Changed {
                path,
                expected_md5,
                found_md5,
                expected_size,
                found_size,
            } => {
                if expected_size.is_some_and(|size| size != *found_size) {
                    format!(
                        "`{path}`: {found_size} bytes, the record says {}",
                        expected_size.unwrap_or_default()
                    )
                } else {
                    format!(
                        "`{path}`: MD5 {}, the record says {}",
                        found_md5.as_deref().unwrap_or("none"),
                        expected_md5.as_deref().unwrap_or("none")
                    )
                }
            }
            Difference::Missing { path } => format!("`{path}`: missing"),
            Difference::Unexpected { path } => format!("`{path}`: not in the record"),
            Difference::Unreadable { error } => error.clone(),
        }
    }
}

impl CopyCheck {
    fn not_checked(copy: CopyKind, location: &str, reason: String) -> CopyCheck {
        CopyCheck {
            copy,
            location: location.to_owned(),
            outcome: CheckOutcome::NotChecked { reason },
            files: 0,
            bytes_read: Some(0),
        }
    }

    pub fn is_intact(&self) -> bool {
        self.outcome == CheckOutcome::Intact
    }

    pub fn has_differences(&self) -> bool {
        matches!(self.outcome, CheckOutcome::Differences { .. })
    }
}

/// What ran a recorded check: the scheduled job, or `workers verify`.
pub const BY_JOB: &str = "fixity";
pub const BY_HAND: &str = "verify";

/// Differences spelled out in a record's detail and in the dataset's metadata; all are
/// counted.
const DETAILED: usize = 5;

impl CopyCheck {
    /// The record of this check of `dataset_id`, made at `at` by `by`.
    pub fn record(&self, dataset_id: DatasetId, at: DateTime<Utc>, by: &str) -> FixityRecord {
        let (result, differences, detail) = match &self.outcome {
            CheckOutcome::Intact => (FixityResult::Intact, 0, String::new()),
            CheckOutcome::Differences { count, differences } => {
                let mut lines: Vec<String> = differences
                    .iter()
                    .take(DETAILED)
                    .map(Difference::describe)
                    .collect();
                if *count > lines.len() as u64 {
                    lines.push(format!("and {} more", *count - lines.len() as u64));
                }
                (FixityResult::Differs, *count, lines.join("; "))
            }
            CheckOutcome::NotChecked { reason } => (FixityResult::NotChecked, 0, reason.clone()),
        };
        FixityRecord {
            dataset_id,
            copy: self.copy.as_str().to_owned(),
            checked_at: at,
            result,
            files: self.files,
            bytes_read: self.bytes_read.unwrap_or(0),
            differences,
            detail,
            by: by.to_owned(),
        }
    }
}

/// The record of a check of `copy` that could not be made (`error`).
pub fn failed_check(
    dataset_id: DatasetId,
    copy: CopyKind,
    at: DateTime<Utc>,
    by: &str,
    error: &anyhow::Error,
) -> FixityRecord {
    FixityRecord {
        dataset_id,
        copy: copy.as_str().to_owned(),
        checked_at: at,
        result: FixityResult::Error,
        files: 0,
        bytes_read: 0,
        differences: 0,
        detail: format!("{error:#}"),
        by: by.to_owned(),
    }
}

/// Raises the alert for the checks of `dataset` that found a difference, then records every
/// check: a difference is logged as an error, the dataset gets the state FIXITY_FAILED, and its
/// metadata (`metadata.fixity`, which the API and UI show) holds each copy's last verdict.
/// The metadata is written only when something differs or an earlier check wrote it (so that
/// a copy found intact again clears it); intact datasets keep their records in the store
/// alone. The alert goes first: a crash in between leaves the check unrecorded, so the
/// dataset stays first in line and is checked (and alerted) again.
pub async fn record(
    env: &StepEnv,
    store: &dyn WorkflowStore,
    dataset: &Dataset,
    records: &[FixityRecord],
) -> anyhow::Result<()> {
    let differing: Vec<&FixityRecord> = records
        .iter()
        .filter(|r| r.result == FixityResult::Differs)
        .collect();
    for record in &differing {
        error!(
            dataset_id = dataset.id,
            name = %dataset.name,
            copy = %record.copy,
            differences = record.differences,
            detail = %record.detail,
            "Fixity check failed: the copy differs from the dataset's record."
        );
    }
    if !differing.is_empty() {
        env.registry
            .add_state(dataset.id, DatasetState::FixityFailed)
            .await
            .with_context(|| format!("cannot mark dataset {} FIXITY_FAILED", dataset.id))?;
    }
    let verdicts: Map<String, Value> = records
        .iter()
        .filter(|r| r.result != FixityResult::Error)
        .map(|r| {
            (
                r.copy.clone(),
                json!({
                    "result": r.result.as_str(),
                    "checked_at": r.checked_at.to_rfc3339_opts(SecondsFormat::Secs, true),
                    "differences": r.differences,
                    "detail": r.detail,
                }),
            )
        })
        .collect();
    let alerted_before = dataset.metadata.get("fixity").is_some();
    if !verdicts.is_empty() && (!differing.is_empty() || alerted_before) {
        let patch = DatasetPatch {
            metadata: Some(json!({"fixity": {"copies": verdicts}})),
            ..DatasetPatch::default()
        };
        env.registry
            .update(dataset.id, &patch)
            .await
            .with_context(|| format!("cannot record the fixity of dataset {}", dataset.id))?;
    }
    store.record_fixity(records).await?;
    for record in records {
        crate::metrics::fixity_checked(
            CopyKind::from_name(&record.copy).map_or("other", CopyKind::as_str),
            record.result.as_str(),
            record.bytes_read,
        );
    }
    Ok(())
}

/// Why `dataset` has no `copy` to check (`has no source directory`), if it has none.
pub fn missing_copy(dataset: &Dataset, copy: CopyKind) -> Option<&'static str> {
    match copy {
        CopyKind::Source if dataset.origin_path.is_none() => Some("has no source directory"),
        CopyKind::Staged if !dataset.is_staged || dataset.staged_path.is_none() => {
            Some("is not staged")
        }
        CopyKind::Archive if dataset.archive_path.is_none() => Some("has not been archived"),
        _ => None,
    }
}

/// Checks each of `copies` of `dataset` in turn; a copy it does not have is not checked.
pub async fn verify(
    env: &StepEnv,
    dataset: &Dataset,
    copies: &[CopyKind],
    recall: RecallPolicy,
    cancel: &CancellationToken,
) -> anyhow::Result<Vec<CopyCheck>> {
    let mut checks = Vec::with_capacity(copies.len());
    for &copy in copies {
        if let Some(missing) = missing_copy(dataset, copy) {
            checks.push(CopyCheck::not_checked(
                copy,
                "",
                format!("the dataset {missing}"),
            ));
            continue;
        }
        let check = match copy {
            CopyKind::Archive => check_archive(env, dataset, recall, cancel).await?,
            CopyKind::Source => {
                check_tree(env, dataset, copy, dataset.origin_path.as_deref(), cancel).await?
            }
            CopyKind::Staged => {
                check_tree(env, dataset, copy, dataset.staged_path.as_deref(), cancel).await?
            }
        };
        checks.push(check);
    }
    Ok(checks)
}

/// The archived bundle against the bundle's recorded MD5 and size, through the archive backend:
/// a local file is read; HPSS answers with the checksum it holds, when it holds one, and the
/// bundle is recalled and read as `recall` says.
async fn check_archive(
    env: &StepEnv,
    dataset: &Dataset,
    recall: RecallPolicy,
    cancel: &CancellationToken,
) -> anyhow::Result<CopyCheck> {
    let copy = CopyKind::Archive;
    let path = dataset.archive_path.as_deref().unwrap_or_default();
    let Some(bundle) = &dataset.bundle else {
        return Ok(CopyCheck::not_checked(
            copy,
            path,
            "the record holds no bundle checksum".into(),
        ));
    };
    let found = match env.archive.stat(path, cancel).await {
        Ok(found) => found,
        Err(ArchiveError::NotFound(_)) => {
            return Ok(CopyCheck {
                copy,
                location: path.to_owned(),
                outcome: CheckOutcome::Differences {
                    count: 1,
                    differences: vec![Difference::Missing {
                        path: path.to_owned(),
                    }],
                },
                files: 1,
                bytes_read: Some(0),
            });
        }
        Err(err) => {
            return Err(anyhow::Error::new(err).context(format!(
                "cannot check the bundle of dataset {} at `{path}` in the {}",
                dataset.id,
                env.archive.describe()
            )));
        }
    };
    let recalls = !env.archive.reads_to_checksum()
        && match recall {
            RecallPolicy::Never => false,
            RecallPolicy::Missing => found.md5.is_none(),
            RecallPolicy::Always => true,
        };
    let (found, bytes_read) = if recalls {
        let recalled = recall_bundle(env, dataset, path, found.size, cancel).await?;
        (recalled, Some(recalled.size))
    } else {
        (found, env.archive.reads_to_checksum().then_some(found.size))
    };
    let Some(md5) = found.md5 else {
        return Ok(CopyCheck::not_checked(
            copy,
            path,
            format!(
                "the {} holds no checksum of the bundle, and fixity.recall is `never`",
                env.archive.describe()
            ),
        ));
    };
    let outcome = if md5 == bundle.md5 && found.size == bundle.size {
        CheckOutcome::Intact
    } else {
        CheckOutcome::Differences {
            count: 1,
            differences: vec![Difference::Changed {
                path: path.to_owned(),
                expected_md5: Some(bundle.md5.to_string()),
                found_md5: Some(md5.to_string()),
                expected_size: Some(bundle.size),
                found_size: found.size,
            }],
        }
    };
    Ok(CopyCheck {
        copy,
        location: path.to_owned(),
        outcome,
        files: 1,
        bytes_read,
    })
}

/// Fetches the bundle at `path` from the archive into the dataset type's bundle staging
/// directory, hashing it on the way, and removes the fetched file again whatever happens.
async fn recall_bundle(
    env: &StepEnv,
    dataset: &Dataset,
    path: &str,
    size: u64,
    cancel: &CancellationToken,
) -> anyhow::Result<ArchivedFile> {
    let dir = env
        .settings
        .paths
        .for_type(dataset.dataset_type)
        .bundle_stage
        .clone();
    // The recalled copy takes room on the staging file system like a staged bundle.
    let holder = format!("fixity-{}", uuid::Uuid::new_v4());
    let _space = capacity::admit_as(
        env,
        &holder,
        dataset.id,
        vec![capacity::Need {
            dir: dir.clone(),
            bytes: size,
        }],
        false,
    )
    .await
    .map_err(|err| {
        anyhow::format_err!(
            "no room to recall the bundle of dataset {} into `{}`: {:#}",
            dataset.id,
            dir.display(),
            err.error()
        )
    })?;
    let local = dir.join(format!(".fixity-{}-{holder}.tar", dataset.id));
    let fetched = env
        .archive
        .recall(path, &local, &Progress::new(), cancel)
        .await;
    let removed = local.clone();
    let fetched_size = blocking(move || {
        let size = std::fs::metadata(&removed).map(|m| m.len());
        if let Err(err) = std::fs::remove_file(&removed)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %removed.display(), error = %err, "Could not remove a recalled bundle.");
        }
        size
    })
    .await;
    let context = || {
        format!(
            "cannot recall the bundle of dataset {} from `{path}` in the {}",
            dataset.id,
            env.archive.describe()
        )
    };
    let md5 = fetched.map_err(|err| anyhow::Error::new(err).context(context()))?;
    Ok(ArchivedFile {
        size: fetched_size.with_context(context)?,
        md5: Some(md5),
    })
}

/// A directory tree (the source or the staged copy, at `root`) against the dataset's file rows:
/// every file re-read and hashed (in parallel, the way inspect reads), each compared with its
/// row, and the rows left over named as missing.
async fn check_tree(
    env: &StepEnv,
    dataset: &Dataset,
    copy: CopyKind,
    root: Option<&str>,
    cancel: &CancellationToken,
) -> anyhow::Result<CopyCheck> {
    let root = root.unwrap_or_default();
    let mut expected: HashMap<String, Expected> = HashMap::new();
    let mut pages = FilePages::new(env.registry.as_ref(), dataset.id, PAGE);
    while let Some(page) = pages.next().await? {
        expected.extend(page.into_iter().map(Expected::from_row));
    }
    if expected.is_empty() {
        return Ok(CopyCheck::not_checked(
            copy,
            root,
            "the record holds no file rows (the dataset was never inspected)".into(),
        ));
    }
    let root_path = PathBuf::from(root);
    let shown = root.to_owned();
    let (differences, unlisted, files, bytes) = env
        .pool
        .run_job(cancel, move |cancel| {
            compare_tree(&root_path, expected, cancel)
        })
        .await
        .map_err(|_| anyhow::format_err!("the check of `{shown}` was cancelled"))?
        .with_context(|| format!("cannot check `{shown}` of dataset {}", dataset.id))?;
    let outcome = if differences.is_empty() {
        CheckOutcome::Intact
    } else {
        let count = differences.len() as u64 + unlisted;
        let mut differences = differences;
        differences.sort();
        differences.truncate(LISTED);
        CheckOutcome::Differences { count, differences }
    };
    Ok(CopyCheck {
        copy,
        location: root.to_owned(),
        outcome,
        files,
        bytes_read: Some(bytes),
    })
}

/// What a file row says, kept by path while a tree is compared: the row without its path,
/// which is the map's key (at a million files the path is most of a row's memory).
struct Expected {
    md5: Option<Md5Digest>,
    size: Option<u64>,
    is_link: bool,
}

impl Expected {
    fn from_row(row: FileRecord) -> (String, Expected) {
        let expected = Expected {
            md5: row.md5,
            size: row.size,
            is_link: row.file_type == FileType::SymbolicLink,
        };
        (row.path, expected)
    }
}

/// Walks `root` as inspect does and compares what it finds with `expected`: the differences,
/// how many unreadable entries the walk counted beyond those it named, the files read and the
/// bytes hashed.
fn compare_tree(
    root: &Path,
    expected: HashMap<String, Expected>,
    cancel: &CancellationToken,
) -> std::io::Result<(Vec<Difference>, u64, u64, u64)> {
    let state = Mutex::new((expected, Vec::new()));
    let no_genome_types: [String; 0] = [];
    let summary = inspect_tree(
        root,
        &InspectOptions {
            genome_file_types: &no_genome_types,
            content_digests: false,
        },
        &|found: InspectRecord| {
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            let (expected, differences) = &mut *state;
            match expected.remove(&found.path) {
                None => differences.push(Difference::Unexpected { path: found.path }),
                Some(row) => {
                    if let Some(difference) = compare(&row, found) {
                        differences.push(difference);
                    }
                }
            }
        },
        &|_, _| {},
        cancel,
    )?;
    let (expected, mut differences) = state.into_inner().unwrap_or_else(|e| e.into_inner());
    // The walk names its first errors and counts the rest.
    let unlisted = summary.error_count - summary.errors.len() as u64;
    differences.extend(
        summary
            .errors
            .into_iter()
            .map(|error| Difference::Unreadable { error }),
    );
    differences.extend(
        expected
            .into_keys()
            .map(|path| Difference::Missing { path }),
    );
    Ok((differences, unlisted, summary.num_files, summary.size))
}

/// A row against what is there now; `None` when they agree.
fn compare(row: &Expected, found: InspectRecord) -> Option<Difference> {
    let row_is_link = row.is_link;
    let found_is_link = found.kind == RecordKind::Symlink;
    // A recorded link only has to be a link still; its target is not the dataset's content.
    if row_is_link && found_is_link {
        return None;
    }
    let same_size = row.size.is_none_or(|size| size == found.size);
    if row_is_link == found_is_link && same_size && row.md5 == found.md5 {
        return None;
    }
    Some(Difference::Changed {
        path: found.path,
        expected_md5: row.md5.map(|md5| md5.to_string()),
        found_md5: found.md5.map(|md5| md5.to_string()),
        expected_size: row.size,
        found_size: found.size,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::steps::testing::{TestEnv, write};
    use crate::steps::{archive, inspect, stage, validate};

    /// Makes `path` writable (archive and stage leave copies read-only) and rewrites it.
    fn tamper(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut bytes = std::fs::read(path).unwrap();
        change(&mut bytes);
        std::fs::write(path, bytes).unwrap();
    }

    fn differences(check: &CopyCheck) -> Vec<Difference> {
        match &check.outcome {
            CheckOutcome::Differences { differences, .. } => differences.clone(),
            other => panic!(
                "expected differences in the {:?} copy, got {other:?}",
                check.copy
            ),
        }
    }

    const ALL: [CopyKind; 3] = [CopyKind::Source, CopyKind::Staged, CopyKind::Archive];

    #[tokio::test(flavor = "multi_thread")]
    async fn every_copy_checks_intact_then_each_change_is_found_and_named() {
        let t = TestEnv::new();
        let big = vec![7u8; 70_000];
        let (id, source) = t
            .dataset(
                "run_1",
                &[
                    ("a.txt", b"alpha"),
                    ("sub/b.bin", &big),
                    ("sub/c.txt", b"gamma"),
                ],
            )
            .await;
        inspect::run(&t.context(id)).await.unwrap();
        archive::run(&t.context(id)).await.unwrap();
        stage::run(&t.context(id)).await.unwrap();
        validate::run(&t.context(id)).await.unwrap();
        let dataset = t.env.registry.get(id).await.unwrap();
        let cancel = CancellationToken::new();

        let checks = verify(&t.env, &dataset, &ALL, RecallPolicy::Never, &cancel)
            .await
            .unwrap();
        for check in &checks {
            assert!(check.is_intact(), "{check:?}");
        }
        assert_eq!((checks[0].files, checks[0].bytes_read), (3, Some(70_010)));
        let bundle = dataset.bundle.as_ref().unwrap();
        assert_eq!(
            checks[2].bytes_read,
            Some(bundle.size),
            "the local bundle is read"
        );

        // One bit of the archived bundle.
        let archived = PathBuf::from(dataset.archive_path.as_ref().unwrap());
        tamper(&archived, |bytes| {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 1;
        });
        // A staged file cut short.
        let staged = PathBuf::from(dataset.staged_path.as_ref().unwrap());
        tamper(&staged.join("sub/b.bin"), |bytes| bytes.truncate(1000));
        // A source file changed in place (same size), one removed, one added.
        tamper(&source.join("sub/c.txt"), |bytes| bytes[0] = b'G');
        std::fs::remove_file(source.join("a.txt")).unwrap();
        write(&source.join("new.txt"), b"new");

        let checks = verify(&t.env, &dataset, &ALL, RecallPolicy::Never, &cancel)
            .await
            .unwrap();
        let bundle_md5 = bundle.md5.to_string();
        assert!(matches!(
            &differences(&checks[2])[..],
            [Difference::Changed { path, expected_md5: Some(expected), found_md5: Some(found), .. }]
                if *path == archived.display().to_string() && *expected == bundle_md5 && *found != bundle_md5
        ));
        assert!(matches!(
            &differences(&checks[1])[..],
            [Difference::Changed { path, expected_size: Some(70_000), found_size: 1000, .. }]
                if path == "sub/b.bin"
        ));
        let source_differences = differences(&checks[0]);
        assert!(
            matches!(
                &source_differences[..],
                [
                    Difference::Changed { path: changed, found_size: 5, .. },
                    Difference::Missing { path: missing },
                    Difference::Unexpected { path: added },
                ] if changed == "sub/c.txt" && missing == "a.txt" && added == "new.txt"
            ),
            "{source_differences:?}"
        );
        assert_eq!(
            source_differences[0].describe().split(':').next(),
            Some("`sub/c.txt`")
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn copies_a_dataset_does_not_have_are_not_checked_and_say_why() {
        let t = TestEnv::new();
        let (id, _) = t.dataset("run_2", &[("a.txt", b"alpha")]).await;
        let cancel = CancellationToken::new();
        let dataset = t.env.registry.get(id).await.unwrap();
        let checks = verify(&t.env, &dataset, &ALL, RecallPolicy::Never, &cancel)
            .await
            .unwrap();
        let reasons: Vec<String> = checks
            .iter()
            .map(|check| match &check.outcome {
                CheckOutcome::NotChecked { reason } => reason.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            reasons,
            [
                "the record holds no file rows (the dataset was never inspected)",
                "the dataset is not staged",
                "the dataset has not been archived",
            ]
        );
    }
}

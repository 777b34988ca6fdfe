//! `purge_stale_uploaded` (spec C.5.4): removes what uploads leave in the upload directories:
//! abandoned sessions, their upload-session files and sidecars, and the payloads of uploads that
//! are archived.
//!
//! Nothing outside an upload root is ever removed: the upload roots are the parents of
//! `paths.<type>.upload`, and a payload is removed only when its real path (links resolved) is
//! a managed payload directory `<root>/{raw_data|data_products}/<id>/<name>`. A link inside an
//! upload root that points elsewhere is never followed.

use std::collections::HashSet;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};
use tracing::{error, info, warn};

use super::check_interrupted;
use crate::app::App;
use crate::cancel::CancellationToken;
use crate::compute::{self, remove_tree};
use crate::model::{CreateMethod, DatasetType};
use crate::registry::uploads::{UploadLogPatch, UploadQuery, UploadStatus};
use crate::registry::{DatasetId, DatasetQuery};

/// The directory of upload sidecars under each root.
const SIDECARS: &str = "uploaded_data";

#[derive(Debug, Clone, Default)]
pub struct PurgeUploadsReport {
    pub dry_run: bool,
    pub stale_uploading_failed: usize,
    pub session_files_removed: usize,
    pub sidecars_removed: usize,
    pub payloads_removed: usize,
    pub errors: usize,
    /// Every path removed (or, in a dry run, that would be).
    pub removed: Vec<PathBuf>,
}

impl PurgeUploadsReport {
    pub fn counters(&self) -> Map<String, Value> {
        let value = json!({
            "stale_uploading_failed": self.stale_uploading_failed,
            "session_files_removed": self.session_files_removed,
            "sidecars_removed": self.sidecars_removed,
            "payloads_removed": self.payloads_removed,
            "errors": self.errors,
        });
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }
}

pub async fn run(
    app: &App,
    dry_run: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<PurgeUploadsReport> {
    let mut report = PurgeUploadsReport {
        dry_run,
        ..PurgeUploadsReport::default()
    };
    let candidates: Vec<PathBuf> = [DatasetType::RawData, DatasetType::DataProduct]
        .into_iter()
        .filter_map(|t| {
            app.settings
                .paths
                .for_type(t)
                .upload
                .parent()
                .map(Path::to_path_buf)
        })
        .collect();
    let roots: Vec<PathBuf> = compute::blocking(move || {
        let mut seen = HashSet::new();
        candidates
            .into_iter()
            .filter_map(|root| fs::canonicalize(&root).ok())
            .filter(|root| root.is_dir() && seen.insert(root.clone()))
            .collect()
    })
    .await;
    if roots.is_empty() {
        info!("No upload directory exists; nothing to purge.");
        return Ok(report);
    }
    let purge = Purge {
        app,
        dry_run,
        roots,
    };
    if let Err(err) = purge.fail_stale_uploading(&mut report, cancel).await {
        report.errors += 1;
        error!(error = %format!("{err:#}"), "Could not fail stale uploads.");
    }
    check_interrupted(cancel)?;
    for root in &purge.roots {
        if let Err(err) = purge.session_files(root, &mut report).await {
            report.errors += 1;
            error!(root = %root.display(), error = %format!("{err:#}"), "Could not purge upload-session files.");
        }
    }
    check_interrupted(cancel)?;
    if let Err(err) = purge.sidecars(&mut report, cancel).await {
        report.errors += 1;
        error!(error = %format!("{err:#}"), "Could not purge upload sidecars.");
    }
    check_interrupted(cancel)?;
    if let Err(err) = purge.archived_payloads(&mut report, cancel).await {
        report.errors += 1;
        error!(error = %format!("{err:#}"), "Could not purge archived upload payloads.");
    }
    Ok(report)
}

struct Purge<'a> {
    app: &'a App,
    dry_run: bool,
    /// Canonical, existing.
    roots: Vec<PathBuf>,
}

impl Purge<'_> {
    /// 1. Uploads still UPLOADING long after their last change: PERMANENTLY_FAILED, and their
    ///    session files and payload removed.
    async fn fail_stale_uploading(
        &self,
        report: &mut PurgeUploadsReport,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let days = self.app.settings.uploads.purge.stale_uploading_days;
        let stale = self
            .app
            .registry
            .uploads(&UploadQuery::Expired {
                status: UploadStatus::Uploading,
                age_days: days,
            })
            .await?;
        for upload in stale {
            check_interrupted(cancel)?;
            let id = upload.dataset_id;
            let Some(log) = self.app.registry.upload_log(id).await? else {
                continue;
            };
            if log.status != UploadStatus::Uploading {
                continue;
            }
            info!(
                dataset_id = id,
                dry_run = self.dry_run,
                "Upload still UPLOADING after {days} days: PERMANENTLY_FAILED."
            );
            if !self.dry_run {
                let mut metadata = Map::new();
                metadata.insert(
                    "failure_reason".into(),
                    json!(format!(
                        "Upload abandoned: still UPLOADING after {days} days"
                    )),
                );
                self.app
                    .registry
                    .update_upload_log(
                        id,
                        &UploadLogPatch::status(UploadStatus::PermanentlyFailed)
                            .with_metadata(metadata),
                    )
                    .await?;
            }
            report.stale_uploading_failed += 1;
            if let Some(process_id) = log.process_id.as_deref().filter(|p| is_plain_name(p)) {
                for root in &self.roots {
                    for name in [process_id.to_owned(), format!("{process_id}.json")] {
                        let path = root.join(name);
                        if self.remove(&path, report).await? {
                            report.session_files_removed += 1;
                        }
                    }
                }
            }
            if let Some(origin) = &log.origin_path
                && let Some(payload) = self.managed_payload(origin, id).await
                && self.remove(&payload, report).await?
            {
                report.payloads_removed += 1;
            }
        }
        Ok(())
    }

    /// 2. Upload-session files at the top of a root (`<32 hex>`, `<32 hex>.json`) older than
    ///    `uploads.purge.ttl_days`. Directories and links are never touched.
    async fn session_files(
        &self,
        root: &Path,
        report: &mut PurgeUploadsReport,
    ) -> anyhow::Result<()> {
        let ttl = Duration::from_secs_f64(self.app.settings.uploads.purge.ttl_days * 86_400.0);
        let root = root.to_path_buf();
        let old: Vec<PathBuf> = compute::blocking(move || -> anyhow::Result<Vec<PathBuf>> {
            let cutoff = SystemTime::now() - ttl;
            let mut old = Vec::new();
            for entry in fs::read_dir(&root)? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if !is_session_file_name(name) {
                    continue;
                }
                let meta = entry.metadata()?;
                if meta.file_type().is_file() && meta.modified()? < cutoff {
                    old.push(entry.path());
                }
            }
            Ok(old)
        })
        .await?;
        for path in old {
            if self.remove(&path, report).await? {
                report.session_files_removed += 1;
            }
        }
        Ok(())
    }

    /// 3. `uploaded_data/<dataset id>/*.json` of uploads that ended or that the registry does
    ///    not know; then the directories this left empty.
    async fn sidecars(
        &self,
        report: &mut PurgeUploadsReport,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let ended: HashSet<DatasetId> = self
            .app
            .registry
            .uploads(&UploadQuery::ByStatus(vec![
                UploadStatus::Complete,
                UploadStatus::PermanentlyFailed,
                UploadStatus::UploadFailed,
                UploadStatus::VerificationFailed,
            ]))
            .await?
            .into_iter()
            .map(|u| u.dataset_id)
            .collect();
        for root in &self.roots {
            let dir = root.join(SIDECARS);
            let listed = dir.clone();
            let entries: Vec<(DatasetId, PathBuf, Vec<PathBuf>)> =
                compute::blocking(move || -> anyhow::Result<_> {
                    let mut out = Vec::new();
                    let entries = match fs::read_dir(&listed) {
                        Ok(entries) => entries,
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                        Err(err) => return Err(err.into()),
                    };
                    for entry in entries {
                        let entry = entry?;
                        let Some(id) = entry
                            .file_name()
                            .to_str()
                            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                            .and_then(|n| n.parse::<DatasetId>().ok())
                        else {
                            continue;
                        };
                        // A link to a directory elsewhere is not an upload's directory.
                        if !entry.file_type()?.is_dir() {
                            continue;
                        }
                        let mut jsons = Vec::new();
                        for file in fs::read_dir(entry.path())? {
                            let file = file?;
                            if file.file_type()?.is_file()
                                && file.path().extension().is_some_and(|e| e == "json")
                            {
                                jsons.push(file.path());
                            }
                        }
                        out.push((id, entry.path(), jsons));
                    }
                    Ok(out)
                })
                .await?;
            for (id, id_dir, jsons) in entries {
                check_interrupted(cancel)?;
                let remove = if ended.contains(&id) {
                    true
                } else {
                    match self.app.registry.upload_log(id).await {
                        Ok(None) => true,
                        Ok(Some(_)) => false,
                        Err(err) => {
                            report.errors += 1;
                            warn!(dataset_id = id, error = %format!("{:#}", anyhow::Error::new(err)), "Could not read the upload log; its sidecars are kept.");
                            false
                        }
                    }
                };
                if !remove {
                    continue;
                }
                for json in jsons {
                    if self.remove(&json, report).await? {
                        report.sidecars_removed += 1;
                    }
                }
                if !self.dry_run {
                    remove_if_empty(id_dir).await;
                }
            }
            if !self.dry_run {
                remove_if_empty(dir).await;
            }
        }
        Ok(())
    }

    /// 4. The payloads of uploads that are archived: the archive holds them now.
    async fn archived_payloads(
        &self,
        report: &mut PurgeUploadsReport,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let datasets = self
            .app
            .registry
            .find(&DatasetQuery {
                create_method: Some(CreateMethod::Upload),
                include_deleted: true,
                ..DatasetQuery::default()
            })
            .await?;
        for dataset in datasets {
            check_interrupted(cancel)?;
            if dataset.archive_path.is_none() {
                continue;
            }
            let Some(origin) = &dataset.origin_path else {
                continue;
            };
            if let Some(payload) = self.managed_payload(origin, dataset.id).await
                && self.remove(&payload, report).await?
            {
                report.payloads_removed += 1;
            }
        }
        Ok(())
    }

    /// The real path of `origin` when it is a managed payload directory of dataset `id`:
    /// `<root>/{raw_data|data_products}/<id>/<name>` below one of the roots, links resolved.
    async fn managed_payload(&self, origin: &str, id: DatasetId) -> Option<PathBuf> {
        let origin = PathBuf::from(origin);
        let roots = self.roots.clone();
        compute::blocking(move || {
            let real = fs::canonicalize(&origin).ok()?;
            if !real.is_dir() {
                return None;
            }
            let found = roots
                .iter()
                .find_map(|root| is_managed_payload(root, &real, id).then(|| real.clone()));
            if found.is_none() {
                warn!(dataset_id = id, origin = %origin.display(), real = %real.display(),
                    "The upload's origin is not a payload directory of an upload root; it is left alone.");
            }
            found
        })
        .await
    }

    /// Removes a file or tree (or, in a dry run, only reports it); whether it existed.
    async fn remove(&self, path: &Path, report: &mut PurgeUploadsReport) -> anyhow::Result<bool> {
        let (target, dry_run) = (path.to_path_buf(), self.dry_run);
        let existed = compute::blocking(move || -> std::io::Result<bool> {
            if fs::symlink_metadata(&target).is_err() {
                return Ok(false);
            }
            if !dry_run {
                remove_tree(&target, &CancellationToken::new())?;
            }
            Ok(true)
        })
        .await
        .map_err(|err| anyhow::format_err!("cannot remove {}: {err}", path.display()))?;
        if existed {
            info!(path = %path.display(), dry_run = self.dry_run, "Removed an upload leftover.");
            report.removed.push(path.to_path_buf());
        }
        Ok(existed)
    }
}

/// Whether `real` (canonical) is `<root>/{raw_data|data_products}/<id>/<name>[/...]`.
fn is_managed_payload(root: &Path, real: &Path, id: DatasetId) -> bool {
    let Ok(below) = real.strip_prefix(root) else {
        return false;
    };
    let parts: Vec<&str> = below
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => part.to_str(),
            _ => None,
        })
        .collect();
    parts.len() >= 3
        && matches!(parts[0], "raw_data" | "data_products")
        && parts[1] == id.to_string()
}

/// An upload-session file name: 32 lowercase hex digits, optionally with `.json`.
fn is_session_file_name(name: &str) -> bool {
    let stem = name.strip_suffix(".json").unwrap_or(name);
    stem.len() == 32 && stem.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A single path component that names something inside a directory.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

async fn remove_if_empty(dir: PathBuf) {
    compute::blocking(move || {
        // Fails, as wanted, when the directory is not empty.
        let _ = fs::remove_dir(&dir);
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_file_names_are_32_hex_digits() {
        assert!(is_session_file_name("0123456789abcdef0123456789abcdef"));
        assert!(is_session_file_name(
            "0123456789abcdef0123456789abcdef.json"
        ));
        assert!(!is_session_file_name("0123456789ABCDEF0123456789abcdef"));
        assert!(!is_session_file_name("0123456789abcdef0123456789abcde"));
        assert!(!is_session_file_name("uploaded_data"));
    }

    #[test]
    fn managed_payloads_are_three_levels_below_a_root_with_the_id() {
        let root = Path::new("/u");
        assert!(is_managed_payload(root, Path::new("/u/raw_data/7/run"), 7));
        assert!(is_managed_payload(
            root,
            Path::new("/u/data_products/7/run/sub"),
            7
        ));
        assert!(!is_managed_payload(root, Path::new("/u/raw_data/8/run"), 7));
        assert!(!is_managed_payload(root, Path::new("/u/raw_data/7"), 7));
        assert!(!is_managed_payload(root, Path::new("/u/other/7/run"), 7));
        assert!(!is_managed_payload(
            root,
            Path::new("/elsewhere/raw_data/7/run"),
            7
        ));
    }

    #[test]
    fn process_ids_must_be_plain_names() {
        assert!(is_plain_name("abc"));
        assert!(!is_plain_name("../etc"));
        assert!(!is_plain_name(".."));
        assert!(!is_plain_name(""));
    }
}

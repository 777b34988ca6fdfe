//! `populate_bundles` (spec C.8): records the bundle (name, size, MD5) of archived datasets
//! that have none, as the archive holds it.
//!
//! The size is the archived file's own, not the dataset's `du_size` the original recorded
//! (spec C.8 [GAP]), and the MD5 is the one HPSS stored with the file (`hashlist`), or for a
//! local archive one computed by reading it. `is_staged` is left alone: the original cleared
//! it, which would make a staged copy look purged. A dry run reads the archive and records
//! nothing.

use tracing::{info, warn};

use super::{Interrupted, check_interrupted};
use crate::app::App;
use crate::archive::ArchiveError;
use crate::cancel::CancellationToken;
use crate::model::Bundle;
use crate::registry::{DatasetPatch, DatasetQuery};

/// A dataset and what was done with it.
#[derive(Debug, Clone)]
pub struct BundleItem {
    pub id: i64,
    pub name: String,
    pub archive_path: String,
    /// The bundle recorded (or, in a dry run, that would be).
    pub bundle: Option<Bundle>,
    /// Why no bundle was recorded.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct BundlesReport {
    pub dry_run: bool,
    pub recorded: Vec<BundleItem>,
    /// Nothing to record from: missing from the archive, or archived without a checksum.
    pub skipped: Vec<BundleItem>,
    /// The archive or the registry failed; the next run tries again.
    pub failed: Vec<BundleItem>,
}

pub async fn run(
    app: &App,
    dry_run: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<BundlesReport> {
    // The registry's filters cannot say "archived without a bundle"; the datasets come with
    // their bundles, so the choice is made here.
    let datasets = app.registry.find(&DatasetQuery::default()).await?;
    let mut report = BundlesReport {
        dry_run,
        ..BundlesReport::default()
    };
    for dataset in datasets {
        let Some(archive_path) = dataset.archive_path.clone() else {
            continue;
        };
        if dataset.bundle.is_some() {
            continue;
        }
        check_interrupted(cancel)?;
        let mut item = BundleItem {
            id: dataset.id,
            name: dataset.name.to_string(),
            archive_path: archive_path.clone(),
            bundle: None,
            reason: None,
        };
        let stat = match app.archive.stat(&archive_path, cancel).await {
            Ok(stat) => stat,
            Err(ArchiveError::Cancelled) => return Err(Interrupted.into()),
            Err(err @ (ArchiveError::NotFound(_) | ArchiveError::Invalid(_))) => {
                item.reason = Some(format!("{:#}", anyhow::Error::new(err)));
                report.skipped.push(item);
                continue;
            }
            Err(err) => {
                let message = format!("{:#}", anyhow::Error::new(err));
                warn!(dataset_id = dataset.id, archive_path = %archive_path, error = %message,
                    "Cannot read the archived bundle.");
                item.reason = Some(message);
                report.failed.push(item);
                continue;
            }
        };
        let Some(md5) = stat.md5 else {
            item.reason = Some(format!(
                "`{archive_path}` was archived without a checksum (hashlist prints (none))"
            ));
            report.skipped.push(item);
            continue;
        };
        let bundle = Bundle {
            name: dataset.name.bundle_file_name(),
            size: stat.size,
            md5,
        };
        item.bundle = Some(bundle.clone());
        if !dry_run {
            let patch = DatasetPatch {
                bundle: Some(bundle),
                ..DatasetPatch::default()
            };
            if let Err(err) = app.registry.update(dataset.id, &patch).await {
                item.reason = Some(format!("{:#}", anyhow::Error::new(err)));
                report.failed.push(item);
                continue;
            }
            info!(dataset_id = dataset.id, archive_path = %archive_path, size = stat.size, md5 = %md5,
                "Recorded the bundle.");
        }
        report.recorded.push(item);
    }
    Ok(report)
}

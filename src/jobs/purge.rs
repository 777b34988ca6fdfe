//! `purge_staged_datasets` (spec C.2) and `purge_stale_workflows` (spec C.3).
//!
//! Unlike the original, purging a staged dataset also removes its download links (they would
//! be left dangling, spec C.2) and read-only trees, and records the purge before it removes
//! anything; stale workflows are found page by page instead of with a
//! list of every workflow id (spec J.25).

use std::path::PathBuf;

use chrono::{TimeDelta, Utc};
use tracing::{info, warn};

use super::check_interrupted;
use crate::app::App;
use crate::cancel::CancellationToken;
use crate::compute::blocking;
use crate::model::DatasetType;
use crate::registry::DatasetQuery;
use crate::steps::capacity::{file_systems_of, free_staging, purge_staged_copy};
use crate::store::PageCursor;

#[derive(Debug, Clone, Default)]
pub struct StagedPurgeReport {
    /// Datasets purged (or that a dry run would purge): id and name.
    pub purged: Vec<(i64, String)>,
    /// Datasets purged because their staging file system was above its high watermark.
    pub purged_by_fill: Vec<(i64, String)>,
    /// Staging file systems above their high watermark, with the percent used (after a dry
    /// run: as found).
    pub over_watermark: Vec<(String, f64)>,
    /// Datasets over the limit, left for the next run.
    pub deferred: usize,
    pub failed: Vec<(i64, String)>,
}

/// Removes the staged copies of datasets last staged more than `stage.purge.days_to_live` days
/// ago, at most `stage.purge.max_purges` per run.
pub async fn purge_staged(
    app: &App,
    dry_run: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<StagedPurgeReport> {
    let days = i64::from(app.settings.stage.days_to_live);
    let cutoff = Utc::now() - TimeDelta::days(days);
    let query = DatasetQuery {
        staged_before: Some(cutoff),
        ..Default::default()
    };
    let mut due = app.registry.find(&query).await?;
    // Oldest first: the longest-staged go first when there are more than the limit.
    due.sort_by_key(|d| d.updated_at);
    let limit = app.settings.stage.max_purges as usize;
    let mut report = StagedPurgeReport::default();
    if due.len() > limit {
        warn!(
            due = due.len(),
            limit, "More staged datasets are due for purging than one run purges."
        );
        report.deferred = due.len() - limit;
        due.truncate(limit);
    }
    for dataset in due {
        check_interrupted(cancel)?;
        if dry_run {
            report.purged.push((dataset.id, dataset.name.to_string()));
            continue;
        }
        match purge_staged_copy(&app.step_env(), &dataset).await {
            Ok(()) => {
                info!(dataset_id = dataset.id, name = %dataset.name, "Purged the staged copy.");
                report.purged.push((dataset.id, dataset.name.to_string()));
            }
            Err(err) => {
                warn!(dataset_id = dataset.id, error = %format!("{err:#}"), "Could not purge the staged copy.");
                report.failed.push((dataset.id, format!("{err:#}")));
            }
        }
    }
    purge_by_fill(app, dry_run, &mut report).await?;
    Ok(report)
}

/// Staging file systems fuller than `stage.purge.high_watermark_percent` lose their longest
/// staged copies (staged at least `min_age_hours` ago) until they are at most
/// `low_watermark_percent` full.
async fn purge_by_fill(
    app: &App,
    dry_run: bool,
    report: &mut StagedPurgeReport,
) -> anyhow::Result<()> {
    let Some((high, low)) = app.settings.stage.watermarks else {
        return Ok(());
    };
    let env = app.step_env();
    let dirs: Vec<(String, PathBuf)> = DatasetType::ALL
        .iter()
        .map(|t| {
            (
                format!("paths.{t}.stage"),
                app.settings.paths.for_type(*t).stage.clone(),
            )
        })
        .collect();
    let (spaces, unreadable) = blocking(move || file_systems_of(dirs)).await;
    if let Some((key, err)) = unreadable.into_iter().next() {
        return Err(err.context(format!("cannot read the file system of {key}")));
    }
    for (space, _) in spaces {
        let used = space.used_percent();
        if used <= f64::from(high) {
            continue;
        }
        warn!(fs = %space.mount.display(), used_percent = format!("{used:.1}"), high_watermark_percent = high,
            "A staging file system is above its high watermark; purging the longest staged copies.");
        report
            .over_watermark
            .push((space.mount.display().to_string(), used));
        if dry_run {
            continue;
        }
        // Purging moves bytes from used to free; their sum stays.
        let usable = space.used.saturating_add(space.free);
        let wanted_free = usable / 100 * u64::from(100 - low);
        let purged = free_staging(
            &env,
            &space.mount,
            wanted_free,
            None,
            &app.identity.holder(),
        )
        .await?;
        report.purged_by_fill.extend(purged);
    }
    Ok(())
}

#[derive(Debug, Clone, Default)]
pub struct WorkflowPurgeReport {
    /// Workflows deleted (or that a dry run would delete).
    pub purged: Vec<String>,
}

/// Workflows looked at per page.
const PAGE: usize = 500;

/// Deletes workflows of the configured names that are older than the age threshold and linked
/// to no dataset (the leftovers of failed registrations), at most `max_purge_count` per run.
pub async fn purge_stale_workflows(
    app: &App,
    dry_run: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<WorkflowPurgeReport> {
    let settings = &app.settings.workflow_purge;
    let cutoff = Utc::now() - TimeDelta::seconds(settings.age_threshold_seconds as i64);
    let mut report = WorkflowPurgeReport::default();
    let mut after: Option<PageCursor> = None;
    while report.purged.len() < settings.max_purge_count {
        let page = app
            .store
            .workflows_created_before(&settings.types, cutoff, after.as_ref(), PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(PageCursor::after(last));
        let ids: Vec<String> = page.iter().map(|w| w.id.clone()).collect();
        let linked = app.registry.linked_workflows(&ids).await?;
        for id in ids.into_iter().filter(|id| !linked.contains(id)) {
            if report.purged.len() >= settings.max_purge_count {
                break;
            }
            check_interrupted(cancel)?;
            if !dry_run {
                app.store.delete_workflow(&id).await?;
                info!(workflow_id = %id, "Deleted a stale workflow.");
            }
            report.purged.push(id);
        }
    }
    Ok(report)
}

//! `fixity`: re-reads the copies of archived datasets, the longest unchecked first, within a
//! byte budget per run, so that every archived dataset is verified once in the configured
//! period; each check is recorded and a difference raises the alert (`fixity::record`).
//!
//! A dataset falls due when its last check would be older than the period by the next run (so
//! it is checked in time, not a run late); with `period_days = 0` every run goes on with the
//! longest unchecked as far as its budget goes. The order is the store's: datasets never
//! checked first, then by their last check. A run that stops (its budget spent, the scheduler
//! stopping) leaves the rest first in line for the next run, so runs resume where the last one
//! stopped without keeping a cursor. A check that fails to read (the archive unreachable) does
//! not move the dataset back in line.

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::check_interrupted;
use crate::app::App;
use crate::cancel::CancellationToken;
use crate::config::{FixitySettings, RecallPolicy};
use crate::fixity::{self, BY_JOB, CopyKind};
use crate::registry::{Dataset, DatasetQuery};
use crate::store::{FixityRecord, FixityResult, FixityStanding};

/// A dataset the run checked (or that a dry run would check).
#[derive(Debug, Clone)]
pub struct FixityItem {
    pub id: i64,
    pub name: String,
    /// The result of each copy checked; empty in a dry run.
    pub results: Vec<(String, FixityResult)>,
    /// Bytes read; in a dry run, the bytes the check is expected to read.
    pub bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct FixityReport {
    pub dry_run: bool,
    pub checked: Vec<FixityItem>,
    /// Datasets left for the next run: the run's byte budget was spent.
    pub deferred: usize,
    /// Datasets checked recently enough that they are not due yet.
    pub not_due: usize,
    /// Archived datasets not verified within the period (after this run).
    pub overdue: usize,
    /// Archived datasets whose last verdict on some copy is a difference (after this run).
    pub failing: usize,
    /// Copies whose check could not be made or recorded; tried again first by the next run.
    pub errors: usize,
}

impl FixityReport {
    pub fn bytes_read(&self) -> u64 {
        self.checked.iter().map(|item| item.bytes).sum()
    }

    /// Copies checked with `result`.
    pub fn count(&self, result: FixityResult) -> usize {
        self.checked
            .iter()
            .flat_map(|item| &item.results)
            .filter(|(_, r)| *r == result)
            .count()
    }
}

pub async fn run(
    app: &App,
    dry_run: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<FixityReport> {
    let settings = &app.settings.fixity;
    let mut datasets: Vec<Dataset> = app
        .registry
        .find(&DatasetQuery::default())
        .await?
        .into_iter()
        .filter(|d| d.archive_path.is_some() && !copies_of(settings, d).is_empty())
        .collect();
    // Every archived dataset, due or not: what `overdue` and `failing` are counted over.
    let archived: Vec<i64> = datasets.iter().map(|d| d.id).collect();
    let standings = app.store.fixity_standings().await?;
    let now = Utc::now();
    let mut report = FixityReport {
        dry_run,
        ..FixityReport::default()
    };
    if let Some(period) = settings.period {
        // Due: checked too long ago to be still within the period at the next run.
        let until_next = until_next_run(app, now);
        let due_before = now - chrono::Duration::from_std(period).unwrap_or_default() + until_next;
        let all = datasets.len();
        datasets.retain(|d| {
            standings
                .get(&d.id)
                .and_then(|s| s.checked_at)
                .is_none_or(|at| at < due_before)
        });
        report.not_due = all - datasets.len();
    }
    // Never checked first (`None` sorts first), then the longest unchecked; ties by id.
    datasets.sort_by_key(|d| (standings.get(&d.id).and_then(|s| s.checked_at), d.id));

    let env = app.step_env();
    let mut spent: u64 = 0;
    for (position, dataset) in datasets.iter().enumerate() {
        check_interrupted(cancel)?;
        let copies = copies_of(settings, dataset);
        let expected = expected_read(app, settings, dataset, &copies);
        if let Some(budget) = settings.bytes_per_run {
            if spent > 0 && spent.saturating_add(expected) > budget {
                report.deferred = datasets.len() - position;
                break;
            }
            if expected > budget {
                warn!(dataset_id = dataset.id, name = %dataset.name, bytes = expected, budget,
                    "The dataset is larger than fixity.bytes_per_run; it is checked alone in this run.");
            }
        }
        if dry_run {
            spent += expected;
            report.checked.push(FixityItem {
                id: dataset.id,
                name: dataset.name.to_string(),
                results: Vec::new(),
                bytes: expected,
            });
            continue;
        }
        let records = check_dataset(&env, dataset, &copies, settings.recall, cancel).await?;
        let bytes: u64 = records.iter().map(|r| r.bytes_read).sum();
        spent += bytes;
        report.errors += records
            .iter()
            .filter(|r| r.result == FixityResult::Error)
            .count();
        if let Err(err) = fixity::record(&env, app.store.as_ref(), dataset, &records).await {
            warn!(dataset_id = dataset.id, error = %format!("{err:#}"),
                "Could not record the fixity check; the next run checks the dataset again.");
            report.errors += 1;
        }
        let results: Vec<(String, FixityResult)> =
            records.iter().map(|r| (r.copy.clone(), r.result)).collect();
        info!(dataset_id = dataset.id, name = %dataset.name, bytes,
            results = %results.iter().map(|(c, r)| format!("{c}: {}", r.as_str())).collect::<Vec<_>>().join(", "),
            "Fixity checked.");
        report.checked.push(FixityItem {
            id: dataset.id,
            name: dataset.name.to_string(),
            results,
            bytes,
        });
    }

    let standings = if dry_run {
        standings
    } else {
        app.store.fixity_standings().await?
    };
    // Without a period, a dataset is overdue only while it has never been verified.
    let verified_after = settings.period.map_or(DateTime::<Utc>::MIN_UTC, |period| {
        Utc::now() - chrono::Duration::from_std(period).unwrap_or_default()
    });
    report.overdue = archived
        .iter()
        .filter(|id| is_overdue(standings.get(id), verified_after))
        .count();
    report.failing = archived
        .iter()
        .filter(|id| standings.get(id).is_some_and(|s| s.failing))
        .count();
    if !dry_run {
        crate::metrics::fixity_standing(report.overdue as u64, report.failing as u64);
    }
    if report.overdue > 0 {
        warn!(
            overdue = report.overdue,
            period_days = settings.period.map_or(0, |p| p.as_secs() / 86_400),
            "Archived datasets have not been verified within fixity.period_days; \
             fixity.bytes_per_run may be too small, or the job runs too rarely."
        );
    }
    Ok(report)
}

/// The time from `now` to the job's next scheduled run; zero when it is not scheduled.
fn until_next_run(app: &App, now: DateTime<Utc>) -> chrono::Duration {
    app.settings
        .schedule(crate::jobs::JobName::Fixity)
        .filter(|s| s.enabled)
        .and_then(|s| s.next_slot(now))
        .map_or(chrono::Duration::zero(), |next| {
            (next - now).max(chrono::Duration::zero())
        })
}

/// The configured copies `dataset` has.
fn copies_of(settings: &FixitySettings, dataset: &Dataset) -> Vec<CopyKind> {
    settings
        .copies
        .iter()
        .copied()
        .filter(|copy| fixity::missing_copy(dataset, *copy).is_none())
        .collect()
}

/// The bytes checking `copies` of `dataset` is expected to read: a tree's size, the bundle's
/// size where the archive reads it (a local archive) or it is recalled every time. A recall
/// `missing` asks for cannot be foreseen; its bytes count once read.
fn expected_read(
    app: &App,
    settings: &FixitySettings,
    dataset: &Dataset,
    copies: &[CopyKind],
) -> u64 {
    let tree = dataset.size.or(dataset.du_size).unwrap_or(0);
    let bundle = dataset
        .bundle
        .as_ref()
        .map(|b| b.size)
        .or(dataset.bundle_size)
        .unwrap_or(tree);
    copies
        .iter()
        .map(|copy| match copy {
            CopyKind::Source | CopyKind::Staged => tree,
            CopyKind::Archive
                if app.archive.reads_to_checksum() || settings.recall == RecallPolicy::Always =>
            {
                bundle
            }
            CopyKind::Archive => 0,
        })
        .sum()
}

/// Checks each copy on its own, so that one that cannot be read is recorded as an error and
/// the others are still checked.
async fn check_dataset(
    env: &crate::steps::StepEnv,
    dataset: &Dataset,
    copies: &[CopyKind],
    recall: RecallPolicy,
    cancel: &CancellationToken,
) -> anyhow::Result<Vec<FixityRecord>> {
    let mut records = Vec::with_capacity(copies.len());
    for &copy in copies {
        let checked = fixity::verify(env, dataset, &[copy], recall, cancel).await;
        check_interrupted(cancel)?;
        let at = Utc::now();
        match checked {
            Ok(checks) => records.extend(checks.iter().map(|c| c.record(dataset.id, at, BY_JOB))),
            Err(err) => {
                warn!(dataset_id = dataset.id, copy = copy.as_str(), error = %format!("{err:#}"),
                    "Could not check the copy; the next run tries again first.");
                records.push(fixity::failed_check(dataset.id, copy, at, BY_JOB, &err));
            }
        }
    }
    Ok(records)
}

/// Whether a dataset with `standing` was last verified before `verified_after` (or never).
fn is_overdue(standing: Option<&FixityStanding>, verified_after: DateTime<Utc>) -> bool {
    standing
        .and_then(|s| s.verified_at)
        .is_none_or(|at| at < verified_after)
}

//! The jobs: `watch` (scan source directories and register new datasets) and `register`
//! (register directories on demand). The scheduler decides when jobs run; these modules
//! decide what a run does.

pub mod bundles;
pub mod fixity;
pub mod manage_uploads;
pub mod metrics;
pub mod purge;
pub mod purge_uploads;
pub mod reconcile;
pub mod register;
pub mod watch;

/// The job names live in `names`, which every layer may use.
pub use crate::names::JobName;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use tracing::{error, info, warn};

use crate::app::App;
use crate::cancel::CancellationToken;
use crate::registry::{BulkOutcome, Dataset, DatasetId, MAX_BULK, NewDataset};
use crate::store::{RunOutcome, Trigger};
use crate::workflow::engine;

/// A dataset registered by a job, and the workflow started for it (when it could be).
#[derive(Debug, Clone)]
pub struct Registered {
    pub id: DatasetId,
    pub name: String,
    pub workflow_id: Option<String>,
}

/// Creates `items` in batches of at most `MAX_BULK` and starts the `integrated` workflow for
/// each created dataset. The created datasets are reported as `Registered` only (the returned
/// outcome's `created` stays empty), so a run of 100,000 keeps no 100,000 full records. A
/// batch that fails is reported in the returned errors (with the names it held) and left for
/// the next run; a workflow that fails to start is logged and left for the repair pass.
pub async fn register_and_start(
    app: &App,
    items: &[NewDataset],
    cancel: &CancellationToken,
) -> (Vec<Registered>, BulkOutcome, Vec<(String, String)>) {
    let mut registered = Vec::new();
    let mut outcome = BulkOutcome::default();
    let mut failed = Vec::new();
    for batch in items.chunks(MAX_BULK) {
        if cancel.is_cancelled() {
            // Not attempted: tried again by the next run, like a batch that failed.
            failed.extend(
                batch
                    .iter()
                    .map(|item| (item.name.to_string(), Interrupted.to_string())),
            );
            continue;
        }
        let result = match app.registry.bulk_create(batch).await {
            Ok(result) => result,
            Err(err) => {
                let message = format!("{:#}", anyhow::Error::new(err));
                error!(datasets = batch.len(), error = %message, "Could not register a batch of datasets.");
                failed.extend(
                    batch
                        .iter()
                        .map(|item| (item.name.to_string(), message.clone())),
                );
                continue;
            }
        };
        let started = start_integrated_many(app, &result.created).await;
        for (dataset, workflow_id) in result.created.iter().zip(started) {
            registered.push(Registered {
                id: dataset.id,
                name: dataset.name.to_string(),
                workflow_id,
            });
        }
        outcome.conflicted.extend(result.conflicted);
        outcome.errored.extend(result.errored);
    }
    (registered, outcome, failed)
}

/// Starts `integrated` for a dataset; on failure logs it and returns `None` (the dataset is
/// left without a workflow, which the repair pass of the next `watch` run finds). A dataset
/// whose `integrated` workflow another process has just started keeps that one.
pub async fn start_integrated(app: &App, dataset: &Dataset) -> Option<String> {
    start_integrated_many(app, std::slice::from_ref(dataset))
        .await
        .pop()
        .flatten()
}

/// `start_integrated` for many datasets, in one batch of the engine's (`engine::start_many`);
/// the workflow started (or found active) for each, in order.
pub async fn start_integrated_many(app: &App, datasets: &[Dataset]) -> Vec<Option<String>> {
    let ids: Vec<DatasetId> = datasets.iter().map(|d| d.id).collect();
    let mut outcomes: std::collections::HashMap<DatasetId, anyhow::Result<String>> =
        engine::start_many(app, "integrated", &ids, &Map::new())
            .await
            .into_iter()
            .collect();
    datasets
        .iter()
        .map(|dataset| {
            let Some(outcome) = outcomes.remove(&dataset.id) else {
                // A dataset listed twice: the first of them has its outcome.
                return None;
            };
            match outcome {
                Ok(workflow_id) => Some(workflow_id),
                Err(err) => match err.downcast_ref::<engine::NotStarted>() {
                    Some(engine::NotStarted::Active { workflow_id, .. }) => Some(workflow_id.clone()),
                    Some(busy @ engine::NotStarted::Busy { .. }) => {
                        info!(dataset_id = dataset.id, name = %dataset.name, "{busy}");
                        None
                    }
                    None => {
                        warn!(dataset_id = dataset.id, name = %dataset.name, error = %format!("{err:#}"),
                            "Could not start the workflow; the next watch run will.");
                        None
                    }
                },
            }
        })
        .collect()
}

/// How a job is run.
#[derive(Debug, Clone, Default)]
pub struct JobOptions {
    /// Report what would be done; change nothing.
    pub dry_run: bool,
    /// `watch` only: look at every directory, not only new ones.
    pub full: bool,
    /// Stops the run between two items (a batch of registrations, a dataset, a workflow): the
    /// scheduler cancels it at shutdown once the grace has run out, and when it loses its
    /// lease, so that two schedulers never run a job at once.
    pub cancel: CancellationToken,
}

/// The error a job run that was cancelled ends with.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: the run was stopped before it finished (scheduler stopping or lease lost)")]
pub struct Interrupted;

/// `Err(Interrupted)` once the run is cancelled; jobs call it between items.
pub fn check_interrupted(cancel: &CancellationToken) -> Result<(), Interrupted> {
    if cancel.is_cancelled() {
        Err(Interrupted)
    } else {
        Ok(())
    }
}

/// What a job run did.
#[derive(Debug, Clone)]
pub enum JobReport {
    Watch(watch::WatchReport),
    PurgeStaged(purge::StagedPurgeReport),
    PurgeWorkflows(purge::WorkflowPurgeReport),
    Reconcile(reconcile::ReconcileReport),
    Metrics(metrics::MetricsReport),
    ManageUploads(manage_uploads::ManageUploadsReport),
    PurgeUploads(purge_uploads::PurgeUploadsReport),
    PopulateBundles(bundles::BundlesReport),
    Fixity(fixity::FixityReport),
}

impl JobReport {
    /// The figures recorded with the run in the job history.
    pub fn counters(&self) -> Map<String, Value> {
        let value = match self {
            JobReport::Watch(r) => json!({
                "registered": r.sources.iter().map(|s| s.registered.len()).sum::<usize>(),
                "already_registered": r.sources.iter().map(|s| s.already_registered).sum::<usize>(),
                "conflicts": r.sources.iter().map(|s| s.conflicts.len()).sum::<usize>(),
                "rejected": r.sources.iter().map(|s| s.rejected.len()).sum::<usize>(),
                "held_back": r.sources.iter().map(|s| s.held_back.len()).sum::<usize>(),
                "failed": r.failed(),
                "workflows_started": r.started_workflows().len(),
                "would_register": r.sources.iter().map(|s| s.would_register.len()).sum::<usize>(),
            }),
            JobReport::PurgeStaged(r) => json!({
                "purged": r.purged.len(),
                "purged_by_fill": r.purged_by_fill.len(),
                "over_watermark": r.over_watermark.len(),
                "deferred": r.deferred,
                "failed": r.failed.len(),
            }),
            JobReport::PurgeWorkflows(r) => json!({"purged": r.purged.len()}),
            JobReport::Reconcile(r) => json!({
                "datasets_without_workflow": r.started.len(),
                "workflows_started": r.started.iter().filter(|s| s.workflow_id.is_some()).count(),
                "stalled_workflows_repaired": r.repaired.len(),
            }),
            JobReport::Metrics(r) => {
                json!({"metrics": r.metrics.len(), "missing_paths": r.missing.len()})
            }
            JobReport::ManageUploads(r) => Value::Object(r.counters()),
            JobReport::PurgeUploads(r) => Value::Object(r.counters()),
            JobReport::PopulateBundles(r) if r.dry_run => json!({
                "would_record": r.recorded.len(),
                "skipped": r.skipped.len(),
                "failed": r.failed.len(),
            }),
            JobReport::PopulateBundles(r) => json!({
                "recorded": r.recorded.len(),
                "skipped": r.skipped.len(),
                "failed": r.failed.len(),
            }),
            JobReport::Fixity(r) if r.dry_run => json!({
                "would_check": r.checked.len(),
                "would_read_bytes": r.bytes_read(),
                "deferred": r.deferred,
                "not_due": r.not_due,
                "overdue": r.overdue,
                "failing": r.failing,
            }),
            JobReport::Fixity(r) => json!({
                "checked": r.checked.len(),
                "intact": r.count(crate::store::FixityResult::Intact),
                "differs": r.count(crate::store::FixityResult::Differs),
                "not_checked": r.count(crate::store::FixityResult::NotChecked),
                "errors": r.errors,
                "bytes_read": r.bytes_read(),
                "deferred": r.deferred,
                "not_due": r.not_due,
                "overdue": r.overdue,
                "failing": r.failing,
            }),
        };
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    /// Things the run could not do (it still did the rest).
    pub fn failures(&self) -> usize {
        match self {
            JobReport::Watch(r) => r.failed(),
            JobReport::PurgeStaged(r) => r.failed.len(),
            JobReport::PopulateBundles(r) => r.failed.len(),
            JobReport::Fixity(r) => r.errors,
            JobReport::Reconcile(r) if !r.dry_run => {
                r.started.iter().filter(|s| s.workflow_id.is_none()).count()
            }
            JobReport::Reconcile(_) => 0,
            JobReport::PurgeWorkflows(_) | JobReport::Metrics(_) => 0,
            JobReport::ManageUploads(r) => r.errors,
            JobReport::PurgeUploads(r) => r.errors,
        }
    }

    /// Workflows the run started.
    pub fn started_workflows(&self) -> Vec<String> {
        match self {
            JobReport::Watch(r) => r.started_workflows(),
            JobReport::Reconcile(r) => r
                .started
                .iter()
                .filter_map(|s| s.workflow_id.clone())
                .collect(),
            JobReport::ManageUploads(r) => r.started.clone(),
            _ => Vec::new(),
        }
    }
}

/// A job as the scheduler sees it: its schedule, when it fires next (if enabled) and its last
/// recorded run.
pub struct JobOverview<'a> {
    pub job: JobName,
    pub schedule: Option<&'a crate::scheduler::schedule::Schedule>,
    pub next_run: Option<DateTime<Utc>>,
    pub last_run: Option<crate::store::JobRun>,
}

/// Every job's overview at `now`, in `JobName::ALL` order (`workers jobs list`, `workers status`).
pub async fn overview(app: &App, now: DateTime<Utc>) -> anyhow::Result<Vec<JobOverview<'_>>> {
    let mut jobs = Vec::with_capacity(JobName::ALL.len());
    for job in JobName::ALL {
        let schedule = app.settings.schedule(job);
        let next_run = schedule
            .filter(|s| s.enabled)
            .and_then(|s| s.next_slot(now).map(|slot| s.fire_time(job.name(), slot)));
        let last_run = app
            .scheduler_store
            .runs(Some(job.name()), 1)
            .await?
            .into_iter()
            .next();
        jobs.push(JobOverview {
            job,
            schedule,
            next_run,
            last_run,
        });
    }
    Ok(jobs)
}

/// Runs one job.
pub async fn run_job(app: &App, job: JobName, opts: &JobOptions) -> anyhow::Result<JobReport> {
    let cancel = &opts.cancel;
    Ok(match job {
        JobName::Watch => JobReport::Watch(
            watch::run(
                app,
                watch::WatchOptions {
                    full: opts.full,
                    dry_run: opts.dry_run,
                },
                cancel,
            )
            .await?,
        ),
        JobName::PurgeStagedDatasets => {
            JobReport::PurgeStaged(purge::purge_staged(app, opts.dry_run, cancel).await?)
        }
        JobName::PurgeStaleWorkflows => JobReport::PurgeWorkflows(
            purge::purge_stale_workflows(app, opts.dry_run, cancel).await?,
        ),
        JobName::Reconcile => {
            JobReport::Reconcile(reconcile::run(app, opts.dry_run, cancel).await?)
        }
        JobName::Metrics => JobReport::Metrics(metrics::run(app, opts.dry_run).await?),
        JobName::ManageUploadWorkflows => {
            JobReport::ManageUploads(manage_uploads::run(app, opts.dry_run, cancel).await?)
        }
        JobName::PurgeStaleUploaded => {
            JobReport::PurgeUploads(purge_uploads::run(app, opts.dry_run, cancel).await?)
        }
        JobName::PopulateBundles => {
            JobReport::PopulateBundles(bundles::run(app, opts.dry_run, cancel).await?)
        }
        JobName::Fixity => JobReport::Fixity(fixity::run(app, opts.dry_run, cancel).await?),
    })
}

/// A recorded job run and what it did.
#[derive(Debug)]
pub struct Execution {
    pub run_id: i64,
    pub outcome: RunOutcome,
    /// `None` when the run failed before it could report.
    pub report: Option<JobReport>,
}

/// Runs a job the way both the scheduler and `workers jobs run` do: recorded in the job
/// history from start to end, and a failure or a panic of the job becomes a failed run.
pub async fn execute(
    app: Arc<App>,
    job: JobName,
    trigger: Trigger,
    slot: Option<DateTime<Utc>>,
    opts: JobOptions,
) -> anyhow::Result<Execution> {
    let host = app.identity.holder();
    let store = Arc::clone(&app.scheduler_store);
    let run_id = store
        .start_run(job.name(), trigger, slot, &host, opts.dry_run, Utc::now())
        .await?;
    info!(job = %job, trigger = trigger.as_str(), run_id, "Job started.");
    // Awaited to its end, cancelled or not: when `execute` returns, nothing of the run is
    // still going on (a job stops between items once cancelled).
    let joined = tokio::spawn(async move {
        #[cfg(feature = "failpoints")]
        crate::failpoints::job(job, &opts.cancel).await?;
        run_job(&app, job, &opts).await
    })
    .await;
    let (outcome, report) = match joined {
        Ok(Ok(report)) => {
            let outcome = match report.failures() {
                0 => RunOutcome::Success,
                n => RunOutcome::Failed(format!(
                    "{n} item(s) could not be handled; the next run tries again"
                )),
            };
            (outcome, Some(report))
        }
        Ok(Err(err)) => (RunOutcome::Failed(format!("{err:#}")), None),
        Err(join_error) => {
            let what = if join_error.is_panic() {
                "panicked"
            } else {
                "was cancelled"
            };
            (
                RunOutcome::Failed(format!("the job {what}: {join_error}")),
                None,
            )
        }
    };
    let counters = report.as_ref().map(JobReport::counters).unwrap_or_default();
    let ended = Utc::now();
    store.finish_run(run_id, &outcome, &counters, ended).await?;
    crate::metrics::job_finished(job.name(), &outcome, ended);
    match &outcome {
        RunOutcome::Failed(reason) => error!(job = %job, run_id, error = %reason, "Job failed."),
        _ => {
            info!(job = %job, run_id, counters = %serde_json::Value::Object(counters), "Job finished.")
        }
    }
    Ok(Execution {
        run_id,
        outcome,
        report,
    })
}

//! `manage_upload_workflows` (spec C.5.2): takes uploads from UPLOADED through verification to
//! the `integrated` workflow, expires abandoned upload sessions and retries failed ingestions.
//!
//! Three phases, in order, each item on its own: an error with one upload is counted and the
//! run goes on with the next. Differences from the original, on purpose:
//! - a failed `integrated` workflow of an upload really is PROCESSING_FAILED (the engine writes
//!   it), and a retry resumes that workflow from its failed step instead of only writing
//!   COMPLETE again; after `uploads.max_retries` retries the upload is PERMANENTLY_FAILED (the
//!   original's query could never return such an upload);
//! - an upload whose dataset is deleted (the API revives a failed upload on a repeated
//!   completion while its dataset stays tombstoned, spec E.5) is never verified or ingested;
//! - a verification message the broker says it no longer holds (lost before any worker took
//!   it) is sent again under the same task id instead of waiting out the 4-hour timeout.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value, json};
use tracing::{error, info, warn};
use uuid::Uuid;

use super::check_interrupted;
use crate::app::App;
use crate::broker::TaskMessage;
use crate::cancel::CancellationToken;
use crate::config::Settings;
use crate::registry::uploads::{
    Notification, UploadLog, UploadLogPatch, UploadQuery, UploadRef, UploadStatus,
};
use crate::registry::{Dataset, DatasetId, Registry};
use crate::store::{TaskStatus, Workflow};
use crate::workflow::engine;

/// The registered name of the upload check (spec C.5.3).
pub const VERIFY_TASK: &str = "verify_upload_integrity";

/// What a run did: the summary counters of the original (spec C.5.2) and what they stand for.
#[derive(Debug, Clone, Default)]
pub struct ManageUploadsReport {
    pub dry_run: bool,
    pub verification_spawned: usize,
    pub verified_triggered: usize,
    pub verification_failed: usize,
    pub failed_retried: usize,
    pub permanently_failed: usize,
    pub stale_uploading_failed: usize,
    pub errors: usize,
    /// Uploads left alone because their dataset is deleted.
    pub skipped_deleted: usize,
    /// Verifications queued or running (or waiting for a retry) that have not ended.
    pub in_flight: usize,
    /// Workflows started or resumed.
    pub started: Vec<String>,
    /// One line per upload acted on (or, in a dry run, that would be): `dataset id: action`.
    pub actions: Vec<String>,
}

impl ManageUploadsReport {
    pub fn counters(&self) -> Map<String, Value> {
        let value = json!({
            "verification_spawned": self.verification_spawned,
            "verified_triggered": self.verified_triggered,
            "verification_failed": self.verification_failed,
            "failed_retried": self.failed_retried,
            "permanently_failed": self.permanently_failed,
            "stale_uploading_failed": self.stale_uploading_failed,
            "errors": self.errors,
            "skipped_deleted": self.skipped_deleted,
        });
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    fn act(&mut self, id: DatasetId, action: impl Into<String>) {
        let action = action.into();
        info!(dataset_id = id, dry_run = self.dry_run, "Upload: {action}.");
        self.actions.push(format!("{id}: {action}"));
    }
}

pub async fn run(
    app: &App,
    dry_run: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<ManageUploadsReport> {
    let mut report = ManageUploadsReport {
        dry_run,
        ..ManageUploadsReport::default()
    };
    let job = Job {
        app,
        dry_run,
        now: Utc::now(),
    };
    if let Err(err) = job.expire_stale(&mut report, cancel).await {
        report.errors += 1;
        error!(error = %format!("{err:#}"), "Could not expire stale uploads.");
    }
    check_interrupted(cancel)?;
    if let Err(err) = job.advance_stalled(&mut report, cancel).await {
        report.errors += 1;
        error!(error = %format!("{err:#}"), "Could not list stalled uploads.");
    }
    check_interrupted(cancel)?;
    if let Err(err) = job.retry_failed(&mut report, cancel).await {
        report.errors += 1;
        error!(error = %format!("{err:#}"), "Could not list failed uploads.");
    }
    Ok(report)
}

struct Job<'a> {
    app: &'a App,
    dry_run: bool,
    now: DateTime<Utc>,
}

impl Job<'_> {
    /// Phase 1: upload sessions abandoned in UPLOADING are failed, which frees their names.
    async fn expire_stale(
        &self,
        report: &mut ManageUploadsReport,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let age_days = self.app.settings.uploads.expire_uploading_after_days;
        let expired = self
            .app
            .registry
            .uploads(&UploadQuery::Expired {
                status: UploadStatus::Uploading,
                age_days,
            })
            .await?;
        for upload in expired {
            check_interrupted(cancel)?;
            let reason = format!(
                "Upload session expired after {:.1} hour(s) in UPLOADING state without being completed",
                age_days * 24.0
            );
            report.act(upload.dataset_id, "UPLOADING too long: UPLOAD_FAILED");
            if !self.dry_run {
                let patch = UploadLogPatch::status(UploadStatus::UploadFailed)
                    .with_metadata(one("failure_reason", json!(reason)));
                if let Err(err) = self
                    .app
                    .registry
                    .update_upload_log(upload.dataset_id, &patch)
                    .await
                {
                    report.errors += 1;
                    error!(dataset_id = upload.dataset_id, error = %format!("{:#}", anyhow::Error::new(err)), "Could not fail an expired upload.");
                    continue;
                }
            }
            report.stale_uploading_failed += 1;
        }
        Ok(())
    }

    /// Phase 2: uploads that have not moved for a while (UPLOADED, VERIFYING, VERIFIED).
    async fn advance_stalled(
        &self,
        report: &mut ManageUploadsReport,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let after_seconds = self.app.settings.uploads.stalled_after_seconds;
        let stalled = self
            .app
            .registry
            .uploads(&UploadQuery::Stalled { after_seconds })
            .await?;
        for upload in stalled {
            check_interrupted(cancel)?;
            if let Err(err) = self.advance(&upload, report).await {
                report.errors += 1;
                error!(dataset_id = upload.dataset_id, error = %format!("{err:#}"), "Could not advance an upload.");
            }
        }
        Ok(())
    }

    async fn advance(
        &self,
        upload: &UploadRef,
        report: &mut ManageUploadsReport,
    ) -> anyhow::Result<()> {
        let id = upload.dataset_id;
        let dataset = self.app.registry.get(id).await?;
        let Some(log) = self.app.registry.upload_log(id).await? else {
            anyhow::bail!("dataset {id} is listed as a stalled upload but has no upload log");
        };
        if dataset.is_deleted {
            report.skipped_deleted += 1;
            warn!(dataset_id = id, status = %log.status, "The upload's dataset is deleted: it is not verified or ingested.");
            return Ok(());
        }
        match log.status {
            UploadStatus::Uploaded => self.spawn_verification(&log, report).await,
            UploadStatus::Verifying => self.watch_verification(&log, report).await,
            UploadStatus::Verified => self.ingest(&dataset, report).await,
            other => {
                info!(dataset_id = id, status = %other, "Upload moved on since it was listed; left alone.");
                Ok(())
            }
        }
    }

    /// UPLOADED: VERIFYING with a new task id is written first, then the check is queued, so
    /// that a crash in between leaves a VERIFYING upload whose task never existed, which the
    /// VERIFYING branch gives a new task.
    async fn spawn_verification(
        &self,
        log: &UploadLog,
        report: &mut ManageUploadsReport,
    ) -> anyhow::Result<()> {
        let id = log.dataset_id;
        let task_id = Uuid::new_v4().to_string();
        report.act(id, format!("verification queued (task {task_id})"));
        if !self.dry_run {
            let mut metadata = match &log.metadata {
                Value::Object(map) => map.clone(),
                _ => Map::new(),
            };
            metadata.insert("verification_task_id".into(), json!(task_id));
            // Naive UTC, as the original writes it (and parses it back).
            metadata.insert(
                "verification_started_at".into(),
                json!(
                    self.now
                        .naive_utc()
                        .format("%Y-%m-%dT%H:%M:%S%.6f")
                        .to_string()
                ),
            );
            self.app
                .registry
                .update_upload_log(
                    id,
                    &UploadLogPatch::status(UploadStatus::Verifying).with_metadata(metadata),
                )
                .await?;
            self.app
                .broker
                .publish(&verify_message(self.app, id, &task_id))
                .await?;
        }
        report.verification_spawned += 1;
        Ok(())
    }

    async fn watch_verification(
        &self,
        log: &UploadLog,
        report: &mut ManageUploadsReport,
    ) -> anyhow::Result<()> {
        let id = log.dataset_id;
        let settings = &self.app.settings.uploads;
        let started = log
            .meta_str("verification_started_at")
            .and_then(parse_naive_utc)
            .unwrap_or(log.updated_at);
        let age = (self.now - started).to_std().unwrap_or_default();
        let Some(task_id) = log.meta_str("verification_task_id").map(str::to_owned) else {
            if age.as_secs() < settings.respawn_verification_after_seconds {
                report.verification_spawned += 1;
                return Ok(());
            }
            return self.spawn_verification(log, report).await;
        };
        if age.as_secs() > settings.verification_timeout_seconds {
            let reason = format!(
                "Verification timeout (>{} hours). Task ID: {task_id}",
                settings.verification_timeout_seconds as f64 / 3600.0
            );
            return self.fail_verification(log, reason, report).await;
        }
        let metas = self
            .app
            .store
            .task_metas(std::slice::from_ref(&task_id))
            .await?;
        let status = metas
            .get(&task_id)
            .map_or(TaskStatus::Pending, |meta| meta.status);
        match status {
            TaskStatus::Success => {
                report.act(id, "verification succeeded: VERIFIED");
                if !self.dry_run {
                    self.app
                        .registry
                        .update_upload_log(id, &UploadLogPatch::status(UploadStatus::Verified))
                        .await?;
                }
                report.verified_triggered += 1;
            }
            TaskStatus::Pending => {
                report.in_flight += 1;
                // Lost before any worker took it: sent again under the same id, so a copy that
                // does turn up is the same task and runs once.
                if age.as_secs() >= settings.respawn_verification_after_seconds
                    && self.app.broker.holds(&task_id).await? == Some(false)
                {
                    report.act(
                        id,
                        format!("verification task {task_id} was lost: queued again"),
                    );
                    if !self.dry_run {
                        self.app
                            .broker
                            .publish(&verify_message(self.app, id, &task_id))
                            .await?;
                    }
                }
            }
            TaskStatus::Started | TaskStatus::Retry => report.in_flight += 1,
            TaskStatus::Failure => {
                // The task writes VERIFICATION_FAILED itself on its last attempt; this covers a
                // task that failed without getting to write it.
                let current = self.app.registry.upload_log(id).await?;
                if current.is_some_and(|l| l.status == UploadStatus::Verifying) {
                    let reason = format!(
                        "Verification task entered FAILURE state in Celery (task ID: {task_id}) without updating the upload"
                    );
                    return self.fail_verification(log, reason, report).await;
                }
                report.verification_failed += 1;
            }
            other => {
                let reason = format!("Unexpected task state: {}", other.as_str());
                return self.fail_verification(log, reason, report).await;
            }
        }
        Ok(())
    }

    async fn fail_verification(
        &self,
        log: &UploadLog,
        reason: String,
        report: &mut ManageUploadsReport,
    ) -> anyhow::Result<()> {
        let id = log.dataset_id;
        report.act(id, format!("VERIFICATION_FAILED: {reason}"));
        if !self.dry_run {
            let mut metadata = one("failure_reason", json!(reason));
            metadata.insert("failed_at".into(), json!(self.now.to_rfc3339()));
            self.app
                .registry
                .update_upload_log(
                    id,
                    &UploadLogPatch::status(UploadStatus::VerificationFailed)
                        .with_metadata(metadata),
                )
                .await?;
            notify(
                self.app.registry.as_ref(),
                &self.app.settings,
                "Upload verification failed",
                &format!(
                    "Upload {} (dataset {id}) failed verification: {reason}",
                    log.dataset_name
                ),
                id,
            )
            .await;
        }
        report.verification_failed += 1;
        Ok(())
    }

    /// VERIFIED: the `integrated` workflow is started (first), then the upload is COMPLETE.
    async fn ingest(
        &self,
        dataset: &Dataset,
        report: &mut ManageUploadsReport,
    ) -> anyhow::Result<()> {
        let id = dataset.id;
        if latest_integrated(self.app, dataset).await?.is_some() {
            report.act(id, "ingestion already started: COMPLETE");
        } else {
            report.act(id, "verified: integrated workflow started, COMPLETE");
            if !self.dry_run {
                let workflow_id = start_integrated(self.app, id).await?;
                report.started.push(workflow_id);
            }
        }
        if !self.dry_run {
            // The workflow is linked by the start; the PATCH only moves the status.
            self.app
                .registry
                .update_upload_log(id, &UploadLogPatch::status(UploadStatus::Complete))
                .await?;
        }
        report.verified_triggered += 1;
        Ok(())
    }

    /// Phase 3: ingestions that failed (PROCESSING_FAILED) are tried again, up to
    /// `uploads.max_retries` times, then given up (PERMANENTLY_FAILED).
    async fn retry_failed(
        &self,
        report: &mut ManageUploadsReport,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let settings = &self.app.settings.uploads;
        let failed = self
            .app
            .registry
            .uploads(&UploadQuery::Failed {
                // One more than the retries allowed, so that uploads that used them all are
                // listed and given up (the original's filter left them out for ever).
                max_retry_count: settings.max_retries,
                max_age_hours: settings.retry_window_hours,
            })
            .await?;
        for upload in failed {
            check_interrupted(cancel)?;
            if let Err(err) = self.retry_one(&upload, report).await {
                report.errors += 1;
                error!(dataset_id = upload.dataset_id, error = %format!("{err:#}"), "Could not retry a failed upload.");
            }
        }
        Ok(())
    }

    async fn retry_one(
        &self,
        upload: &UploadRef,
        report: &mut ManageUploadsReport,
    ) -> anyhow::Result<()> {
        let id = upload.dataset_id;
        let max_retries = self.app.settings.uploads.max_retries;
        let retry_count = match upload.retry_count {
            Some(n) => n,
            None => self
                .app
                .registry
                .upload_log(id)
                .await?
                .map_or(0, |l| l.retry_count),
        };
        if retry_count >= max_retries {
            let reason = format!(
                "Processing failed after {retry_count} retries: {}",
                upload.last_error.as_deref().unwrap_or("unknown error")
            );
            report.act(id, format!("PERMANENTLY_FAILED: {reason}"));
            if !self.dry_run {
                self.app
                    .registry
                    .update_upload_log(
                        id,
                        &UploadLogPatch::status(UploadStatus::PermanentlyFailed)
                            .with_metadata(one("failure_reason", json!(reason))),
                    )
                    .await?;
                notify(
                    self.app.registry.as_ref(),
                    &self.app.settings,
                    "Upload processing failed",
                    &format!(
                        "Upload {} (dataset {id}) failed permanently: {reason}",
                        upload.dataset_name
                    ),
                    id,
                )
                .await;
            }
            report.permanently_failed += 1;
            return Ok(());
        }
        let dataset = self.app.registry.get(id).await?;
        if dataset.is_deleted {
            report.skipped_deleted += 1;
            warn!(
                dataset_id = id,
                "The failed upload's dataset is deleted: it is not ingested again."
            );
            return Ok(());
        }
        let attempt = retry_count + 1;
        match latest_integrated(self.app, &dataset).await? {
            Some(workflow) => {
                report.act(
                    id,
                    format!(
                        "retry {attempt} of {max_retries}: workflow {} resumed",
                        workflow.id
                    ),
                );
                if !self.dry_run {
                    match engine::resume(self.app, &workflow.id).await? {
                        engine::Resumed::Restarted { .. } | engine::Resumed::AlreadyResuming => {}
                        other => {
                            warn!(dataset_id = id, workflow_id = %workflow.id, "The workflow could not be resumed ({other:?}); the upload is marked COMPLETE again and its workflow left as it is.")
                        }
                    }
                    report.started.push(workflow.id.clone());
                }
            }
            None => {
                report.act(
                    id,
                    format!("retry {attempt} of {max_retries}: integrated workflow started"),
                );
                if !self.dry_run {
                    report.started.push(start_integrated(self.app, id).await?);
                }
            }
        }
        if !self.dry_run {
            let patch = UploadLogPatch {
                status: Some(UploadStatus::Complete),
                retry_count: Some(attempt),
                ..UploadLogPatch::default()
            };
            self.app.registry.update_upload_log(id, &patch).await?;
        }
        report.failed_retried += 1;
        Ok(())
    }
}

/// The message of the upload check: a plain Celery task on the default queue, priority 1, as
/// the original's `apply_async` sends it.
pub fn verify_message(app: &App, dataset_id: DatasetId, task_id: &str) -> TaskMessage {
    TaskMessage {
        id: task_id.to_owned(),
        task: VERIFY_TASK.to_owned(),
        args: vec![json!(dataset_id)],
        kwargs: Map::new(),
        priority: 1,
        eta: None,
        retries: 0,
        root_id: task_id.to_owned(),
        parent_id: None,
        queue: format!("{}.q", app.settings.app_id),
        time_limits: Default::default(),
    }
}

/// The dataset's newest `integrated` workflow, if it has one.
async fn latest_integrated(app: &App, dataset: &Dataset) -> anyhow::Result<Option<Workflow>> {
    for workflow_id in dataset.workflows.iter().rev() {
        if let Some(workflow) = app.store.workflow(workflow_id).await?
            && workflow.name == "integrated"
        {
            return Ok(Some(workflow));
        }
    }
    Ok(None)
}

/// Starts `integrated` for an upload; one another process started a moment ago counts.
async fn start_integrated(app: &App, id: DatasetId) -> anyhow::Result<String> {
    match engine::start(app, "integrated", id, Map::new()).await {
        Ok(workflow_id) => Ok(workflow_id),
        Err(err) => match err.downcast_ref::<engine::NotStarted>() {
            Some(engine::NotStarted::Active { workflow_id, .. }) => Ok(workflow_id.clone()),
            _ => Err(err),
        },
    }
}

/// Sends a notification when they are enabled; a failure to send is logged, never fatal.
pub async fn notify(
    registry: &dyn Registry,
    settings: &Settings,
    label: &str,
    text: &str,
    dataset_id: DatasetId,
) {
    let settings = &settings.notifications;
    if !settings.enabled {
        return;
    }
    let notification = Notification {
        label: label.to_owned(),
        text: text.to_owned(),
        kind: "INCIDENT".to_owned(),
        metadata: json!({"dataset_id": dataset_id}),
        role_ids: settings.role_ids.clone(),
    };
    if let Err(err) = registry.notify(&notification).await {
        warn!(dataset_id, error = %format!("{:#}", anyhow::Error::new(err)), "Could not send a notification.");
    }
}

/// Called by the engine when a workflow fails for good: a failed `integrated` workflow of an
/// upload makes the upload PROCESSING_FAILED, so that phase 3 retries it. Errors are logged:
/// the workflow's own failure is already recorded.
pub async fn workflow_failed(app: &App, workflow: &Workflow, dataset_id: DatasetId, error: &str) {
    if workflow.name != "integrated" {
        return;
    }
    let log = match app.registry.upload_log(dataset_id).await {
        Ok(Some(log)) => log,
        Ok(None) => return,
        Err(err) => {
            warn!(dataset_id, error = %format!("{:#}", anyhow::Error::new(err)), "Could not read the upload log of the failed workflow's dataset.");
            return;
        }
    };
    if !matches!(
        log.status,
        UploadStatus::Complete | UploadStatus::Processing | UploadStatus::Verified
    ) {
        return;
    }
    let mut metadata = one("failure_reason", json!(error));
    metadata.insert("failed_workflow_id".into(), json!(workflow.id));
    let patch = UploadLogPatch::status(UploadStatus::ProcessingFailed).with_metadata(metadata);
    match app.registry.update_upload_log(dataset_id, &patch).await {
        Ok(_) => {
            info!(dataset_id, workflow_id = %workflow.id, "The upload's ingestion failed: PROCESSING_FAILED.")
        }
        Err(err) => {
            warn!(dataset_id, error = %format!("{:#}", anyhow::Error::new(err)), "Could not mark the upload PROCESSING_FAILED.")
        }
    }
}

fn one(key: &str, value: Value) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert(key.to_owned(), value);
    map
}

/// Reads the naive UTC times the original writes (`datetime.utcnow().isoformat()`), and
/// offset-carrying ones.
pub fn parse_naive_utc(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naive_times_of_the_original_are_read_as_utc() {
        let t = parse_naive_utc("2026-12-01T10:20:30.123456").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-12-01T10:20:30.123456+00:00");
        assert!(parse_naive_utc("2026-12-01T10:20:30Z").is_some());
        assert!(parse_naive_utc("yesterday").is_none());
    }
}

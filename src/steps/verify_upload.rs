//! `verify_upload_integrity(dataset_id)` (spec C.5.3): checks an upload's files against the
//! manifest its sender gave (BLAKE3 manifest hash, else size manifest, else that files exist)
//! and moves the upload to VERIFIED, or, on the last attempt, VERIFICATION_FAILED.
//!
//! A plain Celery task: `manage_upload_workflows` (this program's or the original's) sends it
//! with `apply_async` and reads its outcome from the task result. The check runs in-process on
//! the CPU pool, but the task still registers a worker process and posts its log lines, so the
//! UI shows them as it did for the original's subprocess.

use chrono::Utc;
use serde_json::{Map, Value, json};
use tracing::{info, warn};

use super::{StepContext, StepError, StepResult};
use crate::compute::manifest::{self, ManifestError, SizeManifest};
use crate::jobs::manage_uploads::{VERIFY_TASK, notify};
use crate::registry::uploads::{
    ProcessLogLine, UploadLog, UploadLogPatch, UploadStatus, WorkerProcess,
};
use crate::registry::{Dataset, DatasetId};

pub async fn run(ctx: &StepContext) -> StepResult {
    let id = ctx.dataset_id;
    let mut log = ProcessLog::new(ctx);
    log.out(format!(
        "Verifying upload integrity: dataset {id}, task {}, attempt {} of {}",
        ctx.task_id,
        ctx.retries + 1,
        ctx.max_retries + 1
    ));
    let dataset = ctx.dataset().await?;
    let Some(upload) = ctx.env.registry.upload_log(id).await? else {
        log.err(format!("dataset {id} has no upload log"));
        log.flush().await;
        return Err(StepError::permanent(
            "UploadNotFound",
            anyhow::format_err!("dataset {id} has no upload log: it is not an upload"),
        ));
    };
    // Only an upload waiting for this check is checked: one that failed meanwhile (the
    // 4-hour timeout, an operator) has a tombstoned dataset that must not come back as VERIFIED.
    match upload.status {
        UploadStatus::Uploaded | UploadStatus::Verifying if !dataset.is_deleted => {}
        UploadStatus::Verified => {
            log.out("The upload is VERIFIED already".to_owned());
            log.flush().await;
            return Ok(json!({"status": "success", "dataset_id": id}));
        }
        status => {
            let what = if dataset.is_deleted {
                format!("upload {id} is {status} and its dataset is deleted")
            } else {
                format!("upload {id} is {status}")
            };
            log.err(format!("Not verified: {what}"));
            log.flush().await;
            return Err(StepError::permanent(
                "UploadNotVerifiable",
                anyhow::format_err!("{what}: there is nothing to verify"),
            ));
        }
    }
    log.flush().await;
    let outcome = check(ctx, &dataset, &upload, &mut log).await;
    let result = match outcome {
        Ok(summary) => {
            log.out(format!("Upload verified: {summary}"));
            ctx.env
                .registry
                .update_upload_log(id, &UploadLogPatch::status(UploadStatus::Verified))
                .await?;
            info!(dataset_id = id, "Upload verified: {summary}.");
            Ok(json!({"status": "success", "dataset_id": id}))
        }
        Err(Failure::Cancelled) => Err(StepError::cancelled()),
        Err(Failure::Check(err)) => {
            let reason = err.failure_reason();
            log.err(format!("Verification failed: {reason}"));
            let last = ctx.retries >= ctx.max_retries;
            if last {
                mark_failed(ctx, id, &upload, &reason).await?;
            } else {
                log.out(format!(
                    "Attempt {} of {} failed; it will be tried again",
                    ctx.retries + 1,
                    ctx.max_retries + 1
                ));
            }
            // Retried like the original's non-zero exit (`SubprocessError`): the files may
            // still be arriving.
            Err(StepError::retryable_as(
                "SubprocessError",
                anyhow::Error::new(err),
            ))
        }
    };
    log.flush().await;
    if let Some(process_id) = log.process_id {
        // The original records the worker process on the upload log, over the metadata it
        // read at the start (a top-level merge: only this key changes).
        let mut metadata = Map::new();
        metadata.insert("worker_process_id".into(), json!(process_id));
        let patch = UploadLogPatch {
            metadata: Some(metadata),
            ..UploadLogPatch::default()
        };
        if let Err(err) = ctx.env.registry.update_upload_log(id, &patch).await {
            warn!(dataset_id = id, error = %format!("{:#}", anyhow::Error::new(err)), "Could not record the worker process on the upload log.");
        }
    }
    result
}

enum Failure {
    Check(ManifestError),
    Cancelled,
}

/// The check the upload's metadata calls for (spec C.5.3, in this order).
async fn check(
    ctx: &StepContext,
    dataset: &Dataset,
    upload: &UploadLog,
    log: &mut ProcessLog<'_>,
) -> Result<String, Failure> {
    let Some(origin) = dataset.origin_path.clone().filter(|p| !p.is_empty()) else {
        return Err(Failure::Check(ManifestError::InvalidManifest(format!(
            "Dataset {} has no origin_path",
            dataset.id
        ))));
    };
    let origin = std::path::PathBuf::from(origin);
    let checksum = upload.meta("checksum");
    let manifest_hash = checksum
        .and_then(|c| c.get("manifest_hash"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let size_manifest = upload.meta("size_manifest").cloned();
    let progress = ctx.progress.clone();
    progress.start("verify", "bytes", None);
    let outcome = if let Some(expected) = manifest_hash {
        log.out(format!(
            "Checking the BLAKE3 manifest of {} against {expected}",
            origin.display()
        ));
        ctx.compute(move |cancel| {
            manifest::check_manifest_hash(&origin, &expected, cancel, Some(&progress)).map(|m| {
                format!(
                    "BLAKE3 manifest {} matches ({} files, {} bytes)",
                    m.hash, m.files, m.bytes
                )
            })
        })
        .await
    } else {
        if let Some(checksum) = checksum.filter(|c| c.get("skipped").is_some_and(truthy)) {
            let reason = checksum.get("skipped_reason").map(show).unwrap_or_default();
            let error = checksum.get("error").map(show).unwrap_or_default();
            log.err(format!(
                "WARNING: the sender skipped the checksum (reason: {reason}; error: {error}); checking sizes or existence only"
            ));
        }
        match size_manifest {
            Some(value) => {
                log.out(format!(
                    "Checking the size manifest of {}",
                    origin.display()
                ));
                ctx.compute(move |_| {
                    let manifest = SizeManifest::from_value(&value)?;
                    manifest::check_size_manifest(&origin, &manifest)?;
                    Ok(format!(
                        "size manifest holds ({} files)",
                        manifest.files.len()
                    ))
                })
                .await
            }
            None => {
                log.out(format!(
                    "No manifest: checking that {} holds files",
                    origin.display()
                ));
                ctx.compute(move |_| {
                    manifest::check_exists(&origin)
                        .map(|()| "files are present (no manifest to compare with)".to_owned())
                })
                .await
            }
        }
    };
    match outcome {
        Err(_) => Err(Failure::Cancelled),
        Ok(Err(ManifestError::Cancelled)) => Err(Failure::Cancelled),
        Ok(Err(err)) => Err(Failure::Check(err)),
        Ok(Ok(summary)) => Ok(summary),
    }
}

/// The last attempt failed: VERIFICATION_FAILED, which tombstones the dataset.
async fn mark_failed(
    ctx: &StepContext,
    id: DatasetId,
    upload: &UploadLog,
    reason: &str,
) -> Result<(), StepError> {
    let mut metadata = Map::new();
    metadata.insert("failure_reason".into(), json!(reason));
    metadata.insert("task_id".into(), json!(ctx.task_id));
    metadata.insert("failed_at".into(), json!(Utc::now().to_rfc3339()));
    metadata.insert("retries_exhausted".into(), json!(true));
    ctx.env
        .registry
        .update_upload_log(
            id,
            &UploadLogPatch::status(UploadStatus::VerificationFailed).with_metadata(metadata),
        )
        .await?;
    notify(
        ctx.env.registry.as_ref(),
        &ctx.env.settings,
        "Upload verification failed",
        &format!(
            "Upload {} (dataset {id}) failed verification: {reason}",
            upload.dataset_name
        ),
        id,
    )
    .await;
    Ok(())
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        _ => true,
    }
}

fn show(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The task's log lines as the UI shows them: a worker process registered once (again at the
/// next flush while that fails), lines posted in batches. Failures are logged, never fatal:
/// the check matters, its transcript is a courtesy.
struct ProcessLog<'a> {
    ctx: &'a StepContext,
    process_id: Option<i64>,
    pending: Vec<ProcessLogLine>,
}

impl<'a> ProcessLog<'a> {
    fn new(ctx: &'a StepContext) -> ProcessLog<'a> {
        ProcessLog {
            ctx,
            process_id: None,
            pending: Vec::new(),
        }
    }

    fn out(&mut self, message: String) {
        info!(dataset_id = self.ctx.dataset_id, "{message}");
        self.push("stdout", message);
    }

    fn err(&mut self, message: String) {
        warn!(dataset_id = self.ctx.dataset_id, "{message}");
        self.push("stderr", message);
    }

    fn push(&mut self, level: &str, message: String) {
        self.pending.push(ProcessLogLine {
            timestamp: Utc::now(),
            level: level.to_owned(),
            message,
        });
    }

    async fn flush(&mut self) {
        let registry = &self.ctx.env.registry;
        if self.process_id.is_none() {
            let process = WorkerProcess {
                workflow_id: None,
                step: VERIFY_TASK.to_owned(),
                task_id: self.ctx.task_id.clone(),
                pid: self.ctx.env.identity.pid,
                hostname: self.ctx.env.identity.hostname.clone(),
                start_time: Utc::now(),
                tags: json!({"args": [
                    self.ctx.dataset_id,
                    self.ctx.task_id,
                    self.ctx.retries,
                    self.ctx.max_retries
                ]}),
            };
            match registry.register_process(&process).await {
                Ok(id) => self.process_id = id,
                Err(err) => {
                    warn!(error = %format!("{:#}", anyhow::Error::new(err)), "Could not register the worker process; its log lines are kept for the next try.");
                    return;
                }
            }
        }
        let Some(process_id) = self.process_id else {
            self.pending.clear();
            return;
        };
        let lines = std::mem::take(&mut self.pending);
        if let Err(err) = registry.add_process_logs(process_id, &lines).await {
            warn!(error = %format!("{:#}", anyhow::Error::new(err)), "Could not post the task's log lines.");
        }
    }
}

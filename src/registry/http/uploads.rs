//! The upload endpoints of the Bioloop API (spec E.2, E.5), worker-process logs and
//! notifications, over the transport of `HttpRegistry`.

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::HttpRegistry;
use super::transport::{Call, Sent};
use super::wire::parse_time;
use crate::registry::uploads::{
    NewUpload, Notification, ProcessLogLine, UploadLog, UploadLogPatch, UploadQuery, UploadRef,
    UploadStatus, WorkerProcess,
};
use crate::registry::{DatasetId, RegistryError};

/// Times as the API stores and the original sends them: ISO 8601, UTC, with `Z`.
pub(crate) fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl HttpRegistry {
    pub(super) async fn http_create_upload(
        &self,
        upload: &NewUpload,
    ) -> Result<UploadLog, RegistryError> {
        let body = json!({"type": upload.dataset_type.as_str(), "name": upload.name.as_str()});
        let call = Call::post("datasets/uploads".to_owned(), &body);
        let reply = self.http.answered(&call, None).await?;
        let log: WireUploadLog = self.http.decode(&call, &reply)?;
        log.into_log()
    }

    pub(super) async fn http_complete_upload(
        &self,
        id: DatasetId,
        process_id: &str,
        metadata: Option<&Map<String, Value>>,
    ) -> Result<UploadLog, RegistryError> {
        let mut body = json!({"process_id": process_id});
        if let Some(metadata) = metadata {
            body["metadata"] = Value::Object(metadata.clone());
        }
        let call = Call::post(format!("datasets/uploads/{id}/complete"), &body);
        let reply = match self.http.send(&call, None).await? {
            Sent::Answer(reply) => reply,
            Sent::AlreadyDone => unreachable!("no settled check was given"),
        };
        match reply.answer.status {
            status if status.is_success() => {}
            StatusCode::NOT_FOUND => return Err(RegistryError::NotFound(id)),
            StatusCode::CONFLICT => {
                return Err(RegistryError::Invalid(format!(
                    "upload {id} has already advanced past the upload stage{}",
                    self.http.quote(&reply.answer.body)
                )));
            }
            _ => return Err(self.http.unexpected(&call, &reply)),
        }
        let done: WirePatched = self.http.decode(&call, &reply)?;
        let mut log = done.upload_log.into_log()?;
        if log.dataset_name.is_empty() {
            // A repeated completion answers with the bare dataset row; read the log whole.
            log = self
                .http_upload_log(id)
                .await?
                .ok_or(RegistryError::NotFound(id))?;
        }
        Ok(log)
    }

    pub(super) async fn http_upload_log(
        &self,
        id: DatasetId,
    ) -> Result<Option<UploadLog>, RegistryError> {
        let call = Call::get(format!("datasets/uploads/{id}/upload-log"), Vec::new());
        let reply = match self.http.send(&call, None).await? {
            Sent::Answer(reply) => reply,
            Sent::AlreadyDone => unreachable!("no settled check was given"),
        };
        match reply.answer.status {
            StatusCode::NOT_FOUND => Ok(None),
            status if status.is_success() => {
                let log: WireUploadLog = self.http.decode(&call, &reply)?;
                log.into_log().map(Some)
            }
            _ => Err(self.http.unexpected(&call, &reply)),
        }
    }

    pub(super) async fn http_update_upload_log(
        &self,
        id: DatasetId,
        patch: &UploadLogPatch,
    ) -> Result<UploadLog, RegistryError> {
        let call = Call::patch(
            format!("datasets/uploads/{id}/upload-log"),
            &patch_body(patch),
        );
        let reply = match self.http.send(&call, None).await? {
            Sent::Answer(reply) => reply,
            Sent::AlreadyDone => unreachable!("no settled check was given"),
        };
        match reply.answer.status {
            status if status.is_success() => {
                let done: WirePatched = self.http.decode(&call, &reply)?;
                done.upload_log.into_log()
            }
            StatusCode::NOT_FOUND => Err(RegistryError::NotFound(id)),
            // The workflow is linked already (an earlier attempt whose answer was lost, or a
            // run that stopped after linking): the API rolled the whole PATCH back, so it is
            // sent again without the link.
            StatusCode::CONFLICT if patch.workflow_id.is_some() => {
                let unlinked = UploadLogPatch {
                    workflow_id: None,
                    ..patch.clone()
                };
                Box::pin(self.http_update_upload_log(id, &unlinked)).await
            }
            _ => Err(self.http.unexpected(&call, &reply)),
        }
    }

    pub(super) async fn http_uploads(
        &self,
        query: &UploadQuery,
    ) -> Result<Vec<UploadRef>, RegistryError> {
        let (path, params): (&str, Vec<(&'static str, String)>) = match query {
            UploadQuery::Expired { status, age_days } => (
                "datasets/uploads/expired",
                vec![
                    ("status", status.as_str().to_owned()),
                    ("age_days", age_days.to_string()),
                ],
            ),
            // The API applies its own window.
            UploadQuery::Stalled { .. } => ("datasets/uploads/stalled", Vec::new()),
            UploadQuery::Failed {
                max_retry_count,
                max_age_hours,
            } => (
                "datasets/uploads/failed",
                vec![
                    ("max_retry_count", max_retry_count.to_string()),
                    ("max_age_hours", max_age_hours.to_string()),
                ],
            ),
            UploadQuery::ByStatus(statuses) => {
                if statuses.is_empty() {
                    return Ok(Vec::new());
                }
                // Repeated, never a comma list (that answers 500, spec E.5).
                (
                    "datasets/uploads/by-status",
                    statuses
                        .iter()
                        .map(|s| ("statuses", s.as_str().to_owned()))
                        .collect(),
                )
            }
            UploadQuery::All { limit } => {
                let call = Call::get(
                    "datasets/uploads".to_owned(),
                    vec![("limit", limit.to_string())],
                );
                let reply = self.http.answered(&call, None).await?;
                let list: WireUploadLogs = self.http.decode(&call, &reply)?;
                return list
                    .uploads
                    .into_iter()
                    .map(|log| {
                        let log = log.into_log()?;
                        Ok(UploadRef {
                            dataset_id: log.dataset_id,
                            last_error: log.meta_str("failure_reason").map(str::to_owned),
                            dataset_name: log.dataset_name,
                            status: Some(log.status),
                            retry_count: Some(log.retry_count),
                            origin_path: log.origin_path,
                            updated_at: Some(log.updated_at),
                        })
                    })
                    .collect();
            }
        };
        let call = Call::get(path.to_owned(), params);
        let reply = self.http.answered(&call, None).await?;
        let list: WireUploadRefs = self.http.decode(&call, &reply)?;
        list.uploads
            .into_iter()
            .map(WireUploadRef::into_ref)
            .collect()
    }

    pub(super) async fn http_register_process(
        &self,
        process: &WorkerProcess,
    ) -> Result<Option<i64>, RegistryError> {
        let body = json!({
            "workflow_id": process.workflow_id,
            "step": process.step,
            "task_id": process.task_id,
            "pid": process.pid,
            "hostname": process.hostname,
            "start_time": iso(process.start_time),
            "tags": process.tags,
        });
        let call = Call::post("workflows/processes".to_owned(), &body);
        let reply = self.http.answered(&call, None).await?;
        let created: WireProcess = self.http.decode(&call, &reply)?;
        Ok(Some(created.id))
    }

    pub(super) async fn http_add_process_logs(
        &self,
        process_id: i64,
        lines: &[ProcessLogLine],
    ) -> Result<(), RegistryError> {
        if lines.is_empty() {
            return Ok(());
        }
        // Every item needs all three fields: the API answers 500 otherwise (spec E.4).
        let body: Vec<Value> = lines
            .iter()
            .map(|line| {
                json!({"timestamp": iso(line.timestamp), "level": line.level, "message": line.message})
            })
            .collect();
        let call = Call::post(
            format!("workflows/processes/{process_id}/logs"),
            &Value::Array(body),
        );
        self.http.answered(&call, None).await?;
        Ok(())
    }

    pub(super) async fn http_notify(
        &self,
        notification: &Notification,
    ) -> Result<(), RegistryError> {
        // The fields the API requires (spec E.5), not the original's, which it rejects.
        let body = json!({
            "label": notification.label,
            "text": notification.text,
            "type": notification.kind,
            "metadata": notification.metadata,
            "role_ids": notification.role_ids,
        });
        let call = Call::post("notifications".to_owned(), &body);
        self.http.answered(&call, None).await?;
        Ok(())
    }
}

fn patch_body(patch: &UploadLogPatch) -> Value {
    let mut body = Map::new();
    if let Some(status) = patch.status {
        body.insert("status".into(), json!(status.as_str()));
    }
    if let Some(metadata) = &patch.metadata {
        body.insert("metadata".into(), Value::Object(metadata.clone()));
    }
    if let Some(retry_count) = patch.retry_count {
        body.insert("retry_count".into(), json!(retry_count));
    }
    if let Some(workflow_id) = &patch.workflow_id {
        body.insert("workflow_id".into(), json!(workflow_id));
    }
    Value::Object(body)
}

/// An upload log as the API sends it (spec E.5).
#[derive(Deserialize)]
struct WireUploadLog {
    #[serde(default)]
    id: i64,
    status: String,
    #[serde(default)]
    process_id: Option<Value>,
    #[serde(default)]
    retry_count: Option<u32>,
    #[serde(default)]
    metadata: Option<Value>,
    updated_at: String,
    dataset_id: DatasetId,
    #[serde(default)]
    dataset: Option<WireUploadDataset>,
}

#[derive(Deserialize)]
struct WireUploadDataset {
    #[serde(default)]
    name: String,
    #[serde(rename = "type", default)]
    dataset_type: Option<String>,
    #[serde(default)]
    origin_path: Option<String>,
}

#[derive(Deserialize)]
struct WirePatched {
    upload_log: WireUploadLog,
}

#[derive(Deserialize)]
struct WireUploadLogs {
    uploads: Vec<WireUploadLog>,
}

#[derive(Deserialize)]
struct WireUploadRefs {
    uploads: Vec<WireUploadRef>,
}

#[derive(Deserialize)]
struct WireUploadRef {
    dataset_id: DatasetId,
    #[serde(default)]
    dataset_name: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    retry_count: Option<u32>,
    #[serde(default)]
    last_error: Option<String>,
    #[serde(default)]
    origin_path: Option<String>,
    #[serde(default)]
    uploaded_at: Option<String>,
}

#[derive(Deserialize)]
struct WireProcess {
    id: i64,
}

impl WireUploadLog {
    fn into_log(self) -> Result<UploadLog, RegistryError> {
        let id = self.dataset_id;
        let status = self.status.parse().map_err(|err: String| {
            RegistryError::Invalid(format!("the upload log of dataset {id}: {err}"))
        })?;
        let dataset = self.dataset.unwrap_or(WireUploadDataset {
            name: String::new(),
            dataset_type: None,
            origin_path: None,
        });
        Ok(UploadLog {
            id: self.id,
            dataset_id: id,
            status,
            process_id: self.process_id.and_then(|p| match p {
                Value::Null => None,
                Value::String(s) => Some(s),
                other => Some(other.to_string()),
            }),
            retry_count: self.retry_count.unwrap_or(0),
            metadata: self.metadata.unwrap_or(Value::Null),
            updated_at: parse_time(id, "updated_at", &self.updated_at)?,
            dataset_name: dataset.name,
            dataset_type: dataset.dataset_type.and_then(|t| t.parse().ok()),
            origin_path: dataset.origin_path,
        })
    }
}

impl WireUploadRef {
    fn into_ref(self) -> Result<UploadRef, RegistryError> {
        let id = self.dataset_id;
        Ok(UploadRef {
            dataset_id: id,
            dataset_name: self.dataset_name,
            status: self
                .status
                .map(|s| s.parse::<UploadStatus>())
                .transpose()
                .map_err(|err| {
                    RegistryError::Invalid(format!("the upload of dataset {id}: {err}"))
                })?,
            retry_count: self.retry_count,
            last_error: self.last_error,
            origin_path: self.origin_path,
            updated_at: self
                .uploaded_at
                .map(|t| parse_time(id, "uploaded_at", &t))
                .transpose()?,
        })
    }
}

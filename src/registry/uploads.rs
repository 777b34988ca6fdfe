//! Upload logs (spec C.5): the records that take a dataset pushed by a user from UPLOADING to
//! COMPLETE, as the Bioloop API keeps them (spec E.5), and the worker-process records whose log
//! lines the UI shows.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::DatasetId;
use crate::model::{DatasetName, DatasetType};

/// The states of an upload (Prisma enum `upload_status`, spec C.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UploadStatus {
    Uploading,
    UploadFailed,
    Uploaded,
    Verifying,
    Verified,
    VerificationFailed,
    Processing,
    ProcessingFailed,
    Complete,
    PermanentlyFailed,
}

impl UploadStatus {
    pub const ALL: [UploadStatus; 10] = [
        UploadStatus::Uploading,
        UploadStatus::UploadFailed,
        UploadStatus::Uploaded,
        UploadStatus::Verifying,
        UploadStatus::Verified,
        UploadStatus::VerificationFailed,
        UploadStatus::Processing,
        UploadStatus::ProcessingFailed,
        UploadStatus::Complete,
        UploadStatus::PermanentlyFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UploadStatus::Uploading => "UPLOADING",
            UploadStatus::UploadFailed => "UPLOAD_FAILED",
            UploadStatus::Uploaded => "UPLOADED",
            UploadStatus::Verifying => "VERIFYING",
            UploadStatus::Verified => "VERIFIED",
            UploadStatus::VerificationFailed => "VERIFICATION_FAILED",
            UploadStatus::Processing => "PROCESSING",
            UploadStatus::ProcessingFailed => "PROCESSING_FAILED",
            UploadStatus::Complete => "COMPLETE",
            UploadStatus::PermanentlyFailed => "PERMANENTLY_FAILED",
        }
    }

    /// The failures after which the API tombstones the dataset (`{name}--{id}`, deleted), which
    /// frees its name for a new upload.
    pub fn is_terminal_failure(self) -> bool {
        matches!(
            self,
            UploadStatus::UploadFailed
                | UploadStatus::VerificationFailed
                | UploadStatus::PermanentlyFailed
        )
    }

    /// Stalled uploads (spec E.5 `GET .../stalled`) are in one of these states.
    pub fn can_stall(self) -> bool {
        matches!(
            self,
            UploadStatus::Uploaded | UploadStatus::Verifying | UploadStatus::Verified
        )
    }
}

impl fmt::Display for UploadStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UploadStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UploadStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown upload status `{s}`"))
    }
}

/// An upload's log (`dataset_upload_log`), with the dataset fields the API returns with it.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadLog {
    pub id: i64,
    pub dataset_id: DatasetId,
    pub status: UploadStatus,
    pub process_id: Option<String>,
    pub retry_count: u32,
    /// `Value::Null` until something is merged in (spec E.5).
    pub metadata: Value,
    /// Changes only with `status` or `retry_count`, never with metadata alone (spec E.5).
    pub updated_at: DateTime<Utc>,
    pub dataset_name: String,
    pub dataset_type: Option<DatasetType>,
    pub origin_path: Option<String>,
}

impl UploadLog {
    /// A top-level metadata field.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key).filter(|v| !v.is_null())
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key).and_then(Value::as_str)
    }
}

/// A change to an upload log (`PATCH .../upload-log`). `metadata` is merged at the top level
/// only (PostgreSQL `||`): a key sent replaces the stored key whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UploadLogPatch {
    pub status: Option<UploadStatus>,
    pub metadata: Option<serde_json::Map<String, Value>>,
    pub retry_count: Option<u32>,
    /// Links the workflow to the dataset in the same transaction as the status change.
    pub workflow_id: Option<String>,
}

impl UploadLogPatch {
    pub fn status(status: UploadStatus) -> UploadLogPatch {
        UploadLogPatch {
            status: Some(status),
            ..UploadLogPatch::default()
        }
    }

    pub fn with_metadata(mut self, metadata: serde_json::Map<String, Value>) -> UploadLogPatch {
        self.metadata = Some(metadata);
        self
    }
}

/// A new upload (`POST /datasets/uploads`).
#[derive(Debug, Clone)]
pub struct NewUpload {
    pub name: DatasetName,
    pub dataset_type: DatasetType,
    /// Where the embedded registry puts the payload: `<upload_dir>/<id>/<name>` (the API uses
    /// its own configured upload path, spec C.5.5).
    pub upload_dir: String,
}

/// The upload listings of the API (spec E.5), one query each.
#[derive(Debug, Clone, PartialEq)]
pub enum UploadQuery {
    /// `GET .../expired`: logs in `status` whose `updated_at` is older than `age_days`.
    Expired { status: UploadStatus, age_days: f64 },
    /// `GET .../stalled`: UPLOADED, VERIFYING and VERIFIED logs untouched for a while: 30 s
    /// for the API (its own fixed window), `after_seconds` for the embedded registry.
    Stalled { after_seconds: u64 },
    /// `GET .../failed`: PROCESSING_FAILED logs with at most `max_retry_count` retries,
    /// updated within `max_age_hours`.
    Failed {
        max_retry_count: u32,
        max_age_hours: f64,
    },
    /// `GET .../by-status`.
    ByStatus(Vec<UploadStatus>),
    /// Every upload, most recently updated first (the embedded registry lists all; the API
    /// lists those that have a `process_id`).
    All { limit: usize },
}

/// An upload in a listing; the listings return different subsets of these fields.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadRef {
    pub dataset_id: DatasetId,
    pub dataset_name: String,
    pub status: Option<UploadStatus>,
    pub retry_count: Option<u32>,
    /// `metadata.failure_reason`.
    pub last_error: Option<String>,
    pub origin_path: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// A process whose log lines the UI shows (`POST /workflows/processes`).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerProcess {
    /// `None` for plain tasks.
    pub workflow_id: Option<String>,
    /// The step name, or the task name for plain tasks.
    pub step: String,
    pub task_id: String,
    pub pid: u32,
    pub hostname: String,
    pub start_time: DateTime<Utc>,
    /// `{args: [...]}`.
    pub tags: Value,
}

/// One log line of a worker process.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessLogLine {
    pub timestamp: DateTime<Utc>,
    /// `stdout` or `stderr`, as the original's log tracking writes them.
    pub level: String,
    pub message: String,
}

/// A notification for the UI (`POST /notifications`, spec E.5).
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub label: String,
    pub text: String,
    pub kind: String,
    pub metadata: Value,
    pub role_ids: Vec<i64>,
}

/// `{name}--{id}`: the name a tombstoned upload's dataset gets, freeing its own.
pub fn tombstone_name(name: &str, id: DatasetId) -> String {
    format!("{name}--{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for status in UploadStatus::ALL {
            assert_eq!(status.as_str().parse::<UploadStatus>(), Ok(status));
        }
        assert!("uploaded".parse::<UploadStatus>().is_err());
    }

    #[test]
    fn terminal_failures_are_the_three_of_the_api() {
        let terminal: Vec<_> = UploadStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal_failure())
            .collect();
        assert_eq!(
            terminal,
            [
                UploadStatus::UploadFailed,
                UploadStatus::VerificationFailed,
                UploadStatus::PermanentlyFailed
            ]
        );
    }
}

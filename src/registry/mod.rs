//! The dataset registry seam: what the workers read and write about datasets.
//!
//! The contract is the Bioloop API's (spec E.2, E.3): names normalized on create, uniqueness on
//! (name, type, is_deleted), REGISTERED on create, metadata deep-merged on update, file rows
//! unique on (dataset, path). Two deliberate strengthenings, so that retries and crashes never
//! duplicate records: `add_state` is a no-op when the dataset's latest state is already the
//! one given, and `add_workflow` is a no-op for a link that exists.

pub mod http;
pub mod sql;
pub mod uploads;

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::model::{Bundle, CreateMethod, DatasetName, DatasetState, DatasetType, FileRecord};
use serde_json::Value;
use uploads::{
    NewUpload, Notification, ProcessLogLine, UploadLog, UploadLogPatch, UploadQuery, UploadRef,
    WorkerProcess,
};

pub type DatasetId = i64;

/// The API rejects bulk requests of more than this many datasets.
pub const MAX_BULK: usize = 100;

/// A dataset to create.
#[derive(Debug, Clone)]
pub struct NewDataset {
    pub name: DatasetName,
    pub dataset_type: DatasetType,
    pub origin_path: String,
    pub create_method: CreateMethod,
    pub description: Option<String>,
    pub metadata: Option<serde_json::Value>,
}

/// A dataset as the registry returns it.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub id: DatasetId,
    pub name: DatasetName,
    pub dataset_type: DatasetType,
    pub origin_path: Option<String>,
    pub archive_path: Option<String>,
    pub staged_path: Option<String>,
    pub description: Option<String>,
    pub du_size: Option<u64>,
    pub size: Option<u64>,
    pub bundle_size: Option<u64>,
    pub num_files: Option<u64>,
    pub num_directories: Option<u64>,
    pub is_deleted: bool,
    pub is_staged: bool,
    /// Always a JSON object.
    pub metadata: serde_json::Value,
    pub create_method: Option<CreateMethod>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Oldest first.
    pub states: Vec<StateRecord>,
    pub bundle: Option<Bundle>,
    /// Ids of the workflows linked to the dataset, oldest first.
    pub workflows: Vec<String>,
}

impl Dataset {
    /// `metadata.stage_alias`, once stage has recorded one.
    pub fn stage_alias(&self) -> Option<&str> {
        self.metadata.get("stage_alias").and_then(|v| v.as_str())
    }

    pub fn latest_state(&self) -> Option<&str> {
        self.states.last().map(|s| s.state.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRecord {
    /// A state name; usually one of `DatasetState`, but the registry may hold others (QC, ...).
    pub state: String,
    pub timestamp: DateTime<Utc>,
}

/// A partial update. `None` leaves a field alone; for the nullable columns `Some(None)` clears.
#[derive(Debug, Clone, Default)]
pub struct DatasetPatch {
    pub name: Option<DatasetName>,
    pub du_size: Option<u64>,
    pub size: Option<u64>,
    pub num_files: Option<u64>,
    pub num_directories: Option<u64>,
    /// Deep-merged into the stored metadata (objects merge key by key, other values replace).
    pub metadata: Option<serde_json::Value>,
    pub archive_path: Option<Option<String>>,
    pub staged_path: Option<Option<String>>,
    /// Where the dataset's data is (`download_illumina_dataset` moves it).
    pub origin_path: Option<String>,
    pub is_staged: Option<bool>,
    pub is_deleted: Option<bool>,
    /// Upserted.
    pub bundle: Option<Bundle>,
}

/// What a bulk create did with each item (spec E.2 `POST /datasets/bulk`).
#[derive(Debug, Clone, Default)]
pub struct BulkOutcome {
    pub created: Vec<Dataset>,
    pub conflicted: Vec<(DatasetName, DatasetType)>,
    pub errored: Vec<(DatasetName, DatasetType, String)>,
}

/// A filter for `Registry::find`. The default finds every dataset that is not deleted.
#[derive(Debug, Clone, Default)]
pub struct DatasetQuery {
    pub dataset_type: Option<DatasetType>,
    /// Exact (normalized) name.
    pub name: Option<DatasetName>,
    pub include_deleted: bool,
    /// Only datasets with no linked workflow.
    pub without_workflows: bool,
    pub create_method: Option<CreateMethod>,
    /// Only datasets linked to this workflow.
    pub workflow_id: Option<String>,
    /// Only staged datasets whose last STAGED state is older than this (spec C.2:
    /// `days_since_last_staged`).
    pub staged_before: Option<DateTime<Utc>>,
    pub limit: Option<usize>,
}

/// A usage measurement (spec C.4, `POST /metrics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    pub measurement: String,
    pub subject: String,
    pub usage: u64,
    pub limit: u64,
    pub tags: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("dataset {0} does not exist")]
    NotFound(DatasetId),
    #[error("{0}")]
    Invalid(String),
    /// The registry could not be reached or was busy; trying again later may work.
    #[error("the dataset registry is unavailable")]
    Unavailable(#[source] anyhow::Error),
}

#[async_trait]
pub trait Registry: Send + Sync {
    /// Creates up to `MAX_BULK` datasets, each with state REGISTERED.
    async fn bulk_create(&self, items: &[NewDataset]) -> Result<BulkOutcome, RegistryError>;

    /// One dataset with its states, bundle and workflow links.
    async fn get(&self, id: DatasetId) -> Result<Dataset, RegistryError>;

    /// Datasets matching `query`, most recently updated first.
    async fn find(&self, query: &DatasetQuery) -> Result<Vec<Dataset>, RegistryError>;

    /// The name and origin path of every live dataset of a type: what `watch`'s full scan
    /// compares a directory listing with, in one listing (paged where the registry pages)
    /// rather than one look-up per directory.
    async fn origins(
        &self,
        dataset_type: DatasetType,
    ) -> Result<HashMap<String, Option<String>>, RegistryError> {
        let query = DatasetQuery {
            dataset_type: Some(dataset_type),
            ..Default::default()
        };
        Ok(self
            .find(&query)
            .await?
            .into_iter()
            .map(|d| (d.name.to_string(), d.origin_path))
            .collect())
    }

    async fn update(&self, id: DatasetId, patch: &DatasetPatch) -> Result<Dataset, RegistryError>;

    /// Appends `state` unless it is already the dataset's latest state.
    async fn add_state(&self, id: DatasetId, state: DatasetState) -> Result<(), RegistryError>;

    /// Stores file rows; a row whose path the dataset already has is skipped.
    async fn add_files(&self, id: DatasetId, files: &[FileRecord]) -> Result<(), RegistryError>;

    /// Makes the dataset's file rows those of a new inspection, read from `rows`, and returns
    /// how many there are. Rows of an earlier inspection never survive as if they were current:
    /// a registry that can replace rows does so atomically; one that cannot (the Bioloop API
    /// keeps rows for good) fails with `Invalid`, naming the paths whose stored rows differ,
    /// and stores nothing. The call returns once every row is stored and readable.
    async fn replace_files(
        &self,
        id: DatasetId,
        rows: std::sync::Arc<dyn FileRowSource>,
    ) -> Result<u64, RegistryError>;

    /// How long stored file rows may take to become readable: a registry that answers before it
    /// stores (the Bioloop API, spec E.4) shows rows late; the embedded one never does.
    fn file_rows_lag(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// File rows in path order, starting after `after`: a stream in pages, so that datasets of
    /// millions of files are never held in memory at once.
    async fn files_page(
        &self,
        id: DatasetId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FileRecord>, RegistryError>;

    /// Links a workflow to the dataset.
    async fn add_workflow(&self, id: DatasetId, workflow_id: &str) -> Result<(), RegistryError>;

    /// Links many workflows, each to its dataset (a batch of `engine::start_many`).
    async fn add_workflows(&self, links: &[(DatasetId, String)]) -> Result<(), RegistryError> {
        for (id, workflow_id) in links {
            self.add_workflow(*id, workflow_id).await?;
        }
        Ok(())
    }

    /// The workflows linked to each of `ids`, oldest first; a dataset that does not exist is
    /// left out.
    async fn workflows_of(
        &self,
        ids: &[DatasetId],
    ) -> Result<HashMap<DatasetId, Vec<String>>, RegistryError> {
        let mut out = HashMap::new();
        for id in ids {
            match self.get(*id).await {
                Ok(dataset) => {
                    out.insert(*id, dataset.workflows);
                }
                Err(RegistryError::NotFound(_)) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(out)
    }

    /// Which of `workflow_ids` are linked to a dataset.
    async fn linked_workflows(
        &self,
        workflow_ids: &[String],
    ) -> Result<HashSet<String>, RegistryError>;

    /// Records usage measurements, all with the same timestamp.
    async fn add_metrics(&self, metrics: &[Metric]) -> Result<(), RegistryError>;

    /// Whether this registry's credentials may record metrics (the Bioloop API grants it to
    /// admins only, spec E.4), found by recording none; `None` when there is nothing to check.
    async fn may_post_metrics(&self) -> Result<Option<bool>, RegistryError> {
        Ok(None)
    }

    // Uploads (spec C.5, E.5).

    /// Registers a dataset created by upload (create method UPLOAD, state REGISTERED) with its
    /// upload log in UPLOADING; its `origin_path` is where the payload is to be put.
    async fn create_upload(&self, upload: &NewUpload) -> Result<UploadLog, RegistryError>;

    /// The sender is done: UPLOADED, with `metadata` merged (the manifest to verify against).
    /// Idempotent while UPLOADED; an upload that has advanced past UPLOADED is refused.
    async fn complete_upload(
        &self,
        id: DatasetId,
        process_id: &str,
        metadata: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<UploadLog, RegistryError>;

    /// The dataset's upload log; `None` if it has none.
    async fn upload_log(&self, id: DatasetId) -> Result<Option<UploadLog>, RegistryError>;

    /// Changes an upload log. A terminal failure status tombstones the dataset; a
    /// `workflow_id` is linked in the same transaction as the status change. `NotFound` if
    /// the dataset has no upload log.
    async fn update_upload_log(
        &self,
        id: DatasetId,
        patch: &UploadLogPatch,
    ) -> Result<UploadLog, RegistryError>;

    /// One of the API's upload listings.
    async fn uploads(&self, query: &UploadQuery) -> Result<Vec<UploadRef>, RegistryError>;

    /// Registers a worker process whose log lines the UI shows; `None` where the registry
    /// keeps no such records.
    async fn register_process(&self, process: &WorkerProcess)
    -> Result<Option<i64>, RegistryError>;

    /// Appends log lines to a registered worker process.
    async fn add_process_logs(
        &self,
        process_id: i64,
        lines: &[ProcessLogLine],
    ) -> Result<(), RegistryError>;

    /// Sends a notification to the UI's users (only where the API's notifications are on).
    async fn notify(&self, notification: &Notification) -> Result<(), RegistryError>;
    // Auxiliary tasks and scripts: QC reports, projects, who created a dataset. Defaults say
    // the registry cannot do it, so registries written for tests need not implement them.

    /// Stores the QC report `report` (an HTML file) of a dataset whose `metadata.report_id`
    /// is set (spec E.2 `PUT datasets/{id}/report`); returns where the registry keeps it.
    async fn upload_report(
        &self,
        id: DatasetId,
        report: &std::path::Path,
    ) -> Result<String, RegistryError> {
        let _ = report;
        Err(RegistryError::Invalid(format!(
            "this registry cannot store the QC report of dataset {id}"
        )))
    }

    /// The project with this id or slug (spec E.2 `GET projects/{id}`).
    async fn project(&self, id_or_slug: &str) -> Result<Project, RegistryError> {
        Err(RegistryError::Invalid(format!(
            "this registry has no projects (project `{id_or_slug}`)"
        )))
    }

    /// Associates datasets with a project; an association that exists already is kept.
    async fn add_to_project(
        &self,
        project_id: &str,
        ids: &[DatasetId],
    ) -> Result<(), RegistryError> {
        let _ = ids;
        Err(RegistryError::Invalid(format!(
            "this registry has no projects (project `{project_id}`)"
        )))
    }

    /// Who created the dataset (its `create` audit entry).
    async fn created_by(&self, id: DatasetId) -> Result<Creator, RegistryError> {
        let _ = id;
        Ok(Creator::Unknown)
    }
}

/// A project (spec E.2 `GET projects/{id}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    /// The project's id (a UUID in the Bioloop API), which associations name.
    pub id: String,
    pub slug: Option<String>,
    pub name: String,
}

/// Who created a dataset, as far as the registry knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creator {
    /// The registry records no users because only this deployment writes to it (the
    /// embedded registry): the service created every dataset.
    Service,
    /// The user named on the dataset's `create` audit entry.
    User(String),
    /// No record of the create.
    Unknown,
}

/// The rows of an inspection, read as often as a registry needs (once to compare, once to
/// store), on a blocking thread: they come from a spool file, never all held in memory.
pub trait FileRowSource: Send + Sync {
    fn rows(&self) -> anyhow::Result<FileRowIter>;
}

pub type FileRowIter = Box<dyn Iterator<Item = anyhow::Result<FileRecord>> + Send>;

/// Rows held in memory (tests, small inspections).
impl FileRowSource for Vec<FileRecord> {
    fn rows(&self) -> anyhow::Result<FileRowIter> {
        Ok(Box::new(self.clone().into_iter().map(Ok)))
    }
}

/// A dataset's file rows page by page, in path order: the cursor over `Registry::files_page`.
pub struct FilePages<'a> {
    registry: &'a dyn Registry,
    id: DatasetId,
    limit: usize,
    after: Option<String>,
    done: bool,
}

impl<'a> FilePages<'a> {
    pub fn new(registry: &'a dyn Registry, id: DatasetId, limit: usize) -> FilePages<'a> {
        FilePages {
            registry,
            id,
            limit,
            after: None,
            done: false,
        }
    }

    /// The next page, or `None` after the last row.
    pub async fn next(&mut self) -> Result<Option<Vec<FileRecord>>, RegistryError> {
        if self.done {
            return Ok(None);
        }
        let page = self
            .registry
            .files_page(self.id, self.after.as_deref(), self.limit)
            .await?;
        match page.last() {
            Some(last) => {
                self.after = Some(last.path.clone());
                Ok(Some(page))
            }
            None => {
                self.done = true;
                Ok(None)
            }
        }
    }
}

/// Merges `patch` into `base` like lodash `merge`, which the API uses for metadata: objects
/// merge key by key and arrays index by index, recursively; any other value replaces.
pub fn deep_merge(base: &mut serde_json::Value, patch: &serde_json::Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                match base.get_mut(key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(base), Value::Array(patch)) => {
            for (idx, value) in patch.iter().enumerate() {
                match base.get_mut(idx) {
                    Some(existing) => deep_merge(existing, value),
                    None => base.push(value.clone()),
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn metadata_merges_deeply() {
        let mut base = json!({"a": {"x": 1, "y": 2}, "b": [1, 2], "c": "keep"});
        deep_merge(
            &mut base,
            &json!({"a": {"y": 3, "z": 4}, "b": [9], "d": null}),
        );
        // Arrays merge index by index, as lodash does.
        assert_eq!(
            base,
            json!({"a": {"x": 1, "y": 3, "z": 4}, "b": [9, 2], "c": "keep", "d": null})
        );
    }
}

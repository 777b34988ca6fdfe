//! The steps of the workflows, one file each: plain async functions over a `StepContext`.
//!
//! A step reads the dataset from the registry, does its file-system and archive work on the
//! CPU pool, records what it found, and returns the value the next step receives. Every step
//! may run again after a crash or a retry, so each one is idempotent: it rebuilds its output
//! from scratch (bundles and staged trees through a temporary name and a rename) and its
//! registry writes do not duplicate (see `registry`).

pub mod archive;
pub mod await_stability;
pub mod delete;
pub mod inspect;
pub mod noop;
pub mod setup_download;
pub mod stage;
pub mod validate;

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::app::App;
use crate::archive::ArchiveError;
use crate::model::DatasetName;
use crate::progress::Progress;
use crate::registry::{Dataset, DatasetId, RegistryError};

/// The tasks the workers run, by their registered (Celery) names (spec B.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    AwaitStability,
    Inspect,
    Archive,
    Stage,
    Validate,
    SetupDownload,
    DeleteDataset,
    DeleteSource,
    /// Does nothing: for benchmarks and interoperability tests.
    Noop,
}

impl Task {
    pub const ALL: [Task; 9] = [
        Task::AwaitStability,
        Task::Inspect,
        Task::Archive,
        Task::Stage,
        Task::Validate,
        Task::SetupDownload,
        Task::DeleteDataset,
        Task::DeleteSource,
        Task::Noop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::AwaitStability => "await_stability",
            Task::Inspect => "inspect_dataset",
            Task::Archive => "archive_dataset",
            Task::Stage => "stage_dataset",
            Task::Validate => "validate_dataset",
            Task::SetupDownload => "setup_dataset_download",
            Task::DeleteDataset => "delete_dataset",
            Task::DeleteSource => "delete_source",
            Task::Noop => "noop",
        }
    }

    pub fn from_name(name: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The task names, comma-separated, for error messages.
    pub fn names() -> String {
        Task::ALL.map(Task::name).join(", ")
    }
}

/// What a step gets to work with.
pub struct StepContext {
    pub app: Arc<App>,
    pub dataset_id: DatasetId,
    pub task_id: String,
    /// The message's keyword arguments (`workflow_id`, `step`, `app_id` and step options).
    pub kwargs: Map<String, Value>,
    pub progress: Progress,
}

impl StepContext {
    pub async fn dataset(&self) -> Result<Dataset, StepError> {
        Ok(self.app.registry.get(self.dataset_id).await?)
    }

    /// A numeric keyword argument, if given.
    pub fn kwarg_u64(&self, key: &str) -> Option<u64> {
        self.kwargs
            .get(key)
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64)))
    }
}

/// Why a step failed, and whether trying again may help.
#[derive(Debug)]
pub struct StepError {
    retryable: bool,
    /// The exception type recorded in the task result (`InspectionFailed`, ...).
    kind: &'static str,
    error: anyhow::Error,
}

impl StepError {
    pub fn retryable(error: anyhow::Error) -> StepError {
        StepError {
            retryable: true,
            kind: "RetryableException",
            error,
        }
    }

    pub fn permanent(kind: &'static str, error: anyhow::Error) -> StepError {
        StepError {
            retryable: false,
            kind,
            error,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    pub fn error(&self) -> &anyhow::Error {
        &self.error
    }
}

impl From<RegistryError> for StepError {
    fn from(err: RegistryError) -> StepError {
        match err {
            RegistryError::Unavailable(_) => StepError::retryable(err.into()),
            RegistryError::NotFound(_) | RegistryError::Invalid(_) => {
                StepError::permanent("ValidationFailed", err.into())
            }
        }
    }
}

impl From<ArchiveError> for StepError {
    fn from(err: ArchiveError) -> StepError {
        match err {
            ArchiveError::NotFound(_) => StepError::permanent("ValidationFailed", err.into()),
            ArchiveError::Invalid(err) => StepError::permanent("ValidationFailed", err),
            ArchiveError::Transient(err) => StepError::retryable(err),
        }
    }
}

/// I/O trouble is worth another try unless the caller says otherwise.
impl From<anyhow::Error> for StepError {
    fn from(err: anyhow::Error) -> StepError {
        StepError::retryable(err)
    }
}

pub type StepResult = Result<Value, StepError>;

/// Runs `task`.
pub async fn run(task: Task, ctx: StepContext) -> StepResult {
    match task {
        Task::AwaitStability => await_stability::run(&ctx).await,
        Task::Inspect => inspect::run(&ctx).await,
        Task::Archive => archive::run(&ctx).await,
        Task::Stage => stage::run(&ctx).await,
        Task::Validate => validate::run(&ctx).await,
        Task::SetupDownload => setup_download::run(&ctx).await,
        Task::DeleteDataset => delete::run_delete_dataset(&ctx).await,
        Task::DeleteSource => delete::run_delete_source(&ctx).await,
        Task::Noop => noop::run(&ctx).await,
    }
}

/// The usual return value: a one-element list whose head the next step receives.
pub fn returns_dataset(id: DatasetId) -> Value {
    json!([id])
}

/// The stage alias (spec D.1): the first 32 hex characters of
/// SHA-256(decimal id + stored name + salt). It names the download directory, so it must
/// not be guessable without the salt.
pub fn stage_alias(id: DatasetId, name: &DatasetName, salt: &str) -> String {
    let digest = openssl::sha::sha256(format!("{id}{}{salt}", name.as_str()).as_bytes());
    hex::encode(digest)[..32].to_owned()
}

/// `{name}.{type}.tar` in the type's `bundle.stage` directory.
pub fn staged_bundle_path(app: &App, dataset: &Dataset) -> std::path::PathBuf {
    app.settings
        .paths
        .for_type(dataset.dataset_type)
        .bundle_stage
        .join(dataset.name.staged_bundle_file_name(dataset.dataset_type))
}

/// Fails with a permanent error unless the dataset has `origin_path` and it is a directory;
/// returns it with symbolic links resolved.
pub fn existing_origin(
    dataset: &Dataset,
    kind: &'static str,
) -> Result<std::path::PathBuf, StepError> {
    let Some(origin) = &dataset.origin_path else {
        return Err(StepError::permanent(
            kind,
            anyhow::format_err!(
                "dataset {} (`{}`) has no origin path",
                dataset.id,
                dataset.name
            ),
        ));
    };
    std::fs::canonicalize(origin).map_err(|err| {
        StepError::permanent(
            kind,
            anyhow::format_err!(
                "origin path `{origin}` of dataset {} (`{}`): {err}",
                dataset.id,
                dataset.name
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_matches_the_original_formula() {
        // hashlib.sha256(b"7ds1salt").hexdigest()[:32], as the original computes it.
        let name = DatasetName::normalize("ds1").unwrap();
        assert_eq!(
            stage_alias(7, &name, "salt"),
            "5c7cbad04b80560063a2353e8d69cb94"
        );
    }

    #[test]
    fn task_names_round_trip() {
        for task in Task::ALL {
            assert_eq!(Task::from_name(task.name()), Some(task));
        }
        assert_eq!(Task::from_name("no_such_task"), None);
    }
}

//! The steps of the workflows, one file each: plain async functions over a `StepContext`.
//!
//! A step reads the dataset from the registry, does its file-system and archive work on the
//! CPU pool, records what it found, and returns the value the next step receives. Every step
//! may run again after a crash or a retry, so each one is idempotent: it rebuilds its output
//! from scratch (bundles and staged trees through a temporary name and a rename) and its
//! registry writes do not duplicate (see `registry`).

pub mod archive;
pub mod await_stability;
pub mod capacity;
pub mod delete;
pub mod illumina;
pub mod inspect;
pub mod mark_archived;
pub mod noop;
pub mod program;
pub mod qc;
pub mod setup_download;
pub mod stage;
#[cfg(test)]
pub(crate) mod testing;
pub mod validate;
pub mod verify_upload;

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::archive::{Archive, ArchiveError};
use crate::cancel::CancellationToken;
use crate::compute::Pool;
use crate::compute::walk::{checksum_fingerprint_add, fingerprint_add};
use crate::config::Settings;
use crate::identity::Identity;
use crate::model::{DatasetName, InspectionRecord};
use crate::progress::Progress;
use crate::registry::{Dataset, DatasetId, Registry, RegistryError};
use crate::store::{SpaceLedger, WorkflowStore};
use anyhow::Context;

/// The task names live in `names`, which every layer may use.
pub use crate::names::Task;

/// The services a step may use: the registry, the archive, the CPU pool, the settings and
/// who runs it. Nothing else: a step never publishes, never touches the workflow store and
/// never talks to other workers (the engine around it does), so a test builds one from an
/// embedded registry and a local archive in a few lines ([`StepEnv::new`]). A worker gives
/// each step one made of its `App`'s parts (`App::step_env`).
pub struct StepEnv {
    pub settings: Arc<Settings>,
    pub registry: Arc<dyn Registry>,
    pub archive: Arc<dyn Archive>,
    /// Where steps reserve the bytes of their output (`capacity`).
    pub space: Arc<dyn SpaceLedger>,
    /// Read only, to tell whether a dataset's copy is still in use by an active workflow
    /// before a purge on demand removes it.
    pub workflows: Arc<dyn WorkflowStore>,
    pub pool: Pool,
    pub identity: Identity,
}

impl StepEnv {
    pub fn new(
        settings: Arc<Settings>,
        registry: Arc<dyn Registry>,
        archive: Arc<dyn Archive>,
        space: Arc<dyn SpaceLedger>,
        workflows: Arc<dyn WorkflowStore>,
        pool: Pool,
        identity: Identity,
    ) -> Arc<StepEnv> {
        Arc::new(StepEnv {
            settings,
            registry,
            archive,
            space,
            workflows,
            pool,
            identity,
        })
    }
}

/// What a step gets to work with.
pub struct StepContext {
    pub env: Arc<StepEnv>,
    pub dataset_id: DatasetId,
    pub task_id: String,
    /// The message's positional arguments; the first is `dataset_id`.
    pub args: Vec<Value>,
    /// The message's keyword arguments (`workflow_id`, `step`, `app_id` and step options).
    pub kwargs: Map<String, Value>,
    pub progress: Progress,
    /// Cancelled when the step must stop: its claim was lost, its time limit passed, its worker
    /// is stopping. Every pool job of the step runs under it.
    pub cancel: CancellationToken,
    /// Earlier attempts of this task (Celery's `request.retries`).
    pub retries: u32,
    /// Retries allowed after the first attempt: the attempt with `retries == max_retries` is
    /// the last.
    pub max_retries: u32,
}

impl StepContext {
    pub async fn dataset(&self) -> Result<Dataset, StepError> {
        Ok(self.env.registry.get(self.dataset_id).await?)
    }

    /// Runs a long job (hashing, bundling, extraction, walks, copies) on the CPU pool under the
    /// step's cancellation; the job polls the token it is given.
    pub async fn compute<T, F>(&self, f: F) -> Result<T, StepError>
    where
        F: FnOnce(&CancellationToken) -> T + Send + 'static,
        T: Send + 'static,
    {
        self.env
            .pool
            .run_job(&self.cancel, f)
            .await
            .map_err(|_| StepError::cancelled())
    }

    /// A numeric keyword argument, if given.
    pub fn kwarg_u64(&self, key: &str) -> Option<u64> {
        self.kwargs
            .get(key)
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64)))
    }
}

/// The exception type of a step that waits for space (`StepError::waiting_for_space`): how the
/// engine tells its RETRY record from a failed attempt's.
pub const WAITING_FOR_SPACE: &str = "WaitingForSpace";

/// Why a step failed, and whether trying again may help.
#[derive(Debug)]
pub struct StepError {
    retryable: bool,
    /// Not a failure: the step cannot start yet (no room for its output) and is to be run
    /// again after this long, without counting a retry.
    wait: Option<std::time::Duration>,
    /// The exception type recorded in the task result (`InspectionFailed`, ...).
    kind: &'static str,
    error: anyhow::Error,
}

impl StepError {
    pub fn retryable(error: anyhow::Error) -> StepError {
        StepError {
            retryable: true,
            wait: None,
            kind: "RetryableException",
            error,
        }
    }

    /// A retryable error recorded under its own exception type.
    pub fn retryable_as(kind: &'static str, error: anyhow::Error) -> StepError {
        StepError {
            retryable: true,
            wait: None,
            kind,
            error,
        }
    }

    pub fn permanent(kind: &'static str, error: anyhow::Error) -> StepError {
        StepError {
            retryable: false,
            wait: None,
            kind,
            error,
        }
    }

    /// `ValidationFailed`: the data or its records are not as the step needs them, and trying
    /// again cannot help.
    pub fn validation(error: anyhow::Error) -> StepError {
        StepError::permanent("ValidationFailed", error)
    }

    /// `InspectionFailed`: the dataset cannot be inspected as it is.
    pub fn inspection(error: anyhow::Error) -> StepError {
        StepError::permanent("InspectionFailed", error)
    }

    /// The step stopped because it was cancelled; whoever cancelled it decides what is
    /// recorded (nothing, for a lost claim or a shutdown).
    pub fn cancelled() -> StepError {
        StepError::permanent("Cancelled", anyhow::Error::new(crate::cancel::Cancelled))
    }

    /// A retryable error, or `cancelled` when the error is a cancellation.
    pub fn retryable_unless_cancelled(error: anyhow::Error) -> StepError {
        if crate::cancel::in_chain(&error) {
            StepError::cancelled()
        } else {
            StepError::retryable(error)
        }
    }

    /// `WaitingForSpace`: the step's output does not fit yet; its message goes back to the queue
    /// to run again after `delay`, and no retry is counted. `error` says what it waits for.
    pub fn waiting_for_space(delay: std::time::Duration, error: anyhow::Error) -> StepError {
        StepError {
            retryable: true,
            wait: Some(delay),
            kind: WAITING_FOR_SPACE,
            error,
        }
    }

    /// How long to wait before running again, for a step that could not start yet.
    pub fn wait(&self) -> Option<std::time::Duration> {
        self.wait
    }

    pub fn is_cancelled(&self) -> bool {
        self.kind == "Cancelled"
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
                StepError::validation(err.into())
            }
        }
    }
}

impl From<ArchiveError> for StepError {
    fn from(err: ArchiveError) -> StepError {
        match err {
            ArchiveError::NotFound(_) => StepError::validation(err.into()),
            ArchiveError::Invalid(err) => StepError::validation(err),
            ArchiveError::Transient(err) => StepError::retryable(err),
            ArchiveError::Cancelled => StepError::cancelled(),
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {:#}", self.kind, self.error)
    }
}

impl std::error::Error for StepError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.error.as_ref())
    }
}

/// I/O trouble is worth another try unless the caller says otherwise.
impl From<anyhow::Error> for StepError {
    fn from(err: anyhow::Error) -> StepError {
        StepError::retryable_unless_cancelled(err)
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
        Task::VerifyUploadIntegrity => verify_upload::run(&ctx).await,
        Task::MarkArchivedAndDelete => mark_archived::run(&ctx).await,
        Task::GenerateQc => qc::run(&ctx).await,
        Task::DownloadIllumina => illumina::run(&ctx).await,
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
pub fn staged_bundle_path(env: &StepEnv, dataset: &Dataset) -> std::path::PathBuf {
    env.settings
        .paths
        .for_type(dataset.dataset_type)
        .bundle_stage
        .join(dataset.name.staged_bundle_file_name(dataset.dataset_type))
}

/// Fails with a permanent error unless the dataset has `origin_path` and it exists; returns it
/// with symbolic links resolved.
pub async fn existing_origin(dataset: &Dataset, kind: &'static str) -> Result<PathBuf, StepError> {
    let Some(origin) = dataset.origin_path.clone() else {
        return Err(StepError::permanent(
            kind,
            anyhow::format_err!(
                "dataset {} (`{}`) has no origin path",
                dataset.id,
                dataset.name
            ),
        ));
    };
    let path = origin.clone();
    crate::compute::blocking(move || std::fs::canonicalize(&path))
        .await
        .map_err(|err| {
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

/// What a dataset's file rows add up to: comparable with an inspection record and a bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowsSummary {
    pub rows: u64,
    /// `fingerprint_add` over (path, 0).
    pub paths: u64,
    /// `fingerprint_add` over (path, size); `None` when the registry returns rows without sizes.
    pub sizes: Option<u64>,
    /// `checksum_fingerprint_add` over (path, MD5).
    pub checksums: u64,
}

/// Reads the dataset's rows page by page into a summary.
pub async fn summarize_rows(ctx: &StepContext, id: DatasetId) -> Result<RowsSummary, StepError> {
    let mut summary = RowsSummary {
        sizes: Some(0),
        ..RowsSummary::default()
    };
    let mut pages = crate::registry::FilePages::new(ctx.env.registry.as_ref(), id, 10_000);
    while let Some(page) = pages.next().await? {
        // Hashing every path of a page is CPU work: on the pool, not on a runtime thread.
        summary = ctx.compute(move |_| summary.add(&page)).await?;
    }
    Ok(summary)
}

impl RowsSummary {
    fn add(mut self, rows: &[crate::model::FileRecord]) -> RowsSummary {
        for row in rows {
            self.rows += 1;
            self.paths = fingerprint_add(self.paths, &row.path, 0);
            self.sizes = match (self.sizes, row.size) {
                (Some(acc), Some(size)) => Some(fingerprint_add(acc, &row.path, size)),
                _ => None,
            };
            self.checksums = checksum_fingerprint_add(self.checksums, &row.path, row.md5.as_ref());
        }
        self
    }
}

/// Reads the dataset's rows until `complete` says they are, waiting with a growing pause for at
/// most the registry's `file_rows_lag` (rows a registry acknowledged may show up late, spec
/// E.4); returns the last reading, complete or not.
pub async fn wait_for_rows(
    ctx: &StepContext,
    id: DatasetId,
    complete: impl Fn(&RowsSummary) -> bool,
) -> Result<RowsSummary, StepError> {
    let started = std::time::Instant::now();
    let lag = ctx.env.registry.file_rows_lag();
    let mut pause = std::time::Duration::from_millis(500);
    loop {
        let summary = summarize_rows(ctx, id).await?;
        if complete(&summary) || started.elapsed() >= lag {
            return Ok(summary);
        }
        tracing::info!(
            rows = summary.rows,
            "File rows are not all readable yet; waiting for them."
        );
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = ctx.cancel.cancelled() => return Err(StepError::cancelled()),
        }
        pause = (pause * 2).min(std::time::Duration::from_secs(15));
    }
}

/// Takes a dataset's staged copy out of service: first the record (not staged, no staged path)
/// so that nothing ever claims a copy being removed, then the download links, the tree
/// (read-only directories included) and the staged bundle. An error after the record was
/// written leaves files behind, never a record that lies; it names what was left.
pub async fn withdraw_staged_copy(env: &StepEnv, dataset: &Dataset) -> anyhow::Result<()> {
    env.registry
        .update(
            dataset.id,
            &crate::registry::DatasetPatch {
                is_staged: Some(false),
                staged_path: Some(None),
                ..Default::default()
            },
        )
        .await
        .context("cannot record that the staged copy is withdrawn; it was left in place")?;
    let download_dir = env.settings.paths.download_dir.clone();
    let links: Vec<PathBuf> = [
        dataset.stage_alias().map(|alias| download_dir.join(alias)),
        Some(download_dir.join(dataset.name.staged_bundle_file_name(dataset.dataset_type))),
    ]
    .into_iter()
    .flatten()
    .collect();
    let tree = dataset.staged_path.as_deref().map(PathBuf::from);
    let bundle = staged_bundle_path(env, dataset);
    crate::compute::blocking(move || -> anyhow::Result<()> {
        let never = CancellationToken::new();
        // The links first: a download never starts on a tree being removed. Anything but a
        // link at a link's place is not ours and is left alone.
        for link in &links {
            if std::fs::symlink_metadata(link).is_ok_and(|meta| meta.file_type().is_symlink()) {
                std::fs::remove_file(link)
                    .with_context(|| format!("cannot remove the link `{}`", link.display()))?;
            }
        }
        for path in tree.iter().chain(std::iter::once(&bundle)) {
            crate::compute::remove_tree(path, &never)
                .with_context(|| format!("cannot remove `{}`", path.display()))?;
        }
        Ok(())
    })
    .await
    .context("the dataset is recorded as not staged, but its files could not all be removed")
}

/// The dataset's inspection record; a dataset inspected by an older release (or by the Python
/// workers) has none, and callers then fall back to its file rows.
pub fn inspection_of(dataset: &Dataset) -> Option<InspectionRecord> {
    InspectionRecord::from_metadata(&dataset.metadata)
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

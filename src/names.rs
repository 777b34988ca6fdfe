//! The names of the jobs and the tasks: what the configuration, the command line, the metrics
//! and the Celery messages call them. A leaf module (it uses nothing of this crate), so that
//! `config` can check names without depending on the jobs and steps that need `config`.

/// The jobs the scheduler runs (and `workers jobs run` runs by hand), by their configuration
/// names: `[schedules.<name>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobName {
    Watch,
    PurgeStagedDatasets,
    PurgeStaleWorkflows,
    Reconcile,
    Metrics,
    ManageUploadWorkflows,
    PurgeStaleUploaded,
    PopulateBundles,
    Fixity,
}

impl JobName {
    pub const ALL: [JobName; 9] = [
        JobName::Watch,
        JobName::PurgeStagedDatasets,
        JobName::PurgeStaleWorkflows,
        JobName::Reconcile,
        JobName::Metrics,
        JobName::ManageUploadWorkflows,
        JobName::PurgeStaleUploaded,
        JobName::PopulateBundles,
        JobName::Fixity,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobName::Watch => "watch",
            JobName::PurgeStagedDatasets => "purge_staged_datasets",
            JobName::PurgeStaleWorkflows => "purge_stale_workflows",
            JobName::Reconcile => "reconcile",
            JobName::Metrics => "metrics",
            JobName::ManageUploadWorkflows => "manage_upload_workflows",
            JobName::PurgeStaleUploaded => "purge_stale_uploaded",
            JobName::PopulateBundles => "populate_bundles",
            JobName::Fixity => "fixity",
        }
    }

    pub fn from_name(name: &str) -> Option<JobName> {
        JobName::ALL.into_iter().find(|j| j.name() == name)
    }

    /// The job names, comma-separated, for messages.
    pub fn names() -> String {
        JobName::ALL.map(JobName::name).join(", ")
    }
}

impl std::fmt::Display for JobName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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
    /// Checks an upload against its sender's manifest (a plain task, spec C.5.3).
    VerifyUploadIntegrity,
    MarkArchivedAndDelete,
    GenerateQc,
    DownloadIllumina,
    /// Does nothing: for benchmarks and interoperability tests.
    Noop,
}

impl Task {
    pub const ALL: [Task; 13] = [
        Task::AwaitStability,
        Task::Inspect,
        Task::Archive,
        Task::Stage,
        Task::Validate,
        Task::SetupDownload,
        Task::DeleteDataset,
        Task::DeleteSource,
        Task::VerifyUploadIntegrity,
        Task::MarkArchivedAndDelete,
        Task::GenerateQc,
        Task::DownloadIllumina,
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
            Task::VerifyUploadIntegrity => "verify_upload_integrity",
            Task::MarkArchivedAndDelete => "mark_archived_and_delete",
            Task::GenerateQc => "generate_qc",
            Task::DownloadIllumina => "download_illumina_dataset",
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

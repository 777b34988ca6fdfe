//! The typed configuration: what `config/*.toml`, the environment and the secrets turn into.
//!
//! `RawSettings` mirrors the files key for key (serde, no defaults: `config/default.toml` holds
//! every key). `Settings` is the validated form the rest of the program receives: paths made
//! absolute, secrets attached, backends chosen.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::{CopyKind, DatasetType};
use crate::names::JobName;
use crate::scheduler::schedule::Schedule;

/// The merged configuration files, before validation. Field names are the TOML keys.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawSettings {
    pub app_id: String,
    /// The account the workers run as (its quota is measured by the metrics job).
    pub service_user: String,
    /// Threads of the CPU pool; 0 means one per core.
    pub parallelism: usize,
    pub genome_file_types: Vec<String>,
    pub paths: RawPaths,
    pub registration: RawRegistration,
    pub stage: RawStage,
    pub inspect: RawInspect,
    pub workflows: RawWorkflows,
    pub retry: RawRetry,
    pub worker: RawWorker,
    pub progress: RawProgress,
    pub registry: RawBackend,
    pub store: RawBackend,
    pub broker: RawBackend,
    pub archive: RawBackend,
    pub sqlite: RawSqlite,
    pub api: RawApi,
    pub mongo: RawMongo,
    pub postgres: RawPostgres,
    pub amqp: RawAmqp,
    pub hsi: RawHsi,
    pub secrets: RawSecrets,
    pub log: RawLog,
    pub scheduler: RawScheduler,
    /// `[schedules.<job>]`, one table per job.
    pub schedules: BTreeMap<String, RawSchedule>,
    pub metrics: RawMetrics,
    pub prometheus: RawPrometheus,
    pub uploads: RawUploads,
    pub notifications: RawNotifications,
    pub qc: RawQc,
    pub illumina: RawIllumina,
    pub fixity: RawFixity,
    pub capacity: RawCapacity,
}

/// Admission by bytes: what steps leave free on the file systems they write to.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawCapacity {
    /// A size (`"10 GiB"`) kept free on every file system a step writes to; `"0"`: none.
    pub headroom: String,
    /// How long a step that waits for space waits before it looks again.
    pub wait_seconds: u64,
}

/// The `fixity` job: which copies it re-reads, how much a run may read, how often every
/// dataset is to be verified.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawFixity {
    /// `archive`, `staged`, `source`.
    pub copies: Vec<String>,
    /// A size (`"2 TB"`, `"500 GiB"`, `"0"`: no limit).
    pub bytes_per_run: String,
    pub period_days: u32,
    /// `never`, `missing` or `always` (see `RecallPolicy`).
    pub recall: String,
}

/// The upload pipeline (spec C.5): `manage_upload_workflows` and `purge_stale_uploaded`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawUploads {
    /// An upload still UPLOADING this many days after its last change is failed (UPLOAD_FAILED),
    /// which frees its name.
    pub expire_uploading_after_days: f64,
    /// How often the ingestion of a verified upload is started again after its `integrated`
    /// workflow failed; then it is PERMANENTLY_FAILED.
    pub max_retries: u32,
    /// A failed ingestion older than this is no longer retried.
    pub retry_window_hours: f64,
    /// A verification that has not ended after this long fails (VERIFICATION_FAILED).
    pub verification_timeout_seconds: u64,
    /// A VERIFYING upload that has no verification task after this long gets a new one.
    pub respawn_verification_after_seconds: u64,
    /// The embedded registry hands an upload to the job once it has not changed for this
    /// long; the Bioloop API applies its own fixed 30 s.
    pub stalled_after_seconds: u64,
    pub purge: RawUploadPurge,
}

/// `purge_stale_uploaded` (spec C.5.4).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawUploadPurge {
    /// Upload-session files (`<32 hex>` and `<32 hex>.json`) older than this are removed.
    pub ttl_days: f64,
    /// An upload still UPLOADING after this many days is PERMANENTLY_FAILED and its files
    /// removed.
    pub stale_uploading_days: f64,
}

/// Notifications to the UI's users (`POST /notifications`, spec E.5).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawNotifications {
    /// Whether the API has its notifications feature on; the route exists only then.
    pub enabled: bool,
    /// The roles notified (the API requires at least one): for example the operators' role id.
    pub role_ids: Vec<i64>,
}

/// `generate_qc` (spec B.8): FastQC over the staged copy's `*.fastq.gz`, then MultiQC.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawQc {
    /// The FastQC program: a name looked up in PATH, or a path.
    pub fastqc: PathBuf,
    /// The MultiQC program: a name looked up in PATH, or a path.
    pub multiqc: PathBuf,
    /// `fastqc -t`: files FastQC works on at once.
    pub threads: u32,
    /// Files given to one FastQC run; progress is reported after each run.
    pub batch_size: usize,
    /// Longest run of one FastQC batch or of MultiQC; past it the program is killed.
    pub command_timeout_seconds: u64,
}

/// `download_illumina_dataset` (spec B.8): Illumina BaseSpace through its `bs` client.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawIllumina {
    /// The BaseSpace CLI: a name looked up in PATH, or a path.
    pub bs: PathBuf,
    /// `bs list datasets --newer-than=<n_days>d`.
    pub n_days: u32,
    /// Downloads go to `<download_dir>/<dataset name>`.
    pub download_dir: PathBuf,
    /// Longest run of one `bs` command; past it the program is killed.
    pub command_timeout_seconds: u64,
}

/// When a job runs (`[schedules.<job>]`): `cron` or `every`, plus policies.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawSchedule {
    /// Six fields, seconds first, e.g. "0 0 7 * * *"; "" when `every` is used.
    pub cron: Option<String>,
    /// An interval such as "10s"; "" when `cron` is used.
    pub every: Option<String>,
    pub timezone: String,
    pub enabled: bool,
    /// "skip" or "queue".
    pub overlap: String,
    /// "skip" or "run_once".
    pub misfire: String,
    /// A duration such as "30s"; "0s" for none.
    pub jitter: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawScheduler {
    /// Only the holder of the scheduler lease fires jobs; it renews the lease every third of
    /// this, and another scheduler takes over at most two lease periods after it dies.
    pub lease_seconds: u64,
    /// On SIGTERM, how long running jobs may take to finish before they are stopped.
    pub grace_seconds: u64,
    /// Workflow steps the scheduler process also runs (embedded broker); 0 leaves them to
    /// `workers worker` processes.
    pub workers: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawMetrics {
    /// Also run `quota` and `lfs quota` and record their figures (the original's SDA and
    /// Lustre scratch quotas).
    pub quota: bool,
    /// The Lustre file system `lfs quota -u <service_user>` is asked about.
    pub lfs_path: PathBuf,
}

/// The Prometheus endpoint of `workers worker` and `workers scheduler`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawPrometheus {
    /// `host:port` (an IP address, e.g. `127.0.0.1:9808` or `[::1]:9808`) to serve `/metrics`
    /// on; empty: no endpoint.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawPaths {
    pub root: PathBuf,
    pub scratch: PathBuf,
    pub download_dir: PathBuf,
    #[serde(rename = "RAW_DATA")]
    pub raw_data: RawTypePaths,
    #[serde(rename = "DATA_PRODUCT")]
    pub data_product: RawTypePaths,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawTypePaths {
    pub upload: PathBuf,
    /// May contain `{year}`, replaced by the current year when a bundle is archived.
    pub archive: String,
    pub stage: PathBuf,
    pub qc: Option<PathBuf>,
    pub bundle: RawBundlePaths,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawBundlePaths {
    pub generate: PathBuf,
    pub stage: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawRegistration {
    #[serde(rename = "RAW_DATA")]
    pub raw_data: RawSource,
    #[serde(rename = "DATA_PRODUCT")]
    pub data_product: RawSource,
    pub recency_threshold_seconds: u64,
    pub wait_between_stability_checks_seconds: u64,
    pub poll_interval_seconds: u64,
    pub full_scan_every_n_scans: u32,
    pub minimum_dataset_size: u64,
    /// `await_stability` fails after waiting this long for a dataset to stop changing (0: no
    /// limit).
    pub max_stability_wait_seconds: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawSource {
    pub source_dir: PathBuf,
    pub rejects: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawStage {
    /// Permission bits of staged files, in octal (`"0644"`); files that were executable get
    /// `x` where they have `r`.
    pub file_mode: String,
    /// Permission bits of staged directories, in octal (`"0755"`).
    pub directory_mode: String,
    pub purge: RawPurge,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawPurge {
    pub days_to_live: u32,
    pub max_purges: u32,
    /// Purging by fill: above this percentage of a staging file system used, the oldest staged
    /// copies go until it is below `low_watermark_percent`; 0 turns it off.
    pub high_watermark_percent: u8,
    pub low_watermark_percent: u8,
    /// Copies staged more recently than this are never purged to make room.
    pub min_age_hours: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawInspect {
    pub file_metadata_batch_size: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawWorkflows {
    /// Folder of the workflow definitions (`<name>.toml`).
    pub dir: PathBuf,
    /// With a broker that cannot say what it holds (RabbitMQ), `reconcile` publishes a step that
    /// never started again once its workflow saw no change for this long.
    pub stalled_after_seconds: u64,
    pub purge: RawWorkflowPurge,
    pub integrated: RawIntegrated,
}

/// Site options of the `integrated` workflow.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawIntegrated {
    /// Insert a `generate_qc` step (named `qc`) after `setup_download`.
    pub qc: bool,
}

/// `purge_stale_workflows` (spec C.3).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawWorkflowPurge {
    /// Workflow names considered.
    pub types: Vec<String>,
    /// Only workflows older than this and linked to no dataset are deleted.
    pub age_threshold_seconds: u64,
    /// At most this many per run.
    pub max_purge_count: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawRetry {
    pub default: RetryPolicy,
    /// Per task name (`inspect_dataset`, ...): overrides of the default policy.
    pub steps: BTreeMap<String, RetryPolicy>,
}

/// How often a failing step is tried again (spec B.0: `max_retries=3` means up to 4 attempts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub delay_seconds: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawWorker {
    /// Steps one process runs at once.
    pub concurrency: usize,
    /// A running step's claim is renewed every third of this; a claim not renewed within this
    /// time (its worker died) lets another worker take the step.
    pub lease_seconds: u64,
    /// On SIGTERM, how long running steps may take to finish before they are stopped and
    /// handed back to the queue.
    pub shutdown_grace_seconds: u64,
    /// Longest run of one step attempt (0: no limit); a step past it is stopped and fails.
    pub time_limit_seconds: u64,
    /// Per task name: overrides of `time_limit_seconds`.
    pub time_limits: BTreeMap<String, u64>,
    /// Send Celery's monitoring events (RabbitMQ only).
    pub send_events: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawProgress {
    /// Least time between two progress writes of one step to the store.
    pub interval_seconds: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawBackend {
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawSqlite {
    pub path: PathBuf,
    pub busy_timeout_seconds: u64,
}

/// The Bioloop API (`registry.kind = "http"`, spec E.1).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawApi {
    /// The API root, e.g. "http://api:3030/" (API_BASE_URL).
    pub base_url: String,
    pub connect_timeout_seconds: f64,
    pub read_timeout_seconds: f64,
    /// Retries of a request on connection errors, timeouts and 429/502/503.
    pub max_retries: u32,
    /// The n-th retry waits backoff_seconds * 2^(n-1), at most backoff_max_seconds.
    pub backoff_seconds: f64,
    pub backoff_max_seconds: f64,
}

/// The MongoDB holding sca-rhythm's and Celery's documents (`store.kind = "mongo"`, spec F.1).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawMongo {
    /// A full connection string; when empty, one is built from the keys below (MONGO_HOST,
    /// MONGO_PORT, MONGO_USER, MONGO_AUTH_SOURCE and the secret MONGO_PASS).
    pub uri: String,
    pub host: String,
    pub port: u16,
    /// The database (MONGO_DB).
    pub database: String,
    pub auth_source: String,
    /// Empty for a server without authentication.
    pub user: String,
}

/// A PostgreSQL database shared by hosts (`registry.kind`, `store.kind` or `broker.kind` =
/// `"postgres"`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawPostgres {
    /// `postgres://user@host:port/database` (or `host=... dbname=...`); the password is the
    /// secret postgres_password (PGPASSWORD).
    pub url: String,
    /// Connections each process keeps at most.
    pub pool_size: u32,
    pub connect_timeout_seconds: u64,
    /// How long a statement keeps trying while the database cannot be reached, before the
    /// work that needed it fails (and is retried as a failure of its own).
    pub reconnect_max_seconds: u64,
    /// Where the registry in PostgreSQL keeps uploaded QC reports
    /// (`<dir>/<report_id>/multiqc_report.html`); empty: nowhere.
    pub reports_dir: PathBuf,
}

/// RabbitMQ (`broker.kind = "amqp"`, spec G.1).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawAmqp {
    /// `host:port/vhost` as QUEUE_URL (vhost `/` spelled `%2f`), or a full `amqp://` URL.
    pub url: String,
    pub user: String,
    /// Queues consumed by `workers worker`; empty means `{app_id}.q`.
    pub queues: Vec<String>,
    pub heartbeat_seconds: u16,
    /// The longest wait between two reconnection attempts.
    pub reconnect_max_seconds: u64,
    /// At most this many messages waiting for their `eta` raise the prefetch.
    pub max_held_messages: u16,
    /// The dead-letter exchange the queues are declared with; empty for none.
    pub dead_letter_exchange: String,
}

/// HPSS through `hsi` (`archive.kind = "hsi"`, spec D.3).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawHsi {
    /// The `hsi` program: a name looked up in PATH, or a path.
    pub command: PathBuf,
    /// Transfer with checksums (`put -c on`, `get -c on`).
    pub verify: bool,
    /// Longest time an hsi command other than a transfer may take.
    pub command_timeout_seconds: u64,
    /// A transfer that makes no progress for this long is stopped.
    pub stall_timeout_seconds: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawSecrets {
    /// Secrets that must be present in the environment (names as in `Secret::name`).
    pub required: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawLog {
    /// `human` or `json`.
    pub format: String,
    /// A `tracing` filter directive such as `info` or `workers=debug`.
    pub level: String,
}

impl RawLog {
    /// The `tracing` filter `level` stands for: a bare level (`debug`) applies to this program
    /// only, because libraries should speak up about problems alone; anything with a `=` is a
    /// filter of its own and taken as written.
    pub fn filter(&self) -> String {
        if self.level.contains('=') {
            self.level.clone()
        } else {
            format!("warn,workers={}", self.level)
        }
    }
}

/// Validated configuration handed to the rest of the program.
#[derive(Debug, Clone)]
pub struct Settings {
    pub app_id: String,
    pub parallelism: usize,
    pub genome_file_types: Vec<String>,
    pub paths: Paths,
    pub registration: Registration,
    pub stage: Stage,
    pub inspect: RawInspect,
    pub workflows_dir: PathBuf,
    pub workflows_stalled_after: std::time::Duration,
    pub retry: RawRetry,
    pub worker: RawWorker,
    pub progress_interval: std::time::Duration,
    pub backends: Backends,
    pub sqlite: RawSqlite,
    pub api: ApiSettings,
    pub mongo: MongoSettings,
    /// What it takes to reach the PostgreSQL database (checked only when a backend uses it).
    pub postgres: crate::sql::postgres::PgConfig,
    /// `postgres.reports_dir`, resolved; `None` when not set.
    pub postgres_reports_dir: Option<PathBuf>,
    pub amqp: AmqpSettings,
    pub hsi: RawHsi,
    pub log: RawLog,
    pub service_user: String,
    pub scheduler: SchedulerSettings,
    /// Every job with its schedule, in `JobName::ALL` order.
    pub schedules: Vec<(JobName, Schedule)>,
    pub workflow_purge: RawWorkflowPurge,
    /// `workflows.integrated.qc`: `integrated` gets a `generate_qc` step.
    pub integrated_qc: bool,
    pub metrics: RawMetrics,
    /// Where `workers worker` and `workers scheduler` serve Prometheus metrics; `None`: nowhere.
    pub prometheus_listen: Option<std::net::SocketAddr>,
    pub uploads: RawUploads,
    pub notifications: RawNotifications,
    pub qc: QcSettings,
    pub illumina: IlluminaSettings,
    pub fixity: FixitySettings,
    pub capacity: CapacitySettings,
    /// Where the configuration came from, for `config show` and error messages.
    pub sources: Vec<String>,
    /// Things worth telling the operator at startup (for example a development secret in use).
    pub warnings: Vec<String>,
}

/// Admission by bytes (`capacity`).
#[derive(Debug, Clone)]
pub struct CapacitySettings {
    /// Bytes kept free on every file system a step writes to.
    pub headroom: u64,
    /// How long a step that waits for space waits before it looks again.
    pub wait: std::time::Duration,
}

/// The `fixity` job's settings.
#[derive(Debug, Clone)]
pub struct FixitySettings {
    /// The copies each check re-reads, in this order.
    pub copies: Vec<CopyKind>,
    /// Most bytes one run reads; `None`: no limit.
    pub bytes_per_run: Option<u64>,
    /// Every archived dataset is checked once in this period (when it falls due); `None`
    /// (`period_days = 0`): continuously, the longest unchecked first, as far as the budget
    /// of each run goes.
    pub period: Option<std::time::Duration>,
    pub recall: RecallPolicy,
}

/// When a fixity check of an archive that keeps checksums of its own (HPSS) recalls the
/// bundle to read it, rather than trusting the checksum the archive holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecallPolicy {
    /// Never: a bundle the archive holds no checksum for is not checked.
    Never,
    /// Only bundles the archive holds no checksum for.
    Missing,
    /// Every bundle: the bytes on the medium are read.
    Always,
}

impl RecallPolicy {
    pub const NAMES: &'static [&'static str] = &["never", "missing", "always"];

    pub fn from_name(name: &str) -> Option<RecallPolicy> {
        Some(match name {
            "never" => RecallPolicy::Never,
            "missing" => RecallPolicy::Missing,
            "always" => RecallPolicy::Always,
            _ => return None,
        })
    }
}

/// `generate_qc`'s programs and limits.
#[derive(Debug, Clone)]
pub struct QcSettings {
    pub fastqc: PathBuf,
    pub multiqc: PathBuf,
    pub threads: u32,
    pub batch_size: usize,
    pub command_timeout: std::time::Duration,
}

/// `download_illumina_dataset`'s program and places.
#[derive(Debug, Clone)]
pub struct IlluminaSettings {
    pub bs: PathBuf,
    pub n_days: u32,
    /// Absolute.
    pub download_dir: PathBuf,
    pub command_timeout: std::time::Duration,
}

/// The Bioloop API client's settings.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Ends in `/`, so relative paths join below it.
    pub base_url: url::Url,
    pub token: Option<SecretString>,
    pub connect_timeout: std::time::Duration,
    pub read_timeout: std::time::Duration,
    pub max_retries: u32,
    pub backoff: std::time::Duration,
    pub backoff_max: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct MongoSettings {
    /// The connection string, with the password when there is one.
    pub uri: SecretString,
    /// The connection string with its password redacted, for messages.
    pub display: String,
    pub database: String,
}

#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:port/vhost`.
    pub uri: SecretString,
    /// The URL with its password redacted, for messages.
    pub display: String,
    /// Never empty.
    pub queues: Vec<String>,
    pub heartbeat: u16,
    pub reconnect_max: std::time::Duration,
    pub max_held: u16,
    /// `None` when the queues have no dead-letter exchange.
    pub dead_letter_exchange: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub lease: std::time::Duration,
    pub grace: std::time::Duration,
    pub workers: usize,
}

impl Settings {
    /// Every configured local directory, by its configuration key (spec C.9 `setup_dirs`,
    /// extended to every path key): what `workers paths check` looks at. A local archive is
    /// named by its part before `{year}`; an HPSS archive is not a local path and is left out.
    pub fn directories(&self) -> Vec<(String, PathBuf)> {
        let p = &self.paths;
        let mut out = vec![
            ("paths.root".to_owned(), p.root.clone()),
            ("paths.scratch".to_owned(), p.scratch.clone()),
            ("paths.download_dir".to_owned(), p.download_dir.clone()),
        ];
        for t in DatasetType::ALL {
            let paths = p.for_type(t);
            let mut keyed = vec![
                ("upload", paths.upload.clone()),
                ("stage", paths.stage.clone()),
                ("bundle.generate", paths.bundle_generate.clone()),
                ("bundle.stage", paths.bundle_stage.clone()),
            ];
            if let Some(qc) = &paths.qc {
                keyed.push(("qc", qc.clone()));
            }
            if self.backends.archive == ArchiveKind::Local {
                let before_year = paths.archive.split("{year}").next().unwrap_or_default();
                keyed.push(("archive", PathBuf::from(before_year)));
            }
            out.extend(
                keyed
                    .into_iter()
                    .map(|(key, path)| (format!("paths.{t}.{key}"), path)),
            );
            out.push((
                format!("registration.{t}.source_dir"),
                self.registration.for_type(t).source_dir.clone(),
            ));
        }
        out.push((
            "illumina.download_dir".to_owned(),
            self.illumina.download_dir.clone(),
        ));
        if let Some(parent) = self.sqlite.path.parent() {
            out.push((
                "sqlite.path (its directory)".to_owned(),
                parent.to_path_buf(),
            ));
        }
        out
    }

    pub fn schedule(&self, job: JobName) -> Option<&Schedule> {
        self.schedules
            .iter()
            .find(|(j, _)| *j == job)
            .map(|(_, s)| s)
    }
}

#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
    pub scratch: PathBuf,
    pub download_dir: PathBuf,
    pub raw_data: TypePaths,
    pub data_product: TypePaths,
}

impl Paths {
    pub fn for_type(&self, dataset_type: DatasetType) -> &TypePaths {
        match dataset_type {
            DatasetType::RawData => &self.raw_data,
            DatasetType::DataProduct => &self.data_product,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TypePaths {
    pub upload: PathBuf,
    pub archive: String,
    pub stage: PathBuf,
    pub qc: Option<PathBuf>,
    pub bundle_generate: PathBuf,
    pub bundle_stage: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Registration {
    pub raw_data: Source,
    pub data_product: Source,
    pub recency_threshold: std::time::Duration,
    pub wait_between_stability_checks: std::time::Duration,
    pub poll_interval: std::time::Duration,
    pub full_scan_every_n_scans: u32,
    pub minimum_dataset_size: u64,
    /// `None`: no limit.
    pub max_stability_wait: Option<std::time::Duration>,
}

impl Registration {
    pub fn for_type(&self, dataset_type: DatasetType) -> &Source {
        match dataset_type {
            DatasetType::RawData => &self.raw_data,
            DatasetType::DataProduct => &self.data_product,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Source {
    pub source_dir: PathBuf,
    pub rejects: globset::GlobSet,
    pub reject_patterns: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub days_to_live: u32,
    pub max_purges: u32,
    /// Purging by fill (percent of a staging file system used): start above `high`, stop at
    /// `low`; `None`: off.
    pub watermarks: Option<(u8, u8)>,
    /// Copies staged more recently are never purged to make room.
    pub min_age: std::time::Duration,
    pub alias_salt: SecretString,
    /// Permission bits of staged trees.
    pub modes: crate::compute::extract::Modes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryKind {
    Sqlite,
    Postgres,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
    Mongo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Embedded,
    Postgres,
    Amqp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    Local,
    Hsi,
}

/// Gives a backend enum its configuration names (`kind = "..."`), so the loader's checks and
/// messages grow with the enum.
macro_rules! backend_kind_names {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every accepted `kind` value.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }

            /// The backend named `name` (exact, case-sensitive), if there is one.
            pub fn from_name(name: &str) -> Option<$ty> {
                match name {
                    $($name => Some($ty::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

backend_kind_names!(RegistryKind { Sqlite => "sqlite", Postgres => "postgres", Http => "http" });
backend_kind_names!(StoreKind { Sqlite => "sqlite", Postgres => "postgres", Mongo => "mongo" });
backend_kind_names!(BrokerKind { Embedded => "embedded", Postgres => "postgres", Amqp => "amqp" });
backend_kind_names!(ArchiveKind { Local => "local", Hsi => "hsi" });

#[derive(Debug, Clone, Copy)]
pub struct Backends {
    pub registry: RegistryKind,
    pub store: StoreKind,
    pub broker: BrokerKind,
    pub archive: ArchiveKind,
}

/// A secret value; `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: String) -> SecretString {
        SecretString(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

//! The command line: what each subcommand takes. Parsing only; `commands` does the work.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::jobs::JobName;
use crate::model::DatasetType;

#[derive(Debug, Parser)]
#[command(
    name = "workers",
    version,
    about = "Data-lifecycle workers for Bioloop research datasets"
)]
pub struct Cli {
    /// Folder of default.toml and <APP_ENV>.toml [default: $WORKERS_CONFIG_DIR, else ./config]
    #[arg(long, global = true, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,

    /// Log format (overrides log.format)
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,

    /// Log filter such as `info` or `workers=debug` (overrides log.level)
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConfigFormat {
    Toml,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check or show the configuration
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run jobs by hand
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Register a directory (or each of its subdirectories) as datasets and start their ingestion
    Register(RegisterArgs),
    /// List, show, start and resume workflows
    #[command(subcommand)]
    Workflows(WorkflowsCommand),
    /// List and show datasets
    #[command(subcommand)]
    Datasets(DatasetsCommand),
    /// Re-read a dataset's copies and compare them with its record, naming every difference
    ///
    /// Reads the source directory and the staged tree file by file against the recorded MD5s
    /// and sizes, and the archived bundle against its recorded MD5 (with HPSS, the checksum
    /// HPSS holds, unless `--recall` or `fixity.recall` says to read the bundle). Changes no
    /// data; the checks are recorded (`workers datasets show`), and a copy that differs marks
    /// the dataset FIXITY_FAILED. Exit code 0 when every copy checked is intact, 1 when one
    /// differs, 2 for a usage error (an unknown dataset, a copy it does not have).
    ///
    /// Example: `workers verify 42 --archive --format json`
    Verify(VerifyDatasetArgs),
    /// Look into the queue of steps, or delete it from RabbitMQ
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Upload integrity: the manifests a sender computes, and their checks
    #[command(subcommand)]
    Uploads(UploadsCommand),
    /// Check that every configured directory exists, or create them
    #[command(subcommand)]
    Paths(PathsCommand),
    /// Remote control of the workers, Python and Rust alike: ping, inspect, revoke, shutdown,
    /// pause and resume workflows
    #[command(subcommand)]
    Control(ControlCommand),
    /// Copy the embedded SQLite database into a PostgreSQL database, to move a site to the
    /// postgres backends
    ///
    /// Copies every table that holds records, ids kept: datasets with their states, files,
    /// bundles and workflows; workflows, steps, task runs and results; the queue (without its
    /// leases, so no claim of a worker of the old site moves across) and its dead letters; watch
    /// state, job runs and slots, metrics, uploads, worker processes and their logs, revoked
    /// tasks and fixity checks. Skips what only the processes running now use: leases,
    /// space_reservations, control_requests and control_replies. Then sets every id sequence
    /// past the copied ids. Stop the workers and the scheduler first; the source is only read.
    ///
    /// Rows go in batches in key order, one transaction each; rows the target already holds are
    /// skipped, so a second run copies nothing and an interrupted one continues where it
    /// stopped. A row the target holds with other values (another database's data) stops it.
    /// Exit code 0 when done; 1 when the copy failed midway (run it again), or completed in a
    /// target that also holds rows that are not the source's; 2 when the source or the target
    /// cannot be used, or the target holds other values for the source's rows.
    ///
    /// Example: `workers migrate --from sqlite:var/workers.db --to
    /// postgres://workers@db.example.org:5432/workers` (password: PGPASSWORD)
    Migrate(MigrateArgs),
    /// Run workflow steps from the queue until stopped
    Worker(WorkerArgs),
    /// Run every job on its schedule until stopped (SIGTERM/SIGINT; SIGHUP reloads the configuration)
    Scheduler,
    /// The whole deployment at a glance: scheduler and jobs, workers, workflows, queue,
    /// datasets by state, file systems, fixity
    ///
    /// Exit code 0 when healthy, 1 when something needs attention (a workflow failed in the
    /// last 24 h, a job whose last run failed, no scheduler holding the lease, a staging file
    /// system over its high watermark, a fixity difference), so monitoring can run it.
    /// Example: `workers status --format json`
    Status {
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Check the configuration, the directories, the database, the queue, the API, the clocks
    /// and the free space, each on a line with what to do when it fails
    ///
    /// Exit code 0 when every check passes, 1 otherwise (a broken configuration included:
    /// doctor reports it). Example: `workers doctor`, `APP_ENV=production workers doctor
    /// --format json`
    Doctor {
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Print the completions of this command line for a shell
    ///
    /// Needs no configuration. Examples: `workers completions bash >
    /// /usr/share/bash-completion/completions/workers`, `workers completions zsh > _workers`,
    /// `workers completions fish > ~/.config/fish/completions/workers.fish`
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per command into a directory
    ///
    /// Needs no configuration. Examples: `workers man | man -l -`, `workers man --dir
    /// /usr/share/man/man1` (workers.1, workers-jobs.1, workers-jobs-run.1, ...)
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Which workers a control command reaches, and how long it waits for their replies.
#[derive(Debug, Clone, Args)]
pub struct ControlTarget {
    /// Only these workers (node names such as `bioloop-w1@host`); repeat for several [default: all]
    #[arg(long = "destination", short = 'd', value_name = "NODE")]
    pub destination: Vec<String>,
    /// Seconds to wait for replies
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub timeout: f64,
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InspectWhat {
    /// The steps running now
    Active,
    /// Received, waiting for a slot
    Reserved,
    /// Held for their eta (retries waiting out their delay)
    Scheduled,
    /// The tasks each worker implements
    Registered,
    /// Process, pool, broker and counters
    Stats,
    /// The queues each worker consumes
    ActiveQueues,
    /// The revoked task ids each worker remembers
    Revoked,
    /// Software and settings, for bug reports
    Report,
    /// Configuration
    Conf,
}

impl InspectWhat {
    /// The remote-control method.
    pub fn method(self) -> &'static str {
        match self {
            InspectWhat::Active => "active",
            InspectWhat::Reserved => "reserved",
            InspectWhat::Scheduled => "scheduled",
            InspectWhat::Registered => "registered",
            InspectWhat::Stats => "stats",
            InspectWhat::ActiveQueues => "active_queues",
            InspectWhat::Revoked => "revoked",
            InspectWhat::Report => "report",
            InspectWhat::Conf => "conf",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ControlCommand {
    /// Ask the workers to answer
    Ping(ControlTarget),
    /// Ask the workers what they run, hold, implement and consume
    Inspect {
        #[arg(value_enum)]
        what: InspectWhat,
        #[command(flatten)]
        target: ControlTarget,
    },
    /// Revoke tasks: a message of one of them is not run; with --terminate, a running one is stopped
    Revoke {
        #[arg(required = true, value_name = "TASK_ID")]
        task_ids: Vec<String>,
        /// Also stop the task where it runs now (its partial work is removed; it reads REVOKED)
        #[arg(long)]
        terminate: bool,
        #[command(flatten)]
        target: ControlTarget,
    },
    /// Shut a worker down: warm (running steps finish), or --immediate: stop consuming, terminate
    /// its running steps, then shut down
    Shutdown {
        /// The worker's node name
        #[arg(long, value_name = "NODE")]
        hostname: String,
        /// With --immediate, the queues to stop consuming first [default: every queue it consumes]
        #[arg(long, num_args = 1.., value_name = "QUEUE")]
        queues: Vec<String>,
        #[arg(long)]
        immediate: bool,
        /// Seconds to wait for each reply
        #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
        timeout: f64,
    },
    /// Make workers consume one more queue
    AddConsumer {
        queue: String,
        #[command(flatten)]
        target: ControlTarget,
    },
    /// Make workers stop consuming a queue (running steps finish)
    CancelConsumer {
        queue: String,
        #[command(flatten)]
        target: ControlTarget,
    },
    /// Pause a workflow as rhythm_api does: its running step is revoked and terminated, nothing
    /// follows it until it is resumed
    Pause { workflow_id: String },
    /// Resume a paused or failed workflow: its pending step runs again
    Resume { workflow_id: String },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate the configuration and the workflow definitions; exit 2 on any problem
    Check,
    /// Print the effective configuration (files, environment and defaults merged; secrets redacted)
    Show {
        #[arg(long, value_enum, default_value = "toml")]
        format: ConfigFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Run one job now, exactly as the scheduler runs it (recorded in the job history)
    Run {
        /// watch, purge_staged_datasets, purge_stale_workflows, reconcile or metrics
        #[arg(value_parser = job_name())]
        job: JobName,
        /// Also run the workflows in this process until every one has finished, then print a summary
        #[arg(long)]
        wait: bool,
        /// watch: scan every directory, not only the ones not seen before
        #[arg(long)]
        full: bool,
        /// Report what would be done; change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Every job with its schedule, next run and last run
    List {
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Recent runs of a job: trigger, start, end, outcome, error and counters
    History {
        #[arg(value_parser = job_name())]
        job: JobName,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
}

/// A job by name; the names are clap's possible values, so that completions offer them and an
/// unknown name is refused with the list.
fn job_name() -> impl clap::builder::TypedValueParser<Value = JobName> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(JobName::ALL.map(JobName::name))
        .map(|name: String| JobName::from_name(&name).expect("one of the possible values"))
}

#[derive(Debug, Args)]
pub struct VerifyDatasetArgs {
    /// Dataset id or name
    pub dataset: String,
    #[arg(long = "type", value_parser = parse_type)]
    pub dataset_type: Option<DatasetType>,
    /// The archived bundle
    #[arg(long)]
    pub archive: bool,
    /// The staged copy
    #[arg(long)]
    pub staged: bool,
    /// The source directory
    #[arg(long)]
    pub source: bool,
    /// Recall the bundle from HPSS and read it, rather than trust the checksum HPSS holds
    #[arg(long)]
    pub recall: bool,
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The directory to register
    pub dir: PathBuf,
    /// Dataset type
    #[arg(long = "type", value_parser = parse_type)]
    pub dataset_type: DatasetType,
    /// Register each immediate subdirectory instead of DIR itself
    #[arg(long)]
    pub ingest_subdirs: bool,
    /// Put `PREFIX-` before each name
    #[arg(long)]
    pub prefix: Option<String>,
    /// Put `-SUFFIX` after each name
    #[arg(long)]
    pub suffix: Option<String>,
    /// Description of the datasets
    #[arg(long)]
    pub description: Option<String>,
    /// Associate the datasets with this project (id or slug; needs the Bioloop API)
    #[arg(long, value_name = "ID")]
    pub project_id: Option<String>,
    /// Report what would be registered; register and start nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Run the started workflows in this process until they finish
    #[arg(long)]
    pub wait: bool,
}

fn parse_type(s: &str) -> Result<DatasetType, String> {
    s.parse()
}

#[derive(Debug, Subcommand)]
pub enum WorkflowsCommand {
    /// List workflows, newest first
    List {
        /// Only workflows that have not finished
        #[arg(long)]
        active: bool,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Show a workflow: status, steps, attempts, last error and progress
    Show {
        id: String,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Restart a failed workflow from its failed step (or an earlier one)
    Resume {
        id: String,
        /// Restart from this earlier step instead (for example `inspect`, when archive found
        /// the data changed since it was inspected)
        #[arg(long, value_name = "STEP")]
        from: Option<String>,
        /// Run it in this process until it finishes
        #[arg(long)]
        wait: bool,
    },
    /// Start a workflow (integrated, stage or delete) for a dataset
    Start {
        name: String,
        /// Dataset id or name
        dataset: String,
        /// Dataset type, when a name is given and both types have it
        #[arg(long = "type", value_parser = parse_type)]
        dataset_type: Option<DatasetType>,
        /// Run it in this process until it finishes
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DatasetsCommand {
    /// List datasets, most recently updated first
    List {
        #[arg(long = "type", value_parser = parse_type)]
        dataset_type: Option<DatasetType>,
        /// Include deleted datasets
        #[arg(long)]
        deleted: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Show one dataset with its states, bundle, paths and workflows
    Show {
        /// Dataset id or name
        dataset: String,
        #[arg(long = "type", value_parser = parse_type)]
        dataset_type: Option<DatasetType>,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Messages kept aside because they can never run (embedded queue), oldest first
    DeadLetters {
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Delete the queue `{app_id}.q` from RabbitMQ, with every message in it (the way out of
    /// PRECONDITION_FAILED after the queue's arguments changed); workers declare it again
    Delete {
        /// Really delete it (without it nothing is done)
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PathsCommand {
    /// Every configured directory, Exists or Missing, with its key; exit 1 if one is missing
    Check {
        /// Create the missing directories (mkdir -p)
        #[arg(long)]
        create: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum UploadsCommand {
    /// Print the BLAKE3 manifest hash of a directory as the UI computes it before an upload
    /// (or, with --size-manifest, its path-size-v1 size manifest). Needs no configuration
    Manifest {
        /// The directory (its regular files, recursively; links are not followed)
        path: PathBuf,
        /// Print the path-size-v1 size manifest (JSON, whatever --format says) instead
        #[arg(long)]
        size_manifest: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Check a directory against a BLAKE3 manifest hash or a path-size-v1 size manifest
    /// (exactly one of them): exit 0 when it holds, 1 when it does not, 2 when the manifest
    /// given is unusable. Needs no configuration
    Verify(VerifyArgs),
    /// Register a dataset to be uploaded: prints its id and the directory to copy the data
    /// into (rsync, scp, Globus), then `workers uploads complete ID`
    Create {
        /// The dataset's name (normalized as every dataset name is)
        name: String,
        /// RAW_DATA or DATA_PRODUCT
        #[arg(long = "type", value_parser = parse_type, value_name = "TYPE")]
        dataset_type: DatasetType,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Mark an upload as sent (UPLOADED), with the manifest it is to be verified against;
    /// `manage_upload_workflows` then verifies and ingests it
    Complete(CompleteArgs),
    /// List uploads, most recently changed first
    List {
        /// At most this many
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Show one upload: its status, manifest, verification and failure
    Show {
        /// The upload's dataset id
        id: i64,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("manifest").args(["manifest_hash", "size_manifest"])))]
pub struct CompleteArgs {
    /// The upload's dataset id (printed by `uploads create`)
    pub id: i64,
    /// The BLAKE3 manifest hash of the data as sent (`workers uploads manifest DIR` on the
    /// sending side)
    #[arg(long, value_name = "HEX")]
    pub manifest_hash: Option<String>,
    /// A file holding the path-size-v1 size manifest of the data as sent
    /// (`workers uploads manifest --size-manifest DIR`)
    #[arg(long, value_name = "FILE")]
    pub size_manifest: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("expected").required(true).args(["manifest_hash", "size_manifest"])))]
pub struct VerifyArgs {
    /// The uploaded directory
    pub path: PathBuf,
    /// The BLAKE3 manifest hash the sender computed (64 hexadecimal digits)
    #[arg(long, value_name = "HEX")]
    pub manifest_hash: Option<String>,
    /// A file holding the sender's path-size-v1 size manifest (JSON)
    #[arg(long, value_name = "FILE")]
    pub size_manifest: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The embedded database to copy: `sqlite:PATH` (sqlite.path), read only
    #[arg(long, value_name = "sqlite:PATH", value_parser = parse_sqlite_source)]
    pub from: PathBuf,
    /// The database to copy into: `postgres://user@host:5432/database` (or `postgres:` and
    /// libpq's `host=... dbname=...`); the password is the secret postgres_password
    /// (PGPASSWORD) [default: postgres.url]
    #[arg(long, value_name = "postgres:URL")]
    pub to: Option<String>,
    /// Print how many rows each table holds, that is what a copy into an empty database
    /// writes; read the source only, connect to nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Rows per transaction
    #[arg(long, default_value_t = 1000, value_name = "ROWS",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_size: u32,
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutputFormat,
}

/// `sqlite:PATH` (also `sqlite://PATH`, the URL form) to PATH.
fn parse_sqlite_source(s: &str) -> Result<PathBuf, String> {
    let path = s
        .strip_prefix("sqlite:")
        .map(|rest| rest.strip_prefix("//").unwrap_or(rest))
        .filter(|path| !path.is_empty())
        .ok_or_else(|| {
            "expected sqlite:PATH, the embedded database file (sqlite.path), such as \
             sqlite:var/workers.db"
                .to_owned()
        })?;
    Ok(PathBuf::from(path))
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Steps run at once [default: worker.concurrency]
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Queues to take steps from, comma-separated [default: {app_id}.q]
    #[arg(long, value_delimiter = ',', value_name = "Q1,Q2")]
    pub queues: Option<Vec<String>>,
    /// Node name recorded as the worker of each task: %h host name, %n short host name, %d
    /// domain [default: workers@%h]
    #[arg(long, value_name = "NAME@%h")]
    pub hostname: Option<String>,
    /// Exit when no workflow is active
    #[arg(long)]
    pub until_idle: bool,
    /// Send Celery's monitoring events, for Flower and `celery events` [default: worker.send_events]
    #[arg(short = 'E', long = "events")]
    pub events: bool,
}

//! Prometheus metrics: what the workers count (steps, bytes, job runs, the scheduler lease) and
//! the HTTP endpoint that serves them (`[prometheus] listen`).
//!
//! The metrics live in one process-wide registry. They are recorded from deep inside the CPU
//! pool's jobs and the backends, where threading a handle through would touch every signature
//! for something the program only ever writes and never reads back; recording costs an atomic
//! add (a lookup under a read lock for labelled ones), so it happens whether or not anything
//! serves them.

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tracing::{error, info};

use crate::jobs::JobName;
use crate::scheduler::schedule::Schedule;
use crate::store::{RunOutcome, SchedulerStore};

/// The content type of what `/metrics` answers: the OpenMetrics text format, which Prometheus
/// asks for and reads.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How a step's attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Succeeded,
    /// Failed and queued again (its retry is counted, not yet its end).
    Retried,
    /// Failed for good: the workflow stops here.
    Failed,
    /// Could not start yet (no room for its output) and queued again; no retry is counted.
    Waiting,
}

impl StepOutcome {
    fn as_str(self) -> &'static str {
        match self {
            StepOutcome::Succeeded => "succeeded",
            StepOutcome::Retried => "retried",
            StepOutcome::Failed => "failed",
            StepOutcome::Waiting => "waiting",
        }
    }
}

/// Which way bundle bytes went between this host and the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Into the archive (`archive_dataset`).
    Archive,
    /// Out of the archive, to be staged (`stage_dataset`).
    Stage,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Archive => "archive",
            Direction::Stage => "stage",
        }
    }
}

/// One attempt of a step from its start to its recorded end: counted as running meanwhile,
/// then by its outcome and duration. An attempt dropped without an outcome (interrupted at
/// shutdown, its claim lost to another worker) only stops counting as running: it ends
/// elsewhere or later.
#[derive(Debug)]
pub struct StepRun {
    task: String,
    started: Instant,
}

impl StepRun {
    /// A step of `task` starts now. Its message's wait in the queue is observed when the
    /// broker knows when it was published (see [`queue_wait`]).
    pub fn start(
        task: &str,
        published: Option<DateTime<Utc>>,
        eta: Option<DateTime<Utc>>,
    ) -> StepRun {
        let metrics = &*METRICS;
        let label = TaskLabel {
            task: task.to_owned(),
        };
        metrics.steps_running.get_or_create(&label).inc();
        if let Some(wait) = published.and_then(|at| queue_wait(at, eta, Utc::now())) {
            metrics
                .queue_wait
                .get_or_create(&label)
                .observe(wait.as_secs_f64());
        }
        StepRun {
            task: label.task,
            started: Instant::now(),
        }
    }

    /// The attempt ended (and is recorded) with `outcome`.
    pub fn finish(self, outcome: StepOutcome) {
        let labels = StepLabels {
            task: self.task.clone(),
            outcome: outcome.as_str(),
        };
        METRICS.steps.get_or_create(&labels).inc();
        METRICS
            .step_duration
            .get_or_create(&labels)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for StepRun {
    fn drop(&mut self) {
        let label = TaskLabel {
            task: std::mem::take(&mut self.task),
        };
        METRICS.steps_running.get_or_create(&label).dec();
    }
}

/// How long a message waited in the queue before its step started at `now`: from when it was
/// published, or from its `eta` when that is later (a retry or a deferred message is not
/// waiting before it is due). `None` for a start before either, which only clocks that
/// disagree (another host's, RabbitMQ's second-resolution timestamp) can produce.
pub fn queue_wait(
    published: DateTime<Utc>,
    eta: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<Duration> {
    let due = eta.map_or(published, |eta| eta.max(published));
    (now - due).to_std().ok()
}

/// Bytes read from files and checksummed (MD5, BLAKE3) in a pass of their own: inspection,
/// validation, upload verification and the checks of archived or fetched bundles.
pub fn hashed(bytes: u64) {
    METRICS.hashed.inc_by(bytes);
}

/// Bytes of tar bundles written (hashed as they are written; not counted as hashed).
pub fn bundled(bytes: u64) {
    METRICS.bundled.inc_by(bytes);
}

/// Bytes of file content extracted from bundles into staged copies.
pub fn extracted(bytes: u64) {
    METRICS.extracted.inc_by(bytes);
}

/// Bytes of a bundle copied into or out of the archive, once the copy is complete.
pub fn transferred(direction: Direction, bytes: u64) {
    METRICS
        .transferred
        .get_or_create(&DirectionLabel {
            direction: direction.as_str(),
        })
        .inc_by(bytes);
}

/// A task of `task` was revoked where it was to run: stopped while it ran (`terminate`), or
/// its message discarded.
pub fn task_revoked(task: &str) {
    METRICS
        .revoked
        .get_or_create(&TaskLabel {
            task: task.to_owned(),
        })
        .inc();
}

/// A fixity check of one `copy` ended with `result` (`intact`, `differs`, `not_checked`,
/// `error`), having read `bytes` (the checksum read or the bundle recalled).
pub fn fixity_checked(copy: &'static str, result: &'static str, bytes: u64) {
    METRICS
        .fixity_checks
        .get_or_create(&FixityLabels { copy, result })
        .inc();
    METRICS.fixity_read.inc_by(bytes);
}

/// Archived datasets not verified within the fixity period, as the last `fixity` run found,
/// and those whose last verdict was a difference.
pub fn fixity_standing(overdue: u64, failing: u64) {
    METRICS
        .fixity_overdue
        .set(i64::try_from(overdue).unwrap_or(i64::MAX));
    METRICS
        .fixity_failing
        .set(i64::try_from(failing).unwrap_or(i64::MAX));
}

/// A run of `job` ended (or was skipped) with `outcome` at `at`, the end its record holds; a
/// success also makes `at` the job's last success.
pub fn job_finished(job: &str, outcome: &RunOutcome, at: DateTime<Utc>) {
    if *outcome == RunOutcome::Running {
        return;
    }
    METRICS
        .job_runs
        .get_or_create(&JobRunLabels {
            job_name: job.to_owned(),
            outcome: outcome.as_str(),
        })
        .inc();
    if *outcome == RunOutcome::Success {
        job_succeeded_at(job, at);
    }
}

fn job_succeeded_at(job: &str, at: DateTime<Utc>) {
    let seconds = at.timestamp_millis() as f64 / 1000.0;
    METRICS
        .job_last_success
        .get_or_create(&JobLabel {
            job_name: job.to_owned(),
        })
        .set(seconds);
}

/// Each job's period as scheduled from `now` (the time between its next two slots); a job
/// that is disabled, or will not run twice more, has none.
pub fn job_schedules(schedules: &[(JobName, Schedule)], now: DateTime<Utc>) {
    METRICS.job_period.clear();
    for (job, schedule) in schedules {
        if !schedule.enabled {
            continue;
        }
        let next = schedule.next_slot(now);
        let after = next.and_then(|next| schedule.next_slot(next));
        if let (Some(next), Some(after)) = (next, after) {
            let period = (after - next).num_milliseconds() as f64 / 1000.0;
            METRICS
                .job_period
                .get_or_create(&JobLabel {
                    job_name: job.name().to_owned(),
                })
                .set(period);
        }
    }
}

/// How many recent runs of a job are looked through for its last success at start.
const HISTORY_LOOKED_AT: usize = 1000;

/// Sets each job's last success time from the recorded runs (the latest successful one among
/// its last [`HISTORY_LOOKED_AT`]), so that a restarted scheduler does not report its jobs as
/// never having succeeded. A history that cannot be read leaves the times unset, and says so.
pub async fn load_last_successes(store: &dyn SchedulerStore) {
    for job in JobName::ALL {
        match store.runs(Some(job.name()), HISTORY_LOOKED_AT).await {
            Ok(runs) => {
                let last = runs
                    .iter()
                    .filter(|run| run.outcome == RunOutcome::Success && !run.dry_run)
                    .filter_map(|run| run.ended_at)
                    .max();
                if let Some(at) = last {
                    job_succeeded_at(job.name(), at);
                }
            }
            Err(err) => {
                error!(job = %job, error = %format!("{err:#}"), "Cannot read the job's history; its last success is not reported until it succeeds again.");
            }
        }
    }
}

/// Whether this scheduler holds the scheduler lease (and so fires the jobs).
pub fn lease_held(held: bool) {
    METRICS.lease_held.set(i64::from(held));
}

/// Every metric in the OpenMetrics text format.
pub fn render() -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug of the encoder.
    if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &METRICS.registry) {
        error!(error = %err, "Cannot encode the metrics.");
    }
    out
}

/// The HTTP endpoint serving [`render`] at `/metrics`; it stops when dropped.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// The address it listens on (the port the system chose, for a configured port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `addr` and serves the metrics from a task of its own. Fails, naming the address,
/// when it cannot listen there (the port is taken, the address is not this host's).
pub async fn serve(addr: SocketAddr) -> anyhow::Result<Server> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr} (prometheus.listen)"))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("cannot serve metrics on {addr} (prometheus.listen)"))?;
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render())
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            error!(address = %addr, error = %err, "The metrics endpoint stopped.");
        }
    });
    info!(address = %addr, "Serving Prometheus metrics at http://{addr}/metrics.");
    Ok(Server { addr, task })
}

/// Upper bounds of the step duration buckets, in seconds: steps take from a moment (a
/// download link) to days (archiving terabytes to tape).
const STEP_BUCKETS: [f64; 15] = [
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0,
    86400.0,
];

/// Upper bounds of the queue wait buckets, in seconds: from a free worker's poll to hours
/// behind a backlog.
const WAIT_BUCKETS: [f64; 13] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabel {
    task: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    task: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

// Jobs are labelled `job_name`: Prometheus gives every scraped series a `job` label of its
// own (the scrape job) and would rename ours to `exported_job`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job_name: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FixityLabels {
    copy: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobRunLabels {
    job_name: String,
    outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type SecondsGauge = Gauge<f64, AtomicU64>;

struct Metrics {
    registry: Registry,
    steps_running: Family<TaskLabel, Gauge>,
    steps: Family<StepLabels, Counter>,
    step_duration: HistogramFamily<StepLabels>,
    queue_wait: HistogramFamily<TaskLabel>,
    hashed: Counter,
    bundled: Counter,
    extracted: Counter,
    transferred: Family<DirectionLabel, Counter>,
    revoked: Family<TaskLabel, Counter>,
    job_runs: Family<JobRunLabels, Counter>,
    job_last_success: Family<JobLabel, SecondsGauge>,
    job_period: Family<JobLabel, SecondsGauge>,
    lease_held: Gauge,
    fixity_checks: Family<FixityLabels, Counter>,
    fixity_read: Counter,
    fixity_overdue: Gauge,
    fixity_failing: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::default(),
            steps_running: Family::default(),
            steps: Family::default(),
            step_duration: Family::new_with_constructor(|| Histogram::new(STEP_BUCKETS)),
            queue_wait: Family::new_with_constructor(|| Histogram::new(WAIT_BUCKETS)),
            hashed: Counter::default(),
            bundled: Counter::default(),
            extracted: Counter::default(),
            transferred: Family::default(),
            revoked: Family::default(),
            job_runs: Family::default(),
            job_last_success: Family::default(),
            job_period: Family::default(),
            lease_held: Gauge::default(),
            fixity_checks: Family::default(),
            fixity_read: Counter::default(),
            fixity_overdue: Gauge::default(),
            fixity_failing: Gauge::default(),
        };
        // Both directions from the start: a counter that appears only once it moves makes
        // `rate()` miss its first increase.
        for direction in [Direction::Archive, Direction::Stage] {
            let _ = metrics.transferred.get_or_create(&DirectionLabel {
                direction: direction.as_str(),
            });
        }
        let mut registry = Registry::default();
        registry.register(
            "workers_steps_running",
            "Steps running now in this process, by task",
            metrics.steps_running.clone(),
        );
        registry.register(
            "workers_steps",
            "Step attempts ended, by task and outcome (succeeded, retried, failed)",
            metrics.steps.clone(),
        );
        registry.register_with_unit(
            "workers_step_duration",
            "How long step attempts ran, by task and outcome",
            Unit::Seconds,
            metrics.step_duration.clone(),
        );
        registry.register_with_unit(
            "workers_queue_wait",
            "How long step messages waited in the queue, from publication (or their eta, when later) to the step's start, by task",
            Unit::Seconds,
            metrics.queue_wait.clone(),
        );
        registry.register_with_unit(
            "workers_hashed",
            "Bytes of files read and checksummed (inspection, validation, upload verification, bundle checks)",
            Unit::Bytes,
            metrics.hashed.clone(),
        );
        registry.register_with_unit(
            "workers_bundled",
            "Bytes of tar bundles written",
            Unit::Bytes,
            metrics.bundled.clone(),
        );
        registry.register_with_unit(
            "workers_extracted",
            "Bytes of file content extracted from bundles into staged copies",
            Unit::Bytes,
            metrics.extracted.clone(),
        );
        registry.register_with_unit(
            "workers_transferred",
            "Bytes of bundles copied into the archive (direction archive) or out of it (direction stage)",
            Unit::Bytes,
            metrics.transferred.clone(),
        );
        registry.register(
            "workers_tasks_revoked",
            "Tasks revoked, by task",
            metrics.revoked.clone(),
        );
        registry.register(
            "workers_job_runs",
            "Job runs ended, by job and outcome (success, failed, skipped)",
            metrics.job_runs.clone(),
        );
        registry.register_with_unit(
            "workers_job_last_success_timestamp",
            "When each job last ended successfully, as a Unix time",
            Unit::Seconds,
            metrics.job_last_success.clone(),
        );
        registry.register_with_unit(
            "workers_job_period",
            "The time between each enabled job's next two scheduled runs",
            Unit::Seconds,
            metrics.job_period.clone(),
        );
        registry.register(
            "workers_scheduler_lease_held",
            "1 while this scheduler holds the scheduler lease and fires the jobs, else 0",
            metrics.lease_held.clone(),
        );
        registry.register(
            "workers_fixity_checks",
            "Fixity checks of dataset copies ended, by copy (archive, staged, source) and result (intact, differs, not_checked, error)",
            metrics.fixity_checks.clone(),
        );
        registry.register_with_unit(
            "workers_fixity_read",
            "Bytes read by fixity checks (files re-read, bundles read or recalled)",
            Unit::Bytes,
            metrics.fixity_read.clone(),
        );
        registry.register(
            "workers_fixity_overdue_datasets",
            "Archived datasets not verified within fixity.period_days, as the last fixity run found",
            metrics.fixity_overdue.clone(),
        );
        registry.register(
            "workers_fixity_failing_datasets",
            "Archived datasets whose last fixity check found a difference, as the last fixity run found",
            metrics.fixity_failing.clone(),
        );
        metrics.registry = registry;
        metrics
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_767_225_600 + seconds, 0).unwrap()
    }

    #[test]
    fn queue_wait_counts_from_publication_or_from_a_later_eta() {
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs());
        assert_eq!(secs(queue_wait(at(0), None, at(7))), Some(7));
        // A retry due 60 s after it was published, started 2 s late.
        assert_eq!(secs(queue_wait(at(0), Some(at(60)), at(62))), Some(2));
        // An eta already past when it was published counts from the publication.
        assert_eq!(secs(queue_wait(at(10), Some(at(5)), at(12))), Some(2));
        // A start before the publication: clocks that disagree; nothing to observe.
        assert_eq!(queue_wait(at(10), None, at(9)), None);
    }

    fn every_ten_seconds() -> Schedule {
        let fields = crate::scheduler::schedule::ScheduleFields {
            cron: None,
            every: Some("10s"),
            timezone: "UTC",
            enabled: true,
            overlap: "skip",
            misfire: "skip",
            jitter: "0s",
        };
        Schedule::parse(&fields).unwrap()
    }

    #[test]
    fn every_metric_is_rendered_with_its_help_and_type() {
        // A labelled metric shows once it has a series.
        StepRun::start("metrics_test_step", Some(Utc::now()), None).finish(StepOutcome::Failed);
        task_revoked("metrics_test_step");
        job_finished("metrics", &RunOutcome::Success, Utc::now());
        job_schedules(&[(JobName::Metrics, every_ten_seconds())], Utc::now());
        let text = render();
        for (name, kind) in [
            ("workers_steps_running", "gauge"),
            ("workers_steps", "counter"),
            ("workers_step_duration_seconds", "histogram"),
            ("workers_queue_wait_seconds", "histogram"),
            ("workers_hashed_bytes", "counter"),
            ("workers_bundled_bytes", "counter"),
            ("workers_extracted_bytes", "counter"),
            ("workers_transferred_bytes", "counter"),
            ("workers_tasks_revoked", "counter"),
            ("workers_job_runs", "counter"),
            ("workers_job_last_success_timestamp_seconds", "gauge"),
            ("workers_job_period_seconds", "gauge"),
            ("workers_scheduler_lease_held", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind} in:\n{text}"
            );
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in [
            "workers_steps_total{task=\"metrics_test_step\",outcome=\"failed\"} 1\n",
            "workers_steps_running{task=\"metrics_test_step\"} 0\n",
            "workers_step_duration_seconds_count{task=\"metrics_test_step\",outcome=\"failed\"} 1\n",
            "workers_queue_wait_seconds_count{task=\"metrics_test_step\"} 1\n",
            "workers_job_runs_total{job_name=\"metrics\",outcome=\"success\"} 1\n",
            "workers_job_period_seconds{job_name=\"metrics\"} 10.0\n",
            "workers_transferred_bytes_total{direction=\"stage\"} ",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
    }

    #[test]
    fn a_revoked_task_is_counted_by_task() {
        task_revoked("metrics_test_revoked");
        task_revoked("metrics_test_revoked");
        assert!(
            render().contains("workers_tasks_revoked_total{task=\"metrics_test_revoked\"} 2\n"),
            "{}",
            render()
        );
    }
}

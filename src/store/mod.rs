//! The workflow store seam: workflows, their steps and task runs, and per-task results.
//!
//! The model is sca-rhythm's `workflow_meta` document plus Celery's `celery_taskmeta` results
//! (spec F.2, F.3), so that the production backend can write exactly those documents. The
//! status of a workflow is derived from its task results (`workflow::status`); the `status`
//! kept here is only a cache, as in sca-rhythm.

pub mod mongo;
pub mod sql;

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

/// Celery task states as stored in task results; PENDING means "no result yet".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskStatus {
    Pending,
    Started,
    Retry,
    Success,
    Failure,
    Revoked,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "PENDING",
            TaskStatus::Started => "STARTED",
            TaskStatus::Retry => "RETRY",
            TaskStatus::Success => "SUCCESS",
            TaskStatus::Failure => "FAILURE",
            TaskStatus::Revoked => "REVOKED",
        }
    }

    pub fn parse(s: &str) -> Option<TaskStatus> {
        Some(match s {
            "PENDING" => TaskStatus::Pending,
            "STARTED" => TaskStatus::Started,
            "RETRY" => TaskStatus::Retry,
            "SUCCESS" => TaskStatus::Success,
            "FAILURE" => TaskStatus::Failure,
            "REVOKED" => TaskStatus::Revoked,
            _ => return None,
        })
    }

    /// SUCCESS, FAILURE and REVOKED: nothing more will happen without an operator.
    pub fn is_done(self) -> bool {
        matches!(
            self,
            TaskStatus::Success | TaskStatus::Failure | TaskStatus::Revoked
        )
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a workflow definition (spec F.2 `steps[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct StepSpec {
    pub name: String,
    pub task: String,
    pub queue: Option<String>,
    pub kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    pub priority: Option<u8>,
}

/// A workflow to create: its name, description and steps.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowSpec {
    pub name: String,
    pub description: Option<String>,
    pub steps: Vec<StepSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRun {
    pub task_id: String,
    pub date_start: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct WorkflowStep {
    pub spec: StepSpec,
    /// Oldest first; retries and redeliveries reuse a task id and add no run.
    pub runs: Vec<TaskRun>,
}

impl WorkflowStep {
    pub fn last_run(&self) -> Option<&TaskRun> {
        self.runs.last()
    }
}

#[derive(Debug, Clone)]
pub struct Workflow {
    pub id: String,
    pub name: String,
    pub app_id: String,
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: Option<DateTime<Utc>>,
    /// The cached status (`_status`); derive the real one with `workflow::status`.
    pub status_cache: TaskStatus,
    pub resume_lock: Option<DateTime<Utc>>,
    /// The positional arguments the workflow was started with (`[dataset_id]`).
    pub start_args: Vec<serde_json::Value>,
    pub steps: Vec<WorkflowStep>,
}

impl Workflow {
    /// A workflow as `create_workflow` stores it: PENDING, no step run yet.
    pub fn pending(
        id: &str,
        app_id: &str,
        spec: &WorkflowSpec,
        start_args: Vec<serde_json::Value>,
    ) -> Workflow {
        Workflow {
            id: id.to_owned(),
            name: spec.name.clone(),
            app_id: app_id.to_owned(),
            description: spec.description.clone(),
            created_at: Utc::now(),
            updated_at: None,
            status_cache: TaskStatus::Pending,
            resume_lock: None,
            start_args,
            steps: spec
                .steps
                .iter()
                .map(|step| WorkflowStep {
                    spec: step.clone(),
                    runs: Vec::new(),
                })
                .collect(),
        }
    }

    /// Every task id of every run.
    pub fn all_task_ids(&self) -> BTreeSet<String> {
        self.steps
            .iter()
            .flat_map(|s| s.runs.iter().map(|r| r.task_id.clone()))
            .collect()
    }
}

/// A task result (`celery_taskmeta`).
#[derive(Debug, Clone)]
pub struct TaskMeta {
    pub task_id: String,
    pub status: TaskStatus,
    /// STARTED: `{pid, hostname}` then progress; RETRY/FAILURE: the error; SUCCESS: the return value.
    pub result: serde_json::Value,
    pub traceback: Option<String>,
    pub date_done: Option<DateTime<Utc>>,
    pub name: Option<String>,
    pub args: Vec<serde_json::Value>,
    pub kwargs: serde_json::Map<String, serde_json::Value>,
    pub worker: Option<String>,
    pub retries: u32,
    pub queue: Option<String>,
    /// How many times the task was started: retries, and runs again after a worker died or
    /// lost its claim (0 when the store does not know, as for tasks a Python worker ran).
    pub starts: u32,
}

/// Everything recorded when a task starts running.
#[derive(Debug, Clone)]
pub struct TaskStart {
    /// `None` for a plain Celery task, which belongs to no workflow.
    pub workflow_id: Option<String>,
    pub position: usize,
    pub task_id: String,
    pub task_name: String,
    pub args: Vec<serde_json::Value>,
    pub kwargs: serde_json::Map<String, serde_json::Value>,
    pub hostname: String,
    pub pid: u32,
    pub retries: u32,
    pub queue: String,
    /// The task that published this one (Celery's `parent_id`), when the message says.
    pub parent_id: Option<String>,
    /// Whether the workflow had a resume lock when it was read for this start. A step's start
    /// clears the lock (sca-rhythm); a store may skip that write when there was none, since a
    /// resume sets its lock before it publishes the step it resumes.
    pub resume_locked: bool,
    /// The start was counted when the task's claim was taken (`claim_task`).
    pub start_counted: bool,
}

/// The answer to `claim_task`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskClaim {
    /// The claim is this holder's; `start_counted` when taking it counted a start.
    Held { start_counted: bool },
    /// Another holder's claim is live.
    Busy,
}

/// A failure as Celery records it: `{exc_type, exc_message: [..], exc_module}`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskError {
    pub exc_type: String,
    pub exc_message: String,
    pub exc_module: String,
}

impl TaskError {
    /// Celery's `TaskRevokedError(reason)`.
    pub fn revoked(reason: &str) -> TaskError {
        TaskError {
            exc_type: "TaskRevokedError".into(),
            exc_message: reason.into(),
            exc_module: "celery.exceptions".into(),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "exc_type": self.exc_type,
            "exc_message": [self.exc_message],
            "exc_module": self.exc_module,
        })
    }
}

/// The `watch` job's memory of one source directory (spec C.1): which names it has handled
/// and how many scans it has made since the last full one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchState {
    pub scan_count: u32,
    pub known: BTreeSet<String>,
}

/// What a fixity check of one copy concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FixityResult {
    /// Every byte matched the record.
    Intact,
    /// The copy differs from the record (or is missing).
    Differs,
    /// The copy could not be compared (the archive holds no checksum and recalls are off, or
    /// the record holds nothing to compare it with).
    NotChecked,
    /// Reading failed (the archive unreachable, a time limit); nothing was concluded.
    Error,
}

impl FixityResult {
    pub const ALL: [FixityResult; 4] = [
        FixityResult::Intact,
        FixityResult::Differs,
        FixityResult::NotChecked,
        FixityResult::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FixityResult::Intact => "intact",
            FixityResult::Differs => "differs",
            FixityResult::NotChecked => "not_checked",
            FixityResult::Error => "error",
        }
    }

    pub fn parse(name: &str) -> Option<FixityResult> {
        FixityResult::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// Whether the copy's content was compared (intact or differing): what makes a dataset
    /// count as verified within the fixity period.
    pub fn is_verdict(self) -> bool {
        matches!(self, FixityResult::Intact | FixityResult::Differs)
    }
}

/// One recorded fixity check of one copy of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixityRecord {
    pub dataset_id: i64,
    /// `source`, `staged` or `archive`.
    pub copy: String,
    pub checked_at: DateTime<Utc>,
    pub result: FixityResult,
    pub files: u64,
    pub bytes_read: u64,
    /// How many differences were found (0 unless `Differs`).
    pub differences: u64,
    /// The first differences, why the copy was not checked, or the error; empty when intact.
    pub detail: String,
    /// What ran the check: `fixity` (the scheduled job) or `verify` (by hand).
    pub by: String,
}

/// Where a dataset stands in the fixity rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FixityStanding {
    /// The last check that was not an error: the rotation's order (an error is tried again
    /// first next time).
    pub checked_at: Option<DateTime<Utc>>,
    /// The last check that compared the content (intact or differing): what the fixity period
    /// is measured from.
    pub verified_at: Option<DateTime<Utc>>,
    /// Whether the last verdict on some copy was a difference.
    pub failing: bool,
}

/// Bytes a running step holds on a file system for the output it is about to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceReservation {
    /// The step's task id.
    pub holder: String,
    pub bytes: u64,
    pub expires_at: DateTime<Utc>,
}

/// Where a page of `workflows_created_before` ended: the last workflow's creation time and id.
/// It carries the time itself so that it stays valid when that workflow is deleted before the
/// next page is read (a purge deletes as it pages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

impl PageCursor {
    pub fn after(workflow: &Workflow) -> PageCursor {
        PageCursor {
            created_at: workflow.created_at,
            id: workflow.id.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkflowFilter {
    All,
    /// Cached status PENDING or STARTED.
    Active,
}

#[async_trait]
pub trait WorkflowStore: Send + Sync {
    /// Inserts a new workflow in status PENDING.
    async fn create_workflow(
        &self,
        id: &str,
        app_id: &str,
        spec: &WorkflowSpec,
        start_args: &[serde_json::Value],
    ) -> anyhow::Result<()>;

    /// Inserts new workflows of one definition, each in status PENDING, given as (id, start
    /// arguments): the batch of `engine::start_many`.
    async fn create_workflows(
        &self,
        app_id: &str,
        spec: &WorkflowSpec,
        workflows: &[(String, Vec<serde_json::Value>)],
    ) -> anyhow::Result<()> {
        for (id, args) in workflows {
            self.create_workflow(id, app_id, spec, args).await?;
        }
        Ok(())
    }

    async fn workflow(&self, id: &str) -> anyhow::Result<Option<Workflow>>;

    /// The workflow as running one of its steps needs it: its steps and their runs, its start
    /// arguments left out where reading them costs more round trips (MongoDB: one read where
    /// `workflow` takes up to three).
    async fn workflow_for_step(&self, id: &str) -> anyhow::Result<Option<Workflow>> {
        self.workflow(id).await
    }

    /// `workflow_for_step` of `workflow_id` and `task_result` of `task_id` together: what a
    /// worker reads before running a delivered step, in one round trip where the store can.
    /// The task's result may be left out (`None`) when the workflow does not exist.
    async fn step_state(
        &self,
        workflow_id: &str,
        task_id: &str,
    ) -> anyhow::Result<(Option<Workflow>, Option<TaskMeta>)> {
        tokio::try_join!(
            self.workflow_for_step(workflow_id),
            self.task_result(task_id)
        )
    }

    /// Workflows, newest first.
    async fn workflows(
        &self,
        filter: WorkflowFilter,
        limit: usize,
    ) -> anyhow::Result<Vec<Workflow>>;

    /// Results of the given tasks; ids without a result are absent (PENDING).
    async fn task_metas(&self, task_ids: &[String]) -> anyhow::Result<HashMap<String, TaskMeta>>;

    /// One task's stored status, retries and result: what a worker checks before running it
    /// (its start count may be left at 0).
    async fn task_result(&self, task_id: &str) -> anyhow::Result<Option<TaskMeta>> {
        Ok(self
            .task_metas(std::slice::from_ref(&task_id.to_owned()))
            .await?
            .remove(task_id))
    }

    /// Takes or renews `holder`'s claim on a task, so that no two runs of one task overlap,
    /// for `ttl` by the store's clock: `Busy` while another holder's claim is live. With
    /// `count_start`, a store that can also counts a start of the task in the same write, and
    /// says so (`task_started` then counts none): one write per step fewer on a store whose
    /// writes are what a step waits for.
    async fn claim_task(
        &self,
        task_id: &str,
        holder: &str,
        ttl: std::time::Duration,
        count_start: bool,
    ) -> anyhow::Result<TaskClaim>;

    /// Gives `holder`'s claim on a task back (nothing when it no longer holds it). `uncount`
    /// takes back the start counted when it was taken: the run found the task finished or
    /// superseded and ran nothing.
    async fn release_task(&self, task_id: &str, holder: &str, uncount: bool) -> anyhow::Result<()>;

    /// Records a task start (sca-rhythm's `before_start`): appends a run unless the task id
    /// already has one, stores STARTED with `{pid, hostname}`, marks the workflow STARTED and
    /// clears its resume lock; counts the start unless its claim did.
    async fn task_started(&self, start: &TaskStart) -> anyhow::Result<()>;

    /// Replaces the result of a STARTED task with a progress report.
    async fn task_progress(
        &self,
        task_id: &str,
        progress: &serde_json::Value,
    ) -> anyhow::Result<()>;

    /// Stores RETRY with the error; the workflow stays STARTED.
    async fn task_retry(
        &self,
        task_id: &str,
        error: &TaskError,
        retries: u32,
    ) -> anyhow::Result<()>;

    /// Stores SUCCESS with the return value.
    /// `task_succeeded` for a task this process started with `start` (whose request fields it
    /// therefore need not read back), returning the status of the task's workflow after it:
    /// what the engine needs next (a paused workflow sends no next step). `None` for a plain
    /// task or a workflow that is gone.
    async fn task_succeeded_from(
        &self,
        start: &TaskStart,
        result: &serde_json::Value,
    ) -> anyhow::Result<Option<TaskStatus>> {
        self.task_succeeded(&start.task_id, result).await?;
        match &start.workflow_id {
            Some(workflow_id) => self.workflow_status(workflow_id).await,
            None => Ok(None),
        }
    }

    async fn task_succeeded(&self, task_id: &str, result: &serde_json::Value)
    -> anyhow::Result<()>;

    /// Stores FAILURE with the error and marks the workflow (if any) FAILURE.
    async fn task_failed(
        &self,
        workflow_id: Option<&str>,
        task_id: &str,
        error: &TaskError,
    ) -> anyhow::Result<()>;

    /// Stores REVOKED as Celery's `mark_as_revoked` does: the result is
    /// `TaskRevokedError(reason)` (`terminated` for a step stopped while it ran, `revoked` for a
    /// message that arrived after its revoke), with no traceback. The workflow's own status is
    /// left alone: a pause has set it, and a revoked step is what a resume runs again.
    async fn task_revoked(&self, task_id: &str, reason: &str) -> anyhow::Result<()>;

    /// Remembers task ids as revoked at `at` (Celery's state db, shared by every worker of this
    /// store): a message of one of them that arrives later is not run.
    async fn remember_revoked(&self, task_ids: &[String], at: DateTime<Utc>) -> anyhow::Result<()>;

    /// Forgets the revokes remembered before `cutoff` (they have expired: Celery keeps them for
    /// three hours), so that the record does not grow for ever.
    async fn forget_revoked_before(&self, cutoff: DateTime<Utc>) -> anyhow::Result<()>;

    /// The task ids revoked at or after `since`, with when; older ones are forgotten.
    async fn revoked_since(
        &self,
        since: DateTime<Utc>,
    ) -> anyhow::Result<Vec<(String, DateTime<Utc>)>>;

    /// The cached status (`_status`) of a workflow alone, without loading its steps; `None`
    /// if there is no such workflow.
    async fn workflow_status(&self, id: &str) -> anyhow::Result<Option<TaskStatus>>;

    /// Sets the cached workflow status.
    async fn set_workflow_status(
        &self,
        workflow_id: &str,
        status: TaskStatus,
    ) -> anyhow::Result<()>;

    /// Sets the resume lock (a resume in flight), unless one is set; returns whether it was set.
    async fn lock_for_resume(&self, workflow_id: &str, now: DateTime<Utc>) -> anyhow::Result<bool>;

    /// Workflows named one of `names` and created before `cutoff`, oldest first (ties by id),
    /// after the cursor `after` (the end of the previous page).
    async fn workflows_created_before(
        &self,
        names: &[String],
        cutoff: DateTime<Utc>,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> anyhow::Result<Vec<Workflow>>;

    /// Deletes a workflow with its runs and task results (and, in a store that also holds the
    /// queue, its queued messages).
    async fn delete_workflow(&self, id: &str) -> anyhow::Result<()>;

    async fn watch_state(&self, source_dir: &str) -> anyhow::Result<WatchState>;

    async fn save_watch_state(&self, source_dir: &str, state: &WatchState) -> anyhow::Result<()>;

    /// Records fixity checks (one per copy checked).
    async fn record_fixity(&self, checks: &[FixityRecord]) -> anyhow::Result<()>;

    /// The fixity checks of a dataset, newest first, at most `limit`.
    async fn fixity_history(
        &self,
        dataset_id: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<FixityRecord>>;

    /// Where each dataset ever checked stands in the fixity rotation; datasets never checked
    /// are absent.
    async fn fixity_standings(&self) -> anyhow::Result<HashMap<i64, FixityStanding>>;
}

/// The bytes running steps hold on each file system for the output they are about to write
/// (`capacity`): kept by the workflow store's backend, so that steps of every worker sharing
/// the store share one account.
#[async_trait]
pub trait SpaceLedger: Send + Sync {
    /// Reserves `bytes` on the file system `fs` (its mount point) for `holder` when they fit:
    /// the live reservations of the other holders plus `bytes` at most `available`. Taking it
    /// again while it is held renews it without that check (the holder's own output uses up
    /// the free space it reserved). Returns whether the holder holds it now. A reservation
    /// lapses `ttl` after it was last taken, judged by the store's clock, so a crashed
    /// worker's bytes come free as its claim does.
    async fn reserve_space(
        &self,
        fs: &str,
        holder: &str,
        bytes: u64,
        available: u64,
        ttl: std::time::Duration,
    ) -> anyhow::Result<bool>;

    /// Gives up `holder`'s reservation on `fs`, if it has one.
    async fn release_space(&self, fs: &str, holder: &str) -> anyhow::Result<()>;

    /// The live reservations on `fs`.
    async fn space_reservations(&self, fs: &str) -> anyhow::Result<Vec<SpaceReservation>>;
}

/// Why a job run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Its scheduled slot came.
    Schedule,
    /// Slots were missed while no scheduler ran (misfire = "run_once").
    Misfire,
    /// It was due while running and waited for the run to end (overlap = "queue").
    Queued,
    /// `workers jobs run`.
    Manual,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Misfire => "misfire",
            Trigger::Queued => "queued",
            Trigger::Manual => "manual",
        }
    }
}

/// How a job run ended (or that it is still running, or was skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    Running,
    Success,
    Failed(String),
    Skipped(String),
}

impl RunOutcome {
    /// Why a run failed or was skipped.
    pub fn reason(&self) -> Option<&str> {
        match self {
            RunOutcome::Failed(reason) | RunOutcome::Skipped(reason) => Some(reason),
            RunOutcome::Running | RunOutcome::Success => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            RunOutcome::Running => "running",
            RunOutcome::Success => "success",
            RunOutcome::Failed(_) => "failed",
            RunOutcome::Skipped(_) => "skipped",
        }
    }
}

/// A live lease: who holds it and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    pub holder: String,
    pub expires_at: DateTime<Utc>,
    /// When this holder took it; `None` when the store does not know (taken by an older
    /// version).
    pub since: Option<DateTime<Utc>>,
}

/// One recorded run of a job.
#[derive(Debug, Clone)]
pub struct JobRun {
    pub id: i64,
    pub job: String,
    pub trigger: String,
    /// The scheduled slot, for scheduled runs.
    pub slot: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub outcome: RunOutcome,
    /// What the run did (datasets registered, purged, ...).
    pub counters: serde_json::Map<String, serde_json::Value>,
    /// `host:pid` of the process that ran it.
    pub host: String,
    pub dry_run: bool,
}

/// The scheduler's records: job runs, the last slot handled per job, and leases.
#[async_trait]
pub trait SchedulerStore: Send + Sync {
    /// Takes or renews the lease `name` for `holder` for `ttl`, unless another holder has it
    /// and it has not expired. Returns whether `holder` holds it now. Expiry is judged by the
    /// store's own clock (the database server's), never by the caller's, so hosts whose clocks
    /// disagree still agree on who holds a lease or a claim.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> anyhow::Result<bool>;

    /// Gives the lease up, if `holder` has it.
    async fn release_lease(&self, name: &str, holder: &str) -> anyhow::Result<()>;

    /// The store server's clock, where it has one of its own (MongoDB); `None` for a store on
    /// this host. Leases and claims are judged by it, so `workers doctor` compares it with ours.
    async fn server_time(&self) -> anyhow::Result<Option<DateTime<Utc>>> {
        Ok(None)
    }

    /// Who holds the lease `name` now and until when (by the store's clock); `None` when nobody
    /// does, or when the store cannot tell.
    async fn lease(&self, name: &str) -> anyhow::Result<Option<LeaseState>> {
        let _ = name;
        Ok(None)
    }

    /// `acquire_lease` for many names and one holder; whether each is held now, in order.
    async fn acquire_leases(
        &self,
        names: &[String],
        holder: &str,
        ttl: std::time::Duration,
    ) -> anyhow::Result<Vec<bool>> {
        let mut held = Vec::with_capacity(names.len());
        for name in names {
            held.push(self.acquire_lease(name, holder, ttl).await?);
        }
        Ok(held)
    }

    /// `release_lease` for many names and one holder.
    async fn release_leases(&self, names: &[String], holder: &str) -> anyhow::Result<()> {
        for name in names {
            self.release_lease(name, holder).await?;
        }
        Ok(())
    }

    /// The last slot handled (run or skipped) per job.
    async fn last_slots(&self) -> anyhow::Result<HashMap<String, DateTime<Utc>>>;

    async fn set_last_slot(&self, job: &str, slot: DateTime<Utc>) -> anyhow::Result<()>;

    /// Records a run as started; returns its id.
    async fn start_run(
        &self,
        job: &str,
        trigger: Trigger,
        slot: Option<DateTime<Utc>>,
        host: &str,
        dry_run: bool,
        now: DateTime<Utc>,
    ) -> anyhow::Result<i64>;

    /// Records how a run ended.
    async fn finish_run(
        &self,
        id: i64,
        outcome: &RunOutcome,
        counters: &serde_json::Map<String, serde_json::Value>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()>;

    /// Records a slot that was not run, and why.
    async fn record_skip(
        &self,
        job: &str,
        trigger: Trigger,
        slot: DateTime<Utc>,
        host: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()>;

    /// Recent runs, newest first; of one job or of all.
    async fn runs(&self, job: Option<&str>, limit: usize) -> anyhow::Result<Vec<JobRun>>;

    /// Marks the runs `host` left running as failed with `reason` (the process stopped or
    /// died before they ended). Returns how many there were.
    async fn abandon_runs(
        &self,
        host: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<u64>;
}

//! The workflow engine: starts workflows, runs one delivered step to a recorded end, resumes
//! failed workflows and repairs stalled ones.
//!
//! Crash safety comes from ordering and idempotence, not from transactions across seams:
//! a step's message is acknowledged only after its result is stored and the next step is
//! published, so a crash at any point redelivers the message. A redelivered message whose
//! task already succeeded does not run again; it only publishes the next step (whose id is
//! derived from the finished task's id) if that step has not started yet.
//!
//! Exactly one run per task: a broker such as RabbitMQ may hand out two copies of a message
//! at once (a redelivery after a lost connection or after its acknowledgement timeout, a
//! re-published next step). Before running a step, the engine claims its task id in the store
//! (`WorkflowStore::claim_task`, a lease renewed while the step runs, which counts the start
//! in the same write where the store can); a copy that finds the claim held by a
//! live worker is deferred by a lease period, so it is neither lost (should that worker die)
//! nor run twice. The embedded queue's own claims are already per task id, so its deliveries
//! need no second claim (and a dead process's claim is reclaimed at once, as before).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tracing::{Instrument, error, info, info_span, warn};
use uuid::Uuid;

use super::status::{DerivedStatus, derive};
use crate::app::App;
use crate::broker::{Delivery, TaskMessage};
use crate::cancel::CancellationToken;
use crate::control::WorkerControl;
use crate::progress::{Progress, RateEstimator};
use crate::registry::{DatasetId, RegistryError};
use crate::steps::{self, StepContext, StepError, Task};
use crate::store::{
    TaskClaim, TaskError, TaskMeta, TaskStart, TaskStatus, Workflow, WorkflowFilter,
};
use crate::ui::Display;

/// Namespace of the task ids the engine derives (for `next` steps and restarts).
const TASK_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5b1f_0c3e_7d2a_4e8f_9a61_3c0d_2e4b_7f19);

/// The id of the first step's message of a workflow.
pub fn start_task_id(workflow_id: &str) -> String {
    Uuid::new_v5(
        &TASK_ID_NAMESPACE,
        format!("{workflow_id}/start").as_bytes(),
    )
    .to_string()
}

/// The id of the message published after task `task_id` succeeded.
pub fn next_task_id(task_id: &str) -> String {
    Uuid::new_v5(&TASK_ID_NAMESPACE, format!("{task_id}/next").as_bytes()).to_string()
}

/// The queue a step goes to: its own, or `{app_id}.q`.
fn queue_of(app: &App, workflow: &Workflow, position: usize) -> String {
    workflow.steps[position]
        .spec
        .queue
        .clone()
        .unwrap_or_else(|| format!("{}.q", app.settings.app_id))
}

/// Builds the message for step `position` (spec F.6): priority is the step's own or its
/// 1-based position, clamped to 0-9; kwargs are the step's, then `extra_kwargs` (the start
/// kwargs, for a first step), then `workflow_id`, `step` and `app_id`. The message starts a
/// new chain (its own root, no parent) until the caller says otherwise.
fn step_message(
    app: &App,
    workflow: &Workflow,
    position: usize,
    id: String,
    args: Vec<Value>,
    extra_kwargs: &Map<String, Value>,
) -> TaskMessage {
    let step = &workflow.steps[position].spec;
    let mut kwargs = step.kwargs.clone().unwrap_or_default();
    kwargs.extend(extra_kwargs.clone());
    kwargs.insert("workflow_id".into(), json!(workflow.id));
    kwargs.insert("step".into(), json!(step.name));
    kwargs.insert("app_id".into(), json!(workflow.app_id));
    let priority = step.priority.map_or(position + 1, usize::from).min(9) as u8;
    TaskMessage {
        root_id: id.clone(),
        id,
        task: step.task.clone(),
        args,
        kwargs,
        priority,
        eta: None,
        retries: 0,
        parent_id: None,
        queue: queue_of(app, workflow, position),
        time_limits: Default::default(),
    }
}

/// Why `start` started nothing.
#[derive(Debug, thiserror::Error)]
pub enum NotStarted {
    /// The dataset has a workflow of that name that is not done: a second one would run the
    /// same steps on the same files at the same time.
    #[error("dataset {dataset_id} already has an active `{name}` workflow ({workflow_id})")]
    Active {
        dataset_id: DatasetId,
        name: String,
        workflow_id: String,
    },
    /// Another process is starting that workflow for the dataset right now.
    #[error(
        "another process is starting a `{name}` workflow for dataset {dataset_id}; try again shortly"
    )]
    Busy { dataset_id: DatasetId, name: String },
}

/// How long a start may hold its claim (`start/{dataset}/{name}`): a starter that dies holding
/// it blocks other starts of that workflow for the dataset this long at most.
const START_CLAIM: Duration = Duration::from_secs(60);

/// Creates workflow `name` for a dataset, links it to the dataset and publishes its first
/// step. Returns the workflow id.
///
/// Starting is exclusive in every backend: under a claim in the store (`start/{dataset}/
/// {name}`, judged by the store's clock), the dataset's linked workflows are checked and a new
/// one is created only when none of that name is active. Two watch runs, a watch run and the
/// repair of datasets without a workflow, or an operator's `workflows start` therefore never
/// give a dataset two active workflows of one name (`NotStarted` says why nothing started).
pub async fn start(
    app: &App,
    name: &str,
    dataset_id: DatasetId,
    start_kwargs: Map<String, Value>,
) -> anyhow::Result<String> {
    start_many(app, name, &[dataset_id], &start_kwargs)
        .await
        .pop()
        .map_or_else(
            || Err(anyhow::format_err!("no workflow was started")),
            |(_, r)| r,
        )
}

/// `start` for many datasets at once, in a fixed number of round trips for the whole batch
/// (claims, links, workflows, first steps) rather than several per dataset: what `watch` and
/// the repair of datasets without a workflow use. Returns each dataset's outcome, in order.
pub async fn start_many(
    app: &App,
    name: &str,
    datasets: &[DatasetId],
    start_kwargs: &Map<String, Value>,
) -> Vec<(DatasetId, anyhow::Result<String>)> {
    let mut seen = std::collections::HashSet::new();
    let datasets: Vec<DatasetId> = datasets
        .iter()
        .copied()
        .filter(|id| seen.insert(*id))
        .collect();
    let Some(spec) = app.definitions.get(name) else {
        let missing = || Err(anyhow::format_err!("no workflow is named `{name}`"));
        return datasets.iter().map(|id| (*id, missing())).collect();
    };
    let holder = format!("{}/{}", app.identity.holder(), Uuid::new_v4());
    let claims: Vec<String> = datasets
        .iter()
        .map(|id| format!("start/{id}/{name}"))
        .collect();
    let held = match app
        .scheduler_store
        .acquire_leases(&claims, &holder, START_CLAIM)
        .await
    {
        Ok(held) => held,
        Err(err) => {
            let message = format!("{err:#}");
            return datasets
                .iter()
                .map(|id| (*id, Err(anyhow::format_err!("{message}"))))
                .collect();
        }
    };
    let mut outcomes: HashMap<DatasetId, anyhow::Result<String>> = HashMap::new();
    let claimed: Vec<DatasetId> = datasets
        .iter()
        .zip(&held)
        .filter_map(|(id, held)| held.then_some(*id))
        .collect();
    for (id, held) in datasets.iter().zip(&held) {
        if !held {
            let busy = NotStarted::Busy {
                dataset_id: *id,
                name: name.to_owned(),
            };
            outcomes.insert(*id, Err(busy.into()));
        }
    }
    let created = async {
        let linked = app.registry.workflows_of(&claimed).await?;
        let mut new = Vec::new();
        for id in &claimed {
            let Some(workflows) = linked.get(id) else {
                outcomes.insert(*id, Err(RegistryError::NotFound(*id).into()));
                continue;
            };
            // A dataset with workflows (rare in a batch: most are new) is looked at closely.
            if !workflows.is_empty() {
                match active_workflow(app, *id, name).await {
                    Ok(Some(workflow_id)) => {
                        let active = NotStarted::Active {
                            dataset_id: *id,
                            name: name.to_owned(),
                            workflow_id,
                        };
                        outcomes.insert(*id, Err(active.into()));
                        continue;
                    }
                    Ok(None) => {}
                    Err(err) => {
                        outcomes.insert(*id, Err(err));
                        continue;
                    }
                }
            }
            new.push((*id, Uuid::new_v4().to_string()));
        }
        if new.is_empty() {
            return anyhow::Ok(new);
        }
        let rows: Vec<(String, Vec<Value>)> = new
            .iter()
            .map(|(id, workflow_id)| (workflow_id.clone(), vec![json!(id)]))
            .collect();
        app.store
            .create_workflows(&app.settings.app_id, spec, &rows)
            .await?;
        app.registry.add_workflows(&new).await?;
        let messages: Vec<TaskMessage> = new
            .iter()
            .map(|(id, workflow_id)| {
                let workflow =
                    Workflow::pending(workflow_id, &app.settings.app_id, spec, vec![json!(id)]);
                step_message(
                    app,
                    &workflow,
                    0,
                    start_task_id(workflow_id),
                    vec![json!(id)],
                    start_kwargs,
                )
            })
            .collect();
        app.broker.publish_many(&messages).await?;
        anyhow::Ok(new)
    }
    .await;
    match created {
        Ok(new) => {
            for (dataset_id, workflow_id) in new {
                info!(dataset_id, workflow_id = %workflow_id, workflow = name, "Started workflow.");
                outcomes.insert(dataset_id, Ok(workflow_id));
            }
        }
        Err(err) => {
            // The batch failed part-way: a dataset left without a linked workflow is found by
            // the repair pass; a linked workflow whose first step was not published, by the
            // repair of stalled workflows.
            let message = format!("{err:#}");
            for id in &claimed {
                outcomes
                    .entry(*id)
                    .or_insert_with(|| Err(anyhow::format_err!("{message}")));
            }
        }
    }
    if let Err(err) = app
        .scheduler_store
        .release_leases(&claims_held(&claims, &held), &holder)
        .await
    {
        warn!(claims = claimed.len(), error = %format!("{err:#}"), "Could not release the start claims; they lapse on their own.");
    }
    datasets
        .iter()
        .map(|id| {
            let outcome = outcomes
                .remove(id)
                .unwrap_or_else(|| Err(anyhow::format_err!("dataset {id}: no outcome")));
            (*id, outcome)
        })
        .collect()
}

/// The claims of `claims` that were taken.
fn claims_held(claims: &[String], held: &[bool]) -> Vec<String> {
    claims
        .iter()
        .zip(held)
        .filter(|(_, held)| **held)
        .map(|(claim, _)| claim.clone())
        .collect()
}

/// The newest workflow named `name` linked to the dataset whose derived status is not done.
async fn active_workflow(
    app: &App,
    dataset_id: DatasetId,
    name: &str,
) -> anyhow::Result<Option<String>> {
    let dataset = app.registry.get(dataset_id).await?;
    for workflow_id in dataset.workflows.iter().rev() {
        let Some(workflow) = app.store.workflow(workflow_id).await? else {
            continue;
        };
        if workflow.name != name {
            continue;
        }
        if !view(app, workflow).await?.derived.status.is_done() {
            return Ok(Some(workflow_id.clone()));
        }
    }
    Ok(None)
}

/// The arguments of the step after one that returned `result`: sca-rhythm passes the first
/// element of the return value on as the only argument.
fn next_args(result: &Value, args: &[Value]) -> Vec<Value> {
    match result {
        Value::Array(items) if !items.is_empty() => vec![items[0].clone()],
        _ => args.iter().take(1).cloned().collect(),
    }
}

/// Whether `advance` publishes a next step that has already started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Republish {
    Always,
    /// A duplicate of a finished step: its successor is published only if it never started,
    /// so duplicates do not cascade through the rest of the workflow.
    UnlessStarted,
}

/// The message of the step after `position`, for the caller to publish, or `None` when
/// nothing is to be sent (after the last step, which marks the workflow done here).
/// `status` is the workflow's status when the caller knows it (read with the step's result);
/// otherwise it is read here.
async fn advance(
    app: &App,
    workflow: &Workflow,
    position: usize,
    finished: &TaskMessage,
    result: &Value,
    republish: Republish,
    status: Option<TaskStatus>,
) -> anyhow::Result<Option<TaskMessage>> {
    let next = position + 1;
    if next >= workflow.steps.len() {
        app.store
            .set_workflow_status(&workflow.id, TaskStatus::Success)
            .await?;
        info!(workflow_id = %workflow.id, "Workflow succeeded.");
        return Ok(None);
    }
    if republish == Republish::UnlessStarted && !workflow.steps[next].runs.is_empty() {
        return Ok(None);
    }
    // Paused (rhythm_api's pause sets REVOKED) while the step ran: the workflow stops here,
    // whichever worker finished the step; a resume continues it.
    let status = match status {
        Some(status) => Some(status),
        None => app.store.workflow_status(&workflow.id).await?,
    };
    if status == Some(TaskStatus::Revoked) {
        info!(workflow_id = %workflow.id, next = %workflow.steps[next].spec.name,
            "The workflow is paused (REVOKED): its next step is not sent.");
        return Ok(None);
    }
    let args = next_args(result, &finished.args);
    let mut message = step_message(
        app,
        workflow,
        next,
        next_task_id(&finished.id),
        args,
        &Map::new(),
    );
    message.parent_id = Some(finished.id.clone());
    message.root_id = finished.root_id.clone();
    Ok(Some(message))
}

/// Converts a step failure into the error Celery records.
fn task_error(err: &StepError) -> TaskError {
    TaskError {
        exc_type: err.kind().to_owned(),
        exc_message: format!("{:#}", err.error()),
        exc_module: "workers.exceptions".to_owned(),
    }
}

enum Outcome {
    Finished(Result<Value, StepError>),
    LeaseLost(anyhow::Error),
    /// The worker is stopping and the step's grace ran out.
    Interrupted,
    /// The step ran past its time limit and was stopped.
    TimedOut(Duration),
    /// The step was revoked with `terminate` and stopped.
    Revoked,
}

/// How long a cancelled step has to stop (its pool jobs check their token per chunk or member,
/// so this is only reached by a step stuck in a file-system call) before it is abandoned.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// How a worker runs steps.
#[derive(Debug, Clone)]
pub struct Runner {
    /// The worker's node name (Celery's `--hostname`), recorded as the task's `worker`.
    pub node_name: String,
    /// Turns true when running steps must stop (a shutdown whose grace ran out): the step is
    /// abandoned, nothing is recorded and its message goes back to the broker. `None`: never.
    pub interrupt: Option<watch::Receiver<bool>>,
    /// The worker's remote control: revoked tasks are not run, and a revoke with `terminate`
    /// stops a running step. `None`: a runner no one can reach (tests, one-off handling).
    pub control: Option<Arc<WorkerControl>>,
}

impl Runner {
    /// A runner with the default node name that is never interrupted.
    pub fn for_app(app: &App) -> Runner {
        Runner {
            node_name: default_node_name(&app.identity.hostname),
            interrupt: None,
            control: None,
        }
    }
}

/// Returns once `interrupt` turns true; never if there is none or its sender is gone.
async fn interrupted(interrupt: &mut Option<watch::Receiver<bool>>) {
    if let Some(interrupt) = interrupt
        && interrupt.wait_for(|i| *i).await.is_ok()
    {
        return;
    }
    std::future::pending::<()>().await;
}

/// `workers@<host>`: the node name of a worker that was given none (Celery's `celery@%h`).
pub fn default_node_name(hostname: &str) -> String {
    format!("workers@{hostname}")
}

/// Runs one delivered message to a recorded end, as a worker with the default node name
/// that is never interrupted.
pub async fn handle(
    app: &Arc<App>,
    delivery: Box<dyn Delivery>,
    display: &Display,
) -> anyhow::Result<()> {
    handle_with(app, delivery, display, &Runner::for_app(app)).await
}

/// Runs one delivered message to a recorded end. Errors returned here are errors of the
/// engine's own bookkeeping (store or broker unreachable); the message is then left
/// unacknowledged and will be delivered again.
pub async fn handle_with(
    app: &Arc<App>,
    delivery: Box<dyn Delivery>,
    display: &Display,
    runner: &Runner,
) -> anyhow::Result<()> {
    let message = delivery.message().clone();
    let Some(task) = Task::from_name(&message.task) else {
        // A site's own task, run by its Python workers on the same queue: never failed or
        // dropped here, only given back for a worker that has it.
        return decline_unknown_task(delivery).await;
    };
    if runner
        .control
        .as_ref()
        .is_some_and(|control| control.is_revoked(&message.id))
    {
        // As a Celery worker does with a message that arrives after its revoke: marked
        // REVOKED, acknowledged, never run. A workflow it belongs to waits for a resume.
        info!(task_id = %message.id, task = %message.task, "Discarding a revoked task.");
        app.store.task_revoked(&message.id, "revoked").await?;
        crate::metrics::task_revoked(&message.task);
        if let Some(control) = &runner.control {
            control.task_event("task-revoked", &message.id, revoked_fields(false));
        }
        return delivery.ack().await;
    }
    if let Some(control) = &runner.control {
        control.task_received(&message, delivery.reprs());
    }
    // Messages that can never run are kept aside (or, where the broker has no place for
    // them, logged and removed) rather than requeued forever. Where the delivery is the
    // claim, the task's stored result is read with the workflow.
    let mut prefetched = None;
    let owner = match (message.workflow_id(), message.step_name()) {
        (Some(workflow_id), Some(step_name)) => {
            let workflow = if delivery.exclusive() {
                let (workflow, stored) = app.store.step_state(workflow_id, &message.id).await?;
                prefetched = Some(stored);
                workflow
            } else {
                app.store.workflow_for_step(workflow_id).await?
            };
            let Some(workflow) = workflow else {
                error!(task_id = %message.id, workflow_id, "Dropped a message of a workflow that does not exist.");
                return delivery.ack().await;
            };
            let Some(position) = workflow.steps.iter().position(|s| s.spec.name == step_name)
            else {
                error!(task_id = %message.id, workflow_id, step = step_name, "Dropped a message of an unknown step.");
                return delivery.ack().await;
            };
            Owner::Step {
                workflow: Box::new(workflow),
                position,
                step_name: step_name.to_owned(),
            }
        }
        // A plain Celery task (`verify_upload_integrity`, or any task sent with `apply_async`):
        // its result is stored, nothing follows it.
        (None, None) => Owner::Plain,
        _ => {
            return delivery
                .dead_letter("the message has only one of workflow_id and step")
                .await;
        }
    };
    let mut start = TaskStart {
        workflow_id: owner.workflow().map(|w| w.id.clone()),
        position: owner.position(),
        task_id: message.id.clone(),
        task_name: message.task.clone(),
        args: message.args.clone(),
        kwargs: message.kwargs.clone(),
        hostname: runner.node_name.clone(),
        pid: app.identity.pid,
        retries: message.retries,
        queue: message.queue.clone(),
        parent_id: message.parent_id.clone(),
        resume_locked: owner.workflow().is_some_and(|w| w.resume_lock.is_some()),
        start_counted: false,
    };
    let Some(dataset_id) = message.args.first().and_then(Value::as_i64) else {
        return delivery
            .dead_letter(&format!(
                "the message of task {} ({}) has no dataset id as its first argument",
                message.id, message.task
            ))
            .await;
    };
    let span = match &owner {
        Owner::Step {
            workflow,
            step_name,
            ..
        } => info_span!("step", dataset_id, workflow_id = %workflow.id, step = %step_name),
        Owner::Plain => info_span!("task", dataset_id, task = %message.task),
    };
    async move {
        // The claim and the task's stored result are read at once: one round trip of waiting.
        let (claim, stored) = if delivery.exclusive() {
            let stored = match prefetched {
                Some(stored) => stored,
                None => app.store.task_result(&message.id).await?,
            };
            (None, stored)
        } else {
            let claim = Claim::new(app, &message.id);
            // Taking the claim counts the start where the store can: one write fewer.
            let (taken, stored) = tokio::try_join!(
                claim.take(app, true),
                app.store.task_result(&message.id)
            )?;
            let TaskClaim::Held { start_counted } = taken else {
                // Another worker runs this task: try again once its claim would have lapsed,
                // in case that worker dies.
                let eta = Utc::now() + chrono::Duration::from_std(claim.ttl)?;
                info!(task_id = %message.id, "Step is running elsewhere; deferred this copy of its message by {} s.", claim.ttl.as_secs());
                return delivery.retry_later(eta, message.retries).await;
            };
            start.start_counted = start_counted;
            (Some(claim), stored)
        };
        let handled = run_claimed(
            app,
            delivery,
            display,
            runner,
            &owner,
            &start,
            task,
            dataset_id,
            claim.as_ref(),
            stored,
        )
        .await;
        if let Some(claim) = claim {
            // Given back off the slot's path: the message is settled, and a claim that is not
            // given back only lapses.
            let app = Arc::clone(app);
            let counted = start.start_counted;
            tokio::spawn(async move { claim.release(&app, counted).await });
        }
        handled
    }
    .instrument(span)
    .await
}

/// What a delivered task belongs to.
enum Owner {
    /// A step of a workflow: its result moves the workflow on.
    Step {
        workflow: Box<Workflow>,
        position: usize,
        step_name: String,
    },
    /// A plain Celery task: its result is all there is.
    Plain,
}

impl Owner {
    fn workflow(&self) -> Option<&Workflow> {
        match self {
            Owner::Step { workflow, .. } => Some(workflow),
            Owner::Plain => None,
        }
    }

    fn position(&self) -> usize {
        match self {
            Owner::Step { position, .. } => *position,
            Owner::Plain => 0,
        }
    }

    /// After the task succeeded: the message of the workflow's next step, to publish
    /// (nothing follows a plain task).
    async fn advance(
        &self,
        app: &App,
        finished: &TaskMessage,
        result: &Value,
        republish: Republish,
        status: Option<TaskStatus>,
    ) -> anyhow::Result<Option<TaskMessage>> {
        match self {
            Owner::Step {
                workflow, position, ..
            } => {
                advance(
                    app, workflow, *position, finished, result, republish, status,
                )
                .await
            }
            Owner::Plain => Ok(None),
        }
    }
}

/// How long a worker holds a task it does not implement before giving it back: growing with
/// each message of that task this process has declined, so that a worker alone on a queue
/// with such messages neither spins nor keeps them long from a worker that has the task.
fn decline_delay(declined_before: u32) -> Duration {
    Duration::from_millis(500 * 2u64.pow(declined_before.min(4))).min(Duration::from_secs(5))
}

/// Gives back a message of a task this worker does not implement, logging each task name once.
async fn decline_unknown_task(delivery: Box<dyn Delivery>) -> anyhow::Result<()> {
    static DECLINED: std::sync::Mutex<Option<HashMap<String, u32>>> = std::sync::Mutex::new(None);
    let task = delivery.message().task.clone();
    let declined_before = {
        let mut declined = DECLINED.lock().unwrap_or_else(|e| e.into_inner());
        let count = declined
            .get_or_insert_with(HashMap::new)
            .entry(task.clone())
            .or_insert(0);
        *count += 1;
        *count - 1
    };
    if declined_before == 0 {
        warn!(task = %task, task_id = %delivery.message().id,
            "This worker does not implement task `{task}`: its messages go back to the queue for a worker that does (route it to a queue of its own to spare the round trips). Known tasks: {}.",
            Task::names());
    }
    delivery.decline(decline_delay(declined_before)).await
}

/// A task's claim in the store, held by one run of one worker.
struct Claim {
    task_id: String,
    /// Unique per run, so two slots of one process never share a claim.
    holder: String,
    ttl: Duration,
    /// When the last take or renewal that succeeded was sent: the claim is held until at least
    /// a lease after it.
    renewed: std::sync::Mutex<Option<Instant>>,
    /// The step started (STARTED recorded): a start counted with the claim stays counted.
    started: AtomicBool,
    /// The task succeeded and its message was settled: the claim is left to lapse.
    succeeded: AtomicBool,
}

impl Claim {
    fn new(app: &App, task_id: &str) -> Claim {
        Claim {
            task_id: task_id.to_owned(),
            holder: format!("{}/{}", app.identity.holder(), Uuid::new_v4()),
            ttl: Duration::from_secs(app.settings.worker.lease_seconds.max(1)),
            renewed: std::sync::Mutex::new(None),
            started: AtomicBool::new(false),
            succeeded: AtomicBool::new(false),
        }
    }

    /// Takes the claim (counting a start with it, where the store can, when `count_start`) or
    /// renews it.
    async fn take(&self, app: &App, count_start: bool) -> anyhow::Result<TaskClaim> {
        let sent = Instant::now();
        let claim = app
            .store
            .claim_task(&self.task_id, &self.holder, self.ttl, count_start)
            .await?;
        let held = matches!(claim, TaskClaim::Held { .. });
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = held.then_some(sent);
        Ok(claim)
    }

    /// Renews the claim; false if another run holds it now.
    async fn renew(&self, app: &App) -> anyhow::Result<bool> {
        Ok(matches!(
            self.take(app, false).await?,
            TaskClaim::Held { .. }
        ))
    }

    /// The step this claim is for started: its counted start stands.
    fn step_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// The task succeeded and its message is settled (acknowledged, the next step queued).
    fn step_succeeded(&self) {
        self.succeeded.store(true, Ordering::Relaxed);
    }

    /// Whether the claim is certainly still held without asking the store: taken or renewed
    /// less than half a lease ago (nobody can take a claim before its lease runs out).
    fn surely_held(&self) -> bool {
        self.renewed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|sent| sent.elapsed() < self.ttl / 2)
    }

    /// Gives the claim back, and the start its taking counted (`counted`) when the step never
    /// started (the task was found finished or superseded, or recording STARTED failed).
    async fn release(&self, app: &App, counted: bool) {
        // A task that succeeded keeps its claim until it lapses, saving a write on every
        // step: nothing needs it sooner. Its message is settled, so only a stray copy could
        // come for it, which is deferred until then and finds the result stored. (A task that
        // failed or waits keeps giving it back: its retry may come before the claim lapses.)
        if self.succeeded.load(Ordering::Relaxed) {
            return;
        }
        let uncount = counted && !self.started.load(Ordering::Relaxed);
        if let Err(err) = app
            .store
            .release_task(&self.task_id, &self.holder, uncount)
            .await
        {
            warn!(task_id = %self.task_id, error = %format!("{err:#}"), "Could not release the claim on the task; it lapses on its own.");
        }
    }
}

/// What a delivered message is to its task, by the retry count it carries and the one stored
/// with the task's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// The attempt to run now.
    Due,
    /// A copy of an attempt older than the one stored: a later attempt started, so its
    /// message exists (held by its worker, or back in the queue should that worker die).
    Superseded,
    /// A copy of the attempt that the stored RETRY recorded as failed.
    Retried,
}

/// A retry stores RETRY with the attempt's retry count, then publishes the same task id with
/// one more retry and an `eta`, then acknowledges the attempt's message. When that
/// acknowledgement is lost (the connection drops in between), the broker delivers the old
/// message again, without the `eta`, and running it would both run early and run attempt
/// `retries + 1` twice (it and the published copy). Such a copy is recognised by its retry
/// count equalling the stored one under RETRY, and is turned into the next attempt, deferred
/// by the retry delay, rather than dropped: after a crash between storing RETRY and
/// publishing, it is the only message left. When the published copy exists too, the two
/// copies of the next attempt are one task id under one claim: the first to arrive runs, the
/// other is deferred while it runs and then finds the attempt finished (SUCCESS or FAILURE,
/// dropped; RETRY, judged as here again). Each attempt therefore runs once, never before its
/// delay, at the cost of a spare message until the task ends.
fn attempt_of(status: TaskStatus, stored_retries: u32, retries: u32) -> Attempt {
    if retries < stored_retries {
        Attempt::Superseded
    } else if status == TaskStatus::Retry && retries == stored_retries {
        Attempt::Retried
    } else {
        Attempt::Due
    }
}

/// The part of `handle_with` that runs under the task's claim.
#[allow(clippy::too_many_arguments)]
async fn run_claimed(
    app: &Arc<App>,
    delivery: Box<dyn Delivery>,
    display: &Display,
    runner: &Runner,
    owner: &Owner,
    start: &TaskStart,
    task: Task,
    dataset_id: DatasetId,
    claim: Option<&Claim>,
    stored: Option<TaskMeta>,
) -> anyhow::Result<()> {
    let message = delivery.message().clone();
    match stored.as_ref().map(|m| m.status) {
        Some(TaskStatus::Success) => {
            // Redelivered after the result was stored: finish the bookkeeping only.
            info!(task_id = %message.id, "Step already succeeded; finishing its bookkeeping only.");
            let result = stored
                .as_ref()
                .map(|m| m.result.clone())
                .unwrap_or_default();
            let next = owner
                .advance(app, &message, &result, Republish::UnlessStarted, None)
                .await?;
            return delivery
                .ack_publishing(app.broker.as_ref(), next.as_ref())
                .await;
        }
        Some(TaskStatus::Failure | TaskStatus::Revoked) => {
            info!(task_id = %message.id, "Step already finished; dropping the duplicate message.");
            return delivery.ack().await;
        }
        _ => {}
    }
    if let Some(meta) = &stored {
        // A step that waited for space was queued again under the same retry count.
        let waited =
            meta.result.get("exc_type").and_then(Value::as_str) == Some(steps::WAITING_FOR_SPACE);
        match attempt_of(meta.status, meta.retries, message.retries) {
            Attempt::Retried if waited => {}
            Attempt::Due => {}
            Attempt::Superseded => {
                info!(task_id = %message.id, retries = message.retries, stored_retries = meta.retries,
                    "A later attempt of this step has started; dropping this copy of an earlier one.");
                return delivery.ack().await;
            }
            Attempt::Retried => {
                let delay = retry_policy(app, &message.task).delay_seconds;
                let eta = Utc::now() + chrono::Duration::seconds(delay as i64);
                info!(task_id = %message.id, retries = message.retries,
                    "This attempt already ran and failed; deferred this copy of its message as the next attempt, by {delay} s.");
                return delivery.retry_later(eta, message.retries + 1).await;
            }
        }
    }
    app.store.task_started(start).await?;
    if let Some(claim) = claim {
        claim.step_started();
    }
    if let Some(control) = &runner.control {
        control.task_event("task-started", &message.id, serde_json::Map::new());
    }
    let running = runner
        .control
        .as_ref()
        .map(|control| control.step_started(&message));
    let step_run =
        crate::metrics::StepRun::start(&message.task, delivery.published_at(), message.eta);
    let attempt = message.retries + 1;
    info!(task_id = %message.id, attempt, worker = %runner.node_name, "Step started.");
    let started = Instant::now();
    let progress = Progress::new();
    let ctx = StepContext {
        env: app.step_env(),
        dataset_id,
        task_id: message.id.clone(),
        args: message.args.clone(),
        kwargs: message.kwargs.clone(),
        progress: progress.clone(),
        cancel: CancellationToken::new(),
        retries: message.retries,
        max_retries: retry_policy(app, &message.task).max_retries,
    };
    let label = match owner {
        Owner::Step { step_name, .. } => format!("dataset {dataset_id} {step_name}"),
        Owner::Plain => format!("dataset {dataset_id} {}", message.task),
    };
    let supervisor = Supervisor {
        app,
        delivery: &*delivery,
        claim,
        interrupt: runner.interrupt.clone(),
        terminated: running.as_ref().map(|r| r.terminated()),
    };
    let time_limit = time_limit(app, &message);
    let outcome = supervisor
        .run(task, ctx, &progress, display, &label, time_limit)
        .await?;
    let outcome = match outcome {
        Outcome::LeaseLost(err) => {
            error!(task_id = %message.id, error = %format!("{err:#}"), "Stopped the step: its claim was lost; another worker runs it.");
            return Ok(());
        }
        Outcome::Interrupted => {
            warn!(task_id = %message.id, "Interrupted the step (the worker is stopping); its message goes back to the queue.");
            return delivery.release().await;
        }
        Outcome::Revoked => {
            // As Celery records a terminated task: REVOKED, `TaskRevokedError('terminated')`,
            // nothing follows. A pause set the workflow's status; a resume runs the step again.
            app.store.task_revoked(&message.id, "terminated").await?;
            crate::metrics::task_revoked(&message.task);
            if let Some(control) = &runner.control {
                control.task_event("task-revoked", &message.id, revoked_fields(true));
            }
            warn!(task_id = %message.id, "Terminated the step: it was revoked. Its partial work was removed; nothing follows it until the workflow is resumed.");
            drop(running);
            return delivery.ack().await;
        }
        Outcome::TimedOut(limit) => Err(StepError::permanent(
            "TimeLimitExceeded",
            anyhow::format_err!(
                "the step ran longer than its time limit of {} s and was stopped; its partial work was removed",
                limit.as_secs_f64()
            ),
        )),
        Outcome::Finished(result) => result,
    };
    // A result is recorded only by the run that still holds the task: a run whose claim lapsed
    // (a long pause, a partitioned store) may be running a second time elsewhere by now.
    if !still_holds(app, &*delivery, claim).await? {
        error!(task_id = %message.id, "The step ended after its claim was lost; its result is not recorded (another worker runs it).");
        return Ok(());
    }
    let elapsed = started.elapsed().as_secs_f64();
    match outcome {
        Ok(result) => {
            let status = app.store.task_succeeded_from(start, &result).await?;
            step_run.finish(crate::metrics::StepOutcome::Succeeded);
            info!(task_id = %message.id, seconds = elapsed, "Step succeeded.");
            if let Some(control) = &runner.control {
                let mut fields = serde_json::Map::new();
                fields.insert(
                    "result".into(),
                    Value::String(crate::broker::saferepr::value(&result)),
                );
                fields.insert("runtime".into(), serde_json::json!(elapsed));
                control.task_event("task-succeeded", &message.id, fields);
            }
            let next = owner
                .advance(app, &message, &result, Republish::Always, status)
                .await?;
            delivery
                .ack_publishing(app.broker.as_ref(), next.as_ref())
                .await?;
            if let Some(claim) = claim {
                claim.step_succeeded();
            }
            Ok(())
        }
        Err(err) => {
            let policy = retry_policy(app, &message.task);
            let error = task_error(&err);
            if let Some(wait) = err.wait() {
                // Recorded as a retry (the step shows RETRY with what it waits for), queued
                // again with the same retry count: waiting is not failing.
                info!(task_id = %message.id, error = %error.exc_message,
                    "Step waits; it will be tried again in {} s.", wait.as_secs());
                app.store
                    .task_retry(&message.id, &error, message.retries)
                    .await?;
                step_run.finish(crate::metrics::StepOutcome::Waiting);
                if let Some(control) = &runner.control {
                    control.task_event("task-retried", &message.id, error_fields(&error));
                }
                let eta = Utc::now()
                    + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(60));
                return delivery.retry_later(eta, message.retries).await;
            }
            if err.is_retryable() && message.retries < policy.max_retries {
                let retries = message.retries + 1;
                warn!(task_id = %message.id, attempt, error = %error.exc_message,
                    "Step failed; it will be tried again in {} s.", policy.delay_seconds);
                app.store
                    .task_retry(&message.id, &error, message.retries)
                    .await?;
                step_run.finish(crate::metrics::StepOutcome::Retried);
                if let Some(control) = &runner.control {
                    control.task_event("task-retried", &message.id, error_fields(&error));
                }
                let eta = Utc::now() + chrono::Duration::seconds(policy.delay_seconds as i64);
                delivery.retry_later(eta, retries).await
            } else {
                let workflow = owner.workflow();
                match workflow {
                    Some(_) => {
                        error!(task_id = %message.id, attempt, error = %error.exc_message, "Step failed; the workflow stops here.")
                    }
                    None => {
                        error!(task_id = %message.id, attempt, error = %error.exc_message, "Task failed.")
                    }
                }
                app.store
                    .task_failed(workflow.map(|w| w.id.as_str()), &message.id, &error)
                    .await?;
                step_run.finish(crate::metrics::StepOutcome::Failed);
                if let Some(control) = &runner.control {
                    control.task_event("task-failed", &message.id, error_fields(&error));
                }
                if let Some(workflow) = workflow {
                    crate::jobs::manage_uploads::workflow_failed(
                        app,
                        workflow,
                        dataset_id,
                        &error.exc_message,
                    )
                    .await;
                }
                delivery.ack().await
            }
        }
    }
}

/// The fields of `task-failed` and `task-retried`: the exception's repr and a traceback (the
/// exception line a Python traceback ends with; there are no Python frames).
fn error_fields(error: &TaskError) -> serde_json::Map<String, Value> {
    let message = crate::broker::celery::py_repr(&Value::String(error.exc_message.clone()));
    let mut fields = serde_json::Map::new();
    fields.insert(
        "exception".into(),
        Value::String(format!("{}({message})", error.exc_type)),
    );
    fields.insert(
        "traceback".into(),
        Value::String(format!(
            "{}.{}: {}",
            error.exc_module, error.exc_type, error.exc_message
        )),
    );
    fields
}

/// The fields of `task-revoked`: terminated while running (with SIGTERM's number, as Celery
/// reports the signal it sent), or discarded when its message arrived.
fn revoked_fields(terminated: bool) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    fields.insert("terminated".into(), Value::Bool(terminated));
    fields.insert(
        "signum".into(),
        if terminated {
            serde_json::json!(15)
        } else {
            Value::Null
        },
    );
    fields.insert("expired".into(), Value::Bool(false));
    fields
}

/// How often and after how long a failed task is tried again.
fn retry_policy(app: &App, task: &str) -> crate::config::RetryPolicy {
    app.settings
        .retry
        .steps
        .get(task)
        .copied()
        .unwrap_or(app.settings.retry.default)
}

/// The step's time limit: the configured one for its task (or the default), or the message's
/// own `timelimit`, whichever is shorter.
fn time_limit(app: &App, message: &TaskMessage) -> Option<Duration> {
    let worker = &app.settings.worker;
    let configured = match worker
        .time_limits
        .get(&message.task)
        .copied()
        .unwrap_or(worker.time_limit_seconds)
    {
        0 => None,
        secs => Some(Duration::from_secs(secs)),
    };
    [configured, message.time_limits.earliest()]
        .into_iter()
        .flatten()
        .min()
}

/// Renews the task's claim (the store's, or the delivery's own) right before its result is
/// recorded, unless it was renewed less than half a lease ago: whether this run may still
/// record it. The claim then runs for at least half a lease, longer than recording takes.
async fn still_holds(
    app: &App,
    delivery: &dyn Delivery,
    claim: Option<&Claim>,
) -> anyhow::Result<bool> {
    match claim {
        // Renewed less than half a lease ago (a short step): still held, no round trip.
        Some(claim) if claim.surely_held() => Ok(true),
        Some(claim) => claim.renew(app).await,
        None if delivery.surely_held() => Ok(true),
        None => Ok(delivery.keep_alive().await.is_ok()),
    }
}

/// Watches a running step: keeps its claims alive, reports its progress, stops it when
/// interrupted.
struct Supervisor<'a> {
    app: &'a Arc<App>,
    delivery: &'a dyn Delivery,
    claim: Option<&'a Claim>,
    interrupt: Option<watch::Receiver<bool>>,
    /// Cancelled by a revoke with `terminate`.
    terminated: Option<CancellationToken>,
}

impl Supervisor<'_> {
    /// Runs the step while keeping its claims alive and reporting its progress. A panic in the
    /// step becomes a permanent failure, never a dead worker. A step that must stop (claim
    /// lost, shutdown, time limit) is cancelled and waited for: its pool jobs stop within
    /// moments and remove their partial work, so nothing of it runs on beside the next attempt.
    async fn run(
        mut self,
        task: Task,
        ctx: StepContext,
        progress: &Progress,
        display: &Display,
        label: &str,
        time_limit: Option<Duration>,
    ) -> anyhow::Result<Outcome> {
        let app = self.app;
        let task_id = ctx.task_id.clone();
        let cancel = ctx.cancel.clone();
        let mut step = AbortOnDrop(tokio::spawn(steps::run(task, ctx).in_current_span()));
        let deadline = time_limit.map(|limit| tokio::time::Instant::now() + limit);
        let time_is_up = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(time_is_up);
        let terminated = self.terminated.clone();
        let revoked = async {
            match terminated {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(revoked);
        let keep_alive_every = Duration::from_secs(app.settings.worker.lease_seconds.max(3) / 3);
        let report_every = app.settings.progress_interval;
        // First due one period from now. (An interval's immediate first tick is not free: the
        // timer rounds it up to its next millisecond, which short steps would wait for.)
        let now = tokio::time::Instant::now();
        let mut keep_alive = tokio::time::interval_at(now + keep_alive_every, keep_alive_every);
        let mut report = tokio::time::interval_at(now + report_every, report_every);
        let mut reporter = Reporter {
            estimator: RateEstimator::default(),
            last_version: u64::MAX,
        };
        let mut claim_renewed = Instant::now();
        let tracker = display.track(label);
        let outcome = loop {
            tokio::select! {
                joined = &mut step.0 => {
                    break match joined {
                        Ok(result) => Outcome::Finished(result),
                        Err(join_error) => {
                            let what = if join_error.is_panic() { "panicked" } else { "was cancelled" };
                            Outcome::Finished(Err(StepError::permanent("WorkerLostError",
                                anyhow::format_err!("the step {what}: {join_error}"))))
                        }
                    };
                }
                _ = interrupted(&mut self.interrupt) => {
                    stop_step(&cancel, &mut step, &task_id).await;
                    break Outcome::Interrupted;
                }
                () = &mut revoked => {
                    stop_step(&cancel, &mut step, &task_id).await;
                    break Outcome::Revoked;
                }
                () = &mut time_is_up => {
                    stop_step(&cancel, &mut step, &task_id).await;
                    break Outcome::TimedOut(time_limit.unwrap_or_default());
                }
                _ = keep_alive.tick() => {
                    if let Err(err) = self.delivery.keep_alive().await {
                        stop_step(&cancel, &mut step, &task_id).await;
                        break Outcome::LeaseLost(err);
                    }
                    if let Some(claim) = self.claim {
                        match claim.renew(app).await {
                            Ok(true) => claim_renewed = Instant::now(),
                            Ok(false) => {
                                stop_step(&cancel, &mut step, &task_id).await;
                                break Outcome::LeaseLost(anyhow::format_err!(
                                    "the claim on task {} was taken by another worker", claim.task_id));
                            }
                            // The store being out of reach is not a takeover, until the claim
                            // could lapse before the next renewal: the step stops first, so it
                            // has stopped before any other worker can take the task.
                            Err(err) if claim_renewed.elapsed() + keep_alive_every < claim.ttl => {
                                warn!(task_id = %claim.task_id, error = %format!("{err:#}"), "Could not renew the claim; trying again.");
                            }
                            Err(err) => {
                                stop_step(&cancel, &mut step, &task_id).await;
                                break Outcome::LeaseLost(err.context(format!(
                                    "the claim on task {} could lapse while the store is out of reach", claim.task_id)));
                            }
                        }
                    }
                }
                _ = report.tick() => {
                    if let Some(report) = reporter.report(progress) {
                        tracker.update(&report);
                        if let Err(err) = app.store.task_progress(&task_id, &report).await {
                            warn!(error = %format!("{err:#}"), "Could not store the step's progress.");
                        }
                    }
                }
            }
        };
        // The final report is always written (the original's throttle could drop it).
        if let Some(report) = reporter.report(progress) {
            tracker.update(&report);
            if let Outcome::Finished(Ok(_)) = &outcome {
                app.store.task_progress(&task_id, &report).await?;
            }
        }
        tracker.finish();
        Ok(outcome)
    }
}

/// Cancels a running step and waits (at most `STOP_WAIT`) for it to end.
async fn stop_step<T>(cancel: &CancellationToken, step: &mut AbortOnDrop<T>, task_id: &str) {
    cancel.cancel();
    if tokio::time::timeout(STOP_WAIT, &mut step.0).await.is_err() {
        warn!(
            task_id,
            "The step did not stop within {} s of its cancellation; abandoning it.",
            STOP_WAIT.as_secs()
        );
        step.0.abort();
    }
}

/// Aborts the step's task when the supervisor is dropped (shutdown), so an interrupted step
/// does not keep running unsupervised.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    // Aborting drops the step's future, and with it the futures of its pool jobs, which
    // cancels those jobs (`Pool::run_job`): nothing of the step goes on unsupervised.
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Reporter {
    estimator: RateEstimator,
    last_version: u64,
}

impl Reporter {
    /// A new report when the counter changed since the last one.
    fn report(&mut self, progress: &Progress) -> Option<Value> {
        let snap = progress.snapshot();
        if snap.version == self.last_version || (snap.name.is_empty() && snap.custom.is_none()) {
            return None;
        }
        self.last_version = snap.version;
        Some(self.estimator.report(&snap, Instant::now()))
    }
}

/// A workflow with its derived status.
pub struct WorkflowView {
    pub workflow: Workflow,
    pub derived: DerivedStatus,
    pub metas: HashMap<String, crate::store::TaskMeta>,
}

pub async fn view(app: &App, workflow: Workflow) -> anyhow::Result<WorkflowView> {
    let ids: Vec<String> = workflow.all_task_ids().into_iter().collect();
    let metas = app.store.task_metas(&ids).await?;
    let derived = derive(&workflow, &metas);
    Ok(WorkflowView {
        workflow,
        derived,
        metas,
    })
}

/// What `resume` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumed {
    /// The failed step was published again under this task id.
    Restarted {
        step: String,
        task_id: String,
    },
    NotFailed(TaskStatus),
    AlreadyResuming,
    /// `from` names no step at or before the failed one.
    NoSuchStep(String),
}

/// Restarts a failed workflow from its failed step, with the same arguments and keyword
/// arguments as its last run (the original dropped the start kwargs, spec J.14).
pub async fn resume(app: &App, workflow_id: &str) -> anyhow::Result<Resumed> {
    resume_from(app, workflow_id, None).await
}

/// `resume`, from the step named `from` when given: a step at or before the failed one (the
/// steps after it run again as it succeeds, each under a new task id).
pub async fn resume_from(
    app: &App,
    workflow_id: &str,
    from: Option<&str>,
) -> anyhow::Result<Resumed> {
    let workflow = app
        .store
        .workflow(workflow_id)
        .await?
        .ok_or_else(|| anyhow::format_err!("no workflow has the id `{workflow_id}`"))?;
    let view = view(app, workflow).await?;
    let Some(position) = view.derived.pending else {
        return Ok(Resumed::NotFailed(TaskStatus::Success));
    };
    let step_status = view.derived.steps[position];
    // A workflow paused between two steps (its next step was held back, `advance`) resumes
    // with that step, which never ran.
    let paused_between_steps =
        view.workflow.status_cache == TaskStatus::Revoked && step_status == TaskStatus::Pending;
    if !matches!(step_status, TaskStatus::Failure | TaskStatus::Revoked) && !paused_between_steps {
        return Ok(Resumed::NotFailed(view.derived.status));
    }
    let position = match from {
        None => position,
        Some(name) => match view.workflow.steps[..=position]
            .iter()
            .position(|s| s.spec.name == name)
        {
            Some(earlier) => earlier,
            None => return Ok(Resumed::NoSuchStep(name.to_owned())),
        },
    };
    if !app.store.lock_for_resume(workflow_id, Utc::now()).await? {
        return Ok(Resumed::AlreadyResuming);
    }
    let workflow = &view.workflow;
    let last = workflow.steps[position]
        .last_run()
        .map(|r| r.task_id.clone());
    let last_meta = last.as_ref().and_then(|id| view.metas.get(id));
    // A step that never ran gets what its predecessor passed on, as `advance` would have sent.
    let passed_on = || {
        let previous = workflow.steps[..position].last()?.last_run()?;
        let meta = view.metas.get(&previous.task_id)?;
        Some(next_args(&meta.result, &meta.args))
    };
    let args = last_meta
        .map(|m| m.args.clone())
        .filter(|a| !a.is_empty())
        .or_else(passed_on)
        .unwrap_or_else(|| workflow.start_args.clone());
    let task_id = Uuid::new_v4().to_string();
    let kwargs = last_meta.map(|m| m.kwargs.clone()).unwrap_or_default();
    let mut message = step_message(app, workflow, position, task_id.clone(), args, &kwargs);
    message.parent_id = last.clone();
    app.broker.publish(&message).await?;
    app.store
        .set_workflow_status(workflow_id, TaskStatus::Started)
        .await?;
    let step = workflow.steps[position].spec.name.clone();
    info!(workflow_id, step = %step, task_id = %task_id, "Resumed workflow.");
    Ok(Resumed::Restarted { step, task_id })
}

/// What `pause` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Paused {
    /// The step's task was revoked (and terminated where it runs).
    Paused {
        step: String,
        task: String,
        task_id: String,
    },
    /// Nothing runs: the workflow is done, failed, or its pending step never started.
    NotRunning(TaskStatus),
}

/// Pauses a workflow as sca-rhythm's `pause()` (rhythm_api's `POST /workflows/{id}/pause`)
/// does: the pending step's last task is revoked with `terminate` and the workflow reads
/// REVOKED until it is resumed. The status is set before the revoke, so that a step ending in
/// between gets no next step (`advance` reads it).
pub async fn pause(app: &App, workflow_id: &str) -> anyhow::Result<Paused> {
    let workflow = app
        .store
        .workflow(workflow_id)
        .await?
        .ok_or_else(|| anyhow::format_err!("no workflow has the id `{workflow_id}`"))?;
    let view = view(app, workflow).await?;
    let Some(position) = view.derived.pending else {
        return Ok(Paused::NotRunning(view.derived.status));
    };
    if matches!(
        view.derived.steps[position],
        TaskStatus::Success | TaskStatus::Failure
    ) {
        return Ok(Paused::NotRunning(view.derived.status));
    }
    let step = &view.workflow.steps[position];
    let Some(run) = step.last_run() else {
        return Ok(Paused::NotRunning(view.derived.status));
    };
    app.store
        .set_workflow_status(workflow_id, TaskStatus::Revoked)
        .await?;
    crate::control::revoke(app, std::slice::from_ref(&run.task_id), true, None, None).await?;
    info!(workflow_id, step = %step.spec.name, task_id = %run.task_id, "Paused workflow.");
    Ok(Paused::Paused {
        step: step.spec.name.clone(),
        task: step.spec.task.clone(),
        task_id: run.task_id.clone(),
    })
}

/// Finds active workflows whose next step is neither queued nor running (a crash between
/// creating a workflow and publishing its first step, for example) and publishes that step
/// again under the id it would have had. Needs a broker that can tell what it holds.
/// Returns the ids of the repaired workflows.
pub async fn repair_stalled(app: &App) -> anyhow::Result<Vec<String>> {
    let mut repaired = Vec::new();
    for workflow in app.store.workflows(WorkflowFilter::Active, 10_000).await? {
        if workflow.resume_lock.is_some() {
            // A resumed step is queued under a new id; it records a run when it starts.
            continue;
        }
        let view = view(app, workflow).await?;
        let workflow = &view.workflow;
        let Some(position) = view.derived.pending else {
            app.store
                .set_workflow_status(&workflow.id, TaskStatus::Success)
                .await?;
            continue;
        };
        let step_status = view.derived.steps[position];
        if step_status.is_done() {
            // FAILURE or REVOKED: the cache is stale; an operator resumes failed workflows.
            app.store
                .set_workflow_status(&workflow.id, step_status)
                .await?;
            continue;
        }
        let message = match workflow.steps[position].last_run() {
            // Started once: its message carries the same id, arguments and retry count.
            Some(run) => {
                let Some(meta) = view.metas.get(&run.task_id) else {
                    continue;
                };
                let mut message = step_message(
                    app,
                    workflow,
                    position,
                    run.task_id.clone(),
                    meta.args.clone(),
                    &meta.kwargs,
                );
                message.retries = meta.retries;
                message
            }
            None if position == 0 => step_message(
                app,
                workflow,
                0,
                start_task_id(&workflow.id),
                workflow.start_args.clone(),
                &Map::new(),
            ),
            // Never started: the message the previous step's success would have published.
            None => {
                let Some(previous) = workflow.steps[position - 1].last_run() else {
                    continue;
                };
                let Some(meta) = view.metas.get(&previous.task_id) else {
                    continue;
                };
                let args = next_args(&meta.result, &meta.args);
                let mut message = step_message(
                    app,
                    workflow,
                    position,
                    next_task_id(&previous.task_id),
                    args,
                    &Map::new(),
                );
                message.parent_id = Some(previous.task_id.clone());
                message
            }
        };
        let lost = match app.broker.holds(&message.id).await? {
            Some(held) => !held,
            // The broker cannot tell (RabbitMQ). A started step is the broker's to redeliver
            // (its message is unacknowledged until the step ends); a step that never started is
            // taken as lost once the workflow saw no change for `stalled_after`. A queue
            // backlog longer than that gets a duplicate message, which the claim check of
            // `handle` drops.
            None => {
                let last_change = workflow.updated_at.unwrap_or(workflow.created_at);
                let idle = Utc::now().signed_duration_since(last_change);
                workflow.steps[position].runs.is_empty()
                    && idle
                        .to_std()
                        .is_ok_and(|idle| idle >= app.settings.workflows_stalled_after)
            }
        };
        if lost {
            warn!(workflow_id = %workflow.id, task_id = %message.id, step = %workflow.steps[position].spec.name,
                "Workflow had no step in flight; published it again.");
            app.broker.publish(&message).await?;
            repaired.push(workflow.id.clone());
        }
    }
    Ok(repaired)
}

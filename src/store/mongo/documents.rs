//! The store's MongoDB documents as they are on the wire: Celery's task results
//! (`celery_taskmeta`), sca-rhythm's workflows (`workflow_meta`), this program's own `workers_*`
//! records, and the filters and updates the store sends about them.
//!
//! Python programs (Celery, sca-rhythm, rhythm_api) read and write the same documents, so their
//! field names, field order and BSON types (32- or 64-bit integers, BSON dates or date strings,
//! null or absent) live here in one place, tested against documents the Python side wrote
//! (`tests/fixtures/celery-sca-rhythm`). Whole documents are typed structs, sent through the
//! driver's own serializer; updates are built by named functions.
//!
//! Documents are read with lenient parsers rather than by deserializing the structs: a document
//! another program wrote with a field missing or of another type reads with that field's default,
//! where a struct would reject the whole document.

use std::borrow::Cow;
use std::io;

use anyhow::Context;
use chrono::{DateTime, NaiveDateTime, Utc};
use mongodb::bson::{self, Bson, Document, doc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::store::{
    FixityRecord, FixityResult, FixityStanding, JobRun, LeaseState, PageCursor, RunOutcome,
    SpaceReservation, StepSpec, TaskError, TaskMeta, TaskRun, TaskStart, TaskStatus, Trigger,
    WatchState, Workflow, WorkflowStep,
};

/// sca-rhythm's workflows (spec F.2).
pub(super) const WORKFLOWS: &str = "workflow_meta";
/// Celery's task results (spec F.3).
pub(super) const TASKS: &str = "celery_taskmeta";
/// `{_id: workflow id, args}`: the start arguments, which sca-rhythm does not keep.
pub(super) const START_ARGS: &str = "workers_workflow_args";
/// `{_id: source directory, scan_count, known}`.
pub(super) const WATCH_STATE: &str = "workers_watch_state";
/// `{_id: lease name, holder, expires_at}`.
pub(super) const LEASES: &str = "workers_leases";
/// How many times each task was started, and its claim while a run holds it (`{_id: task id,
/// starts, holder, expires_at}`): kept apart from `celery_taskmeta`, whose documents stay
/// exactly as Celery writes them.
pub(super) const TASK_STARTS: &str = "workers_task_starts";
/// `{_id: job, slot}`: the last slot handled per job.
pub(super) const JOB_SLOTS: &str = "workers_job_slots";
/// `{_id: run id, job, trigger, slot, started_at, ended_at, outcome, error, counters, host,
/// dry_run}`.
pub(super) const JOB_RUNS: &str = "workers_job_runs";
/// `{_id: sequence name, seq}`: the numeric ids of job runs.
pub(super) const COUNTERS: &str = "workers_counters";
/// `{_id: task id, revoked_at}`: task ids revoked by an operator (Celery's state db).
pub(super) const REVOKED: &str = "workers_revoked";
/// One document per fixity check of one copy: `{dataset_id, copy, checked_at, result, files,
/// bytes_read, differences, detail, by}`.
pub(super) const FIXITY_CHECKS: &str = "workers_fixity_checks";
/// `{_id: dataset id, checked_at, verified_at}`: where each dataset stands in the fixity
/// rotation, kept beside the checks so that ordering the rotation reads one small document per
/// dataset instead of grouping every check.
pub(super) const FIXITY_STANDINGS: &str = "workers_fixity_standings";
/// `{_id: file system (mount point), version, holders: [{holder, bytes, expires_at}]}`: the
/// bytes running steps hold there. One document per file system, replaced as a whole under its
/// `version`, so that checking the sum and adding a reservation is one atomic write.
pub(super) const SPACE: &str = "workers_space_reservations";

// Field names that filters, updates and parsers share (the structs below name theirs in
// `serde` attributes, which take literals only; their tests check them against these).

/// Every document's key.
const ID: &str = "_id";
/// A task result's status (`celery_taskmeta`).
const STATUS: &str = "status";
/// A task result's JSON text.
const RESULT: &str = "result";
const ARGS: &str = "args";
const KWARGS: &str = "kwargs";
/// When a task result became final: naive-UTC isoformat text, not a BSON date.
const DATE_DONE: &str = "date_done";
/// A workflow's status as sca-rhythm caches it (`workflow_meta`).
const WORKFLOW_STATUS: &str = "_status";
const CREATED_AT: &str = "created_at";
const UPDATED_AT: &str = "updated_at";
/// A BSON date while a resume is under way; null once a step started, absent before the first
/// resume.
const RESUME_LOCK: &str = "resume_lock";
const STEPS: &str = "steps";
const TASK_RUNS: &str = "task_runs";
const TASK_ID: &str = "task_id";
const DATE_START: &str = "date_start";
const NAME: &str = "name";
/// A lease's holder (`workers_leases`).
const HOLDER: &str = "holder";
const EXPIRES_AT: &str = "expires_at";
/// A job slot (`workers_job_slots`, `workers_job_runs`).
const SLOT: &str = "slot";
/// A sequence's last value (`workers_counters`).
const SEQ: &str = "seq";
/// How many times a task started (`workers_task_starts`).
const STARTS: &str = "starts";
const REVOKED_AT: &str = "revoked_at";
const SCAN_COUNT: &str = "scan_count";
const KNOWN: &str = "known";
const JOB: &str = "job";
const HOST: &str = "host";
const OUTCOME: &str = "outcome";
const ERROR: &str = "error";
const COUNTERS_FIELD: &str = "counters";
const ENDED_AT: &str = "ended_at";

// ---------------------------------------------------------------------------------------------
// Commands and indexes

/// The command that checks that the server answers.
pub(super) fn ping_command() -> Document {
    doc! {"ping": 1}
}

/// The command whose answer carries the server's clock (`localTime`).
pub(super) fn hello_command() -> Document {
    doc! {"hello": 1}
}

/// The server's clock in the answer to `hello_command`.
pub(super) fn server_time(hello: &Document) -> Option<DateTime<Utc>> {
    hello
        .get_datetime("localTime")
        .ok()
        .map(|d| chrono_date(*d))
}

/// An index the store wants on one of its collections.
pub(super) struct IndexSpec {
    pub(super) collection: &'static str,
    pub(super) keys: Document,
    /// `Some(true)` for the index Celery itself asks for with `background: true`.
    pub(super) background: Option<bool>,
}

/// The indexes of spec F.1 and those of this program's own collections.
pub(super) fn indexes() -> Vec<IndexSpec> {
    let wanted: [(&'static str, Document); 10] = [
        (TASKS, doc! {STATUS: 1}),
        (TASKS, doc! {"kwargs.app_id": 1}),
        (TASKS, doc! {"kwargs.step": 1}),
        (TASKS, doc! {DATE_DONE: 1}),
        (WORKFLOWS, doc! {WORKFLOW_STATUS: 1}),
        (WORKFLOWS, doc! {"app_id": 1}),
        // Listing (newest first) and purging (oldest first) go by creation time.
        (WORKFLOWS, doc! {CREATED_AT: 1}),
        (JOB_RUNS, doc! {JOB: 1, ID: -1}),
        (JOB_RUNS, doc! {HOST: 1, OUTCOME: 1}),
        (FIXITY_CHECKS, doc! {DATASET_ID: 1, CHECKED_AT: -1}),
    ];
    wanted
        .into_iter()
        .map(|(collection, keys)| {
            // Celery asks for its `date_done` index with `background: true` each time it
            // starts; a server may refuse that request when the same index exists without the
            // option, so the index is created exactly as Celery asks for it.
            let background = (collection == TASKS && keys.contains_key(DATE_DONE)).then_some(true);
            IndexSpec {
                collection,
                keys,
                background,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Filters, projections and sorts shared by several collections

/// The document whose `_id` is `id`.
pub(super) fn by_id(id: impl Into<Bson>) -> Document {
    doc! {ID: id.into()}
}

/// The documents whose `_id` is one of `ids`.
pub(super) fn ids_in(ids: &[String]) -> Document {
    doc! {ID: {"$in": ids}}
}

/// Every document.
pub(super) fn all() -> Document {
    Document::new()
}

// ---------------------------------------------------------------------------------------------
// celery_taskmeta: task results

/// A task state to store, with what Celery writes for it.
pub(super) struct State {
    pub(super) status: TaskStatus,
    /// The `result` field: JSON text.
    pub(super) result: String,
    pub(super) traceback: Option<String>,
    pub(super) children: Vec<Bson>,
}

impl State {
    /// SUCCESS with its result.
    pub(super) fn success(result: &Value) -> State {
        State {
            status: TaskStatus::Success,
            result: python_json(result),
            traceback: None,
            children: Vec::new(),
        }
    }

    /// STARTED, whose result names the process that runs the task.
    pub(super) fn started(start: &TaskStart) -> State {
        State {
            status: TaskStatus::Started,
            result: python_json(&StartedResult {
                pid: start.pid,
                hostname: &start.hostname,
            }),
            traceback: None,
            children: Vec::new(),
        }
    }

    /// REVOKED: the revocation as an exception, and no traceback (`mark_as_revoked` stores
    /// none).
    pub(super) fn revoked(reason: &str) -> State {
        let error = TaskError::revoked(reason);
        State {
            status: TaskStatus::Revoked,
            result: python_json(&ErrorResult::from(&error)),
            traceback: None,
            children: Vec::new(),
        }
    }

    /// RETRY or FAILURE with the exception.
    pub(super) fn error(task_id: &str, status: TaskStatus, error: &TaskError) -> State {
        // A retry is published from inside the task, so Celery records it as the request's
        // child: `[[task_id, null], null]` (an AsyncResult as a tuple).
        let children = match status {
            TaskStatus::Retry => vec![bson::bson!([[task_id, Bson::Null], Bson::Null])],
            _ => Vec::new(),
        };
        State {
            status,
            result: python_json(&ErrorResult::from(error)),
            // No Python frames to show: the exception line a traceback ends with.
            traceback: Some(format!(
                "{}.{}: {}",
                error.exc_module, error.exc_type, error.exc_message
            )),
            children,
        }
    }
}

/// What Celery copies from a task's request into its result documents (`result_extended`).
/// Kept as BSON values: a retry or a final state copies them from the document it replaces as
/// they were stored, whichever program stored them.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct RequestFields {
    parent_id: Option<Bson>,
    name: Bson,
    args: Bson,
    kwargs: Bson,
    worker: Bson,
    retries: Bson,
    queue: Bson,
}

impl Default for RequestFields {
    fn default() -> RequestFields {
        RequestFields {
            parent_id: None,
            name: Bson::Null,
            args: Bson::Array(Vec::new()),
            kwargs: Bson::Document(Document::new()),
            worker: Bson::Null,
            retries: Bson::Int32(0),
            queue: Bson::Null,
        }
    }
}

impl RequestFields {
    /// The request fields of a task this process started.
    pub(super) fn from_start(start: &TaskStart) -> RequestFields {
        RequestFields {
            parent_id: start.parent_id.clone().map(Bson::String),
            name: Bson::String(start.task_name.clone()),
            args: Bson::Array(start.args.iter().map(json_to_bson).collect()),
            kwargs: Bson::Document(json_object_to_doc(&start.kwargs)),
            worker: Bson::String(start.hostname.clone()),
            retries: Bson::Int32(to_i32(start.retries)),
            queue: Bson::String(start.queue.clone()),
        }
    }

    /// The request fields of a stored task result; Celery's defaults for those it lacks.
    pub(super) fn from_doc(doc: &Document) -> RequestFields {
        let field = |key: &str, default: Bson| doc.get(key).cloned().unwrap_or(default);
        let defaults = RequestFields::default();
        RequestFields {
            parent_id: doc
                .get("parent_id")
                .filter(|b| !matches!(b, Bson::Null))
                .cloned(),
            name: field(NAME, defaults.name),
            args: field(ARGS, defaults.args),
            kwargs: field(KWARGS, defaults.kwargs),
            worker: field("worker", defaults.worker),
            retries: field("retries", defaults.retries),
            queue: field("queue", defaults.queue),
        }
    }

    /// Sets the number of retries as Celery stores it: a 32-bit integer.
    pub(super) fn set_retries(&mut self, retries: u32) {
        self.retries = Bson::Int32(to_i32(retries));
    }

    /// The workflow of the task, when its kwargs name one.
    pub(super) fn workflow_id(&self) -> Option<String> {
        match &self.kwargs {
            Bson::Document(kwargs) => kwargs.get_str("workflow_id").ok().map(str::to_owned),
            _ => None,
        }
    }
}

/// A `celery_taskmeta` document: Celery's fields in Celery's order (spec F.3), the request
/// fields after them as `result_extended` adds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct TaskDocument {
    #[serde(rename = "_id")]
    id: String,
    status: String,
    /// JSON text, as Celery's JSON serializer writes it.
    result: String,
    traceback: Option<String>,
    children: Vec<Bson>,
    /// Naive-UTC isoformat text (`celery_date`), null until the task is done.
    date_done: Option<String>,
    /// Absent, not null, for a task nothing published from inside another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent_id: Option<Bson>,
    name: Bson,
    args: Bson,
    kwargs: Bson,
    worker: Bson,
    retries: Bson,
    queue: Bson,
}

impl TaskDocument {
    /// The document Celery stores for `state` of task `task_id` at `now`.
    pub(super) fn new(
        task_id: &str,
        state: &State,
        request: &RequestFields,
        now: DateTime<Utc>,
    ) -> TaskDocument {
        // Celery sets date_done for the ready states only.
        let date_done = state.status.is_done().then(|| celery_date(now));
        let request = request.clone();
        TaskDocument {
            id: task_id.to_owned(),
            status: state.status.as_str().to_owned(),
            result: state.result.clone(),
            traceback: state.traceback.clone(),
            children: state.children.clone(),
            date_done,
            parent_id: request.parent_id,
            name: request.name,
            args: request.args,
            kwargs: request.kwargs,
            worker: request.worker,
            retries: request.retries,
            queue: request.queue,
        }
    }
}

/// The task's result only while it is STARTED: a progress report that arrives late never
/// overwrites a final state.
pub(super) fn started_task(task_id: &str) -> Document {
    doc! {ID: task_id, STATUS: TaskStatus::Started.as_str()}
}

/// Replaces a STARTED task's result with a progress report, as sca-rhythm's `update_progress`
/// does (`update_state(state=STARTED, meta=progress)`).
pub(super) fn set_progress(progress: &Value) -> Document {
    doc! {"$set": {RESULT: python_json(progress)}}
}

/// Only the arguments of a task result (the start arguments of an sca-rhythm workflow).
pub(super) fn args_projection() -> Document {
    doc! {ARGS: 1}
}

/// The `_id` and arguments of a task result or a start-arguments document, when both are
/// there.
pub(super) fn args_of(doc: &Document) -> Option<(String, Vec<Value>)> {
    match (doc.get_str(ID), doc.get(ARGS)) {
        (Ok(id), Some(Bson::Array(items))) => {
            Some((id.to_owned(), items.iter().map(bson_to_json).collect()))
        }
        _ => None,
    }
}

/// A `celery_taskmeta` document as Celery or this store writes it; `starts` is left 0 (it is
/// kept elsewhere).
pub(super) fn parse_task_meta(doc: &Document) -> anyhow::Result<TaskMeta> {
    let task_id = doc
        .get_str(ID)
        .context("a task result whose `_id` is not a string")?
        .to_owned();
    let text = |key: &str| doc.get_str(key).ok().map(str::to_owned);
    Ok(TaskMeta {
        status: doc
            .get_str(STATUS)
            .ok()
            .and_then(TaskStatus::parse)
            .unwrap_or(TaskStatus::Pending),
        // JSON text, as Celery's JSON serializer writes it; anything else is taken as it is.
        result: match doc.get(RESULT) {
            Some(Bson::String(text)) => {
                serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
            }
            Some(Bson::Null) | None => Value::Null,
            Some(other) => bson_to_json(other),
        },
        traceback: text("traceback"),
        date_done: match doc.get(DATE_DONE) {
            Some(Bson::String(text)) => parse_celery_date(text),
            Some(Bson::DateTime(d)) => Some(chrono_date(*d)),
            _ => None,
        },
        name: text(NAME),
        args: match doc.get(ARGS) {
            Some(Bson::Array(args)) => args.iter().map(bson_to_json).collect(),
            _ => Vec::new(),
        },
        kwargs: match doc.get(KWARGS) {
            Some(Bson::Document(kwargs)) => doc_to_json_object(kwargs),
            _ => Map::new(),
        },
        worker: text("worker"),
        retries: doc
            .get("retries")
            .and_then(bson_i64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        queue: text("queue"),
        // Filled from `workers_task_starts` by `task_metas`.
        starts: 0,
        task_id,
    })
}

/// The STARTED result: `{"pid": .., "hostname": ..}`, in Celery's order.
#[derive(Serialize)]
struct StartedResult<'a> {
    pid: u32,
    hostname: &'a str,
}

/// A failure as Celery encodes an exception, in its order.
#[derive(Serialize)]
struct ErrorResult<'a> {
    exc_type: &'a str,
    exc_message: [&'a str; 1],
    exc_module: &'a str,
}

impl<'a> From<&'a TaskError> for ErrorResult<'a> {
    fn from(error: &'a TaskError) -> ErrorResult<'a> {
        ErrorResult {
            exc_type: &error.exc_type,
            exc_message: [&error.exc_message],
            exc_module: &error.exc_module,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// workers_task_starts, workers_revoked

/// Counts one more start of a task (upserted: the first start creates the document).
pub(super) fn count_start() -> Document {
    doc! {"$inc": {STARTS: 1}}
}

/// A task's document in `workers_task_starts` while its claim may be taken at `now`: never
/// taken, given back (no expiry) or lapsed by the server's clock. One condition beside `_id`,
/// not an `$or`: a MongoDB-wire server may answer `_id` with an `$or` by scanning the
/// collection (SecantusDB does: 30 ms a claim at 1,000 tasks, against 1.5 ms), and this
/// collection holds a document per task.
pub(super) fn task_claim_takeable(task_id: &str, now: DateTime<Utc>) -> Document {
    doc! {ID: task_id, EXPIRES_AT: {"$not": {"$gte": bson_date(now)}}}
}

/// Gives a task's claim to `holder` until `until` (upserted), counting a start with it when
/// `count_start`.
pub(super) fn hold_task_claim(holder: &str, until: DateTime<Utc>, count_start: bool) -> Document {
    let mut update = hold_lease(holder, until);
    if count_start {
        update.insert("$inc", doc! {STARTS: 1});
    }
    update
}

/// Gives a task's claim back, taking back the start its taking counted when `uncount`.
pub(super) fn give_back_task_claim(uncount: bool) -> Document {
    let mut update = doc! {"$unset": {HOLDER: "", EXPIRES_AT: ""}};
    if uncount {
        update.insert("$inc", doc! {STARTS: -1});
    }
    update
}

/// The task id and start count of a `workers_task_starts` document.
pub(super) fn starts_of(doc: &Document) -> Option<(&str, u32)> {
    let id = doc.get_str(ID).ok()?;
    let starts = doc.get(STARTS).and_then(bson_i64)?;
    Some((id, u32::try_from(starts).unwrap_or(u32::MAX)))
}

/// Records when a task was revoked (upserted).
pub(super) fn set_revoked_at(at: DateTime<Utc>) -> Document {
    doc! {"$set": {REVOKED_AT: bson_date(at)}}
}

/// The tasks revoked at `since` or later.
pub(super) fn revoked_since(since: DateTime<Utc>) -> Document {
    doc! {REVOKED_AT: {"$gte": bson_date(since)}}
}

/// Revocations before `cutoff`.
pub(super) fn revoked_before(cutoff: DateTime<Utc>) -> Document {
    doc! {REVOKED_AT: {"$lt": bson_date(cutoff)}}
}

/// Oldest revocation first.
pub(super) fn by_revocation_time() -> Document {
    doc! {REVOKED_AT: 1}
}

/// The task id and revocation time of a `workers_revoked` document.
pub(super) fn revoked_of(doc: &Document) -> Option<(String, DateTime<Utc>)> {
    let id = doc.get_str(ID).ok()?;
    let at = doc.get_datetime(REVOKED_AT).ok()?;
    Some((id.to_owned(), chrono_date(*at)))
}

// ---------------------------------------------------------------------------------------------
// workflow_meta: workflows and their steps

/// A `workflow_meta` document: sca-rhythm's fields in its order (spec F.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct WorkflowDocument {
    #[serde(rename = "_id")]
    id: String,
    created_at: bson::DateTime,
    steps: Vec<StepDocument>,
    name: String,
    app_id: String,
    description: Option<String>,
    #[serde(rename = "_status")]
    status: String,
    /// Absent until the first update, which appends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    updated_at: Option<bson::DateTime>,
    /// Absent until the first resume, null between resumes (`RESUME_LOCK`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    resume_lock: Option<Option<bson::DateTime>>,
}

impl WorkflowDocument {
    /// A new PENDING workflow as sca-rhythm creates one; `updated_at` comes with the first
    /// update.
    pub(super) fn new(
        id: &str,
        app_id: &str,
        name: &str,
        description: Option<&str>,
        steps: &[StepSpec],
        now: DateTime<Utc>,
    ) -> WorkflowDocument {
        WorkflowDocument {
            id: id.to_owned(),
            created_at: bson_date(now),
            steps: steps
                .iter()
                .map(|step| StepDocument::new(step, app_id))
                .collect(),
            name: name.to_owned(),
            app_id: app_id.to_owned(),
            description: description.map(str::to_owned),
            status: TaskStatus::Pending.as_str().to_owned(),
            updated_at: None,
            resume_lock: None,
        }
    }
}

/// A step of a `workflow_meta` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StepDocument {
    name: String,
    task: String,
    queue: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kwargs: Option<Document>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<i32>,
    /// Absent until the step's first task starts (`push_run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task_runs: Option<Vec<TaskRunDocument>>,
}

impl StepDocument {
    /// Like sca-rhythm's `get_wf_body`, a step without a queue gets `{app_id}.q`; `kwargs` and
    /// `priority` appear only when the definition has them.
    fn new(step: &StepSpec, app_id: &str) -> StepDocument {
        StepDocument {
            name: step.name.clone(),
            task: step.task.clone(),
            queue: step.queue.clone().unwrap_or_else(|| format!("{app_id}.q")),
            kwargs: step.kwargs.as_ref().map(json_object_to_doc),
            priority: step.priority.map(i32::from),
            task_runs: None,
        }
    }
}

/// One run of a step: the task and when it started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TaskRunDocument {
    date_start: bson::DateTime,
    task_id: String,
}

/// Deserializes a field that is there, even as null, as `Some`: with `default`, absent stays
/// `None`, so null and absent are told apart.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// Only a workflow's status.
pub(super) fn workflow_status_projection() -> Document {
    doc! {WORKFLOW_STATUS: 1}
}

/// The status of a workflow document (PENDING when it has none sca-rhythm knows).
pub(super) fn workflow_status_of(doc: &Document) -> TaskStatus {
    doc.get_str(WORKFLOW_STATUS)
        .ok()
        .and_then(TaskStatus::parse)
        .unwrap_or(TaskStatus::Pending)
}

/// The workflows that may still run: PENDING or STARTED.
pub(super) fn active_workflows() -> Document {
    doc! {WORKFLOW_STATUS: {"$in": ["PENDING", "STARTED"]}}
}

/// Newest workflow first, ties by id.
pub(super) fn newest_first() -> Document {
    doc! {CREATED_AT: -1, ID: 1}
}

/// Oldest workflow first, ties by id: the order `created_before` pages in.
pub(super) fn oldest_first() -> Document {
    doc! {CREATED_AT: 1, ID: 1}
}

/// The workflows named one of `names` created at `cutoff` or before, after `after` in
/// `oldest_first` order.
pub(super) fn created_before(
    names: &[String],
    cutoff: DateTime<Utc>,
    after: Option<&PageCursor>,
) -> Document {
    let mut filter = doc! {
        NAME: {"$in": names},
        CREATED_AT: {"$lte": bson_date(cutoff)},
    };
    if let Some(cursor) = after {
        let created_at = bson_date(cursor.created_at);
        filter.insert(
            "$or",
            vec![
                doc! {CREATED_AT: {"$gt": created_at}},
                doc! {CREATED_AT: created_at, ID: {"$gt": &cursor.id}},
            ],
        );
    }
    filter
}

/// Sets `updated_at` of a workflow, and its status when there is one, as sca-rhythm's
/// `on_success` and `on_failure` do.
pub(super) fn touch_workflow(status: Option<TaskStatus>, now: DateTime<Utc>) -> Document {
    let mut fields = Document::new();
    if let Some(status) = status {
        fields.insert(WORKFLOW_STATUS, status.as_str());
    }
    fields.insert(UPDATED_AT, bson_date(now));
    doc! {"$set": fields}
}

/// `steps.{position}`, the path of a step in a workflow document.
fn step_path(position: usize) -> String {
    format!("{STEPS}.{position}")
}

/// Workflow `workflow_id`, when its step at `position` exists and has no run of `task_id` yet.
pub(super) fn run_not_recorded(workflow_id: &str, position: usize, task_id: &str) -> Document {
    let step = step_path(position);
    doc! {
        ID: workflow_id,
        // Without this guard a position past the end would pad the array.
        format!("{step}.{NAME}"): {"$exists": true},
        format!("{step}.{TASK_RUNS}.{TASK_ID}"): {"$ne": task_id},
    }
}

/// Appends a run of `task_id` to the step at `position` and marks the workflow STARTED.
pub(super) fn push_run(position: usize, task_id: &str, now: DateTime<Utc>) -> Document {
    let now = bson_date(now);
    doc! {
        "$push": {format!("{}.{TASK_RUNS}", step_path(position)): {DATE_START: now, TASK_ID: task_id}},
        "$set": {WORKFLOW_STATUS: TaskStatus::Started.as_str(), UPDATED_AT: now},
    }
}

/// Workflow `workflow_id`, when its step at `position` exists.
pub(super) fn step_exists(workflow_id: &str, position: usize) -> Document {
    doc! {ID: workflow_id, format!("{}.{NAME}", step_path(position)): {"$exists": true}}
}

/// Marks a workflow STARTED.
pub(super) fn mark_started(now: DateTime<Utc>) -> Document {
    let now = bson_date(now);
    doc! {"$set": {WORKFLOW_STATUS: TaskStatus::Started.as_str(), UPDATED_AT: now}}
}

/// Workflow `workflow_id` while it is locked for a resume (a date, not null or absent).
pub(super) fn resume_locked(workflow_id: &str) -> Document {
    doc! {ID: workflow_id, RESUME_LOCK: {"$ne": Bson::Null}}
}

/// Clears a resume lock: null, as sca-rhythm clears it, not removed.
pub(super) fn clear_resume_lock() -> Document {
    doc! {"$set": {RESUME_LOCK: Bson::Null}}
}

/// Workflow `workflow_id` while no resume holds it (`null` also matches an absent key: never
/// resumed).
pub(super) fn not_resume_locked(workflow_id: &str) -> Document {
    doc! {ID: workflow_id, RESUME_LOCK: Bson::Null}
}

/// Locks a workflow for a resume at `now`.
pub(super) fn lock_for_resume(now: DateTime<Utc>) -> Document {
    let now = bson_date(now);
    doc! {"$set": {RESUME_LOCK: now, UPDATED_AT: now}}
}

/// A `workflow_meta` document as written by sca-rhythm or by this store; `start_args` is
/// left empty (it is kept elsewhere).
pub(super) fn parse_workflow(doc: &Document) -> anyhow::Result<Workflow> {
    let id = doc
        .get_str(ID)
        .context("a workflow whose `_id` is not a string")?
        .to_owned();
    let created_at = match doc.get(CREATED_AT) {
        Some(Bson::DateTime(d)) => chrono_date(*d),
        _ => anyhow::bail!("workflow {id}: `created_at` is not a date"),
    };
    let steps = match doc.get(STEPS) {
        Some(Bson::Array(steps)) => steps
            .iter()
            .enumerate()
            .map(|(idx, step)| match step {
                Bson::Document(step) => {
                    parse_step(step).with_context(|| format!("workflow {id}: step {idx}"))
                }
                _ => anyhow::bail!("workflow {id}: step {idx} is not a document"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        _ => anyhow::bail!("workflow {id}: `steps` is not an array"),
    };
    Ok(Workflow {
        name: doc.get_str(NAME).unwrap_or_default().to_owned(),
        app_id: doc.get_str("app_id").unwrap_or_default().to_owned(),
        description: doc.get_str("description").ok().map(str::to_owned),
        created_at,
        updated_at: doc.get_datetime(UPDATED_AT).ok().map(|d| chrono_date(*d)),
        status_cache: workflow_status_of(doc),
        // Any date locks, as sca-rhythm's truthiness test does; null or absent does not.
        resume_lock: doc.get_datetime(RESUME_LOCK).ok().map(|d| chrono_date(*d)),
        start_args: Vec::new(),
        steps,
        id,
    })
}

fn parse_step(step: &Document) -> anyhow::Result<WorkflowStep> {
    let runs = match step.get(TASK_RUNS) {
        Some(Bson::Array(runs)) => runs
            .iter()
            .filter_map(Bson::as_document)
            .map(|run| {
                Ok(TaskRun {
                    task_id: run
                        .get_str(TASK_ID)
                        .context("a task run without `task_id`")?
                        .to_owned(),
                    date_start: run
                        .get_datetime(DATE_START)
                        .map(|d| chrono_date(*d))
                        .unwrap_or_default(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    Ok(WorkflowStep {
        spec: StepSpec {
            name: step.get_str(NAME).context("no `name`")?.to_owned(),
            task: step.get_str("task").context("no `task`")?.to_owned(),
            queue: step.get_str("queue").ok().map(str::to_owned),
            kwargs: match step.get(KWARGS) {
                Some(Bson::Document(kwargs)) => Some(doc_to_json_object(kwargs)),
                _ => None,
            },
            priority: step
                .get("priority")
                .and_then(bson_i64)
                .map(|p| p.clamp(0, i64::from(u8::MAX)) as u8),
        },
        runs,
    })
}

// ---------------------------------------------------------------------------------------------
// workers_space_reservations

const VERSION: &str = "version";
const HOLDERS: &str = "holders";

/// The version and the reservations of a `workers_space_reservations` document (expired ones
/// included); a reservation with a field missing is left out.
pub(super) fn parse_space(doc: &Document) -> (i64, Vec<SpaceReservation>) {
    let version = doc.get(VERSION).and_then(bson_i64).unwrap_or(0);
    let holders = match doc.get(HOLDERS) {
        Some(Bson::Array(items)) => items
            .iter()
            .filter_map(|item| {
                let item = item.as_document()?;
                Some(SpaceReservation {
                    holder: item.get_str("holder").ok()?.to_owned(),
                    bytes: item.get("bytes").and_then(bson_i64)?.max(0) as u64,
                    expires_at: chrono_date(*item.get_datetime("expires_at").ok()?),
                })
            })
            .collect(),
        _ => Vec::new(),
    };
    (version, holders)
}

/// The whole document of `fs` at `version`.
pub(super) fn space_document(fs: &str, version: i64, holders: &[SpaceReservation]) -> Document {
    let holders: Vec<Bson> = holders
        .iter()
        .map(|r| {
            Bson::Document(doc! {
                "holder": &r.holder,
                "bytes": i64::try_from(r.bytes).unwrap_or(i64::MAX),
                "expires_at": bson_date(r.expires_at),
            })
        })
        .collect();
    doc! {ID: fs, VERSION: version, HOLDERS: holders}
}

/// The document of `fs` as it was read: a write under this filter fails to match when another
/// process changed it since.
pub(super) fn space_at_version(fs: &str, version: i64) -> Document {
    doc! {ID: fs, VERSION: version}
}

// ---------------------------------------------------------------------------------------------
// workers_fixity_checks, workers_fixity_standings

const DATASET_ID: &str = "dataset_id";
const CHECKED_AT: &str = "checked_at";
const VERIFIED_AT: &str = "verified_at";
const FAILING: &str = "failing";

/// One fixity check (`workers_fixity_checks`); the server gives it its `_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct FixityCheckDocument {
    dataset_id: i64,
    copy: String,
    checked_at: bson::DateTime,
    result: String,
    files: i64,
    bytes_read: i64,
    differences: i64,
    detail: String,
    by: String,
}

impl FixityCheckDocument {
    pub(super) fn new(check: &FixityRecord) -> FixityCheckDocument {
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        FixityCheckDocument {
            dataset_id: check.dataset_id,
            copy: check.copy.clone(),
            checked_at: bson_date(check.checked_at),
            result: check.result.as_str().to_owned(),
            files: count(check.files),
            bytes_read: count(check.bytes_read),
            differences: count(check.differences),
            detail: check.detail.clone(),
            by: check.by.clone(),
        }
    }
}

/// The checks of one dataset, for `fixity_history`.
pub(super) fn fixity_checks_of(dataset_id: i64) -> Document {
    doc! {DATASET_ID: dataset_id}
}

/// Newest check first.
pub(super) fn newest_check_first() -> Document {
    doc! {CHECKED_AT: -1}
}

/// A check as recorded; a field missing or of another type reads as its default.
pub(super) fn parse_fixity_check(doc: &Document) -> FixityRecord {
    let count = |key: &str| doc.get(key).and_then(bson_i64).unwrap_or(0).max(0) as u64;
    let text = |key: &str| doc.get_str(key).unwrap_or_default().to_owned();
    FixityRecord {
        dataset_id: doc.get(DATASET_ID).and_then(bson_i64).unwrap_or(0),
        copy: text("copy"),
        checked_at: doc
            .get_datetime(CHECKED_AT)
            .map(|d| chrono_date(*d))
            .unwrap_or_default(),
        result: FixityResult::parse(doc.get_str("result").unwrap_or_default())
            .unwrap_or(FixityResult::Error),
        files: count("files"),
        bytes_read: count("bytes_read"),
        differences: count("differences"),
        detail: text("detail"),
        by: text("by"),
    }
}

/// Moves a dataset's standing forward to `check` (`$max`: a check recorded late never moves
/// its times back) and keeps the copy's last verdict (`failing.<copy>`); an error moves
/// nothing.
pub(super) fn fixity_standing_update(check: &FixityRecord) -> Option<Document> {
    let at = bson_date(check.checked_at);
    match check.result {
        FixityResult::Error => None,
        FixityResult::NotChecked => Some(doc! {"$max": {CHECKED_AT: at}}),
        FixityResult::Intact | FixityResult::Differs => Some(doc! {
            "$max": {CHECKED_AT: at, VERIFIED_AT: at},
            "$set": {format!("{FAILING}.{}", check.copy): check.result == FixityResult::Differs},
        }),
    }
}

/// A `workers_fixity_standings` document: its dataset and standing.
pub(super) fn parse_fixity_standing(doc: &Document) -> Option<(i64, FixityStanding)> {
    let date = |key: &str| doc.get_datetime(key).ok().map(|d| chrono_date(*d));
    Some((
        doc.get(ID).and_then(bson_i64)?,
        FixityStanding {
            checked_at: date(CHECKED_AT),
            verified_at: date(VERIFIED_AT),
            failing: doc
                .get_document(FAILING)
                .is_ok_and(|copies| copies.values().any(|v| *v == Bson::Boolean(true))),
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// workers_workflow_args, workers_watch_state

/// The start arguments of a workflow (`workers_workflow_args`), which sca-rhythm does not
/// keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StartArgsDocument {
    #[serde(rename = "_id")]
    id: String,
    /// As pymongo would store them (`json_to_bson`).
    args: Vec<Bson>,
}

impl StartArgsDocument {
    pub(super) fn new(workflow_id: &str, args: &[Value]) -> StartArgsDocument {
        StartArgsDocument {
            id: workflow_id.to_owned(),
            args: args.iter().map(json_to_bson).collect(),
        }
    }
}

/// What watch knows of a source directory (`workers_watch_state`). One document per
/// directory: a BSON document holds up to 16 MiB, some hundred thousand directory names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct WatchStateDocument<'a> {
    #[serde(rename = "_id")]
    id: Cow<'a, str>,
    /// A 64-bit integer.
    scan_count: i64,
    /// Borrowed when written: the names are not copied.
    known: Vec<Cow<'a, str>>,
}

impl<'a> WatchStateDocument<'a> {
    pub(super) fn new(source_dir: &'a str, state: &'a WatchState) -> WatchStateDocument<'a> {
        WatchStateDocument {
            id: Cow::Borrowed(source_dir),
            scan_count: i64::from(state.scan_count),
            known: state
                .known
                .iter()
                .map(|name| Cow::Borrowed(name.as_str()))
                .collect(),
        }
    }
}

/// The watch state of a `workers_watch_state` document.
pub(super) fn parse_watch_state(doc: &Document) -> WatchState {
    WatchState {
        scan_count: doc
            .get(SCAN_COUNT)
            .and_then(bson_i64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        known: match doc.get(KNOWN) {
            Some(Bson::Array(names)) => names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect(),
            _ => Default::default(),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// workers_leases, workers_job_slots, workers_counters

/// Lease `name` when `holder` holds it or it expired before `now` (by the server's clock).
pub(super) fn lease_takeable(name: &str, holder: &str, now: DateTime<Utc>) -> Document {
    doc! {
        ID: name,
        "$or": [{HOLDER: holder}, {EXPIRES_AT: {"$lt": bson_date(now)}}],
    }
}

/// Gives a lease to `holder` until `until` (upserted).
pub(super) fn hold_lease(holder: &str, until: DateTime<Utc>) -> Document {
    doc! {"$set": {HOLDER: holder, EXPIRES_AT: bson_date(until)}}
}

/// The holder, expiry and start of a `workers_leases` document; the start counts only when it
/// was recorded for the current holder.
pub(super) fn parse_lease(doc: &Document) -> Option<LeaseState> {
    let holder = doc.get_str(HOLDER).ok()?.to_owned();
    let since = (doc.get_str(SINCE_HOLDER).ok() == Some(holder.as_str()))
        .then(|| doc.get_datetime(SINCE).ok().map(|d| chrono_date(*d)))
        .flatten();
    Some(LeaseState {
        holder,
        expires_at: chrono_date(*doc.get_datetime(EXPIRES_AT).ok()?),
        since,
    })
}

const SINCE: &str = "since";
const SINCE_HOLDER: &str = "since_holder";

/// Lease `name` held by `holder` whose start was recorded for another holder (or never): a
/// lease just taken over.
pub(super) fn lease_taken_anew(name: &str, holder: &str) -> Document {
    doc! {ID: name, HOLDER: holder, SINCE_HOLDER: {"$ne": holder}}
}

/// Records that `holder` took the lease at `now`.
pub(super) fn lease_since(holder: &str, now: DateTime<Utc>) -> Document {
    doc! {"$set": {SINCE_HOLDER: holder, SINCE: bson_date(now)}}
}

/// Lease `name` while `holder` holds it.
pub(super) fn lease_held(name: &str, holder: &str) -> Document {
    doc! {ID: name, HOLDER: holder}
}

/// Moves a job's last slot to `slot`, never back, whichever scheduler writes last (upserted).
pub(super) fn advance_slot(slot: DateTime<Utc>) -> Document {
    doc! {"$max": {SLOT: bson_date(slot)}}
}

/// The job and last slot of a `workers_job_slots` document.
pub(super) fn slot_of(doc: &Document) -> Option<(String, DateTime<Utc>)> {
    let job = doc.get_str(ID).ok()?;
    let slot = doc.get_datetime(SLOT).ok()?;
    Some((job.to_owned(), chrono_date(*slot)))
}

/// Advances a sequence by one (upserted: the first call creates it at 1). A 64-bit integer.
pub(super) fn increment_sequence() -> Document {
    doc! {"$inc": {SEQ: 1_i64}}
}

/// The value of a `workers_counters` document.
pub(super) fn sequence_of(doc: &Document) -> Option<i64> {
    doc.get(SEQ).and_then(bson_i64)
}

// ---------------------------------------------------------------------------------------------
// workers_job_runs

/// A run of a scheduled job (`workers_job_runs`); every field is there from the start, null
/// until known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct JobRunDocument {
    /// A 64-bit integer from `workers_counters`.
    #[serde(rename = "_id")]
    id: i64,
    job: String,
    trigger: String,
    slot: Option<bson::DateTime>,
    started_at: bson::DateTime,
    ended_at: Option<bson::DateTime>,
    outcome: String,
    error: Option<String>,
    counters: Document,
    host: String,
    dry_run: bool,
}

impl JobRunDocument {
    /// A run that starts at `now`.
    pub(super) fn running(
        id: i64,
        job: &str,
        trigger: Trigger,
        slot: Option<DateTime<Utc>>,
        host: &str,
        dry_run: bool,
        now: DateTime<Utc>,
    ) -> JobRunDocument {
        JobRunDocument {
            id,
            job: job.to_owned(),
            trigger: trigger.as_str().to_owned(),
            slot: slot.map(bson_date),
            started_at: bson_date(now),
            ended_at: None,
            outcome: RunOutcome::Running.as_str().to_owned(),
            error: None,
            counters: Document::new(),
            host: host.to_owned(),
            dry_run,
        }
    }

    /// A slot skipped at `now` for `reason`: started and ended at once.
    pub(super) fn skipped(
        id: i64,
        job: &str,
        trigger: Trigger,
        slot: DateTime<Utc>,
        host: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> JobRunDocument {
        JobRunDocument {
            id,
            job: job.to_owned(),
            trigger: trigger.as_str().to_owned(),
            slot: Some(bson_date(slot)),
            started_at: bson_date(now),
            ended_at: Some(bson_date(now)),
            outcome: RunOutcome::Skipped(String::new()).as_str().to_owned(),
            error: Some(reason.to_owned()),
            counters: Document::new(),
            host: host.to_owned(),
            dry_run: false,
        }
    }
}

/// Records the end of a run.
pub(super) fn finish_run(
    outcome: &RunOutcome,
    counters: &Map<String, Value>,
    now: DateTime<Utc>,
) -> Document {
    doc! {"$set": {
        OUTCOME: outcome.as_str(),
        ERROR: outcome.reason().map_or(Bson::Null, |r| Bson::String(r.to_owned())),
        COUNTERS_FIELD: json_object_to_doc(counters),
        ENDED_AT: bson_date(now),
    }}
}

/// The runs still running on `host`.
pub(super) fn running_on(host: &str) -> Document {
    doc! {HOST: host, OUTCOME: RunOutcome::Running.as_str()}
}

/// Closes a run as failed for `reason` (its host went away).
pub(super) fn abandon_run(reason: &str, now: DateTime<Utc>) -> Document {
    doc! {"$set": {
        OUTCOME: RunOutcome::Failed(String::new()).as_str(),
        ERROR: reason,
        ENDED_AT: bson_date(now),
    }}
}

/// The runs of `job`, or of every job.
pub(super) fn runs_of(job: Option<&str>) -> Document {
    match job {
        Some(job) => doc! {JOB: job},
        None => all(),
    }
}

/// Newest run first (ids grow).
pub(super) fn newest_run_first() -> Document {
    doc! {ID: -1}
}

/// A `workers_job_runs` document.
pub(super) fn parse_job_run(doc: &Document) -> anyhow::Result<JobRun> {
    let id = doc
        .get(ID)
        .and_then(bson_i64)
        .context("a job run whose `_id` is not a number")?;
    let date = |key: &str| doc.get_datetime(key).ok().map(|d| chrono_date(*d));
    let reason = doc.get_str(ERROR).unwrap_or_default().to_owned();
    Ok(JobRun {
        id,
        job: doc.get_str(JOB).unwrap_or_default().to_owned(),
        trigger: doc.get_str("trigger").unwrap_or_default().to_owned(),
        slot: date(SLOT),
        started_at: date("started_at").with_context(|| format!("job run {id}: no `started_at`"))?,
        ended_at: date(ENDED_AT),
        outcome: match doc.get_str(OUTCOME).unwrap_or_default() {
            "success" => RunOutcome::Success,
            "failed" => RunOutcome::Failed(reason),
            "skipped" => RunOutcome::Skipped(reason),
            _ => RunOutcome::Running,
        },
        counters: match doc.get(COUNTERS_FIELD) {
            Some(Bson::Document(counters)) => doc_to_json_object(counters),
            _ => Map::new(),
        },
        host: doc.get_str(HOST).unwrap_or_default().to_owned(),
        dry_run: doc.get_bool("dry_run").unwrap_or(false),
    })
}

// ---------------------------------------------------------------------------------------------
// Values: dates, integers, JSON

/// A BSON date (milliseconds), as pymongo stores Python datetimes.
fn bson_date(time: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(time.timestamp_millis())
}

fn chrono_date(date: bson::DateTime) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(date.timestamp_millis()).unwrap_or_default()
}

/// `date_done` as Celery writes it: `datetime.utcnow().isoformat()`, always with the six
/// fractional digits that sca-rhythm's parser (`%Y-%m-%dT%H:%M:%S.%f`) requires.
fn celery_date(time: DateTime<Utc>) -> String {
    time.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

/// Reads `date_done`; Python's isoformat leaves the fraction out when it is zero.
fn parse_celery_date(text: &str) -> Option<DateTime<Utc>> {
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|naive| naive.and_utc())
}

fn bson_i64(value: &Bson) -> Option<i64> {
    match value {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        Bson::Double(f) if f.fract() == 0.0 => Some(*f as i64),
        _ => None,
    }
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// JSON to BSON as pymongo stores Python values: integers as 32-bit when they fit, so
/// documents read the same whichever side wrote them. (`bson::to_bson` would make every
/// integer 64-bit, and `Bson::try_from` would read `$`-keys as extended JSON.)
fn json_to_bson(value: &Value) -> Bson {
    match value {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i32::try_from(i).map_or(Bson::Int64(i), Bson::Int32),
            None => Bson::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(items) => Bson::Array(items.iter().map(json_to_bson).collect()),
        Value::Object(map) => Bson::Document(json_object_to_doc(map)),
    }
}

fn json_object_to_doc(map: &Map<String, Value>) -> Document {
    map.iter()
        .map(|(k, v)| (k.clone(), json_to_bson(v)))
        .collect()
}

fn bson_to_json(value: &Bson) -> Value {
    value.clone().into_relaxed_extjson()
}

fn doc_to_json_object(doc: &Document) -> Map<String, Value> {
    doc.iter()
        .map(|(k, v)| (k.clone(), bson_to_json(v)))
        .collect()
}

/// JSON text as Python's `json.dumps` writes it by default, which is how Celery encodes
/// `result`: `", "` and `": "` between items, and every character outside printable ASCII
/// escaped as `\uXXXX`.
fn python_json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    // Values built from JSON and plain structs always serialize.
    if value.serialize(&mut serializer).is_err() {
        return "null".to_owned();
    }
    String::from_utf8(out).unwrap_or_else(|_| "null".to_owned())
}

struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    /// Fragments are the parts of a string that need no JSON escape; Python's `ensure_ascii`
    /// escapes DEL and everything beyond ASCII too (as UTF-16 units).
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (idx, ch) in fragment.char_indices() {
            if u32::from(ch) >= 0x7f {
                writer.write_all(&fragment.as_bytes()[start..idx])?;
                let mut units = [0u16; 2];
                for unit in ch.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04x}")?;
                }
                start = idx + ch.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use mongodb::bson::RawDocumentBuf;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;

    /// The bytes the driver sends for a document (it serializes every document, typed or not,
    /// to raw BSON): equal bytes are equal field names, order, types and values.
    fn wire(doc: &Document) -> Vec<u8> {
        RawDocumentBuf::from_document(doc)
            .expect("a document serializes")
            .into_bytes()
    }

    fn wire_of<T: Serialize>(value: &T) -> Vec<u8> {
        bson::to_raw_document_buf(value)
            .expect("a document serializes")
            .into_bytes()
    }

    fn assert_same_wire(name: &str, ours: &Document, expected: &Document) {
        assert_eq!(wire(ours), wire(expected), "{name}: {ours} != {expected}");
    }

    fn time(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("an RFC 3339 time")
            .with_timezone(&Utc)
    }

    /// A fixture as it is in the database (the fixtures' README): the shown dates become BSON
    /// dates (`celery_taskmeta.date_done` stays text), integers are 32-bit as pymongo stores
    /// them; key order is kept.
    fn stored(json: &str) -> Document {
        fn walk(value: Bson) -> Bson {
            match value {
                Bson::String(text) => {
                    match NaiveDateTime::parse_from_str(&text, "%Y-%m-%d %H:%M:%S%.6f") {
                        Ok(naive) if text.len() == 26 => Bson::DateTime(bson_date(naive.and_utc())),
                        _ => Bson::String(text),
                    }
                }
                Bson::Int64(n) => i32::try_from(n).map_or(Bson::Int64(n), Bson::Int32),
                Bson::Array(items) => Bson::Array(items.into_iter().map(walk).collect()),
                Bson::Document(doc) => {
                    Bson::Document(doc.into_iter().map(|(k, v)| (k, walk(v))).collect())
                }
                other => other,
            }
        }
        let doc: Document = serde_json::from_str(json).expect("a fixture is a JSON object");
        doc.into_iter().map(|(k, v)| (k, walk(v))).collect()
    }

    /// A captured document reads into `T` and writes back as the same bytes.
    fn assert_round_trip<T: Serialize + DeserializeOwned>(name: &str, json: &str) -> T {
        let doc = stored(json);
        let typed: T = bson::from_document(doc.clone())
            .unwrap_or_else(|e| panic!("{name} does not read as its struct: {e}"));
        assert_eq!(
            wire_of(&typed),
            wire(&doc),
            "{name} does not write back the same"
        );
        typed
    }

    const TASK_FIXTURES: [(&str, &str); 5] = [
        (
            "celery_taskmeta_success_step1.json",
            include_str!(
                "../../../tests/fixtures/celery-sca-rhythm/celery_taskmeta_success_step1.json"
            ),
        ),
        (
            "celery_taskmeta_success_step2.json",
            include_str!(
                "../../../tests/fixtures/celery-sca-rhythm/celery_taskmeta_success_step2.json"
            ),
        ),
        (
            "celery_taskmeta_started_progress.json",
            include_str!(
                "../../../tests/fixtures/celery-sca-rhythm/celery_taskmeta_started_progress.json"
            ),
        ),
        (
            "celery_taskmeta_retry.json",
            include_str!("../../../tests/fixtures/celery-sca-rhythm/celery_taskmeta_retry.json"),
        ),
        (
            "celery_taskmeta_failure.json",
            include_str!("../../../tests/fixtures/celery-sca-rhythm/celery_taskmeta_failure.json"),
        ),
    ];

    const WORKFLOW_FIXTURES: [(&str, &str); 2] = [
        (
            "workflow_meta_success.json",
            include_str!("../../../tests/fixtures/celery-sca-rhythm/workflow_meta_success.json"),
        ),
        (
            "workflow_meta_failure.json",
            include_str!("../../../tests/fixtures/celery-sca-rhythm/workflow_meta_failure.json"),
        ),
    ];

    #[test]
    fn captured_task_results_read_and_write_back_unchanged() {
        for (name, json) in TASK_FIXTURES {
            let task: TaskDocument = assert_round_trip(name, json);
            // The field names the filters and parsers use are the struct's.
            let doc = stored(json);
            assert_eq!(doc.get_str(ID).ok(), Some(task.id.as_str()));
            assert_eq!(doc.get_str(STATUS).ok(), Some(task.status.as_str()));
            assert_eq!(doc.get_str(RESULT).ok(), Some(task.result.as_str()));
            assert_eq!(doc.get(ARGS), Some(&task.args));
            assert_eq!(doc.get(KWARGS), Some(&task.kwargs));
            assert_eq!(doc.get_str(DATE_DONE).ok(), task.date_done.as_deref());
            assert_eq!(
                RequestFields::from_doc(&doc).workflow_id().as_deref(),
                task.kwargs
                    .as_document()
                    .and_then(|k| k.get_str("workflow_id").ok())
            );
        }
    }

    #[test]
    fn captured_workflows_read_and_write_back_unchanged() {
        for (name, json) in WORKFLOW_FIXTURES {
            let workflow: WorkflowDocument = assert_round_trip(name, json);
            let doc = stored(json);
            assert_eq!(
                doc.get_str(WORKFLOW_STATUS).ok(),
                Some(workflow.status.as_str())
            );
            assert_eq!(
                doc.get_datetime(CREATED_AT).ok(),
                Some(&workflow.created_at)
            );
            assert_eq!(
                doc.get_datetime(UPDATED_AT).ok(),
                workflow.updated_at.as_ref()
            );
            let parsed = parse_workflow(&doc).expect("a captured workflow parses");
            assert_eq!(parsed.steps.len(), workflow.steps.len());
            for (step, typed) in parsed.steps.iter().zip(&workflow.steps) {
                let runs: Vec<&str> = step.runs.iter().map(|r| r.task_id.as_str()).collect();
                let typed_runs: Vec<&str> = typed
                    .task_runs
                    .iter()
                    .flatten()
                    .map(|r| r.task_id.as_str())
                    .collect();
                assert_eq!(runs, typed_runs, "{name}");
            }
        }
    }

    #[test]
    fn resume_locks_keep_null_apart_from_absent() {
        let base = stored(WORKFLOW_FIXTURES[0].1);
        for lock in [
            Some(Bson::Null),
            Some(Bson::DateTime(bson::DateTime::from_millis(1_000))),
            None,
        ] {
            let mut doc = base.clone();
            if let Some(lock) = &lock {
                doc.insert(RESUME_LOCK, lock.clone());
            }
            let typed: WorkflowDocument = bson::from_document(doc.clone()).expect("reads");
            assert_eq!(wire_of(&typed), wire(&doc), "resume_lock {lock:?}");
        }
    }

    fn start(parent_id: Option<&str>) -> TaskStart {
        TaskStart {
            workflow_id: Some("wf-1".into()),
            position: 1,
            task_id: "task-1".into(),
            task_name: "inspect".into(),
            args: vec![json!(4242), json!(1_i64 << 40), json!("é")],
            kwargs: object(json!({"workflow_id": "wf-1", "step": "inspect", "app_id": "app"})),
            hostname: "w@h".into(),
            pid: 12,
            retries: 3,
            queue: "app.q".into(),
            parent_id: parent_id.map(str::to_owned),
            resume_locked: false,
            start_counted: false,
        }
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    /// How the store built a task result document before it had `TaskDocument` (the same
    /// expression, with the clock passed in).
    fn inline_task_document(
        task_id: &str,
        state: &State,
        request: &RequestFields,
        now: DateTime<Utc>,
    ) -> Document {
        let date_done = if state.status.is_done() {
            Bson::String(celery_date(now))
        } else {
            Bson::Null
        };
        let mut doc = doc! {
            "_id": task_id,
            "status": state.status.as_str(),
            "result": &state.result,
            "traceback": state.traceback.clone().map_or(Bson::Null, Bson::String),
            "children": Bson::Array(state.children.clone()),
            "date_done": date_done,
        };
        if let Some(parent_id) = &request.parent_id {
            doc.insert("parent_id", parent_id.clone());
        }
        doc.insert("name", request.name.clone());
        doc.insert("args", request.args.clone());
        doc.insert("kwargs", request.kwargs.clone());
        doc.insert("worker", request.worker.clone());
        doc.insert("retries", request.retries.clone());
        doc.insert("queue", request.queue.clone());
        doc
    }

    #[test]
    fn task_documents_are_those_the_inline_code_wrote() {
        let now = time("2026-11-28T19:35:39.216688Z");
        let error = TaskError {
            exc_type: "Boom".into(),
            exc_message: "dataset 11 is broken".into(),
            exc_module: "noop_tasks".into(),
        };
        let failure = stored(TASK_FIXTURES[4].1);
        let mut retried = RequestFields::from_doc(&failure);
        retried.set_retries(2);
        let requests = [
            RequestFields::from_start(&start(None)),
            RequestFields::from_start(&start(Some("task-0"))),
            RequestFields::from_doc(&failure),
            retried,
            RequestFields::default(),
        ];
        let states = [
            State::started(&start(None)),
            State::success(&json!([4242])),
            State::error("task-1", TaskStatus::Retry, &error),
            State::error("task-1", TaskStatus::Failure, &error),
            State::revoked("terminated"),
        ];
        for request in &requests {
            for state in &states {
                let ours = TaskDocument::new("task-1", state, request, now);
                let inline = inline_task_document("task-1", state, request, now);
                assert_eq!(wire_of(&ours), wire(&inline), "{inline}");
            }
        }
        // The states' fields as the inline code set them.
        assert_eq!(
            states[2].children,
            vec![Bson::Array(vec![
                Bson::Array(vec![Bson::String("task-1".into()), Bson::Null]),
                Bson::Null
            ])]
        );
        assert_eq!(
            states[2].traceback.as_deref(),
            Some("noop_tasks.Boom: dataset 11 is broken")
        );
        assert_eq!(states[3].children, Vec::<Bson>::new());
        assert_eq!(states[4].traceback, None);
        assert_eq!(
            states[4].result,
            python_json(&ErrorResult::from(&TaskError::revoked("terminated")))
        );
        assert_eq!(states[0].result, r#"{"pid": 12, "hostname": "w@h"}"#);
        assert_eq!(
            RequestFields::from_doc(&failure).retries,
            Bson::Int32(1),
            "the stored type is kept"
        );
        assert_eq!(requests[3].retries, Bson::Int32(2));
        assert_eq!(
            RequestFields::from_doc(&failure).workflow_id().as_deref(),
            Some("4e128441-2744-4266-bd43-965b95ce6e22")
        );
    }

    #[test]
    fn captured_failure_is_what_the_store_writes_for_it() {
        // Celery's FAILURE document, written again from its STARTED request fields: only the
        // traceback (Python frames) and the time differ.
        let failure = stored(TASK_FIXTURES[4].1);
        let error = TaskError {
            exc_type: "Boom".into(),
            exc_message: "dataset 11 is broken".into(),
            exc_module: "noop_tasks".into(),
        };
        let state = State::error(
            "b34772b9-1b49-4cac-bdff-770c5e33393a",
            TaskStatus::Failure,
            &error,
        );
        let mut ours = TaskDocument::new(
            "b34772b9-1b49-4cac-bdff-770c5e33393a",
            &state,
            &RequestFields::from_doc(&failure),
            time("2026-11-28T19:35:39.216688Z"),
        );
        ours.traceback = Some("<python traceback text>".into());
        assert_eq!(wire_of(&ours), wire(&failure));
    }

    fn step(
        name: &str,
        queue: Option<&str>,
        kwargs: Option<Value>,
        priority: Option<u8>,
    ) -> StepSpec {
        StepSpec {
            name: name.into(),
            task: "noop".into(),
            queue: queue.map(str::to_owned),
            kwargs: kwargs.map(object),
            priority,
        }
    }

    #[test]
    fn workflow_documents_are_those_the_inline_code_wrote() {
        let now = time("2026-11-28T19:35:05.418Z");
        let steps = [
            step("first", None, None, None),
            step(
                "second",
                Some("other.q"),
                Some(json!({"a": 1, "b": [1, 2.5]})),
                Some(7),
            ),
        ];
        // The inline step document and workflow document.
        let inline_step = |step: &StepSpec, app_id: &str| {
            let queue = step.queue.clone().unwrap_or_else(|| format!("{app_id}.q"));
            let mut doc = doc! {"name": &step.name, "task": &step.task, "queue": queue};
            if let Some(kwargs) = &step.kwargs {
                doc.insert("kwargs", json_object_to_doc(kwargs));
            }
            if let Some(priority) = step.priority {
                doc.insert("priority", i32::from(priority));
            }
            doc
        };
        for description in [None, Some("a description")] {
            let inline = doc! {
                "_id": "wf-1",
                "created_at": bson_date(now),
                "steps": steps.iter().map(|s| inline_step(s, "app")).collect::<Vec<_>>(),
                "name": "bars",
                "app_id": "app",
                "description": description.map_or(Bson::Null, |d: &str| Bson::String(d.into())),
                "_status": TaskStatus::Pending.as_str(),
            };
            let ours = WorkflowDocument::new("wf-1", "app", "bars", description, &steps, now);
            assert_eq!(wire_of(&ours), wire(&inline));
        }
        // The start arguments, integers as pymongo stores them.
        let args = [json!(7), json!(1_i64 << 40), json!({"x": null})];
        let inline =
            doc! {"_id": "wf-1", "args": args.iter().map(json_to_bson).collect::<Vec<_>>()};
        assert_eq!(
            wire_of(&StartArgsDocument::new("wf-1", &args)),
            wire(&inline)
        );
    }

    #[test]
    fn workers_records_are_those_the_inline_code_wrote() {
        let now = time("2026-03-01T02:03:04.567Z");
        let slot = time("2026-03-01T02:00:00Z");
        // A job run as it starts, with and without a slot.
        for slot in [None, Some(slot)] {
            let inline = doc! {
                "_id": 42_i64,
                "job": "watch",
                "trigger": Trigger::Schedule.as_str(),
                "slot": slot.map_or(Bson::Null, |s| Bson::DateTime(bson_date(s))),
                "started_at": bson_date(now),
                "ended_at": Bson::Null,
                "outcome": RunOutcome::Running.as_str(),
                "error": Bson::Null,
                "counters": Document::new(),
                "host": "h1",
                "dry_run": true,
            };
            let ours =
                JobRunDocument::running(42, "watch", Trigger::Schedule, slot, "h1", true, now);
            assert_eq!(wire_of(&ours), wire(&inline));
        }
        // A skipped slot.
        let inline = doc! {
            "_id": 43_i64,
            "job": "watch",
            "trigger": Trigger::Misfire.as_str(),
            "slot": bson_date(slot),
            "started_at": bson_date(now),
            "ended_at": bson_date(now),
            "outcome": RunOutcome::Skipped(String::new()).as_str(),
            "error": "still running",
            "counters": Document::new(),
            "host": "h1",
            "dry_run": false,
        };
        let ours = JobRunDocument::skipped(
            43,
            "watch",
            Trigger::Misfire,
            slot,
            "h1",
            "still running",
            now,
        );
        assert_eq!(wire_of(&ours), wire(&inline));
        // Both read back as they were.
        let run = parse_job_run(&bson::to_document(&ours).expect("a document")).expect("parses");
        assert_eq!(run.outcome, RunOutcome::Skipped("still running".into()));
        assert_eq!(run.ended_at, Some(now));
        // The watch state.
        let state = WatchState {
            scan_count: 3,
            known: BTreeSet::from(["a".to_owned(), "b".to_owned()]),
        };
        let known: Vec<&str> = state.known.iter().map(String::as_str).collect();
        let inline =
            doc! {"_id": "/src", "scan_count": i64::from(state.scan_count), "known": known};
        let ours = WatchStateDocument::new("/src", &state);
        assert_eq!(wire_of(&ours), wire(&inline));
        assert_eq!(parse_watch_state(&inline), state);
        let read: WatchStateDocument<'_> = bson::from_document(inline.clone()).expect("reads");
        assert_eq!(read, ours);
    }

    #[test]
    fn updates_and_filters_are_those_the_inline_code_sent() {
        let now = time("2026-03-01T02:03:04.567Z");
        let then = time("2026-02-01T00:00:00Z");
        let (workflow_id, task_id, position) = ("wf-1", "task-1", 2);
        let step = format!("steps.{position}");
        let names = vec!["a".to_owned(), "b".to_owned()];
        let cursor = PageCursor {
            created_at: then,
            id: "wf-0".into(),
        };
        let counters = object(json!({"registered": 3, "big": 1_i64 << 40}));
        let inline_created_before = |after: Option<&PageCursor>| {
            let mut filter = doc! {
                "name": {"$in": &names},
                "created_at": {"$lte": bson_date(now)},
            };
            if let Some(cursor) = after {
                let created_at = bson_date(cursor.created_at);
                filter.insert(
                    "$or",
                    vec![
                        doc! {"created_at": {"$gt": created_at}},
                        doc! {"created_at": created_at, "_id": {"$gt": &cursor.id}},
                    ],
                );
            }
            filter
        };
        let inline_touch = |mut fields: Document| {
            fields.insert("updated_at", bson_date(now));
            doc! {"$set": fields}
        };
        let cases: Vec<(&str, Document, Document)> = vec![
            ("ping_command", ping_command(), doc! {"ping": 1}),
            ("hello_command", hello_command(), doc! {"hello": 1}),
            ("by_id str", by_id(task_id), doc! {"_id": task_id}),
            ("by_id String", by_id(&cursor.id), doc! {"_id": &cursor.id}),
            ("by_id i64", by_id(42_i64), doc! {"_id": 42_i64}),
            (
                "ids_in",
                ids_in(&names),
                doc! {"_id": {"$in": names.as_slice()}},
            ),
            ("all", all(), doc! {}),
            (
                "started_task",
                started_task(task_id),
                doc! {"_id": task_id, "status": TaskStatus::Started.as_str()},
            ),
            (
                "set_progress",
                set_progress(&json!({"done": 50.0, "name": "é"})),
                doc! {"$set": {"result": python_json(&json!({"done": 50.0, "name": "é"}))}},
            ),
            ("args_projection", args_projection(), doc! {"args": 1}),
            ("count_start", count_start(), doc! {"$inc": {"starts": 1}}),
            (
                "task_claim_takeable",
                task_claim_takeable(task_id, now),
                doc! {"_id": task_id, "expires_at": {"$not": {"$gte": bson_date(now)}}},
            ),
            (
                "hold_task_claim counting",
                hold_task_claim("h1", now, true),
                doc! {"$set": {"holder": "h1", "expires_at": bson_date(now)}, "$inc": {"starts": 1}},
            ),
            (
                "hold_task_claim renewing",
                hold_task_claim("h1", now, false),
                doc! {"$set": {"holder": "h1", "expires_at": bson_date(now)}},
            ),
            (
                "give_back_task_claim",
                give_back_task_claim(false),
                doc! {"$unset": {"holder": "", "expires_at": ""}},
            ),
            (
                "give_back_task_claim uncounting",
                give_back_task_claim(true),
                doc! {"$unset": {"holder": "", "expires_at": ""}, "$inc": {"starts": -1}},
            ),
            (
                "set_revoked_at",
                set_revoked_at(now),
                doc! {"$set": {"revoked_at": bson_date(now)}},
            ),
            (
                "revoked_since",
                revoked_since(then),
                doc! {"revoked_at": {"$gte": bson_date(then)}},
            ),
            (
                "by_revocation_time",
                by_revocation_time(),
                doc! {"revoked_at": 1},
            ),
            (
                "workflow_status_projection",
                workflow_status_projection(),
                doc! {"_status": 1},
            ),
            (
                "active_workflows",
                active_workflows(),
                doc! {"_status": {"$in": ["PENDING", "STARTED"]}},
            ),
            (
                "newest_first",
                newest_first(),
                doc! {"created_at": -1, "_id": 1},
            ),
            (
                "oldest_first",
                oldest_first(),
                doc! {"created_at": 1, "_id": 1},
            ),
            (
                "created_before first page",
                created_before(&names, now, None),
                inline_created_before(None),
            ),
            (
                "created_before next page",
                created_before(&names, now, Some(&cursor)),
                inline_created_before(Some(&cursor)),
            ),
            (
                "touch_workflow",
                touch_workflow(None, now),
                inline_touch(Document::new()),
            ),
            (
                "touch_workflow with a status",
                touch_workflow(Some(TaskStatus::Failure), now),
                inline_touch(doc! {"_status": TaskStatus::Failure.as_str()}),
            ),
            (
                "run_not_recorded",
                run_not_recorded(workflow_id, position, task_id),
                doc! {
                    "_id": workflow_id,
                    format!("{step}.name"): {"$exists": true},
                    format!("{step}.task_runs.task_id"): {"$ne": task_id},
                },
            ),
            (
                "push_run",
                push_run(position, task_id, now),
                doc! {
                    "$push": {format!("{step}.task_runs"): {"date_start": bson_date(now), "task_id": task_id}},
                    "$set": {"_status": TaskStatus::Started.as_str(), "updated_at": bson_date(now)},
                },
            ),
            (
                "step_exists",
                step_exists(workflow_id, position),
                doc! {"_id": workflow_id, format!("{step}.name"): {"$exists": true}},
            ),
            (
                "mark_started",
                mark_started(now),
                doc! {"$set": {"_status": TaskStatus::Started.as_str(), "updated_at": bson_date(now)}},
            ),
            (
                "resume_locked",
                resume_locked(workflow_id),
                doc! {"_id": workflow_id, "resume_lock": {"$ne": Bson::Null}},
            ),
            (
                "clear_resume_lock",
                clear_resume_lock(),
                doc! {"$set": {"resume_lock": Bson::Null}},
            ),
            (
                "not_resume_locked",
                not_resume_locked(workflow_id),
                doc! {"_id": workflow_id, "resume_lock": Bson::Null},
            ),
            (
                "lock_for_resume",
                lock_for_resume(now),
                doc! {"$set": {"resume_lock": bson_date(now), "updated_at": bson_date(now)}},
            ),
            (
                "lease_takeable",
                lease_takeable("scheduler", "h1", now),
                doc! {
                    "_id": "scheduler",
                    "$or": [{"holder": "h1"}, {"expires_at": {"$lt": bson_date(now)}}],
                },
            ),
            (
                "hold_lease",
                hold_lease("h1", now),
                doc! {"$set": {"holder": "h1", "expires_at": bson_date(now)}},
            ),
            (
                "lease_held",
                lease_held("scheduler", "h1"),
                doc! {"_id": "scheduler", "holder": "h1"},
            ),
            (
                "advance_slot",
                advance_slot(then),
                doc! {"$max": {"slot": bson_date(then)}},
            ),
            (
                "increment_sequence",
                increment_sequence(),
                doc! {"$inc": {"seq": 1_i64}},
            ),
            (
                "finish_run success",
                finish_run(&RunOutcome::Success, &counters, now),
                doc! {"$set": {
                    "outcome": RunOutcome::Success.as_str(),
                    "error": Bson::Null,
                    "counters": json_object_to_doc(&counters),
                    "ended_at": bson_date(now),
                }},
            ),
            (
                "finish_run failed",
                finish_run(&RunOutcome::Failed("boom".into()), &Map::new(), now),
                doc! {"$set": {
                    "outcome": "failed",
                    "error": "boom",
                    "counters": Document::new(),
                    "ended_at": bson_date(now),
                }},
            ),
            (
                "running_on",
                running_on("h1"),
                doc! {"host": "h1", "outcome": RunOutcome::Running.as_str()},
            ),
            (
                "abandon_run",
                abandon_run("host restarted", now),
                doc! {"$set": {
                    "outcome": RunOutcome::Failed(String::new()).as_str(),
                    "error": "host restarted",
                    "ended_at": bson_date(now),
                }},
            ),
            (
                "runs_of a job",
                runs_of(Some("watch")),
                doc! {"job": "watch"},
            ),
            ("runs_of every job", runs_of(None), doc! {}),
            ("newest_run_first", newest_run_first(), doc! {"_id": -1}),
        ];
        for (name, ours, inline) in &cases {
            assert_same_wire(name, ours, inline);
        }
    }

    #[test]
    fn indexes_are_those_the_inline_code_created() {
        let inline: [(&str, Document); 10] = [
            (TASKS, doc! {"status": 1}),
            (TASKS, doc! {"kwargs.app_id": 1}),
            (TASKS, doc! {"kwargs.step": 1}),
            (TASKS, doc! {"date_done": 1}),
            (WORKFLOWS, doc! {"_status": 1}),
            (WORKFLOWS, doc! {"app_id": 1}),
            (WORKFLOWS, doc! {"created_at": 1}),
            (JOB_RUNS, doc! {"job": 1, "_id": -1}),
            (JOB_RUNS, doc! {"host": 1, "outcome": 1}),
            (FIXITY_CHECKS, doc! {"dataset_id": 1, "checked_at": -1}),
        ];
        let ours = indexes();
        assert_eq!(ours.len(), inline.len());
        for (index, (collection, keys)) in ours.iter().zip(&inline) {
            assert_eq!(index.collection, *collection);
            assert_same_wire(collection, &index.keys, keys);
            let background =
                (*collection == TASKS && keys.contains_key("date_done")).then_some(true);
            assert_eq!(index.background, background, "{keys}");
        }
        assert_eq!(
            ours.iter().filter(|i| i.background.is_some()).count(),
            1,
            "only Celery's date_done index"
        );
    }

    #[test]
    fn fixity_checks_round_trip_and_standings_move_forward_only() {
        let check = FixityRecord {
            dataset_id: 42,
            copy: "archive".into(),
            checked_at: time("2026-12-01T02:00:00.123Z"),
            result: FixityResult::Differs,
            files: 1,
            bytes_read: 3_000_000_000,
            differences: 1,
            detail: "`a.tar`: MD5 x, the record says y".into(),
            by: "fixity".into(),
        };
        let doc = bson::to_document(&FixityCheckDocument::new(&check)).unwrap();
        assert_eq!(doc.get("bytes_read"), Some(&Bson::Int64(3_000_000_000)));
        assert!(matches!(doc.get("checked_at"), Some(Bson::DateTime(_))));
        assert_eq!(parse_fixity_check(&doc), check);

        let update = fixity_standing_update(&check).unwrap();
        assert_eq!(
            update,
            doc! {
                "$max": {"checked_at": bson_date(check.checked_at), "verified_at": bson_date(check.checked_at)},
                "$set": {"failing.archive": true},
            }
        );
        let not_checked = FixityRecord {
            result: FixityResult::NotChecked,
            ..check.clone()
        };
        assert_eq!(
            fixity_standing_update(&not_checked),
            Some(doc! {"$max": {"checked_at": bson_date(check.checked_at)}})
        );
        let error = FixityRecord {
            result: FixityResult::Error,
            ..check.clone()
        };
        assert_eq!(fixity_standing_update(&error), None);
        let standing = doc! {
            "_id": 42_i64,
            "checked_at": bson_date(check.checked_at),
            "failing": {"archive": false, "staged": true},
        };
        assert_eq!(
            parse_fixity_standing(&standing),
            Some((
                42,
                FixityStanding {
                    checked_at: Some(check.checked_at),
                    verified_at: None,
                    failing: true
                }
            ))
        );
    }

    #[test]
    fn small_records_read_as_before() {
        let now = time("2026-03-01T02:03:04.567Z");
        let hello = doc! {"isWritablePrimary": true, "localTime": bson_date(now)};
        assert_eq!(server_time(&hello), Some(now));
        assert_eq!(server_time(&doc! {"ok": 1}), None);
        assert_eq!(starts_of(&doc! {"_id": "t", "starts": 2}), Some(("t", 2)));
        assert_eq!(starts_of(&doc! {"_id": "t"}), None);
        assert_eq!(
            revoked_of(&doc! {"_id": "t", "revoked_at": bson_date(now)}),
            Some(("t".to_owned(), now))
        );
        assert_eq!(
            slot_of(&doc! {"_id": "watch", "slot": bson_date(now)}),
            Some(("watch".to_owned(), now))
        );
        assert_eq!(sequence_of(&doc! {"_id": "x", "seq": 5_i64}), Some(5));
        assert_eq!(
            args_of(&doc! {"_id": "t", "args": [1, "a"]}),
            Some(("t".to_owned(), vec![json!(1), json!("a")]))
        );
        assert_eq!(args_of(&doc! {"_id": "t"}), None);
        assert_eq!(
            workflow_status_of(&doc! {"_status": "FAILURE"}),
            TaskStatus::Failure
        );
        assert_eq!(workflow_status_of(&doc! {}), TaskStatus::Pending);
    }

    #[test]
    fn results_are_written_as_python_writes_them() {
        assert_eq!(python_json(&json!([4242])), "[4242]");
        let error = TaskError {
            exc_type: "Boom".into(),
            exc_message: "dataset 11 is broken".into(),
            exc_module: "noop_tasks".into(),
        };
        // Byte for byte what Celery stored (fixtures/celery_taskmeta_failure.json).
        assert_eq!(
            python_json(&ErrorResult::from(&error)),
            r#"{"exc_type": "Boom", "exc_message": ["dataset 11 is broken"], "exc_module": "noop_tasks"}"#
        );
        assert_eq!(
            python_json(&StartedResult {
                pid: 12,
                hostname: "w@h"
            }),
            r#"{"pid": 12, "hostname": "w@h"}"#
        );
        // json.dumps("é\u{7f}😀\n\"") == '"\\u00e9\\u007f\\ud83d\\ude00\\n\\""'
        assert_eq!(
            python_json(&json!("é\u{7f}😀\n\"")),
            r#""\u00e9\u007f\ud83d\ude00\n\"""#
        );
        assert_eq!(
            python_json(&json!({"a": {"b": [1, 2.5, null]}})),
            r#"{"a": {"b": [1, 2.5, null]}}"#
        );
    }

    #[test]
    fn dates_done_round_trip_in_celery_form() {
        let time = time("2026-11-28T19:35:39.216688Z");
        assert_eq!(celery_date(time), "2026-11-28T19:35:39.216688");
        assert_eq!(parse_celery_date("2026-11-28T19:35:39.216688"), Some(time));
        // A whole second: Python's isoformat drops the fraction, this store never does.
        let whole = DateTime::parse_from_rfc3339("2026-11-28T19:35:39Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(celery_date(whole), "2026-11-28T19:35:39.000000");
        assert_eq!(parse_celery_date("2026-11-28T19:35:39"), Some(whole));
        assert_eq!(parse_celery_date("yesterday"), None);
    }

    #[test]
    fn integers_are_stored_as_pymongo_stores_them() {
        assert_eq!(json_to_bson(&json!(7)), Bson::Int32(7));
        assert_eq!(json_to_bson(&json!(1_i64 << 40)), Bson::Int64(1 << 40));
        assert_eq!(json_to_bson(&json!(0.5)), Bson::Double(0.5));
        assert_eq!(
            json_to_bson(&json!({"$set": 1})),
            Bson::Document(doc! {"$set": 1})
        );
        assert_eq!(
            bson_to_json(&json_to_bson(&json!([1, "a", {"b": null}]))),
            json!([1, "a", {"b": null}])
        );
    }
}

//! The workflow store in MongoDB: the very `workflow_meta` and `celery_taskmeta` documents that
//! sca-rhythm and Celery write (spec F.1-F.3), so Python workers, rhythm_api and the Bioloop UI
//! read and write the same workflows as this program.
//!
//! Every write to a workflow is one targeted atomic update (a `$push` guarded on the task id,
//! `$set` of the status), never sca-rhythm's read-modify-write of the whole document, which
//! loses concurrent writes; task results are replaced whole on each state change, as Celery
//! replaces them. What sca-rhythm has no place for lives in collections of this program, all named
//! `workers_*`: the start arguments of workflows, the scheduler's records and the watch state.

use std::collections::HashMap;
use std::io;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use futures_util::TryStreamExt;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, Database, IndexModel};
use serde::Serialize;
use serde_json::{Map, Value};

use super::{
    JobRun, PageCursor, RunOutcome, SchedulerStore, StepSpec, TaskError, TaskMeta, TaskRun,
    TaskStart, TaskStatus, Trigger, WatchState, Workflow, WorkflowFilter, WorkflowSpec,
    WorkflowStep, WorkflowStore,
};

/// sca-rhythm's workflows (spec F.2).
const WORKFLOWS: &str = "workflow_meta";
/// Celery's task results (spec F.3).
const TASKS: &str = "celery_taskmeta";
/// `{_id: workflow id, args}`: the start arguments, which sca-rhythm does not keep.
const START_ARGS: &str = "workers_workflow_args";
/// `{_id: source directory, scan_count, known}`.
const WATCH_STATE: &str = "workers_watch_state";
/// `{_id: lease name, holder, expires_at}`.
const LEASES: &str = "workers_leases";
/// How many times each task was started (`{_id: task id, starts}`): kept apart from
/// `celery_taskmeta`, whose documents stay exactly as Celery writes them.
const TASK_STARTS: &str = "workers_task_starts";
/// `{_id: job, slot}`: the last slot handled per job.
const JOB_SLOTS: &str = "workers_job_slots";
/// `{_id: run id, job, trigger, slot, started_at, ended_at, outcome, error, counters, host,
/// dry_run}`.
const JOB_RUNS: &str = "workers_job_runs";
/// `{_id: sequence name, seq}`: the numeric ids of job runs.
const COUNTERS: &str = "workers_counters";
/// `{_id: task id, revoked_at}`: task ids revoked by an operator (Celery's state db).
const REVOKED: &str = "workers_revoked";

/// Ids per `$in` query, so a long list never makes one oversized command.
const IN_BATCH: usize = 1000;

/// MongoDB's duplicate key error: an upsert that lost a race to an insert of the same `_id`.
const DUPLICATE_KEY: i32 = 11000;
/// An index of that name or keys already exists with other options (created by Celery or an
/// operator): it serves all the same.
const INDEX_CONFLICTS: [i32; 2] = [85, 86];

pub struct MongoStore {
    db: Database,
    /// The server's clock as an offset from ours, and when it was read: `server_now` asks the
    /// server again only after `CLOCK_REFRESH`, rather than once per lease.
    clock: std::sync::Mutex<Option<(std::time::Instant, chrono::Duration)>>,
}

/// How long a reading of the server's clock is used before it is read again. Clocks drift by
/// far less than a lease's margin in this time.
const CLOCK_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

impl MongoStore {
    /// Connects to the database `database` at `uri`, checks that the server answers and
    /// creates the indexes of spec F.1 (and those of this program's own collections) when
    /// they are missing.
    pub async fn connect(uri: &str, database: &str) -> anyhow::Result<MongoStore> {
        // TLS connections need a process-wide crypto provider; an error only means one is set.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shown = crate::config::redact_uri(uri);
        let client = Client::with_uri_str(uri)
            .await
            .with_context(|| format!("invalid MongoDB URI `{shown}`"))?;
        let db = client.database(database);
        db.run_command(doc! {"ping": 1})
            .await
            .with_context(|| format!("cannot reach MongoDB at `{shown}`"))?;
        let store = MongoStore {
            db,
            clock: std::sync::Mutex::new(None),
        };
        store.create_indexes().await.with_context(|| {
            format!("cannot create the indexes of MongoDB database `{database}`")
        })?;
        Ok(store)
    }

    fn collection(&self, name: &str) -> Collection<Document> {
        self.db.collection(name)
    }

    /// The server's clock: `hello`'s `localTime`, moved on by half the round trip, kept as an
    /// offset from the local clock for `CLOCK_REFRESH`. Leases and claims are judged by it, so
    /// that hosts whose clocks disagree still agree on who holds what. (`$$NOW` would save the
    /// round trip, but not every MongoDB-wire server compares it correctly.)
    async fn server_now(&self) -> anyhow::Result<DateTime<Utc>> {
        let cached = *self.clock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((read_at, offset)) = cached
            && read_at.elapsed() < CLOCK_REFRESH
        {
            return Ok(Utc::now() + offset);
        }
        let sent = std::time::Instant::now();
        let answer = self
            .db
            .run_command(doc! {"hello": 1})
            .await
            .context("cannot read the MongoDB server's clock (`hello`)")?;
        let local_time = answer
            .get_datetime("localTime")
            .context("the MongoDB server's `hello` answer has no `localTime`")?;
        let half_trip = chrono::Duration::from_std(sent.elapsed() / 2).unwrap_or_default();
        let server_now = chrono_date(*local_time) + half_trip;
        let offset = server_now - Utc::now();
        *self.clock.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), offset));
        Ok(server_now)
    }

    /// Stores a state of a task this process started with `start`: the whole document, with
    /// the request fields `start` gives (the ones STARTED wrote), so nothing is read first.
    async fn store_started_state(&self, start: &TaskStart, state: &State) -> anyhow::Result<()> {
        let request = RequestFields::from_start(start);
        self.replace_task_document(&start.task_id, state, &request)
            .await
    }

    /// Replaces (or creates) a task's `celery_taskmeta` document, as Celery stores a state.
    async fn replace_task_document(
        &self,
        task_id: &str,
        state: &State,
        request: &RequestFields,
    ) -> anyhow::Result<()> {
        self.collection(TASKS)
            .replace_one(
                doc! {"_id": task_id},
                task_document(task_id, state, request),
            )
            .upsert(true)
            .await
            .with_context(|| {
                format!(
                    "cannot store {} of task {task_id} in {}",
                    state.status,
                    self.at(TASKS)
                )
            })?;
        Ok(())
    }

    /// Records the run of a task in its workflow (once per task id) and marks the workflow
    /// STARTED; clears a resume lock, where one was ever set.
    async fn record_run(&self, workflow_id: &str, start: &TaskStart) -> anyhow::Result<()> {
        let task_id = &start.task_id;
        let workflows = self.collection(WORKFLOWS);
        let now = bson_date(Utc::now());
        let step = format!("steps.{}", start.position);
        // One run per task id: retries and redeliveries reuse the id and add none.
        let run = async {
            let pushed = workflows
                .update_one(
                    doc! {
                        "_id": workflow_id,
                        // Without this guard a position past the end would pad the array.
                        format!("{step}.name"): {"$exists": true},
                        format!("{step}.task_runs.task_id"): {"$ne": task_id},
                    },
                    doc! {
                        "$push": {format!("{step}.task_runs"): {"date_start": now, "task_id": task_id}},
                        "$set": {"_status": TaskStatus::Started.as_str(), "updated_at": now},
                    },
                )
                .await
                .with_context(|| {
                    format!(
                        "cannot record the run of task {task_id} in workflow {workflow_id} in {}",
                        self.at(WORKFLOWS)
                    )
                })?;
            if pushed.matched_count > 0 {
                return Ok(());
            }
            // The task id has its run already (a retry or a redelivery), or there is no such
            // step.
            let marked = workflows
                .update_one(
                    doc! {"_id": workflow_id, format!("{step}.name"): {"$exists": true}},
                    doc! {"$set": {"_status": TaskStatus::Started.as_str(), "updated_at": now}},
                )
                .await
                .with_context(|| {
                    format!(
                        "cannot update workflow {workflow_id} in {}",
                        self.at(WORKFLOWS)
                    )
                })?;
            if marked.matched_count == 0 {
                anyhow::bail!(
                    "workflow {workflow_id} of task {task_id} does not exist or has no step {} in {}",
                    start.position,
                    self.at(WORKFLOWS)
                );
            }
            Ok(())
        };
        // sca-rhythm clears the lock only where one was ever set: the key stays absent until
        // the first resume.
        let unlocked = async {
            workflows
                .update_one(
                    doc! {"_id": workflow_id, "resume_lock": {"$ne": Bson::Null}},
                    doc! {"$set": {"resume_lock": Bson::Null}},
                )
                .await
                .with_context(|| {
                    format!(
                        "cannot clear the resume lock of workflow {workflow_id} in {}",
                        self.at(WORKFLOWS)
                    )
                })
        };
        if start.resume_locked {
            tokio::try_join!(run, unlocked)?;
        } else {
            run.await?;
        }
        Ok(())
    }

    /// Names a collection in messages: `database.collection`.
    fn at(&self, collection: &str) -> String {
        format!("{}.{collection}", self.db.name())
    }

    async fn create_indexes(&self) -> anyhow::Result<()> {
        let wanted: [(&str, Document); 9] = [
            (TASKS, doc! {"status": 1}),
            (TASKS, doc! {"kwargs.app_id": 1}),
            (TASKS, doc! {"kwargs.step": 1}),
            (TASKS, doc! {"date_done": 1}),
            (WORKFLOWS, doc! {"_status": 1}),
            (WORKFLOWS, doc! {"app_id": 1}),
            // Listing (newest first) and purging (oldest first) go by creation time.
            (WORKFLOWS, doc! {"created_at": 1}),
            (JOB_RUNS, doc! {"job": 1, "_id": -1}),
            (JOB_RUNS, doc! {"host": 1, "outcome": 1}),
        ];
        for (collection, keys) in wanted {
            // Celery asks for its `date_done` index with `background: true` each time it
            // starts; a server may refuse that request when the same index exists without the
            // option, so the index is created exactly as Celery asks for it. (Servers ignore the
            // option since MongoDB 4.2, hence its deprecation in the driver; it is still sent.)
            let background =
                (collection == TASKS && keys.contains_key("date_done")).then_some(true);
            #[allow(deprecated)]
            let options = IndexOptions::builder().background(background).build();
            let index = IndexModel::builder()
                .keys(keys.clone())
                .options(options)
                .build();
            match self.collection(collection).create_index(index).await {
                Ok(_) => {}
                Err(err) if error_code(&err).is_some_and(|c| INDEX_CONFLICTS.contains(&c)) => {}
                Err(err) => {
                    return Err(anyhow::Error::new(err)
                        .context(format!("index {keys} on {}", self.at(collection))));
                }
            }
        }
        Ok(())
    }

    /// Loads the workflows of these documents with their start arguments.
    async fn complete(&self, docs: Vec<Document>) -> anyhow::Result<Vec<Workflow>> {
        let mut workflows = docs
            .iter()
            .map(parse_workflow)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ids: Vec<String> = workflows.iter().map(|w| w.id.clone()).collect();
        let mut args: HashMap<String, Vec<Value>> = HashMap::new();
        for doc in self.find_by_ids(START_ARGS, &ids, None).await? {
            if let (Ok(id), Some(Bson::Array(items))) = (doc.get_str("_id"), doc.get("args")) {
                args.insert(id.to_owned(), items.iter().map(bson_to_json).collect());
            }
        }
        // Workflows created by sca-rhythm: the first step's first task ran with the start
        // arguments (`Workflow.start(*args)`), and its result document kept them.
        let first_tasks: Vec<String> = workflows
            .iter()
            .filter(|w| !args.contains_key(&w.id))
            .filter_map(|w| w.steps.first()?.runs.first().map(|r| r.task_id.clone()))
            .collect();
        let mut task_args: HashMap<String, Vec<Value>> = HashMap::new();
        for doc in self
            .find_by_ids(TASKS, &first_tasks, Some(doc! {"args": 1}))
            .await?
        {
            if let (Ok(id), Some(Bson::Array(items))) = (doc.get_str("_id"), doc.get("args")) {
                task_args.insert(id.to_owned(), items.iter().map(bson_to_json).collect());
            }
        }
        for workflow in &mut workflows {
            workflow.start_args = match args.remove(&workflow.id) {
                Some(args) => args,
                None => workflow
                    .steps
                    .first()
                    .and_then(|s| s.runs.first())
                    .and_then(|r| task_args.get(&r.task_id).cloned())
                    .unwrap_or_default(),
            };
        }
        Ok(workflows)
    }

    /// The documents of `collection` whose `_id` is one of `ids`.
    async fn find_by_ids(
        &self,
        collection: &str,
        ids: &[String],
        projection: Option<Document>,
    ) -> anyhow::Result<Vec<Document>> {
        let mut out = Vec::new();
        let coll = self.collection(collection);
        for batch in ids.chunks(IN_BATCH) {
            let mut find = coll.find(doc! {"_id": {"$in": batch}});
            if let Some(projection) = &projection {
                find = find.projection(projection.clone());
            }
            let docs: Vec<Document> = find
                .await
                .with_context(|| format!("cannot read {}", self.at(collection)))?
                .try_collect()
                .await
                .with_context(|| format!("cannot read {}", self.at(collection)))?;
            out.extend(docs);
        }
        Ok(out)
    }

    async fn find_workflows(
        &self,
        filter: Document,
        sort: Document,
        limit: usize,
    ) -> anyhow::Result<Vec<Workflow>> {
        let docs: Vec<Document> = self
            .collection(WORKFLOWS)
            .find(filter)
            .sort(sort)
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .with_context(|| format!("cannot read {}", self.at(WORKFLOWS)))?
            .try_collect()
            .await
            .with_context(|| format!("cannot read {}", self.at(WORKFLOWS)))?;
        self.complete(docs).await
    }

    /// Stores a final or retry state of a task as Celery does: the whole document replaced,
    /// the request fields (name, arguments, worker, ...) kept from the STARTED document.
    /// Returns the workflow id of the task, when its kwargs name one.
    async fn store_state(
        &self,
        task_id: &str,
        state: State,
        retries: Option<u32>,
    ) -> anyhow::Result<Option<String>> {
        let tasks = self.collection(TASKS);
        let existing = tasks
            .find_one(doc! {"_id": task_id})
            .await
            .with_context(|| format!("cannot read task {task_id} in {}", self.at(TASKS)))?;
        let mut request = existing
            .as_ref()
            .map(RequestFields::from_doc)
            .unwrap_or_default();
        if let Some(retries) = retries {
            request.retries = Bson::Int32(to_i32(retries));
        }
        let workflow_id = match &request.kwargs {
            Bson::Document(kwargs) => kwargs.get_str("workflow_id").ok().map(str::to_owned),
            _ => None,
        };
        self.replace_task_document(task_id, &state, &request)
            .await?;
        Ok(workflow_id)
    }

    /// Sets `fields` and `updated_at` on a workflow; returns whether it exists.
    async fn update_workflow(
        &self,
        workflow_id: &str,
        mut fields: Document,
    ) -> anyhow::Result<bool> {
        fields.insert("updated_at", bson_date(Utc::now()));
        let result = self
            .collection(WORKFLOWS)
            .update_one(doc! {"_id": workflow_id}, doc! {"$set": fields})
            .await
            .with_context(|| {
                format!(
                    "cannot update workflow {workflow_id} in {}",
                    self.at(WORKFLOWS)
                )
            })?;
        Ok(result.matched_count > 0)
    }

    /// The next value of the sequence `name` (1, 2, ...).
    async fn next_id(&self, name: &str) -> anyhow::Result<i64> {
        let counters = self.collection(COUNTERS);
        // Two first calls at once both upsert; the loser sees a duplicate key and tries again,
        // now finding the document.
        for _ in 0..3 {
            match counters
                .find_one_and_update(doc! {"_id": name}, doc! {"$inc": {"seq": 1_i64}})
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await
            {
                Ok(Some(doc)) => {
                    return doc.get("seq").and_then(bson_i64).with_context(|| {
                        format!("sequence `{name}` in {} is not a number", self.at(COUNTERS))
                    });
                }
                Ok(None) => {}
                Err(err) if is_duplicate_key(&err) => {}
                Err(err) => {
                    return Err(anyhow::Error::new(err).context(format!(
                        "cannot advance sequence `{name}` in {}",
                        self.at(COUNTERS)
                    )));
                }
            }
        }
        anyhow::bail!(
            "cannot advance sequence `{name}` in {}: contested too often",
            self.at(COUNTERS)
        )
    }
}

/// A task state to store, with what Celery writes for it.
struct State {
    status: TaskStatus,
    /// The `result` field: JSON text.
    result: String,
    traceback: Option<String>,
    children: Bson,
}

impl State {
    fn error(task_id: &str, status: TaskStatus, error: &TaskError) -> State {
        // A retry is published from inside the task, so Celery records it as the request's
        // child: `[[task_id, null], null]` (an AsyncResult as a tuple).
        let children = match status {
            TaskStatus::Retry => bson::bson!([[[task_id, Bson::Null], Bson::Null]]),
            _ => Bson::Array(Vec::new()),
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
#[derive(Clone)]
struct RequestFields {
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
    fn from_start(start: &TaskStart) -> RequestFields {
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

    fn from_doc(doc: &Document) -> RequestFields {
        let field = |key: &str, default: Bson| doc.get(key).cloned().unwrap_or(default);
        let defaults = RequestFields::default();
        RequestFields {
            parent_id: doc
                .get("parent_id")
                .filter(|b| !matches!(b, Bson::Null))
                .cloned(),
            name: field("name", defaults.name),
            args: field("args", defaults.args),
            kwargs: field("kwargs", defaults.kwargs),
            worker: field("worker", defaults.worker),
            retries: field("retries", defaults.retries),
            queue: field("queue", defaults.queue),
        }
    }
}

/// A `celery_taskmeta` document with Celery's fields in Celery's order (spec F.3).
fn task_document(task_id: &str, state: &State, request: &RequestFields) -> Document {
    // Celery sets date_done for the ready states, as a naive-UTC isoformat string.
    let date_done = if state.status.is_done() {
        Bson::String(celery_date(Utc::now()))
    } else {
        Bson::Null
    };
    let mut doc = doc! {
        "_id": task_id,
        "status": state.status.as_str(),
        "result": &state.result,
        "traceback": state.traceback.clone().map_or(Bson::Null, Bson::String),
        "children": state.children.clone(),
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

#[async_trait]
impl WorkflowStore for MongoStore {
    async fn create_workflow(
        &self,
        id: &str,
        app_id: &str,
        spec: &WorkflowSpec,
        start_args: &[Value],
    ) -> anyhow::Result<()> {
        // The arguments first: a crash in between leaves an unused arguments document rather
        // than a workflow without its arguments.
        let args =
            doc! {"_id": id, "args": start_args.iter().map(json_to_bson).collect::<Vec<_>>()};
        let stored_args = || {
            format!(
                "cannot store the arguments of workflow {id} in {}",
                self.at(START_ARGS)
            )
        };
        match self.collection(START_ARGS).insert_one(args.clone()).await {
            Ok(_) => {}
            Err(err) if is_duplicate_key(&err) => {
                // Never the arguments of another workflow: only those an interrupted creation
                // left behind are replaced.
                if self.workflow(id).await?.is_some() {
                    anyhow::bail!("workflow {id} already exists in {}", self.at(WORKFLOWS));
                }
                self.collection(START_ARGS)
                    .replace_one(doc! {"_id": id}, args)
                    .await
                    .with_context(stored_args)?;
            }
            Err(err) => return Err(anyhow::Error::new(err).context(stored_args())),
        }
        // sca-rhythm's fields in its order; `updated_at` comes with the first update.
        let steps: Vec<Document> = spec
            .steps
            .iter()
            .map(|s| step_document(s, app_id))
            .collect();
        let workflow = doc! {
            "_id": id,
            "created_at": bson_date(Utc::now()),
            "steps": steps,
            "name": &spec.name,
            "app_id": app_id,
            "description": spec.description.clone().map_or(Bson::Null, Bson::String),
            "_status": TaskStatus::Pending.as_str(),
        };
        match self.collection(WORKFLOWS).insert_one(workflow).await {
            Ok(_) => Ok(()),
            Err(err) if is_duplicate_key(&err) => {
                anyhow::bail!("workflow {id} already exists in {}", self.at(WORKFLOWS))
            }
            Err(err) => Err(anyhow::Error::new(err).context(format!(
                "cannot create workflow {id} in {}",
                self.at(WORKFLOWS)
            ))),
        }
    }

    async fn workflow(&self, id: &str) -> anyhow::Result<Option<Workflow>> {
        let doc = self
            .collection(WORKFLOWS)
            .find_one(doc! {"_id": id})
            .await
            .with_context(|| format!("cannot read workflow {id} in {}", self.at(WORKFLOWS)))?;
        let Some(doc) = doc else { return Ok(None) };
        Ok(self.complete(vec![doc]).await?.pop())
    }

    async fn workflow_for_step(&self, id: &str) -> anyhow::Result<Option<Workflow>> {
        let doc = self
            .collection(WORKFLOWS)
            .find_one(doc! {"_id": id})
            .await
            .with_context(|| format!("cannot read workflow {id} in {}", self.at(WORKFLOWS)))?;
        doc.as_ref().map(parse_workflow).transpose()
    }

    async fn task_result(&self, task_id: &str) -> anyhow::Result<Option<TaskMeta>> {
        let doc = self
            .collection(TASKS)
            .find_one(doc! {"_id": task_id})
            .await
            .with_context(|| format!("cannot read task {task_id} in {}", self.at(TASKS)))?;
        doc.as_ref()
            .map(parse_task_meta)
            .transpose()
            .with_context(|| format!("unreadable task result in {}", self.at(TASKS)))
    }

    async fn task_succeeded_from(
        &self,
        start: &TaskStart,
        result: &Value,
    ) -> anyhow::Result<Option<TaskStatus>> {
        let state = State {
            status: TaskStatus::Success,
            result: python_json(result),
            traceback: None,
            children: Bson::Array(Vec::new()),
        };
        // The request fields are the ones this process wrote with STARTED: nothing to read
        // back. The result and the workflow's `updated_at` (sca-rhythm's on_success) go out
        // together; the workflow's status comes back with its update.
        let stored = self.store_started_state(start, &state);
        let Some(workflow_id) = &start.workflow_id else {
            stored.await?;
            return Ok(None);
        };
        let touched = async {
            self.collection(WORKFLOWS)
                .find_one_and_update(
                    doc! {"_id": workflow_id},
                    doc! {"$set": {"updated_at": bson_date(Utc::now())}},
                )
                .projection(doc! {"_status": 1})
                .return_document(mongodb::options::ReturnDocument::After)
                .await
                .with_context(|| {
                    format!(
                        "cannot update workflow {workflow_id} in {}",
                        self.at(WORKFLOWS)
                    )
                })
        };
        let (_, workflow) = tokio::try_join!(stored, touched)?;
        Ok(workflow.map(|doc| {
            doc.get_str("_status")
                .ok()
                .and_then(TaskStatus::parse)
                .unwrap_or(TaskStatus::Pending)
        }))
    }

    async fn workflow_status(&self, id: &str) -> anyhow::Result<Option<TaskStatus>> {
        let doc = self
            .collection(WORKFLOWS)
            .find_one(doc! {"_id": id})
            .projection(doc! {"_status": 1})
            .await
            .with_context(|| format!("cannot read workflow {id} in {}", self.at(WORKFLOWS)))?;
        Ok(doc.map(|doc| {
            doc.get_str("_status")
                .ok()
                .and_then(TaskStatus::parse)
                .unwrap_or(TaskStatus::Pending)
        }))
    }

    async fn workflows(
        &self,
        filter: WorkflowFilter,
        limit: usize,
    ) -> anyhow::Result<Vec<Workflow>> {
        let filter = match filter {
            WorkflowFilter::All => doc! {},
            WorkflowFilter::Active => doc! {"_status": {"$in": ["PENDING", "STARTED"]}},
        };
        self.find_workflows(filter, doc! {"created_at": -1, "_id": 1}, limit)
            .await
    }

    async fn task_metas(&self, task_ids: &[String]) -> anyhow::Result<HashMap<String, TaskMeta>> {
        let mut out = HashMap::new();
        for doc in self.find_by_ids(TASKS, task_ids, None).await? {
            let meta = parse_task_meta(&doc)
                .with_context(|| format!("unreadable task result in {}", self.at(TASKS)))?;
            out.insert(meta.task_id.clone(), meta);
        }
        for doc in self.find_by_ids(TASK_STARTS, task_ids, None).await? {
            if let (Ok(id), Some(starts)) =
                (doc.get_str("_id"), doc.get("starts").and_then(bson_i64))
                && let Some(meta) = out.get_mut(id)
            {
                meta.starts = u32::try_from(starts).unwrap_or(u32::MAX);
            }
        }
        Ok(out)
    }

    async fn task_started(&self, start: &TaskStart) -> anyhow::Result<()> {
        let task_id = &start.task_id;
        let state = State {
            status: TaskStatus::Started,
            result: python_json(&StartedResult {
                pid: start.pid,
                hostname: &start.hostname,
            }),
            traceback: None,
            children: Bson::Array(Vec::new()),
        };
        // The three documents are independent of each other: written at once, one round
        // trip of waiting rather than four.
        let result = self.store_started_state(start, &state);
        let counted = async {
            self.collection(TASK_STARTS)
                .update_one(doc! {"_id": task_id}, doc! {"$inc": {"starts": 1}})
                .upsert(true)
                .await
                .with_context(|| {
                    format!(
                        "cannot count the start of task {task_id} in {}",
                        self.at(TASK_STARTS)
                    )
                })
        };
        let run = async {
            match &start.workflow_id {
                Some(workflow_id) => self.record_run(workflow_id, start).await,
                // A plain Celery task (no workflow) has its result only.
                None => Ok(()),
            }
        };
        tokio::try_join!(result, counted, run)?;
        Ok(())
    }

    async fn task_progress(&self, task_id: &str, progress: &Value) -> anyhow::Result<()> {
        // Only while STARTED: a report that arrives late never overwrites a final state.
        self.collection(TASKS)
            .update_one(
                doc! {"_id": task_id, "status": TaskStatus::Started.as_str()},
                doc! {"$set": {"result": python_json(progress)}},
            )
            .await
            .with_context(|| {
                format!(
                    "cannot store the progress of task {task_id} in {}",
                    self.at(TASKS)
                )
            })?;
        Ok(())
    }

    async fn task_retry(
        &self,
        task_id: &str,
        error: &TaskError,
        retries: u32,
    ) -> anyhow::Result<()> {
        self.store_state(
            task_id,
            State::error(task_id, TaskStatus::Retry, error),
            Some(retries),
        )
        .await?;
        Ok(())
    }

    async fn task_succeeded(&self, task_id: &str, result: &Value) -> anyhow::Result<()> {
        let state = State {
            status: TaskStatus::Success,
            result: python_json(result),
            traceback: None,
            children: Bson::Array(Vec::new()),
        };
        // sca-rhythm's on_success updates the workflow (its `updated_at`) after every step.
        if let Some(workflow_id) = self.store_state(task_id, state, None).await? {
            self.update_workflow(&workflow_id, Document::new()).await?;
        }
        Ok(())
    }

    async fn task_failed(
        &self,
        workflow_id: Option<&str>,
        task_id: &str,
        error: &TaskError,
    ) -> anyhow::Result<()> {
        self.store_state(
            task_id,
            State::error(task_id, TaskStatus::Failure, error),
            None,
        )
        .await?;
        if let Some(workflow_id) = workflow_id {
            self.update_workflow(workflow_id, doc! {"_status": TaskStatus::Failure.as_str()})
                .await?;
        }
        Ok(())
    }

    async fn task_revoked(&self, task_id: &str, reason: &str) -> anyhow::Result<()> {
        let error = TaskError::revoked(reason);
        let state = State {
            status: TaskStatus::Revoked,
            result: python_json(&ErrorResult::from(&error)),
            // `mark_as_revoked` stores no traceback.
            traceback: None,
            children: Bson::Array(Vec::new()),
        };
        self.store_state(task_id, state, None).await?;
        Ok(())
    }

    async fn remember_revoked(&self, task_ids: &[String], at: DateTime<Utc>) -> anyhow::Result<()> {
        let revoked = self.collection(REVOKED);
        for task_id in task_ids {
            revoked
                .update_one(
                    doc! {"_id": task_id},
                    doc! {"$set": {"revoked_at": bson_date(at)}},
                )
                .upsert(true)
                .await
                .with_context(|| {
                    format!(
                        "cannot remember task {task_id} as revoked in {}",
                        self.at(REVOKED)
                    )
                })?;
        }
        Ok(())
    }

    async fn revoked_since(
        &self,
        since: DateTime<Utc>,
    ) -> anyhow::Result<Vec<(String, DateTime<Utc>)>> {
        let mut cursor = self
            .collection(REVOKED)
            .find(doc! {"revoked_at": {"$gte": bson_date(since)}})
            .sort(doc! {"revoked_at": 1})
            .await
            .with_context(|| format!("cannot read the revoked tasks in {}", self.at(REVOKED)))?;
        let mut revoked = Vec::new();
        while let Some(doc) = cursor.try_next().await? {
            if let (Ok(id), Ok(at)) = (doc.get_str("_id"), doc.get_datetime("revoked_at")) {
                revoked.push((id.to_owned(), chrono_date(*at)));
            }
        }
        Ok(revoked)
    }

    async fn set_workflow_status(
        &self,
        workflow_id: &str,
        status: TaskStatus,
    ) -> anyhow::Result<()> {
        self.update_workflow(workflow_id, doc! {"_status": status.as_str()})
            .await?;
        Ok(())
    }

    async fn lock_for_resume(&self, workflow_id: &str, now: DateTime<Utc>) -> anyhow::Result<bool> {
        // `resume_lock: null` matches an absent key too: never resumed.
        let now = bson_date(now);
        let result = self
            .collection(WORKFLOWS)
            .update_one(
                doc! {"_id": workflow_id, "resume_lock": Bson::Null},
                doc! {"$set": {"resume_lock": now, "updated_at": now}},
            )
            .await
            .with_context(|| {
                format!(
                    "cannot lock workflow {workflow_id} for resuming in {}",
                    self.at(WORKFLOWS)
                )
            })?;
        Ok(result.matched_count == 1)
    }

    async fn workflows_created_before(
        &self,
        names: &[String],
        cutoff: DateTime<Utc>,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> anyhow::Result<Vec<Workflow>> {
        let mut filter = doc! {
            "name": {"$in": names},
            "created_at": {"$lte": bson_date(cutoff)},
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
        self.find_workflows(filter, doc! {"created_at": 1, "_id": 1}, limit)
            .await
    }

    async fn delete_workflow(&self, id: &str) -> anyhow::Result<()> {
        let Some(workflow) = self.workflow(id).await? else {
            return Ok(());
        };
        // Results first: a crash midway leaves the workflow, and deleting it again finishes.
        let task_ids: Vec<String> = workflow.all_task_ids().into_iter().collect();
        for batch in task_ids.chunks(IN_BATCH) {
            for collection in [TASKS, TASK_STARTS] {
                self.collection(collection)
                    .delete_many(doc! {"_id": {"$in": batch}})
                    .await
                    .with_context(|| {
                        format!(
                            "cannot delete the task results of workflow {id} in {}",
                            self.at(collection)
                        )
                    })?;
            }
        }
        self.collection(WORKFLOWS)
            .delete_one(doc! {"_id": id})
            .await
            .with_context(|| format!("cannot delete workflow {id} in {}", self.at(WORKFLOWS)))?;
        self.collection(START_ARGS)
            .delete_one(doc! {"_id": id})
            .await
            .with_context(|| {
                format!(
                    "cannot delete the arguments of workflow {id} in {}",
                    self.at(START_ARGS)
                )
            })?;
        Ok(())
    }

    async fn watch_state(&self, source_dir: &str) -> anyhow::Result<WatchState> {
        let doc = self
            .collection(WATCH_STATE)
            .find_one(doc! {"_id": source_dir})
            .await
            .with_context(|| {
                format!(
                    "cannot read the watch state of `{source_dir}` in {}",
                    self.at(WATCH_STATE)
                )
            })?;
        let Some(doc) = doc else {
            return Ok(WatchState::default());
        };
        Ok(WatchState {
            scan_count: doc
                .get("scan_count")
                .and_then(bson_i64)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            known: match doc.get("known") {
                Some(Bson::Array(names)) => names
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect(),
                _ => Default::default(),
            },
        })
    }

    async fn save_watch_state(&self, source_dir: &str, state: &WatchState) -> anyhow::Result<()> {
        // One document per source directory: a BSON document holds up to 16 MiB, some
        // hundred thousand directory names.
        let known: Vec<&str> = state.known.iter().map(String::as_str).collect();
        self.collection(WATCH_STATE)
            .replace_one(
                doc! {"_id": source_dir},
                doc! {"_id": source_dir, "scan_count": i64::from(state.scan_count), "known": known},
            )
            .upsert(true)
            .await
            .with_context(|| {
                format!(
                    "cannot store the watch state of `{source_dir}` in {}",
                    self.at(WATCH_STATE)
                )
            })?;
        Ok(())
    }
}

#[async_trait]
impl SchedulerStore for MongoStore {
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> anyhow::Result<bool> {
        let now = self.server_now().await?;
        let until = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        // Matches when the lease is ours or has expired by the server's clock; when it is
        // someone else's and live, the upsert tries to insert a second document with its
        // `_id` and fails on the key.
        let result = self
            .collection(LEASES)
            .update_one(
                doc! {
                    "_id": name,
                    "$or": [{"holder": holder}, {"expires_at": {"$lt": bson_date(now)}}],
                },
                doc! {"$set": {"holder": holder, "expires_at": bson_date(until)}},
            )
            .upsert(true)
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(err) if is_duplicate_key(&err) => Ok(false),
            Err(err) => Err(anyhow::Error::new(err)
                .context(format!("cannot take lease `{name}` in {}", self.at(LEASES)))),
        }
    }

    async fn release_lease(&self, name: &str, holder: &str) -> anyhow::Result<()> {
        self.collection(LEASES)
            .delete_one(doc! {"_id": name, "holder": holder})
            .await
            .with_context(|| format!("cannot release lease `{name}` in {}", self.at(LEASES)))?;
        Ok(())
    }

    async fn last_slots(&self) -> anyhow::Result<HashMap<String, DateTime<Utc>>> {
        let docs: Vec<Document> = self
            .collection(JOB_SLOTS)
            .find(doc! {})
            .await
            .with_context(|| format!("cannot read {}", self.at(JOB_SLOTS)))?
            .try_collect()
            .await
            .with_context(|| format!("cannot read {}", self.at(JOB_SLOTS)))?;
        Ok(docs
            .iter()
            .filter_map(|doc| {
                let job = doc.get_str("_id").ok()?;
                let slot = doc.get_datetime("slot").ok()?;
                Some((job.to_owned(), chrono_date(*slot)))
            })
            .collect())
    }

    async fn set_last_slot(&self, job: &str, slot: DateTime<Utc>) -> anyhow::Result<()> {
        // `$max`: a slot never moves back, whichever scheduler writes last.
        self.collection(JOB_SLOTS)
            .update_one(doc! {"_id": job}, doc! {"$max": {"slot": bson_date(slot)}})
            .upsert(true)
            .await
            .with_context(|| {
                format!(
                    "cannot store the last slot of job {job} in {}",
                    self.at(JOB_SLOTS)
                )
            })?;
        Ok(())
    }

    async fn start_run(
        &self,
        job: &str,
        trigger: Trigger,
        slot: Option<DateTime<Utc>>,
        host: &str,
        dry_run: bool,
        now: DateTime<Utc>,
    ) -> anyhow::Result<i64> {
        let id = self.next_id(JOB_RUNS).await?;
        let run = doc! {
            "_id": id,
            "job": job,
            "trigger": trigger.as_str(),
            "slot": slot.map_or(Bson::Null, |s| Bson::DateTime(bson_date(s))),
            "started_at": bson_date(now),
            "ended_at": Bson::Null,
            "outcome": RunOutcome::Running.as_str(),
            "error": Bson::Null,
            "counters": Document::new(),
            "host": host,
            "dry_run": dry_run,
        };
        self.collection(JOB_RUNS)
            .insert_one(run)
            .await
            .with_context(|| {
                format!("cannot record a run of job {job} in {}", self.at(JOB_RUNS))
            })?;
        Ok(id)
    }

    async fn finish_run(
        &self,
        id: i64,
        outcome: &RunOutcome,
        counters: &Map<String, Value>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        self.collection(JOB_RUNS)
            .update_one(
                doc! {"_id": id},
                doc! {"$set": {
                    "outcome": outcome.as_str(),
                    "error": outcome.reason().map_or(Bson::Null, |r| Bson::String(r.to_owned())),
                    "counters": json_object_to_doc(counters),
                    "ended_at": bson_date(now),
                }},
            )
            .await
            .with_context(|| {
                format!(
                    "cannot record the end of job run {id} in {}",
                    self.at(JOB_RUNS)
                )
            })?;
        Ok(())
    }

    async fn record_skip(
        &self,
        job: &str,
        trigger: Trigger,
        slot: DateTime<Utc>,
        host: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let id = self.next_id(JOB_RUNS).await?;
        let run = doc! {
            "_id": id,
            "job": job,
            "trigger": trigger.as_str(),
            "slot": bson_date(slot),
            "started_at": bson_date(now),
            "ended_at": bson_date(now),
            "outcome": RunOutcome::Skipped(String::new()).as_str(),
            "error": reason,
            "counters": Document::new(),
            "host": host,
            "dry_run": false,
        };
        self.collection(JOB_RUNS)
            .insert_one(run)
            .await
            .with_context(|| {
                format!(
                    "cannot record a skipped run of job {job} in {}",
                    self.at(JOB_RUNS)
                )
            })?;
        Ok(())
    }

    async fn runs(&self, job: Option<&str>, limit: usize) -> anyhow::Result<Vec<JobRun>> {
        let filter = match job {
            Some(job) => doc! {"job": job},
            None => doc! {},
        };
        let docs: Vec<Document> = self
            .collection(JOB_RUNS)
            .find(filter)
            .sort(doc! {"_id": -1})
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .with_context(|| format!("cannot read {}", self.at(JOB_RUNS)))?
            .try_collect()
            .await
            .with_context(|| format!("cannot read {}", self.at(JOB_RUNS)))?;
        docs.iter()
            .map(parse_job_run)
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(|| format!("unreadable job run in {}", self.at(JOB_RUNS)))
    }

    async fn abandon_runs(
        &self,
        host: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<u64> {
        let result = self
            .collection(JOB_RUNS)
            .update_many(
                doc! {"host": host, "outcome": RunOutcome::Running.as_str()},
                doc! {"$set": {
                    "outcome": RunOutcome::Failed(String::new()).as_str(),
                    "error": reason,
                    "ended_at": bson_date(now),
                }},
            )
            .await
            .with_context(|| format!("cannot close the runs of {host} in {}", self.at(JOB_RUNS)))?;
        Ok(result.modified_count)
    }
}

/// A step as sca-rhythm stores it. Like sca-rhythm's `get_wf_body`, a step without a queue
/// gets `{app_id}.q`; `kwargs` and `priority` appear only when the definition has them.
fn step_document(step: &StepSpec, app_id: &str) -> Document {
    let queue = step.queue.clone().unwrap_or_else(|| format!("{app_id}.q"));
    let mut doc = doc! {"name": &step.name, "task": &step.task, "queue": queue};
    if let Some(kwargs) = &step.kwargs {
        doc.insert("kwargs", json_object_to_doc(kwargs));
    }
    if let Some(priority) = step.priority {
        doc.insert("priority", i32::from(priority));
    }
    doc
}

/// A `workflow_meta` document as written by sca-rhythm or by this store; `start_args` is
/// left empty (it is kept elsewhere).
fn parse_workflow(doc: &Document) -> anyhow::Result<Workflow> {
    let id = doc
        .get_str("_id")
        .context("a workflow whose `_id` is not a string")?
        .to_owned();
    let created_at = match doc.get("created_at") {
        Some(Bson::DateTime(d)) => chrono_date(*d),
        _ => anyhow::bail!("workflow {id}: `created_at` is not a date"),
    };
    let steps = match doc.get("steps") {
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
        name: doc.get_str("name").unwrap_or_default().to_owned(),
        app_id: doc.get_str("app_id").unwrap_or_default().to_owned(),
        description: doc.get_str("description").ok().map(str::to_owned),
        created_at,
        updated_at: doc.get_datetime("updated_at").ok().map(|d| chrono_date(*d)),
        status_cache: doc
            .get_str("_status")
            .ok()
            .and_then(TaskStatus::parse)
            .unwrap_or(TaskStatus::Pending),
        // Any date locks, as sca-rhythm's truthiness test does; null or absent does not.
        resume_lock: doc
            .get_datetime("resume_lock")
            .ok()
            .map(|d| chrono_date(*d)),
        start_args: Vec::new(),
        steps,
        id,
    })
}

fn parse_step(step: &Document) -> anyhow::Result<WorkflowStep> {
    let runs = match step.get("task_runs") {
        Some(Bson::Array(runs)) => runs
            .iter()
            .filter_map(Bson::as_document)
            .map(|run| {
                Ok(TaskRun {
                    task_id: run
                        .get_str("task_id")
                        .context("a task run without `task_id`")?
                        .to_owned(),
                    date_start: run
                        .get_datetime("date_start")
                        .map(|d| chrono_date(*d))
                        .unwrap_or_default(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    Ok(WorkflowStep {
        spec: StepSpec {
            name: step.get_str("name").context("no `name`")?.to_owned(),
            task: step.get_str("task").context("no `task`")?.to_owned(),
            queue: step.get_str("queue").ok().map(str::to_owned),
            kwargs: match step.get("kwargs") {
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

fn parse_task_meta(doc: &Document) -> anyhow::Result<TaskMeta> {
    let task_id = doc
        .get_str("_id")
        .context("a task result whose `_id` is not a string")?
        .to_owned();
    let text = |key: &str| doc.get_str(key).ok().map(str::to_owned);
    Ok(TaskMeta {
        status: doc
            .get_str("status")
            .ok()
            .and_then(TaskStatus::parse)
            .unwrap_or(TaskStatus::Pending),
        // JSON text, as Celery's JSON serializer writes it; anything else is taken as it is.
        result: match doc.get("result") {
            Some(Bson::String(text)) => {
                serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
            }
            Some(Bson::Null) | None => Value::Null,
            Some(other) => bson_to_json(other),
        },
        traceback: text("traceback"),
        date_done: match doc.get("date_done") {
            Some(Bson::String(text)) => parse_celery_date(text),
            Some(Bson::DateTime(d)) => Some(chrono_date(*d)),
            _ => None,
        },
        name: text("name"),
        args: match doc.get("args") {
            Some(Bson::Array(args)) => args.iter().map(bson_to_json).collect(),
            _ => Vec::new(),
        },
        kwargs: match doc.get("kwargs") {
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

fn parse_job_run(doc: &Document) -> anyhow::Result<JobRun> {
    let id = doc
        .get("_id")
        .and_then(bson_i64)
        .context("a job run whose `_id` is not a number")?;
    let date = |key: &str| doc.get_datetime(key).ok().map(|d| chrono_date(*d));
    let reason = doc.get_str("error").unwrap_or_default().to_owned();
    Ok(JobRun {
        id,
        job: doc.get_str("job").unwrap_or_default().to_owned(),
        trigger: doc.get_str("trigger").unwrap_or_default().to_owned(),
        slot: date("slot"),
        started_at: date("started_at").with_context(|| format!("job run {id}: no `started_at`"))?,
        ended_at: date("ended_at"),
        outcome: match doc.get_str("outcome").unwrap_or_default() {
            "success" => RunOutcome::Success,
            "failed" => RunOutcome::Failed(reason),
            "skipped" => RunOutcome::Skipped(reason),
            _ => RunOutcome::Running,
        },
        counters: match doc.get("counters") {
            Some(Bson::Document(counters)) => doc_to_json_object(counters),
            _ => Map::new(),
        },
        host: doc.get_str("host").unwrap_or_default().to_owned(),
        dry_run: doc.get_bool("dry_run").unwrap_or(false),
    })
}

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

fn error_code(err: &mongodb::error::Error) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::Command(e) => Some(e.code),
        _ => None,
    }
}

fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    error_code(err) == Some(DUPLICATE_KEY)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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
        let time = DateTime::parse_from_rfc3339("2026-11-28T19:35:39.216688Z")
            .unwrap()
            .with_timezone(&Utc);
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

//! The workflow store in MongoDB: the very `workflow_meta` and `celery_taskmeta` documents that
//! sca-rhythm and Celery write (spec F.1-F.3), so Python workers, rhythm_api and the Bioloop UI
//! read and write the same workflows as this program.
//!
//! Every write to a workflow is one targeted atomic update (a `$push` guarded on the task id,
//! `$set` of the status), never sca-rhythm's read-modify-write of the whole document, which
//! loses concurrent writes; task results are replaced whole on each state change, as Celery
//! replaces them. What sca-rhythm has no place for lives in collections of this program, all named
//! `workers_*`: the start arguments of workflows, the scheduler's records and the watch state.
//!
//! This module is the logic; the documents, filters and updates it sends are built in
//! `documents`, which keeps them as the Python side writes them.

mod documents;

use std::collections::HashMap;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use mongodb::bson::Document;
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, Database, IndexModel};
use serde_json::{Map, Value};

use self::documents::{
    COUNTERS, FIXITY_CHECKS, FIXITY_STANDINGS, FixityCheckDocument, JOB_RUNS, JOB_SLOTS,
    JobRunDocument, LEASES, REVOKED, RequestFields, SPACE, START_ARGS, StartArgsDocument, State,
    TASK_STARTS, TASKS, TaskDocument, WATCH_STATE, WORKFLOWS, WatchStateDocument, WorkflowDocument,
};
use super::{
    FixityRecord, FixityStanding, JobRun, LeaseState, PageCursor, RunOutcome, SchedulerStore,
    SpaceLedger, SpaceReservation, TaskClaim, TaskError, TaskMeta, TaskStart, TaskStatus, Trigger,
    WatchState, Workflow, WorkflowFilter, WorkflowSpec, WorkflowStore,
};

/// What `change_space` does with a holder's reservation.
enum SpaceChange {
    /// Write nothing.
    Nothing,
    /// Remove the holder's reservation.
    Drop,
    /// Put this one in its place.
    Hold(SpaceReservation),
}

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

/// How many connections a process opens to the server at most, unless the URI's `maxPoolSize`
/// says otherwise. One: the operations of a process then reach the server one at a time, as
/// each process of Celery's prefork pool sends them. A worker's operations are small and
/// short; on the MongoDB-wire server of the benchmarks, which serves concurrent requests
/// slower than the same requests one by one, a worker with four slots ran no-op steps 1.17
/// times as fast on one connection as on the driver's default of ten
/// (`benches/worker_overhead.sh`, BENCHMARKS.md).
const MAX_CONNECTIONS: u32 = 1;

impl MongoStore {
    /// Connects to the database `database` at `uri`, checks that the server answers and
    /// creates the indexes of spec F.1 (and those of this program's own collections) when
    /// they are missing.
    pub async fn connect(uri: &str, database: &str) -> anyhow::Result<MongoStore> {
        // TLS connections need a process-wide crypto provider; an error only means one is set.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shown = crate::config::redact_uri(uri);
        let mut options = mongodb::options::ClientOptions::parse(uri)
            .await
            .with_context(|| format!("invalid MongoDB URI `{shown}`"))?;
        options.max_pool_size = Some(options.max_pool_size.unwrap_or(MAX_CONNECTIONS));
        let client = Client::with_options(options)
            .with_context(|| format!("invalid MongoDB URI `{shown}`"))?;
        let db = client.database(database);
        db.run_command(documents::ping_command())
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
            .run_command(documents::hello_command())
            .await
            .context("cannot read the MongoDB server's clock (`hello`)")?;
        let local_time = documents::server_time(&answer)
            .context("the MongoDB server's `hello` answer has no `localTime`")?;
        let half_trip = chrono::Duration::from_std(sent.elapsed() / 2).unwrap_or_default();
        let server_now = local_time + half_trip;
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
        let document = TaskDocument::new(task_id, state, request, Utc::now());
        self.db
            .collection::<TaskDocument>(TASKS)
            .replace_one(documents::by_id(task_id), document)
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
        let now = Utc::now();
        let position = start.position;
        // One run per task id: retries and redeliveries reuse the id and add none.
        let run = async {
            let pushed = workflows
                .update_one(
                    documents::run_not_recorded(workflow_id, position, task_id),
                    documents::push_run(position, task_id, now),
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
                    documents::step_exists(workflow_id, position),
                    documents::mark_started(now),
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
                    documents::resume_locked(workflow_id),
                    documents::clear_resume_lock(),
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

    /// Changes the reservations of `fs` as `change` decides, given the server's time,
    /// `holder`'s live reservation and the others' (expired ones are dropped on the way). The
    /// document is replaced under the version it was read at, and read again when another
    /// process wrote it first. Returns whether `holder` holds a reservation afterwards.
    async fn change_space(
        &self,
        fs: &str,
        holder: &str,
        change: impl Fn(DateTime<Utc>, Option<&SpaceReservation>, &[SpaceReservation]) -> SpaceChange,
    ) -> anyhow::Result<bool> {
        const ATTEMPTS: usize = 32;
        let coll = self.collection(SPACE);
        for _ in 0..ATTEMPTS {
            let now = self.server_now().await?;
            let doc = coll
                .find_one(documents::by_id(fs))
                .await
                .with_context(|| format!("cannot read {}", self.at(SPACE)))?;
            let (version, holders) = doc.as_ref().map(documents::parse_space).unwrap_or_default();
            let (own, mut kept): (Vec<SpaceReservation>, Vec<SpaceReservation>) = holders
                .into_iter()
                .filter(|r| r.expires_at >= now)
                .partition(|r| r.holder == holder);
            let held = match change(now, own.first(), &kept) {
                SpaceChange::Nothing => return Ok(!own.is_empty()),
                SpaceChange::Drop => false,
                SpaceChange::Hold(reservation) => {
                    kept.push(reservation);
                    true
                }
            };
            let replacement = documents::space_document(fs, version + 1, &kept);
            let written = if doc.is_some() {
                coll.replace_one(documents::space_at_version(fs, version), replacement)
                    .await
                    .map(|r| r.matched_count == 1)
            } else {
                match coll.insert_one(replacement).await {
                    Ok(_) => Ok(true),
                    Err(err) if is_duplicate_key(&err) => Ok(false),
                    Err(err) => Err(err),
                }
            };
            if written.with_context(|| format!("cannot write {}", self.at(SPACE)))? {
                return Ok(held);
            }
        }
        anyhow::bail!(
            "cannot change the reservations of `{fs}` in {}: {ATTEMPTS} other writes came first",
            self.at(SPACE)
        )
    }

    /// Names a collection in messages: `database.collection`.
    fn at(&self, collection: &str) -> String {
        format!("{}.{collection}", self.db.name())
    }

    async fn create_indexes(&self) -> anyhow::Result<()> {
        for documents::IndexSpec {
            collection,
            keys,
            background,
        } in documents::indexes()
        {
            // Servers ignore `background` since MongoDB 4.2, hence its deprecation in the
            // driver; it is still sent where Celery sends it.
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
            .map(documents::parse_workflow)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ids: Vec<String> = workflows.iter().map(|w| w.id.clone()).collect();
        let mut args: HashMap<String, Vec<Value>> = HashMap::new();
        for doc in self.find_by_ids(START_ARGS, &ids, None).await? {
            args.extend(documents::args_of(&doc));
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
            .find_by_ids(TASKS, &first_tasks, Some(documents::args_projection()))
            .await?
        {
            task_args.extend(documents::args_of(&doc));
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
            let mut find = coll.find(documents::ids_in(batch));
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
            .find_one(documents::by_id(task_id))
            .await
            .with_context(|| format!("cannot read task {task_id} in {}", self.at(TASKS)))?;
        let mut request = existing
            .as_ref()
            .map(RequestFields::from_doc)
            .unwrap_or_default();
        if let Some(retries) = retries {
            request.set_retries(retries);
        }
        let workflow_id = request.workflow_id();
        self.replace_task_document(task_id, &state, &request)
            .await?;
        Ok(workflow_id)
    }

    /// Sets `updated_at` on a workflow, and its status when there is one; returns whether it
    /// exists.
    async fn update_workflow(
        &self,
        workflow_id: &str,
        status: Option<TaskStatus>,
    ) -> anyhow::Result<bool> {
        let result = self
            .collection(WORKFLOWS)
            .update_one(
                documents::by_id(workflow_id),
                documents::touch_workflow(status, Utc::now()),
            )
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
                .find_one_and_update(documents::by_id(name), documents::increment_sequence())
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await
            {
                Ok(Some(doc)) => {
                    return documents::sequence_of(&doc).with_context(|| {
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
        let args = StartArgsDocument::new(id, start_args);
        let stored_args = || {
            format!(
                "cannot store the arguments of workflow {id} in {}",
                self.at(START_ARGS)
            )
        };
        let stored = self.db.collection::<StartArgsDocument>(START_ARGS);
        match stored.insert_one(&args).await {
            Ok(_) => {}
            Err(err) if is_duplicate_key(&err) => {
                // Never the arguments of another workflow: only those an interrupted creation
                // left behind are replaced.
                if self.workflow(id).await?.is_some() {
                    anyhow::bail!("workflow {id} already exists in {}", self.at(WORKFLOWS));
                }
                stored
                    .replace_one(documents::by_id(id), &args)
                    .await
                    .with_context(stored_args)?;
            }
            Err(err) => return Err(anyhow::Error::new(err).context(stored_args())),
        }
        let workflow = WorkflowDocument::new(
            id,
            app_id,
            &spec.name,
            spec.description.as_deref(),
            &spec.steps,
            Utc::now(),
        );
        let workflows = self.db.collection::<WorkflowDocument>(WORKFLOWS);
        match workflows.insert_one(workflow).await {
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
            .find_one(documents::by_id(id))
            .await
            .with_context(|| format!("cannot read workflow {id} in {}", self.at(WORKFLOWS)))?;
        let Some(doc) = doc else { return Ok(None) };
        Ok(self.complete(vec![doc]).await?.pop())
    }

    async fn workflow_for_step(&self, id: &str) -> anyhow::Result<Option<Workflow>> {
        let doc = self
            .collection(WORKFLOWS)
            .find_one(documents::by_id(id))
            .await
            .with_context(|| format!("cannot read workflow {id} in {}", self.at(WORKFLOWS)))?;
        doc.as_ref().map(documents::parse_workflow).transpose()
    }

    async fn task_result(&self, task_id: &str) -> anyhow::Result<Option<TaskMeta>> {
        let doc = self
            .collection(TASKS)
            .find_one(documents::by_id(task_id))
            .await
            .with_context(|| format!("cannot read task {task_id} in {}", self.at(TASKS)))?;
        doc.as_ref()
            .map(documents::parse_task_meta)
            .transpose()
            .with_context(|| format!("unreadable task result in {}", self.at(TASKS)))
    }

    async fn claim_task(
        &self,
        task_id: &str,
        holder: &str,
        ttl: std::time::Duration,
        count_start: bool,
    ) -> anyhow::Result<TaskClaim> {
        let now = self.server_now().await?;
        let until = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        let tasks = self.collection(TASK_STARTS);
        let failed = |err| {
            anyhow::Error::new(err).context(format!(
                "cannot claim task {task_id} in {}",
                self.at(TASK_STARTS)
            ))
        };
        // A renewal: the claim is still this holder's, lapsed or not, as long as nobody took
        // it. (A take that counts a start is a run's first: its holder is new.)
        if !count_start {
            let renewed = tasks
                .update_one(
                    documents::lease_held(task_id, holder),
                    documents::hold_task_claim(holder, until, false),
                )
                .await
                .map_err(failed)?;
            if renewed.matched_count > 0 {
                return Ok(TaskClaim::Held {
                    start_counted: false,
                });
            }
        }
        // The claim lives on the task's start count, so that taking it counts the start in
        // the same write. When another holder's claim is live, the filter matches nothing and
        // the upsert fails on the key.
        let taken = tasks
            .update_one(
                documents::task_claim_takeable(task_id, now),
                documents::hold_task_claim(holder, until, count_start),
            )
            .upsert(true)
            .await;
        match taken {
            Ok(_) => Ok(TaskClaim::Held {
                start_counted: count_start,
            }),
            Err(err) if is_duplicate_key(&err) => Ok(TaskClaim::Busy),
            Err(err) => Err(failed(err)),
        }
    }

    async fn release_task(&self, task_id: &str, holder: &str, uncount: bool) -> anyhow::Result<()> {
        self.collection(TASK_STARTS)
            .update_one(
                documents::lease_held(task_id, holder),
                documents::give_back_task_claim(uncount),
            )
            .await
            .with_context(|| {
                format!(
                    "cannot give back the claim on task {task_id} in {}",
                    self.at(TASK_STARTS)
                )
            })?;
        Ok(())
    }

    async fn task_succeeded_from(
        &self,
        start: &TaskStart,
        result: &Value,
    ) -> anyhow::Result<Option<TaskStatus>> {
        let state = State::success(result);
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
                    documents::by_id(workflow_id),
                    documents::touch_workflow(None, Utc::now()),
                )
                .projection(documents::workflow_status_projection())
                .return_document(ReturnDocument::After)
                .await
                .with_context(|| {
                    format!(
                        "cannot update workflow {workflow_id} in {}",
                        self.at(WORKFLOWS)
                    )
                })
        };
        let (_, workflow) = tokio::try_join!(stored, touched)?;
        Ok(workflow.as_ref().map(documents::workflow_status_of))
    }

    async fn workflow_status(&self, id: &str) -> anyhow::Result<Option<TaskStatus>> {
        let doc = self
            .collection(WORKFLOWS)
            .find_one(documents::by_id(id))
            .projection(documents::workflow_status_projection())
            .await
            .with_context(|| format!("cannot read workflow {id} in {}", self.at(WORKFLOWS)))?;
        Ok(doc.as_ref().map(documents::workflow_status_of))
    }

    async fn workflows(
        &self,
        filter: WorkflowFilter,
        limit: usize,
    ) -> anyhow::Result<Vec<Workflow>> {
        let filter = match filter {
            WorkflowFilter::All => documents::all(),
            WorkflowFilter::Active => documents::active_workflows(),
        };
        self.find_workflows(filter, documents::newest_first(), limit)
            .await
    }

    async fn task_metas(&self, task_ids: &[String]) -> anyhow::Result<HashMap<String, TaskMeta>> {
        let mut out = HashMap::new();
        for doc in self.find_by_ids(TASKS, task_ids, None).await? {
            let meta = documents::parse_task_meta(&doc)
                .with_context(|| format!("unreadable task result in {}", self.at(TASKS)))?;
            out.insert(meta.task_id.clone(), meta);
        }
        for doc in self.find_by_ids(TASK_STARTS, task_ids, None).await? {
            if let Some((id, starts)) = documents::starts_of(&doc)
                && let Some(meta) = out.get_mut(id)
            {
                meta.starts = starts;
            }
        }
        Ok(out)
    }

    async fn task_started(&self, start: &TaskStart) -> anyhow::Result<()> {
        let task_id = &start.task_id;
        let state = State::started(start);
        // The three documents are independent of each other: written at once, one round
        // trip of waiting rather than four. The start count is written here only when the
        // task's claim did not count it.
        let result = self.store_started_state(start, &state);
        let counted = async {
            if start.start_counted {
                return Ok(());
            }
            self.collection(TASK_STARTS)
                .update_one(documents::by_id(task_id), documents::count_start())
                .upsert(true)
                .await
                .with_context(|| {
                    format!(
                        "cannot count the start of task {task_id} in {}",
                        self.at(TASK_STARTS)
                    )
                })?;
            Ok(())
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
                documents::started_task(task_id),
                documents::set_progress(progress),
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
        let state = State::success(result);
        // sca-rhythm's on_success updates the workflow (its `updated_at`) after every step.
        if let Some(workflow_id) = self.store_state(task_id, state, None).await? {
            self.update_workflow(&workflow_id, None).await?;
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
            self.update_workflow(workflow_id, Some(TaskStatus::Failure))
                .await?;
        }
        Ok(())
    }

    async fn task_revoked(&self, task_id: &str, reason: &str) -> anyhow::Result<()> {
        self.store_state(task_id, State::revoked(reason), None)
            .await?;
        Ok(())
    }

    async fn remember_revoked(&self, task_ids: &[String], at: DateTime<Utc>) -> anyhow::Result<()> {
        let revoked = self.collection(REVOKED);
        for task_id in task_ids {
            revoked
                .update_one(documents::by_id(task_id), documents::set_revoked_at(at))
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

    async fn forget_revoked_before(&self, cutoff: DateTime<Utc>) -> anyhow::Result<()> {
        self.collection(REVOKED)
            .delete_many(documents::revoked_before(cutoff))
            .await
            .with_context(|| format!("cannot forget expired revokes in {}", self.at(REVOKED)))?;
        Ok(())
    }

    async fn revoked_since(
        &self,
        since: DateTime<Utc>,
    ) -> anyhow::Result<Vec<(String, DateTime<Utc>)>> {
        let mut cursor = self
            .collection(REVOKED)
            .find(documents::revoked_since(since))
            .sort(documents::by_revocation_time())
            .await
            .with_context(|| format!("cannot read the revoked tasks in {}", self.at(REVOKED)))?;
        let mut revoked = Vec::new();
        while let Some(doc) = cursor.try_next().await? {
            revoked.extend(documents::revoked_of(&doc));
        }
        Ok(revoked)
    }

    async fn set_workflow_status(
        &self,
        workflow_id: &str,
        status: TaskStatus,
    ) -> anyhow::Result<()> {
        self.update_workflow(workflow_id, Some(status)).await?;
        Ok(())
    }

    async fn lock_for_resume(&self, workflow_id: &str, now: DateTime<Utc>) -> anyhow::Result<bool> {
        let result = self
            .collection(WORKFLOWS)
            .update_one(
                documents::not_resume_locked(workflow_id),
                documents::lock_for_resume(now),
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
        let filter = documents::created_before(names, cutoff, after);
        self.find_workflows(filter, documents::oldest_first(), limit)
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
                    .delete_many(documents::ids_in(batch))
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
            .delete_one(documents::by_id(id))
            .await
            .with_context(|| format!("cannot delete workflow {id} in {}", self.at(WORKFLOWS)))?;
        self.collection(START_ARGS)
            .delete_one(documents::by_id(id))
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
            .find_one(documents::by_id(source_dir))
            .await
            .with_context(|| {
                format!(
                    "cannot read the watch state of `{source_dir}` in {}",
                    self.at(WATCH_STATE)
                )
            })?;
        Ok(doc
            .as_ref()
            .map(documents::parse_watch_state)
            .unwrap_or_default())
    }

    async fn save_watch_state(&self, source_dir: &str, state: &WatchState) -> anyhow::Result<()> {
        self.db
            .collection::<WatchStateDocument<'_>>(WATCH_STATE)
            .replace_one(
                documents::by_id(source_dir),
                WatchStateDocument::new(source_dir, state),
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

    async fn record_fixity(&self, checks: &[FixityRecord]) -> anyhow::Result<()> {
        if checks.is_empty() {
            return Ok(());
        }
        self.db
            .collection::<FixityCheckDocument>(FIXITY_CHECKS)
            .insert_many(checks.iter().map(FixityCheckDocument::new))
            .await
            .with_context(|| {
                format!("cannot record fixity checks in {}", self.at(FIXITY_CHECKS))
            })?;
        // The standing after the checks: recorded second, so a crash in between leaves the
        // dataset first in line again, never a standing without its check.
        for check in checks {
            let Some(update) = documents::fixity_standing_update(check) else {
                continue;
            };
            self.collection(FIXITY_STANDINGS)
                .update_one(documents::by_id(check.dataset_id), update)
                .upsert(true)
                .await
                .with_context(|| {
                    format!(
                        "cannot record the fixity standing of dataset {} in {}",
                        check.dataset_id,
                        self.at(FIXITY_STANDINGS)
                    )
                })?;
        }
        Ok(())
    }

    async fn fixity_history(
        &self,
        dataset_id: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<FixityRecord>> {
        let docs: Vec<Document> = self
            .collection(FIXITY_CHECKS)
            .find(documents::fixity_checks_of(dataset_id))
            .sort(documents::newest_check_first())
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .with_context(|| format!("cannot read {}", self.at(FIXITY_CHECKS)))?
            .try_collect()
            .await
            .with_context(|| format!("cannot read {}", self.at(FIXITY_CHECKS)))?;
        Ok(docs.iter().map(documents::parse_fixity_check).collect())
    }

    async fn fixity_standings(&self) -> anyhow::Result<HashMap<i64, FixityStanding>> {
        let docs: Vec<Document> = self
            .collection(FIXITY_STANDINGS)
            .find(documents::all())
            .await
            .with_context(|| format!("cannot read {}", self.at(FIXITY_STANDINGS)))?
            .try_collect()
            .await
            .with_context(|| format!("cannot read {}", self.at(FIXITY_STANDINGS)))?;
        Ok(docs
            .iter()
            .filter_map(documents::parse_fixity_standing)
            .collect())
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
                documents::lease_takeable(name, holder, now),
                documents::hold_lease(holder, until),
            )
            .upsert(true)
            .await;
        match result {
            Ok(_) => {
                // When this holder took it, for `workers status`: matches only on a takeover.
                self.collection(LEASES)
                    .update_one(
                        documents::lease_taken_anew(name, holder),
                        documents::lease_since(holder, now),
                    )
                    .await
                    .with_context(|| {
                        format!(
                            "cannot record who took lease `{name}` in {}",
                            self.at(LEASES)
                        )
                    })?;
                Ok(true)
            }
            Err(err) if is_duplicate_key(&err) => Ok(false),
            Err(err) => Err(anyhow::Error::new(err)
                .context(format!("cannot take lease `{name}` in {}", self.at(LEASES)))),
        }
    }

    async fn server_time(&self) -> anyhow::Result<Option<DateTime<Utc>>> {
        self.server_now().await.map(Some)
    }

    async fn lease(&self, name: &str) -> anyhow::Result<Option<LeaseState>> {
        let now = self.server_now().await?;
        let doc = self
            .collection(LEASES)
            .find_one(documents::by_id(name))
            .await
            .with_context(|| format!("cannot read lease `{name}` in {}", self.at(LEASES)))?;
        Ok(doc
            .as_ref()
            .and_then(documents::parse_lease)
            .filter(|lease| lease.expires_at >= now))
    }

    async fn release_lease(&self, name: &str, holder: &str) -> anyhow::Result<()> {
        self.collection(LEASES)
            .delete_one(documents::lease_held(name, holder))
            .await
            .with_context(|| format!("cannot release lease `{name}` in {}", self.at(LEASES)))?;
        Ok(())
    }

    async fn last_slots(&self) -> anyhow::Result<HashMap<String, DateTime<Utc>>> {
        let docs: Vec<Document> = self
            .collection(JOB_SLOTS)
            .find(documents::all())
            .await
            .with_context(|| format!("cannot read {}", self.at(JOB_SLOTS)))?
            .try_collect()
            .await
            .with_context(|| format!("cannot read {}", self.at(JOB_SLOTS)))?;
        Ok(docs.iter().filter_map(documents::slot_of).collect())
    }

    async fn set_last_slot(&self, job: &str, slot: DateTime<Utc>) -> anyhow::Result<()> {
        // `$max`: a slot never moves back, whichever scheduler writes last.
        self.collection(JOB_SLOTS)
            .update_one(documents::by_id(job), documents::advance_slot(slot))
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
        let run = JobRunDocument::running(id, job, trigger, slot, host, dry_run, now);
        self.db
            .collection::<JobRunDocument>(JOB_RUNS)
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
                documents::by_id(id),
                documents::finish_run(outcome, counters, now),
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
        let run = JobRunDocument::skipped(id, job, trigger, slot, host, reason, now);
        self.db
            .collection::<JobRunDocument>(JOB_RUNS)
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
        let docs: Vec<Document> = self
            .collection(JOB_RUNS)
            .find(documents::runs_of(job))
            .sort(documents::newest_run_first())
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .with_context(|| format!("cannot read {}", self.at(JOB_RUNS)))?
            .try_collect()
            .await
            .with_context(|| format!("cannot read {}", self.at(JOB_RUNS)))?;
        docs.iter()
            .map(documents::parse_job_run)
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
                documents::running_on(host),
                documents::abandon_run(reason, now),
            )
            .await
            .with_context(|| format!("cannot close the runs of {host} in {}", self.at(JOB_RUNS)))?;
        Ok(result.modified_count)
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

#[async_trait]
impl SpaceLedger for MongoStore {
    async fn reserve_space(
        &self,
        fs: &str,
        holder: &str,
        bytes: u64,
        available: u64,
        ttl: std::time::Duration,
    ) -> anyhow::Result<bool> {
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        self.change_space(fs, holder, |now, own, others| {
            let reservation = |bytes| {
                SpaceChange::Hold(SpaceReservation {
                    holder: holder.to_owned(),
                    bytes,
                    expires_at: now + ttl,
                })
            };
            match own {
                // Held already: renewed without a second look at the free space, which the
                // holder's own output is using up.
                Some(own) => reservation(own.bytes.max(bytes)),
                None if others
                    .iter()
                    .map(|r| r.bytes)
                    .sum::<u64>()
                    .saturating_add(bytes)
                    <= available =>
                {
                    reservation(bytes)
                }
                None => SpaceChange::Nothing,
            }
        })
        .await
    }

    async fn release_space(&self, fs: &str, holder: &str) -> anyhow::Result<()> {
        self.change_space(fs, holder, |_, own, _| match own {
            Some(_) => SpaceChange::Drop,
            None => SpaceChange::Nothing,
        })
        .await?;
        Ok(())
    }

    async fn space_reservations(&self, fs: &str) -> anyhow::Result<Vec<SpaceReservation>> {
        let now = self.server_now().await?;
        let doc = self
            .collection(SPACE)
            .find_one(documents::by_id(fs))
            .await
            .with_context(|| format!("cannot read {}", self.at(SPACE)))?;
        let mut live: Vec<SpaceReservation> = doc
            .map(|doc| documents::parse_space(&doc).1)
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.expires_at >= now)
            .collect();
        live.sort_by(|a, b| a.holder.cmp(&b.holder));
        Ok(live)
    }
}

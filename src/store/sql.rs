//! The workflow store, the scheduler's records and the space ledger in a SQL database: the
//! embedded SQLite file or a shared PostgreSQL database (`crate::sql`).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    FixityRecord, FixityResult, FixityStanding, JobRun, LeaseState, PageCursor, RunOutcome,
    SchedulerStore, SpaceLedger, SpaceReservation, StepSpec, TaskClaim, TaskError, TaskMeta,
    TaskRun, TaskStart, TaskStatus, Trigger, WatchState, Workflow, WorkflowFilter, WorkflowSpec,
    WorkflowStep, WorkflowStore,
};
use crate::args;
use crate::sql::{Conn, Database, Engine, Row, ToValue, Value, json_list};
use crate::sqlite::{from_millis, to_millis};

pub struct SqlStore {
    db: Database,
    /// The steps of workflows read before. A workflow's steps never change once it exists, so
    /// running one of its steps reads only the workflow's row and its runs: one statement.
    steps: std::sync::Mutex<HashMap<String, Arc<Vec<StepSpec>>>>,
}

/// How many workflows' steps are kept; all are forgotten when there would be more (a miss
/// costs one statement).
const STEPS_KEPT: usize = 4096;

impl SqlStore {
    fn steps_of(&self, workflow_id: &str) -> Option<Arc<Vec<StepSpec>>> {
        self.steps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(workflow_id)
            .cloned()
    }

    /// `load_step_state` with the steps kept here.
    async fn load_step_state(
        &self,
        workflow_id: &str,
        task_id: Option<&str>,
    ) -> anyhow::Result<(Option<Workflow>, Option<TaskMeta>)> {
        let known = self.steps_of(workflow_id);
        let (id, task_id) = (workflow_id.to_owned(), task_id.map(str::to_owned));
        let loaded = {
            let id = id.clone();
            self.db
                .read(move |conn| load_step_state(conn, &id, task_id.as_deref(), known.clone()))
                .await?
        };
        let Some((workflow, meta, steps)) = loaded else {
            return Ok((None, None));
        };
        let mut kept = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= STEPS_KEPT && !kept.contains_key(&id) {
            kept.clear();
        }
        kept.insert(id, steps);
        Ok((Some(workflow), meta))
    }

    pub fn new(db: impl Into<Database>) -> SqlStore {
        SqlStore {
            db: db.into(),
            steps: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

fn json_text(value: &serde_json::Value) -> String {
    value.to_string()
}

/// The columns of `workflows` that `workflow_from_row` reads, in its order.
const WORKFLOW_COLUMNS: &str =
    "w.id, w.name, w.app_id, w.description, w.status, w.resume_lock, w.created_at, w.updated_at";

fn load_workflow(conn: &mut dyn Conn, id: &str) -> anyhow::Result<Option<Workflow>> {
    let Some(row) = conn.query_opt(
        &format!("SELECT {WORKFLOW_COLUMNS}, w.start_args FROM workflows w WHERE w.id = ?1"),
        args![id],
    )?
    else {
        return Ok(None);
    };
    let mut workflow = workflow_from_row(&row, &load_steps(conn, id)?)?;
    let start_args: String = row.get(8)?;
    workflow.start_args = serde_json::from_str(&start_args).unwrap_or_default();
    let runs = conn.query(
        "SELECT position, task_id, date_start FROM task_runs WHERE workflow_id = ?1 ORDER BY seq",
        args![id],
    )?;
    for run in &runs {
        add_run(&mut workflow, run, 0)?;
    }
    Ok(Some(workflow))
}

/// A workflow, the stored result of one of its tasks, and the workflow's steps to keep.
type StepState = (Workflow, Option<TaskMeta>, Arc<Vec<StepSpec>>);

/// `load_workflow` without the start arguments, with the stored result of task `task_id`
/// (if given):
/// what running one of the workflow's steps needs, in one statement (the workflow's row, its
/// runs and the task's result), with the steps from `steps` when they were read before.
/// Returns the steps too, for the next time.
fn load_step_state(
    conn: &mut dyn Conn,
    id: &str,
    task_id: Option<&str>,
    steps: Option<Arc<Vec<StepSpec>>>,
) -> anyhow::Result<Option<StepState>> {
    let rows = conn.query(
        &format!(
            "SELECT {WORKFLOW_COLUMNS}, r.position, r.task_id, r.date_start, {META_COLUMNS}
             FROM workflows w LEFT JOIN task_runs r ON r.workflow_id = w.id
                 LEFT JOIN task_meta m ON m.task_id = ?2
             WHERE w.id = ?1 ORDER BY r.seq"
        ),
        args![id, task_id],
    )?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let steps = match steps {
        Some(steps) => steps,
        None => Arc::new(load_steps(conn, id)?),
    };
    let mut workflow = workflow_from_row(first, &steps)?;
    for row in &rows {
        if row.get::<Option<String>>(9)?.is_some() {
            add_run(&mut workflow, row, 8)?;
        }
    }
    let meta = match first.get::<Option<String>>(11)? {
        Some(_) => Some(meta_from_row(first, 11)?),
        None => None,
    };
    Ok(Some((workflow, meta, steps)))
}

fn load_steps(conn: &mut dyn Conn, id: &str) -> anyhow::Result<Vec<StepSpec>> {
    conn.query(
        "SELECT position, name, task, queue, kwargs, priority FROM workflow_steps
         WHERE workflow_id = ?1 ORDER BY position",
        args![id],
    )?
    .iter()
    .map(|r| {
        let kwargs: Option<String> = r.get(4)?;
        Ok(StepSpec {
            name: r.get(1)?,
            task: r.get(2)?,
            queue: r.get(3)?,
            kwargs: kwargs.and_then(|k| serde_json::from_str(&k).ok()),
            priority: r.get::<Option<i64>>(5)?.map(|p| p.clamp(0, 255) as u8),
        })
    })
    .collect()
}

/// A workflow from the `WORKFLOW_COLUMNS` of `row`, with `steps` and no runs or start arguments.
fn workflow_from_row(row: &Row, steps: &[StepSpec]) -> anyhow::Result<Workflow> {
    let status: String = row.get(4)?;
    Ok(Workflow {
        id: row.get(0)?,
        name: row.get(1)?,
        app_id: row.get(2)?,
        description: row.get(3)?,
        created_at: from_millis(row.get(6)?),
        updated_at: row.get::<Option<i64>>(7)?.map(from_millis),
        status_cache: TaskStatus::parse(&status).unwrap_or(TaskStatus::Pending),
        resume_lock: row.get::<Option<i64>>(5)?.map(from_millis),
        start_args: Vec::new(),
        steps: steps
            .iter()
            .map(|spec| WorkflowStep {
                spec: spec.clone(),
                runs: Vec::new(),
            })
            .collect(),
    })
}

/// Adds the run in columns `at..at + 3` of `row` (position, task id, start) to its step.
fn add_run(workflow: &mut Workflow, row: &Row, at: usize) -> anyhow::Result<()> {
    let position: usize = row.get(at)?;
    if let Some(step) = workflow.steps.get_mut(position) {
        step.runs.push(TaskRun {
            task_id: row.get(at + 1)?,
            date_start: from_millis(row.get(at + 2)?),
        });
    }
    Ok(())
}

/// The workflows of `ids` that exist, in that order.
fn load_workflows(conn: &mut dyn Conn, ids: &[String]) -> anyhow::Result<Vec<Workflow>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(workflow) = load_workflow(conn, id)? {
            out.push(workflow);
        }
    }
    Ok(out)
}

/// The columns of `task_meta` (as `m`) that `meta_from_row` reads, in its order.
const META_COLUMNS: &str = "m.task_id, m.status, m.result, m.traceback, m.date_done, m.name, m.args, \
     m.kwargs, m.worker, m.retries, m.queue, m.starts";

/// The task meta in the `META_COLUMNS` of `r` from column `at` on.
fn meta_from_row(r: &Row, at: usize) -> anyhow::Result<TaskMeta> {
    let status: String = r.get(at + 1)?;
    let result: Option<String> = r.get(at + 2)?;
    let args: Option<String> = r.get(at + 6)?;
    let kwargs: Option<String> = r.get(at + 7)?;
    Ok(TaskMeta {
        task_id: r.get(at)?,
        status: TaskStatus::parse(&status).unwrap_or(TaskStatus::Pending),
        result: result
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null),
        traceback: r.get(at + 3)?,
        date_done: r.get::<Option<i64>>(at + 4)?.map(from_millis),
        name: r.get(at + 5)?,
        args: args
            .and_then(|a| serde_json::from_str(&a).ok())
            .unwrap_or_default(),
        kwargs: kwargs
            .and_then(|k| serde_json::from_str(&k).ok())
            .unwrap_or_default(),
        worker: r.get(at + 8)?,
        retries: r.get(at + 9)?,
        queue: r.get(at + 10)?,
        starts: r.get(at + 11)?,
    })
}

fn touch(tx: &mut dyn Conn, workflow_id: &str, status: Option<TaskStatus>) -> anyhow::Result<()> {
    tx.execute(
        "UPDATE workflows SET status = COALESCE(CAST(?2 AS TEXT), status), updated_at = ?3 WHERE id = ?1",
        args![
            workflow_id,
            status.map(|s| s.as_str()),
            to_millis(Utc::now())
        ],
    )?;
    Ok(())
}

/// Stores status (?2), result (?3), end (?4) and, unless NULL, retry count (?5) of task ?1:
/// every state after STARTED.
macro_rules! set_result_sql {
    () => {
        "INSERT INTO task_meta (task_id, status, result, date_done, retries)
         VALUES (?1, ?2, ?3, ?4, COALESCE(CAST(?5 AS BIGINT), 0))
         ON CONFLICT (task_id) DO UPDATE SET status = excluded.status, result = excluded.result,
            date_done = excluded.date_done, retries = COALESCE(CAST(?5 AS BIGINT), task_meta.retries)"
    };
}

/// The statements that record a start (sca-rhythm's `before_start`), on the parameters
/// task id (?1), `{pid, hostname}` (?2), task name, args, kwargs, worker, retries, queue
/// (?3 to ?8), workflow id (?9, NULL for a plain task), position (?10) and now (?11).
/// The run is appended unless the task id has one.
macro_rules! task_run_sql {
    () => {
        "INSERT INTO task_runs (task_id, workflow_id, position, date_start)
         SELECT ?1, ?9, ?10, ?11 WHERE CAST(?9 AS TEXT) IS NOT NULL
         ON CONFLICT (task_id) DO NOTHING"
    };
}

/// STARTED with `{pid, hostname}`, counting the start.
macro_rules! task_started_sql {
    () => {
        "INSERT INTO task_meta (task_id, status, result, name, args, kwargs, worker, retries, queue, starts)
         VALUES (?1, 'STARTED', ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1)
         ON CONFLICT (task_id) DO UPDATE SET status = 'STARTED', result = excluded.result,
            date_done = NULL, worker = excluded.worker, retries = excluded.retries,
            args = excluded.args, kwargs = excluded.kwargs, starts = task_meta.starts + 1"
    };
}

/// The workflow STARTED, its resume lock cleared.
macro_rules! workflow_started_sql {
    () => {
        "UPDATE workflows SET status = 'STARTED', resume_lock = NULL, updated_at = ?11 WHERE id = ?9"
    };
}

/// Stores status and result of a task (every state after STARTED): one statement, so that
/// it can run alone (`Database::write_alone`).
fn set_result(
    tx: &mut dyn Conn,
    task_id: &str,
    status: TaskStatus,
    result: &serde_json::Value,
    retries: Option<u32>,
) -> anyhow::Result<()> {
    tx.execute(
        set_result_sql!(),
        &result_values(task_id, status, result, retries),
    )?;
    Ok(())
}

/// The parameters of `set_result_sql!`: a done state is dated now.
fn result_values(
    task_id: &str,
    status: TaskStatus,
    result: &serde_json::Value,
    retries: Option<u32>,
) -> Vec<Value> {
    let date_done = status.is_done().then(|| to_millis(Utc::now()));
    args![
        task_id,
        status.as_str(),
        json_text(result),
        date_done,
        retries
    ]
    .to_vec()
}

#[async_trait]
impl WorkflowStore for SqlStore {
    async fn create_workflow(
        &self,
        id: &str,
        app_id: &str,
        spec: &WorkflowSpec,
        start_args: &[serde_json::Value],
    ) -> anyhow::Result<()> {
        self.create_workflows(app_id, spec, &[(id.to_owned(), start_args.to_vec())])
            .await
    }

    async fn create_workflows(
        &self,
        app_id: &str,
        spec: &WorkflowSpec,
        workflows: &[(String, Vec<serde_json::Value>)],
    ) -> anyhow::Result<()> {
        let (app_id, spec, workflows) = (app_id.to_owned(), spec.clone(), workflows.to_vec());
        self.db
            .write(move |tx| {
                let now = to_millis(Utc::now());
                let kwargs: Vec<Option<String>> = spec
                    .steps
                    .iter()
                    .map(|s| s.kwargs.as_ref().map(|k| serde_json::Value::Object(k.clone()).to_string()))
                    .collect();
                for (id, start_args) in &workflows {
                    let start_args = serde_json::Value::from(start_args.clone());
                    tx.execute(
                        "INSERT INTO workflows (id, name, app_id, description, status, start_args, created_at)
                         VALUES (?1, ?2, ?3, ?4, 'PENDING', ?5, ?6)",
                        args![id, spec.name, app_id, spec.description, json_text(&start_args), now],
                    )?;
                    for (position, s) in spec.steps.iter().enumerate() {
                        tx.execute(
                            "INSERT INTO workflow_steps (workflow_id, position, name, task, queue, kwargs, priority)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                            args![
                            id,
                            position as i64,
                            s.name,
                            s.task,
                            s.queue,
                            kwargs[position],
                            s.priority.map(i64::from)
                        ],
                        )?;
                    }
                }
                Ok(())
            })
            .await
    }

    async fn workflow(&self, id: &str) -> anyhow::Result<Option<Workflow>> {
        let id = id.to_owned();
        self.db.read(move |conn| load_workflow(conn, &id)).await
    }

    async fn workflow_for_step(&self, id: &str) -> anyhow::Result<Option<Workflow>> {
        Ok(self.load_step_state(id, None).await?.0)
    }

    async fn step_state(
        &self,
        workflow_id: &str,
        task_id: &str,
    ) -> anyhow::Result<(Option<Workflow>, Option<TaskMeta>)> {
        self.load_step_state(workflow_id, Some(task_id)).await
    }

    async fn workflows(
        &self,
        filter: WorkflowFilter,
        limit: usize,
    ) -> anyhow::Result<Vec<Workflow>> {
        self.db
            .read(move |conn| {
                let sql = match filter {
                    WorkflowFilter::All => {
                        "SELECT id FROM workflows ORDER BY created_at DESC, id LIMIT ?1"
                    }
                    WorkflowFilter::Active => {
                        "SELECT id FROM workflows WHERE status IN ('PENDING', 'STARTED')
                         ORDER BY created_at DESC, id LIMIT ?1"
                    }
                };
                let ids = conn
                    .query(sql, args![limit])?
                    .iter()
                    .map(|r| r.get(0))
                    .collect::<anyhow::Result<Vec<String>>>()?;
                load_workflows(conn, &ids)
            })
            .await
    }

    async fn task_metas(&self, task_ids: &[String]) -> anyhow::Result<HashMap<String, TaskMeta>> {
        let task_ids = task_ids.to_vec();
        self.db
            .read(move |conn| {
                let rows = conn.query(
                    &format!(
                        "SELECT {META_COLUMNS} FROM task_meta m WHERE m.task_id IN {{text_list ?1}}"
                    ),
                    args![json_list(&task_ids)],
                )?;
                rows.iter()
                    .map(|r| meta_from_row(r, 0).map(|meta| (meta.task_id.clone(), meta)))
                    .collect()
            })
            .await
    }

    async fn task_result(&self, task_id: &str) -> anyhow::Result<Option<TaskMeta>> {
        // By the key alone: a list of one, as `task_metas` takes, can cost PostgreSQL a scan.
        let task_id = task_id.to_owned();
        self.db
            .read(move |conn| {
                conn.query_opt(
                    &format!("SELECT {META_COLUMNS} FROM task_meta m WHERE m.task_id = ?1"),
                    args![task_id],
                )?
                .map(|row| meta_from_row(&row, 0))
                .transpose()
            })
            .await
    }

    async fn claim_task(
        &self,
        task_id: &str,
        holder: &str,
        ttl: std::time::Duration,
        _count_start: bool,
    ) -> anyhow::Result<TaskClaim> {
        // A lease like the scheduler's; a write here costs no round trip, so the start is
        // counted with the rest of STARTED (`task_meta.starts`).
        let held = self
            .acquire_lease(&task_claim_name(task_id), holder, ttl)
            .await?;
        Ok(if held {
            TaskClaim::Held {
                start_counted: false,
            }
        } else {
            TaskClaim::Busy
        })
    }

    async fn release_task(
        &self,
        task_id: &str,
        holder: &str,
        _uncount: bool,
    ) -> anyhow::Result<()> {
        self.release_lease(&task_claim_name(task_id), holder).await
    }

    async fn task_started(&self, start: &TaskStart) -> anyhow::Result<()> {
        let result = serde_json::json!({"pid": start.pid, "hostname": start.hostname});
        let values = args![
            start.task_id,
            json_text(&result),
            start.task_name,
            json_text(&serde_json::Value::from(start.args.clone())),
            json_text(&serde_json::Value::Object(start.kwargs.clone())),
            start.hostname,
            start.retries,
            start.queue,
            start.workflow_id,
            start.position,
            to_millis(Utc::now())
        ]
        .to_vec();
        match self.db.engine() {
            // One statement, its own transaction: no BEGIN and COMMIT round trips on the path
            // of every step.
            Engine::Postgres => {
                self.db
                    .write_alone(move |tx| {
                        tx.execute(
                            concat!(
                                "WITH run AS (",
                                task_run_sql!(),
                                "), meta AS (",
                                task_started_sql!(),
                                ") ",
                                workflow_started_sql!()
                            ),
                            &values,
                        )
                    })
                    .await?;
            }
            Engine::Sqlite => {
                self.db
                    .write(move |tx| {
                        // A plain Celery task (no workflow, ?9 NULL) changes no run or
                        // workflow.
                        tx.execute(task_run_sql!(), &values)?;
                        tx.execute(task_started_sql!(), &values[..8])?;
                        tx.execute(workflow_started_sql!(), &values)?;
                        Ok(())
                    })
                    .await?;
            }
        }
        Ok(())
    }

    async fn task_progress(
        &self,
        task_id: &str,
        progress: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let (task_id, progress) = (task_id.to_owned(), json_text(progress));
        self.db
            .write_alone(move |tx| {
                tx.execute(
                    "UPDATE task_meta SET result = ?2 WHERE task_id = ?1 AND status = 'STARTED'",
                    args![task_id, progress],
                )?;
                Ok(())
            })
            .await
    }

    async fn task_retry(
        &self,
        task_id: &str,
        error: &TaskError,
        retries: u32,
    ) -> anyhow::Result<()> {
        let (task_id, error) = (task_id.to_owned(), error.to_json());
        self.db
            .write_alone(move |tx| {
                set_result(tx, &task_id, TaskStatus::Retry, &error, Some(retries))
            })
            .await
    }

    async fn task_succeeded_from(
        &self,
        start: &TaskStart,
        result: &serde_json::Value,
    ) -> anyhow::Result<Option<TaskStatus>> {
        let mut values = result_values(&start.task_id, TaskStatus::Success, result, None);
        values.push(start.workflow_id.to_value());
        // The result stored and the workflow's status read back: one statement on PostgreSQL,
        // one transaction on SQLite. A step's result does not wait for a disk flush: the
        // engine settles the step's message (or ends the workflow) next, with one; a database
        // crash before then loses the result with the message's settling, and the step runs
        // again, as it does when its worker dies at that moment.
        let status = match self.db.engine() {
            Engine::Postgres => {
                self.db
                    .write_alone(move |tx| {
                        tx.query_opt(
                            concat!(
                                "WITH meta AS (",
                                set_result_sql!(),
                                ") SELECT status FROM workflows",
                                " WHERE id = ?6 AND {unflushed_commit}"
                            ),
                            &values,
                        )
                    })
                    .await?
            }
            Engine::Sqlite => {
                self.db
                    .write(move |tx| {
                        tx.execute(set_result_sql!(), &values[..5])?;
                        tx.query_opt("SELECT status FROM workflows WHERE id = ?1", &values[5..])
                    })
                    .await?
            }
        };
        status
            .map(|row| {
                let status: String = row.get(0)?;
                Ok(TaskStatus::parse(&status).unwrap_or(TaskStatus::Pending))
            })
            .transpose()
    }

    async fn task_succeeded(
        &self,
        task_id: &str,
        result: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let (task_id, result) = (task_id.to_owned(), result.clone());
        self.db
            .write_alone(move |tx| set_result(tx, &task_id, TaskStatus::Success, &result, None))
            .await
    }

    async fn task_failed(
        &self,
        workflow_id: Option<&str>,
        task_id: &str,
        error: &TaskError,
    ) -> anyhow::Result<()> {
        let (workflow_id, task_id, error) = (
            workflow_id.map(str::to_owned),
            task_id.to_owned(),
            error.to_json(),
        );
        self.db
            .write(move |tx| {
                set_result(tx, &task_id, TaskStatus::Failure, &error, None)?;
                match &workflow_id {
                    Some(workflow_id) => touch(tx, workflow_id, Some(TaskStatus::Failure)),
                    None => Ok(()),
                }
            })
            .await
    }

    async fn task_revoked(&self, task_id: &str, reason: &str) -> anyhow::Result<()> {
        let (task_id, error) = (task_id.to_owned(), TaskError::revoked(reason).to_json());
        self.db
            .write_alone(move |tx| set_result(tx, &task_id, TaskStatus::Revoked, &error, None))
            .await
    }

    async fn remember_revoked(&self, task_ids: &[String], at: DateTime<Utc>) -> anyhow::Result<()> {
        let (task_ids, at) = (task_ids.to_vec(), to_millis(at));
        self.db
            .write(move |tx| {
                for task_id in &task_ids {
                    tx.execute(
                        "INSERT INTO revoked_tasks (task_id, revoked_at) VALUES (?1, ?2)
                         ON CONFLICT (task_id) DO UPDATE SET revoked_at = excluded.revoked_at",
                        args![task_id, at],
                    )?;
                }
                Ok(())
            })
            .await
    }

    async fn forget_revoked_before(&self, cutoff: DateTime<Utc>) -> anyhow::Result<()> {
        let cutoff = to_millis(cutoff);
        self.db
            .write(move |tx| {
                tx.execute(
                    "DELETE FROM revoked_tasks WHERE revoked_at < ?1",
                    args![cutoff],
                )?;
                Ok(())
            })
            .await
    }

    async fn revoked_since(
        &self,
        since: DateTime<Utc>,
    ) -> anyhow::Result<Vec<(String, DateTime<Utc>)>> {
        let since = to_millis(since);
        self.db
            .read(move |conn| {
                conn.query(
                    "SELECT task_id, revoked_at FROM revoked_tasks WHERE revoked_at >= ?1
                     ORDER BY revoked_at",
                    args![since],
                )?
                .iter()
                .map(|r| Ok((r.get::<String>(0)?, from_millis(r.get(1)?))))
                .collect()
            })
            .await
    }

    async fn workflow_status(&self, id: &str) -> anyhow::Result<Option<TaskStatus>> {
        let id = id.to_owned();
        self.db
            .read(move |conn| {
                let status: Option<String> = conn
                    .query_opt("SELECT status FROM workflows WHERE id = ?1", args![id])?
                    .map(|r| r.get(0))
                    .transpose()?;
                Ok(status.map(|s| TaskStatus::parse(&s).unwrap_or(TaskStatus::Pending)))
            })
            .await
    }

    async fn set_workflow_status(
        &self,
        workflow_id: &str,
        status: TaskStatus,
    ) -> anyhow::Result<()> {
        let workflow_id = workflow_id.to_owned();
        self.db
            .write(move |tx| touch(tx, &workflow_id, Some(status)))
            .await
    }

    async fn lock_for_resume(&self, workflow_id: &str, now: DateTime<Utc>) -> anyhow::Result<bool> {
        let workflow_id = workflow_id.to_owned();
        self.db
            .write(move |tx| {
                let changed = tx.execute(
                    "UPDATE workflows SET resume_lock = ?2, updated_at = ?2 WHERE id = ?1 AND resume_lock IS NULL",
                    args![workflow_id, to_millis(now)],
                )?;
                Ok(changed == 1)
            })
            .await
    }

    async fn workflows_created_before(
        &self,
        names: &[String],
        cutoff: DateTime<Utc>,
        after: Option<&PageCursor>,
        limit: usize,
    ) -> anyhow::Result<Vec<Workflow>> {
        let names = names.to_vec();
        let (after_created, after_id) = match after {
            Some(cursor) => (Some(to_millis(cursor.created_at)), Some(cursor.id.clone())),
            None => (None, None),
        };
        self.db
            .read(move |conn| {
                let ids = conn
                    .query(
                        "SELECT id FROM workflows
                         WHERE name IN {text_list ?1} AND created_at <= ?2
                           AND (CAST(?3 AS BIGINT) IS NULL OR (created_at, id) > (?3, ?4))
                         ORDER BY created_at, id LIMIT ?5",
                        args![
                            json_list(&names),
                            to_millis(cutoff),
                            after_created,
                            after_id,
                            limit
                        ],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect::<anyhow::Result<Vec<String>>>()?;
                load_workflows(conn, &ids)
            })
            .await
    }

    async fn delete_workflow(&self, id: &str) -> anyhow::Result<()> {
        let (id, deleted) = (id.to_owned(), id);
        self.db
            .write(move |tx| {
                tx.execute(
                    "DELETE FROM task_meta WHERE task_id IN (SELECT task_id FROM task_runs WHERE workflow_id = ?1)",
                    args![id],
                )?;
                let queued = match tx.engine() {
                    Engine::Sqlite => "DELETE FROM queue WHERE json_extract(kwargs, '$.workflow_id') = ?1",
                    Engine::Postgres => "DELETE FROM queue WHERE CAST(kwargs AS json) ->> 'workflow_id' = ?1",
                };
                tx.execute(queued, args![id])?;
                // Steps and runs go with the workflow (ON DELETE CASCADE).
                tx.execute("DELETE FROM workflows WHERE id = ?1", args![id])?;
                Ok(())
            })
            .await?;
        self.steps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(deleted);
        Ok(())
    }

    async fn watch_state(&self, source_dir: &str) -> anyhow::Result<WatchState> {
        let source_dir = source_dir.to_owned();
        self.db
            .read(move |conn| {
                let row = conn.query_opt(
                    "SELECT scan_count, known FROM watch_state WHERE source_dir = ?1",
                    args![source_dir],
                )?;
                Ok(match row {
                    Some(row) => WatchState {
                        scan_count: row.get(0)?,
                        known: serde_json::from_str(&row.get::<String>(1)?).unwrap_or_default(),
                    },
                    None => WatchState::default(),
                })
            })
            .await
    }

    async fn save_watch_state(&self, source_dir: &str, state: &WatchState) -> anyhow::Result<()> {
        let (source_dir, state) = (source_dir.to_owned(), state.clone());
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO watch_state (source_dir, scan_count, known) VALUES (?1, ?2, ?3)
                     ON CONFLICT (source_dir) DO UPDATE SET scan_count = excluded.scan_count, known = excluded.known",
                    args![source_dir, state.scan_count, serde_json::to_string(&state.known)?],
                )?;
                Ok(())
            })
            .await
    }

    async fn record_fixity(&self, checks: &[FixityRecord]) -> anyhow::Result<()> {
        let checks = checks.to_vec();
        self.db
            .write(move |tx| {
                for check in &checks {
                    tx.execute(
                    "INSERT INTO fixity_checks
                       (dataset_id, copy, checked_at, result, files, bytes_read, differences, detail, by)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    args![
                        check.dataset_id,
                        check.copy,
                        to_millis(check.checked_at),
                        check.result.as_str(),
                        check.files as i64,
                        check.bytes_read as i64,
                        check.differences as i64,
                        check.detail,
                        check.by,
                    ])?;
                }
                Ok(())
            })
            .await
    }

    async fn fixity_history(
        &self,
        dataset_id: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<FixityRecord>> {
        self.db
            .read(move |conn| {
                let rows = conn.query(
                    "SELECT copy, checked_at, result, files, bytes_read, differences, detail, by
                     FROM fixity_checks WHERE dataset_id = ?1
                     ORDER BY checked_at DESC, seq DESC LIMIT ?2",
                    args![dataset_id, limit],
                )?;
                rows.iter()
                    .map(|r| {
                        let result: String = r.get(2)?;
                        Ok(FixityRecord {
                            dataset_id,
                            copy: r.get(0)?,
                            checked_at: from_millis(r.get(1)?),
                            result: FixityResult::parse(&result).unwrap_or(FixityResult::Error),
                            files: r.get::<i64>(3)?.max(0) as u64,
                            bytes_read: r.get::<i64>(4)?.max(0) as u64,
                            differences: r.get::<i64>(5)?.max(0) as u64,
                            detail: r.get(6)?,
                            by: r.get(7)?,
                        })
                    })
                    .collect()
            })
            .await
    }

    async fn fixity_standings(&self) -> anyhow::Result<HashMap<i64, FixityStanding>> {
        self.db
            .read(move |conn| {
                let rows = conn.query(
                    "SELECT dataset_id,
                            MAX(checked_at) FILTER (WHERE result != 'error'),
                            MAX(checked_at) FILTER (WHERE result IN ('intact', 'differs'))
                     FROM fixity_checks GROUP BY dataset_id",
                    args![],
                )?;
                let mut standings = rows
                    .iter()
                    .map(|r| {
                        Ok((
                            r.get::<i64>(0)?,
                            FixityStanding {
                                checked_at: r.get::<Option<i64>>(1)?.map(from_millis),
                                verified_at: r.get::<Option<i64>>(2)?.map(from_millis),
                                failing: false,
                            },
                        ))
                    })
                    .collect::<anyhow::Result<HashMap<_, _>>>()?;
                // A copy whose last verdict is a difference: no intact check of it since.
                let failing = conn.query(
                    "SELECT DISTINCT c.dataset_id FROM fixity_checks c
                     WHERE c.result = 'differs' AND NOT EXISTS (
                        SELECT 1 FROM fixity_checks d
                        WHERE d.dataset_id = c.dataset_id AND d.copy = c.copy
                          AND d.result = 'intact' AND d.seq > c.seq)",
                    args![],
                )?;
                for row in &failing {
                    if let Some(standing) = standings.get_mut(&row.get::<i64>(0)?) {
                        standing.failing = true;
                    }
                }
                Ok(standings)
            })
            .await
    }
}

/// The lease, run and slot records of the scheduler, in the same database.
/// Takes or renews a lease: (name, holder, ttl in ms); changes one row when `holder` holds it
/// now. Judged by the database's own clock (every process sharing the file is on this host).
/// The lease that is a task's claim.
fn task_claim_name(task_id: &str) -> String {
    format!("task/{task_id}")
}

const LEASE_UPSERT: &str = "INSERT INTO leases (name, holder, expires_at, since)
     VALUES (?1, ?2, {now_ms} + ?3,
             {now_ms})
     ON CONFLICT (name) DO UPDATE SET
         since = CASE WHEN leases.holder = excluded.holder
                      THEN COALESCE(leases.since, excluded.since) ELSE excluded.since END,
         holder = excluded.holder, expires_at = excluded.expires_at
     WHERE leases.holder = excluded.holder
        OR leases.expires_at < {now_ms}";

#[async_trait]
impl SchedulerStore for SqlStore {
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> anyhow::Result<bool> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        let ttl = ttl.as_millis() as i64;
        self.db
            .write(move |tx| {
                // The database's own clock (every process sharing the file is on this host).
                let changed = tx.execute(LEASE_UPSERT, args![name, holder, ttl])?;
                Ok(changed == 1)
            })
            .await
    }

    async fn acquire_leases(
        &self,
        names: &[String],
        holder: &str,
        ttl: std::time::Duration,
    ) -> anyhow::Result<Vec<bool>> {
        let (names, holder) = (names.to_vec(), holder.to_owned());
        let ttl = ttl.as_millis() as i64;
        self.db
            .write(move |tx| {
                let mut held = Vec::with_capacity(names.len());
                for name in &names {
                    held.push(tx.execute(LEASE_UPSERT, args![name, holder, ttl])? == 1);
                }
                Ok(held)
            })
            .await
    }

    async fn release_leases(&self, names: &[String], holder: &str) -> anyhow::Result<()> {
        let (names, holder) = (names.to_vec(), holder.to_owned());
        self.db
            .write(move |tx| {
                for name in &names {
                    tx.execute(
                        "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                        args![name, holder],
                    )?;
                }
                Ok(())
            })
            .await
    }

    async fn server_time(&self) -> anyhow::Result<Option<DateTime<Utc>>> {
        // SQLite's clock is this host's.
        if self.db.engine() == Engine::Sqlite {
            return Ok(None);
        }
        self.db
            .read(|conn| {
                let now = conn.query_one("SELECT {now_ms}", args![])?.get(0)?;
                Ok(Some(from_millis(now)))
            })
            .await
    }

    async fn lease(&self, name: &str) -> anyhow::Result<Option<LeaseState>> {
        let name = name.to_owned();
        self.db
            .read(move |conn| {
                conn.query_opt(
                    "SELECT holder, expires_at, since FROM leases WHERE name = ?1
                     AND expires_at >= {now_ms}",
                    args![name],
                )?
                .map(|r| {
                    Ok(LeaseState {
                        holder: r.get(0)?,
                        expires_at: from_millis(r.get(1)?),
                        since: r.get::<Option<i64>>(2)?.map(from_millis),
                    })
                })
                .transpose()
            })
            .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> anyhow::Result<()> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.db
            .write(move |tx| {
                tx.execute(
                    "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                    args![name, holder],
                )?;
                Ok(())
            })
            .await
    }

    async fn last_slots(&self) -> anyhow::Result<HashMap<String, DateTime<Utc>>> {
        self.db
            .read(|conn| {
                conn.query("SELECT job, slot FROM job_slots", args![])?
                    .iter()
                    .map(|r| Ok((r.get::<String>(0)?, from_millis(r.get(1)?))))
                    .collect()
            })
            .await
    }

    async fn set_last_slot(&self, job: &str, slot: DateTime<Utc>) -> anyhow::Result<()> {
        let job = job.to_owned();
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO job_slots (job, slot) VALUES (?1, ?2)
                     ON CONFLICT (job) DO UPDATE SET slot = CASE WHEN job_slots.slot > excluded.slot
                         THEN job_slots.slot ELSE excluded.slot END",
                    args![job, to_millis(slot)],
                )?;
                Ok(())
            })
            .await
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
        let (job, host) = (job.to_owned(), host.to_owned());
        self.db
            .write(move |tx| {
                tx.query_one(
                    "INSERT INTO job_runs (job, trigger, slot, started_at, outcome, host, dry_run)
                     VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6) RETURNING id",
                    args![
                        job,
                        trigger.as_str(),
                        slot.map(to_millis),
                        to_millis(now),
                        host,
                        dry_run
                    ],
                )?
                .get(0)
            })
            .await
    }

    async fn finish_run(
        &self,
        id: i64,
        outcome: &RunOutcome,
        counters: &serde_json::Map<String, serde_json::Value>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let (outcome, counters) = (
            outcome.clone(),
            serde_json::Value::Object(counters.clone()).to_string(),
        );
        self.db
            .write(move |tx| {
                tx.execute(
                    "UPDATE job_runs SET outcome = ?2, error = ?3, counters = ?4, ended_at = ?5 WHERE id = ?1",
                    args![id, outcome.as_str(), outcome.reason(), counters, to_millis(now)],
                )?;
                Ok(())
            })
            .await
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
        let (job, host, reason) = (job.to_owned(), host.to_owned(), reason.to_owned());
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO job_runs (job, trigger, slot, started_at, ended_at, outcome, error, host)
                     VALUES (?1, ?2, ?3, ?4, ?4, 'skipped', ?5, ?6)",
                    args![job, trigger.as_str(), to_millis(slot), to_millis(now), reason, host],
                )?;
                Ok(())
            })
            .await
    }

    async fn runs(&self, job: Option<&str>, limit: usize) -> anyhow::Result<Vec<JobRun>> {
        let job = job.map(str::to_owned);
        self.db
            .read(move |conn| {
                let rows = conn.query(
                    "SELECT id, job, trigger, slot, started_at, ended_at, outcome, error, counters, host, dry_run
                     FROM job_runs WHERE (CAST(?1 AS TEXT) IS NULL OR job = ?1) ORDER BY id DESC LIMIT ?2",
                    args![job, limit],
                )?;
                rows.iter().map(|r| {
                    let outcome: String = r.get(6)?;
                    let error: Option<String> = r.get(7)?;
                    let counters: String = r.get(8)?;
                    Ok(JobRun {
                        id: r.get(0)?,
                        job: r.get(1)?,
                        trigger: r.get(2)?,
                        slot: r.get::<Option<i64>>(3)?.map(from_millis),
                        started_at: from_millis(r.get(4)?),
                        ended_at: r.get::<Option<i64>>(5)?.map(from_millis),
                        outcome: match outcome.as_str() {
                            "success" => RunOutcome::Success,
                            "failed" => RunOutcome::Failed(error.unwrap_or_default()),
                            "skipped" => RunOutcome::Skipped(error.unwrap_or_default()),
                            _ => RunOutcome::Running,
                        },
                        counters: serde_json::from_str(&counters).unwrap_or_default(),
                        host: r.get(9)?,
                        dry_run: r.get(10)?,
                    })
                }).collect()
            })
            .await
    }

    async fn abandon_runs(
        &self,
        host: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<u64> {
        let (host, reason) = (host.to_owned(), reason.to_owned());
        self.db
            .write(move |tx| {
                let changed = tx.execute(
                    "UPDATE job_runs SET outcome = 'failed', error = ?2, ended_at = ?3
                     WHERE host = ?1 AND outcome = 'running'",
                    args![host, reason, to_millis(now)],
                )?;
                Ok(changed)
            })
            .await
    }
}

#[async_trait]
impl SpaceLedger for SqlStore {
    async fn reserve_space(
        &self,
        fs: &str,
        holder: &str,
        bytes: u64,
        available: u64,
        ttl: std::time::Duration,
    ) -> anyhow::Result<bool> {
        let (fs, holder) = (fs.to_owned(), holder.to_owned());
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        // One immediate transaction: no other process sums the reservations in between.
        self.db
            .write(move |tx| {
                tx.execute(
                    "DELETE FROM space_reservations
                     WHERE expires_at < {now_ms}",
                    args![],
                )?;
                let sums = tx.query_one(
                    "SELECT CAST(COALESCE(SUM(bytes) FILTER (WHERE holder = ?2), -1) AS BIGINT),
                            CAST(COALESCE(SUM(bytes) FILTER (WHERE holder != ?2), 0) AS BIGINT)
                     FROM space_reservations WHERE fs = ?1",
                    args![fs, holder],
                )?;
                let (own, others): (i64, i64) = (sums.get(0)?, sums.get(1)?);
                // Held already: renewed without a second look at the free space, which the
                // holder's own output is using up.
                let held = own >= 0;
                if !held && (others as u64).saturating_add(bytes) > available {
                    return Ok(false);
                }
                tx.execute(
                    "INSERT INTO space_reservations (fs, holder, bytes, expires_at)
                     VALUES (?1, ?2, ?3, {now_ms} + ?4)
                     ON CONFLICT (fs, holder) DO UPDATE
                     SET bytes = CASE WHEN space_reservations.bytes > excluded.bytes
                                      THEN space_reservations.bytes ELSE excluded.bytes END,
                         expires_at = excluded.expires_at",
                    args![fs, holder, i64::try_from(bytes).unwrap_or(i64::MAX), ttl_ms],
                )?;
                Ok(true)
            })
            .await
    }

    async fn release_space(&self, fs: &str, holder: &str) -> anyhow::Result<()> {
        let (fs, holder) = (fs.to_owned(), holder.to_owned());
        self.db
            .write(move |tx| {
                tx.execute(
                    "DELETE FROM space_reservations WHERE fs = ?1 AND holder = ?2",
                    args![fs, holder],
                )?;
                Ok(())
            })
            .await
    }

    async fn space_reservations(&self, fs: &str) -> anyhow::Result<Vec<SpaceReservation>> {
        let fs = fs.to_owned();
        self.db
            .read(move |conn| {
                conn.query(
                    "SELECT holder, bytes, expires_at FROM space_reservations
                     WHERE fs = ?1 AND expires_at >= {now_ms}
                     ORDER BY holder",
                    args![fs],
                )?
                .iter()
                .map(|r| {
                    Ok(SpaceReservation {
                        holder: r.get(0)?,
                        bytes: r.get::<i64>(1)?.max(0) as u64,
                        expires_at: from_millis(r.get(2)?),
                    })
                })
                .collect()
            })
            .await
    }
}

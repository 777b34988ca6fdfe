//! The workflow store in the embedded SQLite database.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use super::{
    StepSpec, TaskError, TaskMeta, TaskRun, TaskStart, TaskStatus, WatchState, Workflow,
    WorkflowFilter, WorkflowSpec, WorkflowStep, WorkflowStore,
};
use crate::sqlite::{Db, from_millis, to_millis};

pub struct SqliteStore {
    db: Db,
}

impl SqliteStore {
    pub fn new(db: Db) -> SqliteStore {
        SqliteStore { db }
    }
}

fn json_text(value: &serde_json::Value) -> String {
    value.to_string()
}

fn load_workflow(conn: &rusqlite::Connection, id: &str) -> anyhow::Result<Option<Workflow>> {
    let row = conn
        .query_row(
            "SELECT id, name, app_id, description, status, resume_lock, start_args, created_at, updated_at
             FROM workflows WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, Option<i64>>(8)?,
                ))
            },
        )
        .optional()?;
    let Some((
        id,
        name,
        app_id,
        description,
        status,
        resume_lock,
        start_args,
        created_at,
        updated_at,
    )) = row
    else {
        return Ok(None);
    };
    let mut steps_stmt = conn.prepare_cached(
        "SELECT position, name, task, queue, kwargs, priority FROM workflow_steps WHERE workflow_id = ?1 ORDER BY position",
    )?;
    let mut steps: Vec<WorkflowStep> = steps_stmt
        .query_map([&id], |r| {
            let kwargs: Option<String> = r.get(4)?;
            Ok(WorkflowStep {
                spec: StepSpec {
                    name: r.get(1)?,
                    task: r.get(2)?,
                    queue: r.get(3)?,
                    kwargs: kwargs.and_then(|k| serde_json::from_str(&k).ok()),
                    priority: r.get::<_, Option<i64>>(5)?.map(|p| p.clamp(0, 255) as u8),
                },
                runs: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut runs_stmt = conn.prepare_cached(
        "SELECT position, task_id, date_start FROM task_runs WHERE workflow_id = ?1 ORDER BY seq",
    )?;
    let runs = runs_stmt.query_map([&id], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            TaskRun {
                task_id: r.get(1)?,
                date_start: from_millis(r.get(2)?),
            },
        ))
    })?;
    for run in runs {
        let (position, run) = run?;
        if let Some(step) = steps.get_mut(position as usize) {
            step.runs.push(run);
        }
    }
    Ok(Some(Workflow {
        id,
        name,
        app_id,
        description,
        created_at: from_millis(created_at),
        updated_at: updated_at.map(from_millis),
        status_cache: TaskStatus::parse(&status).unwrap_or(TaskStatus::Pending),
        resume_lock: resume_lock.map(from_millis),
        start_args: serde_json::from_str(&start_args).unwrap_or_default(),
        steps,
    }))
}

fn meta_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskMeta> {
    let status: String = r.get(1)?;
    let result: Option<String> = r.get(2)?;
    let args: Option<String> = r.get(6)?;
    let kwargs: Option<String> = r.get(7)?;
    Ok(TaskMeta {
        task_id: r.get(0)?,
        status: TaskStatus::parse(&status).unwrap_or(TaskStatus::Pending),
        result: result
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null),
        traceback: r.get(3)?,
        date_done: r.get::<_, Option<i64>>(4)?.map(from_millis),
        name: r.get(5)?,
        args: args
            .and_then(|a| serde_json::from_str(&a).ok())
            .unwrap_or_default(),
        kwargs: kwargs
            .and_then(|k| serde_json::from_str(&k).ok())
            .unwrap_or_default(),
        worker: r.get(8)?,
        retries: r.get::<_, i64>(9)? as u32,
        queue: r.get(10)?,
    })
}

fn touch(
    tx: &rusqlite::Transaction<'_>,
    workflow_id: &str,
    status: Option<TaskStatus>,
) -> anyhow::Result<()> {
    tx.execute(
        "UPDATE workflows SET status = COALESCE(?2, status), updated_at = ?3 WHERE id = ?1",
        params![
            workflow_id,
            status.map(|s| s.as_str()),
            to_millis(Utc::now())
        ],
    )?;
    Ok(())
}

/// Replaces status and result of a task that already has a row (every state after STARTED).
fn set_result(
    tx: &rusqlite::Transaction<'_>,
    task_id: &str,
    status: TaskStatus,
    result: &serde_json::Value,
    retries: Option<u32>,
) -> anyhow::Result<()> {
    let date_done = if status.is_done() {
        Some(to_millis(Utc::now()))
    } else {
        None
    };
    let changed = tx.execute(
        "UPDATE task_meta SET status = ?2, result = ?3, date_done = ?4, retries = COALESCE(?5, retries)
         WHERE task_id = ?1",
        params![task_id, status.as_str(), json_text(result), date_done, retries.map(i64::from)],
    )?;
    if changed == 0 {
        tx.execute(
            "INSERT INTO task_meta (task_id, status, result, date_done, retries) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![task_id, status.as_str(), json_text(result), date_done, retries.map(i64::from).unwrap_or(0)],
        )?;
    }
    Ok(())
}

#[async_trait]
impl WorkflowStore for SqliteStore {
    async fn create_workflow(
        &self,
        id: &str,
        app_id: &str,
        spec: &WorkflowSpec,
        start_args: &[serde_json::Value],
    ) -> anyhow::Result<()> {
        let (id, app_id, spec, start_args) = (
            id.to_owned(),
            app_id.to_owned(),
            spec.clone(),
            serde_json::Value::from(start_args.to_vec()),
        );
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO workflows (id, name, app_id, description, status, start_args, created_at)
                     VALUES (?1, ?2, ?3, ?4, 'PENDING', ?5, ?6)",
                    params![id, spec.name, app_id, spec.description, json_text(&start_args), to_millis(Utc::now())],
                )?;
                for (position, step) in spec.steps.iter().enumerate() {
                    tx.execute(
                        "INSERT INTO workflow_steps (workflow_id, position, name, task, queue, kwargs, priority)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![
                            id,
                            position as i64,
                            step.name,
                            step.task,
                            step.queue,
                            step.kwargs.as_ref().map(|k| serde_json::Value::Object(k.clone()).to_string()),
                            step.priority.map(i64::from)
                        ],
                    )?;
                }
                Ok(())
            })
            .await
    }

    async fn workflow(&self, id: &str) -> anyhow::Result<Option<Workflow>> {
        let id = id.to_owned();
        self.db.call(move |conn| load_workflow(conn, &id)).await
    }

    async fn workflows(
        &self,
        filter: WorkflowFilter,
        limit: usize,
    ) -> anyhow::Result<Vec<Workflow>> {
        self.db
            .call(move |conn| {
                let sql = match filter {
                    WorkflowFilter::All => {
                        "SELECT id FROM workflows ORDER BY created_at DESC, id LIMIT ?1"
                    }
                    WorkflowFilter::Active => {
                        "SELECT id FROM workflows WHERE status IN ('PENDING', 'STARTED')
                         ORDER BY created_at DESC, id LIMIT ?1"
                    }
                };
                let ids: Vec<String> = conn
                    .prepare(sql)?
                    .query_map([limit as i64], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(workflow) = load_workflow(conn, &id)? {
                        out.push(workflow);
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn task_metas(&self, task_ids: &[String]) -> anyhow::Result<HashMap<String, TaskMeta>> {
        let task_ids = task_ids.to_vec();
        self.db
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT task_id, status, result, traceback, date_done, name, args, kwargs, worker, retries, queue
                     FROM task_meta WHERE task_id = ?1",
                )?;
                let mut out = HashMap::new();
                for id in task_ids {
                    if let Some(meta) = stmt.query_row([&id], meta_from_row).optional()? {
                        out.insert(id, meta);
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn task_started(&self, start: &TaskStart) -> anyhow::Result<()> {
        let start = start.clone();
        self.db
            .write(move |tx| {
                let now = to_millis(Utc::now());
                tx.execute(
                    "INSERT INTO task_runs (task_id, workflow_id, position, date_start) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (task_id) DO NOTHING",
                    params![start.task_id, start.workflow_id, start.position as i64, now],
                )?;
                let result = serde_json::json!({"pid": start.pid, "hostname": start.hostname});
                tx.execute(
                    "INSERT INTO task_meta (task_id, status, result, name, args, kwargs, worker, retries, queue)
                     VALUES (?1, 'STARTED', ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (task_id) DO UPDATE SET status = 'STARTED', result = excluded.result,
                        date_done = NULL, worker = excluded.worker, retries = excluded.retries,
                        args = excluded.args, kwargs = excluded.kwargs",
                    params![
                        start.task_id,
                        json_text(&result),
                        start.task_name,
                        json_text(&serde_json::Value::from(start.args.clone())),
                        json_text(&serde_json::Value::Object(start.kwargs.clone())),
                        start.hostname,
                        i64::from(start.retries),
                        start.queue
                    ],
                )?;
                tx.execute(
                    "UPDATE workflows SET status = 'STARTED', resume_lock = NULL, updated_at = ?2 WHERE id = ?1",
                    params![start.workflow_id, now],
                )?;
                Ok(())
            })
            .await
    }

    async fn task_progress(
        &self,
        task_id: &str,
        progress: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let (task_id, progress) = (task_id.to_owned(), json_text(progress));
        self.db
            .write(move |tx| {
                tx.execute(
                    "UPDATE task_meta SET result = ?2 WHERE task_id = ?1 AND status = 'STARTED'",
                    params![task_id, progress],
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
            .write(move |tx| set_result(tx, &task_id, TaskStatus::Retry, &error, Some(retries)))
            .await
    }

    async fn task_succeeded(
        &self,
        task_id: &str,
        result: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let (task_id, result) = (task_id.to_owned(), result.clone());
        self.db
            .write(move |tx| set_result(tx, &task_id, TaskStatus::Success, &result, None))
            .await
    }

    async fn task_failed(
        &self,
        workflow_id: &str,
        task_id: &str,
        error: &TaskError,
    ) -> anyhow::Result<()> {
        let (workflow_id, task_id, error) =
            (workflow_id.to_owned(), task_id.to_owned(), error.to_json());
        self.db
            .write(move |tx| {
                set_result(tx, &task_id, TaskStatus::Failure, &error, None)?;
                touch(tx, &workflow_id, Some(TaskStatus::Failure))
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
                    params![workflow_id, to_millis(now)],
                )?;
                Ok(changed == 1)
            })
            .await
    }

    async fn watch_state(&self, source_dir: &str) -> anyhow::Result<WatchState> {
        let source_dir = source_dir.to_owned();
        self.db
            .call(move |conn| {
                let row: Option<(i64, String)> = conn
                    .query_row(
                        "SELECT scan_count, known FROM watch_state WHERE source_dir = ?1",
                        [source_dir],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                Ok(match row {
                    Some((scan_count, known)) => WatchState {
                        scan_count: scan_count as u32,
                        known: serde_json::from_str(&known).unwrap_or_default(),
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
                    params![source_dir, i64::from(state.scan_count), serde_json::to_string(&state.known)?],
                )?;
                Ok(())
            })
            .await
    }
}

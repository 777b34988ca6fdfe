//! The registry in a SQL database, with the Bioloop API's semantics: the embedded SQLite file
//! or a shared PostgreSQL database, through one body of statements (`crate::sql`).

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::Utc;

use super::uploads::{
    NewUpload, Notification, ProcessLogLine, UploadLog, UploadLogPatch, UploadQuery, UploadRef,
    UploadStatus, WorkerProcess, tombstone_name,
};
use super::{
    BulkOutcome, Creator, Dataset, DatasetId, DatasetPatch, DatasetQuery, FileRowSource, MAX_BULK,
    Metric, NewDataset, Project, Registry, RegistryError, StateRecord, deep_merge,
};
use crate::args;
use crate::model::{Bundle, CreateMethod, DatasetName, DatasetState, DatasetType, FileRecord};
use crate::sql::{Conn, Database, Row, Value, json_list};
use crate::sqlite::{from_millis, to_millis};

pub struct SqlRegistry {
    db: Database,
    /// Where uploaded QC reports are kept: `reports/` beside a SQLite file; for PostgreSQL,
    /// `postgres.reports_dir` when set.
    reports: Option<std::path::PathBuf>,
}

impl SqlRegistry {
    pub fn new(db: impl Into<Database>) -> SqlRegistry {
        let db = db.into();
        let reports = match &db {
            Database::Sqlite(db) => Some(
                db.path()
                    .parent()
                    .map(std::path::Path::to_path_buf)
                    .unwrap_or_default()
                    .join("reports"),
            ),
            Database::Postgres(_) => None,
        };
        SqlRegistry { db, reports }
    }

    /// Keeps uploaded QC reports in `dir` (`<dir>/<report_id>/multiqc_report.html`).
    pub fn keeping_reports_in(mut self, dir: std::path::PathBuf) -> SqlRegistry {
        self.reports = Some(dir);
        self
    }
}

fn unavailable(err: anyhow::Error) -> RegistryError {
    RegistryError::Unavailable(err)
}

impl SqlRegistry {
    /// Runs `f` in a write transaction if dataset `id` exists; `NotFound` otherwise.
    async fn write_existing<T, F>(&self, id: DatasetId, f: F) -> Result<T, RegistryError>
    where
        F: Fn(&mut dyn Conn) -> anyhow::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.db
            .write(move |tx| {
                let exists = tx.query_opt("SELECT id FROM datasets WHERE id = ?1", args![id])?;
                if exists.is_none() {
                    return Ok(None);
                }
                f(tx).map(Some)
            })
            .await
            .map_err(unavailable)?
            .ok_or(RegistryError::NotFound(id))
    }
}

const DATASET_COLUMNS: &str = "id, name, type, origin_path, archive_path, staged_path, description, \
     du_size, size, bundle_size, num_files, num_directories, is_deleted, is_staged, metadata, \
     create_method, created_at, updated_at";

fn opt_u64(row: &Row, idx: usize) -> anyhow::Result<Option<u64>> {
    Ok(row.get::<Option<i64>>(idx)?.map(|v| v as u64))
}

/// Reads the columns of `DATASET_COLUMNS`; states, bundle and workflows are filled separately.
fn dataset_from_row(row: &Row) -> anyhow::Result<Dataset> {
    let type_text: String = row.get(2)?;
    let metadata_text: String = row.get(14)?;
    let create_method: Option<String> = row.get(15)?;
    Ok(Dataset {
        id: row.get(0)?,
        name: DatasetName::from_stored(row.get(1)?),
        dataset_type: type_text.parse().unwrap_or(DatasetType::RawData),
        origin_path: row.get(3)?,
        archive_path: row.get(4)?,
        staged_path: row.get(5)?,
        description: row.get(6)?,
        du_size: opt_u64(row, 7)?,
        size: opt_u64(row, 8)?,
        bundle_size: opt_u64(row, 9)?,
        num_files: opt_u64(row, 10)?,
        num_directories: opt_u64(row, 11)?,
        is_deleted: row.get(12)?,
        is_staged: row.get(13)?,
        metadata: serde_json::from_str(&metadata_text).unwrap_or_else(|_| serde_json::json!({})),
        create_method: create_method.and_then(|m| m.parse().ok()),
        created_at: from_millis(row.get(16)?),
        updated_at: from_millis(row.get(17)?),
        states: Vec::new(),
        bundle: None,
        workflows: Vec::new(),
    })
}

/// Loads one dataset with its relations inside an open transaction or connection.
fn load_dataset(conn: &mut dyn Conn, id: DatasetId) -> anyhow::Result<Option<Dataset>> {
    let sql = format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE id = ?1");
    let Some(row) = conn.query_opt(&sql, args![id])? else {
        return Ok(None);
    };
    let mut dataset = dataset_from_row(&row)?;
    fill_relations(conn, &mut dataset)?;
    Ok(Some(dataset))
}

fn fill_relations(conn: &mut dyn Conn, dataset: &mut Dataset) -> anyhow::Result<()> {
    dataset.states = conn
        .query(
            "SELECT state, timestamp FROM dataset_states WHERE dataset_id = ?1 ORDER BY seq",
            args![dataset.id],
        )?
        .iter()
        .map(|r| {
            Ok(StateRecord {
                state: r.get(0)?,
                timestamp: from_millis(r.get(1)?),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    dataset.bundle = conn
        .query_opt(
            "SELECT name, size, md5 FROM bundles WHERE dataset_id = ?1",
            args![dataset.id],
        )?
        .map(|r| -> anyhow::Result<_> {
            Ok((r.get::<String>(0)?, r.get::<i64>(1)?, r.get::<String>(2)?))
        })
        .transpose()?
        .and_then(|(name, size, md5)| {
            Some(Bundle {
                name,
                size: size as u64,
                md5: md5.parse().ok()?,
            })
        });
    dataset.workflows = conn
        .query(
            "SELECT workflow_id FROM dataset_workflows WHERE dataset_id = ?1 ORDER BY created_at, workflow_id",
            args![dataset.id],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect::<anyhow::Result<_>>()?;
    Ok(())
}

fn insert_state(tx: &mut dyn Conn, id: DatasetId, state: &str) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO dataset_states (dataset_id, state, timestamp) VALUES (?1, ?2, ?3)",
        args![id, state, to_millis(Utc::now())],
    )?;
    Ok(())
}

fn create_one(tx: &mut dyn Conn, item: &NewDataset) -> anyhow::Result<Option<DatasetId>> {
    // The API checks for a live dataset of the same name first and reports a conflict
    // instead of failing (spec E.3).
    let exists = tx.query_opt(
        "SELECT id FROM datasets WHERE name = ?1 AND type = ?2 AND is_deleted = 0",
        args![item.name.as_str(), item.dataset_type.as_str()],
    )?;
    if exists.is_some() {
        return Ok(None);
    }
    let now = to_millis(Utc::now());
    let metadata = item
        .metadata
        .clone()
        .unwrap_or_else(|| serde_json::json!({}));
    let id: DatasetId = tx
        .query_one(
            "INSERT INTO datasets (name, type, origin_path, description, metadata, create_method, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7) RETURNING id",
            args![
                item.name.as_str(),
                item.dataset_type.as_str(),
                item.origin_path,
                item.description,
                metadata.to_string(),
                item.create_method.as_str(),
                now
            ],
        )?
        .get(0)?;
    insert_state(tx, id, DatasetState::Registered.as_str())?;
    Ok(Some(id))
}

#[async_trait]
impl Registry for SqlRegistry {
    async fn bulk_create(&self, items: &[NewDataset]) -> Result<BulkOutcome, RegistryError> {
        if items.len() > MAX_BULK {
            return Err(RegistryError::Invalid(format!(
                "a bulk create takes at most {MAX_BULK} datasets, not {}",
                items.len()
            )));
        }
        let items = items.to_vec();
        self.db
            .write(move |tx| {
                let mut outcome = BulkOutcome::default();
                let mut created_ids = Vec::new();
                for item in &items {
                    match create_one(tx, item)? {
                        Some(id) => created_ids.push(id),
                        None => outcome
                            .conflicted
                            .push((item.name.clone(), item.dataset_type)),
                    }
                }
                for id in created_ids {
                    if let Some(dataset) = load_dataset(tx, id)? {
                        outcome.created.push(dataset);
                    }
                }
                Ok(outcome)
            })
            .await
            .map_err(unavailable)
    }

    async fn get(&self, id: DatasetId) -> Result<Dataset, RegistryError> {
        self.db
            .read(move |conn| load_dataset(conn, id))
            .await
            .map_err(unavailable)?
            .ok_or(RegistryError::NotFound(id))
    }

    async fn find(&self, query: &DatasetQuery) -> Result<Vec<Dataset>, RegistryError> {
        let query = query.clone();
        self.db
            .read(move |conn| {
                let mut sql = format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE 1 = 1");
                let mut args: Vec<Value> = Vec::new();
                if !query.include_deleted {
                    sql.push_str(" AND is_deleted = 0");
                }
                if let Some(t) = query.dataset_type {
                    args.push(Value::Text(t.as_str().to_owned()));
                    sql.push_str(&format!(" AND type = ?{}", args.len()));
                }
                if let Some(name) = &query.name {
                    args.push(Value::Text(name.as_str().to_owned()));
                    sql.push_str(&format!(" AND name = ?{}", args.len()));
                }
                if let Some(method) = query.create_method {
                    args.push(Value::Text(method.as_str().to_owned()));
                    sql.push_str(&format!(" AND create_method = ?{}", args.len()));
                }
                if query.without_workflows {
                    sql.push_str(" AND NOT EXISTS (SELECT 1 FROM dataset_workflows w WHERE w.dataset_id = datasets.id)");
                }
                if let Some(cutoff) = query.staged_before {
                    args.push(Value::Int(to_millis(cutoff)));
                    sql.push_str(&format!(
                        " AND is_staged = 1 AND NOT EXISTS (SELECT 1 FROM dataset_states s
                           WHERE s.dataset_id = datasets.id AND s.state = 'STAGED' AND s.timestamp >= ?{})",
                        args.len()
                    ));
                }
                if let Some(workflow_id) = &query.workflow_id {
                    args.push(Value::Text(workflow_id.clone()));
                    sql.push_str(&format!(
                        " AND id IN (SELECT dataset_id FROM dataset_workflows WHERE workflow_id = ?{})",
                        args.len()
                    ));
                }
                sql.push_str(" ORDER BY updated_at DESC, id DESC");
                if let Some(limit) = query.limit {
                    // Bound, not written into the statement: one prepared statement serves
                    // every limit.
                    args.push(Value::Int(limit as i64));
                    sql.push_str(&format!(" LIMIT ?{}", args.len()));
                }
                let mut datasets = conn
                    .query(&sql, &args)?
                    .iter()
                    .map(dataset_from_row)
                    .collect::<anyhow::Result<Vec<_>>>()?;
                for dataset in &mut datasets {
                    fill_relations(conn, dataset)?;
                }
                Ok(datasets)
            })
            .await
            .map_err(unavailable)
    }

    async fn update(&self, id: DatasetId, patch: &DatasetPatch) -> Result<Dataset, RegistryError> {
        let patch = patch.clone();
        let updated = self
            .db
            .write(move |tx| {
                let Some(current) = load_dataset(tx, id)? else {
                    return Ok(None);
                };
                let mut metadata = current.metadata.clone();
                if let Some(extra) = &patch.metadata {
                    deep_merge(&mut metadata, extra);
                }
                let as_i64 = |v: Option<u64>| v.map(|v| v as i64);
                tx.execute(
                    "UPDATE datasets SET
                        name = COALESCE(?2, name),
                        du_size = COALESCE(?3, du_size),
                        size = COALESCE(?4, size),
                        num_files = COALESCE(?5, num_files),
                        num_directories = COALESCE(?6, num_directories),
                        metadata = ?7,
                        archive_path = CASE WHEN ?8 = 1 THEN ?9 ELSE archive_path END,
                        staged_path = CASE WHEN ?10 = 1 THEN ?11 ELSE staged_path END,
                        is_staged = COALESCE(?12, is_staged),
                        is_deleted = COALESCE(?13, is_deleted),
                        bundle_size = COALESCE(?14, bundle_size),
                        updated_at = ?15,
                        origin_path = COALESCE(?16, origin_path)
                     WHERE id = ?1",
                    args![
                        id,
                        patch.name.as_ref().map(|n| n.as_str().to_owned()),
                        as_i64(patch.du_size),
                        as_i64(patch.size),
                        as_i64(patch.num_files),
                        as_i64(patch.num_directories),
                        metadata.to_string(),
                        patch.archive_path.is_some(),
                        patch.archive_path.clone().flatten(),
                        patch.staged_path.is_some(),
                        patch.staged_path.clone().flatten(),
                        patch.is_staged,
                        patch.is_deleted,
                        patch.bundle.as_ref().map(|b| b.size as i64),
                        to_millis(Utc::now()),
                        patch.origin_path,
                    ],
                )?;
                if let Some(bundle) = &patch.bundle {
                    tx.execute(
                        "INSERT INTO bundles (dataset_id, name, size, md5) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (dataset_id) DO UPDATE SET name = excluded.name, size = excluded.size, md5 = excluded.md5",
                        args![id, bundle.name, bundle.size as i64, bundle.md5.to_string()],
                    )?;
                }
                load_dataset(tx, id)
            })
            .await
            .map_err(unavailable)?;
        updated.ok_or(RegistryError::NotFound(id))
    }

    async fn add_state(&self, id: DatasetId, state: DatasetState) -> Result<(), RegistryError> {
        self.write_existing(id, move |tx| {
            let latest: Option<String> = tx
                .query_opt(
                    "SELECT state FROM dataset_states WHERE dataset_id = ?1 ORDER BY seq DESC LIMIT 1",
                    args![id],
                )?
                .map(|r| r.get(0))
                .transpose()?;
            if latest.as_deref() != Some(state.as_str()) {
                insert_state(tx, id, state.as_str())?;
                tx.execute("UPDATE datasets SET updated_at = ?2 WHERE id = ?1", args![id, to_millis(Utc::now())])?;
            }
            Ok(())
        })
        .await
    }

    async fn add_files(&self, id: DatasetId, files: &[FileRecord]) -> Result<(), RegistryError> {
        // Sizes are what the archive step checks bundles against; a row without one would
        // make that check compare against a made-up number.
        if let Some(row) = files.iter().find(|f| f.size.is_none()) {
            return Err(RegistryError::Invalid(format!(
                "file row `{}` of dataset {id} has no size",
                row.path
            )));
        }
        let files = files.to_vec();
        self.db
            .write(move |tx| {
                for file in &files {
                    tx.execute(
                        "INSERT INTO dataset_files (dataset_id, path, md5, size, filetype) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (dataset_id, path) DO NOTHING",
                        args![
                            id,
                            file.path,
                            file.md5.map(|m| m.to_string()),
                            file.size.unwrap_or_default() as i64,
                            file.file_type.as_str()
                        ],
                    )?;
                }
                Ok(())
            })
            .await
            .map_err(unavailable)
    }

    async fn replace_files(
        &self,
        id: DatasetId,
        rows: std::sync::Arc<dyn FileRowSource>,
    ) -> Result<u64, RegistryError> {
        // One transaction: readers see the old rows or the new ones, never a mixture. The rows
        // are read from the source afresh each time the transaction runs.
        self.write_existing(id, move |tx| {
            tx.execute("DELETE FROM dataset_files WHERE dataset_id = ?1", args![id])?;
            let mut stored = 0u64;
            for row in rows.rows()? {
                let file = row?;
                let Some(size) = file.size else {
                    anyhow::bail!("file row `{}` of dataset {id} has no size", file.path);
                };
                tx.execute(
                    "INSERT INTO dataset_files (dataset_id, path, md5, size, filetype) VALUES (?1, ?2, ?3, ?4, ?5)",
                    args![
                        id,
                        file.path,
                        file.md5.map(|m| m.to_string()),
                        size as i64,
                        file.file_type.as_str()
                    ],
                )?;
                stored += 1;
            }
            Ok(stored)
        })
        .await
    }

    async fn files_page(
        &self,
        id: DatasetId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FileRecord>, RegistryError> {
        let after = after.map(str::to_owned);
        self.db
            .read(move |conn| {
                conn.query(
                    "SELECT path, md5, size, filetype FROM dataset_files
                     WHERE dataset_id = ?1 AND (CAST(?2 AS TEXT) IS NULL OR path > ?2) ORDER BY path LIMIT ?3",
                    args![id, after, limit as i64],
                )?
                .iter()
                .map(|r| {
                    let md5: Option<String> = r.get(1)?;
                    let filetype: String = r.get(3)?;
                    Ok(FileRecord {
                        path: r.get(0)?,
                        md5: md5.and_then(|m| m.parse().ok()),
                        size: Some(r.get::<i64>(2)? as u64),
                        file_type: filetype.parse().unwrap_or(crate::model::FileType::File),
                    })
                })
                .collect()
            })
            .await
            .map_err(unavailable)
    }

    async fn add_workflow(&self, id: DatasetId, workflow_id: &str) -> Result<(), RegistryError> {
        let workflow_id = workflow_id.to_owned();
        self.write_existing(id, move |tx| {
            tx.execute(
                "INSERT INTO dataset_workflows (workflow_id, dataset_id, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (workflow_id) DO NOTHING",
                args![workflow_id, id, to_millis(Utc::now())],
            )?;
            Ok(())
        })
        .await
    }

    async fn add_workflows(&self, links: &[(DatasetId, String)]) -> Result<(), RegistryError> {
        let links = links.to_vec();
        let missing = self
            .db
            .write(move |tx| {
                let now = to_millis(Utc::now());
                // Every dataset is checked before anything is written: all or nothing.
                for (id, _) in &links {
                    if tx.query_opt("SELECT 1 FROM datasets WHERE id = ?1", args![id])?.is_none() {
                        return Ok(Some(*id));
                    }
                }
                for (id, workflow_id) in &links {
                    tx.execute(
                        "INSERT INTO dataset_workflows (workflow_id, dataset_id, created_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (workflow_id) DO NOTHING",
                        args![workflow_id, id, now],
                    )?;
                }
                Ok(None)
            })
            .await
            .map_err(unavailable)?;
        match missing {
            Some(id) => Err(RegistryError::NotFound(id)),
            None => Ok(()),
        }
    }

    async fn workflows_of(
        &self,
        ids: &[DatasetId],
    ) -> Result<HashMap<DatasetId, Vec<String>>, RegistryError> {
        let ids = json_list(ids);
        self.db
            .read(move |conn| {
                let mut out: HashMap<DatasetId, Vec<String>> = HashMap::new();
                for row in conn.query(
                    "SELECT id FROM datasets WHERE id IN {int_list ?1}",
                    args![ids],
                )? {
                    out.insert(row.get(0)?, Vec::new());
                }
                let links = conn.query(
                    "SELECT dataset_id, workflow_id FROM dataset_workflows
                     WHERE dataset_id IN {int_list ?1} ORDER BY created_at, workflow_id",
                    args![ids],
                )?;
                for row in links {
                    let (id, workflow_id): (DatasetId, String) = (row.get(0)?, row.get(1)?);
                    out.entry(id).or_default().push(workflow_id);
                }
                Ok(out)
            })
            .await
            .map_err(unavailable)
    }

    async fn origins(
        &self,
        dataset_type: DatasetType,
    ) -> Result<HashMap<String, Option<String>>, RegistryError> {
        self.db
            .read(move |conn| {
                conn.query(
                    "SELECT name, origin_path FROM datasets WHERE type = ?1 AND is_deleted = 0",
                    args![dataset_type.as_str()],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?)))
                .collect()
            })
            .await
            .map_err(unavailable)
    }

    async fn linked_workflows(
        &self,
        workflow_ids: &[String],
    ) -> Result<HashSet<String>, RegistryError> {
        let ids = json_list(workflow_ids);
        self.db
            .read(move |conn| {
                conn.query(
                    "SELECT workflow_id FROM dataset_workflows WHERE workflow_id IN {text_list ?1}",
                    args![ids],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect()
            })
            .await
            .map_err(unavailable)
    }

    async fn add_metrics(&self, metrics: &[Metric]) -> Result<(), RegistryError> {
        let metrics = metrics.to_vec();
        self.db
            .write(move |tx| {
                let now = to_millis(Utc::now());
                for m in &metrics {
                    tx.execute(
                        "INSERT INTO metrics (timestamp, measurement, subject, usage, \"limit\", tags)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (timestamp, measurement, subject) DO UPDATE SET usage = excluded.usage,
                            \"limit\" = excluded.\"limit\", tags = excluded.tags",
                        args![
                            now,
                            m.measurement,
                            m.subject,
                            m.usage as i64,
                            m.limit as i64,
                            serde_json::to_string(&m.tags)?
                        ],
                    )?;
                }
                Ok(())
            })
            .await
            .map_err(unavailable)
    }

    async fn create_upload(&self, upload: &NewUpload) -> Result<UploadLog, RegistryError> {
        let upload = upload.clone();
        self.db
            .write(move |tx| {
                let item = NewDataset {
                    name: upload.name.clone(),
                    dataset_type: upload.dataset_type,
                    origin_path: String::new(),
                    create_method: CreateMethod::Upload,
                    description: None,
                    metadata: None,
                };
                let Some(id) = create_one(tx, &item)? else {
                    return Ok(Err(RegistryError::Invalid(format!(
                        "a {} dataset named `{}` exists already; choose another name",
                        upload.dataset_type.as_str(),
                        upload.name.as_str()
                    ))));
                };
                // The payload directory is named after the id, known only now (spec C.5.5).
                let origin = std::path::Path::new(&upload.upload_dir)
                    .join(id.to_string())
                    .join(upload.name.as_str());
                tx.execute(
                    "UPDATE datasets SET origin_path = ?2 WHERE id = ?1",
                    args![id, origin.to_string_lossy().into_owned()],
                )?;
                tx.execute(
                    "INSERT INTO upload_logs (dataset_id, status, updated_at) VALUES (?1, 'UPLOADING', ?2)",
                    args![id, to_millis(Utc::now())],
                )?;
                Ok(Ok(load_upload(tx, id)?.expect("the upload log was just written")))
            })
            .await
            .map_err(unavailable)?
    }

    async fn complete_upload(
        &self,
        id: DatasetId,
        process_id: &str,
        metadata: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<UploadLog, RegistryError> {
        let (process_id, metadata) = (process_id.to_owned(), metadata.cloned());
        self.db
            .write(move |tx| {
                let Some(log) = load_upload(tx, id)? else {
                    return Ok(Err(RegistryError::NotFound(id)));
                };
                match log.status {
                    // Sent again: already done (the API ignores the repeated body too).
                    UploadStatus::Uploaded => return Ok(Ok(log)),
                    UploadStatus::Uploading => {}
                    // The API revives these, leaving a deleted dataset to be verified and
                    // ingested; a failed upload is over, and its name is free for a new one.
                    status => {
                        return Ok(Err(RegistryError::Invalid(format!(
                            "upload {id} (`{}`) is {status}: it cannot be completed{}",
                            log.dataset_name,
                            if status.is_terminal_failure()
                                || status == UploadStatus::ProcessingFailed
                            {
                                "; create a new upload"
                            } else {
                                " again"
                            }
                        ))));
                    }
                }
                write_upload_patch(
                    tx,
                    &log,
                    &UploadLogPatch {
                        status: Some(UploadStatus::Uploaded),
                        metadata: metadata.clone(),
                        ..UploadLogPatch::default()
                    },
                )?;
                tx.execute(
                    "UPDATE upload_logs SET process_id = ?2 WHERE dataset_id = ?1",
                    args![id, process_id],
                )?;
                Ok(Ok(load_upload(tx, id)?.expect("the upload log exists")))
            })
            .await
            .map_err(unavailable)?
    }

    async fn upload_log(&self, id: DatasetId) -> Result<Option<UploadLog>, RegistryError> {
        self.db
            .read(move |conn| load_upload(conn, id))
            .await
            .map_err(unavailable)
    }

    async fn update_upload_log(
        &self,
        id: DatasetId,
        patch: &UploadLogPatch,
    ) -> Result<UploadLog, RegistryError> {
        let patch = patch.clone();
        self.db
            .write(move |tx| {
                let Some(log) = load_upload(tx, id)? else {
                    return Ok(None);
                };
                write_upload_patch(tx, &log, &patch)?;
                load_upload(tx, id)
            })
            .await
            .map_err(unavailable)?
            .ok_or(RegistryError::NotFound(id))
    }

    async fn uploads(&self, query: &UploadQuery) -> Result<Vec<UploadRef>, RegistryError> {
        let query = query.clone();
        self.db
            .read(move |conn| {
                // Ages are measured on the database's clock.
                let (filter, mut args): (&str, Vec<Value>) = match &query {
                    UploadQuery::Expired { status, age_days } => (
                        "u.status = ?1 AND u.updated_at < {now_ms} - ?2",
                        vec![
                            Value::Text(status.as_str().to_owned()),
                            Value::Int(days(*age_days).num_milliseconds()),
                        ],
                    ),
                    UploadQuery::Stalled { after_seconds } => (
                        "u.status IN ('UPLOADED', 'VERIFYING', 'VERIFIED') AND u.updated_at <= {now_ms} - ?1",
                        vec![Value::Int(
                            chrono::Duration::seconds(*after_seconds as i64).num_milliseconds(),
                        )],
                    ),
                    UploadQuery::Failed { max_retry_count, max_age_hours } => (
                        "u.status = 'PROCESSING_FAILED' AND u.retry_count <= ?1 AND u.updated_at >= {now_ms} - ?2",
                        vec![
                            Value::Int(i64::from(*max_retry_count)),
                            Value::Int(days(max_age_hours / 24.0).num_milliseconds()),
                        ],
                    ),
                    UploadQuery::ByStatus(statuses) => {
                        let list: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
                        ("u.status IN {text_list ?1}", vec![Value::Text(json_list(&list))])
                    }
                    UploadQuery::All { .. } => ("1 = 1", Vec::new()),
                };
                // Without a limit the statement has no LIMIT clause: PostgreSQL refuses
                // SQLite's `LIMIT -1`.
                let limit = match query {
                    UploadQuery::All { limit } => {
                        args.push(Value::Int(limit as i64));
                        format!(" LIMIT ?{}", args.len())
                    }
                    _ => String::new(),
                };
                let sql = format!(
                    "SELECT u.dataset_id, d.name, u.status, u.retry_count, u.metadata, d.origin_path, u.updated_at
                     FROM upload_logs u JOIN datasets d ON d.id = u.dataset_id
                     WHERE {filter} ORDER BY u.updated_at DESC, u.dataset_id DESC{limit}"
                );
                conn.query(&sql, &args)?
                    .iter()
                    .map(|r| {
                        let metadata: Option<String> = r.get(4)?;
                        let last_error = metadata
                            .and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok())
                            .and_then(|m| m.get("failure_reason")?.as_str().map(str::to_owned));
                        Ok(UploadRef {
                            dataset_id: r.get(0)?,
                            dataset_name: r.get(1)?,
                            status: r.get::<String>(2)?.parse().ok(),
                            retry_count: Some(r.get::<i64>(3)? as u32),
                            last_error,
                            origin_path: r.get(5)?,
                            updated_at: Some(from_millis(r.get(6)?)),
                        })
                    })
                    .collect()
            })
            .await
            .map_err(unavailable)
    }

    async fn register_process(
        &self,
        process: &WorkerProcess,
    ) -> Result<Option<i64>, RegistryError> {
        let process = process.clone();
        self.db
            .write(move |tx| {
                let id = tx
                    .query_one(
                        "INSERT INTO worker_processes (workflow_id, step, task_id, pid, hostname, start_time, tags)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
                        args![
                            process.workflow_id,
                            process.step,
                            process.task_id,
                            process.pid,
                            process.hostname,
                            to_millis(process.start_time),
                            process.tags.to_string()
                        ],
                    )?
                    .get(0)?;
                Ok(Some(id))
            })
            .await
            .map_err(unavailable)
    }

    async fn add_process_logs(
        &self,
        process_id: i64,
        lines: &[ProcessLogLine],
    ) -> Result<(), RegistryError> {
        let lines = lines.to_vec();
        self.db
            .write(move |tx| {
                for line in &lines {
                    tx.execute(
                        "INSERT INTO worker_logs (process_id, timestamp, level, message) VALUES (?1, ?2, ?3, ?4)",
                        args![
                            process_id,
                            to_millis(line.timestamp),
                            line.level,
                            line.message
                        ],
                    )?;
                }
                Ok(())
            })
            .await
            .map_err(unavailable)
    }

    async fn notify(&self, notification: &Notification) -> Result<(), RegistryError> {
        // No UI reads notifications here; the log is where an operator of the embedded
        // profile looks.
        tracing::warn!(label = %notification.label, kind = %notification.kind, "{}", notification.text);
        Ok(())
    }

    // Auxiliary tasks and scripts.

    /// Keeps a copy of the report next to the database, at
    /// `reports/<report_id>/multiqc_report.html`, as the Bioloop API keeps its upload: the QC
    /// directory it came from belongs to `generate_qc` and is rebuilt by its next run, so a
    /// recorded path into it could point at a report being rewritten or gone. A PostgreSQL
    /// database has no directory beside it, so there the report is refused.
    async fn upload_report(
        &self,
        id: DatasetId,
        report: &std::path::Path,
    ) -> Result<String, RegistryError> {
        let dataset = self.get(id).await?;
        let Some(report_id) = dataset.metadata.get("report_id").and_then(|v| v.as_str()) else {
            return Err(RegistryError::Invalid(format!(
                "dataset {id} has no metadata.report_id: record it before uploading its report"
            )));
        };
        if report_id.is_empty() || report_id.contains(['/', '\\']) || report_id.starts_with('.') {
            return Err(RegistryError::Invalid(format!(
                "dataset {id}: metadata.report_id `{report_id}` cannot name a directory"
            )));
        }
        let Some(base) = &self.reports else {
            return Err(RegistryError::Invalid(format!(
                "dataset {id}: the registry in PostgreSQL keeps QC reports in \
                 postgres.reports_dir, which is not set (a directory every host mounts at the \
                 same place)"
            )));
        };
        let dir = base.join(report_id);
        let (source, target) = (report.to_path_buf(), dir.join("multiqc_report.html"));
        let stored = target.clone();
        crate::compute::blocking(move || -> anyhow::Result<()> {
            use anyhow::Context;
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create `{}`", dir.display()))?;
            let partial = crate::compute::attempt_sibling(&target);
            std::fs::copy(&source, &partial).with_context(|| {
                format!(
                    "cannot copy `{}` to `{}`",
                    source.display(),
                    partial.display()
                )
            })?;
            std::fs::rename(&partial, &target)
                .with_context(|| format!("cannot rename into `{}`", target.display()))
        })
        .await
        .map_err(unavailable)?;
        Ok(stored.to_string_lossy().into_owned())
    }

    async fn project(&self, id_or_slug: &str) -> Result<Project, RegistryError> {
        Err(RegistryError::Invalid(format!(
            "project `{id_or_slug}`: the embedded registry has no projects; projects need the \
             Bioloop API (registry.kind = \"http\")"
        )))
    }

    async fn created_by(&self, id: DatasetId) -> Result<Creator, RegistryError> {
        // Only this deployment writes the embedded registry; the read still says whether the
        // dataset exists.
        self.get(id).await?;
        Ok(Creator::Service)
    }
}

fn days(days: f64) -> chrono::Duration {
    chrono::Duration::milliseconds((days * 86_400_000.0) as i64)
}

/// Loads a dataset's upload log with the dataset fields the API returns with it.
fn load_upload(conn: &mut dyn Conn, id: DatasetId) -> anyhow::Result<Option<UploadLog>> {
    let Some(r) = conn.query_opt(
        "SELECT u.id, u.dataset_id, u.status, u.process_id, u.retry_count, u.metadata, u.updated_at,
                d.name, d.type, d.origin_path
         FROM upload_logs u JOIN datasets d ON d.id = u.dataset_id WHERE u.dataset_id = ?1",
        args![id],
    )?
    else {
        return Ok(None);
    };
    let metadata: Option<String> = r.get(5)?;
    let mut log = UploadLog {
        id: r.get(0)?,
        dataset_id: r.get(1)?,
        status: UploadStatus::Uploading,
        process_id: r.get(3)?,
        retry_count: r.get::<i64>(4)? as u32,
        metadata: metadata
            .and_then(|m| serde_json::from_str(&m).ok())
            .unwrap_or(serde_json::Value::Null),
        updated_at: from_millis(r.get(6)?),
        dataset_name: r.get(7)?,
        dataset_type: r.get::<String>(8)?.parse().ok(),
        origin_path: r.get(9)?,
    };
    let status: String = r.get(2)?;
    log.status = status
        .parse()
        .map_err(|err: String| anyhow::format_err!("upload log of dataset {id}: {err}"))?;
    Ok(Some(log))
}

/// Applies a patch the way the API does (spec E.5): metadata merged at the top level,
/// `updated_at` moved only by a status or retry-count change, the workflow linked in the same
/// transaction, and a terminal failure tombstoning the dataset once.
fn write_upload_patch(
    tx: &mut dyn Conn,
    log: &UploadLog,
    patch: &UploadLogPatch,
) -> anyhow::Result<()> {
    let id = log.dataset_id;
    if let Some(extra) = &patch.metadata {
        let mut metadata = match &log.metadata {
            serde_json::Value::Object(map) => map.clone(),
            _ => serde_json::Map::new(),
        };
        for (key, value) in extra {
            metadata.insert(key.clone(), value.clone());
        }
        tx.execute(
            "UPDATE upload_logs SET metadata = ?2 WHERE dataset_id = ?1",
            args![id, serde_json::Value::Object(metadata).to_string()],
        )?;
    }
    if patch.status.is_some() || patch.retry_count.is_some() {
        tx.execute(
            "UPDATE upload_logs SET status = COALESCE(?2, status), retry_count = COALESCE(?3, retry_count),
                updated_at = ?4 WHERE dataset_id = ?1",
            args![
                id,
                patch.status.map(UploadStatus::as_str),
                patch.retry_count.map(i64::from),
                to_millis(Utc::now())
            ],
        )?;
    }
    if let Some(workflow_id) = &patch.workflow_id {
        tx.execute(
            "INSERT INTO dataset_workflows (workflow_id, dataset_id, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (workflow_id) DO NOTHING",
            args![workflow_id, id, to_millis(Utc::now())],
        )?;
    }
    if patch.status.is_some_and(UploadStatus::is_terminal_failure) {
        let dataset = tx
            .query_opt(
                "SELECT name, is_deleted FROM datasets WHERE id = ?1",
                args![id],
            )?
            .map(|r| -> anyhow::Result<(String, bool)> { Ok((r.get(0)?, r.get(1)?)) })
            .transpose()?;
        if let Some((name, false)) = dataset {
            tx.execute(
                "UPDATE datasets SET name = ?2, is_deleted = 1, updated_at = ?3 WHERE id = ?1",
                args![id, tombstone_name(&name, id), to_millis(Utc::now())],
            )?;
        }
    }
    Ok(())
}

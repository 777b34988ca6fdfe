//! The registry in the embedded SQLite database, with the Bioloop API's semantics.

use std::collections::HashSet;

use async_trait::async_trait;
use chrono::Utc;
use rusqlite::{OptionalExtension, Row, Transaction, params};

use super::{
    BulkOutcome, Creator, Dataset, DatasetId, DatasetPatch, DatasetQuery, FileRowSource, MAX_BULK,
    Metric, NewDataset, Project, Registry, RegistryError, StateRecord, deep_merge,
};
use crate::model::{Bundle, DatasetName, DatasetState, DatasetType, FileRecord};
use crate::sqlite::{Db, from_millis, to_millis};

pub struct SqliteRegistry {
    db: Db,
}

impl SqliteRegistry {
    pub fn new(db: Db) -> SqliteRegistry {
        SqliteRegistry { db }
    }
}

fn unavailable(err: anyhow::Error) -> RegistryError {
    RegistryError::Unavailable(err)
}

impl SqliteRegistry {
    /// Runs `f` in a write transaction if dataset `id` exists; `NotFound` otherwise.
    async fn write_existing<T, F>(&self, id: DatasetId, f: F) -> Result<T, RegistryError>
    where
        F: FnOnce(&Transaction<'_>) -> anyhow::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.db
            .write(move |tx| {
                let exists: Option<i64> = tx
                    .query_row("SELECT id FROM datasets WHERE id = ?1", [id], |r| r.get(0))
                    .optional()?;
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

fn opt_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<u64>> {
    Ok(row.get::<_, Option<i64>>(idx)?.map(|v| v as u64))
}

/// Reads the columns of `DATASET_COLUMNS`; states, bundle and workflows are filled separately.
fn dataset_from_row(row: &Row<'_>) -> rusqlite::Result<Dataset> {
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
fn load_dataset(conn: &rusqlite::Connection, id: DatasetId) -> anyhow::Result<Option<Dataset>> {
    let sql = format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE id = ?1");
    let Some(mut dataset) = conn.query_row(&sql, [id], dataset_from_row).optional()? else {
        return Ok(None);
    };
    fill_relations(conn, &mut dataset)?;
    Ok(Some(dataset))
}

fn fill_relations(conn: &rusqlite::Connection, dataset: &mut Dataset) -> anyhow::Result<()> {
    let mut states = conn.prepare_cached(
        "SELECT state, timestamp FROM dataset_states WHERE dataset_id = ?1 ORDER BY seq",
    )?;
    dataset.states = states
        .query_map([dataset.id], |r| {
            Ok(StateRecord {
                state: r.get(0)?,
                timestamp: from_millis(r.get(1)?),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut bundle =
        conn.prepare_cached("SELECT name, size, md5 FROM bundles WHERE dataset_id = ?1")?;
    dataset.bundle = bundle
        .query_row([dataset.id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .optional()?
        .and_then(|(name, size, md5)| {
            Some(Bundle {
                name,
                size: size as u64,
                md5: md5.parse().ok()?,
            })
        });
    let mut workflows = conn.prepare_cached(
        "SELECT workflow_id FROM dataset_workflows WHERE dataset_id = ?1 ORDER BY created_at, workflow_id",
    )?;
    dataset.workflows = workflows
        .query_map([dataset.id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(())
}

fn insert_state(tx: &Transaction<'_>, id: DatasetId, state: &str) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO dataset_states (dataset_id, state, timestamp) VALUES (?1, ?2, ?3)",
        params![id, state, to_millis(Utc::now())],
    )?;
    Ok(())
}

fn create_one(tx: &Transaction<'_>, item: &NewDataset) -> anyhow::Result<Option<DatasetId>> {
    // The API checks for a live dataset of the same name first and reports a conflict
    // instead of failing (spec E.3).
    let exists: Option<i64> = tx
        .query_row(
            "SELECT id FROM datasets WHERE name = ?1 AND type = ?2 AND is_deleted = 0",
            params![item.name.as_str(), item.dataset_type.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_some() {
        return Ok(None);
    }
    let now = to_millis(Utc::now());
    let metadata = item
        .metadata
        .clone()
        .unwrap_or_else(|| serde_json::json!({}));
    tx.execute(
        "INSERT INTO datasets (name, type, origin_path, description, metadata, create_method, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
        params![
            item.name.as_str(),
            item.dataset_type.as_str(),
            item.origin_path,
            item.description,
            metadata.to_string(),
            item.create_method.as_str(),
            now
        ],
    )?;
    let id = tx.last_insert_rowid();
    insert_state(tx, id, DatasetState::Registered.as_str())?;
    Ok(Some(id))
}

#[async_trait]
impl Registry for SqliteRegistry {
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
            .call(move |conn| load_dataset(conn, id))
            .await
            .map_err(unavailable)?
            .ok_or(RegistryError::NotFound(id))
    }

    async fn find(&self, query: &DatasetQuery) -> Result<Vec<Dataset>, RegistryError> {
        let query = query.clone();
        self.db
            .call(move |conn| {
                let mut sql = format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE 1 = 1");
                let mut args: Vec<Box<dyn rusqlite::ToSql + Send>> = Vec::new();
                if !query.include_deleted {
                    sql.push_str(" AND is_deleted = 0");
                }
                if let Some(t) = query.dataset_type {
                    args.push(Box::new(t.as_str()));
                    sql.push_str(&format!(" AND type = ?{}", args.len()));
                }
                if let Some(name) = &query.name {
                    args.push(Box::new(name.as_str().to_owned()));
                    sql.push_str(&format!(" AND name = ?{}", args.len()));
                }
                if let Some(method) = query.create_method {
                    args.push(Box::new(method.as_str()));
                    sql.push_str(&format!(" AND create_method = ?{}", args.len()));
                }
                if query.without_workflows {
                    sql.push_str(" AND NOT EXISTS (SELECT 1 FROM dataset_workflows w WHERE w.dataset_id = datasets.id)");
                }
                if let Some(cutoff) = query.staged_before {
                    args.push(Box::new(to_millis(cutoff)));
                    sql.push_str(&format!(
                        " AND is_staged = 1 AND NOT EXISTS (SELECT 1 FROM dataset_states s
                           WHERE s.dataset_id = datasets.id AND s.state = 'STAGED' AND s.timestamp >= ?{})",
                        args.len()
                    ));
                }
                if let Some(workflow_id) = &query.workflow_id {
                    args.push(Box::new(workflow_id.clone()));
                    sql.push_str(&format!(
                        " AND id IN (SELECT dataset_id FROM dataset_workflows WHERE workflow_id = ?{})",
                        args.len()
                    ));
                }
                sql.push_str(" ORDER BY updated_at DESC, id DESC");
                if let Some(limit) = query.limit {
                    sql.push_str(&format!(" LIMIT {limit}"));
                }
                let mut stmt = conn.prepare(&sql)?;
                let params: Vec<&dyn rusqlite::ToSql> =
                    args.iter().map(|a| a.as_ref() as &dyn rusqlite::ToSql).collect();
                let mut datasets =
                    stmt.query_map(params.as_slice(), dataset_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
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
                        archive_path = CASE WHEN ?8 THEN ?9 ELSE archive_path END,
                        staged_path = CASE WHEN ?10 THEN ?11 ELSE staged_path END,
                        is_staged = COALESCE(?12, is_staged),
                        is_deleted = COALESCE(?13, is_deleted),
                        bundle_size = COALESCE(?14, bundle_size),
                        updated_at = ?15,
                        origin_path = COALESCE(?16, origin_path)
                     WHERE id = ?1",
                    params![
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
                        params![id, bundle.name, bundle.size as i64, bundle.md5.to_string()],
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
                .query_row(
                    "SELECT state FROM dataset_states WHERE dataset_id = ?1 ORDER BY seq DESC LIMIT 1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            if latest.as_deref() != Some(state.as_str()) {
                insert_state(tx, id, state.as_str())?;
                tx.execute("UPDATE datasets SET updated_at = ?2 WHERE id = ?1", params![id, to_millis(Utc::now())])?;
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
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO dataset_files (dataset_id, path, md5, size, filetype) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (dataset_id, path) DO NOTHING",
                )?;
                for file in &files {
                    stmt.execute(params![
                        id,
                        file.path,
                        file.md5.map(|m| m.to_string()),
                        file.size.unwrap_or_default() as i64,
                        file.file_type.as_str()
                    ])?;
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
        // One transaction: readers see the old rows or the new ones, never a mixture.
        self.write_existing(id, move |tx| {
            tx.execute("DELETE FROM dataset_files WHERE dataset_id = ?1", [id])?;
            let mut stmt = tx.prepare_cached(
                "INSERT INTO dataset_files (dataset_id, path, md5, size, filetype) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut stored = 0u64;
            for row in rows.rows()? {
                let file = row?;
                let Some(size) = file.size else {
                    anyhow::bail!("file row `{}` of dataset {id} has no size", file.path);
                };
                stmt.execute(params![
                    id,
                    file.path,
                    file.md5.map(|m| m.to_string()),
                    size as i64,
                    file.file_type.as_str()
                ])?;
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
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT path, md5, size, filetype FROM dataset_files
                     WHERE dataset_id = ?1 AND (?2 IS NULL OR path > ?2) ORDER BY path LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![id, after, limit as i64], |r| {
                    let md5: Option<String> = r.get(1)?;
                    let filetype: String = r.get(3)?;
                    Ok(FileRecord {
                        path: r.get(0)?,
                        md5: md5.and_then(|m| m.parse().ok()),
                        size: Some(r.get::<_, i64>(2)? as u64),
                        file_type: filetype.parse().unwrap_or(crate::model::FileType::File),
                    })
                })?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
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
                params![workflow_id, id, to_millis(Utc::now())],
            )?;
            Ok(())
        })
        .await
    }

    async fn linked_workflows(
        &self,
        workflow_ids: &[String],
    ) -> Result<HashSet<String>, RegistryError> {
        let ids = serde_json::to_string(workflow_ids).unwrap_or_else(|_| "[]".to_owned());
        self.db
            .call(move |conn| {
                let mut stmt = conn.prepare(
                    "SELECT workflow_id FROM dataset_workflows WHERE workflow_id IN (SELECT value FROM json_each(?1))",
                )?;
                let rows = stmt.query_map([ids], |r| r.get(0))?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            })
            .await
            .map_err(unavailable)
    }

    async fn add_metrics(&self, metrics: &[Metric]) -> Result<(), RegistryError> {
        let metrics = metrics.to_vec();
        self.db
            .write(move |tx| {
                let now = to_millis(Utc::now());
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO metrics (timestamp, measurement, subject, usage, \"limit\", tags)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (timestamp, measurement, subject) DO UPDATE SET usage = excluded.usage,
                        \"limit\" = excluded.\"limit\", tags = excluded.tags",
                )?;
                for m in &metrics {
                    stmt.execute(params![
                        now,
                        m.measurement,
                        m.subject,
                        m.usage as i64,
                        m.limit as i64,
                        serde_json::to_string(&m.tags)?
                    ])?;
                }
                Ok(())
            })
            .await
            .map_err(unavailable)
    }

    // Auxiliary tasks and scripts.

    /// Keeps a copy of the report next to the database, at
    /// `reports/<report_id>/multiqc_report.html`, as the Bioloop API keeps its upload: the QC
    /// directory it came from belongs to `generate_qc` and is rebuilt by its next run, so a
    /// recorded path into it could point at a report being rewritten or gone.
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
        let base = self
            .db
            .path()
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        let dir = base.join("reports").join(report_id);
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

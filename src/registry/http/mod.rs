//! The registry over the Bioloop API (spec E): each `Registry` operation as requests to the
//! API, with writes that a retry never duplicates (spec J.16). Requests go through `transport`
//! (the Python workers' bearer token, connect and read timeouts and urllib3-style retries),
//! carry the JSON of `wire`, and the upload endpoints are in `uploads`.
//!
//! The Python client retries every method, POST included, so a POST whose answer was lost
//! (a read timeout, a dropped connection, a 502 from a proxy) is sent again and may be
//! performed twice. Here a request remembers whether any earlier attempt may have been
//! performed, and each write resolves that doubt its own way:
//! - a state is re-posted only after reading the dataset back shows it is not the latest;
//! - file rows are unique per path on the server, so a repeated batch adds nothing;
//! - a repeated workflow link answers 409, which means "already linked";
//! - a repeated bulk create reports the datasets of the first attempt as conflicted; those
//!   whose origin, create method and creation time show they came from this call (and that
//!   have no workflow yet) are returned as created.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use futures_util::future::BoxFuture;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tracing::warn;
use url::Url;

mod transport;
mod uploads;
mod wire;

use super::uploads::{
    NewUpload, Notification, ProcessLogLine, UploadLog, UploadLogPatch, UploadQuery, UploadRef,
    WorkerProcess,
};
use super::{
    BulkOutcome, Creator, Dataset, DatasetId, DatasetPatch, DatasetQuery, FileRowSource, MAX_BULK,
    Metric, NewDataset, Project, Registry, RegistryError,
};
use crate::compute::md5::Md5Digest;
use crate::model::{DatasetState, FileRecord};
use transport::{Call, Reply, Sent, Transport, path_segment, redacted};
use wire::{
    Listed, WireBulkOutcome, WireDataset, WireDatasetList, WireDatasetPatch, WireNewDataset,
    WireProject, WireStoredReport, WireWorkflowLink, read_listed,
};

/// How to reach the Bioloop API and how hard to try (spec E.1).
#[derive(Clone)]
pub struct HttpConfig {
    /// `API_BASE_URL`; a path is kept (`https://host/api` and `https://host/api/` are the same).
    pub base_url: Url,
    /// `APP_API_TOKEN`, sent as `Authorization: Bearer`; never logged.
    pub token: String,
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of an answer.
    pub read_timeout: Duration,
    /// Retries after the first attempt, on connection errors, timeouts and 429/502/503.
    pub max_retries: u32,
    /// The n-th retry waits `backoff * 2^(n-1)`, except the first, which does not wait.
    pub backoff: Duration,
    /// Cap on any one wait, `Retry-After` included.
    pub backoff_max: Duration,
    /// How long stored file rows may take to become readable (spec E.4).
    pub rows_visible_wait: Duration,
    /// File rows sent per `POST datasets/{id}/files`.
    pub file_batch: usize,
}

impl HttpConfig {
    /// The Python workers' transport: connect 5 s, read 30 s, 9 retries with a backoff
    /// factor of 5 s capped at 120 s (about 10.5 minutes of retrying in all).
    pub fn new(base_url: Url, token: String) -> HttpConfig {
        HttpConfig {
            base_url,
            token,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(30),
            max_retries: 9,
            backoff: Duration::from_secs(5),
            backoff_max: Duration::from_secs(120),
            rows_visible_wait: ROWS_VISIBLE_WAIT,
            file_batch: FILE_BATCH,
        }
    }
}

impl fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConfig")
            .field("base_url", &redacted(&self.base_url))
            .field("token", &"<redacted>")
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .field("backoff_max", &self.backoff_max)
            .field("rows_visible_wait", &self.rows_visible_wait)
            .field("file_batch", &self.file_batch)
            .finish()
    }
}

/// File rows sent per request by default (`inspect.file_metadata_batch_size`, spec B.2).
pub const FILE_BATCH: usize = 25_000;

/// How long `replace_files` waits by default for acknowledged rows to become readable (spec
/// E.4: the API answers before it stores them; 20,000 rows took seconds), resending those
/// still missing.
pub const ROWS_VISIBLE_WAIT: Duration = Duration::from_secs(300);

/// Rows still missing this long after they were sent, with none becoming readable meanwhile,
/// are taken as lost and sent again.
const ROWS_RESEND_AFTER: Duration = Duration::from_secs(5);

/// Paths named in an error about stored rows that differ from an inspection.
const LISTED_ROW_DIFFERENCES: usize = 20;

/// Datasets whose file listing is kept between the pages of a walk (see `files_page`).
const FILE_LISTINGS_KEPT: usize = 4;

/// Datasets asked for per page of a `GET datasets` listing. The API applies no limit of its
/// own (spec E.4): without one, a large registry would come back as one giant answer.
const LIST_PAGE: usize = 1_000;

pub struct HttpRegistry {
    http: Transport,
    rows_visible_wait: Duration,
    file_batch: usize,
    /// The last few datasets' file listings, newest last.
    listings: Mutex<VecDeque<(DatasetId, Arc<Vec<FileRecord>>)>>,
    /// Items of dataset listings skipped because they could not be read, since start.
    skipped: AtomicU64,
}

impl fmt::Debug for HttpRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRegistry")
            .field("base", &redacted(self.http.base()))
            .finish_non_exhaustive()
    }
}

impl HttpRegistry {
    pub fn new(config: HttpConfig) -> anyhow::Result<HttpRegistry> {
        Ok(HttpRegistry {
            http: Transport::new(&config)?,
            rows_visible_wait: config.rows_visible_wait,
            file_batch: config.file_batch.max(1),
            listings: Mutex::new(VecDeque::new()),
            skipped: AtomicU64::new(0),
        })
    }

    /// How many items of dataset listings were skipped since start because they could not be
    /// read (each was logged with its id and the reason).
    pub fn skipped_listing_items(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Whether the dataset's latest state is `state`.
    fn state_is(
        &self,
        id: DatasetId,
        state: DatasetState,
    ) -> BoxFuture<'_, Result<bool, RegistryError>> {
        Box::pin(async move { Ok(self.latest_state(id).await?.as_deref() == Some(state.as_str())) })
    }

    /// `GET datasets/{id}` with `query`.
    async fn fetch(
        &self,
        id: DatasetId,
        query: Vec<(&'static str, String)>,
    ) -> Result<WireDataset, RegistryError> {
        let call = Call::get(format!("datasets/{id}"), query);
        let reply = self.http.answered(&call, Some(id)).await?;
        self.http.decode(&call, &reply)
    }

    async fn latest_state(&self, id: DatasetId) -> Result<Option<String>, RegistryError> {
        Ok(self
            .fetch(id, Vec::new())
            .await?
            .into_dataset()?
            .latest_state()
            .map(str::to_owned))
    }

    /// `GET datasets` with the API's own filters, page by page (`limit`, `offset`) until a
    /// page comes back short or `enough` datasets passed `keep`.
    ///
    /// An item that cannot be read (a legacy row with a null name, an unknown type, an odd
    /// date) is skipped with a warning naming it, instead of failing the whole listing: one
    /// such row would otherwise stop every `watch` run. The API sorts by `updated_at`, so a
    /// dataset updated while the pages are read moves to the front: it may be seen twice
    /// (kept once) or missed by this listing (found by the next).
    async fn list(
        &self,
        query: Vec<(&'static str, String)>,
        page_size: usize,
        enough: Option<usize>,
        keep: impl Fn(&Listed) -> bool,
    ) -> Result<Vec<Listed>, RegistryError> {
        let mut kept: Vec<Listed> = Vec::new();
        let mut seen = HashSet::new();
        let mut skipped = 0_u64;
        let mut offset = 0;
        while enough.is_none_or(|n| kept.len() < n) {
            let mut params = query.clone();
            params.push(("limit", page_size.to_string()));
            params.push(("offset", offset.to_string()));
            let call = Call::get("datasets".to_owned(), params);
            let reply = self.http.answered(&call, None).await?;
            let page: WireDatasetList = self.http.decode(&call, &reply)?;
            let received = page.datasets.len();
            for (idx, item) in page.datasets.into_iter().enumerate() {
                match read_listed(item) {
                    Ok(listed) if seen.insert(listed.dataset.id) && keep(&listed) => {
                        kept.push(listed)
                    }
                    Ok(_) => {}
                    Err((id, reason)) => {
                        skipped += 1;
                        match id {
                            Some(id) => warn!(dataset_id = id, reason = %reason,
                                "Skipped a dataset of the listing that cannot be read."),
                            None => warn!(position = offset + idx, reason = %reason,
                                "Skipped an item without an id in the listing of datasets."),
                        }
                    }
                }
            }
            if received < page_size {
                break;
            }
            offset += received;
        }
        if skipped > 0 {
            self.skipped.fetch_add(skipped, Ordering::Relaxed);
            warn!(
                skipped,
                "Skipped {skipped} datasets of a listing that cannot be read; they are left out until they are corrected in the registry."
            );
        }
        if let Some(n) = enough {
            kept.truncate(n);
        }
        Ok(kept)
    }

    /// `GET workflows/current`: every workflow link.
    async fn workflow_links(&self) -> Result<Vec<WireWorkflowLink>, RegistryError> {
        let call = Call::get("workflows/current".to_owned(), Vec::new());
        let reply = self.http.answered(&call, None).await?;
        self.http.decode(&call, &reply)
    }

    /// The rows the API shows now, by path.
    async fn visible_rows(&self, id: DatasetId) -> Result<RowChecksums, RegistryError> {
        self.forget_listing(id);
        let listing = self.fetch_listing(id).await?;
        self.forget_listing(id);
        Ok(listing.iter().map(|r| (r.path.clone(), r.md5)).collect())
    }

    /// Counts the rows of `rows` that `visible` lacks (or shows with another checksum) and, with
    /// `post`, sends them in batches as they are read (never all in memory).
    async fn send_missing(
        &self,
        id: DatasetId,
        rows: Arc<dyn FileRowSource>,
        visible: Arc<RowChecksums>,
        post: bool,
    ) -> Result<u64, RegistryError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Vec<FileRecord>>>(2);
        let file_batch = self.file_batch;
        let reader = tokio::task::spawn_blocking(move || {
            let read = || -> anyhow::Result<()> {
                let mut batch = Vec::new();
                for row in rows.rows()? {
                    let row = row?;
                    if visible.get(&row.path) == Some(&row.md5) {
                        continue;
                    }
                    batch.push(row);
                    if batch.len() == file_batch
                        && tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err()
                    {
                        return Ok(());
                    }
                }
                if !batch.is_empty() {
                    let _ = tx.blocking_send(Ok(batch));
                }
                Ok(())
            };
            if let Err(err) = read() {
                let _ = tx.blocking_send(Err(err));
            }
        });
        let mut missing = 0u64;
        while let Some(batch) = rx.recv().await {
            let batch = batch.map_err(RegistryError::Unavailable)?;
            missing += batch.len() as u64;
            if post {
                self.post_rows(id, &batch).await?;
            }
        }
        reader
            .await
            .map_err(|err| RegistryError::Unavailable(err.into()))?;
        Ok(missing)
    }

    /// `POST datasets/{id}/files` with one batch of rows.
    async fn post_rows(&self, id: DatasetId, batch: &[FileRecord]) -> Result<(), RegistryError> {
        let mut rows = Vec::with_capacity(batch.len());
        for file in batch {
            let Some(size) = file.size else {
                return Err(RegistryError::Invalid(format!(
                    "file row `{}` of dataset {id} has no size",
                    file.path
                )));
            };
            rows.push(json!({
                "path": file.path,
                "md5": file.md5.map(|m| m.to_string()),
                "size": size.to_string(),
                "type": file.file_type.as_str(),
            }));
        }
        // Rows are unique per (dataset, path) on the server: a repeated batch adds nothing.
        let call = Call::post(format!("datasets/{id}/files"), &Value::Array(rows));
        self.http.answered(&call, Some(id)).await?;
        Ok(())
    }

    /// The dataset's file rows sorted by path, from `GET datasets/{id}?files=true`.
    async fn fetch_listing(&self, id: DatasetId) -> Result<Arc<Vec<FileRecord>>, RegistryError> {
        let wire = self.fetch(id, vec![("files", "true".to_owned())]).await?;
        let mut rows = wire
            .files
            .unwrap_or_default()
            .into_iter()
            .map(|f| f.into_record(id))
            .collect::<Result<Vec<_>, _>>()?;
        rows.sort_by(|a, b| a.path.cmp(&b.path));
        let rows = Arc::new(rows);
        let mut listings = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        listings.retain(|(kept, _)| *kept != id);
        if listings.len() >= FILE_LISTINGS_KEPT {
            listings.pop_front();
        }
        listings.push_back((id, Arc::clone(&rows)));
        Ok(rows)
    }

    fn kept_listing(&self, id: DatasetId) -> Option<Arc<Vec<FileRecord>>> {
        let listings = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        listings
            .iter()
            .find(|(kept, _)| *kept == id)
            .map(|(_, rows)| Arc::clone(rows))
    }

    fn forget_listing(&self, id: DatasetId) {
        let mut listings = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        listings.retain(|(kept, _)| *kept != id);
    }

    /// Turns the conflicts of a bulk create whose earlier attempt may have been performed into
    /// creations, where the dataset found is evidently that attempt's work: same origin and
    /// create method, created after the call started (by the server's clock when it sent
    /// one) and no workflow linked yet.
    async fn claim_conflicts(
        &self,
        items: &[NewDataset],
        reply: &Reply,
        outcome: &mut BulkOutcome,
    ) -> Result<(), RegistryError> {
        // The Date header has whole seconds, hence the extra second.
        let now = reply.answer.server_date.unwrap_or_else(Utc::now);
        let since = TimeDelta::from_std(reply.started.elapsed())
            .ok()
            .and_then(|elapsed| elapsed.checked_add(&TimeDelta::seconds(1)))
            .and_then(|margin| now.checked_sub_signed(margin))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut still_conflicted = Vec::new();
        for (name, dataset_type) in std::mem::take(&mut outcome.conflicted) {
            let item = items
                .iter()
                .find(|i| i.name == name && i.dataset_type == dataset_type);
            let mut claimed = None;
            if let Some(item) = item {
                let query = DatasetQuery {
                    dataset_type: Some(dataset_type),
                    name: Some(name.clone()),
                    ..DatasetQuery::default()
                };
                claimed = self.find(&query).await?.into_iter().find(|d| {
                    d.origin_path.as_deref() == Some(item.origin_path.as_str())
                        && d.create_method == Some(item.create_method)
                        && d.created_at >= since
                        && d.workflows.is_empty()
                });
            }
            match claimed {
                Some(found) => outcome.created.push(self.get(found.id).await?),
                None => still_conflicted.push((name, dataset_type)),
            }
        }
        outcome.conflicted = still_conflicted;
        Ok(())
    }

    /// `find` for one workflow: its link names the dataset, so nothing else is listed.
    async fn find_by_workflow(
        &self,
        workflow_id: &str,
        query: &DatasetQuery,
    ) -> Result<Vec<Dataset>, RegistryError> {
        let links = self.workflow_links().await?;
        let Some(id) = links
            .into_iter()
            .find(|link| link.id == workflow_id)
            .and_then(|link| link.dataset_id)
        else {
            return Ok(Vec::new());
        };
        let dataset = match self.get(id).await {
            Ok(dataset) => dataset,
            Err(RegistryError::NotFound(_)) => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        let listed = Listed {
            dataset,
            states_known: true,
        };
        Ok(if matches_query(&listed, query) {
            vec![listed.dataset]
        } else {
            Vec::new()
        })
    }
}

#[async_trait]
impl Registry for HttpRegistry {
    async fn bulk_create(&self, items: &[NewDataset]) -> Result<BulkOutcome, RegistryError> {
        if items.len() > MAX_BULK {
            return Err(RegistryError::Invalid(format!(
                "a bulk create takes at most {MAX_BULK} datasets, not {}",
                items.len()
            )));
        }
        if items.is_empty() {
            return Ok(BulkOutcome::default());
        }
        let datasets: Vec<WireNewDataset<'_>> = items.iter().map(WireNewDataset::from).collect();
        let call = Call::post("datasets/bulk".to_owned(), &json!({ "datasets": datasets }));
        let reply = self.http.answered(&call, None).await?;
        let wire: WireBulkOutcome = self.http.decode(&call, &reply)?;
        let mut outcome = wire.into_outcome()?;
        if reply.unsure && !outcome.conflicted.is_empty() {
            self.claim_conflicts(items, &reply, &mut outcome).await?;
        }
        Ok(outcome)
    }

    async fn get(&self, id: DatasetId) -> Result<Dataset, RegistryError> {
        self.fetch(id, vec![("bundle", "true".to_owned())])
            .await?
            .into_dataset()
    }

    async fn find(&self, query: &DatasetQuery) -> Result<Vec<Dataset>, RegistryError> {
        if let Some(workflow_id) = &query.workflow_id {
            return self.find_by_workflow(workflow_id, query).await;
        }
        let mut params: Vec<(&'static str, String)> = vec![
            ("bundle", "true".to_owned()),
            ("include_states", "true".to_owned()),
        ];
        if let Some(t) = query.dataset_type {
            params.push(("type", t.as_str().to_owned()));
        }
        if let Some(name) = &query.name {
            params.push(("name", name.as_str().to_owned()));
            params.push(("match_name_exact", "true".to_owned()));
        }
        if let Some(cutoff) = query.staged_before {
            // The API counts whole days back from its own now; the exact cutoff is applied
            // below to the states it returns.
            let seconds = (Utc::now() - cutoff).num_seconds().max(0);
            let days = (seconds + 43_200) / 86_400;
            params.push(("days_since_last_staged", days.to_string()));
        }
        // The API ignores parameters it does not know (spec E.4): "without workflows", the
        // create method and the exact staged cutoff are filtered here, so the limit counts the
        // datasets that pass them; pages are as small as the limit only when nothing is.
        let filtered_here = query.without_workflows
            || query.create_method.is_some()
            || query.name.is_some()
            || query.staged_before.is_some();
        let page_size = match (query.limit, filtered_here) {
            (Some(limit), false) => limit.clamp(1, LIST_PAGE),
            _ => LIST_PAGE,
        };
        let deleted_flags: &[bool] = if query.include_deleted {
            &[false, true]
        } else {
            &[false]
        };
        let mut found = Vec::new();
        for deleted in deleted_flags {
            let mut params = params.clone();
            params.push(("deleted", deleted.to_string()));
            found.extend(
                self.list(params, page_size, query.limit, |listed| {
                    matches_query(listed, query)
                })
                .await?,
            );
        }
        let mut datasets: Vec<Dataset> = found.into_iter().map(|l| l.dataset).collect();
        datasets.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(b.id.cmp(&a.id)));
        if let Some(limit) = query.limit {
            datasets.truncate(limit);
        }
        Ok(datasets)
    }

    async fn update(&self, id: DatasetId, patch: &DatasetPatch) -> Result<Dataset, RegistryError> {
        let body = json!(WireDatasetPatch::from(patch));
        let call = Call::patch(format!("datasets/{id}"), &body);
        self.http.answered(&call, Some(id)).await?;
        // The PATCH answer carries neither states nor bundle: read the whole dataset back.
        self.get(id).await
    }

    async fn add_state(&self, id: DatasetId, state: DatasetState) -> Result<(), RegistryError> {
        if self.latest_state(id).await?.as_deref() == Some(state.as_str()) {
            return Ok(());
        }
        let call = Call::post(
            format!("datasets/{id}/states"),
            &json!({ "state": state.as_str() }),
        );
        let settled = move || self.state_is(id, state);
        self.http.expect_ok(&call, Some(id), Some(&settled)).await?;
        Ok(())
    }

    async fn add_files(&self, id: DatasetId, files: &[FileRecord]) -> Result<(), RegistryError> {
        for batch in files.chunks(self.file_batch) {
            self.post_rows(id, batch).await?;
        }
        self.forget_listing(id);
        Ok(())
    }

    /// The API keeps file rows for good and answers a POST before it stores them, sometimes
    /// never storing them (spec E.4). So: compare the new rows with those stored (any that
    /// differ fail the call, naming them: they cannot be replaced); post the missing ones; then
    /// read back until every row is readable, resending what is still missing, for at most
    /// `ROWS_VISIBLE_WAIT`.
    async fn replace_files(
        &self,
        id: DatasetId,
        rows: Arc<dyn FileRowSource>,
    ) -> Result<u64, RegistryError> {
        let stored = Arc::new(self.visible_rows(id).await?);
        let (source, held) = (Arc::clone(&rows), Arc::clone(&stored));
        let compared = crate::compute::blocking(move || compare_rows(id, &*source, &held))
            .await
            .map_err(RegistryError::Unavailable)?;
        if !compared.differences.is_empty() {
            return Err(RegistryError::Invalid(describe_row_differences(
                id,
                &compared.differences,
            )));
        }
        let started = Instant::now();
        let mut visible = stored;
        // When rows were last sent, or last seen to become readable.
        let mut last_move: Option<(Instant, usize)> = None;
        let mut wait = Duration::from_millis(500);
        loop {
            // Send what is missing at first, and again whenever nothing became readable for a
            // while (rows the API lost); rows are unique per path on the server, so a resent
            // row adds nothing.
            let stalled = last_move.is_none_or(|(at, count)| {
                count == visible.len() && at.elapsed() >= ROWS_RESEND_AFTER
            });
            let missing = self
                .send_missing(id, Arc::clone(&rows), Arc::clone(&visible), stalled)
                .await?;
            if missing == 0 {
                return Ok(compared.total);
            }
            if stalled || last_move.is_some_and(|(_, count)| count != visible.len()) {
                last_move = Some((Instant::now(), visible.len()));
            }
            if started.elapsed() >= self.rows_visible_wait {
                return Err(RegistryError::Unavailable(anyhow::format_err!(
                    "the Bioloop API accepted the {} file rows of dataset {id}, but {missing} of them were still not readable after {} s",
                    compared.total,
                    self.rows_visible_wait.as_secs()
                )));
            }
            if stalled {
                // Rows just sent show within moments when the API keeps them: look once soon,
                // then go on waiting longer each time, so that rows the API keeps losing are
                // not sent more often.
                tokio::time::sleep(wait.min(Duration::from_millis(500))).await;
            } else {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(15));
            }
            visible = Arc::new(self.visible_rows(id).await?);
        }
    }

    fn file_rows_lag(&self) -> Duration {
        self.rows_visible_wait
    }

    /// The API returns a dataset's files in one answer, without sizes and without paging. A
    /// walk starts with `after = None`, which fetches the listing; the following pages are
    /// cut from that copy, which is dropped when the walk has been read to its end (or when
    /// more than a few walks run at once).
    async fn files_page(
        &self,
        id: DatasetId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FileRecord>, RegistryError> {
        let rows = match (after, self.kept_listing(id)) {
            (Some(_), Some(rows)) => rows,
            _ => self.fetch_listing(id).await?,
        };
        let start = after.map_or(0, |after| {
            rows.partition_point(|r| r.path.as_str() <= after)
        });
        let end = start.saturating_add(limit).min(rows.len());
        if start >= end {
            self.forget_listing(id);
            return Ok(Vec::new());
        }
        Ok(rows[start..end].to_vec())
    }

    async fn add_workflow(&self, id: DatasetId, workflow_id: &str) -> Result<(), RegistryError> {
        let call = Call::post(
            format!("datasets/{id}/workflows"),
            &json!({ "workflow_id": workflow_id }),
        );
        match self.http.send(&call, None).await? {
            Sent::AlreadyDone => Ok(()),
            Sent::Answer(reply) if reply.answer.status.is_success() => Ok(()),
            // The link exists (perhaps from an attempt whose answer was lost). The API
            // answers 409 for a missing dataset too, which the read tells apart.
            Sent::Answer(reply) if reply.answer.status == StatusCode::CONFLICT => {
                self.fetch(id, Vec::new()).await.map(|_| ())
            }
            Sent::Answer(reply) if reply.answer.status == StatusCode::NOT_FOUND => {
                Err(RegistryError::NotFound(id))
            }
            Sent::Answer(reply) => Err(self.http.unexpected(&call, &reply)),
        }
    }

    async fn linked_workflows(
        &self,
        workflow_ids: &[String],
    ) -> Result<HashSet<String>, RegistryError> {
        if workflow_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let wanted: HashSet<&str> = workflow_ids.iter().map(String::as_str).collect();
        Ok(self
            .workflow_links()
            .await?
            .into_iter()
            .filter(|link| link.dataset_id.is_some() && wanted.contains(link.id.as_str()))
            .map(|link| link.id)
            .collect())
    }

    async fn add_metrics(&self, metrics: &[Metric]) -> Result<(), RegistryError> {
        if metrics.is_empty() {
            return Ok(());
        }
        let body: Vec<Value> = metrics
            .iter()
            .map(|m| {
                json!({
                    "measurement": m.measurement,
                    "subject": m.subject,
                    "usage": m.usage,
                    "limit": m.limit,
                    "tags": m.tags,
                })
            })
            .collect();
        let call = Call::post("metrics".to_owned(), &Value::Array(body));
        match self.http.send(&call, None).await? {
            Sent::Answer(reply) if reply.answer.status.is_success() => Ok(()),
            // The operator role may read metrics but not write them (spec E.4).
            Sent::Answer(reply) if reply.answer.status == StatusCode::FORBIDDEN => {
                Err(RegistryError::Invalid(format!(
                    "{}; posting metrics needs an admin token: the API gives the metrics:create \
                     permission to the admin role only (set APP_API_TOKEN to an admin's token, or \
                     disable [schedules.metrics])",
                    match self.http.unexpected(&call, &reply) {
                        RegistryError::Invalid(message) => message,
                        other => other.to_string(),
                    }
                )))
            }
            Sent::Answer(reply) => Err(self.http.unexpected(&call, &reply)),
            Sent::AlreadyDone => Ok(()),
        }
    }

    async fn may_post_metrics(&self) -> Result<Option<bool>, RegistryError> {
        let call = Call::post("metrics".to_owned(), &Value::Array(Vec::new()));
        match self.http.send(&call, None).await? {
            Sent::Answer(reply) if reply.answer.status.is_success() => Ok(Some(true)),
            Sent::Answer(reply) if reply.answer.status == StatusCode::FORBIDDEN => Ok(Some(false)),
            Sent::Answer(reply) => Err(self.http.unexpected(&call, &reply)),
            Sent::AlreadyDone => Ok(Some(true)),
        }
    }

    // Auxiliary tasks and scripts.

    async fn upload_report(
        &self,
        id: DatasetId,
        report: &std::path::Path,
    ) -> Result<String, RegistryError> {
        let path = report.to_path_buf();
        let content = crate::compute::blocking(move || std::fs::read(&path))
            .await
            .map_err(|err| {
                RegistryError::Invalid(format!(
                    "cannot read the report `{}` of dataset {id}: {err}",
                    report.display()
                ))
            })?;
        // Uploading again replaces the file: no settled check is needed.
        let call = Call::put_file(
            format!("datasets/{id}/report"),
            "report",
            "multiqc_report.html",
            &content,
        );
        let reply = self.http.answered(&call, Some(id)).await?;
        let stored: WireStoredReport = self.http.decode(&call, &reply)?;
        Ok(stored.path)
    }

    async fn project(&self, id_or_slug: &str) -> Result<Project, RegistryError> {
        let call = Call::get(
            format!("projects/{}", path_segment(id_or_slug)),
            vec![("include_datasets", "false".to_owned())],
        );
        let reply = match self.http.send(&call, None).await? {
            Sent::Answer(reply) if reply.answer.status.is_success() => reply,
            Sent::Answer(reply) if reply.answer.status == StatusCode::NOT_FOUND => {
                return Err(RegistryError::Invalid(format!(
                    "project `{id_or_slug}` does not exist"
                )));
            }
            Sent::Answer(reply) => return Err(self.http.unexpected(&call, &reply)),
            Sent::AlreadyDone => {
                return Err(RegistryError::Invalid(format!(
                    "project `{id_or_slug}`: no answer"
                )));
            }
        };
        let wire: WireProject = self.http.decode(&call, &reply)?;
        Ok(wire.into_project())
    }

    /// `PATCH projects/{id}/datasets {add_dataset_ids}`. The API inserts the associations
    /// without skipping existing ones, so one that exists makes the whole request 409: the
    /// datasets are then sent one by one, a 409 meaning that one is associated already.
    async fn add_to_project(
        &self,
        project_id: &str,
        ids: &[DatasetId],
    ) -> Result<(), RegistryError> {
        if ids.is_empty() {
            return Ok(());
        }
        let path = format!("projects/{}/datasets", path_segment(project_id));
        let call = Call::patch(path.clone(), &json!({ "add_dataset_ids": ids }));
        match self.http.send(&call, None).await? {
            Sent::Answer(reply) if reply.answer.status.is_success() => return Ok(()),
            Sent::Answer(reply) if reply.answer.status == StatusCode::CONFLICT && ids.len() > 1 => {
            }
            Sent::Answer(reply) if reply.answer.status == StatusCode::CONFLICT => return Ok(()),
            Sent::Answer(reply) => return Err(self.http.unexpected(&call, &reply)),
            Sent::AlreadyDone => return Ok(()),
        }
        for id in ids {
            let call = Call::patch(path.clone(), &json!({ "add_dataset_ids": [id] }));
            match self.http.send(&call, None).await? {
                Sent::Answer(reply)
                    if reply.answer.status.is_success()
                        || reply.answer.status == StatusCode::CONFLICT => {}
                Sent::Answer(reply) => return Err(self.http.unexpected(&call, &reply)),
                Sent::AlreadyDone => {}
            }
        }
        Ok(())
    }

    async fn create_upload(&self, upload: &NewUpload) -> Result<UploadLog, RegistryError> {
        self.http_create_upload(upload).await
    }

    async fn complete_upload(
        &self,
        id: DatasetId,
        process_id: &str,
        metadata: Option<&serde_json::Map<String, Value>>,
    ) -> Result<UploadLog, RegistryError> {
        self.http_complete_upload(id, process_id, metadata).await
    }

    async fn upload_log(&self, id: DatasetId) -> Result<Option<UploadLog>, RegistryError> {
        self.http_upload_log(id).await
    }

    async fn update_upload_log(
        &self,
        id: DatasetId,
        patch: &UploadLogPatch,
    ) -> Result<UploadLog, RegistryError> {
        self.http_update_upload_log(id, patch).await
    }

    async fn uploads(&self, query: &UploadQuery) -> Result<Vec<UploadRef>, RegistryError> {
        self.http_uploads(query).await
    }

    async fn register_process(
        &self,
        process: &WorkerProcess,
    ) -> Result<Option<i64>, RegistryError> {
        self.http_register_process(process).await
    }

    async fn add_process_logs(
        &self,
        process_id: i64,
        lines: &[ProcessLogLine],
    ) -> Result<(), RegistryError> {
        self.http_add_process_logs(process_id, lines).await
    }

    async fn notify(&self, notification: &Notification) -> Result<(), RegistryError> {
        self.http_notify(notification).await
    }
    /// The user of the dataset's `create` audit entry; `GET datasets/{id}` always includes
    /// the audit logs with their users.
    async fn created_by(&self, id: DatasetId) -> Result<Creator, RegistryError> {
        let call = Call::get(format!("datasets/{id}"), Vec::new());
        let reply = self.http.answered(&call, Some(id)).await?;
        let dataset: Value = self.http.decode(&call, &reply)?;
        let creator = dataset["audit_logs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|entry| entry["action"] == "create")
            .and_then(|entry| entry["user"]["username"].as_str());
        Ok(creator.map_or(Creator::Unknown, |name| Creator::User(name.to_owned())))
    }
}

/// File rows by path, with their checksums.
type RowChecksums = std::collections::HashMap<String, Option<Md5Digest>>;

/// How a new inspection's rows compare with the rows the API holds.
struct ComparedRows {
    total: u64,
    /// Stored rows that the inspection contradicts: another checksum, or a path it no longer
    /// has.
    differences: Vec<String>,
}

fn compare_rows(
    id: DatasetId,
    rows: &dyn FileRowSource,
    stored: &RowChecksums,
) -> anyhow::Result<ComparedRows> {
    let mut unmatched: HashSet<&str> = stored.keys().map(String::as_str).collect();
    let mut differences = Vec::new();
    let mut total = 0u64;
    for row in rows.rows()? {
        let row = row?;
        total += 1;
        if let Some(md5) = stored.get(&row.path) {
            unmatched.remove(row.path.as_str());
            if *md5 != row.md5 {
                differences.push(format!(
                    "`{}` is stored with MD5 {}, inspected with {}",
                    row.path,
                    md5.map_or_else(|| "none".to_owned(), |m| m.to_string()),
                    row.md5.map_or_else(|| "none".to_owned(), |m| m.to_string()),
                ));
            }
        }
    }
    let mut gone: Vec<&str> = unmatched.into_iter().collect();
    gone.sort_unstable();
    differences.extend(
        gone.into_iter()
            .map(|path| format!("`{path}` is stored but no longer in dataset {id}")),
    );
    differences.sort();
    Ok(ComparedRows { total, differences })
}

fn describe_row_differences(id: DatasetId, differences: &[String]) -> String {
    let mut listed = differences
        .iter()
        .take(LISTED_ROW_DIFFERENCES)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if differences.len() > LISTED_ROW_DIFFERENCES {
        listed.push_str(&format!(
            "; and {} more",
            differences.len() - LISTED_ROW_DIFFERENCES
        ));
    }
    format!(
        "dataset {id} changed since its file rows were stored, and the Bioloop API cannot replace \
         stored rows: {listed}. Register the current data as a new dataset, or remove the stale \
         rows in the API's database, then run the workflow again"
    )
}

/// Whether a listed dataset passes the filters the API does not apply (or applies loosely).
fn matches_query(listed: &Listed, query: &DatasetQuery) -> bool {
    let d = &listed.dataset;
    if !query.include_deleted && d.is_deleted {
        return false;
    }
    if query.dataset_type.is_some_and(|t| t != d.dataset_type) {
        return false;
    }
    // The API's name filter is case-insensitive and, in older versions, a substring match.
    if query.name.as_ref().is_some_and(|name| *name != d.name) {
        return false;
    }
    if query.without_workflows && !d.workflows.is_empty() {
        return false;
    }
    if query
        .create_method
        .is_some_and(|m| d.create_method != Some(m))
    {
        return false;
    }
    if query
        .workflow_id
        .as_ref()
        .is_some_and(|w| !d.workflows.contains(w))
    {
        return false;
    }
    if let Some(cutoff) = query.staged_before {
        if !d.is_staged {
            return false;
        }
        if listed.states_known
            && d.states
                .iter()
                .any(|s| s.state == DatasetState::Staged.as_str() && s.timestamp >= cutoff)
        {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_stay_out_of_urls_and_debug_output() {
        let url = Url::parse("https://user:pw@h/api/").expect("url");
        assert_eq!(redacted(&url), "https://h/api/");
        let config = HttpConfig::new(url, "the-token".into());
        let text = format!("{config:?}");
        assert!(
            !text.contains("the-token") && !text.contains("pw"),
            "{text}"
        );
    }
}

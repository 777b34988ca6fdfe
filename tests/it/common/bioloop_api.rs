//! A Bioloop API for tests: the endpoints the workers use (spec E.2, E.3), served by axum on
//! its own thread and runtime, backed by the embedded registry on its own SQLite file, so its
//! semantics are the embedded backend's. It records every request and can be told to
//! misbehave: answer 503 (with `Retry-After`), answer late, or drop the connection before or
//! after doing the work.
//!
//! `GET datasets` answers as the real API does (spec E.2, E.4): sorted by `updated_at`, newest
//! first, paged by `limit` and `offset` (no limit means all), and deaf to parameters it does
//! not know (such as `processed`). A test can add items that the client cannot read, as a
//! legacy row of the real database would be.
//!
//! Where the real API is looser than the embedded registry, this server follows the API:
//! `POST datasets/{id}/states` always appends (spec J.16 is about the duplicates that causes),
//! `GET datasets/{id}?files=true` lists path and MD5 only, and linking a workflow to a missing
//! dataset answers 409 like Prisma's foreign-key error. File rows are stored before the answer
//! (the API does it after), so tests can read them at once, unless a test asks for the real
//! API's behaviour (spec E.4): rows stored only a while after the answer, or never.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{SecondsFormat, TimeDelta, Utc};
use serde_json::{Value, json};
use url::Url;
use workers::model::{Bundle, DatasetName, FileRecord, FileType};
use workers::registry::sql::SqlRegistry;
use workers::registry::{
    Dataset, DatasetId, DatasetPatch, DatasetQuery, FilePages, MAX_BULK, Metric, NewDataset,
    Registry, RegistryError,
};
use workers::sqlite::{Db, to_millis};

/// What the server does to a request a fault applies to.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answers `status` without doing the work, with `Retry-After` when given.
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    /// Does the work, then waits this long before answering.
    Delay(Duration),
    /// Closes the connection without doing the work or answering.
    DropBefore,
    /// Does the work, then closes the connection without answering.
    DropAfter,
}

impl Fault {
    pub fn unavailable() -> Fault {
        Fault::Status {
            status: 503,
            retry_after: None,
        }
    }

    pub fn unavailable_for(retry_after: &str) -> Fault {
        Fault::Status {
            status: 503,
            retry_after: Some(retry_after.to_owned()),
        }
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Relative to the API root, without a leading `/` (`datasets/7/states`).
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
    /// `None` while unanswered, and for a dropped connection.
    pub status: Option<u16>,
    pub at: Instant,
}

/// The running server. Dropping it stops the server.
pub struct TestApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// The path under which the API is mounted, so that base URLs with a path are exercised.
const ROOT: &str = "/api";

struct Shared {
    registry: SqlRegistry,
    db: Db,
    token: String,
    faults: Mutex<Vec<PendingFault>>,
    log: Mutex<Vec<Recorded>>,
    rows: Mutex<RowsBehaviour>,
    /// Items listed ahead of the live datasets by `GET datasets`, as sent.
    raw_listed: Mutex<Vec<Value>>,
    uploads: Mutex<Option<UploadSettings>>,
    notifications: Mutex<Vec<Value>>,
    /// Reports, projects, creators and the operator token (the auxiliary block below).
    aux: Mutex<Aux>,
    /// A token of a user with the operator role only: `POST metrics` answers it 403.
    operator_token: String,
}

/// What `POST datasets/{id}/files` does with its rows after answering 200.
#[derive(Default)]
struct RowsBehaviour {
    /// Stores them only this long after the answer.
    delay: Option<Duration>,
    /// Batches that are acknowledged and never stored (the API died in the moment).
    lose: usize,
}

struct PendingFault {
    method: Option<String>,
    prefix: String,
    fault: Fault,
    remaining: usize,
}

impl TestApi {
    pub fn start() -> TestApi {
        let dir = tempfile::Builder::new()
            .prefix("bioloop-api-")
            .tempdir()
            .expect("temp dir");
        let db = Db::open(&dir.path().join("api.db"), Duration::from_secs(10)).expect("api db");
        let shared = Arc::new(Shared {
            registry: SqlRegistry::new(db.clone()),
            db,
            token: format!("test-token-{}", uuid::Uuid::new_v4()),
            faults: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            rows: Mutex::new(RowsBehaviour::default()),
            raw_listed: Mutex::new(Vec::new()),
            uploads: Mutex::new(None),
            notifications: Mutex::new(Vec::new()),
            aux: Mutex::new(Aux::default()),
            operator_token: format!("operator-token-{}", uuid::Uuid::new_v4()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("address");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("bioloop-api".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("api runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    let serve = std::future::IntoFuture::into_future(axum::serve(listener, app));
                    tokio::select! {
                        _ = serve => {}
                        _ = stop_rx => {}
                    }
                });
                // Connections still open (a delayed answer) are dropped, not waited for.
                runtime.shutdown_background();
            })
            .expect("api thread");
        TestApi {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT/api/`.
    pub fn base_url(&self) -> Url {
        Url::parse(&format!("http://{}{ROOT}/", self.addr)).expect("base url")
    }

    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// A registry client of this API with `token` and quick retries (two, 10 ms apart), for
    /// tests of what the client sends rather than of its retry schedule.
    pub fn client_with(&self, token: &str) -> workers::registry::http::HttpRegistry {
        workers::registry::http::HttpRegistry::new(workers::registry::http::HttpConfig {
            base_url: self.base_url(),
            token: token.to_owned(),
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(5),
            max_retries: 2,
            backoff: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            rows_visible_wait: Duration::from_secs(5),
            file_batch: workers::registry::http::FILE_BATCH,
        })
        .expect("registry client")
    }

    /// `client_with` the API's own token.
    pub fn client(&self) -> workers::registry::http::HttpRegistry {
        self.client_with(self.token())
    }

    /// The server's own registry, for arranging and checking what the API holds.
    pub fn registry(&self) -> &SqlRegistry {
        &self.shared.registry
    }

    pub fn db(&self) -> &Db {
        &self.shared.db
    }

    /// Applies `fault` to the next `times` requests whose method is `method` (`*` for any)
    /// and whose path starts with `path_prefix`. Faults apply in the order they were added.
    pub fn inject(&self, method: &str, path_prefix: &str, fault: Fault, times: usize) {
        self.shared.faults.lock().unwrap().push(PendingFault {
            method: (method != "*").then(|| method.to_owned()),
            prefix: path_prefix.to_owned(),
            fault,
            remaining: times,
        });
    }

    /// From now on, file rows become readable only `delay` after their POST was answered, as
    /// the real API stores them after answering (spec E.4); `None` stores them at once again.
    pub fn delay_file_rows(&self, delay: Option<Duration>) {
        self.shared.rows.lock().unwrap().delay = delay;
    }

    /// The next `batches` file POSTs are answered 200 and their rows never stored, as when the
    /// real API dies right after answering (spec E.4).
    pub fn lose_file_rows(&self, batches: usize) {
        self.shared.rows.lock().unwrap().lose = batches;
    }

    /// Lists `item` exactly as given in every `GET datasets` of live datasets, ahead of the
    /// stored ones (as if most recently updated) and counted in its paging: a row such as a
    /// legacy one with a null name, an unknown type or an odd date.
    pub fn list_raw(&self, item: Value) {
        self.shared.raw_listed.lock().unwrap().push(item);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Requests so far with this method whose path starts with `path_prefix`.
    pub fn requests_to(&self, method: &str, path_prefix: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.path.starts_with(path_prefix))
            .collect()
    }

    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.requests_to(method, path_prefix).len()
    }

    pub fn clear_requests(&self) {
        self.shared.log.lock().unwrap().clear();
    }

    /// The states rows of a dataset as stored, oldest first (duplicates included).
    pub fn stored_states(&self, id: DatasetId) -> Vec<String> {
        self.shared
            .db
            .with_conn(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT state FROM dataset_states WHERE dataset_id = ?1 ORDER BY seq",
                )?;
                let rows = stmt.query_map([id], |r| r.get(0))?;
                Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
            })
            .unwrap()
    }

    /// Adds a state with a chosen time, as if it had been recorded then.
    pub fn backdate_state(&self, id: DatasetId, state: &str, at: chrono::DateTime<Utc>) {
        self.shared
            .db
            .with_conn(|conn| {
                conn.execute(
                    "INSERT INTO dataset_states (dataset_id, state, timestamp) VALUES (?1, ?2, ?3)",
                    rusqlite::params![id, state, to_millis(at)],
                )?;
                Ok(())
            })
            .unwrap();
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/datasets", get(list_datasets).post(create_dataset))
        .route("/datasets/bulk", post(bulk_create))
        .route("/datasets/{id}", get(get_dataset).patch(update_dataset))
        .route("/datasets/{id}/states", post(add_state))
        .route("/datasets/{id}/files", post(add_files))
        .route("/datasets/{id}/workflows", post(add_workflow))
        .route("/workflows/current", get(current_workflows))
        .route("/metrics", post(add_metrics))
        .merge(upload_routes())
        .merge(aux_routes());
    Router::new()
        .nest(ROOT, api)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "Not Found") })
        .layer(middleware::from_fn_with_state(Arc::clone(&shared), gate))
        .with_state(shared)
}

impl Shared {
    fn take_fault(&self, method: &str, path: &str) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap();
        let idx = faults.iter().position(|f| {
            f.remaining > 0
                && f.method.as_deref().is_none_or(|m| m == method)
                && path.starts_with(&f.prefix)
        })?;
        faults[idx].remaining -= 1;
        let fault = faults[idx].fault.clone();
        if faults[idx].remaining == 0 {
            faults.remove(idx);
        }
        Some(fault)
    }

    fn set_status(&self, idx: usize, status: Option<u16>) {
        self.log.lock().unwrap()[idx].status = status;
    }
}

/// Records the request, applies faults and checks the bearer token.
async fn gate(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let path = request
        .uri()
        .path()
        .strip_prefix(ROOT)
        .unwrap_or(request.uri().path())
        .trim_start_matches('/')
        .to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return error(StatusCode::BAD_REQUEST, "unreadable body");
    };
    let request = Request::from_parts(parts, Body::from(bytes.clone()));
    let idx = {
        let mut log = shared.log.lock().unwrap();
        log.push(Recorded {
            method: method.clone(),
            path: path.clone(),
            query,
            body: serde_json::from_slice(&bytes).ok(),
            status: None,
            at: Instant::now(),
        });
        log.len() - 1
    };
    let fault = shared.take_fault(&method, &path);
    match &fault {
        Some(Fault::Status {
            status,
            retry_after,
        }) => {
            let status = StatusCode::from_u16(*status).unwrap();
            let mut response = error(status, status.canonical_reason().unwrap_or("error"));
            if let Some(value) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_str(value).unwrap());
            }
            shared.set_status(idx, Some(status.as_u16()));
            return response;
        }
        Some(Fault::DropBefore) => return dropped_connection(),
        _ => {}
    }
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let response = if bearer == shared.token {
        next.run(request).await
    } else if bearer == shared.operator_token {
        operator_request(request, next, &method, &path).await
    } else {
        error(StatusCode::UNAUTHORIZED, "Unauthorized")
    };
    match fault {
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::DropAfter) => return dropped_connection(),
        _ => {}
    }
    shared.set_status(idx, Some(response.status().as_u16()));
    response
}

/// A body that fails at once: hyper closes the connection without a complete answer.
fn dropped_connection() -> Response {
    let failing = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("connection dropped on purpose"))
    });
    Response::new(Body::from_stream(failing))
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn registry_error(err: RegistryError) -> Response {
    match err {
        RegistryError::NotFound(_) => error(StatusCode::NOT_FOUND, "Not Found"),
        RegistryError::Invalid(message) => error(StatusCode::BAD_REQUEST, &message),
        RegistryError::Unavailable(err) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{err:#}"))
        }
    }
}

/// express-validator's `toBoolean`: anything but `0`, `false` (any case) and empty is true.
fn flag(query: &HashMap<String, String>, key: &str, default: bool) -> bool {
    match query.get(key) {
        None => default,
        Some(v) => !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false")),
    }
}

fn iso(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// BigInt columns travel as strings.
fn big(v: Option<u64>) -> Value {
    v.map_or(Value::Null, |v| Value::String(v.to_string()))
}

fn parse_big(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// The dataset columns plus workflow ids and the (empty) hierarchy, as Prisma includes them.
fn dataset_json(d: &Dataset, states: bool, bundle: bool) -> Value {
    let mut v = json!({
        "id": d.id,
        "name": d.name.as_str(),
        "type": d.dataset_type.as_str(),
        "num_directories": d.num_directories,
        "num_files": d.num_files,
        "du_size": big(d.du_size),
        "size": big(d.size),
        "bundle_size": big(d.bundle_size),
        "description": d.description,
        "created_at": iso(d.created_at),
        "updated_at": iso(d.updated_at),
        "origin_path": d.origin_path,
        "archive_path": d.archive_path,
        "staged_path": d.staged_path,
        "is_deleted": d.is_deleted,
        "is_staged": d.is_staged,
        "metadata": d.metadata,
        "create_method": d.create_method.map(|m| m.as_str()),
        "workflows": d.workflows.iter().map(|id| json!({ "id": id })).collect::<Vec<_>>(),
        "source_datasets": [],
        "derived_datasets": [],
    });
    if states {
        // Newest first, as the API orders them.
        v["states"] = d
            .states
            .iter()
            .rev()
            .map(|s| {
                json!({
                    "state": s.state,
                    "timestamp": iso(s.timestamp),
                    "metadata": null,
                    "dataset_id": d.id,
                })
            })
            .collect();
    }
    if bundle {
        v["bundle"] = d.bundle.as_ref().map_or(Value::Null, |b| {
            json!({
                "name": b.name,
                "size": b.size.to_string(),
                "md5": b.md5.to_string(),
                "dataset_id": d.id,
            })
        });
    }
    v
}

/// An item of a create or bulk create body; `Err` names what is wrong.
fn new_dataset(item: &Value) -> Result<NewDataset, String> {
    let raw_name = item["name"].as_str().ok_or("name is required")?;
    let name = DatasetName::normalize(raw_name).map_err(|e| format!("name: {e}"))?;
    let dataset_type = item["type"]
        .as_str()
        .ok_or("type is required")?
        .parse()
        .map_err(|e: String| e)?;
    let origin_path = item["origin_path"]
        .as_str()
        .ok_or("origin_path is required")?
        .to_owned();
    let create_method = match item["create_method"].as_str() {
        Some(m) => m.parse()?,
        None => workers::model::CreateMethod::Scan,
    };
    Ok(NewDataset {
        name,
        dataset_type,
        origin_path,
        create_method,
        description: item["description"].as_str().map(str::to_owned),
        metadata: item.get("metadata").filter(|m| m.is_object()).cloned(),
    })
}

async fn list_datasets(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let all = match shared
        .registry
        .find(&DatasetQuery {
            include_deleted: true,
            ..DatasetQuery::default()
        })
        .await
    {
        Ok(all) => all,
        Err(err) => return registry_error(err),
    };
    let deleted = flag(&query, "deleted", false);
    let exact = flag(&query, "match_name_exact", false);
    let name = query.get("name").map(|n| n.to_lowercase());
    let staged_cutoff = match query
        .get("days_since_last_staged")
        .map(|d| d.parse::<i64>())
    {
        None => None,
        Some(Ok(days)) => Some(Utc::now() - TimeDelta::days(days)),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "days_since_last_staged"),
    };
    let matching: Vec<&Dataset> = all
        .iter()
        .filter(|d| d.is_deleted == deleted)
        .filter(|d| {
            query
                .get("type")
                .is_none_or(|t| t == d.dataset_type.as_str())
        })
        .filter(|d| {
            name.as_ref().is_none_or(|n| {
                let have = d.name.as_str().to_lowercase();
                if exact {
                    have == *n
                } else {
                    have.contains(n.as_str())
                }
            })
        })
        .filter(|d| !flag(&query, "archived", false) || d.archive_path.is_some())
        .filter(|d| {
            staged_cutoff.is_none_or(|cutoff| {
                d.is_staged
                    && !d
                        .states
                        .iter()
                        .any(|s| s.state == "STAGED" && s.timestamp >= cutoff)
            })
        })
        .collect();
    let states = flag(&query, "include_states", false);
    let bundle = flag(&query, "bundle", false);
    let raw = if deleted {
        Vec::new()
    } else {
        shared.raw_listed.lock().unwrap().clone()
    };
    let listed: Vec<Value> = raw
        .into_iter()
        .chain(
            matching
                .into_iter()
                .map(|d| dataset_json(d, states, bundle)),
        )
        .collect();
    let count = listed.len();
    let offset: usize = query
        .get("offset")
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(usize::MAX);
    let datasets: Vec<Value> = listed.into_iter().skip(offset).take(limit).collect();
    Json(json!({ "metadata": { "count": count }, "datasets": datasets })).into_response()
}

async fn get_dataset(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<DatasetId>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let dataset = match shared.registry.get(id).await {
        Ok(d) => d,
        Err(err) => return registry_error(err),
    };
    let mut body = dataset_json(&dataset, true, flag(&query, "bundle", false));
    body["audit_logs"] = audit_logs(&shared, id);
    if flag(&query, "files", false) {
        let mut files = Vec::new();
        let mut pages = FilePages::new(&shared.registry, id, 10_000);
        loop {
            match pages.next().await {
                Ok(Some(page)) => files.extend(
                    page.into_iter()
                        .map(|f| json!({ "path": f.path, "md5": f.md5.map(|m| m.to_string()) })),
                ),
                Ok(None) => break,
                Err(err) => return registry_error(err),
            }
        }
        body["files"] = Value::Array(files);
    }
    Json(body).into_response()
}

async fn create_dataset(State(shared): State<Arc<Shared>>, Json(item): Json<Value>) -> Response {
    let new = match new_dataset(&item) {
        Ok(new) => new,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let outcome = match shared.registry.bulk_create(&[new]).await {
        Ok(outcome) => outcome,
        Err(err) => return registry_error(err),
    };
    let Some(created) = outcome.created.into_iter().next() else {
        return error(StatusCode::CONFLICT, "Unique constraint failed");
    };
    let patch = DatasetPatch {
        du_size: item.get("du_size").and_then(parse_big),
        size: item.get("size").and_then(parse_big),
        ..DatasetPatch::default()
    };
    match shared.registry.update(created.id, &patch).await {
        Ok(d) => Json(dataset_json(&d, true, false)).into_response(),
        Err(err) => registry_error(err),
    }
}

async fn bulk_create(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let Some(items) = body["datasets"].as_array() else {
        return error(StatusCode::BAD_REQUEST, "datasets must be an array");
    };
    if items.is_empty() || items.len() > MAX_BULK {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("datasets must hold 1 to {MAX_BULK} items"),
        );
    }
    let mut valid = Vec::new();
    let mut errored = Vec::new();
    for item in items {
        match new_dataset(item) {
            Ok(new) => valid.push(new),
            Err(message) => errored.push(json!({
                "name": item["name"], "type": item["type"], "error": message,
            })),
        }
    }
    let outcome = match shared.registry.bulk_create(&valid).await {
        Ok(outcome) => outcome,
        Err(err) => return registry_error(err),
    };
    Json(json!({
        "created": outcome.created.iter().map(|d| dataset_json(d, true, false)).collect::<Vec<_>>(),
        "conflicted": outcome.conflicted.iter()
            .map(|(n, t)| json!({ "name": n.as_str(), "type": t.as_str() }))
            .collect::<Vec<_>>(),
        "errored": errored,
    }))
    .into_response()
}

/// The PATCH body as a patch; `Err` names the field that is wrong.
fn patch_from(body: &Value) -> Result<DatasetPatch, String> {
    let obj = body.as_object().ok_or("the body must be an object")?;
    let mut patch = DatasetPatch::default();
    let size = |key: &str| -> Result<Option<u64>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => parse_big(v)
                .map(Some)
                .ok_or_else(|| format!("{key}: not a size")),
        }
    };
    patch.du_size = size("du_size")?;
    patch.size = size("size")?;
    patch.num_files = size("num_files")?;
    patch.num_directories = size("num_directories")?;
    if let Some(name) = obj.get("name").and_then(Value::as_str) {
        patch.name = Some(DatasetName::from_stored(name.to_owned()));
    }
    patch.metadata = obj.get("metadata").cloned();
    let nullable = |key: &str| -> Result<Option<Option<String>>, String> {
        match obj.get(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(Value::String(s)) => Ok(Some(Some(s.clone()))),
            Some(_) => Err(format!("{key}: not a string")),
        }
    };
    patch.archive_path = nullable("archive_path")?;
    patch.staged_path = nullable("staged_path")?;
    patch.origin_path = nullable("origin_path")?.flatten();
    patch.is_staged = obj.get("is_staged").and_then(Value::as_bool);
    patch.is_deleted = obj.get("is_deleted").and_then(Value::as_bool);
    if let Some(bundle) = obj.get("bundle").filter(|b| !b.is_null()) {
        patch.bundle = Some(Bundle {
            name: bundle["name"].as_str().ok_or("bundle.name")?.to_owned(),
            size: parse_big(&bundle["size"]).ok_or("bundle.size")?,
            md5: bundle["md5"]
                .as_str()
                .ok_or("bundle.md5")?
                .parse()
                .map_err(|_| "bundle.md5".to_owned())?,
        });
    }
    Ok(patch)
}

async fn update_dataset(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<DatasetId>,
    Json(body): Json<Value>,
) -> Response {
    let patch = match patch_from(&body) {
        Ok(patch) => patch,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    match shared.registry.update(id, &patch).await {
        // The updated columns with workflow ids and hierarchy; no states, no bundle.
        Ok(d) => Json(dataset_json(&d, false, false)).into_response(),
        Err(err) => registry_error(err),
    }
}

async fn dataset_exists(shared: &Shared, id: DatasetId) -> Result<bool, Response> {
    match shared.registry.get(id).await {
        Ok(_) => Ok(true),
        Err(RegistryError::NotFound(_)) => Ok(false),
        Err(err) => Err(registry_error(err)),
    }
}

async fn add_state(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<DatasetId>,
    Json(body): Json<Value>,
) -> Response {
    let Some(state) = body["state"].as_str().map(str::to_owned) else {
        return error(StatusCode::BAD_REQUEST, "state is required");
    };
    match dataset_exists(&shared, id).await {
        Ok(true) => {}
        // Prisma's foreign-key error.
        Ok(false) => return error(StatusCode::CONFLICT, "Foreign key constraint failed"),
        Err(response) => return response,
    }
    let written = shared
        .db
        .write(move |tx| {
            let now = to_millis(Utc::now());
            tx.execute(
                "INSERT INTO dataset_states (dataset_id, state, timestamp) VALUES (?1, ?2, ?3)",
                rusqlite::params![id, state, now],
            )?;
            tx.execute(
                "UPDATE datasets SET updated_at = ?2 WHERE id = ?1",
                rusqlite::params![id, now],
            )?;
            Ok(())
        })
        .await;
    match written {
        Ok(()) => (StatusCode::OK, "OK").into_response(),
        Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{err:#}")),
    }
}

async fn add_files(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<DatasetId>,
    Json(body): Json<Value>,
) -> Response {
    let Some(items) = body.as_array() else {
        return error(StatusCode::BAD_REQUEST, "the body must be an array");
    };
    let mut rows = Vec::with_capacity(items.len());
    for item in items {
        let (Some(path), Some(size), Ok(file_type)) = (
            item["path"].as_str(),
            parse_big(&item["size"]),
            item["type"].as_str().unwrap_or("file").parse::<FileType>(),
        ) else {
            return error(StatusCode::BAD_REQUEST, &format!("bad file row {item}"));
        };
        let md5 = match item["md5"].as_str() {
            None => None,
            Some(text) => match text.parse() {
                Ok(md5) => Some(md5),
                Err(_) => return error(StatusCode::BAD_REQUEST, &format!("bad md5 in {item}")),
            },
        };
        rows.push(FileRecord {
            path: path.to_owned(),
            md5,
            size: Some(size),
            file_type,
        });
    }
    match dataset_exists(&shared, id).await {
        Ok(true) => {}
        Ok(false) => return error(StatusCode::NOT_FOUND, "Not Found"),
        Err(response) => return response,
    }
    let delay = {
        let mut behaviour = shared.rows.lock().unwrap();
        if behaviour.lose > 0 {
            behaviour.lose -= 1;
            return (StatusCode::OK, "OK").into_response();
        }
        behaviour.delay
    };
    if let Some(delay) = delay {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = shared.registry.add_files(id, &rows).await;
        });
        return (StatusCode::OK, "OK").into_response();
    }
    match shared.registry.add_files(id, &rows).await {
        Ok(()) => (StatusCode::OK, "OK").into_response(),
        Err(err) => registry_error(err),
    }
}

async fn add_workflow(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<DatasetId>,
    Json(body): Json<Value>,
) -> Response {
    let Some(workflow_id) = body["workflow_id"].as_str().map(str::to_owned) else {
        return error(StatusCode::BAD_REQUEST, "workflow_id is required");
    };
    match shared
        .registry
        .linked_workflows(std::slice::from_ref(&workflow_id))
        .await
    {
        Ok(linked) if !linked.is_empty() => {
            return error(StatusCode::CONFLICT, "Unique constraint failed");
        }
        Ok(_) => {}
        Err(err) => return registry_error(err),
    }
    match shared.registry.add_workflow(id, &workflow_id).await {
        Ok(()) => (StatusCode::OK, "OK").into_response(),
        Err(RegistryError::NotFound(_)) => {
            error(StatusCode::CONFLICT, "Foreign key constraint failed")
        }
        Err(err) => registry_error(err),
    }
}

async fn current_workflows(State(shared): State<Arc<Shared>>) -> Response {
    let rows = shared
        .db
        .call(|conn| {
            let mut stmt = conn.prepare(
                "SELECT workflow_id, dataset_id FROM dataset_workflows ORDER BY created_at",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(json!({
                    "id": r.get::<_, String>(0)?,
                    "dataset_id": r.get::<_, i64>(1)?,
                    "initiator_id": 1,
                    "metadata": null,
                }))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<Value>>>()?)
        })
        .await;
    match rows {
        Ok(rows) => Json(Value::Array(rows)).into_response(),
        Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{err:#}")),
    }
}

async fn add_metrics(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let Some(items) = body.as_array() else {
        return error(StatusCode::BAD_REQUEST, "the body must be an array");
    };
    let mut metrics = Vec::new();
    for item in items {
        let (Some(measurement), Some(subject), Some(usage), Some(limit)) = (
            item["measurement"].as_str(),
            item["subject"].as_str(),
            parse_big(&item["usage"]),
            parse_big(&item["limit"]),
        ) else {
            return error(StatusCode::BAD_REQUEST, &format!("bad metric {item}"));
        };
        metrics.push(Metric {
            measurement: measurement.to_owned(),
            subject: subject.to_owned(),
            usage,
            limit,
            tags: item["tags"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    match shared.registry.add_metrics(&metrics).await {
        Ok(()) => Json(json!({ "count": metrics.len() })).into_response(),
        Err(err) => registry_error(err),
    }
}

// ---------------------------------------------------------------------------------------------
// Uploads (spec C.5.5, E.5), worker processes and notifications, with the real API's quirks:
// a repeated completion of a failed upload revives it (its dataset stays deleted), a
// metadata-only PATCH leaves `updated_at` alone, a workflow id linked twice answers 409 and
// rolls the whole PATCH back, `by-status` wants the parameter repeated.

use workers::registry::uploads::{
    NewUpload, ProcessLogLine, UploadLog, UploadLogPatch, UploadQuery, UploadStatus, WorkerProcess,
};

/// Where the API puts uploaded payloads, and what its optional routes do.
pub struct UploadSettings {
    /// `upload.path`: payloads go to `<this>/<raw_data|data_products>/<id>/<name>`.
    pub root: std::path::PathBuf,
    /// Whether `POST notifications` exists (the API's feature flag).
    pub notifications: bool,
}

impl TestApi {
    /// Sets where uploads are put and whether notifications are on.
    pub fn set_uploads(&self, settings: UploadSettings) {
        *self.shared.uploads.lock().unwrap() = Some(settings);
    }

    /// The notifications posted so far.
    pub fn notifications(&self) -> Vec<Value> {
        self.shared.notifications.lock().unwrap().clone()
    }

    /// Moves an upload log's `updated_at` back by `age`, as if it had not changed for that long.
    pub fn age_upload(&self, id: DatasetId, age: Duration) {
        self.shared
            .db
            .with_conn(|conn| {
                conn.execute(
                    "UPDATE upload_logs SET updated_at = updated_at - ?2 WHERE dataset_id = ?1",
                    rusqlite::params![id, age.as_millis() as i64],
                )?;
                Ok(())
            })
            .unwrap();
    }

    /// The log lines posted for the worker processes of a task.
    pub fn process_logs(&self, task_id: &str) -> Vec<(String, String)> {
        self.shared
            .db
            .with_conn(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT l.level, l.message FROM worker_logs l
                     JOIN worker_processes p ON p.id = l.process_id
                     WHERE p.task_id = ?1 ORDER BY l.id",
                )?;
                let rows = stmt.query_map([task_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .unwrap()
    }
}

fn upload_routes() -> Router<Arc<Shared>> {
    let uploads = Router::new()
        .route("/", get(list_uploads).post(create_upload))
        .route("/expired", get(expired_uploads))
        .route("/stalled", get(stalled_uploads))
        .route("/failed", get(failed_uploads))
        .route("/by-status", get(uploads_by_status))
        .route(
            "/{id}/upload-log",
            get(get_upload_log).patch(patch_upload_log),
        )
        .route("/{id}/complete", post(complete_upload));
    Router::new()
        .nest("/datasets/uploads", uploads.clone())
        .nest("/uploads", uploads)
        .route("/workflows/processes", post(register_process))
        .route("/workflows/processes/{id}/logs", post(add_process_logs))
        .route("/notifications", post(notify))
}

fn upload_log_json(log: &UploadLog, full_dataset: bool) -> Value {
    let mut dataset = json!({
        "id": log.dataset_id,
        "name": log.dataset_name,
    });
    if full_dataset {
        dataset["type"] = json!(log.dataset_type.map(|t| t.as_str()));
        dataset["origin_path"] = json!(log.origin_path);
    }
    json!({
        "id": log.id,
        "status": log.status.as_str(),
        "process_id": log.process_id,
        "retry_count": log.retry_count,
        "metadata": log.metadata,
        "updated_at": iso(log.updated_at),
        "dataset_id": log.dataset_id,
        "dataset": dataset,
    })
}

async fn create_upload(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let mut errors = Vec::new();
    let name = body["name"].as_str().unwrap_or_default();
    if name.chars().count() < 3 {
        errors.push(json!({"msg": "Invalid value", "path": "name", "location": "body"}));
    }
    let dataset_type = body["type"].as_str().and_then(|t| t.parse().ok());
    if dataset_type.is_none() {
        errors.push(json!({"msg": "Invalid value", "path": "type", "location": "body"}));
    }
    if !errors.is_empty() {
        return (StatusCode::BAD_REQUEST, Json(json!({ "errors": errors }))).into_response();
    }
    let dataset_type: workers::model::DatasetType = dataset_type.unwrap();
    let Ok(name) = DatasetName::normalize(name) else {
        return error(StatusCode::BAD_REQUEST, "invalid name");
    };
    let root = shared
        .uploads
        .lock()
        .unwrap()
        .as_ref()
        .map(|u| u.root.clone())
        .unwrap_or_else(|| std::path::PathBuf::from("/uploads"));
    let dir = match dataset_type {
        workers::model::DatasetType::RawData => "raw_data",
        workers::model::DatasetType::DataProduct => "data_products",
    };
    let upload = NewUpload {
        name,
        dataset_type,
        upload_dir: root.join(dir).to_string_lossy().into_owned(),
    };
    match shared.registry.create_upload(&upload).await {
        Ok(log) => {
            let mut body = upload_log_json(&log, true);
            body["dataset"]["create_method"] = json!("UPLOAD");
            Json(body).into_response()
        }
        // The real route fails with a TypeError on a name in use.
        Err(RegistryError::Invalid(_)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Cannot read properties of undefined (reading 'id')",
        ),
        Err(err) => registry_error(err),
    }
}

async fn get_upload_log(State(shared): State<Arc<Shared>>, Path(id): Path<DatasetId>) -> Response {
    match shared.registry.upload_log(id).await {
        Ok(Some(log)) => Json(upload_log_json(&log, true)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "Upload log not found"),
        Err(err) => registry_error(err),
    }
}

async fn complete_upload(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<DatasetId>,
    Json(body): Json<Value>,
) -> Response {
    let Some(process_id) = body["process_id"].as_str().map(str::to_owned) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"errors": [{"msg": "Invalid value", "path": "process_id"}]})),
        )
            .into_response();
    };
    let log = match shared.registry.upload_log(id).await {
        Ok(Some(log)) => log,
        Ok(None) => return error(StatusCode::NOT_FOUND, "Upload log not found"),
        Err(err) => return registry_error(err),
    };
    match log.status {
        UploadStatus::Uploading => {}
        // Again while UPLOADED: 200, the body ignored, the bare dataset row.
        UploadStatus::Uploaded => {
            let mut log = upload_log_json(&log, false);
            log["dataset"] = json!({"id": id});
            return Json(json!({"success": true, "upload_log": log})).into_response();
        }
        // Revived, although its dataset stays tombstoned (spec E.5).
        UploadStatus::UploadFailed | UploadStatus::ProcessingFailed => {
            shared
                .db
                .with_conn(|conn| {
                    conn.execute(
                        "UPDATE upload_logs SET status = 'UPLOADING' WHERE dataset_id = ?1",
                        [id],
                    )?;
                    Ok(())
                })
                .unwrap();
        }
        status => {
            return (
                StatusCode::CONFLICT,
                Json(json!({
                    "error": "Upload has already advanced past the upload stage",
                    "status": status.as_str(),
                })),
            )
                .into_response();
        }
    }
    let metadata = body.get("metadata").and_then(Value::as_object).cloned();
    match shared
        .registry
        .complete_upload(id, &process_id, metadata.as_ref())
        .await
    {
        Ok(log) => Json(json!({"success": true, "upload_log": upload_log_json(&log, false)}))
            .into_response(),
        Err(err) => registry_error(err),
    }
}

async fn patch_upload_log(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<DatasetId>,
    Json(body): Json<Value>,
) -> Response {
    // Nothing is validated by the real route: a bad value fails in Prisma with a 500.
    let status = match body.get("status").and_then(Value::as_str) {
        None => None,
        Some(s) => match s.parse::<UploadStatus>() {
            Ok(s) => Some(s),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        },
    };
    let retry_count = match body.get("retry_count") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64().map(|n| n as u32),
        Some(other) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("Invalid value for retry_count: {other}"),
            );
        }
    };
    let workflow_id = body
        .get("workflow_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if let Some(workflow_id) = &workflow_id {
        match shared
            .registry
            .linked_workflows(std::slice::from_ref(workflow_id))
            .await
        {
            Ok(linked) if !linked.is_empty() => {
                return error(StatusCode::CONFLICT, "Unique constraint failed");
            }
            Ok(_) => {}
            Err(err) => return registry_error(err),
        }
    }
    let patch = UploadLogPatch {
        status,
        metadata: body.get("metadata").and_then(Value::as_object).cloned(),
        retry_count,
        workflow_id,
    };
    let before = match shared.registry.upload_log(id).await {
        Ok(Some(log)) => log,
        Ok(None) => return error(StatusCode::NOT_FOUND, "Upload log not found"),
        Err(err) => return registry_error(err),
    };
    match shared.registry.update_upload_log(id, &patch).await {
        // The reply is built before the tombstone: it still shows the old name.
        Ok(log) => {
            let mut reply = upload_log_json(&log, false);
            reply["dataset"]["name"] = json!(before.dataset_name);
            Json(json!({"success": true, "upload_log": reply})).into_response()
        }
        Err(RegistryError::NotFound(_)) => error(StatusCode::NOT_FOUND, "Upload log not found"),
        Err(err) => registry_error(err),
    }
}

async fn query_uploads(
    shared: &Shared,
    query: UploadQuery,
) -> Result<Vec<workers::registry::uploads::UploadRef>, Response> {
    shared
        .registry
        .uploads(&query)
        .await
        .map_err(registry_error)
}

async fn expired_uploads(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let status = match query.get("status").map(|s| s.parse::<UploadStatus>()) {
        None => UploadStatus::Uploading,
        Some(Ok(s)) => s,
        Some(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let age_days = query
        .get("age_days")
        .and_then(|a| a.parse::<f64>().ok())
        .unwrap_or(7.0);
    let found = match query_uploads(&shared, UploadQuery::Expired { status, age_days }).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let now = Utc::now();
    let uploads: Vec<Value> = found
        .iter()
        .map(|u| {
            let age = u
                .updated_at
                .map_or(0, |t| (now - t).num_milliseconds() / 86_400_000);
            json!({
                "dataset_id": u.dataset_id,
                "dataset_name": u.dataset_name,
                "status": u.status.map(|s| s.as_str()),
                "age_days": age,
            })
        })
        .collect();
    Json(json!({ "uploads": uploads })).into_response()
}

async fn stalled_uploads(State(shared): State<Arc<Shared>>) -> Response {
    let found = match query_uploads(&shared, UploadQuery::Stalled { after_seconds: 30 }).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let uploads: Vec<Value> = found
        .iter()
        .map(|u| {
            json!({
                "dataset_id": u.dataset_id,
                "dataset_name": u.dataset_name,
                "uploaded_at": u.updated_at.map(iso),
            })
        })
        .collect();
    Json(json!({"metadata": {"count": uploads.len()}, "uploads": uploads})).into_response()
}

async fn failed_uploads(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let max_retry_count = query
        .get("max_retry_count")
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let max_age_hours = query
        .get("max_age_hours")
        .and_then(|v| v.parse().ok())
        .unwrap_or(72.0);
    let found = match query_uploads(
        &shared,
        UploadQuery::Failed {
            max_retry_count,
            max_age_hours,
        },
    )
    .await
    {
        Ok(found) => found,
        Err(response) => return response,
    };
    let uploads: Vec<Value> = found
        .iter()
        .map(|u| {
            json!({
                "dataset_id": u.dataset_id,
                "dataset_name": u.dataset_name,
                "retry_count": u.retry_count,
                "last_error": u.last_error,
            })
        })
        .collect();
    Json(json!({ "uploads": uploads })).into_response()
}

async fn uploads_by_status(
    State(shared): State<Arc<Shared>>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let mut statuses = Vec::new();
    for (key, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if key != "statuses" {
            continue;
        }
        match value.parse::<UploadStatus>() {
            Ok(s) => statuses.push(s),
            // A comma list reaches Prisma as one unknown enum value.
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        }
    }
    if statuses.is_empty() {
        return Json(json!({"uploads": []})).into_response();
    }
    let found = match query_uploads(&shared, UploadQuery::ByStatus(statuses)).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let uploads: Vec<Value> = found
        .iter()
        .map(|u| {
            json!({
                "dataset_id": u.dataset_id,
                "dataset_name": u.dataset_name,
                "origin_path": u.origin_path,
                "status": u.status.map(|s| s.as_str()),
            })
        })
        .collect();
    Json(json!({ "uploads": uploads })).into_response()
}

async fn list_uploads(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let limit = query
        .get("limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    let found = match query_uploads(&shared, UploadQuery::All { limit: usize::MAX }).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let mut uploads = Vec::new();
    for u in found {
        if let Ok(Some(log)) = shared.registry.upload_log(u.dataset_id).await
            && log.process_id.is_some()
        {
            uploads.push(upload_log_json(&log, true));
        }
        if uploads.len() >= limit {
            break;
        }
    }
    Json(json!({"metadata": {"count": uploads.len()}, "uploads": uploads})).into_response()
}

async fn register_process(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let (Some(task_id), Some(step), Some(pid)) = (
        body["task_id"].as_str(),
        body["step"].as_str(),
        body["pid"].as_u64(),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "task_id, step and pid are required",
        );
    };
    let start_time = body["start_time"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map_or_else(Utc::now, |t| t.with_timezone(&Utc));
    let process = WorkerProcess {
        workflow_id: body["workflow_id"].as_str().map(str::to_owned),
        step: step.to_owned(),
        task_id: task_id.to_owned(),
        pid: pid as u32,
        hostname: body["hostname"].as_str().unwrap_or_default().to_owned(),
        start_time,
        tags: body.get("tags").cloned().unwrap_or(Value::Null),
    };
    match shared.registry.register_process(&process).await {
        Ok(Some(id)) => Json(json!({
            "id": id,
            "pid": pid,
            "task_id": task_id,
            "step": step,
            "workflow_id": process.workflow_id,
            "tags": process.tags,
            "start_time": iso(start_time),
            "hostname": process.hostname,
        }))
        .into_response(),
        Ok(None) => error(StatusCode::INTERNAL_SERVER_ERROR, "not stored"),
        Err(err) => registry_error(err),
    }
}

async fn add_process_logs(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<i64>,
    Json(body): Json<Value>,
) -> Response {
    let Some(items) = body.as_array() else {
        return error(StatusCode::BAD_REQUEST, "an array of log lines is required");
    };
    let mut lines = Vec::new();
    for item in items {
        // Prisma refuses explicitly undefined values (spec E.4).
        let (Some(timestamp), Some(level), Some(message)) = (
            item["timestamp"].as_str(),
            item["level"].as_str(),
            item["message"].as_str(),
        ) else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "explicitly undefined values are not allowed",
            );
        };
        let Ok(timestamp) = chrono::DateTime::parse_from_rfc3339(timestamp) else {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "invalid timestamp");
        };
        lines.push(ProcessLogLine {
            timestamp: timestamp.with_timezone(&Utc),
            level: level.to_owned(),
            message: message.to_owned(),
        });
    }
    match shared.registry.add_process_logs(id, &lines).await {
        Ok(()) => Json(json!({ "count": lines.len() })).into_response(),
        Err(err) => registry_error(err),
    }
}

async fn notify(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let enabled = shared
        .uploads
        .lock()
        .unwrap()
        .as_ref()
        .is_some_and(|u| u.notifications);
    if !enabled {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    let complete = ["label", "text", "type"]
        .iter()
        .all(|k| body[*k].as_str().is_some())
        && body["role_ids"].as_array().is_some_and(|r| !r.is_empty());
    if !complete {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"errors": [{"msg": "Invalid value", "path": "label"}]})),
        )
            .into_response();
    }
    shared.notifications.lock().unwrap().push(body.clone());
    Json(json!({"id": shared.notifications.lock().unwrap().len()})).into_response()
}

// ---------------------------------------------------------------------------------------------
// Auxiliary tasks and scripts: QC reports (`PUT datasets/{id}/report`), projects
// (`GET projects/{id}`, `PATCH projects/{id}/datasets`), who created a dataset (the `create`
// audit entry of `GET datasets/{id}`) and the operator role (no `POST metrics`).

/// The user the main token belongs to: the service user of the default configuration.
pub const SERVICE_USER: &str = "bioloopuser";

#[derive(Default)]
struct Aux {
    /// Uploaded reports by dataset, as stored.
    reports: HashMap<DatasetId, Vec<u8>>,
    /// Projects by id: (slug, name).
    projects: HashMap<String, (String, String)>,
    /// (project id, dataset id) associations, in the order made.
    associations: Vec<(String, DatasetId)>,
    /// Datasets created by another user than the token's.
    creators: HashMap<DatasetId, String>,
}

impl TestApi {
    /// A token of a user with the operator role only (spec E.4): everything but
    /// `POST metrics`, which answers 403.
    pub fn operator_token(&self) -> &str {
        &self.shared.operator_token
    }

    /// The report stored for a dataset.
    pub fn report(&self, id: DatasetId) -> Option<Vec<u8>> {
        self.shared.aux.lock().unwrap().reports.get(&id).cloned()
    }

    pub fn add_project(&self, id: &str, slug: &str, name: &str) {
        self.shared
            .aux
            .lock()
            .unwrap()
            .projects
            .insert(id.to_owned(), (slug.to_owned(), name.to_owned()));
    }

    /// The datasets associated with a project, in the order they were associated.
    pub fn project_datasets(&self, project_id: &str) -> Vec<DatasetId> {
        let aux = self.shared.aux.lock().unwrap();
        aux.associations
            .iter()
            .filter(|(p, _)| p == project_id)
            .map(|(_, d)| *d)
            .collect()
    }

    /// Records `username` as the creator of a dataset (by default, the token's user).
    pub fn set_creator(&self, id: DatasetId, username: &str) {
        self.shared
            .aux
            .lock()
            .unwrap()
            .creators
            .insert(id, username.to_owned());
    }
}

fn aux_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/datasets/{id}/report", axum::routing::put(upload_report))
        .route("/projects/{id}", get(get_project))
        .route(
            "/projects/{id}/datasets",
            axum::routing::patch(add_to_project),
        )
}

/// What an operator may do: all but `POST metrics` (the API grants `metrics: create` to
/// admins only, spec E.4).
async fn operator_request(request: Request, next: Next, method: &str, path: &str) -> Response {
    if method == "POST" && path == "metrics" {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({ "message": "Forbidden" })),
        )
            .into_response();
    }
    next.run(request).await
}

fn audit_logs(shared: &Shared, id: DatasetId) -> Value {
    let user = shared
        .aux
        .lock()
        .unwrap()
        .creators
        .get(&id)
        .cloned()
        .unwrap_or_else(|| SERVICE_USER.to_owned());
    json!([{ "action": "create", "dataset_id": id, "user": { "username": user } }])
}

/// multer's `single('report')` into `reports/<metadata.report_id>/`: without a report id the
/// upload fails (the API answers 500 through its error handler).
async fn upload_report(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<DatasetId>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let dataset = match shared.registry.get(id).await {
        Ok(d) => d,
        Err(err) => return registry_error(err),
    };
    let Some(report_id) = dataset.metadata["report_id"].as_str().map(str::to_owned) else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "report_id is not set");
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Some(boundary) = content_type
        .strip_prefix("multipart/form-data; boundary=")
        .map(|b| b.trim_matches('"').to_owned())
    else {
        return error(StatusCode::BAD_REQUEST, "not multipart/form-data");
    };
    let Some(content) = multipart_field(&body, &boundary, "report") else {
        return error(StatusCode::BAD_REQUEST, "no field `report`");
    };
    shared.aux.lock().unwrap().reports.insert(id, content);
    Json(json!({ "path": format!("reports/{report_id}/multiqc_report.html") })).into_response()
}

/// The content of the form field `name` of a multipart body.
fn multipart_field(body: &[u8], boundary: &str, name: &str) -> Option<Vec<u8>> {
    let delimiter = format!("--{boundary}");
    let find = |haystack: &[u8], needle: &[u8], from: usize| {
        haystack[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|i| i + from)
    };
    let mut at = find(body, delimiter.as_bytes(), 0)?;
    loop {
        let start = at + delimiter.len();
        if body[start..].starts_with(b"--") {
            return None;
        }
        let headers_end = find(body, b"\r\n\r\n", start)?;
        let headers = String::from_utf8_lossy(&body[start..headers_end]);
        let next = find(body, format!("\r\n{delimiter}").as_bytes(), headers_end)?;
        if headers.contains(&format!("name=\"{name}\"")) {
            return Some(body[headers_end + 4..next].to_vec());
        }
        at = next + 2;
    }
}

/// By id or slug, as the API finds it; `include_datasets=false` leaves the datasets out.
async fn get_project(State(shared): State<Arc<Shared>>, Path(key): Path<String>) -> Response {
    let aux = shared.aux.lock().unwrap();
    let found = aux
        .projects
        .iter()
        .find(|(id, (slug, _))| **id == key || *slug == key);
    match found {
        Some((id, (slug, name))) => {
            Json(json!({ "id": id, "slug": slug, "name": name })).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "Not Found"),
    }
}

/// `createMany` without `skipDuplicates`: one existing association makes the whole request
/// 409 and stores nothing.
async fn add_to_project(
    State(shared): State<Arc<Shared>>,
    Path(project_id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let ids: Vec<DatasetId> = body["add_dataset_ids"]
        .as_array()
        .map(|ids| ids.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default();
    let mut aux = shared.aux.lock().unwrap();
    if !aux.projects.contains_key(&project_id) {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    if ids
        .iter()
        .any(|id| aux.associations.contains(&(project_id.clone(), *id)))
    {
        return error(StatusCode::CONFLICT, "Unique constraint failed");
    }
    aux.associations
        .extend(ids.into_iter().map(|id| (project_id.clone(), id)));
    (StatusCode::OK, "").into_response()
}

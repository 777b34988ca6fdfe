//! The upload pipeline (spec C.5): upload logs in both registries with the API's semantics,
//! verification against the sender's manifest, ingestion of verified uploads, retries of failed
//! ingestions, and the purge of what uploads leave behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::common::bioloop_api::{TestApi, UploadSettings};
use crate::common::*;
use serde_json::{Map, Value, json};
use workers::app::App;
use workers::cancel::CancellationToken;
use workers::compute::manifest;
use workers::model::{DatasetName, DatasetType};
use workers::registry::uploads::{NewUpload, UploadLog, UploadLogPatch, UploadQuery, UploadStatus};
use workers::registry::{DatasetId, Registry, RegistryError};
use workers::store::TaskStatus;

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// A project whose uploads go through verification without waiting: the embedded registry
/// hands uploads to the job at once and the check is retried without delay.
fn upload_project() -> Project {
    let mut project = Project::new();
    project.set_env(
        "WORKERS__RETRY__STEPS__VERIFY_UPLOAD_INTEGRITY__DELAY_SECONDS",
        "0",
    );
    project.set_env(
        "WORKERS__RETRY__STEPS__VERIFY_UPLOAD_INTEGRITY__MAX_RETRIES",
        "1",
    );
    project
}

fn upload_dir(app: &App, t: DatasetType) -> String {
    app.settings
        .paths
        .for_type(t)
        .upload
        .to_string_lossy()
        .into_owned()
}

async fn create_upload(app: &App, name: &str) -> UploadLog {
    create_upload_of(app, name, DatasetType::RawData).await
}

/// An upload of `dataset_type`, put where the app's configuration says (the API ignores that
/// and uses its own upload path).
async fn create_upload_of(app: &App, name: &str, dataset_type: DatasetType) -> UploadLog {
    app.registry
        .create_upload(&NewUpload {
            name: DatasetName::normalize(name).unwrap(),
            dataset_type,
            upload_dir: upload_dir(app, dataset_type),
        })
        .await
        .unwrap()
}

/// Puts `files` into the upload's origin, as rsync or the UI would.
fn fill(log: &UploadLog, files: &[(&str, &[u8])]) -> PathBuf {
    let origin = PathBuf::from(log.origin_path.as_deref().unwrap());
    for (path, content) in files {
        write_file(&origin.join(path), content);
    }
    origin
}

fn manifest_hash(root: &Path) -> String {
    manifest::blake3_manifest(root, &CancellationToken::new(), None)
        .unwrap()
        .hash
}

const FILES: &[(&str, &[u8])] = &[
    ("run 1/reads.fastq", b"@r1\nACGT\n+\nIIII\n"),
    ("run 1/empty.txt", b""),
    ("notes é.txt", b"sample sheet"),
    ("a.txt", b"a"),
    ("a/b", b"b"),
];

// ---------------------------------------------------------------------------------------------
// Upload logs: the same semantics in the embedded registry and over the API.

async fn upload_log_semantics(registry: &dyn Registry, upload_dir: &str, age: &dyn Fn(DatasetId)) {
    let new = |name: &str| NewUpload {
        name: DatasetName::normalize(name).unwrap(),
        dataset_type: DatasetType::RawData,
        upload_dir: upload_dir.to_owned(),
    };
    let log = registry.create_upload(&new("plate 7")).await.unwrap();
    let id = log.dataset_id;
    assert_eq!(log.status, UploadStatus::Uploading);
    assert_eq!(log.dataset_name, "plate-7");
    assert_eq!(log.retry_count, 0);
    assert_eq!(
        log.metadata,
        Value::Null,
        "null until something is merged in"
    );
    assert!(
        log.origin_path
            .as_deref()
            .unwrap()
            .ends_with(&format!("raw_data/{id}/plate-7")),
        "{:?}",
        log.origin_path
    );
    let dataset = registry.get(id).await.unwrap();
    assert_eq!(
        dataset.create_method,
        Some(workers::model::CreateMethod::Upload)
    );
    assert_eq!(state_names(&dataset), ["REGISTERED"]);

    let manifest = object(json!({"checksum": {"manifest_hash": "ab".repeat(32)}, "n": 1}));
    let done = registry
        .complete_upload(id, "0123456789abcdef0123456789abcdef", Some(&manifest))
        .await
        .unwrap();
    assert_eq!(done.status, UploadStatus::Uploaded);
    assert_eq!(done.metadata["checksum"]["manifest_hash"], "ab".repeat(32));
    // Again: the same, the body ignored.
    let again = registry
        .complete_upload(id, "other", Some(&object(json!({"n": 2}))))
        .await
        .unwrap();
    assert_eq!(again.status, UploadStatus::Uploaded);
    assert_eq!(again.metadata["n"], 1);

    // A metadata-only change leaves `updated_at` (the stalled and expired clocks) alone, and
    // replaces top-level keys whole.
    let before = registry.upload_log(id).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let patched = registry
        .update_upload_log(
            id,
            &UploadLogPatch {
                metadata: Some(object(json!({"checksum": {"skipped": true}}))),
                ..UploadLogPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.updated_at, before.updated_at);
    assert_eq!(patched.metadata["checksum"], json!({"skipped": true}));
    assert_eq!(patched.metadata["n"], 1);

    age(id);
    let stalled = registry
        .uploads(&UploadQuery::Stalled { after_seconds: 30 })
        .await
        .unwrap();
    assert_eq!(
        stalled.iter().map(|u| u.dataset_id).collect::<Vec<_>>(),
        [id]
    );

    // Linking a workflow with a status change.
    let patched = registry
        .update_upload_log(
            id,
            &UploadLogPatch {
                status: Some(UploadStatus::Complete),
                workflow_id: Some("wf-upload-1".into()),
                ..UploadLogPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.status, UploadStatus::Complete);
    assert!(patched.updated_at > before.updated_at);
    assert_eq!(registry.get(id).await.unwrap().workflows, ["wf-upload-1"]);
    // Again with the same link (an answer lost): the status still lands.
    let patched = registry
        .update_upload_log(
            id,
            &UploadLogPatch {
                status: Some(UploadStatus::ProcessingFailed),
                retry_count: Some(1),
                metadata: Some(object(json!({"failure_reason": "stage failed"}))),
                workflow_id: Some("wf-upload-1".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.status, UploadStatus::ProcessingFailed);
    let failed = registry
        .uploads(&UploadQuery::Failed {
            max_retry_count: 1,
            max_age_hours: 72.0,
        })
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].retry_count, Some(1));
    assert_eq!(failed[0].last_error.as_deref(), Some("stage failed"));
    assert!(
        registry
            .uploads(&UploadQuery::Failed {
                max_retry_count: 0,
                max_age_hours: 72.0
            })
            .await
            .unwrap()
            .is_empty()
    );

    // A terminal failure tombstones the dataset once and frees its name.
    let other = registry.create_upload(&new("plate 8")).await.unwrap();
    for _ in 0..2 {
        registry
            .update_upload_log(
                other.dataset_id,
                &UploadLogPatch::status(UploadStatus::UploadFailed),
            )
            .await
            .unwrap();
    }
    let tombstoned = registry.get(other.dataset_id).await.unwrap();
    assert!(tombstoned.is_deleted);
    assert_eq!(
        tombstoned.name.as_str(),
        format!("plate-8--{}", other.dataset_id)
    );
    let reborn = registry.create_upload(&new("plate 8")).await.unwrap();
    assert_ne!(reborn.dataset_id, other.dataset_id);
    let by_status = registry
        .uploads(&UploadQuery::ByStatus(vec![
            UploadStatus::UploadFailed,
            UploadStatus::Uploading,
        ]))
        .await
        .unwrap();
    let mut ids: Vec<_> = by_status.iter().map(|u| u.dataset_id).collect();
    ids.sort();
    assert_eq!(ids, [other.dataset_id, reborn.dataset_id]);

    // Expired: UPLOADING and untouched for longer than the age.
    age(reborn.dataset_id);
    let expired = registry
        .uploads(&UploadQuery::Expired {
            status: UploadStatus::Uploading,
            age_days: 30.0 / 86_400.0,
        })
        .await
        .unwrap();
    assert_eq!(
        expired.iter().map(|u| u.dataset_id).collect::<Vec<_>>(),
        [reborn.dataset_id]
    );

    assert!(registry.upload_log(999_999).await.unwrap().is_none());
    assert!(matches!(
        registry
            .update_upload_log(999_999, &UploadLogPatch::status(UploadStatus::Verified))
            .await,
        Err(RegistryError::NotFound(999_999))
    ));
}

/// Moves an upload log of the project's database back by a minute.
fn age_in(db_path: &Path, id: DatasetId) {
    let conn = rusqlite::Connection::open(db_path).unwrap();
    conn.execute(
        "UPDATE upload_logs SET updated_at = updated_at - 60000 WHERE dataset_id = ?1",
        [id],
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_logs_in_the_embedded_registry_behave_as_the_api_does() {
    let project = Project::new();
    let app = project.app().await;
    let db = app.settings.sqlite.path.clone();
    let dir = upload_dir(&app, DatasetType::RawData);
    upload_log_semantics(app.registry.as_ref(), &dir, &|id| age_in(&db, id)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_logs_over_the_api_behave_as_the_api_does() {
    let api = TestApi::start();
    let root = tempfile::tempdir().unwrap();
    api.set_uploads(UploadSettings {
        root: root.path().to_path_buf(),
        notifications: false,
    });
    let registry = api.client();
    upload_log_semantics(&registry, "/ignored/by/the/api", &|id| {
        api.age_upload(id, Duration::from_secs(60))
    })
    .await;
    // The listings are the API's own routes, and `by-status` repeats its parameter.
    let by_status = api.requests_to("GET", "datasets/uploads/by-status");
    assert!(
        by_status[0]
            .query
            .contains("statuses=UPLOAD_FAILED&statuses=UPLOADING"),
        "{}",
        by_status[0].query
    );
    // The lost-answer case: one 409 on the repeated link, then the same PATCH without it.
    assert_eq!(
        api.requests_to("PATCH", "datasets/")
            .iter()
            .filter(|r| r.status == Some(409))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_completed_upload_of_a_failed_one_is_refused_in_the_embedded_registry() {
    let project = Project::new();
    let app = project.app().await;
    let log = create_upload(&app, "failing").await;
    app.registry
        .update_upload_log(
            log.dataset_id,
            &UploadLogPatch::status(UploadStatus::UploadFailed),
        )
        .await
        .unwrap();
    let err = app
        .registry
        .complete_upload(log.dataset_id, "p", None)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("UPLOAD_FAILED") && err.to_string().contains("new upload"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Verification and ingestion, embedded profile, through the binary.

async fn upload_status(app: &App, id: DatasetId) -> UploadLog {
    app.registry.upload_log(id).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_completed_upload_is_verified_and_ingested_to_staged() {
    let project = upload_project();
    let app = project.app().await;
    let log = create_upload(&app, "sequencer run 12").await;
    let id = log.dataset_id;
    let origin = fill(&log, FILES);
    let hash = manifest_hash(&origin);
    app.registry
        .complete_upload(
            id,
            "0123456789abcdef0123456789abcdef",
            Some(&object(json!({"checksum": {"manifest_hash": hash}}))),
        )
        .await
        .unwrap();

    let out = project.run_ok(&["jobs", "run", "manage_upload_workflows", "--wait"]);
    let text = stdout(&out);
    assert!(text.contains("verification queued"), "{text}");
    assert!(text.contains("integrated workflow started"), "{text}");

    let log = upload_status(&app, id).await;
    assert_eq!(log.status, UploadStatus::Complete, "{log:?}");
    let task_id = log.meta_str("verification_task_id").unwrap().to_owned();
    let metas = app
        .store
        .task_metas(std::slice::from_ref(&task_id))
        .await
        .unwrap();
    let meta = &metas[&task_id];
    assert_eq!(meta.status, TaskStatus::Success);
    assert_eq!(meta.result, json!({"status": "success", "dataset_id": id}));
    assert_eq!(meta.name.as_deref(), Some("verify_upload_integrity"));
    assert!(log.meta("worker_process_id").is_some(), "{log:?}");

    let dataset = app.registry.get(id).await.unwrap();
    assert_eq!(
        state_names(&dataset),
        ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED"]
    );
    assert_eq!(dataset.workflows.len(), 1);
    // The staged copy is the upload, byte for byte.
    let staged = PathBuf::from(dataset.staged_path.unwrap());
    assert_eq!(manifest_hash(&staged), hash);

    // Nothing more to do: a second run acts on nothing.
    let out = project.run_ok(&["jobs", "run", "manage_upload_workflows"]);
    assert!(
        !stdout(&out).contains("verification queued"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_that_changed_fails_verification_on_its_last_attempt_and_frees_its_name() {
    let project = upload_project();
    let app = project.app().await;
    let log = create_upload(&app, "changed run").await;
    let id = log.dataset_id;
    let origin = fill(&log, FILES);
    let hash = manifest_hash(&origin);
    // Same size, other content: only the hash can tell.
    write_file(&origin.join("a/b"), b"c");
    app.registry
        .complete_upload(
            id,
            "p",
            Some(&object(json!({"checksum": {"manifest_hash": hash}}))),
        )
        .await
        .unwrap();
    let out = project.run(&["jobs", "run", "manage_upload_workflows", "--wait"]);
    let log = upload_status(&app, id).await;
    assert_eq!(
        log.status,
        UploadStatus::VerificationFailed,
        "{log:?}\n{}",
        describe(&out)
    );
    let reason = log.meta_str("failure_reason").unwrap();
    assert!(
        reason.starts_with("Exception: Manifest hash mismatch") && reason.contains(&hash),
        "{reason}"
    );
    assert_eq!(log.meta("retries_exhausted"), Some(&json!(true)));
    let task_id = log.meta_str("verification_task_id").unwrap();
    assert_eq!(log.meta_str("task_id"), Some(task_id));
    let metas = app.store.task_metas(&[task_id.to_owned()]).await.unwrap();
    assert_eq!(metas[task_id].status, TaskStatus::Failure);
    assert_eq!(metas[task_id].starts, 2, "max_retries = 1: two attempts");
    let dataset = app.registry.get(id).await.unwrap();
    assert!(dataset.is_deleted);
    assert!(dataset.workflows.is_empty(), "never ingested");
    // The name is free for a new upload.
    create_upload(&app, "changed run").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn size_manifests_and_the_existence_check_are_used_without_a_hash() {
    let project = upload_project();
    let app = project.app().await;
    // A size manifest that holds.
    let good = create_upload(&app, "sizes good").await;
    let origin = fill(&good, FILES);
    let sizes = serde_json::to_value(manifest::size_manifest_of(&origin).unwrap()).unwrap();
    app.registry
        .complete_upload(
            good.dataset_id,
            "p",
            Some(&object(json!({"size_manifest": sizes}))),
        )
        .await
        .unwrap();
    // One whose sender skipped the checksum and whose upload got an extra file.
    let extra = create_upload(&app, "sizes extra").await;
    let origin = fill(&extra, FILES);
    let mut sizes = serde_json::to_value(manifest::size_manifest_of(&origin).unwrap()).unwrap();
    write_file(&origin.join("stray.tmp"), b"x");
    sizes["file_count"] = json!(FILES.len());
    app.registry
        .complete_upload(
            extra.dataset_id,
            "p",
            Some(&object(json!({
                "size_manifest": sizes,
                "checksum": {"skipped": true, "skipped_reason": "too large"}
            }))),
        )
        .await
        .unwrap();
    // None at all, and no files: the existence check fails.
    let empty = create_upload(&app, "nothing here").await;
    std::fs::create_dir_all(empty.origin_path.as_deref().unwrap()).unwrap();
    app.registry
        .complete_upload(empty.dataset_id, "p", None)
        .await
        .unwrap();

    project.run(&["jobs", "run", "manage_upload_workflows", "--wait"]);
    assert_eq!(
        upload_status(&app, good.dataset_id).await.status,
        UploadStatus::Complete
    );
    let extra = upload_status(&app, extra.dataset_id).await;
    assert_eq!(extra.status, UploadStatus::VerificationFailed);
    assert!(
        extra.meta_str("failure_reason").unwrap().contains("file"),
        "{extra:?}"
    );
    let empty = upload_status(&app, empty.dataset_id).await;
    assert_eq!(empty.status, UploadStatus::VerificationFailed);
    assert!(
        empty
            .meta_str("failure_reason")
            .unwrap()
            .contains("No files found"),
        "{empty:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The job's phases one by one, over the API.

/// The project's app with the HTTP registry in place of the embedded one.
async fn app_over_api(project: &Project, api: &TestApi) -> Arc<App> {
    let app = Arc::try_unwrap(project.app().await).ok().unwrap();
    Arc::new(App {
        registry: Arc::new(api.client()),
        ..app
    })
}

async fn manage(app: &Arc<App>) -> workers::jobs::manage_uploads::ManageUploadsReport {
    workers::jobs::manage_uploads::run(app, false, &CancellationToken::new())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_job_expires_uploads_verifies_ingests_and_gives_up_over_the_api() {
    let project = upload_project();
    let api = TestApi::start();
    let root = tempfile::tempdir().unwrap();
    api.set_uploads(UploadSettings {
        root: root.path().to_path_buf(),
        notifications: true,
    });
    let mut project = project;
    project.set_env("WORKERS__NOTIFICATIONS__ENABLED", "true");
    project.set_env("WORKERS__NOTIFICATIONS__ROLE_IDS", "[2]");
    let app = app_over_api(&project, &api).await;

    // Phase 1: an abandoned session.
    let abandoned = create_upload_of(&app, "abandoned", DatasetType::RawData).await;
    api.age_upload(abandoned.dataset_id, Duration::from_secs(7 * 3600));

    // Phase 2: a completed upload, not yet stalled (the API's 30 s) ...
    let log = create_upload_of(&app, "web upload", DatasetType::DataProduct).await;
    let id = log.dataset_id;
    let origin = fill(&log, FILES);
    assert!(origin.starts_with(root.path().join("data_products")));
    let hash = manifest_hash(&origin);
    app.registry
        .complete_upload(
            id,
            "p",
            Some(&object(json!({"checksum": {"manifest_hash": hash}}))),
        )
        .await
        .unwrap();
    let report = manage(&app).await;
    assert_eq!(report.stale_uploading_failed, 1);
    assert_eq!(report.verification_spawned, 0, "not stalled yet");
    let abandoned = app.registry.get(abandoned.dataset_id).await.unwrap();
    assert!(abandoned.is_deleted);

    // ... then stalled: VERIFYING is written before the task is queued.
    api.age_upload(id, Duration::from_secs(31));
    let report = manage(&app).await;
    assert_eq!((report.verification_spawned, report.errors), (1, 0));
    let verifying = app.registry.upload_log(id).await.unwrap().unwrap();
    assert_eq!(verifying.status, UploadStatus::Verifying);
    let task_id = verifying
        .meta_str("verification_task_id")
        .unwrap()
        .to_owned();
    let started_at = verifying.meta_str("verification_started_at").unwrap();
    assert!(
        !started_at.ends_with('Z') && !started_at.contains('+'),
        "naive, as the original writes it: {started_at}"
    );
    let delivery = app.broker.next().await.unwrap();
    let message = delivery.message().clone();
    assert_eq!(
        (message.id.as_str(), message.task.as_str(), message.priority),
        (task_id.as_str(), "verify_upload_integrity", 1)
    );
    assert_eq!(message.args, [json!(id)]);
    assert!(message.workflow_id().is_none());
    workers::workflow::engine::handle(&app, delivery, &workers::ui::Display::quiet())
        .await
        .unwrap();
    assert_eq!(
        app.registry.upload_log(id).await.unwrap().unwrap().status,
        UploadStatus::Verified
    );
    // The check's transcript reached the API as the UI reads it.
    let lines = api.process_logs(&task_id);
    assert!(
        lines
            .iter()
            .any(|(level, m)| level == "stdout" && m.contains("Upload verified")),
        "{lines:?}"
    );
    let process = &api.requests_to("POST", "workflows/processes")[0];
    let body = process.body.as_ref().unwrap();
    assert_eq!(body["workflow_id"], Value::Null);
    assert_eq!(body["step"], "verify_upload_integrity");
    assert_eq!(body["task_id"], json!(task_id));

    // VERIFIED and stalled: the workflow is started first, then COMPLETE.
    api.age_upload(id, Duration::from_secs(31));
    let report = manage(&app).await;
    assert_eq!((report.verified_triggered, report.started.len()), (1, 1));
    let complete = app.registry.upload_log(id).await.unwrap().unwrap();
    assert_eq!(complete.status, UploadStatus::Complete);
    let dataset = app.registry.get(id).await.unwrap();
    assert_eq!(dataset.workflows, report.started);

    // A failed ingestion is PROCESSING_FAILED (written when the workflow fails) ...
    let workflow = app
        .store
        .workflow(&report.started[0])
        .await
        .unwrap()
        .unwrap();
    workers::jobs::manage_uploads::workflow_failed(&app, &workflow, id, "archive failed: boom")
        .await;
    let failed = app.registry.upload_log(id).await.unwrap().unwrap();
    assert_eq!(failed.status, UploadStatus::ProcessingFailed);
    assert_eq!(
        failed.meta_str("failure_reason"),
        Some("archive failed: boom")
    );
    // ... retried up to max_retries (3) times ...
    for attempt in 1..=3 {
        let report = manage(&app).await;
        assert_eq!(report.failed_retried, 1, "attempt {attempt}: {report:?}");
        let log = app.registry.upload_log(id).await.unwrap().unwrap();
        assert_eq!(
            (log.status, log.retry_count),
            (UploadStatus::Complete, attempt)
        );
        app.registry
            .update_upload_log(id, &UploadLogPatch::status(UploadStatus::ProcessingFailed))
            .await
            .unwrap();
    }
    // ... then given up, with a notification the API accepts.
    let report = manage(&app).await;
    assert_eq!(report.permanently_failed, 1, "{report:?}");
    let log = app.registry.upload_log(id).await.unwrap().unwrap();
    assert_eq!(log.status, UploadStatus::PermanentlyFailed);
    assert!(app.registry.get(id).await.unwrap().is_deleted);
    let notes = api.notifications();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0]["role_ids"], json!([2]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revived_upload_of_a_deleted_dataset_is_never_verified() {
    let api = TestApi::start();
    let root = tempfile::tempdir().unwrap();
    api.set_uploads(UploadSettings {
        root: root.path().to_path_buf(),
        notifications: false,
    });
    let project = upload_project();
    let app = app_over_api(&project, &api).await;
    let log = create_upload_of(&app, "revived", DatasetType::RawData).await;
    let id = log.dataset_id;
    fill(&log, FILES);
    app.registry
        .update_upload_log(id, &UploadLogPatch::status(UploadStatus::UploadFailed))
        .await
        .unwrap();
    // The API revives it on a repeated completion (spec E.5); its dataset stays deleted.
    let revived = app.registry.complete_upload(id, "p", None).await.unwrap();
    assert_eq!(revived.status, UploadStatus::Uploaded);
    api.age_upload(id, Duration::from_secs(31));
    let report = manage(&app).await;
    assert_eq!(
        (report.skipped_deleted, report.verification_spawned),
        (1, 0)
    );
    assert_eq!(
        app.registry.upload_log(id).await.unwrap().unwrap().status,
        UploadStatus::Uploaded
    );
}

// ---------------------------------------------------------------------------------------------
// purge_stale_uploaded.

fn backdate(path: &Path, days: u64) {
    let when = std::time::SystemTime::now() - Duration::from_secs(days * 86_400);
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(when).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_purge_removes_upload_leftovers_and_never_follows_a_link_out_of_the_roots() {
    let project = Project::new();
    let app = project.app().await;
    let root = app
        .settings
        .paths
        .raw_data
        .upload
        .parent()
        .unwrap()
        .to_path_buf();
    std::fs::create_dir_all(&root).unwrap();

    // Session files: old ones go, new ones and other names stay.
    let old = root.join("0123456789abcdef0123456789abcdef");
    let old_json = root.join("0123456789abcdef0123456789abcdef.json");
    let new = root.join("fedcba9876543210fedcba9876543210");
    let other = root.join("README");
    for path in [&old, &old_json, &new, &other] {
        write_file(path, b"x");
    }
    backdate(&old, 20);
    backdate(&old_json, 20);
    backdate(&other, 20);

    // Sidecars: of an ended upload (go), of one in flight (stay), of an unknown id (go).
    let ended = create_upload(&app, "ended").await;
    app.registry
        .update_upload_log(
            ended.dataset_id,
            &UploadLogPatch::status(UploadStatus::Complete),
        )
        .await
        .unwrap();
    let in_flight = create_upload(&app, "in flight").await;
    let sidecars = root.join("uploaded_data");
    let ended_json = sidecars.join(format!("{}/a.json", ended.dataset_id));
    let flight_json = sidecars.join(format!("{}/b.json", in_flight.dataset_id));
    let orphan_json = sidecars.join("99999/c.json");
    for path in [&ended_json, &flight_json, &orphan_json] {
        write_file(path, b"{}");
    }

    // An archived upload whose payload is a link to data outside the roots: never followed.
    let outside = tempfile::tempdir().unwrap();
    write_file(&outside.path().join("precious.dat"), b"irreplaceable");
    let linked = create_upload(&app, "linked").await;
    let linked_origin = PathBuf::from(linked.origin_path.clone().unwrap());
    std::fs::create_dir_all(linked_origin.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(outside.path(), &linked_origin).unwrap();
    // An archived upload with its payload in place: removed.
    let archived = create_upload(&app, "archived").await;
    let archived_origin = fill(&archived, FILES);
    for id in [linked.dataset_id, archived.dataset_id] {
        app.registry
            .update(
                id,
                &workers::registry::DatasetPatch {
                    archive_path: Some(Some(format!("archive/{id}.tar"))),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }

    // A dry run changes nothing.
    let dry = project.run_ok(&["jobs", "run", "purge_stale_uploaded", "--dry-run"]);
    assert!(stdout(&dry).contains("would remove"), "{}", stdout(&dry));
    assert!(old.exists() && ended_json.exists() && archived_origin.exists());

    project.run_ok(&["jobs", "run", "purge_stale_uploaded"]);
    assert!(!old.exists() && !old_json.exists());
    assert!(new.exists() && other.exists());
    assert!(!ended_json.exists() && !orphan_json.exists());
    assert!(!sidecars.join("99999").exists(), "emptied directories go");
    assert!(flight_json.exists());
    assert!(!archived_origin.exists());
    assert!(
        outside.path().join("precious.dat").exists(),
        "a link out of the upload roots was followed"
    );
    assert!(std::fs::symlink_metadata(&linked_origin).is_ok());
    let history = project.run_ok(&[
        "jobs",
        "history",
        "purge_stale_uploaded",
        "--format",
        "json",
    ]);
    let runs: Value = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(runs[0]["counters"]["payloads_removed"], 1);
    assert_eq!(runs[0]["counters"]["sidecars_removed"], 2);
    assert_eq!(runs[0]["counters"]["session_files_removed"], 2);
}

// ---------------------------------------------------------------------------------------------
// The same by hand, through the command line (embedded profile).

#[test]
fn an_upload_pushed_by_rsync_goes_through_the_command_line_to_staged() {
    let project = upload_project();
    let created = project.run_ok(&[
        "uploads",
        "create",
        "rsync run",
        "--type",
        "RAW_DATA",
        "--format",
        "json",
    ]);
    let created: Value = serde_json::from_slice(&created.stdout).unwrap();
    assert_eq!(created["status"], "UPLOADING");
    assert_eq!(created["name"], "rsync-run");
    let id = created["id"].as_i64().unwrap();
    let origin = PathBuf::from(created["origin_path"].as_str().unwrap());
    assert!(origin.is_dir(), "the directory to copy into exists");
    // The sender's side: the data, and its manifest hash computed with the same tool.
    let sent = tempfile::tempdir().unwrap();
    for (path, content) in FILES {
        write_file(&sent.path().join(path), content);
        write_file(&origin.join(path), content);
    }
    let manifest = project.run_ok(&[
        "uploads",
        "manifest",
        sent.path().to_str().unwrap(),
        "--format",
        "json",
    ]);
    let manifest: Value = serde_json::from_slice(&manifest.stdout).unwrap();
    let hash = manifest["hash"].as_str().unwrap();

    // Bad input changes nothing and says what is wrong.
    let unknown = project.run(&["uploads", "complete", "4242", "--manifest-hash", hash]);
    assert_eq!(unknown.status.code(), Some(2), "{}", describe(&unknown));
    assert!(stderr(&unknown).contains("no upload has the dataset id 4242"));
    let bad_hash = project.run(&[
        "uploads",
        "complete",
        &id.to_string(),
        "--manifest-hash",
        "xyz",
    ]);
    assert_eq!(bad_hash.status.code(), Some(2), "{}", describe(&bad_hash));
    let bad_json = project.path("sizes.json");
    write_file(&bad_json, b"{\"mode\": \"path-size-v1\", \"files\": [");
    let bad = project.run(&[
        "uploads",
        "complete",
        &id.to_string(),
        "--size-manifest",
        bad_json.to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", describe(&bad));
    assert!(stderr(&bad).contains("sizes.json"), "{}", stderr(&bad));
    let show = project.run_ok(&["uploads", "show", &id.to_string(), "--format", "json"]);
    let show: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(
        show["status"], "UPLOADING",
        "unchanged by the refused completions"
    );

    project.run_ok(&[
        "uploads",
        "complete",
        &id.to_string(),
        "--manifest-hash",
        hash,
    ]);
    project.run_ok(&["jobs", "run", "manage_upload_workflows", "--wait"]);
    let show = project.run_ok(&["uploads", "show", &id.to_string(), "--format", "json"]);
    let show: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(show["status"], "COMPLETE", "{show}");
    let datasets = project.run_ok(&["datasets", "show", &id.to_string(), "--format", "json"]);
    assert!(
        stdout(&datasets).contains("STAGED"),
        "{}",
        stdout(&datasets)
    );
    // Completing it again is refused: it has moved on.
    let again = project.run(&["uploads", "complete", &id.to_string()]);
    assert_eq!(again.status.code(), Some(2), "{}", describe(&again));
    assert!(stderr(&again).contains("COMPLETE"), "{}", stderr(&again));
    let list = project.run_ok(&["uploads", "list", "--format", "json"]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list[0]["id"], id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_check_is_queued_again_and_one_that_never_ends_fails() {
    let mut project = upload_project();
    project.set_env("WORKERS__UPLOADS__RESPAWN_VERIFICATION_AFTER_SECONDS", "0");
    let app = project.app().await;
    let log = create_upload(&app, "lost check").await;
    let id = log.dataset_id;
    fill(&log, FILES);
    app.registry.complete_upload(id, "p", None).await.unwrap();
    let report = manage(&app).await;
    assert_eq!(report.verification_spawned, 1);
    let task_id = app
        .registry
        .upload_log(id)
        .await
        .unwrap()
        .unwrap()
        .meta_str("verification_task_id")
        .unwrap()
        .to_owned();
    // The message is lost before any worker ran it.
    let delivery = app.broker.next().await.unwrap();
    assert_eq!(delivery.message().id, task_id);
    delivery.ack().await.unwrap();
    assert_eq!(app.broker.holds(&task_id).await.unwrap(), Some(false));
    let report = manage(&app).await;
    assert_eq!(report.in_flight, 1);
    assert_eq!(
        app.broker.holds(&task_id).await.unwrap(),
        Some(true),
        "queued again under the same id"
    );
    // A check that never ends (its message held somewhere, its start long ago) fails after
    // uploads.verification_timeout_seconds.
    let long_ago = (chrono::Utc::now() - chrono::Duration::hours(5))
        .naive_utc()
        .format("%Y-%m-%dT%H:%M:%S%.6f")
        .to_string();
    app.registry
        .update_upload_log(
            id,
            &UploadLogPatch {
                metadata: Some(object(json!({"verification_started_at": long_ago}))),
                ..UploadLogPatch::default()
            },
        )
        .await
        .unwrap();
    let report = manage(&app).await;
    assert_eq!(report.verification_failed, 1, "{report:?}");
    let log = app.registry.upload_log(id).await.unwrap().unwrap();
    assert_eq!(log.status, UploadStatus::VerificationFailed);
    assert!(
        log.meta_str("failure_reason")
            .unwrap()
            .starts_with("Verification timeout (>4 hours). Task ID: "),
        "{log:?}"
    );
    assert!(app.registry.get(id).await.unwrap().is_deleted);
}

/// `uploads list` shows each upload with its log, in the registry's order, for more uploads
/// than it reads at once.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_list_shows_every_upload_in_the_registrys_order() {
    let project = upload_project();
    let app = project.app().await;
    let mut created = Vec::new();
    for i in 0..11 {
        created.push(create_upload(&app, &format!("listed {i}")).await.dataset_id);
    }
    let expected: Vec<i64> = app
        .registry
        .uploads(&UploadQuery::All { limit: 100 })
        .await
        .unwrap()
        .iter()
        .map(|r| r.dataset_id)
        .collect();
    created.sort_unstable();
    let mut sorted = expected.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, created);
    let list = project.run_ok(&["uploads", "list", "--format", "json"]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let shown: Vec<i64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|log| log["id"].as_i64().unwrap())
        .collect();
    assert_eq!(shown, expected);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|log| log["status"] == "UPLOADING"),
        "{list}"
    );
}

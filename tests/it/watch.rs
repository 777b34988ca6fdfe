//! `watch` beyond the happy path: nothing is left registered without a workflow, a failed
//! batch is tried again on the next run, and several processes share one database.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::common::*;
use async_trait::async_trait;
use workers::app::App;
use workers::jobs::watch::{self, WatchOptions};
use workers::model::{DatasetState, DatasetType, FileRecord};
use workers::registry::uploads::{
    NewUpload, Notification, ProcessLogLine, UploadLog, UploadLogPatch, UploadQuery, UploadRef,
    WorkerProcess,
};
use workers::registry::{
    BulkOutcome, Dataset, DatasetId, DatasetPatch, DatasetQuery, NewDataset, Registry,
    RegistryError,
};
use workers::store::{TaskStatus, WorkflowFilter};
use workers::workflow::engine;

#[tokio::test(flavor = "multi_thread")]
async fn a_dataset_left_without_a_workflow_is_found_and_started() {
    let project = Project::new();
    let origin = project.dataset(DatasetType::RawData, "orphan", &[("a.txt", b"a")]);
    // What a crash between registration and workflow start leaves behind (spec J.1).
    let app = project.app().await;
    register_without_workflow(&app, "orphan", &origin).await;
    let out = project.run_ok(&["jobs", "run", "watch", "--wait"]);
    assert!(
        stdout(&out).contains("started the missing workflow of dataset 1 (`orphan`)"),
        "{}",
        stdout(&out)
    );
    let d = dataset_named(&app, DatasetType::RawData, "orphan").await;
    assert_eq!(d.workflows.len(), 1);
    assert_eq!(
        state_names(&d),
        ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED"]
    );
}

/// A registry whose first `fail_bulk` bulk creates fail as if the API were down.
struct FlakyRegistry {
    inner: Arc<dyn Registry>,
    fail_bulk: AtomicUsize,
}

#[async_trait]
impl Registry for FlakyRegistry {
    async fn bulk_create(&self, items: &[NewDataset]) -> Result<BulkOutcome, RegistryError> {
        if self.fail_bulk.load(Ordering::SeqCst) > 0 {
            self.fail_bulk.fetch_sub(1, Ordering::SeqCst);
            return Err(RegistryError::Unavailable(anyhow::format_err!(
                "503 Service Unavailable"
            )));
        }
        self.inner.bulk_create(items).await
    }
    async fn get(&self, id: DatasetId) -> Result<Dataset, RegistryError> {
        self.inner.get(id).await
    }
    async fn find(&self, query: &DatasetQuery) -> Result<Vec<Dataset>, RegistryError> {
        self.inner.find(query).await
    }
    async fn update(&self, id: DatasetId, patch: &DatasetPatch) -> Result<Dataset, RegistryError> {
        self.inner.update(id, patch).await
    }
    async fn add_state(&self, id: DatasetId, state: DatasetState) -> Result<(), RegistryError> {
        self.inner.add_state(id, state).await
    }
    async fn add_files(&self, id: DatasetId, files: &[FileRecord]) -> Result<(), RegistryError> {
        self.inner.add_files(id, files).await
    }
    async fn replace_files(
        &self,
        id: DatasetId,
        rows: std::sync::Arc<dyn workers::registry::FileRowSource>,
    ) -> Result<u64, RegistryError> {
        self.inner.replace_files(id, rows).await
    }
    async fn files_page(
        &self,
        id: DatasetId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FileRecord>, RegistryError> {
        self.inner.files_page(id, after, limit).await
    }
    async fn add_workflow(&self, id: DatasetId, workflow_id: &str) -> Result<(), RegistryError> {
        self.inner.add_workflow(id, workflow_id).await
    }
    async fn linked_workflows(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashSet<String>, RegistryError> {
        self.inner.linked_workflows(ids).await
    }
    async fn add_metrics(
        &self,
        metrics: &[workers::registry::Metric],
    ) -> Result<(), RegistryError> {
        self.inner.add_metrics(metrics).await
    }

    async fn create_upload(&self, upload: &NewUpload) -> Result<UploadLog, RegistryError> {
        self.inner.create_upload(upload).await
    }

    async fn complete_upload(
        &self,
        id: DatasetId,
        process_id: &str,
        metadata: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<UploadLog, RegistryError> {
        self.inner.complete_upload(id, process_id, metadata).await
    }

    async fn upload_log(&self, id: DatasetId) -> Result<Option<UploadLog>, RegistryError> {
        self.inner.upload_log(id).await
    }

    async fn update_upload_log(
        &self,
        id: DatasetId,
        patch: &UploadLogPatch,
    ) -> Result<UploadLog, RegistryError> {
        self.inner.update_upload_log(id, patch).await
    }

    async fn uploads(&self, query: &UploadQuery) -> Result<Vec<UploadRef>, RegistryError> {
        self.inner.uploads(query).await
    }

    async fn register_process(
        &self,
        process: &WorkerProcess,
    ) -> Result<Option<i64>, RegistryError> {
        self.inner.register_process(process).await
    }

    async fn add_process_logs(
        &self,
        process_id: i64,
        lines: &[ProcessLogLine],
    ) -> Result<(), RegistryError> {
        self.inner.add_process_logs(process_id, lines).await
    }

    async fn notify(&self, notification: &Notification) -> Result<(), RegistryError> {
        self.inner.notify(notification).await
    }
}

#[test]
fn a_dry_run_registers_nothing() {
    let project = Project::new();
    project.dataset(DatasetType::RawData, "maybe", &[("a.txt", b"a")]);
    let out = project.run_ok(&["jobs", "run", "watch", "--dry-run"]);
    assert!(
        stdout(&out).contains("would register RAW_DATA `maybe`"),
        "{}",
        stdout(&out)
    );
    let out = project.run_ok(&["datasets", "list", "--format", "json"]);
    assert_eq!(stdout(&out).trim(), "[]");
    // Nothing was remembered either: the next real run registers it.
    let out = project.run_ok(&["jobs", "run", "watch"]);
    assert!(stdout(&out).contains("incremental"));
    let out = project.run_ok(&["datasets", "list", "--format", "json"]);
    assert!(stdout(&out).contains("\"maybe\""), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_batch_is_tried_again_on_the_next_run() {
    let project = Project::new();
    project.dataset(DatasetType::RawData, "first_try_fails", &[("a.txt", b"a")]);
    let built = project.app().await;
    let flaky = Arc::new(FlakyRegistry {
        inner: Arc::clone(&built.registry),
        fail_bulk: AtomicUsize::new(1),
    });
    let app = App {
        settings: built.settings.clone(),
        registry: flaky,
        store: Arc::clone(&built.store),
        scheduler_store: Arc::clone(&built.scheduler_store),
        space: Arc::clone(&built.space),
        broker: Arc::clone(&built.broker),
        archive: Arc::clone(&built.archive),
        pool: built.pool.clone(),
        definitions: built.definitions.clone(),
        identity: built.identity.clone(),
        mailbox: Arc::clone(&built.mailbox),
    };
    let report = watch::run(&app, WatchOptions::default(), &Default::default())
        .await
        .unwrap();
    assert_eq!(report.failed(), 1);
    assert!(
        report.sources[0].failed[0].1.contains("unavailable"),
        "{:?}",
        report.sources[0].failed
    );
    assert!(
        app.registry
            .find(&Default::default())
            .await
            .unwrap()
            .is_empty()
    );
    // The very next run (incremental, not a full scan) registers it.
    let report = watch::run(&app, WatchOptions::default(), &Default::default())
        .await
        .unwrap();
    assert_eq!(report.failed(), 0);
    assert_eq!(report.sources[0].scan, watch::ScanKind::Incremental);
    assert_eq!(report.sources[0].registered.len(), 1);
    assert!(report.sources[0].registered[0].workflow_id.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_worker_processes_share_the_queue_and_run_each_step_once() {
    let project = Project::new();
    let names: Vec<String> = (0..6).map(|i| format!("shared_{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        project.dataset(
            DatasetType::RawData,
            name,
            &[("data.bin", &pseudo_random(2 << 20, i as u64))],
        );
    }
    project.run_ok(&["jobs", "run", "watch"]);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            project
                .command(&["worker", "--until-idle", "--concurrency", "2"])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = workers
        .into_iter()
        .map(|w| w.wait_with_output().unwrap())
        .collect();
    for out in &outputs {
        assert!(out.status.success(), "{}", describe(out));
    }
    let app = project.app().await;
    for name in &names {
        let d = dataset_named(&app, DatasetType::RawData, name).await;
        assert_eq!(
            state_names(&d),
            ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED"],
            "{name}"
        );
        let workflow = app.store.workflow(&d.workflows[0]).await.unwrap().unwrap();
        let view = engine::view(&app, workflow).await.unwrap();
        assert_eq!(view.derived.status, TaskStatus::Success);
        for step in &view.workflow.steps {
            assert_eq!(step.runs.len(), 1, "{name}: {}", step.spec.name);
            assert_eq!(
                view.metas[&step.runs[0].task_id].retries, 0,
                "{name}: {}",
                step.spec.name
            );
        }
    }
    assert!(
        app.store
            .workflows(WorkflowFilter::Active, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let started: Vec<usize> = outputs
        .iter()
        .map(|o| stderr(o).matches("Step started.").count())
        .collect();
    assert_eq!(
        started.iter().sum::<usize>(),
        names.len() * 6,
        "{started:?}"
    );
}

#[test]
fn directories_below_the_minimum_size_are_held_back_until_they_grow() {
    let mut project = Project::new();
    project.set_env("WORKERS__REGISTRATION__MINIMUM_DATASET_SIZE", "1000");
    project.dataset(DatasetType::RawData, "small", &[("a.txt", b"tiny")]);
    project.dataset(
        DatasetType::RawData,
        "large",
        &[("a.bin", &pseudo_random(2000, 1))],
    );
    let out = project.run_ok(&["jobs", "run", "watch"]);
    assert!(
        stdout(&out).contains("held back `small`"),
        "{}",
        stdout(&out)
    );
    let listed = stdout(&project.run_ok(&["datasets", "list", "--format", "json"]));
    assert!(
        listed.contains("\"large\"") && !listed.contains("\"small\""),
        "{listed}"
    );
    // Not remembered: once it has grown, the next incremental run registers it.
    write_file(
        &project.source(DatasetType::RawData).join("small/b.bin"),
        &pseudo_random(2000, 2),
    );
    project.run_ok(&["jobs", "run", "watch"]);
    let listed = stdout(&project.run_ok(&["datasets", "list", "--format", "json"]));
    assert!(listed.contains("\"small\""), "{listed}");
}

/// `with space` and `with-space` normalize to one name: the second directory is never archived
/// under it, and every scan says so (a warning naming both, a counter in the history).
#[tokio::test(flavor = "multi_thread")]
async fn directories_whose_names_collide_are_reported_on_every_scan() {
    let project = Project::new();
    let first = project.dataset(DatasetType::RawData, "with space", &[("a.txt", b"a")]);
    let second = project.dataset(DatasetType::RawData, "with-space", &[("b.txt", b"b")]);
    for run in 0..3 {
        let out = project.run_ok(&["jobs", "run", "watch"]);
        let err = stderr(&out);
        assert!(
            err.contains("its name normalizes to that of a dataset from another directory"),
            "run {run}: {err}"
        );
        let said = stdout(&out);
        assert!(said.contains("not registered `"), "run {run}: {said}");
        // Both directories are named, whichever of them was registered.
        for dir in [&first, &second] {
            let dir = std::fs::canonicalize(dir).unwrap();
            assert!(
                said.contains(&dir.display().to_string()),
                "run {run}: {said}"
            );
        }
    }
    let history: serde_json::Value = serde_json::from_slice(
        &project
            .run_ok(&["jobs", "history", "watch", "--format", "json"])
            .stdout,
    )
    .unwrap();
    let conflicts: Vec<i64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["counters"]["conflicts"].as_i64().unwrap())
        .collect();
    assert_eq!(conflicts, [1, 1, 1]);
    let app = project.app().await;
    let all = app.registry.find(&DatasetQuery::default()).await.unwrap();
    assert_eq!(all.len(), 1, "one dataset for the two directories");
}

/// Watches run at once (the scheduler's and an operator's by hand) give each dataset one
/// `integrated` workflow: starting is exclusive, and so is the repair of datasets without one.
#[tokio::test(flavor = "multi_thread")]
async fn overlapping_watches_start_one_workflow_per_dataset() {
    let project = Project::new();
    let names: Vec<String> = (0..12).map(|i| format!("overlap_{i}")).collect();
    for name in &names {
        project.dataset(DatasetType::RawData, name, &[("a.txt", name.as_bytes())]);
    }
    let app = project.app().await;
    // Half of them were registered by a run that died before starting their workflows, so
    // every watch also runs the repair pass on them.
    for name in &names[..6] {
        let origin = project.path(&format!("examples/raw_data/{name}"));
        register_without_workflow(&app, name, &origin).await;
    }
    let watches: Vec<_> = (0..3)
        .map(|_| {
            project
                .command(&["jobs", "run", "watch"])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for watch in watches {
        let out = watch.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", describe(&out));
    }
    // Whatever a busy start left for later, the next run finishes.
    project.run_ok(&["jobs", "run", "watch"]);
    for name in &names {
        let d = dataset_named(&app, DatasetType::RawData, name).await;
        assert_eq!(d.workflows.len(), 1, "{name}: {:?}", d.workflows);
    }
    let active = app.store.workflows(WorkflowFilter::All, 100).await.unwrap();
    assert_eq!(
        active.len(),
        names.len(),
        "no workflow created and left unlinked"
    );
}

/// A full scan compares the listing with the registry's names in one listing: registered
/// directories are counted and skipped, colliding ones reported, new ones registered.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_scan_tells_registered_new_and_colliding_directories_apart() {
    let project = Project::new();
    for i in 0..5 {
        project.dataset(DatasetType::RawData, &format!("old-{i}"), &[("a", b"a")]);
    }
    project.run_ok(&["jobs", "run", "watch"]);
    project.dataset(DatasetType::RawData, "new_one", &[("a", b"a")]);
    // `old 1` normalizes to `old-1`, the name of a dataset from another directory (spec J.5).
    project.dataset(DatasetType::RawData, "old 1", &[("b", b"b")]);
    project.run_ok(&["jobs", "run", "watch", "--full"]);
    let history: serde_json::Value = serde_json::from_slice(
        &project
            .run_ok(&[
                "jobs", "history", "watch", "--limit", "1", "--format", "json",
            ])
            .stdout,
    )
    .unwrap();
    let counters = &history[0]["counters"];
    let app = project.app().await;
    let names: Vec<String> = app
        .registry
        .find(&DatasetQuery::default())
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name.to_string())
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(names.contains(&"new_one".to_owned()), "{names:?}");
    assert_eq!(counters["registered"], 1, "{counters}");
    assert_eq!(counters["already_registered"], 5, "{counters}");
    assert_eq!(counters["conflicts"], 1, "{counters}");
}

/// Starting many workflows at once gives each dataset its own outcome: started, already
/// active, busy (another starter holds its claim) or not found.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_starts_reports_each_dataset_on_its_own() {
    let project = Project::new();
    let app = project.app().await;
    let mut ids = Vec::new();
    for name in ["batch_a", "batch_b", "batch_c"] {
        let origin = project.dataset(DatasetType::RawData, name, &[("a", b"a")]);
        ids.push(register_without_workflow(&app, name, &origin).await);
    }
    let active = engine::start(&app, "integrated", ids[0], Default::default())
        .await
        .unwrap();
    // Another process is starting batch_c right now.
    let busy = format!("start/{}/integrated", ids[2]);
    assert!(
        app.scheduler_store
            .acquire_lease(&busy, "elsewhere", std::time::Duration::from_secs(60))
            .await
            .unwrap()
    );
    let missing = 999_999;
    let outcomes = engine::start_many(
        &app,
        "integrated",
        &[ids[0], ids[1], ids[2], missing, ids[1]],
        &Default::default(),
    )
    .await;
    let ids_back: Vec<DatasetId> = outcomes.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids_back,
        [ids[0], ids[1], ids[2], missing],
        "once each, in order"
    );
    let described: Vec<String> = outcomes
        .iter()
        .map(|(_, r)| match r {
            Ok(_) => "started".to_owned(),
            Err(err) => match err.downcast_ref::<engine::NotStarted>() {
                Some(engine::NotStarted::Active { workflow_id, .. }) => {
                    assert_eq!(workflow_id, &active);
                    "active".to_owned()
                }
                Some(engine::NotStarted::Busy { .. }) => "busy".to_owned(),
                None => format!("{err:#}"),
            },
        })
        .collect();
    assert_eq!(described[..3], ["active", "started", "busy"]);
    assert!(described[3].contains("999999"), "{described:?}");
    let b = app.registry.get(ids[1]).await.unwrap();
    assert_eq!(b.workflows.len(), 1);
    assert!(app.registry.get(ids[2]).await.unwrap().workflows.is_empty());
    // The claims taken for the batch are given back (batch_c's belongs to the other starter).
    for id in [ids[0], ids[1]] {
        let claim = format!("start/{id}/integrated");
        assert!(
            app.scheduler_store
                .acquire_lease(&claim, "next", std::time::Duration::from_secs(60))
                .await
                .unwrap(),
            "{claim} released"
        );
    }
}

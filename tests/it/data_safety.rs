//! What is recorded stays true of the disk at the edges: a step past its time limit or whose
//! claim was lost is stopped and records nothing it should not, a stability wait always ends,
//! a step stuck in a file-system call does not stop its claim from being renewed, and a file
//! that changes after inspection is never archived.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{Map, Value, json};
use workers::model::DatasetType;
use workers::store::TaskStatus;
use workers::ui::Display;
use workers::workflow::engine::{self, WorkflowView};

fn kwargs(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// The first step's task result: status and recorded error text.
fn first_step(view: &WorkflowView) -> (TaskStatus, Value) {
    let meta = &view.metas[&view.workflow.steps[0].runs[0].task_id];
    (meta.status, meta.result.clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_past_its_time_limit_is_stopped_and_fails() {
    let mut project = Project::new();
    project.set_env("WORKERS__WORKER__TIME_LIMITS__AWAIT_STABILITY", "1");
    let app = project.app().await;
    let id = register_small(&app, &project, "slow_to_settle").await;
    // Waits for an hour of quiet: only the time limit ends it.
    let workflow_id = engine::start(
        &app,
        "integrated",
        id,
        kwargs(&[("recency_threshold", json!(3600))]),
    )
    .await
    .unwrap();
    let started = Instant::now();
    run_until_idle(&app, 1, Duration::from_secs(30)).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let view = view_of(&app, &workflow_id).await;
    assert_eq!(view.derived.status, TaskStatus::Failure);
    let (status, result) = first_step(&view);
    assert_eq!(status, TaskStatus::Failure);
    assert_eq!(result["exc_type"], "TimeLimitExceeded");
    assert!(
        result["exc_message"][0]
            .as_str()
            .unwrap()
            .contains("time limit of 1 s"),
        "{result}"
    );
    let d = app.registry.get(id).await.unwrap();
    assert_eq!(state_names(&d), ["REGISTERED"], "not READY");
}

/// The embedded queue's claim is taken by another worker while the step runs (its lease
/// lapsed during a pause): the step's result is not recorded and no next step is published.
/// The step outlasts half the lease (3 s), so that the claim is not known to be held still
/// without asking the queue: a claim younger than that cannot have lapsed.
#[tokio::test(flavor = "multi_thread")]
async fn a_result_is_not_recorded_once_the_claim_is_lost() {
    let mut project = Project::new();
    project.set_env("WORKERS__WORKER__LEASE_SECONDS", "3");
    let app = project.app().await;
    let id = register_small(&app, &project, "claim_lost").await;
    let workflow_id = engine::start(
        &app,
        "integrated",
        id,
        kwargs(&[("recency_threshold", json!(2))]),
    )
    .await
    .unwrap();
    let delivery = app.broker.next().await.unwrap();
    let task_id = delivery.message().id.clone();
    let handled = tokio::spawn({
        let app = Arc::clone(&app);
        async move { engine::handle(&app, delivery, &Display::quiet()).await }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let db = workers::sqlite::Db::open(&app.settings.sqlite.path, Duration::from_secs(5)).unwrap();
    db.with_conn(|conn| {
        conn.execute(
            "UPDATE queue SET lease_owner = 'elsewhere:1', lease_until = ?2 WHERE task_id = ?1",
            rusqlite::params![task_id, i64::MAX],
        )?;
        Ok(())
    })
    .unwrap();
    tokio::time::timeout(Duration::from_secs(30), handled)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let view = view_of(&app, &workflow_id).await;
    let (status, _) = first_step(&view);
    assert_eq!(
        status,
        TaskStatus::Started,
        "no result recorded by a run without its claim"
    );
    assert!(view.workflow.steps[1].runs.is_empty());
    let queued: Vec<String> = db
        .with_conn(|conn| {
            let mut stmt = conn.prepare("SELECT task_id FROM queue")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
        })
        .unwrap();
    assert_eq!(
        queued,
        [task_id],
        "the message stays with its new owner; nothing published"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_dated_in_the_future_does_not_hold_up_stability_for_ever() {
    let project = Project::new();
    let app = project.app().await;
    let origin = project.dataset(DatasetType::RawData, "future", &[("a.txt", b"a")]);
    let tomorrow = std::time::SystemTime::now() + Duration::from_secs(86_400);
    filetime::set_file_mtime(
        origin.join("a.txt"),
        filetime::FileTime::from_system_time(tomorrow),
    )
    .unwrap();
    let id = register_without_workflow(&app, "future", &origin).await;
    let workflow_id = engine::start(
        &app,
        "integrated",
        id,
        kwargs(&[("recency_threshold", json!(2)), ("wait_seconds", json!(1))]),
    )
    .await
    .unwrap();
    run_until_idle(&app, 1, Duration::from_secs(60)).await;
    let view = view_of(&app, &workflow_id).await;
    assert_eq!(view.derived.status, TaskStatus::Success);
    assert!(state_names(&app.registry.get(id).await.unwrap()).contains(&"READY".to_owned()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dataset_that_never_settles_fails_after_the_maximum_wait_naming_its_newest_file() {
    let project = Project::new();
    let app = project.app().await;
    let origin = project.dataset(DatasetType::RawData, "busy", &[("quiet.txt", b"q")]);
    let id = register_without_workflow(&app, "busy", &origin).await;
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (writing, file) = (Arc::clone(&writing), origin.join("growing.log"));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                std::fs::write(&file, n.to_string()).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let workflow_id = engine::start(
        &app,
        "integrated",
        id,
        kwargs(&[
            ("recency_threshold", json!(2)),
            ("wait_seconds", json!(1)),
            ("max_wait_seconds", json!(3)),
        ]),
    )
    .await
    .unwrap();
    run_until_idle(&app, 1, Duration::from_secs(60)).await;
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let view = view_of(&app, &workflow_id).await;
    let (status, result) = first_step(&view);
    assert_eq!(status, TaskStatus::Failure);
    let message = result["exc_message"][0].as_str().unwrap();
    assert!(message.contains("still changing after 3 s"), "{message}");
    assert!(message.contains("growing.log"), "{message}");
}

/// A file changed after inspection, its size kept: the bundle's member checksums differ from
/// the inspection's, so archive stores nothing and names the file.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_changed_after_inspection_with_its_size_kept_is_not_archived() {
    let project = Project::new();
    for (name, task) in [
        ("inspect_only", "inspect_dataset"),
        ("archive_only", "archive_dataset"),
    ] {
        std::fs::write(
            project.path(&format!("jobs/{name}.toml")),
            format!("name = \"{name}\"\n\n[[steps]]\nname = \"{name}\"\ntask = \"{task}\"\n"),
        )
        .unwrap();
    }
    let app = project.app().await;
    let origin = project.dataset(
        DatasetType::RawData,
        "edited",
        &[("a.txt", b"alpha"), ("d/b.txt", b"beta")],
    );
    let id = register_without_workflow(&app, "edited", &origin).await;
    let inspect = engine::start(&app, "inspect_only", id, Map::new())
        .await
        .unwrap();
    run_until_idle(&app, 1, Duration::from_secs(60)).await;
    assert_eq!(
        view_of(&app, &inspect).await.derived.status,
        TaskStatus::Success
    );
    write_file(&origin.join("a.txt"), b"ALPHA");
    let archive = engine::start(&app, "archive_only", id, Map::new())
        .await
        .unwrap();
    run_until_idle(&app, 1, Duration::from_secs(60)).await;
    let (status, result) = first_step(&view_of(&app, &archive).await);
    assert_eq!(status, TaskStatus::Failure);
    let message = result["exc_message"][0].as_str().unwrap();
    assert!(
        message.contains("changed after it was inspected"),
        "{message}"
    );
    assert!(message.contains("`a.txt` has MD5"), "{message}");
    assert!(message.contains("--from inspect"), "{message}");
    let d = app.registry.get(id).await.unwrap();
    assert_eq!(d.archive_path, None);
    assert!(d.bundle.is_none());
    let archive_dir = project.path("var/archive");
    let archived: Vec<_> = walkdir::WalkDir::new(&archive_dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .collect();
    assert!(archived.is_empty(), "{archived:?}");
    let generate = &app.settings.paths.raw_data.bundle_generate;
    assert_eq!(std::fs::read_dir(generate).unwrap().count(), 0);
}

/// Archive refuses a dataset changed since inspect; resuming from inspect takes the change in
/// (its rows replaced, not added beside the stale ones) and archives the current data.
#[tokio::test(flavor = "multi_thread")]
async fn resuming_from_inspect_archives_the_changed_dataset() {
    let project = Project::new();
    std::fs::write(
        project.path("jobs/inspect_archive.toml"),
        "name = \"inspect_archive\"\n\n[[steps]]\nname = \"inspect\"\ntask = \"inspect_dataset\"\n\n[[steps]]\nname = \"archive\"\ntask = \"archive_dataset\"\n",
    )
    .unwrap();
    let app = project.app().await;
    let origin = project.dataset(
        DatasetType::RawData,
        "resumed",
        &[("a.txt", b"alpha"), ("d/b.txt", b"beta")],
    );
    let id = register_without_workflow(&app, "resumed", &origin).await;
    let workflow_id = engine::start(&app, "inspect_archive", id, Map::new())
        .await
        .unwrap();
    // Inspect only, then change a file before archive runs.
    let delivery = app.broker.next().await.unwrap();
    engine::handle(&app, delivery, &Display::quiet())
        .await
        .unwrap();
    write_file(&origin.join("a.txt"), b"ALPHA");
    std::fs::remove_file(origin.join("d/b.txt")).unwrap();
    run_until_idle(&app, 1, Duration::from_secs(60)).await;
    assert_eq!(
        view_of(&app, &workflow_id).await.derived.status,
        TaskStatus::Failure
    );

    let resumed = engine::resume_from(&app, &workflow_id, Some("inspect"))
        .await
        .unwrap();
    assert!(
        matches!(resumed, engine::Resumed::Restarted { ref step, .. } if step == "inspect"),
        "{resumed:?}"
    );
    run_until_idle(&app, 1, Duration::from_secs(60)).await;
    assert_eq!(
        view_of(&app, &workflow_id).await.derived.status,
        TaskStatus::Success
    );
    let d = app.registry.get(id).await.unwrap();
    assert_eq!(d.latest_state(), Some("ARCHIVED"));
    let rows = file_rows(&app, id).await;
    let paths: Vec<&str> = rows.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["a.txt"], "the removed file's row is gone");
    assert_eq!(
        rows[0].md5.unwrap(),
        workers::compute::md5::md5_bytes(b"ALPHA")
    );
    assert_eq!(
        engine::resume_from(&app, &workflow_id, Some("nope"))
            .await
            .unwrap(),
        engine::Resumed::NotFailed(TaskStatus::Success)
    );
}

/// A step stuck in a file-system call (the archive copy is a FIFO nobody writes to) holds one
/// thread of the pool, never the runtime: its claim keeps being renewed meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_file_system_call_does_not_stop_claims_from_being_renewed() {
    let mut project = Project::new();
    project.set_env("WORKERS__WORKER__LEASE_SECONDS", "3");
    project.run_ok(&["jobs", "run", "watch", "--wait"]);
    let app = project.app().await;
    project.dataset(DatasetType::RawData, "hangs", &[("a.txt", b"a")]);
    project.run_ok(&["jobs", "run", "watch", "--wait"]);
    let d = dataset_named(&app, DatasetType::RawData, "hangs").await;
    let archive = std::path::PathBuf::from(d.archive_path.clone().unwrap());
    std::fs::remove_file(&archive).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &archive,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let workflow_id = engine::start(&app, "stage", d.id, Map::new())
        .await
        .unwrap();
    let run = tokio::spawn({
        let app = Arc::clone(&app);
        async move { run_until_idle(&app, 1, Duration::from_secs(120)).await }
    });
    let db = workers::sqlite::Db::open(&app.settings.sqlite.path, Duration::from_secs(5)).unwrap();
    let lease = || {
        db.with_conn(|conn| {
            Ok(
                conn.query_row("SELECT MAX(lease_until) FROM queue", [], |r| {
                    r.get::<_, Option<i64>>(0)
                })?,
            )
        })
        .unwrap()
    };
    // The step is stuck opening the FIFO; its lease must move on, second after second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = lease().expect("the step's message is leased");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = lease().expect("still leased");
    assert!(later > first + 2_000, "lease renewed: {first} -> {later}");
    // Unblock it: the bytes are not the bundle, so stage fails on the checksum.
    let mut fifo = std::fs::OpenOptions::new()
        .write(true)
        .open(&archive)
        .unwrap();
    std::io::Write::write_all(&mut fifo, b"not a bundle").unwrap();
    drop(fifo);
    run.await.unwrap();
    let (status, result) = first_step(&view_of(&app, &workflow_id).await);
    assert_eq!(status, TaskStatus::Failure);
    assert!(
        result["exc_message"][0]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{result}"
    );
}

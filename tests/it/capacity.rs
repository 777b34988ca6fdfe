//! Admission by bytes on a real small file system (a tmpfs mounted for the test): three
//! datasets whose staged copies do not fit together are staged one after another without a
//! single "No space left on device"; the one that does not fit waits, visibly, and a purge on
//! demand frees room for it once the oldest copy is old enough to go.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use workers::app::App;
use workers::model::DatasetType;
use workers::registry::Dataset;
use workers::store::TaskStatus;
use workers::workflow::worker::{self, Until, WorkerOptions};

use crate::common::*;

/// A tmpfs of a given size mounted on a directory, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// `None` (the test is skipped) where mounting is not allowed, except under CI.
    fn mount(size: &str, dir: &Path) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        match mounted {
            Ok(out) if out.status.success() => Some(Tmpfs {
                dir: std::fs::canonicalize(dir).unwrap(),
            }),
            other => {
                let why = format!("cannot mount a tmpfs: {other:?}");
                assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{why}");
                eprintln!("skipped: {why}");
                None
            }
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Stages raw data on `tmpfs`: the staged trees in `stage/`, the fetched bundles in `bundles/`.
fn stage_on(project: &mut Project, tmpfs: &Tmpfs) {
    project.set_env(
        "WORKERS__PATHS__RAW_DATA__STAGE",
        tmpfs.path("stage").to_str().unwrap(),
    );
    project.set_env(
        "WORKERS__PATHS__RAW_DATA__BUNDLE__STAGE",
        tmpfs.path("bundles").to_str().unwrap(),
    );
}

/// Runs two worker slots until `done` holds (checked every 200 ms), then stops them; fails
/// after `limit`.
async fn run_until<F, Fut>(app: &Arc<App>, limit: Duration, done: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let opts = WorkerOptions {
        concurrency: 2,
        until: Until::Shutdown,
        queues: None,
        shutdown_grace: Duration::from_secs(30),
        node_name: "workers@capacity".into(),
        send_events: false,
    };
    let running = tokio::spawn(worker::run(
        Arc::clone(app),
        opts,
        stop,
        workers::ui::Display::quiet(),
    ));
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < limit, "not done within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_tx.send(true).unwrap();
    running.await.unwrap().unwrap();
}

/// The test's datasets (`cap_1`, `cap_2`, ...) that are registered, in order.
async fn datasets(app: &App) -> Vec<Dataset> {
    let mut all = Vec::new();
    for name in ["cap_1", "cap_2", "cap_3"] {
        let found = app
            .registry
            .find(&workers::registry::DatasetQuery {
                name: Some(workers::model::DatasetName::normalize(name).unwrap()),
                ..Default::default()
            })
            .await
            .unwrap();
        all.extend(found);
    }
    all
}

/// The error texts of every step attempt that did not succeed, across the datasets' workflows.
async fn step_errors(app: &App) -> Vec<(TaskStatus, String)> {
    let mut errors = Vec::new();
    for dataset in datasets(app).await {
        for workflow_id in &dataset.workflows {
            let view = view_of(app, workflow_id).await;
            for meta in view.metas.values() {
                if matches!(meta.status, TaskStatus::Retry | TaskStatus::Failure) {
                    errors.push((meta.status, meta.result.to_string()));
                }
            }
        }
    }
    errors
}

fn file_count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| entries.count())
}

#[tokio::test(flavor = "multi_thread")]
async fn datasets_that_do_not_fit_together_wait_for_room_and_a_purge_on_demand_makes_it() {
    let mut project = Project::new();
    // Below paths.root, where staged copies are published from.
    let Some(tmpfs) = Tmpfs::mount("8m", &project.path("var/staging-fs")) else {
        return;
    };
    for i in 1..=3u64 {
        project.dataset(
            DatasetType::RawData,
            &format!("cap_{i}"),
            &[("data.bin", &pseudo_random(1_500_000, 40 + i))],
        );
    }
    // Each staged copy needs its bundle and its tree, about 3 MB on the 8 MiB tmpfs: two fit,
    // the third does not.
    stage_on(&mut project, &tmpfs);
    let bundles = tmpfs.path("bundles");
    project.set_env("WORKERS__CAPACITY__HEADROOM", "512 KiB");
    project.set_env("WORKERS__CAPACITY__WAIT_SECONDS", "1");
    project.run_ok(&["jobs", "run", "watch"]);

    // Copies staged less than a day ago are not purged: the third waits.
    let app = project.app().await;
    run_until(&app, Duration::from_secs(120), || {
        let app = Arc::clone(&app);
        async move {
            let staged = datasets(&app).await.iter().filter(|d| d.is_staged).count();
            let waiting = step_errors(&app)
                .await
                .iter()
                .any(|(status, text)| *status == TaskStatus::Retry && text.contains("waiting for"));
            staged == 2 && waiting
        }
    })
    .await;
    let errors = step_errors(&app).await;
    let waiting: Vec<&String> = errors
        .iter()
        .filter(|(status, _)| *status == TaskStatus::Retry)
        .map(|(_, text)| text)
        .collect();
    assert_eq!(waiting.len(), 1, "{errors:?}");
    assert!(
        waiting[0].contains("WaitingForSpace")
            && waiting[0].contains(&tmpfs.dir.display().to_string()),
        "the step says what it waits for and where: {}",
        waiting[0]
    );
    assert!(
        !errors
            .iter()
            .any(|(_, text)| text.contains("No space left")),
        "{errors:?}"
    );
    let first_two: Vec<Dataset> = datasets(&app)
        .await
        .into_iter()
        .filter(|d| d.is_staged)
        .collect();
    assert_eq!(first_two.len(), 2);
    drop(app);

    // Old enough to go: the waiting step purges the longest staged copy and fits.
    project.set_env("WORKERS__STAGE__PURGE__MIN_AGE_HOURS", "0");
    let app = project.app().await;
    run_until_idle(&app, 2, Duration::from_secs(120)).await;
    let all = datasets(&app).await;
    for dataset in &all {
        let workflow = view_of(&app, &dataset.workflows[0]).await;
        assert_eq!(
            workflow.derived.status,
            TaskStatus::Success,
            "{}: {:?}",
            dataset.name,
            workflow
                .metas
                .values()
                .map(|m| (m.status, m.result.to_string()))
                .collect::<Vec<_>>()
        );
    }
    let staged: Vec<&str> = all
        .iter()
        .filter(|d| d.is_staged)
        .map(|d| d.name.as_str())
        .collect();
    let purged: Vec<&Dataset> = all
        .iter()
        .filter(|d| d.latest_state() == Some("PURGED"))
        .collect();
    assert_eq!(staged.len(), 2, "{staged:?}");
    assert_eq!(purged.len(), 1);
    assert!(
        first_two.iter().any(|d| d.id == purged[0].id),
        "one of the copies staged first made room"
    );
    let last = all
        .iter()
        .find(|d| !first_two.iter().any(|f| f.id == d.id))
        .unwrap();
    assert!(last.is_staged, "the third is staged at last");
    let view = view_of(&app, &last.workflows[0]).await;
    let stage = view
        .metas
        .values()
        .find(|m| m.name.as_deref() == Some("stage_dataset"))
        .unwrap();
    assert_eq!(
        (stage.status, stage.retries),
        (TaskStatus::Success, 0),
        "waiting is not failing: no retry was counted"
    );
    assert!(
        stage.starts >= 2,
        "it ran again after waiting: {}",
        stage.starts
    );
    assert!(
        !step_errors(&app)
            .await
            .iter()
            .any(|(_, text)| text.contains("No space left")),
        "no step ever ran out of space"
    );
    // Two trees and two bundles on the tmpfs, and no reservation left behind.
    assert_eq!(file_count(&bundles), 2);
    // Given back as the steps end (a moment after: the release runs on its own task).
    let mount = tmpfs.dir.display().to_string();
    let started = Instant::now();
    while !app
        .space
        .space_reservations(&mount)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "reservations left behind"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `purge_staged_datasets` by fill: a staging file system above its high watermark loses its
/// longest staged copies until it is below the low one; a dry run only reports it.
#[tokio::test(flavor = "multi_thread")]
async fn a_staging_file_system_above_its_high_watermark_is_purged_down_to_the_low_one() {
    let mut project = Project::new();
    let Some(tmpfs) = Tmpfs::mount("8m", &project.path("var/staging-fs")) else {
        return;
    };
    for i in 1..=2u64 {
        project.dataset(
            DatasetType::RawData,
            &format!("cap_{i}"),
            &[("data.bin", &pseudo_random(1_500_000, 50 + i))],
        );
    }
    stage_on(&mut project, &tmpfs);
    project.set_env("WORKERS__CAPACITY__HEADROOM", "0");
    project.run_ok(&["jobs", "run", "watch", "--wait"]);
    // Two copies of about 3 MB each: some 75% of 8 MiB. One must go to be at most 45% full.
    project.set_env("WORKERS__STAGE__PURGE__HIGH_WATERMARK_PERCENT", "60");
    project.set_env("WORKERS__STAGE__PURGE__LOW_WATERMARK_PERCENT", "45");
    project.set_env("WORKERS__STAGE__PURGE__MIN_AGE_HOURS", "0");

    let out = project.run_ok(&["jobs", "run", "purge_staged_datasets", "--dry-run"]);
    assert!(
        stdout(&out).contains("above stage.purge.high_watermark_percent"),
        "{}",
        describe(&out)
    );
    let app = project.app().await;
    assert_eq!(
        datasets(&app).await[..2]
            .iter()
            .filter(|d| d.is_staged)
            .count(),
        2,
        "a dry run purges nothing"
    );

    let out = project.run_ok(&["jobs", "run", "purge_staged_datasets"]);
    let text = stdout(&out);
    assert!(text.contains("to make room"), "{text}");
    let history = project.run_ok(&[
        "jobs",
        "history",
        "purge_staged_datasets",
        "--format",
        "json",
    ]);
    let runs: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(runs[0]["counters"]["purged_by_fill"], 1, "{runs}");
    assert_eq!(runs[0]["counters"]["purged"], 0);
    let both: Vec<Dataset> = datasets(&app).await.into_iter().take(2).collect();
    let staged_at = |d: &Dataset| {
        d.states
            .iter()
            .rev()
            .find(|s| s.state == "STAGED")
            .map(|s| s.timestamp)
    };
    let (gone, kept): (Vec<&Dataset>, Vec<&Dataset>) = both.iter().partition(|d| !d.is_staged);
    assert_eq!((gone.len(), kept.len()), (1, 1));
    assert_eq!(gone[0].latest_state(), Some("PURGED"));
    assert!(
        staged_at(gone[0]) <= staged_at(kept[0]),
        "the longest staged went first"
    );
    let used = workers::steps::capacity::space_of(&tmpfs.dir)
        .unwrap()
        .used_percent();
    assert!(used <= 45.0, "{used}% used after the purge");
}

/// A copy larger than the whole staging file system can never fit: the step fails at once,
/// naming both sizes, instead of waiting for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_larger_than_the_file_system_fails_at_once_naming_both_sizes() {
    let mut project = Project::new();
    let Some(tmpfs) = Tmpfs::mount("2m", &project.path("var/staging-fs")) else {
        return;
    };
    project.dataset(
        DatasetType::RawData,
        "cap_1",
        &[("data.bin", &pseudo_random(1_500_000, 60))],
    );
    stage_on(&mut project, &tmpfs);
    project.set_env("WORKERS__CAPACITY__HEADROOM", "0");
    let out = project.run(&["jobs", "run", "watch", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let app = project.app().await;
    let errors = step_errors(&app).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    let (status, text) = &errors[0];
    assert_eq!(*status, TaskStatus::Failure);
    assert!(
        text.contains("InsufficientSpace") && text.contains("it can never fit there"),
        "{text}"
    );
    assert!(
        text.contains("2.00 MiB in all"),
        "the file system's size is named: {text}"
    );
}

//! Killing the process with SIGKILL in the middle of a step loses nothing: a new run finishes
//! every workflow, steps that had succeeded do not run again, and no dataset gets duplicate
//! states or file rows.

use std::collections::HashMap;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::*;
use workers::app::App;
use workers::model::DatasetType;
use workers::store::{TaskStatus, WorkflowFilter};
use workers::workflow::engine;

/// Polls the store until the step named `step` of some workflow has started, then kills
/// `child` with SIGKILL.
async fn kill_during(app: &App, child: &mut Child, step: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "step `{step}` never started");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("workers exited ({status}) before step `{step}` was caught running");
        }
        for workflow in app
            .store
            .workflows(WorkflowFilter::Active, 10)
            .await
            .unwrap()
        {
            let view = engine::view(app, workflow).await.unwrap();
            if let Some(idx) = view.derived.pending
                && view.workflow.steps[idx].spec.name == step
                && view.derived.steps[idx] == TaskStatus::Started
            {
                child.kill().unwrap();
                child.wait().unwrap();
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// When each step's task finished: a step that ran again would have a new time.
async fn finish_times(
    app: &App,
    workflow_id: &str,
) -> HashMap<String, Option<chrono::DateTime<chrono::Utc>>> {
    let workflow = app.store.workflow(workflow_id).await.unwrap().unwrap();
    let view = engine::view(app, workflow).await.unwrap();
    view.workflow
        .steps
        .iter()
        .filter_map(|s| {
            s.last_run().map(|r| {
                (
                    s.spec.name.clone(),
                    view.metas.get(&r.task_id).and_then(|m| m.date_done),
                )
            })
        })
        .collect()
}

async fn survives_a_kill_during(step: &str, files: Vec<(String, Vec<u8>)>) {
    let project = Project::new();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_slice()))
        .collect();
    let origin = project.dataset(DatasetType::RawData, "big", &refs);
    let app = project.app().await;

    let mut child = project
        .command(&["jobs", "run", "watch", "--wait"])
        .spawn()
        .unwrap();
    let _reap = Reap(child.id());
    kill_during(&app, &mut child, step).await;
    let d = dataset_named(&app, DatasetType::RawData, "big").await;
    assert_eq!(d.workflows.len(), 1);
    let before = finish_times(&app, &d.workflows[0]).await;

    // Start again: the same command finishes the work.
    let out = project.run_ok(&["jobs", "run", "watch", "--wait"]);
    assert!(stdout(&out).contains("SUCCESS"), "{}", describe(&out));

    let d = dataset_named(&app, DatasetType::RawData, "big").await;
    assert_eq!(d.workflows.len(), 1, "no second workflow");
    assert_eq!(
        state_names(&d),
        ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED"],
        "each state once"
    );
    let rows = file_rows(&app, d.id).await;
    assert_eq!(rows.len() as u64, d.num_files.unwrap());
    assert_eq!(rows.len(), tree_files(&origin).len());
    assert_eq!(
        d.bundle.as_ref().unwrap().md5.to_string(),
        md5sum(std::path::Path::new(d.archive_path.as_ref().unwrap()))
    );

    let workflow = app.store.workflow(&d.workflows[0]).await.unwrap().unwrap();
    let view = engine::view(&app, workflow).await.unwrap();
    assert_eq!(view.derived.status, TaskStatus::Success);
    // The interrupted step kept its task id: one run per step, retries included.
    assert!(
        view.workflow.steps.iter().all(|s| s.runs.len() == 1),
        "{:?}",
        view.workflow.steps
    );
    // The interrupted step counts both of its starts as attempts; the others one each.
    let shown: serde_json::Value = serde_json::from_slice(
        &project
            .run_ok(&["workflows", "show", &d.workflows[0], "--format", "json"])
            .stdout,
    )
    .unwrap();
    for shown_step in shown["steps"].as_array().unwrap() {
        let expected = if shown_step["name"] == step { 2 } else { 1 };
        assert_eq!(shown_step["attempts"], expected, "{shown_step}");
    }
    // Steps that had succeeded before the kill did not run again.
    let after = finish_times(&app, &d.workflows[0]).await;
    for (name, done) in &before {
        if done.is_some() {
            assert_eq!(after.get(name), Some(done), "step `{name}` ran again");
        }
    }
    assert!(
        before.get(step).is_some_and(|d| d.is_none()),
        "`{step}` was running when killed: {before:?}"
    );
    // No leftovers: no spool, no partial bundle.
    assert_eq!(
        std::fs::read_dir(project.path("var/scratch"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    let generate = &app.settings.paths.raw_data.bundle_generate;
    assert_eq!(
        std::fs::read_dir(generate).unwrap().count(),
        0,
        "{}",
        generate.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_during_inspect_loses_nothing() {
    // Many files, so that inspect runs long enough to be caught.
    let files = (0..20_000)
        .map(|i| (format!("d{}/f{i}.dat", i % 50), pseudo_random(4096, i)))
        .collect();
    survives_a_kill_during("inspect", files).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_during_archive_loses_nothing() {
    let mut files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("part{i}.bin"), pseudo_random(48 << 20, i)))
        .collect();
    files.push(("small.txt".into(), b"small".to_vec()));
    survives_a_kill_during("archive", files).await;
}

//! Remote control in the embedded profile: `workers control` reaches the local workers through
//! the database. Ping, inspect, revoke with terminate, a revoke remembered across a restart,
//! shutdown, and pause / resume of a workflow.

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use workers::broker::{TaskMessage, TimeLimits};
use workers::store::TaskStatus;

use crate::common::*;

fn spawn_worker(project: &Project, node: &str) -> (Child, Reap) {
    let child = project
        .command(&["worker", "--hostname", node, "--concurrency", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let reap = Reap(child.id());
    (child, reap)
}

fn control(project: &Project, args: &[&str]) -> Output {
    let mut full = vec!["control"];
    full.extend_from_slice(args);
    project.command(&full).output().unwrap()
}

/// A control command's `--format json` output.
fn control_json(project: &Project, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.extend_from_slice(&["--format", "json"]);
    let out = control(project, &full);
    assert!(out.status.success(), "control {args:?}: {}", describe(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("control {args:?} printed no JSON ({e}): {}", describe(&out)))
}

/// Polls `probe` until it gives a value, failing the test after `limit`.
async fn eventually<T>(
    limit: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status_of(app: &workers::app::App, task_id: &str) -> Option<(TaskStatus, Value)> {
    let metas = app.store.task_metas(&[task_id.to_owned()]).await.unwrap();
    metas.get(task_id).map(|m| (m.status, m.result.clone()))
}

/// The ids of the steps `node` runs now, as `control inspect active` shows them (none while
/// the worker is not answering yet).
fn active_on(project: &Project, node: &str) -> Vec<(String, Value)> {
    // Addressed to `node`, so that the command returns as soon as it answers.
    let args = [
        "inspect",
        "active",
        "-d",
        node,
        "--timeout",
        "2",
        "--format",
        "json",
    ];
    let out = control(project, &args);
    let replies: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    replies[node]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| (t["id"].as_str().unwrap().to_owned(), t["args"].clone()))
        .collect()
}

fn plain_noop(app: &workers::app::App, task_id: &str) -> TaskMessage {
    TaskMessage {
        id: task_id.to_owned(),
        task: "noop".into(),
        args: vec![json!(7)],
        kwargs: serde_json::Map::new(),
        priority: 1,
        eta: None,
        retries: 0,
        root_id: task_id.to_owned(),
        parent_id: None,
        queue: app.settings.amqp.queues[0].clone(),
        time_limits: TimeLimits::default(),
    }
}

const TERMINATED: &str = r#"{"exc_type": "TaskRevokedError", "exc_message": ["terminated"], "exc_module": "celery.exceptions"}"#;

#[tokio::test(flavor = "multi_thread")]
async fn local_workers_answer_control_commands_and_a_revoke_stops_a_running_step() {
    let project = Project::new();
    let app = project.app().await;
    let (worker, _reap) = spawn_worker(&project, "w1@test");
    let pong = eventually(
        Duration::from_secs(30),
        "the worker to answer ping",
        async || {
            let out = control(&project, &["ping", "--format", "json", "--timeout", "0.5"]);
            out.status
                .success()
                .then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
        },
    )
    .await;
    assert_eq!(pong, json!({"w1@test": {"ok": "pong"}}));
    let registered = control_json(&project, &["inspect", "registered"]);
    let tasks: Vec<&str> = registered["w1@test"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(
        tasks.contains(&"inspect_dataset") && tasks.contains(&"noop"),
        "{tasks:?}"
    );
    let queues = control_json(&project, &["inspect", "active-queues"]);
    assert_eq!(
        queues["w1@test"][0]["name"],
        json!(app.settings.amqp.queues[0])
    );

    // A step holding for 600 s, revoked with terminate.
    let workflow_id = start_noop_workflow(&app, 600.0).await;
    let (task_id, args) = eventually(Duration::from_secs(20), "the step to run", async || {
        active_on(&project, "w1@test").into_iter().next()
    })
    .await;
    assert_eq!(args, json!([7, 600.0]));
    let revoked_at = Instant::now();
    let replies = control_json(&project, &["revoke", &task_id, "--terminate"]);
    assert_eq!(
        replies["w1@test"],
        json!({"ok": format!("terminate: {task_id}")})
    );
    let (status, result) = eventually(Duration::from_secs(10), "REVOKED", async || {
        status_of(&app, &task_id)
            .await
            .filter(|(s, _)| *s == TaskStatus::Revoked)
    })
    .await;
    let took = revoked_at.elapsed();
    assert_eq!(status, TaskStatus::Revoked);
    assert_eq!(result, serde_json::from_str::<Value>(TERMINATED).unwrap());
    assert!(took < Duration::from_secs(5), "the revoke took {took:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let view = view_of(&app, &workflow_id).await;
    assert!(
        view.workflow.steps[1].runs.is_empty(),
        "a revoked step was followed"
    );
    assert!(active_on(&project, "w1@test").is_empty());
    let revoked = control_json(&project, &["inspect", "revoked"]);
    assert_eq!(revoked["w1@test"], json!([task_id]));
    let stats = control_json(&project, &["inspect", "stats"]);
    assert_eq!(stats["w1@test"]["total"]["noop"], json!(1));

    // Revoked before its message exists, then the worker restarts: the message is not run.
    let later = uuid::Uuid::new_v4().to_string();
    let out = control(&project, &["revoke", &later]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stderr(&out).contains(&format!("no task {later} is recorded")),
        "{}",
        describe(&out)
    );
    let out = control(&project, &["shutdown", "--hostname", "w1@test"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = wait_for_exit(worker, Duration::from_secs(15));
    assert!(
        out.status.success(),
        "the worker did not shut down cleanly: {}",
        describe(&out)
    );
    let (_worker, _reap2) = spawn_worker(&project, "w2@test");
    app.broker.publish(&plain_noop(&app, &later)).await.unwrap();
    let (_, result) = eventually(
        Duration::from_secs(20),
        "the revoked message to be discarded",
        async || {
            status_of(&app, &later)
                .await
                .filter(|(s, _)| *s == TaskStatus::Revoked)
        },
    )
    .await;
    assert_eq!(result["exc_message"], json!(["revoked"]));
    let stats = control_json(&project, &["inspect", "stats", "-d", "w2@test"]);
    assert!(
        stats["w2@test"]["total"].as_object().unwrap().is_empty(),
        "a revoked message was run: {stats}"
    );

    // Nobody by that name: a clear failure.
    let out = control(
        &project,
        &["ping", "-d", "nobody@nowhere", "--timeout", "0.5"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).contains("none of nobody@nowhere answered"),
        "{}",
        describe(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_workflow_stops_its_step_and_resumes_to_success() {
    let project = Project::new();
    let app = project.app().await;
    let (_worker, _reap) = spawn_worker(&project, "w1@test");
    let workflow_id = start_noop_workflow(&app, 6.0).await;
    let (task_id, _) = eventually(Duration::from_secs(20), "the step to run", async || {
        active_on(&project, "w1@test").into_iter().next()
    })
    .await;
    let out = control(&project, &["pause", &workflow_id]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stdout(&out).contains(&format!("task {task_id}")),
        "{}",
        describe(&out)
    );
    let (_, result) = eventually(
        Duration::from_secs(10),
        "the paused step to read REVOKED",
        async || {
            status_of(&app, &task_id)
                .await
                .filter(|(s, _)| *s == TaskStatus::Revoked)
        },
    )
    .await;
    assert_eq!(result["exc_message"], json!(["terminated"]));
    let view = view_of(&app, &workflow_id).await;
    assert_eq!(view.derived.status, TaskStatus::Revoked);
    assert_eq!(view.workflow.status_cache, TaskStatus::Revoked);
    assert!(view.workflow.steps[1].runs.is_empty());

    let out = control(&project, &["resume", &workflow_id]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stdout(&out).contains("at step `first`"),
        "{}",
        describe(&out)
    );
    eventually(
        Duration::from_secs(30),
        "the resumed workflow to succeed",
        async || {
            (view_of(&app, &workflow_id).await.derived.status == TaskStatus::Success).then_some(())
        },
    )
    .await;
    let view = view_of(&app, &workflow_id).await;
    assert_eq!(
        view.workflow.steps[0].runs.len(),
        2,
        "the paused step ran again"
    );
    assert_eq!(view.workflow.steps[1].runs.len(), 1);
    // Nothing runs, so there is nothing to pause.
    let out = control(&project, &["pause", &workflow_id]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_immediate_shutdown_stops_consuming_terminates_what_runs_and_exits() {
    let project = Project::new();
    let app = project.app().await;
    let (worker, _reap) = spawn_worker(&project, "w1@test");
    start_noop_workflow(&app, 600.0).await;
    let (task_id, _) = eventually(Duration::from_secs(20), "the step to run", async || {
        active_on(&project, "w1@test").into_iter().next()
    })
    .await;
    let started = Instant::now();
    let out = control(
        &project,
        &["shutdown", "--hostname", "w1@test", "--immediate"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let printed = stdout(&out);
    let queue = &app.settings.amqp.queues[0];
    assert!(
        printed.contains(&format!("no longer consuming from {queue}")),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("terminate: {task_id}")),
        "{printed}"
    );
    let out = wait_for_exit(worker, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "the worker did not exit cleanly: {}",
        describe(&out)
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "a 600 s step held up the shutdown"
    );
    let (status, result) = status_of(&app, &task_id).await.unwrap();
    assert_eq!(status, TaskStatus::Revoked);
    assert_eq!(result, serde_json::from_str::<Value>(TERMINATED).unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_consumer_takes_no_step_until_it_is_added_again() {
    let project = Project::new();
    let app = project.app().await;
    let (_worker, _reap) = spawn_worker(&project, "w1@test");
    let queue = app.settings.amqp.queues[0].clone();
    eventually(
        Duration::from_secs(30),
        "the worker to answer",
        async || {
            let out = control(
                &project,
                &[
                    "cancel-consumer",
                    &queue,
                    "-d",
                    "w1@test",
                    "--format",
                    "json",
                ],
            );
            out.status.success().then_some(())
        },
    )
    .await;
    let queues = control_json(&project, &["inspect", "active-queues", "-d", "w1@test"]);
    assert_eq!(queues["w1@test"], json!([]));
    let task_id = uuid::Uuid::new_v4().to_string();
    app.broker
        .publish(&plain_noop(&app, &task_id))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        status_of(&app, &task_id).await,
        None,
        "a step was taken from a cancelled queue"
    );
    let replies = control_json(&project, &["add-consumer", &queue, "-d", "w1@test"]);
    assert_eq!(
        replies["w1@test"],
        json!({"ok": format!("add consumer {queue}")})
    );
    eventually(
        Duration::from_secs(20),
        "the step to run once the queue is back",
        async || {
            status_of(&app, &task_id)
                .await
                .filter(|(s, _)| *s == TaskStatus::Success)
        },
    )
    .await;
}

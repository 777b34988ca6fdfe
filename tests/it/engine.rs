//! The workflow engine through the library: retries, failures, resume, redelivery, unknown
//! tasks, stalled workflows and progress.

use std::time::Duration;

use crate::common::*;
use serde_json::json;
use workers::broker::TaskMessage;
use workers::model::DatasetType;
use workers::store::{TaskError, TaskStart, TaskStatus};
use workers::ui::Display;
use workers::workflow::engine::{self, Resumed, WorkflowView};

fn step<'a>(view: &'a WorkflowView, name: &str) -> (usize, &'a workers::store::WorkflowStep) {
    view.workflow
        .steps
        .iter()
        .enumerate()
        .find(|(_, s)| s.spec.name == name)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn retryable_failures_are_retried_then_fail_and_resume_finishes_the_workflow() {
    let mut project = Project::new();
    project.set_env(
        "WORKERS__RETRY__STEPS__ARCHIVE_DATASET",
        "{ max_retries = 2, delay_seconds = 0 }",
    );
    let app = project.app().await;
    let id = register_small(&app, &project, "retry_me").await;
    // A file where the bundle directory should be: creating it fails (an I/O error, retryable).
    let blocker = app
        .settings
        .paths
        .raw_data
        .bundle_generate
        .parent()
        .unwrap()
        .to_path_buf();
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"not a directory").unwrap();

    let workflow_id = engine::start(&app, "integrated", id, Default::default())
        .await
        .unwrap();
    run_until_idle(&app, 2, Duration::from_secs(120)).await;
    let view = view_of(&app, &workflow_id).await;
    assert_eq!(view.derived.status, TaskStatus::Failure);
    let (idx, archive) = step(&view, "archive");
    assert_eq!(view.derived.pending, Some(idx));
    let meta = &view.metas[&archive.runs[0].task_id];
    // Three attempts (max_retries = 2) under one task id: one run.
    assert_eq!(archive.runs.len(), 1);
    assert_eq!(meta.retries, 2);
    assert_eq!(meta.result["exc_type"], "RetryableException");
    let message = meta.result["exc_message"][0].as_str().unwrap();
    assert!(message.contains(blocker.to_str().unwrap()), "{message}");

    // The operator removes the cause; resume restarts the failed step and the rest follows.
    std::fs::remove_file(&blocker).unwrap();
    assert!(
        matches!(engine::resume(&app, &workflow_id).await.unwrap(), Resumed::Restarted { step, .. } if step == "archive")
    );
    assert_eq!(
        engine::resume(&app, &workflow_id).await.unwrap(),
        Resumed::AlreadyResuming
    );
    run_until_idle(&app, 2, Duration::from_secs(120)).await;
    let view = view_of(&app, &workflow_id).await;
    assert_eq!(view.derived.status, TaskStatus::Success);
    assert_eq!(
        step(&view, "archive").1.runs.len(),
        2,
        "the failed run and the resumed one"
    );
    assert_eq!(
        step(&view, "inspect").1.runs.len(),
        1,
        "steps before it did not run again"
    );
    assert!(matches!(
        engine::resume(&app, &workflow_id).await.unwrap(),
        Resumed::NotFailed(TaskStatus::Success)
    ));
    let d = app.registry.get(id).await.unwrap();
    assert_eq!(
        state_names(&d),
        ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_failure_stops_the_workflow_at_once() {
    let project = Project::new();
    let app = project.app().await;
    let id = register_small(&app, &project, "vanished").await;
    std::fs::remove_dir_all(project.source(DatasetType::RawData).join("vanished")).unwrap();
    let workflow_id = engine::start(&app, "integrated", id, Default::default())
        .await
        .unwrap();
    run_until_idle(&app, 2, Duration::from_secs(120)).await;
    let view = view_of(&app, &workflow_id).await;
    assert_eq!(view.derived.status, TaskStatus::Failure);
    assert_eq!(view.derived.pending, Some(0));
    let meta = &view.metas[&view.workflow.steps[0].runs[0].task_id];
    assert_eq!(meta.retries, 0, "not retried");
    assert!(
        meta.result["exc_message"][0]
            .as_str()
            .unwrap()
            .contains("vanished"),
        "{}",
        meta.result
    );
    // The original marked such a dataset READY (spec B.1); here it stays REGISTERED.
    assert_eq!(
        state_names(&app.registry.get(id).await.unwrap()),
        ["REGISTERED"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_message_of_a_finished_step_does_not_run_it_again() {
    let project = Project::new();
    let app = project.app().await;
    let id = register_small(&app, &project, "twice").await;
    let workflow_id = engine::start(&app, "integrated", id, Default::default())
        .await
        .unwrap();
    run_until_idle(&app, 2, Duration::from_secs(120)).await;
    let before = view_of(&app, &workflow_id).await;
    assert_eq!(before.derived.status, TaskStatus::Success);

    // The first step's message arrives again (a broker redelivery after a crash).
    let first = &before.workflow.steps[0].runs[0].task_id;
    let meta = &before.metas[first];
    let message = TaskMessage {
        id: first.clone(),
        task: "await_stability".into(),
        args: vec![json!(id)],
        kwargs: meta.kwargs.clone(),
        priority: 1,
        eta: None,
        retries: 0,
        root_id: first.clone(),
        parent_id: None,
        queue: "q".into(),
        time_limits: Default::default(),
    };
    app.broker.publish(&message).await.unwrap();
    // Handle whatever that sets off until the queue is quiet.
    while let Ok(Ok(delivery)) =
        tokio::time::timeout(Duration::from_secs(2), app.broker.next()).await
    {
        engine::handle(&app, delivery, &Display::quiet())
            .await
            .unwrap();
    }
    let after = view_of(&app, &workflow_id).await;
    for (a, b) in before.workflow.steps.iter().zip(&after.workflow.steps) {
        assert_eq!(a.runs, b.runs, "step `{}` got a new run", a.spec.name);
        let (ma, mb) = (
            &before.metas[&a.runs[0].task_id],
            &after.metas[&b.runs[0].task_id],
        );
        assert_eq!(
            ma.date_done, mb.date_done,
            "step `{}` ran again",
            a.spec.name
        );
    }
    assert_eq!(state_names(&app.registry.get(id).await.unwrap()).len(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_of_an_unknown_task_goes_back_to_the_queue_without_spinning() {
    let project = Project::new();
    let app = project.app().await;
    let id = register_small(&app, &project, "unknown_task").await;
    let workflow_id = engine::start(&app, "integrated", id, Default::default())
        .await
        .unwrap();
    // Replace the queued first step by one this worker does not implement (a site's own task,
    // run by its Python workers).
    let mut delivery = app.broker.next().await.unwrap();
    let mut message = delivery.message().clone();
    delivery.ack().await.unwrap();
    message.task = "site_specific_task".into();
    app.broker.publish(&message).await.unwrap();
    for _ in 0..2 {
        delivery = app.broker.next().await.unwrap();
        let taken = std::time::Instant::now();
        assert_eq!(delivery.message().id, message.id);
        engine::handle(&app, delivery, &Display::quiet())
            .await
            .unwrap();
        assert!(
            taken.elapsed() < Duration::from_secs(1),
            "the embedded queue defers it instead of holding a slot"
        );
        assert_eq!(
            app.broker.holds(&message.id).await.unwrap(),
            Some(true),
            "given back, not acknowledged"
        );
    }
    // Not before a back-off: a worker alone on the queue does not spin on it.
    let next = tokio::time::timeout(Duration::from_millis(300), app.broker.next()).await;
    assert!(next.is_err(), "delivered again at once");
    // Nothing was recorded against the workflow.
    let view = view_of(&app, &workflow_id).await;
    assert!(
        !view.metas.contains_key(&message.id),
        "{:?}",
        view.metas.get(&message.id)
    );
    assert_ne!(view.derived.status, TaskStatus::Failure);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_cannot_run_is_kept_as_a_dead_letter() {
    let project = Project::new();
    let app = project.app().await;
    let id = register_small(&app, &project, "dead_letters").await;
    engine::start(&app, "integrated", id, Default::default())
        .await
        .unwrap();
    let first = app.broker.next().await.unwrap();
    let queued = first.message().clone();
    first.release().await.unwrap();
    // One with a workflow_id but no step (without both, it would be a plain task and run),
    // one of a real step without a dataset id; both ahead of the workflow's own message.
    let mut no_step = queued.clone();
    no_step.id = "no-step".into();
    no_step.kwargs.remove("step");
    no_step.priority = 9;
    let mut no_dataset = queued.clone();
    no_dataset.id = "no-dataset".into();
    no_dataset.args = vec![json!("not an id")];
    no_dataset.priority = 9;
    for message in [&no_step, &no_dataset] {
        app.broker.publish(message).await.unwrap();
    }
    for _ in 0..2 {
        let delivery = app.broker.next().await.unwrap();
        assert_ne!(delivery.message().id, queued.id);
        engine::handle(&app, delivery, &Display::quiet())
            .await
            .unwrap();
    }

    let letters = app.broker.dead_letters().await.unwrap().unwrap();
    let kept: Vec<_> = letters.iter().map(|l| l.task_id.as_str()).collect();
    assert_eq!(kept, ["no-step", "no-dataset"]);
    assert!(
        letters[0].reason.contains("workflow_id and step"),
        "{}",
        letters[0].reason
    );
    assert!(
        letters[1].reason.contains("dataset id"),
        "{}",
        letters[1].reason
    );
    assert_eq!(letters[1].args, r#"["not an id"]"#, "the row as it was");
    for id in ["no-step", "no-dataset"] {
        assert_eq!(app.broker.holds(id).await.unwrap(), Some(false), "{id}");
    }
    assert_eq!(
        app.broker.holds(&queued.id).await.unwrap(),
        Some(true),
        "the workflow's own step is untouched"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_recorded_as_retried_but_never_requeued_runs_again_after_its_delay() {
    let mut project = Project::new();
    project.set_env("WORKERS__RETRY__DEFAULT__DELAY_SECONDS", "3");
    let app = project.app().await;
    let id = register_small(&app, &project, "retried_then_crashed").await;
    let workflow_id = engine::start(&app, "integrated", id, Default::default())
        .await
        .unwrap();
    // A worker ran the first attempt, stored RETRY, and died before the message was put
    // back with its eta: the message comes again as it was.
    let delivery = app.broker.next().await.unwrap();
    let message = delivery.message().clone();
    let start = TaskStart {
        workflow_id: Some(workflow_id.clone()),
        position: 0,
        task_id: message.id.clone(),
        task_name: message.task.clone(),
        args: message.args.clone(),
        kwargs: message.kwargs.clone(),
        hostname: "workers@gone".into(),
        pid: 1,
        retries: 0,
        queue: message.queue.clone(),
        parent_id: None,
        resume_locked: true,
        start_counted: false,
    };
    app.store.task_started(&start).await.unwrap();
    let error = TaskError {
        exc_type: "RetryableException".into(),
        exc_message: "the disk was away".into(),
        exc_module: "workers.exceptions".into(),
    };
    app.store.task_retry(&message.id, &error, 0).await.unwrap();
    delivery.release().await.unwrap();

    let again = app.broker.next().await.unwrap();
    assert_eq!(again.message().retries, 0);
    let deferred_at = std::time::Instant::now();
    engine::handle(&app, again, &Display::quiet())
        .await
        .unwrap();
    let view = view_of(&app, &workflow_id).await;
    assert_eq!(view.derived.steps[0], TaskStatus::Retry, "not run at once");
    assert!(
        tokio::time::timeout(Duration::from_millis(2500), app.broker.next())
            .await
            .is_err(),
        "handed out before the retry delay"
    );
    let next = app.broker.next().await.unwrap();
    assert!(deferred_at.elapsed() >= Duration::from_millis(2900));
    assert_eq!(next.message().id, message.id);
    assert_eq!(next.message().retries, 1, "as the next attempt");
    next.release().await.unwrap();
    run_until_idle(&app, 2, Duration::from_secs(120)).await;
    let view = view_of(&app, &workflow_id).await;
    assert_eq!(view.derived.status, TaskStatus::Success);
    assert_eq!(view.metas[&message.id].retries, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_whose_first_step_was_never_published_is_repaired() {
    let project = Project::new();
    let app = project.app().await;
    let id = register_small(&app, &project, "stalled").await;
    // What a crash between creating the workflow and publishing its first step leaves.
    let spec = app.definitions.get("integrated").unwrap().clone();
    app.store
        .create_workflow("stalled-wf", &app.settings.app_id, &spec, &[json!(id)])
        .await
        .unwrap();
    app.registry.add_workflow(id, "stalled-wf").await.unwrap();
    assert_eq!(engine::repair_stalled(&app).await.unwrap(), ["stalled-wf"]);
    // Repairing again publishes nothing new: the message is queued.
    assert!(engine::repair_stalled(&app).await.unwrap().is_empty());
    run_until_idle(&app, 2, Duration::from_secs(120)).await;
    assert_eq!(
        view_of(&app, "stalled-wf").await.derived.status,
        TaskStatus::Success
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_is_recorded_while_a_long_step_runs() {
    let mut project = Project::new();
    project.set_env("WORKERS__PROGRESS__INTERVAL_SECONDS", "0.05");
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("p{i}.bin"), pseudo_random(64 << 20, i)))
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_slice()))
        .collect();
    project.dataset(DatasetType::RawData, "progress", &refs);
    let app = project.app().await;
    let mut child = project
        .command(&["jobs", "run", "watch", "--wait"])
        .spawn()
        .unwrap();
    let _reap = Reap(child.id());
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        for workflow in app
            .store
            .workflows(workers::store::WorkflowFilter::All, 5)
            .await
            .unwrap()
        {
            let view = engine::view(&app, workflow).await.unwrap();
            for meta in view.metas.values() {
                if meta.status == TaskStatus::Started && meta.result.get("units").is_some() {
                    seen.push(meta.result.clone());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(child.wait().unwrap().success());
    let partial: Vec<_> = seen
        .iter()
        .filter(|r| {
            r["fraction_done"]
                .as_f64()
                .is_some_and(|f| f > 0.0 && f < 1.0)
        })
        .collect();
    assert!(
        !partial.is_empty(),
        "no report between 0 and 100%: {seen:?}"
    );
    for report in partial {
        for field in [
            "name",
            "fraction_done",
            "done",
            "total",
            "units",
            "time_remaining_sec",
            "wt_avg_rate",
            "avg_rate",
        ] {
            assert!(report.get(field).is_some(), "{field} missing from {report}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_takes_steps_only_from_its_queues() {
    let project = Project::new();
    let app = project.app().await;
    let message = |id: &str, queue: &str| TaskMessage {
        id: id.into(),
        task: "noop".into(),
        args: vec![json!(1)],
        kwargs: Default::default(),
        priority: 9,
        eta: None,
        retries: 0,
        root_id: id.into(),
        parent_id: None,
        queue: queue.into(),
        time_limits: Default::default(),
    };
    app.broker
        .publish(&message("other", "other.q"))
        .await
        .unwrap();
    app.broker
        .publish(&message("mine", "mine.q"))
        .await
        .unwrap();
    app.broker
        .start_consuming(&workers::broker::Consume {
            queues: Some(vec!["mine.q".into()]),
            prefetch: 1,
        })
        .await
        .unwrap();
    let delivery = app.broker.next().await.unwrap();
    assert_eq!(delivery.message().id, "mine");
    delivery.ack().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), app.broker.next())
            .await
            .is_err(),
        "a message of another queue was handed out"
    );
    assert_eq!(app.broker.holds("other").await.unwrap(), Some(true));
}

/// A workflow of two `noop` steps, its first step queued; the first step holds `hold_seconds`.
#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_paused_while_its_step_runs_gets_no_next_step() {
    let project = Project::new();
    let app = project.app().await;
    let workflow_id = start_noop_workflow(&app, 1.5).await;
    let delivery = app.broker.next().await.unwrap();
    let first = delivery.message().clone();
    assert_eq!(first.args, [json!(7), json!(1.5)]);
    let started = std::time::Instant::now();
    let running = {
        let app = app.clone();
        tokio::spawn(async move { engine::handle(&app, delivery, &Display::quiet()).await })
    };
    // Paused from the UI (rhythm_api sets REVOKED) while the first step holds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.store
        .set_workflow_status(&workflow_id, TaskStatus::Revoked)
        .await
        .unwrap();
    running.await.unwrap().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "noop held its step for the seconds it was given"
    );
    let view = view_of(&app, &workflow_id).await;
    assert_eq!(view.metas[&first.id].status, TaskStatus::Success);
    assert_eq!(view.workflow.status_cache, TaskStatus::Revoked);
    assert!(view.workflow.steps[1].runs.is_empty());
    let next = engine::next_task_id(&first.id);
    assert_eq!(
        app.broker.holds(&next).await.unwrap(),
        Some(false),
        "the next step of a paused workflow was sent"
    );
    // Resuming continues with the step that was held back.
    let Resumed::Restarted { step, .. } = engine::resume(&app, &workflow_id).await.unwrap() else {
        panic!("a paused workflow was not resumed");
    };
    assert_eq!(step, "second");
    let delivery = app.broker.next().await.unwrap();
    assert_eq!(delivery.message().args, [json!(7)]);
    engine::handle(&app, delivery, &Display::quiet())
        .await
        .unwrap();
    assert_eq!(
        view_of(&app, &workflow_id).await.derived.status,
        TaskStatus::Success
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_noop_stops_at_once_when_its_step_is_stopped() {
    let project = Project::new();
    let app = project.app().await;
    let workflow_id = start_noop_workflow(&app, 600.0).await;
    let (interrupt_tx, interrupt) = tokio::sync::watch::channel(false);
    let runner = engine::Runner {
        node_name: "workers@test".into(),
        interrupt: Some(interrupt),
        control: None,
    };
    let delivery = app.broker.next().await.unwrap();
    let running = {
        let app = app.clone();
        tokio::spawn(async move {
            engine::handle_with(&app, delivery, &Display::quiet(), &runner).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = std::time::Instant::now();
    interrupt_tx.send(true).unwrap();
    running.await.unwrap().unwrap();
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "the hold did not end with its step: {:?}",
        stopped.elapsed()
    );
    // Nothing recorded as done; the message is back in the queue, to run again.
    let view = view_of(&app, &workflow_id).await;
    assert!(
        view.metas.values().all(|m| m.status != TaskStatus::Success),
        "{:?}",
        view.metas
    );
    let message = app.broker.next().await.unwrap();
    assert_eq!(message.message().args, [json!(7), json!(600.0)]);
}

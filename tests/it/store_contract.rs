//! The workflow and scheduler store contract (sca-rhythm's and Celery's semantics, spec F.2-F.4,
//! and the scheduler's records), as one story that every store backend must pass: the
//! embedded SQLite store and the MongoDB store.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::common::postgres::TestPostgres;
use crate::common::services::TestDatabase;
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Map, Value, json};
use workers::sqlite::Db;
use workers::store::mongo::MongoStore;
use workers::store::sql::SqlStore;
use workers::store::{
    FixityRecord, FixityResult, FixityStanding, PageCursor, RunOutcome, SchedulerStore,
    SpaceLedger, StepSpec, TaskClaim, TaskError, TaskStart, TaskStatus, Trigger, WatchState,
    Workflow, WorkflowFilter, WorkflowSpec, WorkflowStore,
};
use workers::workflow::status::derive;

const APP: &str = "bioloop-test.example.org";

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn spec(name: &str) -> WorkflowSpec {
    WorkflowSpec {
        name: name.into(),
        description: Some("ingest a dataset".into()),
        steps: vec![
            StepSpec {
                name: "await stability".into(),
                task: "await_stability".into(),
                queue: Some("special.q".into()),
                kwargs: Some(object(
                    json!({"recency_threshold": 5, "deep": {"a": [1, null]}}),
                )),
                priority: Some(3),
            },
            StepSpec {
                name: "inspect".into(),
                task: "inspect_dataset".into(),
                queue: None,
                kwargs: None,
                priority: None,
            },
            StepSpec {
                name: "archive".into(),
                task: "archive_dataset".into(),
                queue: Some(format!("{APP}.q")),
                kwargs: None,
                priority: None,
            },
        ],
    }
}

fn start(workflow_id: &str, position: usize, task_id: &str, retries: u32) -> TaskStart {
    let step = ["await stability", "inspect", "archive"][position];
    TaskStart {
        workflow_id: Some(workflow_id.into()),
        position,
        task_id: task_id.into(),
        task_name: spec("x").steps[position].task.clone(),
        args: vec![json!(7)],
        kwargs: object(json!({"workflow_id": workflow_id, "step": step, "app_id": APP})),
        hostname: "worker-a@host".into(),
        pid: 4321,
        retries,
        queue: format!("{APP}.q"),
        parent_id: None,
        resume_locked: true,
        start_counted: false,
    }
}

fn error(message: &str) -> TaskError {
    TaskError {
        exc_type: "RetryableException".into(),
        exc_message: message.into(),
        exc_module: "workers.exceptions".into(),
    }
}

/// Times as both stores keep them: milliseconds.
fn ms(time: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(time.timestamp_millis()).unwrap()
}

async fn ids(store: &dyn WorkflowStore, filter: WorkflowFilter, limit: usize) -> Vec<String> {
    store
        .workflows(filter, limit)
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect()
}

async fn derived(store: &dyn WorkflowStore, id: &str) -> (TaskStatus, usize, Vec<TaskStatus>) {
    let workflow = store.workflow(id).await.unwrap().unwrap();
    let task_ids: Vec<String> = workflow.all_task_ids().into_iter().collect();
    let metas = store.task_metas(&task_ids).await.unwrap();
    let derived = derive(&workflow, &metas);
    (derived.status, derived.steps_done, derived.steps)
}

async fn workflow_story(store: &dyn WorkflowStore) {
    use TaskStatus::*;
    // Created PENDING, with no runs, no update yet and no resume lock.
    let before = ms(Utc::now());
    store
        .create_workflow("wf-1", APP, &spec("integrated"), &[json!(7)])
        .await
        .unwrap();
    let wf = store.workflow("wf-1").await.unwrap().unwrap();
    assert_eq!((wf.name.as_str(), wf.app_id.as_str()), ("integrated", APP));
    // What `engine::start_many` publishes from without reading it back is what was stored
    // (a step without a queue goes to `{app_id}.q`, written down or not).
    let queued = |w: &Workflow| -> Vec<StepSpec> {
        w.steps
            .iter()
            .map(|s| StepSpec {
                queue: Some(s.spec.queue.clone().unwrap_or(format!("{APP}.q"))),
                ..s.spec.clone()
            })
            .collect()
    };
    let pending = Workflow::pending("wf-1", APP, &spec("integrated"), vec![json!(7)]);
    assert_eq!(queued(&pending), queued(&wf));
    assert_eq!(pending.start_args, wf.start_args);
    // Many at once, each like one created alone.
    store
        .create_workflows(
            APP,
            &spec("integrated"),
            &[
                ("wf-b1".into(), vec![json!(8)]),
                ("wf-b2".into(), vec![json!(9)]),
            ],
        )
        .await
        .unwrap();
    for (id, arg) in [("wf-b1", 8), ("wf-b2", 9)] {
        let batch = store.workflow(id).await.unwrap().unwrap();
        assert_eq!(batch.start_args, [json!(arg)]);
        assert_eq!(batch.status_cache, Pending);
        assert_eq!(batch.steps.len(), wf.steps.len());
        store.delete_workflow(id).await.unwrap();
    }
    assert_eq!(wf.description.as_deref(), Some("ingest a dataset"));
    assert!(wf.created_at >= before && wf.created_at <= Utc::now());
    assert_eq!(wf.updated_at, None);
    assert_eq!(wf.status_cache, Pending);
    assert_eq!(wf.resume_lock, None);
    assert_eq!(wf.start_args, [json!(7)]);
    let written = spec("integrated");
    assert_eq!(wf.steps.len(), 3);
    assert_eq!(wf.steps[0].spec, written.steps[0]);
    assert_eq!(wf.steps[2].spec, written.steps[2]);
    // A step without a queue goes to `{app_id}.q` (sca-rhythm writes that queue down).
    assert_eq!(wf.steps[1].spec.name, "inspect");
    assert_eq!(
        wf.steps[1].spec.queue.clone().unwrap_or(format!("{APP}.q")),
        format!("{APP}.q")
    );
    assert!(wf.steps.iter().all(|s| s.runs.is_empty()));
    assert!(store.workflow("wf-none").await.unwrap().is_none());
    assert!(
        store
            .create_workflow("wf-1", APP, &spec("integrated"), &[])
            .await
            .is_err(),
        "a workflow id is unique"
    );
    assert_eq!(
        store.workflow("wf-1").await.unwrap().unwrap().start_args,
        [json!(7)],
        "a refused creation changes nothing"
    );
    assert_eq!(derived(store, "wf-1").await.0, Pending);

    // Started: a run, STARTED with `{pid, hostname}` and the request fields.
    store
        .task_started(&start("wf-1", 0, "t1", 0))
        .await
        .unwrap();
    let wf = store.workflow("wf-1").await.unwrap().unwrap();
    assert_eq!(wf.status_cache, Started);
    assert!(wf.updated_at.is_some());
    assert_eq!(wf.steps[0].runs.len(), 1);
    assert_eq!(wf.steps[0].runs[0].task_id, "t1");
    assert!(wf.steps[0].runs[0].date_start >= before);
    let meta = &store.task_metas(&["t1".into()]).await.unwrap()["t1"];
    assert_eq!(meta.status, Started);
    assert_eq!(
        meta.result,
        json!({"pid": 4321, "hostname": "worker-a@host"})
    );
    assert_eq!(meta.name.as_deref(), Some("await_stability"));
    assert_eq!(meta.args, [json!(7)]);
    assert_eq!(meta.kwargs["step"], "await stability");
    assert_eq!(meta.kwargs["workflow_id"], "wf-1");
    assert_eq!(meta.worker.as_deref(), Some("worker-a@host"));
    assert_eq!(meta.queue.as_deref(), Some(&*format!("{APP}.q")));
    assert_eq!((meta.retries, meta.date_done), (0, None));
    assert_eq!(
        derived(store, "wf-1").await,
        (Started, 0, vec![Started, Pending, Pending])
    );

    // A task of a workflow that does not exist is refused (sca-rhythm: WFNotFound).
    assert!(
        store
            .task_started(&start("wf-none", 0, "t0", 0))
            .await
            .is_err()
    );

    // Redelivered under the same id: no second run.
    store
        .task_started(&start("wf-1", 0, "t1", 0))
        .await
        .unwrap();
    let wf = store.workflow("wf-1").await.unwrap().unwrap();
    assert_eq!(wf.steps[0].runs.len(), 1);

    // Progress replaces the result while STARTED.
    let progress =
        json!({"name": "files", "fraction_done": 0.5, "done": 5, "total": 10, "units": "files"});
    store.task_progress("t1", &progress).await.unwrap();
    let meta = &store.task_metas(&["t1".into()]).await.unwrap()["t1"];
    assert_eq!((meta.status, &meta.result), (Started, &progress));

    // RETRY: the error, the attempt's retry count; progress written late is ignored.
    store
        .task_retry("t1", &error("disk busy"), 0)
        .await
        .unwrap();
    store.task_progress("t1", &progress).await.unwrap();
    let meta = &store.task_metas(&["t1".into()]).await.unwrap()["t1"];
    assert_eq!(meta.status, Retry);
    assert_eq!(meta.result, error("disk busy").to_json());
    assert_eq!((meta.retries, meta.date_done), (0, None));
    assert_eq!(
        meta.name.as_deref(),
        Some("await_stability"),
        "request fields stay"
    );
    assert_eq!(
        derived(store, "wf-1").await.0,
        Started,
        "RETRY reads as STARTED"
    );

    // The second attempt: same id, still one run.
    store
        .task_started(&start("wf-1", 0, "t1", 1))
        .await
        .unwrap();
    let meta = &store.task_metas(&["t1".into()]).await.unwrap()["t1"];
    assert_eq!((meta.status, meta.retries), (Started, 1));
    assert_eq!(
        store.workflow("wf-1").await.unwrap().unwrap().steps[0]
            .runs
            .len(),
        1
    );

    // SUCCESS: the return value, date_done; a late progress write does not undo it.
    store.task_succeeded("t1", &json!([7])).await.unwrap();
    store.task_progress("t1", &progress).await.unwrap();
    let meta = &store.task_metas(&["t1".into()]).await.unwrap()["t1"];
    assert_eq!((meta.status, &meta.result), (Success, &json!([7])));
    let done = meta.date_done.unwrap();
    assert!(done >= before - TimeDelta::seconds(1) && done <= Utc::now() + TimeDelta::seconds(1));
    assert_eq!(meta.retries, 1);
    assert_eq!(meta.args, [json!(7)]);
    // The next step has not started yet: the workflow reads STARTED.
    assert_eq!(
        derived(store, "wf-1").await,
        (Started, 1, vec![Success, Pending, Pending])
    );

    // FAILURE of the second step.
    store
        .task_started(&start("wf-1", 1, "t2", 0))
        .await
        .unwrap();
    store
        .task_failed(Some("wf-1"), "t2", &error("checksum mismatch"))
        .await
        .unwrap();
    let wf = store.workflow("wf-1").await.unwrap().unwrap();
    assert_eq!(wf.status_cache, Failure);
    let meta = &store.task_metas(&["t2".into()]).await.unwrap()["t2"];
    assert_eq!(meta.status, Failure);
    assert_eq!(meta.result["exc_message"], json!(["checksum mismatch"]));
    assert!(meta.date_done.is_some());
    assert_eq!(
        derived(store, "wf-1").await,
        (Failure, 1, vec![Success, Failure, Pending])
    );

    // The resume lock: taken once, cleared by the next start.
    let now = Utc::now();
    assert!(store.lock_for_resume("wf-1", now).await.unwrap());
    assert!(!store.lock_for_resume("wf-1", now).await.unwrap());
    assert_eq!(
        store.workflow("wf-1").await.unwrap().unwrap().resume_lock,
        Some(ms(now))
    );
    store
        .task_started(&start("wf-1", 1, "t3", 0))
        .await
        .unwrap();
    let wf = store.workflow("wf-1").await.unwrap().unwrap();
    assert_eq!(wf.resume_lock, None);
    assert_eq!(wf.status_cache, Started);
    let runs: Vec<&str> = wf.steps[1]
        .runs
        .iter()
        .map(|r| r.task_id.as_str())
        .collect();
    assert_eq!(
        runs,
        ["t2", "t3"],
        "the failed run and the resumed one, oldest first"
    );
    assert_eq!(
        derived(store, "wf-1").await,
        (Started, 1, vec![Success, Started, Pending])
    );
    assert!(
        store.lock_for_resume("wf-1", now).await.unwrap(),
        "a cleared lock is taken again"
    );
    store
        .task_started(&start("wf-1", 1, "t3", 0))
        .await
        .unwrap();
    assert_eq!(
        store.workflow("wf-1").await.unwrap().unwrap().resume_lock,
        None
    );

    // What a worker reads before running a step: the workflow with its runs and the task's
    // stored result, together; twice, as a store may keep the steps it read the first time.
    let whole = store.workflow("wf-1").await.unwrap().unwrap();
    let runs = |wf: &Workflow| -> Vec<Vec<String>> {
        wf.steps
            .iter()
            .map(|s| s.runs.iter().map(|r| r.task_id.clone()).collect())
            .collect()
    };
    for _ in 0..2 {
        let (wf, meta) = store.step_state("wf-1", "t3").await.unwrap();
        let wf = wf.expect("the workflow");
        let alone = store.workflow_for_step("wf-1").await.unwrap().unwrap();
        for read in [&wf, &alone] {
            assert_eq!((&read.id, &read.name), (&whole.id, &whole.name));
            assert_eq!(read.status_cache, Started);
            assert_eq!(read.resume_lock, None);
            assert_eq!(runs(read), runs(&whole));
            let names: Vec<&str> = read.steps.iter().map(|s| s.spec.name.as_str()).collect();
            assert_eq!(names, ["await stability", "inspect", "archive"]);
            assert_eq!(read.steps[1].spec.task, whole.steps[1].spec.task);
        }
        let meta = meta.expect("the task's result");
        assert_eq!((meta.task_id.as_str(), meta.status), ("t3", Started));
        assert_eq!(meta.worker.as_deref(), Some("worker-a@host"));
    }
    assert!(
        store
            .step_state("wf-1", "never-ran")
            .await
            .unwrap()
            .1
            .is_none()
    );
    assert!(
        store
            .step_state("no-such-workflow", "t3")
            .await
            .unwrap()
            .0
            .is_none()
    );

    // To the end; a success recorded by the run that started it reads the workflow's status
    // back.
    assert_eq!(
        store
            .task_succeeded_from(&start("wf-1", 1, "t3", 0), &json!([7]))
            .await
            .unwrap(),
        Some(Started)
    );
    assert_eq!(
        store.task_metas(&["t3".into()]).await.unwrap()["t3"].status,
        Success
    );
    store
        .task_started(&start("wf-1", 2, "t4", 0))
        .await
        .unwrap();
    store.task_succeeded("t4", &json!([7, []])).await.unwrap();
    store.set_workflow_status("wf-1", Success).await.unwrap();
    assert_eq!(
        store.workflow("wf-1").await.unwrap().unwrap().status_cache,
        Success
    );
    // The status alone, as the engine reads it before sending a next step.
    assert_eq!(store.workflow_status("wf-1").await.unwrap(), Some(Success));
    assert_eq!(
        store.workflow_status("no-such-workflow").await.unwrap(),
        None
    );
    assert_eq!(
        derived(store, "wf-1").await,
        (Success, 3, vec![Success, Success, Success])
    );
    assert_eq!(
        store.task_metas(&["t4".into()]).await.unwrap()["t4"].result,
        json!([7, []])
    );

    // Listing: newest first; active means cached PENDING or STARTED.
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .create_workflow("wf-2", APP, &spec("stage"), &[json!(8)])
        .await
        .unwrap();
    assert_eq!(ids(store, WorkflowFilter::All, 10).await, ["wf-2", "wf-1"]);
    assert_eq!(ids(store, WorkflowFilter::All, 1).await, ["wf-2"]);
    assert_eq!(ids(store, WorkflowFilter::Active, 10).await, ["wf-2"]);
    let listed = store.workflows(WorkflowFilter::All, 10).await.unwrap();
    assert_eq!(
        listed[1].steps[1].runs.len(),
        2,
        "listed workflows come whole"
    );
    assert_eq!(listed[0].start_args, [json!(8)]);

    // Results of unknown tasks are absent (PENDING).
    let metas = store
        .task_metas(&["t1".into(), "t2".into(), "never-ran".into()])
        .await
        .unwrap();
    assert_eq!(
        metas.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["t1".into(), "t2".into()])
    );

    // Deleting a workflow deletes its task results; others stay.
    store.delete_workflow("wf-1").await.unwrap();
    assert!(store.workflow("wf-1").await.unwrap().is_none());
    let gone: Vec<String> = ["t1", "t2", "t3", "t4"].map(String::from).to_vec();
    assert!(store.task_metas(&gone).await.unwrap().is_empty());
    assert_eq!(ids(store, WorkflowFilter::All, 10).await, ["wf-2"]);
    store.delete_workflow("wf-1").await.unwrap();
    // A workflow that never ran.
    store.delete_workflow("wf-2").await.unwrap();
    assert!(ids(store, WorkflowFilter::All, 10).await.is_empty());
}

async fn purge_paging_story(store: &dyn WorkflowStore) {
    for idx in 0..5 {
        store
            .create_workflow(
                &format!("old-{idx}"),
                APP,
                &spec("integrated"),
                &[json!(idx)],
            )
            .await
            .unwrap();
        store
            .create_workflow(&format!("other-{idx}"), APP, &spec("delete"), &[json!(idx)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let cutoff = Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .create_workflow("old-late", APP, &spec("integrated"), &[])
        .await
        .unwrap();
    // Page by two, deleting every workflow of a page (its last one too) before reading the
    // next, as purge_stale_workflows does.
    let names = ["integrated".to_owned()];
    let mut seen = Vec::new();
    let mut after: Option<PageCursor> = None;
    loop {
        let page = store
            .workflows_created_before(&names, cutoff, after.as_ref(), 2)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        assert!(page.len() <= 2);
        after = Some(PageCursor::after(last));
        for workflow in page {
            assert_eq!(workflow.steps.len(), 3, "paged workflows come whole");
            store.delete_workflow(&workflow.id).await.unwrap();
            seen.push(workflow.id);
        }
    }
    assert_eq!(seen, ["old-0", "old-1", "old-2", "old-3", "old-4"]);
    let mut left = ids(store, WorkflowFilter::All, 100).await;
    left.sort();
    assert_eq!(
        left,
        [
            "old-late", "other-0", "other-1", "other-2", "other-3", "other-4"
        ]
    );
    // Without deletions, paging sees each once too.
    let names = ["delete".to_owned(), "integrated".to_owned()];
    let first = store
        .workflows_created_before(&names, Utc::now(), None, 4)
        .await
        .unwrap();
    let rest = store
        .workflows_created_before(
            &names,
            Utc::now(),
            Some(&PageCursor::after(first.last().unwrap())),
            10,
        )
        .await
        .unwrap();
    let all: Vec<String> = first.iter().chain(&rest).map(|w| w.id.clone()).collect();
    assert_eq!(
        all,
        [
            "other-0", "other-1", "other-2", "other-3", "other-4", "old-late"
        ]
    );
}

async fn watch_state_story(store: &dyn WorkflowStore) {
    assert_eq!(
        store.watch_state("/data/raw").await.unwrap(),
        WatchState::default()
    );
    let state = WatchState {
        scan_count: 3,
        known: BTreeSet::from(["run_1".into(), "run 2 é".into()]),
    };
    store.save_watch_state("/data/raw", &state).await.unwrap();
    store
        .save_watch_state(
            "/data/products",
            &WatchState {
                scan_count: 1,
                known: BTreeSet::new(),
            },
        )
        .await
        .unwrap();
    assert_eq!(store.watch_state("/data/raw").await.unwrap(), state);
    let next = WatchState {
        scan_count: 0,
        known: BTreeSet::from(["run_1".into()]),
    };
    store.save_watch_state("/data/raw", &next).await.unwrap();
    assert_eq!(store.watch_state("/data/raw").await.unwrap(), next);
    assert_eq!(
        store
            .watch_state("/data/products")
            .await
            .unwrap()
            .scan_count,
        1
    );
}

/// Leases are judged by the store's own clock: the story runs in real time with short leases.
async fn lease_story(store: &dyn SchedulerStore) {
    let ttl = Duration::from_millis(1500);
    let half = || tokio::time::sleep(Duration::from_millis(800));
    assert!(store.acquire_lease("scheduler", "a", ttl).await.unwrap());
    assert!(!store.acquire_lease("scheduler", "b", ttl).await.unwrap());
    half().await;
    // Renewed: it now runs 1.5 s from here.
    assert!(store.acquire_lease("scheduler", "a", ttl).await.unwrap());
    half().await;
    assert!(
        !store.acquire_lease("scheduler", "b", ttl).await.unwrap(),
        "renewed, so still held 1.6 s after it was taken"
    );
    half().await;
    half().await;
    // Expired: nobody holds it until it is taken over.
    assert_eq!(store.lease("scheduler").await.unwrap(), None);
    let taken = Utc::now();
    assert!(store.acquire_lease("scheduler", "b", ttl).await.unwrap());
    assert!(!store.acquire_lease("scheduler", "a", ttl).await.unwrap());
    let held = store.lease("scheduler").await.unwrap().unwrap();
    assert_eq!(held.holder, "b");
    assert!(
        held.expires_at > Utc::now() - TimeDelta::seconds(1),
        "{held:?}"
    );
    let since = held.since.expect("when b took it");
    assert!((since - taken).num_milliseconds().abs() < 1000, "{held:?}");
    // A renewal keeps the time it was taken.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(store.acquire_lease("scheduler", "b", ttl).await.unwrap());
    assert_eq!(
        store.lease("scheduler").await.unwrap().unwrap().since,
        Some(since)
    );
    // Only the holder gives it up.
    store.release_lease("scheduler", "a").await.unwrap();
    assert!(!store.acquire_lease("scheduler", "a", ttl).await.unwrap());
    store.release_lease("scheduler", "b").await.unwrap();
    assert_eq!(store.lease("scheduler").await.unwrap(), None);
    assert!(store.acquire_lease("scheduler", "a", ttl).await.unwrap());
    // Leases are independent of each other.
    assert!(store.acquire_lease("other", "b", ttl).await.unwrap());
    // Two contenders for a free lease at once: exactly one gets it.
    let (x, y) = tokio::join!(
        store.acquire_lease("contested", "x", ttl),
        store.acquire_lease("contested", "y", ttl),
    );
    assert!(x.unwrap() ^ y.unwrap(), "exactly one holder");
    // In batches: each lease judged on its own, released together.
    let names: Vec<String> = ["batch-1", "batch-2", "contested"]
        .map(String::from)
        .to_vec();
    assert!(store.acquire_lease("batch-2", "other", ttl).await.unwrap());
    let held = store.acquire_leases(&names, "z", ttl).await.unwrap();
    assert_eq!(held, [true, false, false]);
    store.release_leases(&names, "z").await.unwrap();
    assert!(store.acquire_lease("batch-1", "w", ttl).await.unwrap());
    assert!(
        !store.acquire_lease("batch-2", "w", ttl).await.unwrap(),
        "not z's to release"
    );
}

async fn job_run_story(store: &dyn SchedulerStore) {
    let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let at = |secs: i64| t0 + TimeDelta::seconds(secs);

    // The last slot per job only moves forward.
    assert!(store.last_slots().await.unwrap().is_empty());
    store.set_last_slot("watch", at(20)).await.unwrap();
    store.set_last_slot("watch", at(10)).await.unwrap();
    store.set_last_slot("metrics", at(5)).await.unwrap();
    assert_eq!(
        store.last_slots().await.unwrap(),
        HashMap::from([("watch".into(), at(20)), ("metrics".into(), at(5))])
    );

    let first = store
        .start_run(
            "watch",
            Trigger::Schedule,
            Some(at(0)),
            "host:1",
            false,
            at(0),
        )
        .await
        .unwrap();
    let purge = store
        .start_run(
            "purge_stale_workflows",
            Trigger::Manual,
            None,
            "host:1",
            true,
            at(1),
        )
        .await
        .unwrap();
    assert!(purge > first);
    let counters = object(json!({"registered": 2, "failed": 0}));
    store
        .finish_run(first, &RunOutcome::Success, &counters, at(2))
        .await
        .unwrap();
    store
        .record_skip(
            "watch",
            Trigger::Queued,
            at(10),
            "host:2",
            "the previous run is still running",
            at(3),
        )
        .await
        .unwrap();
    let last = store
        .start_run("watch", Trigger::Misfire, None, "host:2", false, at(4))
        .await
        .unwrap();

    let runs = store.runs(Some("watch"), 10).await.unwrap();
    assert_eq!(runs.len(), 3);
    assert_eq!(runs[0].id, last);
    assert_eq!(
        (runs[0].trigger.as_str(), &runs[0].outcome, runs[0].ended_at),
        ("misfire", &RunOutcome::Running, None)
    );
    assert_eq!(
        runs[1].outcome,
        RunOutcome::Skipped("the previous run is still running".into())
    );
    assert_eq!(
        (runs[1].slot, runs[1].host.as_str()),
        (Some(at(10)), "host:2")
    );
    assert_eq!(runs[2].id, first);
    assert_eq!(runs[2].outcome, RunOutcome::Success);
    assert_eq!(runs[2].counters, counters);
    assert_eq!(
        (runs[2].slot, runs[2].started_at, runs[2].ended_at),
        (Some(at(0)), at(0), Some(at(2)))
    );
    assert!(!runs[2].dry_run);
    let newest: Vec<i64> = store
        .runs(None, 2)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(newest, [last, runs[1].id]);
    let purge_runs = store.runs(Some("purge_stale_workflows"), 10).await.unwrap();
    assert_eq!(purge_runs.len(), 1);
    assert_eq!(
        (
            purge_runs[0].trigger.as_str(),
            purge_runs[0].dry_run,
            purge_runs[0].slot
        ),
        ("manual", true, None)
    );

    // A dead process's running runs are closed as failed; others are left alone.
    assert_eq!(
        store
            .abandon_runs("host:2", "the process stopped", at(5))
            .await
            .unwrap(),
        1
    );
    let runs = store.runs(Some("watch"), 1).await.unwrap();
    assert_eq!(
        runs[0].outcome,
        RunOutcome::Failed("the process stopped".into())
    );
    assert_eq!(runs[0].ended_at, Some(at(5)));
    assert_eq!(
        store.abandon_runs("host:2", "again", at(6)).await.unwrap(),
        0
    );
    assert_eq!(
        store
            .abandon_runs("host:1", "the process stopped", at(6))
            .await
            .unwrap(),
        1
    );
}

/// A task's claim: one holder at a time, renewed by its holder, given back or lapsed for the
/// next; a start counted with the claim is counted once, and taken back by a run that ran
/// nothing.
async fn task_claim_story(store: &dyn WorkflowStore) {
    let ttl = Duration::from_secs(30);
    let task = "claimed-task";
    let taken = store.claim_task(task, "run-1", ttl, true).await.unwrap();
    let TaskClaim::Held { start_counted } = taken else {
        panic!("a task nobody claimed is taken: {taken:?}");
    };
    assert_eq!(
        store.claim_task(task, "run-2", ttl, true).await.unwrap(),
        TaskClaim::Busy,
        "a live claim keeps a second run out"
    );
    assert!(matches!(
        store.claim_task(task, "run-1", ttl, false).await.unwrap(),
        TaskClaim::Held { .. }
    ));
    // A plain task (no workflow) started under the claim.
    let mut started = start("none", 0, task, 0);
    started.workflow_id = None;
    started.start_counted = start_counted;
    store.task_started(&started).await.unwrap();
    let starts = |metas: HashMap<String, workers::store::TaskMeta>| metas[task].starts;
    assert_eq!(starts(store.task_metas(&[task.into()]).await.unwrap()), 1);

    // Only the holder gives it back.
    store.release_task(task, "run-2", false).await.unwrap();
    assert_eq!(
        store.claim_task(task, "run-2", ttl, true).await.unwrap(),
        TaskClaim::Busy
    );
    store.release_task(task, "run-1", false).await.unwrap();
    // The next run takes it, finds the task already started elsewhere, runs nothing and gives
    // back its claim with the start it counted.
    assert!(matches!(
        store.claim_task(task, "run-2", ttl, true).await.unwrap(),
        TaskClaim::Held { .. }
    ));
    store.release_task(task, "run-2", true).await.unwrap();
    assert_eq!(
        starts(store.task_metas(&[task.into()]).await.unwrap()),
        1,
        "a run that ran nothing counts no start"
    );

    // A claim lapses by itself.
    assert!(matches!(
        store
            .claim_task(task, "run-3", Duration::from_millis(200), false)
            .await
            .unwrap(),
        TaskClaim::Held { .. }
    ));
    assert_eq!(
        store.claim_task(task, "run-4", ttl, false).await.unwrap(),
        TaskClaim::Busy
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(matches!(
        store.claim_task(task, "run-4", ttl, false).await.unwrap(),
        TaskClaim::Held { .. }
    ));
}

/// Fixity checks: kept per dataset newest first; the rotation's standing moves with every check
/// but an error, the period's with verdicts only, and a copy fails until it is found intact.
async fn fixity_story(store: &dyn WorkflowStore) {
    let t0 = ms(Utc::now()) - TimeDelta::hours(3);
    let check = |dataset_id: i64, copy: &str, minutes: i64, result: FixityResult| FixityRecord {
        dataset_id,
        copy: copy.into(),
        checked_at: t0 + TimeDelta::minutes(minutes),
        result,
        files: 3,
        bytes_read: 1_000 + minutes as u64,
        differences: u64::from(result == FixityResult::Differs),
        detail: format!("{} at {minutes}", result.as_str()),
        by: "fixity".into(),
    };
    assert!(store.fixity_standings().await.unwrap().is_empty());
    assert!(store.fixity_history(1, 10).await.unwrap().is_empty());

    store
        .record_fixity(&[
            check(1, "archive", 0, FixityResult::Intact),
            check(1, "staged", 0, FixityResult::Differs),
            check(2, "archive", 1, FixityResult::NotChecked),
        ])
        .await
        .unwrap();
    store
        .record_fixity(&[check(3, "archive", 2, FixityResult::Error)])
        .await
        .unwrap();
    let standings = store.fixity_standings().await.unwrap();
    let at = |minutes: i64| Some(t0 + TimeDelta::minutes(minutes));
    assert_eq!(
        standings[&1],
        FixityStanding {
            checked_at: at(0),
            verified_at: at(0),
            failing: true
        }
    );
    assert_eq!(
        standings[&2],
        FixityStanding {
            checked_at: at(1),
            verified_at: None,
            failing: false
        },
        "a copy not checked moves the rotation, not the period"
    );
    assert!(
        standings.get(&3).is_none_or(|s| s.checked_at.is_none()),
        "an error leaves the dataset first in line: {:?}",
        standings.get(&3)
    );

    // The staged copy found intact again clears the failure; an error after it changes nothing.
    store
        .record_fixity(&[check(1, "staged", 10, FixityResult::Intact)])
        .await
        .unwrap();
    store
        .record_fixity(&[check(1, "archive", 20, FixityResult::Error)])
        .await
        .unwrap();
    let standings = store.fixity_standings().await.unwrap();
    assert_eq!(
        standings[&1],
        FixityStanding {
            checked_at: at(10),
            verified_at: at(10),
            failing: false
        }
    );

    let history = store.fixity_history(1, 10).await.unwrap();
    let seen: Vec<(&str, FixityResult)> = history
        .iter()
        .map(|c| (c.copy.as_str(), c.result))
        .collect();
    assert_eq!(
        seen[..2],
        [
            ("archive", FixityResult::Error),
            ("staged", FixityResult::Intact)
        ]
    );
    // The two checks recorded at one moment come in either order.
    let mut first = seen[2..].to_vec();
    first.sort_by_key(|(copy, _)| *copy);
    assert_eq!(
        first,
        [
            ("archive", FixityResult::Intact),
            ("staged", FixityResult::Differs)
        ]
    );
    assert_eq!(history[0], check(1, "archive", 20, FixityResult::Error));
    assert_eq!(store.fixity_history(1, 1).await.unwrap().len(), 1);
    assert!(store.fixity_history(4, 10).await.unwrap().is_empty());
}

/// Space reservations: admitted while they fit beside the others', renewed by their holder
/// whatever the free space, given back, and lapsing by themselves.
async fn space_story(ledger: &dyn SpaceLedger) {
    let ttl = Duration::from_secs(30);
    let fs = "/stage";
    assert!(
        ledger
            .reserve_space(fs, "a", 600, 1_000, ttl)
            .await
            .unwrap()
    );
    assert!(
        !ledger
            .reserve_space(fs, "b", 500, 1_000, ttl)
            .await
            .unwrap(),
        "600 held and 500 more do not fit in 1,000"
    );
    assert!(
        ledger
            .reserve_space(fs, "b", 400, 1_000, ttl)
            .await
            .unwrap()
    );
    assert!(
        ledger
            .reserve_space("/archive", "c", 900, 1_000, ttl)
            .await
            .unwrap(),
        "file systems are apart"
    );
    // The holder's own output uses up the free space: a renewal is not judged by it.
    assert!(ledger.reserve_space(fs, "a", 600, 0, ttl).await.unwrap());
    let held: Vec<(String, u64)> = ledger
        .space_reservations(fs)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.holder, r.bytes))
        .collect();
    assert_eq!(held, [("a".to_owned(), 600), ("b".to_owned(), 400)]);

    ledger.release_space(fs, "a").await.unwrap();
    ledger.release_space(fs, "nobody").await.unwrap();
    assert!(
        ledger
            .reserve_space(fs, "d", 600, 1_000, ttl)
            .await
            .unwrap()
    );

    // A holder that stops renewing loses its bytes.
    assert!(
        ledger
            .reserve_space("/short", "e", 900, 1_000, Duration::from_millis(200))
            .await
            .unwrap()
    );
    assert!(
        !ledger
            .reserve_space("/short", "f", 900, 1_000, ttl)
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        ledger
            .reserve_space("/short", "f", 900, 1_000, ttl)
            .await
            .unwrap()
    );
    assert_eq!(ledger.space_reservations("/short").await.unwrap().len(), 1);
    assert!(
        ledger
            .space_reservations("/nothing")
            .await
            .unwrap()
            .is_empty()
    );
}

/// Revokes are remembered with their time, and the expired ones can be forgotten.
async fn revoked_story(store: &dyn WorkflowStore) {
    let now = ms(Utc::now());
    let old = now - TimeDelta::hours(4);
    store
        .remember_revoked(&["old-1".into(), "old-2".into()], old)
        .await
        .unwrap();
    store.remember_revoked(&["new".into()], now).await.unwrap();
    let all = store.revoked_since(old).await.unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    store
        .forget_revoked_before(now - TimeDelta::hours(3))
        .await
        .unwrap();
    assert_eq!(
        store.revoked_since(old).await.unwrap(),
        [("new".to_owned(), now)]
    );
}

async fn story(workflows: &dyn WorkflowStore, scheduler: &dyn SchedulerStore) {
    revoked_story(workflows).await;
    workflow_story(workflows).await;
    fixity_story(workflows).await;
    task_claim_story(workflows).await;
    purge_paging_story(workflows).await;
    watch_state_story(workflows).await;
    lease_story(scheduler).await;
    job_run_story(scheduler).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sqlite_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("store.db"), Duration::from_secs(5)).unwrap();
    let store = SqlStore::new(db);
    story(&store, &store).await;
    space_story(&store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mongo_store_keeps_the_contract() {
    let Some(database) = TestDatabase::new() else {
        return;
    };
    let store = MongoStore::connect(&database.uri, &database.name)
        .await
        .unwrap();
    story(&store, &store).await;
    space_story(&store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_postgres_store_keeps_the_contract() {
    let Some(database) = TestPostgres::new() else {
        return;
    };
    let store = SqlStore::new(database.db().await);
    story(&store, &store).await;
    space_story(&store).await;
}

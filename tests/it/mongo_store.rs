//! The MongoDB store against what the Python side writes (the captured documents of
//! `tests/fixtures/celery-sca-rhythm`): it reads sca-rhythm's and Celery's documents, derives
//! the statuses sca-rhythm derives, writes the same documents for the same events, and the
//! engine and the jobs (resume, purge, reconcile, a whole workflow) work on it.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::services::TestDatabase;
use crate::common::*;
use chrono::{DateTime, NaiveDateTime, Utc};
use futures_util::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use serde_json::{Map, Value, json};
use workers::app::App;
use workers::jobs::{self, JobName, JobOptions, JobReport};
use workers::model::DatasetType;
use workers::store::mongo::MongoStore;
use workers::store::{
    RunOutcome, StepSpec, TaskError, TaskStart, TaskStatus, Trigger, WorkflowFilter, WorkflowSpec,
    WorkflowStore,
};
use workers::ui::Display;
use workers::workflow::engine::{self, Resumed};
use workers::workflow::status::derive;

const APP_ID: &str = "bioloop-dev.sca.iu.edu";
const QUEUE: &str = "bioloop-dev.sca.iu.edu.q";
const WORKER: &str = "py-w1@worker-host";
/// How the fixtures show MongoDB dates.
const MONGO_DATE: &str = "%Y-%m-%d %H:%M:%S%.6f";
/// How Celery writes `date_done`.
const CELERY_DATE: &str = "%Y-%m-%dT%H:%M:%S%.6f";

const SUCCESS_ID: &str = "d655a019-ae66-413c-994f-6bfd1e16d884";
const SUCCESS_STEP1: &str = "b3f3d7bb-57ea-4f92-b7a0-ce15e23161a9";
const SUCCESS_STEP2: &str = "ea18847f-256b-4b8b-9ece-318212ffaf1b";
const FAILURE_ID: &str = "4e128441-2744-4266-bd43-965b95ce6e22";
const FAILURE_TASK: &str = "b34772b9-1b49-4cac-bdff-770c5e33393a";
const PROGRESS_ID: &str = "ebeda278-3c99-46fc-827f-275048cf2573";
const PROGRESS_TASK: &str = "4f071130-8a2a-4e42-8f6b-daf0c4599e60";

fn fixture_text(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/celery-sca-rhythm")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture_text(name)).unwrap()
}

/// A fixture as it is in the database (the README's rules): the shown dates become BSON
/// dates, integers are 32-bit as pymongo stores them; key order is kept.
fn fixture_doc(name: &str) -> Document {
    let doc: Document = serde_json::from_str(&fixture_text(name)).unwrap();
    match as_stored(Bson::Document(doc)) {
        Bson::Document(doc) => doc,
        _ => unreachable!(),
    }
}

fn mongo_date(text: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(text, MONGO_DATE)
        .ok()
        .filter(|_| text.len() == 26)
        .map(|naive| naive.and_utc())
}

fn as_stored(value: Bson) -> Bson {
    match value {
        Bson::String(text) => match mongo_date(&text) {
            Some(date) => Bson::DateTime(mongodb::bson::DateTime::from_millis(
                date.timestamp_millis(),
            )),
            None => Bson::String(text),
        },
        Bson::Int64(n) => i32::try_from(n).map_or(Bson::Int64(n), Bson::Int32),
        Bson::Array(items) => Bson::Array(items.into_iter().map(as_stored).collect()),
        Bson::Document(doc) => {
            Bson::Document(doc.into_iter().map(|(k, v)| (k, as_stored(v))).collect())
        }
        other => other,
    }
}

/// A stored document for comparison: dates, `date_done` values and tracebacks become
/// placeholders (they differ by run); everything else must be equal.
fn canonical(doc: &Document) -> Value {
    fn walk(key: &str, value: Value) -> Value {
        match value {
            Value::Object(map) if map.len() == 1 && map.contains_key("$date") => json!("<date>"),
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| (k.clone(), walk(&k, v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.into_iter().map(|v| walk("", v)).collect()),
            Value::String(text) if key == "date_done" => {
                assert_eq!(
                    text.len(),
                    26,
                    "date_done `{text}` has six fractional digits"
                );
                NaiveDateTime::parse_from_str(&text, CELERY_DATE).unwrap();
                json!("<date_done>")
            }
            Value::String(_) if key == "traceback" => json!("<traceback>"),
            other => other,
        }
    }
    walk("", Bson::Document(doc.clone()).into_relaxed_extjson())
}

fn keys(doc: &Document) -> Vec<&str> {
    doc.keys().map(String::as_str).collect()
}

/// Asserts that a document written by the store is the fixture, field for field and in
/// Celery's and sca-rhythm's key order.
fn assert_same_document(ours: &Document, fixture: &str) {
    let theirs = fixture_doc(fixture);
    assert_eq!(
        keys(ours),
        keys(&theirs),
        "{fixture}: fields and their order"
    );
    assert_eq!(canonical(ours), canonical(&theirs), "{fixture}");
}

async fn raw(db: &mongodb::Database, collection: &str, id: &str) -> Document {
    db.collection::<Document>(collection)
        .find_one(doc! {"_id": id})
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no document {id} in {collection}"))
}

async fn insert(db: &mongodb::Database, collection: &str, docs: Vec<Document>) {
    db.collection::<Document>(collection)
        .insert_many(docs)
        .await
        .unwrap();
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn utc(text: &str) -> DateTime<Utc> {
    mongo_date(text).unwrap()
}

/// The workflow of `embellished_success_after_progress.json`, whose `workflow_meta` was not
/// captured, rebuilt from the embellished view.
fn progress_workflow_doc() -> Document {
    let view = fixture_json("embellished_success_after_progress.json");
    let step = &view["steps"][0];
    let run = &step["last_task_run"];
    let date = |v: &Value| {
        Bson::DateTime(mongodb::bson::DateTime::from_millis(
            utc(v.as_str().unwrap()).timestamp_millis(),
        ))
    };
    doc! {
        "_id": view["id"].as_str().unwrap(),
        "created_at": date(&view["created_at"]),
        "steps": [{
            "name": step["name"].as_str().unwrap(),
            "task": step["task"].as_str().unwrap(),
            "queue": QUEUE,
            "task_runs": [{"date_start": date(&run["date_start"]), "task_id": run["_id"].as_str().unwrap()}],
        }],
        "name": view["name"].as_str().unwrap(),
        "app_id": view["app_id"].as_str().unwrap(),
        "description": Bson::Null,
        "_status": "STARTED",
        "updated_at": date(&view["created_at"]),
    }
}

async fn store_for(database: &TestDatabase) -> MongoStore {
    MongoStore::connect(&database.uri, &database.name)
        .await
        .unwrap()
}

async fn derived_of(store: &MongoStore, id: &str) -> (TaskStatus, usize, Vec<TaskStatus>) {
    let workflow = store.workflow(id).await.unwrap().unwrap();
    let ids: Vec<String> = workflow.all_task_ids().into_iter().collect();
    let derived = derive(&workflow, &store.task_metas(&ids).await.unwrap());
    (derived.status, derived.steps_done, derived.steps)
}

/// The status sca-rhythm derived, from an embellished fixture.
fn embellished_statuses(name: &str) -> (TaskStatus, usize, Vec<TaskStatus>) {
    let view = fixture_json(name);
    let status = |v: &Value| TaskStatus::parse(v.as_str().unwrap()).unwrap();
    (
        status(&view["status"]),
        view["steps_done"].as_u64().unwrap() as usize,
        view["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| status(&s["status"]))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn documents_written_by_python_read_and_derive_as_sca_rhythm_derives() {
    let Some(database) = TestDatabase::new() else {
        return;
    };
    let store = store_for(&database).await;
    let db = database.db().await;
    insert(
        &db,
        "workflow_meta",
        vec![
            fixture_doc("workflow_meta_success.json"),
            fixture_doc("workflow_meta_failure.json"),
        ],
    )
    .await;
    insert(
        &db,
        "celery_taskmeta",
        [
            "celery_taskmeta_success_step1.json",
            "celery_taskmeta_success_step2.json",
            "celery_taskmeta_failure.json",
        ]
        .into_iter()
        .map(fixture_doc)
        .collect(),
    )
    .await;

    // A finished two-step workflow: steps without kwargs or priority, runs with their dates.
    let wf = store.workflow(SUCCESS_ID).await.unwrap().unwrap();
    assert_eq!(
        (
            wf.name.as_str(),
            wf.app_id.as_str(),
            wf.description.as_deref()
        ),
        ("bars_interop", APP_ID, None)
    );
    assert_eq!(wf.created_at, utc("2026-11-28 19:35:05.418000"));
    assert_eq!(wf.updated_at, Some(utc("2026-11-28 19:35:05.498000")));
    assert_eq!(
        (wf.status_cache, wf.resume_lock),
        (TaskStatus::Success, None)
    );
    let specs: Vec<StepSpec> = wf.steps.iter().map(|s| s.spec.clone()).collect();
    assert_eq!(
        specs,
        [("first step", "noop"), ("second", "noop")].map(|(name, task)| StepSpec {
            name: name.into(),
            task: task.into(),
            queue: Some(QUEUE.into()),
            kwargs: None,
            priority: None,
        })
    );
    assert_eq!(wf.steps[0].runs[0].task_id, SUCCESS_STEP1);
    assert_eq!(
        wf.steps[0].runs[0].date_start,
        utc("2026-11-28 19:35:05.464000")
    );
    assert_eq!(wf.steps[1].runs[0].task_id, SUCCESS_STEP2);
    // sca-rhythm keeps no start arguments: they are those its first task ran with.
    assert_eq!(wf.start_args, [json!(4242)]);

    let metas = store
        .task_metas(&[SUCCESS_STEP1.into(), SUCCESS_STEP2.into()])
        .await
        .unwrap();
    let first = &metas[SUCCESS_STEP1];
    assert_eq!(
        (first.status, &first.result),
        (TaskStatus::Success, &json!([4242]))
    );
    assert_eq!(
        first.date_done,
        Some(
            DateTime::parse_from_rfc3339("2026-11-28T19:35:05.465859Z")
                .unwrap()
                .with_timezone(&Utc)
        )
    );
    assert_eq!(
        (first.name.as_deref(), first.args.as_slice()),
        (Some("noop"), &[json!(4242)][..])
    );
    assert_eq!(
        first.kwargs,
        object(json!({"workflow_id": SUCCESS_ID, "step": "first step", "app_id": APP_ID}))
    );
    assert_eq!(
        (
            first.worker.as_deref(),
            first.retries,
            first.queue.as_deref()
        ),
        (Some(WORKER), 0, Some(QUEUE))
    );
    assert_eq!(first.traceback, None);
    assert_eq!(
        derived_of(&store, SUCCESS_ID).await,
        (TaskStatus::Success, 2, vec![TaskStatus::Success; 2])
    );

    // A workflow whose first step failed after its retry: what sca-rhythm derived.
    assert_eq!(
        derived_of(&store, FAILURE_ID).await,
        embellished_statuses("embellished_failure.json")
    );
    let view = fixture_json("embellished_failure.json");
    let wf = store.workflow(FAILURE_ID).await.unwrap().unwrap();
    assert_eq!(wf.status_cache, TaskStatus::Failure);
    assert_eq!(wf.steps[1].runs.len(), 0, "a step without task_runs");
    assert_eq!(wf.start_args, [json!(11)]);
    let run = &view["steps"][0]["last_task_run"];
    assert_eq!(
        wf.steps[0].runs[0].date_start,
        utc(run["date_start"].as_str().unwrap())
    );
    let failure = &store.task_metas(&[FAILURE_TASK.into()]).await.unwrap()[FAILURE_TASK];
    assert_eq!(
        failure.result, run["result"],
        "the error as the UI shows it"
    );
    assert_eq!(
        failure.result["exc_message"],
        json!(["dataset 11 is broken"])
    );
    assert_eq!(failure.retries, 1);
    assert_eq!(
        failure.traceback.as_deref(),
        Some("<python traceback text>")
    );
    assert_eq!(
        failure.date_done,
        Some(utc(run["date_done"].as_str().unwrap()))
    );

    // Newest first; neither is active.
    let all: Vec<String> = store
        .workflows(WorkflowFilter::All, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(all, [FAILURE_ID, SUCCESS_ID]);
    assert!(
        store
            .workflows(WorkflowFilter::Active, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Created through rhythm_api and never started: `kwargs: null`, no priority, no runs,
    // no `updated_at`; a `resume_lock` of null (cleared) does not lock.
    insert(
        &db,
        "workflow_meta",
        vec![doc! {
            "_id": "from-rhythm-api",
            "created_at": mongodb::bson::DateTime::from_millis(utc("2026-11-28 19:00:00.000000").timestamp_millis()),
            "steps": [{"name": "stage", "task": "stage_dataset", "queue": QUEUE, "kwargs": Bson::Null}],
            "name": "stage",
            "app_id": APP_ID,
            "description": "on request",
            "_status": "PENDING",
            "resume_lock": Bson::Null,
        }],
    )
    .await;
    let wf = store.workflow("from-rhythm-api").await.unwrap().unwrap();
    assert_eq!(
        (wf.steps[0].spec.kwargs.as_ref(), wf.steps[0].spec.priority),
        (None, None)
    );
    assert_eq!((wf.updated_at, wf.resume_lock), (None, None));
    assert_eq!(wf.description.as_deref(), Some("on request"));
    assert!(
        wf.start_args.is_empty(),
        "never started: no arguments to be found"
    );
    assert_eq!(
        derived_of(&store, "from-rhythm-api").await,
        (TaskStatus::Pending, 0, vec![TaskStatus::Pending])
    );
    assert!(
        store
            .lock_for_resume("from-rhythm-api", Utc::now())
            .await
            .unwrap()
    );
    store
        .task_started(&started(
            "from-rhythm-api",
            0,
            "stage",
            "rhythm-task",
            "stage_dataset",
            5,
        ))
        .await
        .unwrap();
    let doc = raw(&db, "workflow_meta", "from-rhythm-api").await;
    assert_eq!(doc.get("resume_lock"), Some(&Bson::Null));
    let step = doc.get_array("steps").unwrap()[0]
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(
        keys(&step),
        ["name", "task", "queue", "kwargs", "task_runs"]
    );
    assert_eq!(
        store
            .workflow("from-rhythm-api")
            .await
            .unwrap()
            .unwrap()
            .start_args,
        [json!(5)]
    );
    store.delete_workflow("from-rhythm-api").await.unwrap();

    // A step reporting progress: STARTED with the progress dict as its result.
    insert(&db, "workflow_meta", vec![progress_workflow_doc()]).await;
    insert(
        &db,
        "celery_taskmeta",
        vec![fixture_doc("celery_taskmeta_started_progress.json")],
    )
    .await;
    assert_eq!(
        derived_of(&store, PROGRESS_ID).await,
        (TaskStatus::Started, 0, vec![TaskStatus::Started])
    );
    let meta = &store.task_metas(&[PROGRESS_TASK.into()]).await.unwrap()[PROGRESS_TASK];
    assert_eq!(
        (
            meta.result["name"].as_str(),
            meta.result["fraction_done"].as_f64()
        ),
        (Some("inspect"), Some(0.5))
    );
    assert_eq!(meta.result["units"], "items");
    assert_eq!(meta.date_done, None);
    assert_eq!(
        store.workflows(WorkflowFilter::Active, 10).await.unwrap()[0].id,
        PROGRESS_ID
    );
    // Then its SUCCESS document, as the embellished view shows it.
    let view = fixture_json("embellished_success_after_progress.json");
    let run = &view["steps"][0]["last_task_run"];
    let mut success = fixture_doc("celery_taskmeta_started_progress.json");
    success.insert("status", "SUCCESS");
    success.insert("result", run["result"].to_string());
    let done =
        NaiveDateTime::parse_from_str(run["date_done"].as_str().unwrap(), MONGO_DATE).unwrap();
    success.insert("date_done", done.format(CELERY_DATE).to_string());
    db.collection::<Document>("celery_taskmeta")
        .replace_one(doc! {"_id": PROGRESS_TASK}, success)
        .await
        .unwrap();
    assert_eq!(
        derived_of(&store, PROGRESS_ID).await,
        embellished_statuses("embellished_success_after_progress.json")
    );
    let meta = &store.task_metas(&[PROGRESS_TASK.into()]).await.unwrap()[PROGRESS_TASK];
    assert_eq!(meta.result, json!([12]));
    assert_eq!(meta.date_done, Some(done.and_utc()));
}

fn two_steps(name: &str, first: (&str, &str), second: (&str, &str)) -> WorkflowSpec {
    let step = |(name, task): (&str, &str)| StepSpec {
        name: name.into(),
        task: task.into(),
        queue: Some(QUEUE.into()),
        kwargs: None,
        priority: None,
    };
    WorkflowSpec {
        name: name.into(),
        description: None,
        steps: vec![step(first), step(second)],
    }
}

fn started(
    workflow_id: &str,
    position: usize,
    step: &str,
    task_id: &str,
    task: &str,
    dataset: i64,
) -> TaskStart {
    TaskStart {
        workflow_id: Some(workflow_id.into()),
        position,
        task_id: task_id.into(),
        task_name: task.into(),
        args: vec![json!(dataset)],
        kwargs: object(json!({"workflow_id": workflow_id, "step": step, "app_id": APP_ID})),
        hostname: WORKER.into(),
        pid: 6950,
        retries: 0,
        queue: QUEUE.into(),
        parent_id: None,
        resume_locked: true,
        start_counted: false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn documents_written_for_the_same_events_are_those_python_writes() {
    let Some(database) = TestDatabase::new() else {
        return;
    };
    let store = store_for(&database).await;
    let db = database.db().await;

    // Two steps that succeed; the second was published by the first (its parent).
    store
        .create_workflow(
            SUCCESS_ID,
            APP_ID,
            &two_steps("bars_interop", ("first step", "noop"), ("second", "noop")),
            &[json!(4242)],
        )
        .await
        .unwrap();
    let created = raw(&db, "workflow_meta", SUCCESS_ID).await;
    assert!(!created.contains_key("updated_at") && !created.contains_key("resume_lock"));
    assert_eq!(created.get_str("_status").unwrap(), "PENDING");
    store
        .task_started(&started(
            SUCCESS_ID,
            0,
            "first step",
            SUCCESS_STEP1,
            "noop",
            4242,
        ))
        .await
        .unwrap();
    let running = raw(&db, "celery_taskmeta", SUCCESS_STEP1).await;
    assert_eq!(running.get_str("status").unwrap(), "STARTED");
    assert_eq!(
        running.get_str("result").unwrap(),
        format!(r#"{{"pid": 6950, "hostname": "{WORKER}"}}"#)
    );
    assert_eq!(running.get("date_done"), Some(&Bson::Null));
    store
        .task_succeeded(SUCCESS_STEP1, &json!([4242]))
        .await
        .unwrap();
    let mut second = started(SUCCESS_ID, 1, "second", SUCCESS_STEP2, "noop", 4242);
    second.parent_id = Some(SUCCESS_STEP1.into());
    store.task_started(&second).await.unwrap();
    store
        .task_succeeded(SUCCESS_STEP2, &json!([4242]))
        .await
        .unwrap();
    store
        .set_workflow_status(SUCCESS_ID, TaskStatus::Success)
        .await
        .unwrap();
    assert_same_document(
        &raw(&db, "celery_taskmeta", SUCCESS_STEP1).await,
        "celery_taskmeta_success_step1.json",
    );
    assert_same_document(
        &raw(&db, "celery_taskmeta", SUCCESS_STEP2).await,
        "celery_taskmeta_success_step2.json",
    );
    assert_same_document(
        &raw(&db, "workflow_meta", SUCCESS_ID).await,
        "workflow_meta_success.json",
    );

    // A step that fails, is retried under the same id (published by itself), and fails.
    store
        .create_workflow(
            FAILURE_ID,
            APP_ID,
            &two_steps("fails", ("a", "fail_always"), ("b", "noop")),
            &[json!(11)],
        )
        .await
        .unwrap();
    let boom = TaskError {
        exc_type: "Boom".into(),
        exc_message: "dataset 11 is broken".into(),
        exc_module: "noop_tasks".into(),
    };
    let mut attempt = started(FAILURE_ID, 0, "a", FAILURE_TASK, "fail_always", 11);
    store.task_started(&attempt).await.unwrap();
    store.task_retry(FAILURE_TASK, &boom, 0).await.unwrap();
    assert_same_document(
        &raw(&db, "celery_taskmeta", FAILURE_TASK).await,
        "celery_taskmeta_retry.json",
    );
    attempt.retries = 1;
    attempt.parent_id = Some(FAILURE_TASK.into());
    store.task_started(&attempt).await.unwrap();
    store
        .task_failed(Some(FAILURE_ID), FAILURE_TASK, &boom)
        .await
        .unwrap();
    let failed = raw(&db, "celery_taskmeta", FAILURE_TASK).await;
    assert_same_document(&failed, "celery_taskmeta_failure.json");
    assert_eq!(
        failed.get_str("result").unwrap(),
        fixture_doc("celery_taskmeta_failure.json")
            .get_str("result")
            .unwrap(),
        "byte for byte"
    );
    assert_same_document(
        &raw(&db, "workflow_meta", FAILURE_ID).await,
        "workflow_meta_failure.json",
    );

    // Progress while STARTED: the same document, the report as its result.
    let progress = fixture_doc("celery_taskmeta_started_progress.json");
    let report: Value = serde_json::from_str(progress.get_str("result").unwrap()).unwrap();
    store
        .create_workflow(
            PROGRESS_ID,
            APP_ID,
            &two_steps("progress", ("inspect", "slow_progress"), ("b", "noop")),
            &[json!(12)],
        )
        .await
        .unwrap();
    store
        .task_started(&started(
            PROGRESS_ID,
            0,
            "inspect",
            PROGRESS_TASK,
            "slow_progress",
            12,
        ))
        .await
        .unwrap();
    store.task_progress(PROGRESS_TASK, &report).await.unwrap();
    let mut ours = raw(&db, "celery_taskmeta", PROGRESS_TASK).await;
    let written: Value = serde_json::from_str(ours.get_str("result").unwrap()).unwrap();
    assert_eq!(written, report);
    // The report's keys are in another order: compare the rest as text.
    ours.insert("result", progress.get_str("result").unwrap());
    assert_same_document(&ours, "celery_taskmeta_started_progress.json");
}

/// An app whose workflow store is `store` (the rest as the project configures it).
async fn app_with(project: &Project, store: MongoStore) -> Arc<App> {
    let app = Arc::try_unwrap(project.app().await).ok().unwrap();
    let store = Arc::new(store);
    Arc::new(App {
        store: store.clone(),
        space: store.clone(),
        scheduler_store: store,
        ..app
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_and_paused_python_workflows_are_resumed() {
    let Some(database) = TestDatabase::new() else {
        return;
    };
    let project = Project::new();
    let app = app_with(&project, store_for(&database).await).await;
    let db = database.db().await;
    // The failed workflow as captured, and a copy of it paused (its step revoked) by rhythm_api.
    let paused_id = "0aa5c0de-0000-4000-8000-000000000001";
    let paused_task = "0aa5c0de-0000-4000-8000-000000000002";
    let mut paused = fixture_doc("workflow_meta_failure.json");
    paused.insert("_id", paused_id);
    paused.insert("_status", "REVOKED");
    let steps = paused.get_array_mut("steps").unwrap();
    let runs = steps[0]
        .as_document_mut()
        .unwrap()
        .get_array_mut("task_runs")
        .unwrap();
    runs[0]
        .as_document_mut()
        .unwrap()
        .insert("task_id", paused_task);
    let mut revoked = fixture_doc("celery_taskmeta_failure.json");
    revoked.insert("_id", paused_task);
    revoked.insert("status", "REVOKED");
    revoked.insert("result", r#"{"exc_type": "TaskRevokedError", "exc_message": ["terminated"], "exc_module": "celery.exceptions"}"#);
    revoked
        .get_document_mut("kwargs")
        .unwrap()
        .insert("workflow_id", paused_id);
    insert(
        &db,
        "workflow_meta",
        vec![fixture_doc("workflow_meta_failure.json"), paused],
    )
    .await;
    insert(
        &db,
        "celery_taskmeta",
        vec![fixture_doc("celery_taskmeta_failure.json"), revoked],
    )
    .await;

    for (workflow_id, status, last_task) in [
        (FAILURE_ID, TaskStatus::Failure, FAILURE_TASK),
        (paused_id, TaskStatus::Revoked, paused_task),
    ] {
        let workflow = app.store.workflow(workflow_id).await.unwrap().unwrap();
        assert_eq!(
            engine::view(&app, workflow).await.unwrap().derived.status,
            status
        );

        let Resumed::Restarted { step, task_id } = engine::resume(&app, workflow_id).await.unwrap()
        else {
            panic!("{workflow_id} was not resumed");
        };
        assert_eq!(step, "a");
        let locked = raw(&db, "workflow_meta", workflow_id).await;
        assert!(
            matches!(locked.get("resume_lock"), Some(Bson::DateTime(_))),
            "{locked}"
        );
        assert_eq!(locked.get_str("_status").unwrap(), "STARTED");
        assert_eq!(
            engine::resume(&app, workflow_id).await.unwrap(),
            Resumed::AlreadyResuming
        );

        // The step goes out again with the arguments and kwargs of its last run.
        let delivery = app.broker.next().await.unwrap();
        let message = delivery.message().clone();
        assert_eq!(
            (message.id.as_str(), message.task.as_str()),
            (task_id.as_str(), "fail_always")
        );
        assert_eq!(message.args, [json!(11)]);
        assert_eq!(
            message.kwargs,
            object(json!({"workflow_id": workflow_id, "step": "a", "app_id": APP_ID}))
        );
        assert_eq!((message.queue.as_str(), message.priority), (QUEUE, 1));
        assert_eq!(message.parent_id.as_deref(), Some(last_task));

        // Run as a task that fails for good on this dataset (none has the id 11): the engine
        // records the start (a second run, the lock cleared the way sca-rhythm clears it) and
        // the failure. (`fail_always` itself is no task of this worker: it would be given back
        // to the queue for a worker that has it.)
        delivery.ack().await.unwrap();
        let mut failing = message.clone();
        failing.task = "delete_dataset".into();
        app.broker.publish(&failing).await.unwrap();
        let delivery = app.broker.next().await.unwrap();
        engine::handle(&app, delivery, &Display::quiet())
            .await
            .unwrap();
        let after = raw(&db, "workflow_meta", workflow_id).await;
        assert_eq!(after.get("resume_lock"), Some(&Bson::Null));
        assert_eq!(after.get_str("_status").unwrap(), "FAILURE");
        let workflow = app.store.workflow(workflow_id).await.unwrap().unwrap();
        let runs: Vec<&str> = workflow.steps[0]
            .runs
            .iter()
            .map(|r| r.task_id.as_str())
            .collect();
        assert_eq!(runs, [last_task, task_id.as_str()]);
        let view = engine::view(&app, workflow).await.unwrap();
        assert_eq!(view.derived.status, TaskStatus::Failure);
        assert_eq!(view.metas[&task_id].result["exc_type"], "ValidationFailed");
        let task = raw(&db, "celery_taskmeta", &task_id).await;
        assert_eq!(task.get_str("parent_id").unwrap(), last_task);
    }
}

/// Registers a dataset with a directory of one file, without a workflow.
async fn dataset(app: &App, project: &Project, name: &str) -> i64 {
    let origin = project.dataset(DatasetType::RawData, name, &[("a.txt", name.as_bytes())]);
    register_without_workflow(app, name, &origin).await
}

async fn ids_in(db: &mongodb::Database, collection: &str) -> Vec<String> {
    let docs: Vec<Document> = db
        .collection::<Document>(collection)
        .find(doc! {})
        .sort(doc! {"_id": 1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    docs.iter()
        .map(|d| d.get_str("_id").unwrap().to_owned())
        .collect()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_stale_workflows_deletes_unlinked_workflows_and_their_results() {
    let Some(database) = TestDatabase::new() else {
        return;
    };
    let mut project = Project::new();
    project.set_env("WORKERS__WORKFLOWS__PURGE__AGE_THRESHOLD_SECONDS", "0");
    project.set_env("WORKERS__WORKFLOWS__PURGE__MAX_PURGE_COUNT", "2");
    let app = app_with(&project, store_for(&database).await).await;
    let db = database.db().await;

    // Linked to a dataset: kept.
    let linked_dataset = dataset(&app, &project, "linked").await;
    let linked = engine::start(&app, "integrated", linked_dataset, Map::new())
        .await
        .unwrap();
    // Leftovers no dataset links to: one that ran a step, one that never ran, and one
    // written by sca-rhythm (its results too).
    let spec = app.definitions.get("integrated").unwrap().clone();
    for id in ["orphan-ran", "orphan-idle"] {
        app.store
            .create_workflow(id, APP_ID, &spec, &[json!(99)])
            .await
            .unwrap();
    }
    app.store
        .task_started(&started(
            "orphan-ran",
            0,
            "await stability",
            "orphan-task",
            "await_stability",
            99,
        ))
        .await
        .unwrap();
    app.store
        .task_succeeded("orphan-task", &json!([99]))
        .await
        .unwrap();
    let mut python = fixture_doc("workflow_meta_success.json");
    python.insert("name", "integrated");
    insert(&db, "workflow_meta", vec![python]).await;
    insert(
        &db,
        "celery_taskmeta",
        vec![
            fixture_doc("celery_taskmeta_success_step1.json"),
            fixture_doc("celery_taskmeta_success_step2.json"),
        ],
    )
    .await;
    // Another workflow name is never purged.
    app.store
        .create_workflow(
            "other-name",
            APP_ID,
            &two_steps("bars", ("a", "noop"), ("b", "noop")),
            &[],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;

    let run = |dry_run| {
        jobs::execute(
            Arc::clone(&app),
            JobName::PurgeStaleWorkflows,
            Trigger::Manual,
            None,
            JobOptions {
                dry_run,
                ..JobOptions::default()
            },
        )
    };
    let purged = |execution: &jobs::Execution| match &execution.report {
        Some(JobReport::PurgeWorkflows(report)) => sorted(report.purged.clone()),
        other => panic!("{other:?}"),
    };
    let all_workflows = sorted(vec![
        linked.clone(),
        "orphan-ran".into(),
        "orphan-idle".into(),
        SUCCESS_ID.into(),
        "other-name".into(),
    ]);

    // A dry run names what it would delete (oldest first, at most max_purge_count) and
    // deletes nothing.
    let dry = run(true).await.unwrap();
    assert_eq!(dry.outcome, RunOutcome::Success);
    assert_eq!(
        purged(&dry),
        sorted(vec![SUCCESS_ID.into(), "orphan-ran".into()])
    );
    assert_eq!(sorted(ids_in(&db, "workflow_meta").await), all_workflows);

    let first = run(false).await.unwrap();
    assert_eq!(
        purged(&first),
        sorted(vec![SUCCESS_ID.into(), "orphan-ran".into()])
    );
    let second = run(false).await.unwrap();
    assert_eq!(purged(&second), ["orphan-idle"]);
    assert!(purged(&run(false).await.unwrap()).is_empty());
    assert_eq!(
        sorted(ids_in(&db, "workflow_meta").await),
        sorted(vec![linked.clone(), "other-name".into()])
    );
    // Their task results and start arguments went with them.
    let tasks = ids_in(&db, "celery_taskmeta").await;
    for gone in ["orphan-task", SUCCESS_STEP1, SUCCESS_STEP2] {
        assert!(!tasks.contains(&gone.to_owned()), "{gone} in {tasks:?}");
    }
    assert_eq!(
        sorted(ids_in(&db, "workers_workflow_args").await),
        sorted(vec![linked.clone(), "other-name".into()])
    );
    // Every run is in the job history, in MongoDB.
    let history = app
        .scheduler_store
        .runs(Some("purge_stale_workflows"), 10)
        .await
        .unwrap();
    assert_eq!(history.len(), 4);
    assert!(history[3].dry_run && !history[0].dry_run);
    assert_eq!(history[2].counters, object(json!({"purged": 2})));
    assert_eq!(history[2].outcome, RunOutcome::Success);
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_starts_missing_workflows_and_repairs_stalled_python_ones() {
    let Some(database) = TestDatabase::new() else {
        return;
    };
    let project = Project::new();
    let app = app_with(&project, store_for(&database).await).await;
    let db = database.db().await;
    let orphan = dataset(&app, &project, "orphan").await;
    // sca-rhythm stored the first step's success but the second step's message was lost.
    let mut stalled = fixture_doc("workflow_meta_success.json");
    stalled.get_array_mut("steps").unwrap()[1]
        .as_document_mut()
        .unwrap()
        .remove("task_runs");
    stalled.insert("_status", "STARTED");
    insert(&db, "workflow_meta", vec![stalled]).await;
    insert(
        &db,
        "celery_taskmeta",
        vec![fixture_doc("celery_taskmeta_success_step1.json")],
    )
    .await;

    let execution = jobs::execute(
        Arc::clone(&app),
        JobName::Reconcile,
        Trigger::Manual,
        None,
        JobOptions::default(),
    )
    .await
    .unwrap();
    let Some(JobReport::Reconcile(report)) = &execution.report else {
        panic!("{execution:?}")
    };
    assert_eq!(execution.outcome, RunOutcome::Success);
    let started = report.started[0].workflow_id.clone().unwrap();
    assert_eq!((report.started.len(), report.started[0].id), (1, orphan));
    assert_eq!(report.repaired, [SUCCESS_ID]);

    // The new workflow: as sca-rhythm would have created it, linked, its first step queued.
    let doc = raw(&db, "workflow_meta", &started).await;
    assert_eq!(
        keys(&doc),
        [
            "_id",
            "created_at",
            "steps",
            "name",
            "app_id",
            "description",
            "_status"
        ]
    );
    assert_eq!(doc.get_str("_status").unwrap(), "PENDING");
    let steps = doc.get_array("steps").unwrap();
    assert_eq!(steps.len(), 6);
    let first = steps[0].as_document().unwrap();
    assert_eq!(
        first,
        &doc! {"name": "await stability", "task": "await_stability", "queue": format!("{}.q", app.settings.app_id)}
    );
    assert_eq!(
        raw(&db, "workers_workflow_args", &started)
            .await
            .get_array("args")
            .unwrap(),
        &vec![Bson::Int32(orphan as i32)]
    );
    assert!(
        app.registry
            .linked_workflows(std::slice::from_ref(&started))
            .await
            .unwrap()
            .contains(&started)
    );
    assert_eq!(
        app.broker
            .holds(&engine::start_task_id(&started))
            .await
            .unwrap(),
        Some(true)
    );
    // The stalled one: its second step published as its first step's success would have.
    assert_eq!(
        app.broker
            .holds(&engine::next_task_id(SUCCESS_STEP1))
            .await
            .unwrap(),
        Some(true)
    );

    // Nothing is left to do.
    let again = jobs::execute(
        Arc::clone(&app),
        JobName::Reconcile,
        Trigger::Manual,
        None,
        JobOptions::default(),
    )
    .await
    .unwrap();
    let Some(JobReport::Reconcile(report)) = &again.report else {
        panic!("{again:?}")
    };
    assert!(
        report.started.is_empty() && report.repaired.is_empty(),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_whole_workflow_runs_on_mongo() {
    let Some(database) = TestDatabase::new() else {
        return;
    };
    let project = Project::new();
    let app = app_with(&project, store_for(&database).await).await;
    let db = database.db().await;
    let id = dataset(&app, &project, "on_mongo").await;
    let workflow_id = engine::start(&app, "integrated", id, Map::new())
        .await
        .unwrap();
    run_until_idle(&app, 2, Duration::from_secs(180)).await;

    let workflow = app.store.workflow(&workflow_id).await.unwrap().unwrap();
    let view = engine::view(&app, workflow).await.unwrap();
    assert_eq!(
        (view.derived.status, view.derived.steps_done),
        (TaskStatus::Success, 6)
    );
    let doc = raw(&db, "workflow_meta", &workflow_id).await;
    assert_eq!(doc.get_str("_status").unwrap(), "SUCCESS");
    assert!(
        !doc.contains_key("resume_lock"),
        "never resumed: no lock key"
    );
    // One run per step; each result names its parent, the step before it.
    let mut parent: Option<String> = None;
    for step in &view.workflow.steps {
        assert_eq!(step.runs.len(), 1, "{}", step.spec.name);
        let task = raw(&db, "celery_taskmeta", &step.runs[0].task_id).await;
        assert_eq!(task.get_str("status").unwrap(), "SUCCESS");
        let result: Value = serde_json::from_str(task.get_str("result").unwrap()).unwrap();
        assert_eq!(
            result[0],
            json!(id),
            "every step returns the dataset id first"
        );
        NaiveDateTime::parse_from_str(task.get_str("date_done").unwrap(), CELERY_DATE).unwrap();
        assert_eq!(task.get_str("parent_id").ok(), parent.as_deref());
        assert_eq!(
            task.get_document("kwargs")
                .unwrap()
                .get_str("step")
                .unwrap(),
            step.spec.name
        );
        parent = Some(step.runs[0].task_id.clone());
    }
    let dataset = app.registry.get(id).await.unwrap();
    assert_eq!(
        state_names(&dataset).last().map(String::as_str),
        Some("STAGED")
    );
}

/// sca-rhythm's own view (`get_embellished_workflow(prev_task_runs=True)`) of the workflows
/// `ids`, computed by the real Python package; `None` when the Python peer is not set up.
fn sca_rhythm_views(database: &TestDatabase, ids: &[&str]) -> Option<Value> {
    let python = common::services::service_var("WORKERS_TEST_PYTHON")?;
    let script = r#"
import json, sys
from celery import Celery
from sca_rhythm import Workflow
uri, database, ids = sys.argv[1], sys.argv[2], sys.argv[3:]
app = Celery("interop", broker="memory://")
app.conf.update(result_backend=uri, mongodb_backend_settings={"database": database}, result_extended=True)
# sca-rhythm reports what it cannot parse with print(): keep that apart from the answer.
answer, sys.stdout = sys.stdout, sys.stderr
views = {i: Workflow(app, i).get_embellished_workflow(prev_task_runs=True) for i in ids}
answer.write(json.dumps(views, default=str))
"#;
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(&database.uri)
        .arg(&database.name)
        .args(ids)
        .output()
        .unwrap();
    assert!(out.status.success(), "sca-rhythm: {}", describe(&out));
    // (It also reports every `date_done: null` of a running task; that is its own habit.)
    assert!(
        !stderr(&out).contains("unable to parse result json"),
        "{}",
        describe(&out)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out))))
}

#[tokio::test(flavor = "multi_thread")]
async fn sca_rhythm_reads_what_the_store_writes() {
    let Some(database) = TestDatabase::new() else {
        return;
    };
    let store = store_for(&database).await;
    let spec = two_steps(
        "interop",
        ("first", "inspect_dataset"),
        ("second", "archive_dataset"),
    );
    let boom = TaskError {
        exc_type: "ChecksumMismatch".into(),
        exc_message: "a.txt: expected 0cc175b9, found 92eb5ffe".into(),
        exc_module: "workers.exceptions".into(),
    };
    for id in ["pending", "running", "failed", "resumed", "done"] {
        store
            .create_workflow(id, APP_ID, &spec, &[json!(3)])
            .await
            .unwrap();
    }
    // Running, reporting progress.
    store
        .task_started(&started(
            "running",
            0,
            "first",
            "running-1",
            "inspect_dataset",
            3,
        ))
        .await
        .unwrap();
    store.task_progress("running-1", &json!({"name": "files", "fraction_done": 0.25, "done": 1, "total": 4, "units": "files", "time_remaining_sec": null})).await.unwrap();
    // Failed in its second step after a retry.
    store
        .task_started(&started(
            "failed",
            0,
            "first",
            "failed-1",
            "inspect_dataset",
            3,
        ))
        .await
        .unwrap();
    store.task_succeeded("failed-1", &json!([3])).await.unwrap();
    let mut second = started("failed", 1, "second", "failed-2", "archive_dataset", 3);
    second.parent_id = Some("failed-1".into());
    store.task_started(&second).await.unwrap();
    store.task_retry("failed-2", &boom, 0).await.unwrap();
    second.retries = 1;
    store.task_started(&second).await.unwrap();
    store
        .task_failed(Some("failed"), "failed-2", &boom)
        .await
        .unwrap();
    // Failed, then resumed: locked, and its second step runs again.
    store
        .task_started(&started(
            "resumed",
            0,
            "first",
            "resumed-1",
            "inspect_dataset",
            3,
        ))
        .await
        .unwrap();
    store
        .task_failed(Some("resumed"), "resumed-1", &boom)
        .await
        .unwrap();
    assert!(store.lock_for_resume("resumed", Utc::now()).await.unwrap());
    // Finished.
    store
        .task_started(&started("done", 0, "first", "done-1", "inspect_dataset", 3))
        .await
        .unwrap();
    store.task_succeeded("done-1", &json!([3])).await.unwrap();
    store
        .task_started(&started(
            "done",
            1,
            "second",
            "done-2",
            "archive_dataset",
            3,
        ))
        .await
        .unwrap();
    store
        .task_succeeded("done-2", &json!([3, []]))
        .await
        .unwrap();
    store
        .set_workflow_status("done", TaskStatus::Success)
        .await
        .unwrap();

    let ids = ["pending", "running", "failed", "resumed", "done"];
    let Some(views) = sca_rhythm_views(&database, &ids) else {
        return;
    };
    for id in ids {
        let view = &views[id];
        let workflow = store.workflow(id).await.unwrap().unwrap();
        let metas = store
            .task_metas(&workflow.all_task_ids().into_iter().collect::<Vec<_>>())
            .await
            .unwrap();
        let derived = derive(&workflow, &metas);
        assert_eq!(view["status"], derived.status.as_str(), "{id}: {view}");
        assert_eq!(view["steps_done"], json!(derived.steps_done), "{id}");
        for (idx, step) in workflow.steps.iter().enumerate() {
            let theirs = &view["steps"][idx];
            assert_eq!(
                theirs["status"],
                derived.steps[idx].as_str(),
                "{id} step {idx}"
            );
            let Some(run) = step.last_run() else {
                assert_eq!(theirs["last_task_run"], Value::Null);
                continue;
            };
            let last = &theirs["last_task_run"];
            assert_eq!(last["_id"], run.task_id.as_str());
            assert_eq!(
                last["result"], metas[&run.task_id].result,
                "{id}: the result parses as JSON"
            );
            if metas[&run.task_id].status.is_done() {
                // sca-rhythm turned the string into a datetime: its format was the expected one.
                let shown = last["date_done"].as_str().unwrap();
                assert!(mongo_date(shown).is_some(), "{id}: date_done {shown}");
            }
        }
        assert_eq!(
            view["resume_lock"].is_null(),
            workflow.resume_lock.is_none(),
            "{id}"
        );
    }
    assert_eq!(views["failed"]["steps"][1]["last_task_run"]["retries"], 1);
    assert_eq!(
        views["failed"]["steps"][1]["last_task_run"]["parent_id"],
        "failed-1"
    );
    assert_eq!(
        views["running"]["steps"][0]["last_task_run"]["result"]["fraction_done"],
        0.25
    );
    assert_eq!(views["done"]["status"], "SUCCESS");
}

//! Interop with the original Python side, proven with its real packages (celery 5.2.7,
//! sca-rhythm, pymongo from `scripts/services.sh`): workflows started from Python run on
//! `workers worker`; workflows started by `workers jobs run watch` read correctly through
//! sca-rhythm; a Python Celery worker and the Rust worker share one workflow.

use crate::common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::bioloop_api::TestApi;
use crate::common::services::{TestDatabase, service_var};
use crate::common::{Project, Reap, describe, wait_for_exit};
use serde_json::{Value, json};
use workers::model::{CreateMethod, DatasetName, DatasetType};
use workers::registry::NewDataset;
use workers::store::{StepSpec, WorkflowSpec};

/// A project in the production profile (the Bioloop API, MongoDB, RabbitMQ), with the Python
/// peers at hand.
struct Production {
    project: Project,
    api: TestApi,
    db: TestDatabase,
    app_id: String,
    amqp: String,
    python: String,
    /// Queues to delete at the end, besides `<app_id>.q`.
    extra_queues: Vec<String>,
}

impl Production {
    /// `None` when the services are not set up (and not under CI, where that fails).
    fn new() -> Option<Production> {
        let amqp = service_var("WORKERS_TEST_AMQP_URL")?;
        let python = service_var("WORKERS_TEST_PYTHON")?;
        let db = TestDatabase::new()?;
        let api = TestApi::start();
        let app_id = format!(
            "interop-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut project = Project::new();
        for (key, value) in [
            ("WORKERS__REGISTRY__KIND", "http"),
            ("WORKERS__STORE__KIND", "mongo"),
            ("WORKERS__BROKER__KIND", "amqp"),
            ("WORKERS__API__BASE_URL", api.base_url().as_str()),
            ("APP_API_TOKEN", api.token()),
            ("WORKERS__AMQP__URL", &amqp),
            ("WORKERS__MONGO__URI", &db.uri),
            ("WORKERS__MONGO__DATABASE", &db.name),
            ("WORKERS__APP_ID", &app_id),
            ("WORKERS__LOG__LEVEL", "info"),
        ] {
            project.set_env(key, value);
        }
        Some(Production {
            project,
            api,
            db,
            app_id,
            amqp,
            python,
            extra_queues: Vec::new(),
        })
    }

    fn queue(&self) -> String {
        format!("{}.q", self.app_id)
    }

    /// The MongoDB URI with the database in its path, as Celery's backend takes it.
    fn python_mongo_uri(&self) -> String {
        let (base, query) = self.db.uri.split_once('?').unwrap_or((&self.db.uri, ""));
        let base = base.trim_end_matches('/');
        if query.is_empty() {
            format!("{base}/{}", self.db.name)
        } else {
            format!("{base}/{}?{query}", self.db.name)
        }
    }

    fn python_command(&self, args: &[&str]) -> Command {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/pyside.py");
        let mut cmd = Command::new(&self.python);
        cmd.arg(script)
            .args(args)
            .env("PYSIDE_AMQP_URL", &self.amqp)
            .env("PYSIDE_MONGO_URI", self.python_mongo_uri())
            .env("PYSIDE_APP_ID", &self.app_id);
        cmd
    }

    /// Runs a pyside command and returns what it printed.
    fn python(&self, args: &[&str]) -> Value {
        let out = self.python_command(args).output().unwrap();
        assert!(out.status.success(), "pyside {args:?}: {}", describe(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("pyside {args:?} printed no JSON ({e}): {}", describe(&out)))
    }

    fn start_from_python(&self, name: &str, steps: Value, dataset_id: i64) -> String {
        let started = self.python(&["start", name, &steps.to_string(), &dataset_id.to_string()]);
        started["workflow_id"].as_str().unwrap().to_owned()
    }

    fn embellished(&self, workflow_id: &str) -> Value {
        self.python(&["embellished", workflow_id])
    }

    /// Waits until sca-rhythm derives `status` for the workflow; returns the embellished view.
    fn wait_for(&self, workflow_id: &str, status: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.embellished(workflow_id);
            if view["status"] == status {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "workflow {workflow_id} did not reach {status}: {view:#}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn spawn_rust_worker(&self, args: &[&str]) -> (Child, Reap) {
        let mut full = vec!["worker"];
        full.extend_from_slice(args);
        // Node names are exclusive queues on the shared RabbitMQ: every Rust worker of these
        // tests gets one of its test's own, whatever else runs at the same time.
        let default_name = self.node_name("rust");
        if !args.contains(&"--hostname") {
            full.extend(["--hostname", default_name.as_str()]);
        }
        let child = self
            .project
            .command(&full)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let reap = Reap(child.id());
        (child, reap)
    }

    fn spawn_python_worker(&mut self, queue: &str) -> (Child, Reap) {
        if queue != self.queue() {
            self.extra_queues.push(queue.to_owned());
        }
        let child = self
            .python_command(&["worker", queue, "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let reap = Reap(child.id());
        (child, reap)
    }

    /// Registers a dataset through the API, as watch would.
    async fn register(&self, name: &str, files: &[(&str, &[u8])]) -> i64 {
        let origin = self.project.dataset(DatasetType::RawData, name, files);
        let app = self.project.app().await;
        let outcome = app
            .registry
            .bulk_create(&[NewDataset {
                name: DatasetName::normalize(name).unwrap(),
                dataset_type: DatasetType::RawData,
                origin_path: origin.to_string_lossy().into_owned(),
                create_method: CreateMethod::Scan,
                description: None,
                metadata: None,
            }])
            .await
            .unwrap();
        outcome.created[0].id
    }
}

impl Drop for Production {
    fn drop(&mut self) {
        let mut queues = self.extra_queues.clone();
        queues.push(self.queue());
        for queue in queues {
            let _ = Command::new("rabbitmqctl")
                .args(["delete_queue", &queue])
                .output();
        }
    }
}

/// Stops a worker with SIGTERM and returns its output; it must exit 0.
fn stop(child: Child) -> Output {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "worker did not stop cleanly: {}",
        describe(&out)
    );
    out
}

fn integrated_steps() -> Value {
    json!([
        {"name": "await stability", "task": "await_stability"},
        {"name": "inspect", "task": "inspect_dataset"},
        {"name": "archive", "task": "archive_dataset"},
        {"name": "stage", "task": "stage_dataset"},
        {"name": "validate", "task": "validate_dataset"},
        {"name": "setup_download", "task": "setup_dataset_download"},
    ])
}

/// Every step of a finished workflow as a Python worker would have left it: SUCCESS, one run,
/// the return value as the result, a naive ISO `date_done`, this worker's name.
fn assert_steps_succeeded(view: &Value, dataset_id: i64) {
    for step in view["steps"].as_array().unwrap() {
        assert_eq!(step["status"], "SUCCESS", "{step:#}");
        let run = &step["last_task_run"];
        assert_eq!(run["status"], "SUCCESS", "{step:#}");
        assert_eq!(run["args"], json!([dataset_id]), "{step:#}");
        assert_eq!(run["result"][0], json!(dataset_id), "{step:#}");
        assert_eq!(run["traceback"], Value::Null);
        assert_eq!(run["children"], json!([]));
        // sca-rhythm parsed date_done with %Y-%m-%dT%H:%M:%S.%f; a failed parse keeps the
        // string, which would not have the isoformat of a datetime.
        let done = run["date_done"].as_str().unwrap();
        assert!(
            chrono::NaiveDateTime::parse_from_str(done, "%Y-%m-%dT%H:%M:%S%.f").is_ok(),
            "{done}"
        );
        assert!(run["date_start"].is_string(), "{step:#}");
        assert_eq!(
            step["prev_task_runs"],
            json!([]),
            "one run per step: {step:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_started_from_python_runs_on_the_rust_worker() {
    let Some(prod) = Production::new() else {
        return;
    };
    let id = prod
        .register("py_started", &[("a.txt", b"alpha"), ("d/b.txt", b"beta")])
        .await;
    let workflow_id = prod.start_from_python("integrated", integrated_steps(), id);
    let before = prod.embellished(&workflow_id);
    assert_eq!(before["status"], "PENDING");
    assert_eq!(before["steps_done"], 0);

    let (worker, _reap) = prod.spawn_rust_worker(&["--concurrency", "2"]);
    let view = prod.wait_for(&workflow_id, "SUCCESS", Duration::from_secs(120));
    let out = stop(worker);
    assert_eq!(view["steps_done"], 6, "{view:#}");
    assert_eq!(view["total_steps"], 6);
    assert_steps_succeeded(&view, id);
    // validate returns (dataset_id, []) like the original.
    assert_eq!(view["steps"][4]["last_task_run"]["result"], json!([id, []]));

    // The API saw the lifecycle the Python workers would have recorded.
    assert_eq!(
        prod.api.stored_states(id),
        ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED"]
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("ERROR"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_started_by_watch_reads_correctly_through_sca_rhythm() {
    let Some(prod) = Production::new() else {
        return;
    };
    prod.project.dataset(
        DatasetType::RawData,
        "watched_run",
        &[("x.bin", b"0123456789")],
    );
    prod.project.run_ok(&["jobs", "run", "watch"]);

    // The dataset was registered through the API and linked to its workflow.
    let app = prod.project.app().await;
    let dataset = common::dataset_named(&app, DatasetType::RawData, "watched_run").await;
    assert_eq!(dataset.workflows.len(), 1);
    let workflow_id = dataset.workflows[0].clone();

    // Before any worker ran: sca-rhythm sees a PENDING integrated workflow of six steps.
    let view = prod.embellished(&workflow_id);
    assert_eq!(view["name"], "integrated");
    assert_eq!(view["app_id"], json!(prod.app_id));
    assert_eq!(view["status"], "PENDING");
    assert_eq!(view["steps_done"], 0);
    assert_eq!(view["total_steps"], 6);

    let (worker, _reap) = prod.spawn_rust_worker(&[]);
    let view = prod.wait_for(&workflow_id, "SUCCESS", Duration::from_secs(120));
    stop(worker);
    assert_eq!(view["steps_done"], 6);
    assert_steps_succeeded(&view, dataset.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_and_the_rust_worker_share_a_workflow() {
    let Some(mut prod) = Production::new() else {
        return;
    };
    let python_queue = format!("{}.py", prod.app_id);
    let rust_queue = format!("{}.rs", prod.app_id);
    // noop runs on both sides: Python, then Rust, then Python, then Rust again.
    let steps = json!([
        {"name": "py1", "task": "noop", "queue": python_queue},
        {"name": "rs1", "task": "noop", "queue": rust_queue},
        {"name": "py2", "task": "noop", "queue": python_queue},
        {"name": "rs2", "task": "noop", "queue": rust_queue},
    ]);
    let (python_worker, _reap_py) = prod.spawn_python_worker(&python_queue.clone());
    prod.extra_queues.push(rust_queue.clone());
    let (rust_worker, _reap_rs) = prod.spawn_rust_worker(&["--queues", &rust_queue]);
    let workflow_id = prod.start_from_python("mixed", steps, 42);
    let view = prod.wait_for(&workflow_id, "SUCCESS", Duration::from_secs(90));
    stop(rust_worker);
    let pid = rustix::process::Pid::from_raw(python_worker.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert_steps_succeeded(&view, 42);
    let workers: Vec<&str> = view["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["last_task_run"]["worker"].as_str().unwrap())
        .collect();
    assert!(workers[0].starts_with("py-"), "{workers:?}");
    assert!(!workers[1].starts_with("py-"), "{workers:?}");
    assert!(workers[2].starts_with("py-"), "{workers:?}");
    assert!(!workers[3].starts_with("py-"), "{workers:?}");
    // Each step was published by the one before it, whichever side ran it.
    for i in 1..4 {
        assert_eq!(
            view["steps"][i]["last_task_run"]["parent_id"],
            view["steps"][i - 1]["last_task_run"]["_id"],
            "{view:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_queues_again_a_first_step_that_was_never_queued() {
    let Some(mut prod) = Production::new() else {
        return;
    };
    prod.project
        .set_env("WORKERS__WORKFLOWS__STALLED_AFTER_SECONDS", "1");
    let app = prod.project.app().await;
    // A workflow whose creator died before queueing its first step.
    let workflow_id = uuid::Uuid::new_v4().to_string();
    let spec = WorkflowSpec {
        name: "lost".into(),
        description: None,
        steps: vec![StepSpec {
            name: "only".into(),
            task: "noop".into(),
            queue: None,
            kwargs: None,
            priority: None,
        }],
    };
    app.store
        .create_workflow(&workflow_id, &app.settings.app_id, &spec, &[json!(7)])
        .await
        .unwrap();
    // RabbitMQ cannot say whether the step is queued: a fresh workflow is left alone...
    let fresh = prod.project.run_ok(&["jobs", "run", "reconcile"]);
    assert!(
        !String::from_utf8_lossy(&fresh.stderr).contains("published it again"),
        "{}",
        describe(&fresh)
    );
    // ...one quiet for longer than workflows.stalled_after_seconds gets its step queued again.
    std::thread::sleep(Duration::from_millis(1500));
    let repaired = prod.project.run_ok(&["jobs", "run", "reconcile"]);
    assert!(
        String::from_utf8_lossy(&repaired.stderr).contains("published it again"),
        "{}",
        describe(&repaired)
    );
    let (worker, _reap) = prod.spawn_rust_worker(&[]);
    let view = prod.wait_for(&workflow_id, "SUCCESS", Duration::from_secs(60));
    stop(worker);
    assert_steps_succeeded(&view, 7);
}

impl Production {
    /// AsyncResult's view of a task, polled until its state is one of `states`.
    fn wait_for_result(&self, task_id: &str, states: &[&str], timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.python(&["result", task_id]);
            if states.iter().any(|s| result["state"] == *s) {
                return result;
            }
            assert!(
                Instant::now() < deadline,
                "task {task_id} did not reach {states:?}: {result}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_upload_integrity_sent_from_python_runs_on_the_rust_worker_and_reads_back() {
    use workers::registry::uploads::{NewUpload, UploadLogPatch, UploadStatus};
    let Some(prod) = Production::new() else {
        return;
    };
    let uploads = tempfile::tempdir().unwrap();
    prod.api.set_uploads(common::bioloop_api::UploadSettings {
        root: uploads.path().to_path_buf(),
        notifications: false,
    });
    let app = prod.project.app().await;
    let log = app
        .registry
        .create_upload(&NewUpload {
            name: DatasetName::normalize("from the ui").unwrap(),
            dataset_type: DatasetType::RawData,
            upload_dir: String::new(),
        })
        .await
        .unwrap();
    let id = log.dataset_id;
    let origin = std::path::PathBuf::from(log.origin_path.unwrap());
    common::write_file(&origin.join("lane 1/r1.fastq"), b"@r\nA\n+\nI\n");
    common::write_file(&origin.join("é/empty"), b"");
    let hash = workers::compute::manifest::blake3_manifest(
        &origin,
        &workers::cancel::CancellationToken::new(),
        None,
    )
    .unwrap()
    .hash;
    let metadata = json!({"checksum": {"manifest_hash": hash}});
    app.registry
        .complete_upload(id, "p", metadata.as_object())
        .await
        .unwrap();
    // What the original's manage_upload_workflows does: VERIFYING with the task id first, then
    // `apply_async` with that id.
    let task_id = uuid::Uuid::new_v4().to_string();
    let mut meta = serde_json::Map::new();
    meta.insert("verification_task_id".into(), json!(task_id));
    app.registry
        .update_upload_log(
            id,
            &UploadLogPatch::status(UploadStatus::Verifying).with_metadata(meta),
        )
        .await
        .unwrap();
    let sent = prod.python(&[
        "send",
        "verify_upload_integrity",
        &json!([id]).to_string(),
        &task_id,
    ]);
    assert_eq!(sent["task_id"], json!(task_id));

    let (worker, _reap) = prod.spawn_rust_worker(&[]);
    let result = prod.wait_for_result(&task_id, &["SUCCESS", "FAILURE"], Duration::from_secs(60));
    stop(worker);
    assert_eq!(
        result,
        json!({"state": "SUCCESS", "result": {"status": "success", "dataset_id": id}})
    );
    let log = app.registry.upload_log(id).await.unwrap().unwrap();
    assert_eq!(log.status, UploadStatus::Verified);
    assert!(log.metadata["worker_process_id"].is_i64(), "{log:?}");
    let lines = prod.api.process_logs(&task_id);
    assert!(
        lines.iter().any(|(_, m)| m.contains("BLAKE3 manifest")),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_only_python_workers_have_runs_there_and_is_never_failed_by_the_rust_worker() {
    let Some(mut prod) = Production::new() else {
        return;
    };
    let queue = prod.queue();
    // The Rust worker first, so that it is offered messages it cannot run.
    let (rust_worker, _reap_rs) = prod.spawn_rust_worker(&[]);
    std::thread::sleep(Duration::from_secs(1));
    let task_ids: Vec<String> = (0..6)
        .map(|i| {
            prod.python(&["send", "site_task", &json!([100 + i]).to_string()])["task_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let (python_worker, _reap_py) = prod.spawn_python_worker(&queue);
    for (i, task_id) in task_ids.iter().enumerate() {
        let result =
            prod.wait_for_result(task_id, &["SUCCESS", "FAILURE"], Duration::from_secs(90));
        assert_eq!(result["state"], "SUCCESS", "{result}");
        assert_eq!(result["result"]["ran_on"], "python");
        assert_eq!(result["result"]["dataset_id"], 100 + i);
    }
    let out = stop(rust_worker);
    let pid = rustix::process::Pid::from_raw(python_worker.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        log.matches("does not implement task `site_task`").count(),
        1,
        "logged once per task name: {log}"
    );
    assert!(!log.contains("NotRegistered"), "{log}");
}

impl Production {
    /// A Rust worker's `--hostname`: `{role}-{this test's id}@%h`. Unique per test, so that
    /// test runs sharing one RabbitMQ never share a node's mailbox (it is exclusive).
    fn node_name(&self, role: &str) -> String {
        format!("{role}-{}@%h", &self.app_id["interop-".len()..])
    }

    /// The start of the node name of this test's Python workers (`py-{app_id}-{pid}@host`).
    fn python_node_prefix(&self) -> String {
        format!("py-{}-", self.app_id)
    }

    /// Polls `app.control.ping()` from Python until a node whose name starts with each of
    /// `prefixes` answers; returns their names in that order.
    fn wait_for_nodes(&self, prefixes: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let replies = self.python(&["ping"]);
            let nodes: Vec<String> = replies
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_object)
                .flat_map(|reply| reply.keys().cloned())
                .collect();
            let found: Vec<String> = prefixes
                .iter()
                .filter_map(|p| nodes.iter().find(|n| n.starts_with(p)).cloned())
                .collect();
            if found.len() == prefixes.len() {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "not every node answered ping: {replies}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Starts a workflow of two `noop` steps (`hold`, `after`) from Python whose first step
    /// holds for `hold_seconds`.
    fn start_held_drill(&self, hold_seconds: u32) -> String {
        let steps = json!([{"name": "hold", "task": "noop"}, {"name": "after", "task": "noop"}]);
        let started = self.python(&[
            "start",
            "drill",
            &steps.to_string(),
            &json!([7, hold_seconds]).to_string(),
        ]);
        started["workflow_id"].as_str().unwrap().to_owned()
    }

    /// Waits until `node` runs a task, as `app.control.inspect().active()` shows it.
    fn wait_for_active(&self, node: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let active = self.python(&["inspect", "active", &json!([node]).to_string()]);
            if let Some(task) = active[node].as_array().and_then(|tasks| tasks.first()) {
                return task.clone();
            }
            assert!(Instant::now() < deadline, "{node} runs nothing: {active}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_rust_workers_answer_the_fleets_remote_control_side_by_side() {
    let Some(mut prod) = Production::new() else {
        return;
    };
    // The Python worker consumes a queue of its own, so the held step runs on the Rust one.
    let python_queue = format!("{}.py.q", prod.app_id);
    let (python_worker, _python_reap) = prod.spawn_python_worker(&python_queue);
    let rust_name = prod.node_name("rust-ctl");
    let (rust_worker, _rust_reap) =
        prod.spawn_rust_worker(&["--hostname", &rust_name, "--concurrency", "2"]);
    let rust_prefix = rust_name.trim_end_matches("%h").to_owned();
    let python_prefix = prod.python_node_prefix();
    let nodes = prod.wait_for_nodes(&[&python_prefix, &rust_prefix]);
    let (python_node, rust_node) = (&nodes[0], &nodes[1]);
    let both = json!(nodes).to_string();
    // What no node can read is logged and ignored: both go on answering.
    prod.python(&["malformed"]);
    assert_eq!(prod.wait_for_nodes(&[&python_prefix, &rust_prefix]), nodes);

    let registered = prod.python(&["inspect", "registered", &both]);
    let rust_tasks = registered[rust_node].as_array().unwrap();
    assert!(rust_tasks.contains(&json!("inspect_dataset")) && rust_tasks.contains(&json!("noop")));
    assert!(
        registered[python_node]
            .as_array()
            .unwrap()
            .contains(&json!("site_task"))
    );
    let queues = prod.python(&["inspect", "active_queues", &both]);
    assert_eq!(queues[rust_node][0]["name"], json!(prod.queue()));
    assert_eq!(
        queues[rust_node][0]["queue_arguments"],
        json!({"x-max-priority": 10})
    );

    // Celery's own command line and the operator command see both workers.
    let out = Command::new(&prod.python)
        .args(["-m", "celery", "-A", "pyside", "inspect", "ping"])
        // Named nodes: the answer comes once both have replied.
        .args(["--destination", &nodes.join(","), "--timeout", "15"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop"))
        .env("PYSIDE_AMQP_URL", &prod.amqp)
        .env("PYSIDE_MONGO_URI", prod.python_mongo_uri())
        .env("PYSIDE_APP_ID", &prod.app_id)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "celery inspect ping: {}",
        describe(&out)
    );
    assert!(
        printed.contains(rust_node.as_str()) && printed.contains(python_node.as_str()),
        "{printed}"
    );
    let out = prod
        .project
        .command(&["control", "ping", "--format", "json", "--timeout", "15"])
        .args(["--destination", python_node, "--destination", rust_node])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "workers control ping: {}",
        describe(&out)
    );
    let pongs: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pongs[rust_node], json!({"ok": "pong"}));
    assert_eq!(pongs[python_node], json!({"ok": "pong"}));

    // A step held on the Rust worker, seen running, revoked with terminate from Python.
    let workflow_id = prod.start_held_drill(600);
    let task = prod.wait_for_active(rust_node);
    assert_eq!(task["name"], "noop");
    assert_eq!(task["args"], json!([7, 600]));
    let task_id = task["id"].as_str().unwrap().to_owned();
    let revoked_at = Instant::now();
    prod.python(&["revoke", &task_id]);
    let result = loop {
        let result = prod.python(&["result", &task_id]);
        if result["state"] == "REVOKED" {
            break result;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(20),
            "not revoked: {result}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = revoked_at.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "revoke to REVOKED took {took:?}"
    );
    assert_eq!(result["result"]["exc_type"], "TaskRevokedError");
    assert_eq!(result["result"]["exc_message"], json!(["terminated"]));
    let app = prod.project.app().await;
    let metas = app
        .store
        .task_metas(std::slice::from_ref(&task_id))
        .await
        .unwrap();
    assert_eq!(
        metas[&task_id].result,
        json!({"exc_type": "TaskRevokedError", "exc_message": ["terminated"], "exc_module": "celery.exceptions"})
    );
    let view = prod.embellished(&workflow_id);
    assert!(
        view["steps"][1]["last_task_run"].is_null(),
        "a terminated step was followed: {view:#}"
    );
    let revoked = prod.python(&["inspect", "revoked", &both]);
    assert!(
        revoked[rust_node]
            .as_array()
            .unwrap()
            .contains(&json!(task_id))
    );
    assert!(
        revoked[python_node]
            .as_array()
            .unwrap()
            .contains(&json!(task_id))
    );

    // Shut down by name from Python: the Rust worker exits cleanly; the Python one stays.
    prod.python(&["shutdown", &json!([rust_node]).to_string()]);
    let out = wait_for_exit(rust_worker, Duration::from_secs(20));
    let logged = String::from_utf8_lossy(&out.stderr);
    assert!(
        logged.contains("Ignored a control message that is not a kombu pidbox request"),
        "{logged}"
    );
    assert!(
        out.status.success(),
        "the Rust worker did not shut down cleanly: {}",
        describe(&out)
    );
    let left = prod.wait_for_nodes(&[&python_prefix]);
    assert_eq!(&left[0], python_node);
    let _ = stop(python_worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sca_rhythms_pause_and_resume_work_on_a_rust_worker() {
    let Some(prod) = Production::new() else {
        return;
    };
    let rust_name = prod.node_name("rust-pause");
    let (rust_worker, _reap) = prod.spawn_rust_worker(&["--hostname", &rust_name]);
    let nodes = prod.wait_for_nodes(&[rust_name.trim_end_matches("%h")]);
    let workflow_id = prod.start_held_drill(8);
    let task = prod.wait_for_active(&nodes[0]);
    let paused = prod.python(&["pause", &workflow_id]);
    assert_eq!(paused["paused"], true, "{paused}");
    assert_eq!(paused["revoked_step"]["task_id"], task["id"]);
    let view = prod.wait_for(&workflow_id, "REVOKED", Duration::from_secs(30));
    assert_eq!(
        view["steps"][0]["last_task_run"]["status"], "REVOKED",
        "{view:#}"
    );
    assert!(
        view["steps"][1]["last_task_run"].is_null(),
        "a paused workflow went on: {view:#}"
    );

    let resumed = prod.python(&["resume", &workflow_id]);
    assert_eq!(resumed["resumed"], true, "{resumed}");
    let view = prod.wait_for(&workflow_id, "SUCCESS", Duration::from_secs(90));
    // The paused step ran again, under a new task id, and the workflow went on.
    assert_eq!(
        view["steps"][0]["prev_task_runs"].as_array().map(Vec::len),
        Some(1),
        "{view:#}"
    );
    assert_eq!(view["steps"][0]["last_task_run"]["status"], "SUCCESS");
    assert_eq!(view["steps"][1]["last_task_run"]["status"], "SUCCESS");
    let _ = stop(rust_worker);
}

/// Kills a child when dropped and waits for it, so that no zombie is left behind.
struct ReapChild(Child);

impl Drop for ReapChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free TCP port on the loopback interface.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads `path` from Flower's HTTP API until `accept` takes the answer.
async fn flower_until(port: u16, path: &str, accept: impl Fn(&Value) -> bool) -> Value {
    // The project's TLS stack (rustls with ring), as its own clients install it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Ok(response) = client
            .get(format!("http://127.0.0.1:{port}{path}"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            && let Ok(body) = response.json::<Value>().await
        {
            if accept(&body) {
                return body;
            }
            last = body;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("Flower's {path} never showed what was expected; last: {last:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_sees_the_rust_worker_online_and_the_tasks_it_ran() {
    let Some(prod) = Production::new() else {
        return;
    };
    let port = free_port();
    let flower = Command::new(&prod.python)
        .args([
            "-m",
            "celery",
            "-A",
            "pyside",
            "flower",
            "--address=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop"))
        .env("PYSIDE_AMQP_URL", &prod.amqp)
        .env("PYSIDE_MONGO_URI", prod.python_mongo_uri())
        .env("PYSIDE_APP_ID", &prod.app_id)
        .env("FLOWER_UNAUTHENTICATED_API", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed when the test ends; its exit is of no interest.
    let _flower = ReapChild(flower);
    let rust_name = prod.node_name("rust-ev");
    let (rust_worker, _reap) = prod.spawn_rust_worker(&["--hostname", &rust_name, "-E"]);
    let node = prod
        .wait_for_nodes(&[rust_name.trim_end_matches("%h")])
        .remove(0);

    // Online, from its heartbeats.
    let status = flower_until(port, "/api/workers?status=true", |b| b[&node] == true).await;
    assert_eq!(status[&node], true);
    // Described through inspect.
    let workers = flower_until(port, "/api/workers?refresh=true", |b| {
        b[&node]["registered"].is_array()
    })
    .await;
    assert!(
        workers[&node]["registered"]
            .as_array()
            .unwrap()
            .contains(&json!("noop"))
    );
    assert_eq!(workers[&node]["stats"]["pool"]["max-concurrency"], 2);

    // A workflow run on it: its tasks, with their states, from the task events.
    let steps = json!([{"name": "one", "task": "noop"}, {"name": "two", "task": "fail_once"}]);
    let started = prod.python(&["start", "events", &steps.to_string(), "7"]);
    let workflow_id = started["workflow_id"].as_str().unwrap().to_owned();
    // `fail_once` is a Python task: only `noop` runs here.
    let view = loop {
        let view = prod.embellished(&workflow_id);
        if view["steps"][0]["last_task_run"]["status"] == "SUCCESS" {
            break view;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let task_id = view["steps"][0]["last_task_run"]["_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let tasks = flower_until(port, "/api/tasks", |b| b[&task_id]["state"] == "SUCCESS").await;
    let task = &tasks[&task_id];
    assert_eq!(task["name"], "noop");
    assert_eq!(task["worker"], json!(node));
    // As a Celery worker reports it: the message's `argsrepr`, the `saferepr` of the tuple
    // sca-rhythm sends.
    assert_eq!(task["args"], "(7,)");
    assert!(task["runtime"].as_f64().unwrap() >= 0.0);
    assert!(task["received"].as_f64().is_some() && task["started"].as_f64().is_some());

    // Offline once it stops.
    let _ = stop(rust_worker);
    flower_until(port, "/api/workers?status=true", |b| b[&node] == false).await;
}

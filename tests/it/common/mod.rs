//! The test harness: a throw-away project (configuration, workflow definitions, source
//! directories, database) in a temporary directory, driven through the real binary or the
//! library.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod postgres;
pub mod services;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::time::Duration;

use workers::app::App;
use workers::config::{LoadOptions, Settings};
use workers::model::DatasetType;
use workers::registry::{Dataset, DatasetQuery};

pub mod bioloop_api;

pub const SALT: &str = "test-salt";

/// A project directory laid out like the repository: `config/`, `jobs/`, `examples/`, `var/`.
pub struct Project {
    pub dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
}

impl Project {
    pub fn new() -> Project {
        let dir = tempfile::Builder::new()
            .prefix("workers-test-")
            .tempdir()
            .expect("temp dir");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        for sub in ["config", "jobs"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            for entry in std::fs::read_dir(repo.join(sub)).unwrap() {
                let entry = entry.unwrap();
                if entry.path().extension().is_some_and(|e| e == "toml") {
                    std::fs::copy(entry.path(), dir.path().join(sub).join(entry.file_name()))
                        .unwrap();
                }
            }
        }
        for t in DatasetType::ALL {
            std::fs::create_dir_all(source_dir_in(dir.path(), t)).unwrap();
        }
        let mut env = BTreeMap::new();
        // Data written by the test is "stable" at once; retries are quick.
        env.insert(
            "WORKERS__REGISTRATION__RECENCY_THRESHOLD_SECONDS".into(),
            "0".into(),
        );
        env.insert(
            "WORKERS__REGISTRATION__WAIT_BETWEEN_STABILITY_CHECKS_SECONDS".into(),
            "1".into(),
        );
        env.insert("WORKERS__RETRY__DEFAULT__DELAY_SECONDS".into(), "0".into());
        env.insert("WORKERS__PARALLELISM".into(), "2".into());
        env.insert("ALIAS_SALT".into(), SALT.into());
        Project { dir, env }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn source(&self, t: DatasetType) -> PathBuf {
        source_dir_in(self.dir.path(), t)
    }

    /// Sets an environment variable for both the binary and `settings()`.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.insert(key.into(), value.into());
    }

    pub fn remove_env(&mut self, key: &str) {
        self.env.remove(key);
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            config_dir: self.path("config"),
            app_env: self.env.get("APP_ENV").cloned(),
            env: self.env.clone(),
            problems: vec![],
            flags: vec![],
        }
    }

    pub fn settings(&self) -> Settings {
        workers::config::load(&self.load_options())
            .unwrap_or_else(|e| panic!("test configuration: {e}"))
    }

    /// The app over the project's database, as the binary builds it.
    pub async fn app(&self) -> Arc<App> {
        App::build(self.settings()).await.expect("app")
    }

    /// The binary, with the project's configuration and environment (and nothing inherited
    /// that could change the configuration).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_workers"));
        cmd.current_dir(self.root())
            .arg("--config-dir")
            .arg(self.path("config"))
            .args(args);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            let original = [
                "APP_ENV",
                "ALIAS_SALT",
                "APP_API_TOKEN",
                "API_BASE_URL",
                "QUEUE_URL",
                "QUEUE_USER",
                "QUEUE_PASS",
            ];
            if name.starts_with("WORKERS")
                || name.starts_with("MONGO_")
                || original.contains(&&*name)
            {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(&self.env);
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run workers")
    }

    /// Runs the binary and fails the test unless it exits 0.
    pub fn run_ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "workers {args:?} failed: {}",
            describe(&out)
        );
        out
    }

    /// Creates `files` (relative path, content) below `<source>/<name>`.
    pub fn dataset(&self, t: DatasetType, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let root = self.source(t).join(name);
        std::fs::create_dir_all(&root).unwrap();
        for (rel, content) in files {
            write_file(&root.join(rel), content);
        }
        root
    }
}

fn source_dir_in(root: &Path, t: DatasetType) -> PathBuf {
    root.join(match t {
        DatasetType::RawData => "examples/raw_data",
        DatasetType::DataProduct => "examples/data_products",
    })
}

pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn write_file(path: &Path, content: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, content).unwrap();
}

/// Deterministic bytes that do not compress to nothing.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

/// MD5 of a file by `md5sum`: an oracle independent of the code under test.
pub fn md5sum(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().expect("md5sum");
    assert!(out.status.success(), "md5sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// SHA-256 hex of a string by `sha256sum`.
pub fn sha256_hex(text: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Registers `origin` as a scanned RAW_DATA dataset straight in the registry, with no
/// workflow: what a crash between registration and workflow start leaves behind.
pub async fn register_without_workflow(app: &App, name: &str, origin: &Path) -> i64 {
    let outcome = app
        .registry
        .bulk_create(&[workers::registry::NewDataset {
            name: workers::model::DatasetName::normalize(name).unwrap(),
            dataset_type: DatasetType::RawData,
            origin_path: origin.to_string_lossy().into_owned(),
            create_method: workers::model::CreateMethod::Scan,
            description: None,
            metadata: None,
        }])
        .await
        .unwrap();
    outcome.created[0].id
}

/// The one live dataset of that name and type.
pub async fn dataset_named(app: &App, t: DatasetType, name: &str) -> Dataset {
    let name = workers::model::DatasetName::normalize(name).unwrap();
    let query = DatasetQuery {
        dataset_type: Some(t),
        name: Some(name.clone()),
        ..Default::default()
    };
    let mut found = app.registry.find(&query).await.unwrap();
    assert_eq!(found.len(), 1, "datasets named {name}: {found:?}");
    found.remove(0)
}

pub fn state_names(dataset: &Dataset) -> Vec<String> {
    dataset.states.iter().map(|s| s.state.clone()).collect()
}

/// Every file row of a dataset.
pub async fn file_rows(app: &App, id: i64) -> Vec<workers::model::FileRecord> {
    let mut rows = Vec::new();
    let mut pages = workers::registry::FilePages::new(app.registry.as_ref(), id, 1000);
    while let Some(page) = pages.next().await.unwrap() {
        rows.extend(page);
    }
    rows
}

/// Regular files and symbolic links below `root`, relative, sorted.
pub fn tree_files(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_type().is_dir())
        .map(|e| {
            e.path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    out.sort();
    out
}

/// Runs `cmd` so that even root cannot read files it lacks permission for (the capabilities
/// that bypass permission checks are dropped), when the tests run as root.
pub fn without_dac_override(cmd: Command) -> Command {
    if !rustix::process::geteuid().is_root() {
        return cmd;
    }
    let mut wrapped = Command::new("setpriv");
    wrapped
        .arg("--bounding-set=-dac_override,-dac_read_search")
        .arg("--inh-caps=-dac_override,-dac_read_search")
        .arg(cmd.get_program());
    wrapped.args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}

/// Kills the process when dropped, so a failing test leaves no process behind.
pub struct Reap(pub u32);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Runs `concurrency` worker slots in this process until no workflow is active, failing the
/// test after `limit`.
pub async fn run_until_idle(app: &Arc<App>, concurrency: usize, limit: Duration) {
    use workers::workflow::worker::{self, Until, WorkerOptions};
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let opts = WorkerOptions {
        concurrency,
        until: Until::Idle,
        queues: None,
        shutdown_grace: Duration::ZERO,
        node_name: "workers@test".into(),
        send_events: false,
    };
    tokio::time::timeout(
        limit,
        worker::run(Arc::clone(app), opts, stop, workers::ui::Display::quiet()),
    )
    .await
    .expect("workflows finish")
    .unwrap();
}

/// A small dataset (two files) registered directly in the registry, without a workflow.
pub async fn register_small(app: &App, project: &Project, name: &str) -> i64 {
    let origin = project.dataset(
        DatasetType::RawData,
        name,
        &[("a.txt", b"alpha"), ("d/b.txt", b"beta")],
    );
    register_without_workflow(app, name, &origin).await
}

/// A workflow with its derived status.
pub async fn view_of(app: &App, workflow_id: &str) -> workers::workflow::engine::WorkflowView {
    workers::workflow::engine::view(app, app.store.workflow(workflow_id).await.unwrap().unwrap())
        .await
        .unwrap()
}

/// Creates a two-step workflow of `noop` steps (`first`, `second`) for dataset 7 whose first
/// step holds for `hold_seconds`, and queues that step; returns the workflow id.
pub async fn start_noop_workflow(app: &Arc<App>, hold_seconds: f64) -> String {
    use workers::store::{StepSpec, WorkflowSpec};
    let workflow_id = uuid::Uuid::new_v4().to_string();
    let step = |name: &str| StepSpec {
        name: name.into(),
        task: "noop".into(),
        queue: None,
        kwargs: None,
        priority: None,
    };
    let spec = WorkflowSpec {
        name: "drill".into(),
        description: None,
        steps: vec![step("first"), step("second")],
    };
    app.store
        .create_workflow(
            &workflow_id,
            &app.settings.app_id,
            &spec,
            &[serde_json::json!(7), serde_json::json!(hold_seconds)],
        )
        .await
        .unwrap();
    // A workflow with nothing queued gets its step published by the repair.
    let repaired = workers::workflow::engine::repair_stalled(app)
        .await
        .unwrap();
    assert_eq!(repaired, std::slice::from_ref(&workflow_id));
    workflow_id
}

/// Waits for `child` to end on its own, failing the test after `limit`.
pub fn wait_for_exit(mut child: Child, limit: Duration) -> Output {
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the process did not end within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// Installs the `hsi` stand-in (`tests/support/hsi`) as `dir/hsi`, run by the Python
/// interpreter itself rather than through `#!/usr/bin/env python3`: where `python3` is a
/// version manager's shim, that shim costs more than the stand-in's own work, once per command.
/// The stand-in reads its settings from `hsi.env` beside the path it was invoked by.
pub fn install_hsi_stand_in(dir: &Path) -> PathBuf {
    static INTERPRETER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let interpreter = INTERPRETER.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 runs the hsi stand-in");
        assert!(out.status.success(), "python3: {}", describe(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    });
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/hsi")).unwrap();
    let (_, body) = source.split_once('\n').unwrap();
    let hsi = dir.join("hsi");
    std::fs::write(&hsi, format!("#!{interpreter}\n{body}")).unwrap();
    std::fs::set_permissions(&hsi, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    hsi
}

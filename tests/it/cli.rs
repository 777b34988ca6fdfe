//! The command line as operators use it: configuration display, logs, look-ups.

use crate::common::*;
use workers::model::DatasetType;

#[test]
fn config_show_prints_the_effective_configuration_with_secrets_redacted() {
    let mut project = Project::new();
    project.set_env("WORKERS__WORKER__CONCURRENCY", "5");
    let out = project.run_ok(&["config", "show", "--format", "json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["worker"]["concurrency"], 5);
    assert_eq!(shown["secrets"]["alias_salt"], "<redacted>");
    assert!(!stdout(&out).contains(SALT));
    // Relative paths are resolved against the project, wherever the command runs.
    let stage = shown["paths"]["RAW_DATA"]["stage"].as_str().unwrap();
    assert_eq!(stage, project.path("var/stage/raw_data").to_str().unwrap());
    let toml = stdout(&project.run_ok(&["config", "show"]));
    assert!(toml.contains("concurrency = 5"), "{toml}");
    assert!(stdout(&project.run_ok(&["config", "check"])).contains("configuration is valid"));
}

#[test]
fn json_logs_carry_the_dataset_workflow_and_step_of_each_line() {
    let project = Project::new();
    project.dataset(DatasetType::RawData, "logged", &[("a.txt", b"a")]);
    let out = project.run_ok(&["--log-format", "json", "jobs", "run", "watch", "--wait"]);
    let lines: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let started: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "Step started.")
        .collect();
    assert_eq!(started.len(), 6);
    for line in started {
        let span = &line["span"];
        assert_eq!(span["dataset_id"], 1, "{line}");
        assert!(
            span["workflow_id"].as_str().is_some_and(|w| w.len() == 36),
            "{line}"
        );
        assert!(span["step"].as_str().is_some(), "{line}");
        assert!(line["task_id"].as_str().is_some(), "{line}");
    }
}

#[test]
fn datasets_and_workflows_can_be_looked_up_as_json() {
    let project = Project::new();
    project.dataset(DatasetType::DataProduct, "looked up", &[("a.txt", b"a")]);
    project.run_ok(&["jobs", "run", "watch", "--wait"]);
    let out = project.run_ok(&["datasets", "show", "looked up", "--format", "json"]);
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["name"], "looked-up");
    assert_eq!(d["type"], "DATA_PRODUCT");
    assert_eq!(
        d["states"][0]["state"], "STAGED",
        "newest first, as the API returns them"
    );
    assert_eq!(d["bundle"]["name"], "looked-up.tar");
    let by_id = project.run_ok(&["datasets", "show", "1", "--format", "json"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&by_id.stdout).unwrap()["id"],
        1
    );

    let workflow_id = d["workflows"][0]["id"].as_str().unwrap();
    let out = project.run_ok(&["workflows", "show", workflow_id, "--format", "json"]);
    let w: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(w["status"], "SUCCESS");
    assert_eq!(w["steps_done"], 6);
    assert_eq!(w["dataset_id"], 1);
    assert_eq!(w["steps"][1]["name"], "inspect");
    assert_eq!(w["steps"][1]["attempts"], 1);
    let listed = project.run_ok(&["workflows", "list", "--format", "json"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&listed.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let table = stdout(&project.run_ok(&["workflows", "show", workflow_id]));
    assert!(
        table.contains("setup_dataset_download") && table.contains("SUCCESS"),
        "{table}"
    );
}

#[test]
fn a_staged_path_outside_the_root_is_an_error_not_a_hang() {
    let mut project = Project::new();
    // The staging area lies outside paths.root.
    let elsewhere = tempfile::tempdir().unwrap();
    let root = project.path("published");
    std::fs::create_dir_all(&root).unwrap();
    project.set_env("WORKERS__PATHS__ROOT", root.to_str().unwrap());
    project.set_env(
        "WORKERS__PATHS__RAW_DATA__STAGE",
        elsewhere.path().to_str().unwrap(),
    );
    project.dataset(DatasetType::RawData, "outside", &[("a.txt", b"a")]);
    let out = project.run(&["jobs", "run", "watch", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let show = stdout(&project.run_ok(&["workflows", "list"]));
    assert!(show.contains("FAILURE"), "{show}");
    let d = serde_json::from_slice::<serde_json::Value>(
        &project
            .run_ok(&["datasets", "show", "outside", "--format", "json"])
            .stdout,
    )
    .unwrap();
    let workflow = project.run_ok(&[
        "workflows",
        "show",
        d["workflows"][0]["id"].as_str().unwrap(),
        "--format",
        "json",
    ]);
    let w: serde_json::Value = serde_json::from_slice(&workflow.stdout).unwrap();
    let error = w["steps"][5]["error"]["exc_message"][0].as_str().unwrap();
    assert!(error.contains("outside paths.root"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_dead_letters_shows_the_messages_kept_aside() {
    let project = Project::new();
    let out = project.run_ok(&["queue", "dead-letters", "--format", "json"]);
    assert_eq!(stdout(&out).trim(), "[]");
    let app = project.app().await;
    // A row whose arguments are not JSON, ahead of a good message: taking the good one puts
    // the bad one aside.
    let db =
        workers::sqlite::Db::open(&app.settings.sqlite.path, std::time::Duration::from_secs(5))
            .unwrap();
    db.with_conn(|conn| {
        conn.execute(
            "INSERT INTO queue (task_id, task, args, kwargs, priority, eta, retries, root_id, queue)
             VALUES ('garbled', 'inspect_dataset', '[1,', '{}', 9, 0, 0, 'garbled', 'q')",
            [],
        )?;
        Ok(())
    })
    .unwrap();
    let good = workers::broker::TaskMessage {
        id: "good".into(),
        task: "noop".into(),
        args: vec![serde_json::json!(1)],
        kwargs: serde_json::Map::new(),
        priority: 1,
        eta: None,
        retries: 0,
        root_id: "good".into(),
        parent_id: None,
        queue: "q".into(),
        time_limits: Default::default(),
    };
    app.broker.publish(&good).await.unwrap();
    let delivery = app.broker.next().await.unwrap();
    assert_eq!(delivery.message().id, "good");

    let out = project.run_ok(&["queue", "dead-letters", "--format", "json"]);
    let letters: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(letters.as_array().unwrap().len(), 1, "{letters}");
    assert_eq!(letters[0]["task_id"], "garbled");
    assert_eq!(letters[0]["task"], "inspect_dataset");
    assert_eq!(letters[0]["args"], "[1,", "the row as it was stored");
    assert!(
        letters[0]["reason"].as_str().unwrap().contains("args"),
        "{letters}"
    );
    let table = stdout(&project.run_ok(&["queue", "dead-letters"]));
    assert!(
        table.contains("garbled") && table.contains("JSON list"),
        "{table}"
    );
}

/// The bytes that would forge a line or drive a terminal: C0 controls other than the line
/// ends of the output itself, DEL, and C1 controls (UTF-8 encoded).
fn raw_controls(output: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(output);
    text.chars()
        .filter(|c| c.is_control() && *c != '\n')
        .map(|c| format!("{c:?}"))
        .collect()
}

#[test]
fn names_with_control_characters_are_escaped_in_logs_tables_and_summaries() {
    let mut project = Project::new();
    project.dataset(
        DatasetType::RawData,
        "evil\nINFO forged line \u{1b}[31mred",
        &[("a.txt", b"a")],
    );
    // Too long to name a bundle: rejected, and named in the summary and in a warning.
    let long = format!("{}\n\u{1b}[2J\u{9b}", "x".repeat(240));
    std::fs::create_dir(project.source(DatasetType::RawData).join(&long)).unwrap();
    project.set_env("WORKERS__LOG__FORMAT", "human");

    let watch = project.run_ok(&["jobs", "run", "watch", "--wait"]);
    let long_shown = format!("{}\\n\\u{{1b}}[2J\\u{{9b}}", "x".repeat(240));
    assert!(
        stdout(&watch).contains(&format!("rejected `{long_shown}`")),
        "{}",
        describe(&watch)
    );
    assert!(
        stderr(&watch).contains(&format!("/{long_shown} error=")),
        "{}",
        describe(&watch)
    );

    let list = project.run_ok(&["datasets", "list"]);
    assert!(stdout(&list).contains("evil-INFO-forged-line-31mred"));
    let show = project.run_ok(&["datasets", "show", "1"]);
    assert!(
        stdout(&show).contains("evil\\nINFO forged line \\u{1b}[31mred"),
        "{}",
        describe(&show)
    );
    let workflows = project.run_ok(&["workflows", "list"]);
    let history = project.run_ok(&["jobs", "history", "watch"]);
    for (what, out) in [
        ("watch", &watch),
        ("datasets list", &list),
        ("datasets show", &show),
        ("workflows list", &workflows),
        ("jobs history", &history),
    ] {
        for stream in [&out.stdout, &out.stderr] {
            assert_eq!(raw_controls(stream), Vec::<String>::new(), "{what}");
            let text = String::from_utf8_lossy(stream);
            assert!(
                !text.lines().any(|l| l.starts_with("INFO forged")),
                "{what}: {text}"
            );
        }
    }
}

#[test]
fn look_ups_on_a_fresh_project_create_nothing() {
    let project = Project::new();
    let cases: [(&[&str], i32); 9] = [
        (&["datasets", "show", "NOPE"], 2),
        (&["workflows", "show", "NOPE"], 2),
        (&["datasets", "list"], 0),
        (&["datasets", "list", "--format", "json"], 0),
        (&["workflows", "list"], 0),
        (&["jobs", "list"], 0),
        (&["jobs", "history", "watch"], 0),
        (&["config", "show"], 0),
        (&["config", "check"], 0),
    ];
    for (args, code) in cases {
        let out = project.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            describe(&out)
        );
        for created in ["var/workers.db", "var/workers.db.migrate-lock", "var"] {
            assert!(
                !project.path(created).exists(),
                "{args:?} created {created}: {}",
                describe(&out)
            );
        }
    }
    let listed = project.run_ok(&["datasets", "list", "--format", "json"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&listed.stdout).unwrap(),
        serde_json::json!([])
    );
    assert!(
        stderr(&project.run_ok(&["datasets", "list"])).contains("does not exist yet"),
        "the operator is told why the list is empty"
    );
}

#[test]
fn look_ups_read_an_existing_database_without_changing_it() {
    let project = Project::new();
    project.dataset(DatasetType::RawData, "kept", &[("a.txt", b"a")]);
    project.run_ok(&["jobs", "run", "watch", "--wait"]);
    let db = project.path("var/workers.db");
    let before = (
        md5sum(&db),
        std::fs::metadata(&db).unwrap().modified().unwrap(),
    );
    assert!(stdout(&project.run_ok(&["datasets", "list"])).contains("kept"));
    assert!(stdout(&project.run_ok(&["workflows", "list"])).contains("SUCCESS"));
    assert!(stdout(&project.run_ok(&["jobs", "history", "watch"])).contains("success"));
    let out = project.run(&["datasets", "show", "NOPE"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let after = (
        md5sum(&db),
        std::fs::metadata(&db).unwrap().modified().unwrap(),
    );
    assert_eq!(before, after);
}

/// Completions and manual pages come from the command line definitions and need no
/// configuration: run from an empty directory.
#[test]
fn completions_and_man_pages_are_generated_without_a_configuration() {
    let empty = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_workers"))
            .args(args)
            .current_dir(empty.path())
            .env_remove("WORKERS_CONFIG_DIR")
            .output()
            .unwrap()
    };
    for (shell, marker) in [
        ("bash", "_workers()"),
        ("zsh", "#compdef workers"),
        ("fish", "complete -c workers"),
    ] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{}", describe(&out));
        let text = stdout(&out);
        assert!(text.contains(marker), "{shell}: {text}");
        for sub in ["verify", "jobs", "completions"] {
            assert!(text.contains(sub), "{shell} completes `{sub}`");
        }
        // Job names after `jobs run` (fish completes no positional values).
        if shell != "fish" {
            assert!(text.contains("purge_staged_datasets"), "{shell}: {text}");
        }
    }
    let out = run(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("possible values: bash"),
        "{}",
        describe(&out)
    );

    let out = run(&["man"]);
    assert!(out.status.success(), "{}", describe(&out));
    let page = stdout(&out);
    assert!(
        page.starts_with(".ie") || page.contains(".TH workers"),
        "{page}"
    );
    assert!(page.contains("verify"), "{page}");
    let dir = empty.path().join("man1");
    let out = run(&["man", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    for page in [
        "workers.1",
        "workers-jobs.1",
        "workers-jobs-run.1",
        "workers-verify.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}: {text}");
    }
    let run_page = std::fs::read_to_string(dir.join("workers-jobs-run.1")).unwrap();
    assert!(run_page.contains("dry\\-run"), "{run_page}");
}

//! `workers migrate`: the embedded database of a site that has run, copied into a throw-away
//! PostgreSQL database by the binary, then read back through the PostgreSQL backends; a second
//! run, an interrupted run, a target holding another site's rows, and bad arguments.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value as Json, json};

use crate::common::postgres::TestPostgres;
use crate::common::*;
use workers::app::App;
use workers::model::{DatasetType, FileRecord, FileType};
use workers::registry::sql::SqlRegistry;
use workers::registry::uploads::{ProcessLogLine, WorkerProcess};
use workers::registry::{FilePages, Metric, Registry};
use workers::sql::{Database, Db};
use workers::store::sql::SqlStore;
use workers::store::{SchedulerStore, WorkflowFilter, WorkflowStore};
use workers::ui::Display;
use workers::workflow::engine;

/// Every table that holds records, as the command must copy them (written out here rather than
/// taken from the code under test).
const COPIED: [&str; 20] = [
    "datasets",
    "dataset_states",
    "dataset_files",
    "bundles",
    "dataset_workflows",
    "workflows",
    "workflow_steps",
    "task_runs",
    "task_meta",
    "queue",
    "dead_letters",
    "watch_state",
    "job_runs",
    "job_slots",
    "metrics",
    "upload_logs",
    "worker_processes",
    "worker_logs",
    "revoked_tasks",
    "fixity_checks",
];

fn source_path(project: &Project) -> PathBuf {
    project.settings().sqlite.path
}

fn from_arg(path: &Path) -> String {
    format!("sqlite:{}", path.display())
}

/// `workers migrate --from sqlite:<the project's database> --to <url> ... --format json`.
fn migrate(project: &Project, to: &str, extra: &[&str]) -> Output {
    let from = from_arg(&source_path(project));
    let mut args = vec!["migrate", "--from", &from, "--to", to, "--format", "json"];
    args.extend_from_slice(extra);
    project.run(&args)
}

/// Runs the copy, which must succeed; its JSON summary.
fn migrate_ok(project: &Project, to: &str, extra: &[&str]) -> Json {
    let out = migrate(project, to, extra);
    assert!(out.status.success(), "migrate failed: {}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)))
}

/// (copied, already there) of `table` in a summary.
fn outcome(summary: &Json, table: &str) -> (u64, u64) {
    let report = summary["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == table)
        .unwrap_or_else(|| panic!("no report of {table}: {summary}"));
    (
        report["copied"].as_u64().unwrap(),
        report["present"].as_u64().unwrap(),
    )
}

/// Rows of every table of `tables`.
async fn counts(db: &Database, tables: &[&'static str]) -> BTreeMap<&'static str, i64> {
    let tables = tables.to_vec();
    db.read(move |conn| {
        tables
            .iter()
            .map(|t| {
                Ok((
                    *t,
                    conn.query_one(&format!("SELECT COUNT(*) FROM {t}"), &[])?
                        .get(0)?,
                ))
            })
            .collect()
    })
    .await
    .unwrap()
}

/// The source, opened as `workers migrate` opens it (read-only), for counting.
fn source_db(project: &Project) -> Database {
    Db::open_read_only(&source_path(project), Duration::from_secs(5))
        .unwrap()
        .expect("the site has a database")
        .into()
}

/// A site that has run: datasets registered by `watch` and taken through `integrated`, a
/// fixity check, an upload, a worker process with log lines, metrics, a job slot, revoked
/// tasks, a step queued and claimed by a worker, a dead letter and a remote-control request.
async fn site_that_has_run() -> (Project, Arc<App>, Box<dyn workers::broker::Delivery>) {
    let project = Project::new();
    project.dataset(
        DatasetType::RawData,
        "run_one",
        &[
            ("a.R1.fastq.gz", &pseudo_random(5_000, 1)),
            ("sub/b.txt", b"b"),
        ],
    );
    project.dataset(DatasetType::RawData, "run_two", &[("c.bam", b"c")]);
    project.dataset(DatasetType::DataProduct, "product", &[("d.vcf", b"d")]);
    project.run_ok(&["jobs", "run", "watch", "--wait"]);
    project.run_ok(&["verify", "1"]);
    project.run_ok(&["uploads", "create", "incoming", "--type", "RAW_DATA"]);
    // Nobody answers (exit 1), but the request is recorded.
    project.run(&["control", "ping", "--timeout", "0.1"]);

    let app = project.app().await;
    let process = app
        .registry
        .register_process(&WorkerProcess {
            workflow_id: None,
            step: "check".into(),
            task_id: "check-1".into(),
            pid: 4242,
            hostname: "old-host".into(),
            start_time: Utc::now(),
            tags: json!({"args": [1]}),
        })
        .await
        .unwrap()
        .expect("the SQL registry keeps processes");
    let lines: Vec<ProcessLogLine> = (0..30)
        .map(|i| ProcessLogLine {
            timestamp: Utc::now(),
            level: "stdout".into(),
            message: format!("line {i}"),
        })
        .collect();
    app.registry
        .add_process_logs(process, &lines)
        .await
        .unwrap();
    app.registry
        .add_metrics(&[Metric {
            measurement: "fs".into(),
            subject: "/data".into(),
            usage: 10,
            limit: 100,
            tags: vec!["a".into()],
        }])
        .await
        .unwrap();
    app.scheduler_store
        .set_last_slot("watch", Utc::now())
        .await
        .unwrap();
    app.store
        .remember_revoked(&["revoked-1".into(), "revoked-2".into()], Utc::now())
        .await
        .unwrap();

    // A step claimed by a worker of the old site (held until the test ends), and a message that
    // can never run, kept as a dead letter.
    let id = register_small(&app, &project, "waiting").await;
    engine::start(&app, "integrated", id, Default::default())
        .await
        .unwrap();
    let held = app.broker.next().await.unwrap();
    let mut no_step = held.message().clone();
    no_step.id = "no-step".into();
    no_step.kwargs.remove("step");
    app.broker.publish(&no_step).await.unwrap();
    let delivery = app.broker.next().await.unwrap();
    engine::handle(&app, delivery, &Display::quiet())
        .await
        .unwrap();
    (project, app, held)
}

/// Every file row of dataset `id` in `registry`.
async fn files_of(registry: &dyn Registry, id: i64) -> Vec<FileRecord> {
    let mut rows = Vec::new();
    let mut pages = FilePages::new(registry, id, 1000);
    while let Some(page) = pages.next().await.unwrap() {
        rows.extend(page);
    }
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn a_site_is_copied_whole_and_reads_back_the_same() {
    let Some(target) = TestPostgres::new() else {
        return;
    };
    let (project, app, held) = site_that_has_run().await;
    let source = source_db(&project);
    let before = counts(&source, &COPIED).await;
    for table in COPIED {
        assert!(
            before[table] > 0,
            "the site has no {table} rows: {before:?}"
        );
    }
    let leased = counts(&source, &["queue"]).await["queue"];
    assert!(leased > 0);

    let summary = migrate_ok(&project, &target.url, &[]);
    for table in COPIED {
        assert_eq!(
            outcome(&summary, table),
            (before[table] as u64, 0),
            "{table}: {summary}"
        );
    }
    let skipped: Vec<&str> = summary["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["table"].as_str().unwrap())
        .collect();
    assert_eq!(
        skipped,
        [
            "leases",
            "space_reservations",
            "control_requests",
            "control_replies"
        ]
    );

    let pg = target.db().await;
    let copied = Database::from(pg.clone());
    assert_eq!(counts(&copied, &COPIED).await, before);
    // The skipped tables stay empty; no claim of the old site's worker moved across.
    assert_eq!(
        counts(&copied, &["leases", "control_requests", "control_replies"])
            .await
            .values()
            .sum::<i64>(),
        0
    );
    let claims = copied
        .read(|conn| {
            conn.query_one(
                "SELECT COUNT(*) FROM queue WHERE lease_owner IS NOT NULL OR lease_until IS NOT NULL",
                &[],
            )?
            .get::<i64>(0)
        })
        .await
        .unwrap();
    assert_eq!(claims, 0);
    let claimed_in_source = source
        .read(|conn| {
            conn.query_one(
                "SELECT COUNT(*) FROM queue WHERE lease_owner IS NOT NULL",
                &[],
            )?
            .get::<i64>(0)
        })
        .await
        .unwrap();
    assert_eq!(claimed_in_source, 1, "the source is left as it was");

    // The PostgreSQL backends read what the embedded ones read.
    let registry = SqlRegistry::new(pg.clone());
    let store = SqlStore::new(pg.clone());
    let datasets = app
        .registry
        .find(&workers::registry::DatasetQuery {
            include_deleted: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(datasets.len() as i64, before["datasets"]);
    let mut workflow_ids: Vec<String> = Vec::new();
    let mut task_count = 0;
    for dataset in &datasets {
        let copy = registry.get(dataset.id).await.unwrap();
        let original = app.registry.get(dataset.id).await.unwrap();
        assert_eq!(format!("{copy:?}"), format!("{original:?}"));
        assert_eq!(
            format!("{:?}", files_of(&registry, dataset.id).await),
            format!("{:?}", files_of(app.registry.as_ref(), dataset.id).await),
        );
        workflow_ids.extend(dataset.workflows.iter().cloned());
    }
    assert!(workflow_ids.len() >= 4, "{workflow_ids:?}");
    for id in &workflow_ids {
        let original = app.store.workflow(id).await.unwrap().unwrap();
        let copy = store.workflow(id).await.unwrap().unwrap();
        assert_eq!(format!("{copy:?}"), format!("{original:?}"));
        let task_ids: Vec<String> = original
            .steps
            .iter()
            .flat_map(|s| s.runs.iter().map(|r| r.task_id.clone()))
            .collect();
        let sorted = |metas: std::collections::HashMap<String, _>| {
            metas
                .into_iter()
                .map(|(k, v)| (k, format!("{v:?}")))
                .collect::<BTreeMap<_, _>>()
        };
        task_count += task_ids.len();
        assert_eq!(
            sorted(store.task_metas(&task_ids).await.unwrap()),
            sorted(app.store.task_metas(&task_ids).await.unwrap())
        );
    }
    assert!(task_count > 10, "{task_count} tasks compared");
    assert_eq!(
        format!(
            "{:?}",
            store.workflows(WorkflowFilter::All, 1000).await.unwrap()
        ),
        format!(
            "{:?}",
            app.store
                .workflows(WorkflowFilter::All, 1000)
                .await
                .unwrap()
        )
    );
    assert_eq!(
        format!("{:?}", store.runs(None, 100).await.unwrap()),
        format!("{:?}", app.scheduler_store.runs(None, 100).await.unwrap())
    );
    assert_eq!(
        store.last_slots().await.unwrap(),
        app.scheduler_store.last_slots().await.unwrap()
    );

    // A second run copies nothing and changes nothing.
    let started = Instant::now();
    let again = migrate_ok(&project, &target.url, &[]);
    for table in COPIED {
        assert_eq!(
            outcome(&again, table),
            (0, before[table] as u64),
            "{table}: {again}"
        );
    }
    assert_eq!(again["copied"], 0);
    assert_eq!(counts(&copied, &COPIED).await, before);
    eprintln!("second run: {:.2} s", started.elapsed().as_secs_f64());

    // The next ids the backends hand out follow the copied ones.
    let max_id = datasets.iter().map(|d| d.id).max().unwrap();
    let created = registry
        .bulk_create(&[workers::registry::NewDataset {
            name: workers::model::DatasetName::normalize("after_the_move").unwrap(),
            dataset_type: DatasetType::RawData,
            origin_path: "/data/after_the_move".into(),
            create_method: workers::model::CreateMethod::Scan,
            description: None,
            metadata: None,
        }])
        .await
        .unwrap();
    assert!(
        created.created[0].id > max_id,
        "new id {} after {max_id}",
        created.created[0].id
    );
    let request_ids = |db: Database| async move {
        db.read(|conn| {
            conn.query_one("SELECT COALESCE(MAX(id), 0) FROM control_requests", &[])?
                .get::<i64>(0)
        })
        .await
        .unwrap()
    };
    let last_request = request_ids(source.clone()).await;
    assert!(last_request > 0);
    copied
        .write(|tx| {
            tx.execute(
                "INSERT INTO control_requests (body, sent_at) VALUES ('{}', 0)",
                &[],
            )
        })
        .await
        .unwrap();
    assert!(request_ids(copied.clone()).await > last_request);
    drop(held);
}

/// A site with many file rows (paths that sort differently by byte and by locale) and log lines.
async fn site_with_many_rows(files: usize) -> (Project, Arc<App>) {
    let project = Project::new();
    let app = project.app().await;
    let id = register_small(&app, &project, "many").await;
    let names = ["a", "B", "_c", "é", "Z", "ä", "1"];
    let rows: Vec<FileRecord> = (0..files)
        .map(|i| FileRecord {
            path: format!("{}/{}{i:05}.txt", names[i % names.len()], names[i % 3]),
            md5: Some(workers::compute::md5::md5_bytes(&i.to_le_bytes())),
            size: Some(i as u64),
            file_type: FileType::File,
        })
        .collect();
    for chunk in rows.chunks(1000) {
        app.registry.add_files(id, chunk).await.unwrap();
    }
    let process = app
        .registry
        .register_process(&WorkerProcess {
            workflow_id: None,
            step: "check".into(),
            task_id: "check-1".into(),
            pid: 1,
            hostname: "old-host".into(),
            start_time: Utc::now(),
            tags: json!({"args": []}),
        })
        .await
        .unwrap()
        .unwrap();
    let lines: Vec<ProcessLogLine> = (0..300)
        .map(|i| ProcessLogLine {
            timestamp: Utc::now(),
            level: "stderr".into(),
            message: format!("line {i}"),
        })
        .collect();
    app.registry
        .add_process_logs(process, &lines)
        .await
        .unwrap();
    (project, app)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_copy_continues_where_it_stopped() {
    let Some(target) = TestPostgres::new() else {
        return;
    };
    const FILES: i64 = 5_000;
    let (project, _app) = site_with_many_rows(FILES as usize).await;
    let source = source_db(&project);
    let before = counts(&source, &COPIED).await;
    assert_eq!(before["dataset_files"], FILES);
    let copied = Database::from(target.db().await);

    // Killed in the middle of dataset_files, one row per transaction.
    let from = from_arg(&source_path(&project));
    let child = project
        .command(&[
            "migrate",
            "--from",
            &from,
            "--to",
            &target.url,
            "--batch-size",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reap = Reap(child.id());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let files = counts(&copied, &["dataset_files"]).await["dataset_files"];
        if files >= 100 {
            break;
        }
        assert!(Instant::now() < deadline, "the copy made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(reap);
    let out = wait_for_exit(child, Duration::from_secs(10));
    assert!(!out.status.success(), "killed: {:?}", out.status);
    let at_kill = counts(&copied, &["dataset_files"]).await["dataset_files"];
    assert!(
        (100..before["dataset_files"]).contains(&at_kill),
        "killed after {at_kill} of {} rows",
        before["dataset_files"]
    );
    assert_eq!(counts(&copied, &["worker_logs"]).await["worker_logs"], 0);

    let resumed = migrate_ok(&project, &target.url, &[]);
    assert_eq!(
        outcome(&resumed, "dataset_files"),
        ((before["dataset_files"] - at_kill) as u64, at_kill as u64)
    );
    assert_eq!(outcome(&resumed, "datasets"), (0, 1));
    assert_eq!(outcome(&resumed, "worker_logs"), (300, 0));
    assert_eq!(counts(&copied, &COPIED).await, before);

    // The second half of a table gone (what a run killed earlier leaves): only it is copied.
    target.execute(
        "DELETE FROM dataset_files WHERE (dataset_id, path) IN (SELECT dataset_id, path \
         FROM dataset_files ORDER BY dataset_id DESC, path COLLATE \"C\" DESC LIMIT 2000)",
    );
    let started = Instant::now();
    let again = migrate_ok(&project, &target.url, &[]);
    eprintln!(
        "copied 2,000 of {} file rows again in {:.2} s",
        before["dataset_files"],
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        outcome(&again, "dataset_files"),
        (2000, (before["dataset_files"] - 2000) as u64)
    );
    // Rows missing here and there (not a prefix): every row is looked at, the missing copied.
    target.execute("DELETE FROM dataset_files WHERE path LIKE '%3.txt'");
    target.execute("DELETE FROM worker_logs WHERE id % 7 = 0");
    let holes = migrate_ok(&project, &target.url, &[]);
    let (files_copied, files_present) = outcome(&holes, "dataset_files");
    assert!(files_copied >= 400, "{holes}");
    assert_eq!(files_copied + files_present, before["dataset_files"] as u64);
    assert_eq!(outcome(&holes, "worker_logs"), (42, 258));
    assert_eq!(counts(&copied, &COPIED).await, before);
    // Fully copied: a run finds nothing to do, quickly.
    let started = Instant::now();
    let done = migrate_ok(&project, &target.url, &[]);
    assert_eq!(done["copied"], 0);
    eprintln!(
        "a run over a copied database: {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_holding_another_sites_rows_is_refused() {
    let Some(target) = TestPostgres::new() else {
        return;
    };
    let project = Project::new();
    let app = project.app().await;
    register_small(&app, &project, "ours").await;
    // Another site's dataset already has id 1 there.
    let elsewhere = SqlRegistry::new(target.db().await);
    elsewhere
        .bulk_create(&[workers::registry::NewDataset {
            name: workers::model::DatasetName::normalize("theirs").unwrap(),
            dataset_type: DatasetType::RawData,
            origin_path: "/elsewhere/theirs".into(),
            create_method: workers::model::CreateMethod::Scan,
            description: None,
            metadata: None,
        }])
        .await
        .unwrap();
    let copied = Database::from(target.db().await);
    let theirs = counts(&copied, &COPIED).await;
    let out = migrate(&project, &target.url, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("table `datasets`") && err.contains("id = 1") && err.contains("'theirs'"),
        "{err}"
    );
    assert_eq!(
        counts(&copied, &COPIED).await,
        theirs,
        "nothing of the site was mixed in"
    );

    // A row changed after it was copied is found on the next run that meets it: the first or
    // last row of a table always, one in the middle when the run reads the table again (here:
    // because a row before it is missing).
    let files: Vec<FileRecord> = (0..10)
        .map(|i| FileRecord {
            path: format!("f{i}"),
            md5: Some(workers::compute::md5::md5_bytes(&[i])),
            size: Some(1),
            file_type: FileType::File,
        })
        .collect();
    app.registry.add_files(1, &files).await.unwrap();
    let other = TestPostgres::new().unwrap();
    migrate_ok(&project, &other.url, &[]);
    other.execute("UPDATE dataset_files SET md5 = 'changed' WHERE path = 'f9'");
    let out = migrate(&project, &other.url, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("table `dataset_files`")
            && err.contains("(dataset_id, path) = (1, 'f9')")
            && err.contains("'changed'"),
        "{err}"
    );
    other.execute(
        "UPDATE dataset_files SET md5 = 'changed' WHERE path = 'f4'; \
         DELETE FROM dataset_files WHERE path = 'f2'",
    );
    let out = migrate(&project, &other.url, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("(1, 'f4')") && stderr(&out).contains("'changed'"),
        "{}",
        describe(&out)
    );

    // Rows of another database whose keys the source's do not have collide with nothing: the
    // copy completes, counts them and says so (exit 1).
    let third = TestPostgres::new().unwrap();
    Database::from(third.db().await)
        .write(|tx| {
            tx.execute(
                "INSERT INTO revoked_tasks (task_id, revoked_at) VALUES ('theirs', 0)",
                &[],
            )
        })
        .await
        .unwrap();
    let out = migrate(&project, &third.url, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).contains("`revoked_tasks` (1)"),
        "{}",
        describe(&out)
    );
    let summary: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["other"], 1);
    assert_eq!(outcome(&summary, "dataset_files"), (10, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_counts_the_rows_and_connects_to_nothing() {
    let project = Project::new();
    let app = project.app().await;
    register_small(&app, &project, "counted").await;
    let out = migrate(&project, "postgres://nobody@127.0.0.1:1/x", &["--dry-run"]);
    assert!(out.status.success(), "{}", describe(&out));
    let summary: Json = serde_json::from_slice(&out.stdout).unwrap();
    let rows = |table: &str| {
        summary["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == table)
            .unwrap()["source_rows"]
            .as_i64()
            .unwrap()
    };
    let source = counts(&source_db(&project), &COPIED).await;
    for table in COPIED {
        assert_eq!(rows(table), source[table], "{table}");
    }
    assert_eq!((rows("datasets"), rows("dataset_states")), (1, 1));
    let out = project.run(&[
        "migrate",
        "--from",
        &from_arg(&source_path(&project)),
        "--to",
        "postgres://nobody@127.0.0.1:1/x",
        "--dry-run",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout(&out).contains("dataset_files"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_sources_and_targets_are_named() {
    let project = Project::new();
    let app = project.app().await;
    register_small(&app, &project, "named").await;
    let from = from_arg(&source_path(&project));
    let refused = |args: &[&str], named: &str| {
        let mut all = vec!["migrate"];
        all.extend_from_slice(args);
        let out = project.run(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        assert!(stderr(&out).contains(named), "{args:?}: {}", describe(&out));
    };
    refused(&["--from", "foo", "--to", "postgres://u@h/d"], "foo");
    refused(
        &[
            "--from",
            "sqlite:/nonexistent/workers.db",
            "--to",
            "postgres://u@h/d",
        ],
        "/nonexistent/workers.db",
    );
    refused(
        &["--from", &from, "--to", "postgres://nobody@127.0.0.1:1/x"],
        "postgres://nobody@127.0.0.1:1/x",
    );
    refused(&["--from", &from, "--to", "mysql://u@h/d"], "mysql://u@h/d");
    // No --to and no postgres.url.
    refused(&["--from", &from], "postgres.url");
    if let Some(server) = TestPostgres::new() {
        let mut url = url::Url::parse(&server.url).unwrap();
        url.set_username("no_such_role").unwrap();
        refused(&["--from", &from, "--to", url.as_str()], url.as_str());
    }

    // A source of an older schema is left as it is, with what to do.
    let old = project.path("var/old.db");
    {
        let conn = rusqlite::Connection::open(&old).unwrap();
        for sql in &workers::sqlite::MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
    }
    let before = std::fs::read(&old).unwrap();
    let out = project.run(&[
        "migrate",
        "--from",
        &from_arg(&old),
        "--to",
        "postgres://u@h/d",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("older schema") && stderr(&out).contains("old.db"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        std::fs::read(&old).unwrap(),
        before,
        "the source is unchanged"
    );
}

/// The copy's figures on a larger table, for the record (`cargo test --test it migrate::speed
/// -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a check"]
async fn speed() {
    let Some(target) = TestPostgres::new() else {
        return;
    };
    let (project, _app) = site_with_many_rows(100_000).await;
    for run in ["first", "second"] {
        let started = Instant::now();
        let summary = migrate_ok(&project, &target.url, &[]);
        eprintln!(
            "{run} run: {:.2} s, dataset_files {:?}",
            started.elapsed().as_secs_f64(),
            outcome(&summary, "dataset_files")
        );
    }
    target.execute("DELETE FROM dataset_files WHERE path LIKE '%3.txt'");
    let started = Instant::now();
    let summary = migrate_ok(&project, &target.url, &[]);
    eprintln!(
        "run with holes: {:.2} s, dataset_files {:?}",
        started.elapsed().as_secs_f64(),
        outcome(&summary, "dataset_files")
    );
}

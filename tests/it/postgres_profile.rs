//! The postgres profile as a site runs it: several `workers worker` processes and schedulers
//! on one PostgreSQL database. A worker killed with SIGKILL mid-step, a scheduler killed while
//! it holds the lease, and every connection cut by the server: work is only delayed, each
//! dataset is staged exactly once and each step recorded once.

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::postgres::{PrivateServer, TestPostgres};
use crate::common::*;
use workers::app::App;
use workers::model::DatasetType;
use workers::registry::DatasetQuery;
use workers::store::{TaskStatus, WorkflowFilter};
use workers::workflow::engine;

/// A project whose three backends are the test's PostgreSQL database, with `watch` every
/// second and the other jobs off.
fn project(database: &TestPostgres) -> Project {
    let mut project = Project::new();
    for backend in ["REGISTRY", "STORE", "BROKER"] {
        project.set_env(&format!("WORKERS__{backend}__KIND"), "postgres");
    }
    project.set_env("WORKERS__POSTGRES__URL", &database.url);
    project.set_env("WORKERS__POSTGRES__RECONNECT_MAX_SECONDS", "60");
    project.set_env("WORKERS__SCHEDULES__WATCH__EVERY", "1s");
    for job in [
        "PURGE_STAGED_DATASETS",
        "PURGE_STALE_WORKFLOWS",
        "RECONCILE",
        "METRICS",
        "FIXITY",
    ] {
        project.set_env(&format!("WORKERS__SCHEDULES__{job}__ENABLED"), "false");
    }
    project.set_env("WORKERS__SCHEDULER__LEASE_SECONDS", "3");
    project.set_env("WORKERS__SCHEDULER__WORKERS", "0");
    // A killed worker's claims lapse soon (a restarted one on this host takes them at once).
    project.set_env("WORKERS__WORKER__LEASE_SECONDS", "10");
    project
}

fn spawn(project: &Project, args: &[&str]) -> (Child, Reap) {
    let child = project
        .command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reap = Reap(child.id());
    (child, reap)
}

fn spawn_worker(project: &Project, node: &str) -> (Child, Reap) {
    spawn(
        project,
        &["worker", "--hostname", node, "--concurrency", "2"],
    )
}

/// Datasets of a few files each, large enough that steps take a moment.
fn datasets(project: &Project, count: usize) {
    for i in 0..count {
        let big = pseudo_random(1 << 20, i as u64);
        let small = pseudo_random(4096, 1000 + i as u64);
        project.dataset(
            DatasetType::RawData,
            &format!("run-{i:02}"),
            &[
                ("reads/a.fastq", &big),
                ("reads/b.fastq", &small),
                ("meta.txt", b"x"),
            ],
        );
    }
}

/// How many datasets are STAGED.
async fn staged(app: &App) -> usize {
    app.registry
        .find(&DatasetQuery::default())
        .await
        .unwrap()
        .iter()
        .filter(|d| d.is_staged)
        .count()
}

/// Waits until a step is running in the process `pid` (its STARTED result names it), then
/// kills the process with SIGKILL.
async fn kill_mid_step(app: &App, child: &mut Child) {
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "no step ever ran in process {pid}"
        );
        for workflow in app
            .store
            .workflows(WorkflowFilter::Active, 100)
            .await
            .unwrap()
        {
            let ids: Vec<String> = workflow.all_task_ids().into_iter().collect();
            let metas = app.store.task_metas(&ids).await.unwrap();
            if metas.values().any(|m| {
                m.status == TaskStatus::Started && m.result["pid"].as_u64() == Some(u64::from(pid))
            }) {
                child.kill().unwrap();
                child.wait().unwrap();
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every dataset staged once, with one workflow whose every step ran once and succeeded.
async fn assert_each_done_once(app: &Arc<App>, count: usize) {
    let datasets = app.registry.find(&DatasetQuery::default()).await.unwrap();
    assert_eq!(datasets.len(), count);
    for summary in datasets {
        let d = app.registry.get(summary.id).await.unwrap();
        assert_eq!(
            state_names(&d),
            ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED"],
            "{}: each state once",
            d.name
        );
        assert_eq!(d.workflows.len(), 1, "{}: one workflow", d.name);
        let rows = file_rows(app, d.id).await;
        assert_eq!(rows.len(), 3, "{}: one row per file", d.name);
        let workflow = app.store.workflow(&d.workflows[0]).await.unwrap().unwrap();
        let view = engine::view(app, workflow).await.unwrap();
        assert_eq!(view.derived.status, TaskStatus::Success, "{}", d.name);
        assert!(
            view.workflow.steps.iter().all(|s| s.runs.len() == 1),
            "{}: one run per step: {:?}",
            d.name,
            view.workflow.steps
        );
    }
}

/// Waits until `count` datasets are staged and no workflow is active any more (staging is
/// not the last step).
async fn wait_for_staged(app: &App, count: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let done = staged(app).await;
        let idle = app
            .store
            .workflows(WorkflowFilter::Active, 1)
            .await
            .unwrap()
            .is_empty();
        if done == count && idle {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {count} datasets staged after {limit:?} (workflows idle: {idle})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_and_a_scheduler_stage_twenty_datasets_once_though_a_worker_is_killed() {
    let Some(database) = TestPostgres::new() else {
        return;
    };
    let project = project(&database);
    datasets(&project, 20);
    let app = project.app().await;

    let (mut worker_a, _reap_a) = spawn_worker(&project, "a@%h");
    let (_worker_b, _reap_b) = spawn_worker(&project, "b@%h");
    let (_scheduler, _reap_s) = spawn(&project, &["scheduler"]);

    kill_mid_step(&app, &mut worker_a).await;
    let (_worker_a, _reap_a2) = spawn_worker(&project, "a@%h");

    wait_for_staged(&app, 20, Duration::from_secs(300)).await;
    assert_each_done_once(&app, 20).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_scheduler_takes_the_lease_when_the_first_is_killed() {
    let Some(database) = TestPostgres::new() else {
        return;
    };
    let project = project(&database);
    let app = project.app().await;
    let watch_hosts = || async {
        app.scheduler_store
            .runs(Some("watch"), 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.host)
            .collect::<Vec<_>>()
    };

    let (mut first, _reap_first) = spawn(&project, &["scheduler"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while watch_hosts().await.is_empty() {
        assert!(Instant::now() < deadline, "the first scheduler never fired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (second, _reap_second) = spawn(&project, &["scheduler"]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let first_pid = format!(":{}", first.id());
    let second_pid = format!(":{}", second.id());
    let hosts = watch_hosts().await;
    assert!(
        hosts.iter().all(|h| h.ends_with(&first_pid)),
        "only the lease holder fires: {hosts:?}"
    );

    first.kill().unwrap();
    first.wait().unwrap();
    let killed = Instant::now();
    loop {
        if watch_hosts().await.iter().any(|h| h.ends_with(&second_pid)) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the second scheduler never took over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Within two lease periods (3 s each), plus the one-second slot granularity.
    assert!(
        killed.elapsed() <= Duration::from_secs(8),
        "{:?}",
        killed.elapsed()
    );
    // The lease is judged by the database's clock, which the store reports.
    let server = app.scheduler_store.server_time().await.unwrap().unwrap();
    assert!((server - chrono::Utc::now()).num_seconds().abs() < 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_cut_by_the_server_only_delay_the_work() {
    let Some(database) = TestPostgres::new() else {
        return;
    };
    let project = project(&database);
    datasets(&project, 6);
    let app = project.app().await;
    let (mut worker, _reap_w) = spawn_worker(&project, "w@%h");
    let (mut scheduler, _reap_s) = spawn(&project, &["scheduler"]);

    // Every connection to the database is terminated by the server, again and again, as a
    // restart or a failover does, while the datasets go through their workflows.
    let cut = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = '{}' AND pid <> pg_backend_pid()",
        database.name
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut cuts = 0;
    while staged(&app).await < 6 {
        if Instant::now() > deadline {
            let mut report = Vec::new();
            for workflow in app.store.workflows(WorkflowFilter::All, 100).await.unwrap() {
                let view = engine::view(&app, workflow).await.unwrap();
                let ids: Vec<String> = view.workflow.all_task_ids().into_iter().collect();
                let metas = app.store.task_metas(&ids).await.unwrap();
                let results: Vec<String> = metas
                    .values()
                    .map(|m| format!("{} {} {}", m.status, m.retries, m.result))
                    .collect();
                report.push(format!(
                    "{:?} {:?} {results:?}",
                    view.derived.status, view.derived.steps
                ));
            }
            panic!("the work did not finish: {report:#?}");
        }
        if cuts < 40 {
            database.execute(&cut);
            cuts += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        cuts >= 3,
        "the connections were cut while work ran ({cuts} times)"
    );
    wait_for_staged(&app, 6, Duration::from_secs(120)).await;
    assert_each_done_once(&app, 6).await;
    // Neither process gave up: the cuts, from their start on, were waited out.
    assert!(worker.try_wait().unwrap().is_none(), "the worker exited");
    assert!(
        scheduler.try_wait().unwrap().is_none(),
        "the scheduler exited"
    );
}

/// One connection to `url`, which messages show as it is.
fn one_connection(url: &str) -> workers::sql::postgres::PgConfig {
    workers::sql::postgres::PgConfig {
        url: url.to_owned(),
        password: None,
        pool_size: 1,
        connect_timeout: Duration::from_secs(3),
        reconnect_max: Duration::from_secs(1),
        display: url.to_owned(),
    }
}

/// The message of the error `PgDb::connect` gives for `url`.
async fn connect_error(url: &str) -> String {
    match workers::sql::postgres::PgDb::connect(one_connection(url)).await {
        Ok(_) => panic!("connected to {url}"),
        Err(err) => format!("{err:#}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_server_a_refused_user_and_a_newer_schema_are_named() {
    let Some(database) = TestPostgres::new() else {
        return;
    };
    let unreachable = "postgres://postgres@127.0.0.1:1/workers";
    let err = connect_error(unreachable).await;
    assert!(
        err.contains(unreachable) && err.contains("reachable"),
        "{err}"
    );

    let refused = database.url.replace("postgres@", "nobody_here@");
    let err = connect_error(&refused).await;
    assert!(
        err.contains(&refused) && err.contains("refused the user"),
        "{err}"
    );

    let missing = database.url.replace(&database.name, "no_such_database");
    let err = connect_error(&missing).await;
    assert!(err.contains("does not exist"), "{err}");

    // A schema written by a newer version is refused, through the binary as an operator
    // meets it.
    drop(database.db().await);
    database.execute("INSERT INTO workers_schema (version) VALUES (999)");
    let project = project(&database);
    let out = project.run(&["datasets", "list"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("newer") && err.contains("999") && err.contains("postgres.url"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_transactions_lose_no_update_and_concurrent_starts_migrate_once() {
    let Some(database) = TestPostgres::new() else {
        return;
    };
    // Eight processes' worth of pools starting at once on a fresh database: the schema is
    // created once, under the advisory lock, and every one of them opens.
    let mut starts = Vec::new();
    for _ in 0..8 {
        let config = database.config();
        starts.push(tokio::spawn(workers::sql::postgres::PgDb::connect(config)));
    }
    let mut pools = Vec::new();
    for start in starts {
        pools.push(start.await.unwrap().unwrap());
    }
    database.execute("CREATE TABLE counter (n BIGINT NOT NULL); INSERT INTO counter VALUES (0)");

    // Read, then write what was read plus one: serializable transactions that conflict run
    // again, so no increment is lost.
    let mut writers = Vec::new();
    for i in 0..40 {
        let db = workers::sql::Database::from(pools[i % pools.len()].clone());
        writers.push(tokio::spawn(async move {
            db.write(|conn| {
                let n: i64 = conn.query_one("SELECT n FROM counter", &[])?.get(0)?;
                conn.execute(
                    "UPDATE counter SET n = ?1",
                    &[workers::sql::Value::Int(n + 1)],
                )?;
                Ok(())
            })
            .await
        }));
    }
    for writer in writers {
        writer.await.unwrap().unwrap();
    }
    let db = workers::sql::Database::from(pools[0].clone());
    let n: i64 = db
        .read(|conn| conn.query_one("SELECT n FROM counter", &[])?.get(0))
        .await
        .unwrap();
    assert_eq!(n, 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_that_cannot_run_twice_is_never_sent_on_a_connection_the_server_closed() {
    let Some(database) = TestPostgres::new() else {
        return;
    };
    let db = workers::sql::Database::from(
        workers::sql::postgres::PgDb::connect(one_connection(&database.url))
            .await
            .unwrap(),
    );
    database.execute("CREATE TABLE written (n BIGINT NOT NULL)");
    for round in 0..3 {
        // The pooled connection is closed by the server (a restart, a failover, an
        // administrator) while it waits in the pool, for longer than the half second after
        // which a connection is checked before use.
        db.read(|conn| conn.query_one("SELECT 1", &[])?.get::<i64>(0))
            .await
            .unwrap();
        database.execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            database.name
        ));
        tokio::time::sleep(Duration::from_millis(700)).await;
        // A statement in a transaction of its own is never run again once sent (its outcome
        // would be unknown), so it must go out on a connection that is still there.
        db.write_alone(move |tx| {
            tx.execute(
                "INSERT INTO written (n) VALUES (?1)",
                &[workers::sql::Value::Int(round)],
            )
        })
        .await
        .unwrap_or_else(|err| panic!("round {round}: {err:#}"));
    }
    let written: i64 = db
        .read(|conn| conn.query_one("SELECT COUNT(*) FROM written", &[])?.get(0))
        .await
        .unwrap();
    assert_eq!(written, 3);
}

/// A connection of `PgDb` to `url`, asked whether it is encrypted (`pg_stat_ssl`).
async fn encrypted(url: &str) -> anyhow::Result<bool> {
    let db = workers::sql::postgres::PgDb::connect(one_connection(url)).await?;
    let ssl: i64 = db
        .read(|conn| {
            conn.query_one(
                "SELECT ssl::int::bigint FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )?
            .get(0)
        })
        .await?;
    Ok(ssl == 1)
}

/// TLS as libpq's `sslmode` and `sslrootcert` say, against the test server (Debian's
/// PostgreSQL offers TLS with a self-signed certificate issued to `localhost`): offered TLS is
/// used by default, `disable` goes without, the verifying modes check the certificate, and
/// a certificate refused, or a root certificate file that is missing, is an error naming it.
#[tokio::test(flavor = "multi_thread")]
async fn tls_follows_sslmode_and_sslrootcert_and_a_refused_certificate_is_named() {
    let Some(database) = TestPostgres::new() else {
        return;
    };
    let db = database.db().await;
    let (ssl, cert_file): (String, String) = db
        .read(|conn| {
            let row = conn.query_one(
                "SELECT current_setting('ssl'), current_setting('ssl_cert_file')",
                &[],
            )?;
            Ok((row.get(0)?, row.get(1)?))
        })
        .await
        .unwrap();
    assert_eq!(ssl, "on", "the test server must offer TLS (ssl = on)");
    let data_dir: String = db
        .read(|conn| {
            conn.query_one("SELECT current_setting('data_directory')", &[])?
                .get(0)
        })
        .await
        .unwrap();
    let root = std::path::Path::new(&data_dir).join(&cert_file);
    let root = root.display();
    let url = &database.url;
    assert!(url.contains("@127.0.0.1:") && !url.contains('?'), "{url}");
    let by_name = url.replace("@127.0.0.1:", "@localhost:");

    assert!(encrypted(url).await.unwrap(), "TLS offered is TLS used");
    assert!(!encrypted(&format!("{url}?sslmode=disable")).await.unwrap());
    assert!(encrypted(&format!("{url}?sslmode=require")).await.unwrap());
    // The certificate is signed by itself and issued to `localhost`: verify-ca takes it on the
    // address, verify-full only on the name.
    assert!(
        encrypted(&format!("{url}?sslmode=verify-ca&sslrootcert={root}"))
            .await
            .unwrap()
    );
    assert!(
        encrypted(&format!("{by_name}?sslmode=verify-full&sslrootcert={root}"))
            .await
            .unwrap()
    );
    let err = connect_error(&format!("{url}?sslmode=verify-full&sslrootcert={root}")).await;
    assert!(
        err.contains("TLS failed") && err.contains("127.0.0.1"),
        "{err}"
    );
    // Another authority did not sign it.
    let scratch = tempfile::tempdir().unwrap();
    let other = scratch.path().join("other-ca.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=another authority",
            "-keyout",
            "/dev/null",
            "-out",
        ])
        .arg(&other)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl req: {}", describe(&made));
    let other = other.display();
    let err = connect_error(&format!(
        "{by_name}?sslmode=verify-full&sslrootcert={other}"
    ))
    .await;
    assert!(
        err.contains("TLS failed") && err.contains("UnknownIssuer"),
        "{err}"
    );

    // Through the binary, as an operator meets it: a missing root certificate file is a
    // configuration error naming the file (exit code 2), a good one works.
    let mut project = project(&database);
    project.set_env(
        "WORKERS__POSTGRES__URL",
        &format!("{url}?sslmode=verify-ca&sslrootcert=/nonexistent/root.crt"),
    );
    let out = project.run(&["datasets", "list"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("cannot read sslrootcert `/nonexistent/root.crt`"),
        "{}",
        describe(&out)
    );
    project.set_env(
        "WORKERS__POSTGRES__URL",
        &format!("{by_name}?sslmode=verify-full&sslrootcert={root}"),
    );
    project.run_ok(&["datasets", "list"]);
    // `workers doctor` says whether the connections are encrypted.
    let database_tls = |project: &Project| {
        let out = project.run(&["doctor", "--format", "json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {}", describe(&out)));
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "database TLS")
            .unwrap_or_else(|| panic!("no database TLS check: {report:#}"))
            .clone()
    };
    let check = database_tls(&project);
    assert_eq!(check["ok"], true, "{check:#}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("are encrypted (TLSv1."),
        "{check:#}"
    );
    project.set_env("WORKERS__POSTGRES__URL", &format!("{url}?sslmode=disable"));
    let check = database_tls(&project);
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("are not encrypted"),
        "{check:#}"
    );
}

/// The registry in PostgreSQL keeps QC reports in `postgres.reports_dir` (a directory every
/// host mounts): uploaded there under the dataset's report id; without it the upload fails
/// naming the key, and a configuration that runs QC in `integrated` is refused at once.
#[tokio::test(flavor = "multi_thread")]
async fn qc_reports_are_kept_in_postgres_reports_dir() {
    use workers::registry::{DatasetPatch, RegistryError};
    let Some(database) = TestPostgres::new() else {
        return;
    };
    let mut project = project(&database);
    let origin = project.dataset(DatasetType::RawData, "run_qc", &[("a.fastq.gz", b"reads")]);
    let report = project.path("multiqc_report.html");
    write_file(&report, b"<html>report</html>");

    let app = project.app().await;
    let id = register_without_workflow(&app, "run_qc", &origin).await;
    app.registry
        .update(
            id,
            &DatasetPatch {
                metadata: Some(serde_json::json!({ "report_id": "r-7" })),
                ..DatasetPatch::default()
            },
        )
        .await
        .unwrap();
    let err = app.registry.upload_report(id, &report).await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::Invalid(m) if m.contains("postgres.reports_dir")),
        "{err:?}"
    );
    drop(app);

    let shared = project.path("shared/qc-reports");
    project.set_env("WORKERS__POSTGRES__REPORTS_DIR", shared.to_str().unwrap());
    let app = project.app().await;
    let stored = app.registry.upload_report(id, &report).await.unwrap();
    let kept = shared.join("r-7/multiqc_report.html");
    assert_eq!(stored, kept.to_string_lossy());
    assert_eq!(std::fs::read(&kept).unwrap(), b"<html>report</html>");
    drop(app);

    project.remove_env("WORKERS__POSTGRES__REPORTS_DIR");
    project.set_env("WORKERS__WORKFLOWS__INTEGRATED__QC", "true");
    let out = project.run(&["datasets", "list"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("postgres.reports_dir"),
        "{}",
        describe(&out)
    );
}

/// A command that only reads leaves a PostgreSQL schema as it is: on a database no writer has
/// set up (or one of an older version), it is refused with what brings it up to date, and
/// nothing is created; once a writing command has run, it reads.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_that_only_reads_never_migrates_the_schema() {
    let Some(database) = TestPostgres::new() else {
        return;
    };
    let project = project(&database);
    let out = project.run(&["datasets", "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("schema is version 0, older") && err.contains("a command that writes"),
        "{err}"
    );
    let tables = postgres_tables(&database).await;
    assert!(tables.is_empty(), "a reading command created {tables:?}");

    project.run_ok(&["jobs", "run", "watch"]);
    assert!(
        postgres_tables(&database)
            .await
            .contains(&"workers_schema".to_owned())
    );
    project.run_ok(&["datasets", "list"]);
}

/// The tables of the test database's public schema.
async fn postgres_tables(database: &TestPostgres) -> Vec<String> {
    let url = database.url.clone();
    tokio::task::spawn_blocking(move || {
        let mut client = url
            .parse::<::postgres::Config>()
            .unwrap()
            .connect(::postgres::NoTls)
            .unwrap();
        client
            .query(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    })
    .await
    .unwrap()
}

/// Runs `openssl` with `args`, in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", describe(&out));
}

/// A key and a certificate for `subject`, signed by `test-ca` (made by the first call) or,
/// for `self_signed`, by itself.
fn certificate(dir: &std::path::Path, name: &str, subject: &str, self_signed: bool) {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    let new_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    if self_signed {
        let mut args = vec!["req", "-x509", "-days", "1", "-subj", subject];
        args.extend(new_key);
        args.extend(["-keyout", &key, "-out", &crt]);
        openssl(dir, &args);
    } else {
        let csr = format!("{name}.csr");
        let mut args = vec!["req", "-subj", subject];
        args.extend(new_key);
        args.extend(["-keyout", &key, "-out", &csr]);
        openssl(dir, &args);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName = DNS:localhost, IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "ext.cnf",
                "-out",
                &crt,
            ],
        );
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A server that authenticates by client certificate (`cert` in pg_hba.conf, a server of the
/// test's own): reached with libpq's `sslcert` and `sslkey`, by the library and by the binary;
/// without a certificate, or with one its authority did not sign, the error names the
/// database and the certificate.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_authenticates_by_certificate_is_reached_with_sslcert_and_sslkey() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    certificate(dir, "ca", "/CN=test-ca", true);
    certificate(dir, "server", "/CN=localhost", false);
    certificate(dir, "client", "/CN=postgres", false);
    certificate(dir, "stranger", "/CN=postgres", true);
    let Some(server) = PrivateServer::start(|data| {
        for file in ["server.crt", "server.key", "ca.crt"] {
            std::fs::copy(dir.join(file), data.join(file)).unwrap();
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 cert\n",
        )
        .unwrap();
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
         ssl_ca_file = 'ca.crt'\n"
            .to_owned()
    }) else {
        return;
    };
    let base = format!("postgres://postgres@localhost:{}/postgres", server.port);
    let path = |file: &str| dir.join(file).display().to_string();
    let verified = format!("{base}?sslmode=verify-full&sslrootcert={}", path("ca.crt"));
    let with_cert = |name: &str| {
        format!(
            "{verified}&sslcert={}&sslkey={}",
            path(&format!("{name}.crt")),
            path(&format!("{name}.key"))
        )
    };

    let db = workers::sql::postgres::PgDb::connect(one_connection(&with_cert("client")))
        .await
        .unwrap();
    let client_dn: String = db
        .read(|conn| {
            conn.query_one(
                "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )?
            .get(0)
        })
        .await
        .unwrap();
    assert_eq!(client_dn, "/CN=postgres");
    drop(db);

    let err = connect_error(&verified).await;
    assert!(
        err.contains(&base) && err.contains("client certificate"),
        "{err}"
    );
    let err = connect_error(&with_cert("stranger")).await;
    assert!(
        err.contains(&base) && err.contains("client certificate"),
        "{err}"
    );

    // Through the binary, as an operator configures it.
    let mut project = Project::new();
    for backend in ["REGISTRY", "STORE", "BROKER"] {
        project.set_env(&format!("WORKERS__{backend}__KIND"), "postgres");
    }
    project.set_env("WORKERS__POSTGRES__URL", &with_cert("client"));
    project.run_ok(&["datasets", "list"]);
    project.set_env("WORKERS__POSTGRES__URL", &verified);
    let out = project.run(&["datasets", "list"]);
    assert!(
        !out.status.success() && stderr(&out).contains("client certificate"),
        "{}",
        describe(&out)
    );
}

//! The operational scripts of spec C.8 and C.9 and the metrics job's contract with the API:
//! `workers paths check`, `workers queue delete` (against a real RabbitMQ), `metrics` posting
//! with an admin or an operator token, and `populate_bundles`.

use crate::common;

use std::process::Command;
use std::sync::Arc;

use crate::common::bioloop_api::TestApi;
use crate::common::*;
use workers::app::App;
use workers::jobs::{JobName, JobOptions};
use workers::store::{RunOutcome, Trigger};

/// The project's app with the test API, reached with `token`, as its registry.
async fn app_over_api(project: &Project, api: &TestApi, token: &str) -> Arc<App> {
    let app = Arc::try_unwrap(project.app().await).ok().unwrap();
    Arc::new(App {
        registry: Arc::new(api.client_with(token)),
        ..app
    })
}

async fn run_job(app: &Arc<App>, job: JobName, dry_run: bool) -> workers::jobs::Execution {
    workers::jobs::execute(
        Arc::clone(app),
        job,
        Trigger::Manual,
        None,
        JobOptions {
            dry_run,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_posted_with_an_operator_token_fail_saying_an_admin_token_is_needed() {
    let project = Project::new();
    std::fs::create_dir_all(project.path("var")).unwrap();
    let api = TestApi::start();

    let app = app_over_api(&project, &api, api.operator_token()).await;
    let run = run_job(&app, JobName::Metrics, false).await;
    let RunOutcome::Failed(error) = &run.outcome else {
        panic!("{:?}", run.outcome);
    };
    assert!(error.contains("403"), "{error}");
    assert!(error.contains("needs an admin token"), "{error}");
    assert_eq!(api.count("POST", "metrics"), 1, "a 403 is not retried");

    let app = app_over_api(&project, &api, api.token()).await;
    let run = run_job(&app, JobName::Metrics, false).await;
    assert_eq!(run.outcome, RunOutcome::Success);
    let posted = api.requests_to("POST", "metrics");
    assert_eq!(posted.last().unwrap().status, Some(200));
    assert!(!posted.last().unwrap().body.as_ref().unwrap()[0]["measurement"].is_null());
}

#[test]
fn the_production_profile_posts_the_quota_series() {
    let mut project = Project::new();
    project.set_env("APP_ENV", "production");
    for (key, value) in [
        ("APP_API_TOKEN", "token"),
        ("QUEUE_PASS", "pass"),
        (
            "WORKERS__REGISTRATION__RAW_DATA__SOURCE_DIR",
            "/srv/origin/raw",
        ),
        (
            "WORKERS__REGISTRATION__DATA_PRODUCT__SOURCE_DIR",
            "/srv/origin/dp",
        ),
    ] {
        project.set_env(key, value);
    }
    let settings = project.settings();
    assert!(settings.metrics.quota);
    assert_eq!(
        settings.metrics.lfs_path,
        std::path::Path::new("/N/scratch")
    );
}

#[test]
fn paths_check_names_every_missing_directory_and_create_makes_them() {
    let project = Project::new();
    let out = project.run(&["paths", "check"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    let scratch = project.path("var/scratch");
    assert!(
        text.lines().any(|l| l.starts_with("Missing")
            && l.contains("paths.scratch")
            && l.ends_with(scratch.to_str().unwrap())),
        "{text}"
    );
    // The source directories of the test project exist.
    assert!(
        text.lines()
            .any(|l| l.starts_with("Exists") && l.contains("registration.RAW_DATA.source_dir")),
        "{text}"
    );
    for key in [
        "paths.RAW_DATA.qc",
        "paths.DATA_PRODUCT.bundle.stage",
        "illumina.download_dir",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    assert!(stderr(&out).contains("paths.scratch"), "{}", describe(&out));
    assert!(!scratch.exists(), "check alone creates nothing");

    let out = project.run_ok(&["paths", "check", "--create"]);
    assert!(stdout(&out).contains("Created"), "{}", describe(&out));
    assert!(scratch.is_dir());
    assert!(project.path("var/qc/raw_data").is_dir());
    let out = project.run_ok(&["paths", "check"]);
    assert!(
        stdout(&out).lines().all(|l| l.starts_with("Exists")),
        "{}",
        describe(&out)
    );

    // A file where a directory belongs cannot be fixed by --create.
    std::fs::remove_dir(project.path("var/downloads")).unwrap();
    write_file(&project.path("var/downloads"), b"not a directory");
    let out = project.run(&["paths", "check", "--create"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stdout(&out).contains("Not a directory  paths.download_dir"),
        "{}",
        describe(&out)
    );
}

#[test]
fn queue_delete_needs_yes_and_refuses_the_embedded_broker() {
    let project = Project::new();
    let out = project.run(&["queue", "delete"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("--yes"), "{}", describe(&out));
    let out = project.run(&["queue", "delete", "--yes"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("has no queue to delete"),
        "{}",
        describe(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_delete_removes_the_queue_from_rabbitmq_with_its_messages() {
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let Some(url) = common::services::service_var("WORKERS_TEST_AMQP_URL") else {
        return;
    };
    let parsed = url::Url::parse(&url).unwrap();
    let app_id = format!("workers-test-delete-{}", uuid::Uuid::new_v4().simple());
    let queue = format!("{app_id}.q");
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    // Declared with other arguments than the workers use: what the command is for.
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(5));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    for body in [b"one".as_slice(), b"two"] {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let mut project = Project::new();
    project.set_env("WORKERS__APP_ID", &app_id);
    project.set_env("WORKERS__BROKER__KIND", "amqp");
    project.set_env(
        "WORKERS__AMQP__URL",
        &format!(
            "{}:{}{}",
            parsed.host_str().unwrap(),
            parsed.port().unwrap_or(5672),
            parsed.path()
        ),
    );
    project.set_env("WORKERS__AMQP__USER", parsed.username());
    project.set_env("QUEUE_PASS", parsed.password().unwrap_or_default());
    let out = project.run(&["queue", "delete", "--yes"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stdout(&out).contains(&format!("deleted the queue `{queue}` (2 messages)")),
        "{}",
        describe(&out)
    );
    let check = conn.create_channel().await.unwrap();
    let passive = check
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(passive.is_err(), "the queue still exists");
}

/// Creates a dataset straight in the test API's store.
async fn api_dataset(api: &TestApi, name: &str, method: workers::model::CreateMethod) -> i64 {
    use workers::registry::Registry;
    api.registry()
        .bulk_create(&[workers::registry::NewDataset {
            name: workers::model::DatasetName::normalize(name).unwrap(),
            dataset_type: workers::model::DatasetType::RawData,
            origin_path: format!("/elsewhere/{name}"),
            create_method: method,
            description: None,
            metadata: None,
        }])
        .await
        .unwrap()
        .created[0]
        .id
}

fn register_options(dir: &std::path::Path, project_id: Option<&str>) -> RegisterOptions {
    RegisterOptions {
        dir: dir.to_path_buf(),
        dataset_type: workers::model::DatasetType::RawData,
        ingest_subdirs: true,
        prefix: None,
        suffix: None,
        description: None,
        project_id: project_id.map(str::to_owned),
        dry_run: false,
    }
}

use workers::jobs::register::{InvalidInput, Outcome, RegisterOptions};

#[tokio::test(flavor = "multi_thread")]
async fn register_with_a_project_associates_its_own_datasets_and_leaves_others_alone() {
    use workers::model::CreateMethod;
    let project = Project::new();
    let api = TestApi::start();
    api.add_project("0b9e6c1e-project", "sequencing-core", "Sequencing core");
    let app = app_over_api(&project, &api, api.token()).await;
    let container = project.path("incoming");
    for name in ["fresh", "ours_unstarted", "someone_elses", "scanned"] {
        write_file(&container.join(name).join("a.txt"), name.as_bytes());
    }
    // Registered on demand by the service user earlier, left without a workflow: continued.
    let ours = api_dataset(&api, "ours_unstarted", CreateMethod::OnDemand).await;
    // Registered on demand by a person: not this command's.
    let theirs = api_dataset(&api, "someone_elses", CreateMethod::OnDemand).await;
    api.set_creator(theirs, "alice");
    // Registered by watch: not this command's either.
    let scanned = api_dataset(&api, "scanned", CreateMethod::Scan).await;

    let opts = register_options(&container, Some("sequencing-core"));
    let report = workers::jobs::register::run(&app, &opts).await.unwrap();
    let outcome = |name: &str| {
        report
            .results
            .iter()
            .find(|(c, _)| c.name.as_str() == name)
            .map(|(_, o)| o.clone())
            .unwrap()
    };
    let Outcome::Registered {
        id: fresh,
        workflow_id: Some(_),
    } = outcome("fresh")
    else {
        panic!("{:?}", outcome("fresh"));
    };
    assert!(matches!(
        outcome("ours_unstarted"),
        Outcome::WorkflowStarted { id, workflow_id: Some(_) } if id == ours
    ));
    assert_eq!(outcome("someone_elses"), Outcome::Foreign { id: theirs });
    assert_eq!(outcome("scanned"), Outcome::Foreign { id: scanned });
    assert_eq!(report.failures(), 0);

    let mut associated = api.project_datasets("0b9e6c1e-project");
    associated.sort();
    let mut expected = vec![fresh, ours];
    expected.sort();
    assert_eq!(associated, expected, "only this command's datasets");
    // The slug was looked up; the association names the project's id.
    assert_eq!(api.count("GET", "projects/sequencing-core"), 1);
    assert!(
        api.requests_to("GET", "projects/sequencing-core")[0]
            .query
            .contains("include_datasets=false")
    );
    assert_eq!(api.count("PATCH", "projects/0b9e6c1e-project/datasets"), 1);

    // Run again: both are associated already (the API answers 409 to the pair), so each is
    // sent alone and nothing is duplicated.
    let report = workers::jobs::register::run(&app, &opts).await.unwrap();
    assert_eq!(report.failures(), 0, "{:?}", report.association);
    let mut again = api.project_datasets("0b9e6c1e-project");
    again.sort();
    assert_eq!(again, expected);
    assert_eq!(api.count("PATCH", "projects/0b9e6c1e-project/datasets"), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn register_refuses_an_unknown_or_malformed_project_before_registering_anything() {
    let project = Project::new();
    let api = TestApi::start();
    let app = app_over_api(&project, &api, api.token()).await;
    let container = project.path("incoming");
    write_file(&container.join("d1/a.txt"), b"a");

    let err = workers::jobs::register::run(&app, &register_options(&container, Some("no-such")))
        .await
        .unwrap_err();
    assert!(err.is::<InvalidInput>(), "{err:#}");
    assert!(
        format!("{err:#}").contains("project `no-such` does not exist"),
        "{err:#}"
    );
    let err = workers::jobs::register::run(&app, &register_options(&container, Some("a b")))
        .await
        .unwrap_err();
    assert!(err.is::<InvalidInput>(), "{err:#}");
    assert_eq!(api.count("POST", "datasets/bulk"), 0);
    assert_eq!(
        api.count("GET", "projects"),
        1,
        "a malformed id is never sent"
    );
}

#[test]
fn register_with_a_project_needs_the_bioloop_api() {
    let project = Project::new();
    let container = project.path("incoming");
    write_file(&container.join("d1/a.txt"), b"a");
    let out = project.run(&[
        "register",
        container.to_str().unwrap(),
        "--type",
        "RAW_DATA",
        "--ingest-subdirs",
        "--project-id",
        "core",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("projects need the Bioloop API"),
        "{}",
        describe(&out)
    );
    let out = project.run_ok(&["datasets", "list", "--format", "json"]);
    assert!(!stdout(&out).contains("d1"), "nothing was registered");
}

/// Registers `name` with `archive_path` recorded and no bundle.
async fn archived_without_bundle(
    app: &App,
    project: &Project,
    name: &str,
    archive_path: &str,
) -> i64 {
    use workers::registry::DatasetPatch;
    let id = register_small(app, project, name).await;
    app.registry
        .update(
            id,
            &DatasetPatch {
                archive_path: Some(Some(archive_path.to_owned())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn populate_bundles_records_the_archived_size_and_md5_and_a_dry_run_records_nothing() {
    let project = Project::new();
    let app = project.app().await;
    let archived = project.path("var/archive/2023/raw_data/old_run.tar");
    let content = pseudo_random(300_000, 9);
    write_file(&archived, &content);
    let old = archived_without_bundle(&app, &project, "old_run", archived.to_str().unwrap()).await;
    let missing_path = project.path("var/archive/2023/raw_data/gone.tar");
    let gone =
        archived_without_bundle(&app, &project, "gone", missing_path.to_str().unwrap()).await;
    // Not archived: not considered.
    let fresh = register_small(&app, &project, "not_archived").await;
    // du_size differs from the bundle's size: the archive's figure is recorded.
    app.registry
        .update(
            old,
            &workers::registry::DatasetPatch {
                du_size: Some(12),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    drop(app);

    let out = project.run_ok(&["jobs", "list"]);
    assert!(
        stdout(&out).contains("populate_bundles"),
        "{}",
        describe(&out)
    );
    let out = project.run_ok(&["jobs", "run", "populate_bundles", "--dry-run"]);
    assert!(stdout(&out).contains("would record"), "{}", describe(&out));
    let app = project.app().await;
    assert!(
        app.registry.get(old).await.unwrap().bundle.is_none(),
        "a dry run records nothing"
    );
    drop(app);

    let out = project.run_ok(&["jobs", "run", "populate_bundles"]);
    let text = stdout(&out);
    assert!(
        text.contains("skipped") && text.contains("gone.tar"),
        "{text}"
    );
    let app = project.app().await;
    let bundle = app.registry.get(old).await.unwrap().bundle.unwrap();
    assert_eq!(bundle.name, "old_run.tar");
    assert_eq!(bundle.size, content.len() as u64);
    assert_eq!(bundle.md5.to_string(), md5sum(&archived));
    assert!(app.registry.get(gone).await.unwrap().bundle.is_none());
    assert!(app.registry.get(fresh).await.unwrap().bundle.is_none());
    let history = project.run_ok(&["jobs", "history", "populate_bundles", "--format", "json"]);
    let runs: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(runs[0]["counters"]["recorded"], 1, "{runs}");
    assert_eq!(runs[0]["counters"]["skipped"], 1, "{runs}");
    assert_eq!(runs[1]["counters"]["would_record"], 1, "{runs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn populate_bundles_reads_the_md5_hpss_stored_and_skips_files_stored_without_one() {
    let mut project = Project::new();
    let bin = project.path("bin");
    let home = project.path("hpss");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    install_hsi_stand_in(&bin);
    std::fs::write(
        bin.join("hsi.env"),
        format!("HSI_STANDIN_HOME={}\n", home.display()),
    )
    .unwrap();
    let hsi = bin.join("hsi");
    let local = project.path("bundle.tar");
    write_file(&local, &pseudo_random(50_000, 3));
    for command in [
        "mkdir -p archive/2023/raw_data",
        &format!(
            "put -c on {} : archive/2023/raw_data/hashed.tar",
            local.display()
        ),
        &format!(
            "put {} : archive/2023/raw_data/unhashed.tar",
            local.display()
        ),
    ] {
        let out = Command::new(&hsi).arg("-P").arg(command).output().unwrap();
        assert!(out.status.success(), "{command}: {}", describe(&out));
    }
    project.set_env("WORKERS__ARCHIVE__KIND", "hsi");
    project.set_env("WORKERS__HSI__COMMAND", hsi.to_str().unwrap());
    let app = project.app().await;
    let hashed =
        archived_without_bundle(&app, &project, "hashed", "archive/2023/raw_data/hashed.tar").await;
    let unhashed = archived_without_bundle(
        &app,
        &project,
        "unhashed",
        "archive/2023/raw_data/unhashed.tar",
    )
    .await;
    let run = run_job(&app, JobName::PopulateBundles, false).await;
    assert_eq!(run.outcome, RunOutcome::Success);
    let bundle = app.registry.get(hashed).await.unwrap().bundle.unwrap();
    assert_eq!(bundle.size, 50_000);
    assert_eq!(bundle.md5.to_string(), md5sum(&local));
    assert!(app.registry.get(unhashed).await.unwrap().bundle.is_none());
    let Some(workers::jobs::JobReport::PopulateBundles(report)) = run.report else {
        panic!("{:?}", run.report);
    };
    assert!(
        report.skipped[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("without a checksum"),
        "{report:?}"
    );
}

#[test]
fn the_new_keys_are_checked_like_the_others() {
    let mut project = Project::new();
    project.set_env("WORKERS__QC__THREADS", "0");
    project.set_env("WORKERS__ILLUMINA__N_DAYS", "seven");
    project.set_env("WORKERS__WORKFLOWS__INTEGRATED__QCC", "true");
    let out = project.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = stderr(&out);
    assert!(err.contains("qc.threads: must be at least 1"), "{err}");
    assert!(err.contains("illumina.n_days"), "{err}");
    assert!(
        err.contains("workflows.integrated.qcc: unknown key (did you mean `qc`?)"),
        "{err}"
    );
}

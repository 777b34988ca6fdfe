//! `workers doctor`: every check on a line with what to do; exit 0 when all pass, 1 otherwise.
//! A healthy embedded deployment, then each part broken in turn: the configuration, the
//! directories, MongoDB, RabbitMQ (unreachable, and a queue declared with other arguments) and
//! the Bioloop API (a token refused, a token without the admin role the metrics job needs).

use std::process::Output;

use serde_json::Value;

use crate::common::bioloop_api::TestApi;
use crate::common::services::{TestDatabase, service_var};
use crate::common::*;

fn doctor(project: &Project) -> (Output, Value) {
    let out = project.run(&["doctor", "--format", "json"]);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {}", describe(&out)));
    (out, report)
}

/// The checks of `area` that failed: their details and fixes.
fn failed(report: &Value, area: &str) -> Vec<(String, String)> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == area && c["ok"] == false)
        .map(|c| {
            (
                c["detail"].as_str().unwrap().to_owned(),
                c["fix"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A project whose directories exist and belong to the user the tests run as.
fn healthy_project() -> Project {
    let mut project = Project::new();
    let me = if rustix::process::geteuid().is_root() {
        "root".to_owned()
    } else {
        std::env::var("USER").unwrap_or_default()
    };
    project.set_env("WORKERS__SERVICE_USER", &me);
    project.set_env("WORKERS__CAPACITY__HEADROOM", "0");
    project.run_ok(&["paths", "check", "--create"]);
    project
}

#[test]
fn a_healthy_embedded_deployment_passes_and_each_broken_part_is_named_with_its_fix() {
    let mut project = healthy_project();
    let (out, report) = doctor(&project);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["ok"], true);
    let areas: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    for area in [
        "configuration",
        "directories",
        "store",
        "clock",
        "broker",
        "registry",
        "free space",
    ] {
        assert!(areas.contains(&area), "{area} is checked: {areas:?}");
    }
    let text = stdout(&project.run_ok(&["doctor"]));
    assert!(text.lines().all(|l| l.starts_with('✔')), "{text}");

    // A directory missing, and a file where one belongs.
    let file = project.path("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    project.set_env("WORKERS__PATHS__DOWNLOAD_DIR", file.to_str().unwrap());
    project.set_env(
        "WORKERS__PATHS__RAW_DATA__STAGE",
        project.path("var/never-made").to_str().unwrap(),
    );
    let (out, report) = doctor(&project);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let problems = failed(&report, "directories");
    assert!(
        problems
            .iter()
            .any(|(d, fix)| d.starts_with("paths.RAW_DATA.stage")
                && d.ends_with("missing")
                && fix.contains("workers paths check --create")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|(d, _)| d.starts_with("paths.download_dir") && d.ends_with("not a directory")),
        "{problems:?}"
    );
    let text = stdout(&project.run(&["doctor"]));
    assert!(text.contains("✘ directories: paths.download_dir"), "{text}");
    assert!(text.contains("    → "), "{text}");

    // A broken configuration is a finding too, with exit 1.
    project.set_env("WORKERS__WORKER__CONCURRENCY", "two");
    let (out, report) = doctor(&project);
    assert_eq!(out.status.code(), Some(1));
    let problems = failed(&report, "configuration");
    assert!(problems[0].0.contains("worker.concurrency"), "{problems:?}");
}

#[test]
fn directories_not_owned_by_the_service_user_are_named_with_a_chown() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: ownership is checked when doctor runs as root");
        return;
    }
    let mut project = healthy_project();
    // `nobody` exists on every Debian system; the project's directories are root's.
    project.set_env("WORKERS__SERVICE_USER", "nobody");
    let (out, report) = doctor(&project);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let problems = failed(&report, "directories");
    assert!(
        problems.iter().any(
            |(d, fix)| d.contains("owned by uid 0, not by the service user")
                && fix.starts_with("chown -R ")
        ),
        "{problems:?}"
    );
    project.set_env("WORKERS__SERVICE_USER", "no-such-user-here");
    let (_, report) = doctor(&project);
    let problems = failed(&report, "directories");
    assert!(
        problems[0].0.contains("`no-such-user-here` does not exist"),
        "{problems:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn production_backends_are_checked_each_on_its_own() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{Connection, ConnectionProperties};

    let (Some(amqp), Some(db)) = (service_var("WORKERS_TEST_AMQP_URL"), TestDatabase::new()) else {
        return;
    };
    let api = TestApi::start();
    let app_id = format!(
        "doctor-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut project = healthy_project();
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
    ] {
        project.set_env(key, value);
    }
    let (out, report) = doctor(&project);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let detail = |area: &str| -> Vec<String> {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["check"] == area)
            .map(|c| c["detail"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(detail("store")[0].contains("MongoDB at"), "{report:#}");
    assert!(
        detail("clock")[0].contains("ms from this host's"),
        "{report:#}"
    );
    assert!(
        detail("broker")[0].contains(&format!("{app_id}.q")),
        "{report:#}"
    );
    assert!(
        detail("registry")
            .iter()
            .any(|d| d.contains("may record metrics")),
        "{report:#}"
    );

    // An operator's token: accepted, but the metrics job could not post.
    project.set_env("APP_API_TOKEN", api.operator_token());
    let (out, report) = doctor(&project);
    assert_eq!(out.status.code(), Some(1));
    let problems = failed(&report, "registry");
    assert!(
        problems[0].0.contains("admin role") && problems[0].1.contains("admin's token"),
        "{problems:?}"
    );
    // A token the API refuses.
    project.set_env("APP_API_TOKEN", "not-a-token");
    let (_, report) = doctor(&project);
    assert_eq!(failed(&report, "registry").len(), 1, "{report:#}");
    project.set_env("APP_API_TOKEN", api.token());

    // The queue declared by someone else with other arguments.
    let other = format!(
        "doctor-other-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(5));
    channel
        .queue_declare(
            format!("{other}.q").as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    project.set_env("WORKERS__APP_ID", &other);
    let (out, report) = doctor(&project);
    assert_eq!(out.status.code(), Some(1));
    let problems = failed(&report, "broker");
    assert!(
        problems[0].0.contains("exists with other arguments")
            && problems[0].0.contains("workers queue delete --yes"),
        "{problems:?}"
    );
    channel
        .queue_delete(
            format!("{other}.q").as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    project.set_env("WORKERS__APP_ID", &app_id);

    // RabbitMQ nowhere to be found.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    project.set_env("WORKERS__AMQP__URL", &format!("127.0.0.1:{port}/%2f"));
    project.set_env("WORKERS__AMQP__RECONNECT_MAX_SECONDS", "1");
    let (out, report) = doctor(&project);
    assert_eq!(out.status.code(), Some(1));
    let problems = failed(&report, "broker");
    assert!(problems[0].1.contains("amqp.url"), "{problems:?}");
    project.set_env("WORKERS__AMQP__URL", &amqp);

    // MongoDB nowhere to be found: the store fails, and the rest is not checked.
    project.set_env(
        "WORKERS__MONGO__URI",
        &format!("mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=1000"),
    );
    let (out, report) = doctor(&project);
    assert_eq!(out.status.code(), Some(1));
    let problems = failed(&report, "store");
    assert!(
        problems[0].0.contains("cannot reach MongoDB") && problems[0].1.contains("mongo.uri"),
        "{problems:?}"
    );
}

//! The Prometheus endpoint of `workers worker` and `workers scheduler`, scraped over HTTP:
//! step counters, durations, queue waits and bytes after one workflow that succeeds and one
//! that fails; revoked tasks; job runs, last successes and the lease of a scheduler; the
//! startup errors of a taken port and a bad address; and the publication time RabbitMQ
//! messages carry.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use workers::model::{CreateMethod, DatasetName, DatasetType};
use workers::registry::NewDataset;
use workers::store::TaskStatus;
use workers::workflow::engine;

/// One scrape of `/metrics`.
struct Scrape {
    content_type: String,
    text: String,
    /// Each sample by its series (`name{labels}`), as the exposition writes it.
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// The value of `series`, failing with the whole exposition when it is absent.
    fn get(&self, series: &str) -> f64 {
        match self.samples.get(series) {
            Some(value) => *value,
            None => panic!("no sample {series} in:\n{}", self.text),
        }
    }

    fn steps(&self, task: &str, outcome: &str) -> f64 {
        self.samples
            .get(&format!(
                "workers_steps_total{{task=\"{task}\",outcome=\"{outcome}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
    }
}

/// GET /metrics on `port` with a plain HTTP/1.1 request; `None` while nothing answers there.
fn scrape(port: u16) -> Option<Scrape> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"), "{response}");
    let headers: BTreeMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    assert!(
        !headers.contains_key("transfer-encoding"),
        "a body of known length: {head}"
    );
    let samples = body
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse::<f64>().unwrap())
        })
        .collect();
    Some(Scrape {
        content_type: headers.get("content-type").cloned().unwrap_or_default(),
        text: body.to_owned(),
        samples,
    })
}

/// Scrapes `port` until `ready` holds, failing with the last exposition after `timeout`.
fn scrape_until(
    port: u16,
    timeout: Duration,
    what: &str,
    ready: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + timeout;
    let mut last = "(nothing answers)".to_owned();
    loop {
        if let Some(scraped) = scrape(port) {
            if ready(&scraped) {
                return scraped;
            }
            last = scraped.text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last scrape:\n{last}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// SIGTERM, then the exit status and what the process wrote to stderr.
fn stop(mut child: Child) -> (Option<i32>, String) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the process did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_serves_its_steps_durations_queue_waits_and_bytes() {
    let mut project = Project::new();
    let port = free_port();
    project.set_env("WORKERS__PROMETHEUS__LISTEN", &format!("127.0.0.1:{port}"));
    project.set_env(
        "WORKERS__RETRY__STEPS__ARCHIVE_DATASET",
        "{ max_retries = 1, delay_seconds = 0 }",
    );
    let app = project.app().await;

    let good_files = [
        ("a.bin", pseudo_random(300_000, 1)),
        ("d/b.bin", pseudo_random(70_001, 2)),
    ];
    let good_size: u64 = good_files.iter().map(|(_, c)| c.len() as u64).sum();
    let files: Vec<(&str, &[u8])> = good_files.iter().map(|(p, c)| (*p, &c[..])).collect();
    let origin = project.dataset(DatasetType::RawData, "good", &files);
    let good = register_without_workflow(&app, "good", &origin).await;

    // A data product whose bundle directory cannot be created (a file stands where it goes):
    // archiving it fails with an I/O error, is tried once more, then fails the workflow.
    let bad_content = pseudo_random(5_000, 3);
    let origin = project.dataset(DatasetType::DataProduct, "bad", &[("c.bin", &bad_content)]);
    let bad = app
        .registry
        .bulk_create(&[NewDataset {
            name: DatasetName::normalize("bad").unwrap(),
            dataset_type: DatasetType::DataProduct,
            origin_path: origin.to_string_lossy().into_owned(),
            create_method: CreateMethod::Scan,
            description: None,
            metadata: None,
        }])
        .await
        .unwrap()
        .created[0]
        .id;
    let blocker = app
        .settings
        .paths
        .data_product
        .bundle_generate
        .parent()
        .unwrap()
        .to_path_buf();
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"not a directory").unwrap();

    let good_workflow = engine::start(&app, "integrated", good, Default::default())
        .await
        .unwrap();
    let bad_workflow = engine::start(&app, "integrated", bad, Default::default())
        .await
        .unwrap();
    let child = project
        .command(&["worker", "--concurrency", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _reap = Reap(child.id());

    let scraped = scrape_until(
        port,
        Duration::from_secs(120),
        "both workflows to end",
        |s| {
            s.steps("setup_dataset_download", "succeeded") == 1.0
                && s.steps("archive_dataset", "failed") == 1.0
        },
    );
    assert_eq!(
        view_of(&app, &good_workflow).await.derived.status,
        TaskStatus::Success
    );
    assert_eq!(
        view_of(&app, &bad_workflow).await.derived.status,
        TaskStatus::Failure
    );
    assert!(
        scraped
            .content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        scraped.content_type
    );

    // Every attempt by task and outcome.
    for (task, outcome, count) in [
        ("await_stability", "succeeded", 2.0),
        ("inspect_dataset", "succeeded", 2.0),
        ("archive_dataset", "succeeded", 1.0),
        ("archive_dataset", "retried", 1.0),
        ("archive_dataset", "failed", 1.0),
        ("stage_dataset", "succeeded", 1.0),
        ("validate_dataset", "succeeded", 1.0),
        ("setup_dataset_download", "succeeded", 1.0),
    ] {
        assert_eq!(scraped.steps(task, outcome), count, "{task} {outcome}");
    }
    assert_eq!(scraped.steps("stage_dataset", "failed"), 0.0);
    for task in ["inspect_dataset", "archive_dataset", "validate_dataset"] {
        assert_eq!(
            scraped.get(&format!("workers_steps_running{{task=\"{task}\"}}")),
            0.0,
            "{task}"
        );
    }

    // One observation per attempt, in the histogram of its outcome.
    let duration = |task: &str, outcome: &str, part: &str| {
        scraped.get(&format!(
            "workers_step_duration_seconds_{part}{{task=\"{task}\",outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(duration("inspect_dataset", "succeeded", "count"), 2.0);
    assert_eq!(duration("archive_dataset", "retried", "count"), 1.0);
    assert_eq!(duration("archive_dataset", "failed", "count"), 1.0);
    assert!(duration("inspect_dataset", "succeeded", "sum") > 0.0);
    assert_eq!(
        scraped.get(
            "workers_step_duration_seconds_bucket{le=\"+Inf\",task=\"inspect_dataset\",outcome=\"succeeded\"}"
        ),
        2.0
    );
    // Every start waited in the embedded queue, which records when each message was published.
    assert_eq!(
        scraped.get("workers_queue_wait_seconds_count{task=\"inspect_dataset\"}"),
        2.0
    );
    assert_eq!(
        scraped.get("workers_queue_wait_seconds_count{task=\"archive_dataset\"}"),
        3.0,
        "two attempts of one archive, one of the other"
    );

    // Bytes: both datasets were inspected and the good one validated (each file hashed once
    // per pass); the good one's bundle was written, fetched back for staging and extracted.
    // The archive is a directory on the same file system: the bundle moved into it by a rename,
    // transferring nothing.
    let dataset = app.registry.get(good).await.unwrap();
    let bundle = dataset
        .bundle
        .expect("the good dataset has its bundle recorded");
    assert_eq!(
        scraped.get("workers_hashed_bytes_total"),
        (2 * good_size + bad_content.len() as u64) as f64
    );
    assert_eq!(
        scraped.get("workers_bundled_bytes_total"),
        bundle.size as f64
    );
    assert_eq!(
        scraped.get("workers_extracted_bytes_total"),
        good_size as f64
    );
    assert_eq!(
        scraped.get("workers_transferred_bytes_total{direction=\"stage\"}"),
        bundle.size as f64
    );
    assert_eq!(
        scraped.get("workers_transferred_bytes_total{direction=\"archive\"}"),
        0.0
    );

    let (code, stderr) = stop(child);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("http://127.0.0.1:{port}/metrics")),
        "the address is logged: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_counts_the_tasks_it_revokes() {
    let mut project = Project::new();
    let port = free_port();
    project.set_env("WORKERS__PROMETHEUS__LISTEN", &format!("127.0.0.1:{port}"));
    let app = project.app().await;
    let child = project
        .command(&["worker", "--hostname", "w1@test"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _reap = Reap(child.id());
    let revoked = "workers_tasks_revoked_total{task=\"noop\"}";
    let running = "workers_steps_running{task=\"noop\"}";

    // A step holding for 600 s, revoked with terminate while it runs.
    let workflow_id = start_noop_workflow(&app, 600.0).await;
    scrape_until(port, Duration::from_secs(30), "the step to run", |s| {
        s.samples.get(running) == Some(&1.0)
    });
    let task_id = view_of(&app, &workflow_id).await.workflow.steps[0].runs[0]
        .task_id
        .clone();
    let out = project.run(&["control", "revoke", &task_id, "--terminate"]);
    assert!(out.status.success(), "{}", describe(&out));
    let scraped = scrape_until(port, Duration::from_secs(30), "the revoke", |s| {
        s.samples.get(revoked) == Some(&1.0)
    });
    assert_eq!(scraped.get(running), 0.0);
    assert_eq!(
        scraped.steps("noop", "failed"),
        0.0,
        "a revoke is not a failure"
    );

    // Revoked before its message arrives: discarded, counted too.
    let later = uuid::Uuid::new_v4().to_string();
    let out = project.run(&["control", "revoke", &later]);
    assert!(out.status.success(), "{}", describe(&out));
    app.broker
        .publish(&workers::broker::TaskMessage {
            id: later.clone(),
            task: "noop".into(),
            args: vec![serde_json::json!(7)],
            kwargs: serde_json::Map::new(),
            priority: 1,
            eta: None,
            retries: 0,
            root_id: later.clone(),
            parent_id: None,
            queue: app.settings.amqp.queues[0].clone(),
            time_limits: Default::default(),
        })
        .await
        .unwrap();
    scrape_until(
        port,
        Duration::from_secs(30),
        "the discarded message",
        |s| s.samples.get(revoked) == Some(&2.0),
    );
    let (code, stderr) = stop(child);
    assert_eq!(code, Some(0), "{stderr}");
}

/// A project whose scheduler runs `watch` every second and nothing else, with a short lease
/// and no steps of its own.
fn scheduler_project(port: u16) -> Project {
    let mut project = Project::new();
    project.set_env("WORKERS__PROMETHEUS__LISTEN", &format!("127.0.0.1:{port}"));
    project.set_env("WORKERS__SCHEDULES__WATCH__EVERY", "1s");
    for job in [
        "PURGE_STAGED_DATASETS",
        "PURGE_STALE_WORKFLOWS",
        "RECONCILE",
        "METRICS",
        "MANAGE_UPLOAD_WORKFLOWS",
        "PURGE_STALE_UPLOADED",
        "FIXITY",
    ] {
        project.set_env(&format!("WORKERS__SCHEDULES__{job}__ENABLED"), "false");
    }
    project.set_env("WORKERS__SCHEDULER__LEASE_SECONDS", "3");
    project.set_env("WORKERS__SCHEDULER__WORKERS", "0");
    project
}

/// When `watch` last ended successfully, as its history records it (Unix time).
fn last_recorded_success(project: &Project) -> f64 {
    let out = project.run_ok(&["jobs", "history", "watch", "--format", "json"]);
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ended = runs
        .as_array()
        .unwrap()
        .iter()
        .filter(|run| run["outcome"] == "success")
        .filter_map(|run| run["ended_at"].as_str())
        .map(|at| chrono::DateTime::parse_from_rfc3339(at).unwrap())
        .max()
        .expect("a successful run of watch");
    ended.timestamp_millis() as f64 / 1000.0
}

fn spawn_scheduler(project: &Project) -> Child {
    project
        .command(&["scheduler"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_scheduler_serves_its_job_runs_last_successes_periods_and_lease() {
    let port = free_port();
    let mut project = scheduler_project(port);
    let before = chrono::Utc::now().timestamp() as f64;
    let child = spawn_scheduler(&project);
    let _reap = Reap(child.id());
    let watch_runs = "workers_job_runs_total{job_name=\"watch\",outcome=\"success\"}";
    let last_success = "workers_job_last_success_timestamp_seconds{job_name=\"watch\"}";
    let scraped = scrape_until(port, Duration::from_secs(60), "two runs of watch", |s| {
        s.samples.get(watch_runs).is_some_and(|n| *n >= 2.0)
    });
    let after = chrono::Utc::now().timestamp() as f64 + 1.0;
    let succeeded = scraped.get(last_success);
    assert!(
        (before..=after).contains(&succeeded),
        "{before} <= {succeeded} <= {after}"
    );
    assert_eq!(scraped.get("workers_scheduler_lease_held"), 1.0);
    assert_eq!(
        scraped.get("workers_job_period_seconds{job_name=\"watch\"}"),
        1.0
    );
    assert!(
        !scraped
            .text
            .contains("workers_job_period_seconds{job_name=\"reconcile\"}"),
        "a disabled job has no period:\n{}",
        scraped.text
    );
    assert!(
        !scraped
            .text
            .contains("workers_job_runs_total{job_name=\"watch\",outcome=\"failed\"}"),
        "{}",
        scraped.text
    );
    let (code, stderr) = stop(child);
    assert_eq!(code, Some(0), "{stderr}");

    // Started again with watch off, the scheduler reports watch's last success from the
    // history at once, though it runs nothing.
    project.set_env("WORKERS__SCHEDULES__WATCH__ENABLED", "false");
    let child = spawn_scheduler(&project);
    let _reap = Reap(child.id());
    let scraped = scrape_until(port, Duration::from_secs(30), "the lease", |s| {
        s.samples.get("workers_scheduler_lease_held") == Some(&1.0)
    });
    assert_eq!(scraped.get(last_success), last_recorded_success(&project));
    assert!(
        !scraped.text.contains(watch_runs),
        "no run in this process:\n{}",
        scraped.text
    );
    assert!(
        !scraped.text.contains("workers_job_period_seconds{"),
        "{}",
        scraped.text
    );
    let (code, stderr) = stop(child);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_taken_port_is_a_startup_error_naming_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut project = Project::new();
    project.set_env("WORKERS__PROMETHEUS__LISTEN", &format!("127.0.0.1:{port}"));
    for args in [&["worker", "--until-idle"][..], &["scheduler"][..]] {
        let out = project.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
        assert!(
            stderr(&out).contains(&format!(
                "cannot serve metrics on 127.0.0.1:{port} (prometheus.listen)"
            )),
            "{args:?}: {}",
            describe(&out)
        );
    }
    drop(taken);
}

#[test]
fn a_bad_address_is_a_configuration_error() {
    let mut project = Project::new();
    project.set_env("WORKERS__PROMETHEUS__LISTEN", "localhost:9808");
    let out = project.run(&["worker", "--until-idle"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = stderr(&out);
    assert!(
        stderr.contains("prometheus.listen") && stderr.contains("`localhost:9808`"),
        "{stderr}"
    );
}

/// With RabbitMQ, a message this program publishes carries when it was published (the AMQP
/// `timestamp`, to the second), so its wait in the queue is measured; one published as Celery
/// publishes, without a timestamp, has none and is not measured.
#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_messages_carry_their_publication_time_when_published_here() {
    use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
    use lapin::{Connection, ConnectionProperties};
    use workers::broker::amqp::{AmqpBroker, AmqpConfig};
    use workers::broker::{Broker, Delivery};

    let Some(url) = services::service_var("WORKERS_TEST_AMQP_URL") else {
        return;
    };
    let queue = format!("workers-test-published-{}", uuid::Uuid::new_v4().simple());
    let config = AmqpConfig {
        uri: url.clone(),
        queues: vec![queue.clone()],
        prefetch: 1,
        heartbeat: 10,
        reconnect_max: Duration::from_secs(2),
        max_held: 100,
        dead_letter_exchange: None,
    };
    let broker = AmqpBroker::new(config, &workers::identity::Identity::current()).unwrap();
    let message = |id: &str| workers::broker::TaskMessage {
        id: id.to_owned(),
        task: "noop".into(),
        args: vec![serde_json::json!(1)],
        kwargs: serde_json::Map::new(),
        priority: 0,
        eta: None,
        retries: 0,
        root_id: id.to_owned(),
        parent_id: None,
        queue: queue.clone(),
        time_limits: Default::default(),
    };
    let next = || async {
        tokio::time::timeout(Duration::from_secs(30), broker.next())
            .await
            .expect("the message is delivered")
            .unwrap()
    };

    let before = chrono::Utc::now().timestamp();
    broker.publish(&message("ours")).await.unwrap();
    let delivery: Box<dyn Delivery> = next().await;
    assert_eq!(delivery.message().id, "ours");
    let published = delivery
        .published_at()
        .expect("our publisher sets the timestamp")
        .timestamp();
    let after = chrono::Utc::now().timestamp();
    assert!(
        (before..=after).contains(&published),
        "{before} <= {published} <= {after}"
    );
    delivery.ack().await.unwrap();

    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let (properties, body) = workers::broker::celery::encode(
        &message("celerys"),
        &workers::broker::celery::Sender::new("celery-host", 1),
    );
    // Our publisher declared the queue and its exchange (Celery's topology: both named after
    // the queue).
    channel
        .basic_publish(
            queue.as_str().into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let delivery = next().await;
    assert_eq!(delivery.message().id, "celerys");
    assert_eq!(delivery.published_at(), None);
    delivery.ack().await.unwrap();

    broker.stop_consuming().await.unwrap();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = channel
        .exchange_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "OK".into()).await;
}

//! The HTTP registry against a Bioloop API on a real socket: retries and their timing,
//! `Retry-After`, timeouts, dropped connections, writes that a retry must not duplicate,
//! errors, BigInt strings, paging of the file listing, filters the API lacks, and the whole
//! `integrated` workflow with file rows that carry no sizes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::bioloop_api::{Fault, TestApi};
use crate::common::*;
use chrono::{TimeDelta, Utc};
use serde_json::json;
use workers::app::App;
use workers::compute::md5::md5_bytes;
use workers::model::{CreateMethod, DatasetName, DatasetState, DatasetType, FileRecord, FileType};
use workers::registry::http::{HttpConfig, HttpRegistry};
use workers::registry::{
    Dataset, DatasetPatch, DatasetQuery, FilePages, MAX_BULK, NewDataset, Registry, RegistryError,
};
use workers::store::TaskStatus;
use workers::workflow::engine;

/// Quick retries, so that tests measure the schedule rather than wait for it.
fn config(api: &TestApi) -> HttpConfig {
    HttpConfig {
        base_url: api.base_url(),
        token: api.token().to_owned(),
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(2),
        max_retries: 5,
        backoff: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        rows_visible_wait: Duration::from_secs(20),
        file_batch: workers::registry::http::FILE_BATCH,
    }
}

fn registry(config: HttpConfig) -> HttpRegistry {
    HttpRegistry::new(config).unwrap()
}

fn new_dataset(name: &str, origin: &str) -> NewDataset {
    NewDataset {
        name: DatasetName::normalize(name).unwrap(),
        dataset_type: DatasetType::RawData,
        origin_path: origin.to_owned(),
        create_method: CreateMethod::Scan,
        description: None,
        metadata: None,
    }
}

async fn create(registry: &dyn Registry, name: &str) -> Dataset {
    let outcome = registry
        .bulk_create(&[new_dataset(name, &format!("/data/{name}"))])
        .await
        .unwrap();
    assert_eq!(outcome.created.len(), 1, "{outcome:?}");
    outcome.created.into_iter().next().unwrap()
}

fn rows(n: usize) -> Vec<FileRecord> {
    (0..n)
        .map(|i| FileRecord {
            path: format!("dir{}/file{i:05}.bin", i % 7),
            md5: Some(md5_bytes(format!("content {i}").as_bytes())),
            size: Some(i as u64 * 10),
            file_type: FileType::File,
        })
        .collect()
}

/// Every live dataset of that name, as the API itself holds them.
async fn stored_named(api: &TestApi, name: &str) -> Vec<Dataset> {
    api.registry()
        .find(&DatasetQuery {
            name: Some(DatasetName::normalize(name).unwrap()),
            ..DatasetQuery::default()
        })
        .await
        .unwrap()
}

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test]
async fn bursts_of_503_are_retried_on_the_urllib3_schedule() {
    let api = TestApi::start();
    let registry = registry(HttpConfig {
        backoff: Duration::from_millis(200),
        backoff_max: Duration::from_millis(500),
        ..config(&api)
    });
    api.inject("POST", "datasets/bulk", Fault::unavailable(), 3);
    let created = create(&registry, "after_a_burst").await;
    assert_eq!(created.name.as_str(), "after_a_burst");

    let attempts = api.requests_to("POST", "datasets/bulk");
    let statuses: Vec<_> = attempts.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [Some(503), Some(503), Some(503), Some(200)]);
    let gaps = gaps(&attempts.iter().map(|r| r.at).collect::<Vec<_>>());
    // No wait before the first retry, then 200 ms * 2^(n-1), capped at 500 ms.
    assert!(gaps[0] < Duration::from_millis(150), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(400), "{gaps:?}");
    assert!(
        gaps[2] >= Duration::from_millis(500) && gaps[2] < Duration::from_millis(750),
        "{gaps:?}"
    );
    assert_eq!(stored_named(&api, "after_a_burst").await.len(), 1);
}

#[tokio::test]
async fn retry_after_is_honoured_as_seconds_and_as_a_date() {
    let api = TestApi::start();
    let registry = registry(HttpConfig {
        backoff_max: Duration::from_secs(5),
        ..config(&api)
    });
    let d = create(&registry, "patience").await;
    let path = format!("datasets/{}", d.id);
    let in_two_seconds = (Utc::now() + TimeDelta::seconds(2)).to_rfc2822();
    api.inject("GET", &path, Fault::unavailable_for(&in_two_seconds), 1);
    api.inject("GET", &path, Fault::unavailable_for("1"), 1);
    let started = Instant::now();
    assert_eq!(registry.get(d.id).await.unwrap().id, d.id);
    let elapsed = started.elapsed();

    let attempts = api.requests_to("GET", &path);
    assert_eq!(attempts.len(), 3);
    let gaps = gaps(&attempts.iter().map(|r| r.at).collect::<Vec<_>>());
    // The date has whole seconds: "in two seconds" is at least one second away.
    assert!(gaps[0] >= Duration::from_millis(900), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(950), "{gaps:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

    // A Retry-After longer than the longest backoff waits only that long.
    let impatient = HttpRegistry::new(HttpConfig {
        backoff_max: Duration::from_millis(300),
        ..config(&api)
    })
    .unwrap();
    api.inject("GET", &path, Fault::unavailable_for("30"), 1);
    let started = Instant::now();
    impatient.get(d.id).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn slow_answers_are_retried_without_duplicating_writes() {
    let api = TestApi::start();
    let registry = registry(HttpConfig {
        read_timeout: Duration::from_millis(300),
        ..config(&api)
    });
    let slow = Fault::Delay(Duration::from_millis(1500));
    let d = create(&registry, "slow_api").await;

    // The state was written before the answer timed out: reading back shows it, so it is
    // not posted again.
    let states = format!("datasets/{}/states", d.id);
    api.inject("POST", &states, slow.clone(), 1);
    registry.add_state(d.id, DatasetState::Ready).await.unwrap();
    assert_eq!(api.stored_states(d.id), ["REGISTERED", "READY"]);
    assert_eq!(api.count("POST", &states), 1);

    // File rows are unique per path: the repeated batch adds nothing.
    let files = format!("datasets/{}/files", d.id);
    api.inject("POST", &files, slow.clone(), 1);
    registry.add_files(d.id, &rows(30)).await.unwrap();
    assert_eq!(api.count("POST", &files), 2);
    assert_eq!(file_rows_in(&api, d.id).await, 30);

    // A repeated link answers 409: already linked. (The first answer never left the server:
    // the client had hung up.)
    let workflows = format!("datasets/{}/workflows", d.id);
    api.inject("POST", &workflows, slow.clone(), 1);
    registry.add_workflow(d.id, "wf-slow").await.unwrap();
    let statuses: Vec<_> = api
        .requests_to("POST", &workflows)
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [None, Some(409)]);
    assert_eq!(registry.get(d.id).await.unwrap().workflows, ["wf-slow"]);

    // The repeated bulk create finds the dataset the first attempt made: it is reported as
    // created, once.
    api.inject("POST", "datasets/bulk", slow, 1);
    let before = api.count("POST", "datasets/bulk");
    let outcome = registry
        .bulk_create(&[new_dataset(
            "made_while_waiting",
            "/data/made_while_waiting",
        )])
        .await
        .unwrap();
    assert_eq!(api.count("POST", "datasets/bulk") - before, 2);
    assert!(outcome.conflicted.is_empty(), "{outcome:?}");
    assert_eq!(outcome.created.len(), 1);
    assert_eq!(outcome.created[0].name.as_str(), "made_while_waiting");
    assert_eq!(
        state_names(&outcome.created[0]),
        ["REGISTERED"],
        "the whole dataset"
    );
    assert_eq!(stored_named(&api, "made_while_waiting").await.len(), 1);
}

async fn file_rows_in(api: &TestApi, id: i64) -> usize {
    let mut n = 0;
    let mut pages = FilePages::new(api.registry(), id, 1000);
    while let Some(page) = pages.next().await.unwrap() {
        n += page.len();
    }
    n
}

#[tokio::test]
async fn dropped_connections_do_not_duplicate_writes() {
    let api = TestApi::start();
    let registry = registry(config(&api));
    // Made long enough before the bulk create below that it cannot be that call's work.
    let old = create(&registry, "registered_long_ago").await;
    let made_old = Instant::now();
    let d = create(&registry, "dropped").await;

    let states = format!("datasets/{}/states", d.id);
    // Performed, then the connection dropped: not posted again.
    api.inject("POST", &states, Fault::DropAfter, 1);
    registry.add_state(d.id, DatasetState::Ready).await.unwrap();
    assert_eq!(api.stored_states(d.id), ["REGISTERED", "READY"]);
    assert_eq!(api.count("POST", &states), 1);
    // Dropped before it was performed: posted again, once.
    api.inject("POST", &states, Fault::DropBefore, 1);
    registry
        .add_state(d.id, DatasetState::Archived)
        .await
        .unwrap();
    assert_eq!(api.stored_states(d.id), ["REGISTERED", "READY", "ARCHIVED"]);
    assert_eq!(api.count("POST", &states), 3);

    let files = format!("datasets/{}/files", d.id);
    api.inject("POST", &files, Fault::DropAfter, 1);
    registry.add_files(d.id, &rows(12)).await.unwrap();
    assert_eq!(file_rows_in(&api, d.id).await, 12);

    let workflows = format!("datasets/{}/workflows", d.id);
    api.inject("POST", &workflows, Fault::DropAfter, 1);
    registry.add_workflow(d.id, "wf-dropped").await.unwrap();
    assert_eq!(registry.get(d.id).await.unwrap().workflows, ["wf-dropped"]);

    // A bulk create whose answer was lost. Of the conflicts the retry reports, only the
    // dataset the first attempt created is claimed: not one with another origin, one that
    // has a workflow, or one created before the call.
    let linked = create(&registry, "already_linked").await;
    registry.add_workflow(linked.id, "wf-linked").await.unwrap();
    create(&registry, "other_origin").await;
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(made_old.elapsed())).await;
    api.inject("POST", "datasets/bulk", Fault::DropAfter, 1);
    let outcome = registry
        .bulk_create(&[
            new_dataset("fresh", "/data/fresh"),
            new_dataset("already_linked", "/data/already_linked"),
            new_dataset("other_origin", "/elsewhere/other_origin"),
            new_dataset("registered_long_ago", "/data/registered_long_ago"),
        ])
        .await
        .unwrap();
    let created: Vec<_> = outcome.created.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(created, ["fresh"]);
    let mut conflicted: Vec<_> = outcome.conflicted.iter().map(|(n, _)| n.as_str()).collect();
    conflicted.sort();
    assert_eq!(
        conflicted,
        ["already_linked", "other_origin", "registered_long_ago"]
    );
    assert_eq!(stored_named(&api, "fresh").await.len(), 1);
    assert_eq!(
        stored_named(&api, "registered_long_ago").await[0].id,
        old.id
    );
}

#[tokio::test]
async fn exhausted_retries_leave_the_registry_unavailable() {
    let api = TestApi::start();
    let registry = registry(HttpConfig {
        max_retries: 2,
        read_timeout: Duration::from_millis(200),
        ..config(&api)
    });
    let d = create(&registry, "unlucky").await;
    let path = format!("datasets/{}", d.id);

    api.inject("GET", &path, Fault::unavailable(), 10);
    let err = registry.get(d.id).await.unwrap_err();
    let message = format!("{:#}", anyhow::Error::new(err));
    assert!(
        message.contains(&format!("GET {}{path}?bundle=true", api.base_url())),
        "{message}"
    );
    assert!(
        message.contains("503") && message.contains("2 retries"),
        "{message}"
    );
    assert_eq!(api.count("GET", &path), 3, "one attempt and two retries");

    let other = create(&registry, "slower_still").await;
    let other_path = format!("datasets/{}", other.id);
    api.inject("GET", &other_path, Fault::Delay(Duration::from_secs(1)), 3);
    match registry.get(other.id).await {
        Err(RegistryError::Unavailable(err)) => {
            assert!(format!("{err:#}").contains("timed out"), "{err:#}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }

    // Nobody listens on the port any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let nowhere = HttpRegistry::new(HttpConfig {
        base_url: format!("http://127.0.0.1:{port}/api").parse().unwrap(),
        ..config(&api)
    })
    .unwrap();
    match nowhere.get(1).await {
        Err(RegistryError::Unavailable(err)) => {
            let text = format!("{err:#}");
            assert!(text.contains("cannot connect"), "{text}");
            assert!(
                text.contains(&format!("127.0.0.1:{port}/api/datasets/1")),
                "{text}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_bad_token_is_refused_and_the_error_names_the_url_not_the_token() {
    let api = TestApi::start();
    let mut base = api.base_url();
    base.set_username("operator").unwrap();
    base.set_password(Some("hunter2")).unwrap();
    let wrong = "wrong-token-that-must-not-leak";
    let registry = registry(HttpConfig {
        base_url: base,
        token: wrong.to_owned(),
        ..config(&api)
    });
    let err = registry.get(7).await.unwrap_err();
    assert!(matches!(err, RegistryError::Invalid(_)), "{err:?}");
    let debug = format!("{err:?}");
    let message = format!("{:#} {debug}", anyhow::Error::new(err));
    assert!(
        message.contains(&format!("GET {}datasets/7?bundle=true", api.base_url())),
        "{message}"
    );
    assert!(message.contains("401"), "{message}");
    for secret in [wrong, "hunter2", api.token()] {
        assert!(!message.contains(secret), "{secret} leaked: {message}");
    }
    assert_eq!(api.count("GET", "datasets/7"), 1, "a 401 is not retried");
}

#[tokio::test]
async fn big_ints_travel_as_strings_both_ways() {
    let api = TestApi::start();
    let registry = registry(config(&api));
    let d = create(&registry, "huge").await;
    // 2^53 + 1: a JSON number would round it.
    let huge: u64 = 9_007_199_254_740_993;
    let md5 = md5_bytes(b"bundle");
    let updated = registry
        .update(
            d.id,
            &DatasetPatch {
                du_size: Some(huge),
                size: Some(huge - 1),
                bundle: Some(workers::model::Bundle {
                    name: "huge.tar".into(),
                    size: huge + 2,
                    md5,
                }),
                ..DatasetPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.du_size, Some(huge));
    assert_eq!(updated.size, Some(huge - 1));
    assert_eq!(updated.bundle_size, Some(huge + 2));
    assert_eq!(updated.bundle.as_ref().map(|b| b.size), Some(huge + 2));

    let sent = api.requests_to("PATCH", &format!("datasets/{}", d.id));
    let body = sent[0].body.as_ref().unwrap();
    assert_eq!(body["du_size"], json!("9007199254740993"));
    assert_eq!(body["size"], json!("9007199254740992"));
    assert_eq!(body["bundle_size"], json!("9007199254740995"));
    assert_eq!(body["bundle"]["size"], json!("9007199254740995"));

    registry.add_files(d.id, &rows(2)).await.unwrap();
    let files = api.requests_to("POST", &format!("datasets/{}/files", d.id));
    assert_eq!(files[0].body.as_ref().unwrap()[1]["size"], json!("10"));

    // What the API sends: strings.
    let raw: serde_json::Value = reqwest::Client::new()
        .get(format!("{}datasets/{}?bundle=true", api.base_url(), d.id))
        .bearer_auth(api.token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(raw["du_size"], json!("9007199254740993"));
    assert_eq!(raw["bundle"]["size"], json!("9007199254740995"));
}

#[tokio::test]
async fn a_missing_dataset_is_not_found() {
    let api = TestApi::start();
    let registry = registry(config(&api));
    let missing = 424_242;
    assert!(matches!(
        registry.get(missing).await,
        Err(RegistryError::NotFound(424_242))
    ));
    assert!(matches!(
        registry.update(missing, &DatasetPatch::default()).await,
        Err(RegistryError::NotFound(424_242))
    ));
    assert!(matches!(
        registry.add_state(missing, DatasetState::Ready).await,
        Err(RegistryError::NotFound(424_242))
    ));
    // The API answers 409 for a link to a missing dataset; it is still "not found".
    assert!(matches!(
        registry.add_workflow(missing, "wf-x").await,
        Err(RegistryError::NotFound(424_242))
    ));
    assert!(matches!(
        registry.files_page(missing, None, 10).await,
        Err(RegistryError::NotFound(424_242))
    ));
    // None of these is retried.
    assert_eq!(api.count("GET", "datasets/424242"), 4);
}

#[tokio::test]
async fn file_pages_are_cut_from_one_listing_per_walk() {
    let api = TestApi::start();
    let registry = registry(config(&api));
    let d = create(&registry, "many_files").await;
    let written = rows(2_500);
    registry.add_files(d.id, &written).await.unwrap();

    let walk = || async {
        let mut pages = FilePages::new(&registry, d.id, 1_000);
        let mut sizes = Vec::new();
        let mut got = Vec::new();
        while let Some(page) = pages.next().await.unwrap() {
            sizes.push(page.len());
            got.extend(page);
        }
        (sizes, got)
    };
    let (sizes, got) = walk().await;
    assert_eq!(sizes, [1_000, 1_000, 500]);
    let mut want = written.clone();
    want.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(
        got.iter().map(|r| (&r.path, r.md5)).collect::<Vec<_>>(),
        want.iter().map(|r| (&r.path, r.md5)).collect::<Vec<_>>()
    );
    assert!(
        got.iter().all(|r| r.size.is_none()),
        "the API sends no sizes"
    );
    let listings = |api: &TestApi| {
        api.requests_to("GET", &format!("datasets/{}", d.id))
            .iter()
            .filter(|r| r.query.contains("files=true"))
            .count()
    };
    assert_eq!(listings(&api), 1);
    // A new walk reads the listing afresh.
    walk().await;
    assert_eq!(listings(&api), 2);
}

#[tokio::test]
async fn find_applies_the_filters_the_api_lacks() {
    let api = TestApi::start();
    let registry = registry(config(&api));
    let now = Utc::now();
    let staged = DatasetPatch {
        is_staged: Some(true),
        ..DatasetPatch::default()
    };
    // Staged 30 days ago: due.
    let due = create(&registry, "staged_long_ago").await;
    registry.update(due.id, &staged).await.unwrap();
    api.backdate_state(due.id, "STAGED", now - TimeDelta::days(30));
    // Staged 20.2 days ago: the API, counting whole days (20), returns it; the cutoff of
    // 20.4 days does not.
    let recent = create(&registry, "staged_20_2_days_ago").await;
    registry.update(recent.id, &staged).await.unwrap();
    api.backdate_state(
        recent.id,
        "STAGED",
        now - TimeDelta::days(20) - TimeDelta::hours(5),
    );
    let not_staged = create(&registry, "never_staged").await;
    api.backdate_state(not_staged.id, "STAGED", now - TimeDelta::days(30));

    let found = registry
        .find(&DatasetQuery {
            staged_before: Some(now - TimeDelta::days(20) - TimeDelta::hours(10)),
            ..DatasetQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(found.iter().map(|d| d.id).collect::<Vec<_>>(), [due.id]);
    let sent = api.requests_to("GET", "datasets");
    assert!(
        sent.last()
            .unwrap()
            .query
            .contains("days_since_last_staged=20"),
        "{:?}",
        sent.last()
    );

    // Linked to a workflow: found through the link, without listing every dataset.
    registry.add_workflow(recent.id, "wf-find").await.unwrap();
    api.clear_requests();
    let by_workflow = registry
        .find(&DatasetQuery {
            workflow_id: Some("wf-find".into()),
            ..DatasetQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        by_workflow.iter().map(|d| d.id).collect::<Vec<_>>(),
        [recent.id]
    );
    assert_eq!(api.count("GET", "datasets"), 1, "one dataset read, no list");

    // The create method and "no workflow" are filtered here; the limit applies after them.
    let on_demand = registry
        .bulk_create(&[NewDataset {
            create_method: CreateMethod::OnDemand,
            ..new_dataset("asked_for", "/data/asked_for")
        }])
        .await
        .unwrap()
        .created
        .remove(0);
    let unlinked_scans = registry
        .find(&DatasetQuery {
            without_workflows: true,
            create_method: Some(CreateMethod::Scan),
            ..DatasetQuery::default()
        })
        .await
        .unwrap();
    let mut ids: Vec<_> = unlinked_scans.iter().map(|d| d.id).collect();
    ids.sort();
    assert_eq!(ids, [due.id, not_staged.id]);
    let one = registry
        .find(&DatasetQuery {
            create_method: Some(CreateMethod::OnDemand),
            limit: Some(1),
            ..DatasetQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(one.iter().map(|d| d.id).collect::<Vec<_>>(), [on_demand.id]);
}

/// Captures what this test's thread logs, for as long as the guard lives.
fn capture_logs() -> (
    tracing::subscriber::DefaultGuard,
    Arc<std::sync::Mutex<Vec<u8>>>,
) {
    #[derive(Clone)]
    struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer(Arc::default());
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("warn,workers=info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (tracing::subscriber::set_default(subscriber), buffer.0)
}

#[tokio::test]
async fn a_dataset_the_client_cannot_read_is_skipped_not_fatal_to_the_listing() {
    let (_guard, logs) = capture_logs();
    let api = TestApi::start();
    let registry = registry(config(&api));
    let good = create(&registry, "readable").await;
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    // Legacy rows as the real database may hold them.
    api.list_raw(json!({
        "id": 9001, "name": null, "type": "RAW_DATA",
        "created_at": now, "updated_at": now, "workflows": [],
    }));
    api.list_raw(json!({
        "id": 9002, "name": "odd_type", "type": "SPREADSHEET",
        "created_at": now, "updated_at": now, "workflows": [],
    }));
    api.list_raw(json!({
        "id": 9003, "name": "odd_date", "type": "RAW_DATA",
        "created_at": "last tuesday", "updated_at": now, "workflows": [],
    }));
    api.list_raw(json!({ "name": "no_id", "type": "RAW_DATA" }));

    let found = registry.find(&DatasetQuery::default()).await.unwrap();
    assert_eq!(found.iter().map(|d| d.id).collect::<Vec<_>>(), [good.id]);
    // What `watch` asks for.
    let unlinked = registry
        .find(&DatasetQuery {
            without_workflows: true,
            dataset_type: Some(DatasetType::RawData),
            ..DatasetQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(unlinked.iter().map(|d| d.id).collect::<Vec<_>>(), [good.id]);
    assert_eq!(registry.skipped_listing_items(), 8, "four per listing");

    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let skipped = |needle: &str, why: &str| {
        logs.lines()
            .any(|l| l.contains("Skipped") && l.contains(needle) && l.contains(why))
    };
    assert!(
        skipped("dataset_id=9001", "name: invalid type: null"),
        "{logs}"
    );
    assert!(skipped("dataset_id=9002", "SPREADSHEET"), "{logs}");
    assert!(skipped("dataset_id=9003", "created_at"), "{logs}");
    assert!(skipped("position=3", "id"), "{logs}");
    assert!(skipped("skipped=4", "Skipped 4 datasets"), "{logs}");
}

#[tokio::test]
async fn listings_are_paged_and_what_the_api_ignores_is_filtered_here() {
    let api = TestApi::start();
    let registry = registry(config(&api));
    // 2,100 datasets, created in the API's own registry (quicker than through HTTP).
    for batch in 0..21 {
        let items: Vec<NewDataset> = (0..100)
            .map(|i| new_dataset(&format!("paged_{batch:02}_{i:03}"), "/data/paged"))
            .collect();
        api.registry().bulk_create(&items).await.unwrap();
    }
    let linked = stored_named(&api, "paged_07_042").await[0].id;
    api.registry()
        .add_workflow(linked, "wf-paged")
        .await
        .unwrap();

    api.clear_requests();
    let all = registry.find(&DatasetQuery::default()).await.unwrap();
    assert_eq!(all.len(), 2_100);
    let ids: std::collections::HashSet<_> = all.iter().map(|d| d.id).collect();
    assert_eq!(ids.len(), 2_100, "each once");
    let queries: Vec<String> = api
        .requests_to("GET", "datasets")
        .into_iter()
        .map(|r| r.query)
        .collect();
    assert_eq!(queries.len(), 3, "{queries:?}");
    for (query, offset) in queries.iter().zip([0, 1_000, 2_000]) {
        assert!(
            query.contains("limit=1000") && query.contains(&format!("offset={offset}")),
            "{query}"
        );
    }

    // "Without workflows" is not a filter the API knows: nothing is sent for it, and the
    // linked dataset is left out here.
    api.clear_requests();
    let unlinked = registry
        .find(&DatasetQuery {
            without_workflows: true,
            ..DatasetQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(unlinked.len(), 2_099);
    assert!(unlinked.iter().all(|d| d.id != linked));
    let sent = api.requests_to("GET", "datasets");
    assert!(
        sent.iter().all(|r| !r.query.contains("processed")),
        "{sent:?}"
    );

    // A limit asks for no more than it needs: the newest, in one short page.
    api.clear_requests();
    let newest = registry
        .find(&DatasetQuery {
            limit: Some(5),
            ..DatasetQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        newest.iter().map(|d| d.id).collect::<Vec<_>>(),
        all[..5].iter().map(|d| d.id).collect::<Vec<_>>()
    );
    let sent = api.requests_to("GET", "datasets");
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(
        sent[0].query.contains("limit=5") && sent[0].query.contains("offset=0"),
        "{:?}",
        sent[0]
    );
}

/// The project's app with the HTTP registry in place of the embedded one.
async fn app_over_api(project: &Project, api: &TestApi) -> Arc<App> {
    let app = Arc::try_unwrap(project.app().await).ok().unwrap();
    Arc::new(App {
        registry: Arc::new(registry(config(api))),
        ..app
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_of_250_is_registered_in_three_requests() {
    let project = Project::new();
    let api = TestApi::start();
    let app = app_over_api(&project, &api).await;
    let items: Vec<_> = (0..250)
        .map(|i| new_dataset(&format!("batch_{i:03}"), &format!("/data/batch_{i:03}")))
        .collect();
    let (registered, outcome, failed) =
        workers::jobs::register_and_start(&app, &items, &Default::default()).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(outcome.conflicted.is_empty() && outcome.errored.is_empty());
    assert_eq!(registered.len(), 250);
    assert!(registered.iter().all(|r| r.workflow_id.is_some()));
    let sizes: Vec<usize> = api
        .requests_to("POST", "datasets/bulk")
        .iter()
        .map(|r| {
            r.body.as_ref().unwrap()["datasets"]
                .as_array()
                .unwrap()
                .len()
        })
        .collect();
    assert_eq!(sizes, [100, 100, 50]);
    assert_eq!(
        api.registry()
            .find(&DatasetQuery::default())
            .await
            .unwrap()
            .len(),
        250
    );

    // More than the API takes in one request is refused before anything is sent.
    let too_many: Vec<_> = (0..=MAX_BULK)
        .map(|i| new_dataset(&format!("over_{i}"), &format!("/data/over_{i}")))
        .collect();
    assert!(matches!(
        app.registry.bulk_create(&too_many).await,
        Err(RegistryError::Invalid(_))
    ));
    assert_eq!(api.count("POST", "datasets/bulk"), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_integrated_workflow_runs_against_the_api() {
    let project = Project::new();
    let api = TestApi::start();
    let app = app_over_api(&project, &api).await;
    let origin = project.dataset(
        DatasetType::RawData,
        "through_the_api",
        &[
            ("a.txt", b"alpha"),
            ("sub/b.fastq.gz", &pseudo_random(70_000, 3)),
            ("sub/deeper/c.txt", b""),
        ],
    );
    std::os::unix::fs::symlink("a.txt", origin.join("link_to_a")).unwrap();
    let id = register_without_workflow(&app, "through_the_api", &origin).await;
    let workflow_id = engine::start(&app, "integrated", id, Default::default())
        .await
        .unwrap();
    run_until_idle(&app, 2, Duration::from_secs(120)).await;

    let view = engine::view(
        &app,
        app.store.workflow(&workflow_id).await.unwrap().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(view.derived.status, TaskStatus::Success);
    let d = app.registry.get(id).await.unwrap();
    assert_eq!(
        state_names(&d),
        ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED"]
    );
    assert_eq!(d.num_files, Some(4));
    assert!(d.bundle.is_some() && d.is_staged);
    let staged = std::path::PathBuf::from(d.staged_path.unwrap());
    assert_eq!(tree_files(&staged), tree_files(&origin));
    // The API holds the sizes inspect sent but returns none: archive checked the paths and
    // the total.
    assert!(file_rows(&app, id).await.iter().all(|r| r.size.is_none()));
    assert_eq!(api.count("POST", &format!("datasets/{id}/states")), 4);
}

/// Workflows of a single step, to run inspect and archive apart.
fn add_one_step_workflows(project: &Project) {
    for (name, task) in [
        ("inspect_only", "inspect_dataset"),
        ("archive_only", "archive_dataset"),
    ] {
        std::fs::write(
            project.path(&format!("jobs/{name}.toml")),
            format!(
                "name = \"{name}\"\ndescription = \"one step\"\n\n[[steps]]\nname = \"{name}\"\ntask = \"{task}\"\n"
            ),
        )
        .unwrap();
    }
}

async fn run_workflow(app: &Arc<App>, workflow: &str, id: i64) -> engine::WorkflowView {
    let workflow_id = engine::start(app, workflow, id, Default::default())
        .await
        .unwrap();
    run_until_idle(app, 2, Duration::from_secs(120)).await;
    engine::view(
        app,
        app.store.workflow(&workflow_id).await.unwrap().unwrap(),
    )
    .await
    .unwrap()
}

fn failure_message(view: &engine::WorkflowView) -> String {
    assert_eq!(view.derived.status, TaskStatus::Failure);
    let meta = &view.metas[&view.workflow.steps[0].runs[0].task_id];
    assert_eq!(meta.result["exc_type"], "ValidationFailed");
    meta.result["exc_message"][0].as_str().unwrap().to_owned()
}

const TWO_FILES: &[(&str, &[u8])] = &[("a.txt", b"alpha"), ("sub/b.txt", b"beta")];

#[tokio::test(flavor = "multi_thread")]
async fn archive_refuses_a_changed_dataset_when_the_api_has_no_sizes() {
    let project = Project::new();
    add_one_step_workflows(&project);
    let api = TestApi::start();
    let app = app_over_api(&project, &api).await;

    // The same paths, one file longer: only the total size can tell.
    let grown = project.dataset(DatasetType::RawData, "grown", TWO_FILES);
    let grown_id = register_without_workflow(&app, "grown", &grown).await;
    assert_eq!(
        run_workflow(&app, "inspect_only", grown_id)
            .await
            .derived
            .status,
        TaskStatus::Success
    );
    write_file(&grown.join("sub/b.txt"), b"beta, and then some");
    let message = failure_message(&run_workflow(&app, "archive_only", grown_id).await);
    assert!(
        message.contains("does not match the inspection"),
        "{message}"
    );
    assert!(
        message.contains("24 bytes of files, 9 recorded"),
        "{message}"
    );

    // The same count and sizes under another name: the paths tell.
    let renamed = project.dataset(DatasetType::RawData, "renamed", TWO_FILES);
    let renamed_id = register_without_workflow(&app, "renamed", &renamed).await;
    run_workflow(&app, "inspect_only", renamed_id).await;
    std::fs::rename(renamed.join("a.txt"), renamed.join("z.txt")).unwrap();
    let message = failure_message(&run_workflow(&app, "archive_only", renamed_id).await);
    assert!(message.contains("`z.txt` is new"), "{message}");

    // Unchanged: archived.
    let same = project.dataset(DatasetType::RawData, "unchanged", TWO_FILES);
    let same_id = register_without_workflow(&app, "unchanged", &same).await;
    run_workflow(&app, "inspect_only", same_id).await;
    assert_eq!(
        run_workflow(&app, "archive_only", same_id)
            .await
            .derived
            .status,
        TaskStatus::Success
    );
    for (id, archived) in [(grown_id, false), (renamed_id, false), (same_id, true)] {
        let d = app.registry.get(id).await.unwrap();
        assert_eq!(d.latest_state() == Some("ARCHIVED"), archived, "{}", d.name);
        assert_eq!(d.bundle.is_some(), archived, "{}", d.name);
    }
}

/// The API answers a file POST before it stores the rows (spec E.4): inspect waits until they
/// are readable, and archive never reads them back: it compares the bundle with the inspection
/// record kept with the dataset.
#[tokio::test(flavor = "multi_thread")]
async fn rows_the_api_shows_late_hold_up_inspect_only_and_archive_never_reads_them() {
    let project = Project::new();
    add_one_step_workflows(&project);
    let api = TestApi::start();
    let app = app_over_api(&project, &api).await;
    let origin = project.dataset(DatasetType::RawData, "late_rows", TWO_FILES);
    let id = register_without_workflow(&app, "late_rows", &origin).await;
    api.delay_file_rows(Some(Duration::from_secs(3)));
    let started = std::time::Instant::now();
    let view = run_workflow(&app, "inspect_only", id).await;
    assert_eq!(view.derived.status, TaskStatus::Success);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "inspect waited for its rows"
    );
    assert_eq!(
        file_rows(&app, id).await.len(),
        2,
        "every row readable when inspect ends"
    );

    // Rows the API holds are not looked at by archive (here: gone entirely).
    api.db()
        .with_conn(|conn| {
            conn.execute("DELETE FROM dataset_files WHERE dataset_id = ?1", [id])?;
            Ok(())
        })
        .unwrap();
    api.clear_requests();
    let view = run_workflow(&app, "archive_only", id).await;
    assert_eq!(view.derived.status, TaskStatus::Success);
    assert!(
        api.requests_to("GET", &format!("datasets/{id}"))
            .iter()
            .all(|r| !r.query.contains("files=true")),
        "archive read no file rows"
    );
    assert_eq!(
        app.registry.get(id).await.unwrap().latest_state(),
        Some("ARCHIVED")
    );
}

/// Rows acknowledged and then lost (the API died right after answering) are sent again.
#[tokio::test(flavor = "multi_thread")]
async fn inspect_sends_rows_the_api_lost_again() {
    let project = Project::new();
    add_one_step_workflows(&project);
    let api = TestApi::start();
    let app = app_over_api(&project, &api).await;
    let origin = project.dataset(DatasetType::RawData, "lost_rows", TWO_FILES);
    let id = register_without_workflow(&app, "lost_rows", &origin).await;
    api.lose_file_rows(1);
    let view = run_workflow(&app, "inspect_only", id).await;
    assert_eq!(view.derived.status, TaskStatus::Success);
    assert_eq!(file_rows(&app, id).await.len(), 2);
    assert_eq!(api.count("POST", &format!("datasets/{id}/files")), 2);
}

/// The API cannot replace rows: a new inspection that contradicts them fails, naming them, and
/// stores nothing; the dataset's inspection record stays the earlier one.
#[tokio::test(flavor = "multi_thread")]
async fn an_inspection_that_contradicts_stored_rows_fails_naming_them() {
    let project = Project::new();
    add_one_step_workflows(&project);
    let api = TestApi::start();
    let app = app_over_api(&project, &api).await;
    let origin = project.dataset(DatasetType::RawData, "changed", TWO_FILES);
    let id = register_without_workflow(&app, "changed", &origin).await;
    run_workflow(&app, "inspect_only", id).await;
    let first = app.registry.get(id).await.unwrap().metadata["inspection"].clone();
    write_file(&origin.join("a.txt"), b"ALPHA");
    std::fs::remove_file(origin.join("sub/b.txt")).unwrap();
    let view = run_workflow(&app, "inspect_only", id).await;
    assert_eq!(view.derived.status, TaskStatus::Failure);
    let meta = &view.metas[&view.workflow.steps[0].runs[0].task_id];
    assert_eq!(meta.result["exc_type"], "InspectionFailed");
    let message = meta.result["exc_message"][0].as_str().unwrap();
    assert!(message.contains("`a.txt` is stored with MD5"), "{message}");
    assert!(
        message.contains("`sub/b.txt` is stored but no longer in dataset"),
        "{message}"
    );
    assert_eq!(file_rows(&app, id).await.len(), 2, "nothing stored");
    assert_eq!(
        app.registry.get(id).await.unwrap().metadata["inspection"],
        first
    );
}

/// With sizes per row (the embedded registry), a change that keeps the total is caught too.
#[tokio::test(flavor = "multi_thread")]
async fn archive_still_checks_each_size_where_the_registry_keeps_them() {
    let project = Project::new();
    add_one_step_workflows(&project);
    let app = project.app().await;
    let swapped = project.dataset(DatasetType::RawData, "swapped", TWO_FILES);
    let id = register_without_workflow(&app, "swapped", &swapped).await;
    run_workflow(&app, "inspect_only", id).await;
    // 5 + 4 bytes become 4 + 5: the same paths and total.
    write_file(&swapped.join("a.txt"), b"alfa");
    write_file(&swapped.join("sub/b.txt"), b"betas");
    let message = failure_message(&run_workflow(&app, "archive_only", id).await);
    assert!(
        message.contains("`a.txt` is 4 bytes, inspect recorded 5"),
        "{message}"
    );
}

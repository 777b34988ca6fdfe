//! `workers register` (spec C.6, and the original's test cases I.2) without the original's
//! bugs: dry runs change nothing, invalid input exits 2, batches of at most 100, names
//! compared after normalization.

use std::path::PathBuf;

use crate::common::*;
use workers::model::{CreateMethod, DatasetType};
use workers::registry::DatasetQuery;

/// A container directory with the given subdirectories, each holding one file.
fn container(project: &Project, name: &str, subdirs: &[&str]) -> PathBuf {
    let root = project.path(&format!("incoming/{name}"));
    for sub in subdirs {
        write_file(&root.join(sub).join("file_1.dat"), &pseudo_random(1024, 1));
    }
    write_file(
        &root.join("metadata.txt"),
        b"container file, not a dataset\n",
    );
    root
}

async fn names(project: &Project, t: DatasetType) -> Vec<String> {
    let app = project.app().await;
    let mut names: Vec<String> = app
        .registry
        .find(&DatasetQuery {
            dataset_type: Some(t),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name.to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn subdirectories_or_the_directory_itself_are_registered() {
    let project = Project::new();
    let dir = container(&project, "batch_1", &["ds_a", "ds_b"]);
    let dir = dir.to_str().unwrap();
    // Case 1: each subdirectory under its own name; the parent is not registered.
    project.run_ok(&[
        "register",
        dir,
        "--type",
        "DATA_PRODUCT",
        "--ingest-subdirs",
    ]);
    assert_eq!(
        names(&project, DatasetType::DataProduct).await,
        ["ds_a", "ds_b"]
    );
    // Case 2: the directory itself, not its subdirectories.
    project.run_ok(&["register", dir, "--type", "RAW_DATA"]);
    assert_eq!(names(&project, DatasetType::RawData).await, ["batch_1"]);
    let app = project.app().await;
    let d = dataset_named(&app, DatasetType::RawData, "batch_1").await;
    assert_eq!(d.create_method, Some(CreateMethod::OnDemand));
    assert_eq!(
        d.origin_path.as_deref(),
        Some(std::fs::canonicalize(dir).unwrap().to_str().unwrap())
    );
    assert_eq!(d.workflows.len(), 1, "its integrated workflow was started");
}

#[tokio::test(flavor = "multi_thread")]
async fn prefixes_suffixes_and_descriptions_apply() {
    let project = Project::new();
    let dir = container(&project, "batch_2", &["ds_a", "ds_b"]);
    let dir = dir.to_str().unwrap();
    // Cases 5, 7 and 8.
    project.run_ok(&[
        "register",
        dir,
        "--type",
        "DATA_PRODUCT",
        "--ingest-subdirs",
        "--prefix",
        "PRE",
    ]);
    project.run_ok(&[
        "register",
        dir,
        "--type",
        "DATA_PRODUCT",
        "--ingest-subdirs",
        "--prefix",
        "PRE",
        "--suffix",
        "SUF",
        "--description",
        "This is a test dataset",
    ]);
    // Case 6.
    project.run_ok(&["register", dir, "--type", "RAW_DATA", "--suffix", "SUF"]);
    assert_eq!(
        names(&project, DatasetType::DataProduct).await,
        ["PRE-ds_a", "PRE-ds_a-SUF", "PRE-ds_b", "PRE-ds_b-SUF"]
    );
    assert_eq!(names(&project, DatasetType::RawData).await, ["batch_2-SUF"]);
    let app = project.app().await;
    let d = dataset_named(&app, DatasetType::DataProduct, "PRE-ds_a-SUF").await;
    assert_eq!(d.description.as_deref(), Some("This is a test dataset"));
}

#[tokio::test(flavor = "multi_thread")]
async fn existing_datasets_are_not_registered_twice() {
    let project = Project::new();
    // Case 9: two names registered before, two new ones.
    let dir = container(
        &project,
        "batch_3",
        &["conflict_1", "conflict_2", "fresh_1", "fresh_2"],
    );
    let dir = dir.to_str().unwrap();
    let first = container(&project, "earlier", &["conflict_1", "conflict_2"]);
    project.run_ok(&[
        "register",
        first.to_str().unwrap(),
        "--type",
        "RAW_DATA",
        "--ingest-subdirs",
    ]);
    let out = project.run_ok(&["register", dir, "--type", "RAW_DATA", "--ingest-subdirs"]);
    let printed = stdout(&out);
    assert!(printed.contains("already registered"), "{printed}");
    assert_eq!(
        names(&project, DatasetType::RawData).await,
        ["conflict_1", "conflict_2", "fresh_1", "fresh_2"]
    );
    // Names are compared after normalization: `conflict.1` is `conflict-1`, not `conflict_1`,
    // but `fresh 1` and `fresh-1` are the same dataset.
    let odd = container(&project, "batch_4", &["fresh 1"]);
    project.run_ok(&[
        "register",
        odd.to_str().unwrap(),
        "--type",
        "RAW_DATA",
        "--ingest-subdirs",
    ]);
    let odd2 = container(&project, "batch_5", &["fresh-1"]);
    let out = project.run_ok(&[
        "register",
        odd2.to_str().unwrap(),
        "--type",
        "RAW_DATA",
        "--ingest-subdirs",
    ]);
    assert!(
        stdout(&out).contains("already registered"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        names(&project, DatasetType::RawData).await,
        ["conflict_1", "conflict_2", "fresh-1", "fresh_1", "fresh_2"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_registers_and_starts_nothing() {
    let project = Project::new();
    let dir = container(&project, "dry", &["ds_a", "ds_b"]);
    let out = project.run_ok(&[
        "register",
        dir.to_str().unwrap(),
        "--type",
        "RAW_DATA",
        "--ingest-subdirs",
        "--dry-run",
    ]);
    assert_eq!(
        stdout(&out).matches("would be registered").count(),
        2,
        "{}",
        stdout(&out)
    );
    let app = project.app().await;
    assert!(
        app.registry
            .find(&Default::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        app.store
            .workflows(workers::store::WorkflowFilter::All, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn more_than_a_hundred_directories_go_in_batches() {
    let project = Project::new();
    let subdirs: Vec<String> = (0..130).map(|i| format!("ds_{i:03}")).collect();
    let refs: Vec<&str> = subdirs.iter().map(String::as_str).collect();
    let dir = container(&project, "many", &refs);
    project.run_ok(&[
        "register",
        dir.to_str().unwrap(),
        "--type",
        "RAW_DATA",
        "--ingest-subdirs",
    ]);
    let app = project.app().await;
    let all = app.registry.find(&Default::default()).await.unwrap();
    assert_eq!(all.len(), 130);
    assert!(all.iter().all(|d| d.workflows.len() == 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn register_with_wait_takes_the_datasets_to_staged() {
    let project = Project::new();
    let dir = container(&project, "waited", &["ds_a"]);
    let out = project.run_ok(&[
        "register",
        dir.to_str().unwrap(),
        "--type",
        "RAW_DATA",
        "--ingest-subdirs",
        "--wait",
    ]);
    assert!(stdout(&out).contains("SUCCESS"), "{}", describe(&out));
    let d = dataset_named(&*project.app().await, DatasetType::RawData, "ds_a").await;
    assert_eq!(
        state_names(&d),
        ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED"]
    );
}

#[test]
fn invalid_input_exits_2_and_registers_nothing() {
    let project = Project::new();
    let empty = project.path("incoming/empty");
    std::fs::create_dir_all(&empty).unwrap();
    let clash = container(&project, "clash", &["a.b", "a-b"]);
    let file = project.path("incoming/file.txt");
    write_file(&file, b"x");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // Case 3: no type.
        (vec!["register", empty.to_str().unwrap()], "--type"),
        (
            vec!["register", file.to_str().unwrap(), "--type", "RAW_DATA"],
            "is not a directory",
        ),
        (
            vec![
                "register",
                empty.to_str().unwrap(),
                "--type",
                "RAW_DATA",
                "--ingest-subdirs",
            ],
            "has no subdirectories",
        ),
        (
            vec![
                "register",
                clash.to_str().unwrap(),
                "--type",
                "RAW_DATA",
                "--ingest-subdirs",
            ],
            "would both be registered as `a-b`",
        ),
    ];
    for (args, expected) in cases {
        let out = project.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {expected:?} not in {}",
            stderr(&out)
        );
    }
    let db = project.path("var/workers.db");
    if db.exists() {
        let count: i64 = workers::sqlite::Db::open(&db, std::time::Duration::from_secs(5))
            .unwrap()
            .with_conn(|c| Ok(c.query_row("SELECT COUNT(*) FROM datasets", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(count, 0);
    }
}

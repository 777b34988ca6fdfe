//! The whole data lifecycle on the embedded backends, through the binary: `watch` registers,
//! the `integrated` workflow takes every dataset to staged and verified, and the `stage`
//! workflow stages an archived dataset again. Checks what the original's integration test
//! checks (spec I.1 test 5), with odd directory names.

use std::path::{Path, PathBuf};

use crate::common::*;
use workers::model::DatasetType;
use workers::registry::Dataset;
use workers::store::TaskStatus;
use workers::workflow::engine;

const EXPECTED_STATES: [&str; 5] = ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED"];

/// Builds datasets with nested directories, an empty directory and file, a link to a file,
/// a dangling link inside the tree, and a file name of 255 bytes.
fn populate(project: &Project, t: DatasetType, dir_name: &str, seed: u64) -> PathBuf {
    let long_file = format!("{}.fastq.gz", "f".repeat(255 - ".fastq.gz".len()));
    let root = project.dataset(
        t,
        dir_name,
        &[
            ("a.R1.fastq.gz", &pseudo_random(70_000, seed)),
            ("sub/dir/b.bam", &pseudo_random(1_234, seed + 1)),
            ("sub/empty.txt", b""),
            ("sub/with space ü.txt", b"odd name\n"),
            (&long_file, &pseudo_random(10, seed + 2)),
        ],
    );
    std::fs::create_dir_all(root.join("empty_dir")).unwrap();
    std::os::unix::fs::symlink("sub/dir/b.bam", root.join("link.bam")).unwrap();
    std::os::unix::fs::symlink("sub/not-there", root.join("dangling")).unwrap();
    root
}

/// Checks one dataset after its `integrated` workflow, the way spec I.1 test 5 does.
async fn check_dataset(project: &Project, app: &workers::app::App, d: &Dataset, origin: &Path) {
    let settings = &app.settings;
    assert_eq!(
        d.origin_path.as_deref(),
        Some(std::fs::canonicalize(origin).unwrap().to_str().unwrap())
    );
    // States, in order, each once.
    assert_eq!(state_names(d), EXPECTED_STATES, "states of {}", d.name);

    // inspect: sizes, counts and one row per file with the MD5 md5sum computes.
    let origin_files = tree_files(origin);
    let rows = file_rows(app, d.id).await;
    assert_eq!(d.num_files, Some(origin_files.len() as u64), "{}", d.name);
    assert_eq!(rows.len() as u64, d.num_files.unwrap());
    assert_eq!(d.num_directories, Some(3), "sub, sub/dir and empty_dir");
    assert!(d.du_size.unwrap() > 0);
    let mut size = 0;
    for row in &rows {
        let path = origin.join(&row.path);
        let meta = path.symlink_metadata().unwrap();
        size += meta.len();
        assert_eq!(row.size, Some(meta.len()), "{}", row.path);
        if meta.file_type().is_symlink() {
            assert_eq!(row.file_type, workers::model::FileType::SymbolicLink);
            assert_eq!(row.md5, None);
        } else {
            assert_eq!(row.md5.unwrap().to_string(), md5sum(&path), "{}", row.path);
        }
    }
    assert_eq!(d.size, Some(size));
    // a.R1.fastq.gz and the long *.fastq.gz count; the link to b.bam does not.
    assert_eq!(d.metadata["num_genome_files"], 3, "{}", d.metadata);

    // archive: the bundle in the archive, recorded with its real MD5 and size.
    let year = chrono::Local::now().format("%Y").to_string();
    let type_dir = if d.dataset_type == DatasetType::RawData {
        "raw_data"
    } else {
        "data_products"
    };
    let archive = project.path(&format!("var/archive/{year}/{type_dir}/{}.tar", d.name));
    assert_eq!(d.archive_path.as_deref(), Some(archive.to_str().unwrap()));
    let bundle = d.bundle.as_ref().expect("bundle");
    assert_eq!(bundle.name, format!("{}.tar", d.name));
    assert_eq!(bundle.md5.to_string(), md5sum(&archive));
    assert_eq!(bundle.size, archive.metadata().unwrap().len());
    // The generated copy is removed once archived.
    let generate = settings
        .paths
        .for_type(d.dataset_type)
        .bundle_generate
        .join(format!("{}.tar", d.name));
    assert!(!generate.exists(), "{} should be gone", generate.display());
    // GNU tar reads it, with members relative to `./`.
    let listing = std::process::Command::new("tar")
        .arg("tf")
        .arg(&archive)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(listing.lines().all(|l| l.starts_with("./")), "{listing}");
    assert!(listing.contains("./sub/dir/b.bam"), "{listing}");

    // stage: the alias, the staged tree and the staged bundle.
    let alias = &sha256_hex(&format!("{}{}{SALT}", d.id, d.name))[..32];
    assert_eq!(d.stage_alias(), Some(alias));
    let stage_root = std::fs::canonicalize(&settings.paths.for_type(d.dataset_type).stage).unwrap();
    let staged = stage_root.join(alias).join(d.name.as_str());
    assert_eq!(d.staged_path.as_deref(), Some(staged.to_str().unwrap()));
    assert_eq!(tree_files(&staged), origin_files);
    for rel in &origin_files {
        let (a, b) = (origin.join(rel), staged.join(rel));
        if a.symlink_metadata().unwrap().file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&a).unwrap(),
                std::fs::read_link(&b).unwrap()
            );
        } else {
            assert_eq!(
                std::fs::read(&a).unwrap(),
                std::fs::read(&b).unwrap(),
                "{rel}"
            );
        }
    }
    assert!(staged.join("empty_dir").is_dir());
    let staged_bundle = settings
        .paths
        .for_type(d.dataset_type)
        .bundle_stage
        .join(format!("{}.{}.tar", d.name, d.dataset_type));
    assert_eq!(md5sum(&staged_bundle), bundle.md5.to_string());

    // validate and setup_download.
    assert!(d.is_staged);
    let download = std::fs::canonicalize(&settings.paths.download_dir).unwrap();
    let alias_link = download.join(alias);
    assert!(
        alias_link
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::canonicalize(&alias_link).unwrap(), staged);
    let bundle_link = download.join(format!("{}.{}.tar", d.name, d.dataset_type));
    assert_eq!(
        std::fs::canonicalize(&bundle_link).unwrap(),
        std::fs::canonicalize(&staged_bundle).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = staged
        .join("a.R1.fastq.gz")
        .metadata()
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o004, 0o004, "staged files are world-readable");
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_takes_every_dataset_to_staged_and_verified() {
    let project = Project::new();
    let names = [
        (DatasetType::RawData, "run with spaces", "run-with-spaces"),
        (DatasetType::RawData, "données_été", "donn-es_-t-"),
        (DatasetType::RawData, "-leading-dash", "-leading-dash"),
        (
            DatasetType::DataProduct,
            &"p".repeat(workers::model::MAX_NAME_BYTES) as &str,
            "",
        ),
    ];
    let mut origins = Vec::new();
    for (idx, (t, dir_name, _)) in names.iter().enumerate() {
        origins.push(populate(&project, *t, dir_name, idx as u64 * 10));
    }
    // A name too long for the bundle file names is refused, visibly, and nothing else suffers.
    let too_long = "q".repeat(255);
    project.dataset(DatasetType::DataProduct, &too_long, &[("x", b"x")]);

    let out = project.run_ok(&["jobs", "run", "watch", "--wait"]);
    let printed = stdout(&out);
    assert!(
        printed.contains(&format!("rejected `{too_long}`")),
        "{printed}"
    );
    assert!(printed.contains("SUCCESS"), "{printed}");

    let app = project.app().await;
    for ((t, dir_name, normalized), origin) in names.iter().zip(&origins) {
        let name = if normalized.is_empty() {
            *dir_name
        } else {
            *normalized
        };
        let d = dataset_named(&app, *t, name).await;
        check_dataset(&project, &app, &d, origin).await;
        assert_eq!(d.create_method, Some(workers::model::CreateMethod::Scan));
        // One workflow, every step done in one run.
        assert_eq!(d.workflows.len(), 1);
        let workflow = app.store.workflow(&d.workflows[0]).await.unwrap().unwrap();
        let view = engine::view(&app, workflow).await.unwrap();
        assert_eq!(view.derived.status, TaskStatus::Success);
        let steps: Vec<_> = view
            .workflow
            .steps
            .iter()
            .map(|s| s.spec.name.as_str())
            .collect();
        assert_eq!(
            steps,
            [
                "await stability",
                "inspect",
                "archive",
                "stage",
                "validate",
                "setup_download"
            ]
        );
        assert!(view.workflow.steps.iter().all(|s| s.runs.len() == 1));
    }
    let all = app.registry.find(&Default::default()).await.unwrap();
    assert_eq!(
        all.len(),
        names.len(),
        "the over-long name was not registered"
    );
    // Nothing is left in the scratch directory or the queue.
    let scratch = project.path("var/scratch");
    assert!(std::fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0) == 0);

    // A second run finds nothing new; a full scan finds everything registered.
    let again = stdout(&project.run_ok(&["jobs", "run", "watch"]));
    assert!(again.contains("incremental"), "{again}");
    let full = stdout(&project.run_ok(&["jobs", "run", "watch", "--full"]));
    assert!(full.contains("full"), "{full}");
    assert_eq!(
        app.registry.find(&Default::default()).await.unwrap().len(),
        names.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stage_workflow_stages_an_archived_dataset_again() {
    let project = Project::new();
    let origin = populate(&project, DatasetType::RawData, "restage_me", 7);
    project.run_ok(&["jobs", "run", "watch", "--wait"]);
    let app = project.app().await;
    let before = dataset_named(&app, DatasetType::RawData, "restage_me").await;
    let staged = PathBuf::from(before.staged_path.clone().unwrap());
    // As if the staged copy had been purged.
    std::fs::remove_dir_all(&staged).unwrap();

    let out = project.run_ok(&["workflows", "start", "stage", "restage_me", "--wait"]);
    assert!(stdout(&out).contains("SUCCESS"), "{}", describe(&out));
    let after = dataset_named(&app, DatasetType::RawData, "restage_me").await;
    assert_eq!(
        state_names(&after),
        [
            "REGISTERED",
            "READY",
            "ARCHIVED",
            "FETCHED",
            "STAGED",
            "FETCHED",
            "STAGED"
        ]
    );
    // Same alias, same place, same content.
    assert_eq!(after.staged_path, before.staged_path);
    assert_eq!(tree_files(&staged), tree_files(&origin));
    assert_eq!(after.workflows.len(), 2);
    assert!(after.is_staged);
    for rel in tree_files(&origin) {
        let path = origin.join(&rel);
        if !path.symlink_metadata().unwrap().file_type().is_symlink() {
            assert_eq!(md5sum(&path), md5sum(&staged.join(&rel)), "{rel}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_delete_workflow_removes_the_archive_and_frees_the_name() {
    let project = Project::new();
    populate(&project, DatasetType::DataProduct, "to_delete", 3);
    project.run_ok(&["jobs", "run", "watch", "--wait"]);
    let app = project.app().await;
    let before = dataset_named(&app, DatasetType::DataProduct, "to_delete").await;
    let archive = PathBuf::from(before.archive_path.clone().unwrap());
    assert!(archive.exists());

    project.run_ok(&["workflows", "start", "delete", "to_delete", "--wait"]);
    let after = app.registry.get(before.id).await.unwrap();
    assert!(after.is_deleted);
    assert_eq!(after.name.as_str(), format!("to_delete-{}", before.id));
    assert_eq!(after.archive_path, None);
    assert_eq!(
        state_names(&after).last().map(String::as_str),
        Some("DELETED")
    );
    assert!(!archive.exists(), "the archived bundle is removed");
    // The name is free again for a new dataset of that name.
    let query = workers::registry::DatasetQuery {
        dataset_type: Some(DatasetType::DataProduct),
        name: Some(workers::model::DatasetName::normalize("to_delete").unwrap()),
        ..Default::default()
    };
    assert!(app.registry.find(&query).await.unwrap().is_empty());
}

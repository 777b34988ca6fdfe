//! The auxiliary tasks of spec B.8 run as steps of a workflow: `mark_archived_and_delete`,
//! `delete_source`, `generate_qc` (with the real FastQC and MultiQC) and
//! `download_illumina_dataset` (with a stand-in `bs`), and the QC report upload against the
//! test Bioloop API.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::common::bioloop_api::TestApi;
use crate::common::services::service_var;
use crate::common::*;
use chrono::Datelike;
use serde_json::{Map, Value, json};
use workers::app::App;
use workers::model::DatasetType;
use workers::registry::{DatasetPatch, Registry, RegistryError};
use workers::store::TaskStatus;
use workers::workflow::engine;

/// Adds `jobs/<task>_only.toml`, a workflow of one step running `task`.
fn single_step_workflow(project: &Project, task: &str) -> String {
    let name = format!("{task}_only");
    std::fs::write(
        project.path(&format!("jobs/{name}.toml")),
        format!("name = \"{name}\"\n\n[[steps]]\nname = \"{task}\"\ntask = \"{task}\"\n"),
    )
    .unwrap();
    name
}

/// Runs `workflow` for dataset `id` to its end; the status and result of its last step.
async fn run_workflow(app: &Arc<App>, workflow: &str, id: i64) -> (TaskStatus, Value) {
    let workflow_id = engine::start(app, workflow, id, Map::new()).await.unwrap();
    run_until_idle(app, 1, Duration::from_secs(300)).await;
    let view = view_of(app, &workflow_id).await;
    let step = view
        .workflow
        .steps
        .iter()
        .rev()
        .find(|s| !s.runs.is_empty())
        .unwrap();
    let meta = &view.metas[&step.runs.last().unwrap().task_id];
    (meta.status, meta.result.clone())
}

fn error_message(result: &Value) -> String {
    result["exc_message"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn mark_archived_and_delete_records_the_configured_archive_path_and_removes_the_copies() {
    let project = Project::new();
    let workflow = single_step_workflow(&project, "mark_archived_and_delete");
    let app = project.app().await;
    let origin = project.dataset(
        DatasetType::RawData,
        "run_to_mark",
        &[("a.txt", b"alpha"), ("ro/b.txt", b"beta")],
    );
    // Instruments write read-only trees.
    std::fs::set_permissions(origin.join("ro"), std::fs::Permissions::from_mode(0o555)).unwrap();
    let id = register_without_workflow(&app, "run_to_mark", &origin).await;
    let dataset = app.registry.get(id).await.unwrap();
    let bundle = workers::steps::staged_bundle_path(&app.step_env(), &dataset);
    write_file(&bundle, b"a staged bundle");

    let (status, result) = run_workflow(&app, &workflow, id).await;
    assert_eq!(status, TaskStatus::Success, "{result}");
    let dataset = app.registry.get(id).await.unwrap();
    let year = chrono::Local::now().year();
    let expected = project.path(&format!("var/archive/{year}/raw_data/run_to_mark.tar"));
    assert_eq!(
        dataset.archive_path.as_deref(),
        Some(expected.to_str().unwrap()),
        "the archive path follows paths.RAW_DATA.archive, not the original's hard-coded one"
    );
    assert_eq!(dataset.latest_state(), Some("ARCHIVED"));
    assert!(!origin.exists(), "the origin directory is removed");
    assert!(!bundle.exists(), "the staged bundle is removed");

    // Run again (a retry after a crash): nothing left to remove is not an error.
    let (status, result) = run_workflow(&app, &workflow, id).await;
    assert_eq!(status, TaskStatus::Success, "{result}");
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_source_removes_a_read_only_origin_tree_reached_through_a_link() {
    let project = Project::new();
    let workflow = single_step_workflow(&project, "delete_source");
    let app = project.app().await;
    let origin = project.dataset(
        DatasetType::RawData,
        "source_to_delete",
        &[("ro/deep/a.txt", b"alpha")],
    );
    std::fs::set_permissions(
        origin.join("ro/deep"),
        std::fs::Permissions::from_mode(0o555),
    )
    .unwrap();
    std::fs::set_permissions(origin.join("ro"), std::fs::Permissions::from_mode(0o555)).unwrap();
    let link = project.path("link_to_source");
    std::os::unix::fs::symlink(&origin, &link).unwrap();
    let id = register_without_workflow(&app, "source_to_delete", &link).await;

    let (status, result) = run_workflow(&app, &workflow, id).await;
    assert_eq!(status, TaskStatus::Success, "{result}");
    assert!(!origin.exists(), "the tree the link leads to is removed");
    // A second run finds nothing and succeeds.
    let (status, _) = run_workflow(&app, &workflow, id).await;
    assert_eq!(status, TaskStatus::Success);
}

/// A small gzip-compressed FASTQ file of `reads` reads.
fn write_fastq_gz(path: &Path, reads: usize, seed: u64) {
    let mut text = String::new();
    let bases = b"ACGT";
    let mut state = seed;
    for i in 0..reads {
        let seq: String = (0..50)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                bases[(state >> 62) as usize] as char
            })
            .collect();
        text.push_str(&format!("@read{i}\n{seq}\n+\n{}\n", "I".repeat(50)));
    }
    let plain = path.with_extension("");
    write_file(&plain, text.as_bytes());
    let status = Command::new("gzip").arg("-f").arg(&plain).status().unwrap();
    assert!(status.success(), "gzip {}", plain.display());
    assert!(path.exists());
}

/// The FastQC and MultiQC programs of the test environment (scripts/services.sh installs
/// them), or `None` with a note when they are not there (a failure under CI).
fn qc_tools() -> Option<(String, String)> {
    let fastqc = service_var("WORKERS_TEST_FASTQC")?;
    let multiqc = service_var("WORKERS_TEST_MULTIQC")?;
    Some((fastqc, multiqc))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_qc_switch_runs_fastqc_and_multiqc_after_setup_download_and_records_the_report() {
    let Some((fastqc, multiqc)) = qc_tools() else {
        return;
    };
    let mut project = Project::new();
    project.set_env("WORKERS__WORKFLOWS__INTEGRATED__QC", "true");
    project.set_env("WORKERS__QC__FASTQC", &fastqc);
    project.set_env("WORKERS__QC__MULTIQC", &multiqc);
    project.set_env("WORKERS__QC__THREADS", "1");
    // Three files in batches of two: two FastQC runs.
    project.set_env("WORKERS__QC__BATCH_SIZE", "2");
    let app = project.app().await;
    let origin = project.dataset(
        DatasetType::RawData,
        "run_with_reads",
        &[("notes.txt", b"x")],
    );
    for (idx, rel) in [
        "S1_L001_R1_001.fastq.gz",
        "S1_L001_R2_001.fastq.gz",
        "lane2/S2_L002_R1_001.fastq.gz",
    ]
    .iter()
    .enumerate()
    {
        write_fastq_gz(&origin.join(rel), 200, idx as u64 + 1);
    }
    let id = register_without_workflow(&app, "run_with_reads", &origin).await;
    let steps: Vec<_> = app
        .definitions
        .get("integrated")
        .unwrap()
        .steps
        .iter()
        .map(|s| s.task.clone())
        .collect();
    assert_eq!(
        steps[steps.len() - 2..],
        ["setup_dataset_download", "generate_qc"]
    );

    let (status, result) = run_workflow(&app, "integrated", id).await;
    assert_eq!(status, TaskStatus::Success, "{result}");
    let dataset = app.registry.get(id).await.unwrap();
    assert_eq!(dataset.latest_state(), Some("QC"));
    let report_id = dataset.metadata["report_id"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&report_id).is_ok(), "{report_id}");

    let qc_dir = project.path("var/qc/raw_data/run_with_reads/qc");
    for stem in ["S1_L001_R1_001", "S1_L001_R2_001", "S2_L002_R1_001"] {
        assert!(
            qc_dir.join(format!("{stem}_fastqc.html")).is_file(),
            "FastQC report of {stem} in {}: {:?}",
            qc_dir.display(),
            tree_files(&qc_dir)
        );
    }
    let report = qc_dir.join("multiqc_report.html");
    let stored = project.path(&format!("var/reports/{report_id}/multiqc_report.html"));
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        std::fs::read(&report).unwrap(),
        "the embedded registry keeps a copy of the report"
    );
    assert!(
        String::from_utf8_lossy(&std::fs::read(&report).unwrap()).contains("S2_L002_R1_001"),
        "MultiQC summarised every file"
    );

    // Run again: the report keeps its id.
    let workflow = single_step_workflow(&project, "generate_qc");
    let app = project.app().await;
    let (status, result) = run_workflow(&app, &workflow, id).await;
    assert_eq!(status, TaskStatus::Success, "{result}");
    let dataset = app.registry.get(id).await.unwrap();
    assert_eq!(dataset.metadata["report_id"], json!(report_id));
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_qc_fails_clearly_without_a_qc_path_a_staged_copy_or_reads() {
    let project = Project::new();
    let workflow = single_step_workflow(&project, "generate_qc");
    let app = project.app().await;

    // A DATA_PRODUCT: no paths.DATA_PRODUCT.qc in the default configuration.
    let origin = project.dataset(DatasetType::DataProduct, "product", &[("a.txt", b"a")]);
    let outcome = app
        .registry
        .bulk_create(&[workers::registry::NewDataset {
            name: workers::model::DatasetName::normalize("product").unwrap(),
            dataset_type: DatasetType::DataProduct,
            origin_path: origin.to_string_lossy().into_owned(),
            create_method: workers::model::CreateMethod::Scan,
            description: None,
            metadata: None,
        }])
        .await
        .unwrap();
    let product = outcome.created[0].id;
    let (status, result) = run_workflow(&app, &workflow, product).await;
    assert_eq!(status, TaskStatus::Failure);
    assert!(
        error_message(&result).contains("paths.DATA_PRODUCT.qc is not set"),
        "{result}"
    );

    // RAW_DATA, never staged.
    let id = register_small(&app, &project, "never_staged").await;
    let (status, result) = run_workflow(&app, &workflow, id).await;
    assert_eq!(status, TaskStatus::Failure);
    assert!(
        error_message(&result).contains("has no staged copy"),
        "{result}"
    );

    // A staged path that is gone.
    let gone = project.path("var/stage/raw_data/gone/never_staged");
    app.registry
        .update(
            id,
            &DatasetPatch {
                staged_path: Some(Some(gone.to_string_lossy().into_owned())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (status, result) = run_workflow(&app, &workflow, id).await;
    assert_eq!(status, TaskStatus::Failure);
    let message = error_message(&result);
    assert!(
        message.contains("does not exist") && message.contains(gone.to_str().unwrap()),
        "{result}"
    );

    // A staged copy without reads: nothing to check, and no program is run.
    let staged = project.path("var/stage/raw_data/alias/never_staged");
    write_file(&staged.join("a.txt"), b"alpha");
    app.registry
        .update(
            id,
            &DatasetPatch {
                staged_path: Some(Some(staged.to_string_lossy().into_owned())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (status, result) = run_workflow(&app, &workflow, id).await;
    assert_eq!(status, TaskStatus::Failure);
    assert!(
        error_message(&result).contains("holds no *.fastq.gz file"),
        "{result}"
    );
    assert_ne!(
        app.registry.get(id).await.unwrap().latest_state(),
        Some("QC")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_program_that_hangs_is_killed_at_its_time_limit() {
    let mut project = Project::new();
    // A "FastQC" that never finishes: sleeps in a child process of its own, which must go
    // too (the whole process group is killed).
    let fake = project.path("fake_fastqc");
    let marker = project.path("fake_fastqc.pid");
    write_file(
        &fake,
        format!(
            "#!/bin/sh\nsleep 300 &\necho $! > '{}'\nwait\n",
            marker.display()
        )
        .as_bytes(),
    );
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    project.set_env("WORKERS__QC__FASTQC", fake.to_str().unwrap());
    project.set_env("WORKERS__QC__COMMAND_TIMEOUT_SECONDS", "1");
    project.set_env("WORKERS__RETRY__DEFAULT__MAX_RETRIES", "0");
    let workflow = single_step_workflow(&project, "generate_qc");
    let app = project.app().await;
    let id = register_small(&app, &project, "hanging_qc").await;
    let staged = project.path("var/stage/raw_data/alias/hanging_qc");
    write_fastq_gz(&staged.join("x.fastq.gz"), 10, 7);
    app.registry
        .update(
            id,
            &DatasetPatch {
                staged_path: Some(Some(staged.to_string_lossy().into_owned())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (status, result) = run_workflow(&app, &workflow, id).await;
    assert_eq!(status, TaskStatus::Failure);
    assert!(
        error_message(&result).contains("qc.command_timeout_seconds"),
        "{result}"
    );
    let pid: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The grandchild was killed with the group (it may linger as a zombie of init briefly).
    let mut alive = true;
    for _ in 0..50 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if status.is_empty() || status.contains(") Z ") {
            alive = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!alive, "the program's child {pid} still runs");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_is_uploaded_to_the_api_as_multipart_once_its_report_id_is_recorded() {
    let api = TestApi::start();
    let registry = api.client();
    let created = registry
        .bulk_create(&[workers::registry::NewDataset {
            name: workers::model::DatasetName::normalize("reported").unwrap(),
            dataset_type: DatasetType::RawData,
            origin_path: "/data/reported".into(),
            create_method: workers::model::CreateMethod::Scan,
            description: None,
            metadata: None,
        }])
        .await
        .unwrap()
        .created
        .remove(0);
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("multiqc_report.html");
    // Bytes that look like a multipart delimiter must arrive intact.
    let content = b"<html>\r\n--boundary\r\n\0 report \xff</html>".to_vec();
    std::fs::write(&report, &content).unwrap();

    // The API refuses a report without metadata.report_id (multer answers through the error
    // handler: 500).
    let err = registry
        .upload_report(created.id, &report)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::Unavailable(e) if format!("{e:#}").contains("report_id is not set")),
        "{err:?}"
    );
    assert_eq!(api.report(created.id), None);

    registry
        .update(
            created.id,
            &DatasetPatch {
                metadata: Some(json!({ "report_id": "r-1" })),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let stored = registry.upload_report(created.id, &report).await.unwrap();
    assert_eq!(stored, "reports/r-1/multiqc_report.html");
    assert_eq!(api.report(created.id), Some(content));
    let sent = api.requests_to("PUT", &format!("datasets/{}/report", created.id));
    assert_eq!(sent.len(), 2);
}

/// A `bs` stand-in in a directory of its own, configured by `bs.env` there.
fn stand_in_bs(dir: &Path, config: &str) -> PathBuf {
    let bs = dir.join("bs");
    std::os::unix::fs::symlink(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/bs"),
        &bs,
    )
    .unwrap();
    std::fs::write(dir.join("bs.env"), config).unwrap();
    bs
}

#[tokio::test(flavor = "multi_thread")]
async fn download_illumina_dataset_downloads_the_recent_datasets_and_records_the_origin() {
    let mut project = Project::new();
    let tools = project.path("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let log = project.path("bs.log");
    let bs = stand_in_bs(
        &tools,
        &format!(
            "BS_STANDIN_DATASETS=ds.111,ds.222\nBS_STANDIN_LOG={}\n",
            log.display()
        ),
    );
    project.set_env("WORKERS__ILLUMINA__BS", bs.to_str().unwrap());
    project.set_env("WORKERS__ILLUMINA__N_DAYS", "3");
    let workflow = single_step_workflow(&project, "download_illumina_dataset");
    let app = project.app().await;
    let id = register_small(&app, &project, "basespace_run").await;

    let (status, result) = run_workflow(&app, &workflow, id).await;
    assert_eq!(status, TaskStatus::Success, "{result}");
    let target = project.path("var/scratch/illumina/basespace_run");
    let dataset = app.registry.get(id).await.unwrap();
    assert_eq!(
        dataset.origin_path.as_deref(),
        Some(target.to_str().unwrap())
    );
    assert_eq!(dataset.latest_state(), Some("DOWNLOADED"));
    assert_eq!(
        tree_files(&target),
        ["ds.111_L001_R1_001.fastq.gz", "ds.222_L001_R1_001.fastq.gz"]
    );
    let calls: Vec<Vec<String>> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        calls[0],
        ["list", "datasets", "-f", "json", "--newer-than=3d"]
    );
    assert_eq!(
        calls[1],
        [
            "download",
            "dataset",
            "--id",
            "ds.111",
            "-o",
            target.to_str().unwrap()
        ]
    );
    assert_eq!(calls.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_basespace_download_fails_the_step_naming_the_command_and_records_nothing() {
    let mut project = Project::new();
    let tools = project.path("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let bs = stand_in_bs(
        &tools,
        "BS_STANDIN_DATASETS=ds.1,ds.2\nBS_STANDIN_FAIL_ID=ds.2\n",
    );
    project.set_env("WORKERS__ILLUMINA__BS", bs.to_str().unwrap());
    project.set_env("WORKERS__RETRY__DEFAULT__MAX_RETRIES", "1");
    let workflow = single_step_workflow(&project, "download_illumina_dataset");
    let app = project.app().await;
    let id = register_small(&app, &project, "failing_download").await;
    let before = app.registry.get(id).await.unwrap().origin_path;

    let (status, result) = run_workflow(&app, &workflow, id).await;
    assert_eq!(status, TaskStatus::Failure);
    let message = error_message(&result);
    assert!(
        message.contains("--id ds.2") && message.contains("download failed"),
        "{message}"
    );
    let dataset = app.registry.get(id).await.unwrap();
    assert_eq!(dataset.origin_path, before);
    assert_ne!(dataset.latest_state(), Some("DOWNLOADED"));
}

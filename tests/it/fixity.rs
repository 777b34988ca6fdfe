//! `workers verify`: a dataset's copies re-read against its record, through the binary, with
//! the exit codes monitoring relies on (0 intact, 1 differences, 2 usage).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::Value;
use workers::model::DatasetType;

use crate::common::*;

/// Makes `path` writable (stage leaves staged files read-only) and rewrites it.
fn tamper(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    change(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_reports_intact_copies_then_names_a_truncated_staged_file_and_exits_1() {
    let project = Project::new();
    project.dataset(
        DatasetType::RawData,
        "fixity_run",
        &[
            ("a.txt", b"alpha\n"),
            ("dir/b.bin", &pseudo_random(50_000, 5)),
        ],
    );
    project.run_ok(&["jobs", "run", "watch", "--wait"]);
    let dataset = dataset_named(&*project.app().await, DatasetType::RawData, "fixity_run").await;
    assert!(dataset.is_staged && dataset.archive_path.is_some());
    let id = dataset.id.to_string();

    let out = project.run(&["verify", &id, "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["intact"], true);
    let results: Vec<(&str, &str)> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["copy"].as_str().unwrap(), c["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        results,
        [
            ("source", "intact"),
            ("staged", "intact"),
            ("archive", "intact")
        ]
    );
    assert_eq!(report["checks"][0]["bytes_read"], 50_006);

    let staged = Path::new(dataset.staged_path.as_ref().unwrap()).join("dir/b.bin");
    tamper(&staged, |bytes| bytes.truncate(1000));
    let out = project.run(&["verify", "fixity_run", "--staged"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("`dir/b.bin`: 1000 bytes, the record says 50000"),
        "{stdout}"
    );
    // The other copies are still intact, and the check changed nothing.
    let out = project.run(&["verify", "fixity_run", "--source", "--archive"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(std::fs::metadata(&staged).unwrap().len(), 1000);
    let after = dataset_named(&*project.app().await, DatasetType::RawData, "fixity_run").await;
    assert_eq!(after.states, dataset.states);
    assert!(after.is_staged);
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_of_an_unknown_dataset_or_a_copy_it_lacks_is_a_usage_error() {
    let project = Project::new();
    let root = project.dataset(DatasetType::RawData, "never_run", &[("a.txt", b"alpha\n")]);
    project.run_ok(&["register", root.to_str().unwrap(), "--type", "RAW_DATA"]);

    let out = project.run(&["verify", "never_run", "--staged"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        describe(&out).contains("is not staged: there is no staged copy to verify"),
        "{}",
        describe(&out)
    );
    // Without a choice, the copies it lacks are listed as not checked: nothing differs.
    let out = project.run(&["verify", "never_run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("not checked: the dataset has not been archived"),
        "{}",
        describe(&out)
    );
    let out = project.run(&["verify", "424242"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(describe(&out).contains("no dataset has the id 424242"));
}

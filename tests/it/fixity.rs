//! `workers verify`: a dataset's copies re-read against its record, through the binary, with
//! the exit codes monitoring relies on (0 intact, 1 differences, 2 usage).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use workers::jobs::fixity::FixityReport;
use workers::jobs::{self, JobName, JobOptions, JobReport};
use workers::model::DatasetType;
use workers::store::{FixityResult, RunOutcome, Trigger};

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
    // The other copies are still intact, and the check changed no data; it raised the alert
    // (a state and the metadata the UI shows) and was recorded.
    let out = project.run(&["verify", "fixity_run", "--source", "--archive"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(std::fs::metadata(&staged).unwrap().len(), 1000);
    let after = dataset_named(&*project.app().await, DatasetType::RawData, "fixity_run").await;
    assert_eq!(after.states[..dataset.states.len()], dataset.states[..]);
    assert_eq!(after.latest_state(), Some("FIXITY_FAILED"));
    assert!(after.is_staged);
    let staged_verdict = &after.metadata["fixity"]["copies"]["staged"];
    assert_eq!(staged_verdict["result"], "differs");
    assert_eq!(staged_verdict["differences"], 1);
    assert!(
        staged_verdict["detail"]
            .as_str()
            .unwrap()
            .contains("`dir/b.bin`: 1000 bytes")
    );
    assert_eq!(
        after.metadata["fixity"]["copies"]["archive"]["result"],
        "intact"
    );
    let shown = project.run_ok(&["datasets", "show", "fixity_run", "--format", "json"]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let checks: Vec<(&str, &str, &str)> = shown["fixity_checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["copy"].as_str().unwrap(),
                c["result"].as_str().unwrap(),
                c["by"].as_str().unwrap(),
            )
        })
        .collect();
    // Newest first: the last run's two copies, the staged failure, the first run's three.
    assert_eq!(checks.len(), 6, "{checks:?}");
    assert!(
        checks[..2]
            .iter()
            .all(|(_, result, by)| *result == "intact" && *by == "verify")
    );
    assert_eq!(checks[2], ("staged", "differs", "verify"));
}

/// The scheduled check: within its byte budget, the longest unchecked first, each run going on
/// where the last stopped; a flipped bit in a bundle is found, named and alerted, and the
/// rotation and the alert are what `datasets show` and the metrics report.
#[tokio::test(flavor = "multi_thread")]
async fn the_fixity_job_rotates_through_the_archive_within_its_budget_and_alerts_on_a_flipped_bit()
{
    let mut project = Project::new();
    for (i, name) in ["fix_a", "fix_b", "fix_c"].iter().enumerate() {
        project.dataset(
            DatasetType::RawData,
            name,
            &[("data.bin", &pseudo_random(100_000, i as u64 + 20))],
        );
    }
    project.run_ok(&["jobs", "run", "watch", "--wait"]);
    // About 102 kB a bundle: two fit in a run, three do not.
    project.set_env("WORKERS__FIXITY__BYTES_PER_RUN", "250 kB");
    // A continuous rotation: every run goes on as far as its budget goes.
    project.set_env("WORKERS__FIXITY__PERIOD_DAYS", "0");
    let app = project.app().await;
    let mut ids = HashMap::new();
    let mut bundles = HashMap::new();
    for name in ["fix_a", "fix_b", "fix_c"] {
        let dataset = dataset_named(&app, DatasetType::RawData, name).await;
        bundles.insert(name, dataset.bundle.clone().unwrap().size);
        ids.insert(dataset.id, name);
    }
    let run = |dry_run: bool| {
        let app = Arc::clone(&app);
        async move {
            let opts = JobOptions {
                dry_run,
                ..JobOptions::default()
            };
            let execution = jobs::execute(app, JobName::Fixity, Trigger::Manual, None, opts)
                .await
                .unwrap();
            assert_eq!(execution.outcome, RunOutcome::Success);
            match execution.report {
                Some(JobReport::Fixity(report)) => report,
                other => panic!("{other:?}"),
            }
        }
    };
    let names = |report: &FixityReport| -> Vec<&str> {
        report.checked.iter().map(|item| ids[&item.id]).collect()
    };

    let planned = run(true).await;
    assert_eq!(names(&planned), ["fix_a", "fix_b"]);
    assert_eq!(planned.deferred, 1);
    assert!(
        app.store.fixity_standings().await.unwrap().is_empty(),
        "a dry run records nothing"
    );

    let first = run(false).await;
    assert_eq!(names(&first), ["fix_a", "fix_b"]);
    assert_eq!(first.deferred, 1);
    assert_eq!(first.bytes_read(), bundles["fix_a"] + bundles["fix_b"]);
    assert!(first.bytes_read() <= 250_000);
    assert_eq!(first.count(FixityResult::Intact), 2);
    assert_eq!((first.overdue, first.failing), (1, 0));

    // The next run goes on with the one left over, then the longest unchecked.
    let second = run(false).await;
    assert_eq!(names(&second), ["fix_c", "fix_a"]);
    assert_eq!(second.overdue, 0);

    // One bit of fix_b's archived bundle.
    let b = dataset_named(&app, DatasetType::RawData, "fix_b").await;
    let archived = Path::new(b.archive_path.as_ref().unwrap());
    tamper(archived, |bytes| {
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x10;
    });
    let third = run(false).await;
    // fix_b was checked longest ago; fix_c and fix_a follow it in the order of their checks
    // (which can fall in one millisecond).
    let third_names = names(&third);
    assert_eq!((third_names.len(), third_names[0]), (2, "fix_b"));
    assert_eq!(third.count(FixityResult::Differs), 1);
    assert_eq!(third.failing, 1);
    assert_eq!(
        third.checked[0].results,
        [("archive".to_owned(), FixityResult::Differs)]
    );

    let b = dataset_named(&app, DatasetType::RawData, "fix_b").await;
    assert_eq!(b.latest_state(), Some("FIXITY_FAILED"));
    let verdict = &b.metadata["fixity"]["copies"]["archive"];
    assert_eq!(verdict["result"], "differs");
    assert!(
        verdict["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("`{}`: MD5", archived.display())),
        "{verdict}"
    );
    let unchanged = dataset_named(&app, DatasetType::RawData, "fix_a").await;
    assert!(
        unchanged.metadata.get("fixity").is_none(),
        "an intact dataset's metadata is left alone: {}",
        unchanged.metadata
    );
    let history = app.store.fixity_history(b.id, 10).await.unwrap();
    assert_eq!(
        history.iter().map(|c| c.result).collect::<Vec<_>>(),
        [FixityResult::Differs, FixityResult::Intact]
    );
    assert!(
        history
            .iter()
            .all(|c| c.by == "fixity" && c.copy == "archive")
    );
    assert!(
        workers::metrics::render().contains("workers_fixity_failing_datasets 1"),
        "the gauge the alert rules watch"
    );

    // What an operator sees.
    let shown = project.run_ok(&["datasets", "show", "fix_b"]);
    let text = stdout(&shown);
    assert!(text.contains("fixity checks (newest first)"), "{text}");
    assert!(text.contains("differs (1)"), "{text}");
    let listed = project.run_ok(&["jobs", "list"]);
    assert!(stdout(&listed).contains("fixity"), "{}", stdout(&listed));

    // With a period, a dataset checked within it is not due: nothing is read again.
    project.set_env("WORKERS__FIXITY__PERIOD_DAYS", "90");
    let app = project.app().await;
    let opts = JobOptions::default();
    let execution = jobs::execute(app, JobName::Fixity, Trigger::Manual, None, opts)
        .await
        .unwrap();
    let Some(JobReport::Fixity(due)) = execution.report else {
        panic!("{:?}", execution.outcome)
    };
    assert_eq!((due.checked.len(), due.not_due, due.deferred), (0, 3, 0));
    assert_eq!((due.overdue, due.failing), (0, 1));
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

//! `workers status`: the deployment at a glance, and its exit code (0 healthy, 1 needs
//! attention) for monitoring.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use workers::model::DatasetType;

use crate::common::*;

fn status(project: &Project) -> (Option<i32>, Value) {
    let out = project.run(&["status", "--format", "json"]);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status printed no JSON ({e}): {}", describe(&out)));
    (out.status.code(), report)
}

fn problems(report: &Value) -> Vec<String> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn status_reports_the_deployment_and_exits_1_while_something_needs_attention() {
    let mut project = Project::new();
    project.dataset(DatasetType::RawData, "seen", &[("a.txt", b"alpha")]);
    project.run_ok(&["jobs", "run", "watch", "--wait"]);

    // Jobs are enabled and no scheduler runs: that needs attention.
    let (code, report) = status(&project);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["healthy"], false);
    assert!(
        problems(&report)
            .iter()
            .any(|p| p.contains("no scheduler holds the lease")),
        "{report:#}"
    );
    assert_eq!(report["datasets"]["STAGED"], 1, "{report:#}");
    assert_eq!(report["workflows"]["active"], 0);
    assert_eq!(report["queue"]["waiting"], 0);
    let watch = report["scheduler"]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job"] == "watch")
        .unwrap();
    assert_eq!(watch["last_run"]["outcome"], "success");
    assert!(watch["next_run"].is_string());
    let stage_fs = report["file_systems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|fs| {
            fs["paths"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == "paths.RAW_DATA.stage")
        })
        .unwrap_or_else(|| panic!("{report:#}"));
    assert!(stage_fs["free"].as_u64().unwrap() > 0);
    assert_eq!(stage_fs["headroom"], 1u64 << 30);

    // A workflow started with no worker to run it: active, its step queued.
    project.run_ok(&["workflows", "start", "stage", "seen"]);
    let (_, report) = status(&project);
    assert_eq!(report["workflows"]["active"], 1, "{report:#}");
    assert_eq!(report["workflows"]["oldest_active"]["name"], "stage");
    assert!(
        report["workflows"]["oldest_active"]["step"].is_string(),
        "{report:#}"
    );
    assert_eq!(report["queue"]["waiting"], 1, "{report:#}");
    assert!(report["queue"]["oldest"].is_string(), "{report:#}");

    // A scheduler holds the lease and a worker answers (and runs that step): healthy.
    project.set_env("WORKERS__SCHEDULER__WORKERS", "0");
    let scheduler = project
        .command(&["scheduler"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reap_scheduler = Reap(scheduler.id());
    let worker = project
        .command(&[
            "worker",
            "--hostname",
            "status-node@test",
            "--concurrency",
            "3",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reap_worker = Reap(worker.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let (code, report) = status(&project);
        // Answered, and done with the queued step (on a loaded machine it may still run it
        // when the deployment is first healthy).
        let answered = report["workers"].as_array().is_some_and(|nodes| {
            nodes
                .iter()
                .any(|n| n["node"] == "status-node@test" && n["busy"] == 0)
        });
        if code == Some(0) && answered {
            break report;
        }
        assert!(Instant::now() < deadline, "never healthy: {report:#}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        report["scheduler"]["lease_holder"].is_string(),
        "{report:#}"
    );
    assert!(report["scheduler"]["lease_since"].is_string(), "{report:#}");
    let node = report["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "status-node@test")
        .unwrap();
    assert_eq!(node["busy"], 0);
    assert_eq!(node["slots"], 3);
    assert!(node["uptime_seconds"].is_u64(), "{node}");

    // A staging file system over its high watermark needs attention; the table says so too.
    project.set_env("WORKERS__STAGE__PURGE__HIGH_WATERMARK_PERCENT", "1");
    project.set_env("WORKERS__STAGE__PURGE__LOW_WATERMARK_PERCENT", "0");
    let (code, report) = status(&project);
    assert_eq!(code, Some(1));
    assert!(
        problems(&report)
            .iter()
            .any(|p| p.contains("above stage.purge.high_watermark_percent")),
        "{report:#}"
    );
    let out = project.run(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.starts_with("needs attention:"), "{text}");
    assert!(
        text.contains("status-node@test (0 of 3 slots busy, up "),
        "{text}"
    );
    assert!(text.contains("datasets: STAGED 1"), "{text}");
    for mut child in [scheduler, worker] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

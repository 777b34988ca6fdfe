//! The scheduler's jobs run by hand (`workers jobs run`), through the same code path the
//! scheduler uses: purges, reconcile, metrics, and their records in the job history.

use std::path::PathBuf;

use crate::common::*;
use serde_json::{Value, json};
use workers::model::DatasetType;
use workers::sqlite::Db;
use workers::store::WorkflowFilter;

fn db(project: &Project) -> Db {
    Db::open(
        &project.path("var/workers.db"),
        std::time::Duration::from_secs(5),
    )
    .unwrap()
}

/// Makes every STAGED state of `dataset_id` `days` days old.
fn backdate_staged(project: &Project, dataset_id: i64, days: i64) {
    let ms = (chrono::Utc::now() - chrono::TimeDelta::days(days)).timestamp_millis();
    db(project)
        .with_conn(|c| {
            c.execute(
                "UPDATE dataset_states SET timestamp = ?2 WHERE dataset_id = ?1 AND state = 'STAGED'",
                [dataset_id, ms],
            )?;
            Ok(())
        })
        .unwrap();
}

fn history(project: &Project, job: &str) -> Vec<Value> {
    serde_json::from_slice(
        &project
            .run_ok(&["jobs", "history", job, "--format", "json"])
            .stdout,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_staged_datasets_removes_old_staged_copies_and_their_links() {
    let mut project = Project::new();
    project.set_env("WORKERS__STAGE__PURGE__MAX_PURGES", "2");
    for name in ["old_1", "old_2", "old_3", "recent"] {
        project.dataset(DatasetType::RawData, name, &[("a.txt", name.as_bytes())]);
    }
    project.run_ok(&["jobs", "run", "watch", "--wait"]);
    let app = project.app().await;
    let mut old = Vec::new();
    for name in ["old_1", "old_2", "old_3"] {
        let d = dataset_named(&app, DatasetType::RawData, name).await;
        backdate_staged(&project, d.id, 30);
        old.push(d);
    }

    // A dry run changes nothing.
    let out = project.run_ok(&["jobs", "run", "purge_staged_datasets", "--dry-run"]);
    assert!(stdout(&out).contains("would purge"), "{}", stdout(&out));
    assert!(PathBuf::from(old[0].staged_path.clone().unwrap()).exists());

    // Trees with read-only directories (as instruments write them) are removed all the same,
    // by a process without the power to ignore permissions.
    use std::os::unix::fs::PermissionsExt;
    for d in &old {
        let tree = PathBuf::from(d.staged_path.clone().unwrap());
        std::fs::create_dir(tree.join("ro")).unwrap();
        std::fs::write(tree.join("ro/f"), b"x").unwrap();
        for dir in [tree.join("ro"), tree.clone()] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
    }
    let out = without_dac_override(project.command(&["jobs", "run", "purge_staged_datasets"]))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout(&out).contains("1 more are due"), "{}", stdout(&out));
    let mut purged = 0;
    for before in &old {
        let d = app.registry.get(before.id).await.unwrap();
        if d.is_staged {
            continue;
        }
        purged += 1;
        assert_eq!(d.staged_path, None);
        assert_eq!(state_names(&d).last().map(String::as_str), Some("PURGED"));
        assert!(
            !PathBuf::from(before.staged_path.clone().unwrap()).exists(),
            "tree removed"
        );
        let download = app.settings.paths.download_dir.clone();
        assert!(
            download
                .join(before.stage_alias().unwrap())
                .symlink_metadata()
                .is_err(),
            "alias link removed"
        );
        assert!(
            download
                .join(format!("{}.RAW_DATA.tar", before.name))
                .symlink_metadata()
                .is_err()
        );
        let bundle = app
            .settings
            .paths
            .raw_data
            .bundle_stage
            .join(format!("{}.RAW_DATA.tar", before.name));
        assert!(!bundle.exists(), "staged bundle removed");
    }
    assert_eq!(purged, 2, "at most stage.purge.max_purges per run");
    assert!(
        dataset_named(&app, DatasetType::RawData, "recent")
            .await
            .is_staged,
        "recent copies stay"
    );

    let runs = history(&project, "purge_staged_datasets");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["trigger"], "manual");
    assert_eq!(runs[0]["outcome"], "success");
    assert_eq!(
        runs[0]["counters"],
        json!({"purged": 2, "purged_by_fill": 0, "over_watermark": 0, "deferred": 1, "failed": 0})
    );
    assert_eq!(runs[1]["dry_run"], true);

    // The next run takes the rest; staging again works after a purge.
    project.run_ok(&["jobs", "run", "purge_staged_datasets"]);
    for before in &old {
        assert!(
            !app.registry.get(before.id).await.unwrap().is_staged,
            "{}",
            before.name
        );
    }
    project.run_ok(&["workflows", "start", "stage", "old_1", "--wait"]);
    assert!(
        dataset_named(&app, DatasetType::RawData, "old_1")
            .await
            .is_staged
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_stale_workflows_deletes_only_old_unlinked_workflows() {
    let project = Project::new();
    let app = project.app().await;
    let spec = app.definitions.get("stage").unwrap().clone();
    let origin = project.dataset(DatasetType::RawData, "linked", &[("a", b"a")]);
    let id = register_without_workflow(&app, "linked", &origin).await;
    for wf in ["old-orphan", "old-linked", "new-orphan"] {
        app.store
            .create_workflow(wf, &app.settings.app_id, &spec, &[json!(id)])
            .await
            .unwrap();
    }
    app.registry.add_workflow(id, "old-linked").await.unwrap();
    let two_days_ago = (chrono::Utc::now() - chrono::TimeDelta::days(2)).timestamp_millis();
    db(&project)
        .with_conn(|c| {
            c.execute(
                "UPDATE workflows SET created_at = ?1 WHERE id LIKE 'old-%'",
                [two_days_ago],
            )?;
            Ok(())
        })
        .unwrap();

    let out = project.run_ok(&["jobs", "run", "purge_stale_workflows", "--dry-run"]);
    assert!(
        stdout(&out).contains("would delete workflow old-orphan"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        app.store
            .workflows(WorkflowFilter::All, 10)
            .await
            .unwrap()
            .len(),
        3
    );

    project.run_ok(&["jobs", "run", "purge_stale_workflows"]);
    let mut left: Vec<String> = app
        .store
        .workflows(WorkflowFilter::All, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    left.sort();
    assert_eq!(left, ["new-orphan", "old-linked"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_starts_missing_workflows_and_repairs_stalled_ones() {
    let project = Project::new();
    let app = project.app().await;
    let origin = project.dataset(DatasetType::RawData, "orphan", &[("a", b"a")]);
    register_without_workflow(&app, "orphan", &origin).await;
    let stalled = project.dataset(DatasetType::RawData, "stalled", &[("b", b"b")]);
    let id = register_without_workflow(&app, "stalled", &stalled).await;
    let spec = app.definitions.get("integrated").unwrap().clone();
    app.store
        .create_workflow("stalled-wf", &app.settings.app_id, &spec, &[json!(id)])
        .await
        .unwrap();
    app.registry.add_workflow(id, "stalled-wf").await.unwrap();

    let out = project.run_ok(&["jobs", "run", "reconcile", "--dry-run"]);
    assert!(
        stdout(&out).contains("(`orphan`) has no workflow"),
        "{}",
        stdout(&out)
    );
    let out = project.run_ok(&["jobs", "run", "reconcile", "--wait"]);
    let printed = stdout(&out);
    assert!(
        printed.contains("(`orphan`) had no workflow: started"),
        "{printed}"
    );
    assert!(
        printed.contains("workflow stalled-wf had no step in flight"),
        "{printed}"
    );
    for name in ["orphan", "stalled"] {
        let d = dataset_named(&app, DatasetType::RawData, name).await;
        assert_eq!(
            state_names(&d).last().map(String::as_str),
            Some("STAGED"),
            "{name}"
        );
    }
    let runs = history(&project, "reconcile");
    assert_eq!(
        runs[0]["counters"],
        json!({"datasets_without_workflow": 1, "workflows_started": 1, "stalled_workflows_repaired": 1})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_records_the_file_systems_of_the_configured_paths() {
    let project = Project::new();
    project.run_ok(&["jobs", "run", "metrics", "--dry-run"]);
    let count = |project: &Project| -> i64 {
        db(project)
            .with_conn(|c| Ok(c.query_row("SELECT COUNT(*) FROM metrics", [], |r| r.get(0))?))
            .unwrap()
    };
    assert_eq!(count(&project), 0, "a dry run records nothing");
    std::fs::create_dir_all(project.path("var/stage/raw_data")).unwrap();
    let out = project.run_ok(&["jobs", "run", "metrics"]);
    let printed = stdout(&out);
    assert!(
        printed.contains("paths.root") && printed.contains("files"),
        "{printed}"
    );
    assert!(
        count(&project) >= 2,
        "a size and a files metric per file system"
    );
    let (usage, limit): (i64, i64) = db(&project)
        .with_conn(|c| {
            Ok(c.query_row(
                "SELECT usage, \"limit\" FROM metrics WHERE measurement NOT LIKE '% files' LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
        .unwrap();
    assert!(usage > 0 && limit >= usage, "usage {usage}, limit {limit}");
}

#[test]
fn jobs_list_shows_each_schedule_with_its_next_and_last_run() {
    let mut project = Project::new();
    project.set_env("WORKERS__SCHEDULES__METRICS__ENABLED", "false");
    project.set_env(
        "WORKERS__SCHEDULES__PURGE_STAGED_DATASETS__TIMEZONE",
        "Europe/Berlin",
    );
    project.run_ok(&["jobs", "run", "watch"]);
    let out = project.run_ok(&["jobs", "list", "--format", "json"]);
    let jobs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = jobs.iter().map(|j| j["job"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "watch",
            "purge_staged_datasets",
            "purge_stale_workflows",
            "reconcile",
            "metrics",
            "manage_upload_workflows",
            "purge_stale_uploaded",
            "populate_bundles",
            "fixity"
        ]
    );
    assert_eq!(jobs[0]["schedule"], "every 10s");
    assert_eq!(jobs[0]["last_run"]["outcome"], "success");
    assert_eq!(jobs[0]["last_run"]["trigger"], "manual");
    let purge_next: chrono::DateTime<chrono::FixedOffset> =
        jobs[1]["next_run"].as_str().unwrap().parse().unwrap();
    let berlin = purge_next.with_timezone(&"Europe/Berlin".parse::<chrono_tz::Tz>().unwrap());
    assert_eq!(berlin.format("%H:%M:%S").to_string(), "07:00:00");
    assert_eq!(jobs[4]["enabled"], false);
    assert!(jobs[4]["next_run"].is_null());
    assert_eq!(jobs[5]["schedule"], "every 1m");
    assert_eq!(jobs[5]["enabled"], true);
    // Off unless a site needs it.
    assert_eq!(jobs[7]["enabled"], false);
    assert_eq!(jobs[8]["schedule"], "cron 0 0 2 * * *");
    assert_eq!(jobs[8]["enabled"], true);
}

#[test]
fn invalid_schedules_are_configuration_errors() {
    let mut project = Project::new();
    project.set_env("WORKERS__SCHEDULES__WATCH__EVERY", "often");
    project.set_env("WORKERS__SCHEDULES__METRICS__CRON", "0 0 21 * *");
    project.set_env(
        "WORKERS__SCHEDULES__RECONCILE__TIMEZONE",
        "Mars/Olympus_Mons",
    );
    // A schedule for a job that does not exist.
    std::fs::write(
        project.path("config/production.toml"),
        "[schedules.nightly_backup]\ncron = \"0 0 1 * * *\"\nevery = \"\"\ntimezone = \"UTC\"\n\
         enabled = true\noverlap = \"skip\"\nmisfire = \"skip\"\njitter = \"0s\"\n",
    )
    .unwrap();
    project.set_env("APP_ENV", "production");
    let out = project.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = stderr(&out);
    for expected in [
        "schedules.watch.every: `often` is not a duration",
        "schedules.metrics.cron: `0 0 21 * *` has 5 fields",
        "schedules.reconcile.timezone: `Mars/Olympus_Mons` is not an IANA time zone",
        "production.toml:1:12: schedules.nightly_backup: unknown job `nightly_backup`",
    ] {
        assert!(err.contains(expected), "{expected:?} not in:\n{err}");
    }
}

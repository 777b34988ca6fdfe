//! `workers jobs run|list|history`.

use std::process::ExitCode;
use std::sync::Arc;

use chrono::Utc;
use serde_json::{Value, json};

use super::{Failed, wait_for};
use crate::app::App;
use crate::cli::{JobsCommand, OutputFormat};
use crate::jobs::watch::{ScanKind, WatchReport};
use crate::jobs::{self, JobName, JobOptions, JobReport};
use crate::store::{JobRun, RunOutcome, Trigger};
use crate::ui::Display;

pub(super) async fn run(
    app: &Arc<App>,
    cmd: JobsCommand,
    display: Display,
) -> anyhow::Result<ExitCode> {
    match cmd {
        JobsCommand::Run {
            job: JobName::ManageUploadWorkflows,
            wait: true,
            dry_run: false,
            ..
        } => run_uploads_to_the_end(app, display).await,
        JobsCommand::Run {
            job,
            wait,
            full,
            dry_run,
        } => {
            let execution = jobs::execute(
                Arc::clone(app),
                job,
                Trigger::Manual,
                None,
                JobOptions {
                    dry_run,
                    full,
                    ..JobOptions::default()
                },
            )
            .await?;
            if let Some(report) = &execution.report {
                print_report(report, dry_run);
                if wait && !dry_run {
                    wait_for(app, &report.started_workflows(), display).await?;
                }
            }
            match execution.outcome {
                RunOutcome::Failed(reason) => Err(Failed(format!("{job} failed: {reason}")).into()),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        JobsCommand::List { format } => {
            let mut rows = Vec::new();
            for jobs::JobOverview {
                job,
                schedule,
                next_run: next,
                last_run: last,
            } in jobs::overview(app, Utc::now()).await?
            {
                rows.push(json!({
                    "job": job.name(),
                    "schedule": schedule.map(|s| s.text.clone()),
                    "timezone": schedule.map(|s| s.timezone.name()),
                    "enabled": schedule.is_some_and(|s| s.enabled),
                    "next_run": next.map(|t| t.to_rfc3339()),
                    "last_run": last.as_ref().map(run_json),
                }));
            }
            match format {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                OutputFormat::Table => {
                    let mut table = super::table([
                        "job",
                        "schedule",
                        "time zone",
                        "next run",
                        "last run",
                        "outcome",
                    ]);
                    for row in &rows {
                        let text = |v: &Value| v.as_str().unwrap_or("-").to_owned();
                        let next = if row["enabled"] == true {
                            text(&row["next_run"])
                        } else {
                            "disabled".to_owned()
                        };
                        table.add_row([
                            text(&row["job"]),
                            text(&row["schedule"]),
                            text(&row["timezone"]),
                            next,
                            text(&row["last_run"]["started_at"]),
                            text(&row["last_run"]["outcome"]),
                        ]);
                    }
                    println!("{table}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::History { job, limit, format } => {
            let runs = app.scheduler_store.runs(Some(job.name()), limit).await?;
            match format {
                OutputFormat::Json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(
                            &runs.iter().map(run_json).collect::<Vec<_>>()
                        )?
                    )
                }
                OutputFormat::Table => {
                    let mut table = super::table([
                        "run", "trigger", "slot", "started", "ended", "outcome", "error",
                        "counters",
                    ]);
                    for run in &runs {
                        let time = |t: Option<chrono::DateTime<Utc>>| {
                            t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                                .unwrap_or_default()
                        };
                        let error = run.outcome.reason().unwrap_or_default().to_owned();
                        table.add_row([
                            run.id.to_string(),
                            format!(
                                "{}{}",
                                run.trigger,
                                if run.dry_run { " (dry run)" } else { "" }
                            ),
                            time(run.slot),
                            time(Some(run.started_at)),
                            time(run.ended_at),
                            run.outcome.as_str().to_owned(),
                            error,
                            Value::Object(run.counters.clone()).to_string(),
                        ]);
                    }
                    println!("{table}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `jobs run manage_upload_workflows --wait`: runs the job, lets the workers run what it
/// queued (verifications), and runs it again while that moves uploads on (VERIFIED uploads
/// start their ingestion), then waits for the ingestion workflows.
async fn run_uploads_to_the_end(app: &Arc<App>, display: Display) -> anyhow::Result<ExitCode> {
    let mut started = Vec::new();
    let mut rounds = 0;
    loop {
        let execution = jobs::execute(
            Arc::clone(app),
            JobName::ManageUploadWorkflows,
            Trigger::Manual,
            None,
            JobOptions::default(),
        )
        .await?;
        if let RunOutcome::Failed(reason) = execution.outcome {
            return Err(Failed(format!("manage_upload_workflows failed: {reason}")).into());
        }
        let Some(JobReport::ManageUploads(report)) = execution.report else {
            break;
        };
        if rounds == 0 || !report.actions.is_empty() {
            print_report(&JobReport::ManageUploads(report.clone()), false);
        }
        rounds += 1;
        started.extend(report.started.iter().cloned());
        if report.actions.is_empty() {
            if report.in_flight == 0 {
                break;
            }
            // A verification waits for its retry: give it its time, then run it.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        super::run_until_idle(app, display.clone()).await?;
    }
    wait_for(app, &started, display).await
}

fn run_json(run: &JobRun) -> Value {
    let error = run.outcome.reason();
    json!({
        "id": run.id,
        "job": run.job,
        "trigger": run.trigger,
        "slot": run.slot.map(|t| t.to_rfc3339()),
        "started_at": run.started_at.to_rfc3339(),
        "ended_at": run.ended_at.map(|t| t.to_rfc3339()),
        "outcome": run.outcome.as_str(),
        "error": error,
        "counters": run.counters,
        "host": run.host,
        "dry_run": run.dry_run,
    })
}

fn print_report(report: &JobReport, dry_run: bool) {
    let verb = if dry_run { "would purge" } else { "purged" };
    match report {
        JobReport::Watch(r) => print_watch_report(r, dry_run),
        JobReport::PurgeStaged(r) => {
            for (id, name) in &r.purged {
                say!("{verb} the staged copy of dataset {id} (`{name}`)");
            }
            for (id, reason) in &r.failed {
                say!("could not purge dataset {id}: {reason}");
            }
            if r.deferred > 0 {
                say!(
                    "{} more are due and left for the next run (stage.purge.max_purges)",
                    r.deferred
                );
            }
            for (fs, used) in &r.over_watermark {
                say!("`{fs}` is {used:.1}% full, above stage.purge.high_watermark_percent");
            }
            for (id, name) in &r.purged_by_fill {
                say!("purged the staged copy of dataset {id} (`{name}`) to make room");
            }
            say!("{} staged dataset(s) {verb}", r.purged.len());
        }
        JobReport::PurgeWorkflows(r) => {
            for id in &r.purged {
                say!(
                    "{} workflow {id}",
                    if dry_run { "would delete" } else { "deleted" }
                );
            }
            say!(
                "{} stale workflow(s) {}",
                r.purged.len(),
                if dry_run {
                    "would be deleted"
                } else {
                    "deleted"
                }
            );
        }
        JobReport::Reconcile(r) => {
            for d in &r.started {
                match &d.workflow_id {
                    Some(w) => say!(
                        "dataset {} (`{}`) had no workflow: started {w}",
                        d.id,
                        d.name
                    ),
                    None if dry_run => say!("dataset {} (`{}`) has no workflow", d.id, d.name),
                    None => say!(
                        "dataset {} (`{}`) has no workflow and none could be started",
                        d.id,
                        d.name
                    ),
                }
            }
            for id in &r.repaired {
                say!("workflow {id} had no step in flight: published it again");
            }
            say!(
                "{} dataset(s) without a workflow, {} stalled workflow(s) repaired",
                r.started.len(),
                r.repaired.len()
            );
        }
        JobReport::PopulateBundles(r) => {
            let mut table = super::table(["dataset", "archive path", "size", "md5", "result"]);
            let verb = if dry_run { "would record" } else { "recorded" };
            for (item, result) in r
                .recorded
                .iter()
                .map(|i| (i, verb.to_owned()))
                .chain(r.skipped.iter().map(|i| {
                    (
                        i,
                        format!("skipped: {}", i.reason.as_deref().unwrap_or_default()),
                    )
                }))
                .chain(r.failed.iter().map(|i| {
                    (
                        i,
                        format!("failed: {}", i.reason.as_deref().unwrap_or_default()),
                    )
                }))
            {
                let bundle = item.bundle.as_ref();
                table.add_row([
                    format!("{} `{}`", item.id, item.name),
                    item.archive_path.clone(),
                    bundle.map(|b| b.size.to_string()).unwrap_or_default(),
                    bundle.map(|b| b.md5.to_string()).unwrap_or_default(),
                    result,
                ]);
            }
            println!("{table}");
        }
        JobReport::Fixity(r) => {
            let mut table = super::table(["dataset", "read", "result"]);
            for item in &r.checked {
                let result = if dry_run {
                    "would check".to_owned()
                } else {
                    item.results
                        .iter()
                        .map(|(copy, result)| format!("{copy}: {}", result.as_str()))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                table.add_row([
                    format!("{} `{}`", item.id, item.name),
                    indicatif::HumanBytes(item.bytes).to_string(),
                    result,
                ]);
            }
            println!("{table}");
            if r.deferred > 0 {
                say!(
                    "{} more dataset(s) left for the next run (fixity.bytes_per_run)",
                    r.deferred
                );
            }
            if r.failing > 0 {
                say!(
                    "{} dataset(s) with a copy that differs from its record",
                    r.failing
                );
            }
            if r.overdue > 0 {
                say!(
                    "{} dataset(s) not verified within fixity.period_days",
                    r.overdue
                );
            }
        }
        JobReport::Metrics(r) => {
            let mut table = super::table(["measurement", "subject", "usage", "limit", "paths"]);
            for m in &r.metrics {
                table.add_row([
                    m.measurement.clone(),
                    m.subject.clone(),
                    m.usage.to_string(),
                    m.limit.to_string(),
                    m.tags.join(", "),
                ]);
            }
            println!("{table}");
            for missing in &r.missing {
                say!("not measured (does not exist): {missing}");
            }
        }
        JobReport::ManageUploads(r) => {
            for action in &r.actions {
                say!("{}{action}", if dry_run { "would act: " } else { "" });
            }
            print_counters(&r.counters());
        }
        JobReport::PurgeUploads(r) => {
            for path in &r.removed {
                say!(
                    "{} {}",
                    if dry_run { "would remove" } else { "removed" },
                    crate::ui::escape_controls(&path.display().to_string())
                );
            }
            print_counters(&r.counters());
        }
    }
}

/// A job's counters as one table row.
fn print_counters(counters: &serde_json::Map<String, Value>) {
    let mut table = super::table(["counter", "value"]);
    for (name, value) in counters {
        table.add_row([name.clone(), value.to_string()]);
    }
    println!("{table}");
}

fn print_watch_report(report: &WatchReport, dry_run: bool) {
    let action = if dry_run {
        "would register"
    } else {
        "registered"
    };
    let mut table = super::table([
        "type",
        "source directory",
        "scan",
        "directories",
        action,
        "already registered",
        "conflicts",
        "rejected",
        "failed",
    ]);
    for source in &report.sources {
        let (scan, seen) = if source.missing {
            ("missing".to_owned(), "-".to_owned())
        } else {
            let scan = match source.scan {
                ScanKind::Full => "full",
                ScanKind::Incremental => "incremental",
            };
            (scan.to_owned(), source.seen.to_string())
        };
        let new = if dry_run {
            source.would_register.len()
        } else {
            source.registered.len()
        };
        table.add_row([
            source.dataset_type.to_string(),
            source.source_dir.display().to_string(),
            scan,
            seen,
            new.to_string(),
            source.already_registered.to_string(),
            source.conflicts.len().to_string(),
            source.rejected.len().to_string(),
            source.failed.len().to_string(),
        ]);
    }
    println!("{table}");
    for source in &report.sources {
        for name in &source.would_register {
            say!("would register {} `{name}`", source.dataset_type);
        }
        for name in &source.held_back {
            say!("held back `{name}`: smaller than registration.minimum_dataset_size");
        }
        for (dir, reason) in &source.rejected {
            say!("rejected `{dir}`: {reason}");
        }
        for (dir, other) in &source.conflicts {
            say!(
                "not registered `{dir}`: its name normalizes to that of the dataset registered from `{other}`; rename one of them"
            );
        }
        for (name, reason) in &source.failed {
            say!("failed `{name}`: {reason}");
        }
    }
    for repaired in &report.repaired {
        say!(
            "started the missing workflow of dataset {} (`{}`)",
            repaired.id,
            repaired.name
        );
    }
}

//! `workers status`: the whole deployment at a glance (the scheduler and its jobs, the workers
//! that answer, workflows, the queue, datasets by state, file systems, fixity), and an exit
//! code monitoring can use: 0 healthy, 1 when something needs attention.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use indicatif::HumanBytes;
use serde_json::{Map, Value, json};

use super::EXIT_FAILED;
use crate::app::App;
use crate::cli::OutputFormat;
use crate::config::ArchiveKind;
use crate::control::Request;
use crate::control::mailbox::Collect;
use crate::model::DatasetType;
use crate::progress::human_seconds;
use crate::registry::DatasetQuery;
use crate::steps::capacity::file_systems_of;
use crate::store::{RunOutcome, TaskStatus, WorkflowFilter};
use crate::workflow::engine;

/// How long workers have to answer.
const WORKERS_ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// Active workflows counted at most.
const ACTIVE_WORKFLOWS: usize = 100_000;

/// Workflows looked at for failures of the last day, newest first.
const RECENT_WORKFLOWS: usize = 1_000;

pub(super) async fn run(app: &App, format: OutputFormat) -> anyhow::Result<ExitCode> {
    let now = Utc::now();
    let mut problems: Vec<String> = Vec::new();

    let scheduler = scheduler(app, now, &mut problems).await?;
    let workers = workers(app).await;
    let workflows = workflows(app, now, &mut problems).await?;
    let queue = match app.broker.queued().await {
        Ok(Some(depth)) => json!({
            "waiting": depth.waiting,
            "oldest": depth.oldest.map(|t| t.to_rfc3339()),
        }),
        Ok(None) => Value::Null,
        Err(err) => json!({"error": format!("{err:#}")}),
    };
    let datasets = datasets_by_state(app).await?;
    let file_systems = file_systems(app, &mut problems).await?;
    let failing = app
        .store
        .fixity_standings()
        .await?
        .values()
        .filter(|s| s.failing)
        .count();
    if failing > 0 {
        problems.push(format!(
            "{failing} dataset(s) have a copy that differs from their record (fixity); see `workers datasets show`"
        ));
    }

    let report = json!({
        "healthy": problems.is_empty(),
        "problems": problems,
        "scheduler": scheduler,
        "workers": workers,
        "workflows": workflows,
        "queue": queue,
        "datasets": datasets,
        "file_systems": file_systems,
        "fixity": {"failing": failing},
    });
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Table => print_report(&report, now),
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// The lease holder, and each job's schedule, next run and last run.
async fn scheduler(
    app: &App,
    now: DateTime<Utc>,
    problems: &mut Vec<String>,
) -> anyhow::Result<Value> {
    let lease = app
        .scheduler_store
        .lease(crate::scheduler::runtime::LEASE_NAME)
        .await?;
    let any_enabled = app.settings.schedules.iter().any(|(_, s)| s.enabled);
    if lease.is_none() && any_enabled {
        problems.push(
            "no scheduler holds the lease: jobs do not run (is `workers scheduler` running?)"
                .to_owned(),
        );
    }
    let mut jobs = Vec::new();
    for crate::jobs::JobOverview {
        job,
        schedule,
        next_run: next,
        last_run: last,
    } in crate::jobs::overview(app, now).await?
    {
        let enabled = schedule.is_some_and(|s| s.enabled);
        if let Some(run) = &last
            && let RunOutcome::Failed(reason) = &run.outcome
        {
            problems.push(format!(
                "the last run of `{job}` failed {} ago: {reason}",
                human_seconds((now - run.started_at).num_seconds() as f64)
            ));
        }
        jobs.push(json!({
            "job": job.name(),
            "enabled": enabled,
            "next_run": next.map(|t| t.to_rfc3339()),
            "last_run": last.map(|run| json!({
                "outcome": run.outcome.as_str(),
                "started_at": run.started_at.to_rfc3339(),
                "ended_at": run.ended_at.map(|t| t.to_rfc3339()),
                "seconds_ago": (now - run.started_at).num_seconds(),
                "error": run.outcome.reason(),
            })),
        }));
    }
    Ok(json!({
        "lease_holder": lease.as_ref().map(|l| l.holder.clone()),
        "lease_since": lease.as_ref().and_then(|l| l.since).map(|t| t.to_rfc3339()),
        "lease_seconds_held": lease.as_ref().and_then(|l| l.since).map(|t| (now - t).num_seconds()),
        "lease_until": lease.as_ref().map(|l| l.expires_at.to_rfc3339()),
        "jobs": jobs,
    }))
}

/// The workers that answer within a second, Rust and Python alike: node name, steps running
/// (`active`), slots and uptime (`stats`), asked at once.
async fn workers(app: &App) -> Value {
    let ask = |method: &str| {
        let collect = Collect {
            timeout: WORKERS_ANSWER_WITHIN,
            limit: None,
        };
        app.mailbox
            .broadcast(Request::new(method, Map::new()), Some(collect))
    };
    let (active, stats) = tokio::join!(ask("active"), ask("stats"));
    let active = match active {
        Ok(replies) => replies,
        Err(err) => return json!({"error": format!("{err:#}")}),
    };
    let stats: BTreeMap<String, Value> = stats.unwrap_or_default().into_iter().collect();
    let mut nodes: Vec<Value> = active
        .iter()
        .map(|(node, reply)| {
            let stat = stats.get(node);
            json!({
                "node": node,
                "busy": reply.as_array().map_or(0, Vec::len),
                "slots": stat.and_then(|s| s["pool"]["max-concurrency"].as_u64()),
                "uptime_seconds": stat.and_then(|s| s["uptime"].as_u64()),
            })
        })
        .collect();
    nodes.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
    Value::Array(nodes)
}

/// Active workflows (and the oldest with its step), and those that failed in the last day.
async fn workflows(
    app: &App,
    now: DateTime<Utc>,
    problems: &mut Vec<String>,
) -> anyhow::Result<Value> {
    let active = app
        .store
        .workflows(WorkflowFilter::Active, ACTIVE_WORKFLOWS)
        .await?;
    let oldest = match active.iter().min_by_key(|w| w.created_at) {
        Some(workflow) => {
            let view = engine::view(app, workflow.clone()).await?;
            let step = view
                .workflow
                .steps
                .get(view.derived.steps_done)
                .map(|s| s.spec.name.clone());
            json!({
                "id": workflow.id,
                "name": workflow.name,
                "step": step,
                "created_at": workflow.created_at.to_rfc3339(),
                "seconds_old": (now - workflow.created_at).num_seconds(),
            })
        }
        None => Value::Null,
    };
    let day_ago = now - chrono::Duration::hours(24);
    let mut failed = Vec::new();
    for workflow in app
        .store
        .workflows(WorkflowFilter::All, RECENT_WORKFLOWS)
        .await?
    {
        if workflow.updated_at.unwrap_or(workflow.created_at) < day_ago {
            continue;
        }
        if app.store.workflow_status(&workflow.id).await? == Some(TaskStatus::Failure) {
            failed.push(workflow.id);
        }
    }
    if !failed.is_empty() {
        problems.push(format!(
            "{} workflow(s) failed in the last 24 h: {} (`workers workflows show ID`)",
            failed.len(),
            failed.join(", ")
        ));
    }
    Ok(json!({
        "active": active.len(),
        "oldest_active": oldest,
        "failed_last_24h": failed,
    }))
}

/// Datasets (not deleted) by their latest state.
async fn datasets_by_state(app: &App) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    for dataset in app.registry.find(&DatasetQuery::default()).await? {
        let state = dataset.latest_state().unwrap_or("(none)").to_owned();
        *counts.entry(state).or_insert(0) += 1;
    }
    Ok(counts)
}

/// The file systems of the staging and bundle directories (and of a local archive): size,
/// free, headroom, reserved, and whether a staging one is over its high watermark.
async fn file_systems(app: &App, problems: &mut Vec<String>) -> anyhow::Result<Vec<Value>> {
    let settings = &app.settings;
    let mut dirs: Vec<(String, PathBuf)> = Vec::new();
    let mut staging_keys = Vec::new();
    for dataset_type in DatasetType::ALL {
        let paths = settings.paths.for_type(dataset_type);
        let key = |name: &str| format!("paths.{}.{name}", dataset_type.as_str());
        staging_keys.push(key("stage"));
        dirs.push((key("stage"), paths.stage.clone()));
        dirs.push((key("bundle.stage"), paths.bundle_stage.clone()));
        dirs.push((key("bundle.generate"), paths.bundle_generate.clone()));
        if settings.backends.archive == ArchiveKind::Local {
            let root = paths.archive.split("{year}").next().unwrap_or_default();
            dirs.push((key("archive"), PathBuf::from(root)));
        }
    }
    let (found, unreadable) = crate::compute::blocking(move || file_systems_of(dirs)).await;
    let headroom = settings.capacity.headroom;
    let mut out: Vec<Value> = unreadable
        .into_iter()
        .map(|(key, err)| json!({"paths": [key], "error": format!("{err:#}")}))
        .collect();
    for (space, keys) in found {
        let staging = keys.iter().any(|k| staging_keys.contains(k));
        let mount = space.mount.display().to_string();
        let reserved: u64 = app
            .space
            .space_reservations(&mount)
            .await?
            .iter()
            .map(|r| r.bytes)
            .sum();
        let used = space.used_percent();
        let over = staging
            && settings
                .stage
                .watermarks
                .is_some_and(|(high, _)| used > f64::from(high));
        if over {
            problems.push(format!(
                "`{mount}` is {used:.1}% full, above stage.purge.high_watermark_percent"
            ));
        }
        out.push(json!({
            "mount": mount,
            "paths": keys,
            "total": space.total,
            "free": space.free,
            "used_percent": (used * 10.0).round() / 10.0,
            "headroom": headroom,
            "reserved": reserved,
            "over_watermark": over,
        }));
    }
    Ok(out)
}

fn print_report(report: &Value, now: DateTime<Utc>) {
    let text = |v: &Value| v.as_str().map_or_else(|| "-".to_owned(), str::to_owned);
    let ago = |v: &Value| {
        v.as_i64().map_or_else(
            || "-".to_owned(),
            |s| format!("{} ago", human_seconds(s as f64)),
        )
    };
    let _ = now;
    if report["healthy"] == true {
        say!("healthy");
    } else {
        say!("needs attention:");
        for problem in report["problems"].as_array().into_iter().flatten() {
            say!("  ✘ {}", text(problem));
        }
    }

    let scheduler = &report["scheduler"];
    say!("");
    match scheduler["lease_holder"].as_str() {
        Some(holder) => say!(
            "scheduler: {holder} holds the lease{} (until {})",
            scheduler["lease_seconds_held"]
                .as_i64()
                .map(|s| format!(", taken {}", ago(&json!(s))))
                .unwrap_or_default(),
            text(&scheduler["lease_until"])
        ),
        None => say!("scheduler: nobody holds the lease"),
    }
    let mut table = super::table(["job", "next run", "last run", "outcome"]);
    for job in scheduler["jobs"].as_array().into_iter().flatten() {
        let last = &job["last_run"];
        table.add_row([
            text(&job["job"]),
            if job["enabled"] == true {
                text(&job["next_run"])
            } else {
                "disabled".to_owned()
            },
            ago(&last["seconds_ago"]),
            match (last["outcome"].as_str(), last["error"].as_str()) {
                (Some(outcome), Some(error)) => format!("{outcome}: {error}"),
                (Some(outcome), None) => outcome.to_owned(),
                _ => "-".to_owned(),
            },
        ]);
    }
    println!("{table}");

    say!("");
    match &report["workers"] {
        Value::Array(nodes) if nodes.is_empty() => say!(
            "workers: none answered within {} s",
            WORKERS_ANSWER_WITHIN.as_secs()
        ),
        Value::Array(nodes) => {
            let listed: Vec<String> = nodes
                .iter()
                .map(|n| match n["slots"].as_u64() {
                    Some(slots) => format!(
                        "{} ({} of {slots} slots busy, up {})",
                        text(&n["node"]),
                        n["busy"],
                        human_seconds(n["uptime_seconds"].as_f64().unwrap_or_default())
                    ),
                    None => format!("{} ({} busy)", text(&n["node"]), n["busy"]),
                })
                .collect();
            say!("workers: {}", listed.join(", "));
        }
        other => say!("workers: cannot ask them: {}", text(&other["error"])),
    }

    let workflows = &report["workflows"];
    let failed = workflows["failed_last_24h"].as_array().map_or(0, Vec::len);
    say!(
        "workflows: {} active, {failed} failed in the last 24 h",
        workflows["active"]
    );
    let oldest = &workflows["oldest_active"];
    if !oldest.is_null() {
        say!(
            "  oldest active: {} ({}), at `{}`, started {}",
            text(&oldest["id"]),
            text(&oldest["name"]),
            text(&oldest["step"]),
            ago(&oldest["seconds_old"])
        );
    }
    match &report["queue"] {
        Value::Null => say!("queue: the broker cannot say"),
        queue if queue.get("error").is_some() => {
            say!("queue: cannot ask the broker: {}", text(&queue["error"]))
        }
        queue => say!(
            "queue: {} waiting{}",
            queue["waiting"],
            queue["oldest"]
                .as_str()
                .map(|t| format!(", the oldest published {t}"))
                .unwrap_or_default()
        ),
    }
    let states: Vec<String> = report["datasets"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(state, n)| format!("{state} {n}"))
        .collect();
    say!(
        "datasets: {}",
        if states.is_empty() {
            "none".to_owned()
        } else {
            states.join(", ")
        }
    );
    say!("fixity: {} failing", report["fixity"]["failing"]);

    say!("");
    let mut table = super::table([
        "file system",
        "used",
        "free",
        "reserved",
        "headroom",
        "paths",
    ]);
    for fs in report["file_systems"].as_array().into_iter().flatten() {
        let bytes = |v: &Value| {
            v.as_u64()
                .map_or_else(|| "-".to_owned(), |b| HumanBytes(b).to_string())
        };
        let paths: Vec<String> = fs["paths"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        if let Some(error) = fs["error"].as_str() {
            table.add_row([
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                format!("{}: {error}", paths.join(", ")),
            ]);
            continue;
        }
        table.add_row([
            text(&fs["mount"]),
            format!(
                "{}%{}",
                fs["used_percent"],
                if fs["over_watermark"] == true {
                    " ✘"
                } else {
                    ""
                }
            ),
            bytes(&fs["free"]),
            bytes(&fs["reserved"]),
            bytes(&fs["headroom"]),
            paths.join(", "),
        ]);
    }
    println!("{table}");
}

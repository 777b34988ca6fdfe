//! `workers workflows list|show|resume|start`.

use std::process::ExitCode;
use std::sync::Arc;

use serde_json::{Value, json};

use super::{Usage, find_dataset, wait_for};
use crate::app::App;
use crate::cli::{OutputFormat, WorkflowsCommand};
use crate::registry::DatasetQuery;
use crate::store::{TaskStatus, WorkflowFilter};
use crate::ui::Display;
use crate::workflow::engine::{self, Resumed, WorkflowView};

pub(super) async fn run(
    app: &Arc<App>,
    cmd: WorkflowsCommand,
    display: Display,
) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkflowsCommand::List {
            active,
            limit,
            format,
        } => {
            let filter = if active {
                WorkflowFilter::Active
            } else {
                WorkflowFilter::All
            };
            let mut views = Vec::new();
            for workflow in app.store.workflows(filter, limit).await? {
                views.push(engine::view(app, workflow).await?);
            }
            match format {
                OutputFormat::Json => {
                    let mut items = Vec::new();
                    for view in &views {
                        items.push(to_json(app, view).await?);
                    }
                    println!("{}", serde_json::to_string_pretty(&items)?);
                }
                OutputFormat::Table => {
                    let mut table = super::table([
                        "id",
                        "workflow",
                        "dataset",
                        "status",
                        "steps done",
                        "created",
                    ]);
                    for view in &views {
                        let dataset = dataset_label(app, &view.workflow.id).await?;
                        table.add_row([
                            view.workflow.id.clone(),
                            view.workflow.name.clone(),
                            dataset,
                            view.derived.status.to_string(),
                            format!("{}/{}", view.derived.steps_done, view.workflow.steps.len()),
                            view.workflow
                                .created_at
                                .format("%Y-%m-%d %H:%M:%S")
                                .to_string(),
                        ]);
                    }
                    println!("{table}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkflowsCommand::Show { id, format } => {
            let view = load(app, &id).await?;
            match format {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&to_json(app, &view).await?)?
                ),
                OutputFormat::Table => print_view(app, &view).await?,
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkflowsCommand::Resume { id, from, wait } => {
            load(app, &id).await?;
            match engine::resume_from(app, &id, from.as_deref()).await? {
                Resumed::Restarted { step, task_id } => {
                    say!("resumed workflow {id} at step `{step}` (task {task_id})");
                    if wait {
                        return wait_for(app, &[id], display).await;
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Resumed::NotFailed(status) => Err(Usage(format!(
                    "workflow {id} is {status}; only a failed workflow can be resumed"
                ))
                .into()),
                Resumed::AlreadyResuming => {
                    Err(Usage(format!("workflow {id} is being resumed already")).into())
                }
                Resumed::NoSuchStep(step) => Err(Usage(format!(
                    "workflow {id} has no step `{step}` before or at its failed step"
                ))
                .into()),
            }
        }
        WorkflowsCommand::Start {
            name,
            dataset,
            dataset_type,
            wait,
        } => {
            if app.definitions.get(&name).is_none() {
                let known = app.definitions.names().collect::<Vec<_>>().join(", ");
                return Err(
                    Usage(format!("no workflow is named `{name}` (known: {known})")).into(),
                );
            }
            let dataset = find_dataset(app, &dataset, dataset_type).await?;
            let id = engine::start(app, &name, dataset.id, serde_json::Map::new()).await?;
            say!(
                "started workflow {id} ({name}) for dataset {} (`{}`)",
                dataset.id,
                dataset.name
            );
            if wait {
                return wait_for(app, &[id], display).await;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn load(app: &App, id: &str) -> anyhow::Result<WorkflowView> {
    let workflow = app
        .store
        .workflow(id)
        .await?
        .ok_or_else(|| Usage(format!("no workflow has the id `{id}`")))?;
    engine::view(app, workflow).await
}

async fn dataset_label(app: &App, workflow_id: &str) -> anyhow::Result<String> {
    let query = DatasetQuery {
        workflow_id: Some(workflow_id.to_owned()),
        include_deleted: true,
        ..Default::default()
    };
    Ok(app
        .registry
        .find(&query)
        .await?
        .first()
        .map(|d| format!("{} {}", d.id, d.name))
        .unwrap_or_default())
}

/// Attempts of a step so far: every start of each of its tasks (a retry, a run again after a
/// worker died); for a task whose starts were not counted (run by a Python worker), its retry
/// count plus one.
fn attempts(view: &WorkflowView, idx: usize) -> u32 {
    view.workflow.steps[idx]
        .runs
        .iter()
        .filter_map(|run| view.metas.get(&run.task_id))
        .map(|meta| meta.starts.max(meta.retries + 1))
        .sum()
}

fn step_detail(view: &WorkflowView, idx: usize) -> (Option<Value>, Option<Value>) {
    let Some(run) = view.workflow.steps[idx].last_run() else {
        return (None, None);
    };
    let Some(meta) = view.metas.get(&run.task_id) else {
        return (None, None);
    };
    match meta.status {
        TaskStatus::Started if meta.result.get("pid").is_none() => {
            (Some(meta.result.clone()), None)
        }
        TaskStatus::Retry | TaskStatus::Failure | TaskStatus::Revoked => {
            (None, Some(meta.result.clone()))
        }
        TaskStatus::Success => (None, None),
        _ => (None, None),
    }
}

fn describe_error(error: &Value) -> String {
    let message = match &error["exc_message"] {
        Value::Array(parts) => parts
            .iter()
            .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.as_str().unwrap_or_default().to_owned(),
    };
    format!(
        "{}: {message}",
        error["exc_type"].as_str().unwrap_or("error")
    )
}

async fn print_view(app: &App, view: &WorkflowView) -> anyhow::Result<()> {
    let workflow = &view.workflow;
    say!("workflow {} ({})", workflow.id, workflow.name);
    say!(
        "  status:  {} ({}/{} steps done)",
        view.derived.status,
        view.derived.steps_done,
        workflow.steps.len()
    );
    say!("  dataset: {}", dataset_label(app, &workflow.id).await?);
    say!("  created: {}", workflow.created_at.to_rfc3339());
    if let Some(updated) = workflow.updated_at {
        say!("  updated: {}", updated.to_rfc3339());
    }
    let mut table = super::table([
        "#",
        "step",
        "task",
        "status",
        "attempts",
        "progress",
        "last error",
    ]);
    for (idx, step) in workflow.steps.iter().enumerate() {
        let (progress, error) = step_detail(view, idx);
        table.add_row([
            (idx + 1).to_string(),
            step.spec.name.clone(),
            step.spec.task.clone(),
            view.derived.steps[idx].to_string(),
            attempts(view, idx).to_string(),
            progress
                .as_ref()
                .map(crate::progress::describe)
                .unwrap_or_default(),
            error.as_ref().map(describe_error).unwrap_or_default(),
        ]);
    }
    println!("{table}");
    Ok(())
}

/// The workflow as JSON, shaped like rhythm_api's embellished workflow (spec F.4).
async fn to_json(app: &App, view: &WorkflowView) -> anyhow::Result<Value> {
    let workflow = &view.workflow;
    let query = DatasetQuery {
        workflow_id: Some(workflow.id.clone()),
        include_deleted: true,
        ..Default::default()
    };
    let dataset_id = app.registry.find(&query).await?.first().map(|d| d.id);
    let steps: Vec<Value> = workflow
        .steps
        .iter()
        .enumerate()
        .map(|(idx, step)| {
            let (progress, error) = step_detail(view, idx);
            let last = step
                .last_run()
                .and_then(|run| view.metas.get(&run.task_id).map(|m| (run, m)));
            json!({
                "name": step.spec.name,
                "task": step.spec.task,
                "status": view.derived.steps[idx].as_str(),
                "attempts": attempts(view, idx),
                "task_id": step.last_run().map(|r| r.task_id.clone()),
                "date_start": last.map(|(run, _)| run.date_start.to_rfc3339()),
                "date_done": last.and_then(|(_, m)| m.date_done.map(|d| d.to_rfc3339())),
                "progress": progress,
                "error": error,
            })
        })
        .collect();
    Ok(json!({
        "id": workflow.id,
        "name": workflow.name,
        "app_id": workflow.app_id,
        "description": workflow.description,
        "status": view.derived.status.as_str(),
        "steps_done": view.derived.steps_done,
        "total_steps": workflow.steps.len(),
        "created_at": workflow.created_at.to_rfc3339(),
        "updated_at": workflow.updated_at.map(|t| t.to_rfc3339()),
        "resume_lock": workflow.resume_lock.map(|t| t.to_rfc3339()),
        "dataset_id": dataset_id,
        "steps": steps,
    }))
}

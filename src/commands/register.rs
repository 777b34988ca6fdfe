//! `workers register DIR`.

use std::process::ExitCode;
use std::sync::Arc;

use super::{Failed, wait_for};
use crate::app::App;
use crate::cli::RegisterArgs;
use crate::jobs::register::{self, Outcome, RegisterOptions};
use crate::ui::Display;

pub(super) async fn run(
    app: &Arc<App>,
    args: RegisterArgs,
    display: Display,
) -> anyhow::Result<ExitCode> {
    let opts = RegisterOptions {
        dir: args.dir,
        dataset_type: args.dataset_type,
        ingest_subdirs: args.ingest_subdirs,
        prefix: args.prefix,
        suffix: args.suffix,
        description: args.description,
        project_id: args.project_id,
        dry_run: args.dry_run,
    };
    let report = register::run(app, &opts).await?;
    let mut table = super::table(["directory", "dataset", "result"]);
    for (candidate, outcome) in &report.results {
        let result = match outcome {
            Outcome::Registered {
                id,
                workflow_id: Some(_),
            } => format!("registered as {id}, workflow started"),
            Outcome::Registered {
                id,
                workflow_id: None,
            } => format!("registered as {id}, workflow NOT started"),
            Outcome::WorkflowStarted {
                id,
                workflow_id: Some(_),
            } => format!("already registered as {id}; workflow started"),
            Outcome::WorkflowStarted {
                id,
                workflow_id: None,
            } => {
                format!("already registered as {id}; workflow NOT started")
            }
            Outcome::AlreadyRegistered { id } => format!("already registered as {id}"),
            Outcome::Foreign { id } => {
                format!("already registered as {id}, not on demand by the service user: left alone")
            }
            Outcome::WouldRegister => "would be registered".to_owned(),
            Outcome::Failed(reason) => format!("failed: {reason}"),
        };
        table.add_row([
            candidate.dir.display().to_string(),
            candidate.name.to_string(),
            result,
        ]);
    }
    println!("{table}");
    if let Some(association) = &report.association {
        let project = &association.project;
        match &association.error {
            None if args.dry_run => say!(
                "would associate the datasets with project `{}` ({})",
                project.name,
                project.id
            ),
            None => say!(
                "associated {} datasets with project `{}` ({})",
                association.datasets.len(),
                project.name,
                project.id
            ),
            Some(error) => say!(
                "could not associate the datasets with project `{}` ({}): {error}",
                project.name,
                project.id
            ),
        }
    }
    let failures = report.failures();
    if args.wait && !args.dry_run {
        wait_for(app, &report.started_workflows(), display).await?;
    }
    if failures > 0 {
        return Err(Failed(format!(
            "{failures} directories were not registered or started"
        ))
        .into());
    }
    Ok(ExitCode::SUCCESS)
}

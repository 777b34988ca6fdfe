//! `workers datasets list|show`.

use std::process::ExitCode;

use chrono::SecondsFormat;
use serde_json::{Value, json};

use super::find_dataset;
use crate::app::App;
use crate::cli::{DatasetsCommand, OutputFormat};
use crate::registry::{Dataset, DatasetQuery};
use crate::store::{FixityRecord, FixityResult};

pub(super) async fn run(app: &App, cmd: DatasetsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DatasetsCommand::List {
            dataset_type,
            deleted,
            limit,
            format,
        } => {
            let query = DatasetQuery {
                dataset_type,
                include_deleted: deleted,
                limit: Some(limit),
                ..Default::default()
            };
            let datasets = app.registry.find(&query).await?;
            match format {
                OutputFormat::Json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(
                            &datasets.iter().map(to_json).collect::<Vec<_>>()
                        )?
                    )
                }
                OutputFormat::Table => {
                    let mut table = super::table([
                        "id", "name", "type", "state", "files", "size", "staged", "updated",
                    ]);
                    for d in &datasets {
                        table.add_row([
                            d.id.to_string(),
                            d.name.to_string(),
                            d.dataset_type.to_string(),
                            d.latest_state().unwrap_or_default().to_owned(),
                            d.num_files.map(|n| n.to_string()).unwrap_or_default(),
                            d.size
                                .map(|n| indicatif::HumanBytes(n).to_string())
                                .unwrap_or_default(),
                            if d.is_staged { "yes" } else { "no" }.to_owned(),
                            d.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        ]);
                    }
                    println!("{table}");
                }
            }
        }
        DatasetsCommand::Show {
            dataset,
            dataset_type,
            format,
        } => {
            let dataset = find_dataset(app, &dataset, dataset_type).await?;
            let checks = app.store.fixity_history(dataset.id, FIXITY_SHOWN).await?;
            match format {
                OutputFormat::Json => {
                    let mut shown = to_json(&dataset);
                    shown["fixity_checks"] = checks.iter().map(fixity_json).collect();
                    println!("{}", serde_json::to_string_pretty(&shown)?)
                }
                OutputFormat::Table => {
                    print_dataset(&dataset);
                    print_fixity(&checks);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_dataset(d: &Dataset) {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    let num = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_else(|| "-".to_owned());
    say!("dataset {} `{}` ({})", d.id, d.name, d.dataset_type);
    say!("  origin path:   {}", opt(&d.origin_path));
    say!("  archive path:  {}", opt(&d.archive_path));
    say!("  staged path:   {}", opt(&d.staged_path));
    say!("  staged:        {}", d.is_staged);
    say!("  deleted:       {}", d.is_deleted);
    say!(
        "  created by:    {}",
        d.create_method.map(|m| m.as_str()).unwrap_or("-")
    );
    say!(
        "  files:         {}   directories: {}",
        num(d.num_files),
        num(d.num_directories)
    );
    say!(
        "  size:          {} bytes (du {} bytes)",
        num(d.size),
        num(d.du_size)
    );
    if let Some(bundle) = &d.bundle {
        say!(
            "  bundle:        {} ({} bytes, md5 {})",
            bundle.name,
            bundle.size,
            bundle.md5
        );
    }
    say!("  metadata:      {}", d.metadata);
    say!(
        "  workflows:     {}",
        if d.workflows.is_empty() {
            "-".to_owned()
        } else {
            d.workflows.join(", ")
        }
    );
    say!("  states:");
    for state in &d.states {
        say!("    {}  {}", state.timestamp.to_rfc3339(), state.state);
    }
}

/// Fixity checks shown with a dataset, newest first.
const FIXITY_SHOWN: usize = 20;

fn print_fixity(checks: &[FixityRecord]) {
    if checks.is_empty() {
        say!("  fixity checks: none");
        return;
    }
    say!("  fixity checks (newest first):");
    let mut table = super::table([
        "checked at",
        "copy",
        "result",
        "files",
        "read",
        "by",
        "detail",
    ]);
    for check in checks {
        table.add_row([
            check.checked_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            check.copy.clone(),
            match check.result {
                FixityResult::Differs => format!("differs ({})", check.differences),
                other => other.as_str().to_owned(),
            },
            check.files.to_string(),
            indicatif::HumanBytes(check.bytes_read).to_string(),
            check.by.clone(),
            check.detail.clone(),
        ]);
    }
    println!("{table}");
}

fn fixity_json(check: &FixityRecord) -> Value {
    json!({
        "checked_at": check.checked_at.to_rfc3339(),
        "copy": check.copy,
        "result": check.result.as_str(),
        "files": check.files,
        "bytes_read": check.bytes_read,
        "differences": check.differences,
        "detail": check.detail,
        "by": check.by,
    })
}

/// The dataset as JSON, shaped like the Bioloop API's response (states newest first).
fn to_json(d: &Dataset) -> Value {
    json!({
        "id": d.id,
        "name": d.name.as_str(),
        "type": d.dataset_type.as_str(),
        "origin_path": d.origin_path,
        "archive_path": d.archive_path,
        "staged_path": d.staged_path,
        "description": d.description,
        "du_size": d.du_size,
        "size": d.size,
        "bundle_size": d.bundle_size,
        "num_files": d.num_files,
        "num_directories": d.num_directories,
        "is_deleted": d.is_deleted,
        "is_staged": d.is_staged,
        "metadata": d.metadata,
        "create_method": d.create_method.map(|m| m.as_str()),
        "created_at": d.created_at.to_rfc3339(),
        "updated_at": d.updated_at.to_rfc3339(),
        "states": d.states.iter().rev().map(|s| json!({"state": s.state, "timestamp": s.timestamp.to_rfc3339()})).collect::<Vec<_>>(),
        "bundle": d.bundle.as_ref().map(|b| json!({"name": b.name, "size": b.size, "md5": b.md5.to_string()})),
        "workflows": d.workflows.iter().map(|id| json!({"id": id})).collect::<Vec<_>>(),
    })
}

//! `workers jobs run <job>`.

use std::process::ExitCode;
use std::sync::Arc;

use super::{Failed, wait_for};
use crate::app::App;
use crate::cli::{JobName, JobsCommand};
use crate::jobs::watch::{self, ScanKind, WatchOptions, WatchReport};
use crate::ui::Display;

pub(super) async fn run(
    app: &Arc<App>,
    cmd: JobsCommand,
    display: Display,
) -> anyhow::Result<ExitCode> {
    let JobsCommand::Run {
        job,
        wait,
        full,
        dry_run,
    } = cmd;
    match job {
        JobName::Watch => {
            let report = watch::run(app, WatchOptions { full, dry_run }).await?;
            print_watch_report(&report, dry_run);
            let failed = report.failed();
            if wait && !dry_run {
                wait_for(app, &report.started_workflows(), display).await?;
            }
            if failed > 0 {
                return Err(Failed(format!(
                    "{failed} directories could not be registered; the next run tries again"
                ))
                .into());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
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
            source.rejected.len().to_string(),
            source.failed.len().to_string(),
        ]);
    }
    println!("{table}");
    for source in &report.sources {
        for name in &source.would_register {
            println!("would register {} `{name}`", source.dataset_type);
        }
        for name in &source.held_back {
            println!("held back `{name}`: smaller than registration.minimum_dataset_size");
        }
        for (dir, reason) in &source.rejected {
            println!("rejected `{dir}`: {reason}");
        }
        for (name, reason) in &source.failed {
            println!("failed `{name}`: {reason}");
        }
    }
    for repaired in &report.repaired {
        println!(
            "started the missing workflow of dataset {} (`{}`)",
            repaired.id, repaired.name
        );
    }
}

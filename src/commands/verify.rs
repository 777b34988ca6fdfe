//! `workers verify DATASET [--archive] [--staged] [--source]`: a fixity check by hand.

use std::process::ExitCode;

use chrono::Utc;
use serde_json::json;

use super::{EXIT_FAILED, Usage, find_dataset};
use crate::app::App;
use crate::cancel::CancellationToken;
use crate::cli::{OutputFormat, VerifyDatasetArgs};
use crate::config::RecallPolicy;
use crate::fixity::{BY_HAND, CheckOutcome, CopyCheck, CopyKind};
use crate::registry::Dataset;

pub(super) async fn run(app: &App, args: VerifyDatasetArgs) -> anyhow::Result<ExitCode> {
    let dataset = find_dataset(app, &args.dataset, args.dataset_type).await?;
    let chosen: Vec<CopyKind> = [
        (args.source, CopyKind::Source),
        (args.staged, CopyKind::Staged),
        (args.archive, CopyKind::Archive),
    ]
    .into_iter()
    .filter_map(|(wanted, copy)| wanted.then_some(copy))
    .collect();
    // Without a choice, every copy the dataset has; a copy asked for by name must exist.
    let copies = if chosen.is_empty() {
        vec![CopyKind::Source, CopyKind::Staged, CopyKind::Archive]
    } else {
        for copy in &chosen {
            if let Some(missing) = crate::fixity::missing_copy(&dataset, *copy) {
                return Err(Usage(format!(
                    "dataset {} (`{}`) {missing}: there is no {} copy to verify",
                    dataset.id,
                    dataset.name,
                    copy.as_str()
                ))
                .into());
            }
        }
        chosen
    };
    let cancel = CancellationToken::new();
    let env = app.step_env();
    let recall = if args.recall {
        RecallPolicy::Always
    } else {
        app.settings.fixity.recall
    };
    let checks = crate::fixity::verify(&env, &dataset, &copies, recall, &cancel).await?;
    let at = Utc::now();
    let records: Vec<_> = checks
        .iter()
        .filter(|check| crate::fixity::missing_copy(&dataset, check.copy).is_none())
        .map(|check| check.record(dataset.id, at, BY_HAND))
        .collect();
    crate::fixity::record(&env, app.store.as_ref(), &dataset, &records).await?;
    let intact = !checks.iter().any(CopyCheck::has_differences);
    match args.format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "dataset_id": dataset.id,
                "name": dataset.name.to_string(),
                "intact": intact,
                "checks": checks,
            }))?
        ),
        OutputFormat::Table => print_checks(&dataset, &checks),
    }
    Ok(if intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

fn print_checks(dataset: &Dataset, checks: &[CopyCheck]) {
    println!("Dataset {} (`{}`)", dataset.id, dataset.name);
    let mut table = super::table(["copy", "result", "files", "read", "location"]);
    for check in checks {
        let result = match &check.outcome {
            CheckOutcome::Intact => "intact".to_owned(),
            CheckOutcome::Differences { count, .. } => format!("{count} differences"),
            CheckOutcome::NotChecked { reason } => format!("not checked: {reason}"),
        };
        table.add_row([
            check.copy.as_str().to_owned(),
            result,
            check.files.to_string(),
            match check.bytes_read {
                Some(bytes) => indicatif::HumanBytes(bytes).to_string(),
                None => "checksum held by the archive".to_owned(),
            },
            check.location.clone(),
        ]);
    }
    println!("{table}");
    for check in checks {
        if let CheckOutcome::Differences { count, differences } = &check.outcome {
            println!("{} copy:", check.copy.as_str());
            for difference in differences {
                println!("  {}", difference.describe());
            }
            if *count > differences.len() as u64 {
                println!("  and {} more", *count - differences.len() as u64);
            }
        }
    }
}

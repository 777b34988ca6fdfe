//! `workers verify DATASET [--archive] [--staged] [--source]`: a fixity check by hand.

use std::process::ExitCode;

use serde_json::json;

use super::{EXIT_FAILED, Usage, find_dataset};
use crate::app::App;
use crate::cancel::CancellationToken;
use crate::cli::{OutputFormat, VerifyDatasetArgs};
use crate::fixity::{CheckOutcome, CopyCheck, CopyKind};
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
    let checks = crate::fixity::verify(&env, &dataset, &copies, &cancel).await?;
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

//! `download_illumina_dataset` (spec B.8): downloads the Illumina BaseSpace datasets of the
//! last `illumina.n_days` days into `illumina.download_dir/<name>` with the `bs` client,
//! records that directory as the dataset's origin and adds state DOWNLOADED.
//!
//! The original read a configuration key that did not exist and so always failed; here the
//! settings are `[illumina]`. `bs download` skips files it already has, so a retried step
//! carries on where the last attempt stopped.

use std::ffi::OsString;

use anyhow::Context;
use serde::Deserialize;
use tracing::info;

use super::program::Run;
use super::{StepContext, StepError, StepResult, returns_dataset};
use crate::model::DatasetState;
use crate::registry::DatasetPatch;

/// One item of `bs list datasets -f json`; only the id is used.
#[derive(Debug, Deserialize)]
struct Listed {
    #[serde(rename = "Id")]
    id: String,
}

pub async fn run(ctx: &StepContext) -> StepResult {
    let env = &ctx.env;
    let settings = &env.settings.illumina;
    let dataset = ctx.dataset().await?;
    let target = settings.download_dir.join(dataset.name.as_str());
    let dir = target.clone();
    crate::compute::blocking(move || std::fs::create_dir_all(&dir))
        .await
        .with_context(|| format!("cannot create `{}`", target.display()))?;

    let listing = Run {
        program: &settings.bs,
        args: vec![
            "list".into(),
            "datasets".into(),
            "-f".into(),
            "json".into(),
            format!("--newer-than={}d", settings.n_days).into(),
        ],
        timeout: settings.command_timeout,
        timeout_key: "illumina.command_timeout_seconds",
    };
    let shown = listing.describe();
    let listed: Vec<Listed> = serde_json::from_str(&listing.output(&ctx.cancel).await?.stdout)
        .map_err(|err| {
            StepError::permanent(
                "ValidationFailed",
                anyhow::Error::new(err).context(format!(
                    "`{shown}` did not print a JSON list of datasets with an `Id` each"
                )),
            )
        })?;

    ctx.progress
        .start("datasets", "items", Some(listed.len() as u64));
    for (idx, item) in listed.iter().enumerate() {
        // An id is a word of BaseSpace's; anything else would be read as an option.
        if item.id.is_empty() || item.id.starts_with('-') {
            return Err(StepError::permanent(
                "ValidationFailed",
                anyhow::format_err!("`{shown}` listed a dataset with the id `{}`", item.id),
            ));
        }
        let args: Vec<OsString> = vec![
            "download".into(),
            "dataset".into(),
            "--id".into(),
            item.id.clone().into(),
            "-o".into(),
            target.clone().into_os_string(),
        ];
        Run {
            program: &settings.bs,
            args,
            timeout: settings.command_timeout,
            timeout_key: "illumina.command_timeout_seconds",
        }
        .output(&ctx.cancel)
        .await?;
        ctx.progress.set_done(idx as u64 + 1);
        info!(basespace_id = %item.id, dir = %target.display(), "Downloaded a BaseSpace dataset.");
    }

    env.registry
        .update(
            dataset.id,
            &DatasetPatch {
                origin_path: Some(target.to_string_lossy().into_owned()),
                ..DatasetPatch::default()
            },
        )
        .await?;
    env.registry
        .add_state(dataset.id, DatasetState::Downloaded)
        .await?;
    Ok(returns_dataset(dataset.id))
}

//! `generate_qc` (spec B.8): FastQC over every `*.fastq.gz` of the staged copy, in batches,
//! then MultiQC over the FastQC reports; the MultiQC report is recorded (`metadata.report_id`),
//! uploaded to the registry, and the dataset gets state QC.
//!
//! The QC directory is `paths.<TYPE>.qc/<name>/qc`, rebuilt from empty by every attempt so a
//! report never mixes in the output of files a staged copy no longer has. Unlike the original,
//! a run that leaves no `multiqc_report.html` fails (the original passed silently), and so does
//! a staged copy with no FASTQ file to check.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;
use tracing::info;

use super::program::Run;
use super::{StepContext, StepError, StepResult, returns_dataset};
use crate::model::DatasetState;
use crate::registry::DatasetPatch;

/// What MultiQC writes into its output directory.
const REPORT_FILE: &str = "multiqc_report.html";

pub async fn run(ctx: &StepContext) -> StepResult {
    let env = &ctx.env;
    let settings = &env.settings.qc;
    let dataset = ctx.dataset().await?;
    let Some(qc_root) = env.settings.paths.for_type(dataset.dataset_type).qc.clone() else {
        return Err(StepError::validation(anyhow::format_err!(
            "dataset {} (`{}`): paths.{}.qc is not set, so no QC report is made for {} datasets",
            dataset.id,
            dataset.name,
            dataset.dataset_type,
            dataset.dataset_type
        )));
    };
    let Some(staged) = dataset.staged_path.clone().map(PathBuf::from) else {
        return Err(StepError::validation(anyhow::format_err!(
            "dataset {} (`{}`) has no staged copy to check: stage it first",
            dataset.id,
            dataset.name
        )));
    };
    let qc_dir = qc_root.join(dataset.name.as_str()).join("qc");

    let (tree, dir) = (staged.clone(), qc_dir.clone());
    let fastq = ctx
        .compute(move |cancel| -> anyhow::Result<Option<Vec<PathBuf>>> {
            if !tree.is_dir() {
                return Ok(None);
            }
            crate::compute::remove_tree(&dir, cancel)
                .with_context(|| format!("cannot empty the QC directory `{}`", dir.display()))?;
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create the QC directory `{}`", dir.display()))?;
            fastq_files(&tree).map(Some)
        })
        .await??;
    let Some(fastq) = fastq else {
        return Err(StepError::validation(anyhow::format_err!(
            "the staged copy `{}` of dataset {} (`{}`) does not exist: stage it again",
            staged.display(),
            dataset.id,
            dataset.name
        )));
    };
    if fastq.is_empty() {
        return Err(StepError::validation(anyhow::format_err!(
            "the staged copy `{}` of dataset {} (`{}`) holds no *.fastq.gz file: nothing to check",
            staged.display(),
            dataset.id,
            dataset.name
        )));
    }

    let total = fastq.len() as u64;
    ctx.progress.start("fastqc", "items", Some(total));
    let mut done = 0;
    for batch in fastq.chunks(settings.batch_size.max(1)) {
        let mut args: Vec<OsString> = vec!["-t".into(), settings.threads.to_string().into()];
        args.extend(batch.iter().map(|p| p.clone().into_os_string()));
        args.extend(["-o".into(), qc_dir.clone().into_os_string()]);
        Run {
            program: &settings.fastqc,
            args,
            timeout: settings.command_timeout,
            timeout_key: "qc.command_timeout_seconds",
        }
        .output(&ctx.cancel)
        .await?;
        done += batch.len() as u64;
        ctx.progress.set_done(done);
        info!(done, total, "FastQC checked a batch.");
    }

    Run {
        program: &settings.multiqc,
        args: vec![
            qc_dir.clone().into_os_string(),
            "-o".into(),
            qc_dir.clone().into_os_string(),
        ],
        timeout: settings.command_timeout,
        timeout_key: "qc.command_timeout_seconds",
    }
    .output(&ctx.cancel)
    .await?;
    let report = qc_dir.join(REPORT_FILE);
    let found = report.clone();
    if !crate::compute::blocking(move || found.is_file()).await {
        return Err(StepError::validation(anyhow::format_err!(
            "MultiQC wrote no report `{}` for dataset {} (`{}`)",
            report.display(),
            dataset.id,
            dataset.name
        )));
    }

    // A report made again keeps its id, so links to it stay valid.
    let report_id = dataset
        .metadata
        .get("report_id")
        .and_then(|v| v.as_str())
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    env.registry
        .update(
            dataset.id,
            &DatasetPatch {
                metadata: Some(json!({ "report_id": report_id })),
                ..DatasetPatch::default()
            },
        )
        .await?;
    let stored = env.registry.upload_report(dataset.id, &report).await?;
    env.registry.add_state(dataset.id, DatasetState::Qc).await?;
    info!(report_id = %report_id, stored = %stored, files = total, "QC report made and uploaded.");
    Ok(returns_dataset(dataset.id))
}

/// Every `*.fastq.gz` regular file below `root`, sorted, symbolic links not followed (a staged
/// copy is extracted through a filter, but a link would still lead out of it).
fn fastq_files(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root).follow_links(false) {
        let entry = entry.with_context(|| format!("cannot list `{}`", root.display()))?;
        if entry.file_type().is_file() && entry.file_name().to_string_lossy().ends_with(".fastq.gz")
        {
            out.push(entry.into_path());
        }
    }
    out.sort();
    Ok(out)
}

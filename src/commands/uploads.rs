//! `workers uploads`: upload integrity (spec C.5.3) by hand.
//!
//! `manifest` and `verify` look at a directory only: no database, no registry, nothing
//! written. They run without a configuration; when one loads, it only sizes the CPU pool.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{Failed, Usage};
use crate::cancel::CancellationToken;
use crate::cli::{OutputFormat, UploadsCommand, VerifyArgs};
use crate::compute::manifest::{
    self, Blake3Manifest, ManifestError, SizeManifest, check_manifest_hash, check_size_manifest,
    size_manifest_of,
};
use crate::compute::{Pool, blocking};
use crate::config::LoadOptions;

/// Whether `cmd` works on files alone, before any configuration or app is needed.
pub(super) fn needs_no_app(cmd: &UploadsCommand) -> bool {
    matches!(
        cmd,
        UploadsCommand::Manifest { .. } | UploadsCommand::Verify(_)
    )
}

/// The commands of [`needs_no_app`].
pub(super) async fn run_without_app(
    load: &LoadOptions,
    cmd: &UploadsCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        UploadsCommand::Manifest {
            path,
            size_manifest: true,
            ..
        } => {
            let root = path.clone();
            let sizes = blocking(move || size_manifest_of(&root))
                .await
                .map_err(failure)?;
            println!("{}", serde_json::to_string_pretty(&sizes)?);
            Ok(ExitCode::SUCCESS)
        }
        UploadsCommand::Manifest { path, format, .. } => {
            let summary = blake3_of(load, path, None).await?;
            match format {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
                OutputFormat::Table => {
                    let mut table = super::table(["hash", "files", "bytes"]);
                    table.add_row([
                        summary.hash,
                        summary.files.to_string(),
                        summary.bytes.to_string(),
                    ]);
                    println!("{table}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        UploadsCommand::Verify(args) => verify(load, args).await,
    }
}

async fn verify(load: &LoadOptions, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let path = &args.path;
    if let Some(expected) = &args.manifest_hash {
        // Checked before any file is read: a typo should not cost a pass over the upload.
        let expected = manifest::parse_hash(expected).map_err(failure)?;
        let summary = blake3_of(load, path, Some(expected)).await?;
        say!(
            "the BLAKE3 manifest hash {} holds for `{}`: {} file(s), {} byte(s)",
            summary.hash,
            path.display(),
            summary.files,
            summary.bytes
        );
        return Ok(ExitCode::SUCCESS);
    }
    let Some(file) = &args.size_manifest else {
        // clap requires one of the two.
        return Err(Usage("give --manifest-hash or --size-manifest".to_owned()).into());
    };
    let sizes = read_size_manifest(file).await?;
    let (root, checked) = (path.clone(), sizes.clone());
    blocking(move || check_size_manifest(&root, &checked))
        .await
        .map_err(|err| match err {
            err if err.is_invalid_manifest() => {
                Usage(format!("`{}`: {err}", file.display())).into()
            }
            err => failure(err),
        })?;
    let mut also = Vec::new();
    if sizes.file_count.is_some() {
        also.push("no other file on disk");
    }
    if sizes.total_size.is_some() {
        also.push("the total size");
    }
    say!(
        "the size manifest `{}` holds for `{}`: {} file(s), {} byte(s){}",
        file.display(),
        path.display(),
        sizes.files.len(),
        sizes.files.iter().map(|f| f.size).sum::<u64>(),
        if also.is_empty() {
            String::new()
        } else {
            format!("; checked too: {}", also.join(", "))
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// The BLAKE3 manifest of `path` on a CPU pool of its own, compared with `expected` if given.
async fn blake3_of(
    load: &LoadOptions,
    path: &Path,
    expected: Option<String>,
) -> anyhow::Result<Blake3Manifest> {
    let pool = Pool::new(pool_threads(load))?;
    let root: PathBuf = path.to_path_buf();
    let outcome = pool
        .run_job(&CancellationToken::new(), move |cancel| match &expected {
            Some(expected) => check_manifest_hash(&root, expected, cancel, None),
            None => manifest::blake3_manifest(&root, cancel, None),
        })
        .await
        .unwrap_or(Err(ManifestError::Cancelled));
    outcome.map_err(failure)
}

/// `parallelism` of the configuration when one loads, else one thread per core: these
/// commands must work where no configuration exists.
fn pool_threads(load: &LoadOptions) -> usize {
    match crate::config::load(load) {
        Ok(settings) => settings.parallelism,
        Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

async fn read_size_manifest(file: &Path) -> anyhow::Result<SizeManifest> {
    let path = file.to_path_buf();
    let text = blocking(move || std::fs::read_to_string(path))
        .await
        .map_err(|err| Usage(format!("cannot read `{}`: {err}", file.display())))?;
    SizeManifest::parse(&text).map_err(|err| Usage(format!("`{}`: {err}", file.display())).into())
}

/// Exit 2 when the manifest given is unusable, 1 when the files do not match it.
fn failure(err: ManifestError) -> anyhow::Error {
    if err.is_invalid_manifest() {
        Usage(err.to_string()).into()
    } else {
        Failed(err.to_string()).into()
    }
}

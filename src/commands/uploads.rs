//! `workers uploads`: uploads without the Bioloop UI (spec C.5) and their integrity checks by
//! hand.
//!
//! `create`, `complete`, `list` and `show` work on the registry's upload logs, so that data
//! pushed by rsync, scp or Globus goes through the same verification and ingestion as an
//! upload from the web UI. `manifest` and `verify` look at a directory only: no database, no
//! registry, nothing written. They run without a configuration; when one loads, it only sizes
//! the CPU pool.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{Map, Value, json};

use super::{Failed, Usage};
use crate::app::App;
use crate::cancel::CancellationToken;
use crate::cli::{CompleteArgs, OutputFormat, UploadsCommand, VerifyArgs};
use crate::compute::manifest::{
    self, Blake3Manifest, ManifestError, SizeManifest, check_manifest_hash, check_size_manifest,
    size_manifest_of,
};
use crate::compute::{Pool, blocking};
use crate::config::LoadOptions;
use crate::model::{DatasetName, DatasetType};
use crate::registry::RegistryError;
use crate::registry::uploads::{NewUpload, UploadLog, UploadQuery};

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
        _ => unreachable!("needs the app"),
    }
}

/// The commands that work on the registry's upload logs.
pub(super) async fn run(app: &App, cmd: UploadsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        UploadsCommand::Create {
            name,
            dataset_type,
            format,
        } => {
            let name =
                DatasetName::normalize(&name).map_err(|e| Usage(format!("`{name}`: {e}")))?;
            let upload_dir = app
                .settings
                .paths
                .for_type(dataset_type)
                .upload
                .to_string_lossy()
                .into_owned();
            let log = app
                .registry
                .create_upload(&NewUpload {
                    name,
                    dataset_type,
                    upload_dir,
                })
                .await
                .map_err(usage)?;
            // The payload directory exists at once, so that a sender can copy into it.
            if let Some(origin) = log.origin_path.clone() {
                let dir = PathBuf::from(&origin);
                blocking(move || std::fs::create_dir_all(&dir))
                    .await
                    .map_err(|err| Failed(format!("cannot create `{origin}`: {err}")))?;
            }
            print_logs(&[log], format, true)?;
            Ok(ExitCode::SUCCESS)
        }
        UploadsCommand::Complete(args) => complete(app, args).await,
        UploadsCommand::List { limit, format } => {
            use futures_util::{StreamExt, TryStreamExt};
            let refs = app.registry.uploads(&UploadQuery::All { limit }).await?;
            // Each upload's log is a read of its own (a request to the API): several at once,
            // in the listing's order.
            let logs: Vec<UploadLog> = futures_util::stream::iter(refs)
                .map(|r| app.registry.upload_log(r.dataset_id))
                .buffered(8)
                .try_filter_map(|log| async move { Ok(log) })
                .try_collect()
                .await?;
            print_logs(&logs, format, false)?;
            Ok(ExitCode::SUCCESS)
        }
        UploadsCommand::Show { id, format } => {
            let log = app
                .registry
                .upload_log(id)
                .await?
                .ok_or_else(|| Usage(format!("no upload has the dataset id {id}")))?;
            match format {
                OutputFormat::Json => {
                    println!("{}", serde_json::to_string_pretty(&log_json(&log))?)
                }
                OutputFormat::Table => {
                    let mut table = super::table(["field", "value"]);
                    let json = log_json(&log);
                    for (key, value) in json.as_object().into_iter().flatten() {
                        let text = match value {
                            Value::String(s) => s.clone(),
                            Value::Null => "-".to_owned(),
                            other => other.to_string(),
                        };
                        table.add_row([key.clone(), text]);
                    }
                    println!("{table}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        UploadsCommand::Manifest { .. } | UploadsCommand::Verify(_) => {
            unreachable!("handled without the app")
        }
    }
}

async fn complete(app: &App, args: CompleteArgs) -> anyhow::Result<ExitCode> {
    let id = args.id;
    if app.registry.upload_log(id).await?.is_none() {
        return Err(Usage(format!("no upload has the dataset id {id}")).into());
    }
    let mut metadata = Map::new();
    if let Some(hash) = &args.manifest_hash {
        let hash = manifest::parse_hash(hash).map_err(|e| Usage(e.to_string()))?;
        metadata.insert("checksum".into(), json!({"manifest_hash": hash}));
    }
    if let Some(file) = &args.size_manifest {
        let sizes = read_size_manifest(file).await?;
        metadata.insert("size_manifest".into(), serde_json::to_value(sizes)?);
    }
    if metadata.is_empty() {
        warn_no_manifest(id);
    }
    // The process id names the sender's session; a command line has none, so it names itself.
    let process_id = format!("cli-{}", uuid::Uuid::new_v4().simple());
    let log = app
        .registry
        .complete_upload(id, &process_id, Some(&metadata))
        .await
        .map_err(usage)?;
    say!(
        "upload {id} (`{}`) is {}: `workers jobs run manage_upload_workflows` verifies and ingests it",
        log.dataset_name,
        log.status
    );
    Ok(ExitCode::SUCCESS)
}

fn warn_no_manifest(id: i64) {
    tracing::warn!(
        dataset_id = id,
        "No manifest given: the upload is only checked to hold files. Pass --manifest-hash (or --size-manifest) to have its content verified."
    );
}

/// Errors about the upload asked for (unknown, in the wrong state, a name in use) are usage
/// errors; the registry being out of reach is not.
fn usage(err: RegistryError) -> anyhow::Error {
    match err {
        RegistryError::NotFound(id) => Usage(format!("no upload has the dataset id {id}")).into(),
        RegistryError::Invalid(message) => Usage(message).into(),
        other => other.into(),
    }
}

fn log_json(log: &UploadLog) -> Value {
    json!({
        "id": log.dataset_id,
        "name": log.dataset_name,
        "type": log.dataset_type.map(DatasetType::as_str),
        "origin_path": log.origin_path,
        "status": log.status.as_str(),
        "retry_count": log.retry_count,
        "updated_at": log.updated_at.to_rfc3339(),
        "process_id": log.process_id,
        "failure_reason": log.meta_str("failure_reason"),
        "verification_task_id": log.meta_str("verification_task_id"),
        "manifest_hash": log.meta("checksum").and_then(|c| c.get("manifest_hash")).cloned(),
        "metadata": log.metadata,
    })
}

/// The logs as a table, or as JSON: one object for `one` (a created upload), else a list.
fn print_logs(logs: &[UploadLog], format: OutputFormat, one: bool) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => {
            let items: Vec<Value> = logs.iter().map(log_json).collect();
            match items.as_slice() {
                [item] if one => println!("{}", serde_json::to_string_pretty(item)?),
                _ => println!("{}", serde_json::to_string_pretty(&items)?),
            }
        }
        OutputFormat::Table => {
            let mut table = super::table([
                "id",
                "name",
                "type",
                "status",
                "retries",
                "updated",
                "origin path",
            ]);
            for log in logs {
                table.add_row([
                    log.dataset_id.to_string(),
                    log.dataset_name.clone(),
                    log.dataset_type.map_or("-", DatasetType::as_str).to_owned(),
                    log.status.to_string(),
                    log.retry_count.to_string(),
                    log.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    log.origin_path.clone().unwrap_or_default(),
                ]);
            }
            println!("{table}");
        }
    }
    Ok(())
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

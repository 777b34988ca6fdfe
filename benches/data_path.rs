//! Data-path benchmark driver: each run does one timed operation and prints one JSON line.
//!
//! `benches/run.sh` calls this binary directly (not through cargo), so the timings measure
//! only the operation itself, never process start-up or set-up. Usage:
//!
//! ```text
//! data_path md5 FILE
//! data_path inspect-tree DIR THREADS
//! data_path verify-tree DIR THREADS
//! data_path stability-walk DIR THREADS
//! data_path inspect-step DIR THREADS
//! data_path bundle DIR OUT THREADS
//! data_path extract BUNDLE DEST THREADS SYNC
//! ```
//!
//! Output: `{"op", "seconds", "bytes", "files", "peak_rss_kb", ...}` plus per-operation fields
//! (digests, stored rows) that let the caller check the work was really done.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Map, Value, json};

use workers::app::App;
use workers::cancel::CancellationToken;
use workers::compute::Pool;
use workers::compute::bundle::{MemberDigest, write_bundle};
use workers::compute::extract::{ExtractOptions, extract_bundle};
use workers::compute::md5::md5_file;
use workers::compute::walk::{InspectOptions, inspect_tree, newest_change};
use workers::config::LoadOptions;
use workers::model::{CreateMethod, DatasetName, DatasetType};
use workers::progress::Progress;
use workers::registry::NewDataset;
use workers::steps::{StepContext, Task};

const USAGE: &str = "usage:
  data_path md5 FILE
  data_path inspect-tree DIR THREADS
  data_path verify-tree DIR THREADS
  data_path stability-walk DIR THREADS
  data_path inspect-step DIR THREADS
  data_path bundle DIR OUT THREADS
  data_path extract BUNDLE DEST THREADS SYNC (SYNC: 1 fsyncs every file and directory, 0 not)";

/// Rows read back per registry page when checking what inspect stored.
const PAGE: usize = 10_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(line) => println!("{line}"),
        Err(err) => {
            eprintln!("data_path: {err:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: &[String]) -> Result<String> {
    // `cargo bench` passes `--bench` to harness-less benches; accept and ignore it so that
    // `cargo bench --bench data_path -- ARGS` works as well as calling the binary directly.
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    match args.as_slice() {
        ["md5", file] => md5(Path::new(file)),
        ["inspect-tree", dir, threads] => {
            inspect_tree_only(Path::new(dir), threads_arg(threads)?, true)
        }
        // The walk of a fixity check (`workers verify`): MD5 only.
        ["verify-tree", dir, threads] => {
            inspect_tree_only(Path::new(dir), threads_arg(threads)?, false)
        }
        ["stability-walk", dir, threads] => stability_walk(Path::new(dir), threads_arg(threads)?),
        ["inspect-step", dir, threads] => inspect_step(Path::new(dir), threads_arg(threads)?),
        ["bundle", dir, out, threads] => {
            bundle(Path::new(dir), Path::new(out), threads_arg(threads)?)
        }
        ["extract", bundle, dest, threads, sync] => extract(
            Path::new(bundle),
            Path::new(dest),
            threads_arg(threads)?,
            match *sync {
                "1" => true,
                "0" => false,
                other => bail!("SYNC must be 0 or 1, not `{other}`"),
            },
        ),
        _ => bail!("unexpected arguments {args:?}\n{USAGE}"),
    }
}

fn threads_arg(text: &str) -> Result<usize> {
    let threads: usize = text
        .parse()
        .with_context(|| format!("THREADS must be a positive integer, not `{text}`"))?;
    ensure!(threads >= 1, "THREADS must be at least 1");
    Ok(threads)
}

/// One report line: the common fields first, in a fixed order, then the operation's own
/// (`serde_json::Map` would sort the keys, burying `op` in the middle).
fn report(
    op: &str,
    seconds: f64,
    bytes: u64,
    files: u64,
    peak_rss_kb: u64,
    extra: Value,
) -> String {
    let mut fields = vec![
        ("op".to_owned(), json!(op)),
        ("seconds".to_owned(), json!(seconds)),
        ("bytes".to_owned(), json!(bytes)),
        ("files".to_owned(), json!(files)),
        ("peak_rss_kb".to_owned(), json!(peak_rss_kb)),
    ];
    if let Value::Object(extra) = extra {
        fields.extend(extra);
    }
    let body = fields
        .iter()
        .map(|(key, value)| format!("{}: {value}", Value::from(key.as_str())))
        .collect::<Vec<_>>()
        .join(", ");
    format!("{{{body}}}")
}

/// The process's peak resident set (`VmHWM`, kB) so far.
fn peak_rss_kb() -> Result<u64> {
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM line in /proc/self/status")?;
    let kb = line.trim().trim_end_matches("kB").trim();
    kb.parse()
        .with_context(|| format!("unexpected VmHWM value `{kb}`"))
}

fn md5(file: &Path) -> Result<String> {
    let start = Instant::now();
    let (digest, bytes) = md5_file(file, &CancellationToken::new())
        .with_context(|| format!("cannot hash `{}`", file.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(report(
        "md5",
        seconds,
        bytes,
        1,
        peak_rss_kb()?,
        json!({"md5": digest.to_string()}),
    ))
}

/// The walk and the hashing alone: rows are only counted, nothing is written anywhere. With
/// `content_digests` each file's BLAKE3 is computed with its MD5, as inspect does; without,
/// only the MD5, as a fixity check does.
fn inspect_tree_only(dir: &Path, threads: usize, content_digests: bool) -> Result<String> {
    let pool = Pool::new(threads)?;
    let records = AtomicU64::new(0);
    let no_genome_types: Vec<String> = Vec::new();
    let opts = InspectOptions {
        genome_file_types: &no_genome_types,
        content_digests,
    };
    let start = Instant::now();
    let summary = pool
        .install(|| {
            inspect_tree(
                dir,
                &opts,
                &|_record| {
                    records.fetch_add(1, Ordering::Relaxed);
                },
                &|_, _| {},
                &CancellationToken::new(),
            )
        })
        .with_context(|| format!("cannot inspect `{}`", dir.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    ensure!(
        summary.error_count == 0,
        "{} problem(s) inspecting `{}`: {}",
        summary.error_count,
        dir.display(),
        summary.errors.join("; ")
    );
    let records = records.into_inner();
    ensure!(
        records == summary.num_files,
        "{records} records reported for {} files",
        summary.num_files
    );
    Ok(report(
        if content_digests {
            "inspect-tree"
        } else {
            "verify-tree"
        },
        seconds,
        summary.size,
        summary.num_files,
        peak_rss_kb()?,
        json!({"threads": threads, "directories": summary.num_directories}),
    ))
}

/// The walk of `await_stability`: every entry listed and stat'd, the newest change found.
fn stability_walk(dir: &Path, threads: usize) -> Result<String> {
    let pool = Pool::new(threads)?;
    let start = Instant::now();
    let future_after = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    let summary = pool
        .install(|| newest_change(dir, future_after, &CancellationToken::new()))
        .with_context(|| format!("cannot walk `{}`", dir.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    ensure!(
        summary.unreadable == 0,
        "{} unreadable entries below `{}`",
        summary.unreadable,
        dir.display()
    );
    ensure!(summary.newest.is_some(), "no change time found");
    Ok(report(
        "stability-walk",
        seconds,
        0,
        summary.entries,
        peak_rss_kb()?,
        json!({"threads": threads}),
    ))
}

/// The whole inspect step as a worker runs it: count, walk + hash to the spool, store the
/// rows in the embedded registry and record the dataset's sizes.
fn inspect_step(dir: &Path, threads: usize) -> Result<String> {
    let dir = fs::canonicalize(dir).with_context(|| format!("no directory `{}`", dir.display()))?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("`{}` has no UTF-8 name", dir.display()))?;
    let origin = dir
        .to_str()
        .with_context(|| format!("`{}` is not UTF-8", dir.display()))?
        .to_owned();
    // Counted before and outside the timing: an oracle independent of the step.
    let expected_files = walkdir::WalkDir::new(&dir)
        .min_depth(1)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| !e.file_type().is_dir())
        .count() as u64;

    // The project (configuration, workflow definitions, database, scratch) lives in a
    // temporary directory under TMPDIR, so the database sits where run.sh puts it.
    let project = tempfile::Builder::new()
        .prefix("workers-bench-project-")
        .tempdir()
        .context("cannot create the temporary project directory")?;
    copy_project_files(project.path())?;
    let mut env = BTreeMap::new();
    env.insert("WORKERS__PARALLELISM".to_owned(), threads.to_string());
    env.insert("ALIAS_SALT".to_owned(), "bench".to_owned());
    let settings = workers::config::load(&LoadOptions {
        config_dir: project.path().join("config"),
        app_env: None,
        env,
        problems: vec![],
        flags: vec![],
    })
    .map_err(|e| anyhow::format_err!("benchmark configuration: {e}"))?;
    // The same runtime shape as the `workers` binary.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let app = runtime.block_on(App::build(settings))?;
    let (seconds, peak_after_step, dataset) = runtime.block_on(async {
        let created = app
            .registry
            .bulk_create(&[NewDataset {
                name: DatasetName::normalize(name)
                    .map_err(|e| anyhow::format_err!("dataset name `{name}`: {e}"))?,
                dataset_type: DatasetType::RawData,
                origin_path: origin.clone(),
                create_method: CreateMethod::Scan,
                description: None,
                metadata: None,
            }])
            .await?;
        let Some(dataset) = created.created.first() else {
            bail!("the dataset was not registered: {created:?}");
        };
        let ctx = StepContext {
            env: app.step_env(),
            dataset_id: dataset.id,
            task_id: "bench".to_owned(),
            args: Vec::new(),
            kwargs: Map::new(),
            progress: Progress::new(),
            cancel: CancellationToken::new(),
            retries: 0,
            max_retries: 0,
        };
        let start = Instant::now();
        let outcome = workers::steps::run(Task::Inspect, ctx).await;
        let seconds = start.elapsed().as_secs_f64();
        // Taken before reading the rows back, so it describes the step, not the check.
        let peak = peak_rss_kb()?;
        if let Err(err) = outcome {
            bail!("inspect step failed ({}): {:#}", err.kind(), err.error());
        }
        let dataset = app.registry.get(dataset.id).await?;
        Ok((seconds, peak, dataset))
    })?;
    let rows = runtime.block_on(count_rows(&app, dataset.id))?;
    ensure!(
        rows == expected_files,
        "inspect stored {rows} file rows but `{}` holds {expected_files} files",
        dir.display()
    );
    ensure!(
        dataset.num_files == Some(expected_files),
        "inspect recorded num_files {:?} but `{}` holds {expected_files} files",
        dataset.num_files,
        dir.display()
    );
    Ok(report(
        "inspect-step",
        seconds,
        dataset.size.unwrap_or(0),
        expected_files,
        peak_after_step,
        json!({
            "threads": threads,
            "rows": rows,
            "directories": dataset.num_directories,
        }),
    ))
}

/// Copies the repository's configuration and workflow definitions, as the integration tests do,
/// and creates the watched directories the configuration names.
fn copy_project_files(project: &Path) -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for sub in ["config", "jobs"] {
        let target = project.join(sub);
        fs::create_dir_all(&target)?;
        for entry in fs::read_dir(repo.join(sub))? {
            let path = entry?.path();
            let Some(file_name) = path.file_name() else {
                continue;
            };
            if path.extension().is_some_and(|e| e == "toml") {
                fs::copy(&path, target.join(file_name))
                    .with_context(|| format!("cannot copy `{}`", path.display()))?;
            }
        }
    }
    for sub in ["examples/raw_data", "examples/data_products"] {
        fs::create_dir_all(project.join(sub))?;
    }
    Ok(())
}

/// File rows stored for the dataset, read back page by page.
async fn count_rows(app: &App, dataset_id: i64) -> Result<u64> {
    let mut rows = 0u64;
    let mut after: Option<String> = None;
    loop {
        let page = app
            .registry
            .files_page(dataset_id, after.as_deref(), PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.path.clone());
        rows += page.len() as u64;
    }
    Ok(rows)
}

/// Tar bundle plus its MD5, computed while writing, as the archive step builds it.
fn bundle(dir: &Path, out: &Path, threads: usize) -> Result<String> {
    let pool = Pool::new(threads)?;
    let out: PathBuf = out.to_path_buf();
    // A bundle is always written to a new file.
    match fs::remove_file(&out) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(
                anyhow::Error::new(err).context(format!("cannot remove `{}`", out.display()))
            );
        }
        _ => {}
    }
    let start = Instant::now();
    let summary = pool
        .install(|| {
            write_bundle(
                dir,
                &out,
                MemberDigest::default(),
                &|_| {},
                &CancellationToken::new(),
            )
        })
        .with_context(|| format!("cannot bundle `{}`", dir.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(report(
        "bundle",
        seconds,
        summary.size,
        summary.members.files,
        peak_rss_kb()?,
        json!({"threads": threads, "md5": summary.md5.to_string()}),
    ))
}

/// Safe extraction as the stage step does it (`compute::extract::extract_bundle`): built beside
/// the destination, with or without the fsync of every file and directory, then swapped in.
fn extract(bundle: &Path, dest: &Path, threads: usize, sync: bool) -> Result<String> {
    let pool = Pool::new(threads)?;
    let opts = ExtractOptions {
        sync,
        ..ExtractOptions::default()
    };
    let start = Instant::now();
    let extracted = pool
        .install(|| extract_bundle(bundle, dest, &opts, &|_| {}, &CancellationToken::new()))
        .with_context(|| format!("cannot extract `{}`", bundle.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    ensure!(
        extracted.replaced.is_none(),
        "`{}` existed before the run",
        dest.display()
    );
    Ok(report(
        "extract",
        seconds,
        extracted.summary.bytes,
        extracted.summary.files,
        peak_rss_kb()?,
        json!({"threads": threads, "sync": sync}),
    ))
}

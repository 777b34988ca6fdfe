//! From the merged tree to [`Settings`]: typed deserialization that finds every unknown key and
//! every wrong type (not only the first), then the checks the types cannot express.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use toml::Table;

use super::ConfigError;
use super::layers::{
    Layer, Origins, Seg, display_path, get, key_path, key_prefix, remove, set, suggest,
};
use super::overlap::{Overlap, overlap};
use super::secrets::{DEVELOPMENT_ALIAS_SALT, SECRETS, SecretValue, redact_uri};
use super::settings::*;
use crate::names::JobName;
use crate::scheduler::schedule::{Schedule, ScheduleFields};
use crate::sql::postgres::PgConfig;
use mongodb::options::ConnectionString;
use serde_path_to_error::Segment;

/// Each round fixes one wrong value; beyond this many the configuration is hopeless anyway.
const MAX_ROUNDS: usize = 64;

const LOG_FORMATS: &[&str] = &["human", "json"];
const MAX_BATCH_SIZE: usize = 100_000;

/// What validation needs to know about the layers.
pub(super) struct Context<'a> {
    /// Every layer, `default.toml` first (index 0).
    pub(super) layers: &'a [Layer],
    pub(super) origins: Origins,
    /// `default.toml`: the fallback for wrong values.
    pub(super) default: &'a Table,
}

impl Context<'_> {
    /// Where the value in effect at `path` came from.
    fn source_of(&self, path: &[Seg]) -> String {
        let layer = self
            .origins
            .of(&key_prefix(path))
            .last()
            .copied()
            .unwrap_or(0);
        self.layers[layer].describe(path)
    }

    fn error(&self, path: &[Seg], message: impl Into<String>) -> ConfigError {
        ConfigError::new(display_path(path), self.source_of(path), message)
    }

    /// Puts the value of `default.toml` back at `keys`, or removes the key when the value in
    /// effect is the default's own or it has none, so the next round gets past it. False when
    /// nothing can be done (the root).
    fn fall_back(
        &mut self,
        working: &mut Table,
        keys: &[String],
        removed: &mut BTreeSet<Vec<String>>,
    ) -> bool {
        if keys.is_empty() {
            return false;
        }
        let from_default = self.origins.of(keys).last() == Some(&0);
        match get(self.default, keys) {
            Some(value) if !from_default => {
                set(working, keys, value.clone());
                self.origins.reset_to(keys, 0);
            }
            _ => {
                remove(working, keys);
                removed.insert(keys.to_vec());
            }
        }
        true
    }
}

/// Deserializes `merged` into [`RawSettings`], reporting every unknown key, wrong type and
/// missing key. `None` when some problem could not be worked around.
pub(super) fn deserialize(
    merged: &Table,
    ctx: &mut Context<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<RawSettings> {
    let mut working = merged.clone();
    let mut unknown: BTreeSet<Vec<Seg>> = BTreeSet::new();
    let mut removed: BTreeSet<Vec<String>> = BTreeSet::new();
    let mut seen: BTreeSet<(Vec<Seg>, String)> = BTreeSet::new();
    let mut type_errors = Vec::new();
    let mut result = None;
    let mut out_of_rounds = true;

    // serde stops at the first wrong value; to report them all, each round records the error,
    // puts the default's value in place of the wrong one, and tries again.
    for _ in 0..MAX_ROUNDS {
        let mut ignored = Vec::new();
        let attempt = {
            let mut on_ignored = |path: serde_ignored::Path<'_>| ignored.push(ignored_path(&path));
            let de = serde_ignored::Deserializer::new(working.clone(), &mut on_ignored);
            serde_path_to_error::deserialize::<_, RawSettings>(de)
        };
        unknown.extend(ignored);
        let err = match attempt {
            Ok(raw) => {
                result = Some(raw);
                break;
            }
            Err(err) => err,
        };
        let path = error_path(err.path());
        let message = err.inner().message().to_string();
        if !seen.insert((path.clone(), message.clone())) {
            // The same error again: the fix did not take, so stop rather than loop.
            out_of_rounds = false;
            break;
        }
        let progressed = match missing_field(&message) {
            Some(field) => {
                let parent = key_prefix(&path);
                let mut full = parent.clone();
                full.push(field.to_string());
                if removed.contains(&full) {
                    // Its wrong value was reported and removed, and default.toml has no valid
                    // one to put back: give up on the enclosing table instead.
                    ctx.fall_back(&mut working, &parent, &mut removed)
                } else {
                    type_errors.push(missing_error(ctx, &parent, &full));
                    match get(ctx.default, &full) {
                        Some(value) => {
                            set(&mut working, &full, value.clone());
                            ctx.origins.reset_to(&full, 0);
                            true
                        }
                        None => ctx.fall_back(&mut working, &parent, &mut removed),
                    }
                }
            }
            None => {
                type_errors.push(ctx.error(&path, explain(&message)));
                let target = existing_prefix(&working, &path);
                ctx.fall_back(&mut working, &target, &mut removed)
            }
        };
        if !progressed {
            out_of_rounds = false;
            break;
        }
    }

    for path in &unknown {
        errors.extend(unknown_errors(ctx, path));
    }
    errors.extend(type_errors);
    if result.is_none() && out_of_rounds {
        errors.push(ConfigError::new(
            "",
            ctx.layers[0].name.clone(),
            format!(
                "stopped after {MAX_ROUNDS} wrong values; fix the ones above and load again to \
                 see the rest"
            ),
        ));
    }
    result
}

fn missing_error(ctx: &Context<'_>, parent: &[String], full: &[String]) -> ConfigError {
    // Blame the layer that introduced the enclosing table: that is where the key belongs.
    let layer = ctx.origins.of(parent).first().copied().unwrap_or(0);
    let mut message = "missing key".to_string();
    if layer == 0 {
        message.push_str(&format!(" ({} must define every key)", ctx.layers[0].name));
    }
    ConfigError::new(
        display_path(&key_path(full)),
        ctx.layers[layer].describe(&key_path(parent)),
        message,
    )
}

/// One error per layer that set an unknown key.
fn unknown_errors(ctx: &Context<'_>, path: &[Seg]) -> Vec<ConfigError> {
    let keys = key_prefix(path);
    let mut message = "unknown key".to_string();
    if let Some(suggestion) = suggest(&keys) {
        message.push_str(&format!(" (did you mean `{suggestion}`?)"));
    }
    let mut layers: Vec<usize> = ctx.origins.of(&keys).to_vec();
    layers.dedup();
    let mut seen = BTreeSet::new();
    layers
        .into_iter()
        .filter(|layer| seen.insert(*layer))
        .map(|layer| {
            ConfigError::new(
                display_path(path),
                ctx.layers[layer].describe(path),
                message.clone(),
            )
        })
        .collect()
}

fn ignored_path(path: &serde_ignored::Path<'_>) -> Vec<Seg> {
    fn walk(path: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
        use serde_ignored::Path as P;
        match path {
            P::Root => {}
            P::Seq { parent, index } => {
                walk(parent, out);
                out.push(Seg::Index(*index));
            }
            P::Map { parent, key } => {
                walk(parent, out);
                out.push(Seg::Key(key.clone()));
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                walk(parent, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(path, &mut out);
    out
}

fn error_path(path: &serde_path_to_error::Path) -> Vec<Seg> {
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            Segment::Unknown => None,
        })
        .collect()
}

/// The longest table-key prefix of `path` present in `table`: the value to fall back on.
fn existing_prefix(table: &Table, path: &[Seg]) -> Vec<String> {
    let keys = key_prefix(path);
    let mut len = keys.len();
    while len > 0 && get(table, &keys[..len]).is_none() {
        len -= 1;
    }
    keys[..len].to_vec()
}

fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.strip_suffix('`')
}

/// serde's `invalid type: string "x", expected u64` in an operator's words.
fn explain(message: &str) -> String {
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "));
    let Some((found, expected)) = rest.and_then(|rest| rest.rsplit_once(", expected ")) else {
        return message.to_string();
    };
    let expected = match expected {
        "usize" | "u64" => "a non-negative integer".to_string(),
        "u32" => "a non-negative integer up to 4294967295".to_string(),
        "f64" => "a number".to_string(),
        "a sequence" => "an array".to_string(),
        "path string" => "a string (a path)".to_string(),
        "a map" => "a table".to_string(),
        other if other.starts_with("struct ") => "a table".to_string(),
        other => other.to_string(),
    };
    let found = match found {
        "sequence" => "an array",
        "map" => "a table",
        other => other,
    };
    format!("expected {expected}, found {found}")
}

/// Checks what the types cannot and builds [`Settings`], plus the resolved raw form for
/// `config show`. `None` when something failed (the errors say what).
pub(super) fn build(
    raw: RawSettings,
    ctx: &Context<'_>,
    root: &Path,
    secrets: &[SecretValue],
    errors: &mut Vec<ConfigError>,
) -> Option<(Settings, RawSettings)> {
    let mut check = Checker {
        ctx,
        root,
        errors: Vec::new(),
    };

    let app_id = raw.app_id.trim().to_string();
    if app_id.is_empty() {
        check.fail(&key(&["app_id"]), "must not be empty");
    }
    let parallelism = match raw.parallelism {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    for (i, suffix) in raw.genome_file_types.iter().enumerate() {
        if !suffix.starts_with('.') || suffix.len() < 2 {
            check.fail(
                &at(key(&["genome_file_types"]), i),
                format!(
                    "`{suffix}` is not a file name suffix: it must start with '.', e.g. \".bam\""
                ),
            );
        }
    }

    // HPSS paths are relative to the HPSS home (spec D.1); local ones to the project.
    let archive_is_local = raw.archive.kind != ArchiveKind::Hsi.as_str();
    let paths = Paths {
        root: check.path(&["paths", "root"], &raw.paths.root),
        scratch: check.path(&["paths", "scratch"], &raw.paths.scratch),
        download_dir: check.path(&["paths", "download_dir"], &raw.paths.download_dir),
        raw_data: check.type_paths("RAW_DATA", &raw.paths.raw_data, archive_is_local),
        data_product: check.type_paths("DATA_PRODUCT", &raw.paths.data_product, archive_is_local),
    };

    let registration = Registration {
        raw_data: check.source("RAW_DATA", &raw.registration.raw_data),
        data_product: check.source("DATA_PRODUCT", &raw.registration.data_product),
        recency_threshold: Duration::from_secs(raw.registration.recency_threshold_seconds),
        wait_between_stability_checks: Duration::from_secs(
            raw.registration.wait_between_stability_checks_seconds,
        ),
        poll_interval: Duration::from_secs(raw.registration.poll_interval_seconds),
        full_scan_every_n_scans: raw.registration.full_scan_every_n_scans,
        minimum_dataset_size: raw.registration.minimum_dataset_size,
        max_stability_wait: match raw.registration.max_stability_wait_seconds {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        },
    };
    let modes = crate::compute::extract::Modes {
        file: check.mode(&["stage", "file_mode"], &raw.stage.file_mode, 0o600),
        directory: check.mode(
            &["stage", "directory_mode"],
            &raw.stage.directory_mode,
            0o700,
        ),
    };

    check.sources_apart(&registration, &paths, archive_is_local);

    let batch = raw.inspect.file_metadata_batch_size;
    if !(1..=MAX_BATCH_SIZE).contains(&batch) {
        check.fail(
            &key(&["inspect", "file_metadata_batch_size"]),
            format!("must be between 1 and {MAX_BATCH_SIZE}, not {batch}"),
        );
    }
    let workflows_dir = check.path(&["workflows", "dir"], &raw.workflows.dir);

    for task in raw.retry.steps.keys() {
        if crate::names::Task::from_name(task).is_none() {
            check.fail(
                &key(&["retry", "steps", task]),
                format!(
                    "unknown task `{task}` (known: {})",
                    crate::names::Task::names()
                ),
            );
        }
    }
    for task in raw.worker.time_limits.keys() {
        if crate::names::Task::from_name(task).is_none() {
            check.fail(
                &key(&["worker", "time_limits", task]),
                format!(
                    "unknown task `{task}` (known: {})",
                    crate::names::Task::names()
                ),
            );
        }
    }
    if raw.worker.concurrency < 1 {
        check.fail(&key(&["worker", "concurrency"]), "must be at least 1");
    }
    let interval = raw.progress.interval_seconds;
    let progress_interval = Duration::try_from_secs_f64(interval)
        .ok()
        .filter(|d| !d.is_zero() && interval.is_finite());
    if progress_interval.is_none() {
        check.fail(
            &key(&["progress", "interval_seconds"]),
            format!("must be a number of seconds greater than 0, not {interval}"),
        );
    }

    let backends = MaybeBackends {
        registry: check.kind(
            "registry",
            &raw.registry,
            RegistryKind::from_name,
            RegistryKind::NAMES,
        ),
        store: check.kind("store", &raw.store, StoreKind::from_name, StoreKind::NAMES),
        broker: check.kind(
            "broker",
            &raw.broker,
            BrokerKind::from_name,
            BrokerKind::NAMES,
        ),
        archive: check.kind(
            "archive",
            &raw.archive,
            ArchiveKind::from_name,
            ArchiveKind::NAMES,
        ),
    };
    let sqlite_path = check.path(&["sqlite", "path"], &raw.sqlite.path);

    if !LOG_FORMATS.contains(&raw.log.format.as_str()) {
        check.fail(
            &key(&["log", "format"]),
            format!(
                "unknown format `{}` (expected one of: {})",
                raw.log.format,
                LOG_FORMATS.join(", ")
            ),
        );
    }

    // The filter is parsed by the same code that will use it, so what passes here is what
    // the logs get; a typo must not silently fall back to some other level.
    if raw.log.level.trim().is_empty() {
        check.fail(&key(&["log", "level"]), "must not be empty");
    } else if let Err(err) = tracing_subscriber::EnvFilter::try_new(raw.log.filter()) {
        check.fail(
            &key(&["log", "level"]),
            format!(
                "`{}` is not a tracing filter such as `info` or `warn,workers=debug`: {err}",
                raw.log.level
            ),
        );
    }

    let (found, warnings) = check.secrets(&raw.secrets, secrets);
    let api = check.api(&raw.api, backends.registry, found.api_token.clone());
    let mongo = check.mongo(&raw.mongo, backends.store, found.mongo_password.as_deref());
    let postgres = check.postgres(&raw.postgres, &backends, found.postgres_password.clone());
    let reports_key = key(&["postgres", "reports_dir"]);
    let postgres_reports_dir = (!raw.postgres.reports_dir.as_os_str().is_empty())
        .then(|| check.resolve(&reports_key, &raw.postgres.reports_dir));
    if backends.registry == Some(RegistryKind::Postgres)
        && raw.workflows.integrated.qc
        && postgres_reports_dir.is_none()
    {
        check.fail(
            &reports_key,
            "must be set when workflows.integrated.qc is true and registry.kind is \"postgres\": \
             the registry keeps QC reports there (a directory every host mounts at the same place)",
        );
    }
    let amqp = check.amqp(
        &raw.amqp,
        &app_id,
        backends.broker,
        found.queue_password.as_deref(),
    );
    if backends.archive == Some(ArchiveKind::Hsi) && raw.hsi.command.as_os_str().is_empty() {
        check.fail(&key(&["hsi", "command"]), "must not be empty");
    }
    for name in ["command_timeout_seconds", "stall_timeout_seconds"] {
        let value = match name {
            "command_timeout_seconds" => raw.hsi.command_timeout_seconds,
            _ => raw.hsi.stall_timeout_seconds,
        };
        if value == 0 {
            check.fail(&key(&["hsi", name]), "must be at least 1");
        }
    }

    if raw.service_user.trim().is_empty() {
        check.fail(&key(&["service_user"]), "must not be empty");
    }
    let schedules = check.schedules(&raw.schedules);
    if raw.scheduler.lease_seconds < 3 {
        check.fail(&key(&["scheduler", "lease_seconds"]), "must be at least 3");
    }
    for (i, name) in raw.workflows.purge.types.iter().enumerate() {
        if name.trim().is_empty() {
            check.fail(
                &at(key(&["workflows", "purge", "types"]), i),
                "must not be empty",
            );
        }
    }
    let lfs_path = check.path(&["metrics", "lfs_path"], &raw.metrics.lfs_path);
    let prometheus_listen = check.listen(&["prometheus", "listen"], &raw.prometheus.listen);
    for (parts, value) in [
        (
            &["uploads", "expire_uploading_after_days"][..],
            raw.uploads.expire_uploading_after_days,
        ),
        (
            &["uploads", "retry_window_hours"][..],
            raw.uploads.retry_window_hours,
        ),
        (
            &["uploads", "purge", "ttl_days"][..],
            raw.uploads.purge.ttl_days,
        ),
        (
            &["uploads", "purge", "stale_uploading_days"][..],
            raw.uploads.purge.stale_uploading_days,
        ),
    ] {
        if !(value.is_finite() && value > 0.0) {
            check.fail(
                &key(parts),
                format!("must be a number above 0, not {value}"),
            );
        }
    }
    if raw.uploads.verification_timeout_seconds == 0 {
        check.fail(
            &key(&["uploads", "verification_timeout_seconds"]),
            "must be at least 1",
        );
    }
    if raw.notifications.enabled && raw.notifications.role_ids.is_empty() {
        check.fail(
            &key(&["notifications", "role_ids"]),
            "must name at least one role when notifications are enabled (the API requires it)",
        );
    }
    for (name, program) in [("fastqc", &raw.qc.fastqc), ("multiqc", &raw.qc.multiqc)] {
        if program.as_os_str().is_empty() {
            check.fail(&key(&["qc", name]), "must not be empty");
        }
    }
    for (section, name, value) in [
        ("qc", "threads", u64::from(raw.qc.threads)),
        ("qc", "batch_size", raw.qc.batch_size as u64),
        (
            "qc",
            "command_timeout_seconds",
            raw.qc.command_timeout_seconds,
        ),
        ("illumina", "n_days", u64::from(raw.illumina.n_days)),
        (
            "illumina",
            "command_timeout_seconds",
            raw.illumina.command_timeout_seconds,
        ),
    ] {
        if value == 0 {
            check.fail(&key(&[section, name]), "must be at least 1");
        }
    }
    if raw.illumina.bs.as_os_str().is_empty() {
        check.fail(&key(&["illumina", "bs"]), "must not be empty");
    }
    let illumina_dir = check.path(&["illumina", "download_dir"], &raw.illumina.download_dir);
    let fixity = check.fixity(&raw.fixity);
    let headroom = check.size(&["capacity", "headroom"], &raw.capacity.headroom);
    if raw.capacity.wait_seconds == 0 {
        check.fail(&key(&["capacity", "wait_seconds"]), "must be at least 1");
    }
    let purge = &raw.stage.purge;
    let watermarks = match (purge.high_watermark_percent, purge.low_watermark_percent) {
        (0, _) => None,
        (high, low) if high <= 100 && low < high => Some((high, low)),
        (high, low) => {
            check.fail(
                &key(&["stage", "purge", "low_watermark_percent"]),
                format!(
                    "must be below high_watermark_percent ({high}), and both at most 100 (found {low}); set high_watermark_percent = 0 to turn purging by fill off"
                ),
            );
            None
        }
    };

    errors.append(&mut check.errors);
    let (
        Some(backends),
        Some(progress_interval),
        Some(api),
        Some(mongo),
        Some(postgres),
        Some(amqp),
        Some(fixity),
        Some(headroom),
    ) = (
        backends.all(),
        progress_interval,
        api,
        mongo,
        postgres,
        amqp,
        fixity,
        headroom,
    )
    else {
        return None;
    };
    if !errors.is_empty() {
        return None;
    }

    let mut resolved = raw.clone();
    resolved.parallelism = parallelism;
    resolved.paths = RawPaths {
        root: paths.root.clone(),
        scratch: paths.scratch.clone(),
        download_dir: paths.download_dir.clone(),
        raw_data: raw_type_paths(&paths.raw_data),
        data_product: raw_type_paths(&paths.data_product),
    };
    resolved.registration.raw_data.source_dir = registration.raw_data.source_dir.clone();
    resolved.registration.data_product.source_dir = registration.data_product.source_dir.clone();
    resolved.workflows.dir = workflows_dir.clone();
    resolved.sqlite.path = sqlite_path.clone();
    resolved.postgres.reports_dir = postgres_reports_dir.clone().unwrap_or_default();
    resolved.metrics.lfs_path = lfs_path.clone();
    resolved.illumina.download_dir = illumina_dir.clone();

    let settings = Settings {
        app_id,
        parallelism,
        genome_file_types: raw.genome_file_types,
        paths,
        registration,
        stage: Stage {
            days_to_live: raw.stage.purge.days_to_live,
            max_purges: raw.stage.purge.max_purges,
            watermarks,
            min_age: Duration::from_secs(u64::from(raw.stage.purge.min_age_hours) * 3600),
            alias_salt: SecretString::new(found.alias_salt),
            modes,
        },
        inspect: raw.inspect,
        workflows_dir,
        workflows_stalled_after: Duration::from_secs(raw.workflows.stalled_after_seconds),
        retry: raw.retry,
        worker: raw.worker,
        progress_interval,
        backends,
        sqlite: RawSqlite {
            path: sqlite_path,
            busy_timeout_seconds: raw.sqlite.busy_timeout_seconds,
        },
        api,
        mongo,
        postgres,
        postgres_reports_dir,
        amqp,
        hsi: raw.hsi,
        log: raw.log,
        service_user: raw.service_user,
        scheduler: SchedulerSettings {
            lease: Duration::from_secs(raw.scheduler.lease_seconds),
            grace: Duration::from_secs(raw.scheduler.grace_seconds),
            workers: raw.scheduler.workers,
        },
        schedules,
        workflow_purge: raw.workflows.purge,
        integrated_qc: raw.workflows.integrated.qc,
        metrics: RawMetrics {
            quota: raw.metrics.quota,
            lfs_path,
        },
        prometheus_listen,
        uploads: raw.uploads,
        notifications: raw.notifications,
        qc: QcSettings {
            fastqc: raw.qc.fastqc,
            multiqc: raw.qc.multiqc,
            threads: raw.qc.threads,
            batch_size: raw.qc.batch_size,
            command_timeout: Duration::from_secs(raw.qc.command_timeout_seconds),
        },
        illumina: IlluminaSettings {
            bs: raw.illumina.bs,
            n_days: raw.illumina.n_days,
            download_dir: illumina_dir,
            command_timeout: Duration::from_secs(raw.illumina.command_timeout_seconds),
        },
        fixity,
        capacity: CapacitySettings {
            headroom,
            wait: Duration::from_secs(raw.capacity.wait_seconds),
        },
        sources: ctx.layers.iter().map(|layer| layer.name.clone()).collect(),
        warnings,
    };
    Some((settings, resolved))
}

fn raw_type_paths(paths: &TypePaths) -> RawTypePaths {
    RawTypePaths {
        upload: paths.upload.clone(),
        archive: paths.archive.clone(),
        stage: paths.stage.clone(),
        qc: paths.qc.clone(),
        bundle: RawBundlePaths {
            generate: paths.bundle_generate.clone(),
            stage: paths.bundle_stage.clone(),
        },
    }
}

fn key(parts: &[&str]) -> Vec<Seg> {
    parts
        .iter()
        .map(|part| Seg::Key(part.to_string()))
        .collect()
}

fn at(mut path: Vec<Seg>, index: usize) -> Vec<Seg> {
    path.push(Seg::Index(index));
    path
}

/// Backends while some may still be unknown.
/// The secrets found in the environment.
struct FoundSecrets {
    alias_salt: String,
    api_token: Option<String>,
    queue_password: Option<String>,
    mongo_password: Option<String>,
    postgres_password: Option<String>,
}

struct MaybeBackends {
    registry: Option<RegistryKind>,
    store: Option<StoreKind>,
    broker: Option<BrokerKind>,
    archive: Option<ArchiveKind>,
}

impl MaybeBackends {
    fn all(self) -> Option<Backends> {
        Some(Backends {
            registry: self.registry?,
            store: self.store?,
            broker: self.broker?,
            archive: self.archive?,
        })
    }
}

/// Collects the semantic errors of one load.
struct Checker<'a> {
    ctx: &'a Context<'a>,
    root: &'a Path,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn fail(&mut self, path: &[Seg], message: impl Into<String>) {
        self.errors.push(self.ctx.error(path, message));
    }

    /// An address to listen on: an IP address and a port other than 0 (nothing could find a
    /// port the system picks). Empty means none. Host names are refused: resolving one would
    /// be network I/O while loading, and could pick an address nobody meant.
    fn listen(&mut self, parts: &[&str], text: &str) -> Option<std::net::SocketAddr> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        match text.parse::<std::net::SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Some(addr),
            Ok(_) => {
                self.fail(&key(parts), format!("`{text}` needs a port other than 0"));
                None
            }
            Err(_) => {
                self.fail(
                    &key(parts),
                    format!(
                        "`{text}` is not an IP address and port such as 127.0.0.1:9808, \
                         0.0.0.0:9808 or [::1]:9808 (empty: no metrics endpoint)"
                    ),
                );
                None
            }
        }
    }

    /// Parses permission bits written in octal (`"0644"`, `"755"`), which must include
    /// `owner_needs` (the service must still read, and for directories list and clean up, what
    /// it staged).
    fn mode(&mut self, parts: &[&str], text: &str, owner_needs: u32) -> u32 {
        let digits = text.trim().trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if mode <= 0o777 && mode & owner_needs == owner_needs => mode,
            Ok(mode) if mode > 0o777 => {
                self.fail(
                    &key(parts),
                    format!("`{text}` has bits above 0777 (setuid, setgid, sticky): not allowed"),
                );
                0
            }
            Ok(_) => {
                self.fail(
                    &key(parts),
                    format!("`{text}` must give the owner at least {owner_needs:04o}"),
                );
                0
            }
            Err(_) => {
                self.fail(
                    &key(parts),
                    format!("`{text}` is not an octal mode such as \"0644\""),
                );
                0
            }
        }
    }

    /// Makes a configured path absolute against the project root, refusing what would
    /// silently mean something else than the operator wrote.
    fn path(&mut self, parts: &[&str], path: &Path) -> PathBuf {
        self.resolve(&key(parts), path)
    }

    fn resolve(&mut self, at: &[Seg], path: &Path) -> PathBuf {
        if path.as_os_str().is_empty() {
            self.fail(at, "must not be empty");
        } else if path.starts_with("~") {
            self.fail(at, "`~` is not expanded here; write the absolute path");
        }
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.root.join(path)
        }
    }

    fn type_paths(
        &mut self,
        dataset_type: &str,
        raw: &RawTypePaths,
        archive_is_local: bool,
    ) -> TypePaths {
        let base = ["paths", dataset_type];
        let sub = |name: &str| key(&[base[0], base[1], name]);
        let archive_key = sub("archive");
        if let Err(message) = check_template(&raw.archive) {
            self.fail(&archive_key, message);
        }
        let archive = if archive_is_local {
            self.resolve(&archive_key, Path::new(&raw.archive))
        } else if raw.archive.trim().is_empty() {
            self.fail(&archive_key, "must not be empty");
            PathBuf::new()
        } else {
            PathBuf::from(&raw.archive)
        };
        let archive = match archive.to_str() {
            Some(archive) => archive.to_string(),
            None => {
                self.fail(&archive_key, "the resolved path is not valid UTF-8");
                raw.archive.clone()
            }
        };
        TypePaths {
            upload: self.resolve(&sub("upload"), &raw.upload),
            archive,
            stage: self.resolve(&sub("stage"), &raw.stage),
            qc: raw.qc.as_ref().map(|qc| self.resolve(&sub("qc"), qc)),
            bundle_generate: self.resolve(
                &key(&[base[0], base[1], "bundle", "generate"]),
                &raw.bundle.generate,
            ),
            bundle_stage: self.resolve(
                &key(&[base[0], base[1], "bundle", "stage"]),
                &raw.bundle.stage,
            ),
        }
    }

    /// A source directory must stay apart from every directory the workers write into:
    /// watch registers what appears in a source directory, so each run would register the
    /// previous run's output (staged copies, bundles, links) as new datasets.
    fn sources_apart(
        &mut self,
        registration: &Registration,
        paths: &Paths,
        archive_is_local: bool,
    ) {
        let mut written = vec![
            (key(&["paths", "scratch"]), paths.scratch.clone()),
            (key(&["paths", "download_dir"]), paths.download_dir.clone()),
        ];
        for (name, typed) in [
            ("RAW_DATA", &paths.raw_data),
            ("DATA_PRODUCT", &paths.data_product),
        ] {
            written.push((key(&["paths", name, "stage"]), typed.stage.clone()));
            written.push((
                key(&["paths", name, "bundle", "generate"]),
                typed.bundle_generate.clone(),
            ));
            written.push((
                key(&["paths", name, "bundle", "stage"]),
                typed.bundle_stage.clone(),
            ));
            if let Some(qc) = &typed.qc {
                written.push((key(&["paths", name, "qc"]), qc.clone()));
            }
            // Bundles land below the part of the template before `{year}`.
            if archive_is_local {
                let fixed: PathBuf = Path::new(&typed.archive)
                    .components()
                    .take_while(|c| !c.as_os_str().to_string_lossy().contains('{'))
                    .collect();
                written.push((key(&["paths", name, "archive"]), fixed));
            }
        }
        let sources = [
            ("RAW_DATA", &registration.raw_data.source_dir),
            ("DATA_PRODUCT", &registration.data_product.source_dir),
        ];
        // A path already reported (empty, `~`) was resolved to something arbitrary.
        let reported: BTreeSet<String> = self.errors.iter().map(|e| e.key.clone()).collect();
        for (name, source_dir) in sources {
            let source_key = key(&["registration", name, "source_dir"]);
            for (other_key, other) in &written {
                if reported.contains(&display_path(&source_key))
                    || reported.contains(&display_path(other_key))
                {
                    continue;
                }
                let Some((relation, through_links)) = overlap(source_dir, other) else {
                    continue;
                };
                let relation = match relation {
                    Overlap::Same => "is",
                    Overlap::Inside => "is inside",
                    Overlap::Contains => "contains",
                };
                let links = if through_links {
                    " once symbolic links are resolved"
                } else {
                    ""
                };
                let message = format!(
                    "`{}` {relation} {} (`{}`, set in {}){links}: watch would register what the \
                     workers write there as new datasets; keep source directories apart from \
                     the stage, archive, bundle, scratch and download directories",
                    source_dir.display(),
                    display_path(other_key),
                    other.display(),
                    self.ctx.source_of(other_key),
                );
                self.fail(&source_key, message);
            }
        }
    }

    fn source(&mut self, dataset_type: &str, raw: &RawSource) -> Source {
        let source_dir = self.resolve(
            &key(&["registration", dataset_type, "source_dir"]),
            &raw.source_dir,
        );
        let mut builder = GlobSetBuilder::new();
        for (i, pattern) in raw.rejects.iter().enumerate() {
            let at = at(key(&["registration", dataset_type, "rejects"]), i);
            if pattern.is_empty() {
                self.fail(&at, "an empty pattern matches no directory");
                continue;
            }
            // Like Python's fnmatch, which the original used: `*` also matches `/`, case
            // matters, and a backslash is an ordinary character.
            let glob = GlobBuilder::new(pattern)
                .literal_separator(false)
                .backslash_escape(false)
                .case_insensitive(false)
                .build();
            match glob {
                Ok(glob) => {
                    builder.add(glob);
                }
                Err(err) => self.fail(&at, format!("invalid glob `{pattern}`: {}", err.kind())),
            }
        }
        let rejects = builder.build().unwrap_or_else(|err| {
            self.fail(
                &key(&["registration", dataset_type, "rejects"]),
                format!("invalid globs: {err}"),
            );
            GlobSet::empty()
        });
        Source {
            source_dir,
            rejects,
            reject_patterns: raw.rejects.clone(),
        }
    }

    /// Every job must have a schedule and every schedule a job; each is parsed and checked.
    /// A size with its unit (`"2 TB"`, `"500 GiB"`, `"0"`), in bytes.
    fn size(&mut self, parts: &[&str], text: &str) -> Option<u64> {
        let parsed = match text.trim() {
            "0" => Some(0),
            trimmed => trimmed
                .parse::<bytesize::ByteSize>()
                .ok()
                .map(|s| s.as_u64()),
        };
        if parsed.is_none() {
            self.fail(
                &key(parts),
                format!(
                    "`{text}` is not a size: write a number with a unit, such as \"2 TB\" or \"500 GiB\" (\"0\": none)"
                ),
            );
        }
        parsed
    }

    /// `[fixity]`: known copies, a size with its unit, a period, a recall policy.
    fn fixity(&mut self, raw: &RawFixity) -> Option<FixitySettings> {
        let mut ok = true;
        let mut copies = Vec::new();
        if raw.copies.is_empty() {
            self.fail(
                &key(&["fixity", "copies"]),
                "must name at least one copy (archive, staged, source)",
            );
            ok = false;
        }
        for (i, name) in raw.copies.iter().enumerate() {
            match crate::model::CopyKind::from_name(name) {
                Some(copy) if !copies.contains(&copy) => copies.push(copy),
                Some(_) => {}
                None => {
                    self.fail(
                        &at(key(&["fixity", "copies"]), i),
                        format!("unknown copy `{name}` (known: archive, staged, source)"),
                    );
                    ok = false;
                }
            }
        }
        let bytes_per_run = self
            .size(&["fixity", "bytes_per_run"], &raw.bytes_per_run)
            .map(|bytes| (bytes > 0).then_some(bytes));
        let recall = RecallPolicy::from_name(&raw.recall);
        if recall.is_none() {
            self.fail(
                &key(&["fixity", "recall"]),
                format!(
                    "unknown policy `{}` (known: {})",
                    raw.recall,
                    RecallPolicy::NAMES.join(", ")
                ),
            );
        }
        let (Some(bytes_per_run), Some(recall), true) = (bytes_per_run, recall, ok) else {
            return None;
        };
        Some(FixitySettings {
            copies,
            bytes_per_run,
            period: (raw.period_days > 0)
                .then(|| Duration::from_secs(u64::from(raw.period_days) * 86_400)),
            recall,
        })
    }

    fn schedules(
        &mut self,
        raw: &std::collections::BTreeMap<String, RawSchedule>,
    ) -> Vec<(JobName, Schedule)> {
        let mut out = Vec::new();
        for (name, table) in raw {
            let Some(job) = JobName::from_name(name) else {
                self.fail(
                    &key(&["schedules", name]),
                    format!("unknown job `{name}` (known: {})", JobName::names()),
                );
                continue;
            };
            let fields = ScheduleFields {
                cron: table.cron.as_deref(),
                every: table.every.as_deref(),
                timezone: &table.timezone,
                enabled: table.enabled,
                overlap: &table.overlap,
                misfire: &table.misfire,
                jitter: &table.jitter,
            };
            match Schedule::parse(&fields) {
                Ok(schedule) => out.push((job, schedule)),
                Err(problems) => {
                    for (field, message) in problems {
                        self.fail(&key(&["schedules", name, field]), message);
                    }
                }
            }
        }
        for job in JobName::ALL {
            if !raw.contains_key(job.name()) {
                self.fail(
                    &key(&["schedules", job.name()]),
                    "every job needs a schedule (set enabled = false to turn it off)",
                );
            }
        }
        out.sort_by_key(|(job, _)| *job);
        out
    }

    fn kind<K>(
        &mut self,
        section: &str,
        raw: &RawBackend,
        from_name: fn(&str) -> Option<K>,
        names: &[&str],
    ) -> Option<K> {
        let kind = from_name(&raw.kind);
        if kind.is_none() {
            self.fail(
                &key(&[section, "kind"]),
                format!(
                    "unknown {section} backend `{}` (known: {})",
                    raw.kind,
                    names.join(", ")
                ),
            );
        }
        kind
    }

    /// Checks `secrets.required` against the environment; returns the secrets to use and the
    /// warnings for the operator.
    fn secrets(&mut self, raw: &RawSecrets, found: &[SecretValue]) -> (FoundSecrets, Vec<String>) {
        let required_source = self.ctx.source_of(&key(&["secrets", "required"]));
        let mut required = BTreeSet::new();
        for (i, name) in raw.required.iter().enumerate() {
            if SECRETS.iter().any(|spec| spec.name == name) {
                required.insert(name.as_str());
            } else {
                let known: Vec<&str> = SECRETS.iter().map(|spec| spec.name).collect();
                self.fail(
                    &at(key(&["secrets", "required"]), i),
                    format!("unknown secret `{name}` (known: {})", known.join(", ")),
                );
            }
        }
        for secret in found {
            if required.contains(secret.spec.name) && secret.value.is_none() {
                let state = if secret.empty {
                    "is set but empty"
                } else {
                    "is not set"
                };
                self.errors.push(ConfigError::new(
                    format!("secrets.{}", secret.spec.name),
                    "environment",
                    format!(
                        "required secret {state}: set {} (required by secrets.required in \
                         {required_source})",
                        secret.spec.variables()
                    ),
                ));
            }
        }
        let mut warnings = Vec::new();
        let salt = found
            .iter()
            .find(|secret| secret.spec.name == "alias_salt")
            .and_then(|secret| secret.value.clone());
        let salt = salt.unwrap_or_else(|| {
            warnings.push(
                "ALIAS_SALT is not set; using the development salt: stage aliases are predictable"
                    .to_string(),
            );
            DEVELOPMENT_ALIAS_SALT.to_string()
        });
        let value = |name: &str| {
            found
                .iter()
                .find(|secret| secret.spec.name == name)
                .and_then(|secret| secret.value.clone())
        };
        let secrets = FoundSecrets {
            alias_salt: salt,
            api_token: value("api_token"),
            queue_password: value("queue_password"),
            mongo_password: value("mongo_password"),
            postgres_password: value("postgres_password"),
        };
        (secrets, warnings)
    }

    /// The API client's settings; the token is required when the registry is the API.
    fn api(
        &mut self,
        raw: &RawApi,
        kind: Option<RegistryKind>,
        token: Option<String>,
    ) -> Option<ApiSettings> {
        let mut ok = true;
        let base_url = match url::Url::parse(raw.base_url.trim()) {
            Ok(mut url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
                // Relative paths join below the base only when it ends in `/` (spec E.1).
                if !url.path().ends_with('/') {
                    let path = format!("{}/", url.path());
                    url.set_path(&path);
                }
                Some(url)
            }
            Ok(_) => {
                self.fail(
                    &key(&["api", "base_url"]),
                    format!("`{}` is not an http:// or https:// URL", raw.base_url),
                );
                None
            }
            Err(err) => {
                self.fail(
                    &key(&["api", "base_url"]),
                    format!("`{}` is not a URL: {err}", raw.base_url),
                );
                None
            }
        };
        let mut seconds = |name: &str, value: f64| -> Duration {
            match Duration::try_from_secs_f64(value) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    ok = false;
                    self.fail(
                        &key(&["api", name]),
                        format!("must be a number of seconds greater than 0, not {value}"),
                    );
                    Duration::ZERO
                }
            }
        };
        let connect_timeout = seconds("connect_timeout_seconds", raw.connect_timeout_seconds);
        let read_timeout = seconds("read_timeout_seconds", raw.read_timeout_seconds);
        let backoff = seconds("backoff_seconds", raw.backoff_seconds);
        let backoff_max = seconds("backoff_max_seconds", raw.backoff_max_seconds);
        let reported = self.errors.iter().any(|e| e.key == "secrets.api_token");
        if kind == Some(RegistryKind::Http) && token.is_none() && !reported {
            ok = false;
            self.errors.push(ConfigError::new(
                "secrets.api_token",
                "environment",
                "registry.kind = \"http\" needs the API's bearer token: set APP_API_TOKEN or \
                 WORKERS__SECRETS__API_TOKEN",
            ));
        }
        Some(ApiSettings {
            base_url: base_url?,
            token: token.map(SecretString::new),
            connect_timeout,
            read_timeout,
            max_retries: raw.max_retries,
            backoff,
            backoff_max,
        })
        .filter(|_| ok)
    }

    /// The MongoDB connection string: `mongo.uri`, or one built as the original builds it
    /// (`mongodb://USER:PASS@HOST:PORT/DB?authSource=SRC`). Either is checked by the MongoDB
    /// driver's own parser, so what passes here is what the store can connect with (replica
    /// sets, several hosts and every option included).
    fn mongo(
        &mut self,
        raw: &RawMongo,
        kind: Option<StoreKind>,
        password: Option<&str>,
    ) -> Option<MongoSettings> {
        let database = raw.database.trim().to_string();
        if database.is_empty() || database.contains(['/', '\\', '.', ' ', '"', '$', '\0']) {
            self.fail(
                &key(&["mongo", "database"]),
                format!("`{}` is not a MongoDB database name", raw.database),
            );
            return None;
        }
        let (uri, uri_key) = if raw.uri.trim().is_empty() {
            if !raw.user.is_empty() && password.is_none() && kind == Some(StoreKind::Mongo) {
                self.errors.push(ConfigError::new(
                    "secrets.mongo_password",
                    "environment",
                    format!(
                        "mongo.user is `{}` but no password is set: set MONGO_PASS or \
                         WORKERS__SECRETS__MONGO_PASSWORD",
                        raw.user
                    ),
                ));
                return None;
            }
            (built_mongo_uri(raw, &database, password), "host")
        } else {
            (raw.uri.trim().to_string(), "uri")
        };
        if let Err(problem) = check_mongo_uri(&uri) {
            self.fail(&key(&["mongo", uri_key]), problem);
            return None;
        }
        Some(MongoSettings {
            display: redact_uri(&uri),
            uri: SecretString::new(uri),
            database,
        })
    }

    /// The PostgreSQL connection: `postgres.url` parsed by the client's own parser, so that
    /// what passes here is what the backends connect with; required only when a backend is
    /// of kind `postgres`.
    fn postgres(
        &mut self,
        raw: &RawPostgres,
        backends: &MaybeBackends,
        password: Option<String>,
    ) -> Option<PgConfig> {
        let used = backends.registry == Some(RegistryKind::Postgres)
            || backends.store == Some(StoreKind::Postgres)
            || backends.broker == Some(BrokerKind::Postgres);
        let url = raw.url.trim().to_owned();
        if used && url.is_empty() {
            self.fail(
                &key(&["postgres", "url"]),
                "must be set when a backend is of kind \"postgres\" \
                 (postgres://user@host:5432/database)",
            );
            return None;
        }
        if !url.is_empty()
            && let Err(err) = crate::sql::tls::Target::parse(&url)
        {
            self.fail(
                &key(&["postgres", "url"]),
                format!("`{}` is not a PostgreSQL URL: {err:#}", redact_uri(&url)),
            );
            return None;
        }
        if raw.pool_size == 0 || raw.pool_size > 1000 {
            self.fail(
                &key(&["postgres", "pool_size"]),
                format!("must be between 1 and 1000 (found {})", raw.pool_size),
            );
            return None;
        }
        Some(PgConfig {
            display: redact_uri(&url),
            url,
            password,
            pool_size: raw.pool_size,
            connect_timeout: Duration::from_secs(raw.connect_timeout_seconds.max(1)),
            reconnect_max: Duration::from_secs(raw.reconnect_max_seconds),
        })
    }

    /// The RabbitMQ URL: `amqp.url` as QUEUE_URL (`host:port/vhost`) with user and password,
    /// as the original builds it, or a full `amqp://` URL.
    fn amqp(
        &mut self,
        raw: &RawAmqp,
        app_id: &str,
        kind: Option<BrokerKind>,
        password: Option<&str>,
    ) -> Option<AmqpSettings> {
        let text = raw.url.trim();
        let full = text.starts_with("amqp://") || text.starts_with("amqps://");
        let candidate = if full {
            text.to_string()
        } else {
            format!("amqp://{text}")
        };
        let mut url = match url::Url::parse(&candidate) {
            Ok(url) if url.has_host() => url,
            _ => {
                self.fail(
                    &key(&["amqp", "url"]),
                    format!(
                        "`{}` is neither host:port/vhost nor an amqp:// URL",
                        redact_uri(text)
                    ),
                );
                return None;
            }
        };
        if !full || url.username().is_empty() {
            let _ = url.set_username(&raw.user);
            match password {
                Some(password) => {
                    let _ = url.set_password(Some(password));
                }
                None if kind == Some(BrokerKind::Amqp) && raw.user != "guest" => {
                    self.errors.push(ConfigError::new(
                        "secrets.queue_password",
                        "environment",
                        format!(
                            "amqp.user is `{}` but no password is set: set QUEUE_PASS or \
                             WORKERS__SECRETS__QUEUE_PASSWORD",
                            raw.user
                        ),
                    ));
                    return None;
                }
                // RabbitMQ's default account, on a development broker.
                None => {
                    let _ = url.set_password(Some("guest"));
                }
            }
        }
        let mut queues = Vec::new();
        for (i, queue) in raw.queues.iter().enumerate() {
            let queue = queue.trim();
            if queue.is_empty() || queue.len() > 255 {
                self.fail(
                    &at(key(&["amqp", "queues"]), i),
                    "must be a queue name of 1 to 255 bytes",
                );
                return None;
            }
            queues.push(queue.to_string());
        }
        if queues.is_empty() {
            queues.push(format!("{app_id}.q"));
        }
        Some(AmqpSettings {
            uri: SecretString::new(url.to_string()),
            display: redact_uri(url.as_str()),
            queues,
            heartbeat: raw.heartbeat_seconds,
            reconnect_max: Duration::from_secs(raw.reconnect_max_seconds.max(1)),
            max_held: raw.max_held_messages,
            dead_letter_exchange: Some(raw.dead_letter_exchange.trim())
                .filter(|e| !e.is_empty())
                .map(str::to_owned),
        })
    }
}

/// The connection string the original workers build from MONGO_HOST, MONGO_PORT,
/// MONGO_USER, MONGO_PASS and MONGO_AUTH_SOURCE.
fn built_mongo_uri(raw: &RawMongo, database: &str, password: Option<&str>) -> String {
    // Encoded as the driver encodes user information: everything but letters and digits, so
    // that a `%` in a password stays a `%`.
    let encode = |text: &str| {
        percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let host = raw.host.trim();
    let port = raw.port;
    if raw.user.is_empty() {
        return format!("mongodb://{host}:{port}/{database}");
    }
    let user = encode(&raw.user);
    let password = password
        .map(|p| format!(":{}", encode(p)))
        .unwrap_or_default();
    let auth_source = encode(&raw.auth_source);
    format!("mongodb://{user}{password}@{host}:{port}/{database}?authSource={auth_source}")
}

/// Checks a MongoDB connection string with the driver's parser. Its messages may quote the
/// password, so when the string does not parse, the parser only gets to speak about the
/// string with the password redacted.
fn check_mongo_uri(uri: &str) -> Result<(), String> {
    if ConnectionString::parse(uri).is_ok() {
        return Ok(());
    }
    let redacted = redact_uri(uri);
    match ConnectionString::parse(&redacted) {
        Ok(_) => Err(format!(
            "`{redacted}`: the password cannot be read from the connection string; \
             percent-encode `:`, `/`, `?`, `#`, `[`, `]`, `@` and `%` in it"
        )),
        Err(err) => Err(format!(
            "`{redacted}` is not a MongoDB connection string: {}",
            err.kind
        )),
    }
}

/// Only `{year}` may appear in braces in an archive path template.
fn check_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(pos) = rest.find(['{', '}']) {
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("{year}") {
            rest = after;
            continue;
        }
        let placeholder = if tail.starts_with('{') {
            tail.find('}').map_or(tail, |end| &tail[..=end])
        } else {
            "}"
        };
        return Err(format!(
            "unsupported placeholder `{placeholder}` in `{template}`: only {{year}} is replaced"
        ));
    }
    Ok(())
}

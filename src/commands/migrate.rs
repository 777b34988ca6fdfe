//! `workers migrate --from sqlite:PATH --to postgres:URL`: copies the embedded database into
//! PostgreSQL (`sql::copy`), table by table, with a progress line for each and a summary.
//!
//! The source is opened read-only and never migrated. A source with an older schema is refused,
//! with what to do (run a command that writes once, with the configuration that still uses
//! it), rather than migrated in place: an operator moving a site expects the database being
//! moved away from to stay exactly as it was, to go back to, and to be copied as it is. Bringing
//! it up to date is then an ordinary, separate step they take knowingly.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{info, warn};

use super::{Failed, Usage};
use crate::cli::{MigrateArgs, OutputFormat};
use crate::config::{Settings, redact_uri};
use crate::progress::{Progress, RateEstimator};
use crate::sql::copy::{self, COPIED, Mismatch, SKIPPED, TableReport};
use crate::sql::postgres::{PgConfig, PgDb};
use crate::sqlite::Db;
use crate::ui::Display;

/// Connections the copy uses: it runs one transaction at a time.
const POOL_SIZE: u32 = 2;

pub(super) async fn run(
    settings: &Settings,
    args: &MigrateArgs,
    display: Display,
) -> anyhow::Result<ExitCode> {
    let busy_timeout = Duration::from_secs(settings.sqlite.busy_timeout_seconds);
    let source = open_source(&args.from, busy_timeout)?;
    let from = source.path().display().to_string();
    copy::check_tables(&source).await?;
    if args.dry_run {
        // The target's form is checked all the same, so that the command the dry run
        // rehearses is one that runs.
        if let Some(to) = &args.to {
            parse_target(to)?;
        }
        return dry_run(&source, &from, args.format).await;
    }
    let config = target_config(settings, args.to.as_deref())?;
    let to = config.display.clone();
    let target = PgDb::connect(config)
        .await
        .map_err(|err| Usage(format!("cannot use the target database: {err:#}")))?;
    info!(from = %from, to = %to, "Copying the embedded database into PostgreSQL.");
    let started = Instant::now();
    let mut reports = Vec::new();
    for table in COPIED {
        let report = copy_one(&source, &target, table, args.batch_size, &display)
            .await
            .map_err(|err| {
                if err.is::<Mismatch>() {
                    Usage(format!("{err:#}")).into()
                } else {
                    err.context(format!(
                        "the copy into {to} stopped at table `{table}`; run the command again: \
                         it continues where it stopped"
                    ))
                }
            })?;
        reports.push(report);
    }
    // The skipped tables' ids are not handed out again either, as SQLite's AUTOINCREMENT
    // promised: a remote-control request is known by its id.
    for table in SKIPPED {
        copy::set_sequences(&source, &target, table).await?;
    }
    let skipped = skipped_counts(&source).await?;
    let elapsed = started.elapsed();
    let copied: u64 = reports.iter().map(|r| r.copied).sum();
    let present: u64 = reports.iter().map(|r| r.present).sum();
    let rate = copied as f64 / elapsed.as_secs_f64().max(1e-3);
    match args.format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "from": from,
                "to": to,
                "dry_run": false,
                "tables": reports,
                "skipped": skipped_json(&skipped),
                "copied": copied,
                "present": present,
                "other": reports.iter().map(|r| r.other).sum::<u64>(),
                "seconds": elapsed.as_secs_f64(),
            }))?
        ),
        OutputFormat::Table => {
            let mut table = super::table([
                "table",
                "rows",
                "copied",
                "already there",
                "not the source's",
                "seconds",
            ]);
            for r in &reports {
                table.add_row([
                    r.table.to_owned(),
                    r.source_rows.to_string(),
                    r.copied.to_string(),
                    r.present.to_string(),
                    r.other.to_string(),
                    format!("{:.1}", r.seconds),
                ]);
            }
            for (name, rows) in &skipped {
                table.add_row([
                    (*name).to_owned(),
                    rows.to_string(),
                    "skipped".to_owned(),
                    String::new(),
                    String::new(),
                    String::new(),
                ]);
            }
            println!("{table}");
            say!(
                "Copied {copied} rows ({present} already there) of {} tables from `{from}` to \
                 {to} in {:.1} s ({rate:.0} rows/s); skipped {} (only running processes use \
                 them).",
                reports.len(),
                elapsed.as_secs_f64(),
                SKIPPED.join(", ")
            );
            say!(
                "Next: set registry.kind, store.kind and broker.kind to \"postgres\" and \
                 postgres.url, then start the scheduler and the workers."
            );
        }
    }
    info!(
        copied,
        present,
        seconds = elapsed.as_secs_f64(),
        "Copied the database."
    );
    let mixed: Vec<String> = reports
        .iter()
        .filter(|r| r.other > 0)
        .map(|r| format!("`{}` ({})", r.table, r.other))
        .collect();
    if !mixed.is_empty() {
        return Err(Failed(format!(
            "every row of the source is in {to}, but it also holds rows that are not the \
             source's, which it held before this copy: {}; check them before moving the site to \
             it, or copy into a new, empty database",
            mixed.join(", ")
        ))
        .into());
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens the source read-only; a missing file, a file that is not a database and a schema this
/// version cannot copy are usage errors that name the file.
fn open_source(path: &Path, busy_timeout: Duration) -> anyhow::Result<Db> {
    match Db::open_read_only(path, busy_timeout) {
        Ok(Some(db)) => Ok(db),
        Ok(None) => Err(Usage(format!(
            "the source database `{}` does not exist (--from sqlite:PATH names the embedded \
             database, sqlite.path)",
            path.display()
        ))
        .into()),
        Err(err) => {
            let older = schema_version(path)
                .is_some_and(|version| version < crate::sqlite::MIGRATIONS.len());
            if older {
                return Err(Usage(format!(
                    "the source database `{}` has an older schema, and `workers migrate` only \
                     reads its source: bring it up to date first with a command that opens it \
                     for writing, under the configuration that still uses it (for example \
                     `workers status`), then run `workers migrate` again",
                    path.display()
                ))
                .into());
            }
            Err(Usage(format!(
                "cannot read the source database `{}`: {err:#}",
                path.display()
            ))
            .into())
        }
    }
}

/// The schema version SQLite records for the migrations (`user_version`), if it can be read.
fn schema_version(path: &Path) -> Option<usize> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .ok()?;
    usize::try_from(version).ok()
}

/// The target from `--to`, or `postgres.url`; the password as the backends have it.
fn target_config(settings: &Settings, to: Option<&str>) -> anyhow::Result<PgConfig> {
    let configured = &settings.postgres;
    let url = match to {
        Some(text) => parse_target(text)?,
        None if configured.url.trim().is_empty() => {
            return Err(Usage(
                "no target: give --to postgres://user@host:5432/database, or set postgres.url"
                    .to_owned(),
            )
            .into());
        }
        None => configured.url.clone(),
    };
    Ok(PgConfig {
        display: redact_uri(&url),
        url,
        password: configured.password.clone(),
        pool_size: POOL_SIZE,
        connect_timeout: configured.connect_timeout,
        reconnect_max: configured.reconnect_max,
    })
}

/// `postgres://...` or `postgresql://...` as it is; `postgres:` before a URL or before libpq's
/// `host=... dbname=...` form, without it. Checked by the client's own parser, so that what
/// passes here is what it connects with.
fn parse_target(text: &str) -> anyhow::Result<String> {
    let url = if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        text
    } else {
        text.strip_prefix("postgres:")
            .filter(|rest| !rest.trim().is_empty())
            .ok_or_else(|| {
                Usage(format!(
                    "--to `{}`: expected postgres://user@host:5432/database",
                    redact_uri(text)
                ))
            })?
    };
    if let Err(err) = crate::sql::tls::Target::parse(url) {
        return Err(Usage(format!(
            "--to `{}` is not a PostgreSQL URL: {err:#}",
            redact_uri(url)
        ))
        .into());
    }
    Ok(url.to_owned())
}

/// Copies one table with a progress bar (or a log line every few seconds), then sets its id
/// sequences.
async fn copy_one(
    source: &Db,
    target: &PgDb,
    table: &'static str,
    batch_size: u32,
    display: &Display,
) -> anyhow::Result<TableReport> {
    let tracker = display.track(table);
    let progress = Progress::new();
    let mut estimator = RateEstimator::default();
    let mut on_batch = |done: u64, total: u64| {
        if progress.snapshot().total != Some(total) {
            progress.start(table, "rows", Some(total));
        }
        progress.set_done(done);
        tracker.update(&estimator.report(&progress.snapshot(), Instant::now()));
    };
    let copied = copy::copy_table(source, target, table, batch_size as usize, &mut on_batch).await;
    tracker.finish();
    let report = copied?;
    copy::set_sequences(source, target, table).await?;
    if report.copied + report.present != report.source_rows {
        warn!(
            table,
            rows = report.source_rows,
            copied = report.copied,
            present = report.present,
            "The source changed during the copy (are workers still running on it?); run the \
             command again once they are stopped."
        );
    }
    info!(
        table,
        copied = report.copied,
        present = report.present,
        seconds = format!("{:.1}", report.seconds),
        "Copied a table."
    );
    Ok(report)
}

async fn skipped_counts(source: &Db) -> anyhow::Result<Vec<(&'static str, u64)>> {
    let mut counts = Vec::new();
    for table in SKIPPED {
        counts.push((*table, copy::source_count(source, table).await?));
    }
    Ok(counts)
}

fn skipped_json(skipped: &[(&str, u64)]) -> serde_json::Value {
    skipped
        .iter()
        .map(|(table, rows)| json!({"table": table, "source_rows": rows}))
        .collect()
}

/// `--dry-run`: what each table of the source holds; connects to nothing.
async fn dry_run(source: &Db, from: &str, format: OutputFormat) -> anyhow::Result<ExitCode> {
    let mut counts = Vec::new();
    for table in COPIED {
        counts.push((*table, copy::source_count(source, table).await?));
    }
    let skipped = skipped_counts(source).await?;
    let total: u64 = counts.iter().map(|(_, rows)| rows).sum();
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "from": from,
                "dry_run": true,
                "tables": counts
                    .iter()
                    .map(|(table, rows)| json!({"table": table, "source_rows": rows}))
                    .collect::<Vec<_>>(),
                "skipped": skipped_json(&skipped),
                "rows": total,
            }))?
        ),
        OutputFormat::Table => {
            let mut table = super::table(["table", "rows", "copied"]);
            for (name, rows) in &counts {
                table.add_row([(*name).to_owned(), rows.to_string(), "yes".to_owned()]);
            }
            for (name, rows) in &skipped {
                table.add_row([
                    (*name).to_owned(),
                    rows.to_string(),
                    "no: only running processes use it".to_owned(),
                ]);
            }
            println!("{table}");
            say!(
                "Dry run: {total} rows of {} tables in `{from}` would be copied (rows the \
                 target already holds are skipped); nothing was written or connected to.",
                counts.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_forms() {
        let url = "postgres://u@h:5432/d";
        assert_eq!(parse_target(url).unwrap(), url);
        assert_eq!(parse_target(&format!("postgres:{url}")).unwrap(), url);
        assert_eq!(
            parse_target("postgres:host=h dbname=d").unwrap(),
            "host=h dbname=d"
        );
        for bad in ["mysql://u@h/d", "postgres:", "h:5432/d"] {
            let err = parse_target(bad).unwrap_err();
            assert!(err.is::<Usage>(), "{bad}: {err:#}");
            assert!(err.to_string().contains(bad), "{err}");
        }
        let err = parse_target("postgres://u:secret@h:notaport/d").unwrap_err();
        assert!(err.is::<Usage>());
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}

//! `workers doctor`: checks the configuration, the directories, each backend and the clocks
//! one by one, and says for each what is wrong and what to do. Exit 0 when every check
//! passes, 1 otherwise.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::HumanBytes;
use serde_json::json;

use super::EXIT_FAILED;
use crate::app::App;
use crate::cli::OutputFormat;
use crate::config::{BrokerKind, LoadOptions, RegistryKind, Settings, StoreKind};
use crate::jobs::JobName;
use crate::registry::DatasetQuery;
use crate::steps::capacity::file_systems_of;

/// The most a store's clock may differ from ours: leases of 15 s are judged by the store's.
const MAX_SKEW: chrono::Duration = chrono::Duration::seconds(2);

/// How long a backend has to answer one check.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// One check: what was looked at, whether it passed, what was found, and what to do.
struct Check {
    area: &'static str,
    ok: bool,
    detail: String,
    fix: Option<String>,
}

impl Check {
    fn pass(area: &'static str, detail: impl Into<String>) -> Check {
        Check {
            area,
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(area: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            area,
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

pub(super) async fn run(load: &LoadOptions, format: OutputFormat) -> anyhow::Result<ExitCode> {
    let checks = match crate::config::load(load) {
        Err(errors) => vec![Check::fail(
            "configuration",
            errors.to_string(),
            "correct the keys named above (`workers config check` lists them with where each value came from)",
        )],
        Ok(settings) => checks(settings).await,
    };
    let healthy = checks.iter().all(|c| c.ok);
    match format {
        OutputFormat::Json => {
            let items: Vec<_> = checks
                .iter()
                .map(|c| json!({"check": c.area, "ok": c.ok, "detail": c.detail, "fix": c.fix}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"ok": healthy, "checks": items}))?
            );
        }
        OutputFormat::Table => {
            for check in &checks {
                let mark = if check.ok { '✔' } else { '✘' };
                let mut lines = check.detail.lines();
                say!(
                    "{mark} {}: {}",
                    check.area,
                    lines.next().unwrap_or_default()
                );
                for line in lines {
                    say!("    {line}");
                }
                if let Some(fix) = &check.fix {
                    say!("    → {fix}");
                }
            }
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

async fn checks(settings: Settings) -> Vec<Check> {
    let mut checks = vec![Check::pass(
        "configuration",
        format!("valid ({})", settings.sources.join(", ")),
    )];
    checks.extend(directories(&settings));
    let app = match tokio::time::timeout(ANSWER_WITHIN * 3, App::build(settings.clone())).await {
        Ok(Ok(app)) => app,
        Ok(Err(err)) => {
            checks.push(Check::fail(
                "store",
                format!("{err:#}"),
                match settings.backends.store {
                    StoreKind::Mongo => "check mongo.uri (or MONGO_HOST, MONGO_PORT, MONGO_DB), MONGO_PASS, that MongoDB runs, and that the user may create indexes",
                    StoreKind::Sqlite => "check sqlite.path: its directory must exist and be writable by the service user",
                    StoreKind::Postgres => "check postgres.url and PGPASSWORD, that PostgreSQL runs and is reachable from this host, and that the user may create tables in the database",
                },
            ));
            checks.push(Check::fail(
                "backends",
                "not checked: the app could not be built",
                "fix the store first",
            ));
            return checks;
        }
        Err(_) => {
            checks.push(Check::fail(
                "store",
                format!("no answer within {} s", (ANSWER_WITHIN * 3).as_secs()),
                "check that the database server runs and is reachable from this host",
            ));
            return checks;
        }
    };
    if let Some(check) = database_tls(&settings).await {
        checks.push(check);
    }
    checks.push(Check::pass(
        "store",
        match settings.backends.store {
            StoreKind::Sqlite => format!(
                "the embedded database `{}` opens, schema current",
                settings.sqlite.path.display()
            ),
            StoreKind::Postgres => format!(
                "PostgreSQL at {} answers, schema current",
                settings.postgres.display
            ),
            StoreKind::Mongo => format!(
                "MongoDB at {} answers; the indexes are in place",
                settings.mongo.display
            ),
        },
    ));
    checks.push(clock(&app).await);
    checks.push(broker(&app).await);
    if let Some(check) = archive(&app).await {
        checks.push(check);
    }
    checks.extend(registry(&app).await);
    checks.extend(space(&app).await);
    checks
}

/// Every configured directory: there, a directory, and usable by the service user (written
/// to, or for source directories read).
fn directories(settings: &Settings) -> Vec<Check> {
    let service_uid = if rustix::process::geteuid().is_root() && settings.service_user != "root" {
        match uid_of(&settings.service_user) {
            Some(uid) => Some(uid),
            None => {
                return vec![Check::fail(
                    "directories",
                    format!(
                        "the service user `{}` does not exist",
                        settings.service_user
                    ),
                    "create it (the Debian package's sysusers file does), or set service_user",
                )];
            }
        }
    } else {
        None
    };
    let mut problems = Vec::new();
    let all = settings.directories();
    for (key, path) in &all {
        let read_only = key.starts_with("registration.");
        if let Some(problem) = directory_problem(path, read_only, service_uid) {
            problems.push(Check::fail(
                "directories",
                format!("{key} `{}`: {}", path.display(), problem.0),
                problem.1,
            ));
        }
    }
    if problems.is_empty() {
        vec![Check::pass(
            "directories",
            format!(
                "{} configured directories exist and are usable by `{}`",
                all.len(),
                settings.service_user
            ),
        )]
    } else {
        problems
    }
}

/// What is wrong with a directory, and what to do.
fn directory_problem(
    path: &Path,
    read_only: bool,
    service_uid: Option<u32>,
) -> Option<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Some((
                "missing".into(),
                "`workers paths check --create` creates the missing directories".into(),
            ));
        }
        Err(err) => return Some((err.to_string(), "check the path and its parents".into())),
        Ok(meta) => meta,
    };
    if !meta.is_dir() {
        return Some((
            "not a directory".into(),
            "move the file away or point the key elsewhere".into(),
        ));
    }
    if let Some(uid) = service_uid {
        if !read_only && meta.uid() != uid {
            return Some((
                format!("owned by uid {}, not by the service user", meta.uid()),
                format!("chown -R {uid} {}", path.display()),
            ));
        }
        return None;
    }
    let access = if read_only {
        rustix::fs::Access::READ_OK | rustix::fs::Access::EXEC_OK
    } else {
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK
    };
    rustix::fs::access(path, access).err().map(|err| {
        (
            format!(
                "not {} by this user ({err})",
                if read_only { "readable" } else { "writable" }
            ),
            format!("chown or chmod `{}` for the service user", path.display()),
        )
    })
}

/// The uid of `user` in /etc/passwd.
fn uid_of(user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == user)
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })
}

async fn clock(app: &App) -> Check {
    match app.scheduler_store.server_time().await {
        Ok(None) => Check::pass(
            "clock",
            "the store is on this host: one clock judges leases and claims",
        ),
        Ok(Some(server)) => {
            let skew = server - chrono::Utc::now();
            if skew.abs() <= MAX_SKEW {
                Check::pass(
                    "clock",
                    format!(
                        "the store's clock is {} ms from this host's",
                        skew.num_milliseconds()
                    ),
                )
            } else {
                Check::fail(
                    "clock",
                    format!(
                        "the store's clock is {} s from this host's",
                        skew.num_seconds()
                    ),
                    "synchronise the clocks (chrony or systemd-timesyncd); leases are judged by the store's clock, but logs and schedules use this host's",
                )
            }
        }
        Err(err) => Check::fail(
            "clock",
            format!("cannot read the store's clock: {err:#}"),
            "check the store",
        ),
    }
}

/// Whether connections to the PostgreSQL database are encrypted, when a backend uses it:
/// `sslmode=prefer` (the default) goes without TLS, silently, when the server offers none.
async fn database_tls(settings: &Settings) -> Option<Check> {
    let backends = &settings.backends;
    if backends.registry != RegistryKind::Postgres
        && backends.store != StoreKind::Postgres
        && backends.broker != BrokerKind::Postgres
    {
        return None;
    }
    let asked = tokio::time::timeout(
        ANSWER_WITHIN,
        crate::sql::postgres::PgDb::tls_in_use(settings.postgres.clone()),
    )
    .await;
    Some(match asked {
        Ok(Ok(Some(version))) => Check::pass(
            "database TLS",
            format!(
                "connections to {} are encrypted ({version})",
                settings.postgres.display
            ),
        ),
        Ok(Ok(None)) => Check::pass(
            "database TLS",
            format!(
                "connections to {} are not encrypted (sslmode=disable, or a server that offers \
                 no TLS); between hosts, set sslmode=verify-full in postgres.url",
                settings.postgres.display
            ),
        ),
        Ok(Err(err)) => Check::fail(
            "database TLS",
            format!("{err:#}"),
            "check sslmode and sslrootcert in postgres.url against the server's certificate, \
             and sslcert and sslkey where the server authenticates by certificate",
        ),
        Err(_) => Check::fail(
            "database TLS",
            format!("no answer within {} s", ANSWER_WITHIN.as_secs()),
            "check that PostgreSQL runs and is reachable from this host",
        ),
    })
}

async fn broker(app: &App) -> Check {
    let settings = &app.settings;
    if settings.backends.broker == BrokerKind::Embedded {
        return Check::pass("broker", "the embedded queue, in the embedded database");
    }
    if settings.backends.broker == BrokerKind::Postgres {
        return Check::pass(
            "broker",
            format!("the queue in PostgreSQL at {}", settings.postgres.display),
        );
    }
    let checked = tokio::time::timeout(ANSWER_WITHIN, async {
        app.broker.check_reachable().await?;
        app.broker.check_queues().await
    })
    .await;
    match checked {
        Ok(Ok(())) => Check::pass(
            "broker",
            format!(
                "RabbitMQ at {} answers; queue(s) {} declared as the workers declare them",
                settings.amqp.display,
                settings.amqp.queues.join(", ")
            ),
        ),
        Ok(Err(err)) => {
            let text = format!("{err:#}");
            let fix = if text.contains("delete --yes") {
                "see above".to_owned()
            } else {
                "check amqp.url, amqp.user and QUEUE_PASS, and that RabbitMQ runs and lets the user declare queues".to_owned()
            };
            Check::fail("broker", text, fix)
        }
        Err(_) => Check::fail(
            "broker",
            format!(
                "RabbitMQ at {} did not answer within {} s",
                settings.amqp.display,
                ANSWER_WITHIN.as_secs()
            ),
            "check amqp.url and that RabbitMQ runs",
        ),
    }
}

/// An archive that has something to ask (HPSS): whether `hsi` runs and is let in.
async fn archive(app: &App) -> Option<Check> {
    let cancel = crate::cancel::CancellationToken::new();
    match tokio::time::timeout(ANSWER_WITHIN, app.archive.check(&cancel)).await {
        Ok(Ok(None)) => None,
        Ok(Ok(Some(answer))) => Some(Check::pass(
            "archive",
            format!("{} answers: {answer}", app.archive.describe()),
        )),
        Ok(Err(err)) => Some(Check::fail(
            "archive",
            format!("{:#}", anyhow::Error::new(err)),
            "check hsi.command (found on PATH?) and the service user's HPSS credentials (keytab); `hsi pwd` as that user must answer",
        )),
        Err(_) => {
            cancel.cancel();
            Some(Check::fail(
                "archive",
                format!("hsi did not answer within {} s", ANSWER_WITHIN.as_secs()),
                "check that HPSS is reachable from this host",
            ))
        }
    }
}

async fn registry(app: &App) -> Vec<Check> {
    let settings = &app.settings;
    if settings.backends.registry == RegistryKind::Sqlite {
        return vec![Check::pass(
            "registry",
            "the embedded registry, in the embedded database",
        )];
    }
    if settings.backends.registry == RegistryKind::Postgres {
        return vec![Check::pass(
            "registry",
            format!(
                "the registry in PostgreSQL at {}",
                settings.postgres.display
            ),
        )];
    }
    let base = settings.api.base_url.as_str();
    let query = DatasetQuery {
        limit: Some(1),
        ..DatasetQuery::default()
    };
    let mut checks = Vec::new();
    match tokio::time::timeout(ANSWER_WITHIN, app.registry.find(&query)).await {
        Ok(Ok(_)) => checks.push(Check::pass(
            "registry",
            format!("the Bioloop API at {base} answers and accepts the token"),
        )),
        Ok(Err(err)) => {
            checks.push(Check::fail(
                "registry",
                format!("{:#}", anyhow::Error::new(err)),
                "check api.base_url, that the API runs, and APP_API_TOKEN (a token of the service user, issued by the API's issue_token script)",
            ));
            return checks;
        }
        Err(_) => {
            checks.push(Check::fail(
                "registry",
                format!(
                    "the Bioloop API at {base} did not answer within {} s",
                    ANSWER_WITHIN.as_secs()
                ),
                "check api.base_url and that the API runs",
            ));
            return checks;
        }
    }
    let metrics_on = app
        .settings
        .schedule(JobName::Metrics)
        .is_some_and(|s| s.enabled);
    if metrics_on {
        match app.registry.may_post_metrics().await {
            Ok(Some(false)) => checks.push(Check::fail(
                "registry",
                "the token may not record metrics: the API gives metrics:create to the admin role only",
                "set APP_API_TOKEN to an admin's token, or disable [schedules.metrics]",
            )),
            Ok(_) => checks.push(Check::pass(
                "registry",
                "the token may record metrics (admin role)",
            )),
            Err(err) => checks.push(Check::fail(
                "registry",
                format!(
                    "cannot tell whether the token may record metrics: {:#}",
                    anyhow::Error::new(err)
                ),
                "check the API",
            )),
        }
    }
    checks
}

/// Free space beyond the headroom on every file system the workers write to.
async fn space(app: &App) -> Vec<Check> {
    let settings = &app.settings;
    let headroom = settings.capacity.headroom;
    let dirs: Vec<(String, std::path::PathBuf)> = settings
        .directories()
        .into_iter()
        .filter(|(key, _)| !key.starts_with("registration."))
        .collect();
    let (spaces, _) = crate::compute::blocking(move || file_systems_of(dirs)).await;
    let mut checks = Vec::new();
    for (space, _) in spaces {
        let mount = space.mount.display().to_string();
        if space.free <= headroom {
            checks.push(Check::fail(
                "free space",
                format!(
                    "`{mount}` has {} free, no more than capacity.headroom ({}): steps that write there wait",
                    HumanBytes(space.free),
                    HumanBytes(headroom)
                ),
                "free space there (`workers jobs run purge_staged_datasets`) or lower capacity.headroom",
            ));
        } else {
            checks.push(Check::pass(
                "free space",
                format!(
                    "`{mount}`: {} free, {:.1}% used",
                    HumanBytes(space.free),
                    space.used_percent()
                ),
            ));
        }
    }
    checks
}

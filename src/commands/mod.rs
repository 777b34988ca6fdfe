//! One function per subcommand: load the configuration, build the app, call the core, print.
//! No business rules live here.

/// `println!` for a line that shows names from outside (directories, datasets, errors): its
/// control characters are escaped, so it stays one line and cannot drive the terminal.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", $crate::ui::Escaped(format_args!($($arg)*)))
    };
}

mod config;
mod control;
mod datasets;
mod doctor;
mod jobs;
mod manual;
mod migrate;
mod paths;
mod queue;
mod register;
mod scheduler;
mod status;
mod uploads;
mod verify;
mod worker;
mod workflows;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use comfy_table::{Table, presets};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::app::App;
use crate::cli::{Cli, Command, LogFormat};
use crate::config::{ConfigErrors, FlagValue, LoadOptions, Settings};
use crate::registry::DatasetQuery;
use crate::store::TaskStatus;
use crate::ui::{Display, EscapedFields, escape_controls};
use crate::workflow::engine;
use crate::workflow::worker::{Until, WorkerOptions};
use tracing_subscriber::EnvFilter;

/// Exit status 1: the command ran, but something it did failed (a workflow, a registration).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Failed(pub String);

/// Exit status 2: the command was used wrongly (bad arguments, unknown dataset, ...).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

/// The exit status for an error: 2 for configuration and usage problems, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    let usage = err.is::<ConfigErrors>()
        || err.is::<crate::app::DefinitionErrors>()
        || err.is::<crate::jobs::register::InvalidInput>()
        || err.is::<Usage>();
    ExitCode::from(if usage { EXIT_USAGE } else { EXIT_FAILED })
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Completions { shell } => return manual::completions(*shell),
        Command::Man { dir } => return manual::man(dir.as_deref()),
        _ => {}
    }
    let load = LoadOptions::from_process(cli.config_dir.clone(), flags(&cli));
    if let Command::Doctor { format } = &cli.command {
        return doctor::run(&load, *format).await;
    }
    if let Command::Config(cmd) = &cli.command {
        return config::run(&load, cmd);
    }
    if let Command::Uploads(cmd) = &cli.command
        && uploads::needs_no_app(cmd)
    {
        return uploads::run_without_app(&load, cmd).await;
    }
    let settings = crate::config::load(&load)?;
    // Needs the configuration only: no backend, no database.
    if let Command::Paths(cmd) = cli.command {
        return paths::run(&settings, cmd);
    }
    let interactive = !matches!(cli.command, Command::Worker(_) | Command::Scheduler);
    let display = Display::new(interactive);
    init_logging(&settings, &display);
    // Look-ups change nothing and create nothing (not even the database), and warnings about
    // the configuration matter to commands that do work, not to them.
    let looks_up = matches!(
        cli.command,
        Command::Datasets(_)
            | Command::Queue(crate::cli::QueueCommand::DeadLetters { .. })
            | Command::Uploads(
                crate::cli::UploadsCommand::List { .. } | crate::cli::UploadsCommand::Show { .. }
            )
            | Command::Workflows(
                crate::cli::WorkflowsCommand::List { .. }
                    | crate::cli::WorkflowsCommand::Show { .. }
            )
            | Command::Jobs(
                crate::cli::JobsCommand::List { .. } | crate::cli::JobsCommand::History { .. }
            )
    );
    for warning in &settings.warnings {
        if looks_up {
            tracing::debug!("{warning}");
        } else {
            warn!("{warning}");
        }
    }
    // Opens its own databases: the source read-only, whatever the backends are configured as.
    if let Command::Migrate(args) = &cli.command {
        return migrate::run(&settings, args, display).await;
    }
    let app = if looks_up {
        App::build_read_only(settings).await?
    } else {
        App::build(settings).await?
    };
    match cli.command {
        Command::Config(_)
        | Command::Paths(_)
        | Command::Completions { .. }
        | Command::Doctor { .. }
        | Command::Migrate(_)
        | Command::Man { .. } => unreachable!("handled above"),
        Command::Uploads(cmd) => uploads::run(&app, cmd).await,
        Command::Jobs(cmd) => jobs::run(&app, cmd, display).await,
        Command::Register(args) => register::run(&app, args, display).await,
        Command::Workflows(cmd) => workflows::run(&app, cmd, display).await,
        Command::Datasets(cmd) => datasets::run(&app, cmd).await,
        Command::Verify(args) => verify::run(&app, args).await,
        Command::Status { format } => status::run(&app, format).await,
        Command::Queue(cmd) => queue::run(&app, cmd).await,
        Command::Control(cmd) => control::run(&app, cmd).await,
        Command::Worker(args) => worker::run(&app, args).await,
        Command::Scheduler => scheduler::run(&app, load).await,
    }
}

/// The configuration keys the global options set: a layer above the environment, so a bad
/// value is reported like any other.
fn flags(cli: &Cli) -> Vec<FlagValue> {
    let mut flags = Vec::new();
    if let Some(level) = &cli.log_level {
        flags.push(FlagValue {
            flag: "--log-level".to_owned(),
            key: "log.level".to_owned(),
            value: level.clone(),
        });
    }
    if let Some(format) = cli.log_format {
        let value = match format {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        };
        flags.push(FlagValue {
            flag: "--log-format".to_owned(),
            key: "log.format".to_owned(),
            value: value.to_owned(),
        });
    }
    flags
}

fn init_logging(settings: &Settings, display: &Display) {
    // Loading validated the filter with this same parser.
    let filter = EnvFilter::try_new(settings.log.filter())
        .unwrap_or_else(|_| EnvFilter::new("warn,workers=info"));
    let json = settings.log.format == "json";
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(display.log_writer());
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder
            .fmt_fields(EscapedFields)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// Turns Ctrl-C and SIGTERM into a stop signal for the worker loop; `announce` is logged
/// when it comes.
fn stop_on_signals(announce: &str) -> watch::Receiver<bool> {
    let announce = announce.to_owned();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate => {}
        }
        warn!("{announce}");
        let _ = tx.send(true);
    });
    rx
}

/// Runs in-process workers until the queue is idle (a stop signal ends them early).
pub(crate) async fn run_until_idle(app: &Arc<App>, display: Display) -> anyhow::Result<()> {
    let stop = stop_on_signals("Stopping: running steps are interrupted and will run again later.");
    let opts = WorkerOptions {
        concurrency: app.settings.worker.concurrency,
        until: Until::Idle,
        queues: None,
        shutdown_grace: std::time::Duration::ZERO,
        // A node name of its own (a worker or scheduler may run on this host too), so that it
        // has a mailbox and answers remote control while it waits.
        node_name: format!("run-{}@{}", app.identity.pid, app.identity.hostname),
        send_events: false,
    };
    crate::workflow::worker::run(Arc::clone(app), opts, stop.clone(), display).await?;
    if *stop.borrow() {
        return Err(
            Failed("interrupted; the workflows carry on with the next worker".to_owned()).into(),
        );
    }
    Ok(())
}

/// How often the whole `--wait` run's line is brought up to date.
const OVERALL_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs every active workflow to its end in this process (`--wait`), then prints a summary of
/// `started` and of every workflow that was active before (left by an interrupted run, for
/// example). Fails (exit 1) if any of them did not succeed.
pub(crate) async fn wait_for(
    app: &Arc<App>,
    started: &[String],
    display: Display,
) -> anyhow::Result<ExitCode> {
    let mut workflow_ids: Vec<String> = started.to_vec();
    for workflow in app
        .store
        .workflows(crate::store::WorkflowFilter::Active, 10_000)
        .await?
    {
        if !workflow_ids.contains(&workflow.id) {
            workflow_ids.push(workflow.id);
        }
    }
    // One line for the whole run beside the steps' own: workflows done of all, rate, time left.
    let (stop_overall, mut stopped) = tokio::sync::watch::channel(false);
    let overall = tokio::spawn({
        let (app, tracker, total) = (
            Arc::clone(app),
            display.track("all workflows"),
            workflow_ids.len() as u64,
        );
        let ids: std::collections::HashSet<String> = workflow_ids.iter().cloned().collect();
        async move {
            let progress = crate::progress::Progress::new();
            progress.start("workflows", "workflows", Some(total));
            let mut estimator = crate::progress::RateEstimator::default();
            loop {
                if let Ok(active) = app
                    .store
                    .workflows(crate::store::WorkflowFilter::Active, 10_000)
                    .await
                {
                    let running = active.iter().filter(|w| ids.contains(&w.id)).count() as u64;
                    progress.set_done(total.saturating_sub(running));
                    tracker.update(&estimator.report(&progress.snapshot(), Instant::now()));
                }
                tokio::select! {
                    _ = tokio::time::sleep(OVERALL_EVERY) => {}
                    _ = stopped.changed() => break,
                }
            }
            tracker.finish();
        }
    });
    let ran = run_until_idle(app, display).await;
    let _ = stop_overall.send(true);
    let _ = overall.await;
    ran?;
    let mut table = table([
        "dataset", "type", "workflow", "status", "state", "files", "bytes", "duration",
    ]);
    let mut unsuccessful = 0;
    for id in &workflow_ids {
        let Some(workflow) = app.store.workflow(id).await? else {
            continue;
        };
        let view = engine::view(app, workflow).await?;
        let query = DatasetQuery {
            workflow_id: Some(id.clone()),
            include_deleted: true,
            ..Default::default()
        };
        let dataset = app.registry.find(&query).await?.into_iter().next();
        if view.derived.status != TaskStatus::Success {
            unsuccessful += 1;
        }
        let duration = view
            .workflow
            .updated_at
            .map(|end| {
                format!(
                    "{:.2} s",
                    (end - view.workflow.created_at).num_milliseconds() as f64 / 1000.0
                )
            })
            .unwrap_or_default();
        table.add_row([
            dataset
                .as_ref()
                .map(|d| d.name.to_string())
                .unwrap_or_default(),
            dataset
                .as_ref()
                .map(|d| d.dataset_type.to_string())
                .unwrap_or_default(),
            view.workflow.name.clone(),
            view.derived.status.to_string(),
            dataset
                .as_ref()
                .and_then(|d| d.latest_state().map(str::to_owned))
                .unwrap_or_default(),
            dataset
                .as_ref()
                .and_then(|d| d.num_files)
                .map(|n| n.to_string())
                .unwrap_or_default(),
            dataset
                .as_ref()
                .and_then(|d| d.size)
                .map(|n| indicatif::HumanBytes(n).to_string())
                .unwrap_or_default(),
            duration,
        ]);
    }
    if !workflow_ids.is_empty() {
        println!("{table}");
    }
    if unsuccessful > 0 {
        return Err(Failed(format!(
            "{unsuccessful} of {} workflows did not succeed; see `workers workflows show ID`",
            workflow_ids.len()
        ))
        .into());
    }
    info!(workflows = workflow_ids.len(), "All workflows succeeded.");
    Ok(ExitCode::SUCCESS)
}

/// A table in the style every command prints.
pub(crate) fn table<const N: usize>(header: [&str; N]) -> Listing {
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED);
    table.set_header(header);
    Listing(table)
}

/// A table whose cells have their control characters escaped: a cell holding a newline would
/// otherwise become two rows.
pub(crate) struct Listing(Table);

impl Listing {
    pub(crate) fn add_row<S: AsRef<str>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.0.add_row(
            cells
                .into_iter()
                .map(|cell| escape_controls(cell.as_ref()).into_owned()),
        );
    }
}

impl std::fmt::Display for Listing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Finds a dataset by id or exact name (normalized).
pub(crate) async fn find_dataset(
    app: &App,
    key: &str,
    dataset_type: Option<crate::model::DatasetType>,
) -> anyhow::Result<crate::registry::Dataset> {
    if let Ok(id) = key.parse::<i64>() {
        return match app.registry.get(id).await {
            Ok(dataset) => Ok(dataset),
            Err(crate::registry::RegistryError::NotFound(_)) => {
                Err(Usage(format!("no dataset has the id {id}")).into())
            }
            Err(err) => Err(err.into()),
        };
    }
    let name =
        crate::model::DatasetName::normalize(key).map_err(|e| Usage(format!("`{key}`: {e}")))?;
    let query = DatasetQuery {
        dataset_type,
        name: Some(name.clone()),
        ..Default::default()
    };
    let mut found = app.registry.find(&query).await?;
    match found.len() {
        0 => Err(Usage(format!("no dataset is named `{name}`")).into()),
        1 => Ok(found.remove(0)),
        _ => Err(Usage(format!(
            "both a RAW_DATA and a DATA_PRODUCT dataset are named `{name}`; add --type"
        ))
        .into()),
    }
}

//! `workers scheduler`: every job on its schedule, with systemd readiness and watchdog,
//! SIGHUP reload and a graceful SIGTERM.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::app::App;
use crate::cancel::CancellationToken;
use crate::config::LoadOptions;
use crate::jobs::{self, JobName, JobOptions};
use crate::scheduler::runtime::{self, Clock, Control, Event, JobRunner, Options};
use crate::store::{RunOutcome, Trigger};
use crate::ui::Display;
use crate::workflow::worker::{self, Until, WorkerOptions};

/// Runs jobs with the current app; a reload swaps the app in for the runs that follow.
struct AppRunner {
    app: RwLock<Arc<App>>,
}

impl AppRunner {
    fn current(&self) -> Arc<App> {
        Arc::clone(&self.app.read().unwrap_or_else(|e| e.into_inner()))
    }
}

impl JobRunner for AppRunner {
    fn run(
        &self,
        job: JobName,
        trigger: Trigger,
        slot: Option<DateTime<Utc>>,
        cancel: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let app = self.current();
        let opts = JobOptions {
            cancel,
            ..JobOptions::default()
        };
        Box::pin(async move {
            if let Err(err) = jobs::execute(app, job, trigger, slot, opts).await {
                error!(job = %job, error = %format!("{err:#}"), "Could not record the job run.");
            }
        })
    }
}

pub(super) async fn run(app: &Arc<App>, load: LoadOptions) -> anyhow::Result<ExitCode> {
    let holder = app.identity.holder();
    abandon_dead_runs(app).await;
    let _metrics = match app.settings.prometheus_listen {
        Some(addr) => {
            let server = crate::metrics::serve(addr).await?;
            crate::metrics::load_last_successes(app.scheduler_store.as_ref()).await;
            Some(server)
        }
        None => None,
    };

    let runner = Arc::new(AppRunner {
        app: RwLock::new(Arc::clone(app)),
    });
    let (control_tx, control_rx) = mpsc::channel(4);
    tokio::spawn(handle_signals(load, Arc::clone(&runner), control_tx));

    // In-process workers run workflow steps alongside (embedded profile).
    let (stop_workers, workers_stopped) = watch::channel(false);
    let workers = (app.settings.scheduler.workers > 0).then(|| {
        // Stopped after the scheduler's own grace has run out: running steps are interrupted
        // at once and their messages go back to the queue.
        let opts = WorkerOptions {
            concurrency: app.settings.scheduler.workers,
            until: Until::Shutdown,
            queues: None,
            shutdown_grace: std::time::Duration::ZERO,
            // Its own node name, so that it and a `workers worker` on the same host (default
            // `workers@%h`) each have a mailbox.
            node_name: format!("scheduler@{}", app.identity.hostname),
            send_events: false,
        };
        tokio::spawn(worker::run(
            Arc::clone(app),
            opts,
            workers_stopped,
            Display::quiet(),
        ))
    });

    let opts = Options {
        holder,
        lease: app.settings.scheduler.lease,
        grace: app.settings.scheduler.grace,
        clock: Clock::System,
        watchdog: sd_notify::watchdog_enabled(),
    };
    let notify = |event: Event| {
        let state = match event {
            Event::Ready => sd_notify::NotifyState::Ready,
            Event::Alive => sd_notify::NotifyState::Watchdog,
        };
        if let Err(err) = sd_notify::notify(&[state]) {
            warn!(error = %err, "Cannot notify systemd.");
        }
    };
    let store = Arc::clone(&app.scheduler_store);
    runtime::run(
        opts,
        app.settings.schedules.clone(),
        store,
        runner,
        control_rx,
        notify,
    )
    .await?;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);

    let _ = stop_workers.send(true);
    if let Some(workers) = workers {
        let _ = workers.await;
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT stop the scheduler; SIGHUP reloads the configuration, keeping the
/// current one if the new one is invalid.
async fn handle_signals(load: LoadOptions, runner: Arc<AppRunner>, control: mpsc::Sender<Control>) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        error!("Cannot listen for signals.");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                match reload(&load).await {
                    Ok(app) => {
                        let schedules = app.settings.schedules.clone();
                        *runner.app.write().unwrap_or_else(|e| e.into_inner()) = app;
                        let _ = control.send(Control::Reload(schedules)).await;
                        info!("Configuration reloaded.");
                    }
                    Err(err) => error!("The new configuration is invalid; keeping the current one:\n{err:#}"),
                }
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
    info!("Stopping: no more jobs are started.");
    let _ = control.send(Control::Shutdown).await;
}

async fn reload(load: &LoadOptions) -> anyhow::Result<Arc<App>> {
    // The environment and .env are read again: they may have changed too.
    let fresh = LoadOptions::from_process(Some(load.config_dir.clone()), load.flags.clone());
    // Reading the files is file-system work: off the runtime threads, like every other.
    let settings = crate::compute::blocking(move || crate::config::load(&fresh)).await?;
    App::build(settings).await
}

/// Runs that a scheduler of this host left running when it died are marked failed, so the
/// history does not show them running forever.
async fn abandon_dead_runs(app: &App) {
    let Ok(runs) = app.scheduler_store.runs(None, 1000).await else {
        return;
    };
    let mut dead: Vec<String> = runs
        .into_iter()
        .filter(|r| r.outcome == RunOutcome::Running && app.identity.is_dead_owner(&r.host))
        .map(|r| r.host)
        .collect();
    dead.sort();
    dead.dedup();
    for host in dead {
        let reason = "abandoned: the process running it stopped before it finished";
        if let Ok(n) = app
            .scheduler_store
            .abandon_runs(&host, reason, Utc::now())
            .await
        {
            warn!(host = %host, runs = n, "Marked runs of a stopped process as failed.");
        }
    }
}

//! The long-running loop: sleeps until the next job is due, starts it (never two runs of one
//! job at once), keeps the scheduler lease, and reloads or stops when told.
//!
//! Time comes from a `Clock`, so that tests run the loop under tokio's paused clock. The
//! decisions are the pure functions of `schedule`; this loop only applies them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::schedule::{Misfire, Overlap, Schedule};
use crate::cancel::CancellationToken;
use crate::jobs::JobName;
use crate::metrics;
use crate::store::{RunOutcome, SchedulerStore, Trigger};

/// The lease that only one scheduler holds at a time.
pub const LEASE_NAME: &str = "scheduler";

/// Where "now" comes from.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system clock.
    System,
    /// `base_utc` at `base`, advancing with tokio's clock (which tests pause and advance).
    Tokio {
        base_utc: DateTime<Utc>,
        base: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that reads `at` now and follows tokio's time from here on.
    pub fn tokio_at(at: DateTime<Utc>) -> Clock {
        Clock::Tokio {
            base_utc: at,
            base: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Tokio { base_utc, base } => {
                *base_utc + TimeDelta::from_std(base.elapsed()).unwrap_or(TimeDelta::MAX)
            }
        }
    }

    /// The tokio instant at which this clock will read `at`.
    pub fn deadline(&self, at: DateTime<Utc>) -> tokio::time::Instant {
        let wait = (at - self.now()).to_std().unwrap_or_default();
        tokio::time::Instant::now() + wait
    }
}

/// Runs one job to its end (and records it).
pub trait JobRunner: Send + Sync + 'static {
    /// The run must stop soon after `cancel` is cancelled, and its future end only once
    /// nothing of it goes on.
    fn run(
        &self,
        job: JobName,
        trigger: Trigger,
        slot: Option<DateTime<Utc>>,
        cancel: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// What the loop is told from outside.
#[derive(Debug)]
pub enum Control {
    /// New schedules (a reloaded configuration). Running jobs carry on.
    Reload(Vec<(JobName, Schedule)>),
    /// Stop firing, let running jobs finish within the grace period, release the lease.
    Shutdown,
}

/// What the loop tells the outside (systemd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Schedules are loaded.
    Ready,
    /// The loop is alive (sent at the watchdog interval).
    Alive,
}

pub struct Options {
    /// Who this scheduler is, in the lease and the job history (`host:pid`).
    pub holder: String,
    pub lease: Duration,
    pub grace: Duration,
    pub clock: Clock,
    /// How often to report `Event::Alive`, if at all.
    pub watchdog: Option<Duration>,
}

struct JobState {
    job: JobName,
    schedule: Schedule,
    /// The next slot to fire, while this scheduler holds the lease.
    next_slot: Option<DateTime<Utc>>,
    running: Option<Running>,
    /// A slot that came due while running, with overlap = "queue".
    queued: Option<DateTime<Utc>>,
}

/// Runs the scheduler until `Control::Shutdown` (or the control channel closes).
pub async fn run(
    opts: Options,
    schedules: Vec<(JobName, Schedule)>,
    store: Arc<dyn SchedulerStore>,
    runner: Arc<dyn JobRunner>,
    mut control: mpsc::Receiver<Control>,
    notify: impl Fn(Event) + Send,
) -> anyhow::Result<()> {
    let clock = opts.clock;
    metrics::job_schedules(&schedules, clock.now());
    let mut jobs: Vec<JobState> = schedules
        .into_iter()
        .map(|(job, schedule)| JobState::new(job, schedule))
        .collect();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<JobName>();
    let mut lease_until: Option<DateTime<Utc>> = None;
    let mut next_lease_check = clock.now();
    let mut next_alive = opts.watchdog.map(|_| clock.now());
    notify(Event::Ready);
    info!(holder = %opts.holder, jobs = jobs.len(), "Scheduler started.");

    loop {
        let now = clock.now();
        if now >= next_lease_check {
            let was_leader = lease_until.is_some_and(|until| now < until);
            match store
                .acquire_lease(LEASE_NAME, &opts.holder, opts.lease)
                .await
            {
                Ok(true) => {
                    metrics::lease_held(true);
                    lease_until = Some(now + TimeDelta::from_std(opts.lease).unwrap_or_default());
                    if !was_leader {
                        info!(holder = %opts.holder, "This scheduler holds the lease and fires the jobs.");
                        take_over(&mut jobs, store.as_ref(), &opts, &runner, &done_tx, now).await;
                    }
                }
                Ok(false) => {
                    metrics::lease_held(false);
                    if was_leader {
                        warn!(
                            "Lost the scheduler lease to another scheduler; no longer firing jobs."
                        );
                    }
                    lease_until = None;
                    jobs.iter_mut().for_each(|j| j.next_slot = None);
                    cancel_running(&jobs);
                }
                Err(err) => {
                    // Without the store nobody can prove who holds the lease: stop firing, and
                    // stop what runs before the lease could pass to another scheduler.
                    error!(error = %format!("{err:#}"), "Cannot renew the scheduler lease.");
                    metrics::lease_held(false);
                    lease_until = None;
                    jobs.iter_mut().for_each(|j| j.next_slot = None);
                    cancel_running(&jobs);
                }
            }
            let every = if lease_until.is_some() {
                opts.lease / 3
            } else {
                opts.lease / 2
            };
            next_lease_check = now + TimeDelta::from_std(every).unwrap_or_default();
        }

        // Fire what is due, but only while the lease is certainly ours.
        if lease_until.is_some_and(|until| now < until) {
            for state in jobs.iter_mut() {
                let Some(slot) = state.next_slot else {
                    continue;
                };
                if state.schedule.fire_time(state.job.name(), slot) > now {
                    continue;
                }
                due(state, slot, now, store.as_ref(), &opts, &runner, &done_tx).await;
            }
        }

        let mut wake = next_lease_check;
        for state in &jobs {
            if let Some(slot) = state.next_slot {
                wake = wake.min(state.schedule.fire_time(state.job.name(), slot));
            }
        }
        if let Some(alive) = next_alive {
            wake = wake.min(alive);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(clock.deadline(wake)) => {}
            Some(job) = done_rx.recv() => {
                if let Some(state) = jobs.iter_mut().find(|s| s.job == job) {
                    state.running = None;
                    if let Some(slot) = state.queued.take() {
                        start(state, Trigger::Queued, Some(slot), &runner, &done_tx);
                    }
                }
            }
            message = control.recv() => match message {
                Some(Control::Reload(schedules)) => {
                    metrics::job_schedules(&schedules, clock.now());
                    reload(&mut jobs, schedules, lease_until.is_some(), clock.now());
                    info!(jobs = jobs.len(), "Schedules reloaded.");
                }
                Some(Control::Shutdown) | None => break,
            },
        }
        if let Some(alive) = next_alive
            && clock.now() >= alive
        {
            notify(Event::Alive);
            next_alive = opts
                .watchdog
                .map(|every| clock.now() + TimeDelta::from_std(every / 2).unwrap_or_default());
        }
    }

    shut_down(jobs, &mut done_rx, store.as_ref(), &opts).await;
    Ok(())
}

/// A run in flight and the token that stops it.
struct Running {
    handle: JoinHandle<()>,
    cancel: CancellationToken,
}

/// Stops every running job: without the lease (or the store that proves it), another
/// scheduler may start the same jobs once the lease expires, and the two must never overlap.
fn cancel_running(jobs: &[JobState]) {
    for state in jobs {
        if let Some(running) = &state.running
            && !running.cancel.is_cancelled()
        {
            warn!(job = %state.job, "Stopping the running job: this scheduler no longer holds the lease.");
            running.cancel.cancel();
        }
    }
}

impl JobState {
    fn new(job: JobName, schedule: Schedule) -> JobState {
        JobState {
            job,
            schedule,
            next_slot: None,
            running: None,
            queued: None,
        }
    }
}

/// Taking the lease: plan every enabled job from now, and run once the jobs whose slots were
/// missed while no scheduler ran, if their misfire policy says so.
async fn take_over(
    jobs: &mut [JobState],
    store: &dyn SchedulerStore,
    opts: &Options,
    runner: &Arc<dyn JobRunner>,
    done: &mpsc::UnboundedSender<JobName>,
    now: DateTime<Utc>,
) {
    let last = match store.last_slots().await {
        Ok(last) => last,
        Err(err) => {
            error!(error = %format!("{err:#}"), "Cannot read when jobs last ran; missed runs are not caught up.");
            HashMap::new()
        }
    };
    for state in jobs.iter_mut() {
        state.next_slot = None;
        if !state.schedule.enabled {
            continue;
        }
        let missed = missed_slot(&state.schedule, last.get(state.job.name()).copied(), now);
        state.next_slot = state.schedule.next_slot(now);
        if let Some(slot) = missed {
            match state.schedule.misfire {
                Misfire::RunOnce if state.running.is_none() => {
                    info!(job = %state.job, slot = %slot, "Runs missed while no scheduler ran: running once now.");
                    let _ = store.set_last_slot(state.job.name(), slot).await;
                    start(state, Trigger::Misfire, Some(slot), runner, done);
                }
                Misfire::RunOnce => {}
                Misfire::Skip => {
                    info!(job = %state.job, slot = %slot, "Runs missed while no scheduler ran: skipped (misfire = skip).");
                    let reason = "missed while no scheduler ran";
                    let _ = store
                        .record_skip(
                            state.job.name(),
                            Trigger::Misfire,
                            slot,
                            &opts.holder,
                            reason,
                            now,
                        )
                        .await;
                    metrics::job_finished(
                        state.job.name(),
                        &RunOutcome::Skipped(reason.into()),
                        now,
                    );
                    let _ = store.set_last_slot(state.job.name(), slot).await;
                }
            }
        }
    }
}

/// The latest slot after `last` that is already past, if any: a run that was missed. A job
/// that never ran has missed nothing.
pub fn missed_slot(
    schedule: &Schedule,
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let last = last?;
    let first_after = schedule.next_slot(last)?;
    (first_after <= now)
        .then(|| schedule.previous_slot(now))
        .flatten()
}

/// A slot came due: start it, or skip or queue it if the job still runs. The next slot is
/// taken after `now`, not after the slot, so a loop that was held up fires once and carries
/// on instead of working through a backlog or falling behind for good.
async fn due(
    state: &mut JobState,
    slot: DateTime<Utc>,
    now: DateTime<Utc>,
    store: &dyn SchedulerStore,
    opts: &Options,
    runner: &Arc<dyn JobRunner>,
    done: &mpsc::UnboundedSender<JobName>,
) {
    state.next_slot = state.schedule.next_slot(now);
    if let Err(err) = store.set_last_slot(state.job.name(), slot).await {
        warn!(job = %state.job, error = %format!("{err:#}"), "Cannot record the job's slot.");
    }
    if state.running.is_none() {
        start(state, Trigger::Schedule, Some(slot), runner, done);
        return;
    }
    match state.schedule.overlap {
        Overlap::Queue if state.queued.is_none() => {
            info!(job = %state.job, slot = %slot, "Job still running: this run waits for it (overlap = queue).");
            state.queued = Some(slot);
        }
        Overlap::Queue | Overlap::Skip => {
            let reason = if state.queued.is_some() {
                "the previous run was still running and another was already waiting"
            } else {
                "the previous run was still running (overlap = skip)"
            };
            info!(job = %state.job, slot = %slot, "Skipped: {reason}.");
            metrics::job_finished(state.job.name(), &RunOutcome::Skipped(reason.into()), now);
            if let Err(err) = store
                .record_skip(
                    state.job.name(),
                    Trigger::Schedule,
                    slot,
                    &opts.holder,
                    reason,
                    now,
                )
                .await
            {
                warn!(job = %state.job, error = %format!("{err:#}"), "Cannot record the skipped run.");
            }
        }
    }
}

fn start(
    state: &mut JobState,
    trigger: Trigger,
    slot: Option<DateTime<Utc>>,
    runner: &Arc<dyn JobRunner>,
    done: &mpsc::UnboundedSender<JobName>,
) {
    let cancel = CancellationToken::new();
    let (job, run, done) = (
        state.job,
        runner.run(state.job, trigger, slot, cancel.clone()),
        done.clone(),
    );
    let handle = tokio::spawn(async move {
        // A panic in the runner ends only its own task; the loop hears that the job ended
        // either way and keeps scheduling.
        if let Err(err) = tokio::spawn(run).await
            && err.is_panic()
        {
            error!(job = %job, "The job panicked.");
        }
        let _ = done.send(job);
    });
    state.running = Some(Running { handle, cancel });
}

fn reload(
    jobs: &mut Vec<JobState>,
    schedules: Vec<(JobName, Schedule)>,
    leader: bool,
    now: DateTime<Utc>,
) {
    let mut old: HashMap<JobName, JobState> = jobs.drain(..).map(|s| (s.job, s)).collect();
    for (job, schedule) in schedules {
        let mut state = old
            .remove(&job)
            .unwrap_or_else(|| JobState::new(job, schedule.clone()));
        state.next_slot = (leader && schedule.enabled)
            .then(|| schedule.next_slot(now))
            .flatten();
        state.schedule = schedule;
        jobs.push(state);
    }
    // A job that left the configuration keeps running to its end, unscheduled.
    for (_, mut state) in old {
        state.next_slot = None;
        state.queued = None;
        if state.running.is_some() {
            jobs.push(state);
        }
    }
}

/// How long a cancelled job has to stop (it checks between items) before it is abandoned.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// Why a run abandoned at shutdown failed.
const INTERRUPTED: &str = "interrupted: the scheduler stopped before the job finished";

/// Stops firing; running jobs get the grace period, then are cancelled and waited for (they
/// record themselves as interrupted), and only what still runs after that is aborted and
/// recorded as interrupted here; the lease goes last, so no other scheduler starts a job this
/// one still runs.
async fn shut_down(
    mut jobs: Vec<JobState>,
    done: &mut mpsc::UnboundedReceiver<JobName>,
    store: &dyn SchedulerStore,
    opts: &Options,
) {
    let running = jobs.iter().filter(|j| j.running.is_some()).count();
    if running > 0 {
        info!(
            running,
            grace_seconds = opts.grace.as_secs(),
            "Stopping: waiting for running jobs to finish."
        );
    }
    let deadline = tokio::time::Instant::now() + opts.grace;
    wait_for_jobs(&mut jobs, done, deadline).await;
    for state in &jobs {
        if let Some(running) = &state.running {
            warn!(job = %state.job, "The job did not finish within the grace period; stopping it.");
            running.cancel.cancel();
        }
    }
    wait_for_jobs(&mut jobs, done, tokio::time::Instant::now() + STOP_WAIT).await;
    let mut interrupted = 0;
    for state in &mut jobs {
        if let Some(running) = state.running.take() {
            warn!(job = %state.job, "The job did not stop within {} s of its cancellation; abandoning it.", STOP_WAIT.as_secs());
            running.handle.abort();
            metrics::job_finished(
                state.job.name(),
                &RunOutcome::Failed(INTERRUPTED.into()),
                Utc::now(),
            );
            interrupted += 1;
        }
    }
    if interrupted > 0 {
        let reason = INTERRUPTED;
        if let Err(err) = store.abandon_runs(&opts.holder, reason, Utc::now()).await {
            warn!(error = %format!("{err:#}"), "Cannot record the interrupted runs.");
        }
    }
    metrics::lease_held(false);
    if let Err(err) = store.release_lease(LEASE_NAME, &opts.holder).await {
        warn!(error = %format!("{err:#}"), "Cannot release the scheduler lease; it expires on its own.");
    }
    info!("Scheduler stopped.");
}

/// Marks jobs as ended as they report it, until none runs or `deadline` passes.
async fn wait_for_jobs(
    jobs: &mut [JobState],
    done: &mut mpsc::UnboundedReceiver<JobName>,
    deadline: tokio::time::Instant,
) {
    while jobs.iter().any(|j| j.running.is_some()) {
        match tokio::time::timeout_at(deadline, done.recv()).await {
            Ok(Some(job)) => {
                if let Some(state) = jobs.iter_mut().find(|s| s.job == job) {
                    state.running = None;
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
}

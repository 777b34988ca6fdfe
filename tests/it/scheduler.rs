//! The scheduler loop under tokio's paused clock (no real sleeps): intervals, overlap skip and
//! queue, misfire after a gap, jitter, a stalled loop, a panicking job, reloads and the lease.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::mpsc;
use workers::cancel::CancellationToken;
use workers::jobs::JobName;
use workers::scheduler::runtime::{self, Clock, Control, Event, JobRunner, Options};
use workers::scheduler::schedule::{Schedule, ScheduleFields};
use workers::store::{JobRun, RunOutcome, SchedulerStore, Trigger};

fn start_time() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-06-01T12:00:00.500Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn schedule(
    every: Option<&str>,
    cron: Option<&str>,
    overlap: &str,
    misfire: &str,
    jitter: &str,
) -> Schedule {
    Schedule::parse(&ScheduleFields {
        cron,
        every,
        timezone: "UTC",
        enabled: true,
        overlap,
        misfire,
        jitter,
    })
    .unwrap()
}

/// The scheduler's records, in memory; leases are judged by the store's own clock, which here
/// is tokio's (paused) one.
#[derive(Default)]
struct MemoryStore {
    lease: Mutex<Option<(String, tokio::time::Instant)>>,
    slots: Mutex<HashMap<String, DateTime<Utc>>>,
    skips: Mutex<Vec<(String, DateTime<Utc>, String)>>,
}

#[async_trait]
impl SchedulerStore for MemoryStore {
    async fn acquire_lease(&self, _: &str, holder: &str, ttl: Duration) -> anyhow::Result<bool> {
        let now = tokio::time::Instant::now();
        let mut lease = self.lease.lock().unwrap();
        let free = match &*lease {
            None => true,
            Some((who, until)) => who == holder || *until < now,
        };
        if free {
            *lease = Some((holder.to_owned(), now + ttl));
        }
        Ok(free)
    }
    async fn release_lease(&self, _: &str, holder: &str) -> anyhow::Result<()> {
        let mut lease = self.lease.lock().unwrap();
        if lease.as_ref().is_some_and(|(who, _)| who == holder) {
            *lease = None;
        }
        Ok(())
    }
    async fn last_slots(&self) -> anyhow::Result<HashMap<String, DateTime<Utc>>> {
        Ok(self.slots.lock().unwrap().clone())
    }
    async fn set_last_slot(&self, job: &str, slot: DateTime<Utc>) -> anyhow::Result<()> {
        self.slots.lock().unwrap().insert(job.to_owned(), slot);
        Ok(())
    }
    async fn start_run(
        &self,
        _: &str,
        _: Trigger,
        _: Option<DateTime<Utc>>,
        _: &str,
        _: bool,
        _: DateTime<Utc>,
    ) -> anyhow::Result<i64> {
        Ok(0)
    }
    async fn finish_run(
        &self,
        _: i64,
        _: &RunOutcome,
        _: &serde_json::Map<String, serde_json::Value>,
        _: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        Ok(())
    }
    async fn record_skip(
        &self,
        job: &str,
        _: Trigger,
        slot: DateTime<Utc>,
        _: &str,
        reason: &str,
        _: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        self.skips
            .lock()
            .unwrap()
            .push((job.to_owned(), slot, reason.to_owned()));
        Ok(())
    }
    async fn runs(&self, _: Option<&str>, _: usize) -> anyhow::Result<Vec<JobRun>> {
        Ok(Vec::new())
    }
    async fn abandon_runs(&self, _: &str, _: &str, _: DateTime<Utc>) -> anyhow::Result<u64> {
        Ok(0)
    }
}

/// Run starts: which scheduler, which job, why, when.
type Starts = Arc<Mutex<Vec<(&'static str, JobName, Trigger, DateTime<Utc>)>>>;

/// When runs were stopped by their cancellation: which scheduler, which job, when.
type Stops = Arc<Mutex<Vec<(&'static str, JobName, DateTime<Utc>)>>>;

/// A job that takes `duration` (tokio time), or less when it is cancelled, and records when
/// it started and when it was stopped.
struct FakeRunner {
    clock: Clock,
    duration: Duration,
    panics: bool,
    /// Which scheduler ran it (to tell two apart).
    name: &'static str,
    starts: Starts,
    stops: Stops,
}

impl JobRunner for FakeRunner {
    fn run(
        &self,
        job: JobName,
        trigger: Trigger,
        _: Option<DateTime<Utc>>,
        cancel: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.starts
            .lock()
            .unwrap()
            .push((self.name, job, trigger, self.clock.now()));
        let (duration, panics, clock, name) = (self.duration, self.panics, self.clock, self.name);
        let stops = Arc::clone(&self.stops);
        Box::pin(async move {
            tokio::select! {
                () = tokio::time::sleep(duration) => {}
                () = cancel.cancelled() => {
                    stops.lock().unwrap().push((name, job, clock.now()));
                    return;
                }
            }
            assert!(!panics, "the job panics");
        })
    }
}

struct Harness {
    starts: Starts,
    stops: Stops,
    control: mpsc::Sender<Control>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    events: Arc<Mutex<Vec<Event>>>,
}

fn spawn(
    name: &'static str,
    clock: Clock,
    store: Arc<MemoryStore>,
    schedules: Vec<(JobName, Schedule)>,
    duration: Duration,
    panics: bool,
    starts: Starts,
) -> Harness {
    let stops = Stops::default();
    let runner = Arc::new(FakeRunner {
        clock,
        duration,
        panics,
        name,
        starts: Arc::clone(&starts),
        stops: Arc::clone(&stops),
    });
    let (control, rx) = mpsc::channel(4);
    let opts = Options {
        holder: name.to_owned(),
        lease: Duration::from_secs(15),
        grace: Duration::from_secs(60),
        clock,
        watchdog: Some(Duration::from_secs(20)),
    };
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&events);
    let task = tokio::spawn(runtime::run(opts, schedules, store, runner, rx, move |e| {
        seen.lock().unwrap().push(e)
    }));
    Harness {
        starts,
        stops,
        control,
        task,
        events,
    }
}

fn one(job: JobName, schedule: Schedule, duration: Duration, store: Arc<MemoryStore>) -> Harness {
    spawn(
        "a",
        Clock::tokio_at(start_time()),
        store,
        vec![(job, schedule)],
        duration,
        false,
        Arc::default(),
    )
}

/// Seconds after the start time of each run start.
fn offsets(h: &Harness) -> Vec<f64> {
    h.starts
        .lock()
        .unwrap()
        .iter()
        .map(|(_, _, _, at)| (*at - start_time()).num_milliseconds() as f64 / 1000.0)
        .collect()
}

async fn stop(h: Harness) {
    h.control.send(Control::Shutdown).await.unwrap();
    h.task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_interval_job_fires_on_its_slots() {
    let h = one(
        JobName::Watch,
        schedule(Some("10s"), None, "skip", "skip", "0s"),
        Duration::from_secs(1),
        Arc::default(),
    );
    tokio::time::sleep(Duration::from_secs(45)).await;
    // Slots are multiples of 10 s: 12:00:10, :20, :30, :40 (the start was at :00.5).
    assert_eq!(offsets(&h), [9.5, 19.5, 29.5, 39.5]);
    assert_eq!(h.events.lock().unwrap()[0], Event::Ready);
    stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn overlap_skip_skips_and_records_why() {
    let store = Arc::new(MemoryStore::default());
    let h = one(
        JobName::Watch,
        schedule(Some("10s"), None, "skip", "skip", "0s"),
        Duration::from_secs(25),
        Arc::clone(&store),
    );
    tokio::time::sleep(Duration::from_secs(65)).await;
    // A run takes 25 s: the slots at +19.5 and +29.5 come while it runs and are skipped.
    assert_eq!(offsets(&h), [9.5, 39.5]);
    let skips = store.skips.lock().unwrap().clone();
    assert_eq!(skips.len(), 4, "{skips:?}");
    assert!(
        skips
            .iter()
            .all(|(job, _, why)| job == "watch" && why.contains("still running"))
    );
    stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn overlap_queue_runs_once_more_after_the_current_run() {
    let store = Arc::new(MemoryStore::default());
    let h = one(
        JobName::Watch,
        schedule(Some("10s"), None, "queue", "skip", "0s"),
        Duration::from_secs(25),
        Arc::clone(&store),
    );
    tokio::time::sleep(Duration::from_secs(62)).await;
    let starts = h.starts.lock().unwrap().clone();
    let triggers: Vec<Trigger> = starts.iter().map(|s| s.2).collect();
    // +9.5 runs until +34.5; +19.5 waits; +29.5 is skipped (one waits already); the waiting one
    // starts at +34.5 and runs until +59.5, with +39.5 and +49.5 skipped or queued.
    assert_eq!(offsets(&h)[..2], [9.5, 34.5]);
    assert_eq!(triggers[..2], [Trigger::Schedule, Trigger::Queued]);
    assert!(
        store
            .skips
            .lock()
            .unwrap()
            .iter()
            .any(|(_, _, why)| why.contains("already waiting"))
    );
    stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn a_daily_job_missed_while_down_runs_once_at_start_with_run_once() {
    let daily = schedule(None, Some("0 0 7 * * *"), "skip", "run_once", "0s");
    let store = Arc::new(MemoryStore::default());
    // Last run three days ago: three 07:00 slots were missed.
    store.slots.lock().unwrap().insert(
        "purge_staged_datasets".into(),
        start_time() - TimeDelta::days(3),
    );
    let h = one(
        JobName::PurgeStagedDatasets,
        daily,
        Duration::from_secs(1),
        Arc::clone(&store),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let starts = h.starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 1, "once, not three times: {starts:?}");
    assert_eq!(starts[0].2, Trigger::Misfire);
    stop(h).await;

    let skip = schedule(None, Some("0 0 7 * * *"), "skip", "skip", "0s");
    let store = Arc::new(MemoryStore::default());
    store.slots.lock().unwrap().insert(
        "purge_staged_datasets".into(),
        start_time() - TimeDelta::days(3),
    );
    let h = one(
        JobName::PurgeStagedDatasets,
        skip,
        Duration::from_secs(1),
        Arc::clone(&store),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(h.starts.lock().unwrap().is_empty());
    assert_eq!(
        store.skips.lock().unwrap()[0].2,
        "missed while no scheduler ran"
    );
    // The next slot is tomorrow 07:00: nothing runs before it.
    tokio::time::sleep(Duration::from_secs(3600 * 20)).await;
    assert_eq!(offsets(&h), [(19.0 * 3600.0) - 0.5]);
    stop(h).await;

    // A job that never ran has missed nothing.
    let h = one(
        JobName::Metrics,
        schedule(None, Some("0 0 7 * * *"), "skip", "run_once", "0s"),
        Duration::from_secs(1),
        Arc::default(),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(h.starts.lock().unwrap().is_empty());
    stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn jitter_delays_each_run_within_its_bound() {
    let jittered = schedule(Some("60s"), None, "skip", "skip", "20s");
    let h = one(
        JobName::Reconcile,
        jittered.clone(),
        Duration::from_secs(1),
        Arc::default(),
    );
    tokio::time::sleep(Duration::from_secs(620)).await;
    let starts = offsets(&h);
    assert_eq!(starts.len(), 10);
    for (i, at) in starts.iter().enumerate() {
        let slot = 59.5 + 60.0 * i as f64;
        assert!(
            *at >= slot && *at < slot + 20.0,
            "run {i} at +{at}, slot +{slot}"
        );
    }
    assert!(
        starts
            .iter()
            .enumerate()
            .any(|(i, at)| *at > 59.5 + 60.0 * i as f64 + 0.5),
        "{starts:?}"
    );
    stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn a_stalled_loop_fires_once_and_carries_on_on_time() {
    // The failure of tokio-cron-scheduler's repeated jobs (its issue 113): after the loop was
    // held up, the next tick lies in the past and the job never fires again.
    let store = Arc::new(MemoryStore::default());
    let h = one(
        JobName::Watch,
        schedule(Some("10s"), None, "skip", "skip", "0s"),
        Duration::from_millis(100),
        Arc::clone(&store),
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    // The runtime is held up for 8 s (less than the lease): the slot at +19.5 passes unseen.
    tokio::time::advance(Duration::from_secs(8)).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let starts = offsets(&h);
    assert_eq!(starts[0], 9.5);
    // One catch-up run as soon as the loop runs again (+23), then every slot on time.
    assert!((23.0..24.0).contains(&starts[1]), "{starts:?}");
    assert_eq!(starts[2..], [29.5, 39.5], "{starts:?}");

    // Held up for five minutes (longer than the lease): the scheduler takes the lease again and
    // the misfire policy (skip) decides; then it fires on time again.
    tokio::time::advance(Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    let after = &offsets(&h)[4..];
    assert_eq!(after, [349.5, 359.5], "{:?}", offsets(&h));
    assert!(
        store
            .skips
            .lock()
            .unwrap()
            .iter()
            .any(|(_, _, why)| why == "missed while no scheduler ran")
    );
    stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_job_does_not_stop_the_scheduler() {
    let starts = Arc::default();
    let h = spawn(
        "a",
        Clock::tokio_at(start_time()),
        Arc::default(),
        vec![(
            JobName::Metrics,
            schedule(Some("10s"), None, "skip", "skip", "0s"),
        )],
        Duration::from_secs(1),
        true,
        starts,
    );
    tokio::time::sleep(Duration::from_secs(35)).await;
    assert_eq!(offsets(&h), [9.5, 19.5, 29.5]);
    stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn a_reload_changes_the_schedule_without_a_restart() {
    let h = one(
        JobName::Watch,
        schedule(Some("10s"), None, "skip", "skip", "0s"),
        Duration::from_secs(1),
        Arc::default(),
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    let every_minute = schedule(Some("60s"), None, "skip", "skip", "0s");
    h.control
        .send(Control::Reload(vec![(JobName::Watch, every_minute)]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(offsets(&h), [9.5, 59.5, 119.5]);
    stop(h).await;
}

#[tokio::test(start_paused = true)]
async fn only_the_lease_holder_fires_and_another_takes_over_when_it_dies() {
    let store = Arc::new(MemoryStore::default());
    let starts = Arc::new(Mutex::new(Vec::new()));
    let clock = Clock::tokio_at(start_time());
    let jobs = vec![(
        JobName::Watch,
        schedule(Some("10s"), None, "skip", "skip", "0s"),
    )];
    let a = spawn(
        "a",
        clock,
        Arc::clone(&store),
        jobs.clone(),
        Duration::from_secs(1),
        false,
        Arc::clone(&starts),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let b = spawn(
        "b",
        clock,
        Arc::clone(&store),
        jobs,
        Duration::from_secs(1),
        false,
        Arc::clone(&starts),
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    let who: Vec<&str> = starts.lock().unwrap().iter().map(|s| s.0).collect();
    assert_eq!(who, ["a"; 6], "only one scheduler fires");
    // `a` dies without releasing its lease.
    a.task.abort();
    let died = clock.now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let by_b: Vec<DateTime<Utc>> = starts
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.0 == "b")
        .map(|s| s.3)
        .collect();
    assert!(!by_b.is_empty());
    let takeover = (by_b[0] - died).num_milliseconds() as f64 / 1000.0;
    assert!(
        takeover <= 2.0 * 15.0,
        "took over after {takeover} s (lease 15 s)"
    );
    stop(b).await;
}

/// A scheduler that loses its lease stops the job it runs at its next renewal, so that the
/// scheduler taking over never runs the same job at the same time.
#[tokio::test(start_paused = true)]
async fn losing_the_lease_stops_the_running_job() {
    let store = Arc::new(MemoryStore::default());
    let clock = Clock::tokio_at(start_time());
    let h = spawn(
        "a",
        clock,
        Arc::clone(&store),
        vec![(
            JobName::Watch,
            schedule(Some("10s"), None, "skip", "skip", "0s"),
        )],
        Duration::from_secs(3600),
        false,
        Arc::default(),
    );
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(offsets(&h), [9.5], "the job runs");
    // Another scheduler holds the lease now (this one was paused past its expiry).
    let taken = clock.now();
    *store.lease.lock().unwrap() = Some((
        "b".to_owned(),
        tokio::time::Instant::now() + Duration::from_secs(15),
    ));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let stops = h.stops.lock().unwrap().clone();
    assert_eq!(stops.len(), 1, "{stops:?}");
    let after = (stops[0].2 - taken).num_milliseconds() as f64 / 1000.0;
    assert!(
        after <= 5.0,
        "stopped {after} s after losing the lease (renewal every 5 s)"
    );
    stop(h).await;
}

/// At shutdown a job that outlives the grace period is cancelled, and the scheduler waits for
/// it to stop before it ends.
#[tokio::test(start_paused = true)]
async fn a_job_past_the_grace_period_is_cancelled_and_waited_for() {
    let h = one(
        JobName::Watch,
        schedule(Some("10s"), None, "skip", "skip", "0s"),
        Duration::from_secs(3600),
        Arc::default(),
    );
    tokio::time::sleep(Duration::from_secs(12)).await;
    let stops = Arc::clone(&h.stops);
    stop(h).await;
    assert_eq!(
        stops.lock().unwrap().len(),
        1,
        "stopped through its cancellation"
    );
}

//! `workers scheduler` as a process: two schedulers on one store, takeover after SIGKILL,
//! SIGTERM during a running job, SIGHUP with a valid and an invalid configuration, a
//! panicking job, and systemd notifications.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;

/// A project whose scheduler runs `watch` every second and nothing else, with a short lease.
fn project() -> Project {
    let mut project = Project::new();
    project.set_env("WORKERS__SCHEDULES__WATCH__EVERY", "1s");
    for job in [
        "PURGE_STAGED_DATASETS",
        "PURGE_STALE_WORKFLOWS",
        "RECONCILE",
        "METRICS",
    ] {
        project.set_env(&format!("WORKERS__SCHEDULES__{job}__ENABLED"), "false");
    }
    project.set_env("WORKERS__SCHEDULER__LEASE_SECONDS", "3");
    project.set_env("WORKERS__SCHEDULER__WORKERS", "0");
    project
}

fn spawn_scheduler(project: &Project) -> Child {
    project
        .command(&["scheduler"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
}

/// The recorded runs of `job`, newest first, read from the store directly (the configuration
/// may be invalid on purpose while a test runs).
fn runs(project: &Project, job: &str) -> Vec<Value> {
    use workers::store::SchedulerStore;
    let path = project.path("var/workers.db");
    if !path.exists() {
        return Vec::new();
    }
    let store = workers::store::sql::SqlStore::new(
        workers::sqlite::Db::open(&path, Duration::from_secs(10)).unwrap(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs = runtime.block_on(store.runs(Some(job), 1000)).unwrap();
    runs.iter()
        .map(|r| {
            let error = r.outcome.reason();
            serde_json::json!({"id": r.id, "host": r.host, "outcome": r.outcome.as_str(), "error": error})
        })
        .collect()
}

/// Waits until `check` holds, or fails after `timeout`.
fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn host_of(run: &Value) -> String {
    run["host"].as_str().unwrap().to_owned()
}

fn pid_host(child: &Child) -> String {
    format!(":{}", child.id())
}

#[test]
fn only_one_of_two_schedulers_fires_and_the_other_takes_over_after_a_sigkill() {
    let project = project();
    let mut a = spawn_scheduler(&project);
    let _reap_a = Reap(a.id());
    wait_until(Duration::from_secs(20), "a first run", || {
        !runs(&project, "watch").is_empty()
    });
    let mut b = spawn_scheduler(&project);
    let _reap_b = Reap(b.id());
    std::thread::sleep(Duration::from_secs(6));
    let hosts: Vec<String> = runs(&project, "watch").iter().map(host_of).collect();
    assert!(hosts.len() >= 5, "{hosts:?}");
    assert!(
        hosts.iter().all(|h| h.ends_with(&pid_host(&a))),
        "only the lease holder fires: {hosts:?}"
    );

    a.kill().unwrap();
    a.wait().unwrap();
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "the second scheduler to fire",
        || {
            runs(&project, "watch")
                .iter()
                .any(|r| host_of(r).ends_with(&pid_host(&b)))
        },
    );
    let takeover = killed.elapsed();
    // Within two lease periods (3 s each), plus the one-second slot granularity.
    assert!(
        takeover <= Duration::from_secs(7),
        "took over after {takeover:?}"
    );
    signal(&b, rustix::process::Signal::TERM);
    assert!(b.wait().unwrap().success());
}

#[cfg(feature = "failpoints")] // WORKERS_FAILPOINTS
#[test]
fn sigterm_lets_a_running_job_finish_then_exits_0() {
    let mut project = project();
    project.set_env("WORKERS_FAILPOINTS", "watch=sleep(3000)");
    project.set_env("WORKERS__SCHEDULER__GRACE_SECONDS", "20");
    let child = spawn_scheduler(&project);
    let _reap_child = Reap(child.id());
    wait_until(Duration::from_secs(20), "a running job", || {
        runs(&project, "watch")
            .first()
            .is_some_and(|r| r["outcome"] == "running")
    });
    let running_id = runs(&project, "watch")[0]["id"].clone();
    signal(&child, rustix::process::Signal::TERM);
    let mut child = child;
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let all = runs(&project, "watch");
    let run = all.iter().find(|r| r["id"] == running_id).unwrap();
    assert_eq!(run["outcome"], "success", "the running job finished: {run}");
    assert!(all.iter().all(|r| r["outcome"] != "running"), "{all:?}");
}

#[cfg(feature = "failpoints")] // WORKERS_FAILPOINTS
#[test]
fn a_job_that_outlives_the_grace_period_is_stopped_and_recorded() {
    let mut project = project();
    project.set_env("WORKERS_FAILPOINTS", "watch=sleep(60000)");
    project.set_env("WORKERS__SCHEDULER__GRACE_SECONDS", "1");
    let mut child = spawn_scheduler(&project);
    let _reap_child = Reap(child.id());
    wait_until(Duration::from_secs(20), "a running job", || {
        runs(&project, "watch")
            .first()
            .is_some_and(|r| r["outcome"] == "running")
    });
    signal(&child, rustix::process::Signal::TERM);
    let started = Instant::now();
    assert!(child.wait().unwrap().success());
    assert!(started.elapsed() < Duration::from_secs(10));
    let run = &runs(&project, "watch")[0];
    assert_eq!(run["outcome"], "failed");
    assert!(
        run["error"].as_str().unwrap().contains("interrupted"),
        "{run}"
    );
}

/// Replaces the `[schedules.metrics]` timing in the project's default.toml.
fn set_metrics_timing(project: &Project, timing: &str) {
    let path = project.path("config/default.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find("[schedules.metrics]\n").unwrap() + "[schedules.metrics]\n".len();
    let end = start + text[start..].find("timezone").unwrap();
    std::fs::write(
        &path,
        format!("{}{timing}\n{}", &text[..start], &text[end..]),
    )
    .unwrap();
}

#[test]
fn sighup_reloads_a_valid_configuration_and_keeps_the_old_one_when_invalid() {
    let mut project = project();
    project.remove_env("WORKERS__SCHEDULES__METRICS__ENABLED");
    set_metrics_timing(&project, "cron = \"0 0 3 1 1 *\"\nevery = \"\"");
    let child = spawn_scheduler(&project);
    let _reap_child = Reap(child.id());
    wait_until(Duration::from_secs(20), "watch runs", || {
        runs(&project, "watch").len() >= 2
    });
    assert!(runs(&project, "metrics").is_empty());

    // A valid change: metrics every second, from the next reload on.
    set_metrics_timing(&project, "cron = \"\"\nevery = \"1s\"");
    signal(&child, rustix::process::Signal::HUP);
    wait_until(
        Duration::from_secs(20),
        "metrics runs after the reload",
        || runs(&project, "metrics").len() >= 2,
    );

    // An invalid configuration is refused; the scheduler carries on with the one it has.
    set_metrics_timing(&project, "cron = \"\"\nevery = \"soon\"");
    signal(&child, rustix::process::Signal::HUP);
    std::thread::sleep(Duration::from_secs(1));
    let (watch, metrics) = (
        runs(&project, "watch").len(),
        runs(&project, "metrics").len(),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(runs(&project, "watch").len() > watch, "watch still fires");
    assert!(
        runs(&project, "metrics").len() > metrics,
        "metrics still fires every second"
    );
    signal(&child, rustix::process::Signal::TERM);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = stderr(&out);
    assert!(log.contains("Configuration reloaded."), "{log}");
    assert!(
        log.contains("The new configuration is invalid; keeping the current one"),
        "{log}"
    );
    assert!(
        log.contains("schedules.metrics.every: `soon` is not a duration"),
        "{log}"
    );
}

#[cfg(feature = "failpoints")] // WORKERS_FAILPOINTS
#[test]
fn a_panicking_job_is_recorded_as_failed_and_the_scheduler_keeps_running() {
    let mut project = project();
    project.set_env("WORKERS_FAILPOINTS", "watch=panic");
    let mut child = spawn_scheduler(&project);
    let _reap_child = Reap(child.id());
    let failed = |project: &Project| {
        runs(project, "watch")
            .iter()
            .filter(|r| r["outcome"] == "failed")
            .count()
    };
    wait_until(Duration::from_secs(30), "three failed runs", || {
        failed(&project) >= 3
    });
    // A slot that came while a run was still going is skipped (overlap), as on a loaded
    // machine a run of a second's schedule can be; every run that ran failed.
    for run in runs(&project, "watch")
        .iter()
        .filter(|r| r["outcome"] != "running" && r["outcome"] != "skipped")
    {
        assert_eq!(run["outcome"], "failed");
        assert!(run["error"].as_str().unwrap().contains("panicked"), "{run}");
    }
    assert!(child.try_wait().unwrap().is_none(), "still running");
    signal(&child, rustix::process::Signal::TERM);
    assert!(child.wait().unwrap().success());
}

#[test]
fn systemd_hears_ready_and_watchdog_pings() {
    let project = project();
    let socket_path = project.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = project
        .command(&["scheduler"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reap = Reap(child.id());
    let mut received = Vec::new();
    let mut buf = [0u8; 256];
    while !(received.iter().any(|m: &String| m.contains("READY=1"))
        && received.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        let n = socket.recv(&mut buf).expect("a notification");
        received.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    signal(&child, rustix::process::Signal::TERM);
    assert!(child.wait().unwrap().success());
    assert!(received[0].contains("READY=1"), "{received:?}");
}

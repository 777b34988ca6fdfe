//! Progress of long steps: a cheap shared counter that compute threads bump, and the report
//! (spec F.5 fields) computed from it for the store and the terminal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A progress counter shared between a step and whoever reports on it. Updating it is a few
/// atomic operations, so rayon threads can call `add` per file or per buffer.
#[derive(Clone, Default)]
pub struct Progress {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    done: AtomicU64,
    /// `u64::MAX` while unknown.
    total: AtomicU64,
    label: Mutex<Label>,
    /// Bumped whenever anything changes, so reporters can skip unchanged writes.
    version: AtomicU64,
}

#[derive(Default, Clone)]
struct Label {
    name: String,
    units: String,
    /// A report that replaces the computed one (await_stability sends its own fields).
    custom: Option<serde_json::Value>,
}

/// What a progress counter says at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub name: String,
    pub units: String,
    pub done: u64,
    pub total: Option<u64>,
    pub custom: Option<serde_json::Value>,
    pub version: u64,
}

impl Progress {
    pub fn new() -> Progress {
        let progress = Progress::default();
        progress.inner.total.store(u64::MAX, Ordering::Relaxed);
        progress
    }

    /// Starts a new phase: resets `done` and sets what is counted.
    pub fn start(&self, name: &str, units: &str, total: Option<u64>) {
        {
            let mut label = self.inner.label.lock().unwrap_or_else(|e| e.into_inner());
            label.name = name.to_owned();
            label.units = units.to_owned();
            label.custom = None;
        }
        self.inner.done.store(0, Ordering::Relaxed);
        self.inner
            .total
            .store(total.unwrap_or(u64::MAX), Ordering::Relaxed);
        self.inner.version.fetch_add(1, Ordering::Release);
    }

    pub fn set_total(&self, total: u64) {
        self.inner.total.store(total, Ordering::Relaxed);
        self.inner.version.fetch_add(1, Ordering::Release);
    }

    pub fn add(&self, n: u64) {
        self.inner.done.fetch_add(n, Ordering::Relaxed);
        self.inner.version.fetch_add(1, Ordering::Release);
    }

    pub fn set_done(&self, n: u64) {
        self.inner.done.store(n, Ordering::Relaxed);
        self.inner.version.fetch_add(1, Ordering::Release);
    }

    /// Replaces the computed report with `report` until the next `start`.
    pub fn report_custom(&self, report: serde_json::Value) {
        self.inner
            .label
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .custom = Some(report);
        self.inner.version.fetch_add(1, Ordering::Release);
    }

    pub fn snapshot(&self) -> Snapshot {
        let version = self.inner.version.load(Ordering::Acquire);
        let label = self
            .inner
            .label
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let total = self.inner.total.load(Ordering::Relaxed);
        Snapshot {
            name: label.name,
            units: label.units,
            done: self.inner.done.load(Ordering::Relaxed),
            total: (total != u64::MAX).then_some(total),
            custom: label.custom,
            version,
        }
    }
}

/// Turns successive snapshots into spec F.5 reports: fraction done, a smoothed rate and the
/// time remaining. Unlike the original, an unknown estimate is `null` (not `1e100`).
pub struct RateEstimator {
    first: Option<(Instant, f64)>,
    last: Option<(Instant, f64)>,
    ewma: f64,
    samples: i32,
}

/// Weight of the previous average in the smoothed rate (the original's alpha).
const EWMA_ALPHA: f64 = 0.9;

impl Default for RateEstimator {
    fn default() -> Self {
        RateEstimator {
            first: None,
            last: None,
            ewma: 0.0,
            samples: 0,
        }
    }
}

impl RateEstimator {
    /// The report for `snap` taken at `now`.
    pub fn report(&mut self, snap: &Snapshot, now: Instant) -> serde_json::Value {
        if let Some(custom) = &snap.custom {
            return custom.clone();
        }
        let fraction = snap
            .total
            .filter(|t| *t > 0)
            .map(|t| (snap.done as f64 / t as f64).clamp(0.0, 1.0));
        let mut remaining = None;
        let mut wt_avg_rate = None;
        let mut avg_rate = None;
        if let Some(p) = fraction {
            match self.last {
                None => {
                    self.first = Some((now, p));
                }
                Some((t0, p0)) => {
                    let dt = now.duration_since(t0).as_secs_f64();
                    if dt > 0.0 {
                        let rate = (p - p0) / dt;
                        self.ewma = EWMA_ALPHA * self.ewma + (1.0 - EWMA_ALPHA) * rate;
                        self.samples += 1;
                        let smoothed = self.ewma / (1.0 - EWMA_ALPHA.powi(self.samples));
                        if smoothed > 1e-12 {
                            remaining = Some((1.0 - p) / smoothed);
                            wt_avg_rate = snap.total.map(|t| t as f64 * smoothed);
                        }
                    }
                    if let Some((tf, pf)) = self.first {
                        let elapsed = now.duration_since(tf).as_secs_f64();
                        if elapsed > 0.0 {
                            avg_rate = snap.total.map(|t| t as f64 * (p - pf) / elapsed);
                        }
                    }
                }
            }
            if p >= 1.0 {
                remaining = Some(0.0);
            }
            self.last = Some((now, p));
        }
        serde_json::json!({
            "name": snap.name,
            "fraction_done": fraction,
            "done": snap.done,
            "total": snap.total,
            "units": snap.units,
            "time_remaining_sec": remaining,
            "wt_avg_rate": wt_avg_rate,
            "avg_rate": avg_rate,
        })
    }
}

/// A report (spec F.5 fields) for people: `tar 666 MiB / 2.79 GiB · 350 MiB/s · 7 s left`, or
/// with counts `inspect 41,200 / 50,000 files · 1,030 files/s · 8 s left`; a stability wait
/// reads `stable in 42 s`; anything else as its JSON.
pub fn describe(report: &serde_json::Value) -> String {
    let name = report["name"].as_str().unwrap_or_default();
    let units = report["units"].as_str().unwrap_or_default();
    let Some(done) = report["done"].as_u64() else {
        if let Some(remaining) = report["time_remaining_sec"].as_f64() {
            return format!("stable in {}", human_seconds(remaining));
        }
        return report.to_string();
    };
    let amount = |n: u64| {
        if units == "bytes" {
            indicatif::HumanBytes(n).to_string()
        } else {
            format!("{} {units}", indicatif::HumanCount(n))
        }
    };
    let mut parts = vec![match report["total"].as_u64() {
        Some(total) if units == "bytes" => format!("{} / {}", amount(done), amount(total)),
        Some(total) => format!("{} / {}", indicatif::HumanCount(done), amount(total)),
        None => amount(done),
    }];
    if let Some(rate) = report["wt_avg_rate"].as_f64().filter(|r| *r > 0.0) {
        parts.push(match rate {
            _ if units == "bytes" || rate >= 10.0 => format!("{}/s", amount(rate.round() as u64)),
            1.0.. => format!("{rate:.1} {units}/s"),
            _ => format!("{:.1} {units}/min", rate * 60.0),
        });
    }
    if let Some(left) = report["time_remaining_sec"].as_f64()
        && report["fraction_done"].as_f64().is_some_and(|f| f < 1.0)
    {
        parts.push(format!("{} left", human_seconds(left)));
    }
    let figures = parts.join(" · ");
    if name.is_empty() {
        figures
    } else {
        format!("{name} {figures}")
    }
}

/// `7 s`, `3 min 20 s`, `2 h 5 min`.
pub fn human_seconds(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3600 if seconds.is_multiple_of(60) => format!("{} min", seconds / 60),
        60..3600 => format!("{} min {} s", seconds / 60, seconds % 60),
        _ if seconds % 3600 < 60 => format!("{} h", seconds / 3600),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn reports_have_the_spec_fields_and_converge() {
        let progress = Progress::new();
        progress.start("inspect", "files", Some(100));
        let mut estimator = RateEstimator::default();
        let t0 = Instant::now();
        let first = estimator.report(&progress.snapshot(), t0);
        assert_eq!(first["fraction_done"], 0.0);
        assert!(
            first["time_remaining_sec"].is_null(),
            "no estimate from one sample: {first}"
        );
        for step in 1..=4 {
            progress.add(10);
            let report = estimator.report(&progress.snapshot(), t0 + Duration::from_secs(step));
            // 10% per second, steady: 1 - p of the work left at 0.1/s.
            let remaining = report["time_remaining_sec"].as_f64().unwrap();
            let expected = (1.0 - 0.1 * step as f64) / 0.1;
            assert!((remaining - expected).abs() < 0.01, "step {step}: {report}");
            assert_eq!(report["units"], "files");
            assert_eq!(report["total"], 100);
        }
        progress.set_done(100);
        let done = estimator.report(&progress.snapshot(), t0 + Duration::from_secs(5));
        assert_eq!(done["fraction_done"], 1.0);
        assert_eq!(done["time_remaining_sec"], 0.0);
    }

    #[test]
    fn unknown_totals_have_no_fraction() {
        let progress = Progress::new();
        progress.start("tar", "bytes", None);
        progress.add(5);
        let report = RateEstimator::default().report(&progress.snapshot(), Instant::now());
        assert!(report["fraction_done"].is_null());
        assert_eq!(report["done"], 5);
    }

    #[test]
    fn reports_read_in_human_units_with_rate_and_time_left() {
        let bytes = serde_json::json!({
            "name": "tar", "fraction_done": 0.2328, "done": 698_351_616_u64,
            "total": 3_000_012_288_u64, "units": "bytes", "time_remaining_sec": 6.6,
            "wt_avg_rate": 367_001_600.0, "avg_rate": 300_000_000.0,
        });
        assert_eq!(
            describe(&bytes),
            "tar 666.00 MiB / 2.79 GiB · 350.00 MiB/s · 7 s left"
        );
        let files = serde_json::json!({
            "name": "inspect", "fraction_done": 0.824, "done": 41_200, "total": 50_000,
            "units": "files", "time_remaining_sec": 8.2, "wt_avg_rate": 1030.4,
        });
        assert_eq!(
            describe(&files),
            "inspect 41,200 / 50,000 files · 1,030 files/s · 8 s left"
        );
        // No estimate yet, and an unknown total.
        let first = serde_json::json!({
            "name": "md5", "fraction_done": 0.0, "done": 0, "total": 10,
            "units": "files", "time_remaining_sec": null, "wt_avg_rate": null,
        });
        assert_eq!(describe(&first), "md5 0 / 10 files");
        let open =
            serde_json::json!({"name": "tar", "done": 2048, "total": null, "units": "bytes"});
        assert_eq!(describe(&open), "tar 2.00 KiB");
        let stable = serde_json::json!({"name": "2026-01-01T00:00:00", "time_remaining_sec": 125});
        assert_eq!(describe(&stable), "stable in 2 min 5 s");
        let slow = serde_json::json!({
            "name": "workflows", "fraction_done": 0.4, "done": 2, "total": 5,
            "units": "workflows", "time_remaining_sec": 150.0, "wt_avg_rate": 0.02,
        });
        assert_eq!(
            describe(&slow),
            "workflows 2 / 5 workflows · 1.2 workflows/min · 2 min 30 s left"
        );
        assert_eq!(human_seconds(7260.0), "2 h 1 min");
        assert_eq!(human_seconds(3600.0), "1 h");
    }

    #[test]
    fn custom_reports_replace_the_computed_one() {
        let progress = Progress::new();
        progress.report_custom(
            serde_json::json!({"name": "2026-01-01T00:00:00", "time_remaining_sec": 3}),
        );
        let report = RateEstimator::default().report(&progress.snapshot(), Instant::now());
        assert_eq!(report["time_remaining_sec"], 3);
    }
}

//! When a job is due: schedules parsed from the configuration and the pure functions that turn
//! them into fire times. No I/O and no clock: every function takes `now` or `after`.

use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// How a schedule's slots are laid out.
#[derive(Debug, Clone)]
pub enum Timing {
    /// Every `n` (a fixed rate, slots aligned to multiples of `n` since the Unix epoch, so they
    /// neither drift nor move when the scheduler restarts).
    Every(Duration),
    /// A six-field cron expression (seconds first), evaluated in the schedule's time zone.
    Cron(Box<Cron>),
}

/// What happens when a job is due while its previous run is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// The due run is skipped (and recorded as skipped, with the reason).
    Skip,
    /// The due run starts once the current one ends (at most one waits).
    Queue,
}

/// What happens to slots missed while no scheduler was running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misfire {
    /// They are skipped; the job next runs at its next slot.
    Skip,
    /// The job runs once at start-up, however many slots were missed.
    RunOnce,
}

/// A validated schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub timing: Timing,
    pub timezone: Tz,
    pub enabled: bool,
    pub overlap: Overlap,
    pub misfire: Misfire,
    /// Each fire is delayed by a fixed pseudo-random amount in `[0, jitter)`.
    pub jitter: Duration,
    /// The schedule as written (`every 10s`, `cron 0 0 7 * * *`), for display.
    pub text: String,
}

/// The raw fields of a `[schedules.<job>]` table, as strings.
#[derive(Debug, Clone, Default)]
pub struct ScheduleFields<'a> {
    pub cron: Option<&'a str>,
    pub every: Option<&'a str>,
    pub timezone: &'a str,
    pub enabled: bool,
    pub overlap: &'a str,
    pub misfire: &'a str,
    pub jitter: &'a str,
}

impl Schedule {
    /// Parses and checks a schedule. Errors name the field (`cron`, `every`, `timezone`, ...).
    pub fn parse(fields: &ScheduleFields<'_>) -> Result<Schedule, Vec<(&'static str, String)>> {
        let mut errors = Vec::new();
        let cron = fields.cron.filter(|s| !s.trim().is_empty());
        let every = fields.every.filter(|s| !s.trim().is_empty());
        let (timing, text) = match (cron, every) {
            (Some(_), Some(_)) => {
                errors.push((
                    "cron",
                    "set either `cron` or `every`, not both (set the other to \"\")".to_owned(),
                ));
                (None, String::new())
            }
            (None, None) => {
                errors.push((
                    "every",
                    "set `cron` (six fields, seconds first) or `every` (such as \"10s\")"
                        .to_owned(),
                ));
                (None, String::new())
            }
            (Some(expr), None) => match parse_cron(expr) {
                Ok(cron) => (
                    Some(Timing::Cron(Box::new(cron))),
                    format!("cron {}", expr.trim()),
                ),
                Err(err) => {
                    errors.push(("cron", err));
                    (None, String::new())
                }
            },
            (None, Some(text)) => match humantime::parse_duration(text.trim()) {
                Ok(d) if d >= Duration::from_secs(1) && d.subsec_nanos() == 0 => {
                    (Some(Timing::Every(d)), format!("every {}", text.trim()))
                }
                Ok(_) => {
                    errors.push((
                        "every",
                        format!("`{text}` is not a whole number of seconds of at least 1s"),
                    ));
                    (None, String::new())
                }
                Err(err) => {
                    errors.push((
                        "every",
                        format!("`{text}` is not a duration such as \"10s\" or \"15m\": {err}"),
                    ));
                    (None, String::new())
                }
            },
        };
        let timezone = match Tz::from_str(fields.timezone.trim()) {
            Ok(tz) => Some(tz),
            Err(_) => {
                errors.push((
                    "timezone",
                    format!("`{}` is not an IANA time zone name such as \"UTC\" or \"America/Indiana/Indianapolis\"", fields.timezone),
                ));
                None
            }
        };
        let overlap = match fields.overlap {
            "skip" => Some(Overlap::Skip),
            "queue" => Some(Overlap::Queue),
            other => {
                errors.push(("overlap", format!("`{other}` is not one of: skip, queue")));
                None
            }
        };
        let misfire = match fields.misfire {
            "skip" => Some(Misfire::Skip),
            "run_once" => Some(Misfire::RunOnce),
            other => {
                errors.push((
                    "misfire",
                    format!("`{other}` is not one of: skip, run_once"),
                ));
                None
            }
        };
        let jitter = if fields.jitter.trim().is_empty() {
            Some(Duration::ZERO)
        } else {
            match humantime::parse_duration(fields.jitter.trim()) {
                Ok(d) => Some(d),
                Err(err) => {
                    errors.push((
                        "jitter",
                        format!(
                            "`{}` is not a duration such as \"30s\": {err}",
                            fields.jitter
                        ),
                    ));
                    None
                }
            }
        };
        if let (Some(Timing::Every(every)), Some(jitter)) = (&timing, jitter)
            && jitter >= *every
        {
            errors.push((
                "jitter",
                format!(
                    "{} must be shorter than the interval ({})",
                    fields.jitter, text
                ),
            ));
        }
        match (timing, timezone, overlap, misfire, jitter) {
            (Some(timing), Some(timezone), Some(overlap), Some(misfire), Some(jitter))
                if errors.is_empty() =>
            {
                Ok(Schedule {
                    timing,
                    timezone,
                    enabled: fields.enabled,
                    overlap,
                    misfire,
                    jitter,
                    text,
                })
            }
            _ => Err(errors),
        }
    }

    /// The first slot strictly after `after`, if the schedule has one.
    pub fn next_slot(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.timing {
            Timing::Every(every) => {
                let step = every.as_millis() as i64;
                let at = after.timestamp_millis();
                let next = (at.div_euclid(step) + 1) * step;
                DateTime::from_timestamp_millis(next)
            }
            Timing::Cron(cron) => {
                let local = after.with_timezone(&self.timezone);
                cron.find_next_occurrence(&local, false)
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
            }
        }
    }

    /// The last slot at or before `at`, if any (used to tell whether slots were missed).
    pub fn previous_slot(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.timing {
            Timing::Every(every) => {
                let step = every.as_millis() as i64;
                DateTime::from_timestamp_millis(at.timestamp_millis().div_euclid(step) * step)
            }
            Timing::Cron(cron) => {
                let local = at.with_timezone(&self.timezone);
                cron.find_previous_occurrence(&local, true)
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
            }
        }
    }

    /// When the run of `slot` starts: the slot plus this job's jitter for it. The jitter is a
    /// hash of the job and the slot, so it spreads jobs and slots without any state and is the
    /// same if the plan is recomputed.
    pub fn fire_time(&self, job: &str, slot: DateTime<Utc>) -> DateTime<Utc> {
        let jitter_ms = self.jitter.as_millis() as u64;
        if jitter_ms == 0 {
            return slot;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        job.hash(&mut hasher);
        slot.timestamp_millis().hash(&mut hasher);
        slot + TimeDelta::milliseconds((hasher.finish() % jitter_ms) as i64)
    }
}

fn parse_cron(expr: &str) -> Result<Cron, String> {
    let fields = expr.split_whitespace().count();
    if fields != 6 {
        return Err(format!(
            "`{expr}` has {fields} fields; a schedule takes six, seconds first (\"0 0 7 * * *\" is 07:00 daily)"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Required)
        .build()
        .parse(expr)
        .map_err(|err| format!("`{expr}` is not a cron expression: {err}"))
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Timelike};

    use super::*;

    fn schedule(cron: Option<&str>, every: Option<&str>, timezone: &str) -> Schedule {
        Schedule::parse(&ScheduleFields {
            cron,
            every,
            timezone,
            enabled: true,
            overlap: "skip",
            misfire: "skip",
            jitter: "",
        })
        .unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn intervals_are_aligned_and_restart_stable() {
        let s = schedule(None, Some("10s"), "UTC");
        assert_eq!(
            s.next_slot(utc("2026-03-01T00:00:03Z")),
            Some(utc("2026-03-01T00:00:10Z"))
        );
        assert_eq!(
            s.next_slot(utc("2026-03-01T00:00:10Z")),
            Some(utc("2026-03-01T00:00:20Z"))
        );
        assert_eq!(
            s.previous_slot(utc("2026-03-01T00:00:19.999Z")),
            Some(utc("2026-03-01T00:00:10Z"))
        );
        // After a long stall the next slot is still in the future: no backlog, no drift into
        // the past (the failure of tokio-cron-scheduler's repeated jobs, its issue 113).
        let late = utc("2026-03-01T05:17:42Z");
        assert!(s.next_slot(late).unwrap() > late);
    }

    #[test]
    fn a_daily_job_fires_once_a_day_at_local_time_across_dst_changes() {
        // 2026 changes: US on 8 March and 1 November, EU on 29 March and 25 October.
        let cases = [
            (
                "America/Indiana/Indianapolis",
                "2026-03-06T12:00:00Z",
                "2026-10-30T12:00:00Z",
            ),
            (
                "Europe/Berlin",
                "2026-03-27T12:00:00Z",
                "2026-10-23T12:00:00Z",
            ),
        ];
        for (zone, spring, fall) in cases {
            let s = schedule(Some("0 0 7 * * *"), None, zone);
            let tz: Tz = zone.parse().unwrap();
            for start in [spring, fall] {
                let mut at = utc(start);
                let mut fires = Vec::new();
                for _ in 0..5 {
                    at = s.next_slot(at).unwrap();
                    fires.push(at);
                }
                for fire in &fires {
                    let local = fire.with_timezone(&tz);
                    assert_eq!(
                        (local.hour(), local.minute(), local.second()),
                        (7, 0, 0),
                        "{zone}: {fire}"
                    );
                }
                // One fire per local day: consecutive days, no day twice or skipped.
                for pair in fires.windows(2) {
                    let (a, b) = (
                        pair[0].with_timezone(&tz).date_naive(),
                        pair[1].with_timezone(&tz).date_naive(),
                    );
                    assert_eq!(b - a, TimeDelta::days(1), "{zone}: {pair:?}");
                }
                // Across the change the UTC gap is 23 or 25 hours.
                let gaps: Vec<i64> = fires
                    .windows(2)
                    .map(|p| (p[1] - p[0]).num_hours())
                    .collect();
                assert!(
                    gaps.iter().any(|h| *h != 24),
                    "{zone} from {start}: {gaps:?}"
                );
            }
        }
    }

    #[test]
    fn times_in_a_dst_gap_or_fold_fire_once() {
        // 02:30 does not exist on 8 March 2026 in Indianapolis and happens twice on 1 November.
        let s = schedule(Some("0 30 2 * * *"), None, "America/Indiana/Indianapolis");
        let tz: Tz = "America/Indiana/Indianapolis".parse().unwrap();
        let mut at = utc("2026-03-07T12:00:00Z");
        let mut days = Vec::new();
        for _ in 0..3 {
            at = s.next_slot(at).unwrap();
            days.push(at.with_timezone(&tz).date_naive());
        }
        days.dedup();
        assert_eq!(days.len(), 3, "one fire per day around the gap: {days:?}");
        let start = tz
            .with_ymd_and_hms(2026, 10, 31, 12, 0, 0)
            .unwrap()
            .with_timezone(&Utc);
        let mut at = start;
        let mut fires = Vec::new();
        while at < start + TimeDelta::days(3) {
            at = s.next_slot(at).unwrap();
            fires.push(at);
        }
        let on_fold_day = fires
            .iter()
            .filter(|f| {
                f.with_timezone(&tz).date_naive()
                    == chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap()
            })
            .count();
        assert_eq!(on_fold_day, 1, "{fires:?}");
    }

    #[test]
    fn jitter_stays_within_its_bound_and_is_stable() {
        let mut s = schedule(None, Some("1h"), "UTC");
        s.jitter = Duration::from_secs(30);
        let slot = utc("2026-03-01T10:00:00Z");
        let mut seen = std::collections::BTreeSet::new();
        for job in ["watch", "metrics", "reconcile", "purge_staged_datasets"] {
            for hour in 0..24 {
                let slot = slot + TimeDelta::hours(hour);
                let fire = s.fire_time(job, slot);
                assert!(
                    fire >= slot && fire < slot + TimeDelta::seconds(30),
                    "{job} {slot} {fire}"
                );
                assert_eq!(fire, s.fire_time(job, slot));
                seen.insert((fire - slot).num_milliseconds());
            }
        }
        assert!(
            seen.len() > 50,
            "jitter spreads the fires: {} distinct offsets",
            seen.len()
        );
    }

    #[test]
    fn bad_schedules_name_the_field() {
        let cases: Vec<(ScheduleFields<'_>, &str, &str)> = vec![
            (
                ScheduleFields {
                    cron: Some("0 7 * * *"),
                    ..fields()
                },
                "cron",
                "has 5 fields",
            ),
            (
                ScheduleFields {
                    cron: Some("0 0 25 * * *"),
                    ..fields()
                },
                "cron",
                "not a cron expression",
            ),
            (
                ScheduleFields {
                    every: Some("10 parsecs"),
                    ..fields()
                },
                "every",
                "not a duration",
            ),
            (
                ScheduleFields {
                    every: Some("500ms"),
                    ..fields()
                },
                "every",
                "whole number of seconds",
            ),
            (
                ScheduleFields {
                    every: Some("10s"),
                    cron: Some("0 0 7 * * *"),
                    ..fields()
                },
                "cron",
                "not both",
            ),
            (
                ScheduleFields {
                    every: Some("10s"),
                    timezone: "Mars/Olympus",
                    ..fields()
                },
                "timezone",
                "IANA",
            ),
            (
                ScheduleFields {
                    every: Some("10s"),
                    overlap: "sometimes",
                    ..fields()
                },
                "overlap",
                "skip, queue",
            ),
            (
                ScheduleFields {
                    every: Some("10s"),
                    misfire: "later",
                    ..fields()
                },
                "misfire",
                "skip, run_once",
            ),
            (
                ScheduleFields {
                    every: Some("10s"),
                    jitter: "20s",
                    ..fields()
                },
                "jitter",
                "shorter than",
            ),
            (fields(), "every", "set `cron`"),
        ];
        for (input, field, message) in cases {
            let errors = Schedule::parse(&input).unwrap_err();
            assert!(
                errors
                    .iter()
                    .any(|(f, m)| *f == field && m.contains(message)),
                "{input:?}: {errors:?}"
            );
        }
    }

    fn fields() -> ScheduleFields<'static> {
        ScheduleFields {
            cron: None,
            every: None,
            timezone: "UTC",
            enabled: true,
            overlap: "skip",
            misfire: "skip",
            jitter: "",
        }
    }
}

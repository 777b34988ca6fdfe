//! What the operator sees on the terminal: progress bars when stderr is a terminal, plain
//! log lines otherwise, and log output that does not tear the bars.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;

/// Least time between two progress log lines of one step when there are no bars.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Shows the progress of running steps. Cloning shares the display.
#[derive(Clone)]
pub struct Display {
    bars: Option<MultiProgress>,
    log_lines: bool,
}

impl Display {
    /// Bars when stderr is a terminal and `interactive` is set; log lines otherwise.
    pub fn new(interactive: bool) -> Display {
        if interactive && std::io::stderr().is_terminal() {
            Display {
                bars: Some(MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
                log_lines: false,
            }
        } else {
            Display {
                bars: None,
                log_lines: true,
            }
        }
    }

    /// Shows nothing (worker processes under a service manager log their steps anyway).
    pub fn quiet() -> Display {
        Display {
            bars: None,
            log_lines: false,
        }
    }

    /// Where log lines go: through the bars, so that they are printed above them.
    pub fn log_writer(&self) -> LogWriter {
        LogWriter {
            bars: self.bars.clone(),
        }
    }

    pub fn track(&self, label: &str) -> Tracker {
        // Log lines start only once a step has run for a while: short steps stay quiet.
        Tracker {
            bars: self.bars.clone(),
            bar: Mutex::new(None),
            label: label.to_owned(),
            log_lines: self.log_lines,
            last_log: Mutex::new(Instant::now()),
        }
    }
}

/// The display of one running step.
pub struct Tracker {
    bars: Option<MultiProgress>,
    /// Added on the first report, so steps that report nothing show no bar.
    bar: Mutex<Option<ProgressBar>>,
    label: String,
    log_lines: bool,
    last_log: Mutex<Instant>,
}

impl Tracker {
    /// Shows a progress report (spec F.5 fields).
    pub fn update(&self, report: &serde_json::Value) {
        let name = report["name"].as_str().unwrap_or_default();
        let done = report["done"].as_u64();
        let total = report["total"].as_u64();
        if let Some(bars) = &self.bars {
            let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
            let bar = slot.get_or_insert_with(|| {
                let bar = bars.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>28.bold} {msg:<16} [{bar:30}] {pos}/{len} ({eta})",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(self.label.clone());
                bar
            });
            match (done, total) {
                (Some(done), Some(total)) => {
                    bar.set_message(name.to_owned());
                    bar.set_length(total);
                    bar.set_position(done);
                }
                _ => {
                    let remaining = report["time_remaining_sec"].as_f64().unwrap_or_default();
                    bar.set_message(format!("stable in {remaining:.0} s"));
                }
            }
            return;
        }
        if !self.log_lines {
            return;
        }
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < LOG_EVERY {
            return;
        }
        *last = Instant::now();
        let units = report["units"].as_str().unwrap_or_default();
        match (done, total, report["time_remaining_sec"].as_f64()) {
            (Some(done), Some(total), eta) => {
                let percent = if total > 0 {
                    done as f64 * 100.0 / total as f64
                } else {
                    100.0
                };
                let eta = eta
                    .map(|s| format!(", about {s:.0} s left"))
                    .unwrap_or_default();
                info!("Progress: {name} {done}/{total} {units} ({percent:.0}%{eta})");
            }
            (Some(done), None, _) => info!("Progress: {name} {done} {units}"),
            _ => {
                if let Some(remaining) = report["time_remaining_sec"].as_f64() {
                    info!("Progress: waiting for the data to be stable, {remaining:.0} s left");
                }
            }
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar.into_inner().unwrap_or_else(|e| e.into_inner()) {
            bar.finish_and_clear();
        }
    }
}

/// A `tracing` writer that suspends the progress bars while a log line is printed.
#[derive(Clone)]
pub struct LogWriter {
    bars: Option<MultiProgress>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            bars: self.bars.clone(),
            buf: Vec::new(),
        }
    }
}

/// Collects one event and writes it in one piece when dropped.
pub struct LineWriter {
    bars: Option<MultiProgress>,
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let write = || {
            let _ = std::io::stderr().lock().write_all(&buf);
        };
        match &self.bars {
            Some(bars) => bars.suspend(write),
            None => write(),
        }
    }
}

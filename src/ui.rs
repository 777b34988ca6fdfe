//! What the operator sees on the terminal: progress bars when stderr is a terminal, plain
//! log lines otherwise, log output that does not tear the bars, and names from outside
//! (directories, files, errors) with their control characters escaped.

use std::borrow::Cow;
use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::field::{Field, Visit};
use tracing::info;
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// `text` with every control character (C0, DEL, C1) escaped the way Rust writes it (`\n`,
/// `\t`, `\u{1b}`). Directory names come from whoever can write to a drop directory: a
/// newline in one would forge a log line or break a table row, an escape sequence would drive
/// the terminal. Everything shown to the operator goes through this one function.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Shows a value (`{}` or `{:?}`) through [`escape_controls`].
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::write(&mut EscapingWriter(f), format_args!("{}", self.0))
    }
}

impl<T: fmt::Debug> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::write(&mut EscapingWriter(f), format_args!("{:?}", self.0))
    }
}

struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        self.0.write_str(&escape_controls(text))
    }
}

/// The fields of human-readable log lines, laid out as tracing lays them out, with the
/// message and every value escaped (JSON lines escape by themselves).
pub struct EscapedFields;

impl<'a> MakeVisitor<Writer<'a>> for EscapedFields {
    type Visitor = EscapedVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> EscapedVisitor<'a> {
        EscapedVisitor(DefaultVisitor::new(target, true))
    }
}

/// tracing's own visitor, handed escaped values.
pub struct EscapedVisitor<'a>(DefaultVisitor<'a>);

impl Visit for EscapedVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.record_str(field, &escape_controls(value));
        } else {
            // Shown quoted, with `{:?}`, which escapes already.
            self.0.record_str(field, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut sources = Vec::new();
        let mut source = value.source();
        while let Some(cause) = source {
            sources.push(cause.to_string());
            source = cause.source();
        }
        if !sources.is_empty() {
            text.push_str(&format!(
                " {}.sources=[{}]",
                field.name(),
                sources.join(", ")
            ));
        }
        self.0
            .record_debug(field, &format_args!("{}", escape_controls(&text)));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.record_debug(field, &Escaped(value));
    }
}

impl VisitOutput<fmt::Result> for EscapedVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.0.finish()
    }
}

impl VisitFmt for EscapedVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        self.0.writer()
    }
}

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
    /// Shows a progress report (spec F.5 fields), in human units (`progress::describe`).
    pub fn update(&self, report: &serde_json::Value) {
        let done = report["done"].as_u64();
        let total = report["total"].as_u64();
        if let Some(bars) = &self.bars {
            let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
            let bar = slot.get_or_insert_with(|| {
                let bar = bars.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>28.bold} [{bar:30}] {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                bar.set_prefix(self.label.clone());
                bar
            });
            if let (Some(done), Some(total)) = (done, total) {
                bar.set_length(total);
                bar.set_position(done);
            }
            bar.set_message(crate::progress::describe(report));
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
        let percent = match (done, total) {
            (Some(done), Some(total)) if total > 0 => {
                format!(" ({:.0}%)", done as f64 * 100.0 / total as f64)
            }
            _ => String::new(),
        };
        info!("Progress: {}{percent}", crate::progress::describe(report));
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn control_characters_are_escaped_and_nothing_else() {
        let cases = [
            ("plain name/with spaces", "plain name/with spaces"),
            ("a\nb\tc\rd", "a\\nb\\tc\\rd"),
            ("\u{1b}[31mred\u{7}", "\\u{1b}[31mred\\u{7}"),
            ("del\u{7f} c1\u{85}\u{9b}", "del\\u{7f} c1\\u{85}\\u{9b}"),
            ("nul\0", "nul\\0"),
            // Backslashes and printable Unicode are left alone.
            ("C:\\data é 数据", "C:\\data é 数据"),
        ];
        for (raw, shown) in cases {
            assert_eq!(escape_controls(raw), shown, "{raw:?}");
            assert_eq!(Escaped(raw).to_string(), shown, "{raw:?}");
        }
        assert!(matches!(escape_controls("clean"), Cow::Borrowed(_)));
    }

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn human_log_lines_escape_messages_fields_and_span_fields() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(EscapedFields)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let evil = "evil\nINFO forged \u{1b}[2J";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("step", name = %evil);
            let _entered = span.enter();
            let error = std::io::Error::other(evil);
            tracing::info!(
                directory = %evil,
                quoted = evil,
                error = &error as &(dyn std::error::Error + 'static),
                "Registered {evil}."
            );
        });
        let out = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.matches('\n').count(), 1, "{out}");
        assert!(!out.contains('\u{1b}'), "{out}");
        let shown = "evil\\nINFO forged \\u{1b}[2J";
        for expected in [
            format!("step{{name={shown}}}"),
            format!("Registered {shown}."),
            format!("directory={shown}"),
            format!("quoted=\"{shown}\""),
            format!("error={shown}"),
        ] {
            assert!(out.contains(&expected), "{expected} missing from {out}");
        }
    }
}

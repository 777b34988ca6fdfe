//! External programs run by steps (FastQC, MultiQC, BaseSpace's `bs`): bounded by a timeout,
//! stopped with the step, and never left running.
//!
//! Each program runs in a process group of its own, and the whole group is killed when the
//! step is cancelled, when the timeout passes, or when the future is dropped: FastQC is a
//! wrapper that starts a Java process, and killing only the wrapper would leave Java working on
//! beside the next attempt.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use super::StepError;
use crate::cancel::CancellationToken;

/// What a program printed, once it exited with 0.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
}

/// A program's run: what to start and how long it may take. `key` is the configuration key
/// of the limit, for the message when it is passed.
pub struct Run<'a> {
    pub program: &'a Path,
    pub args: Vec<OsString>,
    pub timeout: Duration,
    pub timeout_key: &'static str,
}

/// Kills the process group when dropped, unless the program was already reaped.
struct Group(Option<u32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self
            .0
            .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

impl Run<'_> {
    /// The command line, for messages.
    pub fn describe(&self) -> String {
        std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(|arg| arg.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the program to its end. A program that cannot be started, exits with another code
    /// than 0 or passes its timeout is a retryable failure naming the command line and what
    /// the program said; cancellation is `StepError::cancelled`.
    pub async fn output(&self, cancel: &CancellationToken) -> Result<Output, StepError> {
        let shown = self.describe();
        tracing::debug!(command = %shown, "Running a program.");
        let child = tokio::process::Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| {
                StepError::retryable(anyhow::Error::new(err).context(format!(
                    "cannot run `{}` (is it installed?)",
                    self.program.display()
                )))
            })?;
        let mut group = Group(child.id());
        let output = tokio::select! {
            output = child.wait_with_output() => output,
            () = cancel.cancelled() => return Err(StepError::cancelled()),
            () = tokio::time::sleep(self.timeout) => {
                return Err(StepError::retryable(anyhow::format_err!(
                    "`{shown}` did not finish within {} s ({}); it was stopped",
                    self.timeout.as_secs(),
                    self.timeout_key
                )));
            }
        };
        // Processes the program left behind in its group go with it. The group's id stays
        // taken while any member lives, so this never reaches another program.
        if let Some(pid) = group
            .0
            .take()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let output = output.map_err(|err| {
            StepError::retryable(anyhow::Error::new(err).context(format!("cannot run `{shown}`")))
        })?;
        if output.status.success() {
            return Ok(Output {
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            });
        }
        let mut said = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if said.is_empty() {
            said = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        }
        // The end of what it said: where programs put the reason they stopped.
        let tail: String = {
            let chars: Vec<char> = said.chars().collect();
            chars[chars.len().saturating_sub(1000)..].iter().collect()
        };
        Err(StepError::retryable(anyhow::format_err!(
            "`{shown}` failed ({}): {tail}",
            output.status
        )))
    }
}

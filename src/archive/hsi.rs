//! The HPSS archive through the `hsi` command (spec B.3, B.4, B.7, D.3): every operation is one
//! `hsi -P "<command>"` run without a shell, with every path quoted as one hsi word.
//!
//! Archive copies are written under a hidden temporary name next to the target, checked against
//! the bundle's MD5 through the checksum HPSS stored with them (`put -c on`, `hashlist`), and
//! only then renamed into place, so the target is never a partial or unverified file. Fetched
//! copies are likewise written next to the local target, hashed, and renamed into place.
//!
//! Progress is polled, not parsed: hsi's own transfer messages are meant for a terminal and
//! differ between hsi versions, while the growing size of the file being written is always
//! there (`ls -s1` of the temporary HPSS name during a put, the local file during a get).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use tracing::{debug, info};

use super::{Archive, ArchiveError, ArchivedFile};
use crate::cancel::CancellationToken;
use crate::compute::md5::{Md5Digest, md5_reader};
use crate::compute::{
    Pool, attempt_sibling, blocking, partial_name, remove_leftover_partials, sync_parent,
};
use crate::progress::Progress;

/// How the archive runs hsi.
#[derive(Debug, Clone)]
pub struct HsiConfig {
    /// The hsi program (`hsi` is looked up on `PATH`).
    pub command: PathBuf,
    /// Store and check checksums (`put -c on`, `get -c on`); without it transfers are plain
    /// and a put is checked by size only, as HPSS then keeps no checksum to compare.
    pub verify: bool,
    /// How often the size of a file being transferred is looked at for progress.
    pub progress_interval: Duration,
    /// Longest time a command other than a transfer may take (`ls`, `hashlist`, `mkdir`, `mv`,
    /// `rm`): a hung HPSS or authentication prompt then fails the step instead of holding it.
    pub command_timeout: Duration,
    /// Longest time a transfer may go on without a byte of progress before it is stopped.
    pub stall_timeout: Duration,
}

/// Bundles kept in HPSS. Archive paths are HPSS paths (relative ones are relative to the HPSS
/// home directory); local paths are paths on this host.
pub struct HsiArchive {
    config: HsiConfig,
    pool: Pool,
}

/// An hsi command that ran and failed. `stderr` is what hsi wrote to its standard error,
/// trimmed (its standard output when the error stream was empty).
#[derive(Debug, thiserror::Error)]
pub struct HsiFailure {
    pub command: String,
    /// The exit code, `None` when hsi was killed by a signal.
    pub code: Option<i32>,
    pub stderr: String,
}

impl std::fmt::Display for HsiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "hsi `{}` exited with code {code}", self.command)?,
            None => write!(f, "hsi `{}` was killed by a signal", self.command)?,
        }
        if self.stderr.is_empty() {
            Ok(())
        } else {
            write!(f, ": {}", self.stderr)
        }
    }
}

impl HsiFailure {
    /// Whether hsi failed because the HPSS path does not exist: HPSS reports that as error -2,
    /// `HPSS_ENOENT` ("No such file or directory").
    pub fn is_missing_file(&self) -> bool {
        self.stderr.contains("HPSS_ENOENT") || self.stderr.contains("No such file or directory")
    }
}

/// A path that cannot be written into an hsi command without changing its meaning.
#[derive(Debug, thiserror::Error)]
#[error("the path {path:?} cannot be passed to hsi: {reason}")]
pub struct UnquotablePath {
    pub path: String,
    pub reason: &'static str,
}

/// Quotes `path` as one word of an hsi command.
///
/// The hsi reference manual ("Path Names") says that hsi separates words at spaces, that
/// pathnames containing spaces must be quoted, and that wildcards (`* ? ^ [] {}`) are expanded
/// in every command; hsi itself prints paths enclosed in single quotes. It documents no way to
/// escape a quote character inside a quoted path. So a path is enclosed in single quotes, or
/// in double quotes when it contains a single quote; a path that contains both cannot be
/// quoted and is refused, as is one with a control character (the manual lists 0x20 to 0x7E
/// as the characters of a path parameter, and a newline would end the command). A leading `-`
/// would read as an option, so it is refused too.
pub fn quote_path(path: &str) -> Result<String, UnquotablePath> {
    let refuse = |reason| {
        Err(UnquotablePath {
            path: path.to_owned(),
            reason,
        })
    };
    if path.is_empty() {
        return refuse("it is empty");
    }
    if path.chars().any(char::is_control) {
        return refuse("it contains a control character (such as a newline or a tab)");
    }
    if path.starts_with('-') {
        return refuse("it starts with `-`, which hsi reads as an option");
    }
    match (path.contains('\''), path.contains('"')) {
        (false, _) => Ok(format!("'{path}'")),
        (true, false) => Ok(format!("\"{path}\"")),
        (true, true) => refuse("it contains both a single and a double quote"),
    }
}

/// What HPSS holds at a path, as far as checksums go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    Missing,
    /// A file stored without a checksum (`hashlist` prints `(none)`).
    NoHash,
    Hash(Md5Digest),
}

/// Why running hsi did not give an answer.
enum RunError {
    Failed(HsiFailure),
    Other(anyhow::Error),
    /// Stopped by the step's cancellation; hsi was killed.
    Cancelled,
}

impl RunError {
    fn is_missing_file(&self) -> bool {
        matches!(self, RunError::Failed(failure) if failure.is_missing_file())
    }

    fn into_anyhow(self) -> anyhow::Error {
        match self {
            RunError::Failed(failure) => anyhow::Error::new(failure),
            RunError::Other(err) => err,
            RunError::Cancelled => anyhow::Error::new(crate::cancel::Cancelled),
        }
    }

    fn transient(self) -> ArchiveError {
        match self {
            RunError::Cancelled => ArchiveError::Cancelled,
            other => ArchiveError::Transient(other.into_anyhow()),
        }
    }

    /// `NotFound` for a missing `archive_path`, `Transient` otherwise.
    fn not_found_or_transient(self, archive_path: &str) -> ArchiveError {
        if self.is_missing_file() {
            ArchiveError::NotFound(archive_path.to_owned())
        } else {
            self.transient()
        }
    }
}

/// Longest hsi error text kept in an error message: enough for any real diagnostic, short
/// enough that a flood of output does not end up in every log line and task result.
const MAX_STDERR: usize = 4096;

fn trimmed_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.len() <= MAX_STDERR {
        return text.to_owned();
    }
    let mut start = text.len() - MAX_STDERR;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

fn invalid(err: UnquotablePath) -> ArchiveError {
    ArchiveError::Invalid(err.into())
}

/// The local path as hsi must see it: absolute (a relative local name starting with `-` or `|`
/// would mean standard input or a pipe command to hsi), UTF-8, and quoted.
fn quote_local(path: &Path) -> Result<String, ArchiveError> {
    let absolute = std::path::absolute(path).map_err(|err| {
        ArchiveError::Transient(
            anyhow::Error::new(err).context(format!("cannot resolve `{}`", path.display())),
        )
    })?;
    let text = absolute.to_str().ok_or_else(|| {
        invalid(UnquotablePath {
            path: absolute.to_string_lossy().into_owned(),
            reason: "it is not valid UTF-8",
        })
    })?;
    quote_path(text).map_err(invalid)
}

/// The hidden name a put writes to before the checked copy is renamed to `archive_path`. It is
/// the same for every attempt, so the next attempt replaces a crash's leftover on HPSS (where no
/// process can be asked whether it still runs); two attempts never overlap, because a cancelled
/// step kills its hsi and a step stops before its claim could pass to another worker.
fn remote_partial(archive_path: &str) -> String {
    partial_name(Path::new(archive_path))
        .to_string_lossy()
        .into_owned()
}

/// The HPSS directory holding `archive_path`, if it names one.
fn remote_parent(archive_path: &str) -> Option<&str> {
    match archive_path.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => None,
        Some((parent, _)) => Some(parent),
    }
}

/// The first word of hsi's standard output (the value of `ls -s1` and `hashlist`).
fn first_word(stdout: &str) -> Option<&str> {
    stdout.split_whitespace().next()
}

impl HsiArchive {
    pub fn new(config: HsiConfig, pool: Pool) -> HsiArchive {
        HsiArchive { config, pool }
    }

    /// Fetches `archive_path` into `local` (through a partial file, renamed once complete and
    /// synced) and returns the MD5 of the fetched bytes; with `verify`, HPSS also checks them
    /// against the checksum it holds (`get -c on`).
    async fn fetch(
        &self,
        archive_path: &str,
        local: &Path,
        verify: bool,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<Md5Digest, ArchiveError> {
        let remote = quote_path(archive_path).map_err(invalid)?;
        let target = local.to_path_buf();
        blocking(move || remove_leftover_partials(&target))
            .await
            .with_context(|| format!("cannot remove leftovers next to `{}`", local.display()))
            .map_err(ArchiveError::Transient)?;
        let partial = attempt_sibling(local);
        let partial_quoted = quote_local(&partial)?;
        let size = self
            .remote_size(&remote, cancel)
            .await
            .map_err(|err| err.not_found_or_transient(archive_path))?;
        progress.start("sda get", "bytes", Some(size));

        let get = if verify { "get -c on" } else { "get" };
        let transferred = self
            .transfer_with_progress(
                &format!("{get} {partial_quoted} : {remote}"),
                cancel,
                || async {
                    let done = tokio::fs::metadata(&partial).await.ok().map(|m| m.len());
                    if let Some(done) = done {
                        progress.set_done(done);
                    }
                    done
                },
            )
            .await;
        if let Err(err) = transferred {
            let leftover = partial.clone();
            let _ = blocking(move || std::fs::remove_file(&leftover)).await;
            return Err(err.not_found_or_transient(archive_path));
        }

        progress.start("md5", "bytes", Some(size));
        let (fetched, target, counter) = (partial.clone(), local.to_path_buf(), progress.clone());
        let hashed = self
            .pool
            .run_job(cancel, move |cancel| -> anyhow::Result<Md5Digest> {
                let mut file = std::fs::File::open(&fetched)
                    .with_context(|| format!("cannot open `{}`", fetched.display()))?;
                let (md5, _) = md5_reader(&mut file, &mut |n| counter.add(n), cancel)
                    .with_context(|| format!("cannot read `{}`", fetched.display()))?;
                file.sync_all()
                    .with_context(|| format!("cannot sync `{}`", fetched.display()))?;
                std::fs::rename(&fetched, &target).with_context(|| {
                    format!(
                        "cannot rename `{}` to `{}`",
                        fetched.display(),
                        target.display()
                    )
                })?;
                sync_parent(&target).with_context(|| {
                    format!("cannot sync the directory of `{}`", target.display())
                })?;
                Ok(md5)
            })
            .await;
        match hashed {
            Ok(Ok(md5)) => {
                crate::metrics::transferred(crate::metrics::Direction::Stage, size);
                Ok(md5)
            }
            outcome => {
                let leftover = partial.clone();
                let _ = blocking(move || std::fs::remove_file(&leftover)).await;
                match outcome {
                    Ok(Err(err)) if !crate::cancel::in_chain(&err) => {
                        Err(ArchiveError::Transient(err))
                    }
                    _ => Err(ArchiveError::Cancelled),
                }
            }
        }
    }

    /// Runs `hsi -P "<command>"` within the command timeout and returns its standard output.
    async fn run(&self, command: &str, cancel: &CancellationToken) -> Result<String, RunError> {
        self.run_for(command, cancel, Some(self.config.command_timeout))
            .await
    }

    /// Runs `hsi -P "<command>"` and returns its standard output. The child is killed when
    /// `cancel` is cancelled, when `timeout` passes, or if the returned future is dropped, so a
    /// stopped step leaves no transfer running.
    async fn run_for(
        &self,
        command: &str,
        cancel: &CancellationToken,
        timeout: Option<Duration>,
    ) -> Result<String, RunError> {
        debug!(command, "Running hsi.");
        let child = tokio::process::Command::new(&self.config.command)
            .arg("-P")
            .arg(command)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let deadline = async {
            match timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        let output = tokio::select! {
            output = child => output,
            () = cancel.cancelled() => return Err(RunError::Cancelled),
            () = deadline => {
                return Err(RunError::Other(anyhow::format_err!(
                    "hsi `{command}` did not finish within {} s (hsi.command_timeout_seconds); it was stopped",
                    timeout.unwrap_or_default().as_secs()
                )));
            }
        };
        let output = output.map_err(|err| {
            RunError::Other(anyhow::Error::new(err).context(format!(
                "cannot run `{}` for hsi `{command}`",
                self.config.command.display()
            )))
        })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let mut stderr = trimmed_text(&output.stderr);
        if stderr.is_empty() {
            stderr = trimmed_text(&output.stdout);
        }
        Err(RunError::Failed(HsiFailure {
            command: command.to_owned(),
            code: output.status.code(),
            stderr,
        }))
    }

    /// The size in bytes of an HPSS file (`ls -s1`).
    async fn remote_size(&self, quoted: &str, cancel: &CancellationToken) -> Result<u64, RunError> {
        let command = format!("ls -s1 {quoted}");
        let stdout = self.run(&command, cancel).await?;
        first_word(&stdout)
            .and_then(|word| word.parse::<u64>().ok())
            .ok_or_else(|| {
                RunError::Other(anyhow::format_err!(
                    "hsi `{command}` printed no size: {:?}",
                    stdout.trim()
                ))
            })
    }

    /// What HPSS holds at `quoted` (`hashlist`; `(none)` means stored without a checksum).
    async fn stored(
        &self,
        quoted: &str,
        cancel: &CancellationToken,
    ) -> Result<Stored, ArchiveError> {
        let command = format!("hashlist {quoted}");
        let stdout = match self.run(&command, cancel).await {
            Ok(stdout) => stdout,
            Err(err) if err.is_missing_file() => return Ok(Stored::Missing),
            Err(err) => return Err(err.transient()),
        };
        match first_word(&stdout) {
            Some("(none)") => Ok(Stored::NoHash),
            Some(word) => word.parse().map(Stored::Hash).map_err(|err| {
                ArchiveError::Transient(
                    anyhow::Error::new(err).context(format!("hsi `{command}` printed no MD5")),
                )
            }),
            None => Err(ArchiveError::Transient(anyhow::format_err!(
                "hsi `{command}` printed nothing"
            ))),
        }
    }

    /// Runs `command` (a transfer) while calling `poll` every progress interval for the bytes
    /// transferred so far; `poll` runs concurrently with the transfer, which is never held up by
    /// it. A transfer whose size has not moved for the stall timeout is stopped.
    async fn transfer_with_progress<P, F>(
        &self,
        command: &str,
        cancel: &CancellationToken,
        poll: P,
    ) -> Result<(), RunError>
    where
        P: Fn() -> F,
        F: Future<Output = Option<u64>>,
    {
        let transfer = self.run_for(command, cancel, None);
        tokio::pin!(transfer);
        let mut ticker = tokio::time::interval(self.config.progress_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; there is nothing to measure yet.
        ticker.tick().await;
        let (mut last_size, mut last_move) = (None, tokio::time::Instant::now());
        loop {
            tokio::select! {
                biased;
                done = &mut transfer => return done.map(drop),
                _ = ticker.tick() => {}
            }
            let size = tokio::select! {
                biased;
                done = &mut transfer => return done.map(drop),
                size = poll() => size,
            };
            if size.is_some() && size != last_size {
                (last_size, last_move) = (size, tokio::time::Instant::now());
            } else if last_move.elapsed() >= self.config.stall_timeout {
                // Dropping `transfer` kills hsi.
                return Err(RunError::Other(anyhow::format_err!(
                    "hsi `{command}` made no progress for {} s (hsi.stall_timeout_seconds); it was stopped",
                    self.config.stall_timeout.as_secs()
                )));
            }
        }
    }

    /// Removes an HPSS file; a file that is already gone is not an error.
    async fn remove_remote(
        &self,
        quoted: &str,
        cancel: &CancellationToken,
    ) -> Result<(), RunError> {
        match self.run(&format!("rm {quoted}"), cancel).await {
            Err(err) if err.is_missing_file() => Ok(()),
            other => other.map(drop),
        }
    }

    /// Checks the copy at `partial` against the bundle: its stored checksum with verification
    /// on, its size otherwise.
    async fn check_copy(
        &self,
        local: &Path,
        archive_path: &str,
        partial: &str,
        md5: Md5Digest,
        size: u64,
        cancel: &CancellationToken,
    ) -> Result<(), ArchiveError> {
        if !self.config.verify {
            let stored_size = self
                .remote_size(partial, cancel)
                .await
                .map_err(RunError::transient)?;
            if stored_size != size {
                return Err(ArchiveError::Transient(anyhow::format_err!(
                    "the archive copy of `{}` for `{archive_path}` has {stored_size} bytes, but the bundle has {size}",
                    local.display()
                )));
            }
            return Ok(());
        }
        match self.stored(partial, cancel).await? {
            Stored::Hash(stored) if stored == md5 => Ok(()),
            Stored::Hash(stored) => Err(ArchiveError::Transient(anyhow::format_err!(
                "checksum mismatch: the archive copy of `{}` for `{archive_path}` has MD5 {stored}, but the bundle has MD5 {md5}",
                local.display()
            ))),
            Stored::NoHash => Err(ArchiveError::Transient(anyhow::format_err!(
                "the archive copy of `{}` for `{archive_path}` was stored without a checksum",
                local.display()
            ))),
            Stored::Missing => Err(ArchiveError::Transient(anyhow::format_err!(
                "the archive copy of `{}` for `{archive_path}` is missing after the transfer",
                local.display()
            ))),
        }
    }
}

#[async_trait]
impl Archive for HsiArchive {
    fn describe(&self) -> &'static str {
        "HPSS via hsi"
    }

    fn reads_to_checksum(&self) -> bool {
        // `stat` answers with the checksum HPSS holds (`hashlist`).
        false
    }

    async fn put(
        &self,
        local: &Path,
        archive_path: &str,
        md5: Md5Digest,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<(), ArchiveError> {
        let target = quote_path(archive_path).map_err(invalid)?;
        let partial = quote_path(&remote_partial(archive_path)).map_err(invalid)?;
        let parent = remote_parent(archive_path)
            .map(quote_path)
            .transpose()
            .map_err(invalid)?;
        let local_quoted = quote_local(local)?;
        let local_path = local.to_path_buf();
        let size = blocking(move || std::fs::metadata(&local_path))
            .await
            .with_context(|| format!("cannot read `{}`", local.display()))
            .map_err(ArchiveError::Transient)?
            .len();
        progress.start("sda put", "bytes", Some(size));

        if let Some(parent) = &parent {
            self.run(&format!("mkdir -p {parent}"), cancel)
                .await
                .map_err(RunError::transient)?;
        }
        // The preflight of the original: the same bytes already archived need no transfer.
        let existing = self.stored(&target, cancel).await?;
        if existing == Stored::Hash(md5) {
            info!(archive_path, md5 = %md5, "The archive already holds this bundle; not transferring it again.");
            progress.set_done(size);
            return Ok(());
        }

        let put = if self.config.verify {
            "put -c on"
        } else {
            "put"
        };
        let transferred = self
            .transfer_with_progress(
                &format!("{put} {local_quoted} : {partial}"),
                cancel,
                || async {
                    let done = self.remote_size(&partial, cancel).await.ok();
                    if let Some(done) = done {
                        progress.set_done(done);
                    }
                    done
                },
            )
            .await;
        let checked = match transferred {
            Ok(()) => {
                self.check_copy(local, archive_path, &partial, md5, size, cancel)
                    .await
            }
            Err(err) => Err(err.transient()),
        };
        if let Err(err) = checked {
            // Best effort (and not cancellable: it cleans up after a cancellation too); a
            // leftover is overwritten by the next attempt anyway.
            let _ = self
                .remove_remote(&partial, &CancellationToken::new())
                .await;
            return Err(err);
        }
        // The checked copy replaces whatever was there: a copy with another checksum, or one
        // stored without any (which cannot be trusted to be this bundle).
        if existing != Stored::Missing {
            self.remove_remote(&target, cancel)
                .await
                .map_err(RunError::transient)?;
        }
        self.run(&format!("mv {partial} {target}"), cancel)
            .await
            .map_err(RunError::transient)?;
        progress.set_done(size);
        crate::metrics::transferred(crate::metrics::Direction::Archive, size);
        Ok(())
    }

    async fn get(
        &self,
        archive_path: &str,
        local: &Path,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<Md5Digest, ArchiveError> {
        self.fetch(archive_path, local, self.config.verify, progress, cancel)
            .await
    }

    async fn recall(
        &self,
        archive_path: &str,
        local: &Path,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<Md5Digest, ArchiveError> {
        self.fetch(archive_path, local, false, progress, cancel)
            .await
    }

    async fn delete(&self, archive_path: &str) -> Result<bool, ArchiveError> {
        let quoted = quote_path(archive_path).map_err(invalid)?;
        let cancel = CancellationToken::new();
        match self.run(&format!("ls {quoted}"), &cancel).await {
            Ok(_) => {}
            Err(err) if err.is_missing_file() => return Ok(false),
            // Not knowing whether the bundle is there is not "nothing to remove".
            Err(err) => return Err(err.transient()),
        }
        self.run(&format!("rm {quoted}"), &cancel)
            .await
            .map_err(RunError::transient)?;
        Ok(true)
    }

    /// `pwd`: answers only when `hsi` is found and authenticated (its keytab or credentials).
    async fn check(&self, cancel: &CancellationToken) -> Result<Option<String>, ArchiveError> {
        let answer = self.run("pwd", cancel).await.map_err(RunError::transient)?;
        Ok(Some(trimmed_text(answer.as_bytes())))
    }

    /// `hashlist` for the MD5 HPSS stored with the file (`put -c on`), `ls -s1` for its size.
    async fn stat(
        &self,
        archive_path: &str,
        cancel: &CancellationToken,
    ) -> Result<ArchivedFile, ArchiveError> {
        let quoted = quote_path(archive_path).map_err(invalid)?;
        let md5 = match self.stored(&quoted, cancel).await? {
            Stored::Missing => return Err(ArchiveError::NotFound(archive_path.to_owned())),
            Stored::NoHash => None,
            Stored::Hash(md5) => Some(md5),
        };
        let size = self
            .remote_size(&quoted, cancel)
            .await
            .map_err(|err| err.not_found_or_transient(archive_path))?;
        Ok(ArchivedFile { size, md5 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_single_quoted_unless_they_hold_a_single_quote() {
        assert_eq!(quote_path("a b/c.tar").unwrap(), "'a b/c.tar'");
        assert_eq!(
            quote_path("$HOME;rm *\"x\".tar").unwrap(),
            "'$HOME;rm *\"x\".tar'"
        );
        assert_eq!(quote_path("it's.tar").unwrap(), "\"it's.tar\"");
        assert_eq!(quote_path("données.tar").unwrap(), "'données.tar'");
    }

    #[test]
    fn unquotable_paths_are_refused_by_name() {
        for (path, reason) in [
            ("a\nb", "control character"),
            ("a\tb", "control character"),
            ("it's \"x\"", "both a single and a double quote"),
            ("", "empty"),
            ("-rf", "option"),
        ] {
            let err = quote_path(path).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(&format!("{path:?}")), "{message}");
            assert!(message.contains(reason), "{message}");
        }
    }

    #[test]
    fn parents_of_archive_paths() {
        assert_eq!(remote_parent("a/b/c.tar"), Some("a/b"));
        assert_eq!(remote_parent("/abs/c.tar"), Some("/abs"));
        assert_eq!(remote_parent("/c.tar"), None);
        assert_eq!(remote_parent("c.tar"), None);
    }

    #[test]
    fn missing_files_are_recognised_by_the_hpss_error() {
        let failure = |stderr: &str| HsiFailure {
            command: "ls 'x'".into(),
            code: Some(64),
            stderr: stderr.into(),
        };
        assert!(
            failure("*** hpss_Lstat: No such file or directory [-2: HPSS_ENOENT]")
                .is_missing_file()
        );
        assert!(!failure("*** hpss_Open: I/O error [-5: HPSS_EIO]").is_missing_file());
        let shown = failure("boom").to_string();
        assert_eq!(shown, "hsi `ls 'x'` exited with code 64: boom");
    }

    #[test]
    fn long_error_output_keeps_its_end() {
        let text = format!("{}END", "é".repeat(5000));
        let kept = trimmed_text(text.as_bytes());
        assert!(kept.ends_with("END"));
        assert!(kept.len() <= MAX_STDERR + "…".len());
    }
}

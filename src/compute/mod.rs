//! CPU-bound data path: checksums, tar bundles, extraction and tree walks, all run on one rayon pool.
//!
//! Async code hands work to [`Pool::run`] so runtime threads never block on disk reads or hashing.

pub mod bundle;
pub mod extract;
pub mod manifest;
pub mod md5;
pub mod walk;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;

use crate::cancel::{CancellationToken, Cancelled, check};
use rustix::fs::{CWD, RenameFlags, renameat_with};

/// The one CPU pool: checksums, tar, extraction and tree walks run here, never on async runtime threads.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<rayon::ThreadPool>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads())
            .finish()
    }
}

impl Pool {
    /// Builds a pool of `threads` worker threads named `workers-cpu-{i}`; `threads` must be at least 1
    /// (the caller decides what "all cores" means).
    pub fn new(threads: usize) -> anyhow::Result<Pool> {
        anyhow::ensure!(threads >= 1, "the CPU pool needs at least one thread");
        let inner = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("workers-cpu-{i}"))
            .build()
            .context("cannot start the CPU thread pool")?;
        Ok(Pool {
            inner: Arc::new(inner),
        })
    }

    pub fn threads(&self) -> usize {
        self.inner.current_num_threads()
    }

    /// Runs `f` on the pool and awaits its result without blocking the async runtime (tokio oneshot).
    /// A panic inside `f` is resumed in the awaiting task (std::panic::resume_unwind).
    ///
    /// For short jobs that need no cancellation (they end on their own within moments); long ones
    /// use [`Pool::run_job`]. Dropping the returned future does not stop `f`.
    pub async fn run<T, F>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.spawn(move || {
            let outcome = panic::catch_unwind(AssertUnwindSafe(f));
            // The receiver is gone only when the caller stopped waiting; nothing is left to tell.
            let _ = tx.send(outcome);
        });
        match rx.await {
            Ok(Ok(value)) => value,
            Ok(Err(payload)) => panic::resume_unwind(payload),
            // The job always sends before its sender drops, and the pool outlives `self`.
            Err(_) => panic!("a CPU pool job ended without reporting its result"),
        }
    }

    /// Runs a long job on the pool under a child of `cancel`, which the job polls (per chunk,
    /// entry or member) to stop early. The future resolves once the job has returned, so after a
    /// cancellation the caller knows the job has stopped and cleaned up. Dropping the future
    /// cancels the job too (it then stops on its own, unobserved). A job whose token is cancelled
    /// before it starts never runs: `Err(Cancelled)`.
    pub async fn run_job<T, F>(&self, cancel: &CancellationToken, f: F) -> Result<T, Cancelled>
    where
        F: FnOnce(&CancellationToken) -> T + Send + 'static,
        T: Send + 'static,
    {
        let token = cancel.child_token();
        // Cancels the job if this future is dropped before it ends; harmless once it has.
        let _stop_on_drop = token.clone().drop_guard();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.spawn(move || {
            if token.is_cancelled() {
                let _ = tx.send(Ok(Err(Cancelled)));
                return;
            }
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| f(&token)));
            let _ = tx.send(outcome.map(Ok));
        });
        match rx.await {
            Ok(Ok(value)) => value,
            Ok(Err(payload)) => panic::resume_unwind(payload),
            Err(_) => panic!("a CPU pool job ended without reporting its result"),
        }
    }

    /// Runs `f` inside the pool from synchronous code (benchmarks, tests).
    pub fn install<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        self.inner.install(f)
    }
}

/// Runs a file-system call (a `stat`, `mkdir`, `rename`, a small read) on tokio's blocking threads,
/// never on the runtime's own: a hung network mount then holds one of those threads, while
/// heartbeats, claim renewals and lease renewals go on. A panic is resumed in the caller.
pub async fn blocking<T, F>(f: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(err) if err.is_panic() => panic::resume_unwind(err.into_panic()),
        Err(err) => panic!("a blocking file-system call was cancelled: {err}"),
    }
}

/// A file one attempt made for itself (a spool, a generated bundle): removed by `remove`, which
/// waits for it, or else when the guard is dropped, on whatever path leaves the step (an error,
/// a cancellation), off the runtime threads.
#[derive(Debug)]
pub struct TempFile(Option<PathBuf>);

impl TempFile {
    pub fn new(path: PathBuf) -> TempFile {
        TempFile(Some(path))
    }

    pub fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// Removes the file now (a file already gone is fine).
    pub async fn remove(mut self) -> io::Result<()> {
        match self.0.take() {
            Some(path) => blocking(move || ignore_missing(fs::remove_file(path))).await,
            None => Ok(()),
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let Some(path) = self.0.take() else {
            return;
        };
        let remove = move || {
            if let Err(err) = ignore_missing(fs::remove_file(&path)) {
                tracing::warn!(path = %path.display(), error = %err, "Could not remove a temporary file.");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// Makes a rename of `path` durable by syncing the directory that holds it.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    sync_dir(parent)
}

/// Makes the entries of directory `dir` (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir).and_then(|dir| dir.sync_all())
}

/// Leftover partials untouched for this long are removed whoever made them: no attempt runs
/// that long without writing to its partial, and a process on another host cannot be asked
/// whether it still lives.
const LEFTOVER_AGE: Duration = Duration::from_secs(24 * 3600);

/// `.{hash of the final name}.`: the prefix shared by every partial of one final path. The
/// name stays short whatever the length of the final name (a 255-byte name plus a suffix would
/// not fit in a path component).
fn partial_prefix(path: &Path) -> String {
    let name = path.file_name().unwrap_or_default();
    let digest = openssl::sha::sha256(name.as_encoded_bytes());
    format!(".{}.", hex::encode(&digest[..8]))
}

/// A hidden sibling of `path` that is the same for every attempt: `.{hash of the name}.partial`,
/// for places where no process can be asked whether a leftover's writer still runs (HPSS).
pub fn partial_name(path: &Path) -> PathBuf {
    path.with_file_name(format!("{}partial", partial_prefix(path)))
}

/// This host's short tag in partial names, so that a leftover's process can be judged dead
/// only on the host that ran it.
fn host_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let host = rustix::system::uname().nodename().to_bytes().to_vec();
        hex::encode(&openssl::sha::sha256(&host)[..4])
    })
}

/// Where one attempt builds `path` before renaming it into place: a hidden sibling,
/// `.{hash of the name}.{host}-{pid}-{random}.partial`, unique to this attempt. Two attempts of
/// the same work (a redelivered message next to a cancelled job still stopping) therefore never
/// write, truncate, remove or rename each other's partial; each can only put its own complete
/// result into place. Leftovers of dead attempts go with [`remove_leftover_partials`].
pub fn attempt_sibling(path: &Path) -> PathBuf {
    let random = uuid::Uuid::new_v4().simple().to_string();
    path.with_file_name(format!(
        "{}{}-{}-{}.partial",
        partial_prefix(path),
        host_tag(),
        std::process::id(),
        &random[..8]
    ))
}

/// Removes the partials of `path` that earlier attempts left behind: those of processes of
/// this host that no longer run, and any left untouched for a day. Partials of live attempts
/// (another workflow staging the same dataset, a cancelled job of this process still stopping)
/// are left alone: each removes its own.
pub fn remove_leftover_partials(path: &Path) -> io::Result<()> {
    let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    let prefix = partial_prefix(path);
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    let me = std::process::id();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix.as_str()))
            .and_then(|n| n.strip_suffix(".partial"))
        else {
            continue;
        };
        let mut parts = owner.split('-');
        let (host, pid) = (
            parts.next(),
            parts.next().and_then(|p| p.parse::<u32>().ok()),
        );
        let dead_here =
            host == Some(host_tag()) && pid.is_some_and(|pid| pid != me && !process_alive(pid));
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|modified| {
                SystemTime::now()
                    .duration_since(modified)
                    .is_ok_and(|age| age > LEFTOVER_AGE)
            });
        if dead_here || stale {
            tracing::info!(path = %entry.path().display(), "Removing a leftover of an earlier attempt.");
            remove_tree(&entry.path(), &CancellationToken::new())?;
        }
    }
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    rustix::process::Pid::from_raw(raw).is_some_and(|pid| {
        !matches!(
            rustix::process::test_kill_process(pid),
            Err(rustix::io::Errno::SRCH)
        )
    })
}

/// Removes `path`, a file, a link or a whole tree, whatever the permissions of its directories:
/// instruments write read-only trees (0555), and a directory must be writable to remove its
/// entries and searchable to list them, so each directory is given its owner's `rwx` as the
/// removal reaches it. Links are removed, never followed. A missing `path` is not an error.
/// Checks `cancel` per entry; a cancelled removal leaves the rest of the tree in place.
pub fn remove_tree(path: &Path, cancel: &CancellationToken) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    if !meta.is_dir() {
        return ignore_missing(fs::remove_file(path));
    }
    remove_dir_contents(path, &meta, cancel)?;
    ignore_missing(fs::remove_dir(path))
}

fn remove_dir_contents(
    dir: &Path,
    meta: &fs::Metadata,
    cancel: &CancellationToken,
) -> io::Result<()> {
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o700))?;
    }
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    for entry in entries {
        check(cancel)?;
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            match fs::symlink_metadata(&path) {
                Ok(meta) => remove_dir_contents(&path, &meta, cancel)?,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            }
            ignore_missing(fs::remove_dir(&path))?;
        } else {
            ignore_missing(fs::remove_file(&path))?;
        }
    }
    Ok(())
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Puts the directory `new` at `dest`, replacing whatever tree is there as one atomic step where
/// the file system allows (`renameat2(RENAME_EXCHANGE)`), so `dest` is always a complete tree:
/// the old one until the swap, the new one after. Returns the path where the old tree now is (to
/// be removed by the caller), or `None` when `dest` did not exist. Without exchange support the
/// old tree is first renamed aside, leaving `dest` missing for the moment between two renames.
pub fn swap_into_place(new: &Path, dest: &Path) -> io::Result<Option<PathBuf>> {
    match fs::symlink_metadata(dest) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            match renameat_with(CWD, new, CWD, dest, RenameFlags::NOREPLACE) {
                Ok(()) => return Ok(None),
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                    fs::rename(new, dest)?;
                    return Ok(None);
                }
                // Something appeared at `dest` meanwhile: swap with it below.
                Err(rustix::io::Errno::EXIST) => {}
                Err(err) => return Err(err.into()),
            }
        }
        Err(err) => return Err(err),
        Ok(_) => {}
    }
    match renameat_with(CWD, new, CWD, dest, RenameFlags::EXCHANGE) {
        // `new` now holds the old tree.
        Ok(()) => Ok(Some(new.to_path_buf())),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            let retired = attempt_sibling(dest);
            fs::rename(dest, &retired)?;
            fs::rename(new, dest)?;
            Ok(Some(retired))
        }
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_siblings_are_short_hidden_and_unique() {
        let long = Path::new("/d").join("x".repeat(255));
        let a = attempt_sibling(&long);
        let b = attempt_sibling(&long);
        assert_eq!(a.parent(), Some(Path::new("/d")));
        assert_ne!(a, b, "two attempts never share a partial");
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(&partial_prefix(&long)) && name.ends_with(".partial"));
        assert!(name.len() < 64, "{name}");
        assert!(
            !attempt_sibling(Path::new("/d/y"))
                .to_str()
                .unwrap()
                .contains(&partial_prefix(&long))
        );
    }

    #[test]
    fn leftovers_of_dead_processes_go_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("bundle.tar");
        let mine = attempt_sibling(&target);
        fs::write(&mine, b"mine").unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let dead = dir.path().join(format!(
            "{}{}-{gone}-deadbeef.partial",
            partial_prefix(&target),
            host_tag()
        ));
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join("f"), b"x").unwrap();
        let other_host = dir.path().join(format!(
            "{}00000000-1-cafe.partial",
            partial_prefix(&target)
        ));
        fs::write(&other_host, b"elsewhere").unwrap();
        let unrelated = dir.path().join(".other.partial");
        fs::write(&unrelated, b"").unwrap();
        remove_leftover_partials(&target).unwrap();
        assert!(!dead.exists(), "a dead process's partial is removed");
        assert!(mine.exists(), "this process's own partial stays");
        assert!(other_host.exists(), "another host's recent partial stays");
        assert!(unrelated.exists());
    }

    #[test]
    fn read_only_trees_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("instrument");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), b"data").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("a/link")).unwrap();
        for d in ["a/b", "a", ""] {
            fs::set_permissions(root.join(d), fs::Permissions::from_mode(0o555)).unwrap();
        }
        fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o000)).unwrap();
        remove_tree(&root, &CancellationToken::new()).unwrap();
        assert!(!root.exists());
        assert!(Path::new("/etc").exists(), "links are not followed");
        remove_tree(&root, &CancellationToken::new()).expect("a missing tree is fine");
    }

    #[test]
    fn a_cancelled_removal_stops() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("t")).unwrap();
        fs::write(dir.path().join("t/f"), b"").unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = remove_tree(&dir.path().join("t"), &cancel).unwrap_err();
        assert!(crate::cancel::is_cancelled(&err));
        assert!(dir.path().join("t/f").exists());
    }

    #[test]
    fn swaps_replace_trees_whole() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("staged");
        let new = attempt_sibling(&dest);
        fs::create_dir(&new).unwrap();
        fs::write(new.join("v"), b"1").unwrap();
        assert_eq!(swap_into_place(&new, &dest).unwrap(), None);
        assert_eq!(fs::read(dest.join("v")).unwrap(), b"1");
        let newer = attempt_sibling(&dest);
        fs::create_dir(&newer).unwrap();
        fs::write(newer.join("v"), b"2").unwrap();
        let old = swap_into_place(&newer, &dest)
            .unwrap()
            .expect("the old tree");
        assert_eq!(fs::read(dest.join("v")).unwrap(), b"2");
        assert_eq!(fs::read(old.join("v")).unwrap(), b"1");
    }

    #[test]
    fn rejects_zero_threads() {
        assert!(Pool::new(0).is_err());
    }

    #[test]
    fn install_runs_on_named_pool_threads() {
        let pool = Pool::new(2).expect("pool");
        assert_eq!(pool.threads(), 2);
        let name = pool.install(|| std::thread::current().name().map(str::to_owned));
        let name = name.expect("pool threads are named");
        assert!(name.starts_with("workers-cpu-"), "{name}");
        assert_eq!(pool.install(rayon::current_num_threads), 2);
    }

    #[tokio::test]
    async fn run_returns_the_result_off_the_runtime() {
        let pool = Pool::new(1).expect("pool");
        let (value, name) = pool
            .run(|| (21 * 2, std::thread::current().name().map(str::to_owned)))
            .await;
        assert_eq!(value, 42);
        assert_eq!(name.as_deref(), Some("workers-cpu-0"));
    }

    #[tokio::test]
    async fn a_cancelled_job_stops_and_one_not_started_never_runs() {
        let pool = Pool::new(1).expect("pool");
        let cancel = CancellationToken::new();
        let started = std::sync::Arc::new(std::sync::Barrier::new(2));
        let job = {
            let (pool, cancel, started) = (pool.clone(), cancel.clone(), started.clone());
            tokio::spawn(async move {
                pool.run_job(&cancel, move |token| {
                    started.wait();
                    while !token.is_cancelled() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    "stopped"
                })
                .await
            })
        };
        tokio::task::spawn_blocking(move || started.wait())
            .await
            .unwrap();
        cancel.cancel();
        let outcome = tokio::time::timeout(Duration::from_secs(1), job).await;
        assert_eq!(outcome.unwrap().unwrap(), Ok("stopped"));
        let never = pool
            .run_job(&cancel, |_| -> u32 { panic!("must not run") })
            .await;
        assert_eq!(never, Err(Cancelled));
    }

    #[tokio::test]
    async fn dropping_a_job_future_cancels_the_job() {
        let pool = Pool::new(1).expect("pool");
        let (tx, rx) = std::sync::mpsc::channel();
        let cancel = CancellationToken::new();
        let future = pool.run_job(&cancel, move |token| {
            while !token.is_cancelled() {
                std::thread::sleep(Duration::from_millis(5));
            }
            tx.send(()).unwrap();
        });
        let _ = tokio::time::timeout(Duration::from_millis(50), future).await;
        rx.recv_timeout(Duration::from_secs(1))
            .expect("the job saw its cancellation");
    }

    #[tokio::test]
    async fn run_resumes_a_panic_in_the_awaiting_task() {
        let pool = Pool::new(1).expect("pool");
        let task = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(|| -> u32 { panic!("boom in the pool") }).await }
        });
        let err = task.await.expect_err("the panic reaches the task");
        assert!(err.is_panic());
        let payload = err.into_panic();
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom in the pool"));
        // The pool survives a panicking job.
        assert_eq!(pool.run(|| 7).await, 7);
    }
}

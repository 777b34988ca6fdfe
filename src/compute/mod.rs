//! CPU-bound data path: checksums, tar bundles, extraction and tree walks, all run on one rayon pool.
//!
//! Async code hands work to [`Pool::run`] so runtime threads never block on disk reads or hashing.

pub mod bundle;
pub mod extract;
pub mod md5;
pub mod walk;

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

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
    /// Dropping the returned future does not stop `f`: it runs to completion and its result is discarded.
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

    /// Runs `f` inside the pool from synchronous code (benchmarks, tests).
    pub fn install<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        self.inner.install(f)
    }
}

/// Makes a rename of `path` durable by syncing the directory that holds it.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::File::open(parent).and_then(|dir| dir.sync_all())
}

/// Where to build `path` before renaming it into place: a hidden sibling named after a hash
/// of `path`'s name. The name stays short whatever the length of the final name (a 255-byte
/// name plus a suffix would not fit in a path component), and it is the same on every
/// attempt, so a leftover of a crash is found and replaced by the next one.
pub fn partial_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default();
    let digest = openssl::sha::sha256(name.as_encoded_bytes());
    path.with_file_name(format!(".{}.partial", hex::encode(&digest[..8])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_siblings_are_short_stable_and_distinct() {
        let long = Path::new("/d").join("x".repeat(255));
        let partial = partial_sibling(&long);
        assert_eq!(partial.parent(), Some(Path::new("/d")));
        assert_eq!(
            partial.file_name().unwrap().len(),
            ".0123456789abcdef.partial".len()
        );
        assert_eq!(partial, partial_sibling(&long));
        assert_ne!(partial, partial_sibling(Path::new("/d/y")));
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

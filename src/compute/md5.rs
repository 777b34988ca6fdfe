//! MD5 at OpenSSL speed: digests, file and reader hashing, and pipelined hashing of written streams.
//!
//! MD5 stays the recorded checksum (the API and the tape archive store it), so it has to be as fast as
//! `openssl dgst -md5`; the pure-Rust implementations measure about 0.8x of that.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, TryLockError};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use openssl::md::{Md, MdRef};

use crate::cancel::{CancellationToken, check};
use openssl::md_ctx::MdCtx;

/// Size of every read and of every pipelined chunk: large enough that syscalls and lock traffic vanish
/// next to the hashing itself.
pub(crate) const CHUNK_SIZE: usize = 1 << 20;

/// A 128-bit MD5 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Md5Digest([u8; 16]);

impl Md5Digest {
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Md5Digest(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for Md5Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; 32];
        // Cannot fail: the output is exactly twice the input length.
        hex::encode_to_slice(self.0, &mut out).map_err(|_| fmt::Error)?;
        let text = std::str::from_utf8(&out).map_err(|_| fmt::Error)?;
        f.pad(text)
    }
}

impl fmt::Debug for Md5Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The text given to [`Md5Digest::from_str`] is not 32 hexadecimal characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not an MD5 digest (expected 32 hexadecimal characters)")]
pub struct ParseMd5Error {
    input: String,
}

impl FromStr for Md5Digest {
    type Err = ParseMd5Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 16];
        if s.len() != 32 || hex::decode_to_slice(s, &mut bytes).is_err() {
            // Keep the message readable when someone passes a whole file by mistake.
            let input = if s.chars().count() > 80 {
                format!("{}…", s.chars().take(80).collect::<String>())
            } else {
                s.to_owned()
            };
            return Err(ParseMd5Error { input });
        }
        Ok(Md5Digest(bytes))
    }
}

/// The MD5 implementation, fetched once: OpenSSL 3 otherwise repeats a locked provider lookup for every
/// context, which dominates when hashing many small files from several threads.
fn md5_algorithm() -> &'static MdRef {
    static ALGORITHM: OnceLock<Md> = OnceLock::new();
    ALGORITHM.get_or_init(|| {
        Md::fetch(None, "MD5", None)
            .expect("OpenSSL provides no MD5 implementation (is a FIPS-only provider configured?)")
    })
}

thread_local! {
    /// One idle context per thread: creating a context allocates provider state, which shows up when
    /// hashing tens of thousands of small files.
    static SPARE_CTX: Cell<Option<MdCtx>> = const { Cell::new(None) };
    /// The per-thread read buffer (see [`with_read_buffer`]).
    static READ_BUFFER: Cell<Option<Box<[u8]>>> = const { Cell::new(None) };
}

/// Incremental MD5.
pub struct Md5 {
    ctx: Option<MdCtx>,
}

impl Default for Md5 {
    fn default() -> Self {
        Md5::new()
    }
}

impl fmt::Debug for Md5 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Md5").finish_non_exhaustive()
    }
}

impl Md5 {
    pub fn new() -> Self {
        let mut ctx = SPARE_CTX
            .with(Cell::take)
            .unwrap_or_else(|| MdCtx::new().expect("OpenSSL cannot allocate a digest context"));
        ctx.digest_init(md5_algorithm())
            .expect("OpenSSL cannot initialise MD5");
        Md5 { ctx: Some(ctx) }
    }

    pub fn update(&mut self, data: &[u8]) {
        if let Some(ctx) = self.ctx.as_mut() {
            ctx.digest_update(data).expect("OpenSSL MD5 update failed");
        }
    }

    pub fn finish(mut self) -> Md5Digest {
        let mut out = [0u8; 16];
        if let Some(mut ctx) = self.ctx.take() {
            let written = ctx
                .digest_final(&mut out)
                .expect("OpenSSL MD5 finalisation failed");
            assert_eq!(written, 16, "MD5 digests are 16 bytes");
            SPARE_CTX.with(|spare| spare.set(Some(ctx)));
        }
        Md5Digest(out)
    }
}

pub fn md5_bytes(data: &[u8]) -> Md5Digest {
    let mut md5 = Md5::new();
    md5.update(data);
    md5.finish()
}

/// Lends this thread's 1 MiB read buffer to `f`. A nested call (from inside `f`) gets a fresh buffer
/// instead of panicking; only the outermost one is kept for reuse.
pub(crate) fn with_read_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut buffer = READ_BUFFER
        .with(Cell::take)
        .unwrap_or_else(|| vec![0u8; CHUNK_SIZE].into_boxed_slice());
    let result = f(&mut buffer);
    READ_BUFFER.with(|slot| slot.set(Some(buffer)));
    result
}

/// Asks the kernel for aggressive read-ahead: these files are read once, front to back.
pub(crate) fn advise_sequential(file: &File) {
    // Purely a hint; a file system that refuses it still reads correctly.
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Sequential);
}

/// Reads into `buf`, retrying interrupted reads.
pub(crate) fn read_retrying(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Hashes a file with large reads (1 MiB buffer reused per thread); returns digest and byte count.
/// Stops with a cancellation error once `cancel` is cancelled.
pub fn md5_file(path: &Path, cancel: &CancellationToken) -> io::Result<(Md5Digest, u64)> {
    let mut file = File::open(path)?;
    advise_sequential(&file);
    md5_reader(&mut file, &mut |_| {}, cancel)
}

/// Same over any reader; `on_bytes(n)` is called with each chunk length (progress), and
/// `cancel` is checked before each chunk.
pub fn md5_reader(
    reader: &mut dyn Read,
    on_bytes: &mut dyn FnMut(u64),
    cancel: &CancellationToken,
) -> io::Result<(Md5Digest, u64)> {
    md5_reader_with(reader, &mut |chunk| on_bytes(chunk.len() as u64), cancel)
}

/// `md5_reader` that also shows every chunk read to `on_chunk` (another hash of the same bytes,
/// progress), so the bytes are read once.
pub fn md5_reader_with(
    reader: &mut dyn Read,
    on_chunk: &mut dyn FnMut(&[u8]),
    cancel: &CancellationToken,
) -> io::Result<(Md5Digest, u64)> {
    with_read_buffer(|buf| {
        let mut md5 = Md5::new();
        let mut total = 0u64;
        loop {
            check(cancel)?;
            let n = read_retrying(reader, buf)?;
            if n == 0 {
                break;
            }
            md5.update(&buf[..n]);
            total += n as u64;
            crate::metrics::hashed(n as u64);
            on_chunk(&buf[..n]);
        }
        Ok((md5.finish(), total))
    })
}

/// Copies src to dst (created/truncated) hashing the bytes on the way: one read of the source.
///
/// The copy is not fsynced: callers that need it durable sync `dst` themselves. `cancel` is
/// checked before each chunk.
pub fn copy_file_with_md5(
    src: &Path,
    dst: &Path,
    on_bytes: &(dyn Fn(u64) + Sync),
    cancel: &CancellationToken,
) -> io::Result<(Md5Digest, u64)> {
    let mut source = File::open(src)?;
    advise_sequential(&source);
    let target = File::create(dst)?;
    let mut writer = HashingWriter::new(target);
    loop {
        check(cancel)?;
        let n = writer.read_from(&mut source, &mut |_| {})?;
        if n == 0 {
            break;
        }
        on_bytes(n as u64);
    }
    let (_, digest, total) = writer.finish()?;
    Ok((digest, total))
}

/// Chunks allowed to wait for hashing before the writer hashes them itself: bounds memory per writer to a
/// few MiB and keeps a slow helper from letting the writer run arbitrarily far ahead.
const MAX_QUEUED: usize = 4;

/// How long an idle helper waits for the next chunk before giving its pool thread back. A writer held up by
/// slow storage would otherwise pin a pool thread that other work could use; the writer starts a new
/// helper when chunks arrive again.
const HELPER_IDLE: Duration = Duration::from_millis(2);

const HELPER_NONE: u8 = 0;
const HELPER_PENDING: u8 = 1;
const HELPER_RUNNING: u8 = 2;

struct Chunk {
    data: Box<[u8]>,
    len: usize,
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

struct Queue {
    filled: VecDeque<Chunk>,
    spare: Vec<Box<[u8]>>,
    done: bool,
    /// Thread that last pushed a chunk: a helper that finds itself on that thread is running nested
    /// inside the writer (rayon work stealing) and must not wait for it.
    writer_thread: Option<ThreadId>,
}

/// State shared between a [`HashingWriter`] and its helper task.
///
/// Lock order: `hasher` before `queue`, and nobody waits for anything while holding `hasher`, so a
/// thread blocked on `hasher` only ever waits for a thread that is hashing.
struct Shared {
    hasher: Mutex<Option<Md5>>,
    queue: Mutex<Queue>,
    ready: Condvar,
    helper: AtomicU8,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .expect("a thread panicked while hashing a stream")
}

impl Shared {
    fn take_spare(&self) -> Chunk {
        let data = lock(&self.queue)
            .spare
            .pop()
            .unwrap_or_else(|| vec![0u8; CHUNK_SIZE].into_boxed_slice());
        Chunk { data, len: 0 }
    }

    /// Queues a written chunk for hashing; returns how many chunks are now waiting.
    fn push(&self, chunk: Chunk) -> usize {
        let mut queue = lock(&self.queue);
        queue.filled.push_back(chunk);
        queue.writer_thread = Some(thread::current().id());
        let waiting = queue.filled.len();
        drop(queue);
        self.ready.notify_one();
        waiting
    }

    /// Hashes every queued chunk, oldest first. Popping only while holding the hasher keeps the order.
    fn drain(&self, hasher: &mut Option<Md5>) {
        loop {
            let Some(chunk) = lock(&self.queue).filled.pop_front() else {
                return;
            };
            if let Some(md5) = hasher.as_mut() {
                md5.update(chunk.bytes());
            }
            let mut queue = lock(&self.queue);
            // More spares than could ever be in flight would only pin memory.
            if queue.spare.len() < MAX_QUEUED + 2 {
                queue.spare.push(chunk.data);
            }
        }
    }

    fn drain_blocking(&self) {
        let mut hasher = lock(&self.hasher);
        self.drain(&mut hasher);
    }

    fn try_drain(&self) {
        match self.hasher.try_lock() {
            Ok(mut hasher) => self.drain(&mut hasher),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Poisoned(_)) => panic!("a thread panicked while hashing a stream"),
        }
    }

    /// Body of the helper task: hashes chunks as the writer queues them, until the writer is done or no
    /// chunk has come for a while.
    fn help(&self) {
        if self
            .helper
            .compare_exchange(
                HELPER_PENDING,
                HELPER_RUNNING,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return;
        }
        let me = thread::current().id();
        loop {
            {
                let mut queue = lock(&self.queue);
                let mut idle_since = None;
                loop {
                    if !queue.filled.is_empty() {
                        break;
                    }
                    // Leaving under the queue lock: a writer that pushes afterwards sees the helper gone
                    // and starts another one.
                    if queue.done
                        // The writer is suspended below us on this very thread; waiting would deadlock.
                        || queue.writer_thread == Some(me)
                        || idle_since.is_some_and(|since: Instant| since.elapsed() >= HELPER_IDLE)
                    {
                        self.helper.store(HELPER_NONE, Ordering::Release);
                        return;
                    }
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    let left = HELPER_IDLE.saturating_sub(since.elapsed());
                    queue = self
                        .ready
                        .wait_timeout(queue, left)
                        .expect("a thread panicked while hashing a stream")
                        .0;
                }
            }
            self.drain_blocking();
        }
    }

    fn mark_done(&self) {
        lock(&self.queue).done = true;
        self.ready.notify_all();
        // A helper that has not started yet has nothing left to do.
        let _ = self.helper.compare_exchange(
            HELPER_PENDING,
            HELPER_NONE,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

/// Tells the helper to stop when the writer goes away, including when it is dropped after an error.
struct DoneGuard(Arc<Shared>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        self.0.mark_done();
    }
}

/// Which side of a copy failed: callers name the source or the destination accordingly.
#[derive(Debug)]
pub(crate) enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

impl From<CopyError> for io::Error {
    fn from(err: CopyError) -> io::Error {
        match err {
            CopyError::Read(err) | CopyError::Write(err) => err,
        }
    }
}

/// A writer that hashes what passes through it.
///
/// Bytes are gathered in 1 MiB chunks. Each full chunk is written to the inner writer and then queued;
/// a helper task on another thread of the current rayon pool hashes queued chunks while the writer fills
/// and writes the next ones, so writing and hashing overlap.
///
/// The writer never waits for the helper to be scheduled, so it cannot deadlock however busy the pool is:
/// when more than a few chunks are waiting it takes the hasher lock (only ever held by a thread that is
/// hashing, never by one that waits) and catches up itself. Outside a pool or in a single-thread pool no
/// helper is started and the writer hashes each chunk itself when the hasher is free. A helper left idle
/// (the writer waits on slow storage) gives its pool thread back after a few milliseconds and a new one
/// is started when chunks come again.
pub struct HashingWriter<W: Write> {
    inner: W,
    current: Chunk,
    total: u64,
    shared: DoneGuard,
}

impl<W: Write> fmt::Debug for HashingWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashingWriter")
            .field("total", &(self.total + self.current.len as u64))
            .finish_non_exhaustive()
    }
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        let shared = Arc::new(Shared {
            hasher: Mutex::new(Some(Md5::new())),
            queue: Mutex::new(Queue {
                filled: VecDeque::new(),
                spare: Vec::new(),
                done: false,
                writer_thread: None,
            }),
            ready: Condvar::new(),
            helper: AtomicU8::new(HELPER_NONE),
        });
        let current = shared.take_spare();
        HashingWriter {
            inner,
            current,
            total: 0,
            shared: DoneGuard(shared),
        }
    }

    /// Writes and hashes whatever is buffered, then flushes the inner writer and returns it with the
    /// digest and the number of bytes written.
    pub fn finish(mut self) -> io::Result<(W, Md5Digest, u64)> {
        if self.current.len > 0 {
            let chunk = std::mem::replace(
                &mut self.current,
                Chunk {
                    data: Box::default(),
                    len: 0,
                },
            );
            self.inner.write_all(chunk.bytes())?;
            self.total += chunk.len as u64;
            self.shared.0.push(chunk);
        }
        let HashingWriter {
            mut inner,
            total,
            shared,
            ..
        } = self;
        shared.0.mark_done();
        let digest = {
            let mut hasher = lock(&shared.0.hasher);
            shared.0.drain(&mut hasher);
            hasher.take().map(Md5::finish)
        };
        let digest = digest.expect("the digest of a hashing writer is taken only once");
        inner.flush()?;
        Ok((inner, digest, total))
    }

    /// Reads from `reader` straight into the current chunk (no intermediate copy) and shows the
    /// bytes read to `on_data` before they are written; returns 0 at EOF.
    pub(crate) fn read_from(
        &mut self,
        reader: &mut dyn Read,
        on_data: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, CopyError> {
        if self.current.len == CHUNK_SIZE {
            self.submit().map_err(CopyError::Write)?;
        }
        let start = self.current.len;
        let n = read_retrying(reader, &mut self.current.data[start..]).map_err(CopyError::Read)?;
        on_data(&self.current.data[start..start + n]);
        self.current.len += n;
        if self.current.len == CHUNK_SIZE {
            self.submit().map_err(CopyError::Write)?;
        }
        Ok(n)
    }

    /// Writes the current chunk out and queues it for hashing.
    fn submit(&mut self) -> io::Result<()> {
        let next = self.shared.0.take_spare();
        let chunk = std::mem::replace(&mut self.current, next);
        self.inner.write_all(chunk.bytes())?;
        self.total += chunk.len as u64;
        let shared = &self.shared.0;
        let waiting = shared.push(chunk);
        if shared.helper.load(Ordering::Acquire) == HELPER_NONE {
            self.start_helper();
        }
        if waiting > MAX_QUEUED {
            shared.drain_blocking();
        } else if shared.helper.load(Ordering::Acquire) == HELPER_NONE {
            // No helper could be started (outside a pool, or a single thread). A helper that is started
            // but not yet running is left the chunk: hashing it here would leave that helper idle, and if
            // it never runs the bound above makes the writer catch up anyway.
            shared.try_drain();
        }
        Ok(())
    }

    fn start_helper(&self) {
        let shared = &self.shared.0;
        if rayon::current_thread_index().is_none() || rayon::current_num_threads() < 2 {
            return;
        }
        shared.helper.store(HELPER_PENDING, Ordering::Release);
        let helper = Arc::clone(shared);
        rayon::spawn(move || helper.help());
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if self.current.len == CHUNK_SIZE {
            self.submit()?;
        }
        let start = self.current.len;
        let n = data.len().min(CHUNK_SIZE - start);
        self.current.data[start..start + n].copy_from_slice(&data[..n]);
        self.current.len += n;
        if self.current.len == CHUNK_SIZE {
            self.submit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.current.len > 0 {
            self.submit()?;
        }
        self.inner.flush()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::compute::Pool;
    use std::process::Command;

    /// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
    pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(&state.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    #[test]
    fn known_vectors() {
        assert_eq!(
            md5_bytes(b"").to_string(),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
        assert_eq!(
            md5_bytes(b"abc").to_string(),
            "900150983cd24fb0d6963f7d28e17f72"
        );
        assert_eq!(
            md5_bytes(b"The quick brown fox jumps over the lazy dog").to_string(),
            "9e107d9d372bb6826bd81d3542a419d6"
        );
        let mut md5 = Md5::new();
        md5.update(b"a");
        md5.update(b"");
        md5.update(b"bc");
        assert_eq!(md5.finish(), md5_bytes(b"abc"));
    }

    #[test]
    fn display_parse_round_trip() {
        let digest = md5_bytes(b"abc");
        let text = digest.to_string();
        assert_eq!(text.parse::<Md5Digest>(), Ok(digest));
        assert_eq!(
            text.to_uppercase().parse::<Md5Digest>(),
            Ok(digest),
            "upper case is accepted"
        );
        assert_eq!(format!("{digest:?}"), text);
        assert_eq!(Md5Digest::from_bytes(*digest.as_bytes()), digest);
    }

    #[test]
    fn parse_rejects_bad_input_and_names_it() {
        for bad in [
            "",
            "abc",
            "d41d8cd98f00b204e9800998ecf8427",
            "d41d8cd98f00b204e9800998ecf8427e0",
            "g41d8cd98f00b204e9800998ecf8427e",
            " d41d8cd98f00b204e9800998ecf8427",
            "d41d8cd98f00b204e9800998ecf842é",
        ] {
            let err = bad.parse::<Md5Digest>().expect_err(bad);
            assert!(err.to_string().contains(&format!("`{bad}`")), "{err}");
        }
    }

    #[test]
    fn md5_file_matches_openssl_dgst() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("random.bin");
        let data = pseudo_random(3 * 1024 * 1024 + 12_345, 7);
        std::fs::write(&path, &data).expect("write");
        let (digest, size) = md5_file(&path, &CancellationToken::new()).expect("hash");
        assert_eq!(size, data.len() as u64);
        assert_eq!(digest, md5_bytes(&data));
        let out = Command::new("openssl")
            .args(["dgst", "-md5", "-r"])
            .arg(&path)
            .output()
            .expect("run openssl");
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).expect("utf8");
        let expected = text.split_whitespace().next().expect("digest column");
        assert_eq!(digest.to_string(), expected);
    }

    #[test]
    fn md5_reader_reports_progress() {
        let data = pseudo_random(CHUNK_SIZE * 2 + 3, 1);
        let mut seen = 0u64;
        let (digest, size) = md5_reader(
            &mut data.as_slice(),
            &mut |n| seen += n,
            &CancellationToken::new(),
        )
        .expect("hash");
        assert_eq!(size, data.len() as u64);
        assert_eq!(seen, size);
        assert_eq!(digest, md5_bytes(&data));
    }

    /// Writes `data` through a HashingWriter in pieces of the given sizes (cycled).
    fn hash_in_pieces(data: &[u8], pieces: &[usize]) -> (Vec<u8>, Md5Digest, u64) {
        let mut writer = HashingWriter::new(Vec::new());
        let mut offset = 0;
        let mut i = 0;
        while offset < data.len() {
            let n = pieces[i % pieces.len()].min(data.len() - offset);
            writer.write_all(&data[offset..offset + n]).expect("write");
            offset += n;
            i += 1;
            if i % 97 == 0 {
                writer.flush().expect("flush");
            }
        }
        writer.finish().expect("finish")
    }

    fn check_write_patterns() {
        let data = pseudo_random(5 * CHUNK_SIZE + 777, 3);
        let patterns: &[&[usize]] = &[
            &[1, 7, 512, 4096, 65_536],
            &[CHUNK_SIZE],
            &[CHUNK_SIZE - 1, 2],
            &[3 * CHUNK_SIZE + 5],
            &[data.len()],
            &[10 * CHUNK_SIZE],
        ];
        for pieces in patterns {
            let (out, digest, size) = hash_in_pieces(&data, pieces);
            assert_eq!(size, data.len() as u64, "{pieces:?}");
            assert!(out == data, "bytes pass through unchanged for {pieces:?}");
            assert_eq!(digest, md5_bytes(&data), "{pieces:?}");
        }
        // Tiny writes only: many chunks of single bytes would be slow, so use a smaller stream.
        let small = pseudo_random(CHUNK_SIZE + 100, 4);
        let (_, digest, _) = hash_in_pieces(&small, &[1, 2, 3]);
        assert_eq!(digest, md5_bytes(&small));
        // Nothing written at all.
        let (out, digest, size) = HashingWriter::new(Vec::new()).finish().expect("finish");
        assert!(out.is_empty());
        assert_eq!(size, 0);
        assert_eq!(digest, md5_bytes(b""));
    }

    #[test]
    fn hashing_writer_outside_any_pool() {
        check_write_patterns();
    }

    #[test]
    fn hashing_writer_in_single_thread_pool() {
        let pool = Pool::new(1).expect("pool");
        pool.install(check_write_patterns);
    }

    #[test]
    fn hashing_writer_in_two_thread_pool() {
        let pool = Pool::new(2).expect("pool");
        pool.install(check_write_patterns);
    }

    /// A sink slow enough that the helper hashes while the writer waits on I/O.
    struct SlowSink(Vec<u8>);

    impl Write for SlowSink {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            std::thread::sleep(std::time::Duration::from_micros(200));
            self.0.extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn more_writers_than_pool_threads_do_not_deadlock() {
        for threads in [1, 2] {
            let pool = Pool::new(threads).expect("pool");
            let (tx, rx) = std::sync::mpsc::channel();
            let writers = 6;
            for seed in 0..writers {
                let tx = tx.clone();
                pool.inner.spawn(move || {
                    let data = pseudo_random(4 * CHUNK_SIZE + seed as usize * 1000, seed);
                    let mut writer = HashingWriter::new(SlowSink(Vec::new()));
                    for piece in data.chunks(100_000) {
                        writer.write_all(piece).expect("write");
                    }
                    let (sink, digest, size) = writer.finish().expect("finish");
                    let ok =
                        sink.0 == data && digest == md5_bytes(&data) && size == data.len() as u64;
                    tx.send(ok).expect("send");
                });
            }
            drop(tx);
            for _ in 0..writers {
                let ok = rx
                    .recv_timeout(std::time::Duration::from_secs(60))
                    .expect("every writer finishes");
                assert!(ok, "digest matches with {threads} pool threads");
            }
        }
    }

    #[test]
    fn helper_run_nested_on_the_writer_thread_does_not_wait_for_it() {
        let pool = Pool::new(2).expect("pool");
        // Keep the other pool thread busy so it cannot steal the helper: the only thread left to run it
        // is the writer's own, from inside `yield_now`.
        let (busy_tx, busy_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        pool.inner.spawn(move || {
            busy_tx.send(()).expect("send");
            let _ = release_rx.recv();
        });
        busy_rx.recv().expect("busy");
        let data = pseudo_random(3 * CHUNK_SIZE + 5, 12);
        let ran_nested = std::sync::atomic::AtomicBool::new(false);
        let (_, digest, _) = pool
            .install(|| {
                let mut writer = HashingWriter::new(Vec::new());
                for piece in data.chunks(CHUNK_SIZE / 2) {
                    writer.write_all(piece)?;
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        ran_nested.store(true, Ordering::Relaxed);
                    }
                }
                writer.finish()
            })
            .expect("finish");
        release_tx.send(()).expect("release");
        assert!(ran_nested.load(Ordering::Relaxed), "the helper ran nested");
        assert_eq!(digest, md5_bytes(&data));
    }

    #[test]
    fn writer_dropped_without_finish_releases_its_helper() {
        let pool = Pool::new(2).expect("pool");
        pool.install(|| {
            let mut writer = HashingWriter::new(SlowSink(Vec::new()));
            writer
                .write_all(&pseudo_random(3 * CHUNK_SIZE, 9))
                .expect("write");
            drop(writer);
        });
        // The helper exited: the pool still runs both of these at once.
        let (a, b) = pool.install(|| rayon::join(|| 1, || 2));
        assert_eq!(a + b, 3);
    }

    #[test]
    fn copy_file_with_md5_copies_and_hashes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.bin");
        let dst = dir.path().join("dst.bin");
        let pool = Pool::new(2).expect("pool");
        for len in [0, 10, CHUNK_SIZE, 3 * CHUNK_SIZE + 17] {
            let data = pseudo_random(len, len as u64);
            std::fs::write(&src, &data).expect("write");
            std::fs::write(&dst, b"old contents that must be truncated away").expect("write");
            let seen = std::sync::atomic::AtomicU64::new(0);
            let (digest, size) = pool
                .install(|| {
                    copy_file_with_md5(
                        &src,
                        &dst,
                        &|n| {
                            seen.fetch_add(n, Ordering::Relaxed);
                        },
                        &CancellationToken::new(),
                    )
                })
                .expect("copy");
            assert_eq!(size, len as u64);
            assert_eq!(seen.load(Ordering::Relaxed), len as u64);
            assert_eq!(digest, md5_bytes(&data));
            assert!(std::fs::read(&dst).expect("read") == data);
        }
    }
}

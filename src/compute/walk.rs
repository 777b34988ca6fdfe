//! Tree walks over datasets: change detection (stability), inspection (checksums, counts, sizes) and the
//! shared rules for classifying entries and symbolic links.
//!
//! Directories are read in parallel (the parallel walker of `ignore`, every filter off) on as many
//! threads as the current rayon pool has: on Lustre and NFS listing and `stat` are what a walk
//! waits for. Each thread stats, and for inspection hashes, the entries it takes. A walk runs as
//! one job of the pool, whose thread waits while the walker's threads work, so one walk keeps as
//! many threads busy as the pool has. A dataset of millions of files is never listed in memory:
//! at most the entries of the directories being read.

use std::collections::HashSet;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ignore::{WalkBuilder, WalkState};
use walkdir::WalkDir;

use crate::cancel::{CancellationToken, Cancelled};
use crate::compute::md5::{CHUNK_SIZE, Md5Digest, advise_sequential, md5_reader_with};

/// What a directory entry is, with symbolic links told apart by what they point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    SymlinkToFile,
    SymlinkToDirectory,
    BrokenSymlink,
    Other,
}

/// Classifies an entry from its lstat metadata; for symlinks, follows once with stat to tell file/dir/broken.
///
/// A link to anything that is not a directory (a file, but also a fifo or device) is `SymlinkToFile`: the
/// link itself is what gets recorded and archived, never its target. A link whose target cannot be
/// resolved for any reason (missing, loop, permission) is `BrokenSymlink`.
pub fn classify(path: &Path, lstat: &Metadata) -> EntryKind {
    let file_type = lstat.file_type();
    if file_type.is_file() {
        EntryKind::File
    } else if file_type.is_dir() {
        EntryKind::Directory
    } else if file_type.is_symlink() {
        match fs::metadata(path) {
            Ok(target) if target.is_dir() => EntryKind::SymlinkToDirectory,
            Ok(_) => EntryKind::SymlinkToFile,
            Err(_) => EntryKind::BrokenSymlink,
        }
    } else {
        EntryKind::Other
    }
}

/// True when a symlink at `link_rel` (relative to the dataset root) with `target` would point outside the
/// root: an absolute target, or a relative one whose lexical normalization (join of link's parent and target,
/// resolving `.` and `..`) climbs above the root.
pub fn symlink_escapes(link_rel: &Path, target: &Path) -> bool {
    let parent = link_rel.parent().unwrap_or(Path::new(""));
    let mut depth: usize = 0;
    for component in parent.components().chain(target.components()) {
        match component {
            Component::Prefix(_) | Component::RootDir => return true,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(up) => depth = up,
                None => return true,
            },
            Component::Normal(_) => depth += 1,
        }
    }
    false
}

/// Order-independent fingerprint of (path, size) pairs: acc.wrapping_add(stable 64-bit hash of path bytes,
/// a 0 byte, size as LE u64). The hash is FNV-1a 64 followed by MurmurHash3's 64-bit finalizer, both
/// fixed by their definitions, so fingerprints compare across processes, machines and releases.
///
/// The finalizer matters because the items are summed: FNV-1a ends with the size's bytes, mostly
/// zeros, so its last steps are linear, and without mixing the sums of `(a, 4), (b, 5)` and
/// `(a, 5), (b, 4)` are equal about half the time: two files swapping sizes would go unnoticed.
pub fn fingerprint_add(acc: u64, rel_path: &str, size: u64) -> u64 {
    acc.wrapping_add(mixed_hash(
        rel_path
            .as_bytes()
            .iter()
            .copied()
            .chain(std::iter::once(0u8))
            .chain(size.to_le_bytes()),
    ))
}

/// Order-independent fingerprint of (path, MD5) pairs: [`digest_fingerprint_add`] of the MD5.
pub fn checksum_fingerprint_add(acc: u64, rel_path: &str, md5: Option<&Md5Digest>) -> u64 {
    digest_fingerprint_add(acc, rel_path, md5.map(|m| m.as_bytes().as_slice()))
}

/// The BLAKE3 of a file's content, computed with its MD5 at inspection and as archive writes it.
pub type ContentDigest = [u8; 32];

/// Order-independent fingerprint of (path, content digest) pairs, made like
/// [`fingerprint_add`]: the path bytes, a 0 byte, then the digest's bytes, or one 0xff byte for
/// an entry without one (a symbolic link). Equal sums mean every file holds the content that
/// was hashed before, whatever happened to sizes and times.
pub fn digest_fingerprint_add(acc: u64, rel_path: &str, digest: Option<&[u8]>) -> u64 {
    let digest: &[u8] = digest.unwrap_or(&[0xff]);
    acc.wrapping_add(mixed_hash(
        rel_path
            .as_bytes()
            .iter()
            .copied()
            .chain(std::iter::once(0u8))
            .chain(digest.iter().copied()),
    ))
}

/// FNV-1a 64 of `bytes` followed by MurmurHash3's 64-bit finalizer.
fn mixed_hash(bytes: impl Iterator<Item = u8>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    hash
}

/// Result of [`newest_change`].
#[derive(Debug, Clone, Default)]
pub struct ChangeSummary {
    /// The newest change time not after the walk's `future_after`, and the entry it is of.
    pub newest: Option<SystemTime>,
    pub newest_path: Option<PathBuf>,
    /// Entries whose change time lies after `future_after` (clocks of instruments are wrong
    /// at times): how many, and the newest of them.
    pub future_entries: u64,
    pub future_newest: Option<(SystemTime, PathBuf)>,
    pub entries: u64,
    pub unreadable: u64,
}

impl ChangeSummary {
    fn merge(mut self, other: ChangeSummary) -> ChangeSummary {
        if other.newest > self.newest {
            self.newest = other.newest;
            self.newest_path = other.newest_path;
        }
        if other.future_newest.as_ref().map(|(t, _)| *t)
            > self.future_newest.as_ref().map(|(t, _)| *t)
        {
            self.future_newest = other.future_newest;
        }
        self.future_entries += other.future_entries;
        self.entries += other.entries;
        self.unreadable += other.unreadable;
        self
    }

    fn of(path: &Path, changed: SystemTime, future_after: SystemTime) -> ChangeSummary {
        let mut summary = ChangeSummary::default();
        summary.add(path, changed, future_after);
        summary
    }

    /// Counts one entry; its path is copied only when it is the newest so far.
    fn add(&mut self, path: &Path, changed: SystemTime, future_after: SystemTime) {
        self.entries += 1;
        if changed > future_after {
            self.future_entries += 1;
            if self
                .future_newest
                .as_ref()
                .is_none_or(|(t, _)| changed > *t)
            {
                self.future_newest = Some((changed, path.to_path_buf()));
            }
        } else if self.newest.is_none_or(|t| changed > t) {
            self.newest = Some(changed);
            self.newest_path = Some(path.to_path_buf());
        }
    }
}

/// max(mtime, ctime): ctime catches renames, permission changes and `touch -d` into the past.
fn changed_at(metadata: &Metadata) -> SystemTime {
    let ctime = timestamp(metadata.ctime(), metadata.ctime_nsec());
    let mtime = timestamp(metadata.mtime(), metadata.mtime_nsec());
    ctime.max(mtime)
}

fn timestamp(secs: i64, nanos: i64) -> SystemTime {
    let nanos = Duration::from_nanos(nanos.clamp(0, 999_999_999) as u64);
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

/// Newest max(mtime, ctime) over `root` itself and every entry below it (lstat; entries whose target does not
/// exist, i.e. broken symlinks, are not counted, as in the original await_stability). Streaming (never the
/// whole listing in memory) and parallel: directories are listed and their entries stat'd on as many threads
/// as the current rayon pool has ([`fold_tree`]). Directories that cannot be read are counted in `unreadable`
/// and skipped (logged with tracing::warn naming the path). A missing root is `Err(io::ErrorKind::NotFound)`.
///
/// Entries that vanish between listing and stat are ignored: their parent directory's times record the
/// removal anyway.
///
/// Change times after `future_after` are reported apart (`future_entries`, `future_newest`):
/// a file dated in the future would otherwise look like a change that never ends.
///
/// Checks `cancel` per entry; a cancelled walk returns a cancellation error.
pub fn newest_change(
    root: &Path,
    future_after: SystemTime,
    cancel: &CancellationToken,
) -> io::Result<ChangeSummary> {
    let root_meta = fs::symlink_metadata(root)?;
    let start = ChangeSummary::of(root, changed_at(&root_meta), future_after);
    let rest = fold_tree(
        root,
        |summary: &mut ChangeSummary, entry| {
            if cancel.is_cancelled() {
                return false;
            }
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) => {
                    if !is_not_found(err.io_error()) {
                        tracing::warn!(
                            path = %walk_error_path(&err).unwrap_or(root).display(),
                            error = %walk_error_reason(&err),
                            "cannot read while checking for changes; skipped"
                        );
                        summary.unreadable += 1;
                    }
                    return true;
                }
            };
            let metadata = match fs::symlink_metadata(entry.path()) {
                Ok(metadata) => metadata,
                Err(err) if err.kind() == io::ErrorKind::NotFound => return true,
                Err(err) => {
                    tracing::warn!(
                        path = %entry.path().display(),
                        error = %err,
                        "cannot stat while checking for changes; skipped"
                    );
                    summary.unreadable += 1;
                    return true;
                }
            };
            if metadata.file_type().is_symlink() && fs::metadata(entry.path()).is_err() {
                return true;
            }
            summary.add(entry.path(), changed_at(&metadata), future_after);
            true
        },
        ChangeSummary::merge,
    );
    if cancel.is_cancelled() {
        return Err(Cancelled.into());
    }
    Ok(start.merge(rest))
}

/// Walks the tree below `root` (not `root` itself; symbolic links are listed, never followed)
/// with the parallel walker of `ignore`, every filter off (hidden files, ignore files), on as
/// many threads as the current rayon pool has: directories are read in parallel, and their
/// entries are visited on whichever thread takes them. Each thread folds the entries it sees into its own
/// `A` with `visit`; the folds are merged at the end. A `visit` that returns false stops the
/// walk (a cancellation, a consumer gone).
///
/// The threads are the walker's own; the pool job that calls this waits meanwhile. Handing entries from listing threads
/// to the pool's threads measured slower: a file of a few KiB costs less to hash than to hand
/// over.
fn fold_tree<A, V>(root: &Path, visit: V, merge: fn(A, A) -> A) -> A
where
    A: Default + Send,
    V: Fn(&mut A, Result<ignore::DirEntry, ignore::Error>) -> bool + Sync,
{
    /// One thread's fold, handed over when the walker drops the thread's visitor.
    struct Fold<'a, A: Default> {
        acc: A,
        into: &'a Mutex<Vec<A>>,
    }
    impl<A: Default> Drop for Fold<'_, A> {
        fn drop(&mut self) {
            if let Ok(mut folds) = self.into.lock() {
                folds.push(std::mem::take(&mut self.acc));
            }
        }
    }

    let folds = Mutex::new(Vec::new());
    WalkBuilder::new(root)
        .standard_filters(false)
        .follow_links(false)
        .min_depth(Some(1))
        .threads(rayon::current_num_threads().max(1))
        .build_parallel()
        .run(|| {
            let mut fold = Fold {
                acc: A::default(),
                into: &folds,
            };
            let visit = &visit;
            Box::new(move |entry| {
                if visit(&mut fold.acc, entry) {
                    WalkState::Continue
                } else {
                    WalkState::Quit
                }
            })
        });
    folds
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .into_iter()
        .fold(A::default(), merge)
}

/// The path a walk error is about, when it names one.
fn walk_error_path(err: &ignore::Error) -> Option<&Path> {
    match err {
        ignore::Error::WithPath { path, .. } => Some(path),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            walk_error_path(err)
        }
        _ => None,
    }
}

/// What went wrong, without the path (reported apart).
fn walk_error_reason(err: &ignore::Error) -> String {
    match err.io_error() {
        Some(io_err) => io_err.to_string(),
        None => err.to_string(),
    }
}

fn is_not_found(err: Option<&io::Error>) -> bool {
    err.is_some_and(|e| e.kind() == io::ErrorKind::NotFound)
}

/// Options for [`inspect_tree`].
#[derive(Debug, Clone, Copy)]
pub struct InspectOptions<'a> {
    /// File name suffixes (each starting with a dot, e.g. ".fastq.gz") that mark genome files.
    pub genome_file_types: &'a [String],
    /// Whether each file's BLAKE3 is computed with its MD5 (`InspectRecord::content`): what an
    /// inspection keeps for archive; a fixity check compares MD5s only and reads at MD5's speed.
    pub content_digests: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKind {
    File,
    Symlink,
}

/// One file row of an inspected dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectRecord {
    /// Relative to the root, '/'-separated, no leading "./".
    pub path: String,
    /// None for symlinks.
    pub md5: Option<Md5Digest>,
    /// BLAKE3 of the content, read in the same pass; None for symlinks.
    pub content: Option<ContentDigest>,
    pub size: u64,
    pub kind: RecordKind,
}

/// How many error messages an inspection keeps; the rest are only counted.
const MAX_ERRORS: usize = 100;

/// Totals of [`inspect_tree`].
#[derive(Debug, Clone, Default)]
pub struct InspectSummary {
    /// Apparent size like `du -sb`: every entry's lstat size, hard-linked files once.
    pub du_size: u64,
    /// Bytes of the recorded rows (file contents, link lengths).
    pub size: u64,
    pub num_files: u64,
    pub num_directories: u64,
    pub num_genome_files: u64,
    /// `fingerprint_add` over every row's (path, size).
    pub fingerprint: u64,
    /// `checksum_fingerprint_add` over every row's (path, MD5).
    pub checksum_fingerprint: u64,
    /// `digest_fingerprint_add` over every row's (path, BLAKE3 of the content).
    pub content_fingerprint: u64,
    /// The first error messages (at most 100).
    pub errors: Vec<String>,
    pub error_count: u64,
}

impl InspectSummary {
    fn error(&mut self, message: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(message);
        }
    }

    fn merge(mut self, other: InspectSummary) -> InspectSummary {
        self.du_size += other.du_size;
        self.size += other.size;
        self.num_files += other.num_files;
        self.num_directories += other.num_directories;
        self.num_genome_files += other.num_genome_files;
        self.fingerprint = self.fingerprint.wrapping_add(other.fingerprint);
        self.checksum_fingerprint = self
            .checksum_fingerprint
            .wrapping_add(other.checksum_fingerprint);
        self.content_fingerprint = self
            .content_fingerprint
            .wrapping_add(other.content_fingerprint);
        self.error_count += other.error_count;
        let room = MAX_ERRORS.saturating_sub(self.errors.len());
        self.errors.extend(other.errors.into_iter().take(room));
        self
    }

    fn record(&mut self, record: &InspectRecord) {
        self.num_files += 1;
        self.size += record.size;
        self.fingerprint = fingerprint_add(self.fingerprint, &record.path, record.size);
        self.checksum_fingerprint =
            checksum_fingerprint_add(self.checksum_fingerprint, &record.path, record.md5.as_ref());
        self.content_fingerprint = digest_fingerprint_add(
            self.content_fingerprint,
            &record.path,
            record.content.as_ref().map(|d| d.as_slice()),
        );
    }
}

/// Shared state of one inspection.
struct Inspection<'a> {
    root: &'a Path,
    opts: &'a InspectOptions<'a>,
    on_record: &'a (dyn Fn(InspectRecord) + Sync),
    on_progress: &'a (dyn Fn(u64, u64) + Sync),
    cancel: &'a CancellationToken,
    /// (dev, ino) of files with more than one link, so `du_size` counts each once.
    hard_links: Mutex<HashSet<(u64, u64)>>,
    files_done: AtomicU64,
    bytes_done: AtomicU64,
}

impl Inspection<'_> {
    /// Stats one entry and records it: directories are counted, symbolic links recorded,
    /// regular files hashed and recorded. False when the walk should stop (cancelled).
    fn entry(
        &self,
        summary: &mut InspectSummary,
        entry: Result<ignore::DirEntry, ignore::Error>,
    ) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                let rel =
                    walk_error_path(&err).map_or_else(|| ".".to_owned(), |p| self.rel_lossy(p));
                summary.error(format!("`{rel}`: {}", walk_error_reason(&err)));
                return true;
            }
        };
        let path = entry.path();
        let metadata = match fs::symlink_metadata(path) {
            Ok(metadata) => metadata,
            Err(err) => {
                summary.error(format!("`{}`: {err}", self.rel_lossy(path)));
                return true;
            }
        };
        summary.du_size += self.apparent_size(&metadata);
        let kind = classify(path, &metadata);
        if kind == EntryKind::Other {
            tracing::warn!(path = %path.display(), "not a file, directory or symbolic link; skipped");
            return true;
        }
        let rel = match path.strip_prefix(self.root).map(Path::to_str) {
            Ok(Some(rel)) => rel,
            _ => {
                summary.error(format!(
                    "`{}`: file name is not valid UTF-8",
                    self.rel_lossy(path)
                ));
                return true;
            }
        };
        if metadata.file_type().is_symlink() {
            match fs::read_link(path) {
                Ok(target) if symlink_escapes(Path::new(rel), &target) => summary.error(format!(
                    "`{rel}`: symbolic link points outside the dataset (`{}`); stage could not restore it",
                    target.display()
                )),
                Ok(_) => {}
                Err(err) => summary.error(format!("`{rel}`: {err}")),
            }
        }
        match kind {
            EntryKind::Directory | EntryKind::SymlinkToDirectory => summary.num_directories += 1,
            EntryKind::SymlinkToFile | EntryKind::BrokenSymlink => {
                let record = InspectRecord {
                    path: rel.to_owned(),
                    md5: None,
                    content: None,
                    size: metadata.len(),
                    kind: RecordKind::Symlink,
                };
                self.emit(summary, record);
            }
            EntryKind::File => self.file(summary, path, rel, metadata.len()),
            EntryKind::Other => {}
        }
        true
    }

    /// Hashes one regular file and records it.
    fn file(&self, summary: &mut InspectSummary, path: &Path, rel: &str, size: u64) {
        match self.hash(path, size) {
            Ok((digest, content, size)) => {
                if self.is_genome_file(rel) {
                    summary.num_genome_files += 1;
                }
                let record = InspectRecord {
                    path: rel.to_owned(),
                    md5: Some(digest),
                    content,
                    size,
                    kind: RecordKind::File,
                };
                self.emit(summary, record);
            }
            Err(err) => summary.error(format!("`{rel}`: {err}")),
        }
    }

    fn apparent_size(&self, metadata: &Metadata) -> u64 {
        if !metadata.is_dir() && metadata.nlink() > 1 {
            let first_seen = self
                .hard_links
                .lock()
                .expect("a thread panicked while inspecting")
                .insert((metadata.dev(), metadata.ino()));
            if !first_seen {
                return 0;
            }
        }
        metadata.size()
    }

    /// MD5 and (when asked for) BLAKE3 of the file's content, in one read. `size` is the
    /// file's length when it was listed: only files larger than one read get the read-ahead
    /// advice (a system call that buys nothing for a file read in one go, and there are
    /// millions of those).
    fn hash(&self, path: &Path, size: u64) -> io::Result<(Md5Digest, Option<ContentDigest>, u64)> {
        let mut file = File::open(path)?;
        if size > CHUNK_SIZE as u64 {
            advise_sequential(&file);
        }
        let mut content = self.opts.content_digests.then(blake3::Hasher::new);
        let (md5, size) = md5_reader_with(
            &mut file,
            &mut |chunk| {
                if let Some(content) = &mut content {
                    content.update(chunk);
                }
                let n = chunk.len() as u64;
                let bytes = self.bytes_done.fetch_add(n, Ordering::Relaxed) + n;
                (self.on_progress)(self.files_done.load(Ordering::Relaxed), bytes);
            },
            self.cancel,
        )?;
        Ok((md5, content.map(|c| *c.finalize().as_bytes()), size))
    }

    fn emit(&self, summary: &mut InspectSummary, record: InspectRecord) {
        summary.record(&record);
        (self.on_record)(record);
        let files = self.files_done.fetch_add(1, Ordering::Relaxed) + 1;
        (self.on_progress)(files, self.bytes_done.load(Ordering::Relaxed));
    }

    fn is_genome_file(&self, rel: &str) -> bool {
        let name = rel.rsplit('/').next().unwrap_or(rel);
        self.opts
            .genome_file_types
            .iter()
            .any(|suffix| !suffix.is_empty() && name.ends_with(suffix.as_str()))
    }

    fn rel_lossy(&self, path: &Path) -> String {
        let rel = path.strip_prefix(self.root).unwrap_or(path);
        if rel.as_os_str().is_empty() {
            ".".to_owned()
        } else {
            rel.to_string_lossy().into_owned()
        }
    }
}

/// Walks `root` (streaming, not following symlinks), listing directories and hashing regular
/// files (each read with the 1 MiB per-thread buffer) on as many threads as the current rayon
/// pool has ([`fold_tree`]). `on_record` is called (from those threads) for every file row;
/// `on_progress(files_done, bytes_done)` as work completes (cheap; callers keep atomics). Never
/// holds the listing in memory.
///
/// Rules: regular files are hashed and recorded (and counted as genome files when their name ends with one
/// of `genome_file_types`); symlinks to files and broken symlinks are recorded with their own lstat length
/// and no checksum; directories and symlinks to directories are counted, never followed; other kinds
/// (fifo, socket, device) are skipped with a warning. Unreadable entries, names that are not UTF-8 and
/// symlinks escaping the root are reported in `errors` while the walk goes on. A record's size is the
/// number of bytes hashed, so size and checksum always describe the same content. `cancel` is
/// checked per entry and per chunk hashed; a cancelled inspection returns a cancellation error.
pub fn inspect_tree(
    root: &Path,
    opts: &InspectOptions,
    on_record: &(dyn Fn(InspectRecord) + Sync),
    on_progress: &(dyn Fn(u64, u64) + Sync),
    cancel: &CancellationToken,
) -> io::Result<InspectSummary> {
    let root_meta = fs::metadata(root)?;
    if !root_meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("`{}` is not a directory", root.display()),
        ));
    }
    let inspection = Inspection {
        root,
        opts,
        on_record,
        on_progress,
        cancel,
        hard_links: Mutex::new(HashSet::new()),
        files_done: AtomicU64::new(0),
        bytes_done: AtomicU64::new(0),
    };
    let start = InspectSummary {
        du_size: root_meta.size(),
        ..InspectSummary::default()
    };
    let rest = fold_tree(
        root,
        |summary, entry| inspection.entry(summary, entry),
        InspectSummary::merge,
    );
    if cancel.is_cancelled() {
        return Err(Cancelled.into());
    }
    Ok(start.merge(rest))
}

/// The apparent size of the regular files below `root`. Unreadable parts are skipped. A
/// cancelled walk stops early (its result is then meaningless).
pub fn regular_file_bytes(root: &Path, cancel: &CancellationToken) -> u64 {
    WalkDir::new(root)
        .into_iter()
        .take_while(|_| !cancel.is_cancelled())
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::Pool;
    use crate::compute::md5::md5_bytes;
    use std::collections::BTreeMap;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::symlink;
    use std::process::Command;

    fn write(path: &Path, data: &[u8]) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(path, data).expect("write");
    }

    fn mkfifo(path: &Path) {
        let status = Command::new("mkfifo").arg(path).status().expect("mkfifo");
        assert!(status.success());
    }

    #[test]
    fn classify_every_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        write(&root.join("file"), b"x");
        fs::create_dir(root.join("dir")).expect("mkdir");
        symlink("file", root.join("to_file")).expect("symlink");
        symlink("dir", root.join("to_dir")).expect("symlink");
        symlink("missing", root.join("broken")).expect("symlink");
        symlink("loop", root.join("loop")).expect("symlink");
        mkfifo(&root.join("fifo"));
        let kind = |name: &str| {
            let path = root.join(name);
            classify(&path, &fs::symlink_metadata(&path).expect("lstat"))
        };
        assert_eq!(kind("file"), EntryKind::File);
        assert_eq!(kind("dir"), EntryKind::Directory);
        assert_eq!(kind("to_file"), EntryKind::SymlinkToFile);
        assert_eq!(kind("to_dir"), EntryKind::SymlinkToDirectory);
        assert_eq!(kind("broken"), EntryKind::BrokenSymlink);
        assert_eq!(kind("loop"), EntryKind::BrokenSymlink);
        assert_eq!(kind("fifo"), EntryKind::Other);
    }

    #[test]
    fn symlink_escapes_table() {
        let cases = [
            ("a/l", "../x", false),
            ("l", "../x", true),
            ("a/b/l", "../../x", false),
            ("a/b/l", "../../../x", true),
            ("l", "/abs", true),
            ("a/l", "/abs/inside/looking", true),
            ("l", "sub/../../x", true),
            ("l", "sub/../x", false),
            ("l", "./x", false),
            ("l", ".", false),
            ("a/l", "..", false),
            ("a/l", "../..", true),
            ("l", "x/./y/../../z", false),
        ];
        for (link, target, escapes) in cases {
            assert_eq!(
                symlink_escapes(Path::new(link), Path::new(target)),
                escapes,
                "{link} -> {target}"
            );
        }
    }

    #[test]
    fn fingerprint_is_order_independent_and_stable() {
        let a = fingerprint_add(fingerprint_add(0, "a/b", 1), "c", 2);
        let b = fingerprint_add(fingerprint_add(0, "c", 2), "a/b", 1);
        assert_eq!(a, b);
        assert_ne!(fingerprint_add(0, "a", 1), fingerprint_add(0, "a", 2));
        assert_ne!(fingerprint_add(0, "a", 1), fingerprint_add(0, "b", 1));
        // Two files swapping sizes change the sum, whatever the sizes' low bits.
        for (x, y) in [(4, 5), (0, 1), (6, 7), (1 << 20, (1 << 20) + 1)] {
            for (p, q) in [
                ("a.txt", "sub/b.txt"),
                ("x", "y"),
                ("r1.fastq.gz", "r2.fastq.gz"),
            ] {
                assert_ne!(
                    fingerprint_add(fingerprint_add(0, p, x), q, y),
                    fingerprint_add(fingerprint_add(0, p, y), q, x),
                    "{p}={x}, {q}={y}"
                );
            }
        }
        // Pinned so that a change of hash (which would invalidate stored fingerprints) is noticed.
        assert_eq!(fingerprint_add(0, "", 0), 0xf51e_c3da_bc2c_4015_u64);
    }

    fn set_times(path: &Path, secs: i64) {
        let time = filetime::FileTime::from_unix_time(secs, 0);
        filetime::set_symlink_file_times(path, time, time).expect("utimes");
    }

    #[test]
    fn newest_change_finds_a_deep_change() {
        let pool = Pool::new(2).expect("pool");
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("ds");
        for i in 0..50 {
            write(&root.join(format!("d{}/e{}/f{i}", i % 5, i % 3)), b"data");
        }
        symlink("nowhere", root.join("d1/broken")).expect("symlink");
        let before = pool
            .install(|| newest_change(&root, far_future(), &CancellationToken::new()))
            .expect("walk");
        // 50 files + 5 + 15 directories + root; the broken link is not counted.
        assert_eq!(before.entries, 71);
        assert_eq!(before.unreadable, 0);
        let newest = before.newest.expect("newest");
        // mtime in the past, but the ctime of the touched file moves forward.
        std::thread::sleep(Duration::from_millis(20));
        let deep = root.join("d3/e0/f3");
        set_times(&deep, 1_000_000);
        let after = pool
            .install(|| newest_change(&root, far_future(), &CancellationToken::new()))
            .expect("walk");
        let changed = after.newest.expect("newest");
        assert!(changed > newest, "{changed:?} > {newest:?}");
        assert_eq!(
            changed,
            changed_at(&fs::symlink_metadata(&deep).expect("lstat"))
        );
    }

    #[test]
    fn newest_change_missing_root_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = newest_change(
            &dir.path().join("missing"),
            far_future(),
            &CancellationToken::new(),
        )
        .expect_err("missing root");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    fn genome_types() -> Vec<String> {
        vec![".fastq.gz".to_owned(), ".bam".to_owned()]
    }

    type Collected = (InspectSummary, BTreeMap<String, InspectRecord>);

    fn inspect(pool: &Pool, root: &Path) -> Collected {
        let types = genome_types();
        let opts = InspectOptions {
            genome_file_types: &types,
            content_digests: true,
        };
        let records = Mutex::new(BTreeMap::new());
        let last_progress = Mutex::new((0u64, 0u64));
        let summary = pool
            .install(|| {
                inspect_tree(
                    root,
                    &opts,
                    &|record| {
                        let previous = records
                            .lock()
                            .expect("lock")
                            .insert(record.path.clone(), record);
                        assert!(previous.is_none(), "each row once");
                    },
                    &|files, bytes| {
                        let mut last = last_progress.lock().expect("lock");
                        last.0 = last.0.max(files);
                        last.1 = last.1.max(bytes);
                    },
                    &CancellationToken::new(),
                )
            })
            .expect("inspect");
        let records = records.into_inner().expect("lock");
        let (files, bytes) = *last_progress.lock().expect("lock");
        assert_eq!(files, summary.num_files);
        assert_eq!(
            bytes,
            records
                .values()
                .filter(|r| r.kind == RecordKind::File)
                .map(|r| r.size)
                .sum::<u64>()
        );
        (summary, records)
    }

    fn du_sb(path: &Path) -> u64 {
        let out = Command::new("du")
            .arg("-sb")
            .arg(path)
            .output()
            .expect("run du");
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).expect("utf8");
        text.split_whitespace()
            .next()
            .expect("size column")
            .parse()
            .expect("number")
    }

    #[test]
    fn inspect_tree_every_kind() {
        for threads in [1, 2] {
            let pool = Pool::new(threads).expect("pool");
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().join("ds");
            let big = crate::compute::md5::tests::pseudo_random(2_500_000, 5);
            write(&root.join("reads/x.R1.fastq.gz"), b"ACGT");
            write(&root.join("reads/x.gz"), b"not genome");
            write(&root.join("aligned.bam"), b"bam");
            write(&root.join("big.bin"), &big);
            write(&root.join("empty"), b"");
            write(&root.join("deep/er/still/file name é.txt"), b"spaces");
            fs::create_dir_all(root.join("empty_dir")).expect("mkdir");
            symlink("aligned.bam", root.join("link_to_file")).expect("symlink");
            symlink("reads", root.join("link_to_dir")).expect("symlink");
            symlink("../nowhere", root.join("deep/broken")).expect("symlink");
            mkfifo(&root.join("fifo"));
            fs::hard_link(root.join("big.bin"), root.join("deep/big_again.bin")).expect("link");

            let (summary, records) = inspect(&pool, &root);
            assert_eq!(summary.errors, Vec::<String>::new());
            assert_eq!(summary.error_count, 0);
            // 7 regular files (one hard link among them) + 2 symlink rows.
            assert_eq!(summary.num_files, 9, "{records:#?}");
            // reads, deep, deep/er, deep/er/still, empty_dir, link_to_dir.
            assert_eq!(summary.num_directories, 6);
            assert_eq!(summary.num_genome_files, 2);
            let row = |path: &str| records.get(path).unwrap_or_else(|| panic!("row {path}"));
            assert_eq!(row("reads/x.R1.fastq.gz").md5, Some(md5_bytes(b"ACGT")));
            assert_eq!(row("big.bin").md5, Some(md5_bytes(&big)));
            assert_eq!(row("big.bin").size, big.len() as u64);
            assert_eq!(row("deep/big_again.bin").size, big.len() as u64);
            assert_eq!(row("empty").md5, Some(md5_bytes(b"")));
            assert_eq!(row("deep/er/still/file name é.txt").kind, RecordKind::File);
            let link = row("link_to_file");
            assert_eq!(link.kind, RecordKind::Symlink);
            assert_eq!(link.md5, None);
            assert_eq!(link.size, "aligned.bam".len() as u64);
            assert_eq!(row("deep/broken").size, "../nowhere".len() as u64);
            assert!(!records.contains_key("fifo"));
            assert!(!records.contains_key("link_to_dir"));
            let expected_size: u64 = records.values().map(|r| r.size).sum();
            assert_eq!(summary.size, expected_size);
            let expected_fp = records
                .values()
                .fold(0, |acc, r| fingerprint_add(acc, &r.path, r.size));
            assert_eq!(summary.fingerprint, expected_fp);
            // Apparent size like du -sb, the hard-linked file counted once.
            assert_eq!(summary.du_size, du_sb(&root));
            let every_lstat: u64 = WalkDir::new(&root)
                .into_iter()
                .map(|e| {
                    e.expect("walk")
                        .path()
                        .symlink_metadata()
                        .expect("lstat")
                        .size()
                })
                .sum();
            assert_eq!(summary.du_size, every_lstat - big.len() as u64);
            assert!(summary.size >= big.len() as u64 * 2);
        }
    }

    #[test]
    fn inspect_tree_reports_escaping_links_and_bad_names() {
        let pool = Pool::new(2).expect("pool");
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("ds");
        write(&root.join("ok"), b"ok");
        symlink("../../etc/passwd", root.join("sneaky")).expect("symlink");
        symlink("/etc/passwd", root.join("absolute")).expect("symlink");
        let bad_name = OsStr::from_bytes(b"bad\xffname");
        write(&root.join(bad_name), b"x");
        let (summary, records) = inspect(&pool, &root);
        assert_eq!(summary.error_count, 3, "{:?}", summary.errors);
        let errors = summary.errors.join("\n");
        assert!(errors.contains(
            "`sneaky`: symbolic link points outside the dataset (`../../etc/passwd`); stage could not restore it"
        ), "{errors}");
        assert!(
            errors.contains("`absolute`: symbolic link points outside the dataset (`/etc/passwd`)"),
            "{errors}"
        );
        assert!(
            errors.contains("`bad\u{fffd}name`: file name is not valid UTF-8"),
            "{errors}"
        );
        // The escaping links are still rows; the non-UTF-8 file is not.
        assert!(records.contains_key("sneaky"));
        assert!(records.contains_key("absolute"));
        assert_eq!(summary.num_files, 3);
    }

    #[test]
    fn inspect_tree_keeps_only_the_first_hundred_errors() {
        let pool = Pool::new(2).expect("pool");
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("ds");
        fs::create_dir(&root).expect("mkdir");
        for i in 0..130 {
            symlink("/etc", root.join(format!("l{i}"))).expect("symlink");
        }
        let (summary, _) = inspect(&pool, &root);
        assert_eq!(summary.error_count, 130);
        assert_eq!(summary.errors.len(), 100);
    }

    #[test]
    fn a_root_that_is_a_symbolic_link_is_walked_through() {
        let pool = Pool::new(2).expect("pool");
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        write(&real.join("a.txt"), b"a");
        write(&real.join("sub/b.txt"), b"bb");
        let link = dir.path().join("link");
        symlink(&real, &link).expect("symlink");
        let (summary, records) = inspect(&pool, &link);
        assert_eq!(summary.error_count, 0, "{:?}", summary.errors);
        assert_eq!(
            records.keys().map(String::as_str).collect::<Vec<_>>(),
            ["a.txt", "sub/b.txt"]
        );
        let changes = pool
            .install(|| newest_change(&link, far_future(), &CancellationToken::new()))
            .expect("walk");
        // The link itself, `a.txt`, `sub` and `sub/b.txt`.
        assert_eq!(changes.entries, 4);
    }

    #[test]
    fn inspect_tree_missing_root_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let types = genome_types();
        let opts = InspectOptions {
            genome_file_types: &types,
            content_digests: true,
        };
        let err = inspect_tree(
            &dir.path().join("missing"),
            &opts,
            &|_| {},
            &|_, _| {},
            &CancellationToken::new(),
        )
        .expect_err("missing root");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn cancelled_walks_return_a_cancellation() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..50 {
            std::fs::write(dir.path().join(format!("f{i}")), b"x").expect("write");
        }
        let cancel = CancellationToken::new();
        cancel.cancel();
        let types = genome_types();
        let opts = InspectOptions {
            genome_file_types: &types,
            content_digests: true,
        };
        let err = inspect_tree(
            dir.path(),
            &opts,
            &|_| panic!("no rows"),
            &|_, _| {},
            &cancel,
        )
        .expect_err("cancelled");
        assert!(crate::cancel::is_cancelled(&err));
        let err = newest_change(dir.path(), far_future(), &cancel).expect_err("cancelled");
        assert!(crate::cancel::is_cancelled(&err));
    }

    fn far_future() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    #[test]
    fn future_times_are_reported_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        std::fs::write(dir.path().join("now"), b"x").expect("write");
        let ahead = dir.path().join("ahead");
        std::fs::write(&ahead, b"x").expect("write");
        let in_a_day = now + Duration::from_secs(86_400);
        filetime::set_file_mtime(&ahead, filetime::FileTime::from_system_time(in_a_day))
            .expect("mtime");
        let summary = newest_change(
            dir.path(),
            now + Duration::from_secs(60),
            &CancellationToken::new(),
        )
        .expect("walk");
        assert_eq!(summary.future_entries, 1);
        let (time, path) = summary.future_newest.expect("future");
        assert_eq!(path, ahead);
        assert!(time > now + Duration::from_secs(80_000));
        assert!(summary.newest.expect("newest") <= now + Duration::from_secs(60));
    }
}

//! Safe, all-or-nothing extraction of tar bundles (ours and GNU tar's) for staging.
//!
//! Bundles come back from the tape archive and are treated as untrusted: every member path is checked,
//! nothing is ever written through a symbolic link, links may not resolve outside the tree, and the tree
//! only appears at its destination (by rename) once everything has been extracted and verified.

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use filetime::FileTime;
use tar::EntryType;
use walkdir::WalkDir;

use rayon::iter::{ParallelBridge, ParallelIterator};

use crate::cancel::{CancellationToken, check, is_cancelled};
use crate::compute::md5::{CHUNK_SIZE, advise_sequential, read_retrying, with_read_buffer};
use crate::compute::{attempt_sibling, remove_leftover_partials, remove_tree, swap_into_place};

/// The permission bits of an extracted tree: the site's policy (`stage.file_mode`,
/// `stage.directory_mode`), never the bundle's own bits, which could make a staged tree
/// world-writable, setgid or unreadable by the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    pub file: u32,
    pub directory: u32,
}

impl Default for Modes {
    fn default() -> Modes {
        Modes {
            file: 0o644,
            directory: 0o755,
        }
    }
}

impl Modes {
    /// A file that was executable in the bundle stays executable where it is readable.
    fn for_file(self, bundle_mode: u32) -> u32 {
        let file = self.file & 0o777;
        if bundle_mode & 0o111 != 0 {
            file | ((file & 0o444) >> 2)
        } else {
            file
        }
    }
}

/// How [`extract_bundle`] extracts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractOptions {
    pub modes: Modes,
    /// Fsync every extracted file and directory before the tree is put into place, so that a
    /// power cut after the caller records the staging cannot leave empty or partial files.
    pub sync: bool,
}

impl Default for ExtractOptions {
    fn default() -> ExtractOptions {
        ExtractOptions {
            modes: Modes::default(),
            sync: true,
        }
    }
}

/// What [`extract_bundle`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub summary: ExtractSummary,
    /// Where the tree that was at the destination before now is (a hidden sibling), for the
    /// caller to remove once it has recorded the new one; `None` if there was none.
    pub replaced: Option<PathBuf>,
}

/// What [`extract_bundle`] created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtractSummary {
    /// Regular files and hard links.
    pub files: u64,
    /// Directory members other than the root.
    pub directories: u64,
    pub symlinks: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("bundle member `{member}` is unsafe: {reason}")]
    Unsafe { member: String, reason: String },
    #[error("bundle `{bundle}` is not a readable tar archive")]
    Corrupt {
        bundle: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the extraction was cancelled")]
    Cancelled,
}

impl ExtractError {
    /// Only I/O failures may go away on retry; an unsafe or corrupt bundle stays so.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ExtractError::Io { .. })
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ExtractError + '_ {
    move |source| {
        if is_cancelled(&source) {
            ExtractError::Cancelled
        } else {
            ExtractError::Io {
                path: path.to_owned(),
                source,
            }
        }
    }
}

fn unsafe_member(member: &str, reason: impl Into<String>) -> ExtractError {
    ExtractError::Unsafe {
        member: member.to_owned(),
        reason: reason.into(),
    }
}

/// Extracts `bundle` to `dest` with a safety filter, all or nothing: `dest` is always a complete
/// tree, the one that was there (if any) until the new one is complete, then the new one.
///
/// The tree is built in a hidden sibling unique to this attempt (`attempt_sibling`), synced when
/// `opts.sync` says so, and swapped into place (`swap_into_place`); the replaced tree is returned
/// for the caller to remove once it has recorded the new one. On any error, cancellation
/// included, the partial tree is removed and `dest` is left as it was. Leftovers of earlier,
/// dead attempts are removed first.
///
/// Member paths lose their leading `./`; absolute paths, `..` components, drive prefixes and NUL bytes are
/// `Unsafe`, and so are devices and fifos. Symbolic links are created only after every other member, and
/// each must resolve (following the links it passes through) inside the tree. Ownership is not restored;
/// modification times are, and permission bits come from `opts.modes`. `cancel` is checked per member
/// and per chunk.
pub fn extract_bundle(
    bundle: &Path,
    dest: &Path,
    opts: &ExtractOptions,
    on_bytes: &(dyn Fn(u64) + Sync),
    cancel: &CancellationToken,
) -> Result<Extracted, ExtractError> {
    remove_leftover_partials(dest).map_err(io_error(dest))?;
    let partial = attempt_sibling(dest);
    fs::create_dir(&partial).map_err(io_error(&partial))?;
    let result = extract_into(bundle, &partial, opts, on_bytes, cancel).and_then(|summary| {
        if opts.sync {
            sync_tree(&partial, cancel).map_err(io_error(&partial))?;
        }
        let replaced = swap_into_place(&partial, dest).map_err(io_error(dest))?;
        if opts.sync {
            crate::compute::sync_parent(dest).map_err(io_error(dest))?;
        }
        Ok(Extracted { summary, replaced })
    });
    if result.is_err()
        && let Err(err) = remove_tree(&partial, &CancellationToken::new())
    {
        tracing::warn!(path = %partial.display(), error = %err, "cannot remove a partial extraction");
    }
    result
}

/// Fsyncs every file and directory of `root`, in parallel on the current pool (a file system
/// merges concurrent syncs into fewer journal commits).
fn sync_tree(root: &Path, cancel: &CancellationToken) -> io::Result<()> {
    WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .par_bridge()
        .try_for_each(|entry| {
            check(cancel)?;
            let entry = entry.map_err(io::Error::from)?;
            if entry.file_type().is_symlink() {
                return Ok(());
            }
            File::open(entry.path())
                .and_then(|f| f.sync_all())
                .map_err(|err| {
                    io::Error::new(
                        err.kind(),
                        format!("cannot sync `{}`: {err}", entry.path().display()),
                    )
                })
        })
}

/// What the bundle reader observed, to tell a failing disk (retryable) from a malformed archive.
#[derive(Default)]
struct ReadState {
    io_failed: Cell<bool>,
    saw_eof: Cell<bool>,
}

/// Counts bundle bytes as the tar parser consumes them and reports them about once per MiB.
struct CountingReader<'a, R> {
    inner: R,
    state: &'a ReadState,
    on_bytes: &'a (dyn Fn(u64) + Sync),
    pending: u64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match read_retrying(&mut self.inner, buf) {
            Ok(0) if !buf.is_empty() => {
                self.state.saw_eof.set(true);
                Ok(0)
            }
            Ok(n) => {
                self.pending += n as u64;
                if self.pending >= CHUNK_SIZE as u64 {
                    (self.on_bytes)(self.pending);
                    self.pending = 0;
                }
                Ok(n)
            }
            Err(err) => {
                self.state.io_failed.set(true);
                Err(err)
            }
        }
    }
}

impl<R> Drop for CountingReader<'_, R> {
    fn drop(&mut self) {
        if self.pending > 0 {
            (self.on_bytes)(self.pending);
        }
    }
}

struct PendingLink {
    member: String,
    target: PathBuf,
    mtime: u64,
}

struct Extraction<'a> {
    bundle: &'a Path,
    root: &'a Path,
    modes: Modes,
    cancel: &'a CancellationToken,
    state: &'a ReadState,
    /// Symbolic links, created only after every other member so nothing is written through one.
    links: BTreeMap<PathBuf, PendingLink>,
    /// Directory (relative path) → mtime, applied at the end with the policy's mode, deepest first.
    directories: BTreeMap<PathBuf, u64>,
    summary: ExtractSummary,
}

fn extract_into(
    bundle: &Path,
    root: &Path,
    opts: &ExtractOptions,
    on_bytes: &(dyn Fn(u64) + Sync),
    cancel: &CancellationToken,
) -> Result<ExtractSummary, ExtractError> {
    let file = File::open(bundle).map_err(|source| ExtractError::Io {
        path: bundle.to_owned(),
        source,
    })?;
    advise_sequential(&file);
    let state = ReadState::default();
    let mut extraction = Extraction {
        bundle,
        root,
        modes: opts.modes,
        cancel,
        state: &state,
        links: BTreeMap::new(),
        directories: BTreeMap::new(),
        summary: ExtractSummary::default(),
    };
    {
        let reader = CountingReader {
            inner: BufReader::with_capacity(CHUNK_SIZE, file),
            state: &state,
            on_bytes,
            pending: 0,
        };
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(|e| extraction.read_error(e))?;
        for entry in entries {
            check(cancel).map_err(io_error(root))?;
            let mut entry = entry.map_err(|e| extraction.read_error(e))?;
            extraction.member(&mut entry)?;
        }
    }
    if state.saw_eof.get() {
        return Err(ExtractError::Corrupt {
            bundle: bundle.to_owned(),
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends without an end-of-archive block (truncated)",
            ),
        });
    }
    extraction.create_links()?;
    extraction.verify_links()?;
    extraction.apply_directory_metadata()?;
    Ok(extraction.summary)
}

/// Splits a member path into its components, dropping `./` prefixes and empty parts; the root is empty.
fn member_path(bytes: &[u8]) -> Result<PathBuf, &'static str> {
    if bytes.contains(&0) {
        return Err("the path contains a NUL byte");
    }
    if bytes.first() == Some(&b'/') {
        return Err("the path is absolute");
    }
    let mut path = PathBuf::new();
    for (i, part) in bytes.split(|&b| b == b'/').enumerate() {
        match part {
            b"" | b"." => {}
            b".." => return Err("the path contains a `..` component"),
            _ => {
                if i == 0 && part.len() >= 2 && part[0].is_ascii_alphabetic() && part[1] == b':' {
                    return Err("the path starts with a drive prefix");
                }
                if i == 0 && part.starts_with(b"\\\\") {
                    return Err("the path starts with a network share prefix");
                }
                path.push(OsStr::from_bytes(part));
            }
        }
    }
    Ok(path)
}

fn is_conflict(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::NotADirectory | io::ErrorKind::AlreadyExists | io::ErrorKind::IsADirectory
    )
}

impl Extraction<'_> {
    fn read_error(&self, source: io::Error) -> ExtractError {
        if is_cancelled(&source) {
            ExtractError::Cancelled
        } else if self.state.io_failed.get() {
            ExtractError::Io {
                path: self.bundle.to_owned(),
                source,
            }
        } else {
            ExtractError::Corrupt {
                bundle: self.bundle.to_owned(),
                source,
            }
        }
    }

    fn corrupt(&self, message: String) -> ExtractError {
        ExtractError::Corrupt {
            bundle: self.bundle.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, message),
        }
    }

    fn member<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ExtractError> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) || kind.as_byte() == b'V'
        {
            // Archive-level metadata (pax globals, volume labels), not files.
            return Ok(());
        }
        let raw_name = entry.path_bytes().into_owned();
        let member = String::from_utf8_lossy(&raw_name).into_owned();
        let rel = member_path(&raw_name).map_err(|reason| unsafe_member(&member, reason))?;
        if rel.as_os_str().is_empty() && kind != EntryType::Directory {
            return Err(unsafe_member(
                &member,
                "only a directory can stand for the root",
            ));
        }
        if kind != EntryType::Symlink {
            self.reject_through_link(&member, &rel)?;
            // A later member replaces an earlier one of the same name.
            self.links.remove(&rel);
        }
        let header = entry.header();
        let mode = header
            .mode()
            .map_err(|e| self.corrupt(format!("member `{member}`: {e}")))?;
        let mtime = header
            .mtime()
            .map_err(|e| self.corrupt(format!("member `{member}`: {e}")))?;
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.file(entry, &member, &rel, mode, mtime)
            }
            EntryType::Directory => self.directory(&member, &rel, mtime),
            EntryType::Symlink => self.symlink(entry, &member, &rel, mtime),
            EntryType::Link => self.hard_link(entry, &member, &rel),
            EntryType::Char | EntryType::Block | EntryType::Fifo => Err(unsafe_member(
                &member,
                "devices and fifos are not allowed in a dataset",
            )),
            other => Err(unsafe_member(
                &member,
                format!(
                    "unsupported member type `{}`",
                    other.as_byte().escape_ascii()
                ),
            )),
        }
    }

    /// Rejects a member whose path passes through a symbolic link of the bundle: extracting it would write
    /// through that link.
    fn reject_through_link(&self, member: &str, rel: &Path) -> Result<(), ExtractError> {
        for ancestor in rel.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() {
                break;
            }
            if self.links.contains_key(ancestor) {
                return Err(unsafe_member(
                    member,
                    format!(
                        "the path goes through symbolic link `{}`",
                        ancestor.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Creates the parent directories of `rel` (no symbolic links exist in the tree yet).
    fn make_parents(&self, member: &str, rel: &Path) -> Result<(), ExtractError> {
        if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            let dir = self.root.join(parent);
            fs::create_dir_all(&dir).map_err(|err| {
                if is_conflict(&err) {
                    unsafe_member(member, "a parent of this member is not a directory")
                } else {
                    io_error(&dir)(err)
                }
            })?;
        }
        Ok(())
    }

    /// Removes whatever a previous member left at `path`, so a new file never shares an inode with it.
    fn clear_path(&self, member: &str, path: &Path) -> Result<(), ExtractError> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => Err(unsafe_member(
                member,
                "the member would replace a directory",
            )),
            Ok(_) => fs::remove_file(path).map_err(io_error(path)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(io_error(path)(err)),
        }
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        member: &str,
        rel: &Path,
        mode: u32,
        mtime: u64,
    ) -> Result<(), ExtractError> {
        self.make_parents(member, rel)?;
        let path = self.root.join(rel);
        self.clear_path(member, &path)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .map_err(io_error(&path))?;
        let expected = entry.size();
        let written = with_read_buffer(|buf| -> Result<u64, ExtractError> {
            let mut written = 0u64;
            loop {
                check(self.cancel).map_err(io_error(&path))?;
                let n = read_retrying(entry, buf).map_err(|e| self.read_error(e))?;
                if n == 0 {
                    return Ok(written);
                }
                file.write_all(&buf[..n]).map_err(io_error(&path))?;
                written += n as u64;
                crate::metrics::extracted(n as u64);
            }
        })?;
        if written != expected {
            return Err(self.corrupt(format!(
                "member `{member}` holds {written} of its {expected} bytes (truncated archive)"
            )));
        }
        file.set_permissions(fs::Permissions::from_mode(self.modes.for_file(mode)))
            .map_err(io_error(&path))?;
        filetime::set_file_handle_times(&file, None, Some(unix_time(mtime)))
            .map_err(io_error(&path))?;
        self.summary.files += 1;
        self.summary.bytes += written;
        Ok(())
    }

    fn directory(&mut self, member: &str, rel: &Path, mtime: u64) -> Result<(), ExtractError> {
        if !rel.as_os_str().is_empty() {
            let path = self.root.join(rel);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(unsafe_member(member, "the member would replace a file"));
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    self.make_parents(member, rel)?;
                    fs::create_dir(&path).map_err(io_error(&path))?;
                }
                Err(err) => return Err(io_error(&path)(err)),
            }
            if self.directories.insert(rel.to_owned(), mtime).is_none() {
                self.summary.directories += 1;
            }
        } else {
            self.directories.insert(PathBuf::new(), mtime);
        }
        Ok(())
    }

    fn symlink<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        member: &str,
        rel: &Path,
        mtime: u64,
    ) -> Result<(), ExtractError> {
        let target = match entry.link_name_bytes() {
            Some(target) if !target.is_empty() => target.into_owned(),
            _ => return Err(unsafe_member(member, "symbolic link without a target")),
        };
        if target.contains(&0) {
            return Err(unsafe_member(member, "the link target contains a NUL byte"));
        }
        if target.first() == Some(&b'/') {
            return Err(unsafe_member(
                member,
                format!(
                    "symbolic link to an absolute path (`{}`)",
                    String::from_utf8_lossy(&target)
                ),
            ));
        }
        self.reject_through_link(member, rel)?;
        self.links.insert(
            rel.to_owned(),
            PendingLink {
                member: member.to_owned(),
                target: PathBuf::from(OsStr::from_bytes(&target)),
                mtime,
            },
        );
        Ok(())
    }

    fn hard_link<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        member: &str,
        rel: &Path,
    ) -> Result<(), ExtractError> {
        let target = entry
            .link_name_bytes()
            .map(|t| t.into_owned())
            .unwrap_or_default();
        let target_rel = member_path(&target)
            .map_err(|reason| unsafe_member(member, format!("hard link target: {reason}")))?;
        let described = String::from_utf8_lossy(&target).into_owned();
        self.reject_through_link(member, &target_rel)?;
        let target_path = self.root.join(&target_rel);
        let is_extracted_file = !target_rel.as_os_str().is_empty()
            && target_rel != rel
            && fs::symlink_metadata(&target_path).is_ok_and(|meta| meta.is_file());
        if !is_extracted_file {
            return Err(unsafe_member(
                member,
                format!("hard link target `{described}` is not a file extracted earlier"),
            ));
        }
        self.make_parents(member, rel)?;
        let path = self.root.join(rel);
        self.clear_path(member, &path)?;
        fs::hard_link(&target_path, &path).map_err(io_error(&path))?;
        self.summary.files += 1;
        Ok(())
    }

    fn create_links(&mut self) -> Result<(), ExtractError> {
        for (rel, link) in &self.links {
            // Parents must be real directories: an earlier link in this loop could otherwise redirect
            // the new one outside the tree.
            let mut dir = self.root.to_path_buf();
            if let Some(parent) = rel.parent() {
                for part in parent.components() {
                    dir.push(part);
                    match fs::symlink_metadata(&dir) {
                        Ok(meta) if meta.is_dir() => {}
                        Ok(meta) if meta.file_type().is_symlink() => {
                            return Err(unsafe_member(
                                &link.member,
                                "the path goes through another symbolic link",
                            ));
                        }
                        Ok(_) => {
                            return Err(unsafe_member(
                                &link.member,
                                "a parent of this member is not a directory",
                            ));
                        }
                        Err(err) if err.kind() == io::ErrorKind::NotFound => {
                            fs::create_dir(&dir).map_err(io_error(&dir))?;
                        }
                        Err(err) => return Err(io_error(&dir)(err)),
                    }
                }
            }
            let path = self.root.join(rel);
            std::os::unix::fs::symlink(&link.target, &path).map_err(|err| {
                if err.kind() == io::ErrorKind::AlreadyExists {
                    unsafe_member(&link.member, "the link conflicts with another member")
                } else {
                    io_error(&path)(err)
                }
            })?;
            let time = unix_time(link.mtime);
            filetime::set_symlink_file_times(&path, time, time).map_err(io_error(&path))?;
            self.summary.symlinks += 1;
        }
        Ok(())
    }

    fn verify_links(&self) -> Result<(), ExtractError> {
        for (rel, link) in &self.links {
            if let Err(reason) = resolves_inside(self.root, rel, &link.target) {
                return Err(unsafe_member(&link.member, reason));
            }
        }
        Ok(())
    }

    fn apply_directory_metadata(&self) -> Result<(), ExtractError> {
        let mut dirs: Vec<(&PathBuf, &u64)> = self.directories.iter().collect();
        // Deepest first, so a read-only directory is closed only after everything inside it is done.
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
        let mode = self.modes.directory & 0o777;
        for (rel, &mtime) in dirs {
            let path = self.root.join(rel);
            let dir = OpenOptions::new()
                .read(true)
                .custom_flags(
                    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::DIRECTORY).bits() as i32,
                )
                .open(&path)
                .map_err(io_error(&path))?;
            dir.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_error(&path))?;
            filetime::set_file_handle_times(&dir, None, Some(unix_time(mtime)))
                .map_err(io_error(&path))?;
        }
        Ok(())
    }
}

fn unix_time(secs: u64) -> FileTime {
    FileTime::from_unix_time(i64::try_from(secs).unwrap_or(i64::MAX), 0)
}

/// Most symbolic links followed while resolving one link, as the kernel allows (MAXSYMLINKS).
const MAX_HOPS: u32 = 40;

/// Resolves `parent(link_rel)/target` against the real tree under `root`, component by component,
/// following symbolic links met on the way (so `..` applies to where a link really leads); once a
/// component does not exist the rest is resolved lexically. Fails if the resolution ever leaves `root`.
fn resolves_inside(root: &Path, link_rel: &Path, target: &Path) -> Result<(), String> {
    let escapes = || {
        format!(
            "symbolic link target `{}` resolves outside the dataset",
            target.display()
        )
    };
    let mut current: Vec<OsString> = link_rel
        .parent()
        .map(|p| p.iter().map(OsStr::to_owned).collect())
        .unwrap_or_default();
    let mut pending: VecDeque<OsString> = VecDeque::new();
    if !push_components(&mut pending, target) {
        return Err(escapes());
    }
    let mut hops = 0;
    let mut on_disk = true;
    while let Some(part) = pending.pop_front() {
        if part == "." {
            continue;
        }
        if part == ".." {
            if current.pop().is_none() {
                return Err(escapes());
            }
            continue;
        }
        current.push(part);
        if !on_disk {
            continue;
        }
        let path: PathBuf = std::iter::once(root.as_os_str())
            .chain(current.iter().map(OsString::as_os_str))
            .collect();
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(format!(
                        "symbolic link target `{}` goes through too many links",
                        target.display()
                    ));
                }
                let next = fs::read_link(&path)
                    .map_err(|e| format!("cannot read a link it goes through: {e}"))?;
                current.pop();
                let mut expanded = VecDeque::new();
                if !push_components(&mut expanded, &next) {
                    return Err(escapes());
                }
                expanded.extend(pending);
                pending = expanded;
            }
            Ok(meta) if meta.is_dir() => {}
            // A file or a missing entry: nothing below it exists, so the rest is lexical.
            _ => on_disk = false,
        }
    }
    Ok(())
}

/// Appends the components of a relative path; false for an absolute one.
fn push_components(out: &mut VecDeque<OsString>, path: &Path) -> bool {
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push_back(part.to_owned()),
            Component::CurDir => out.push_back(".".into()),
            Component::ParentDir => out.push_back("..".into()),
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::Pool;
    use crate::compute::bundle::tests::{describe_tree, sample_tree};
    use std::process::Command;

    /// Builds a bundle from raw members; names are written into the header verbatim (no checks).
    struct Hostile {
        builder: tar::Builder<Vec<u8>>,
    }

    impl Hostile {
        fn new() -> Self {
            Hostile {
                builder: tar::Builder::new(Vec::new()),
            }
        }

        fn header(name: &str, kind: EntryType, size: u64, link: Option<&str>) -> tar::Header {
            let mut header = tar::Header::new_gnu();
            let old = header.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(link) = link {
                old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_mode(0o644);
            header.set_mtime(1_600_000_000);
            header.set_size(size);
            header.set_entry_type(kind);
            header.set_cksum();
            header
        }

        fn dir(mut self, name: &str) -> Self {
            let header = Self::header(name, EntryType::Directory, 0, None);
            self.builder.append(&header, io::empty()).expect("append");
            self
        }

        fn file(mut self, name: &str, data: &[u8]) -> Self {
            let header = Self::header(name, EntryType::Regular, data.len() as u64, None);
            self.builder.append(&header, data).expect("append");
            self
        }

        fn link(mut self, name: &str, kind: EntryType, target: &str) -> Self {
            let header = Self::header(name, kind, 0, Some(target));
            self.builder.append(&header, io::empty()).expect("append");
            self
        }

        fn with_data(mut self, name: &str, kind: EntryType, data: &[u8]) -> Self {
            let header = Self::header(name, kind, data.len() as u64, None);
            self.builder.append(&header, data).expect("append");
            self
        }

        fn raw(mut self, name: &str, kind: EntryType) -> Self {
            let header = Self::header(name, kind, 0, None);
            self.builder.append(&header, io::empty()).expect("append");
            self
        }

        fn finish(self) -> Vec<u8> {
            self.builder.into_inner().expect("finish")
        }
    }

    struct Case {
        _dir: tempfile::TempDir,
        base: PathBuf,
        bundle: PathBuf,
        dest: PathBuf,
    }

    impl Case {
        fn new(bytes: &[u8]) -> Case {
            let dir = tempfile::tempdir().expect("tempdir");
            let base = dir.path().join("stage");
            fs::create_dir(&base).expect("mkdir");
            let bundle = dir.path().join("bundle.tar");
            fs::write(&bundle, bytes).expect("write");
            let dest = base.join("restored");
            Case {
                base,
                bundle,
                dest,
                _dir: dir,
            }
        }

        fn extract(&self) -> Result<ExtractSummary, ExtractError> {
            Pool::new(2)
                .expect("pool")
                .install(|| {
                    extract_bundle(
                        &self.bundle,
                        &self.dest,
                        &ExtractOptions::default(),
                        &|_| {},
                        &CancellationToken::new(),
                    )
                })
                .map(|extracted| extracted.summary)
        }

        /// The extraction failed cleanly: no tree at dest, no partial directory, nothing outside.
        fn assert_nothing_left(&self) {
            assert!(!self.dest.exists(), "dest must not exist");
            assert!(fs::symlink_metadata(&self.dest).is_err());
            let left: Vec<_> = fs::read_dir(&self.base).expect("read_dir").collect();
            assert!(left.is_empty(), "stage dir is empty: {left:?}");
            let outside: Vec<_> = fs::read_dir(self.base.parent().expect("parent"))
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            let mut outside: Vec<_> = outside
                .iter()
                .map(|n| n.to_string_lossy().into_owned())
                .collect();
            outside.sort();
            assert_eq!(outside, ["bundle.tar", "stage"], "nothing written outside");
        }
    }

    fn expect_unsafe(bytes: Vec<u8>, member: &str) {
        let case = Case::new(&bytes);
        match case.extract() {
            Err(ExtractError::Unsafe {
                member: got,
                reason,
            }) => {
                assert_eq!(got, member, "{reason}");
                assert!(
                    !ExtractError::Unsafe {
                        member: got,
                        reason
                    }
                    .is_retryable()
                );
            }
            other => panic!("expected Unsafe for `{member}`, got {other:?}"),
        }
        case.assert_nothing_left();
    }

    #[test]
    fn rejects_parent_components() {
        expect_unsafe(Hostile::new().file("../evil", b"x").finish(), "../evil");
        expect_unsafe(
            Hostile::new().dir("a/").file("a/../../evil", b"x").finish(),
            "a/../../evil",
        );
        expect_unsafe(
            Hostile::new()
                .file("./ok", b"x")
                .file("a/..", b"x")
                .finish(),
            "a/..",
        );
    }

    /// One pax extended-header record: "<length> <key>=<value>\n", the length counting itself.
    fn pax_record(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    #[test]
    fn checks_paths_from_extended_headers() {
        // A pax path overrides the harmless name in the header itself.
        expect_unsafe(
            Hostile::new()
                .with_data(
                    "./PaxHeaders/x",
                    EntryType::XHeader,
                    &pax_record("path", "../evil"),
                )
                .file("innocent", b"x")
                .finish(),
            "../evil",
        );
        expect_unsafe(
            Hostile::new()
                .with_data(
                    "./PaxHeaders/l",
                    EntryType::XHeader,
                    &pax_record("linkpath", "../../outside"),
                )
                .link("l", EntryType::Symlink, "harmless")
                .finish(),
            "l",
        );
        // A GNU long name record.
        let long = format!("{}/../../evil", "d".repeat(120));
        let mut record = long.clone().into_bytes();
        record.push(0);
        expect_unsafe(
            Hostile::new()
                .with_data("././@LongLink", EntryType::GNULongName, &record)
                .file("short", b"x")
                .finish(),
            &long,
        );
    }

    #[test]
    fn extracts_gnu_sparse_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        fs::create_dir(&source).expect("mkdir");
        let sparse = source.join("sparse.img");
        let file = File::create(&sparse).expect("create");
        file.set_len(8 << 20).expect("truncate");
        use std::os::unix::fs::FileExt;
        file.write_all_at(b"head", 0).expect("write");
        file.write_all_at(b"middle", 3 << 20).expect("write");
        file.write_all_at(b"tail", (8 << 20) - 4).expect("write");
        drop(file);
        let bundle = dir.path().join("sparse.tar");
        let status = Command::new("tar")
            .arg("--sparse")
            .arg("-cf")
            .arg(&bundle)
            .arg("-C")
            .arg(&source)
            .arg(".")
            .status()
            .expect("tar");
        assert!(status.success());
        let dest = dir.path().join("restored");
        let summary = extract_bundle(
            &bundle,
            &dest,
            &ExtractOptions::default(),
            &|_| {},
            &CancellationToken::new(),
        )
        .expect("extract")
        .summary;
        assert_eq!(summary.bytes, 8 << 20);
        assert!(
            fs::read(dest.join("sparse.img")).expect("read") == fs::read(&sparse).expect("read")
        );
    }

    #[test]
    fn rejects_absolute_and_prefixed_paths() {
        expect_unsafe(Hostile::new().file("/abs/path", b"x").finish(), "/abs/path");
        expect_unsafe(
            Hostile::new().file("C:/windows", b"x").finish(),
            "C:/windows",
        );
    }

    #[test]
    fn rejects_escaping_symlinks() {
        expect_unsafe(
            Hostile::new()
                .link("l", EntryType::Symlink, "../../outside")
                .finish(),
            "l",
        );
        expect_unsafe(
            Hostile::new()
                .link("./l", EntryType::Symlink, "/etc")
                .finish(),
            "./l",
        );
        expect_unsafe(
            Hostile::new()
                .dir("./d/")
                .link("./d/l", EntryType::Symlink, "sub/../../..")
                .finish(),
            "./d/l",
        );
    }

    #[test]
    fn rejects_chained_symlinks_that_escape_together() {
        // Each looks harmless lexically: a -> b/.. stays at the root and b -> . is the root itself, but
        // on disk b/.. is the parent of the root.
        expect_unsafe(
            Hostile::new()
                .link("a", EntryType::Symlink, "b/..")
                .link("b", EntryType::Symlink, ".")
                .finish(),
            "a",
        );
        // A chain through a subdirectory: up -> d/x/.. with d/x -> ../.. .
        expect_unsafe(
            Hostile::new()
                .dir("d/")
                .link("d/x", EntryType::Symlink, "..")
                .link("up", EntryType::Symlink, "d/x/..")
                .finish(),
            "up",
        );
        // A loop is rejected, not followed forever.
        expect_unsafe(
            Hostile::new()
                .link("p", EntryType::Symlink, "q/x")
                .link("q", EntryType::Symlink, "p/x")
                .finish(),
            "p",
        );
    }

    #[test]
    fn never_writes_through_a_symlink() {
        // l -> sub, then l/x: rejected rather than written through the link.
        expect_unsafe(
            Hostile::new()
                .dir("sub/")
                .link("l", EntryType::Symlink, "sub")
                .file("l/x", b"through the link")
                .finish(),
            "l/x",
        );
        // The classic: a link to the outside, then a file below it.
        expect_unsafe(
            Hostile::new()
                .link("l", EntryType::Symlink, "../../outside")
                .file("l/x", b"escaped")
                .finish(),
            "l/x",
        );
        // A file first, then a link at its parent: the link conflicts with the real directory.
        expect_unsafe(
            Hostile::new()
                .file("l/x", b"data")
                .link("l", EntryType::Symlink, "sub")
                .finish(),
            "l",
        );
    }

    #[test]
    fn rejects_hard_links_outside_or_to_nothing() {
        expect_unsafe(
            Hostile::new().link("h", EntryType::Link, "../x").finish(),
            "h",
        );
        expect_unsafe(
            Hostile::new()
                .link("h", EntryType::Link, "/etc/passwd")
                .finish(),
            "h",
        );
        expect_unsafe(
            Hostile::new()
                .link("h", EntryType::Link, "missing")
                .finish(),
            "h",
        );
        // A hard link to a symlink could alias its target.
        expect_unsafe(
            Hostile::new()
                .file("f", b"x")
                .link("s", EntryType::Symlink, "f")
                .link("h", EntryType::Link, "s")
                .finish(),
            "h",
        );
    }

    #[test]
    fn rejects_devices_and_fifos() {
        expect_unsafe(Hostile::new().raw("dev", EntryType::Char).finish(), "dev");
        expect_unsafe(Hostile::new().raw("blk", EntryType::Block).finish(), "blk");
        expect_unsafe(Hostile::new().raw("fifo", EntryType::Fifo).finish(), "fifo");
    }

    fn expect_corrupt(bytes: &[u8]) {
        let case = Case::new(bytes);
        match case.extract() {
            Err(err @ ExtractError::Corrupt { .. }) => assert!(!err.is_retryable()),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        case.assert_nothing_left();
    }

    #[test]
    fn truncated_or_garbage_archives_are_corrupt() {
        let data = crate::compute::md5::tests::pseudo_random(5000, 2);
        let whole = Hostile::new()
            .dir("./")
            .file("./a", b"first")
            .file("./big", &data)
            .finish();
        // Inside the content of a member.
        expect_corrupt(&whole[..512 * 4 + 100]);
        // Inside a header.
        expect_corrupt(&whole[..512 * 3 + 100]);
        // Exactly at a member boundary, without the end-of-archive blocks.
        expect_corrupt(&whole[..512 * 3]);
        // Not a tar at all, and empty.
        expect_corrupt(&data);
        expect_corrupt(b"");
        // A flipped byte in a header breaks its checksum.
        let mut flipped = whole.clone();
        flipped[512 + 3] ^= 0x20;
        expect_corrupt(&flipped);
    }

    #[test]
    fn an_existing_tree_stays_whole_until_the_new_one_replaces_it() {
        let case = Case::new(&Hostile::new().dir("./").file("./a", b"new").finish());
        fs::create_dir(&case.dest).expect("mkdir");
        fs::write(case.dest.join("a"), b"old").expect("write");
        let extracted = Pool::new(2)
            .expect("pool")
            .install(|| {
                extract_bundle(
                    &case.bundle,
                    &case.dest,
                    &ExtractOptions::default(),
                    &|_| {},
                    &CancellationToken::new(),
                )
            })
            .expect("extract");
        assert_eq!(fs::read(case.dest.join("a")).expect("read"), b"new");
        let old = extracted.replaced.expect("the old tree is handed back");
        assert_eq!(fs::read(old.join("a")).expect("read"), b"old");
        assert_eq!(old.parent(), Some(case.base.as_path()));

        // A refused bundle leaves the current tree exactly as it was.
        fs::write(
            &case.bundle,
            Hostile::new()
                .file("ok", b"x")
                .file("../evil", b"x")
                .finish(),
        )
        .expect("write");
        case.extract().expect_err("hostile");
        assert_eq!(fs::read(case.dest.join("a")).expect("read"), b"new");
        let names: Vec<_> = fs::read_dir(&case.base)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "the tree and the old one only: {names:?}");
    }

    #[test]
    fn leftovers_of_dead_attempts_are_removed() {
        let case = Case::new(&Hostile::new().dir("./").file("./a", b"fresh").finish());
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let gone = child.id();
        child.wait().expect("wait");
        let mine = crate::compute::attempt_sibling(&case.dest);
        let name = mine
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let (prefix, owner) = name.split_at(name.find('-').expect("owner"));
        let _ = owner;
        let leftover = case.base.join(format!("{prefix}-{gone}-0badf00d.partial"));
        fs::create_dir_all(leftover.join("stale/ro")).expect("mkdir");
        fs::write(leftover.join("stale/ro/old"), b"old").expect("write");
        fs::set_permissions(leftover.join("stale/ro"), fs::Permissions::from_mode(0o555))
            .expect("chmod");
        let summary = case.extract().expect("extract");
        assert_eq!(summary.files, 1);
        assert_eq!(fs::read(case.dest.join("a")).expect("read"), b"fresh");
        assert!(fs::symlink_metadata(&leftover).is_err());
    }

    #[test]
    fn an_extraction_cancelled_from_elsewhere_stops_within_a_second() {
        let mut bundle = Hostile::new().dir("./");
        for i in 0..24 {
            let data = crate::compute::md5::tests::pseudo_random(2 * CHUNK_SIZE, i);
            bundle = bundle.file(&format!("./f{i:02}.bin"), &data);
        }
        let case = Case::new(&bundle.finish());
        let cancel = CancellationToken::new();
        let read = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                while read.load(std::sync::atomic::Ordering::Relaxed) < 4 * CHUNK_SIZE as u64 {
                    std::thread::yield_now();
                }
                cancel.cancel();
                std::time::Instant::now()
            });
            let err = Pool::new(2)
                .expect("pool")
                .install(|| {
                    extract_bundle(
                        &case.bundle,
                        &case.dest,
                        &ExtractOptions::default(),
                        &|n| {
                            read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        },
                        &cancel,
                    )
                })
                .expect_err("cancelled");
            assert!(matches!(err, ExtractError::Cancelled), "{err:?}");
            let cancelled_at = watcher.join().expect("watcher");
            assert!(cancelled_at.elapsed() < std::time::Duration::from_secs(1));
        });
        case.assert_nothing_left();
    }

    #[test]
    fn a_cancelled_extraction_stops_and_leaves_nothing() {
        let data = crate::compute::md5::tests::pseudo_random(6 * CHUNK_SIZE, 5);
        let case = Case::new(&Hostile::new().dir("./").file("./big", &data).finish());
        let cancel = CancellationToken::new();
        let err = Pool::new(1)
            .expect("pool")
            .install(|| {
                extract_bundle(
                    &case.bundle,
                    &case.dest,
                    &ExtractOptions::default(),
                    &|_| cancel.cancel(),
                    &cancel,
                )
            })
            .expect_err("cancelled");
        assert!(matches!(err, ExtractError::Cancelled), "{err:?}");
        case.assert_nothing_left();
    }

    #[test]
    fn modes_come_from_the_policy_not_the_bundle() {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, mode, data) in [
            ("./", EntryType::Directory, 0o777, &b""[..]),
            ("sub/", EntryType::Directory, 0o3777, &b""[..]),
            (
                "sub/run.sh",
                EntryType::Regular,
                0o4755,
                &b"#!/bin/sh\n"[..],
            ),
            ("sub/data", EntryType::Regular, 0o666, &b"d"[..]),
        ] {
            let mut header = Hostile::header(name, kind, data.len() as u64, None);
            header.set_mode(mode);
            header.set_cksum();
            builder.append(&header, data).expect("append");
        }
        let case = Case::new(&builder.into_inner().expect("finish"));
        let opts = ExtractOptions {
            modes: Modes {
                file: 0o640,
                directory: 0o750,
            },
            sync: true,
        };
        Pool::new(1)
            .expect("pool")
            .install(|| {
                extract_bundle(
                    &case.bundle,
                    &case.dest,
                    &opts,
                    &|_| {},
                    &CancellationToken::new(),
                )
            })
            .expect("extract");
        let mode = |rel: &str| {
            fs::metadata(case.dest.join(rel))
                .expect("stat")
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode(""), 0o750);
        assert_eq!(mode("sub"), 0o750);
        assert_eq!(mode("sub/run.sh"), 0o750);
        assert_eq!(mode("sub/data"), 0o640);
    }

    #[test]
    fn extracts_members_hard_links_and_harmless_links() {
        let bytes = Hostile::new()
            .dir("./")
            .dir("./d/")
            .file("./d/f", b"content")
            .link("./d/h", EntryType::Link, "./d/f")
            .link("./up", EntryType::Symlink, "d/../d/f")
            .link("./d/self", EntryType::Symlink, "..")
            .link("./d/via", EntryType::Symlink, "self/d/f")
            .file("./dup", b"first")
            .file("./dup", b"second wins")
            .finish();
        let case = Case::new(&bytes);
        let summary = case.extract().expect("extract");
        assert_eq!(
            summary,
            ExtractSummary {
                files: 4,
                directories: 1,
                symlinks: 3,
                bytes: 7 + 5 + 11,
            }
        );
        assert_eq!(fs::read(case.dest.join("d/h")).expect("read"), b"content");
        assert_eq!(fs::read(case.dest.join("up")).expect("read"), b"content");
        assert_eq!(fs::read(case.dest.join("d/via")).expect("read"), b"content");
        assert_eq!(
            fs::read(case.dest.join("dup")).expect("read"),
            b"second wins"
        );
        use std::os::unix::fs::MetadataExt;
        let f = fs::metadata(case.dest.join("d/f")).expect("stat");
        assert_eq!(f.nlink(), 2);
        assert_eq!(f.mtime(), 1_600_000_000);
    }

    #[test]
    fn read_only_directories_in_a_bundle_do_not_block_extraction() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = Hostile::header("ro/", EntryType::Directory, 0, None);
        header.set_mode(0o555);
        header.set_cksum();
        builder.append(&header, io::empty()).expect("append");
        let header = Hostile::header("ro/f", EntryType::Regular, 2, None);
        builder.append(&header, &b"hi"[..]).expect("append");
        let case = Case::new(&builder.into_inner().expect("finish"));
        case.extract().expect("extract");
        let meta = fs::metadata(case.dest.join("ro")).expect("stat");
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o755,
            "the policy's mode"
        );
        assert_eq!(fs::read(case.dest.join("ro/f")).expect("read"), b"hi");
    }

    #[test]
    fn extracts_a_gnu_tar_bundle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        sample_tree(&source);
        let bundle = dir.path().join("gnu.tar");
        let status = Command::new("tar")
            .arg("cf")
            .arg(&bundle)
            .arg("-C")
            .arg(&source)
            .arg(".")
            .status()
            .expect("tar cf");
        assert!(status.success());
        let dest = dir.path().join("restored");
        let reported = std::sync::atomic::AtomicU64::new(0);
        let summary = Pool::new(1)
            .expect("pool")
            .install(|| {
                extract_bundle(
                    &bundle,
                    &dest,
                    &ExtractOptions::default(),
                    &|n| {
                        reported.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    },
                    &CancellationToken::new(),
                )
            })
            .expect("extract")
            .summary;
        assert_eq!(describe_tree(&dest, false), describe_tree(&source, false));
        assert_eq!(summary.files, 7);
        assert_eq!(summary.symlinks, 4);
        let consumed = reported.load(std::sync::atomic::Ordering::Relaxed);
        let len = fs::metadata(&bundle).expect("stat").len();
        assert!(
            consumed > 1_300_000 && consumed <= len,
            "{consumed} of {len}"
        );
    }

    #[test]
    fn member_paths() {
        assert_eq!(member_path(b"./a/b"), Ok(PathBuf::from("a/b")));
        assert_eq!(member_path(b"././a//b/"), Ok(PathBuf::from("a/b")));
        assert_eq!(member_path(b"./"), Ok(PathBuf::new()));
        assert!(member_path(b"a/../b").is_err());
        assert!(member_path(b"/a").is_err());
        assert!(member_path(b"a\0b").is_err());
        assert!(member_path(b"c:x").is_err());
        // A colon later in a name is an ordinary character.
        assert_eq!(member_path(b"a/c:x"), Ok(PathBuf::from("a/c:x")));
    }
}

//! Tar bundles of datasets, hashed while they are written so the bundle is never read back for its MD5.
//!
//! Bundles list members like GNU `tar cf B -C source .` (`./` first, then `./rel/path`), depth first with
//! the entries of every directory sorted by name, so the same tree always gives a byte-identical bundle.

use std::fs::{self, File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};
use walkdir::WalkDir;

use crate::cancel::{CancellationToken, check, is_cancelled};
use crate::compute::md5::{
    CHUNK_SIZE, CopyError, HashingWriter, Md5, Md5Digest, advise_sequential,
};
use crate::compute::walk::{
    EntryKind, classify, digest_fingerprint_add, fingerprint_add, symlink_escapes,
};

/// What [`write_bundle`] wrote.
#[derive(Debug, Clone)]
pub struct BundleSummary {
    pub md5: Md5Digest,
    /// Tar bytes.
    pub size: u64,
    pub members: MemberSummary,
}

/// Counts of the members of a bundle, comparable with an inspection of the same tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberSummary {
    /// Regular files, symlinks to files and broken symlinks.
    pub files: u64,
    /// Directory members other than `./`, plus symlinks to directories.
    pub directories: u64,
    /// `fingerprint_add` over (path without "./", size) of the members counted in `files`; equals
    /// `inspect_tree(..).fingerprint` of an unchanged tree.
    pub fingerprint: u64,
    /// `fingerprint_add` over (path, 0) of the same members: comparable with file rows whose
    /// sizes the registry does not return.
    pub path_fingerprint: u64,
    /// `digest_fingerprint_add` over (path, digest of the content as written, none for links) of
    /// the same members, the digest being the writer's `MemberDigest`; equals
    /// `inspect_tree(..).content_fingerprint` (BLAKE3) or `.checksum_fingerprint` (MD5) when every
    /// file still holds the bytes inspect hashed.
    pub digest_fingerprint: u64,
    /// Sum of the sizes in `fingerprint`; equals `inspect_tree(..).size` of an unchanged tree.
    pub bytes: u64,
}

impl MemberSummary {
    fn add_file(&mut self, rel: &str, size: u64, digest: Option<&[u8]>) {
        self.files += 1;
        self.fingerprint = fingerprint_add(self.fingerprint, rel, size);
        self.path_fingerprint = fingerprint_add(self.path_fingerprint, rel, 0);
        self.digest_fingerprint = digest_fingerprint_add(self.digest_fingerprint, rel, digest);
        self.bytes += size;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read or write `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{path}` changed while it was being archived")]
    Changed { path: PathBuf },
    #[error("`{path}` is a symbolic link pointing outside the dataset (`{target}`)")]
    EscapingSymlink { path: PathBuf, target: PathBuf },
    #[error("writing the bundle was cancelled")]
    Cancelled,
}

impl BundleError {
    /// Io and Changed may succeed on a later attempt; an escaping symlink needs the dataset fixed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BundleError::Io { .. } | BundleError::Changed { .. })
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |source| {
        if is_cancelled(&source) {
            BundleError::Cancelled
        } else {
            BundleError::Io {
                path: path.to_owned(),
                source,
            }
        }
    }
}

/// Which digest of each member's content the writer computes, to compare the bundle with an
/// inspection: BLAKE3, which inspect records alongside each MD5 and which costs a fraction of a
/// second MD5 pass; or MD5, for inspections that recorded nothing else (older releases, the
/// Python workers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemberDigest {
    #[default]
    Blake3,
    Md5,
}

/// A member's content digest as it is computed.
enum MemberHasher {
    Blake3(Box<blake3::Hasher>),
    Md5(Md5),
}

impl MemberHasher {
    fn new(kind: MemberDigest) -> MemberHasher {
        match kind {
            MemberDigest::Blake3 => MemberHasher::Blake3(Box::default()),
            MemberDigest::Md5 => MemberHasher::Md5(Md5::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            MemberHasher::Blake3(hasher) => {
                hasher.update(data);
            }
            MemberHasher::Md5(md5) => md5.update(data),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            MemberHasher::Blake3(hasher) => hasher.finalize().as_bytes().to_vec(),
            MemberHasher::Md5(md5) => md5.finish().as_bytes().to_vec(),
        }
    }
}

/// Writes the tar bundle of `source` to the new file `bundle`, hashing it while it is written
/// (never re-read), and each member's content with `members` on the way, and syncs it.
///
/// `bundle` must not exist: callers give each attempt its own path (`super::attempt_sibling`),
/// so that a cancelled attempt still stopping and the next one never share a file. On any error,
/// cancellation included, `bundle` is removed. `cancel` is checked per member and per chunk.
pub fn write_bundle(
    source: &Path,
    bundle: &Path,
    members: MemberDigest,
    on_bytes: &(dyn Fn(u64) + Sync),
    cancel: &CancellationToken,
) -> Result<BundleSummary, BundleError> {
    let result = write_new(source, bundle, members, on_bytes, cancel);
    if result.is_err() {
        // Best effort: the error being returned matters more than a failed cleanup.
        let _ = fs::remove_file(bundle);
    }
    result
}

fn write_new(
    source: &Path,
    partial: &Path,
    digest: MemberDigest,
    on_bytes: &(dyn Fn(u64) + Sync),
    cancel: &CancellationToken,
) -> Result<BundleSummary, BundleError> {
    let root_meta = fs::metadata(source).map_err(io_error(source))?;
    if !root_meta.is_dir() {
        return Err(io_error(source)(io::Error::new(
            io::ErrorKind::NotADirectory,
            "the dataset to archive is not a directory",
        )));
    }
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(partial)
        .map_err(io_error(partial))?;
    let out = ProgressWriter {
        inner: HashingWriter::new(BufWriter::with_capacity(CHUNK_SIZE, file)),
        on_bytes,
        pending: 0,
    };
    let mut builder = tar::Builder::new(out);
    let mut members = MemberSummary::default();

    append_entry(
        builder.get_mut(),
        b"./",
        EntryType::Directory,
        &root_meta,
        None,
        0,
    )
    .map_err(io_error(partial))?;
    let walk = WalkDir::new(source)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name();
    for entry in walk {
        check(cancel).map_err(io_error(partial))?;
        let entry = entry.map_err(|err| walk_error(source, err))?;
        let path = entry.path();
        let rel = path.strip_prefix(source).unwrap_or(path);
        let mut name = b"./".to_vec();
        name.extend_from_slice(rel.as_os_str().as_bytes());
        let meta = match fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(BundleError::Changed {
                    path: path.to_owned(),
                });
            }
            Err(err) => return Err(io_error(path)(err)),
        };
        let file_type = meta.file_type();
        if file_type.is_dir() {
            name.push(b'/');
            append_entry(
                builder.get_mut(),
                &name,
                EntryType::Directory,
                &meta,
                None,
                0,
            )
            .map_err(io_error(partial))?;
            members.directories += 1;
        } else if file_type.is_symlink() {
            let target = fs::read_link(path).map_err(io_error(path))?;
            if symlink_escapes(rel, &target) {
                return Err(BundleError::EscapingSymlink {
                    path: path.to_owned(),
                    target,
                });
            }
            append_entry(
                builder.get_mut(),
                &name,
                EntryType::Symlink,
                &meta,
                Some(target.as_os_str().as_bytes()),
                0,
            )
            .map_err(io_error(partial))?;
            if classify(path, &meta) == EntryKind::SymlinkToDirectory {
                members.directories += 1;
            } else {
                members.add_file(&rel.to_string_lossy(), meta.len(), None);
            }
        } else if file_type.is_file() {
            let content = append_file(builder.get_mut(), &name, path, &meta, digest, cancel)
                .map_err(|err| match err {
                    MemberError::Changed => BundleError::Changed {
                        path: path.to_owned(),
                    },
                    MemberError::Read(source) => io_error(path)(source),
                    MemberError::Write(source) => io_error(partial)(source),
                })?;
            members.add_file(&rel.to_string_lossy(), meta.len(), Some(&content));
        } else {
            tracing::warn!(path = %path.display(), "not a file, directory or symbolic link; left out of the bundle");
        }
    }

    let out = builder.into_inner().map_err(io_error(partial))?;
    let (buffered, md5, size) = out.finish().map_err(io_error(partial))?;
    let file = buffered
        .into_inner()
        .map_err(|err| io_error(partial)(err.into_error()))?;
    file.sync_all().map_err(io_error(partial))?;
    Ok(BundleSummary { md5, size, members })
}

fn walk_error(source: &Path, err: walkdir::Error) -> BundleError {
    let path = err.path().unwrap_or(source).to_owned();
    match err.into_io_error() {
        Some(io) if io.kind() == io::ErrorKind::NotFound => BundleError::Changed { path },
        Some(io) => BundleError::Io { path, source: io },
        None => BundleError::Io {
            path,
            source: io::Error::other("file system loop"),
        },
    }
}

/// Reports tar bytes to `on_bytes` about once per MiB (tar writes in small pieces).
struct ProgressWriter<'a, W: Write> {
    inner: HashingWriter<W>,
    on_bytes: &'a (dyn Fn(u64) + Sync),
    pending: u64,
}

impl<W: Write> ProgressWriter<'_, W> {
    /// Reads member content straight into the hashing writer's buffer, showing it to `on_data`.
    fn read_from(
        &mut self,
        reader: &mut dyn Read,
        on_data: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, CopyError> {
        let n = self.inner.read_from(reader, on_data)?;
        self.count(n);
        Ok(n)
    }

    fn count(&mut self, n: usize) {
        self.pending += n as u64;
        if self.pending >= CHUNK_SIZE as u64 {
            (self.on_bytes)(self.pending);
            crate::metrics::bundled(self.pending);
            self.pending = 0;
        }
    }

    fn finish(self) -> io::Result<(W, Md5Digest, u64)> {
        if self.pending > 0 {
            (self.on_bytes)(self.pending);
            crate::metrics::bundled(self.pending);
        }
        self.inner.finish()
    }
}

impl<W: Write> Write for ProgressWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.count(n);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

const BLOCK: usize = 512;

/// Writes the member header (preceded by GNU long-name / long-link records when needed), the way GNU tar
/// does: names of 100 bytes or more go in a `././@LongLink` record.
fn append_entry(
    out: &mut dyn Write,
    name: &[u8],
    kind: EntryType,
    meta: &Metadata,
    link: Option<&[u8]>,
    size: u64,
) -> io::Result<()> {
    let mut header = Header::new_gnu();
    {
        let old = header.as_old_mut();
        if name.len() >= old.name.len() {
            write_long_record(out, b'L', name)?;
        }
        let n = name.len().min(old.name.len());
        old.name[..n].copy_from_slice(&name[..n]);
        if let Some(link) = link {
            if link.len() >= old.linkname.len() {
                write_long_record(out, b'K', link)?;
            }
            let n = link.len().min(old.linkname.len());
            old.linkname[..n].copy_from_slice(&link[..n]);
        }
    }
    // GNU tar stores permission bits only; the type lives in the type flag.
    header.set_mode(meta.mode() & 0o7777);
    header.set_uid(u64::from(meta.uid()));
    header.set_gid(u64::from(meta.gid()));
    header.set_mtime(meta.mtime().max(0) as u64);
    header.set_size(size);
    header.set_entry_type(kind);
    header.set_cksum();
    out.write_all(header.as_bytes())
}

fn write_long_record(out: &mut dyn Write, kind: u8, value: &[u8]) -> io::Result<()> {
    let mut header = Header::new_gnu();
    let tag = b"././@LongLink";
    header.as_old_mut().name[..tag.len()].copy_from_slice(tag);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    // The stored name is NUL-terminated, as GNU tar writes it.
    header.set_size(value.len() as u64 + 1);
    header.set_entry_type(EntryType::new(kind));
    header.set_cksum();
    out.write_all(header.as_bytes())?;
    out.write_all(value)?;
    out.write_all(&[0])?;
    pad(out, value.len() as u64 + 1)
}

fn pad(out: &mut dyn Write, len: u64) -> io::Result<()> {
    let rem = (len % BLOCK as u64) as usize;
    if rem != 0 {
        out.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
    }
    Ok(())
}

#[derive(Debug)]
enum MemberError {
    /// Fewer bytes than the header announces, or the file changed under us.
    Changed,
    Read(io::Error),
    Write(io::Error),
}

/// Appends a regular file and returns the digest of the content it wrote: compared with the
/// inspection's, so that a file changed since (even with its size kept) is never archived under
/// the old description.
fn append_file<W: Write>(
    out: &mut ProgressWriter<'_, W>,
    name: &[u8],
    path: &Path,
    meta: &Metadata,
    digest: MemberDigest,
    cancel: &CancellationToken,
) -> Result<Vec<u8>, MemberError> {
    let mut file = match fs::OpenOptions::new()
        .read(true)
        // The entry was a regular file when listed; never follow a link swapped in since.
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
    {
        Ok(file) => file,
        Err(err)
            if err.kind() == io::ErrorKind::NotFound
                || err.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) =>
        {
            return Err(MemberError::Changed);
        }
        Err(err) => return Err(MemberError::Read(err)),
    };
    let opened = file.metadata().map_err(MemberError::Read)?;
    if !opened.is_file() || opened.dev() != meta.dev() || opened.ino() != meta.ino() {
        return Err(MemberError::Changed);
    }
    advise_sequential(&file);
    let len = meta.len();
    append_entry(out, name, EntryType::Regular, meta, None, len).map_err(MemberError::Write)?;
    let content = copy_member(&mut file, len, out, digest, cancel)?;
    let after = file.metadata().map_err(MemberError::Read)?;
    if after.len() != len
        || after.mtime() != meta.mtime()
        || after.mtime_nsec() != meta.mtime_nsec()
    {
        return Err(MemberError::Changed);
    }
    Ok(content)
}

/// Copies exactly `len` bytes of member content and the block padding, reading straight into the
/// hashing writer's buffer (no intermediate copy), and returns the `digest` of the content. A
/// reader that runs dry early means the file shrank after its header was written: the archive
/// would be corrupt, so that is `Changed`.
fn copy_member<W: Write>(
    reader: &mut dyn Read,
    len: u64,
    out: &mut ProgressWriter<'_, W>,
    digest: MemberDigest,
    cancel: &CancellationToken,
) -> Result<Vec<u8>, MemberError> {
    let mut limited = reader.take(len);
    let mut remaining = len;
    let mut hasher = MemberHasher::new(digest);
    while remaining > 0 {
        check(cancel).map_err(MemberError::Read)?;
        let n = out
            .read_from(&mut limited, &mut |data| hasher.update(data))
            .map_err(|err| match err {
                CopyError::Read(err) => MemberError::Read(err),
                CopyError::Write(err) => MemberError::Write(err),
            })?;
        if n == 0 {
            return Err(MemberError::Changed);
        }
        remaining -= n as u64;
    }
    pad(out, len).map_err(MemberError::Write)?;
    Ok(hasher.finish())
}

/// A non-directory member of a bundle, as [`list_members`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedMember {
    /// Without the leading `./`.
    pub path: String,
    /// A symbolic link's size is the length of its target (what `lstat` reports, and what
    /// inspect records).
    pub size: u64,
    /// MD5 of a file's content; `None` for links.
    pub md5: Option<Md5Digest>,
}

/// The non-directory members of a bundle with the checksums of their contents: what the bundle
/// really holds, read back to name the files that differ from an inspection (a failure path,
/// so reading the bundle again is fine).
pub fn list_members(bundle: &Path, cancel: &CancellationToken) -> io::Result<Vec<ListedMember>> {
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(
        CHUNK_SIZE,
        File::open(bundle)?,
    ));
    let mut out = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        let path = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let (size, md5) = if kind.is_symlink() {
            let len = entry
                .link_name_bytes()
                .map_or(0, |target| target.len() as u64);
            (len, None)
        } else {
            let (md5, _) = crate::compute::md5::md5_reader(&mut entry, &mut |_| {}, cancel)?;
            (entry.size(), Some(md5))
        };
        out.push(ListedMember { path, size, md5 });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::compute::Pool;
    use crate::compute::extract::{ExtractOptions, extract_bundle};
    use crate::compute::md5::md5_file;
    use crate::compute::walk::{InspectOptions, inspect_tree};
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::process::Command;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A file name of the maximum length (255 bytes).
    pub(crate) fn long_name() -> String {
        format!("n255_{}", "a".repeat(250))
    }

    fn write(path: &Path, data: &[u8], mode: u32) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(path, data).expect("write");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// A dataset with every kind of member a bundle has to carry.
    pub(crate) fn sample_tree(root: &Path) {
        let long_name = long_name();
        assert_eq!(long_name.len(), 255);
        let deep =
            "a_rather_long_directory_name/another_rather_long_directory_name/yet_another_level";
        write(&root.join("top.txt"), b"top level\n", 0o644);
        write(&root.join("empty"), b"", 0o600);
        write(
            &root.join("data/big.bin"),
            &crate::compute::md5::tests::pseudo_random(1_300_000, 11),
            0o640,
        );
        write(
            &root.join("data/run script.sh"),
            b"#!/bin/sh\necho hi\n",
            0o755,
        );
        write(&root.join("data/échantillon ü.csv"), b"a,b\n1,2\n", 0o644);
        write(
            &root.join(format!("{deep}/file_with_a_path_over_100_bytes.txt")),
            b"deep",
            0o644,
        );
        write(&root.join(format!("data/{long_name}")), b"long name", 0o644);
        fs::create_dir_all(root.join("empty_dir")).expect("mkdir");
        symlink("top.txt", root.join("link_to_file")).expect("symlink");
        symlink("data", root.join("link_to_dir")).expect("symlink");
        symlink("../missing_target", root.join("data/broken")).expect("symlink");
        symlink(
            format!("../{deep}/file_with_a_path_over_100_bytes.txt"),
            root.join("data/long_link"),
        )
        .expect("symlink");
    }

    fn md5sum(path: &Path) -> String {
        let out = Command::new("md5sum").arg(path).output().expect("md5sum");
        assert!(out.status.success());
        String::from_utf8(out.stdout)
            .expect("utf8")
            .split_whitespace()
            .next()
            .expect("digest")
            .to_owned()
    }

    pub(crate) fn gnu_tar_list(bundle: &Path) -> Vec<String> {
        let out = Command::new("tar")
            .arg("tf")
            .arg(bundle)
            .output()
            .expect("tar tf");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf8")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Every entry below `root` (relative path, description) for comparing trees; with
    /// `modes`, permission bits are part of the description.
    pub(crate) fn describe_tree(root: &Path, modes: bool) -> Vec<(String, String)> {
        let mode = |meta: &Metadata| {
            if modes {
                format!("{:o}", meta.mode() & 0o7777)
            } else {
                String::new()
            }
        };
        let mut out = Vec::new();
        for entry in WalkDir::new(root).min_depth(1).sort_by_file_name() {
            let entry = entry.expect("walk");
            let rel = entry
                .path()
                .strip_prefix(root)
                .expect("prefix")
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(entry.path()).expect("lstat");
            let desc = if meta.file_type().is_symlink() {
                format!(
                    "link -> {}",
                    fs::read_link(entry.path()).expect("readlink").display()
                )
            } else if meta.is_dir() {
                format!("dir {}", mode(&meta))
            } else {
                let data = fs::read(entry.path()).expect("read");
                format!(
                    "file {} {} {}",
                    mode(&meta),
                    data.len(),
                    crate::compute::md5::md5_bytes(&data)
                )
            };
            out.push((rel, desc));
        }
        out
    }

    #[test]
    fn round_trip_through_gnu_tar_and_extract() {
        let pool = Pool::new(2).expect("pool");
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("dataset");
        sample_tree(&source);
        let bundle = dir.path().join("dataset.tar");
        let reported = AtomicU64::new(0);
        let summary = pool
            .install(|| {
                write_bundle(
                    &source,
                    &bundle,
                    MemberDigest::Blake3,
                    &|n| {
                        reported.fetch_add(n, Ordering::Relaxed);
                    },
                    &CancellationToken::new(),
                )
            })
            .expect("bundle");
        let bundle_len = fs::metadata(&bundle).expect("stat").len();
        assert_eq!(summary.size, bundle_len);
        assert_eq!(reported.load(Ordering::Relaxed), bundle_len);
        assert_eq!(
            md5_file(&bundle, &CancellationToken::new()).expect("hash"),
            (summary.md5, bundle_len)
        );
        assert_eq!(summary.md5.to_string(), md5sum(&bundle));
        // files: top.txt, empty, big.bin, run script.sh, échantillon, deep file, long name file,
        // link_to_file, broken, long_link. directories: data, empty_dir, the three deep ones, link_to_dir.
        assert_eq!(summary.members.files, 10);
        assert_eq!(summary.members.directories, 6);

        let listing = gnu_tar_list(&bundle);
        assert_eq!(listing[0], "./");
        assert!(
            listing.iter().all(|name| name.starts_with("./")),
            "{listing:?}"
        );
        assert!(listing.contains(&"./data/".to_owned()));
        assert!(listing.contains(&format!("./data/{}", long_name())));
        assert!(listing.contains(&"./data/échantillon ü.csv".to_owned()));
        // Depth first, names sorted within each directory.
        let data_pos = listing.iter().position(|n| n == "./data/").expect("data");
        let big_pos = listing
            .iter()
            .position(|n| n == "./data/big.bin")
            .expect("big");
        let empty_pos = listing.iter().position(|n| n == "./empty").expect("empty");
        assert!(data_pos < big_pos && big_pos < empty_pos, "{listing:?}");
        let verbose = Command::new("tar")
            .arg("tvf")
            .arg(&bundle)
            .output()
            .expect("tar tvf");
        assert!(verbose.status.success());
        let verbose = String::from_utf8(verbose.stdout).expect("utf8");
        assert!(verbose.contains("./link_to_file -> top.txt"), "{verbose}");
        assert!(verbose.contains("-rwxr-xr-x"), "{verbose}");

        // GNU tar extracts it to the same tree.
        let by_gnu = dir.path().join("by_gnu");
        fs::create_dir(&by_gnu).expect("mkdir");
        let status = Command::new("tar")
            .arg("xf")
            .arg(&bundle)
            .arg("-C")
            .arg(&by_gnu)
            .status()
            .expect("tar xf");
        assert!(status.success());
        assert_eq!(describe_tree(&by_gnu, true), describe_tree(&source, true));

        let restored = dir.path().join("restored");
        let extracted = pool
            .install(|| {
                extract_bundle(
                    &bundle,
                    &restored,
                    &ExtractOptions::default(),
                    &|_| {},
                    &CancellationToken::new(),
                )
            })
            .expect("extract")
            .summary;
        // Contents, links and times come back; modes are the staging policy's.
        assert_eq!(
            describe_tree(&restored, false),
            describe_tree(&source, false)
        );
        assert_eq!(extracted.files, 7);
        assert_eq!(extracted.symlinks, 4);
        assert_eq!(extracted.directories, 5);
    }

    #[test]
    fn bundles_are_deterministic_and_match_inspection() {
        let pool = Pool::new(1).expect("pool");
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("dataset");
        sample_tree(&source);
        let first = dir.path().join("first.tar");
        let second = dir.path().join("second.tar");
        let a = pool
            .install(|| {
                write_bundle(
                    &source,
                    &first,
                    MemberDigest::Blake3,
                    &|_| {},
                    &CancellationToken::new(),
                )
            })
            .expect("bundle");
        let b = pool
            .install(|| {
                write_bundle(
                    &source,
                    &second,
                    MemberDigest::Md5,
                    &|_| {},
                    &CancellationToken::new(),
                )
            })
            .expect("bundle");
        assert_eq!(a.md5, b.md5, "the member digest does not change the bundle");
        assert!(fs::read(&first).expect("read") == fs::read(&second).expect("read"));
        // A path that exists is never written over: each attempt has its own.
        let taken = pool.install(|| {
            write_bundle(
                &source,
                &first,
                MemberDigest::Blake3,
                &|_| {},
                &CancellationToken::new(),
            )
        });
        assert!(matches!(taken, Err(BundleError::Io { .. })), "{taken:?}");
        assert!(!first.exists(), "a failed write removes its file");

        let types = Vec::new();
        let inspected = pool
            .install(|| {
                inspect_tree(
                    &source,
                    &InspectOptions {
                        genome_file_types: &types,
                        content_digests: true,
                    },
                    &|_| {},
                    &|_, _| {},
                    &CancellationToken::new(),
                )
            })
            .expect("inspect");
        assert_eq!(a.members.fingerprint, inspected.fingerprint);
        assert_eq!(a.members.digest_fingerprint, inspected.content_fingerprint);
        assert_eq!(b.members.digest_fingerprint, inspected.checksum_fingerprint);
        assert_eq!(a.members.bytes, inspected.size);
        assert_eq!(a.members.files, inspected.num_files);
        assert_eq!(a.members.directories, inspected.num_directories);
    }

    #[test]
    fn escaping_symlink_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("dataset");
        write(&source.join("a.txt"), b"a", 0o644);
        symlink("../../outside", source.join("sub_link")).expect("symlink");
        let bundle = dir.path().join("dataset.tar");
        let err = write_bundle(
            &source,
            &bundle,
            MemberDigest::Blake3,
            &|_| {},
            &CancellationToken::new(),
        )
        .expect_err("escaping link");
        match &err {
            BundleError::EscapingSymlink { path, target } => {
                assert_eq!(path, &source.join("sub_link"));
                assert_eq!(target, Path::new("../../outside"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!err.is_retryable());
        assert!(!bundle.exists());
    }

    #[test]
    fn a_file_changed_with_its_size_kept_changes_the_checksum_fingerprint() {
        let pool = Pool::new(2).expect("pool");
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("dataset");
        sample_tree(&source);
        let bundle = |name: &str| {
            pool.install(|| {
                write_bundle(
                    &source,
                    &dir.path().join(name),
                    MemberDigest::Blake3,
                    &|_| {},
                    &CancellationToken::new(),
                )
            })
            .expect("bundle")
        };
        let before = bundle("before.tar");
        write(&source.join("top.txt"), b"TOP LEVEL\n", 0o644);
        let after = bundle("after.tar");
        assert_eq!(
            before.members.fingerprint, after.members.fingerprint,
            "same sizes"
        );
        assert_ne!(
            before.members.digest_fingerprint,
            after.members.digest_fingerprint
        );
        let listed =
            list_members(&dir.path().join("after.tar"), &CancellationToken::new()).expect("list");
        let top = listed
            .iter()
            .find(|m| m.path == "top.txt")
            .expect("top.txt");
        assert_eq!(
            top.md5,
            Some(crate::compute::md5::md5_bytes(b"TOP LEVEL\n"))
        );
        let link = listed
            .iter()
            .find(|m| m.path == "link_to_file")
            .expect("link");
        assert_eq!((link.size, link.md5), (7, None));
    }

    #[test]
    fn a_bundle_cancelled_from_elsewhere_stops_within_a_second() {
        let pool = Pool::new(2).expect("pool");
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("dataset");
        for i in 0..48 {
            write(
                &source.join(format!("f{i:02}.bin")),
                &crate::compute::md5::tests::pseudo_random(4 * CHUNK_SIZE, i),
                0o644,
            );
        }
        let bundle = dir.path().join("dataset.tar");
        let cancel = CancellationToken::new();
        let written = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                while written.load(Ordering::Relaxed) < 8 * CHUNK_SIZE as u64 {
                    std::thread::yield_now();
                }
                cancel.cancel();
                std::time::Instant::now()
            });
            let err = pool
                .install(|| {
                    write_bundle(
                        &source,
                        &bundle,
                        MemberDigest::Blake3,
                        &|n| {
                            written.fetch_add(n, Ordering::Relaxed);
                        },
                        &cancel,
                    )
                })
                .expect_err("cancelled");
            assert!(matches!(err, BundleError::Cancelled), "{err:?}");
            let cancelled_at = watcher.join().expect("watcher");
            assert!(cancelled_at.elapsed() < std::time::Duration::from_secs(1));
        });
        assert!(!bundle.exists(), "nothing left");
    }

    #[test]
    fn a_cancelled_bundle_stops_and_leaves_nothing() {
        let pool = Pool::new(2).expect("pool");
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("dataset");
        write(
            &source.join("big.bin"),
            &crate::compute::md5::tests::pseudo_random(8 * CHUNK_SIZE, 3),
            0o644,
        );
        let bundle = dir.path().join("dataset.tar");
        let cancel = CancellationToken::new();
        let err = pool
            .install(|| {
                write_bundle(
                    &source,
                    &bundle,
                    MemberDigest::Blake3,
                    &|written| {
                        if written > 0 {
                            cancel.cancel();
                        }
                    },
                    &cancel,
                )
            })
            .expect_err("cancelled");
        assert!(matches!(err, BundleError::Cancelled), "{err:?}");
        assert!(!bundle.exists());
    }

    #[test]
    fn missing_source_is_an_io_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("x.tar");
        let err = write_bundle(
            &dir.path().join("missing"),
            &bundle,
            MemberDigest::Blake3,
            &|_| {},
            &CancellationToken::new(),
        )
        .expect_err("missing");
        assert!(matches!(err, BundleError::Io { .. }));
        assert!(err.is_retryable());
        assert!(!bundle.exists());
    }

    #[test]
    fn short_content_is_changed() {
        let writer = |on_bytes| ProgressWriter {
            inner: HashingWriter::new(Vec::new()),
            on_bytes,
            pending: 0,
        };
        let mut out = writer(&|_| {});
        let cancel = CancellationToken::new();
        let err = copy_member(
            &mut &b"only ten b"[..],
            20,
            &mut out,
            MemberDigest::Blake3,
            &cancel,
        )
        .expect_err("short");
        assert!(matches!(err, MemberError::Changed));
        let mut out = writer(&|_| {});
        let md5 = copy_member(
            &mut &b"exactly ten and more"[..],
            10,
            &mut out,
            MemberDigest::Md5,
            &cancel,
        )
        .expect("exact");
        assert_eq!(
            md5,
            crate::compute::md5::md5_bytes(b"exactly te").as_bytes()
        );
        let (out, digest, size) = out.finish().expect("finish");
        assert_eq!(out.len(), BLOCK);
        assert_eq!(size, BLOCK as u64);
        assert_eq!(&out[..10], b"exactly te");
        assert!(out[10..].iter().all(|&b| b == 0));
        assert_eq!(digest, crate::compute::md5::md5_bytes(&out));
    }

    #[test]
    fn changed_error_is_retryable() {
        let err = BundleError::Changed {
            path: PathBuf::from("x"),
        };
        assert!(err.is_retryable());
        assert_eq!(err.to_string(), "`x` changed while it was being archived");
    }
}

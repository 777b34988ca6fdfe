//! Upload integrity (spec C.5.3): the BLAKE3 manifest the UI hashes before an upload, the
//! `path-size-v1` size manifest a sender may pass instead, and the existence check, each run
//! over the uploaded tree exactly as the verifier has to.
//!
//! The BLAKE3 manifest must equal the UI's byte for byte (`ui/src/services/upload/checksum.js`):
//! the line `blake3-manifest-v1`, then `<path>\t<size>\t<blake3 hex>` per regular file, joined
//! by `\n` without a trailing newline, in the order of JavaScript's `<` on the path strings
//! (UTF-16 code units, see [`utf16_cmp`]). Its hash is the BLAKE3 of that text.
//!
//! Like the other walks, these functions are synchronous and run on the current rayon pool:
//! async callers hand them to [`crate::compute::Pool::run_job`] (which also gives the
//! cancellation token), synchronous ones to [`crate::compute::Pool::install`].

use std::cmp::Ordering;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use walkdir::WalkDir;

use crate::cancel::{self, CancellationToken, check};
use crate::compute::md5::{advise_sequential, read_retrying, with_read_buffer};
use crate::progress::Progress;

/// First line of a BLAKE3 manifest.
pub const MANIFEST_HEADER: &str = "blake3-manifest-v1";

/// The only size manifest mode there is.
pub const SIZE_MANIFEST_MODE: &str = "path-size-v1";

/// Files are read through the thread's 1 MiB buffer and hashed on one thread up to this many
/// bytes; a larger one goes through [`hash_large`], which spreads it over the pool.
const SMALL_FILE: u64 = 1 << 20;

/// The subtrees of a large file read and hashed as one piece: the size of the thread's read
/// buffer. Reads of 1 MiB, several at once, suit Lustre (its RPC size) as well as the 16 MiB
/// sequential reads of the original.
const LEAF: u64 = crate::compute::md5::CHUNK_SIZE as u64;

/// Summary of a BLAKE3 manifest over a tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Blake3Manifest {
    /// BLAKE3 of the manifest text, lowercase hex.
    pub hash: String,
    pub files: u64,
    pub bytes: u64,
}

/// One line of a BLAKE3 manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestLine {
    /// Relative to the root, '/'-separated.
    pub path: String,
    pub size: u64,
    pub hash: blake3::Hash,
}

/// A `path-size-v1` size manifest, as the sender passes it in the upload's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct SizeManifest {
    /// Missing reads as empty, so that it is reported as an unsupported mode.
    #[serde(default)]
    pub mode: String,
    /// Missing reads as empty, so that it is reported as a manifest without files.
    #[serde(default)]
    pub files: Vec<SizeEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size: Option<u64>,
}

/// One file of a [`SizeManifest`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct SizeEntry {
    pub path: String,
    pub size: u64,
}

impl SizeManifest {
    /// Reads a size manifest from JSON text; any error (syntax, a missing field, a size that is
    /// not a non-negative integer) is an [`ManifestError::InvalidManifest`] naming where it is.
    pub fn parse(text: &str) -> Result<SizeManifest, ManifestError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let manifest: SizeManifest =
            serde_path_to_error::deserialize(&mut de).map_err(invalid_json)?;
        de.end()
            .map_err(|err| ManifestError::InvalidManifest(err.to_string()))?;
        Ok(manifest)
    }

    /// Reads a size manifest from a JSON value (the upload log's `metadata.size_manifest`).
    pub fn from_value(value: &serde_json::Value) -> Result<SizeManifest, ManifestError> {
        serde_path_to_error::deserialize(value).map_err(invalid_json)
    }
}

fn invalid_json(err: serde_path_to_error::Error<serde_json::Error>) -> ManifestError {
    let path = err.path().to_string();
    let inner = err.into_inner();
    ManifestError::InvalidManifest(if path == "." {
        inner.to_string()
    } else {
        format!("`{path}`: {inner}")
    })
}

/// Why an integrity check did not hold. Each message names what it is about; [`type_name`]
/// gives the Python exception type the original raises in the same case, for the
/// `failure_reason` (`"<Type>: <msg>"`) the verifier writes.
///
/// [`type_name`]: ManifestError::type_name
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "Manifest hash mismatch for `{root}`: expected {expected}, computed {actual} over {files} \
         file(s), {bytes} byte(s); the files differ from what was hashed before the upload"
    )]
    Mismatch {
        root: PathBuf,
        expected: String,
        actual: String,
        files: u64,
        bytes: u64,
    },
    #[error("No files found at `{0}`")]
    NoFiles(PathBuf),
    #[error("origin `{0}` does not exist")]
    OriginMissing(PathBuf),
    #[error("origin `{0}` is not a directory")]
    OriginNotDirectory(PathBuf),
    /// The manifest itself is wrong: its mode, no files, a missing or malformed field, an
    /// expected hash that is not BLAKE3 hex.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    #[error("size manifest path `{path}` escapes origin `{root}`")]
    PathEscapes { root: PathBuf, path: String },
    #[error("`{path}` listed in the size manifest is not a regular file ({kind})")]
    NotRegularFile { path: String, kind: &'static str },
    #[error("file `{path}` listed in the size manifest is missing")]
    MissingFile { path: String },
    #[error("size of `{path}` differs: the size manifest says {expected} byte(s), found {actual}")]
    SizeDiffers {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("size manifest file_count is {file_count} but it lists {entries} file(s)")]
    FileCountListed { file_count: u64, entries: u64 },
    #[error("{}", describe_count_on_disk(root, *expected, *found, first_unlisted.as_deref()))]
    FileCountOnDisk {
        root: PathBuf,
        expected: u64,
        found: u64,
        /// The first regular file (in manifest order) that the size manifest does not list.
        first_unlisted: Option<String>,
    },
    #[error(
        "total size differs: the size manifest says {expected} byte(s), the files hold {actual}"
    )]
    TotalSizeDiffers { expected: u64, actual: u64 },
    #[error("`{}`: the file name is not valid UTF-8 (an upload cannot have made it)", .path.display())]
    NonUtf8Name { path: PathBuf },
    #[error("`{}`: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("the check was cancelled")]
    Cancelled,
}

fn describe_count_on_disk(
    root: &Path,
    expected: u64,
    found: u64,
    first_unlisted: Option<&str>,
) -> String {
    let mut text = format!(
        "File count mismatch at `{}`: the size manifest says {expected}, found {found} regular \
         file(s)",
        root.display()
    );
    if found > expected {
        text.push_str(&format!(" ({} extra", found - expected));
        if let Some(path) = first_unlisted {
            text.push_str(&format!(", the first not listed is `{path}`"));
        }
        text.push(')');
    } else {
        // Every listed file was found, so fewer files on disk means some are listed twice.
        text.push_str(&format!(
            " ({} fewer: the size manifest lists some file more than once)",
            expected - found
        ));
    }
    text
}

impl ManifestError {
    /// The Python exception type the original raises in this case. Its checks all raise a bare
    /// `Exception`; only what the operating system or the encoder reports has its own type.
    pub fn type_name(&self) -> &'static str {
        match self {
            ManifestError::Io { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => "FileNotFoundError",
                io::ErrorKind::PermissionDenied => "PermissionError",
                io::ErrorKind::IsADirectory => "IsADirectoryError",
                io::ErrorKind::NotADirectory => "NotADirectoryError",
                io::ErrorKind::Interrupted => "InterruptedError",
                _ => "OSError",
            },
            // `str.encode('utf-8')` of a name holding undecodable bytes.
            ManifestError::NonUtf8Name { .. } => "UnicodeEncodeError",
            // What Celery reports for a task stopped from outside.
            ManifestError::Cancelled => "Terminated",
            _ => "Exception",
        }
    }

    /// `"<Type>: <message>"`, the `failure_reason` of a failed verification.
    pub fn failure_reason(&self) -> String {
        format!("{}: {self}", self.type_name())
    }

    /// Whether the manifest given to the check is at fault rather than the files.
    pub fn is_invalid_manifest(&self) -> bool {
        matches!(self, ManifestError::InvalidManifest(_))
    }

    fn io(path: &Path, source: io::Error) -> ManifestError {
        if cancel::is_cancelled(&source) {
            ManifestError::Cancelled
        } else {
            ManifestError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// JavaScript's `a < b` on strings: UTF-16 code units compared in order. It agrees with the
/// byte (code point) order except between a character above U+FFFF (a surrogate pair, units
/// 0xD800-0xDFFF) and one in U+E000-U+FFFF, which JavaScript puts after it.
pub fn utf16_cmp(a: &str, b: &str) -> Ordering {
    // Equal leading bytes are equal leading code units; only the first differing characters
    // decide, and UTF-16 being prefix-free, their encodings compare like the strings.
    let common = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    let mut start = common;
    while !a.is_char_boundary(start) {
        start -= 1;
    }
    match (a[start..].chars().next(), b[start..].chars().next()) {
        (Some(x), Some(y)) => {
            let (mut xs, mut ys) = ([0u16; 2], [0u16; 2]);
            let (xs, ys): (&[u16], &[u16]) = (x.encode_utf16(&mut xs), y.encode_utf16(&mut ys));
            xs.cmp(ys)
        }
        _ => a.len().cmp(&b.len()),
    }
}

/// The manifest text of `lines` (already in manifest order).
pub fn manifest_text(lines: &[ManifestLine]) -> String {
    let mut text = String::new();
    write_manifest(lines, &mut |piece| text.push_str(piece));
    text
}

/// Feeds the manifest text of `lines` to `out` piece by piece, so it can be hashed without
/// being held whole.
fn write_manifest(lines: &[ManifestLine], out: &mut dyn FnMut(&str)) {
    out(MANIFEST_HEADER);
    for line in lines {
        out("\n");
        out(&line.path);
        out("\t");
        out(&line.size.to_string());
        out("\t");
        out(line.hash.to_hex().as_str());
    }
}

/// The BLAKE3 manifest of the regular files below `root`: their hashes computed in parallel
/// on the current rayon pool, the manifest text hashed as it is written.
///
/// Symbolic links are neither listed nor followed (a link to a directory is not entered);
/// directories are entered; other kinds (fifos, sockets) are skipped. A name that is not UTF-8
/// fails ([`ManifestError::NonUtf8Name`]), as does any directory or file that cannot be read.
/// A file's size is the number of bytes hashed, so both describe the same content.
///
/// `cancel` is checked per entry listed and per chunk read. With `progress`, its total is set
/// to the bytes listed and bytes are added as they are read (the caller names the phase with
/// [`Progress::start`]).
pub fn blake3_manifest(
    root: &Path,
    cancel: &CancellationToken,
    progress: Option<&Progress>,
) -> Result<Blake3Manifest, ManifestError> {
    let lines = manifest_lines(root, cancel, progress)?;
    Ok(summarize(&lines))
}

/// The manifest text itself (what [`blake3_manifest`] hashes), for tests and diagnosis.
pub fn blake3_manifest_text(
    root: &Path,
    cancel: &CancellationToken,
) -> Result<String, ManifestError> {
    Ok(manifest_text(&manifest_lines(root, cancel, None)?))
}

/// [`blake3_manifest`] compared with `expected_hex` (as the UI stored it in
/// `metadata.checksum.manifest_hash`): the manifest on a match, else
/// [`ManifestError::Mismatch`]. Hex case does not matter; anything but 64 hex digits is an
/// invalid manifest, found before any file is read.
pub fn check_manifest_hash(
    root: &Path,
    expected_hex: &str,
    cancel: &CancellationToken,
    progress: Option<&Progress>,
) -> Result<Blake3Manifest, ManifestError> {
    let expected = parse_hash(expected_hex)?;
    let manifest = blake3_manifest(root, cancel, progress)?;
    if manifest.hash != expected {
        return Err(ManifestError::Mismatch {
            root: root.to_path_buf(),
            expected,
            actual: manifest.hash,
            files: manifest.files,
            bytes: manifest.bytes,
        });
    }
    Ok(manifest)
}

/// `text` as a lowercase BLAKE3 hex digest, or why it is not one.
pub fn parse_hash(text: &str) -> Result<String, ManifestError> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        let shown: String = text.chars().take(80).collect();
        Err(ManifestError::InvalidManifest(format!(
            "manifest hash `{shown}` is not a BLAKE3 digest (64 hexadecimal digits)"
        )))
    }
}

fn summarize(lines: &[ManifestLine]) -> Blake3Manifest {
    let mut hasher = blake3::Hasher::new();
    write_manifest(lines, &mut |piece| {
        hasher.update(piece.as_bytes());
    });
    Blake3Manifest {
        hash: hasher.finalize().to_hex().to_string(),
        files: lines.len() as u64,
        bytes: lines.iter().map(|l| l.size).sum(),
    }
}

fn manifest_lines(
    root: &Path,
    cancel: &CancellationToken,
    progress: Option<&Progress>,
) -> Result<Vec<ManifestLine>, ManifestError> {
    check_root(root)?;
    let listed = list_regular_files(root, progress.is_some(), cancel)?;
    if listed.is_empty() {
        return Err(ManifestError::NoFiles(root.to_path_buf()));
    }
    if let Some(progress) = progress {
        progress.set_total(listed.iter().map(|f| f.size).sum());
    }
    let on_bytes = |n: u64| {
        if let Some(progress) = progress {
            progress.add(n);
        }
    };
    listed
        .into_par_iter()
        .map(|file| {
            check(cancel).map_err(|err| ManifestError::io(&file.full, err))?;
            let (size, hash) = hash_file(&file.full, &on_bytes, cancel)
                .map_err(|err| ManifestError::io(&file.full, err))?;
            Ok(ManifestLine {
                path: file.rel,
                size,
                hash,
            })
        })
        .collect()
}

/// A regular file found below the root.
struct Listed {
    /// The manifest path: relative, '/'-separated.
    rel: String,
    full: PathBuf,
    /// Its lstat size when asked for, else 0.
    size: u64,
}

/// `root` must be a directory (a link to one is followed: deployments may link the upload
/// directory elsewhere).
fn check_root(root: &Path) -> Result<(), ManifestError> {
    match fs::metadata(root) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(ManifestError::OriginNotDirectory(root.to_path_buf())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            Err(ManifestError::OriginMissing(root.to_path_buf()))
        }
        Err(err) => Err(ManifestError::io(root, err)),
    }
}

fn walk(root: &Path) -> walkdir::IntoIter {
    WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .into_iter()
}

fn walk_error(root: &Path, err: walkdir::Error) -> ManifestError {
    let path = err.path().unwrap_or(root).to_path_buf();
    let source = err
        .into_io_error()
        .unwrap_or_else(|| io::Error::other("the directory tree cannot be walked"));
    ManifestError::io(&path, source)
}

/// The regular files below `root` in manifest order. The listing reads directory entries only
/// (their types come with them), plus one lstat per file when `sizes` is asked for.
fn list_regular_files(
    root: &Path,
    sizes: bool,
    cancel: &CancellationToken,
) -> Result<Vec<Listed>, ManifestError> {
    let mut files = Vec::new();
    for entry in walk(root) {
        if cancel.is_cancelled() {
            return Err(ManifestError::Cancelled);
        }
        let entry = entry.map_err(|err| walk_error(root, err))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = manifest_path(root, entry.path())?;
        let size = if sizes {
            entry.metadata().map_err(|err| walk_error(root, err))?.len()
        } else {
            0
        };
        files.push(Listed {
            rel,
            full: entry.into_path(),
            size,
        });
    }
    files.sort_unstable_by(|a, b| utf16_cmp(&a.rel, &b.rel));
    Ok(files)
}

/// The manifest path of `path` below `root`. Backslashes become '/', as both the UI and the
/// original verifier rewrite them, so a name holding one is listed the way they list it.
fn manifest_path(root: &Path, path: &Path) -> Result<String, ManifestError> {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let rel = rel.to_str().ok_or_else(|| ManifestError::NonUtf8Name {
        path: path.to_path_buf(),
    })?;
    Ok(if rel.contains('\\') {
        rel.replace('\\', "/")
    } else {
        rel.to_owned()
    })
}

/// BLAKE3 of one file and the number of bytes hashed. A file starts on the thread's 1 MiB
/// buffer (open, read, read, close: no stat, which counts with tiny files); one that fills it
/// is hashed again whole by [`hash_large`].
fn hash_file(
    path: &Path,
    on_bytes: &(dyn Fn(u64) + Sync),
    cancel: &CancellationToken,
) -> io::Result<(u64, blake3::Hash)> {
    let mut file = File::open(path)?;
    let small = with_read_buffer(|buf| -> io::Result<Option<(u64, blake3::Hash)>> {
        let mut hasher = blake3::Hasher::new();
        let mut total = 0u64;
        loop {
            check(cancel)?;
            let n = read_retrying(&mut file, buf)?;
            if n == 0 {
                return Ok(Some((total, hasher.finalize())));
            }
            hasher.update(&buf[..n]);
            total += n as u64;
            if total >= SMALL_FILE {
                return Ok(None);
            }
        }
    })?;
    if let Some((size, hash)) = small {
        on_bytes(size);
        crate::metrics::hashed(size);
        return Ok((size, hash));
    }
    advise_sequential(&file);
    let size = file.metadata()?.len();
    let hash = hash_large(&file, size, on_bytes, cancel)?;
    // The tree was laid out for `size` bytes: a file that grew meanwhile has more.
    if file.metadata()?.len() != size {
        return Err(changed_while_read());
    }
    // Counted once: the first MiB, read twice, is one file's bytes.
    crate::metrics::hashed(size);
    Ok((size, hash))
}

fn changed_while_read() -> io::Error {
    io::Error::other("the file changed size while it was being read")
}

/// BLAKE3 of the first `len` bytes of a large file, as BLAKE3's tree splits it: each subtree of
/// at most 1 MiB is read at its own offset into the thread's buffer and hashed there, on
/// whichever pool thread takes it, and the chaining values are merged up the tree. Reading is
/// spread over the pool like hashing (on a page cache the copy costs as much as the hash), and
/// each piece is hashed while still in the CPU's cache. The result is `blake3::hash` of the
/// bytes, whatever the number of threads.
fn hash_large(
    file: &File,
    len: u64,
    on_bytes: &(dyn Fn(u64) + Sync),
    cancel: &CancellationToken,
) -> io::Result<blake3::Hash> {
    if len <= blake3::CHUNK_LEN as u64 {
        // One chunk has no tree to merge; `hash_file` never gets here, since `len` > 1 MiB.
        return hash_leaf(file, 0, len, on_bytes, cancel, |h| h.finalize());
    }
    let left = left_subtree_len(len);
    let (l, r) = rayon::join(
        || subtree(file, 0, left, on_bytes, cancel),
        || subtree(file, left, len - left, on_bytes, cancel),
    );
    Ok(merge_subtrees_root(&l?, &r?, Mode::Hash))
}

/// The chaining value of the subtree of `len` bytes at `offset` (laid out by the recursion
/// from the root, so it is a valid BLAKE3 subtree).
fn subtree(
    file: &File,
    offset: u64,
    len: u64,
    on_bytes: &(dyn Fn(u64) + Sync),
    cancel: &CancellationToken,
) -> io::Result<ChainingValue> {
    if len <= LEAF {
        return hash_leaf(file, offset, len, on_bytes, cancel, |h| {
            h.finalize_non_root()
        });
    }
    let left = left_subtree_len(len);
    let (l, r) = rayon::join(
        || subtree(file, offset, left, on_bytes, cancel),
        || subtree(file, offset + left, len - left, on_bytes, cancel),
    );
    Ok(merge_subtrees_non_root(&l?, &r?, Mode::Hash))
}

fn hash_leaf<T>(
    file: &File,
    offset: u64,
    len: u64,
    on_bytes: &(dyn Fn(u64) + Sync),
    cancel: &CancellationToken,
    finish: impl FnOnce(&blake3::Hasher) -> T,
) -> io::Result<T> {
    check(cancel)?;
    with_read_buffer(|buf| {
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(offset);
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..want], offset + done)
                .map_err(|err| match err.kind() {
                    io::ErrorKind::UnexpectedEof => changed_while_read(),
                    _ => err,
                })?;
            hasher.update(&buf[..want]);
            done += want as u64;
        }
        on_bytes(len);
        Ok(finish(&hasher))
    })
}

/// The `path-size-v1` size manifest of the regular files below `root`, as a sender computes it:
/// the files of [`blake3_manifest`] in the same order, with `file_count` and `total_size`.
pub fn size_manifest_of(root: &Path) -> Result<SizeManifest, ManifestError> {
    check_root(root)?;
    let listed = list_regular_files(root, true, &CancellationToken::new())?;
    if listed.is_empty() {
        return Err(ManifestError::NoFiles(root.to_path_buf()));
    }
    let files: Vec<SizeEntry> = listed
        .into_iter()
        .map(|f| SizeEntry {
            path: f.rel,
            size: f.size,
        })
        .collect();
    Ok(SizeManifest {
        mode: SIZE_MANIFEST_MODE.to_owned(),
        file_count: Some(files.len() as u64),
        total_size: Some(files.iter().map(|f| f.size).sum()),
        files,
    })
}

/// Checks the files below `root` against a size manifest, in the original's order: the root
/// exists; the mode is `path-size-v1` and there are files; each entry names a path inside the
/// root (no absolute path, no `..`, no link leading out: judged on the real path) that is a
/// regular file (not a link) of exactly its size; then `file_count`, when given, equals both
/// the number of entries and the number of regular files on disk (so files nobody listed are
/// caught); then `total_size`, when given, equals the sum of the sizes. The first rule broken
/// is the error.
pub fn check_size_manifest(root: &Path, manifest: &SizeManifest) -> Result<(), ManifestError> {
    check_root(root)?;
    if manifest.mode != SIZE_MANIFEST_MODE {
        return Err(ManifestError::InvalidManifest(format!(
            "unsupported size manifest mode `{}` (expected `{SIZE_MANIFEST_MODE}`)",
            manifest.mode
        )));
    }
    if manifest.files.is_empty() {
        return Err(ManifestError::InvalidManifest(
            "the size manifest lists no files".to_owned(),
        ));
    }
    let real_root = fs::canonicalize(root).map_err(|err| ManifestError::io(root, err))?;
    let mut total = 0u64;
    for (i, entry) in manifest.files.iter().enumerate() {
        if entry.path.is_empty() {
            return Err(ManifestError::InvalidManifest(format!(
                "`files[{i}]` has an empty path"
            )));
        }
        let size = listed_file_size(root, &real_root, &entry.path)?;
        if size != entry.size {
            return Err(ManifestError::SizeDiffers {
                path: entry.path.clone(),
                expected: entry.size,
                actual: size,
            });
        }
        total += size;
    }
    let entries = manifest.files.len() as u64;
    if let Some(file_count) = manifest.file_count {
        if file_count != entries {
            return Err(ManifestError::FileCountListed {
                file_count,
                entries,
            });
        }
        let on_disk = list_regular_files(root, false, &CancellationToken::new())?;
        let found = on_disk.len() as u64;
        if found != file_count {
            let listed: HashSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
            let first_unlisted = on_disk
                .into_iter()
                .map(|f| f.rel)
                .find(|rel| !listed.contains(rel.as_str()));
            return Err(ManifestError::FileCountOnDisk {
                root: root.to_path_buf(),
                expected: file_count,
                found,
                first_unlisted,
            });
        }
    }
    if let Some(expected) = manifest.total_size
        && expected != total
    {
        return Err(ManifestError::TotalSizeDiffers {
            expected,
            actual: total,
        });
    }
    Ok(())
}

/// The size of the regular file a size manifest entry names, after checking it lies inside the
/// root.
fn listed_file_size(root: &Path, real_root: &Path, rel: &str) -> Result<u64, ManifestError> {
    let escapes = || ManifestError::PathEscapes {
        root: root.to_path_buf(),
        path: rel.to_owned(),
    };
    // Lexically first: `..` and absolute paths never name an uploaded file, even when they
    // would land back inside.
    if Path::new(rel)
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(escapes());
    }
    let candidate = root.join(rel);
    // Then on the real path: a directory on the way may be a link leading out.
    match fs::canonicalize(&candidate) {
        Ok(real) if !real.starts_with(real_root) => return Err(escapes()),
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            // The nearest existing ancestor tells whether the missing file would be outside.
            let outside = candidate
                .ancestors()
                .skip(1)
                .find_map(|dir| fs::canonicalize(dir).ok())
                .is_some_and(|real| !real.starts_with(real_root));
            return Err(if outside {
                escapes()
            } else {
                ManifestError::MissingFile {
                    path: rel.to_owned(),
                }
            });
        }
        Err(err) => return Err(ManifestError::io(&candidate, err)),
    }
    let meta =
        fs::symlink_metadata(&candidate).map_err(|err| ManifestError::io(&candidate, err))?;
    let file_type = meta.file_type();
    if file_type.is_file() {
        return Ok(meta.len());
    }
    let kind = if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_dir() {
        "a directory"
    } else {
        "a special file"
    };
    Err(ManifestError::NotRegularFile {
        path: rel.to_owned(),
        kind,
    })
}

/// The existence check of uploads without a manifest: `root` is a directory holding at least
/// one regular file somewhere below it. Parts that cannot be read are passed over while a file
/// may still be found; if none is, the first such error is reported.
pub fn check_exists(root: &Path) -> Result<(), ManifestError> {
    check_root(root)?;
    let mut first_error = None;
    for entry in walk(root) {
        match entry {
            Ok(entry) if entry.file_type().is_file() => return Ok(()),
            Ok(_) => {}
            Err(err) => {
                first_error.get_or_insert_with(|| walk_error(root, err));
            }
        }
    }
    Err(first_error.unwrap_or_else(|| ManifestError::NoFiles(root.to_path_buf())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::Pool;
    use std::os::unix::fs::symlink;

    fn write(path: &Path, data: &[u8]) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(path, data).expect("write");
    }

    fn manifest(root: &Path) -> Result<Blake3Manifest, ManifestError> {
        blake3_manifest(root, &CancellationToken::new(), None)
    }

    fn text(root: &Path) -> String {
        blake3_manifest_text(root, &CancellationToken::new()).expect("manifest text")
    }

    fn hex(data: &[u8]) -> String {
        blake3::hash(data).to_hex().to_string()
    }

    #[test]
    fn utf16_order_is_javascripts() {
        // '.' (0x2E) sorts before '/' (0x2F) as strings, whatever the components say.
        assert_eq!(utf16_cmp("a.txt", "a/b"), Ordering::Less);
        assert_eq!(utf16_cmp("a b", "a/b"), Ordering::Less);
        assert_eq!(utf16_cmp("a-b", "a/b"), Ordering::Less);
        // U+1F600 is 0xD83D 0xDE00 in UTF-16, below U+E000 and U+FFFD, above in bytes.
        assert_eq!(utf16_cmp("\u{1F600}", "\u{E000}"), Ordering::Less);
        assert_eq!("\u{1F600}".cmp("\u{E000}"), Ordering::Greater);
        assert_eq!(utf16_cmp("x\u{FFFD}", "x\u{10000}"), Ordering::Greater);
        // Below the surrogates, code points and code units agree.
        assert_eq!(utf16_cmp("\u{D7FF}", "\u{10000}"), Ordering::Less);
        assert_eq!(utf16_cmp("é", "z"), Ordering::Greater);
        assert_eq!(utf16_cmp("ab", "abc"), Ordering::Less);
        assert_eq!(utf16_cmp("abc", "abc"), Ordering::Equal);
        assert_eq!(utf16_cmp("", "a"), Ordering::Less);
        // Differing in a later byte of a shared lead byte: é (C3 A9) vs ó (C3 B3).
        assert_eq!(utf16_cmp("é", "ó"), Ordering::Less);
        let mut names = vec!["a/b", "\u{E000}", "a.txt", "\u{1F600}", "A", "a", "~"];
        names.sort_by(|a, b| utf16_cmp(a, b));
        assert_eq!(
            names,
            ["A", "a", "a.txt", "a/b", "~", "\u{1F600}", "\u{E000}"]
        );
    }

    #[test]
    fn utf16_cmp_agrees_with_encoding_everywhere() {
        let samples = [
            "",
            "a",
            "a/",
            "a/b",
            "a.b",
            "\u{7F}",
            "\u{80}",
            "\u{7FF}",
            "\u{800}",
            "\u{D7FF}",
            "\u{E000}",
            "\u{FFFF}",
            "\u{10000}",
            "\u{10FFFF}",
            "a\u{E000}",
            "a\u{10000}b",
        ];
        for a in samples {
            for b in samples {
                assert_eq!(
                    utf16_cmp(a, b),
                    a.encode_utf16().cmp(b.encode_utf16()),
                    "{a:?} vs {b:?}"
                );
            }
        }
    }

    #[test]
    fn manifest_text_has_the_exact_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        write(&root.join("a.txt"), b"hello");
        write(&root.join("a/b"), b"");
        write(&root.join("sub dir/é.bin"), b"xyz");
        let expected = format!(
            "blake3-manifest-v1\na.txt\t5\t{}\na/b\t0\t{}\nsub dir/é.bin\t3\t{}",
            hex(b"hello"),
            hex(b""),
            hex(b"xyz")
        );
        assert_eq!(text(root), expected);
        let summary = manifest(root).expect("manifest");
        assert_eq!(summary.hash, hex(expected.as_bytes()));
        assert_eq!((summary.files, summary.bytes), (3, 8));
        assert!(!summary.hash.chars().any(|c| c.is_ascii_uppercase()));
    }

    #[test]
    fn empty_files_hash_the_empty_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(&dir.path().join("empty"), b"");
        assert_eq!(
            text(dir.path()),
            format!("blake3-manifest-v1\nempty\t0\t{}", hex(b""))
        );
        assert_eq!(
            hex(b""),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn links_are_not_listed_nor_followed_and_odd_kinds_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        write(&outside.path().join("secret"), b"s");
        let root = dir.path();
        write(&root.join("real"), b"r");
        symlink("real", root.join("link")).expect("symlink");
        symlink(outside.path(), root.join("linked_dir")).expect("symlink");
        symlink("missing", root.join("broken")).expect("symlink");
        let status = std::process::Command::new("mkfifo")
            .arg(root.join("fifo"))
            .status()
            .expect("mkfifo");
        assert!(status.success());
        assert_eq!(
            text(root),
            format!("blake3-manifest-v1\nreal\t1\t{}", hex(b"r"))
        );
    }

    #[test]
    fn large_files_hash_like_one_update_on_any_pool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = crate::compute::md5::tests::pseudo_random(33 * LEAF as usize + 12_345, 5);
        // Around the hand-over from the small path to the large one, and a multi-chunk file.
        let sizes = [
            100,
            SMALL_FILE as usize - 1,
            SMALL_FILE as usize,
            SMALL_FILE as usize + 1,
            2 * LEAF as usize,
            2 * LEAF as usize + 1,
            5 * LEAF as usize + 1024,
            data.len(),
        ];
        let mut expected = MANIFEST_HEADER.to_owned();
        for (i, size) in sizes.iter().enumerate() {
            write(&dir.path().join(format!("f{i}")), &data[..*size]);
            expected.push_str(&format!("\nf{i}\t{size}\t{}", hex(&data[..*size])));
        }
        let total: u64 = sizes.iter().map(|s| *s as u64).sum();
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads).expect("pool");
            let progress = Progress::new();
            let summary = pool
                .install(|| blake3_manifest(dir.path(), &CancellationToken::new(), Some(&progress)))
                .expect("manifest");
            assert_eq!(summary.hash, hex(expected.as_bytes()), "{threads} threads");
            let snap = progress.snapshot();
            assert_eq!(snap.done, total);
            assert_eq!(snap.total, Some(total));
        }
    }

    #[test]
    fn manifest_failures_name_their_object() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        let err = manifest(&missing).unwrap_err();
        assert!(matches!(err, ManifestError::OriginMissing(_)), "{err}");
        assert!(err.to_string().contains("missing` does not exist"), "{err}");

        fs::create_dir_all(dir.path().join("only/dirs")).expect("mkdir");
        let err = manifest(&dir.path().join("only")).unwrap_err();
        assert!(matches!(err, ManifestError::NoFiles(_)), "{err}");
        assert_eq!(err.type_name(), "Exception");
        assert!(
            err.failure_reason()
                .starts_with("Exception: No files found at `")
        );

        write(&dir.path().join("file"), b"x");
        let err = manifest(&dir.path().join("file")).unwrap_err();
        assert!(matches!(err, ManifestError::OriginNotDirectory(_)), "{err}");

        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = blake3_manifest(dir.path(), &cancel, None).unwrap_err();
        assert!(matches!(err, ManifestError::Cancelled), "{err}");
    }

    #[test]
    fn non_utf8_names_fail_naming_the_path() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().expect("tempdir");
        write(&dir.path().join(OsStr::from_bytes(b"bad\xffname")), b"x");
        let err = manifest(dir.path()).unwrap_err();
        assert!(matches!(err, ManifestError::NonUtf8Name { .. }), "{err}");
        assert!(err.to_string().contains("bad\u{FFFD}name"), "{err}");
        assert_eq!(err.type_name(), "UnicodeEncodeError");
    }

    #[test]
    fn unreadable_files_are_io_errors_naming_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("locked");
        write(&path, b"x");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o000)).expect("chmod");
        if File::open(&path).is_ok() {
            return; // Running as root: permissions do not apply.
        }
        let err = manifest(dir.path()).unwrap_err();
        assert!(matches!(err, ManifestError::Io { .. }), "{err}");
        assert!(err.to_string().contains("locked"), "{err}");
        assert_eq!(err.type_name(), "PermissionError");
    }

    #[test]
    fn manifest_hash_check_matches_mismatches_and_rejects_bad_hex() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(&dir.path().join("f"), b"content");
        let expected = manifest(dir.path()).expect("manifest").hash;
        let cancel = CancellationToken::new();
        let ok = check_manifest_hash(dir.path(), &expected.to_uppercase(), &cancel, None)
            .expect("same tree");
        assert_eq!(ok.hash, expected);
        write(&dir.path().join("f"), b"Content");
        let err = check_manifest_hash(dir.path(), &expected, &cancel, None).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("Manifest hash mismatch"), "{text}");
        assert!(text.contains(&expected), "{text}");
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(65)] {
            let err = check_manifest_hash(dir.path(), bad, &cancel, None).unwrap_err();
            assert!(err.is_invalid_manifest(), "{bad}: {err}");
        }
    }

    fn sized(files: &[(&str, u64)]) -> SizeManifest {
        SizeManifest {
            mode: SIZE_MANIFEST_MODE.to_owned(),
            files: files
                .iter()
                .map(|(path, size)| SizeEntry {
                    path: (*path).to_owned(),
                    size: *size,
                })
                .collect(),
            file_count: Some(files.len() as u64),
            total_size: Some(files.iter().map(|(_, s)| s).sum()),
        }
    }

    fn size_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        write(&dir.path().join("a.txt"), b"12345");
        write(&dir.path().join("a/b"), b"");
        write(&dir.path().join("d/e f"), b"xy");
        dir
    }

    #[test]
    fn size_manifest_of_a_tree_checks_against_it() {
        let dir = size_tree();
        let of = size_manifest_of(dir.path()).expect("size manifest");
        assert_eq!(of, sized(&[("a.txt", 5), ("a/b", 0), ("d/e f", 2)]));
        let json = serde_json::to_value(&of).expect("json");
        assert_eq!(json["mode"], "path-size-v1");
        assert_eq!(
            json["files"][0],
            serde_json::json!({"path": "a.txt", "size": 5})
        );
        assert_eq!(json["file_count"], 3);
        assert_eq!(json["total_size"], 7);
        check_size_manifest(dir.path(), &of).expect("holds");
        // Without the optional totals it holds too.
        let mut bare = of.clone();
        bare.file_count = None;
        bare.total_size = None;
        check_size_manifest(dir.path(), &bare).expect("holds");
    }

    fn size_error(root: &Path, manifest: &SizeManifest) -> ManifestError {
        check_size_manifest(root, manifest).expect_err("the check fails")
    }

    #[test]
    fn size_manifest_rules_each_have_their_error() {
        let dir = size_tree();
        let root = dir.path();
        let good = sized(&[("a.txt", 5), ("a/b", 0), ("d/e f", 2)]);

        let err = size_error(&root.join("nope"), &good);
        assert!(matches!(err, ManifestError::OriginMissing(_)), "{err}");

        let mut m = good.clone();
        m.mode = "path-size-v2".into();
        let err = size_error(root, &m);
        assert!(
            err.is_invalid_manifest() && err.to_string().contains("path-size-v2"),
            "{err}"
        );

        let err = size_error(root, &sized(&[]));
        assert!(err.is_invalid_manifest(), "{err}");

        let err = size_error(root, &sized(&[("", 1)]));
        assert!(err.is_invalid_manifest(), "{err}");

        for escape in ["../x", "/etc/passwd", "a/../a.txt", "a/../../x"] {
            let err = size_error(root, &sized(&[(escape, 1)]));
            assert!(
                matches!(err, ManifestError::PathEscapes { .. })
                    && err.to_string().contains(escape),
                "{escape}: {err}"
            );
        }

        let err = size_error(root, &sized(&[("a.txt", 5), ("gone.txt", 1)]));
        assert!(
            matches!(&err, ManifestError::MissingFile { path } if path == "gone.txt"),
            "{err}"
        );

        let err = size_error(root, &sized(&[("a", 0)]));
        assert!(
            matches!(
                err,
                ManifestError::NotRegularFile {
                    kind: "a directory",
                    ..
                }
            ),
            "{err}"
        );

        let err = size_error(root, &sized(&[("a.txt", 6)]));
        assert!(
            matches!(
                err,
                ManifestError::SizeDiffers {
                    expected: 6,
                    actual: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("`a.txt`"), "{err}");

        let mut m = good.clone();
        m.file_count = Some(4);
        let err = size_error(root, &m);
        assert!(
            matches!(
                err,
                ManifestError::FileCountListed {
                    file_count: 4,
                    entries: 3
                }
            ),
            "{err}"
        );

        // Two files on disk nobody listed: the count catches them and names the first.
        write(&root.join("extra2"), b"");
        write(&root.join("extra1"), b"");
        let err = size_error(root, &good);
        assert!(
            matches!(&err, ManifestError::FileCountOnDisk { expected: 3, found: 5, first_unlisted: Some(p), .. } if p == "extra1"),
            "{err}"
        );
        assert!(err.to_string().contains("2 extra"), "{err}");
        // Without file_count nothing counts the disk.
        let mut m = good.clone();
        m.file_count = None;
        check_size_manifest(root, &m).expect("extra files are not looked for");
        fs::remove_file(root.join("extra1")).expect("rm");
        fs::remove_file(root.join("extra2")).expect("rm");

        // A file listed twice: entries and file_count agree, the disk has one fewer.
        let twice = sized(&[("a.txt", 5), ("a.txt", 5), ("a/b", 0), ("d/e f", 2)]);
        let err = size_error(root, &twice);
        assert!(err.to_string().contains("more than once"), "{err}");

        let mut m = good.clone();
        m.total_size = Some(8);
        let err = size_error(root, &m);
        assert!(
            matches!(
                err,
                ManifestError::TotalSizeDiffers {
                    expected: 8,
                    actual: 7
                }
            ),
            "{err}"
        );
        assert_eq!(err.type_name(), "Exception");
    }

    #[test]
    fn size_manifest_links_inside_pass_links_leading_out_escape() {
        let dir = size_tree();
        let outside = tempfile::tempdir().expect("tempdir");
        write(&outside.path().join("x"), b"abc");
        let root = dir.path();
        symlink(outside.path(), root.join("out")).expect("symlink");
        symlink("d", root.join("in")).expect("symlink");
        symlink("a.txt", root.join("file_link")).expect("symlink");
        let err = size_error(root, &sized(&[("out/x", 3)]));
        assert!(matches!(err, ManifestError::PathEscapes { .. }), "{err}");
        let err = size_error(root, &sized(&[("out/missing", 3)]));
        assert!(matches!(err, ManifestError::PathEscapes { .. }), "{err}");
        // A directory link that stays inside resolves to a listed file's real place.
        let mut m = sized(&[("in/e f", 2)]);
        m.file_count = None;
        check_size_manifest(root, &m).expect("inside");
        let err = size_error(root, &sized(&[("file_link", 5)]));
        assert!(
            matches!(
                err,
                ManifestError::NotRegularFile {
                    kind: "a symbolic link",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn size_manifests_parse_strictly_and_say_where() {
        let m = SizeManifest::parse(
            r#"{"mode": "path-size-v1", "files": [{"path": "a", "size": 1}], "extra": true}"#,
        )
        .expect("parse");
        assert_eq!(m.files[0].size, 1);
        assert_eq!((m.file_count, m.total_size), (None, None));
        for (text, says) in [
            (
                r#"{"mode": "path-size-v1", "files": [{"path": "a"}]}"#,
                "files[0]",
            ),
            (
                r#"{"mode": "path-size-v1", "files": [{"path": "a", "size": -1}]}"#,
                "files[0].size",
            ),
            (
                r#"{"mode": "path-size-v1", "files": [{"path": "a", "size": "1"}]}"#,
                "files[0].size",
            ),
            (r#"{"mode": "path-size-v1", "files": [], }"#, "line 1"),
            (r#"{"mode": 1}"#, "mode"),
        ] {
            let err = SizeManifest::parse(text).unwrap_err();
            assert!(err.is_invalid_manifest(), "{text}: {err}");
            assert!(err.to_string().contains(says), "{text}: {err}");
        }
        // A missing mode or file list reads as empty: the check then says what is wrong.
        let m = SizeManifest::from_value(&serde_json::json!({})).expect("empty object");
        assert!(m.mode.is_empty() && m.files.is_empty());
    }

    #[test]
    fn existence_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        assert!(matches!(
            check_exists(&root.join("nope")).unwrap_err(),
            ManifestError::OriginMissing(_)
        ));
        fs::create_dir_all(root.join("a/b")).expect("mkdir");
        symlink("a", root.join("link")).expect("symlink");
        let err = check_exists(root).unwrap_err();
        assert!(matches!(err, ManifestError::NoFiles(_)), "{err}");
        write(&root.join("a/b/deep"), b"");
        check_exists(root).expect("a file deep down counts");
        assert!(matches!(
            check_exists(&root.join("a/b/deep")).unwrap_err(),
            ManifestError::OriginNotDirectory(_)
        ));
    }
}

//! The local-directory archive (the original's Docker mode): archive paths are absolute
//! paths on this host.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context;
use async_trait::async_trait;

use super::{Archive, ArchiveError, ArchivedFile};
use crate::cancel::CancellationToken;
use crate::compute::md5::{Md5Digest, copy_file_with_md5};
use crate::compute::{Pool, attempt_sibling, remove_leftover_partials, sync_parent};
use crate::progress::Progress;

pub struct LocalArchive {
    pool: Pool,
}

impl LocalArchive {
    pub fn new(pool: Pool) -> LocalArchive {
        LocalArchive { pool }
    }
}

/// Copies `src` to `dst` through a hidden sibling unique to this attempt, hashing while
/// copying, then fsyncs and renames so that `dst` is either absent, the old file, or the
/// complete new one; returns the MD5 and the bytes copied. Leftovers of dead attempts are
/// removed first.
fn copy_atomically(
    src: &Path,
    dst: &Path,
    progress: &Progress,
    cancel: &CancellationToken,
) -> anyhow::Result<(Md5Digest, u64)> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create `{}`", parent.display()))?;
    }
    remove_leftover_partials(dst)
        .with_context(|| format!("cannot remove leftovers next to `{}`", dst.display()))?;
    let partial = attempt_sibling(dst);
    let result = (|| {
        let (md5, bytes) = copy_file_with_md5(src, &partial, &|n| progress.add(n), cancel)
            .with_context(|| {
                format!("cannot copy `{}` to `{}`", src.display(), partial.display())
            })?;
        std::fs::File::open(&partial)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot sync `{}`", partial.display()))?;
        std::fs::rename(&partial, dst).with_context(|| {
            format!(
                "cannot rename `{}` to `{}`",
                partial.display(),
                dst.display()
            )
        })?;
        sync_parent(dst)
            .with_context(|| format!("cannot sync the directory of `{}`", dst.display()))?;
        Ok((md5, bytes))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// `Cancelled` for a cancelled job, `Transient` for anything else.
fn transient_or_cancelled(err: anyhow::Error) -> ArchiveError {
    if crate::cancel::in_chain(&err) {
        ArchiveError::Cancelled
    } else {
        ArchiveError::Transient(err)
    }
}

#[async_trait]
impl Archive for LocalArchive {
    fn describe(&self) -> &'static str {
        "local directory"
    }

    fn reads_to_checksum(&self) -> bool {
        // `stat` hashes the file.
        true
    }

    async fn put(
        &self,
        local: &Path,
        archive_path: &str,
        md5: Md5Digest,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<(), ArchiveError> {
        let (local, dst, progress) = (
            local.to_path_buf(),
            PathBuf::from(archive_path),
            progress.clone(),
        );
        self.pool
            .run_job(cancel, move |cancel| {
                let size = std::fs::metadata(&local).map(|m| m.len()).ok();
                progress.start("archive copy", "bytes", size);
                // On the same file system a rename stores the bundle without reading it again
                // (nor transferring it); it was hashed and synced when it was written.
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("cannot create `{}`", parent.display()))?;
                }
                match std::fs::rename(&local, &dst) {
                    Ok(()) => {
                        sync_parent(&dst).with_context(|| {
                            format!("cannot sync the directory of `{}`", dst.display())
                        })?;
                        progress.set_done(size.unwrap_or(0));
                        return Ok(());
                    }
                    Err(err) if err.kind() == io::ErrorKind::CrossesDevices => {}
                    Err(err) => {
                        return Err(anyhow::Error::new(err)
                            .context(format!("cannot move `{}` to `{}`", local.display(), dst.display())));
                    }
                }
                let (copied, bytes) = copy_atomically(&local, &dst, &progress, cancel)?;
                // The source is hashed as it is read: a difference means the bundle changed
                // or was damaged after it was written, and must not be archived.
                if copied != md5 {
                    let _ = std::fs::remove_file(&dst);
                    anyhow::bail!(
                        "`{}` read back with MD5 {copied}, but the bundle was written with MD5 {md5}",
                        local.display()
                    );
                }
                crate::metrics::transferred(crate::metrics::Direction::Archive, bytes);
                Ok(())
            })
            .await
            .map_err(|_| ArchiveError::Cancelled)?
            .map_err(transient_or_cancelled)
    }

    async fn get(
        &self,
        archive_path: &str,
        local: &Path,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<Md5Digest, ArchiveError> {
        let (src, dst, progress) = (
            PathBuf::from(archive_path),
            local.to_path_buf(),
            progress.clone(),
        );
        let archive_path = archive_path.to_owned();
        self.pool
            .run_job(cancel, move |cancel| {
                let size = match std::fs::metadata(&src) {
                    Ok(meta) => meta.len(),
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {
                        return Err(ArchiveError::NotFound(archive_path));
                    }
                    Err(err) => {
                        return Err(ArchiveError::Transient(
                            anyhow::Error::new(err)
                                .context(format!("cannot read `{archive_path}`")),
                        ));
                    }
                };
                progress.start("archive fetch", "bytes", Some(size));
                let (md5, bytes) = copy_atomically(&src, &dst, &progress, cancel)
                    .map_err(transient_or_cancelled)?;
                crate::metrics::transferred(crate::metrics::Direction::Stage, bytes);
                Ok(md5)
            })
            .await
            .map_err(|_| ArchiveError::Cancelled)?
    }

    async fn delete(&self, archive_path: &str) -> Result<bool, ArchiveError> {
        let path = PathBuf::from(archive_path);
        let removed = crate::compute::blocking(move || std::fs::remove_file(&path)).await;
        match removed {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(ArchiveError::Transient(
                anyhow::Error::new(err).context(format!("cannot remove `{archive_path}`")),
            )),
        }
    }

    /// Computes the MD5 by reading the file: a directory keeps no checksums.
    async fn stat(
        &self,
        archive_path: &str,
        cancel: &CancellationToken,
    ) -> Result<ArchivedFile, ArchiveError> {
        let path = PathBuf::from(archive_path);
        let shown = archive_path.to_owned();
        self.pool
            .run_job(cancel, move |cancel| {
                match std::fs::metadata(&path) {
                    Ok(meta) if meta.is_file() => {}
                    Ok(_) => {
                        return Err(ArchiveError::Invalid(anyhow::format_err!(
                            "`{shown}` is not a file"
                        )));
                    }
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {
                        return Err(ArchiveError::NotFound(shown));
                    }
                    Err(err) => {
                        return Err(ArchiveError::Transient(
                            anyhow::Error::new(err).context(format!("cannot read `{shown}`")),
                        ));
                    }
                }
                let (md5, size) = crate::compute::md5::md5_file(&path, cancel).map_err(|err| {
                    transient_or_cancelled(
                        anyhow::Error::new(err).context(format!("cannot read `{shown}`")),
                    )
                })?;
                Ok(ArchivedFile {
                    size,
                    md5: Some(md5),
                })
            })
            .await
            .map_err(|_| ArchiveError::Cancelled)?
    }
}

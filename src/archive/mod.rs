//! The archive seam: where bundles are kept for the long term (a directory, or HPSS tape).

pub mod hsi;
pub mod local;

use std::path::Path;

use async_trait::async_trait;

use crate::cancel::CancellationToken;
use crate::compute::md5::Md5Digest;
use crate::progress::Progress;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("`{0}` is not in the archive")]
    NotFound(String),
    /// The archive or the transfer failed; trying again later may work.
    #[error(transparent)]
    Transient(anyhow::Error),
    /// The request cannot be carried out by this archive however often it is tried (a path
    /// the archive's command language cannot express).
    #[error(transparent)]
    Invalid(anyhow::Error),
    /// The transfer was stopped by its cancellation token; nothing of it is left in place.
    #[error("the transfer was cancelled")]
    Cancelled,
}

#[async_trait]
pub trait Archive: Send + Sync {
    /// A short description for logs (`local directory`, `HPSS via hsi`).
    fn describe(&self) -> &'static str;

    /// Whether `stat` reads the whole file to give its MD5 (a local directory), rather than
    /// answering with a checksum the archive holds (HPSS): what a fixity check costs.
    fn reads_to_checksum(&self) -> bool;

    /// Stores the local file `local`, whose MD5 is `md5`, at `archive_path`, atomically: a
    /// reader never sees a partial file there. The backend may move `local` instead of copying
    /// it; callers remove `local` afterwards if it is still there. Byte progress goes to
    /// `progress`. A cancelled put stops within moments and leaves nothing at `archive_path`.
    async fn put(
        &self,
        local: &Path,
        archive_path: &str,
        md5: Md5Digest,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<(), ArchiveError>;

    /// Fetches `archive_path` into `local` (replacing it atomically) and returns the MD5 of the
    /// fetched bytes, computed during the transfer where the backend allows. A cancelled get
    /// stops within moments and leaves `local` as it was.
    async fn get(
        &self,
        archive_path: &str,
        local: &Path,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<Md5Digest, ArchiveError>;

    /// `get` without the archive's own check of the fetched bytes against a checksum it holds
    /// (`hsi get -c on`): for fixity checks, which compare the bytes with the dataset's record
    /// themselves and must see bytes that changed on the medium as a difference, not as a
    /// failed transfer.
    async fn recall(
        &self,
        archive_path: &str,
        local: &Path,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<Md5Digest, ArchiveError> {
        self.get(archive_path, local, progress, cancel).await
    }

    /// Whether the archive answers with the configured credentials (`workers doctor`): what it
    /// said, or `None` for an archive with nothing to ask (a local directory, checked with the
    /// other directories).
    async fn check(&self, cancel: &CancellationToken) -> Result<Option<String>, ArchiveError> {
        let _ = cancel;
        Ok(None)
    }

    /// Removes `archive_path`; returns whether there was something to remove.
    async fn delete(&self, archive_path: &str) -> Result<bool, ArchiveError>;

    /// The size and MD5 of what the archive holds at `archive_path` (`populate_bundles`), the
    /// MD5 `None` when the archive keeps none and cannot compute it (a file stored in HPSS
    /// without a checksum). `NotFound` when there is nothing there.
    async fn stat(
        &self,
        archive_path: &str,
        cancel: &CancellationToken,
    ) -> Result<ArchivedFile, ArchiveError>;
}

/// What the archive holds at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchivedFile {
    pub size: u64,
    pub md5: Option<Md5Digest>,
}

//! Domain types shared by every layer: dataset types, names, states and file records.
//!
//! These are not wire formats: the registry backends convert them to and from their own rows
//! and bodies.

use std::fmt;
use std::str::FromStr;

use crate::compute::md5::Md5Digest;

/// The two kinds of dataset Bioloop knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DatasetType {
    RawData,
    DataProduct,
}

impl DatasetType {
    pub const ALL: [DatasetType; 2] = [DatasetType::RawData, DatasetType::DataProduct];

    pub fn as_str(self) -> &'static str {
        match self {
            DatasetType::RawData => "RAW_DATA",
            DatasetType::DataProduct => "DATA_PRODUCT",
        }
    }
}

impl fmt::Display for DatasetType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatasetType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "RAW_DATA" => Ok(DatasetType::RawData),
            "DATA_PRODUCT" => Ok(DatasetType::DataProduct),
            other => Err(format!(
                "unknown dataset type `{other}` (expected RAW_DATA or DATA_PRODUCT)"
            )),
        }
    }
}

/// The longest name whose derived file names (`{name}.{type}.tar`) still fit in one path
/// component (255 bytes on every file system the workers run on).
pub const MAX_NAME_BYTES: usize = 255 - ".DATA_PRODUCT.tar".len();

/// A dataset name as the registry stores it: every character outside `[A-Za-z0-9_]` replaced
/// by `-`, runs of `-` collapsed (spec E.3), and short enough for the bundle file names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DatasetName(String);

impl DatasetName {
    /// Normalizes `raw` the way the Bioloop API does and checks the result can name files.
    pub fn normalize(raw: &str) -> Result<DatasetName, NameError> {
        let normalized = normalize_name(raw);
        if normalized.is_empty() {
            return Err(NameError::Empty);
        }
        if normalized.len() > MAX_NAME_BYTES {
            return Err(NameError::TooLong {
                bytes: normalized.len(),
            });
        }
        Ok(DatasetName(normalized))
    }

    /// Wraps a name read back from a registry, which stored it normalized already.
    pub fn from_stored(name: String) -> DatasetName {
        DatasetName(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error(
        "the name is {bytes} bytes long after normalization; at most {MAX_NAME_BYTES} bytes fit in the bundle file names"
    )]
    TooLong { bytes: usize },
}

/// Every character outside `[A-Za-z0-9_]` becomes `-`; runs of `-` collapse into one.
pub fn normalize_name(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '-'
        };
        if c == '-' && out.ends_with('-') {
            continue;
        }
        out.push(c);
    }
    out
}

/// The lifecycle states the workers write (spec A.2), in the order a dataset reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetState {
    Registered,
    Ready,
    Archived,
    Fetched,
    Staged,
    Purged,
    Deleted,
    /// A QC report was made and uploaded (`generate_qc`).
    Qc,
    /// Downloaded from Illumina BaseSpace (`download_illumina_dataset`).
    Downloaded,
    /// A fixity check found a copy that differs from the record (`workers verify`, the
    /// `fixity` job): an alert the UI shows as the dataset's state until a later state.
    FixityFailed,
}

impl DatasetState {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetState::Registered => "REGISTERED",
            DatasetState::Ready => "READY",
            DatasetState::Archived => "ARCHIVED",
            DatasetState::Fetched => "FETCHED",
            DatasetState::Staged => "STAGED",
            DatasetState::Purged => "PURGED",
            DatasetState::Deleted => "DELETED",
            DatasetState::Qc => "QC",
            DatasetState::Downloaded => "DOWNLOADED",
            DatasetState::FixityFailed => "FIXITY_FAILED",
        }
    }
}

impl fmt::Display for DatasetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A copy of a dataset that a fixity check can re-read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyKind {
    /// The directory the dataset was registered from.
    Source,
    /// The tree stage extracted for download.
    Staged,
    /// The tar bundle in the archive.
    Archive,
}

impl CopyKind {
    pub const ALL: [CopyKind; 3] = [CopyKind::Source, CopyKind::Staged, CopyKind::Archive];

    pub fn as_str(self) -> &'static str {
        match self {
            CopyKind::Source => "source",
            CopyKind::Staged => "staged",
            CopyKind::Archive => "archive",
        }
    }

    pub fn from_name(name: &str) -> Option<CopyKind> {
        CopyKind::ALL.into_iter().find(|copy| copy.as_str() == name)
    }
}

impl fmt::Display for CopyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a dataset came to be registered (Prisma enum `create_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CreateMethod {
    Scan,
    OnDemand,
    Upload,
    Import,
}

impl CreateMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CreateMethod::Scan => "SCAN",
            CreateMethod::OnDemand => "ON_DEMAND",
            CreateMethod::Upload => "UPLOAD",
            CreateMethod::Import => "IMPORT",
        }
    }
}

impl FromStr for CreateMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "SCAN" => Ok(CreateMethod::Scan),
            "ON_DEMAND" => Ok(CreateMethod::OnDemand),
            "UPLOAD" => Ok(CreateMethod::Upload),
            "IMPORT" => Ok(CreateMethod::Import),
            other => Err(format!("unknown create method `{other}`")),
        }
    }
}

/// The kind of a file row (spec B.2). Directories are never sent as rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    File,
    SymbolicLink,
}

impl FileType {
    pub fn as_str(self) -> &'static str {
        match self {
            FileType::File => "file",
            FileType::SymbolicLink => "symbolic link",
        }
    }
}

impl FromStr for FileType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "file" => Ok(FileType::File),
            "symbolic link" => Ok(FileType::SymbolicLink),
            other => Err(format!("unknown file type `{other}`")),
        }
    }
}

/// One file row: a path relative to the dataset root, its size and (for regular files) MD5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub path: String,
    pub md5: Option<Md5Digest>,
    /// Bytes (the link's own length for a symbolic link). `None` when read back from a registry
    /// that does not return sizes: the Bioloop API lists a dataset's files as path and MD5 only
    /// (spec E.2), so readers must not treat a missing size as zero.
    pub size: Option<u64>,
    pub file_type: FileType,
}

/// What an inspection found, kept with the dataset (`metadata.inspection`): later steps compare
/// bundles, staged copies and file rows against the inspection itself, never only against file
/// rows, which a registry may not show yet or may have lost (spec E.4). Fingerprints are the
/// order-independent sums of `compute::walk` over every row, written as 16 hex digits (JSON
/// numbers could not carry 64 bits through the API's JavaScript).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InspectionRecord {
    /// File rows: regular files and links to files.
    pub files: u64,
    pub directories: u64,
    /// Bytes of the rows.
    pub bytes: u64,
    /// `fingerprint_add` over (path, size).
    pub sizes_fingerprint: String,
    /// `checksum_fingerprint_add` over (path, MD5).
    pub checksums_fingerprint: String,
    /// `digest_fingerprint_add` over (path, BLAKE3 of the content): what archive compares a
    /// bundle's members with (a second MD5 of every byte would cost too much there).
    pub contents_fingerprint: String,
    /// The task that made the inspection.
    pub task_id: String,
}

impl InspectionRecord {
    pub const METADATA_KEY: &'static str = "inspection";

    pub fn fingerprint_text(value: u64) -> String {
        format!("{value:016x}")
    }

    /// The record in a dataset's metadata, if a complete inspection left one.
    pub fn from_metadata(metadata: &serde_json::Value) -> Option<InspectionRecord> {
        serde_json::from_value(metadata.get(Self::METADATA_KEY)?.clone()).ok()
    }

    pub fn sizes(&self) -> Option<u64> {
        u64::from_str_radix(&self.sizes_fingerprint, 16).ok()
    }

    pub fn checksums(&self) -> Option<u64> {
        u64::from_str_radix(&self.checksums_fingerprint, 16).ok()
    }

    pub fn contents(&self) -> Option<u64> {
        u64::from_str_radix(&self.contents_fingerprint, 16).ok()
    }
}

/// The archived tar bundle of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub name: String,
    pub size: u64,
    pub md5: Md5Digest,
}

/// The dataset type part of the bundle and stage names, as the original formats it.
impl DatasetName {
    /// `{name}.tar`: the bundle name in the archive (spec D.1).
    pub fn bundle_file_name(&self) -> String {
        format!("{}.tar", self.0)
    }

    /// `{name}.{type}.tar`: the staged bundle and its download link (spec D.1).
    pub fn staged_bundle_file_name(&self, dataset_type: DatasetType) -> String {
        format!("{}.{}.tar", self.0, dataset_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized_like_the_api() {
        let cases = [
            ("plain_name1", "plain_name1"),
            ("a.b", "a-b"),
            ("a-b", "a-b"),
            ("with space", "with-space"),
            ("many   spaces..dots", "many-spaces-dots"),
            ("données", "donn-es"),
            ("-leading", "-leading"),
            ("trailing--", "trailing-"),
            ("日本", "-"),
        ];
        for (raw, want) in cases {
            assert_eq!(
                DatasetName::normalize(raw).unwrap().as_str(),
                want,
                "normalizing {raw:?}"
            );
        }
    }

    #[test]
    fn names_that_cannot_name_files_are_rejected() {
        assert_eq!(DatasetName::normalize(""), Err(NameError::Empty));
        let longest = "x".repeat(MAX_NAME_BYTES);
        let name = DatasetName::normalize(&longest).unwrap();
        assert_eq!(
            name.staged_bundle_file_name(DatasetType::DataProduct).len(),
            255
        );
        let too_long = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(matches!(
            DatasetName::normalize(&too_long),
            Err(NameError::TooLong { .. })
        ));
    }
}

//! The JSON the Bioloop API sends and takes (spec E.1, E.2, E.4), and its conversions to and
//! from the registry's model.
//!
//! Answers are Prisma rows: BigInt columns come as strings, timestamps as ISO 8601 with `Z`,
//! and a listing may hold legacy rows (a null name, an unknown type, an odd date) that are
//! skipped one by one rather than failing the whole page.

use chrono::{DateTime, Utc};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

use crate::model::{Bundle, DatasetName, DatasetType, FileRecord, FileType};
use crate::registry::{
    BulkOutcome, Dataset, DatasetId, DatasetPatch, NewDataset, Project, RegistryError, StateRecord,
};

/// A BigInt column: the API sends a string; a number is accepted too.
fn big_int<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    match Option::<Value>::deserialize(deserializer)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => text
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("`{text}` is not a size"))),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(v)),
            None => match n.as_f64() {
                Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= u64::MAX as f64 => {
                    Ok(Some(f as u64))
                }
                _ => Err(D::Error::custom(format!("{n} is not a size"))),
            },
        },
        Some(other) => Err(D::Error::custom(format!("{other} is not a size"))),
    }
}

pub(super) fn parse_time(
    id: DatasetId,
    field: &str,
    text: &str,
) -> Result<DateTime<Utc>, RegistryError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|err| {
            RegistryError::Invalid(format!(
                "dataset {id}: {field} `{text}` is not a timestamp: {err}"
            ))
        })
}

/// A dataset as the API sends it (Prisma's JSON, BigInts as strings).
#[derive(Deserialize)]
pub(super) struct WireDataset {
    id: DatasetId,
    name: String,
    #[serde(rename = "type")]
    dataset_type: String,
    #[serde(default)]
    origin_path: Option<String>,
    #[serde(default)]
    archive_path: Option<String>,
    #[serde(default)]
    staged_path: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default, deserialize_with = "big_int")]
    du_size: Option<u64>,
    #[serde(default, deserialize_with = "big_int")]
    size: Option<u64>,
    #[serde(default, deserialize_with = "big_int")]
    bundle_size: Option<u64>,
    #[serde(default, deserialize_with = "big_int")]
    num_files: Option<u64>,
    #[serde(default, deserialize_with = "big_int")]
    num_directories: Option<u64>,
    #[serde(default)]
    is_deleted: bool,
    #[serde(default)]
    is_staged: bool,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    create_method: Option<String>,
    created_at: String,
    updated_at: String,
    /// Newest first; absent from list answers unless asked for.
    #[serde(default)]
    states: Option<Vec<WireState>>,
    #[serde(default)]
    bundle: Option<WireBundle>,
    #[serde(default)]
    workflows: Vec<WireWorkflowRef>,
    /// Present when asked for with `files=true`.
    #[serde(default)]
    pub(super) files: Option<Vec<WireFile>>,
}

#[derive(Deserialize)]
struct WireState {
    state: String,
    timestamp: String,
}

#[derive(Deserialize)]
struct WireBundle {
    name: String,
    #[serde(deserialize_with = "big_int")]
    size: Option<u64>,
    md5: String,
}

#[derive(Deserialize)]
struct WireWorkflowRef {
    id: String,
}

#[derive(Deserialize)]
pub(super) struct WireFile {
    path: String,
    #[serde(default)]
    md5: Option<String>,
    #[serde(default, deserialize_with = "big_int")]
    size: Option<u64>,
    #[serde(default)]
    filetype: Option<String>,
}

/// A page of `GET datasets`; each item is read on its own, so that one odd item does not
/// spoil the page.
#[derive(Deserialize)]
pub(super) struct WireDatasetList {
    pub(super) datasets: Vec<Value>,
}

/// A dataset named in the `conflicted` or `errored` list of a bulk create.
#[derive(Deserialize)]
pub(super) struct WireKey {
    name: String,
    #[serde(rename = "type")]
    dataset_type: String,
    #[serde(default)]
    error: Option<String>,
}

/// The answer of `POST datasets/bulk`.
#[derive(Deserialize)]
pub(super) struct WireBulkOutcome {
    #[serde(default)]
    created: Vec<WireDataset>,
    #[serde(default)]
    conflicted: Vec<WireKey>,
    #[serde(default)]
    errored: Vec<WireKey>,
}

/// A row of `GET workflows/current`.
#[derive(Deserialize)]
pub(super) struct WireWorkflowLink {
    pub(super) id: String,
    #[serde(default)]
    pub(super) dataset_id: Option<DatasetId>,
}

/// The answer of `GET projects/{id or slug}`, of which only the project itself is read.
#[derive(Deserialize)]
pub(super) struct WireProject {
    id: String,
    slug: Option<String>,
    name: String,
}

/// The answer of `PUT datasets/{id}/report`.
#[derive(Deserialize)]
pub(super) struct WireStoredReport {
    pub(super) path: String,
}

/// An item of `POST datasets/bulk`; the optional fields are left out when unset.
#[derive(Serialize)]
pub(super) struct WireNewDataset<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    dataset_type: &'static str,
    origin_path: &'a str,
    create_method: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a Value>,
}

/// The body of `PATCH datasets/{id}`: only the fields the patch sets; `null` clears a nullable
/// column. BigInt columns go as strings (spec E.1).
#[derive(Serialize)]
pub(super) struct WireDatasetPatch<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    du_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bundle_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_files: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_directories: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_path: Option<&'a str>,
    /// `Some(None)` is sent as `null`, which clears the column.
    #[serde(skip_serializing_if = "Option::is_none")]
    archive_path: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    staged_path: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_staged: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_deleted: Option<bool>,
    /// Upserted by the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    bundle: Option<WireNewBundle<'a>>,
}

#[derive(Serialize)]
struct WireNewBundle<'a> {
    name: &'a str,
    size: String,
    md5: String,
}

impl<'a> From<&'a NewDataset> for WireNewDataset<'a> {
    fn from(item: &'a NewDataset) -> Self {
        WireNewDataset {
            name: item.name.as_str(),
            dataset_type: item.dataset_type.as_str(),
            origin_path: &item.origin_path,
            create_method: item.create_method.as_str(),
            description: item.description.as_deref(),
            metadata: item.metadata.as_ref(),
        }
    }
}

impl<'a> From<&'a DatasetPatch> for WireDatasetPatch<'a> {
    fn from(patch: &'a DatasetPatch) -> Self {
        WireDatasetPatch {
            name: patch.name.as_ref().map(DatasetName::as_str),
            du_size: patch.du_size.map(|v| v.to_string()),
            size: patch.size.map(|v| v.to_string()),
            bundle_size: patch.bundle.as_ref().map(|b| b.size.to_string()),
            num_files: patch.num_files,
            num_directories: patch.num_directories,
            metadata: patch.metadata.as_ref(),
            origin_path: patch.origin_path.as_deref(),
            archive_path: patch.archive_path.as_ref().map(Option::as_deref),
            staged_path: patch.staged_path.as_ref().map(Option::as_deref),
            is_staged: patch.is_staged,
            is_deleted: patch.is_deleted,
            bundle: patch.bundle.as_ref().map(|b| WireNewBundle {
                name: &b.name,
                size: b.size.to_string(),
                md5: b.md5.to_string(),
            }),
        }
    }
}

impl WireKey {
    fn into_key(self) -> Result<(DatasetName, DatasetType), RegistryError> {
        let dataset_type = self.dataset_type.parse().map_err(|err| {
            RegistryError::Invalid(format!("bulk create answer for `{}`: {err}", self.name))
        })?;
        Ok((DatasetName::from_stored(self.name), dataset_type))
    }
}

impl WireBulkOutcome {
    pub(super) fn into_outcome(self) -> Result<BulkOutcome, RegistryError> {
        Ok(BulkOutcome {
            created: self
                .created
                .into_iter()
                .map(WireDataset::into_dataset)
                .collect::<Result<_, _>>()?,
            conflicted: self
                .conflicted
                .into_iter()
                .map(WireKey::into_key)
                .collect::<Result<_, _>>()?,
            errored: self
                .errored
                .into_iter()
                .map(|e| {
                    let message = e
                        .error
                        .clone()
                        .unwrap_or_else(|| "the registry could not create it".to_owned());
                    e.into_key().map(|(name, t)| (name, t, message))
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

impl WireProject {
    pub(super) fn into_project(self) -> Project {
        Project {
            id: self.id,
            slug: self.slug,
            name: self.name,
        }
    }
}

impl WireFile {
    pub(super) fn into_record(self, id: DatasetId) -> Result<FileRecord, RegistryError> {
        let md5 = match self.md5.as_deref() {
            None | Some("") => None,
            Some(text) => Some(text.parse().map_err(|err| {
                RegistryError::Invalid(format!(
                    "dataset {id}: file `{}` has an invalid MD5 `{text}`: {err}",
                    self.path
                ))
            })?),
        };
        // The API omits the type; inspect records an MD5 for every regular file and none for
        // a symbolic link.
        let file_type = match self.filetype.as_deref().map(str::parse::<FileType>) {
            Some(Ok(t)) => t,
            _ if md5.is_some() => FileType::File,
            _ => FileType::SymbolicLink,
        };
        Ok(FileRecord {
            path: self.path,
            md5,
            size: self.size,
            file_type,
        })
    }
}

impl WireDataset {
    pub(super) fn into_dataset(self) -> Result<Dataset, RegistryError> {
        let id = self.id;
        let dataset_type: DatasetType = self.dataset_type.parse().map_err(|err| {
            RegistryError::Invalid(format!("dataset {id} (`{}`): {err}", self.name))
        })?;
        let mut states = self
            .states
            .unwrap_or_default()
            .into_iter()
            .rev()
            .map(|s| {
                Ok(StateRecord {
                    timestamp: parse_time(id, "state timestamp", &s.timestamp)?,
                    state: s.state,
                })
            })
            .collect::<Result<Vec<_>, RegistryError>>()?;
        // Oldest first; the stable sort keeps the API's order among equal timestamps.
        states.sort_by_key(|s| s.timestamp);
        let bundle = match self.bundle {
            None => None,
            Some(b) => Some(Bundle {
                size: b.size.ok_or_else(|| {
                    RegistryError::Invalid(format!("dataset {id}: the bundle has no size"))
                })?,
                md5: b.md5.parse().map_err(|err| {
                    RegistryError::Invalid(format!(
                        "dataset {id}: the bundle MD5 `{}` is invalid: {err}",
                        b.md5
                    ))
                })?,
                name: b.name,
            }),
        };
        let metadata = match self.metadata {
            Some(Value::Object(map)) => Value::Object(map),
            _ => json!({}),
        };
        Ok(Dataset {
            id,
            name: DatasetName::from_stored(self.name),
            dataset_type,
            origin_path: self.origin_path,
            archive_path: self.archive_path,
            staged_path: self.staged_path,
            description: self.description,
            du_size: self.du_size,
            size: self.size,
            bundle_size: self.bundle_size,
            num_files: self.num_files,
            num_directories: self.num_directories,
            is_deleted: self.is_deleted,
            is_staged: self.is_staged,
            metadata,
            create_method: self.create_method.and_then(|m| m.parse().ok()),
            created_at: parse_time(id, "created_at", &self.created_at)?,
            updated_at: parse_time(id, "updated_at", &self.updated_at)?,
            states,
            bundle,
            workflows: self.workflows.into_iter().map(|w| w.id).collect(),
        })
    }
}

/// A dataset from a list answer, and whether the answer included its states.
pub(super) struct Listed {
    pub(super) dataset: Dataset,
    pub(super) states_known: bool,
}

/// A dataset of a list answer, or its id (when it has one) and why it cannot be read.
pub(super) fn read_listed(item: Value) -> Result<Listed, (Option<DatasetId>, String)> {
    let id = item.get("id").and_then(Value::as_i64);
    let wire: WireDataset = serde_path_to_error::deserialize(item).map_err(|err| {
        let field = err.path().to_string();
        let err = err.into_inner();
        // The path of the whole item is `.`: its error names the field already.
        (
            id,
            match field.as_str() {
                "." => err.to_string(),
                _ => format!("{field}: {err}"),
            },
        )
    })?;
    let states_known = wire.states.is_some();
    let dataset = wire.into_dataset().map_err(|err| (id, format!("{err}")))?;
    Ok(Listed {
        dataset,
        states_known,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CreateMethod;

    fn patches() -> Vec<(DatasetPatch, &'static str)> {
        let bundle = Bundle {
            name: "PCM230203.RAW_DATA.tar".into(),
            size: 18_446_744_073_709_551_615,
            md5: "d41d8cd98f00b204e9800998ecf8427e".parse().expect("md5"),
        };
        vec![
            (DatasetPatch::default(), "{}"),
            (
                DatasetPatch {
                    name: Some(DatasetName::from_stored("PCM230203".into())),
                    du_size: Some(123_456_789_012),
                    size: Some(0),
                    num_files: Some(120),
                    num_directories: Some(3),
                    ..DatasetPatch::default()
                },
                r#"{"name":"PCM230203","du_size":"123456789012","size":"0","num_files":120,"num_directories":3}"#,
            ),
            (
                DatasetPatch {
                    archive_path: Some(None),
                    staged_path: Some(None),
                    is_staged: Some(false),
                    ..DatasetPatch::default()
                },
                r#"{"archive_path":null,"staged_path":null,"is_staged":false}"#,
            ),
            (
                DatasetPatch {
                    origin_path: Some("/data/new".into()),
                    archive_path: Some(Some("/archive/x.tar".into())),
                    staged_path: Some(Some("/staged/x".into())),
                    is_staged: Some(true),
                    is_deleted: Some(true),
                    ..DatasetPatch::default()
                },
                r#"{"origin_path":"/data/new","archive_path":"/archive/x.tar","staged_path":"/staged/x","is_staged":true,"is_deleted":true}"#,
            ),
            (
                DatasetPatch {
                    metadata: Some(json!({"stage_alias": "abc", "inspection": {"files": 2}})),
                    bundle: Some(bundle.clone()),
                    ..DatasetPatch::default()
                },
                r#"{"bundle_size":"18446744073709551615","metadata":{"stage_alias":"abc","inspection":{"files":2}},"bundle":{"name":"PCM230203.RAW_DATA.tar","size":"18446744073709551615","md5":"d41d8cd98f00b204e9800998ecf8427e"}}"#,
            ),
            (
                DatasetPatch {
                    metadata: Some(Value::Null),
                    staged_path: Some(None),
                    ..DatasetPatch::default()
                },
                r#"{"metadata":null,"staged_path":null}"#,
            ),
            (
                DatasetPatch {
                    name: Some(DatasetName::from_stored("n".into())),
                    du_size: Some(1),
                    size: Some(2),
                    num_files: Some(3),
                    num_directories: Some(4),
                    metadata: Some(json!({"k": [1, null]})),
                    archive_path: Some(None),
                    staged_path: Some(Some("/s".into())),
                    origin_path: Some("/o".into()),
                    is_staged: Some(true),
                    is_deleted: Some(false),
                    bundle: Some(bundle),
                },
                r#"{"name":"n","du_size":"1","size":"2","bundle_size":"18446744073709551615","num_files":3,"num_directories":4,"metadata":{"k":[1,null]},"origin_path":"/o","archive_path":null,"staged_path":"/s","is_staged":true,"is_deleted":false,"bundle":{"name":"PCM230203.RAW_DATA.tar","size":"18446744073709551615","md5":"d41d8cd98f00b204e9800998ecf8427e"}}"#,
            ),
        ]
    }

    /// The bodies are those the PATCH has always sent: the same keys in the same order, a
    /// cleared column as `null`, an unset one absent.
    #[test]
    fn a_patch_sends_only_what_it_sets() {
        for (patch, want) in patches() {
            assert_eq!(json!(WireDatasetPatch::from(&patch)).to_string(), want);
        }
    }

    /// `GET datasets/{id}?bundle=true&files=true` as the API answers it (spec E.2, E.5): BigInt
    /// columns as strings, states newest first, audit logs always included, a null metadata.
    const DATASET: &str = r#"{
        "id": 42,
        "name": "PCM230203",
        "type": "RAW_DATA",
        "num_directories": 3,
        "num_files": 120,
        "du_size": "123456789012",
        "size": "98765",
        "bundle_size": null,
        "description": null,
        "created_at": "2026-11-30T09:15:02.123Z",
        "updated_at": "2026-12-01T10:00:00.000Z",
        "origin_path": "/data/PCM230203",
        "archive_path": "/archive/PCM230203.RAW_DATA.tar",
        "staged_path": null,
        "is_deleted": false,
        "is_staged": true,
        "metadata": null,
        "create_method": "SCAN",
        "states": [
            {"state": "STAGED", "timestamp": "2026-12-01T10:00:00.000Z", "metadata": null},
            {"state": "ARCHIVED", "timestamp": "2026-12-01T09:00:00.000Z", "metadata": null},
            {"state": "REGISTERED", "timestamp": "2026-11-30T09:15:02.123Z", "metadata": null}
        ],
        "audit_logs": [{"action": "create", "user": {"username": "svc"}}],
        "workflows": [{"id": "wf-1"}, {"id": "wf-2"}],
        "source_datasets": [],
        "derived_datasets": [],
        "bundle": {
            "id": 7,
            "name": "PCM230203.RAW_DATA.tar",
            "size": "40960",
            "md5": "d41d8cd98f00b204e9800998ecf8427e",
            "dataset_id": 42
        },
        "files": [
            {"path": "a/b.fastq.gz", "md5": "0cc175b9c0f1b6a831c399e269772661"},
            {"path": "link", "md5": null},
            {"path": "c.txt", "md5": "", "size": "12", "filetype": "file"}
        ]
    }"#;

    fn time(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn a_dataset_answer_becomes_the_model() {
        let mut wire: WireDataset = serde_json::from_str(DATASET).expect("dataset");
        let files = wire.files.take().expect("files");
        let dataset = wire.into_dataset().expect("dataset");
        assert_eq!(dataset.id, 42);
        assert_eq!(dataset.name.as_str(), "PCM230203");
        assert_eq!(dataset.dataset_type, DatasetType::RawData);
        assert_eq!(dataset.du_size, Some(123_456_789_012));
        assert_eq!(dataset.size, Some(98_765));
        assert_eq!(dataset.bundle_size, None);
        assert_eq!(
            (dataset.num_files, dataset.num_directories),
            (Some(120), Some(3))
        );
        assert_eq!(dataset.staged_path, None);
        assert!(dataset.is_staged && !dataset.is_deleted);
        // A null metadata reads as an empty object.
        assert_eq!(dataset.metadata, json!({}));
        assert_eq!(dataset.create_method, Some(CreateMethod::Scan));
        assert_eq!(dataset.created_at, time("2026-11-30T09:15:02.123Z"));
        // Oldest first, whatever the answer's order.
        let states: Vec<&str> = dataset.states.iter().map(|s| s.state.as_str()).collect();
        assert_eq!(states, ["REGISTERED", "ARCHIVED", "STAGED"]);
        assert_eq!(dataset.latest_state(), Some("STAGED"));
        assert_eq!(dataset.workflows, ["wf-1", "wf-2"]);
        let bundle = dataset.bundle.expect("bundle");
        assert_eq!(bundle.size, 40_960);
        assert_eq!(bundle.md5.to_string(), "d41d8cd98f00b204e9800998ecf8427e");

        let rows: Vec<FileRecord> = files
            .into_iter()
            .map(|f| f.into_record(42))
            .collect::<Result<_, _>>()
            .expect("rows");
        let kinds: Vec<(&str, bool, Option<u64>, FileType)> = rows
            .iter()
            .map(|r| (r.path.as_str(), r.md5.is_some(), r.size, r.file_type))
            .collect();
        // Without a type, an MD5 means a regular file and none a symbolic link; an empty MD5
        // is none.
        assert_eq!(
            kinds,
            [
                ("a/b.fastq.gz", true, None, FileType::File),
                ("link", false, None, FileType::SymbolicLink),
                ("c.txt", false, Some(12), FileType::File),
            ]
        );
    }

    #[test]
    fn unknown_create_methods_are_none_and_bad_bundles_and_checksums_are_errors() {
        let mut item: Value = serde_json::from_str(DATASET).expect("json");
        item["create_method"] = json!("LEGACY");
        let dataset = serde_json::from_value::<WireDataset>(item.clone())
            .expect("dataset")
            .into_dataset()
            .expect("dataset");
        assert_eq!(dataset.create_method, None);

        item["bundle"]["size"] = Value::Null;
        let err = serde_json::from_value::<WireDataset>(item.clone())
            .expect("dataset")
            .into_dataset()
            .expect_err("no bundle size");
        assert!(err.to_string().contains("the bundle has no size"), "{err}");

        let file: WireFile =
            serde_json::from_value(json!({"path": "x", "md5": "not-an-md5"})).expect("file");
        let err = file.into_record(42).expect_err("bad md5");
        assert!(err.to_string().contains("`x` has an invalid MD5"), "{err}");
    }

    #[test]
    fn a_listing_skips_the_items_it_cannot_read_and_names_them() {
        let page: WireDatasetList = serde_json::from_value(json!({
            "metadata": {"count": 6},
            "datasets": [
                {"id": 1, "name": "ok", "type": "DATA_PRODUCT", "du_size": 5,
                 "created_at": "2026-12-01T00:00:00.000Z", "updated_at": "2026-12-01T00:00:00Z",
                 "workflows": []},
                {"id": 2, "name": null, "type": "RAW_DATA",
                 "created_at": "2026-12-01T00:00:00.000Z", "updated_at": "2026-12-01T00:00:00.000Z"},
                {"id": 3, "name": "old", "type": "ANALYSIS",
                 "created_at": "2026-12-01T00:00:00.000Z", "updated_at": "2026-12-01T00:00:00.000Z"},
                {"id": 4, "name": "odd", "type": "RAW_DATA",
                 "created_at": "2026-12-01 00:00:00", "updated_at": "2026-12-01T00:00:00.000Z"},
                {"id": 5, "name": "big", "type": "RAW_DATA", "size": "12 kB",
                 "created_at": "2026-12-01T00:00:00.000Z", "updated_at": "2026-12-01T00:00:00.000Z"},
                {"name": "no id", "type": "RAW_DATA"},
                {"id": 7, "name": "with states", "type": "RAW_DATA", "states": [],
                 "created_at": "2026-12-01T00:00:00.000Z", "updated_at": "2026-12-01T00:00:00.000Z"}
            ]
        }))
        .expect("page");
        let read: Vec<_> = page.datasets.into_iter().map(read_listed).collect();
        assert_eq!(read.len(), 7);

        let first = read[0].as_ref().expect("readable");
        assert_eq!(first.dataset.id, 1);
        assert_eq!(first.dataset.dataset_type, DatasetType::DataProduct);
        assert_eq!(first.dataset.du_size, Some(5));
        // A listing without `include_states` says nothing about the states.
        assert!(!first.states_known && first.dataset.states.is_empty());

        let skipped = |index: usize| match &read[index] {
            Ok(listed) => panic!("item {index} read as dataset {}", listed.dataset.id),
            Err((id, reason)) => (*id, reason.clone()),
        };
        let (id, reason) = skipped(1);
        assert_eq!(id, Some(2));
        assert!(reason.starts_with("name: invalid type: null"), "{reason}");
        let (id, reason) = skipped(2);
        assert_eq!(id, Some(3));
        assert!(
            reason.contains("unknown dataset type `ANALYSIS`"),
            "{reason}"
        );
        let (id, reason) = skipped(3);
        assert_eq!(id, Some(4));
        assert!(
            reason.contains("created_at `2026-12-01 00:00:00` is not a timestamp"),
            "{reason}"
        );
        let (id, reason) = skipped(4);
        assert_eq!(id, Some(5));
        assert!(
            reason.starts_with("size: `12 kB` is not a size"),
            "{reason}"
        );
        let (id, reason) = skipped(5);
        assert_eq!(id, None);
        assert!(reason.contains("missing field `id`"), "{reason}");

        let last = read[6].as_ref().expect("readable");
        assert!(last.states_known);
    }

    #[test]
    fn a_bulk_answer_becomes_the_outcome() {
        let mut created: Value = serde_json::from_str(DATASET).expect("json");
        created["files"] = Value::Null;
        let wire: WireBulkOutcome = serde_json::from_value(json!({
            "created": [created],
            "conflicted": [{"name": "A", "type": "RAW_DATA"}],
            "errored": [
                {"name": "B", "type": "DATA_PRODUCT"},
                {"name": "C", "type": "RAW_DATA", "error": "boom"}
            ]
        }))
        .expect("outcome");
        let outcome = wire.into_outcome().expect("outcome");
        assert_eq!(outcome.created.len(), 1);
        assert_eq!(outcome.created[0].id, 42);
        assert_eq!(
            outcome.conflicted,
            [(DatasetName::from_stored("A".into()), DatasetType::RawData)]
        );
        assert_eq!(
            outcome.errored,
            [
                (
                    DatasetName::from_stored("B".into()),
                    DatasetType::DataProduct,
                    "the registry could not create it".to_owned()
                ),
                (
                    DatasetName::from_stored("C".into()),
                    DatasetType::RawData,
                    "boom".to_owned()
                ),
            ]
        );

        let wire: WireBulkOutcome =
            serde_json::from_value(json!({"conflicted": [{"name": "D", "type": "OTHER"}]}))
                .expect("outcome");
        let err = wire.into_outcome().expect_err("unknown type");
        assert!(
            err.to_string().contains("bulk create answer for `D`"),
            "{err}"
        );
    }

    #[test]
    fn workflow_links_and_projects_read_what_they_need() {
        let links: Vec<WireWorkflowLink> = serde_json::from_value(json!([
            {"id": "wf-1", "dataset_id": 42, "initiator_id": 1, "metadata": null},
            {"id": "wf-2", "dataset_id": null, "initiator_id": null, "metadata": {}}
        ]))
        .expect("links");
        let links: Vec<(&str, Option<DatasetId>)> = links
            .iter()
            .map(|l| (l.id.as_str(), l.dataset_id))
            .collect();
        assert_eq!(links, [("wf-1", Some(42)), ("wf-2", None)]);

        let project: WireProject = serde_json::from_value(json!({
            "id": "5d4c4a1e-0000-4000-8000-000000000001",
            "slug": null,
            "name": "Genomics",
            "datasets": []
        }))
        .expect("project");
        let project = project.into_project();
        assert_eq!(
            (project.id.as_str(), project.slug, project.name.as_str()),
            ("5d4c4a1e-0000-4000-8000-000000000001", None, "Genomics")
        );
    }

    #[test]
    fn new_datasets_are_sent_with_their_optional_fields_only_when_set() {
        let mut item = NewDataset {
            name: DatasetName::from_stored("PCM230203".into()),
            dataset_type: DatasetType::RawData,
            origin_path: "/data/PCM230203".into(),
            create_method: CreateMethod::Scan,
            description: None,
            metadata: None,
        };
        assert_eq!(
            json!(WireNewDataset::from(&item)).to_string(),
            r#"{"name":"PCM230203","type":"RAW_DATA","origin_path":"/data/PCM230203","create_method":"SCAN"}"#
        );
        item.description = Some("a run".into());
        item.metadata = Some(json!({"num_genome_files": 2}));
        assert_eq!(
            json!(WireNewDataset::from(&item)).to_string(),
            r#"{"name":"PCM230203","type":"RAW_DATA","origin_path":"/data/PCM230203","create_method":"SCAN","description":"a run","metadata":{"num_genome_files":2}}"#
        );
    }

    #[test]
    fn big_ints_are_read_from_strings_and_numbers() {
        #[derive(Deserialize)]
        struct T {
            #[serde(default, deserialize_with = "big_int")]
            v: Option<u64>,
        }
        let read = |text: &str| serde_json::from_str::<T>(text).map(|t| t.v);
        assert_eq!(
            read(r#"{"v": "18446744073709551615"}"#).ok(),
            Some(Some(u64::MAX))
        );
        assert_eq!(read(r#"{"v": 42}"#).ok(), Some(Some(42)));
        assert_eq!(read(r#"{"v": null}"#).ok(), Some(None));
        assert_eq!(read(r#"{}"#).ok(), Some(None));
        assert!(read(r#"{"v": "-1"}"#).is_err());
        assert!(read(r#"{"v": "12 kB"}"#).is_err());
    }
}

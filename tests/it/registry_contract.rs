//! The registry contract (the Bioloop API's semantics, spec E.2 and E.3), as one story that
//! every registry backend must pass.

use crate::common::Project;
use crate::common::bioloop_api::TestApi;
use crate::common::postgres::TestPostgres;
use serde_json::json;
use workers::model::{
    Bundle, CreateMethod, DatasetName, DatasetState, DatasetType, FileRecord, FileType,
};
use workers::registry::http::{HttpConfig, HttpRegistry};
use workers::registry::sql::SqlRegistry;
use workers::registry::{
    DatasetPatch, DatasetQuery, MAX_BULK, NewDataset, Registry, RegistryError,
};

fn new(name: &str, t: DatasetType, method: CreateMethod) -> NewDataset {
    NewDataset {
        name: DatasetName::normalize(name).unwrap(),
        dataset_type: t,
        origin_path: format!("/data/{name}"),
        create_method: method,
        description: Some("desc".into()),
        metadata: Some(json!({"source": {"instrument": "nova"}})),
    }
}

fn row(path: &str, size: u64) -> FileRecord {
    FileRecord {
        path: path.into(),
        md5: Some(workers::compute::md5::md5_bytes(path.as_bytes())),
        size: Some(size),
        file_type: FileType::File,
    }
}

/// Whether a backend returns file rows with their sizes (the Bioloop API lists path and MD5
/// only).
#[derive(Clone, Copy, PartialEq, Eq)]
enum FileSizes {
    Returned,
    Omitted,
}

async fn registry_story(registry: &dyn Registry, sizes: FileSizes) {
    use DatasetType::{DataProduct, RawData};
    // Bulk create: names are normalized; the same name and type conflicts; types are separate.
    let outcome = registry
        .bulk_create(&[
            new("run.1", RawData, CreateMethod::Scan),
            new("run-1", RawData, CreateMethod::Scan),
            new("run 1", DataProduct, CreateMethod::OnDemand),
        ])
        .await
        .unwrap();
    assert_eq!(outcome.created.len(), 2);
    assert_eq!(
        outcome.conflicted,
        [(DatasetName::normalize("run-1").unwrap(), RawData)]
    );
    let raw = outcome
        .created
        .iter()
        .find(|d| d.dataset_type == RawData)
        .unwrap()
        .clone();
    assert_eq!(raw.name.as_str(), "run-1");
    assert_eq!(raw.create_method, Some(CreateMethod::Scan));
    assert_eq!(
        raw.states
            .iter()
            .map(|s| s.state.as_str())
            .collect::<Vec<_>>(),
        ["REGISTERED"]
    );
    assert_eq!(raw.metadata, json!({"source": {"instrument": "nova"}}));
    // At most 100 per request.
    let too_many: Vec<_> = (0..=MAX_BULK)
        .map(|i| new(&format!("many{i}"), RawData, CreateMethod::Scan))
        .collect();
    assert!(matches!(
        registry.bulk_create(&too_many).await,
        Err(RegistryError::Invalid(_))
    ));
    assert!(
        registry
            .find(&DatasetQuery {
                name: Some(DatasetName::normalize("many0").unwrap()),
                ..Default::default()
            })
            .await
            .unwrap()
            .is_empty()
    );

    // Look-ups.
    assert_eq!(registry.get(raw.id).await.unwrap().name, raw.name);
    assert!(matches!(
        registry.get(999_999).await,
        Err(RegistryError::NotFound(999_999))
    ));
    let by_type = registry
        .find(&DatasetQuery {
            dataset_type: Some(DataProduct),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_type.len(), 1);
    let by_method = registry
        .find(&DatasetQuery {
            create_method: Some(CreateMethod::Scan),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_method.iter().map(|d| d.id).collect::<Vec<_>>(), [raw.id]);

    // Update: metadata deep-merges, bundle upserts, nullable columns clear.
    let updated = registry
        .update(
            raw.id,
            &DatasetPatch {
                metadata: Some(json!({"source": {"run": 7}, "num_genome_files": 2})),
                archive_path: Some(Some("/archive/run-1.tar".into())),
                bundle: Some(Bundle {
                    name: "run-1.tar".into(),
                    size: 10,
                    md5: workers::compute::md5::md5_bytes(b"a"),
                }),
                num_files: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        updated.metadata,
        json!({"source": {"instrument": "nova", "run": 7}, "num_genome_files": 2})
    );
    assert_eq!(updated.archive_path.as_deref(), Some("/archive/run-1.tar"));
    assert_eq!(updated.num_files, Some(3));
    let second = Bundle {
        name: "run-1.tar".into(),
        size: 11,
        md5: workers::compute::md5::md5_bytes(b"b"),
    };
    let updated = registry
        .update(
            raw.id,
            &DatasetPatch {
                bundle: Some(second.clone()),
                archive_path: Some(None),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.bundle, Some(second));
    assert_eq!(updated.archive_path, None);
    assert_eq!(updated.num_files, Some(3), "fields not in the patch stay");
    assert!(matches!(
        registry.update(999_999, &DatasetPatch::default()).await,
        Err(RegistryError::NotFound(_))
    ));

    // States: in order; repeating the latest one (a retried write) adds nothing.
    for state in [
        DatasetState::Ready,
        DatasetState::Ready,
        DatasetState::Archived,
        DatasetState::Archived,
    ] {
        registry.add_state(raw.id, state).await.unwrap();
    }
    let states: Vec<_> = registry
        .get(raw.id)
        .await
        .unwrap()
        .states
        .into_iter()
        .map(|s| s.state)
        .collect();
    assert_eq!(states, ["REGISTERED", "READY", "ARCHIVED"]);
    assert!(matches!(
        registry.add_state(999_999, DatasetState::Ready).await,
        Err(RegistryError::NotFound(_))
    ));

    // Files: unique on path, paged in path order.
    registry
        .add_files(raw.id, &[row("b", 2), row("a", 1), row("c/d", 4)])
        .await
        .unwrap();
    registry
        .add_files(raw.id, &[row("a", 1), row("c/e", 5)])
        .await
        .unwrap();
    let first = registry.files_page(raw.id, None, 2).await.unwrap();
    assert_eq!(
        first.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    let rest = registry.files_page(raw.id, Some("b"), 10).await.unwrap();
    assert_eq!(
        rest.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["c/d", "c/e"]
    );
    let want = row("c/d", 4);
    assert_eq!(
        (&rest[0].path, rest[0].md5, rest[0].file_type),
        (&want.path, want.md5, want.file_type)
    );
    match sizes {
        FileSizes::Returned => assert_eq!(rest[0].size, Some(4)),
        FileSizes::Omitted => assert_eq!(rest[0].size, None),
    }

    // Workflows: linking is idempotent, and `without_workflows` finds the unlinked.
    let orphans = DatasetQuery {
        without_workflows: true,
        ..Default::default()
    };
    assert_eq!(registry.find(&orphans).await.unwrap().len(), 2);
    registry.add_workflow(raw.id, "wf-1").await.unwrap();
    registry.add_workflow(raw.id, "wf-1").await.unwrap();
    assert_eq!(registry.get(raw.id).await.unwrap().workflows, ["wf-1"]);
    assert_eq!(registry.find(&orphans).await.unwrap().len(), 1);
    // Batches: links for many datasets at once, read back per dataset in order; a dataset that
    // does not exist is left out of the answer and fails a batch that links it, whole.
    let other = registry.find(&orphans).await.unwrap()[0].id;
    registry
        .add_workflows(&[(raw.id, "wf-2".into()), (other, "wf-3".into())])
        .await
        .unwrap();
    let of = registry
        .workflows_of(&[raw.id, other, 999_999])
        .await
        .unwrap();
    assert_eq!(of.len(), 2, "{of:?}");
    assert_eq!(of[&raw.id], ["wf-1", "wf-2"]);
    assert_eq!(of[&other], ["wf-3"]);
    assert!(
        registry
            .add_workflows(&[(999_999, "wf-4".into())])
            .await
            .is_err()
    );
    assert!(registry.find(&orphans).await.unwrap().is_empty());
    // Every live name of a type with its origin, in one call (watch's full scan).
    let origins = registry.origins(RawData).await.unwrap();
    assert_eq!(
        origins.get("run-1"),
        Some(&Some("/data/run.1".to_owned())),
        "{origins:?}"
    );
    assert!(!origins.contains_key("run-1-dp"));
    let linked = registry
        .find(&DatasetQuery {
            workflow_id: Some("wf-1".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(linked.iter().map(|d| d.id).collect::<Vec<_>>(), [raw.id]);

    // Deleting renames and frees the name (unique on name, type, is_deleted).
    registry
        .update(
            raw.id,
            &DatasetPatch {
                is_deleted: Some(true),
                name: Some(DatasetName::from_stored(format!("run-1-{}", raw.id))),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let again = registry
        .bulk_create(&[new("run-1", RawData, CreateMethod::Scan)])
        .await
        .unwrap();
    assert_eq!(again.created.len(), 1);
    let live = registry
        .find(&DatasetQuery {
            dataset_type: Some(RawData),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(live.len(), 1);
    let all = registry
        .find(&DatasetQuery {
            dataset_type: Some(RawData),
            include_deleted: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
}

#[tokio::test]
async fn the_sqlite_registry_keeps_the_contract() {
    let project = Project::new();
    let app = project.app().await;
    registry_story(app.registry.as_ref(), FileSizes::Returned).await;
}

/// The same statements on PostgreSQL, in a database of the test's own (skipped with a note
/// when the server cannot be reached, except under CI).
#[tokio::test]
async fn the_postgres_registry_keeps_the_contract() {
    let Some(database) = TestPostgres::new() else {
        return;
    };
    let registry = SqlRegistry::new(database.db().await);
    registry_story(&registry, FileSizes::Returned).await;
}

#[tokio::test]
async fn the_http_registry_keeps_the_contract() {
    let api = TestApi::start();
    let registry = HttpRegistry::new(HttpConfig::new(api.base_url(), api.token().to_owned()))
        .expect("http registry");
    registry_story(&registry, FileSizes::Omitted).await;
}

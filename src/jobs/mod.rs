//! The jobs: `watch` (scan source directories and register new datasets) and `register`
//! (register directories on demand). The scheduler decides when jobs run; these modules
//! decide what a run does.

pub mod register;
pub mod watch;

use serde_json::Map;
use tracing::{error, warn};

use crate::app::App;
use crate::registry::{BulkOutcome, Dataset, DatasetId, MAX_BULK, NewDataset, RegistryError};
use crate::workflow::engine;

/// A dataset registered by a job, and the workflow started for it (when it could be).
#[derive(Debug, Clone)]
pub struct Registered {
    pub id: DatasetId,
    pub name: String,
    pub workflow_id: Option<String>,
}

/// Creates `items` in batches of at most `MAX_BULK` and starts the `integrated` workflow for
/// each created dataset. A batch that fails is reported in the returned errors (with the
/// names it held) and left for the next run; a workflow that fails to start is logged and
/// left for the repair pass.
pub async fn register_and_start(
    app: &App,
    items: &[NewDataset],
) -> (Vec<Registered>, BulkOutcome, Vec<(String, String)>) {
    let mut registered = Vec::new();
    let mut outcome = BulkOutcome::default();
    let mut failed = Vec::new();
    for batch in items.chunks(MAX_BULK) {
        let result = match app.registry.bulk_create(batch).await {
            Ok(result) => result,
            Err(err) => {
                let message = format!("{:#}", anyhow::Error::new(err));
                error!(datasets = batch.len(), error = %message, "Could not register a batch of datasets.");
                failed.extend(
                    batch
                        .iter()
                        .map(|item| (item.name.to_string(), message.clone())),
                );
                continue;
            }
        };
        for dataset in &result.created {
            let workflow_id = start_integrated(app, dataset).await;
            registered.push(Registered {
                id: dataset.id,
                name: dataset.name.to_string(),
                workflow_id,
            });
        }
        outcome.created.extend(result.created);
        outcome.conflicted.extend(result.conflicted);
        outcome.errored.extend(result.errored);
    }
    (registered, outcome, failed)
}

/// Starts `integrated` for a dataset; on failure logs it and returns `None` (the dataset is
/// left without a workflow, which the repair pass of the next `watch` run finds).
pub async fn start_integrated(app: &App, dataset: &Dataset) -> Option<String> {
    match engine::start(app, "integrated", dataset.id, Map::new()).await {
        Ok(workflow_id) => Some(workflow_id),
        Err(err) => {
            warn!(dataset_id = dataset.id, name = %dataset.name, error = %format!("{err:#}"),
                "Could not start the workflow; the next watch run will.");
            None
        }
    }
}

pub(crate) fn registry_error(err: RegistryError) -> anyhow::Error {
    anyhow::Error::new(err)
}

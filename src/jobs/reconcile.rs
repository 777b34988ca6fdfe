//! `reconcile`: finds work that nothing will move on and moves it on: datasets registered
//! without a workflow, and active workflows whose next step is neither queued nor running.

use tracing::warn;

use super::{Registered, check_interrupted, start_integrated_many};
use crate::app::App;
use crate::cancel::CancellationToken;
use crate::model::CreateMethod;
use crate::registry::{DatasetQuery, MAX_BULK};
use crate::workflow::engine;

#[derive(Debug, Clone, Default)]
pub struct ReconcileReport {
    /// Datasets that had no workflow (and whether one was started for them).
    pub started: Vec<Registered>,
    /// Workflows whose stalled step was published again.
    pub repaired: Vec<String>,
    /// Nothing was started or repaired: `started` lists what would be.
    pub dry_run: bool,
}

/// Datasets registered by a scan or on demand get their `integrated` workflow here if they
/// have none. Uploads are left alone: their workflow starts once the upload is verified.
pub async fn run(
    app: &App,
    dry_run: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<ReconcileReport> {
    let started = start_missing_workflows(
        app,
        &[CreateMethod::Scan, CreateMethod::OnDemand],
        dry_run,
        cancel,
    )
    .await?;
    check_interrupted(cancel)?;
    let repaired = if dry_run {
        Vec::new()
    } else {
        engine::repair_stalled(app).await?
    };
    Ok(ReconcileReport {
        started,
        repaired,
        dry_run,
    })
}

/// Starts `integrated` for every live dataset created by one of `methods` that has no
/// workflow: what a crash or an outage between registration and workflow start leaves
/// (spec J.1). A dry run only lists them.
pub async fn start_missing_workflows(
    app: &App,
    methods: &[CreateMethod],
    dry_run: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<Vec<Registered>> {
    let mut started = Vec::new();
    for method in methods {
        let query = DatasetQuery {
            without_workflows: true,
            create_method: Some(*method),
            ..Default::default()
        };
        // One query finds them all; their workflows start in batches.
        let found = app.registry.find(&query).await?;
        for batch in found.chunks(MAX_BULK) {
            check_interrupted(cancel)?;
            let workflow_ids = if dry_run {
                vec![None; batch.len()]
            } else {
                start_integrated_many(app, batch).await
            };
            for (dataset, workflow_id) in batch.iter().zip(workflow_ids) {
                if workflow_id.is_some() {
                    warn!(dataset_id = dataset.id, name = %dataset.name, "Dataset had no workflow; started one.");
                }
                started.push(Registered {
                    id: dataset.id,
                    name: dataset.name.to_string(),
                    workflow_id,
                });
            }
        }
    }
    Ok(started)
}

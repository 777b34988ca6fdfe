//! `register` (spec C.6, `register_ondemand`): registers one directory, or each of its
//! subdirectories, as datasets created ON_DEMAND and starts their `integrated` workflows.
//!
//! Unlike the original (spec J.6): `--dry-run` changes nothing, invalid input is an error
//! (exit code 2), requests go in batches of at most 100, and names are compared after the
//! registry's normalization. A dataset that exists already is continued (its workflow started
//! when it has none) only if it is this command's own: registered on demand by the service
//! user (spec C.6 step 6; the original's filter let every candidate through). With
//! `--project-id`, the datasets are associated with the project through
//! `PATCH projects/{id}/datasets`, because the bulk create ignores `project_id` (spec E.2).

use std::collections::BTreeMap;
use std::path::PathBuf;

use tracing::info;

use super::{Registered, register_and_start, start_integrated};
use crate::app::App;
use crate::model::{CreateMethod, DatasetName, DatasetType};
use crate::registry::{
    Creator, Dataset, DatasetQuery, MAX_BULK, NewDataset, Project, RegistryError,
};

#[derive(Debug, Clone)]
pub struct RegisterOptions {
    pub dir: PathBuf,
    pub dataset_type: DatasetType,
    pub ingest_subdirs: bool,
    pub prefix: Option<String>,
    pub suffix: Option<String>,
    pub description: Option<String>,
    /// A project (id or slug) to associate the datasets with.
    pub project_id: Option<String>,
    pub dry_run: bool,
}

/// Input that cannot be registered; the command exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct InvalidInput(pub Vec<String>);

/// One directory and the dataset name it gets.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub dir: PathBuf,
    pub name: DatasetName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Registered {
        id: i64,
        workflow_id: Option<String>,
    },
    /// Registered before; its workflow was started now (it had none).
    WorkflowStarted {
        id: i64,
        workflow_id: Option<String>,
    },
    AlreadyRegistered {
        id: i64,
    },
    /// Registered otherwise than on demand by the service user: not this command's to
    /// continue, left alone.
    Foreign {
        id: i64,
    },
    WouldRegister,
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct RegisterReport {
    pub results: Vec<(Candidate, Outcome)>,
    /// The project the datasets were (or, in a dry run, would be) associated with.
    pub association: Option<Association>,
}

#[derive(Debug, Clone)]
pub struct Association {
    pub project: Project,
    /// The datasets associated (in a dry run: none).
    pub datasets: Vec<i64>,
    /// Why the association failed, if it did.
    pub error: Option<String>,
}

impl RegisterReport {
    pub fn started_workflows(&self) -> Vec<String> {
        self.results
            .iter()
            .filter_map(|(_, outcome)| match outcome {
                Outcome::Registered { workflow_id, .. }
                | Outcome::WorkflowStarted { workflow_id, .. } => workflow_id.clone(),
                _ => None,
            })
            .collect()
    }

    pub fn failures(&self) -> usize {
        let association = self.association.as_ref().is_some_and(|a| a.error.is_some());
        usize::from(association)
            + self
                .results
                .iter()
                .filter(|(_, o)| {
                    matches!(
                        o,
                        Outcome::Failed(_)
                            | Outcome::Registered {
                                workflow_id: None,
                                ..
                            }
                            | Outcome::WorkflowStarted {
                                workflow_id: None,
                                ..
                            }
                    )
                })
                .count()
    }
}

/// `prefix-dirname-suffix`, leaving out empty parts (the original's `new_name`).
pub fn compose_name(prefix: Option<&str>, dir_name: &str, suffix: Option<&str>) -> String {
    [
        prefix.unwrap_or_default(),
        dir_name,
        suffix.unwrap_or_default(),
    ]
    .into_iter()
    .filter(|part| !part.is_empty())
    .collect::<Vec<_>>()
    .join("-")
}

/// Checks the input and works out the datasets to register. Every problem is reported.
pub fn candidates(opts: &RegisterOptions) -> Result<Vec<Candidate>, InvalidInput> {
    let mut problems = Vec::new();
    if let Some(project) = &opts.project_id
        && (project.trim().is_empty() || project.chars().any(char::is_whitespace))
    {
        problems.push(format!(
            "--project-id `{project}`: a project id must not be blank or hold whitespace"
        ));
    }
    if !opts.dir.is_dir() {
        return Err(InvalidInput(vec![format!(
            "`{}` is not a directory",
            opts.dir.display()
        )]));
    }
    let dir = std::fs::canonicalize(&opts.dir).map_err(|err| {
        InvalidInput(vec![format!(
            "cannot resolve `{}`: {err}",
            opts.dir.display()
        )])
    })?;
    let dirs: Vec<PathBuf> = if opts.ingest_subdirs {
        let entries = std::fs::read_dir(&dir)
            .map_err(|err| InvalidInput(vec![format!("cannot list `{}`: {err}", dir.display())]))?;
        let mut subdirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        subdirs.sort();
        if subdirs.is_empty() {
            return Err(InvalidInput(vec![format!(
                "`{}` has no subdirectories to register (--ingest-subdirs)",
                dir.display()
            )]));
        }
        subdirs
    } else {
        vec![dir]
    };
    let mut out = Vec::new();
    let mut by_name: BTreeMap<DatasetName, PathBuf> = BTreeMap::new();
    for path in dirs {
        let Some(dir_name) = path.file_name().and_then(|n| n.to_str()) else {
            problems.push(format!(
                "`{}`: the directory name is not valid UTF-8",
                path.display()
            ));
            continue;
        };
        let raw = compose_name(opts.prefix.as_deref(), dir_name, opts.suffix.as_deref());
        match DatasetName::normalize(&raw) {
            Ok(name) => {
                if let Some(other) = by_name.insert(name.clone(), path.clone()) {
                    problems.push(format!(
                        "`{}` and `{}` would both be registered as `{name}`",
                        other.display(),
                        path.display()
                    ));
                }
                let dir = std::fs::canonicalize(&path).unwrap_or(path);
                out.push(Candidate { dir, name });
            }
            Err(err) => problems.push(format!("`{}`: {err}", path.display())),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(InvalidInput(problems))
    }
}

async fn existing(
    app: &App,
    name: &DatasetName,
    dataset_type: DatasetType,
) -> anyhow::Result<Option<Dataset>> {
    let query = DatasetQuery {
        dataset_type: Some(dataset_type),
        name: Some(name.clone()),
        ..Default::default()
    };
    Ok(app.registry.find(&query).await?.into_iter().next())
}

/// Whether any of the dataset's workflows is an `integrated` one.
async fn has_integrated(app: &App, dataset: &Dataset) -> anyhow::Result<bool> {
    for id in &dataset.workflows {
        if let Some(workflow) = app.store.workflow(id).await?
            && workflow.name == "integrated"
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether an existing dataset is this command's own (spec C.6 step 6): registered on demand
/// by the service user.
async fn is_ours(app: &App, dataset: &Dataset) -> anyhow::Result<bool> {
    if dataset.create_method != Some(CreateMethod::OnDemand) {
        return Ok(false);
    }
    Ok(match app.registry.created_by(dataset.id).await? {
        Creator::Service => true,
        Creator::User(name) => name == app.settings.service_user,
        Creator::Unknown => false,
    })
}

/// What becomes of a dataset that exists already: one of ours left without a workflow (a
/// crash, or the original's bugs) gets it now; another's is left alone.
async fn continue_existing(app: &App, dataset: &Dataset, dry_run: bool) -> anyhow::Result<Outcome> {
    if !is_ours(app, dataset).await? {
        return Ok(Outcome::Foreign { id: dataset.id });
    }
    if has_integrated(app, dataset).await? {
        return Ok(Outcome::AlreadyRegistered { id: dataset.id });
    }
    Ok(if dry_run {
        Outcome::WouldRegister
    } else {
        Outcome::WorkflowStarted {
            id: dataset.id,
            workflow_id: start_integrated(app, dataset).await,
        }
    })
}

/// The project `--project-id` names; a project that does not exist, or a registry without
/// projects, is invalid input (exit code 2).
async fn find_project(app: &App, id_or_slug: &str) -> anyhow::Result<Project> {
    match app.registry.project(id_or_slug).await {
        Ok(project) => Ok(project),
        Err(RegistryError::Invalid(message)) => Err(InvalidInput(vec![message]).into()),
        Err(err) => {
            Err(anyhow::Error::new(err)
                .context(format!("cannot look up the project `{id_or_slug}`")))
        }
    }
}

/// Associates this command's datasets with the project, in requests of at most `MAX_BULK`.
async fn associate(app: &App, project: Project, results: &[(Candidate, Outcome)]) -> Association {
    let ids: Vec<i64> = results
        .iter()
        .filter_map(|(_, outcome)| match outcome {
            Outcome::Registered { id, .. }
            | Outcome::WorkflowStarted { id, .. }
            | Outcome::AlreadyRegistered { id } => Some(*id),
            _ => None,
        })
        .collect();
    let mut datasets = Vec::new();
    for chunk in ids.chunks(MAX_BULK) {
        if let Err(err) = app.registry.add_to_project(&project.id, chunk).await {
            let error = format!("{:#}", anyhow::Error::new(err));
            return Association {
                project,
                datasets,
                error: Some(error),
            };
        }
        datasets.extend_from_slice(chunk);
    }
    info!(project = %project.id, datasets = datasets.len(), "Associated the datasets with the project.");
    Association {
        project,
        datasets,
        error: None,
    }
}

pub async fn run(app: &App, opts: &RegisterOptions) -> anyhow::Result<RegisterReport> {
    // Listing and resolving directories is file-system work: off the runtime threads.
    let listed = opts.clone();
    let candidates = crate::compute::blocking(move || candidates(&listed)).await?;
    let project = match &opts.project_id {
        Some(id) => Some(find_project(app, id.trim()).await?),
        None => None,
    };
    let mut results = Vec::new();
    let mut to_create = Vec::new();
    for candidate in candidates {
        match existing(app, &candidate.name, opts.dataset_type).await? {
            Some(dataset) => {
                let outcome = continue_existing(app, &dataset, opts.dry_run).await?;
                results.push((candidate, outcome));
            }
            None if opts.dry_run => results.push((candidate, Outcome::WouldRegister)),
            None => to_create.push(candidate),
        }
    }
    if !to_create.is_empty() {
        let items: Vec<NewDataset> = to_create
            .iter()
            .map(|c| NewDataset {
                name: c.name.clone(),
                dataset_type: opts.dataset_type,
                origin_path: c.dir.to_string_lossy().into_owned(),
                create_method: CreateMethod::OnDemand,
                description: opts.description.clone(),
                metadata: None,
            })
            .collect();
        let (registered, outcome, failed) =
            register_and_start(app, &items, &crate::cancel::CancellationToken::new()).await;
        for candidate in to_create {
            let result = if let Some(Registered {
                id, workflow_id, ..
            }) = registered
                .iter()
                .find(|r| r.name == candidate.name.as_str())
            {
                info!(dataset_id = id, name = %candidate.name, dir = %candidate.dir.display(), "Registered.");
                Outcome::Registered {
                    id: *id,
                    workflow_id: workflow_id.clone(),
                }
            } else if let Some((_, reason)) =
                failed.iter().find(|(n, _)| n == candidate.name.as_str())
            {
                Outcome::Failed(reason.clone())
            } else if outcome.conflicted.iter().any(|(n, _)| n == &candidate.name) {
                // Registered by someone else (or another run of this command) between our
                // look-up and the create.
                match existing(app, &candidate.name, opts.dataset_type).await? {
                    Some(dataset) => continue_existing(app, &dataset, opts.dry_run).await?,
                    None => Outcome::Failed("reported as a conflict, then not found".to_owned()),
                }
            } else {
                let reason = outcome
                    .errored
                    .iter()
                    .find(|(n, _, _)| n == &candidate.name)
                    .map_or_else(
                        || "not in the registry's answer".to_owned(),
                        |(_, _, r)| r.clone(),
                    );
                Outcome::Failed(reason)
            };
            results.push((candidate, result));
        }
    }
    let association = match project {
        Some(project) if opts.dry_run => Some(Association {
            project,
            datasets: Vec::new(),
            error: None,
        }),
        Some(project) => Some(associate(app, project, &results).await),
        None => None,
    };
    Ok(RegisterReport {
        results,
        association,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_join_the_non_empty_parts() {
        assert_eq!(compose_name(None, "run1", None), "run1");
        assert_eq!(compose_name(Some("P"), "run1", None), "P-run1");
        assert_eq!(compose_name(None, "run1", Some("S")), "run1-S");
        assert_eq!(compose_name(Some("P"), "run1", Some("S")), "P-run1-S");
        assert_eq!(compose_name(Some(""), "run1", Some("")), "run1");
    }

    #[test]
    fn invalid_input_lists_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a.b")).unwrap();
        std::fs::create_dir(dir.path().join("a-b")).unwrap();
        std::fs::create_dir(dir.path().join("x".repeat(250))).unwrap();
        let opts = RegisterOptions {
            dir: dir.path().to_path_buf(),
            dataset_type: DatasetType::RawData,
            ingest_subdirs: true,
            prefix: None,
            suffix: None,
            description: None,
            project_id: Some("has space".to_owned()),
            dry_run: true,
        };
        let problems = candidates(&opts).unwrap_err().0.join("\n");
        assert!(
            problems.contains("would both be registered as `a-b`"),
            "{problems}"
        );
        assert!(
            problems.contains("bytes long after normalization"),
            "{problems}"
        );
        assert!(
            problems.contains("--project-id `has space`: a project id must not be blank"),
            "{problems}"
        );
        let opts = RegisterOptions {
            project_id: None,
            ..opts
        };

        let empty = tempfile::tempdir().unwrap();
        let opts = RegisterOptions {
            dir: empty.path().to_path_buf(),
            ..opts
        };
        assert!(candidates(&opts).unwrap_err().0[0].contains("has no subdirectories"));
        let opts = RegisterOptions {
            dir: empty.path().join("missing"),
            ..opts
        };
        assert!(candidates(&opts).unwrap_err().0[0].contains("is not a directory"));
    }
}

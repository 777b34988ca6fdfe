//! Workflow definitions: the `jobs/<name>.toml` files operators read and edit.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Deserialize;

use crate::steps::Task;
use crate::store::{StepSpec, WorkflowSpec};

/// The definitions the workers must have.
pub const REQUIRED: [&str; 3] = ["integrated", "stage", "delete"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    name: String,
    description: Option<String>,
    steps: Vec<RawStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    task: String,
    queue: Option<String>,
    kwargs: Option<toml::Table>,
    priority: Option<u8>,
}

/// Every workflow definition, by name.
#[derive(Debug, Clone, Default)]
pub struct Definitions {
    by_name: BTreeMap<String, WorkflowSpec>,
}

impl Definitions {
    pub fn get(&self, name: &str) -> Option<&WorkflowSpec> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// `workflows.integrated.qc`: inserts a `qc` step (task `generate_qc`) into `integrated`
    /// right after its `setup_dataset_download` step (at the end when it has none), unless
    /// the definition already runs `generate_qc`. A site switch rather than an edit of
    /// `integrated.toml`, so that the shipped definition stays the same everywhere.
    pub fn add_integrated_qc(&mut self) {
        let Some(spec) = self.by_name.get_mut("integrated") else {
            return;
        };
        let qc = Task::GenerateQc.name();
        if spec.steps.iter().any(|step| step.task == qc) {
            return;
        }
        let at = spec
            .steps
            .iter()
            .position(|step| step.task == Task::SetupDownload.name())
            .map_or(spec.steps.len(), |idx| idx + 1);
        spec.steps.insert(
            at,
            StepSpec {
                name: "qc".to_owned(),
                task: qc.to_owned(),
                queue: None,
                kwargs: None,
                priority: None,
            },
        );
    }

    /// Loads every `*.toml` file of `dir`. All problems are returned at once, each naming its
    /// file.
    pub fn load(dir: &Path) -> Result<Definitions, Vec<String>> {
        let mut problems = Vec::new();
        let mut by_name = BTreeMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) => {
                return Err(vec![format!(
                    "{}: cannot read the workflow definitions: {err}",
                    dir.display()
                )]);
            }
        };
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        for file in files {
            let shown = file.display().to_string();
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(err) => {
                    problems.push(format!("{shown}: cannot read: {err}"));
                    continue;
                }
            };
            let raw: RawWorkflow = match toml::from_str(&text) {
                Ok(raw) => raw,
                Err(err) => {
                    problems.push(format!("{shown}: {}", err.to_string().trim_end()));
                    continue;
                }
            };
            let stem = file
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            match check(raw, &stem) {
                Ok(spec) => {
                    by_name.insert(spec.name.clone(), spec);
                }
                Err(errs) => problems.extend(errs.into_iter().map(|e| format!("{shown}: {e}"))),
            }
        }
        for name in REQUIRED {
            if !by_name.contains_key(name) {
                problems.push(format!(
                    "{}: the `{name}` workflow is not defined ({name}.toml)",
                    dir.display()
                ));
            }
        }
        if problems.is_empty() {
            Ok(Definitions { by_name })
        } else {
            Err(problems)
        }
    }
}

/// The checks sca-rhythm makes when a workflow is created (spec F.2), plus known task names.
fn check(raw: RawWorkflow, stem: &str) -> Result<WorkflowSpec, Vec<String>> {
    let mut errors = Vec::new();
    if raw.name.trim().is_empty() {
        errors.push("name: must not be empty".to_owned());
    } else if raw.name != stem {
        errors.push(format!(
            "name: `{}` must match the file name `{stem}`",
            raw.name
        ));
    }
    if raw.steps.is_empty() {
        errors.push("steps: a workflow needs at least one step".to_owned());
    }
    let mut seen = HashSet::new();
    let mut steps = Vec::new();
    for (idx, step) in raw.steps.into_iter().enumerate() {
        let at = format!("steps[{idx}]");
        if step.name.trim().is_empty() {
            errors.push(format!("{at}.name: must not be empty"));
        } else if !seen.insert(step.name.clone()) {
            errors.push(format!(
                "{at}.name: `{}` is used by another step",
                step.name
            ));
        }
        if Task::from_name(&step.task).is_none() {
            errors.push(format!(
                "{at}.task: `{}` is not a task the workers run ({})",
                step.task,
                Task::names()
            ));
        }
        if let Some(priority) = step.priority
            && priority > 9
        {
            errors.push(format!(
                "{at}.priority: {priority} is above the highest priority 9"
            ));
        }
        let kwargs = step.kwargs.map(|table| match serde_json::to_value(table) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        });
        steps.push(StepSpec {
            name: step.name,
            task: step.task,
            queue: step.queue,
            kwargs,
            priority: step.priority,
        });
    }
    if errors.is_empty() {
        Ok(WorkflowSpec {
            name: raw.name,
            description: raw.description,
            steps,
        })
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn the_shipped_definitions_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
        let defs = Definitions::load(&dir).unwrap();
        let integrated = defs.get("integrated").unwrap();
        let names: Vec<_> = integrated.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "await stability",
                "inspect",
                "archive",
                "stage",
                "validate",
                "setup_download"
            ]
        );
        let stage: Vec<_> = defs
            .get("stage")
            .unwrap()
            .steps
            .iter()
            .map(|s| s.task.as_str())
            .collect();
        assert_eq!(
            stage,
            [
                "stage_dataset",
                "validate_dataset",
                "setup_dataset_download"
            ]
        );
    }

    #[test]
    fn the_qc_switch_adds_one_step_after_setup_download() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
        let mut defs = Definitions::load(&dir).unwrap();
        defs.add_integrated_qc();
        defs.add_integrated_qc();
        let tasks: Vec<_> = defs
            .get("integrated")
            .unwrap()
            .steps
            .iter()
            .map(|s| s.task.as_str())
            .collect();
        assert_eq!(
            tasks[tasks.len() - 2..],
            ["setup_dataset_download", "generate_qc"]
        );
        assert_eq!(tasks.iter().filter(|t| **t == "generate_qc").count(), 1);
        let qc = defs.get("qc").unwrap();
        assert_eq!(qc.steps.len(), 1);
        assert_eq!(qc.steps[0].task, "generate_qc");
    }

    #[test]
    fn every_problem_is_reported_with_its_file() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "integrated.toml",
            "name = \"integrated\"\n[[steps]]\nname = \"a\"\ntask = \"no_such_task\"\n[[steps]]\nname = \"a\"\ntask = \"inspect_dataset\"\n",
        );
        write(dir.path(), "stage.toml", "name = \"other\"\nsteps = []\n");
        write(dir.path(), "broken.toml", "name = \n");
        let problems = Definitions::load(dir.path()).unwrap_err();
        let all = problems.join("\n");
        for expected in [
            "integrated.toml: steps[0].task: `no_such_task` is not a task",
            "integrated.toml: steps[1].name: `a` is used by another step",
            "stage.toml: name: `other` must match the file name `stage`",
            "stage.toml: steps: a workflow needs at least one step",
            "broken.toml:",
            "the `delete` workflow is not defined",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }
}

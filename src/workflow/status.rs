//! Workflow status derived from task results, as sca-rhythm derives it (spec F.4). Pure.

use std::collections::HashMap;

use crate::store::{TaskMeta, TaskStatus, Workflow};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedStatus {
    pub status: TaskStatus,
    /// Status of each step: its last run's result, PENDING without one.
    pub steps: Vec<TaskStatus>,
    /// The first step that has not succeeded.
    pub pending: Option<usize>,
    /// The index of the pending step, or the number of steps when all succeeded.
    pub steps_done: usize,
}

pub fn derive(workflow: &Workflow, metas: &HashMap<String, TaskMeta>) -> DerivedStatus {
    let steps: Vec<TaskStatus> = workflow
        .steps
        .iter()
        .map(|step| match step.last_run() {
            Some(run) => metas
                .get(&run.task_id)
                .map_or(TaskStatus::Pending, |m| m.status),
            None => TaskStatus::Pending,
        })
        .collect();
    let pending = steps.iter().position(|s| *s != TaskStatus::Success);
    let status = match pending {
        None => TaskStatus::Success,
        Some(0) if steps[0] == TaskStatus::Pending => TaskStatus::Pending,
        Some(idx) => match steps[idx] {
            TaskStatus::Started | TaskStatus::Retry | TaskStatus::Pending => TaskStatus::Started,
            other => other,
        },
    };
    DerivedStatus {
        status,
        steps_done: pending.unwrap_or(steps.len()),
        pending,
        steps,
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::store::{StepSpec, TaskRun, WorkflowStep};

    fn workflow(runs: &[Option<&str>]) -> Workflow {
        Workflow {
            id: "w".into(),
            name: "integrated".into(),
            app_id: "app".into(),
            description: None,
            created_at: Utc::now(),
            updated_at: None,
            status_cache: TaskStatus::Pending,
            resume_lock: None,
            start_args: vec![],
            steps: runs
                .iter()
                .enumerate()
                .map(|(idx, run)| WorkflowStep {
                    spec: StepSpec {
                        name: format!("s{idx}"),
                        task: "t".into(),
                        queue: None,
                        kwargs: None,
                        priority: None,
                    },
                    runs: run
                        .iter()
                        .map(|id| TaskRun {
                            task_id: id.to_string(),
                            date_start: Utc::now(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn metas(entries: &[(&str, TaskStatus)]) -> HashMap<String, TaskMeta> {
        entries
            .iter()
            .map(|(id, status)| {
                (
                    id.to_string(),
                    TaskMeta {
                        task_id: id.to_string(),
                        status: *status,
                        result: serde_json::Value::Null,
                        traceback: None,
                        date_done: None,
                        name: None,
                        args: vec![],
                        kwargs: Default::default(),
                        worker: None,
                        retries: 0,
                        queue: None,
                        starts: 0,
                    },
                )
            })
            .collect()
    }

    /// Runs of each step, task results, expected status and steps done.
    type Case = (
        Vec<Option<&'static str>>,
        Vec<(&'static str, TaskStatus)>,
        TaskStatus,
        usize,
    );

    #[test]
    fn statuses_follow_sca_rhythm() {
        use TaskStatus::*;
        let cases: Vec<Case> = vec![
            (vec![None, None], vec![], Pending, 0),
            // Published but no result yet: the first step reads PENDING.
            (vec![Some("a"), None], vec![], Pending, 0),
            (vec![Some("a"), None], vec![("a", Started)], Started, 0),
            (vec![Some("a"), None], vec![("a", Retry)], Started, 0),
            // A later step not yet started counts as STARTED.
            (vec![Some("a"), None], vec![("a", Success)], Started, 1),
            (
                vec![Some("a"), Some("b")],
                vec![("a", Success), ("b", Failure)],
                Failure,
                1,
            ),
            (
                vec![Some("a"), Some("b")],
                vec![("a", Success), ("b", Revoked)],
                Revoked,
                1,
            ),
            (
                vec![Some("a"), Some("b")],
                vec![("a", Success), ("b", Success)],
                Success,
                2,
            ),
        ];
        for (runs, results, want, done) in cases {
            let derived = derive(&workflow(&runs), &metas(&results));
            assert_eq!(
                (derived.status, derived.steps_done),
                (want, done),
                "runs {runs:?} results {results:?}"
            );
        }
    }
}

//! `workers paths check [--create]` (spec C.9 `setup_dirs`): every configured directory, Exists
//! or Missing, with its key; `--create` makes the missing ones.

use std::process::ExitCode;

use anyhow::Context;

use super::Failed;
use crate::cli::PathsCommand;
use crate::config::Settings;

pub(super) fn run(settings: &Settings, cmd: PathsCommand) -> anyhow::Result<ExitCode> {
    let PathsCommand::Check { create } = cmd;
    let mut missing = Vec::new();
    for (key, path) in settings.directories() {
        let state = if path.is_dir() {
            "Exists"
        } else if path.exists() {
            // A file where a directory belongs: creating cannot fix it.
            missing.push(key.clone());
            "Not a directory"
        } else if create {
            std::fs::create_dir_all(&path)
                .with_context(|| format!("cannot create `{}` ({key})", path.display()))?;
            "Created"
        } else {
            missing.push(key.clone());
            "Missing"
        };
        say!("{state:<16} {key:<36} {}", path.display());
    }
    if missing.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    Err(Failed(format!(
        "{} configured directories are missing or not directories ({}); `workers paths check \
         --create` creates missing ones",
        missing.len(),
        missing.join(", ")
    ))
    .into())
}

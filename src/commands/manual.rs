//! `workers completions SHELL` and `workers man [--dir DIR]`: shell completions and manual
//! pages generated from the command line definitions, so they never disagree with `--help`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::Cli;

pub(super) fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "workers", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// The page of `workers` on standard output, or a page for it and for every subcommand (named
/// like `git`'s: `workers-jobs-run.1`) in `dir`.
pub(super) fn man(dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let command = Cli::command();
    match dir {
        None => clap_mangen::Man::new(command)
            .render(&mut std::io::stdout())
            .context("cannot write the manual page")?,
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create `{}`", dir.display()))?;
            write_pages(dir, command, "workers")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the page of `command` as `<name>.1` and recurses into its subcommands.
fn write_pages(dir: &Path, command: clap::Command, name: &str) -> anyhow::Result<()> {
    let command = command.name(name.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .with_context(|| format!("cannot render the page of `{name}`"))?;
    std::fs::write(&path, page).with_context(|| format!("cannot write `{}`", path.display()))?;
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        let sub_name = format!("{name}-{}", sub.get_name());
        write_pages(dir, sub.clone(), &sub_name)?;
    }
    Ok(())
}

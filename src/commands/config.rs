//! `workers config check` and `workers config show`.

use std::process::ExitCode;

use super::EXIT_USAGE;
use crate::cli::{ConfigCommand, ConfigFormat};
use crate::config::LoadOptions;
use crate::workflow::definitions::Definitions;

pub(super) fn run(load: &LoadOptions, cmd: &ConfigCommand) -> anyhow::Result<ExitCode> {
    let (settings, tree) = match crate::config::effective(load) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let definitions = Definitions::load(&settings.workflows_dir);
    match cmd {
        ConfigCommand::Check => {
            if let Err(problems) = &definitions {
                for problem in problems {
                    eprintln!("{problem}");
                }
                return Ok(ExitCode::from(EXIT_USAGE));
            }
            for warning in &settings.warnings {
                eprintln!("warning: {warning}");
            }
            say!("configuration is valid ({})", settings.sources.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Show { format } => {
            match format {
                ConfigFormat::Toml => print!("{}", toml::to_string_pretty(&tree)?),
                ConfigFormat::Json => println!("{}", serde_json::to_string_pretty(&tree)?),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

//! The `workers` binary: parses the command line and hands over to `workers::commands`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = workers::cli::Cli::parse();
    // The async side only waits on files, the database and timers; CPU work has its own pool.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(workers::commands::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            workers::commands::exit_code(&err)
        }
    }
}

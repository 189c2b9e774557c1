//! `polyhead`: command-line client of the polyhead inference service.
//!
//! Results go to stdout (text, or JSON with `--json`); failures print one `error: ...` line to
//! stderr and exit with status 1, usage errors with status 2.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse_valid(std::env::args_os()) {
        Ok(args) => args,
        Err(err) => err.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", cli::render_error(&err));
            ExitCode::FAILURE
        }
    }
}

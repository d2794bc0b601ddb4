use std::process::ExitCode;

use tracer::{cli, daemon, privileges};

fn main() -> ExitCode {
    let cli = match cli::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help / --version
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!(
                "tracer: {}",
                cli::one_line(&err).trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    match cli.command {
        cli::Command::Run(args) => {
            env_logger::Builder::new()
                .filter_level(args.log_level)
                .target(env_logger::Target::Stderr)
                .init();
            let missing = privileges::missing(privileges::effective());
            if !missing.is_empty() {
                eprintln!(
                    "tracer: run needs root or these capabilities, missing: {}",
                    missing.join(", ")
                );
                return ExitCode::from(1);
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    eprintln!("tracer: cannot start the runtime: {err}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(daemon::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("tracer: {err:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

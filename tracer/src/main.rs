use std::process::ExitCode;

use tracer::{
    cmd::check, cmd::list, cmd::top, config::cli, config::cli::RunArgs, daemon, kernel::privileges,
};

fn main() -> ExitCode {
    // Everything is parsed and validated (config file included) before anything is attached.
    let cli = match cli::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(cli::CliError::Info(info)) => {
            // --help / --version
            #[allow(
                clippy::let_underscore_must_use,
                reason = "nothing to tell if stdout is closed"
            )]
            let _ = info.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("tracer: {err}");
            return ExitCode::from(err.exit_code());
        }
    };
    match cli.command {
        cli::Command::Run(args) => run(args),
        cli::Command::List(args) => exit_with(list::run(
            &args,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr(),
        )),
        cli::Command::Top(args) => exit_with(top::run(&args)),
        cli::Command::Check => check(),
    }
}

fn run(args: RunArgs) -> ExitCode {
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
    // The main loop runs on this thread; one worker serves /metrics, so a burst of kernel
    // records never delays a scrape.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("tracer: cannot start the runtime: {err}");
            return ExitCode::from(1);
        }
    };
    exit_with(runtime.block_on(daemon::run(args)))
}

fn check() -> ExitCode {
    let checks = check::run_checks();
    for c in &checks {
        println!(
            "{:<5} {:<13} {}",
            if c.ok { "ok" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    if checks.iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Exit 0, or 1 with the error chain on one line.
fn exit_with(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tracer: {}", check::one_line(&format!("{err:#}")));
            ExitCode::from(1)
        }
    }
}

//! Command line: subcommands and their options, validated before anything is attached.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tracer",
    version,
    about = "eBPF connection tracer and leak detector for PostgreSQL clients"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the probes and stream connection events until SIGINT/SIGTERM.
    Run(RunArgs),
}

#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// TCP ports that count as Postgres / PgBouncer (repeatable or comma list).
    #[arg(long = "port", value_name = "P", value_delimiter = ',', value_parser = parse_port,
          default_values_t = [5432u16, 6432u16])]
    pub ports: Vec<u16>,
    /// Where JSON events go: `-` for stdout, or a file path (appended).
    #[arg(long, value_name = "DEST", default_value = "-")]
    pub events: EventsDest,
    /// Log level for stderr: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: log::LevelFilter,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventsDest {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for EventsDest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("empty events destination".into()),
            "-" => Ok(Self::Stdout),
            path => Ok(Self::File(path.into())),
        }
    }
}

pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u64>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(_) => Err("ports are 1-65535".into()),
        Err(_) => Err("not a port number".into()),
    }
}

fn parse_log_level(s: &str) -> Result<log::LevelFilter, String> {
    match s {
        "error" | "warn" | "info" | "debug" | "trace" => {
            s.parse().map_err(|_| "unknown log level".to_owned())
        }
        _ => Err("expected error, warn, info, debug or trace".into()),
    }
}

impl RunArgs {
    /// Watched ports, sorted, without duplicates.
    pub fn unique_ports(&self) -> Vec<u16> {
        let mut ports = self.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// Parses the command line; on bad input returns the one line to print (exit code 2).
pub fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(args)
}

/// The first line of a clap error: one clear line naming the bad value.
pub fn one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    rendered
        .lines()
        .next()
        .unwrap_or("error: bad command line")
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, String> {
        let mut argv = vec!["tracer", "run"];
        argv.extend_from_slice(args);
        match parse(argv) {
            Ok(Cli {
                command: Command::Run(a),
            }) => Ok(a),
            Err(e) => Err(one_line(&e)),
        }
    }

    #[test]
    fn defaults_follow_the_spec() {
        let a = run_args(&[]).expect("parses");
        assert_eq!(a.unique_ports(), vec![5432, 6432]);
        assert_eq!(a.events, EventsDest::Stdout);
        assert_eq!(a.log_level, log::LevelFilter::Info);
    }

    #[test]
    fn ports_repeat_and_split_on_commas() {
        let a = run_args(&["--port", "6432,5432", "--port", "15432", "--port", "5432"])
            .expect("parses");
        assert_eq!(a.unique_ports(), vec![5432, 6432, 15432]);
    }

    #[test]
    fn bad_input_is_one_line_naming_the_value() {
        for (args, needle) in [
            (vec!["--port", "0"], "'0'"),
            (vec!["--port", "65536"], "'65536'"),
            (vec!["--port", "abc"], "'abc'"),
            (vec!["--port", "5432,-1"], "'-1'"),
            (vec!["--log-level", "loud"], "'loud'"),
            (vec!["--events", ""], "--events"),
            (vec!["--bogus"], "--bogus"),
        ] {
            let err = run_args(&args).expect_err("rejected");
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}

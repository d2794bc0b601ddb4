//! Command line: subcommands and their options, merged with `--config FILE` and validated
//! before anything is attached. Value parsers and the file format live in `config`.
//!
//! Flags are parsed into `Option`s (so that "not given" is visible), the file into the same
//! shape, and [`RunArgs`] takes each option from the flags, else the file, else the default.

use std::{ffi::OsStr, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand, builder::TypedValueParser, error::ErrorKind};

pub use crate::config::EventsDest;
use crate::{
    config::{self, RunSettings, shown},
    export::web_config::WebConfig,
    host::redact::CmdlineMode,
};

/// The validated command line.
#[derive(Clone, Debug)]
pub struct Cli {
    pub command: Command,
}

#[derive(Clone, Debug)]
pub enum Command {
    Run(RunArgs),
    List(ListArgs),
    Top(TopArgs),
    Check,
}

/// `tracer run`: every option resolved (flag, else config file, else default) and valid.
#[derive(Clone, Debug, PartialEq)]
pub struct RunArgs {
    /// Sorted, without duplicates.
    pub ports: Vec<u16>,
    pub unix_socket_glob: String,
    pub events: EventsDest,
    /// `None`: `--metrics-addr off`.
    pub metrics_addr: Option<SocketAddr>,
    pub stall_after: Duration,
    pub idle_in_transaction_after: Duration,
    pub close_wait_after: Duration,
    pub idle_after: Duration,
    pub log_level: log::LevelFilter,
    /// Event stream format.
    pub format: crate::export::events::EventFormat,
    pub max_label_sets: usize,
    pub max_connections: u32,
    pub state_dir: config::StateDirSetting,
    /// What of a process's command line events carry.
    pub cmdline: CmdlineMode,
    /// `--web-config`, read and checked: TLS and basic auth of the metrics endpoint.
    pub web_config: Option<Arc<WebConfig>>,
    /// The file the options were read from, if any.
    pub config: Option<PathBuf>,
}

impl Default for RunArgs {
    /// The SPEC defaults.
    fn default() -> Self {
        Self {
            ports: config::DEFAULT_PORTS.to_vec(),
            unix_socket_glob: config::DEFAULT_UNIX_SOCKET_GLOB.to_owned(),
            events: EventsDest::Stdout,
            metrics_addr: Some(config::DEFAULT_METRICS_ADDR),
            stall_after: config::DEFAULT_STALL_AFTER,
            idle_in_transaction_after: config::DEFAULT_IDLE_IN_TRANSACTION_AFTER,
            close_wait_after: config::DEFAULT_CLOSE_WAIT_AFTER,
            idle_after: config::DEFAULT_IDLE_AFTER,
            log_level: config::DEFAULT_LOG_LEVEL,
            format: crate::export::events::EventFormat::Json,
            max_label_sets: config::DEFAULT_MAX_LABEL_SETS,
            max_connections: config::DEFAULT_MAX_CONNECTIONS,
            state_dir: config::StateDirSetting::Default,
            cmdline: CmdlineMode::default(),
            web_config: None,
            config: None,
        }
    }
}

impl RunArgs {
    /// Each option from `flags`, else from `file`, else the default. The web config file is
    /// read by [`parse`], not here.
    pub fn merge(flags: RunSettings, file: RunSettings, config: Option<PathBuf>) -> Self {
        let d = Self::default();
        let mut ports = flags.ports.or(file.ports).unwrap_or(d.ports);
        ports.sort_unstable();
        ports.dedup();
        // The flag, else the file, else the default.
        macro_rules! pick {
            ($field:ident) => {
                flags.$field.or(file.$field).unwrap_or(d.$field)
            };
        }
        Self {
            ports,
            unix_socket_glob: pick!(unix_socket_glob),
            events: pick!(events),
            metrics_addr: pick!(metrics_addr),
            stall_after: pick!(stall_after),
            idle_in_transaction_after: pick!(idle_in_transaction_after),
            close_wait_after: pick!(close_wait_after),
            idle_after: pick!(idle_after),
            log_level: pick!(log_level),
            format: pick!(format),
            max_label_sets: pick!(max_label_sets),
            max_connections: pick!(max_connections),
            state_dir: pick!(state_dir),
            cmdline: pick!(cmdline),
            web_config: None,
            config,
        }
    }

    /// Watched ports, sorted, without duplicates.
    pub fn unique_ports(&self) -> Vec<u16> {
        let mut ports = self.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// `tracer list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListArgs {
    pub json: bool,
    /// Sorted, without duplicates.
    pub ports: Vec<u16>,
    pub unix_socket_glob: String,
    pub cmdline: CmdlineMode,
    /// The daemon to ask first; `None`: `--metrics-addr off`, the socket tables only.
    pub metrics_addr: Option<SocketAddr>,
}

/// `tracer top`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopArgs {
    /// The daemon's metrics address, where its live table is served.
    pub metrics_addr: SocketAddr,
}

/// Why parsing stopped.
#[derive(Debug)]
pub enum CliError {
    /// `--help` / `--version`: print it as clap renders it (stdout) and exit 0.
    Info(clap::Error),
    /// Bad input: print this one line (prefixed `tracer: `) on stderr and exit 2.
    Usage(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Info(_) => 0,
            Self::Usage(_) => 2,
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Info(info) => write!(f, "{}", info.render()),
            Self::Usage(line) => f.write_str(line),
        }
    }
}

/// Parses and validates the command line, reading `--config` if given.
pub fn parse<I, T>(args: I) -> Result<Cli, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let raw = RawCli::try_parse_from(args).map_err(|err| {
        if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            CliError::Usage(
                "missing subcommand: run, list, top or check (see tracer --help)".into(),
            )
        } else if err.use_stderr() {
            CliError::Usage(one_line(&err))
        } else {
            CliError::Info(err)
        }
    })?;
    let command = match raw.command {
        RawCommand::Run(flags) => {
            let file = match &flags.config {
                Some(path) => config::load(path)
                    .map_err(|e| CliError::Usage(config::flatten(&e.to_string())))?,
                None => RunSettings::default(),
            };
            let config = flags.config.clone();
            let flags = flags.into_settings();
            let web_config = flags.web_config.clone().or_else(|| file.web_config.clone());
            let mut args = RunArgs::merge(flags, file, config);
            // Certificates, keys and hashes are checked now, before anything is attached.
            args.web_config = web_config
                .map(|path| WebConfig::load(&path).map(Arc::new))
                .transpose()
                .map_err(|e| CliError::Usage(e.to_string()))?;
            Command::Run(args)
        }
        RawCommand::List(flags) => {
            let mut ports = if flags.watch.ports.is_empty() {
                config::DEFAULT_PORTS.to_vec()
            } else {
                flags.watch.ports
            };
            ports.sort_unstable();
            ports.dedup();
            Command::List(ListArgs {
                json: flags.json,
                ports,
                unix_socket_glob: flags
                    .watch
                    .unix_socket_glob
                    .unwrap_or_else(|| config::DEFAULT_UNIX_SOCKET_GLOB.to_owned()),
                cmdline: flags.cmdline.unwrap_or_default(),
                metrics_addr: flags
                    .metrics_addr
                    .map_or(Some(config::DEFAULT_METRICS_ADDR), |m| m.0),
            })
        }
        RawCommand::Top(flags) => Command::Top(TopArgs {
            metrics_addr: flags.metrics_addr.unwrap_or(config::DEFAULT_METRICS_ADDR),
        }),
        RawCommand::Check => Command::Check,
    };
    Ok(Cli { command })
}

/// The first line of a clap error, without clap's `error: ` prefix: one line naming the bad
/// value.
pub fn one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let first = rendered
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("bad command line");
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

// ---------------------------------------------------------------------------------------
// What clap sees

#[derive(Debug, Parser)]
#[command(
    name = "tracer",
    version,
    propagate_version = true,
    about = "eBPF connection tracer and leak detector for PostgreSQL clients"
)]
struct RawCli {
    #[command(subcommand)]
    command: RawCommand,
}

#[derive(Debug, Subcommand)]
enum RawCommand {
    /// Attach the probes and stream connection events and metrics until SIGINT/SIGTERM.
    #[command(after_help = RUN_AFTER_HELP)]
    Run(Box<RunFlags>),
    /// Print the Postgres connections open on this host right now, then exit.
    #[command(after_help = GLOB_HELP)]
    List(ListFlags),
    /// Live terminal view of a running daemon's connections, by process or container.
    Top(TopFlags),
    /// Check that this kernel and these privileges can `run`; one line per check.
    Check,
}

const RUN_AFTER_HELP: &str = "\
Config file (--config FILE): TOML, one key per option, the long flag name with '_' for '-':
  port = [5432, 6432]    stall_after = \"5s\"    metrics_addr = \"off\"
Flags win over the file, the file over the defaults.

Durations: an integer and a unit (ms, s, m, h), e.g. 500ms, 5s, 2m, 1h, 1m30s.
Unix-socket glob: `*` matches any characters, `/` included; `?` one character;
`[a-z]`, `[!a-z]` one character of a class; `\\x` the character x.";

const GLOB_HELP: &str = "\
Unix-socket glob: `*` matches any characters, `/` included; `?` one character;
`[a-z]`, `[!a-z]` one character of a class; `\\x` the character x.";

/// Which sockets are Postgres: the same two flags on `run` and `list`.
#[derive(Debug, Args)]
struct WatchFlags {
    /// Postgres / PgBouncer TCP ports, repeatable or comma list [default: 5432,6432]
    #[arg(long = "port", value_name = "P", value_delimiter = ',',
          allow_hyphen_values = true,
          value_parser = Checked(config::parse_port))]
    ports: Vec<u16>,
    /// Unix-socket paths that count as Postgres (a glob, see below) [default:
    /// */.s.PGSQL.*]
    #[arg(long, value_name = "G", value_parser = Checked(config::parse_unix_socket_glob))]
    unix_socket_glob: Option<String>,
}

/// The four leak and stall thresholds take the same kind of value.
const THRESHOLD: Checked<Duration> = Checked(config::parse_threshold);

#[derive(Debug, Args)]
struct RunFlags {
    /// TOML file with any of these options; flags given here win over it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    watch: WatchFlags,
    /// Where JSON events go: `-` for stdout, or a file path (appended) [default: -]
    #[arg(long, value_name = "DEST", value_parser = EventsParser)]
    events: Option<EventsDest>,
    /// Prometheus endpoint, IP:PORT or [IPv6]:PORT, or `off` [default: 127.0.0.1:9433]
    #[arg(long, value_name = "ADDR", value_parser = Checked(parse_metrics_flag))]
    metrics_addr: Option<MetricsAddr>,
    /// A request unanswered this long is stalled [default: 5s]
    #[arg(long, value_name = "DUR", allow_hyphen_values = true, value_parser = THRESHOLD)]
    stall_after: Option<Duration>,
    /// Inside a transaction and silent this long = leak suspect [default: 30s]
    #[arg(long, value_name = "DUR", allow_hyphen_values = true, value_parser = THRESHOLD)]
    idle_in_transaction_after: Option<Duration>,
    /// Peer closed, local process has not, for this long = leak suspect [default: 10s]
    #[arg(long, value_name = "DUR", allow_hyphen_values = true, value_parser = THRESHOLD)]
    close_wait_after: Option<Duration>,
    /// No traffic at all for this long = leak suspect [default: 30m]
    #[arg(long, value_name = "DUR", allow_hyphen_values = true, value_parser = THRESHOLD)]
    idle_after: Option<Duration>,
    /// Logs on stderr: error, warn, info, debug or trace [default: info]
    #[arg(long, value_name = "LEVEL", value_parser = Checked(config::parse_log_level))]
    log_level: Option<log::LevelFilter>,
    /// Event stream format: json (one object per line) or text (one readable line per
    /// event) [default: json]
    #[arg(long, value_name = "FMT", value_parser = Checked(config::parse_format))]
    format: Option<crate::export::events::EventFormat>,
    /// Cap on Prometheus label sets; the rest go to comm="~other" [default: 1000]
    #[arg(long, value_name = "N", allow_hyphen_values = true,
          value_parser = Checked(config::parse_max_label_sets))]
    max_label_sets: Option<usize>,
    /// Capacity of the kernel connection table, 16-1048576 [default: 65536]
    #[arg(long, value_name = "N", allow_hyphen_values = true,
          value_parser = Checked(config::parse_max_connections))]
    max_connections: Option<u32>,
    /// Keeps what is known of open connections across restarts, or `off` [default:
    /// $STATE_DIRECTORY, else /var/lib/tracer, when writable]
    #[arg(long, value_name = "DIR", value_parser = Checked(config::parse_state_dir))]
    state_dir: Option<config::StateDirSetting>,
    /// Command lines in events: full, redacted (credentials replaced by <redacted>) or off
    /// [default: redacted]
    #[arg(long, value_name = "MODE", value_parser = Checked(config::parse_cmdline_mode))]
    cmdline: Option<CmdlineMode>,
    /// Prometheus exporter-toolkit web config (YAML: TLS, basic auth) for every HTTP endpoint
    #[arg(long, value_name = "FILE", value_parser = Checked(config::parse_web_config))]
    web_config: Option<PathBuf>,
}

impl RunFlags {
    fn into_settings(self) -> RunSettings {
        RunSettings {
            ports: (!self.watch.ports.is_empty()).then_some(self.watch.ports),
            unix_socket_glob: self.watch.unix_socket_glob,
            events: self.events,
            metrics_addr: self.metrics_addr.map(|m| m.0),
            stall_after: self.stall_after,
            idle_in_transaction_after: self.idle_in_transaction_after,
            close_wait_after: self.close_wait_after,
            idle_after: self.idle_after,
            log_level: self.log_level,
            format: self.format,
            max_label_sets: self.max_label_sets,
            max_connections: self.max_connections,
            state_dir: self.state_dir,
            cmdline: self.cmdline,
            web_config: self.web_config,
        }
    }
}

#[derive(Debug, Args)]
struct ListFlags {
    /// One JSON object per connection instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    watch: WatchFlags,
    /// Command lines in --json: full, redacted or off [default: redacted]
    #[arg(long, value_name = "MODE", value_parser = Checked(config::parse_cmdline_mode))]
    cmdline: Option<CmdlineMode>,
    /// The daemon to ask first (its live table has real states), or `off` for the socket
    /// tables only [default: 127.0.0.1:9433]
    #[arg(long, value_name = "ADDR", value_parser = Checked(parse_metrics_flag))]
    metrics_addr: Option<MetricsAddr>,
}

#[derive(Debug, Args)]
struct TopFlags {
    /// The daemon's metrics address, IP:PORT or [IPv6]:PORT [default: 127.0.0.1:9433]
    #[arg(long, value_name = "ADDR", value_parser = Checked(parse_daemon_addr))]
    metrics_addr: Option<SocketAddr>,
}

/// `tracer top` needs a daemon to draw: `off` is no address there.
fn parse_daemon_addr(s: &str) -> Result<SocketAddr, String> {
    config::parse_metrics_addr(s)?.ok_or_else(|| "top needs the daemon's IP:PORT".to_owned())
}

/// `Option<Option<_>>` means something else to clap; wrap the inner one.
#[derive(Clone, Debug)]
struct MetricsAddr(Option<SocketAddr>);

fn parse_metrics_flag(s: &str) -> Result<MetricsAddr, String> {
    config::parse_metrics_addr(s).map(MetricsAddr)
}

/// Runs a `config` parser on a flag value; on failure (non-UTF-8 included) the error names
/// the flag and the value on one line.
#[derive(Clone)]
struct Checked<T>(fn(&str) -> Result<T, String>);

impl<T: Clone + Send + Sync + 'static> TypedValueParser for Checked<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        let Some(s) = value.to_str() else {
            return Err(invalid(cmd, arg, value, "not valid UTF-8"));
        };
        (self.0)(s).map_err(|reason| invalid(cmd, arg, value, &reason))
    }
}

/// `-`, or a path (any bytes: paths need not be UTF-8).
#[derive(Clone)]
struct EventsParser;

impl TypedValueParser for EventsParser {
    type Value = EventsDest;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<EventsDest, clap::Error> {
        match value.to_str() {
            Some(s) => config::parse_events(s).map_err(|reason| invalid(cmd, arg, value, &reason)),
            None => Ok(EventsDest::File(PathBuf::from(value))),
        }
    }
}

fn invalid(
    cmd: &clap::Command,
    arg: Option<&clap::Arg>,
    value: &OsStr,
    reason: &str,
) -> clap::Error {
    let arg = arg.map_or_else(|| "...".to_owned(), ToString::to_string);
    let value = match value.to_str() {
        Some(s) => shown(s),
        None => value.as_encoded_bytes().escape_ascii().to_string(),
    };
    clap::Error::raw(
        ErrorKind::ValueValidation,
        format!("invalid value '{value}' for '{arg}': {reason}\n"),
    )
    .with_cmd(cmd)
}

#[cfg(test)]
mod tests;

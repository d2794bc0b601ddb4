//! The TOML file (`--config FILE`): read, checked value by value with the flags' parsers,
//! and every error on one line that says where.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

use crate::host::redact::CmdlineMode;

use super::*;

/// The values of `run` options that one source (the command line or the file) sets; `None`
/// where that source is silent. Flags are merged over the file, the file over the defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunSettings {
    pub ports: Option<Vec<u16>>,
    pub unix_socket_glob: Option<String>,
    pub events: Option<EventsDest>,
    pub metrics_addr: Option<Option<SocketAddr>>,
    pub stall_after: Option<Duration>,
    pub idle_in_transaction_after: Option<Duration>,
    pub close_wait_after: Option<Duration>,
    pub idle_after: Option<Duration>,
    pub log_level: Option<log::LevelFilter>,
    pub format: Option<crate::export::events::EventFormat>,
    pub max_label_sets: Option<usize>,
    pub max_connections: Option<u32>,
    pub state_dir: Option<StateDirSetting>,
    pub cmdline: Option<CmdlineMode>,
    pub web_config: Option<PathBuf>,
}

/// The file as written; values are checked by [`FileConfig::validate`] so that errors can
/// name the key, the value and the line.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    port: Option<Spanned<PortList>>,
    unix_socket_glob: Option<Spanned<String>>,
    events: Option<Spanned<String>>,
    metrics_addr: Option<Spanned<String>>,
    stall_after: Option<Spanned<String>>,
    idle_in_transaction_after: Option<Spanned<String>>,
    close_wait_after: Option<Spanned<String>>,
    idle_after: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
    max_label_sets: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
    state_dir: Option<Spanned<String>>,
    cmdline: Option<Spanned<String>>,
    web_config: Option<Spanned<String>>,
}

/// `port = 5432` or `port = [5432, 6432]`.
#[derive(Debug)]
struct PortList(Vec<u16>);

impl<'de> Deserialize<'de> for PortList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = PortList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a port number or an array of port numbers")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortList, E> {
                Ok(PortList(vec![port_value(v)?]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortList, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<PortList, A::Error> {
                let mut ports = Vec::new();
                while let Some(v) = seq.next_element::<i64>()? {
                    ports.push(port_value(v)?);
                }
                if ports.is_empty() {
                    return Err(de::Error::custom("port: empty list"));
                }
                Ok(PortList(ports))
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn port_value<E: de::Error>(v: i64) -> Result<u16, E> {
    port_in_range(v.into()).map_err(|reason| E::custom(format_args!("port {v}: {reason}")))
}

/// Why `--config FILE` was rejected; always one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {} line {line}: not valid UTF-8", path.display())]
    NotUtf8 { path: PathBuf, line: usize },
    /// Syntax, unknown key, wrong type: the toml crate's message, flattened, with the line.
    #[error("config {} line {line}: {message}", path.display())]
    Toml {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A well-typed value the option does not accept.
    #[error("config {} line {line}: invalid {key} '{value}': {reason}", path.display())]
    Value {
        path: PathBuf,
        line: usize,
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// Reads and checks the file given by `--config`.
pub fn load(path: &Path) -> Result<RunSettings, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| ConfigError::NotUtf8 {
        path: path.to_owned(),
        line: line_of(e.as_bytes(), e.utf8_error().valid_up_to()),
    })?;
    parse_file(path, &text)
}

/// Checks the text of a config file; `path` is only used in messages.
pub fn parse_file(path: &Path, text: &str) -> Result<RunSettings, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| {
        let line = line_of(text.as_bytes(), e.span().map_or(0, |s| s.start));
        let mut message = flatten(e.message());
        // The message does not name the key (`unknown field`, `invalid type`): quote the line.
        let src = text.lines().nth(line - 1).map(str::trim).unwrap_or("");
        if e.span().is_some() && !src.is_empty() {
            message = format!("{message} (at `{}`)", shorten(&shown(src)));
        }
        ConfigError::Toml {
            path: path.to_owned(),
            line,
            message,
        }
    })?;
    file.validate(path, text)
}

impl FileConfig {
    fn validate(self, path: &Path, text: &str) -> Result<RunSettings, ConfigError> {
        let at = Located { path, text };
        let ports = self.port.map(|p| {
            let mut ports = p.into_inner().0;
            ports.sort_unstable();
            ports.dedup();
            ports
        });
        Ok(RunSettings {
            ports,
            unix_socket_glob: at.check(
                "unix_socket_glob",
                self.unix_socket_glob,
                parse_unix_socket_glob,
            )?,
            events: at.check("events", self.events, parse_events)?,
            metrics_addr: at.check("metrics_addr", self.metrics_addr, parse_metrics_addr)?,
            stall_after: at.check("stall_after", self.stall_after, parse_threshold)?,
            idle_in_transaction_after: at.check(
                "idle_in_transaction_after",
                self.idle_in_transaction_after,
                parse_threshold,
            )?,
            close_wait_after: at.check(
                "close_wait_after",
                self.close_wait_after,
                parse_threshold,
            )?,
            idle_after: at.check("idle_after", self.idle_after, parse_threshold)?,
            log_level: at.check("log_level", self.log_level, parse_log_level)?,
            format: at.check("format", self.format, parse_format)?,
            max_label_sets: at
                .count("max_label_sets", self.max_label_sets, MAX_LABEL_SETS_RANGE)?
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            max_connections: at
                .count(
                    "max_connections",
                    self.max_connections,
                    MAX_CONNECTIONS_RANGE,
                )?
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            state_dir: at.check("state_dir", self.state_dir, parse_state_dir)?,
            cmdline: at.check("cmdline", self.cmdline, parse_cmdline_mode)?,
            web_config: at.check("web_config", self.web_config, parse_web_config)?,
        })
    }
}

/// The file being checked, to say where a bad value is.
struct Located<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Located<'_> {
    fn check<T>(
        &self,
        key: &'static str,
        value: Option<Spanned<String>>,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        value
            .map(|v| {
                parse(v.get_ref()).map_err(|reason| self.error(key, &v, shown(v.get_ref()), reason))
            })
            .transpose()
    }

    fn count(
        &self,
        key: &'static str,
        value: Option<Spanned<u64>>,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, ConfigError> {
        value
            .map(|v| {
                count_in_range(*v.get_ref(), range)
                    .map_err(|reason| self.error(key, &v, v.get_ref().to_string(), reason))
            })
            .transpose()
    }

    fn error<T>(
        &self,
        key: &'static str,
        at: &Spanned<T>,
        value: String,
        reason: String,
    ) -> ConfigError {
        ConfigError::Value {
            path: self.path.to_owned(),
            line: line_of(self.text.as_bytes(), at.span().start),
            key,
            value,
            reason,
        }
    }
}

/// 1-based line of byte offset `at`.
fn line_of(text: &[u8], at: usize) -> usize {
    1 + text[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// Joins a possibly multi-line message into one line.
pub fn flatten(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_owned(),
    }
}

/// `s` with control characters escaped, so a value always prints on one line.
pub fn shown(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

//! Option values of `tracer run`: their defaults, the parsers shared by flags and the TOML
//! file (`--config FILE`), the file loader, and the Unix-socket glob matcher.
//!
//! Every parser returns a short reason; the caller (clap for flags, [`load`] for the file)
//! puts it on one line together with the option and the bad value.

pub mod cli;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

use crate::host::redact::CmdlineMode;

pub const DEFAULT_PORTS: [u16; 2] = [5432, 6432];
/// libpq's socket files are `<dir>/.s.PGSQL.<port>`.
pub const DEFAULT_UNIX_SOCKET_GLOB: &str = "*/.s.PGSQL.*";
pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9433);
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(5);
pub const DEFAULT_IDLE_IN_TRANSACTION_AFTER: Duration = Duration::from_secs(30);
pub const DEFAULT_CLOSE_WAIT_AFTER: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_LOG_LEVEL: log::LevelFilter = log::LevelFilter::Info;
pub const DEFAULT_MAX_LABEL_SETS: usize = 1000;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65_536;
/// Where the daemon keeps its state file when no `--state-dir` is given and systemd names
/// no `$STATE_DIRECTORY`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tracer";

pub const MAX_LABEL_SETS_RANGE: std::ops::RangeInclusive<u64> = 1..=1_000_000;
pub const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<u64> = 16..=1_048_576;
/// Longest accepted duration: far beyond any sensible threshold, and small enough that
/// `Instant + threshold` can never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventsDest {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for EventsDest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_events(s)
    }
}

pub fn parse_events(s: &str) -> Result<EventsDest, String> {
    match s {
        "" => Err("empty events destination (use - for stdout)".into()),
        "-" => Ok(EventsDest::Stdout),
        path => Ok(EventsDest::File(path.into())),
    }
}

pub fn parse_cmdline_mode(s: &str) -> Result<CmdlineMode, String> {
    CmdlineMode::parse(s)
}

/// A web config file name (checked later, by [`crate::export::web_config::WebConfig::load`]).
pub fn parse_web_config(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("empty file name".into());
    }
    Ok(PathBuf::from(s))
}

pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<i128>() {
        Ok(p) => port_in_range(p),
        Err(_) => Err("not a port number (1-65535)".into()),
    }
}

fn port_in_range(p: i128) -> Result<u16, String> {
    match u16::try_from(p) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err("ports are 1-65535".into()),
    }
}

/// `--format`: `json` or `text`.
pub fn parse_format(s: &str) -> Result<crate::export::events::EventFormat, String> {
    match s {
        "json" => Ok(crate::export::events::EventFormat::Json),
        "text" => Ok(crate::export::events::EventFormat::Text),
        _ => Err("expected json or text".into()),
    }
}

pub fn parse_log_level(s: &str) -> Result<log::LevelFilter, String> {
    match s {
        "error" | "warn" | "info" | "debug" | "trace" => {
            s.parse().map_err(|_| "unknown log level".to_owned())
        }
        _ => Err("expected error, warn, info, debug or trace".into()),
    }
}

/// `IP:PORT`, `[IPv6]:PORT`, or `off` (no metrics endpoint).
pub fn parse_metrics_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| "expected IP:PORT, [IPv6]:PORT or off".to_owned())?;
    if addr.port() == 0 {
        return Err("port 0 is not a fixed port for Prometheus to scrape".into());
    }
    Ok(Some(addr))
}

/// A duration: one or more `<integer><unit>` parts, units `ms`, `s`, `m`, `h`, `d`
/// (`500ms`, `5s`, `2m`, `1h`, `1m30s`). May be zero; see [`parse_threshold`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const EXPECTED: &str = "expected an integer and a unit (ms, s, m, h), e.g. 500ms, 5s, 1m30s";
    if s.is_empty() {
        return Err(format!("empty duration, {EXPECTED}"));
    }
    if s.starts_with('-') {
        return Err("must not be negative".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            let c = rest.chars().next().unwrap_or_default();
            return Err(format!("unexpected {c:?}, {EXPECTED}"));
        }
        let letters = rest[digits..]
            .bytes()
            .take_while(u8::is_ascii_alphabetic)
            .count();
        let (number, unit) = (&rest[..digits], &rest[digits..digits + letters]);
        rest = &rest[digits + letters..];
        if let (true, Some(c)) = (unit.is_empty(), rest.chars().next()) {
            return Err(format!("unexpected {c:?}, {EXPECTED}"));
        }
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60 * 1000,
            "h" => 3600 * 1000,
            "d" => 24 * 3600 * 1000,
            "" => return Err(format!("missing unit, {EXPECTED}")),
            _ => return Err(format!("unknown unit '{unit}', {EXPECTED}")),
        };
        let part = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(millis_per_unit))
            .map(Duration::from_millis)
            .ok_or_else(too_long)?;
        total = total.checked_add(part).ok_or_else(too_long)?;
    }
    if total > MAX_DURATION {
        return Err(too_long());
    }
    Ok(total)
}

fn too_long() -> String {
    "too long (at most 30d)".into()
}

/// A detector threshold: a [`parse_duration`] greater than zero.
pub fn parse_threshold(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

pub fn parse_unix_socket_glob(s: &str) -> Result<String, String> {
    Glob::compile(s)?;
    Ok(s.to_owned())
}

pub fn parse_max_label_sets(s: &str) -> Result<usize, String> {
    let n = parse_count(s, MAX_LABEL_SETS_RANGE)?;
    usize::try_from(n).map_err(|_| "too large".to_owned())
}

pub fn parse_max_connections(s: &str) -> Result<u32, String> {
    let n = parse_count(s, MAX_CONNECTIONS_RANGE)?;
    u32::try_from(n).map_err(|_| "too large".to_owned())
}

/// `--state-dir`: where the daemon keeps what it knows of open connections across restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StateDirSetting {
    /// Not given: [`default_state_dir`], if it can be used.
    #[default]
    Default,
    /// `off`: nothing is kept.
    Off,
    Dir(PathBuf),
}

pub fn parse_state_dir(s: &str) -> Result<StateDirSetting, String> {
    match s {
        "" => Err("empty path (use off to keep no state)".into()),
        "off" => Ok(StateDirSetting::Off),
        path => Ok(StateDirSetting::Dir(path.into())),
    }
}

/// The state directory when none is given: the one systemd's `StateDirectory=` made
/// (`$STATE_DIRECTORY`, the first of a list), else [`DEFAULT_STATE_DIR`].
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .and_then(|dirs| {
            let first = dirs.to_string_lossy().split(':').next()?.to_owned();
            (!first.is_empty()).then(|| PathBuf::from(first))
        })
        .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
}

fn parse_count(s: &str, range: std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) => count_in_range(n, range),
        Err(_) => Err(format!(
            "not a whole number ({}-{})",
            range.start(),
            range.end()
        )),
    }
}

fn count_in_range(n: u64, range: std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    if range.contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be {}-{}", range.start(), range.end()))
    }
}

// ---------------------------------------------------------------------------------------
// Unix-socket glob

/// A compiled Unix-socket glob, fnmatch(3)-style without `FNM_PATHNAME`: `*` matches any run
/// of characters including `/` (so `*/.s.PGSQL.*` matches a socket in any directory), `?` one
/// character, `[abc]`, `[a-z]`, `[!a-z]` / `[^a-z]` one character of a class, `\x` the
/// character `x`. The whole path must match. Only socket paths are matched, so libpq's
/// `.s.PGSQL.5432.lock` (a regular file) never reaches the glob even though `*` would match it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    tokens: Vec<Token>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    AnyOne,
    AnyRun,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Glob {
    pub fn compile(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("empty glob".into());
        }
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let token = match chars[i] {
                '*' => {
                    // `**` is the same as `*`.
                    if tokens.last() == Some(&Token::AnyRun) {
                        i += 1;
                        continue;
                    }
                    Token::AnyRun
                }
                '?' => Token::AnyOne,
                '\\' => {
                    i += 1;
                    match chars.get(i) {
                        Some(&c) => Token::Literal(c),
                        None => return Err("trailing '\\'".into()),
                    }
                }
                '[' => {
                    let (class, next) = compile_class(&chars, i)?;
                    i = next;
                    tokens.push(class);
                    continue;
                }
                c => Token::Literal(c),
            };
            tokens.push(token);
            i += 1;
        }
        Ok(Self { tokens })
    }

    pub fn matches(&self, path: &str) -> bool {
        let text: Vec<char> = path.chars().collect();
        let (mut t, mut p) = (0, 0);
        // Where the last `*` was and how much text it had taken when we came back to it.
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match self.tokens.get(p) {
                Some(Token::AnyRun) => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                Some(token) if token.matches_one(text[t]) => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
            match star {
                // Let the last `*` take one more character and retry from there.
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    p = sp + 1;
                    t = st + 1;
                }
                None => return false,
            }
        }
        self.tokens[p..].iter().all(|tok| *tok == Token::AnyRun)
    }
}

impl Token {
    fn matches_one(&self, c: char) -> bool {
        match self {
            Token::Literal(l) => *l == c,
            Token::AnyOne => true,
            Token::AnyRun => false,
            Token::Class { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

/// Compiles the class opening at `chars[open]` (`[`); returns it and the index after `]`.
fn compile_class(chars: &[char], open: usize) -> Result<(Token, usize), String> {
    let mut i = open + 1;
    let negated = matches!(chars.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let Some(&c) = chars.get(i) else {
            return Err(format!("unclosed '[' at character {}", open + 1));
        };
        // A `]` right after `[` or `[!` is a member, as in fnmatch.
        if c == ']' && !first {
            return Ok((Token::Class { negated, ranges }, i + 1));
        }
        first = false;
        let lo = if c == '\\' {
            i += 1;
            *chars
                .get(i)
                .ok_or_else(|| format!("unclosed '[' at character {}", open + 1))?
        } else {
            c
        };
        i += 1;
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&n| n != ']') {
            let hi = chars[i + 1];
            if hi < lo {
                return Err(format!("reversed range '{lo}-{hi}'"));
            }
            ranges.push((lo, hi));
            i += 2;
        } else {
            ranges.push((lo, lo));
        }
    }
}

/// Whether `path` matches the glob `pattern` (see [`Glob`]); an invalid pattern matches
/// nothing.
pub fn glob_matches(pattern: &str, path: &str) -> bool {
    Glob::compile(pattern).is_ok_and(|g| g.matches(path))
}

// ---------------------------------------------------------------------------------------
// The TOML file

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

#[cfg(test)]
mod tests;

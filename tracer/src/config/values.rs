//! The parsers of option values shared by flags and the TOML file: each returns a short
//! reason, which the caller puts on one line with the option and the bad value.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::host::redact::CmdlineMode;

use super::*;

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

pub(super) fn port_in_range(p: i128) -> Result<u16, String> {
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

pub(super) fn count_in_range(n: u64, range: std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    if range.contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be {}-{}", range.start(), range.end()))
    }
}

// ---------------------------------------------------------------------------------------
// Unix-socket glob

//! Defaults and accepted ranges of `tracer run`'s settings; the parsing (flags, TOML) stays
//! in `tracer::config`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

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

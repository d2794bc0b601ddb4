//! The state file: what the daemon knows of each open connection (transaction state and
//! since when, last I/O times, age, verdicts already reported), written atomically each tick
//! under the state directory, so that a daemon restarted or crashed and started again on the
//! same boot carries on where the last one stopped. Connections are matched by socket
//! cookie, which is unique for the life of a boot; the file names its boot and a file from
//! another boot is ignored. Timestamps are CLOCK_MONOTONIC ns, which run on across daemon
//! restarts within a boot.
//!
//! Owns the file format, the merge of a saved connection into one found alive at start-up,
//! and the directory (created 0700, locked against a second daemon). No command line is
//! stored: it may carry credentials.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{StateDirSetting, default_state_dir},
    host::process::{Container, ProcessDetails},
    model::conn_table::{Conn, Owner, Role, Transport},
    model::detectors::{ConnState, Episodes, LeakReason, Seeded},
    model::endpoint::Endpoint,
};

pub const FILE_NAME: &str = "state.json";
const TEMP_NAME: &str = "state.json.tmp";
/// Bumped when the meaning of a field changes; another format is ignored.
const FORMAT: u32 = 1;
/// A larger file is not ours (about 1 KiB per connection, 65,536 connections at most).
const MAX_BYTES: u64 = 256 << 20;
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub format: u32,
    /// `/proc/sys/kernel/random/boot_id` when written: cookies and monotonic times are only
    /// meaningful within one boot.
    pub boot_id: String,
    pub connections: Vec<SavedConn>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedLeak {
    pub reason: LeakReason,
    pub since_ns: u64,
}

/// One open connection as the daemon knew it (monotonic ns; 0 = never).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedConn {
    /// The socket cookie.
    pub cookie: u64,
    pub role: Role,
    pub transport: Transport,
    pub local: String,
    pub remote: String,
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub start_boottime_ns: u64,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    pub container_runtime: Option<String>,
    pub pod_uid: Option<String>,
    pub systemd_unit: Option<String>,
    pub preexisting: bool,
    pub born_ns: u64,
    pub to_server_ns: u64,
    pub from_server_ns: u64,
    pub peer_closed_ns: Option<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The transaction state and when it was known, if known.
    pub state: Option<ConnState>,
    pub state_known_ns: u64,
    /// Verdicts already reported and not ended, with their onsets.
    pub stall_since_ns: Option<u64>,
    pub leaks: Vec<SavedLeak>,
}

/// The runtimes `ProcessDetails` names, back from their strings.
fn runtime(name: Option<&str>) -> Option<&'static str> {
    match name? {
        "docker" => Some("docker"),
        "containerd" => Some("containerd"),
        "cri-o" => Some("cri-o"),
        "podman" => Some("podman"),
        _ => None,
    }
}

impl SavedConn {
    /// What to keep of `conn` at `now`.
    pub fn of(conn: &Conn, now: u64) -> Self {
        let view = conn.view();
        let known = view.known_state(now);
        let details = &conn.details;
        Self {
            cookie: conn.cookie,
            role: conn.role,
            transport: conn.transport,
            local: conn.local.to_string(),
            remote: conn.remote.to_string(),
            pid: conn.owner.pid,
            uid: conn.owner.uid,
            comm: conn.owner.comm.clone(),
            cgroup_id: conn.owner.cgroup_id,
            start_boottime_ns: conn.owner.start_boottime_ns,
            exe: details.exe.clone(),
            cgroup: details.cgroup.clone(),
            container_id: details.container.container_id.clone(),
            container_runtime: details.container.container_runtime.map(str::to_owned),
            pod_uid: details.container.pod_uid.clone(),
            systemd_unit: details.container.systemd_unit.clone(),
            preexisting: conn.preexisting,
            born_ns: conn.born_ns,
            to_server_ns: view.to_server_ns,
            from_server_ns: view.from_server_ns,
            peer_closed_ns: conn.peer_closed_ns,
            bytes_sent: conn.live.bytes_sent,
            bytes_received: conn.live.bytes_received,
            state: known.map(|k| k.state),
            state_known_ns: known.map_or(0, |k| k.known_ns),
            stall_since_ns: conn.episodes.stall_since(),
            leaks: conn
                .episodes
                .leaks()
                .into_iter()
                .map(|(reason, since_ns)| SavedLeak { reason, since_ns })
                .collect(),
        }
    }

    fn seeded(&self) -> Option<Seeded> {
        self.state.map(|state| Seeded {
            state,
            known_ns: self.state_known_ns,
        })
    }

    /// The connection as it was, for one that closed while no daemon ran: its open verdicts
    /// come back so that their end can be reported with its close.
    pub fn to_closed_conn(&self) -> Conn {
        let owner = Owner {
            pid: self.pid,
            uid: self.uid,
            cgroup_id: self.cgroup_id,
            comm: self.comm.clone(),
            start_boottime_ns: self.start_boottime_ns,
        };
        let mut conn = Conn::new(
            self.cookie,
            self.role,
            self.transport,
            Endpoint::parse(&self.local),
            Endpoint::parse(&self.remote),
            owner,
            self.born_ns,
        );
        conn.details = ProcessDetails {
            exe: self.exe.clone(),
            cmdline: None,
            cgroup: self.cgroup.clone(),
            container: Container {
                container_id: self.container_id.clone(),
                container_runtime: runtime(self.container_runtime.as_deref()),
                pod_uid: self.pod_uid.clone(),
                systemd_unit: self.systemd_unit.clone(),
            },
        };
        conn.preexisting = self.preexisting;
        conn.found_to_server_ns = self.to_server_ns;
        conn.found_from_server_ns = self.from_server_ns;
        conn.peer_closed_ns = self.peer_closed_ns;
        conn.live.bytes_sent = self.bytes_sent;
        conn.live.bytes_received = self.bytes_received;
        conn.seeded = self.seeded();
        let leaks: Vec<(LeakReason, u64)> =
            self.leaks.iter().map(|l| (l.reason, l.since_ns)).collect();
        conn.episodes = Episodes::reported_before(self.stall_since_ns, &leaks);
        conn
    }

    /// Merges what was saved into `conn`, found alive at start-up (at `now`) with its
    /// process-title state, if any, already in `conn.seeded`. False when the saved record
    /// is not this connection.
    ///
    /// Age and times only move towards the truth: the oldest birth, the latest I/O. The
    /// state: a process title read now beats the file; when both agree the file's times
    /// stand, so the idle time counts from when it really began. When they disagree the state
    /// changed while no daemon watched: the saved times are stale and idle time counts from
    /// the socket tables (TCP) or from `now` (Unix, which has no I/O times), a lower bound.
    /// Verdicts are not carried over: the detectors find them again from the restored
    /// times and report them, with their true `idle_s`, on this daemon's stream.
    pub fn restore_into(&self, conn: &mut Conn, now: u64) -> bool {
        if self.cookie != conn.cookie || self.role != conn.role || self.transport != conn.transport
        {
            return false;
        }
        if self.born_ns != 0 {
            conn.born_ns = conn.born_ns.min(self.born_ns);
        }
        conn.peer_closed_ns = match (conn.peer_closed_ns, self.peer_closed_ns) {
            (Some(found), Some(saved)) => Some(found.min(saved)),
            (found, saved) => found.or(saved),
        };
        conn.preexisting = true;
        let title = conn.seeded;
        let agrees = title.is_none_or(|t| Some(t.state) == self.state);
        if agrees {
            conn.found_to_server_ns = conn.found_to_server_ns.max(self.to_server_ns);
            conn.found_from_server_ns = conn.found_from_server_ns.max(self.from_server_ns);
            conn.seeded = title.or(self.seeded());
        } else if conn.transport == Transport::Unix {
            conn.found_from_server_ns = conn.found_from_server_ns.max(now);
        }
        true
    }
}

impl StateFile {
    pub fn of<'a>(boot_id: &str, conns: impl Iterator<Item = &'a Conn>, now: u64) -> Self {
        let mut connections: Vec<SavedConn> = conns.map(|c| SavedConn::of(c, now)).collect();
        connections.sort_by_key(|c| c.cookie);
        Self {
            format: FORMAT,
            boot_id: boot_id.to_owned(),
            connections,
        }
    }

    /// Reads a file's bytes; `Err` says in one line why it cannot be used.
    pub fn decode(bytes: &[u8], boot_id: &str) -> Result<Self, String> {
        let file: Self =
            serde_json::from_slice(bytes).map_err(|e| format!("not a tracer state file ({e})"))?;
        if file.format != FORMAT {
            return Err(format!(
                "format {} (this build reads {FORMAT})",
                file.format
            ));
        }
        if file.boot_id != boot_id {
            return Err("written before the last reboot".into());
        }
        Ok(file)
    }
}

/// This boot's id.
pub fn boot_id() -> io::Result<String> {
    Ok(fs::read_to_string(BOOT_ID)?.trim().to_owned())
}

/// The state directory, locked for this daemon as long as it lives.
pub struct StateDir {
    dir: PathBuf,
    /// Holds the lock (flock on the directory); released when the daemon exits, however.
    _lock: File,
}

impl StateDir {
    /// Creates `dir` if needed (0700) and locks it; fails if another daemon holds it.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let lock = File::open(dir)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "another tracer daemon is using it",
                ));
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        // Fail now, not at the first tick, when it cannot be written.
        let probe = dir.join(TEMP_NAME);
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&probe)?;
        #[allow(
            clippy::let_underscore_must_use,
            reason = "the probe file only proved the directory writable"
        )]
        let _ = fs::remove_file(&probe);
        Ok(Self {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The file a previous daemon of this boot left, if there is a usable one; a missing
    /// file is normal, anything else wrong with it is logged once and the file ignored.
    pub fn load(&self, boot_id: &str) -> Option<StateFile> {
        let path = self.path();
        let bytes = match fs::metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Ok(meta) if meta.len() > MAX_BYTES => {
                log::warn!(
                    "ignoring state file {}: {} bytes is too large",
                    path.display(),
                    meta.len()
                );
                return None;
            }
            _ => fs::read(&path),
        };
        let decoded = bytes
            .map_err(|e| e.to_string())
            .and_then(|b| StateFile::decode(&b, boot_id));
        match decoded {
            Ok(file) => Some(file),
            Err(why) => {
                log::warn!("ignoring state file {}: {why}", path.display());
                None
            }
        }
    }

    /// Replaces the file atomically (a temporary file renamed over it), so a crash at any
    /// point leaves the old or the new file, never half of one. No fsync: the file only
    /// matters within this boot, and a daemon crash does not lose the page cache.
    pub fn save(&self, write: impl FnOnce(&mut dyn io::Write) -> io::Result<()>) -> io::Result<()> {
        let temp = self.dir.join(TEMP_NAME);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        // Streamed: a table of 20,000 connections is never held in memory as one string.
        let mut out = io::BufWriter::new(file);
        write(&mut out)?;
        out.flush()?;
        drop(out);
        fs::rename(&temp, self.path())
    }
}

/// The state directory in use, and what was last written there.
pub struct KeptState {
    dir: StateDir,
    boot_id: String,
    /// A failed write was logged; the next ones are not, until one succeeds.
    failing: bool,
}

impl KeptState {
    /// Opens the state directory `--state-dir` names. One given explicitly must work; the
    /// default (systemd's `$STATE_DIRECTORY`, else /var/lib/tracer) is used when it can be.
    pub fn open(setting: &StateDirSetting) -> anyhow::Result<Option<Self>> {
        let (dir, explicit) = match setting {
            StateDirSetting::Off => return Ok(None),
            StateDirSetting::Dir(dir) => (dir.clone(), true),
            StateDirSetting::Default => (default_state_dir(), false),
        };
        let opened = boot_id()
            .map_err(|e| anyhow::anyhow!("reading the boot id: {e}"))
            .and_then(|boot_id| {
                let dir = StateDir::open(&dir)
                    .map_err(|e| anyhow::anyhow!("state directory {}: {e}", dir.display()))?;
                Ok(Self {
                    dir,
                    boot_id,
                    failing: false,
                })
            });
        match opened {
            Ok(kept) => Ok(Some(kept)),
            Err(err) if explicit => Err(err),
            Err(err) => {
                log::warn!("{err:#}; nothing is kept across restarts (see --state-dir)");
                Ok(None)
            }
        }
    }

    /// What the previous daemon of this boot left, if usable.
    pub fn load(&self) -> Option<StateFile> {
        self.dir.load(&self.boot_id)
    }

    /// Writes what is known of `conns` at `now` (the caller writes only when something
    /// changed).
    pub fn save<'a>(&mut self, conns: impl Iterator<Item = &'a Conn>, now: u64) {
        let mut conns: Vec<&Conn> = conns.collect();
        conns.sort_by_key(|c| c.cookie);
        let file = StateFileOut {
            format: FORMAT,
            boot_id: &self.boot_id,
            connections: SavedSeq { conns, now },
        };
        let written = self
            .dir
            .save(|out| serde_json::to_writer(out, &file).map_err(io::Error::other));
        match written {
            Ok(()) => self.failing = false,
            Err(err) => {
                if !self.failing {
                    log::warn!("writing {}: {err}", self.dir.path().display());
                }
                self.failing = true;
            }
        }
    }
}

/// [`StateFile`] as written: the same fields, each connection converted as it is encoded.
#[derive(Serialize)]
struct StateFileOut<'a> {
    format: u32,
    boot_id: &'a str,
    connections: SavedSeq<'a>,
}

struct SavedSeq<'a> {
    conns: Vec<&'a Conn>,
    now: u64,
}

impl Serialize for SavedSeq<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.conns.iter().map(|c| SavedConn::of(c, self.now)))
    }
}

#[cfg(test)]
mod tests;

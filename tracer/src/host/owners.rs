//! Which processes hold a socket, and how long a process has existed, read from `/proc`
//! under a root that tests point at a fake tree. Used with `sockdiag` to attribute
//! connections that existed before the daemon, and to bound their age.
//!
//! Processes come and go while the tree is read: whatever cannot be read is skipped.

use std::{collections::HashMap, ffi::OsStr, fs, path::Path};

/// The inode in an fd link's target `socket:[INODE]`.
pub fn socket_inode(link: &OsStr) -> Option<u64> {
    let digits = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
    all_digits(digits).then(|| digits.parse().ok()).flatten()
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Maps socket inode -> the pids holding it (sorted, each once), from the
/// `<proc_root>/<pid>/fd/*` links. Threads share their process's fds, so only the process
/// directories are read, not `task/`.
pub fn socket_owners(proc_root: &Path) -> HashMap<u64, Vec<u32>> {
    let mut owners: HashMap<u64, Vec<u32>> = HashMap::new();
    let Ok(entries) = fs::read_dir(proc_root) else {
        return owners;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| all_digits(n))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue; // gone, or not ours to read
        };
        for fd in fds.flatten() {
            let Some(inode) = fs::read_link(fd.path())
                .ok()
                .and_then(|target| socket_inode(target.as_os_str()))
            else {
                continue;
            };
            let pids = owners.entry(inode).or_default();
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
    }
    for pids in owners.values_mut() {
        pids.sort_unstable();
    }
    owners
}

/// `starttime` (field 22 of `/proc/<pid>/stat`): clock ticks after boot. The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn start_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first one after the name.
    after_comm
        .split_ascii_whitespace()
        .nth(22 - 3)?
        .parse()
        .ok()
}

/// A process's age from its stat line, `/proc/uptime` and the clock tick rate.
pub fn age_from(stat: &str, uptime: &str, ticks_per_s: u64) -> Option<f64> {
    if ticks_per_s == 0 {
        return None;
    }
    let up: f64 = uptime.split_ascii_whitespace().next()?.parse().ok()?;
    let started = start_ticks(stat)? as f64 / ticks_per_s as f64;
    let age = up - started;
    // uptime is rounded to 10 ms: a process started just now can come out a little negative.
    age.is_finite().then_some(age.max(0.0))
}

fn ticks_per_s() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0)
}

/// Process age in seconds, from `/proc/<pid>/stat` starttime and `/proc/uptime`: an upper
/// bound on the age of a connection the process holds. `None` when the process is gone.
pub fn process_age_s(proc_root: &Path, pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let uptime = fs::read_to_string(proc_root.join("uptime")).ok()?;
    age_from(&stat, &uptime, ticks_per_s()?)
}

#[cfg(test)]
mod tests;

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
mod tests {
    use super::*;
    use std::{
        ffi::OsString,
        os::unix::{ffi::OsStringExt, fs::symlink},
        path::PathBuf,
    };

    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("tracer-owners-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("mkdir");
            Self(dir)
        }

        fn fd(&self, pid: &str, fd: u32, target: &str) {
            let dir = self.0.join(pid).join("fd");
            fs::create_dir_all(&dir).expect("mkdir fd");
            symlink(target, dir.join(fd.to_string())).expect("symlink");
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn socket_inode_parsing() {
        assert_eq!(socket_inode(OsStr::new("socket:[12345]")), Some(12345));
        for bad in [
            "socket:[]",
            "socket:[+1]",
            "socket:[12",
            "pipe:[1]",
            "/dev/null",
            "socket:[99999999999999999999999]",
        ] {
            assert_eq!(socket_inode(OsStr::new(bad)), None, "{bad}");
        }
        let not_utf8 = OsString::from_vec(vec![0xff, b'1']);
        assert_eq!(socket_inode(&not_utf8), None);
    }

    #[test]
    fn owners_from_a_fake_proc_tree() {
        let p = FakeProc::new("tree");
        p.fd("100", 3, "socket:[12345]");
        p.fd("100", 4, "socket:[12345]"); // dup'ed fd: pid listed once
        p.fd("100", 5, "/dev/null");
        p.fd("100", 6, "pipe:[777]");
        p.fd("200", 3, "socket:[12345]");
        p.fd("200", 7, "socket:[555]");
        p.fd("self", 3, "socket:[999]"); // non-numeric: not a process
        p.fd("+300", 3, "socket:[999]"); // nor this
        fs::create_dir_all(p.0.join("sys")).expect("mkdir");
        fs::create_dir_all(p.0.join("400")).expect("mkdir"); // a process gone: no fd dir
        fs::write(p.0.join("500"), b"not a dir").expect("write");
        // A dangling pid link, like /proc/self in a vanished process's namespace.
        symlink(p.0.join("nope"), p.0.join("600")).expect("symlink");

        let owners = socket_owners(&p.0);
        assert_eq!(owners.len(), 2, "{owners:?}");
        assert_eq!(owners[&12345], vec![100, 200]);
        assert_eq!(owners[&555], vec![200]);
        assert!(socket_owners(&p.0.join("missing")).is_empty());
    }

    #[test]
    fn start_ticks_and_age() {
        // A command name with spaces and parentheses.
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 12345 \
                    1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(start_ticks(stat), Some(12345));
        assert_eq!(age_from(stat, "200.50 300.00\n", 100), Some(200.5 - 123.45));
        assert_eq!(age_from(stat, "100.00 1.0", 100), Some(0.0)); // clamped
        assert_eq!(age_from(stat, "x", 100), None);
        assert_eq!(age_from(stat, "200", 0), None);
        assert_eq!(start_ticks("42 (cut) S 1 2"), None);
        assert_eq!(start_ticks("no parenthesis"), None);
        assert_eq!(start_ticks(""), None);
    }

    #[test]
    fn process_age_from_a_fake_proc_tree() {
        let p = FakeProc::new("age");
        fs::create_dir_all(p.0.join("7")).expect("mkdir");
        let hz = ticks_per_s().expect("CLK_TCK");
        let start = 50 * hz;
        fs::write(
            p.0.join("7/stat"),
            format!("7 (pg) S 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0"),
        )
        .expect("write stat");
        fs::write(p.0.join("uptime"), "80.25 10.00\n").expect("write uptime");
        let age = process_age_s(&p.0, 7).expect("age");
        assert!((age - 30.25).abs() < 1e-9, "{age}");
        assert_eq!(process_age_s(&p.0, 8), None);
    }

    #[test]
    fn our_own_process_is_young_and_holds_its_sockets() {
        let proc_root = Path::new("/proc");
        let age = process_age_s(proc_root, std::process::id()).expect("own age");
        let since_boot = fs::read_to_string("/proc/uptime").expect("uptime");
        let up: f64 = since_boot
            .split_whitespace()
            .next()
            .and_then(|u| u.parse().ok())
            .expect("uptime");
        assert!((0.0..=up).contains(&age), "{age} of {up}");
        // Test binaries live for seconds to minutes, not hours.
        assert!(age < 3600.0, "{age}");

        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let inode = {
            use std::os::{fd::AsFd, unix::fs::MetadataExt};
            let owned = sock.as_fd().try_clone_to_owned().expect("dup");
            fs::File::from(owned).metadata().expect("fstat").ino()
        };
        let owners = socket_owners(proc_root);
        assert!(
            owners
                .get(&inode)
                .is_some_and(|p| p.contains(&std::process::id()))
        );
    }
}

#![allow(
    clippy::let_underscore_must_use,
    reason = "clean-up of processes, sockets and files that may be gone already, and calls made only to show they do not panic: their results are ignored on purpose"
)]
use super::*;
use std::{
    ffi::OsString,
    os::unix::{ffi::OsStringExt, fs::symlink},
    path::PathBuf,
};

struct FakeProc(PathBuf);

impl FakeProc {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tracer-owners-{tag}-{}", std::process::id()));
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

//! `tracer check`: what it says as root, and what it says without privileges.
use std::process::Command;

use tests::{require_root, tracer_bin};

fn check_as(prefix: &[&str]) -> (i32, Vec<String>) {
    check_with(prefix, None)
}

/// `tracer check`, optionally with the hook set forced (`TRACER_HOOKS`).
fn check_with(prefix: &[&str], hooks: Option<&str>) -> (i32, Vec<String>) {
    let mut cmd = if prefix.is_empty() {
        Command::new(tracer_bin())
    } else {
        let mut c = Command::new(prefix[0]);
        c.args(&prefix[1..]).arg(tracer_bin());
        c
    };
    cmd.env_remove("TRACER_HOOKS");
    if let Some(set) = hooks {
        cmd.env("TRACER_HOOKS", set);
    }
    let out = cmd.arg("check").output().expect("tracer check");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

fn line<'a>(lines: &'a [String], name: &str) -> Vec<&'a String> {
    lines
        .iter()
        .filter(|l| l.split_whitespace().nth(1) == Some(name))
        .collect()
}

/// The programs of each hook set, as `check` names them.
fn programs_of(set: &str) -> &'static [&'static str] {
    match set {
        "tracepoints" => &[
            "tp_btf/sock_send_length",
            "tp_btf/sock_recv_length",
            "tp_btf/inet_sock_set_state",
        ],
        "trampolines" => &[
            "fexit/tcp_sendmsg",
            "fexit/unix_stream_sendmsg",
            "fexit/sock_recvmsg",
            "tp_btf/inet_sock_set_state",
        ],
        other => panic!("unknown hook set {other}"),
    }
}

fn assert_set_loads(lines: &[String], set: &str) {
    let dump = lines.join("\n");
    let hooks = line(lines, "hooks");
    assert_eq!(hooks.len(), 1, "one hooks line: {dump}");
    assert!(
        hooks[0].starts_with("ok") && hooks[0].contains(&format!(" {set}: ")),
        "{dump}"
    );
    let probes = line(lines, "probe");
    assert_eq!(probes.len(), programs_of(set).len(), "{dump}");
    for program in programs_of(set) {
        assert!(
            probes.iter().any(
                |l| l.starts_with("ok") && l.contains(&format!("{program} loads and attaches"))
            ),
            "{program}: {dump}"
        );
    }
}

#[test]
fn check_passes_as_root_and_loads_every_probe() {
    if !require_root() {
        return;
    }
    let (code, lines) = check_as(&[]);
    let dump = lines.join("\n");
    assert_eq!(code, 0, "{dump}");
    for name in ["kernel", "btf", "tracefs", "capabilities", "sock_diag"] {
        let found = line(&lines, name);
        assert_eq!(found.len(), 1, "one {name} line: {dump}");
        assert!(found[0].starts_with("ok"), "{dump}");
    }
    // The VM tier names the hook sets each kernel must load, preferred first (see
    // `cargo xtask vm-test`); elsewhere the detected set must load.
    let expected = std::env::var("TRACER_EXPECT_HOOKS").unwrap_or_default();
    let mut expected: Vec<&str> = expected.split_whitespace().collect();
    if expected.is_empty() {
        let hooks = line(&lines, "hooks");
        let set = hooks
            .first()
            .and_then(|l| l.split_whitespace().nth(2))
            .map(|s| s.trim_end_matches(':'))
            .unwrap_or_else(|| panic!("no hooks line: {dump}"));
        expected.push(if set == "trampolines" {
            "trampolines"
        } else {
            "tracepoints"
        });
    }
    assert_set_loads(&lines, expected[0]);
    eprintln!("{dump}");
    // Every program this kernel can run loads and attaches, not only the preferred set's.
    for set in &expected[1..] {
        let (code, lines) = check_with(&[], Some(set));
        assert_eq!(code, 0, "{set} forced: {}", lines.join("\n"));
        assert_set_loads(&lines, set);
    }
}

#[test]
fn check_fails_without_privileges_and_says_which() {
    if !require_root() {
        return;
    }
    let (code, lines) = check_as(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ]);
    let dump = lines.join("\n");
    assert_ne!(code, 0, "{dump}");
    let caps = line(&lines, "capabilities");
    assert_eq!(caps.len(), 1, "{dump}");
    assert!(caps[0].starts_with("FAIL"), "{dump}");
    for cap in [
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_NET_ADMIN",
        "CAP_SYS_PTRACE",
        "CAP_DAC_READ_SEARCH",
    ] {
        assert!(caps[0].contains(cap), "{cap} named: {dump}");
    }
    // The probes really were tried, and refused.
    let probes = line(&lines, "probe");
    assert_eq!(probes.len(), 3, "{dump}");
    assert!(probes.iter().all(|l| l.starts_with("FAIL")), "{dump}");
    // One line per check, nothing else.
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("ok") || l.starts_with("FAIL")),
        "{dump}"
    );
    eprintln!("{dump}");
}

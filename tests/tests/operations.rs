//! `tracer check`: what it says as root, and what it says without privileges.

use std::process::Command;

use tests::{require_root, tracer_bin};

fn check_as(prefix: &[&str]) -> (i32, Vec<String>) {
    let mut cmd = if prefix.is_empty() {
        Command::new(tracer_bin())
    } else {
        let mut c = Command::new(prefix[0]);
        c.args(&prefix[1..]).arg(tracer_bin());
        c
    };
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
    let probes = line(&lines, "probe");
    assert_eq!(probes.len(), 3, "{dump}");
    for hook in [
        "inet_sock_set_state",
        "sock_send_length",
        "sock_recv_length",
    ] {
        assert!(
            probes
                .iter()
                .any(|l| l.starts_with("ok")
                    && l.contains(&format!("tp_btf/{hook} loads and attaches"))),
            "{hook}: {dump}"
        );
    }
    eprintln!("{dump}");
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

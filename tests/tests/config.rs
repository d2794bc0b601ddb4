//! Bad input through the real binary: exit code 2, one stderr line naming the bad value, and
//! nothing attached. The exit-code part needs no root; the BPF checks run as root (bpftool)
//! or wherever strace is installed.
use std::{
    ffi::OsString,
    os::unix::ffi::OsStringExt,
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use tests::{TempDir, loaded_program_names, tracer_bin};

/// Replaced in a case's arguments by the path of its config file.
const CONFIG: &str = "{config}";

struct Case {
    args: Vec<OsString>,
    /// Contents of the file `{config}` names.
    config: Option<&'static [u8]>,
    /// What the stderr line must contain.
    needle: &'static str,
}

/// `args` is the command line after `tracer`, split at spaces (no argument here holds one).
fn case(args: &str, needle: &'static str) -> Case {
    Case {
        args: args.split(' ').map(OsString::from).collect(),
        config: None,
        needle,
    }
}

fn file_case(contents: &'static [u8], needle: &'static str) -> Case {
    Case {
        config: Some(contents),
        ..case(&format!("run --config {CONFIG}"), needle)
    }
}

/// `--web-config {config}` with `contents` as the web config (YAML).
fn web_case(contents: &'static [u8], needle: &'static str) -> Case {
    Case {
        config: Some(contents),
        ..case(&format!("run --web-config {CONFIG}"), needle)
    }
}

fn cases() -> Vec<Case> {
    let mut non_utf8 = case("run --port", "54\\xff");
    non_utf8.args.push(OsString::from_vec(b"54\xff".to_vec()));
    vec![
        case("run --bogus", "--bogus"),
        case("run --port 0", "'0'"),
        case("run --port 65536", "'65536'"),
        case("run --port 5432,-1", "'-1'"),
        case("run --stall-after 5x", "'5x'"),
        case("run --stall-after 5", "'5'"),
        case("run --stall-after 0s", "'0s'"),
        case("run --idle-in-transaction-after 0ms", "'0ms'"),
        case("run --close-wait-after 0m", "'0m'"),
        case("run --idle-after -5m", "'-5m'"),
        case("run --metrics-addr 127.0.0.1:0", "'127.0.0.1:0'"),
        case("run --metrics-addr localhost:9433", "'localhost:9433'"),
        case("run --log-level loud", "'loud'"),
        case("run --unix-socket-glob /tmp/[x", "'/tmp/[x'"),
        case("run --max-connections 8", "'8'"),
        case("run --max-label-sets 0", "'0'"),
        case("run --config /nonexistent/tracer.toml", "/nonexistent/tracer.toml"),
        case("list --port 70000", "'70000'"),
        non_utf8,
        file_case(b"bogus_key = 1\n", "bogus_key"),
        file_case(b"port = [5432, 0]\n", "port 0"),
        file_case(b"port = 65536\n", "port 65536"),
        file_case(
            b"\n\nstall_after = \"0s\"\n",
            "line 3: invalid stall_after '0s'",
        ),
        file_case(b"idle_after = \"soon\"\n", "idle_after 'soon'"),
        file_case(b"metrics_addr = \"[::1]:0\"\n", "metrics_addr '[::1]:0'"),
        // The toml crate's message spans several lines; it must come out as one.
        file_case(b"port = [5432,\n", "line 1"),
        file_case(b"log_level = \"\xff\"\n", "UTF-8"),
        case("run --cmdline none", "'none'"),
        file_case(b"cmdline = \"all\"\n", "cmdline 'all'"),
        case("run --web-config /nonexistent/web.yml", "web config /nonexistent/web.yml: cannot read"),
        file_case(
            b"web_config = \"/nonexistent/web.yml\"\n",
            "web config /nonexistent/web.yml",
        ),
        web_case(b"tls_server_config: [\n", "web config"),
        web_case(b"basic_auth_user:\n  a: b\n", "unknown field `basic_auth_user`"),
        web_case(
            b"basic_auth_users:\n  prometheus: secret\n",
            "basic_auth_users.prometheus: not a bcrypt hash",
        ),
        web_case(
            b"tls_server_config:\n  cert_file: /nonexistent/tls.crt\n  key_file: /nonexistent/tls.key\n",
            "cert_file /nonexistent/tls.crt",
        ),
        web_case(
            b"tls_server_config:\n  cert_file: /etc/passwd\n  key_file: /etc/passwd\n",
            "no PEM certificate",
        ),
    ]
}

/// Runs the binary, killing it if it is still running after 10 s (it must not start).
fn run(program: &Path, args: &[OsString]) -> Output {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e} (build it first)", program.display()));
    let pid = child.id();
    let started = Instant::now();
    let watchdog = std::thread::spawn(move || {
        while started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: kill(pid, 0) only probes whether our child still exists.
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return false;
            }
        }
        // SAFETY: plain kill(2) on our own child, which has not been reaped (it still runs).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        true
    });
    let out = child.wait_with_output().expect("waiting for tracer");
    let hung = watchdog.join().unwrap_or(false);
    assert!(!hung, "{args:?}: still running after 10 s");
    out
}

fn pgc_programs() -> Vec<String> {
    let mut names: Vec<String> = loaded_program_names()
        .expect("bpftool -j prog show")
        .into_iter()
        .filter(|n| n.starts_with("pgc_"))
        .collect();
    names.sort();
    names
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn has_strace() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn bad_input_exits_2_with_one_line_naming_the_value_and_attaches_nothing() {
    let bin = tracer_bin();
    let root = is_root();
    let strace = has_strace();
    if !root {
        eprintln!("not root: the bpftool check is skipped, exit codes are still checked");
    }
    if !strace {
        eprintln!("strace not installed: the no-bpf()-syscall check is skipped");
    }
    let dir = TempDir::new("config").expect("temp dir");
    for (i, case) in cases().into_iter().enumerate() {
        let config = dir.0.join(format!("case-{i}.toml"));
        if let Some(contents) = case.config {
            std::fs::write(&config, contents).expect("write config");
        }
        let args: Vec<OsString> = case
            .args
            .iter()
            .map(|a| {
                if a == CONFIG {
                    config.clone().into_os_string()
                } else {
                    a.clone()
                }
            })
            .collect();
        // Other tests may run a daemon meanwhile: only programs that appear count.
        let before = if root { pgc_programs() } else { Vec::new() };

        let out = run(&bin, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: not one line: {stderr:?}");
        assert!(lines[0].starts_with("tracer: "), "{args:?}: {stderr:?}");
        assert!(
            lines[0].contains(case.needle),
            "{args:?}: {stderr:?} does not name {:?}",
            case.needle
        );
        assert!(out.stdout.is_empty(), "{args:?}: wrote to stdout");

        if root {
            let new: Vec<String> = pgc_programs()
                .into_iter()
                .filter(|p| !before.contains(p))
                .collect();
            assert!(
                new.is_empty(),
                "{args:?}: left BPF programs loaded: {new:?}"
            );
        }
        // Programs die with the process, so the check above only catches leftovers; strace
        // shows whether anything was loaded at all.
        if strace {
            let log = dir.0.join(format!("case-{i}.strace"));
            let mut traced: Vec<OsString> = ["-f", "-qq", "-e", "trace=bpf,perf_event_open", "-o"]
                .iter()
                .map(OsString::from)
                .collect();
            traced.push(log.clone().into_os_string());
            traced.push(bin.clone().into_os_string());
            traced.extend(args.iter().cloned());
            let out = run(Path::new("strace"), &traced);
            assert_eq!(out.status.code(), Some(2), "{args:?} under strace");
            let calls = std::fs::read_to_string(&log).expect("strace log");
            assert!(
                !calls.contains("bpf(") && !calls.contains("perf_event_open("),
                "{args:?}: touched BPF before rejecting its input:\n{calls}"
            );
        }
    }
}

#[test]
fn run_help_exits_0_on_stdout() {
    for args in [&["run", "--help"][..], &["--help"], &["--version"]] {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let out = run(&tracer_bin(), &args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(out.stderr.is_empty(), "{args:?}: stderr not empty");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("tracer"), "{args:?}: {stdout}");
    }
    let out = run(
        &tracer_bin(),
        &[OsString::from("run"), OsString::from("--help")],
    );
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--config",
        "--stall-after",
        "--max-connections",
        "--max-label-sets",
    ] {
        assert!(help.contains(option), "run --help lacks {option}");
    }
}

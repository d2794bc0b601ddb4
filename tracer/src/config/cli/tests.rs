#![allow(
    clippy::let_underscore_must_use,
    reason = "clean-up of processes, sockets and files that may be gone already, and calls made only to show they do not panic: their results are ignored on purpose"
)]
use std::{
    ffi::OsString,
    os::unix::ffi::OsStringExt,
    sync::atomic::{AtomicU32, Ordering},
};

use super::*;

/// A config file under the temp dir, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(contents: &[u8]) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "tracer-cli-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).expect("write config");
        Self(path)
    }

    fn arg(&self) -> String {
        self.0.to_str().expect("utf-8 temp path").to_owned()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn parse_os(args: Vec<OsString>) -> Result<Command, CliError> {
    parse(args).map(|cli| cli.command)
}

fn argv(args: &[&str]) -> Vec<OsString> {
    std::iter::once("tracer")
        .chain(args.iter().copied())
        .map(OsString::from)
        .collect()
}

fn run_args(args: &[&str]) -> Result<RunArgs, CliError> {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    match parse_os(argv(&all))? {
        Command::Run(a) => Ok(a),
        other => panic!("not run: {other:?}"),
    }
}

#[test]
fn defaults_follow_the_spec() {
    let a = run_args(&[]).expect("parses");
    assert_eq!(a.ports, vec![5432, 6432]);
    assert_eq!(a.unique_ports(), vec![5432, 6432]);
    assert_eq!(a.unix_socket_glob, "*/.s.PGSQL.*");
    assert_eq!(a.events, EventsDest::Stdout);
    assert_eq!(
        a.metrics_addr,
        Some("127.0.0.1:9433".parse().expect("addr"))
    );
    assert_eq!(a.stall_after, Duration::from_secs(5));
    assert_eq!(a.idle_in_transaction_after, Duration::from_secs(30));
    assert_eq!(a.close_wait_after, Duration::from_secs(10));
    assert_eq!(a.idle_after, Duration::from_secs(30 * 60));
    assert_eq!(a.log_level, log::LevelFilter::Info);
    assert_eq!(a.max_label_sets, 1000);
    assert_eq!(a.max_connections, 65_536);
    assert_eq!(a.cmdline, CmdlineMode::Redacted);
    assert_eq!(a.web_config, None);
    assert_eq!(a.config, None);
    assert_eq!(a, RunArgs::default());
}

#[test]
fn every_flag() {
    let a = run_args(&[
        "--port=6432,5432",
        "--port",
        "15432",
        "--port",
        "5432",
        "--unix-socket-glob",
        "/run/pg/*",
        "--events",
        "/tmp/ev.jsonl",
        "--metrics-addr",
        "[::1]:9500",
        "--stall-after",
        "500ms",
        "--idle-in-transaction-after",
        "1m30s",
        "--close-wait-after",
        "2m",
        "--idle-after",
        "1h",
        "--log-level",
        "trace",
        "--format",
        "text",
        "--max-label-sets",
        "10",
        "--max-connections",
        "16",
        "--state-dir",
        "/tmp/tracer-state",
        "--cmdline",
        "full",
    ])
    .expect("parses");
    assert_eq!(
        a,
        RunArgs {
            ports: vec![5432, 6432, 15432],
            unix_socket_glob: "/run/pg/*".into(),
            events: EventsDest::File("/tmp/ev.jsonl".into()),
            metrics_addr: Some("[::1]:9500".parse().expect("addr")),
            stall_after: Duration::from_millis(500),
            idle_in_transaction_after: Duration::from_secs(90),
            close_wait_after: Duration::from_secs(120),
            idle_after: Duration::from_secs(3600),
            log_level: log::LevelFilter::Trace,
            format: crate::export::events::EventFormat::Text,
            max_label_sets: 10,
            max_connections: 16,
            state_dir: config::StateDirSetting::Dir("/tmp/tracer-state".into()),
            cmdline: CmdlineMode::Full,
            web_config: None,
            config: None,
        }
    );
    let off = run_args(&["--metrics-addr", "off"]).expect("parses");
    assert_eq!(off.metrics_addr, None);
}

#[test]
fn flags_win_over_the_file_and_the_file_over_defaults() {
    let file = ConfigFile::new(
        br#"
        port = [7000, 7001]
        stall_after = "1s"
        idle_after = "2h"
        metrics_addr = "off"
        log_level = "warn"
        max_connections = 1024
        "#,
    );
    let a = run_args(&[
        "--config",
        &file.arg(),
        "--port",
        "8000",
        "--idle-after",
        "5m",
        "--metrics-addr",
        "127.0.0.1:9999",
    ])
    .expect("parses");
    // Flags.
    assert_eq!(a.ports, vec![8000]);
    assert_eq!(a.idle_after, Duration::from_secs(300));
    assert_eq!(
        a.metrics_addr,
        Some("127.0.0.1:9999".parse().expect("addr"))
    );
    // File.
    assert_eq!(a.stall_after, Duration::from_secs(1));
    assert_eq!(a.log_level, log::LevelFilter::Warn);
    assert_eq!(a.max_connections, 1024);
    // Defaults.
    assert_eq!(a.close_wait_after, Duration::from_secs(10));
    assert_eq!(a.idle_in_transaction_after, Duration::from_secs(30));
    assert_eq!(a.max_label_sets, 1000);
    assert_eq!(a.events, EventsDest::Stdout);
    assert_eq!(a.config, Some(file.0.clone()));

    // Without flags the file's values hold.
    let a = run_args(&["--config", &file.arg()]).expect("parses");
    assert_eq!(a.ports, vec![7000, 7001]);
    assert_eq!(a.metrics_addr, None);
    assert_eq!(a.idle_after, Duration::from_secs(7200));
}

#[test]
fn an_empty_file_changes_nothing() {
    let file = ConfigFile::new(b"# all defaults\n");
    let a = run_args(&["--config", &file.arg()]).expect("parses");
    assert_eq!(
        a,
        RunArgs {
            config: Some(file.0.clone()),
            ..RunArgs::default()
        }
    );
}

/// Asserts exit class 2, one line, and every needle in it.
fn assert_bad(args: Vec<OsString>, needles: &[&str]) {
    let shown = format!("{args:?}");
    let err = parse_os(args).expect_err(&shown);
    assert_eq!(err.exit_code(), 2, "{shown}: {err}");
    let CliError::Usage(line) = &err else {
        panic!("{shown}: not a usage error: {err}");
    };
    assert!(
        !line.is_empty() && !line.contains('\n'),
        "{shown}: {line:?}"
    );
    for needle in needles {
        assert!(line.contains(needle), "{shown}: {line:?} lacks {needle:?}");
    }
}

#[test]
fn bad_flags_are_one_line_naming_the_value() {
    for (args, needles) in [
        (&["run", "--port", "0"][..], &["'0'", "--port"][..]),
        (&["run", "--port", "65536"], &["'65536'"]),
        (&["run", "--port", "abc"], &["'abc'"]),
        (&["run", "--port", "5432,-1"], &["'-1'"]),
        (&["run", "--port", "-1"], &["'-1'"]),
        (&["run", "--port", "5432,"], &["''", "--port"]),
        (&["run", "--port"], &["--port"]),
        (&["run", "--bogus"], &["--bogus"]),
        (&["run", "extra"], &["extra"]),
        (&["bogus"], &["bogus"]),
        (&[], &["subcommand"]),
        (
            &["run", "--stall-after", "0s"],
            &["'0s'", "--stall-after", "greater than zero"],
        ),
        (&["run", "--idle-in-transaction-after", "0ms"], &["'0ms'"]),
        (&["run", "--close-wait-after", "0m"], &["'0m'"]),
        (&["run", "--idle-after", "0h"], &["'0h'"]),
        (&["run", "--idle-after", "-5s"], &["'-5s'", "negative"]),
        (&["run", "--stall-after", "5"], &["'5'", "missing unit"]),
        (&["run", "--stall-after", "5x"], &["'5x'"]),
        (&["run", "--stall-after", "soon"], &["'soon'"]),
        (&["run", "--stall-after", "5s\n"], &["'5s\\n'"]),
        (
            &["run", "--metrics-addr", "127.0.0.1:0"],
            &["'127.0.0.1:0'"],
        ),
        (&["run", "--metrics-addr", "[::1]:0"], &["'[::1]:0'"]),
        (
            &["run", "--metrics-addr", "localhost:9433"],
            &["'localhost:9433'"],
        ),
        (&["run", "--metrics-addr", "9433"], &["'9433'"]),
        (&["run", "--log-level", "loud"], &["'loud'"]),
        (&["run", "--events", ""], &["--events"]),
        (
            &["run", "--unix-socket-glob", ""],
            &["--unix-socket-glob", "empty glob"],
        ),
        (&["run", "--unix-socket-glob", "/tmp/[x"], &["'/tmp/[x'"]),
        (
            &["run", "--max-label-sets", "0"],
            &["'0'", "--max-label-sets"],
        ),
        (&["run", "--max-connections", "15"], &["'15'", "16-1048576"]),
        (&["run", "--max-connections", "1048577"], &["'1048577'"]),
        (&["run", "--max-connections", "-1"], &["'-1'"]),
        (&["run", "--state-dir", ""], &["--state-dir", "empty path"]),
        (
            &["run", "--config", "/nonexistent/tracer.toml"],
            &["/nonexistent/tracer.toml", "No such file"],
        ),
        (&["run", "--config", "/"], &["config /:"]),
        (&["run", "--cmdline", "none"], &["'none'", "--cmdline"]),
        (&["run", "--web-config", ""], &["--web-config", "empty"]),
        (
            &["run", "--web-config", "/nonexistent/web.yml"],
            &["web config /nonexistent/web.yml", "cannot read"],
        ),
        (&["list", "--cmdline", "all"], &["'all'"]),
        (&["list", "--port", "0"], &["'0'"]),
        (&["list", "--unix-socket-glob", "[x"], &["'[x'"]),
        (&["list", "--stall-after", "5s"], &["--stall-after"]),
        (&["check", "--json"], &["--json"]),
        (
            &["list", "--metrics-addr", "9433"],
            &["'9433'", "--metrics-addr"],
        ),
        (&["top", "--metrics-addr", "off"], &["'off'", "daemon"]),
        (&["top", "--metrics-addr", "host:1"], &["'host:1'"]),
        (&["top", "--json"], &["--json"]),
    ] {
        assert_bad(argv(args), needles);
    }
}

#[test]
fn non_utf8_values_are_named() {
    let mut args = argv(&["run", "--port"]);
    args.push(OsString::from_vec(b"54\xff".to_vec()));
    assert_bad(args, &["'54\\xff'", "--port", "UTF-8"]);
    let mut args = argv(&["run", "--stall-after"]);
    args.push(OsString::from_vec(b"\xfe5s".to_vec()));
    assert_bad(args, &["'\\xfe5s'"]);
    // A path may be any bytes.
    let mut args = argv(&["run", "--events"]);
    args.push(OsString::from_vec(b"/tmp/ev\xff".to_vec()));
    match parse_os(args).expect("parses") {
        Command::Run(a) => assert!(matches!(a.events, EventsDest::File(_))),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_files_are_one_line_naming_file_key_and_value() {
    for (contents, needles) in [
        (&b"bogus = 1\n"[..], &["line 1", "bogus"][..]),
        (b"port = [5432, 0]", &["port 0"]),
        (b"port = 65536", &["port 65536"]),
        (b"\nstall_after = \"0s\"", &["line 2", "stall_after '0s'"]),
        (b"idle_after = \"5\"", &["idle_after '5'"]),
        (b"metrics_addr = \"1.2.3.4\"", &["metrics_addr '1.2.3.4'"]),
        (b"state_dir = \"\"", &["state_dir ''", "empty path"]),
        (b"port = [5432,", &["line 1", "port = [5432,"]),
        (b"log_level = \"\xff\"", &["not valid UTF-8"]),
        (b"[[x]]\ny = 1\n", &["x"]),
        (b"cmdline = \"none\"", &["cmdline 'none'"]),
        (b"web_config = \"\"", &["web_config ''"]),
    ] {
        let file = ConfigFile::new(contents);
        let mut needles = needles.to_vec();
        let name = format!("config {}", file.0.display());
        needles.push(&name);
        assert_bad(argv(&["run", "--config", &file.arg()]), &needles);
    }
}

#[test]
fn a_bad_file_is_rejected_even_when_flags_override_the_key() {
    let file = ConfigFile::new(b"stall_after = \"0s\"");
    assert_bad(
        argv(&["run", "--config", &file.arg(), "--stall-after", "5s"]),
        &["stall_after '0s'"],
    );
}

#[test]
fn help_and_version_exit_zero() {
    for args in [
        &["--help"][..],
        &["--version"],
        &["run", "--help"],
        &["list", "--help"],
        &["check", "--help"],
        &["top", "--help"],
        &["help", "run"],
    ] {
        let err = parse_os(argv(args)).expect_err("stops");
        assert_eq!(err.exit_code(), 0, "{args:?}");
        assert!(matches!(err, CliError::Info(_)), "{args:?}");
    }
}

#[test]
fn run_help_documents_every_option_and_its_default() {
    let Err(CliError::Info(help)) = parse_os(argv(&["run", "--help"])) else {
        panic!("no help");
    };
    let help = help.render().to_string();
    for needle in [
        "--config <FILE>",
        "--port <P>",
        "[default: 5432,6432]",
        "--unix-socket-glob <G>",
        "[default: */.s.PGSQL.*]",
        "--events <DEST>",
        "[default: -]",
        "--metrics-addr <ADDR>",
        "[default: 127.0.0.1:9433]",
        "--stall-after <DUR>",
        "[default: 5s]",
        "--idle-in-transaction-after <DUR>",
        "[default: 30s]",
        "--close-wait-after <DUR>",
        "[default: 10s]",
        "--idle-after <DUR>",
        "[default: 30m]",
        "--log-level <LEVEL>",
        "[default: info]",
        "--max-label-sets <N>",
        "[default: 1000]",
        "--max-connections <N>",
        "[default: 65536]",
        "--state-dir <DIR>",
        "--cmdline <MODE>",
        "[default: redacted]",
        "--web-config <FILE>",
        "stall_after = \"5s\"",
    ] {
        assert!(help.contains(needle), "help lacks {needle:?}:\n{help}");
    }
}

#[test]
fn list_and_check() {
    assert_eq!(
        match parse_os(argv(&["list"])).expect("parses") {
            Command::List(a) => a,
            other => panic!("{other:?}"),
        },
        ListArgs {
            json: false,
            ports: vec![5432, 6432],
            unix_socket_glob: "*/.s.PGSQL.*".into(),
            cmdline: CmdlineMode::Redacted,
            metrics_addr: Some("127.0.0.1:9433".parse().expect("addr")),
        }
    );
    assert_eq!(
        match parse_os(argv(&[
            "list",
            "--json",
            "--port",
            "7000,6000",
            "--port=6000",
            "--unix-socket-glob",
            "/run/*",
            "--cmdline=off",
            "--metrics-addr",
            "off"
        ]))
        .expect("parses")
        {
            Command::List(a) => a,
            other => panic!("{other:?}"),
        },
        ListArgs {
            json: true,
            ports: vec![6000, 7000],
            unix_socket_glob: "/run/*".into(),
            cmdline: CmdlineMode::Off,
            metrics_addr: None,
        }
    );
    assert_eq!(
        match parse_os(argv(&["top"])).expect("parses") {
            Command::Top(a) => a,
            other => panic!("{other:?}"),
        },
        TopArgs {
            metrics_addr: "127.0.0.1:9433".parse().expect("addr"),
        }
    );
    assert_eq!(
        match parse_os(argv(&["top", "--metrics-addr", "[::1]:9500"])).expect("parses") {
            Command::Top(a) => a,
            other => panic!("{other:?}"),
        },
        TopArgs {
            metrics_addr: "[::1]:9500".parse().expect("addr"),
        }
    );
    assert!(matches!(
        parse_os(argv(&["check"])).expect("parses"),
        Command::Check
    ));
}

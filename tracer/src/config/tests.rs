use crate::host::redact::CmdlineMode;
use std::path::Path;

use super::*;

/// Whether `path` matches the glob `pattern`; an invalid pattern matches nothing.
fn glob_matches(pattern: &str, path: &str) -> bool {
    Glob::compile(pattern).is_ok_and(|g| g.matches(path))
}

/// Runs `parse` over `cases`: an `Ok` must come out equal, an `Err` must contain the text.
fn check_parser<T: PartialEq + std::fmt::Debug, const N: usize>(
    parse: impl Fn(&str) -> Result<T, String>,
    cases: [(&str, Result<T, &str>); N],
) {
    for (text, want) in cases {
        match (parse(text), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{text:?}"),
            (Err(got), Err(want)) => assert!(got.contains(want), "{text:?}: {got}"),
            (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn durations() {
    let ms = Duration::from_millis;
    let cases = [
        ("500ms", Ok(ms(500))),
        ("5s", Ok(ms(5_000))),
        ("2m", Ok(ms(120_000))),
        ("1h", Ok(ms(3_600_000))),
        ("1d", Ok(ms(86_400_000))),
        ("1m30s", Ok(ms(90_000))),
        ("1h2m3s4ms", Ok(ms(3_723_004))),
        ("0s", Ok(Duration::ZERO)),
        ("30d", Ok(MAX_DURATION)),
        ("", Err("empty duration")),
        ("5", Err("missing unit")),
        ("1m30", Err("missing unit")),
        ("-5s", Err("negative")),
        ("5x", Err("unknown unit 'x'")),
        ("5 s", Err("unexpected ' '")),
        (" 5s", Err("unexpected ' '")),
        ("1.5s", Err("unexpected '.'")),
        ("5s ", Err("unexpected ' '")),
        ("s", Err("unexpected 's'")),
        ("5s\n", Err("unexpected '\\n'")),
        ("5s5", Err("missing unit")),
        ("31d", Err("too long")),
        ("99999999999999999999s", Err("too long")),
        ("18446744073709551615h", Err("too long")),
    ];
    check_parser(parse_duration, cases);
}

#[test]
fn thresholds_reject_zero() {
    assert_eq!(parse_threshold("1ms"), Ok(Duration::from_millis(1)));
    for zero in ["0s", "0ms", "0m0s", "0h"] {
        assert_eq!(
            parse_threshold(zero),
            Err("must be greater than zero".into()),
            "{zero}"
        );
    }
}

#[test]
fn ports() {
    for (text, want) in [
        ("1", Some(1)),
        ("5432", Some(5432)),
        ("65535", Some(65535)),
        (" 6432 ", Some(6432)),
        ("0", None),
        ("65536", None),
        ("-1", None),
        ("", None),
        ("54x", None),
        ("99999999999999999999999999", None),
    ] {
        assert_eq!(parse_port(text).ok(), want, "{text:?}");
    }
}

#[test]
fn metrics_addresses() {
    let v6: SocketAddr = "[::1]:9433".parse().expect("v6");
    let cases = [
        ("127.0.0.1:9433", Ok(Some(DEFAULT_METRICS_ADDR))),
        ("[::1]:9433", Ok(Some(v6))),
        ("off", Ok(None)),
        ("127.0.0.1:0", Err("port 0")),
        ("[::1]:0", Err("port 0")),
        ("127.0.0.1", Err("expected IP:PORT")),
        ("::1:9433", Err("expected IP:PORT")),
        ("localhost:9433", Err("expected IP:PORT")),
        ("127.0.0.1:65536", Err("expected IP:PORT")),
        ("OFF", Err("expected IP:PORT")),
        ("", Err("expected IP:PORT")),
    ];
    check_parser(parse_metrics_addr, cases);
}

#[test]
fn counts() {
    assert_eq!(parse_max_connections("16"), Ok(16));
    assert_eq!(parse_max_connections("1048576"), Ok(1_048_576));
    assert!(parse_max_connections("15").is_err());
    assert!(parse_max_connections("1048577").is_err());
    assert!(parse_max_connections("-1").is_err());
    assert_eq!(parse_max_label_sets("1"), Ok(1));
    assert!(parse_max_label_sets("0").is_err());
    assert!(parse_max_label_sets("1e3").is_err());
}

#[test]
fn globs() {
    const PG: &str = DEFAULT_UNIX_SOCKET_GLOB;
    for (pattern, path, want) in [
        (PG, "/var/run/postgresql/.s.PGSQL.5432", true),
        (PG, "/tmp/.s.PGSQL.6432", true),
        (PG, "/.s.PGSQL.5432", true),
        // `*` crosses `/` and `.`: the lock file would match, but it is not a socket.
        (PG, "/tmp/.s.PGSQL.5432.lock", true),
        (PG, ".s.PGSQL.5432", false),
        (PG, "/tmp/s.PGSQL.5432", false),
        (PG, "/tmp/.s.PGSQL", false),
        (PG, "/tmp/.s.pgsql.5432", false),
        (PG, "/tmp/mysql.sock", false),
        ("/tmp/.s.PGSQL.5432", "/tmp/.s.PGSQL.5432", true),
        ("/tmp/.s.PGSQL.5432", "/tmp/.s.PGSQL.54321", false),
        ("*", "", true),
        ("*", "/any/thing", true),
        ("**", "/a/b", true),
        ("a*b*c", "abc", true),
        ("a*b*c", "a/x/b/y/c", true),
        ("a*b*c", "a/x/b/y/cd", false),
        ("a*b*c", "acb", false),
        ("?", "a", true),
        ("?", "", false),
        ("?", "ab", false),
        ("/run/pg?/x", "/run/pg1/x", true),
        ("*.[0-9][0-9][0-9][0-9]", "/s.5432", true),
        ("*.[0-9][0-9][0-9][0-9]", "/s.543x", false),
        ("*.[!0-9]", "/s.x", true),
        ("*.[!0-9]", "/s.5", false),
        ("*.[^0-9]", "/s.5", false),
        ("[]]", "]", true),
        ("[!]]", "]", false),
        ("[a-]", "-", true),
        ("[a-]", "a", true),
        ("\\*", "*", true),
        ("\\*", "x", false),
        ("[\\]]", "]", true),
        ("/tmp/é/*", "/tmp/é/.s.PGSQL.1", true),
        (
            "*a*a*a*a*a*a*b",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            false,
        ),
        // An invalid pattern matches nothing.
        ("[abc", "[abc", false),
        ("", "", false),
    ] {
        assert_eq!(glob_matches(pattern, path), want, "{pattern:?} vs {path:?}");
    }
}

#[test]
fn bad_globs_say_why() {
    for (pattern, reason) in [
        ("", "empty glob"),
        ("/tmp/[abc", "unclosed '['"),
        ("[!", "unclosed '['"),
        ("[\\", "unclosed '['"),
        ("abc\\", "trailing '\\'"),
        ("[z-a]", "reversed range 'z-a'"),
    ] {
        let err = parse_unix_socket_glob(pattern).expect_err(pattern);
        assert!(err.contains(reason), "{pattern:?}: {err}");
    }
}

#[test]
fn a_file_with_every_key() {
    let text = r#"
        port = [6432, 5432, 6432, 15432]
        unix_socket_glob = "/run/pg/.s.PGSQL.*"
        events = "/var/log/tracer/events.jsonl"
        metrics_addr = "[::1]:9500"
        stall_after = "500ms"
        idle_in_transaction_after = "1m30s"
        close_wait_after = "2m"
        idle_after = "1h"
        log_level = "debug"
        format = "text"
        max_label_sets = 50
        max_connections = 4096
        state_dir = "off"
        cmdline = "off"
        web_config = "/etc/tracer/web-config.yml"
    "#;
    let got = parse_file(Path::new("t.toml"), text).expect("valid");
    assert_eq!(
        got,
        RunSettings {
            ports: Some(vec![5432, 6432, 15432]),
            unix_socket_glob: Some("/run/pg/.s.PGSQL.*".into()),
            events: Some(EventsDest::File("/var/log/tracer/events.jsonl".into())),
            metrics_addr: Some(Some("[::1]:9500".parse().expect("addr"))),
            stall_after: Some(Duration::from_millis(500)),
            idle_in_transaction_after: Some(Duration::from_secs(90)),
            close_wait_after: Some(Duration::from_secs(120)),
            idle_after: Some(Duration::from_secs(3600)),
            log_level: Some(log::LevelFilter::Debug),
            format: Some(crate::export::events::EventFormat::Text),
            max_label_sets: Some(50),
            max_connections: Some(4096),
            state_dir: Some(StateDirSetting::Off),
            cmdline: Some(CmdlineMode::Off),
            web_config: Some("/etc/tracer/web-config.yml".into()),
        }
    );
}

#[test]
fn file_values_that_are_easy_to_get_wrong() {
    let parse = |text: &str| parse_file(Path::new("t.toml"), text).expect(text);
    assert_eq!(parse("port = 5432").ports, Some(vec![5432]));
    assert_eq!(parse("metrics_addr = \"off\"").metrics_addr, Some(None));
    assert_eq!(parse("events = \"-\"").events, Some(EventsDest::Stdout));
    assert_eq!(parse("# nothing\n"), RunSettings::default());
}

#[test]
fn bad_files_give_one_line_with_file_line_and_value() {
    for (text, line, needles) in [
        ("bogus = 1", 1, &["unknown field `bogus`"][..]),
        ("\n\n[run]\nport = 1", 3, &["unknown field `run`"]),
        ("config = \"x.toml\"", 1, &["unknown field `config`"]),
        ("port = 0", 1, &["port 0", "1-65535"]),
        ("port = [5432,\n  70000]", 1, &["port 70000"]),
        ("port = -1", 1, &["port -1"]),
        ("port = []", 1, &["port: empty list"]),
        ("port = \"5432\"", 1, &["\"5432\"", "port = \"5432\""]),
        ("port = [5432, \"x\"]", 1, &["\"x\""]),
        (
            "\nstall_after = \"0s\"",
            2,
            &["stall_after '0s'", "greater than zero"],
        ),
        (
            "idle_in_transaction_after = \"0ms\"",
            1,
            &["idle_in_transaction_after '0ms'"],
        ),
        ("close_wait_after = \"0m\"", 1, &["close_wait_after '0m'"]),
        ("idle_after = \"0h\"", 1, &["idle_after '0h'"]),
        ("idle_after = \"-5m\"", 1, &["idle_after '-5m'", "negative"]),
        (
            "stall_after = \"5\"",
            1,
            &["stall_after '5'", "missing unit"],
        ),
        ("stall_after = \"5 s\"", 1, &["stall_after '5 s'"]),
        ("stall_after = 5", 1, &["integer `5`", "stall_after = 5"]),
        (
            "metrics_addr = \"127.0.0.1:0\"",
            1,
            &["metrics_addr '127.0.0.1:0'"],
        ),
        ("metrics_addr = \"nowhere\"", 1, &["metrics_addr 'nowhere'"]),
        ("log_level = \"loud\"", 1, &["log_level 'loud'"]),
        ("format = \"yaml\"", 1, &["format 'yaml'"]),
        ("events = \"\"", 1, &["events ''"]),
        (
            "unix_socket_glob = \"\"",
            1,
            &["unix_socket_glob ''", "empty glob"],
        ),
        ("unix_socket_glob = \"[x\"", 1, &["unix_socket_glob '[x'"]),
        ("max_label_sets = 0", 1, &["max_label_sets '0'"]),
        (
            "max_connections = 8",
            1,
            &["max_connections '8'", "16-1048576"],
        ),
        ("max_connections = -1", 1, &["`-1`", "max_connections = -1"]),
        (
            "stall_after = \"5s\"\nstall_after = \"6s\"",
            2,
            &["duplicate key"],
        ),
        ("port = [5432,", 1, &["port = [5432,"]),
        ("port = ", 1, &["port ="]),
        ("= 5", 1, &["= 5"]),
        ("log_level = \"tab\\there\"", 1, &["log_level 'tab\\there'"]),
    ] {
        let err = parse_file(Path::new("/etc/tracer.toml"), text)
            .expect_err(text)
            .to_string();
        assert!(!err.contains('\n'), "{text:?}: {err}");
        let prefix = format!("config /etc/tracer.toml line {line}: ");
        assert!(err.starts_with(&prefix), "{text:?}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{text:?}: {err} lacks {needle}");
        }
    }
}

#[test]
fn flatten_joins_lines() {
    assert_eq!(flatten("a\n  b\r\n\nc  "), "a b c");
    assert_eq!(shown("a\nb\tc"), "a\\nb\\tc");
}

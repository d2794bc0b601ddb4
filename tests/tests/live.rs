//! The live view: the daemon's live table (`GET /api/v1/connections`), `tracer list` asking
//! the daemon first, and `tracer top` in a real terminal (tmux). A worker holds 3
//! connections idle in a transaction, another process holds one idle; `pg_stat_activity`
//! is the oracle for what each backend is doing.
use std::{
    collections::BTreeMap,
    process::{Command, Output},
    time::{Duration, Instant},
};

use tests::{
    Tracer, Value,
    clients::{Client, ClientKind, ClientOptions, Target},
    free_port, patience,
    prom::http_get,
    root_postgres, run_ok,
    schema::{connections_schema_path, load_schema, schema_path, validate_connections},
    tracer_bin,
};

/// A leak verdict soon after the transaction went quiet.
const IDLE_IN_TX: &str = "2s";

/// The live table's rows, checked against the published schema.
fn live_table(addr: &str) -> Vec<Value> {
    let answer = http_get(addr, "/api/v1/connections", Duration::from_secs(5)).expect("GET");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer
            .headers
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{}",
        answer.headers
    );
    let body: Value = serde_json::from_str(&answer.body).expect("a JSON body");
    validate_connections(&body).unwrap_or_else(|e| panic!("{e}"));
    body.as_array().expect("an array").clone()
}

/// The rows owned by `pid`, with the given role.
fn owned<'a>(rows: &'a [Value], pid: u32, role: &str) -> Vec<&'a Value> {
    rows.iter()
        .filter(|r| r["pid"] == pid && r["role"] == role)
        .collect()
}

fn states(rows: &[&Value]) -> Vec<String> {
    let mut states: Vec<String> = rows
        .iter()
        .map(|r| r["state"].as_str().unwrap_or("?").to_owned())
        .collect();
    states.sort();
    states
}

fn polled<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let timeout = patience(timeout);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tracer(args: &[&str]) -> Output {
    Command::new(tracer_bin())
        .args(args)
        .output()
        .expect("run tracer")
}

/// A tmux session of our own, killed on drop.
struct Tmux(String);

impl Tmux {
    /// A 100x30 terminal running `command` under `sh`.
    fn start(command: &str) -> Self {
        let name = format!("tracer-live-{}", std::process::id());
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &name])
            .output();
        run_ok(Command::new("tmux").args([
            "new-session",
            "-d",
            "-s",
            &name,
            "-x",
            "100",
            "-y",
            "30",
            "sh",
            "-c",
            command,
        ]))
        .expect("tmux new-session");
        Self(name)
    }

    fn screen(&self) -> String {
        let out = run_ok(Command::new("tmux").args(["capture-pane", "-p", "-t", &self.0]))
            .expect("capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        run_ok(Command::new("tmux").args(["send-keys", "-t", &self.0, keys])).expect("send-keys");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

/// The cells of `pid`'s group line under the header's column names, if on screen.
fn group_cells(screen: &str, pid: u32) -> Option<BTreeMap<String, String>> {
    let header: Vec<&str> = screen
        .lines()
        .find(|l| l.contains("PID") && l.contains("IN-TX"))?
        .split_whitespace()
        .collect();
    let line = screen.lines().find(|l| {
        let mut cells = l.split_whitespace();
        matches!(cells.next(), Some("+" | "-")) && cells.next() == Some(&pid.to_string())
    })?;
    let cells: Vec<&str> = line.split_whitespace().skip(1).collect();
    Some(
        header
            .iter()
            .zip(cells)
            .map(|(h, c)| ((*h).to_owned(), c.to_owned()))
            .collect(),
    )
}

#[test]
fn the_live_table_list_and_top_show_transaction_states() {
    let Some(pg) = root_postgres() else { return };
    let port = pg.port.to_string();
    let addr = format!("127.0.0.1:{}", free_port().expect("port"));
    let glob = format!("{}/.s.PGSQL.{}", pg.socket_dir.display(), pg.port);
    let daemon = Tracer::start(&[
        "--port",
        &port,
        "--unix-socket-glob",
        &glob,
        "--metrics-addr",
        &addr,
        "--idle-in-transaction-after",
        IDLE_IN_TX,
    ])
    .expect("tracer");

    let target = Target::tcp(pg.port);
    let worker = Client::start(
        ClientKind::Psycopg2,
        &target,
        &ClientOptions {
            connections: 3,
            in_transaction: true,
            ..ClientOptions::default()
        },
    )
    .expect("worker");
    let idler = Client::start(
        ClientKind::Psycopg2,
        &target,
        &ClientOptions {
            connections: 1,
            in_transaction: false,
            ..ClientOptions::default()
        },
    )
    .expect("idle client");
    let (worker_pid, idler_pid) = (worker.pid(), idler.pid());

    // The oracle: Postgres sees the worker's backends in a transaction, the other idle.
    let pg_view = pg.client_states();
    for backend in &worker.backend_pids {
        assert_eq!(
            pg_view.get(backend).map(String::as_str),
            Some("idle in transaction"),
            "{pg_view:?}"
        );
    }
    assert_eq!(
        pg_view.get(&idler.backend_pids[0]).map(String::as_str),
        Some("idle"),
        "{pg_view:?}"
    );

    // The API: both ends of every connection, with the real states, and the leak verdict
    // on the worker's once it has been quiet for IDLE_IN_TX.
    let rows = polled(
        "the leak verdicts in the live table",
        Duration::from_secs(15),
        || {
            let rows = live_table(&addr);
            let leaking = owned(&rows, worker_pid, "client");
            (leaking.len() == 3
                && leaking
                    .iter()
                    .all(|r| r["leak"] == "idle_in_transaction" && r["stalled"] == false))
            .then_some(rows)
        },
    );
    assert_eq!(
        states(&owned(&rows, worker_pid, "client")),
        ["idle_in_transaction"; 3]
    );
    assert_eq!(states(&owned(&rows, idler_pid, "client")), ["idle"]);
    assert!(owned(&rows, idler_pid, "client")[0]["leak"].is_null());
    for backend in &worker.backend_pids {
        assert_eq!(
            states(&owned(&rows, *backend, "server")),
            ["idle_in_transaction"],
            "backend {backend}"
        );
    }
    assert_eq!(
        states(&owned(&rows, idler.backend_pids[0], "server")),
        ["idle"]
    );
    for row in owned(&rows, worker_pid, "client") {
        assert_eq!(row["remote"], format!("127.0.0.1:{port}"));
        assert!(row["waiting_s"].is_null(), "nothing in flight: {row}");
        assert!(row["idle_s"].as_f64().expect("idle_s") >= 2.0, "{row}");
        for key in ["peer_conn_id", "linked", "backend_pid"] {
            assert!(row.get(key).is_some(), "{key} missing: {row}");
        }
    }

    // `tracer list` asks the daemon: the same states, one JSON object per line.
    let out = tracer(&["list", "--json", "--port", &port, "--metrics-addr", &addr]);
    assert!(out.status.success(), "{out:?}");
    let note = String::from_utf8_lossy(&out.stderr);
    assert_eq!(note.lines().count(), 1, "{note}");
    assert!(note.contains(&format!("daemon at {addr}")), "{note}");
    let listed: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(
        states(&owned(&listed, worker_pid, "client")),
        ["idle_in_transaction"; 3]
    );
    assert_eq!(states(&owned(&listed, idler_pid, "client")), ["idle"]);
    for row in &listed {
        assert!(
            row["conn_id"].is_string() && row["transport"].is_string(),
            "{row}"
        );
    }

    // `tracer top` in a real terminal: the worker's line shows its pid, 3 connections idle
    // in a transaction and 3 leaks; `q` quits and gives the terminal back.
    let tmux = Tmux::start(&format!(
        "{} top --metrics-addr {addr}; echo \"top exited $?\"; stty -a; sleep 600",
        tracer_bin().display()
    ));
    let cells = polled("the worker's line in top", Duration::from_secs(15), || {
        group_cells(&tmux.screen(), worker_pid)
    });
    assert_eq!(cells["IN-TX"], "3", "{}", tmux.screen());
    assert_eq!(cells["CONNS"], "3", "{}", tmux.screen());
    assert_eq!(cells["ISSUES"], "3L", "{}", tmux.screen());
    assert_eq!(cells["COMM"], "python3", "{}", tmux.screen());
    let idle_cells = group_cells(&tmux.screen(), idler_pid).expect("the idle client's line");
    assert_eq!(
        (idle_cells["IDLE"].as_str(), idle_cells["IN-TX"].as_str()),
        ("1", "0")
    );
    let screen = tmux.screen();
    assert!(screen.contains("q:quit"), "no help line:\n{screen}");
    for line in screen.lines() {
        assert!(line.trim_end().chars().count() <= 100, "{line}");
    }

    eprintln!("top:\n{screen}");

    // The worker leaks most, so it is first and selected: enter expands it into its
    // connections, each flagged.
    tmux.keys("Enter");
    let expanded = polled("the worker's connections", Duration::from_secs(5), || {
        let screen = tmux.screen();
        let conns = screen
            .lines()
            .filter(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                cells.first() == Some(&"idle_in_transaction")
                    && cells.get(4) == Some(&"LEAK")
                    && cells.get(5) == Some(&"client")
            })
            .count();
        (conns == 3).then_some(screen)
    });
    eprintln!("top, worker expanded:\n{expanded}");

    // The filter keeps only the worker's line.
    tmux.keys("/");
    for key in ["p", "y", "t", "h", "o", "n"] {
        tmux.keys(key);
    }
    tmux.keys("Enter");
    polled(
        "only python3 groups after filtering",
        Duration::from_secs(5),
        || {
            let screen = tmux.screen();
            (screen.contains("filter:python")
                && group_cells(&screen, *worker.backend_pids.first()?).is_none())
            .then_some(())
        },
    );

    tmux.keys("q");
    let after = polled("top to quit", Duration::from_secs(10), || {
        let screen = tmux.screen();
        // `stty -a` prints the line speed first and the control characters last.
        (screen.contains("top exited 0") && screen.contains("speed") && screen.contains("eof"))
            .then_some(screen)
    });
    assert!(
        !after.contains("IN-TX"),
        "top's screen is still up:\n{after}"
    );
    // The terminal is back in cooked mode with echo, as before top.
    let stty: String = after.split_whitespace().collect::<Vec<_>>().join(" ");
    for mode in [" icanon", " echo", " isig"] {
        assert!(stty.contains(mode), "{mode} not restored:\n{after}");
    }
    drop(tmux);

    // With no daemon: top says so in one line and exits non-zero; list falls back to the
    // socket tables and says so.
    let nobody = format!("127.0.0.1:{}", free_port().expect("port"));
    let out = tracer(&["top", "--metrics-addr", &nobody]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("no daemon answers at {nobody}")),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "top drew without a daemon: {out:?}");

    let out = tracer(&["list", "--json", "--port", &port, "--metrics-addr", &nobody]);
    assert!(out.status.success(), "{out:?}");
    let note = String::from_utf8_lossy(&out.stderr);
    assert_eq!(note.lines().count(), 1, "{note}");
    assert!(
        note.contains(&format!("no daemon answers at {nobody}"))
            && note.contains("kernel's socket tables"),
        "{note}"
    );
    let listed: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(owned(&listed, worker_pid, "client").len(), 3, "{listed:?}");
    assert_eq!(owned(&listed, idler_pid, "client").len(), 1, "{listed:?}");
    assert!(
        listed.iter().all(|r| r.get("leak").is_none()),
        "the socket tables know no verdicts"
    );

    // The daemon goes away under a running top: the last table stays, the line above it
    // says why it is not fresh, and `q` still quits.
    let tmux = Tmux::start(&format!(
        "{} top --metrics-addr {addr}; echo \"top exited $?\"; sleep 600",
        tracer_bin().display()
    ));
    polled("the worker's line in top", Duration::from_secs(15), || {
        group_cells(&tmux.screen(), worker_pid)
    });
    let (status, _) = daemon.terminate(Duration::from_secs(5)).expect("stop");
    assert!(status.success());
    let screen = polled("top to notice", Duration::from_secs(10), || {
        let screen = tmux.screen();
        screen
            .contains(&format!("not refreshed: no daemon answers at {addr}"))
            .then_some(screen)
    });
    assert!(group_cells(&screen, worker_pid).is_some(), "{screen}");
    tmux.keys("q");
    polled("top to quit", Duration::from_secs(10), || {
        tmux.screen().contains("top exited 0").then_some(())
    });
    drop(tmux);

    worker.stop().expect("worker");
    idler.stop().expect("idler");
}

/// The live table's connection fields are the event schema's, word for word.
#[test]
fn the_live_table_schema_shares_the_event_fields() {
    let (events, _) = load_schema(&schema_path()).expect("event schema");
    let (live, _) = load_schema(&connections_schema_path()).expect("live-table schema");
    let event_fields = events["$defs"]["conn_fields"]["properties"]
        .as_object()
        .expect("conn_fields");
    let row = &live["$defs"]["connection"];
    for (name, definition) in event_fields {
        assert_eq!(&row["properties"][name], definition, "{name}");
        assert!(
            row["required"]
                .as_array()
                .expect("required")
                .contains(&Value::from(name.as_str())),
            "{name} not required"
        );
    }
    for name in [
        "age_s",
        "idle_s",
        "waiting_s",
        "stalled",
        "leak",
        "linked",
        "peer_conn_id",
    ] {
        assert!(row["properties"].get(name).is_some(), "{name}");
    }
}

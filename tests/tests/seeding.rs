//! Connections older than the daemon: a leak that began before start-up, or before a
//! restart, is still flagged. Before start-up the state comes from Postgres's process titles
//! (the backend's view, and the client's when it is on this host too); across a restart or
//! a crash, from the state file the previous daemon left. `pg_stat_activity` is the oracle.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use tests::{
    Event, Postgres, TempDir, Tracer,
    clients::{Client, ClientKind, ClientOptions, Target},
    events::Want,
    lines,
    pgbouncer::PgBouncer,
    port_of, require_root, root_postgres, run_ok,
};

const IDLE_IN_TX: &str = "2s";
const IDLE_IN_TX_S: f64 = 2.0;
/// A tick, plus scheduling on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

/// Waits until `pg_stat_activity` shows `pid` in `state`.
fn wait_for_pg_state(pg: &Postgres, pid: u32, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg.client_states().get(&pid).map(String::as_str) != Some(state) {
        assert!(
            Instant::now() < deadline,
            "backend {pid} not {state:?}: {:?}",
            pg.client_states()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn socket_glob(pg: &Postgres) -> String {
    format!("{}/.s.PGSQL.{}", pg.socket_dir.display(), pg.port)
}

/// The daemon watching `pg` over TCP and its Unix socket, with the short idle-in-transaction
/// threshold.
fn start_tracer(pg: &Postgres) -> Tracer {
    Tracer::start(&[
        "--port",
        &pg.port.to_string(),
        "--unix-socket-glob",
        &socket_glob(pg),
        "--idle-in-transaction-after",
        IDLE_IN_TX,
    ])
    .expect("tracer")
}

/// Pids that have a leak of `reason` for `role` among `pids`.
fn leaking(events: &[Event], role: &str, reason: &str, pids: &BTreeSet<u32>) -> BTreeSet<u32> {
    Want::kind("leak")
        .role(role)
        .reason(reason)
        .find(events)
        .into_iter()
        .map(|e| e.pid)
        .filter(|p| pids.contains(p))
        .collect()
}

/// An application holding two psycopg2 connections through PgBouncer.
fn app_through(bouncer: &PgBouncer) -> Client {
    let opts = ClientOptions {
        connections: 2,
        ..ClientOptions::default()
    };
    Client::start(ClientKind::Psycopg2, &Target::tcp(bouncer.port), &opts)
        .expect("app through PgBouncer")
}

fn psql(target: &Target, in_transaction: bool) -> Client {
    let opts = ClientOptions {
        in_transaction,
        ..ClientOptions::default()
    };
    Client::start(ClientKind::Psql, target, &opts).expect("psql")
}

#[test]
fn idle_in_transaction_before_start_up_is_flagged_on_both_ends_tcp_and_unix() {
    let Some(pg) = root_postgres() else { return };
    let tcp = Target::tcp(pg.port);
    let unix = Target::Socket {
        dir: pg.socket_dir.clone(),
        port: pg.port,
    };
    // 3 TCP and 2 Unix connections left in a transaction, one aborted transaction each way,
    // one idle connection each way.
    let leakers: Vec<(Client, &str)> = [&tcp, &tcp, &tcp, &unix, &unix]
        .into_iter()
        .map(|t| (psql(t, true), "idle in transaction"))
        .chain([&tcp, &unix].into_iter().map(|t| {
            let mut c = psql(t, true);
            c.fail_transaction().expect("SELECT 1/0");
            (c, "idle in transaction (aborted)")
        }))
        .collect();
    let idlers: Vec<Client> = [&tcp, &unix].into_iter().map(|t| psql(t, false)).collect();
    for (client, state) in &leakers {
        wait_for_pg_state(&pg, client.backend_pids[0], state);
    }
    let idle_since = Instant::now();
    let oracle = pg.client_states();
    let leaking_backends: BTreeSet<u32> = oracle
        .iter()
        .filter(|(_, s)| s.starts_with("idle in transaction"))
        .map(|(p, _)| *p)
        .collect();
    let backend_of = |c: &Client| c.backend_pids[0];
    assert_eq!(
        leaking_backends,
        leakers.iter().map(|(c, _)| backend_of(c)).collect(),
        "the oracle agrees with what the test did: {oracle:?}"
    );
    // The TCP ones are past the threshold before the daemon starts.
    std::thread::sleep(Duration::from_secs(3));

    let tracer = start_tracer(&pg);
    let ready_at = Instant::now();
    let leaking_clients: BTreeSet<u32> = leakers.iter().map(|(c, _)| c.pid()).collect();
    let events = tracer
        .wait_for(Duration::from_secs_f64(IDLE_IN_TX_S) + SLACK, |evs| {
            let backends: BTreeSet<u32> = oracle.keys().copied().collect();
            leaking(evs, "server", "idle_in_transaction", &backends) == leaking_backends
                && leaking(evs, "client", "idle_in_transaction", &leaking_clients)
                    == leaking_clients
        })
        .unwrap_or_else(|e| panic!("every pre-existing leak within the threshold: {e}"));
    let seen_at = Instant::now();
    // Anything spurious has time to show up.
    std::thread::sleep(Duration::from_millis(1500));
    drop(events);
    let events = tracer.events();
    let dump = lines(&events);

    let all_backends: BTreeSet<u32> = oracle.keys().copied().collect();
    let all_clients: BTreeSet<u32> = leakers
        .iter()
        .map(|(c, _)| c)
        .chain(&idlers)
        .map(Client::pid)
        .collect();
    assert_eq!(
        leaking(&events, "server", "idle_in_transaction", &all_backends),
        leaking_backends,
        "exactly the backends pg_stat_activity shows idle in transaction: {dump}"
    );
    assert_eq!(
        leaking(&events, "client", "idle_in_transaction", &all_clients),
        leaking_clients,
        "and exactly their clients: {dump}"
    );
    for (client, pg_state) in &leakers {
        let want = if pg_state.ends_with("(aborted)") {
            "idle_in_transaction_aborted"
        } else {
            "idle_in_transaction"
        };
        for (role, pid) in [("server", backend_of(client)), ("client", client.pid())] {
            let found: Vec<&Event> = Want::kind("leak")
                .role(role)
                .reason("idle_in_transaction")
                .find(&events)
                .into_iter()
                .filter(|e| e.pid == pid)
                .collect();
            assert_eq!(found.len(), 1, "one verdict for {role} {pid}: {dump}");
            let e = found[0];
            assert_eq!(e.state, want, "{e}");
            let idle_s = e.idle_s();
            if e.transport == "tcp" {
                // tcp_info knows when the bytes last moved: the true idle time.
                assert!(
                    idle_s >= ready_at.duration_since(idle_since).as_secs_f64() - 0.5,
                    "true idle time {e}"
                );
            } else {
                // No I/O times for Unix sockets: counted from the start-up, a lower bound.
                assert!(idle_s >= IDLE_IN_TX_S, "{e}");
                assert!(
                    idle_s <= seen_at.duration_since(ready_at).as_secs_f64() + 0.5,
                    "a lower bound {e}"
                );
            }
        }
    }
    // Both ends of the same connection: the backend's remote is the client's local (TCP).
    for (client, _) in &leakers {
        let of = |role: &str, pid: u32| {
            Want::kind("leak")
                .role(role)
                .reason("idle_in_transaction")
                .find(&events)
                .into_iter()
                .find(|e| e.pid == pid)
                .cloned()
                .expect("leak")
        };
        let (s, c) = (of("server", backend_of(client)), of("client", client.pid()));
        assert_eq!(s.transport, c.transport, "{s}\n{c}");
        if c.transport == "tcp" {
            assert_eq!(s.remote, c.local, "{s}\n{c}");
        }
    }
    // Idle connections: known idle on both ends, no verdict.
    for client in &idlers {
        for (role, pid) in [("server", backend_of(client)), ("client", client.pid())] {
            let opens = Want::of("open", role, pid).find(&events);
            assert_eq!(opens.len(), 1, "{role} {pid}: {dump}");
            assert_eq!(opens[0].state, "idle", "{}", opens[0]);
            assert_eq!(opens[0].preexisting, Some(true), "{}", opens[0]);
            assert!(
                !Want::of("leak", role, pid).found_in(&events),
                "no verdict on an idle connection: {dump}"
            );
        }
    }
    eprintln!(
        "{} backends and {} clients flagged within {:.1?} of ready (threshold {IDLE_IN_TX})",
        leaking_backends.len(),
        leaking_clients.len(),
        seen_at.duration_since(ready_at)
    );
}

#[test]
fn through_pgbouncer_the_backend_and_pgbouncers_end_are_flagged_the_app_end_stays_unknown() {
    let Some(pg) = root_postgres() else { return };
    let bouncer = PgBouncer::start(&pg, 4).expect("pgbouncer");
    let app_started = Instant::now();
    let app = app_through(&bouncer);
    for &backend in &app.backend_pids {
        wait_for_pg_state(&pg, backend, "idle in transaction");
    }
    let oracle: BTreeSet<u32> = pg
        .client_states()
        .into_iter()
        .filter(|(_, s)| s == "idle in transaction")
        .map(|(p, _)| p)
        .collect();
    assert_eq!(oracle, app.backend_pids.iter().copied().collect());

    let ports = format!("{},{}", pg.port, bouncer.port);
    let tracer = Tracer::start(&[
        "--port",
        &ports,
        "--unix-socket-glob",
        &socket_glob(&pg),
        "--idle-in-transaction-after",
        IDLE_IN_TX,
        "--idle-after",
        "3s",
    ])
    .expect("tracer");
    let bouncer_pid: BTreeSet<u32> = [bouncer.pid()].into();
    let app_pid: BTreeSet<u32> = [app.pid()].into();
    tracer
        .wait_for(SLACK + Duration::from_secs(3), |evs| {
            leaking(evs, "server", "idle_in_transaction", &oracle) == oracle
                && Want::of("leak", "client", bouncer.pid())
                    .reason("idle_in_transaction")
                    .count(evs)
                    == 2
                && Want::of("leak", "client", app.pid())
                    .reason("idle")
                    .count(evs)
                    == 2
        })
        .unwrap_or_else(|e| panic!("backends, PgBouncer's server connections, app idle: {e}"));
    std::thread::sleep(Duration::from_millis(1500));
    let events = tracer.events();
    let dump = lines(&events);

    // PgBouncer's server connections are the clients of exactly those backends.
    let backend_remotes: BTreeSet<String> = Want::kind("leak")
        .role("server")
        .reason("idle_in_transaction")
        .find(&events)
        .into_iter()
        .filter(|e| oracle.contains(&e.pid))
        .map(|e| e.remote.clone())
        .collect();
    let bouncer_locals: BTreeSet<String> = Want::kind("leak")
        .role("client")
        .reason("idle_in_transaction")
        .find(&events)
        .into_iter()
        .filter(|e| e.pid == bouncer.pid())
        .inspect(|e| {
            assert_eq!(e.state, "idle_in_transaction", "{e}");
            assert_eq!(port_of(&e.remote), Some(pg.port), "{e}");
        })
        .map(|e| e.local.clone())
        .collect();
    assert_eq!(backend_remotes.len(), 2, "{dump}");
    assert_eq!(bouncer_locals, backend_remotes, "{dump}");

    // The app's connections to PgBouncer: PgBouncer publishes nothing of their state, so it
    // stays unknown; the idle verdict still applies, with a lower-bound age.
    assert!(
        leaking(&events, "client", "idle_in_transaction", &app_pid).is_empty(),
        "{dump}"
    );
    let app_idle = Want::kind("leak")
        .role("client")
        .reason("idle")
        .find(&events);
    let app_idle: Vec<&&Event> = app_idle.iter().filter(|e| e.pid == app.pid()).collect();
    assert_eq!(app_idle.len(), 2, "{dump}");
    for e in app_idle {
        assert_eq!(e.state, "unknown", "{e}");
        assert_eq!(port_of(&e.remote), Some(bouncer.port), "{e}");
        assert!(
            e.age_s() <= app_started.elapsed().as_secs_f64(),
            "age_s is a lower bound: {e}"
        );
    }
    // PgBouncer's accepted ends of them: unknown too.
    for e in events
        .iter()
        .filter(|e| e.kind == "open" && e.role == "server")
        .filter(|e| bouncer_pid.contains(&e.pid))
    {
        assert_eq!(e.state, "unknown", "{e}");
    }
}

/// The daemon's arguments for the restart test: the same state directory every time.
fn restart_args<'a>(ports: &'a str, glob: &'a str, state: &'a Path) -> Vec<&'a str> {
    vec![
        "--port",
        ports,
        "--unix-socket-glob",
        glob,
        "--idle-in-transaction-after",
        IDLE_IN_TX,
        "--state-dir",
        state.to_str().expect("utf-8 path"),
    ]
}

/// Waits in `tracer` for an idle-in-transaction verdict on each connection of `idle_since`
/// (conn_id -> when the test saw it go idle); checks that its `idle_s` counts from then
/// (what a tick can add or take, at most) and returns the events.
fn expect_leaks_again(
    tracer: &Tracer,
    idle_since: &BTreeMap<String, Instant>,
    what: &str,
) -> Vec<Event> {
    let ids: BTreeSet<String> = idle_since.keys().cloned().collect();
    let started = Instant::now();
    let events = tracer
        .wait_for(SLACK, |evs| {
            let flagged: BTreeSet<String> = Want::kind("leak")
                .role("server")
                .reason("idle_in_transaction")
                .find(evs)
                .into_iter()
                .chain(
                    Want::kind("leak")
                        .role("client")
                        .reason("idle_in_transaction")
                        .find(evs),
                )
                .map(|e| e.conn_id.clone())
                .collect();
            ids.is_subset(&flagged)
        })
        .unwrap_or_else(|e| panic!("{what}: the leaks again: {e}"));
    for e in events
        .iter()
        .filter(|e| e.kind == "leak" && ids.contains(&e.conn_id.clone()))
    {
        let since = idle_since[&e.conn_id.clone()];
        let before = started.duration_since(since).as_secs_f64();
        let after = since.elapsed().as_secs_f64();
        let idle_s = e.idle_s();
        assert!(
            idle_s >= before - 1.2 && idle_s <= after + 0.5,
            "{what}: idle_s {idle_s} counts from when it went idle ({before:.2}..{after:.2} s ago): {e}"
        );
        assert!(e.age_s() >= idle_s, "{e}");
        assert_eq!(e.state, "idle_in_transaction", "{e}");
        eprintln!(
            "{what}: {} {} idle_s {idle_s:.2} (idle for {before:.2}..{after:.2} s)",
            e.role, e.transport
        );
    }
    events
}

#[test]
fn a_leak_survives_sigterm_and_kill_9_and_a_connection_closed_meanwhile_is_not_open() {
    let Some(pg) = root_postgres() else { return };
    let bouncer = PgBouncer::start(&pg, 4).expect("pgbouncer");
    let state = TempDir::new("restart-state").expect("state dir");
    let ports = format!("{},{}", pg.port, bouncer.port);
    let glob = socket_glob(&pg);
    let args = restart_args(&ports, &glob, &state.0);

    let first = Tracer::start(&args).expect("tracer");
    // Leaks that begin while the first daemon watches: two connections through PgBouncer
    // (nothing but the kernel's reading of them tells their state), one over the Unix socket
    // (no I/O times in the socket tables), and one that will close while no daemon runs.
    let app = app_through(&bouncer);
    let app_since = Instant::now();
    let unix = psql(
        &Target::Socket {
            dir: pg.socket_dir.clone(),
            port: pg.port,
        },
        true,
    );
    let unix_since = Instant::now();
    let gone = psql(&Target::tcp(pg.port), true);
    let pids = [app.pid(), unix.pid(), gone.pid()];
    let events = first
        .wait_for(Duration::from_secs_f64(IDLE_IN_TX_S) + SLACK, |evs| {
            Want::kind("leak")
                .role("client")
                .reason("idle_in_transaction")
                .find(evs)
                .into_iter()
                .filter(|e| pids.contains(&e.pid))
                .count()
                == 4
        })
        .expect("the first daemon flags them");
    let leak_ids = |role: &str, pid: u32| -> BTreeSet<String> {
        let leaks = Want::of("leak", role, pid).reason("idle_in_transaction");
        leaks.conn_ids_in(&events).map(str::to_owned).collect()
    };
    let app_ids = leak_ids("client", app.pid());
    let unix_ids = leak_ids("client", unix.pid());
    let gone_ids = leak_ids("client", gone.pid());
    let unix_backend_ids = leak_ids("server", unix.backend_pids[0]);
    assert_eq!(
        (
            app_ids.len(),
            unix_ids.len(),
            gone_ids.len(),
            unix_backend_ids.len()
        ),
        (2, 1, 1, 1),
        "{}",
        lines(&events)
    );
    let kept: BTreeMap<String, Instant> = app_ids
        .iter()
        .map(|id| (id.clone(), app_since))
        .chain(
            unix_ids
                .iter()
                .chain(&unix_backend_ids)
                .map(|id| (id.clone(), unix_since)),
        )
        .collect();
    let gone_id = gone_ids.iter().next().expect("id").clone();
    // Let the leak age, so that a restart counting from its own start would show.
    std::thread::sleep(Duration::from_secs(3));

    // SIGTERM: detaches and exits 0, the state file stays.
    let (status, took) = first.terminate(Duration::from_secs(10)).expect("SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(
        state.0.join("state.json").exists(),
        "state file left behind"
    );
    // Closed while no daemon runs.
    let gone_backend = gone.backend_pids[0];
    gone.stop().expect("psql exits");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg.client_states().contains_key(&gone_backend) {
        assert!(
            Instant::now() < deadline,
            "backend {gone_backend} still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let second = Tracer::start(&args).expect("tracer after SIGTERM");
    let events = expect_leaks_again(&second, &kept, "after SIGTERM + start");
    let dump = lines(&events);
    let gone_events: Vec<&Event> = events.iter().filter(|e| e.conn_id == gone_id).collect();
    assert!(
        gone_events
            .iter()
            .all(|e| e.kind != "open" && e.kind != "leak"),
        "closed while down: never reported open: {dump}"
    );
    let kinds: Vec<&str> = gone_events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["leak_end", "close"], "{dump}");
    assert_eq!(
        gone_events[1].closed_by.as_deref(),
        Some("unknown"),
        "{dump}"
    );
    for id in kept.keys() {
        let opens: Vec<&Event> = events
            .iter()
            .filter(|e| e.kind == "open" && e.conn_id == *id)
            .collect();
        assert_eq!(opens.len(), 1, "{id} found open again: {dump}");
        assert_eq!(opens[0].preexisting, Some(true), "{}", opens[0]);
    }
    // The file is rewritten within a tick of the verdicts; then a crash.
    std::thread::sleep(Duration::from_millis(1500));
    second.kill().expect("kill -9");

    let third = Tracer::start(&args).expect("tracer after kill -9");
    let events = expect_leaks_again(&third, &kept, "after kill -9 + start");
    let dump = lines(&events);
    assert!(
        events.iter().all(|e| e.conn_id != gone_id),
        "the connection closed two daemons ago does not come back: {dump}"
    );
    drop(app);
    drop(unix);
}

#[test]
fn without_process_titles_found_connections_stay_unknown_and_check_says_so() {
    let Some(pg) = root_postgres() else { return };
    run_ok(&mut pg.psql("127.0.0.1", "ALTER SYSTEM SET update_process_title = off"))
        .expect("ALTER SYSTEM");
    run_ok(&mut pg.psql("127.0.0.1", "SELECT pg_reload_conf()")).expect("reload");
    let clients: Vec<Client> = [
        Target::tcp(pg.port),
        Target::Socket {
            dir: pg.socket_dir.clone(),
            port: pg.port,
        },
    ]
    .iter()
    .map(|t| psql(t, true))
    .collect();
    for c in &clients {
        let backend = c.backend_pids[0];
        wait_for_pg_state(&pg, backend, "idle in transaction");
        let title =
            tracer::host::proc_title::read_title(Path::new("/proc"), backend).expect("title");
        assert_eq!(
            tracer::host::proc_title::parse(&title).map(|t| t.activity),
            Some(tracer::host::proc_title::Activity::Unset),
            "the title shows no state: {title:?}"
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    let tracer = start_tracer(&pg);
    std::thread::sleep(Duration::from_secs_f64(IDLE_IN_TX_S) + SLACK);
    let events = tracer.events();
    let dump = lines(&events);
    for c in &clients {
        for (role, pid) in [("server", c.backend_pids[0]), ("client", c.pid())] {
            let opens = Want::of("open", role, pid).find(&events);
            assert_eq!(opens.len(), 1, "{role} {pid}: {dump}");
            assert_eq!(opens[0].state, "unknown", "{}", opens[0]);
        }
    }
    let pids: BTreeSet<u32> = clients
        .iter()
        .flat_map(|c| [c.pid(), c.backend_pids[0]])
        .collect();
    assert!(
        Want::kind("leak")
            .role("server")
            .reason("idle_in_transaction")
            .find(&events)
            .into_iter()
            .chain(
                Want::kind("leak")
                    .role("client")
                    .reason("idle_in_transaction")
                    .find(&events)
            )
            .all(|e| !pids.contains(&e.pid)),
        "no state, no idle-in-transaction verdict: {dump}"
    );
    // `tracer check` has a line about titles, and it never fails the check.
    let out = std::process::Command::new(tests::tracer_bin())
        .arg("check")
        .output()
        .expect("tracer check");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("process_title"))
        .unwrap_or_else(|| panic!("no process_title line:\n{text}"));
    assert!(line.starts_with("ok"), "{line}");
}

#[test]
fn a_corrupt_state_file_is_ignored_with_one_warning_and_an_unusable_directory_refused() {
    if !require_root() {
        return;
    }
    let port = tests::free_port().expect("port").to_string();
    let state = TempDir::new("corrupt-state").expect("state dir");
    let file = state.0.join("state.json");
    std::fs::write(&file, b"{\"format\":1,\"boot_id\":\"x\",\"conn\x00\xff").expect("garbage");
    let args = [
        "--port",
        port.as_str(),
        "--state-dir",
        state.0.to_str().expect("utf-8"),
    ];
    let tracer = Tracer::start(&args).expect("starts despite the garbage");
    let warnings: Vec<String> = tracer
        .stderr()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("state file"))
        .map(str::to_owned)
        .collect();
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert!(warnings[0].contains("ignoring"), "{warnings:?}");
    // A second daemon on the same directory is refused before it attaches anything.
    let second = std::process::Command::new(tests::tracer_bin())
        .arg("run")
        .args(args)
        .args(["--metrics-addr", "off", "--events", "/dev/null"])
        .output()
        .expect("second daemon");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another tracer daemon"), "{stderr}");
    // The first one replaces the garbage with its own state within a tick or two.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read(&file).unwrap_or_default();
        if serde_json::from_slice::<serde_json::Value>(&text).is_ok_and(|v| v["format"] == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "state file not rewritten");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, _) = tracer.terminate(Duration::from_secs(10)).expect("SIGTERM");
    assert_eq!(status.code(), Some(0));

    // A directory given explicitly that cannot be used: exit 1, one line naming it.
    let blocked = state.0.join("not-a-dir");
    std::fs::write(&blocked, b"").expect("file");
    let out = std::process::Command::new(tests::tracer_bin())
        .args([
            "run",
            "--port",
            &port,
            "--metrics-addr",
            "off",
            "--events",
            "/dev/null",
        ])
        .arg("--state-dir")
        .arg(&blocked)
        .output()
        .expect("tracer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&blocked.display().to_string()), "{stderr}");
}

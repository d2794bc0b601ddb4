//! Leak and stall detection against real servers and real clients: the PgBouncer incident
//! the product exists for, replayed end to end, and the idle-in-transaction verdict for each
//! client library (each moves its bytes with different syscalls).
//!
//! Thresholds are a few seconds; the daemon ticks every second, so a verdict may come up to
//! about one tick after its threshold (plus scheduling slack on a loaded 2-core machine).
use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use tests::{
    Event, Postgres, TempDir, Tracer,
    clients::{Client, ClientKind, ClientOptions, DockerCgroup, Pgbench, Target},
    events::{Want, conn_ids},
    lines,
    pgbouncer::PgBouncer,
    port_of, require_root, root_postgres, run_ok,
};

const IDLE_IN_TX_S: f64 = 3.0;
const STALL_S: f64 = 2.0;
const CLOSE_WAIT_S: f64 = 2.0;
/// Slack on top of a threshold for a verdict to show up: a tick, plus scheduling.
const SLACK: Duration = Duration::from_secs(3);

fn start_tracer(ports: &[u16]) -> Tracer {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    Tracer::start(&[
        "--port",
        &ports,
        "--idle-in-transaction-after",
        "3s",
        "--stall-after",
        "2s",
        "--close-wait-after",
        "2s",
    ])
    .expect("tracer")
}

fn secs(d: f64) -> Duration {
    Duration::from_secs_f64(d)
}

// ---------------------------------------------------------------------------------------
// The incident
// ---------------------------------------------------------------------------------------

/// Select-only pgbench transaction, the same as `-S`, as a script: custom scripts skip
/// pgbench's start-up scale query, so each of its client connections goes straight to the
/// starved pool.
const SELECT_ONLY: &str =
    "\\set aid random(1, 100000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n";

#[test]
fn incident_replay_names_the_leaker_the_starved_and_the_abandoned() {
    if !require_root() {
        return;
    }
    let test_start = Instant::now();
    let pg = Postgres::start().expect("postgres");
    let bouncer = PgBouncer::start(&pg, 3).expect("pgbouncer");
    let direct = Target::tcp(pg.port);
    let pooled = Target::tcp(bouncer.port);
    Pgbench::init(&direct, 1).expect("pgbench -i");
    let tracer = start_tracer(&[pg.port, bouncer.port]);

    // Healthy traffic, running through the whole incident, straight to Postgres.
    let channel = "tracer_incident";
    let mut healthy = Client::healthy_psycopg2(&direct, Some(channel)).expect("healthy");
    let mut listener = Client::listener_psycopg2(&direct, channel).expect("listener");
    let healthy_bench = Pgbench::start(&direct, &["-n", "-c", "2", "-T", "40", "-S", "-R", "50"])
        .expect("healthy pgbench");

    // The abandoned connections: the server ends them, the application never closes them.
    let abandoned = Client::start(
        ClientKind::Psycopg2,
        &direct,
        &ClientOptions {
            connections: 2,
            in_transaction: false,
            ..ClientOptions::default()
        },
    )
    .expect("abandoned");
    let terminate = format!(
        "select pg_terminate_backend({}), pg_terminate_backend({})",
        abandoned.backend_pids[0], abandoned.backend_pids[1]
    );
    run_ok(&mut pg.psql("127.0.0.1", &terminate)).expect("pg_terminate_backend");
    let terminated_at = Instant::now();

    // The leaky worker, in a "container": three pooled connections left in a transaction.
    let cgroup = DockerCgroup::create().expect("cgroup");
    let container_id = cgroup.id.clone();
    let worker = Client::start(
        ClientKind::Psycopg2,
        &pooled,
        &ClientOptions {
            connections: 3,
            in_transaction: true,
            cgroup: Some(cgroup.path.clone()),
            ..ClientOptions::default()
        },
    )
    .expect("worker");
    let worker_pid = worker.pid();
    let worker_idle_since = Instant::now();
    tracer
        .wait_for(secs(CLOSE_WAIT_S) + SLACK, |evs| {
            Want::of("leak", "client", abandoned.pid())
                .reason("close_wait")
                .count(evs)
                >= 2
        })
        .expect("the abandoned connections' close_wait leaks");
    let close_wait_after = terminated_at.elapsed();
    tracer
        .wait_for(secs(IDLE_IN_TX_S) + SLACK, |evs| {
            Want::of("leak", "client", worker_pid).count(evs) >= 3
        })
        .expect("the worker's three leaks");
    let worker_leaks_after = worker_idle_since.elapsed();

    // The starving backend: its queries queue in PgBouncer for a server connection.
    let scripts = TempDir::new("detect-scripts").expect("dir");
    let script = scripts.0.join("select-only.sql");
    std::fs::write(&script, SELECT_ONLY).expect("script");
    let script = script.to_string_lossy().into_owned();
    let backend = Pgbench::start(&pooled, &["-n", "-c", "2", "-T", "60", "-f", &script])
        .expect("starving pgbench");
    let backend_pid = backend.pid();
    let backend_started = Instant::now();
    tracer
        .wait_for(secs(STALL_S) + SLACK + Duration::from_secs(2), |evs| {
            Want::of("stall", "client", backend_pid).count(evs) >= 2
        })
        .unwrap_or_else(|e| panic!("the backend's stalls: {e}\npgbench: {}", backend.report()));
    let stalls_after = backend_started.elapsed();
    // Let the stalls and the healthy traffic run on for a while.
    std::thread::sleep(Duration::from_secs(2));

    // The worker dies (OOM kill, deploy...): its connections close, the pool frees up.
    let killed_at = Instant::now();
    worker.kill().expect("kill worker");
    tracer
        .wait_for(SLACK + Duration::from_secs(2), |evs| {
            Want::of("leak_end", "client", worker_pid).count(evs) >= 3
                && Want::of("stall_end", "client", backend_pid).count(evs)
                    >= Want::of("stall", "client", backend_pid).count(evs)
        })
        .unwrap_or_else(|e| {
            panic!(
                "leak_end for the worker, stall_end for the backend: {e}\npgbouncer: {}",
                bouncer.log()
            )
        });
    let recovered_after = killed_at.elapsed();
    drop(cgroup);

    // The application finally closes its abandoned connections.
    let abandoned_pid = abandoned.pid();
    abandoned.stop().expect("abandoned stops");
    tracer
        .wait_for(SLACK, |evs| {
            Want::of("leak_end", "client", abandoned_pid).count(evs) >= 2
        })
        .expect("close_wait leak_end");

    let healthy_pid = healthy.pid();
    let listener_pid = listener.pid();
    let healthy_backend = healthy.backend_pids[0];
    let listener_backend = listener.backend_pids[0];
    let queries = healthy.last_count("queries");
    let notified = listener.last_count("notified");
    let healthy_bench_pid = healthy_bench.pid();
    healthy.stop().expect("healthy stops");
    listener.stop().expect("listener stops");
    drop(healthy_bench);
    let backend_report = backend.report();
    drop(backend);
    std::thread::sleep(Duration::from_millis(1500));

    let events = tracer.events();
    let dump = lines(&events);
    let bouncer_pid = bouncer.pid();

    // 1. The worker: exactly its three pooled connections, attributed to its container.
    let worker_leaks = Want::of("leak", "client", worker_pid).find(&events);
    let worker_ids = conn_ids(worker_leaks.iter().copied());
    assert_eq!(worker_leaks.len(), 3, "one leak per connection: {dump}");
    assert_eq!(worker_ids.len(), 3, "{dump}");
    let worker_opens = Want::of("open", "client", worker_pid).find(&events);
    assert_eq!(conn_ids(worker_opens.iter().copied()), worker_ids, "{dump}");
    for e in &worker_leaks {
        assert_eq!(e.reason.as_deref(), Some("idle_in_transaction"), "{e}");
        assert_eq!(e.state, "idle_in_transaction", "{e}");
        assert_eq!(e.comm, "python3", "{e}");
        assert_eq!(e.transport, "tcp", "{e}");
        assert_eq!(port_of(&e.remote), Some(bouncer.port), "{e}");
        assert_eq!(
            e.container_id.as_deref(),
            Some(container_id.as_str()),
            "{e}"
        );
        assert_eq!(e.container_runtime.as_deref(), Some("docker"), "{e}");
        assert_eq!(
            e.cgroup.as_deref(),
            Some(format!("/system.slice/docker-{container_id}.scope").as_str()),
            "{e}"
        );
        assert!(e.idle_s() >= IDLE_IN_TX_S, "{e}");
        assert!(e.idle_s() < IDLE_IN_TX_S + SLACK.as_secs_f64(), "{e}");
        assert!(e.age_s() >= e.idle_s(), "{e}");
    }
    // Only the worker leaks in a transaction among PgBouncer's clients.
    let pooled_tx_leaks: Vec<&Event> = events
        .iter()
        .filter(|e| {
            e.kind == "leak"
                && e.role == "client"
                && e.reason.as_deref() == Some("idle_in_transaction")
                && port_of(&e.remote) == Some(bouncer.port)
        })
        .collect();
    assert_eq!(conn_ids(pooled_tx_leaks), worker_ids, "{dump}");
    let worker_ends = Want::of("leak_end", "client", worker_pid).find(&events);
    assert_eq!(conn_ids(worker_ends.iter().copied()), worker_ids, "{dump}");
    for e in &worker_ends {
        assert_eq!(e.reason.as_deref(), Some("idle_in_transaction"), "{e}");
        assert!(e.lasted_s() >= IDLE_IN_TX_S, "{e}");
    }

    // 1b. PgBouncer's side of the same three connections (matched by address).
    let worker_locals: BTreeSet<String> = worker_opens.iter().map(|e| e.local.clone()).collect();
    let bouncer_side: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind == "leak" && e.role == "server" && worker_locals.contains(&e.remote))
        .collect();
    assert_eq!(
        bouncer_side.len(),
        3,
        "PgBouncer's view of the worker: {dump}"
    );
    for e in &bouncer_side {
        assert_eq!(e.pid, bouncer_pid, "{e}");
        assert_eq!(e.comm, "pgbouncer", "{e}");
        assert_eq!(e.reason.as_deref(), Some("idle_in_transaction"), "{e}");
        assert_eq!(port_of(&e.local), Some(bouncer.port), "{e}");
    }

    // 2. The starving backend: stalled while the pool was dry, answered once it freed up.
    let stalls = Want::of("stall", "client", backend_pid).find(&events);
    let stall_ends = Want::of("stall_end", "client", backend_pid).find(&events);
    assert_eq!(stalls.len(), 2, "one per pgbench connection: {dump}");
    assert_eq!(
        conn_ids(stalls.iter().copied()),
        conn_ids(stall_ends.iter().copied()),
        "{dump}"
    );
    for e in &stalls {
        assert_eq!(e.comm, "pgbench", "{e}");
        assert_eq!(e.state, "active", "{e}");
        assert_eq!(port_of(&e.remote), Some(bouncer.port), "{e}");
        assert!(e.waiting_s() >= STALL_S, "{e}");
        assert!(e.waiting_s() < STALL_S + SLACK.as_secs_f64(), "{e}");
    }
    let mut waited = Vec::new();
    for e in &stall_ends {
        let w = e.waited_s();
        assert!(w >= STALL_S, "{e}");
        waited.push(w);
        // Each stall is reported once, and ends once.
        let id = e.conn_id.as_str();
        let conn = Want::conn(id).find(&events);
        assert_eq!(
            conn.iter().filter(|e| e.kind == "stall").count(),
            1,
            "{dump}"
        );
        assert_eq!(
            conn.iter().filter(|e| e.kind == "stall_end").count(),
            1,
            "{dump}"
        );
    }
    assert!(
        Want::of("leak", "client", backend_pid)
            .find(&events)
            .is_empty(),
        "a waiting backend is not a leak: {dump}"
    );

    // 3. The abandoned connections: close_wait on exactly those two, ended by the close.
    let abandoned_leaks = Want::of("leak", "client", abandoned_pid).find(&events);
    let abandoned_ids = conn_ids(abandoned_leaks.iter().copied());
    assert_eq!(abandoned_leaks.len(), 2, "{dump}");
    assert_eq!(abandoned_ids.len(), 2, "{dump}");
    for e in &abandoned_leaks {
        assert_eq!(e.reason.as_deref(), Some("close_wait"), "{e}");
        assert_eq!(e.state, "close_wait", "{e}");
        assert_eq!(port_of(&e.remote), Some(pg.port), "{e}");
        assert!(e.container_id.is_none(), "{e}");
    }
    let close_wait_leaks = Want::kind("leak")
        .role("client")
        .reason("close_wait")
        .find(&events);
    assert_eq!(conn_ids(close_wait_leaks), abandoned_ids, "{dump}");
    let abandoned_ends = Want::of("leak_end", "client", abandoned_pid).find(&events);
    assert_eq!(
        conn_ids(abandoned_ends.iter().copied()),
        abandoned_ids,
        "{dump}"
    );
    assert!(
        abandoned_ends
            .iter()
            .all(|e| e.reason.as_deref() == Some("close_wait")),
        "{dump}"
    );

    // 4. Healthy traffic: traced, and never a leak or a stall.
    assert!(
        queries >= 5,
        "the healthy client ran only {queries} queries"
    );
    assert!(notified >= 1, "the listener got no notification");
    let healthy_pids = [healthy_pid, listener_pid, healthy_bench_pid];
    for pid in healthy_pids {
        assert!(
            Want::of("open", "client", pid).found_in(&events),
            "pid {pid} was not traced: {dump}"
        );
    }
    let healthy_backends = [healthy_backend, listener_backend];
    let verdicts = ["leak", "stall"];
    let bad: Vec<&Event> = events
        .iter()
        .filter(|e| verdicts.contains(&e.kind.as_str()))
        .filter(|e| {
            (e.role == "client" && healthy_pids.contains(&e.pid))
                || (e.role == "server" && healthy_backends.contains(&e.pid))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "healthy connections flagged:\n{}",
        lines_of(&bad)
    );

    // The expected server-side echoes, for the record.
    let server_side: HashMap<(String, String), usize> = events
        .iter()
        .filter(|e| {
            (e.kind == "leak" || e.kind == "stall") && (e.role == "server" || e.pid == bouncer_pid)
        })
        .fold(HashMap::new(), |mut m, e| {
            let key = (
                format!("{} {}", e.role.as_str(), e.comm.as_str()),
                format!("{} {}", e.kind.as_str(), e.reason.as_deref().unwrap_or("")),
            );
            *m.entry(key).or_default() += 1;
            m
        });

    eprintln!(
        "incident: worker leaks {worker_leaks_after:.1?} after its transactions went idle \
         (threshold {IDLE_IN_TX_S} s); backend stalls {stalls_after:.1?} after pgbench start \
         (threshold {STALL_S} s), waited {waited:.2?} s; close_wait {close_wait_after:.1?} \
         after the terminations (threshold {CLOSE_WAIT_S} s); stall_end/leak_end \
         {recovered_after:.1?} after the kill; healthy: {queries} queries, {notified} \
         notifications, no verdicts; server-side echoes {server_side:?}; whole test \
         {:.1?}\nstarving pgbench:\n{backend_report}",
        test_start.elapsed()
    );
}

/// `[::ffff:a.b.c.d]:port` as `a.b.c.d:port`; other addresses unchanged.
fn unmapped(text: &str) -> String {
    match text
        .strip_prefix("[::ffff:")
        .and_then(|r| r.split_once("]:"))
    {
        Some((ip, port)) if ip.contains('.') => format!("{ip}:{port}"),
        _ => text.to_owned(),
    }
}

fn lines_of(events: &[&Event]) -> String {
    events.iter().map(|e| format!("{e}\n")).collect()
}

// ---------------------------------------------------------------------------------------
// Idle in transaction, per client library
// ---------------------------------------------------------------------------------------

fn idle_in_transaction_is_reported_for(kind: ClientKind) {
    let Some(pg) = root_postgres() else { return };
    let tracer = start_tracer(&[pg.port]);
    let mut client = Client::start(kind, &Target::tcp(pg.port), &ClientOptions::default())
        .unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
    let idle_since = Instant::now();
    let pid = client.pid();
    let backend = client.backend_pids[0];
    let leak = |evs: &[Event], role: &str, pid: u32| {
        evs.iter()
            .filter(|e| Want::of("leak", role, pid).matches(e))
            .cloned()
            .collect::<Vec<_>>()
    };
    tracer
        .wait_for(secs(IDLE_IN_TX_S) + SLACK, |evs| {
            !leak(evs, "client", pid).is_empty() && !leak(evs, "server", backend).is_empty()
        })
        .unwrap_or_else(|e| panic!("{kind:?} leak within threshold + 3 s: {e}"));
    let detected_after = idle_since.elapsed();
    // Anything spurious (a second verdict, another connection) has time to show up.
    std::thread::sleep(Duration::from_millis(1500));
    let events = tracer.events();
    let dump = lines(&events);

    let opens = Want::of("open", "client", pid).find(&events);
    assert_eq!(opens.len(), 1, "{kind:?} opened one connection: {dump}");
    let conn_id = opens[0].conn_id.clone();
    let client_leaks = leak(&events, "client", pid);
    assert_eq!(client_leaks.len(), 1, "exactly one leak: {dump}");
    let e = &client_leaks[0];
    assert_eq!(e.conn_id, conn_id.as_str(), "{e}");
    assert_eq!(e.reason.as_deref(), Some("idle_in_transaction"), "{e}");
    assert_eq!(e.state, "idle_in_transaction", "{e}");
    assert_eq!(e.comm, kind.comm(), "{e}");
    assert_eq!(e.transport, "tcp", "{e}");
    assert_eq!(port_of(&e.remote), Some(pg.port), "{e}");
    assert!(e.idle_s() >= IDLE_IN_TX_S, "{e}");
    assert!(e.idle_s() < IDLE_IN_TX_S + SLACK.as_secs_f64(), "{e}");
    let client_local = e.local.clone();

    let server_leaks = leak(&events, "server", backend);
    assert_eq!(server_leaks.len(), 1, "the backend's view: {dump}");
    let s = &server_leaks[0];
    assert_eq!(s.reason.as_deref(), Some("idle_in_transaction"), "{s}");
    assert_eq!(s.comm, "postgres", "{s}");
    // Java connects an AF_INET6 socket to 127.0.0.1: its own view names the v4-mapped
    // address, the backend's the plain one.
    assert_eq!(
        unmapped(&s.remote),
        unmapped(&client_local),
        "the same connection: {s}"
    );
    let server_id = s.conn_id.clone();

    // COMMIT ends both verdicts; the connection stays open and healthy.
    client.commit().expect("commit");
    let committed_at = Instant::now();
    let events = tracer
        .wait_for(SLACK, |evs| {
            [&conn_id, &server_id].iter().all(|id| {
                Want::conn(id)
                    .find(evs)
                    .iter()
                    .any(|e| e.kind == "leak_end")
            })
        })
        .unwrap_or_else(|e| panic!("{kind:?} leak_end after COMMIT: {e}"));
    let ended_after = committed_at.elapsed();
    for id in [&conn_id, &server_id] {
        let ends: Vec<&Event> = Want::conn(id)
            .find(&events)
            .into_iter()
            .filter(|e| e.kind == "leak_end")
            .collect();
        assert_eq!(ends.len(), 1, "{dump}");
        assert_eq!(
            ends[0].reason.as_deref(),
            Some("idle_in_transaction"),
            "{}",
            ends[0]
        );
        assert!(ends[0].lasted_s() >= IDLE_IN_TX_S, "{}", ends[0]);
    }
    std::thread::sleep(Duration::from_secs(2));
    client.stop().expect("client exits");
    let events = tracer
        .wait_for(SLACK, |evs| {
            Want::conn(&conn_id)
                .find(evs)
                .iter()
                .any(|e| e.kind == "close")
        })
        .expect("close");
    let dump = lines(&events);
    let client_conn = Want::conn(&conn_id).find(&events);
    assert_eq!(
        client_conn.iter().filter(|e| e.kind == "leak").count(),
        1,
        "no new verdict once committed: {dump}"
    );
    assert!(client_conn.iter().all(|e| e.kind != "stall"), "{dump}");
    eprintln!(
        "{kind:?} (pid {pid}, comm {}): idle_in_transaction reported {detected_after:.1?} after \
         the transaction went idle (threshold {IDLE_IN_TX_S} s, idle_s {:.2}); backend {backend} \
         too; leak_end {ended_after:.1?} after COMMIT",
        kind.comm(),
        e.idle_s()
    );
}

/// One test per client kind, each named for its client.
macro_rules! idle_in_transaction_tests {
    ($($name:ident: $kind:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                idle_in_transaction_is_reported_for(ClientKind::$kind);
            }
        )*
    };
}

idle_in_transaction_tests!(
    idle_in_transaction_psql: Psql,
    idle_in_transaction_psycopg2: Psycopg2,
    idle_in_transaction_jdbc: Jdbc,
    idle_in_transaction_node_postgres: NodePg,
);

// ---------------------------------------------------------------------------------------
// TLS: the protocol is unreadable, the timing is not
// ---------------------------------------------------------------------------------------

/// Turns TLS on in a harness cluster with a fresh self-signed certificate.
fn enable_tls(pg: &Postgres) {
    let out = run_ok(&mut pg.psql("127.0.0.1", "show data_directory")).expect("data dir");
    let data = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let (crt, key) = (format!("{data}/server.crt"), format!("{data}/server.key"));
    run_ok(std::process::Command::new("openssl").args([
        "req",
        "-x509",
        "-nodes",
        "-newkey",
        "rsa:2048",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &key,
        "-out",
        &crt,
    ]))
    .expect("openssl");
    run_ok(std::process::Command::new("chown").args(["postgres:postgres", &crt, &key]))
        .expect("chown");
    run_ok(std::process::Command::new("chmod").args(["600", &key])).expect("chmod");
    run_ok(&mut pg.psql("127.0.0.1", "alter system set ssl = on")).expect("ssl on");
    run_ok(&mut pg.psql("127.0.0.1", "select pg_reload_conf()")).expect("reload");
    let mut check = pg.psql(
        "127.0.0.1",
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    check.env("PGSSLMODE", "require");
    // The reload is asynchronous.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(out) = run_ok(&mut check)
            && String::from_utf8_lossy(&out.stdout).trim() == "t"
        {
            return;
        }
        assert!(Instant::now() < deadline, "TLS did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn tls_connection_is_unknown_never_idle_in_transaction_but_stalls_are_seen() {
    let Some(pg) = root_postgres() else { return };
    enable_tls(&pg);
    let tracer = start_tracer(&[pg.port]);
    let mut client = Client::start(
        ClientKind::Psycopg2,
        &Target::tcp(pg.port),
        &ClientOptions {
            tls: true,
            ..ClientOptions::default()
        },
    )
    .expect("psycopg2 over TLS");
    let pid = client.pid();
    let backend = client.backend_pids[0];
    // Idle inside a transaction well past the threshold: invisible under TLS.
    std::thread::sleep(secs(IDLE_IN_TX_S) + SLACK);
    let sleep_s = STALL_S + 2.0;
    let asked = Instant::now();
    client.server_sleep(sleep_s).expect("pg_sleep");
    let answered_after = asked.elapsed();
    let events = tracer
        .wait_for(SLACK, |evs| {
            Want::of("stall_end", "client", pid).found_in(evs)
        })
        .expect("stall_end");
    std::thread::sleep(Duration::from_millis(1500));
    let events_now = tracer.events();
    let dump = lines(&events_now);
    drop(events);

    let opens = Want::of("open", "client", pid).find(&events_now);
    assert_eq!(opens.len(), 1, "{dump}");
    let conn_id = opens[0].conn_id.clone();
    let conn = Want::conn(&conn_id).find(&events_now);
    assert!(
        conn.iter().all(|e| e.kind != "leak"),
        "no leak verdict on an encrypted connection idle {IDLE_IN_TX_S}+ s: {dump}"
    );
    assert!(
        events_now
            .iter()
            .filter(|e| e.pid == backend && e.role == "server")
            .all(|e| e.kind != "leak"),
        "nor on the backend's side: {dump}"
    );
    let stalls: Vec<&&Event> = conn.iter().filter(|e| e.kind == "stall").collect();
    let ends: Vec<&&Event> = conn.iter().filter(|e| e.kind == "stall_end").collect();
    assert_eq!((stalls.len(), ends.len()), (1, 1), "{dump}");
    assert!(stalls[0].waiting_s() >= STALL_S, "{}", stalls[0]);
    assert_eq!(stalls[0].state, "active", "{}", stalls[0]);
    let waited = ends[0].waited_s();
    assert!(
        waited >= sleep_s - 0.5 && waited <= answered_after.as_secs_f64() + 0.5,
        "waited {waited} s for a {sleep_s} s pg_sleep: {}",
        ends[0]
    );
    assert_eq!(ends[0].state, "unknown", "unreadable protocol: {}", ends[0]);
    client.stop().expect("client exits");
    eprintln!(
        "TLS: no leak after {:.1?} idle in a transaction (state unknown); pg_sleep({sleep_s}) \
         stalled at {:.2} s and ended after waited_s {waited:.2}",
        secs(IDLE_IN_TX_S) + SLACK,
        stalls[0].waiting_s()
    );
}

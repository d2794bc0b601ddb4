//! The first end-to-end trace: real kernel probes, a real Postgres, real clients.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    Event, Postgres, Tracer, conn_events, ensure_tracefs, events::Want, lines, linked_program_ids,
    loaded_program_names, loaded_programs, port_of, psql_backend, require_root, root_postgres,
    run_ok,
};

const WAIT: Duration = Duration::from_secs(15);

/// Runs psql and returns (psql's pid, the backend pid it printed).
fn psql_with_backend_pid(pg: &Postgres, host: &str, sql_tail: &str) -> (u32, u32) {
    psql_backend(pg.psql(host, &format!("select pg_backend_pid(){sql_tail}")))
}

#[test]
fn psql_over_tcp_gives_one_pair_per_role_with_the_right_owners() {
    let Some(pg) = root_postgres() else { return };
    let port = pg.port.to_string();
    let tracer = Tracer::start(&["--port", &port]).expect("tracer");

    let (psql_pid, backend_pid) = psql_with_backend_pid(&pg, "127.0.0.1", ", pg_sleep(0.3)");
    tracer
        .wait_for(WAIT, |evs| {
            evs.iter().filter(|e| e.kind == "close").count() >= 2
        })
        .expect("two closes");
    // Let anything spurious arrive before counting.
    std::thread::sleep(Duration::from_millis(500));
    let events = conn_events(&tracer.events(), pg.port);
    let dump = lines(&events);

    let client_opens = Want::kind("open").role("client").find(&events);
    let client_closes = Want::kind("close").role("client").find(&events);
    let server_opens = Want::kind("open").role("server").find(&events);
    let server_closes = Want::kind("close").role("server").find(&events);
    assert_eq!(client_opens.len(), 1, "{dump}");
    assert_eq!(client_closes.len(), 1, "{dump}");
    assert_eq!(server_opens.len(), 1, "{dump}");
    assert_eq!(server_closes.len(), 1, "{dump}");
    assert_eq!(events.len(), 4, "only these four: {dump}");

    for e in client_opens.iter().chain(&client_closes) {
        assert_eq!(e.pid, psql_pid, "{dump}");
        assert_eq!(e.comm, "psql", "{dump}");
        assert_eq!(port_of(&e.remote), Some(pg.port), "{dump}");
        assert_eq!(e.transport, "tcp");
    }
    for e in server_opens.iter().chain(&server_closes) {
        assert_eq!(
            e.pid, backend_pid,
            "the backend, not the postmaster: {dump}"
        );
        assert_eq!(e.comm, "postgres", "{dump}");
        assert_eq!(port_of(&e.local), Some(pg.port), "{dump}");
    }
    assert_eq!(client_opens[0].preexisting, Some(false));
    // One connection, seen from both ends.
    assert_eq!(client_opens[0].local, server_opens[0].remote, "{dump}");
    assert_eq!(client_opens[0].remote, server_opens[0].local, "{dump}");
    assert_eq!(client_opens[0].conn_id, client_closes[0].conn_id);
    assert_eq!(server_opens[0].conn_id, server_closes[0].conn_id);
    assert_ne!(client_opens[0].conn_id, server_opens[0].conn_id);

    let (c, s) = (client_closes[0], server_closes[0]);
    assert!(c.duration_s.unwrap() >= 0.3, "{dump}");
    assert!(c.duration_s.unwrap() < 5.0, "{dump}");
    assert!(c.bytes_sent.unwrap() > 0, "{dump}");
    assert_eq!(c.bytes_sent, s.bytes_received, "{dump}");
    assert_eq!(c.bytes_received, s.bytes_sent, "{dump}");
    // psql sends Terminate and closes first; the backend then exits.
    assert_eq!(c.closed_by.as_deref(), Some("local"), "{dump}");
    assert_eq!(s.closed_by.as_deref(), Some("peer"), "{dump}");
}

#[test]
fn ipv6_is_seen_and_unwatched_ports_are_not() {
    let Some(pg) = root_postgres() else { return };
    let tracer = Tracer::watching(&pg);

    // A TCP service on a port the tracer does not watch, with real traffic.
    let other = TcpListener::bind("127.0.0.1:0").expect("bind");
    let other_port = other.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = other.accept().expect("accept");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read");
        s.write_all(b"world").expect("write");
    });
    let mut c = TcpStream::connect(("127.0.0.1", other_port)).expect("connect");
    c.write_all(b"hello").expect("write");
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).expect("read");
    drop(c);
    server.join().expect("server");

    let (psql_pid, backend_pid) = psql_with_backend_pid(&pg, "::1", "");
    let events = tracer
        .wait_for(WAIT, |evs| {
            evs.iter().filter(|e| e.kind == "close").count() >= 2
        })
        .expect("closes");
    std::thread::sleep(Duration::from_millis(500));
    let all = tracer.events();
    let dump = lines(&all);
    assert!(
        conn_events(&all, other_port).is_empty(),
        "unwatched port {other_port} reported: {dump}"
    );
    let v6 = conn_events(&events, pg.port);
    let client = Want::kind("close").role("client").find(&v6);
    let server = Want::kind("close").role("server").find(&v6);
    assert_eq!((client.len(), server.len()), (1, 1), "{dump}");
    assert_eq!(client[0].remote, format!("[::1]:{}", pg.port), "{dump}");
    assert_eq!(server[0].local, format!("[::1]:{}", pg.port), "{dump}");
    assert_eq!(client[0].pid, psql_pid);
    assert_eq!(server[0].pid, backend_pid);
}

/// One line of `tcplife -w`.
#[derive(Debug)]
struct TcplifeRow {
    pid: u32,
    lport: u16,
    rport: u16,
    tx_kb: f64,
    rx_kb: f64,
    ms: f64,
}

fn parse_tcplife(text: &str) -> Vec<TcplifeRow> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 9 || f[0] == "PID" {
                return None;
            }
            let n = f.len();
            Some(TcplifeRow {
                pid: f[0].parse().ok()?,
                lport: f[n - 6].parse().ok()?,
                rport: f[n - 4].parse().ok()?,
                tx_kb: f[n - 3].parse().ok()?,
                rx_kb: f[n - 2].parse().ok()?,
                ms: f[n - 1].parse().ok()?,
            })
        })
        .collect()
}

fn bytes_agree(ours: u64, tcplife_kb: f64) -> bool {
    let ours_kb = ours as f64 / 1024.0;
    // tcplife prints KB with two decimals.
    (ours_kb - tcplife_kb).abs() <= 0.01 || (ours_kb - tcplife_kb).abs() <= 0.01 * ours_kb
}

#[test]
fn lifetimes_bytes_and_pids_agree_with_tcplife() {
    if !require_root() {
        return;
    }
    ensure_tracefs().expect("tracefs");
    let pg = Postgres::start().expect("postgres");
    let tracer = Tracer::watching(&pg);
    let tcplife_out = tempfile_path("tcplife");
    // Line-buffered, so its header (printed once its probes are attached) shows up at once.
    let mut tcplife = Command::new("stdbuf")
        .args(["-oL", "tcplife", "-w"])
        .stdout(std::fs::File::create(&tcplife_out).expect("file"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcplife (libbpf-tools)");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&tcplife_out)
        .unwrap_or_default()
        .contains("PID")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "tcplife did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let workloads = [
        ("127.0.0.1", ", pg_sleep(0.05)"),
        (
            "127.0.0.1",
            ", length(repeat('x', 200000)), repeat('y', 300000)",
        ),
        ("::1", ", repeat('z', 1000000), pg_sleep(0.2)"),
        ("127.0.0.1", ", generate_series(1, 20000)"),
    ];
    // (psql, its backend) of each run: Postgres's own answer for the server end's owner.
    let owners: HashMap<u32, u32> = workloads
        .iter()
        .map(|(host, tail)| psql_with_backend_pid(&pg, host, tail))
        .collect();
    let expected = workloads.len() * 2;
    tracer
        .wait_for(WAIT, |evs| {
            evs.iter().filter(|e| e.kind == "close").count() >= expected
        })
        .expect("all closes");
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child; tcplife flushes its output on SIGINT.
    unsafe { libc::kill(tcplife.id() as i32, libc::SIGINT) };
    tcplife.wait().expect("tcplife exit");
    let rows = parse_tcplife(&std::fs::read_to_string(&tcplife_out).expect("tcplife output"));
    let rows: HashMap<(u16, u16), &TcplifeRow> = rows
        .iter()
        .filter(|r| r.lport == pg.port || r.rport == pg.port)
        .map(|r| ((r.lport, r.rport), r))
        .collect();

    let closes: Vec<Event> = conn_events(&tracer.events(), pg.port)
        .into_iter()
        .filter(|e| e.kind == "close")
        .collect();
    assert_eq!(closes.len(), expected, "{}", lines(&closes));
    assert_eq!(rows.len(), expected, "tcplife rows: {rows:?}");
    // Both tools time the same state changes; under the VM tier's emulated CPU (TCG, about
    // ten times slower) the gap between their two clock readings grows with it.
    let tolerance_ms = if std::env::var_os("TRACER_VM").is_some() {
        25.0
    } else {
        5.0
    };
    let mut max_ms_diff = 0f64;
    for close in &closes {
        let key = (
            port_of(&close.local).unwrap(),
            port_of(&close.remote).unwrap(),
        );
        let row = rows
            .get(&key)
            .unwrap_or_else(|| panic!("tcplife missed {close}"));
        if close.role == "client" {
            // tcplife takes the pid of an active open from the connect: psql.
            assert_eq!(close.pid, row.pid, "{close} vs {row:?}");
            assert!(owners.contains_key(&close.pid), "{close}");
        } else {
            // For a passive open tcplife names whoever ran the handshake (in softirq: on
            // loopback, often the client), so the server end is checked against
            // pg_backend_pid() instead.
            assert!(
                owners.values().any(|&b| b == close.pid),
                "{close} vs {owners:?}"
            );
        }
        let sent = close.bytes_sent.unwrap();
        let received = close.bytes_received.unwrap();
        assert!(bytes_agree(sent, row.tx_kb), "sent {sent} vs {row:?}");
        assert!(
            bytes_agree(received, row.rx_kb),
            "received {received} vs {row:?}"
        );
        let ours_ms = close.duration_s.unwrap() * 1000.0;
        let diff = (ours_ms - row.ms).abs();
        max_ms_diff = max_ms_diff.max(diff);
        assert!(
            diff <= tolerance_ms,
            "duration {ours_ms:.2} ms vs tcplife {row:?}"
        );
    }
    // Every client row names psql; tcplife knows it from the connect.
    assert!(
        rows.values()
            .filter(|r| r.rport == pg.port)
            .all(|r| r.pid != 0)
    );
    eprintln!(
        "tcplife agreement: {expected} connections, max duration difference {max_ms_diff:.3} ms"
    );
    let _ = std::fs::remove_file(tcplife_out);
}

fn tempfile_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tracer-{tag}-{}.txt", std::process::id()))
}

#[test]
fn sigterm_under_load_exits_zero_quickly_and_detaches_everything() {
    let Some(pg) = root_postgres() else { return };
    let tracer = Tracer::watching(&pg);
    let ours = |names: &[String]| names.iter().filter(|n| n.starts_with("pgc_")).count();
    // This daemon's programs (other tracers may run on the machine) and their links.
    let before: Vec<u64> = loaded_programs()
        .expect("bpftool")
        .into_iter()
        .filter(|(_, name)| name.starts_with("pgc_"))
        .map(|(id, _)| id)
        .collect();
    assert!(before.len() >= 3, "our three programs load");
    let linked = linked_program_ids().expect("bpftool link");
    assert!(
        before.iter().filter(|id| linked.contains(id)).count() >= 3,
        "our three programs are attached through links"
    );

    // Keep connections churning while the daemon stops.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let mut cmd = pg.psql("127.0.0.1", "select 1");
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                run_ok(&mut cmd).expect("psql");
                n += 1;
            }
            n
        })
    };
    tracer
        .wait_for(WAIT, |evs| {
            evs.iter().filter(|e| e.kind == "close").count() >= 10
        })
        .expect("load is traced");
    let (status, took) = tracer.terminate(Duration::from_secs(5)).expect("stops");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = load.join().expect("load");
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let after: Vec<u64> = loaded_programs()
        .expect("bpftool")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let left: Vec<&u64> = before.iter().filter(|id| after.contains(id)).collect();
    assert!(left.is_empty(), "programs left behind: {left:?}");
    let linked = linked_program_ids().expect("bpftool link");
    assert!(
        !before.iter().any(|id| linked.contains(id)),
        "links left behind"
    );
    assert_eq!(
        ours(&loaded_program_names().expect("bpftool")),
        0,
        "no pgc_ program at all"
    );
    eprintln!("stopped in {took:?} under load ({runs} psql runs)");
}

//! Faults and abuse: killed clients, shared sockets, a stalled or killed daemon, a full
//! kernel table, PID reuse, hostile bytes, and the defaults that keep data safe. Every test
//! prints its figures.
use std::{
    collections::{HashMap, HashSet},
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tests::{
    Event, Postgres, TempDir, Tracer, conn_events,
    events::Want,
    free_port,
    hosts::ts_secs,
    load::{
        ConnHolder, Listener, MetricsEndpoint, Serve, alive, close_with_reset, http_get,
        raise_nofile, signal, ss_connections,
    },
    port_of, require_root, root_postgres, run_ok, tracer_bin,
};

/// The fields that matter here, one event a line (`cmdline` can be a whole script).
fn dump(events: &[&Event]) -> String {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {} {} conn_id={} pid={} comm={} local={} remote={} closed_by={} bytes={}/{}\n",
                e.ts,
                e.kind,
                e.role,
                e.conn_id,
                e.pid,
                e.comm,
                e.local,
                e.remote,
                e.closed_by.as_deref().unwrap_or("-"),
                e.bytes_sent.unwrap_or(0),
                e.bytes_received.unwrap_or(0)
            )
        })
        .collect()
}

/// Lost counts by `where`, from the `lost` events.
fn lost_events(events: &[Event]) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for e in Want::kind("lost").find(events) {
        *out.entry(e.lost_where.as_deref().unwrap_or("?").to_owned())
            .or_default() += e.count.unwrap_or(0);
    }
    out
}

/// Other Postgres servers on the host (other tests) listen on Unix sockets that the default
/// glob matches; tests that count tracked connections or losses watch TCP only.
const NO_UNIX: [&str; 2] = ["--unix-socket-glob", "/nonexistent-tracer-faults/*"];

/// The daemon watching `ports`, with `extra` arguments and its metrics endpoint on a free
/// port of 127.0.0.1 (returned).
fn start_with_metrics(ports: &str, extra: &[&str]) -> (Tracer, u16) {
    let mport = free_port().expect("port");
    let addr = format!("127.0.0.1:{mport}");
    let args = [&["--port", ports, "--metrics-addr", &addr][..], extra].concat();
    (Tracer::start(&args).expect("tracer"), mport)
}

#[test]
fn sigkill_of_a_client_holding_200_connections_closes_all_of_them() {
    let Some(pg) = root_postgres() else { return };
    let (tracer, mport) = start_with_metrics(&pg.port.to_string(), &NO_UNIX);
    let metrics = MetricsEndpoint(mport);
    std::thread::sleep(Duration::from_millis(1500));
    let baseline = metrics.tracked().expect("metrics");

    let holder = ConnHolder::start("127.0.0.1", pg.port, 200, true).expect("holder");
    let pid = holder.pid;
    let ports: HashSet<u16> = holder.local_ports.iter().copied().collect();
    assert_eq!(ports.len(), 200);
    // Both roles: the 200 client sockets and the 200 backends' sockets.
    let (held, _) = metrics.wait_tracked(baseline + 400, Duration::from_secs(15));
    assert_eq!(
        held,
        baseline + 400,
        "tracked while held (baseline {baseline})"
    );

    let is_ours = |e: &&Event| {
        e.role == "client" && e.pid == pid && port_of(&e.local).is_some_and(|p| ports.contains(&p))
    };
    let killed = Instant::now();
    let mut holder = holder;
    holder.child.kill().expect("SIGKILL");
    holder.child.wait().expect("reap");
    let mut all_closed = None;
    while killed.elapsed() < Duration::from_secs(10) {
        let events = tracer.events();
        if Want::kind("close")
            .find(&events)
            .into_iter()
            .filter(is_ours)
            .count()
            >= 200
        {
            all_closed = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (back, back_after) = metrics.wait_tracked(baseline, Duration::from_secs(10));
    let events = tracer.events();
    let closes: Vec<&Event> = Want::kind("close")
        .find(&events)
        .into_iter()
        .filter(is_ours)
        .collect();
    let mut by: HashMap<String, usize> = HashMap::new();
    for c in &closes {
        *by.entry(c.closed_by.as_deref().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let ids: HashSet<&str> = closes.iter().map(|c| c.conn_id.as_str()).collect();
    let server_closes = conn_events(&events, pg.port)
        .iter()
        .filter(|e| e.kind == "close" && e.role == "server")
        .count();
    eprintln!(
        "kill -9 of a holder of 200: {} client closes in {all_closed:?} (closed_by {by:?}), {server_closes} backend closes; tracked {held} -> {back} (baseline {baseline}) after {back_after:?}; skipped program runs {:?}",
        closes.len(),
        tests::recursion_misses()
    );
    assert_eq!(
        closes.len(),
        200,
        "one close per connection: {}",
        dump(&closes)
    );
    assert_eq!(ids.len(), 200, "distinct conn_ids");
    let took = all_closed.expect("all 200 closes");
    assert!(took <= Duration::from_secs(2), "closes took {took:?}");
    assert!(
        closes
            .iter()
            .all(|c| c.closed_by.as_deref() == Some("exit")
                || c.closed_by.as_deref() == Some("reset")),
        "a killed owner's connections end by exit (or reset): {by:?}"
    );
    assert_eq!(back, baseline, "tracked count back to its baseline");
}

const SHARED_PY: &str = r#"
import array, os, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
to_c, c_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
c_pid = os.fork()
if c_pid == 0:
    to_c.close()
    msg, anc, flags, addr = c_end.recvmsg(1, socket.CMSG_SPACE(4))
    fd = array.array("i", anc[0][2][:4])[0]
    s = socket.socket(fileno=fd)
    time.sleep(1.0)
    s.sendall(b"from C")
    time.sleep(1.0)
    print("C %d %.6f" % (os.getpid(), time.time()), flush=True)
    s.close()
    os._exit(0)
c_end.close()
s = socket.create_connection((host, port))
print("A %d %d" % (os.getpid(), s.getsockname()[1]), flush=True)
s.sendall(b"from A")
d = os.dup(s.fileno())
os.close(d)
time.sleep(1.0)
b_pid = os.fork()
if b_pid == 0:
    time.sleep(1.0)
    s.sendall(b"from B")
    time.sleep(1.0)
    socket.send_fds(to_c, [b"x"], [s.fileno()])
    s.close()
    print("B %d %.6f" % (os.getpid(), time.time()), flush=True)
    os._exit(0)
s.close()
print("Aclosed %d %.6f" % (os.getpid(), time.time()), flush=True)
os.waitpid(b_pid, 0)
os.waitpid(c_pid, 0)
"#;

#[test]
fn shared_sockets_end_once_at_the_last_close_and_follow_the_holder() {
    if !require_root() {
        return;
    }
    let listener = Listener::start(Serve::Drain).expect("listener");
    let tracer = Tracer::start(&["--port", &listener.port.to_string()]).expect("tracer");
    let out = run_ok(Command::new("/usr/bin/python3").args([
        "-c",
        SHARED_PY,
        "127.0.0.1",
        &listener.port.to_string(),
    ]))
    .expect("script");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |tag: &str, i: usize| -> String {
        text.lines()
            .find(|l| l.split(' ').next() == Some(tag))
            .and_then(|l| l.split(' ').nth(i))
            .unwrap_or_else(|| panic!("no {tag} in {text}"))
            .to_owned()
    };
    let a_pid: u32 = field("A", 1).parse().expect("pid");
    let local: u16 = field("A", 2).parse().expect("port");
    let b_pid: u32 = field("B", 1).parse().expect("pid");
    let c_pid: u32 = field("C", 1).parse().expect("pid");
    let c_closed: f64 = field("C", 2).parse().expect("time");
    let a_closed: f64 = field("Aclosed", 2).parse().expect("time");
    let b_closed: f64 = field("B", 2).parse().expect("time");

    let mine = |evs: &[Event]| -> Vec<Event> {
        evs.iter()
            .filter(|e| e.role == "client" && port_of(&e.local) == Some(local))
            .cloned()
            .collect()
    };
    tracer
        .wait_for(Duration::from_secs(10), |evs| {
            mine(evs).iter().any(|e| e.kind == "close")
        })
        .expect("the close");
    std::thread::sleep(Duration::from_millis(500));
    let events = mine(&tracer.events());
    let refs: Vec<&Event> = events.iter().collect();
    let opens = Want::kind("open").find(&events);
    let closes = Want::kind("close").find(&events);
    eprintln!(
        "shared socket: holders A={a_pid} (closed {a_closed:.3}), B={b_pid} (passed and closed {b_closed:.3}), C={c_pid} (closed {c_closed:.3}); events:\n{}",
        dump(&refs)
    );
    assert_eq!(opens.len(), 1, "{}", dump(&refs));
    assert_eq!(opens[0].pid, a_pid, "the connecting process");
    assert_eq!(closes.len(), 1, "exactly one close: {}", dump(&refs));
    let close = closes[0];
    assert!(
        ts_secs(&close.ts).expect("ts") >= c_closed - 0.05,
        "the close came at the last holder's close ({c_closed:.3}), not at a dup's, the parent's ({a_closed:.3}) or the sender's ({b_closed:.3}): {close}"
    );
    assert_eq!(close.conn_id, opens[0].conn_id);
    assert_eq!(
        close.pid, c_pid,
        "the process that received the fd and did the last I/O owns it: {close}"
    );
    assert_eq!(
        close.bytes_sent,
        Some(18),
        "A, B and C each sent 6 bytes: {close}"
    );
}

#[test]
fn a_stalled_daemon_counts_every_loss_and_recovers_the_true_connection_set() {
    if !require_root() {
        return;
    }
    let listener = Listener::start(Serve::Drain).expect("listener");
    let port = listener.port;
    // Churn goes to a listener without a thread per connection: more connections per second.
    let churn_listener = Listener::start(Serve::ReadOnceThenClose).expect("listener");
    let churn_port = churn_listener.port;
    let ports = format!("{port},{churn_port}");
    let (tracer, mport) = start_with_metrics(
        &ports,
        &[
            NO_UNIX[0],
            NO_UNIX[1],
            "--close-wait-after",
            "2s",
            "--idle-after",
            "5s",
        ],
    );
    let metrics = MetricsEndpoint(mport);
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(b"hi").expect("write");
        held.push(s);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let churn: Vec<_> = (0..4)
        .map(|_| {
            let (stop, made) = (stop.clone(), made.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", churn_port)) {
                        let _ = s.write_all(b"q");
                        close_with_reset(s);
                        made.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    signal(tracer.pid(), libc::SIGSTOP);
    let before_stop = made.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(10));
    let during_stop = made.load(Ordering::Relaxed) - before_stop;
    signal(tracer.pid(), libc::SIGCONT);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for t in churn {
        t.join().expect("churn");
    }
    let churned = made.load(Ordering::Relaxed);

    // Within 5 s the tracked set is the kernel's.
    let resumed = Instant::now();
    let (mut tracked, mut truth) = (-1, 0);
    let truth_now =
        || ss_connections(port).expect("ss").len() + ss_connections(churn_port).expect("ss").len();
    while resumed.elapsed() < Duration::from_secs(5) {
        tracked = metrics.tracked().unwrap_or(-1);
        truth = truth_now() as i64;
        if tracked == truth {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let settled = resumed.elapsed();
    // Let the losses be reported (once per tick) and the short leak thresholds pass.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        alive(tracer.pid()),
        "the daemon survived: {}",
        tracer.stderr()
    );
    let tracked_later = metrics.tracked().unwrap_or(-1);
    let events = tracer.events();
    let mut ours = conn_events(&events, port);
    ours.extend(conn_events(&events, churn_port));
    let opens = Want::kind("open").count(&ours) as u64;
    let closes = Want::kind("close").count(&ours) as u64;
    let by_role = |kind: &str, role: &str| {
        ours.iter()
            .filter(|e| e.kind == kind && e.role == role)
            .count()
    };
    eprintln!(
        "by role: client {} opens {} closes, server {} opens {} closes",
        by_role("open", "client"),
        by_role("close", "client"),
        by_role("open", "server"),
        by_role("close", "server")
    );
    let lost = lost_events(&events);
    let lost_total: u64 = lost.values().sum();
    let text = metrics.text().expect("metrics");
    let mut lost_metric = HashMap::new();
    for location in ["kernel_ring", "kernel_table", "user_queue", "decode"] {
        let n = tests::load::metric_sum(
            &text,
            "pgconn_tracer_events_lost_total",
            &[&format!("where=\"{location}\"")],
        ) as u64;
        if n > 0 {
            lost_metric.insert(location.to_owned(), n);
        }
    }
    // Each connection has a client end and, once the server's kernel made a socket for it
    // (it may drop the handshake when its accept queue overflows), a server end; each end
    // has one open and one close record.
    let accepted = churn_listener.accepted.load(Ordering::Relaxed);
    let expected_opens = churned + accepted + 2 * held.len() as u64;
    let expected_closes = churned + accepted;
    let missing = expected_opens.saturating_sub(opens) + expected_closes.saturating_sub(closes);
    let mut live = ss_connections(port).expect("ss");
    live.extend(ss_connections(churn_port).expect("ss"));
    // A leak is false when the connection had already ended (its close came first), or when
    // it is gone now and no close was ever reported (the daemon kept a dead connection). A
    // leak on a connection that really sat idle (say in the listener's accept queue while
    // the daemon was stopped) and closed later is a true verdict.
    let close_ts: HashMap<String, String> = Want::kind("close")
        .find(&ours)
        .into_iter()
        .map(|e| (e.conn_id.clone(), e.ts.as_str().to_owned()))
        .collect();
    let false_leaks: Vec<&Event> = Want::kind("leak")
        .find(&ours)
        .into_iter()
        .filter(|e| {
            let key = (e.local.clone(), e.remote.clone());
            match close_ts.get(e.conn_id.as_str()) {
                Some(closed) => closed.as_str() < e.ts.as_str(),
                None => !live.contains(&key),
            }
        })
        .collect();
    eprintln!(
        "SIGSTOP 10 s: {churned} churned connections ({during_stop} while stopped, {accepted} accepted), tracked {tracked} vs ss {truth} {settled:?} after SIGCONT ({tracked_later} 3 s later); events: {opens} opens (expected {expected_opens}), {closes} closes (expected {expected_closes}), {missing} missing records; lost events {lost:?}, lost metric {lost_metric:?}; {} leak events, {} for gone connections",
        Want::kind("leak").count(&ours),
        false_leaks.len()
    );
    assert_eq!(
        tracked, truth,
        "tracked set equals ss within 5 s of SIGCONT"
    );
    assert_eq!(
        lost, lost_metric,
        "every lost event is in the metric, and only those"
    );
    // A lost open also hides its close (a close for an unknown connection is not reported).
    let (missing_opens, missing_closes) = (
        expected_opens.saturating_sub(opens),
        expected_closes.saturating_sub(closes),
    );
    assert!(
        missing_opens <= lost_total && missing_closes <= lost_total,
        "{missing_opens} opens and {missing_closes} closes missing but only {lost_total} records counted lost"
    );
    assert!(
        false_leaks.is_empty(),
        "leaks for connections that are gone: {}",
        dump(&false_leaks)
    );
    drop(held);
}

#[test]
fn a_daemon_killed_under_load_restarts_and_reseeds_without_duplicates() {
    if !require_root() {
        return;
    }
    let listener = Listener::start(Serve::ReadyForQuery).expect("listener");
    let args = ["--port".to_owned(), listener.port.to_string()];
    let port = listener.port;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = Tracer::start(&args).expect("tracer");
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(b"Q\0\0\0\x04").expect("write");
        let mut reply = [0u8; 6];
        s.read_exact(&mut reply).expect("read");
        held.push(s);
    }
    let held_ports: HashSet<u16> = held
        .iter()
        .map(|s| s.local_addr().expect("addr").port())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                    let mut reply = [0u8; 6];
                    if s.write_all(b"Q\0\0\0\x04").is_ok() && s.read_exact(&mut reply).is_ok() {
                        n += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    signal(first.pid(), libc::SIGKILL);
    drop(first);
    let started = Instant::now();
    let second = Tracer::start(&args).expect("restarted tracer");
    let to_ready = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let churned = churn.join().expect("churn");
    std::thread::sleep(Duration::from_secs(1));

    let events = conn_events(&second.events(), port);
    let opens = Want::kind("open").find(&events);
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for o in &opens {
        *per_id.entry(o.conn_id.as_str()).or_default() += 1;
    }
    let duplicated: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    let reseeded = |role: &str, end: fn(&Event) -> &str| {
        opens
            .iter()
            .filter(|o| {
                o.role == role
                    && o.preexisting == Some(true)
                    && port_of(end(o)).is_some_and(|p| held_ports.contains(&p))
            })
            .count()
    };
    let (clients, servers) = (
        reseeded("client", |o| &o.local),
        reseeded("server", |o| &o.remote),
    );
    eprintln!(
        "restart after kill -9: ready in {to_ready:?}; {} opens, {} preexisting; held connections re-seeded: {clients} client + {servers} server of 20 + 20; {churned} churned connections; duplicates {duplicated:?}",
        opens.len(),
        opens.iter().filter(|o| o.preexisting == Some(true)).count()
    );
    assert!(
        to_ready <= Duration::from_secs(5),
        "ready took {to_ready:?}"
    );
    assert!(duplicated.is_empty(), "duplicate opens: {duplicated:?}");
    assert_eq!(
        (clients, servers),
        (20, 20),
        "every held connection re-seeded, once per role"
    );
    drop(held);
}

#[test]
fn a_full_kernel_table_is_counted_and_forgets_no_tracked_connection() {
    if !require_root() {
        return;
    }
    raise_nofile(20_000);
    let listener = Listener::start(Serve::Hold).expect("listener");
    let port = listener.port;
    let (tracer, mport) = start_with_metrics(
        &port.to_string(),
        &["--max-connections", "1024", NO_UNIX[0], NO_UNIX[1]],
    );
    let metrics = MetricsEndpoint(mport);
    let started = Instant::now();
    let holders: Vec<ConnHolder> = (0..5)
        .map(|_| ConnHolder::start("127.0.0.1", port, 1000, false).expect("holder"))
        .collect();
    let client_ports: HashSet<u16> = holders
        .iter()
        .flat_map(|h| h.local_ports.iter().copied())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while listener.held() < 5000 {
        assert!(
            Instant::now() < deadline,
            "only {} accepted",
            listener.held()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let opened_in = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    assert!(alive(tracer.pid()), "daemon alive: {}", tracer.stderr());
    let tracked_full = metrics.tracked().expect("metrics");
    let table_lost_metric = metrics.lost("kernel_table").expect("metrics");

    for h in holders {
        h.close().expect("holder close");
    }
    listener.close_all();
    let (tracked_end, _) = metrics.wait_tracked(0, Duration::from_secs(15));
    // Losses are reported once per tick.
    std::thread::sleep(Duration::from_secs(2));
    let table_lost_end = metrics.lost("kernel_table").expect("metrics");
    let events = tracer.events();
    let ours = conn_events(&events, port);
    let opened: HashSet<&str> = Want::kind("open").conn_ids_in(&ours).collect();
    let closed: HashSet<&str> = Want::kind("close").conn_ids_in(&ours).collect();
    let forgotten: Vec<&&str> = opened.difference(&closed).collect();
    // The server ends (held by the test, never read) as the events name them.
    let server_ends: Vec<&Event> = events
        .iter()
        .filter(|e| {
            e.role == "server"
                && (e.kind == "open" || e.kind == "close")
                && port_of(&e.remote).is_some_and(|p| client_ports.contains(&p))
        })
        .collect();
    let wrong_local: Vec<&&Event> = server_ends
        .iter()
        .filter(|e| port_of(&e.local) != Some(port))
        .collect();
    let lost = lost_events(&events);
    // Skipped program runs are missed state changes (a close among them): the daemon's
    // check against the socket tables must make those good.
    let misses = tests::recursion_misses();
    eprintln!(
        "5000 connections ({} sockets) in {opened_in:?} with --max-connections 1024: tracked {tracked_full}, {} opens, {} closes, lost events {lost:?}, kernel_table metric {table_lost_metric} while open, {table_lost_end} at the end; tracked after close {tracked_end}; {} forgotten; skipped program runs {misses:?}",
        10_000,
        opened.len(),
        closed.len(),
        forgotten.len()
    );
    eprintln!(
        "server ends: {} events, {} naming a local address other than 127.0.0.1:{port}, e.g. {:?}",
        server_ends.len(),
        wrong_local.len(),
        wrong_local.first()
    );
    assert!(table_lost_metric > 0, "overflow counted in the metric");
    assert_eq!(
        lost.get("kernel_table").copied().unwrap_or(0),
        table_lost_end,
        "lost events and the metric agree"
    );
    // An untracked socket loses its open and its close record: a count far above that
    // counts attempts, not losses, and makes the metric meaningless.
    assert!(
        table_lost_end <= 2 * 10_000,
        "{table_lost_end} kernel_table losses for 10,000 sockets"
    );
    assert!(
        lost.get("kernel_table").copied().unwrap_or(0) > 0,
        "overflow reported as lost events: {lost:?}"
    );
    assert!(
        tracked_full <= 1024,
        "tracked {tracked_full} above the table size"
    );
    assert!(
        !opened.is_empty(),
        "connections up to the limit are tracked"
    );
    assert!(
        forgotten.is_empty(),
        "{} tracked connections never closed, e.g. {:?}; skipped program runs {misses:?}; \
         daemon log:\n{}",
        forgotten.len(),
        forgotten.iter().take(5).collect::<Vec<_>>(),
        tracer.stderr()
    );
    assert_eq!(tracked_end, 0);
    assert!(
        wrong_local.is_empty(),
        "server ends reported with the wrong local address: {}",
        dump(&wrong_local.iter().take(3).map(|e| **e).collect::<Vec<_>>())
    );
}

const CLIENT_C: &str = r#"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(argv[1]));
    a.sin_addr.s_addr = htonl(0x7f000001);
    if (connect(s, (struct sockaddr *)&a, sizeof a)) return 2;
    struct sockaddr_in l;
    socklen_t n = sizeof l;
    getsockname(s, (struct sockaddr *)&l, &n);
    uint64_t cookie = 0;
    socklen_t cn = sizeof cookie;
    getsockopt(s, SOL_SOCKET, SO_COOKIE, &cookie, &cn);
    printf("%d %d %llu\n", getpid(), ntohs(l.sin_port), (unsigned long long)cookie);
    fflush(stdout);
    if (write(s, "x", 1) != 1) return 3;
    close(s);
    return 0;
}
"#;

#[test]
fn short_lived_clients_reusing_pids_are_never_misattributed() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("pidreuse").expect("dir");
    let src = dir.0.join("client.c");
    std::fs::write(&src, CLIENT_C).expect("write");
    // Two names, so that a pid reused by the other program shows in `comm`.
    let bins = [dir.0.join("pgc_even"), dir.0.join("pgc_odd")];
    run_ok(
        Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&bins[0])
            .arg(&src),
    )
    .expect("cc");
    std::fs::copy(&bins[0], &bins[1]).expect("copy");
    let listener = Listener::start(Serve::Drain).expect("listener");
    let port = listener.port.to_string();
    let tracer = Tracer::start(&["--port", &port]).expect("tracer");

    const CLIENTS: usize = 20_000;
    let budget = Duration::from_secs(150);
    let started = Instant::now();
    // cookie -> (pid, local port, comm)
    let mut clients: HashMap<String, (u32, u16, &str)> = HashMap::new();
    let mut reused = 0usize;
    let mut seen_pids = HashSet::new();
    let mut last_pid = 0u32;
    for i in 0..CLIENTS {
        if started.elapsed() > budget {
            break;
        }
        // Hand the previous client's pid (exited and reaped) to the next one: the next pid the
        // kernel allocates host-wide; other processes just get other free pids.
        if last_pid > 1 {
            let _ = std::fs::write("/proc/sys/kernel/ns_last_pid", (last_pid - 1).to_string());
        }
        let out = Command::new(&bins[i % 2])
            .arg(&port)
            .output()
            .expect("client");
        assert!(out.status.success(), "client {i}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let f: Vec<&str> = text.split_whitespace().collect();
        let pid: u32 = f[0].parse().expect("pid");
        if !seen_pids.insert(pid) {
            reused += 1;
        }
        last_pid = pid;
        let comm = if i % 2 == 0 { "pgc_even" } else { "pgc_odd" };
        clients.insert(f[2].to_owned(), (pid, f[1].parse().expect("port"), comm));
    }
    let spawned = clients.len();
    let took = started.elapsed();
    let events = tracer
        .wait_for(Duration::from_secs(60), |evs| {
            evs.iter()
                .filter(|e| e.kind == "close" && e.role == "client")
                .count()
                >= spawned
        })
        .map_err(|_| "timeout")
        .unwrap_or_else(|_| tracer.events());
    let mut wrong = Vec::new();
    let (mut opens, mut closes) = (0, 0);
    let test_pid = std::process::id();
    for e in conn_events(&events, listener.port) {
        match e.kind.as_str() {
            "open" if e.role == "client" => opens += 1,
            "close" if e.role == "client" => closes += 1,
            _ => {}
        }
        if e.role == "server" {
            if e.pid != test_pid {
                wrong.push(e.clone());
            }
            continue;
        }
        let Some((pid, lport, comm)) = clients.get(&e.conn_id) else {
            wrong.push(e.clone());
            continue;
        };
        if e.pid != *pid || e.comm != *comm || port_of(&e.local) != Some(*lport) {
            wrong.push(e.clone());
        }
    }
    eprintln!(
        "pid reuse: {spawned} clients in {took:?} ({:.0}/s), {} distinct pids ({reused} reused); {opens} client opens, {closes} client closes; {} misattributed",
        spawned as f64 / took.as_secs_f64(),
        seen_pids.len(),
        wrong.len()
    );
    assert!(reused > spawned / 2, "the test did reuse pids");
    assert!(
        wrong.is_empty(),
        "misattributed events, e.g.:\n{}",
        dump(&wrong.iter().take(10).collect::<Vec<_>>())
    );
    assert_eq!(
        (opens, closes),
        (spawned, spawned),
        "one open and one close per client"
    );
}

/// Deterministic garbage.
struct Noise(u64);

impl Noise {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0 as u8
            })
            .collect()
    }
    fn below(&mut self, n: usize) -> usize {
        self.bytes(2)
            .iter()
            .fold(0usize, |a, &b| a * 256 + b as usize)
            % n
    }
}

/// Protocol-shaped garbage: fake ReadyForQuery frames with bad status, huge lengths,
/// partial headers, startup/SSL/cancel codes with wrong lengths, random bytes.
fn hostile_payload(noise: &mut Noise) -> Vec<u8> {
    match noise.below(8) {
        0 => {
            let n = 1 + noise.below(3000);
            noise.bytes(n)
        }
        1 => [b'Z', 0, 0, 0, 5, b'X'].to_vec(),
        2 => [b'Z', 0xff, 0xff, 0xff, 0xff].to_vec(),
        3 => vec![b'Z', 0, 0],
        4 => [0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0].to_vec(),
        5 => [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f, b'Z', 0, 0, 0, 5].to_vec(),
        6 => [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 1, 2, 3].to_vec(),
        _ => {
            let mut v = vec![b'Z', 0, 0, 0, 5, b'I'];
            let n = noise.below(7);
            v.extend(noise.bytes(n));
            v
        }
    }
}

#[test]
fn hostile_bytes_do_not_disturb_the_daemon_or_other_connections() {
    let Some(pg) = root_postgres() else { return };
    let hostile = TcpListener::bind("127.0.0.1:0").expect("bind");
    let hport = hostile.local_addr().expect("addr").port();
    let stop = Arc::new(AtomicBool::new(false));
    // A server that answers garbage.
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            hostile.set_nonblocking(true).expect("nonblocking");
            let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
            while !stop.load(Ordering::Relaxed) {
                match hostile.accept() {
                    Ok((mut s, _)) => {
                        s.set_read_timeout(Some(Duration::from_millis(20))).ok();
                        let mut buf = [0u8; 4096];
                        for _ in 0..noise.below(4) {
                            let _ = s.write_all(&hostile_payload(&mut noise));
                            let _ = s.read(&mut buf);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        })
    };
    let ports = format!("{},{hport}", pg.port);
    let (tracer, mport) = start_with_metrics(&ports, &[]);

    let attacks = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = [pg.port, hport, pg.port]
        .into_iter()
        .enumerate()
        .map(|(i, target)| {
            let (stop, attacks) = (stop.clone(), attacks.clone());
            std::thread::spawn(move || {
                let mut noise = Noise(0x1234_5678 + i as u64);
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(("127.0.0.1", target)) else {
                        continue;
                    };
                    s.set_read_timeout(Some(Duration::from_millis(20))).ok();
                    let mut buf = [0u8; 4096];
                    for _ in 0..1 + noise.below(4) {
                        let _ = s.write_all(&hostile_payload(&mut noise));
                        let _ = s.read(&mut buf);
                    }
                    if noise.below(2) == 0 {
                        close_with_reset(s);
                    }
                    attacks.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    // A normal session in the middle of the attack.
    let child = pg
        .psql(
            "127.0.0.1",
            "select pg_backend_pid(), pg_sleep(0.5), repeat('x', 5000)",
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("psql");
    let psql_pid = child.id();
    let out = child.wait_with_output().expect("psql");
    assert!(out.status.success());
    let backend: u32 = String::from_utf8_lossy(&out.stdout)
        .split('|')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .expect("backend pid");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().expect("attacker");
    }
    server.join().expect("server");
    std::thread::sleep(Duration::from_secs(1));

    assert!(alive(tracer.pid()), "daemon alive: {}", tracer.stderr());
    let (health, _) = http_get(mport, "/healthz").expect("healthz");
    let events = tracer.events();
    let of = |kind: &str, role: &str, pid: u32| -> Vec<&Event> {
        events
            .iter()
            .filter(|e| e.kind == kind && e.role == role && e.pid == pid)
            .collect()
    };
    let (co, cc) = (
        of("open", "client", psql_pid),
        of("close", "client", psql_pid),
    );
    let (so, sc) = (
        of("open", "server", backend),
        of("close", "server", backend),
    );
    let hostile_events = conn_events(&events, hport).len();
    eprintln!(
        "hostile input: {} attack connections, {hostile_events} events on the garbage server's port, {} events in all; /healthz {health}; psql {psql_pid} / backend {backend}: {} {} {} {}",
        attacks.load(Ordering::Relaxed),
        events.len(),
        co.len(),
        cc.len(),
        so.len(),
        sc.len()
    );
    assert_eq!(health, 200);
    let all = [co.clone(), cc.clone(), so.clone(), sc.clone()].concat();
    assert_eq!(
        (co.len(), cc.len(), so.len(), sc.len()),
        (1, 1, 1, 1),
        "exactly one open and one close per role: {}",
        dump(&all)
    );
    assert_eq!(co[0].comm, "psql");
    assert_eq!(cc[0].bytes_sent, sc[0].bytes_received, "{}", dump(&all));
    assert_eq!(cc[0].bytes_received, sc[0].bytes_sent, "{}", dump(&all));
    assert!(cc[0].bytes_received.unwrap_or(0) > 5000);
    assert_eq!(co[0].local, so[0].remote);
}

#[test]
fn metrics_bind_to_localhost_by_default() {
    if !require_root() {
        return;
    }
    match TcpListener::bind("0.0.0.0:9433") {
        Ok(l) => drop(l),
        Err(e) => {
            eprintln!("skipped: port 9433 is taken ({e}); cannot check the default address");
            return;
        }
    }
    let dir = TempDir::new("defaults").expect("dir");
    let events = dir.0.join("events.jsonl");
    let port = free_port().expect("port");
    let mut child = Command::new(tracer_bin())
        .args(["run", "--port", &port.to_string(), "--events"])
        .arg(&events)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tracer");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&events)
        .unwrap_or_default()
        .contains("\"ready\"")
    {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            if err.contains("in use") {
                eprintln!("skipped: port 9433 was taken meanwhile: {err}");
                return;
            }
            panic!("tracer exited {status}: {err}");
        }
        assert!(Instant::now() < deadline, "not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = run_ok(Command::new("ss").args(["-ltnH", "sport = :9433"])).expect("ss");
    let listening = String::from_utf8_lossy(&out.stdout).into_owned();
    let (health, _) = http_get(9433, "/healthz").expect("healthz on 127.0.0.1:9433");
    signal(child.id(), libc::SIGTERM);
    let status = child.wait().expect("wait");
    eprintln!("default metrics listener: {listening:?}, /healthz {health}, exit {status}");
    assert!(listening.contains("127.0.0.1:9433"), "{listening}");
    for wildcard in ["0.0.0.0:9433", "*:9433", "[::]:9433"] {
        assert!(!listening.contains(wildcard), "{listening}");
    }
    assert_eq!(health, 200);
}

#[test]
fn no_event_or_metric_carries_query_text() {
    if !require_root() {
        return;
    }
    const MARKER: &str = "SECRET_MARKER_12345";
    let pg = Postgres::start().expect("postgres");
    let (tracer, mport) = start_with_metrics(
        &pg.port.to_string(),
        &["--stall-after", "1s", "--idle-in-transaction-after", "1s"],
    );
    // The queries go in on psql's stdin, not its command line: the command line is reported
    // (`cmdline`) by design, the wire never is. Pauses between the parts leave a transaction
    // idle and a request waiting, so the detectors report on these very connections.
    let sessions: [&[(String, u64)]; 3] = [
        &[(format!("select '{MARKER}', pg_sleep(2);\n"), 2500)],
        &[
            (format!("select {MARKER}_column;\n"), 0),
            (
                format!("prepare p as select '{MARKER}'::text;\nexecute p;\n"),
                0,
            ),
        ],
        &[
            (format!("begin;\nselect '{MARKER}';\n"), 2500),
            ("commit;\n".to_owned(), 0),
        ],
    ];
    for parts in sessions {
        let mut child = Command::new("psql")
            .args(["-X", "-U", "postgres", "-d", "postgres", "-h", "127.0.0.1"])
            .args(["-p", &pg.port.to_string()])
            .env("PGAPPNAME", MARKER)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql");
        let mut stdin = child.stdin.take().expect("stdin");
        for (sql, pause_ms) in parts {
            stdin.write_all(sql.as_bytes()).expect("write");
            stdin.flush().expect("flush");
            std::thread::sleep(Duration::from_millis(*pause_ms));
        }
        drop(stdin);
        child.wait().expect("psql");
    }
    tracer
        .wait_for(Duration::from_secs(15), |evs| {
            Want::kind("close").count(evs) >= 6
        })
        .expect("closes");
    std::thread::sleep(Duration::from_millis(1500));
    let events = tracer.events();
    let text: String = events.iter().map(|e| format!("{e}\n")).collect();
    let metrics = MetricsEndpoint(mport).text().expect("metrics");
    let kinds: HashSet<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    eprintln!(
        "query text: {} events of kinds {kinds:?}; marker in events: {}, in metrics: {}",
        events.len(),
        text.contains(MARKER),
        metrics.contains(MARKER)
    );
    assert!(
        kinds.contains("stall") && kinds.contains("leak"),
        "the detectors ran: {kinds:?}"
    );
    let carrying: Vec<&str> = text.lines().filter(|l| l.contains(MARKER)).collect();
    assert!(carrying.is_empty(), "events carry query text: {carrying:?}");
    assert!(!metrics.contains(MARKER), "metrics carry query text");
}

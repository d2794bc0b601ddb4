//! Who holds each connection: process, container, pod and unit, for clients in containers,
//! over the Unix socket, in another network namespace, and for connections that existed
//! before the daemon started; and `tracer list` against `ss`.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    process::Command,
    time::Duration,
};

use tests::{
    Event, Postgres, Tracer, Value, conn_events,
    events::{Want, path_events},
    hosts::{
        FakeContainer, HeldConn, NetNs, PYTHON, PyClient, cgroup2_of, cmdline_of, conn_spec, dsn,
        postgres_bin_dir, random_hex, random_pod_uid, ts_secs, wall_now,
    },
    lines, psql_backend, require_root, root_postgres, run_ok, tracer_bin,
};

const WAIT: Duration = Duration::from_secs(15);

/// The owner fields an event must carry.
#[derive(Clone, Debug)]
struct Owner {
    pid: u32,
    comm: &'static str,
    exe: String,
    cmdline: String,
    uid: u32,
    cgroup: String,
    container_id: Option<String>,
    container_runtime: Option<&'static str>,
    pod_uid: Option<String>,
    systemd_unit: Option<String>,
}

impl Owner {
    /// A live process, as `/proc` shows it now, with the container fields to expect.
    fn of(pid: u32, comm: &'static str, container: Container) -> Self {
        Self {
            pid,
            comm,
            exe: std::fs::read_link(format!("/proc/{pid}/exe"))
                .expect("exe of a live process")
                .to_string_lossy()
                .into_owned(),
            cmdline: cmdline_of(pid).expect("cmdline of a live process"),
            uid: 0,
            cgroup: container.cgroup,
            container_id: container.id,
            container_runtime: container.runtime,
            pod_uid: container.pod_uid,
            systemd_unit: container.unit,
        }
    }

    /// Every field that differs from the event's, as `field: got X, want Y`.
    fn mismatches(&self, e: &Event) -> Vec<String> {
        let text = |v: Option<&str>| format!("{v:?}");
        let pairs = [
            ("pid", e.pid.to_string(), self.pid.to_string()),
            ("comm", e.comm.clone(), self.comm.to_owned()),
            ("exe", text(e.exe.as_deref()), text(Some(&self.exe))),
            (
                "cmdline",
                text(e.cmdline.as_deref()),
                text(Some(&self.cmdline)),
            ),
            ("uid", e.uid.to_string(), self.uid.to_string()),
            (
                "cgroup",
                text(e.cgroup.as_deref()),
                text(Some(&self.cgroup)),
            ),
            (
                "container_id",
                text(e.container_id.as_deref()),
                text(self.container_id.as_deref()),
            ),
            (
                "container_runtime",
                text(e.container_runtime.as_deref()),
                text(self.container_runtime),
            ),
            (
                "pod_uid",
                text(e.pod_uid.as_deref()),
                text(self.pod_uid.as_deref()),
            ),
            (
                "systemd_unit",
                text(e.systemd_unit.as_deref()),
                text(self.systemd_unit.as_deref()),
            ),
        ];
        pairs
            .into_iter()
            .filter(|(_, got, want)| got != want)
            .map(|(k, got, want)| format!("{k}: got {got}, want {want}"))
            .collect()
    }
}

/// Where a client runs and what the daemon must say about it.
#[derive(Clone, Debug)]
struct Container {
    cgroup: String,
    id: Option<String>,
    runtime: Option<&'static str>,
    pod_uid: Option<String>,
    unit: Option<String>,
}

fn container(
    cgroup: String,
    id: Option<&str>,
    runtime: Option<&'static str>,
    pod_uid: Option<&str>,
    unit: Option<String>,
) -> Container {
    Container {
        cgroup,
        id: id.map(str::to_owned),
        runtime,
        pod_uid: pod_uid.map(str::to_owned),
        unit,
    }
}

/// psycopg2 clients, one per layout, each inside its fake container holding one TCP
/// connection: the client's open and close name its process and container exactly, the
/// server side names the backend and no container.
fn clients_in_containers_are_attributed(layouts: Vec<Container>) {
    let pg = Postgres::start().expect("postgres");
    let tracer = Tracer::watching(&pg);
    let target = dsn("127.0.0.1", pg.port);

    let mut running = Vec::new();
    for layout in &layouts {
        let cg = FakeContainer::create(&layout.cgroup).expect("cgroup");
        let client = PyClient::start(&[conn_spec(&target, false)], Some(&cg)).expect("client");
        assert_eq!(
            cgroup2_of(client.pid()).as_deref(),
            Some(layout.cgroup.as_str()),
            "the client runs in its container"
        );
        let owner = Owner::of(client.pid(), "python3", layout.clone());
        assert_eq!(owner.exe, canonical(PYTHON), "{owner:?}");
        running.push((cg, client, owner));
    }
    let held: Vec<(u32, HeldConn)> = running
        .iter()
        .map(|(_, c, _)| (c.pid(), c.conns[0].clone()))
        .collect();
    let events = tracer
        .wait_for(WAIT, |evs| {
            held.iter().all(|(pid, conn)| {
                let client = Want::kind("open").pid(*pid).found_in(evs);
                let server = Want::kind("open").pid(conn.backend_pid).found_in(evs);
                client && server
            })
        })
        .expect("an open for every client and its backend");
    let events = conn_events(&events, pg.port);
    let dump = lines(&events);
    let mut failures = Vec::new();
    for (_, client, owner) in &running {
        let conn = &client.conns[0];
        let opens = Want::kind("open").pid(owner.pid).find(&events);
        assert_eq!(opens.len(), 1, "one open for pid {}: {dump}", owner.pid);
        let open = opens[0];
        eprintln!(
            "{} -> container_id {:?} runtime {:?} pod {:?} unit {:?}",
            owner.cgroup,
            open.container_id,
            open.container_runtime,
            open.pod_uid,
            open.systemd_unit
        );
        for m in owner.mismatches(open) {
            failures.push(format!("{} client open {m}", owner.cgroup));
        }
        assert_eq!(open.role, "client", "{open}");
        assert_eq!(open.transport, "tcp", "{open}");
        assert_eq!(open.local, conn.local, "{open}");
        assert_eq!(open.remote, format!("127.0.0.1:{}", pg.port), "{open}");
        assert_eq!(open.preexisting, Some(false), "{open}");

        let servers = Want::kind("open").pid(conn.backend_pid).find(&events);
        assert_eq!(servers.len(), 1, "one server open: {dump}");
        let server = servers[0];
        assert_eq!(server.role, "server", "{server}");
        assert_eq!(server.comm, "postgres", "{server}");
        assert_eq!(server.remote, conn.local, "{server}");
        assert!(
            server.in_no_container(),
            "Postgres is in no container: {server}"
        );
    }

    let pids: Vec<u32> = running.iter().map(|(_, c, _)| c.pid()).collect();
    let owners: Vec<Owner> = running.iter().map(|(_, _, o)| o.clone()).collect();
    let mut containers = Vec::new();
    for (cg, client, _) in running {
        client.close().expect("client closes");
        containers.push(cg);
    }
    let events = tracer
        .wait_for(WAIT, |evs| {
            pids.iter()
                .all(|pid| Want::kind("close").pid(*pid).found_in(evs))
        })
        .expect("a close for every client");
    for owner in &owners {
        let close = Want::kind("close").pid(owner.pid).find(&events)[0];
        for m in owner.mismatches(close) {
            failures.push(format!("{} client close {m}", owner.cgroup));
        }
    }
    // Inner directories first: layouts can share parents (kubepods.slice).
    while let Some(cg) = containers.pop() {
        drop(cg);
    }
    assert!(
        failures.is_empty(),
        "wrong attribution:\n{}\nevents:\n{dump}",
        failures.join("\n")
    );
}

/// `/usr/bin/psql` is Debian's `pg_wrapper` script, which execs the real binary in place.
fn psql_exe() -> String {
    postgres_bin_dir()
        .expect("postgres")
        .join("psql")
        .to_string_lossy()
        .into_owned()
}

fn canonical(path: &str) -> String {
    std::fs::canonicalize(path)
        .expect("canonicalize")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn clients_in_a_docker_container_and_a_kubernetes_pod_are_attributed() {
    if !require_root() {
        return;
    }
    let (docker, cri) = (random_hex(64), random_hex(64));
    let pod = random_pod_uid();
    let pod_ = pod.replace('-', "_");
    clients_in_containers_are_attributed(vec![
        container(
            format!("/system.slice/docker-{docker}.scope"),
            Some(&docker),
            Some("docker"),
            None,
            Some(format!("docker-{docker}.scope")),
        ),
        container(
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{cri}.scope"
            ),
            Some(&cri),
            Some("containerd"),
            Some(&pod),
            Some(format!("cri-containerd-{cri}.scope")),
        ),
    ]);
}

#[test]
fn every_runtime_cgroup_layout_is_recognised() {
    if !require_root() {
        return;
    }
    let id = || random_hex(64);
    let (a, b, c, d, e, f) = (id(), id(), id(), id(), id(), id());
    let (p1, p2, p3) = (random_pod_uid(), random_pod_uid(), random_pod_uid());
    let u = |p: &str| p.replace('-', "_");
    let service = format!("tracer-attr-{}.service", random_hex(8));
    clients_in_containers_are_attributed(vec![
        // Docker, cgroupfs driver.
        container(format!("/docker/{a}"), Some(&a), Some("docker"), None, None),
        // Kubernetes (systemd driver), Guaranteed QoS: the pod slice sits right under
        // kubepods.slice.
        container(
            format!(
                "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{b}.scope",
                u(&p1)
            ),
            Some(&b),
            Some("containerd"),
            Some(&p1),
            Some(format!("cri-containerd-{b}.scope")),
        ),
        // Kubernetes with CRI-O, BestEffort QoS.
        container(
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{c}.scope",
                u(&p2)
            ),
            Some(&c),
            Some("cri-o"),
            Some(&p2),
            Some(format!("crio-{c}.scope")),
        ),
        // Kubernetes, cgroupfs driver: the path does not name the runtime.
        container(
            format!("/kubepods/burstable/pod{p3}/{d}"),
            Some(&d),
            None,
            Some(&p3),
            None,
        ),
        // Podman, systemd driver and cgroupfs driver.
        container(
            format!("/machine.slice/libpod-{e}.scope"),
            Some(&e),
            Some("podman"),
            None,
            Some(format!("libpod-{e}.scope")),
        ),
        container(
            format!("/libpod_parent/libpod-{f}"),
            Some(&f),
            Some("podman"),
            None,
            None,
        ),
        // A systemd service, no container.
        container(
            format!("/system.slice/{service}"),
            None,
            None,
            None,
            Some(service.clone()),
        ),
    ]);
}

fn socket_path(pg: &Postgres) -> String {
    format!("{}/.s.PGSQL.{}", pg.socket_dir.display(), pg.port)
}

/// Waits until `tracer` has reported `closes` closes of Unix connections to `path`; the
/// failure names `what` and shows the daemon's stderr.
fn wait_for_unix_closes(tracer: &Tracer, path: &str, closes: usize, what: &str) {
    tracer
        .wait_for(WAIT, |evs| {
            Want::kind("close").remote(path).count(evs) >= closes
        })
        .unwrap_or_else(|e| panic!("{what}: {e:#}\ntracer stderr:\n{}", tracer.stderr()));
}

#[test]
fn psql_over_the_unix_socket_is_seen_on_both_roles() {
    let Some(pg) = root_postgres() else { return };
    let path = socket_path(&pg);
    let tracer = Tracer::watching(&pg);
    let host = pg.unix_host().to_owned();
    let (psql, backend) = psql_backend(pg.psql(&host, "select pg_backend_pid(), pg_sleep(0.3)"));
    wait_for_unix_closes(&tracer, &path, 2, "both ends close");
    std::thread::sleep(Duration::from_millis(1500));
    let events = path_events(&tracer.events(), &path);
    let dump = lines(&events);
    eprintln!("unix socket {path}: psql {psql}, backend {backend}\n{dump}");
    assert_eq!(events.len(), 4, "one open and one close per role: {dump}");
    for kind in ["open", "close"] {
        let client = Want::kind(kind).role("client").find(&events);
        let server = Want::kind(kind).role("server").find(&events);
        assert_eq!((client.len(), server.len()), (1, 1), "{kind}: {dump}");
        let (c, s) = (client[0], server[0]);
        for e in [c, s] {
            assert_eq!(e.transport, "unix", "{e}");
            assert_eq!(e.remote, path, "{e}");
        }
        assert_eq!(c.pid, psql, "{c}");
        assert_eq!(c.comm, "psql", "{c}");
        assert_eq!(c.exe, Some(psql_exe()), "{c}");
        let sql = "select pg_backend_pid(), pg_sleep(0.3)";
        assert_eq!(c.cmdline, Some(psql_cmdline(&host, pg.port, sql)), "{c}");
        assert_host_process(c, 0);
        assert_host_process(s, postgres_uid());
        // An unnamed client socket has no address of its own.
        assert_eq!(c.local, "", "{c}");
        assert_eq!(s.pid, backend, "the backend, not the postmaster: {s}");
        assert_eq!(s.comm, "postgres", "{s}");
        assert_eq!(s.local, path, "{s}");
    }
    let opens = Want::kind("open").find(&events);
    assert!(opens.iter().all(|e| e.preexisting == Some(false)), "{dump}");
    let closes = Want::kind("close").find(&events);
    assert_ne!(closes[0].conn_id, closes[1].conn_id, "{dump}");
    for close in closes {
        let open = Want::kind("open").find_where(&events, |e| e.role == close.role)[0];
        assert_eq!(open.conn_id, close.conn_id, "{dump}");
        assert!(close.duration_s.unwrap_or(0.0) >= 0.3, "{close}");
    }
}

#[test]
fn unix_connections_in_quick_succession_keep_their_own_byte_counts() {
    let Some(pg) = root_postgres() else { return };
    let path = socket_path(&pg);
    let tracer = Tracer::watching(&pg);
    let host = pg.unix_host().to_owned();
    // The same query each time: every connection moves the same bytes.
    let runs: Vec<(u32, u32)> = (0..10)
        .map(|_| psql_backend(pg.psql(&host, "select pg_backend_pid(), 1")))
        .collect();
    wait_for_unix_closes(&tracer, &path, 2 * runs.len(), "every end closes");
    let events = path_events(&tracer.events(), &path);
    let dump = lines(&events);
    let mut failures = Vec::new();
    let mut counts = Vec::new();
    for (psql, backend) in &runs {
        let client = Want::kind("close").pid(*psql).find(&events);
        let server = Want::kind("close").pid(*backend).find(&events);
        assert_eq!(
            (client.len(), server.len()),
            (1, 1),
            "{psql}/{backend}: {dump}"
        );
        let (c, s) = (client[0], server[0]);
        let sent = c.bytes_sent.unwrap_or(0);
        let received = c.bytes_received.unwrap_or(0);
        counts.push((sent, received, s.bytes_sent, s.bytes_received));
        if sent == 0 || received == 0 {
            failures.push(format!("psql {psql}: sent {sent}, received {received}"));
        }
        if c.bytes_sent != s.bytes_received || c.bytes_received != s.bytes_sent {
            failures.push(format!(
                "psql {psql} sent {sent} / received {received}, backend {backend} received {} / sent {}",
                s.bytes_received.unwrap_or(0), s.bytes_sent.unwrap_or(0)
            ));
        }
    }
    eprintln!("(client sent, client received, server sent, server received): {counts:?}");
    let first = counts[0];
    assert!(
        failures.is_empty() && counts.iter().all(|c| *c == first),
        "{}\n{dump}",
        failures.join("\n")
    );
}

/// Each round, a Unix stream socket that is not Postgres does I/O and closes, then a
/// psycopg2 connection over the Postgres socket opens right away in the same process (so
/// the kernel likely reuses the freed socket's memory), runs one query and closes. Prints
/// the client's pid.
const UNIX_CHURN_PY: &str = r#"
import os, socket, sys, time
import psycopg2
print(os.getpid(), flush=True)
for i in range(int(sys.argv[2])):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.send(b"x"); b.recv(1); b.send(b"y"); a.recv(1)
    a.close(); b.close()
    c = psycopg2.connect(sys.argv[1])
    c.cursor().execute("select 1")
    c.close()
    time.sleep(0.02)
"#;

#[test]
fn unix_connections_are_seen_while_other_unix_sockets_come_and_go() {
    let Some(pg) = root_postgres() else { return };
    let path = socket_path(&pg);
    let tracer = Tracer::watching(&pg);
    let rounds = 20;
    let out = run_ok(Command::new(PYTHON).args([
        "-c",
        UNIX_CHURN_PY,
        &dsn(&pg.socket_dir.to_string_lossy(), pg.port),
        &rounds.to_string(),
    ]))
    .expect("client");
    let pid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("pid");
    let seen = tracer.wait_for(WAIT, |evs| {
        Want::kind("open")
            .find_where(evs, |e| e.pid == pid && e.remote == path.as_str())
            .len()
            >= rounds
    });
    std::thread::sleep(Duration::from_millis(1500));
    let events = path_events(&tracer.events(), &path);
    let clients = Want::kind("open").role("client").count(&events);
    let servers = Want::kind("open").role("server").count(&events);
    eprintln!("{rounds} connections by pid {pid}: {clients} client opens, {servers} server opens");
    assert!(
        seen.is_ok() && clients == rounds && servers == rounds,
        "{rounds} connections, {clients} client and {servers} server opens:\n{}",
        lines(&events)
    );
}

#[test]
fn unix_socket_glob_decides_which_sockets_count() {
    let Some(pg) = root_postgres() else { return };
    let path = socket_path(&pg);
    let port = pg.port.to_string();
    // The exact path, and a glob that matches no socket of this cluster.
    let exact = Tracer::start(&["--port", &port, "--unix-socket-glob", &path]).expect("tracer");
    let elsewhere = Tracer::start(&[
        "--port",
        &port,
        "--unix-socket-glob",
        "/nonexistent-dir/*/.s.PGSQL.*",
    ])
    .expect("tracer");
    let host = pg.unix_host().to_owned();
    let (psql, _) = psql_backend(pg.psql(&host, "select pg_backend_pid()"));
    // TCP, which both watch: shows the second daemon is tracing at all.
    let (tcp_psql, _) = psql_backend(pg.psql("127.0.0.1", "select pg_backend_pid()"));
    for tracer in [&exact, &elsewhere] {
        tracer
            .wait_for(WAIT, |evs| {
                Want::kind("close").pid(tcp_psql).count(evs) == 1
            })
            .expect("the TCP connection is traced");
    }
    wait_for_unix_closes(&exact, &path, 2, "the exact glob matches the socket");
    // Unix closes are noticed on the daemon's 1 s tick: give the other one time to err.
    std::thread::sleep(Duration::from_millis(2500));
    let seen = path_events(&exact.events(), &path);
    let unseen: Vec<Event> = elsewhere
        .events()
        .into_iter()
        .filter(|e| e.transport == "unix" || e.pid == psql)
        .collect();
    eprintln!(
        "glob {path}: {} events; glob /nonexistent-dir/*: {} Unix events",
        seen.len(),
        unseen.len()
    );
    assert_eq!(seen.len(), 4, "{}", lines(&seen));
    assert!(
        Want::kind("open")
            .find_where(&seen, |e| e.role == "client" && e.pid == psql)
            .len()
            == 1,
        "{}",
        lines(&seen)
    );
    assert!(unseen.is_empty(), "not watched: {}", lines(&unseen));
}

/// As root: a network namespace, and a Postgres listening on loopback and on the
/// namespace's host-side address. The cluster stops before the namespace goes.
fn netns_pg() -> Option<(Postgres, NetNs)> {
    if !require_root() {
        return None;
    }
    let ns = NetNs::create().expect("network namespace");
    let pg = Postgres::start_listening(&format!("127.0.0.1,{}", ns.host_ip)).expect("postgres");
    Some((pg, ns))
}

#[test]
fn a_client_in_another_network_namespace_is_seen_and_attributed() {
    let Some((pg, ns)) = netns_pg() else { return };
    let tracer = Tracer::watching(&pg);
    // The shell prints its pid and execs psql under it.
    let mut cmd = ns.command("sh");
    cmd.args([
        "-c",
        "echo $$; exec psql -X -A -t -U postgres -d postgres -h \"$0\" -p \"$1\" \
         -c 'select pg_backend_pid(), inet_client_addr(), pg_sleep(0.3)'",
        &ns.host_ip,
        &pg.port.to_string(),
    ])
    .env("PGCONNECT_TIMEOUT", "10")
    .env("PGSSLMODE", "disable");
    let out = run_ok(&mut cmd).expect("psql in the namespace");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines_out = text.lines();
    let psql: u32 = lines_out.next().and_then(|l| l.parse().ok()).expect("pid");
    let row: Vec<&str> = lines_out.next().expect("row").split('|').collect();
    let backend: u32 = row[0].parse().expect("backend pid");
    assert_eq!(row[1], ns.ns_ip, "the client came from the namespace");

    tracer
        .wait_for(WAIT, |evs| {
            Want::kind("close")
                .find_where(evs, |e| e.pid == psql || e.pid == backend)
                .len()
                >= 2
        })
        .expect("both ends close");
    std::thread::sleep(Duration::from_millis(500));
    let events = conn_events(&tracer.events(), pg.port);
    let dump = lines(&events);
    eprintln!(
        "netns {}: psql {psql} at {} -> backend {backend} at {}\n{dump}",
        ns.name, ns.ns_ip, ns.host_ip
    );
    let remote = format!("{}:{}", ns.host_ip, pg.port);
    for kind in ["open", "close"] {
        let client = Want::kind(kind).role("client").find(&events);
        let server = Want::kind(kind).role("server").find(&events);
        assert_eq!((client.len(), server.len()), (1, 1), "{kind}: {dump}");
        let (c, s) = (client[0], server[0]);
        assert_eq!(c.pid, psql, "{c}");
        assert_eq!(c.comm, "psql", "{c}");
        assert_eq!(c.exe, Some(psql_exe()), "{c}");
        let sql = "select pg_backend_pid(), inet_client_addr(), pg_sleep(0.3)";
        assert_eq!(
            c.cmdline,
            Some(psql_cmdline(&ns.host_ip, pg.port, sql)),
            "{c}"
        );
        assert_host_process(c, 0);
        assert_host_process(s, postgres_uid());
        assert_eq!(c.remote, remote, "{c}");
        let local = c.local.as_str();
        assert!(
            local.starts_with(&format!("{}:", ns.ns_ip)),
            "the namespace's address: {c}"
        );
        assert_eq!(s.pid, backend, "{s}");
        assert_eq!(s.comm, "postgres", "{s}");
        assert_eq!(s.local, remote, "{s}");
        assert_eq!(s.remote, c.local, "{s}");
    }
    let close = Want::kind("close").role("client").find(&events)[0];
    assert!(close.bytes_sent.unwrap_or(0) > 0, "{close}");
    assert_eq!(
        close.bytes_sent,
        Want::kind("close").role("server").find(&events)[0].bytes_received,
        "{dump}"
    );
}

#[test]
fn a_client_in_another_network_namespace_connected_before_start_is_found() {
    let Some((pg, ns)) = netns_pg() else { return };
    let target = dsn(&ns.host_ip, pg.port);
    let holder = PyClient::start_with(
        &[conn_spec(&target, true), conn_spec(&target, false)],
        &mut ns.command(PYTHON),
    )
    .expect("psycopg2 in the namespace");
    let owner = Owner::of(holder.pid(), "python3", host_cgroup_of(holder.pid()));
    std::thread::sleep(Duration::from_secs(1));
    let tracer = Tracer::watching(&pg);
    let remote = format!("{}:{}", ns.host_ip, pg.port);
    let found = tracer.wait_for(Duration::from_secs(5), |evs| {
        Want::kind("open").role("client").count(evs) >= 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let events = conn_events(&tracer.events(), pg.port);
    let dump = lines(&events);
    eprintln!(
        "netns {}: {} connections held by {} before start; opens seen: {} client, {} server",
        ns.name,
        holder.conns.len(),
        holder.pid(),
        Want::kind("open").role("client").count(&events),
        Want::kind("open").role("server").count(&events)
    );
    let mut failures = Vec::new();
    for conn in &holder.conns {
        let client = Want::kind("open").find_where(&events, |e| {
            e.role == "client" && e.local == conn.local.as_str()
        });
        let server = Want::kind("open")
            .find_where(&events, |e| e.role == "server" && e.pid == conn.backend_pid);
        if client.len() != 1 {
            failures.push(format!("{} client opens of {}", client.len(), conn.local));
        }
        if server.len() != 1 {
            failures.push(format!("{} server opens of {}", server.len(), conn.local));
        }
        for e in client.iter().chain(&server) {
            if e.preexisting != Some(true) {
                failures.push(format!("not preexisting: {e}"));
            }
        }
        for e in &client {
            if e.remote != remote.as_str() {
                failures.push(format!("remote: {e}"));
            }
            failures.extend(owner.mismatches(e).into_iter().map(|m| format!("{m}: {e}")));
        }
        for e in &server {
            if e.remote != conn.local.as_str() || e.comm != "postgres" {
                failures.push(format!("server end: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty() && found.is_ok(),
        "{}\nevents:\n{dump}",
        failures.join("\n")
    );
    holder.close().expect("holder closes");
}

/// The opens, and how many there are, of each conn_id.
fn opens_by_conn_id(events: &[Event]) -> HashMap<String, Vec<&Event>> {
    let mut by_id: HashMap<String, Vec<&Event>> = HashMap::new();
    for e in Want::kind("open").find(events) {
        by_id.entry(e.conn_id.clone()).or_default().push(e);
    }
    by_id
}

/// The client-side and server-side opens of one held connection.
fn opens_of<'a>(
    events: &'a [&'a Event],
    conn: &HeldConn,
    client_pid: u32,
) -> (Vec<&'a Event>, Vec<&'a Event>) {
    let client = events
        .iter()
        .filter(|e| {
            e.role == "client"
                && e.pid == client_pid
                && if conn.local.is_empty() {
                    e.transport == "unix"
                } else {
                    e.local == conn.local
                }
        })
        .copied()
        .collect();
    let server = events
        .iter()
        .filter(|e| e.role == "server" && e.pid == conn.backend_pid)
        .copied()
        .collect();
    (client, server)
}

#[test]
fn connections_open_before_start_are_found_once_with_their_owners() {
    let Some(pg) = root_postgres() else { return };
    let path = socket_path(&pg);
    let sock = pg.unix_host().to_owned();
    let (v4, v6, unix) = (
        dsn("127.0.0.1", pg.port),
        dsn("::1", pg.port),
        dsn(&sock, pg.port),
    );
    // 20 connections: 8 over IPv4, 6 over IPv6, 6 over the Unix socket; every other one
    // left inside a transaction.
    let specs: Vec<Value> = (0..20)
        .map(|i| {
            let target = match i {
                0..8 => &v4,
                8..14 => &v6,
                _ => &unix,
            };
            conn_spec(target, i % 2 == 0)
        })
        .collect();
    let holder = PyClient::start(&specs, None).expect("holder");
    let holder_owner = Owner::of(holder.pid(), "python3", host_cgroup_of(holder.pid()));
    // Let them sit, so their ages are well above zero.
    std::thread::sleep(Duration::from_secs(3));

    // A second client keeps opening connections while the daemon starts.
    let mut racer = PyClient::start_racing(
        &[],
        &[v4.clone(), unix.clone()],
        Duration::from_millis(10),
        250,
    )
    .expect("racer");
    racer.wait_for_conns(3).expect("racing");
    let spawned_at = wall_now();
    let tracer = Tracer::watching(&pg);
    // And goes on a little after it is ready.
    std::thread::sleep(Duration::from_millis(600));
    racer.stop_racing().expect("racer stops");
    let racer_pid = racer.pid();

    let total = holder.conns.len() + racer.conns.len();
    let all = tracer
        .wait_for(WAIT, |evs| {
            let ours = path_events(evs, &path).len() + conn_events(evs, pg.port).len();
            ours >= 2 * total
        })
        .expect("an open per end of every connection");
    // Anything late (a duplicate) has time to arrive.
    std::thread::sleep(Duration::from_millis(2500));
    let all = {
        let later = tracer.events();
        assert!(later.len() >= all.len());
        later
    };
    let ready_ts = all
        .iter()
        .find(|e| e.kind == "ready")
        .and_then(|e| ts_secs(&e.ts))
        .expect("ready ts");
    let mut ours = conn_events(&all, pg.port);
    ours.extend(path_events(&all, &path));
    let dump = lines(&ours);
    let opens = Want::kind("open").find(&ours);

    // No connection is reported twice, whichever way it was found.
    let dups: Vec<_> = opens_by_conn_id(&ours)
        .into_iter()
        .filter(|(_, v)| v.len() > 1)
        .collect();
    assert!(dups.is_empty(), "duplicate opens: {dups:?}");
    assert_eq!(
        opens.len(),
        2 * total,
        "one open per end of each of {total} connections: {dump}"
    );

    let mut failures = Vec::new();
    let mut ages = Vec::new();
    for conn in &holder.conns {
        let (client, server) = opens_of(&opens, conn, holder.pid());
        let expect_clients = if conn.local.is_empty() { 6 } else { 1 };
        assert_eq!(
            client.len(),
            expect_clients,
            "client open of {conn:?}: {dump}"
        );
        assert_eq!(server.len(), 1, "server open of {conn:?}: {dump}");
        for e in client.iter().take(1).chain(&server) {
            let true_age = ts_secs(&e.ts).expect("ts") - conn.t_start;
            let age = e.age_s.unwrap_or(-1.0);
            ages.push(age);
            if e.preexisting != Some(true) {
                failures.push(format!("not preexisting: {e}"));
            }
            if !(0.0..=true_age + 0.01).contains(&age) {
                failures.push(format!("age_s {age} not in [0, {true_age:.3}]: {e}"));
            }
            // TCP knows when data last moved: at least the quiet time before the start.
            let quiet = spawned_at - conn.t_end - 0.5;
            if e.transport == "tcp" && age < quiet {
                failures.push(format!(
                    "age_s {age} below the {quiet:.1} s it sat idle: {e}"
                ));
            }
        }
        for m in holder_owner.mismatches(client[0]) {
            failures.push(format!("holder's connection {}: {m}", conn.local));
        }
        if server[0].comm != "postgres" {
            failures.push(format!("server comm: {}", server[0]));
        }
    }
    let (mut before, mut during, mut after) = (0, 0, 0);
    for conn in &racer.conns {
        let (client, server) = opens_of(&opens, conn, racer_pid);
        let client: Vec<_> = if conn.local.is_empty() {
            // Unix client sockets are unnamed: pair through the server side's timing is not
            // possible, so count them below.
            Vec::new()
        } else {
            client
        };
        assert_eq!(server.len(), 1, "server open of racing {conn:?}: {dump}");
        let mut ends = client.clone();
        ends.extend(&server);
        for e in ends {
            let pre = e.preexisting == Some(true);
            if conn.t_end < spawned_at {
                before += 1;
                if !pre {
                    failures.push(format!("opened before the daemon, not preexisting: {e}"));
                }
            } else if conn.t_start > ready_ts {
                after += 1;
                if pre {
                    failures.push(format!("opened after ready, preexisting: {e}"));
                }
            } else {
                during += 1;
            }
        }
    }
    let racer_unix = racer.conns.iter().filter(|c| c.local.is_empty()).count();
    let racer_unix_clients = Want::kind("open")
        .find_where(&ours, |e| e.pid == racer_pid && e.transport == "unix")
        .len();
    assert_eq!(racer_unix_clients, racer_unix, "{dump}");
    let racer_clients = Want::kind("open").pid(racer_pid).count(&ours);
    assert_eq!(racer_clients, racer.conns.len(), "{dump}");
    eprintln!(
        "preexisting: {} held by {}, ages {:.2}..{:.2} s; racing: {} ({} ends before start, {} \
         during, {} after ready)",
        holder.conns.len(),
        holder.pid(),
        ages.iter().copied().fold(f64::INFINITY, f64::min),
        ages.iter().copied().fold(0.0, f64::max),
        racer.conns.len(),
        before,
        during,
        after
    );
    assert!(
        failures.is_empty(),
        "{}\nevents:\n{dump}",
        failures.join("\n")
    );
    holder.close().expect("holder closes");
    racer.close().expect("racer closes");
    // Every connection closes exactly once, under the conn_id it opened with.
    tracer
        .wait_for(WAIT, |evs| {
            let mut o = conn_events(evs, pg.port);
            o.extend(path_events(evs, &path));
            Want::kind("close").count(&o) >= 2 * total
        })
        .expect("every connection closes");
    std::thread::sleep(Duration::from_millis(1500));
    let mut ours = conn_events(&tracer.events(), pg.port);
    ours.extend(path_events(&tracer.events(), &path));
    let opened: BTreeSet<&str> = Want::kind("open").conn_ids_in(&ours).collect();
    let closed: Vec<&str> = Want::kind("close").conn_ids_in(&ours).collect();
    assert_eq!(closed.len(), opened.len(), "{}", lines(&ours));
    assert_eq!(
        closed.iter().copied().collect::<BTreeSet<_>>(),
        opened,
        "{}",
        lines(&ours)
    );
}

/// What the daemon must say of a process of this host that is in no container (the test,
/// and what it starts outside a fake container): its cgroup v2 path, or when that is the
/// root, the v1 systemd hierarchy's path; the unit when that path ends in a service.
fn host_cgroup_of(pid: u32) -> Container {
    let v2 = cgroup2_of(pid).expect("cgroup");
    let path = if v2 == "/" {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .expect("cgroup")
            .lines()
            .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p.to_owned()))
            .unwrap_or(v2)
    } else {
        v2
    };
    let unit = path
        .rsplit('/')
        .next()
        .filter(|u| u.ends_with(".service"))
        .map(str::to_owned);
    container(path, None, None, None, unit)
}

/// The command line psql runs under (`pg_wrapper` execs the real binary with its arguments),
/// as events show it: the SQL after `-c` is hidden (events never carry query text).
fn psql_cmdline(host: &str, port: u16, sql: &str) -> String {
    assert!(!sql.is_empty());
    format!(
        "{} -X -A -t -U postgres -d postgres -h {host} -p {port} -c <sql>",
        psql_exe()
    )
}

fn postgres_uid() -> u32 {
    let out = run_ok(Command::new("id").args(["-u", "postgres"])).expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("uid")
}

/// A process of this host, started from the test (in its cgroups, in no container).
fn assert_host_process(e: &Event, uid: u32) {
    let here = host_cgroup_of(std::process::id());
    assert_eq!(e.uid, uid, "{e}");
    assert_eq!(e.cgroup, Some(here.cgroup), "{e}");
    assert_eq!(e.systemd_unit, here.unit, "{e}");
    assert!(e.in_no_container(), "{e}");
}

/// `(role, local, remote, pid, cookie)` of one connection end.
type End = (&'static str, String, String, u32, Option<u64>);

/// The lowest pid in an `ss -p` users column.
fn ss_pid(line: &str) -> Option<u32> {
    line.split("pid=")
        .skip(1)
        .filter_map(|s| {
            s.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u32>()
                .ok()
        })
        .min()
}

fn ss_tcp(port: u16) -> BTreeSet<End> {
    let out = run_ok(Command::new("ss").args(["-tnpeH", "state", "established"])).expect("ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let port_of = |a: &str| a.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // With a state filter ss leaves the state column out.
            let (local, remote) = (f.get(2)?.to_string(), f.get(3)?.to_string());
            let role = if port_of(&remote) == Some(port) {
                "client"
            } else if port_of(&local) == Some(port) {
                "server"
            } else {
                return None;
            };
            let cookie = l
                .split(" sk:")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            Some((role, local, remote, ss_pid(l)?, cookie))
        })
        .collect()
}

/// Unix ends on `path`: `ss -x` names the path on the server end only; a client end is the
/// one whose peer is a server end.
fn ss_unix(path: &str) -> BTreeMap<(&'static str, u32), usize> {
    let out = run_ok(Command::new("ss").args(["-xpH"])).expect("ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<(Vec<&str>, &str)> = text
        .lines()
        .map(|l| (l.split_whitespace().collect::<Vec<_>>(), l))
        .filter(|(f, _)| f.len() >= 8 && f[0] == "u_str" && f[1] == "ESTAB")
        .collect();
    let servers: BTreeSet<&str> = rows
        .iter()
        .filter(|(f, _)| f[4] == path)
        .map(|(f, _)| f[5])
        .collect();
    let mut ends = BTreeMap::new();
    for (f, l) in &rows {
        let role = if f[4] == path {
            "server"
        } else if servers.contains(f[7]) {
            "client"
        } else {
            continue;
        };
        if let Some(pid) = ss_pid(l) {
            *ends.entry((role, pid)).or_insert(0) += 1;
        }
    }
    ends
}

/// `tracer list` from the socket tables (never a daemon that may be listening).
fn tracer_list(args: &[&str]) -> String {
    let out = run_ok(
        Command::new(tracer_bin())
            .args(["list", "--metrics-addr", "off"])
            .args(args),
    )
    .expect("tracer list");
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn list_json_agrees_with_ss_on_the_same_connections() {
    let Some(pg) = root_postgres() else { return };
    let path = socket_path(&pg);
    let sock = pg.unix_host().to_owned();
    let id = random_hex(64);
    let cg = FakeContainer::create(&format!("/system.slice/docker-{id}.scope")).expect("cgroup");
    let mut specs = Vec::new();
    for i in 0..4 {
        specs.push(conn_spec(&dsn("127.0.0.1", pg.port), i % 2 == 0));
    }
    for i in 0..2 {
        specs.push(conn_spec(&dsn("::1", pg.port), i % 2 == 0));
    }
    for i in 0..3 {
        specs.push(conn_spec(&dsn(&sock, pg.port), i % 2 == 0));
    }
    let holder = PyClient::start(&specs, Some(&cg)).expect("holder");
    let port = pg.port.to_string();

    // The connections are held steady: the three views are of the same moment.
    let json_before = tracer_list(&["--json", "--port", &port]);
    let tcp = ss_tcp(pg.port);
    let unix = ss_unix(&path);
    let json_after = tracer_list(&["--json", "--port", &port]);
    let table = tracer_list(&["--port", &port]);
    let listed: Vec<Event> = json_before
        .lines()
        .map(|l| Event::parse(l).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let is_ours = |c: &Event| {
        c.remote == path.as_str()
            || [&c.local, &c.remote]
                .iter()
                .any(|a| tests::port_of(a) == Some(pg.port))
    };
    let ours: Vec<&Event> = listed.iter().filter(|c| is_ours(c)).collect();
    eprintln!(
        "tracer list: {} connections ({} ours); ss: {} TCP ends, {} Unix ends",
        listed.len(),
        ours.len(),
        tcp.len(),
        unix.values().sum::<usize>()
    );
    for c in &ours {
        eprintln!(
            "  {} {} {} {:>22} -> {:<22} pid {} {} {}",
            c.conn_id,
            c.role,
            c.transport,
            c.local,
            c.remote,
            c.pid,
            c.comm,
            c.container_id.as_deref().unwrap_or("-")
        );
    }
    let identity = |text: &str| -> BTreeSet<String> {
        text.lines()
            .map(|l| Event::parse(l).expect("json"))
            .filter(|c| is_ours(c))
            .map(|c| {
                format!(
                    "{} {} {} {} {}",
                    c.conn_id, c.role, c.local, c.remote, c.pid
                )
            })
            .collect()
    };
    assert_eq!(
        identity(&json_before),
        identity(&json_after),
        "the connections were steady"
    );

    let role = |c: &Event| -> &'static str {
        if c.role == "client" {
            "client"
        } else {
            "server"
        }
    };
    let list_tcp: BTreeSet<End> = ours
        .iter()
        .filter(|c| c.transport == "tcp")
        .map(|c| {
            (
                role(c),
                c.local.clone(),
                c.remote.clone(),
                c.pid,
                c.conn_id.parse().ok(),
            )
        })
        .collect();
    let mut list_unix: BTreeMap<(&'static str, u32), usize> = BTreeMap::new();
    for c in ours.iter().filter(|c| c.transport == "unix") {
        assert_eq!(c.remote, path, "{c}");
        *list_unix.entry((role(c), c.pid)).or_insert(0) += 1;
    }
    assert_eq!(
        tcp.len(),
        12,
        "ss sees both ends of 6 TCP connections: {tcp:?}"
    );
    assert_eq!(list_tcp, tcp, "tracer list vs ss -tnp");
    assert_eq!(unix.values().sum::<usize>(), 6, "ss -xp: {unix:?}");
    assert_eq!(list_unix, unix, "tracer list vs ss -xp");

    // The holder's ends name its process and container.
    let owner = Owner::of(
        holder.pid(),
        "python3",
        container(
            cg.path.clone(),
            Some(&id),
            Some("docker"),
            None,
            Some(format!("docker-{id}.scope")),
        ),
    );
    let mut failures = Vec::new();
    for c in ours.iter().filter(|c| c.role == "client") {
        failures.extend(owner.mismatches(c).into_iter().map(|m| format!("{c}: {m}")));
    }
    for c in ours.iter().filter(|c| c.role == "server") {
        if c.comm != "postgres" || c.container_id.is_some() {
            failures.push(format!("server end: {c}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The table: a header and one line per connection, each naming its pid.
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.contains(&path) || l.contains(&format!(":{}", pg.port)))
        .collect();
    assert!(table.starts_with("PID"), "{table}");
    assert_eq!(rows.len(), ours.len(), "{table}");
    for c in &ours {
        let pid = c.pid.to_string();
        assert!(
            rows.iter()
                .any(|r| r.split_whitespace().next() == Some(&pid)),
            "pid {pid} in the table:\n{table}"
        );
    }
    holder.close().expect("holder closes");
}

/// Connects with psycopg2 under the command name `argv[2]` and exits at once, before
/// anything could read its `/proc` entry at leisure.
const CONNECT_AND_EXIT_PY: &str = r#"
import ctypes, os, sys
import psycopg2
ctypes.CDLL(None).prctl(15, sys.argv[2].encode(), 0, 0, 0)  # PR_SET_NAME
psycopg2.connect(sys.argv[1])
os._exit(0)
"#;

#[test]
fn a_client_that_exits_right_after_connecting_keeps_its_comm() {
    let Some(pg) = root_postgres() else { return };
    let tracer = Tracer::watching(&pg);
    let target = dsn("127.0.0.1", pg.port);
    let mut clients = Vec::new();
    for i in 0..5 {
        let comm = format!("qexit{i}-{}", random_hex(6));
        let child = Command::new(PYTHON)
            .args(["-c", CONNECT_AND_EXIT_PY, &target, &comm])
            .spawn()
            .expect("python");
        let pid = child.id();
        let out = child.wait_with_output().expect("python");
        assert!(out.status.success(), "{out:?}");
        clients.push((pid, comm));
    }
    // Matched by their unique names: other tests on this host may force pid reuse.
    let events = tracer
        .wait_for(WAIT, |evs| {
            clients.iter().all(|(_, comm)| {
                !Want::kind("close")
                    .find_where(evs, |e| e.comm == comm.as_str())
                    .is_empty()
            })
        })
        .expect("an open and a close per client");
    let events = conn_events(&events, pg.port);
    let dump = lines(&events);
    for (pid, comm) in &clients {
        let mine: Vec<&Event> = events
            .iter()
            .filter(|e| e.role == "client" && (e.pid == *pid || e.comm == comm.as_str()))
            .collect();
        eprintln!(
            "pid {pid} {comm}: {:?}",
            mine.iter()
                .map(|e| format!("{} comm={}", e.kind, e.comm))
                .collect::<Vec<_>>()
        );
        assert_eq!(mine.len(), 2, "one open and one close of pid {pid}: {dump}");
        for e in &mine {
            assert_eq!(e.comm, comm.as_str(), "{e}");
            assert_eq!(e.pid, *pid, "{e}");
        }
        assert_eq!(mine[0].kind, "open", "{dump}");
        assert_eq!(mine[0].conn_id, mine[1].conn_id, "{dump}");
    }
}

#[test]
fn a_reused_pid_names_each_connection_s_own_process() {
    let Some(pg) = root_postgres() else { return };
    let tracer = Tracer::watching(&pg);
    let target = dsn("127.0.0.1", pg.port);
    let (a_id, b_id) = (random_hex(64), random_hex(64));
    let a_cg = FakeContainer::create(&format!("/system.slice/docker-{a_id}.scope")).expect("cg");
    let b_cg = FakeContainer::create(&format!("/system.slice/docker-{b_id}.scope")).expect("cg");
    // A pid well ahead of the allocator, so that both clients can be given it in turn.
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .expect("ns_last_pid")
        .trim()
        .parse()
        .expect("pid");
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("pid_max");
    let pid = 1000 + (last + 2000) % (max - 2000);

    let mut owners = Vec::new();
    for (comm, cg, id) in [("reuse-a", &a_cg, &a_id), ("reuse-b", &b_cg, &b_id)] {
        let client = PyClient::start_as(&[conn_spec(&target, false)], cg, comm, pid)
            .expect("client under the pid");
        let owner = Owner::of(
            pid,
            comm,
            container(
                cg.path.clone(),
                Some(id),
                Some("docker"),
                None,
                Some(format!("docker-{id}.scope")),
            ),
        );
        let seen = |kind: &str| {
            let found = |evs: &[Event]| {
                !Want::kind(kind)
                    .find_where(evs, |e| e.pid == pid && e.comm == comm)
                    .is_empty()
            };
            tracer.wait_for(WAIT, found).expect(kind);
        };
        seen("open");
        client.close().expect("close");
        seen("close");
        owners.push(owner);
    }
    std::thread::sleep(Duration::from_millis(500));
    let events = conn_events(&tracer.events(), pg.port);
    let dump = lines(&events);
    let mine: Vec<&Event> = events
        .iter()
        .filter(|e| e.role == "client" && e.pid == pid)
        .collect();
    eprintln!(
        "pid {pid} reused: {:?}",
        mine.iter()
            .map(|e| format!(
                "{} conn {} comm {} container {}",
                e.kind,
                e.conn_id,
                e.comm,
                e.container_id.as_deref().unwrap_or("-")
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(mine.len(), 4, "open and close of each: {dump}");
    let kinds: Vec<&str> = mine.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["open", "close", "open", "close"], "{dump}");
    assert_eq!(mine[0].conn_id, mine[1].conn_id, "{dump}");
    assert_eq!(mine[2].conn_id, mine[3].conn_id, "{dump}");
    assert_ne!(mine[0].conn_id, mine[2].conn_id, "{dump}");
    let mut failures = Vec::new();
    for (i, e) in mine.iter().enumerate() {
        let owner = &owners[i / 2];
        for m in owner.mismatches(e) {
            failures.push(format!("{} {}: {m}", owner.comm, e.kind));
        }
    }
    assert!(failures.is_empty(), "{}\n{dump}", failures.join("\n"));
}

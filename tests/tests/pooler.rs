//! Who holds the pool: a real PgBouncer in front of a real Postgres, its admin console
//! (`SHOW SERVERS.link` = `SHOW CLIENTS.ptr`, `remote_pid`) and `pg_stat_activity` as the
//! oracles for the tracer's `linked`, `peer_conn_id` and `backend_pid`, in the incident (a
//! worker holds every server connection idle in a transaction while another client queues)
//! and under load.
use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tests::{
    Event, Postgres, TempDir, Tracer,
    clients::{Client, ClientKind, ClientOptions, DockerCgroup, Pgbench, Target},
    free_port,
    hosts::{PYTHON, ts_secs},
    lines,
    load::metric_sum,
    pgbouncer::{Options, PgBouncer},
    port_of,
    prom::http_get,
    root_postgres, run_ok,
};

const POOL: u32 = 3;

fn port_str(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

/// The client port each server connection (by its local port) is linked to, per the
/// admin console of every PgBouncer process.
fn oracle_links(bouncers: &[PgBouncer]) -> HashMap<u16, u16> {
    let mut links = HashMap::new();
    for b in bouncers {
        let servers = b.show("SERVERS").expect("SHOW SERVERS");
        let clients = b.show("CLIENTS").expect("SHOW CLIENTS");
        let port_of_ptr: HashMap<&str, u16> = clients
            .iter()
            .filter_map(|c| Some((c.get("ptr")?.as_str(), c.get("port")?.parse().ok()?)))
            .collect();
        for s in &servers {
            let (Some(link), Some(local)) = (s.get("link"), s.get("local_port")) else {
                continue;
            };
            if let (Some(&client), Ok(local)) = (port_of_ptr.get(link.as_str()), local.parse()) {
                links.insert(local, client);
            }
        }
    }
    links
}

fn pg_pids(pg: &Postgres, sql: &str) -> BTreeSet<u32> {
    let out = run_ok(&mut pg.psql("127.0.0.1", sql)).expect("psql");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The incident: a worker in a container holds every server connection of the pool idle in
/// a transaction; another client queues behind it (`queued`: one PgBouncer only, as with two
/// `so_reuseport` processes the kernel picks the process the client lands on).
fn incident(pool_mode: &'static str, processes: usize) {
    let Some(pg) = root_postgres() else { return };
    let shared = (processes > 1).then(|| free_port().expect("port"));
    let bouncers: Vec<PgBouncer> = (0..processes)
        .map(|_| {
            PgBouncer::start_with(
                &pg,
                &Options {
                    pool_size: POOL,
                    pool_mode,
                    reuseport: shared,
                },
            )
            .expect("pgbouncer")
        })
        .collect();
    let bouncer_port = bouncers[0].port;
    let bouncer_pids: BTreeSet<u32> = bouncers.iter().map(PgBouncer::pid).collect();
    let metrics_addr = format!("127.0.0.1:{}", free_port().expect("port"));
    let tracer = Tracer::start(&[
        "--port",
        &format!("{},{bouncer_port}", pg.port),
        "--idle-in-transaction-after",
        "2s",
        "--stall-after",
        "2s",
        "--metrics-addr",
        &metrics_addr,
    ])
    .expect("tracer");

    let direct = Client::start(
        ClientKind::Psycopg2,
        &Target::tcp(pg.port),
        &ClientOptions {
            in_transaction: false,
            ..ClientOptions::default()
        },
    )
    .expect("direct client");
    let direct_backend = direct.backend_pids[0];
    let direct_pid = direct.pid();

    let cgroup = DockerCgroup::create().expect("cgroup");
    let worker = Client::start(
        ClientKind::Psycopg2,
        &Target::tcp(bouncer_port),
        &ClientOptions {
            connections: POOL as usize,
            in_transaction: true,
            cgroup: Some(cgroup.path.clone()),
            tls: false,
        },
    )
    .expect("worker");
    let worker_pid = worker.pid();
    // The queued client: its query waits in PgBouncer for a server connection.
    let queued: Option<Child> = (processes == 1).then(|| {
        bouncers[0]
            .psql("select 1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("queued psql")
    });
    let queued_pid = queued.as_ref().map(Child::id);

    let leaks_of = |evs: &[Event], pid: u32| -> Vec<Event> {
        evs.iter()
            .filter(|e| {
                e.kind == "leak"
                    && e.pid == pid
                    && e.reason.as_deref() == Some("idle_in_transaction")
            })
            .cloned()
            .collect()
    };
    let events = tracer
        .wait_for(Duration::from_secs(20), |evs| {
            leaks_of(evs, worker_pid).len() >= POOL as usize
                && bouncer_pids
                    .iter()
                    .map(|&p| {
                        leaks_of(evs, p)
                            .iter()
                            .filter(|e| e.role == "client")
                            .count()
                    })
                    .sum::<usize>()
                    >= POOL as usize
                && queued_pid.is_none_or(|q| evs.iter().any(|e| e.kind == "stall" && e.pid == q))
        })
        .unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", tracer.stderr()));

    // Real pooled events, `linked` objects included, match the published schema.
    for e in &events {
        if let Err(err) = tests::schema::validate_event(&e.json()) {
            panic!("{err}: {e}");
        }
    }

    // The oracles, while everything still holds.
    let links = oracle_links(&bouncers);
    assert_eq!(links.len(), POOL as usize, "SHOW SERVERS links: {links:?}");
    let idle_in_tx = pg_pids(
        &pg,
        "select pid from pg_stat_activity where state = 'idle in transaction'",
    );
    assert_eq!(idle_in_tx.len(), POOL as usize, "{idle_in_tx:?}");

    // PgBouncer's connections to Postgres: each names the worker and the client port.
    let server_leaks: Vec<Event> = bouncer_pids
        .iter()
        .flat_map(|&p| leaks_of(&events, p))
        .filter(|e| e.role == "client")
        .collect();
    assert_eq!(
        server_leaks.len(),
        POOL as usize,
        "{}",
        lines(&server_leaks)
    );
    eprintln!(
        "a server connection leak: {}\noracle links: {links:?}",
        server_leaks[0]
    );
    for leak in &server_leaks {
        let local = port_of(&leak.local).expect("local port");
        let linked = leak.linked.as_ref().expect("linked");
        assert_eq!(linked.pid, Some(worker_pid), "{leak}");
        assert_eq!(linked.comm.as_deref(), Some("python3"), "{leak}");
        assert_eq!(
            linked.container_id.as_deref(),
            Some(cgroup.id.as_str()),
            "{leak}"
        );
        let remote = port_str(&linked.remote);
        assert_eq!(
            remote,
            links.get(&local).copied(),
            "{leak}\noracle {links:?}"
        );
        assert!(
            idle_in_tx.contains(&(leak.backend_pid.unwrap_or(0))),
            "{leak}"
        );
    }
    // The worker's own leaks pin the backends Postgres shows idle in transaction.
    let pinned: BTreeSet<u32> = leaks_of(&events, worker_pid)
        .iter()
        .map(|e| e.linked.as_ref().and_then(|l| l.backend_pid).unwrap_or(0))
        .collect();
    assert_eq!(
        pinned,
        idle_in_tx,
        "{}",
        lines(&leaks_of(&events, worker_pid))
    );
    for leak in leaks_of(&events, worker_pid) {
        assert!(
            leak.backend_pid.is_none(),
            "a pooler's key is no backend: {leak}"
        );
    }
    // Every backend's connection has PgBouncer's end as its peer.
    let server_ids: BTreeSet<String> = server_leaks.iter().map(|e| e.conn_id.clone()).collect();
    for pid in &idle_in_tx {
        let leak = leaks_of(&events, *pid);
        assert!(
            !leak.is_empty(),
            "no leak for backend {pid}:\n{}",
            lines(&events)
        );
        let peer = leak[0].peer_conn_id.clone().unwrap_or_default();
        assert!(server_ids.contains(&peer), "{}", leak[0]);
    }
    // The queued client's stalls: no server connection.
    if let Some(q) = queued_pid {
        for stall in events.iter().filter(|e| e.kind == "stall" && e.pid == q) {
            assert!(stall.linked.is_none(), "{stall}");
        }
    }
    // The metric: the worker holds 3 of the pooler's server connections in a transaction.
    let container = &cgroup.id[..12];
    let metrics = http_get(&metrics_addr, "/metrics", Duration::from_secs(5)).expect("metrics");
    let held = metric_sum(
        &metrics.body,
        "pgconn_pooler_server_connections",
        &[
            "comm=\"pgbouncer\"",
            "client_comm=\"python3\"",
            &format!("client_container=\"{container}\""),
            "client_ip=\"127.0.0.1\"",
            "state=\"idle_in_transaction\"",
        ],
    );
    assert_eq!(held, f64::from(POOL));

    // A direct client's backend_pid is the pid its server announced.
    direct.stop().expect("direct stop");
    let events = tracer
        .wait_for(Duration::from_secs(10), |evs| {
            evs.iter()
                .any(|e| e.kind == "close" && e.pid == direct_pid && e.role == "client")
        })
        .expect("direct close");
    let close = events
        .iter()
        .find(|e| e.kind == "close" && e.pid == direct_pid && e.role == "client")
        .expect("close");
    assert_eq!(close.backend_pid, Some(direct_backend), "{close}");
    assert!(close.linked.is_none(), "{close}");
    let peer = close.peer_conn_id.as_deref().expect("peer_conn_id");
    assert!(
        events
            .iter()
            .any(|e| e.conn_id == peer && e.pid == direct_backend),
        "peer {peer} is not the backend {direct_backend}"
    );
    drop(worker);
    if let Some(mut q) = queued {
        let _ = q.kill();
        let _ = q.wait();
    }
}

#[test]
fn transaction_pooling_names_the_client_behind_every_server_connection() {
    incident("transaction", 1);
}

#[test]
fn session_pooling_names_the_client_behind_every_server_connection() {
    incident("session", 1);
}

#[test]
fn two_reuseport_poolers_name_the_client_behind_every_server_connection() {
    incident("transaction", 2);
}

/// Samples both admin views every 0.5 s (one connection to the console), printing one JSON
/// line per sample with the wall-clock time around it.
const SAMPLER_PY: &str = r#"
import json, sys, time
import psycopg2
conn = psycopg2.connect(host=sys.argv[1], port=int(sys.argv[2]), user="postgres", dbname="pgbouncer")
conn.autocommit = True
cur = conn.cursor()
end = time.time() + float(sys.argv[3])
def rows(sql):
    cur.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]
while time.time() < end:
    clients = {c["ptr"]: c["port"] for c in rows("SHOW CLIENTS")}
    t0 = time.time()
    servers = rows("SHOW SERVERS")
    t1 = time.time()
    links = {str(s["local_port"]): clients.get(s["link"]) for s in servers}
    print(json.dumps({"t0": t0, "t1": t1, "links": links}), flush=True)
    time.sleep(0.5)
"#;

/// The tracer's link history per server connection local port: `(time, client port)`.
fn link_history(stderr: &str) -> HashMap<u16, Vec<(f64, Option<u16>)>> {
    let mut history: HashMap<u16, Vec<(f64, Option<u16>)>> = HashMap::new();
    for line in stderr.lines() {
        let Some(rest) = line.split_once("link ts=").map(|(_, r)| r) else {
            continue;
        };
        let field = |name: &str| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        let ts = rest.split_whitespace().next().unwrap_or_default();
        let Some(t) = ts_secs(ts) else {
            continue;
        };
        let Some(local) = field("server_local=").as_deref().and_then(port_str) else {
            continue;
        };
        let client = field("client_remote=").as_deref().and_then(port_str);
        history.entry(local).or_default().push((t, client));
    }
    history
}

/// Under load (pgbench -c 20 through a pool of 5, transaction pooling), the tracer's links
/// agree with `SHOW SERVERS` sampled every 0.5 s for at least 99% of the linked server
/// connections; each sample counts if the tracer's link at some instant of the admin query
/// is the one PgBouncer reports.
#[test]
fn links_agree_with_show_servers_under_load() {
    let Some(pg) = root_postgres() else { return };
    let bouncer = PgBouncer::start_with(
        &pg,
        &Options {
            pool_size: 5,
            pool_mode: "transaction",
            reuseport: None,
        },
    )
    .expect("pgbouncer");
    Pgbench::init(&Target::tcp(pg.port), 1).expect("pgbench -i");
    let tracer = Tracer::start(&[
        "--port",
        &format!("{},{}", pg.port, bouncer.port),
        "--log-level",
        "debug",
    ])
    .expect("tracer");
    let seconds = 30;
    let bench = Pgbench::start(
        &Target::tcp(bouncer.port),
        &["-n", "-c", "20", "-T", &seconds.to_string()],
    )
    .expect("pgbench");
    std::thread::sleep(Duration::from_secs(2));
    let dir = TempDir::new("sampler").expect("dir");
    let script = dir.0.join("sampler.py");
    std::fs::write(&script, SAMPLER_PY).expect("script");
    let mut sampler = Command::new(PYTHON)
        .arg(&script)
        .arg(&bouncer.socket_dir)
        .arg(bouncer.port.to_string())
        .arg((seconds - 5).to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sampler");
    let samples: Vec<serde_json::Value> = BufReader::new(sampler.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    let _ = sampler.wait();
    let report = bench.wait(Duration::from_secs(60)).expect("pgbench");
    // The last link records are in the log within a tick.
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let history = link_history(&tracer.stderr());
    let (mut linked, mut agree, mut stale) = (0usize, 0usize, 0usize);
    for sample in &samples {
        let (t0, t1) = (
            sample["t0"].as_f64().unwrap_or(0.0),
            sample["t1"].as_f64().unwrap_or(0.0),
        );
        let Some(links) = sample["links"].as_object() else {
            continue;
        };
        for (local, client) in links {
            let Ok(local) = local.parse::<u16>() else {
                continue;
            };
            let changes = history.get(&local).map(Vec::as_slice).unwrap_or(&[]);
            // The link at t0 and every one it took until t1.
            let mut states: Vec<Option<u16>> = vec![
                changes
                    .iter()
                    .rev()
                    .find(|(t, _)| *t <= t0)
                    .and_then(|(_, c)| *c),
            ];
            states.extend(
                changes
                    .iter()
                    .filter(|(t, _)| *t > t0 && *t <= t1)
                    .map(|(_, c)| *c),
            );
            let expected = client.as_u64().map(|p| p as u16);
            if expected.is_some() {
                linked += 1;
                agree += usize::from(states.contains(&expected));
            } else if states.iter().all(Option::is_some) {
                stale += 1;
            }
        }
    }
    let ratio = agree as f64 / linked.max(1) as f64;
    eprintln!(
        "links under load: {agree}/{linked} linked server connections agree ({:.2}%), {stale} \
         idle ones the tracer still showed linked, {} samples, {} link changes; pgbench: {}",
        ratio * 100.0,
        samples.len(),
        history.values().map(Vec::len).sum::<usize>(),
        report
            .lines()
            .filter(|l| l.contains("tps"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    let _ = started;
    assert!(samples.len() >= 30, "{} samples", samples.len());
    assert!(
        linked >= 50,
        "only {linked} linked server connections sampled"
    );
    assert!(ratio >= 0.99, "{agree}/{linked} agree");
}

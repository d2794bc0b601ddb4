//! What users consume: every real event matches the published schema, a real Prometheus
//! scrapes the daemon and answers PromQL, promtool accepts a real scrape, and a blocked event
//! reader costs counted events, never the metrics endpoint.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tests::{
    Event, TempDir, Tracer, Value,
    events::Want,
    free_port, lines,
    load::reset_on_close,
    prom::{Prometheus, http_get, promtool_check_metrics, sample_value},
    root_postgres, run_ok,
    schema::{EVENT_TYPES, validate_event},
    tracer_bin,
};

const WAIT: Duration = Duration::from_secs(20);

/// A psycopg2 session in `/usr/bin/python3` (comm `python3`), driven one SQL line at a time
/// over stdin; autocommit, so `BEGIN` / `COMMIT` are explicit.
struct PySession {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    pid: u32,
    backend_pid: u32,
}

const PY_SESSION: &str = r#"
import sys, psycopg2
conn = psycopg2.connect(host=sys.argv[1], port=int(sys.argv[2]), user='postgres',
                        dbname='postgres', sslmode='disable', connect_timeout=10)
conn.autocommit = True
cur = conn.cursor()
print('pid', conn.get_backend_pid(), flush=True)
for line in sys.stdin:
    sql = line.strip()
    if not sql:
        continue
    try:
        cur.execute(sql)
        print('ok', cur.fetchall() if cur.description else [], flush=True)
    except Exception as e:
        print('err', str(e).replace('\n', ' '), flush=True)
try:
    conn.close()
except Exception:
    pass
"#;

impl PySession {
    fn connect(host: &str, port: u16) -> Self {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", PY_SESSION, host, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn /usr/bin/python3 (psycopg2)");
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("python output");
        let backend_pid = line
            .strip_prefix("pid ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("psycopg2 did not connect: {line:?}"));
        Self {
            pid: child.id(),
            child,
            stdin,
            out,
            backend_pid,
        }
    }

    fn exec(&mut self, sql: &str) -> String {
        let stdin = self.stdin.as_mut().expect("session open");
        writeln!(stdin, "{sql}").expect("write to python");
        stdin.flush().expect("flush");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("python answer");
        assert!(line.starts_with("ok"), "{sql}: {line}");
        line
    }

    /// Ends the script (it closes the connection) and waits for it.
    fn close(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for PySession {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child killed on drop (background psql sessions).
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_quiet(cmd: &mut Command) -> Background {
    Background(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    )
}

#[test]
fn every_event_of_a_real_scenario_matches_the_schema() {
    let Some(pg) = root_postgres() else { return };
    let port = pg.port.to_string();
    // Open before the daemon: reported as preexisting.
    let pre = PySession::connect("127.0.0.1", pg.port);
    let tracer = Tracer::start(&[
        "--port",
        &port,
        "--stall-after",
        "1s",
        "--idle-in-transaction-after",
        "2s",
        "--close-wait-after",
        "2s",
    ])
    .expect("tracer");

    // A request that waits longer than stall_after.
    let mut stall = pg.psql_spawn("127.0.0.1", "select pg_sleep(2.5)");
    let stall_pid = stall.id();
    // Idle inside a transaction.
    let mut tx = PySession::connect("127.0.0.1", pg.port);
    tx.exec("BEGIN");
    tx.exec("select 1");
    // The server ends an idle client's session; the client holds its socket in CLOSE_WAIT.
    let victim = PySession::connect("127.0.0.1", pg.port);
    run_ok(&mut pg.psql(
        "127.0.0.1",
        &format!("select pg_terminate_backend({})", victim.backend_pid),
    ))
    .expect("pg_terminate_backend");
    let terminated = Instant::now();
    // Over the Unix socket, and over IPv6.
    run_ok(&mut pg.psql(pg.unix_host(), "select 1")).expect("psql over the Unix socket");
    run_ok(&mut pg.psql("::1", "select 1")).expect("psql over ::1");

    let (tx_pid, victim_pid) = (tx.pid, victim.pid);
    // The three episodes: their verdicts (`suffix` empty), or their ends (`_end`).
    let episodes = |evs: &[Event], suffix: &str| {
        let want = |kind: &str| Want::kind(&format!("{kind}{suffix}"));
        want("stall").pid(stall_pid).found_in(evs)
            && want("leak")
                .reason("idle_in_transaction")
                .pid(tx_pid)
                .found_in(evs)
            && want("leak")
                .reason("close_wait")
                .pid(victim_pid)
                .found_in(evs)
    };
    tracer
        .wait_for(WAIT, |evs| episodes(evs, ""))
        .expect("stall, idle-in-transaction and close-wait leaks");
    std::thread::sleep(Duration::from_secs(4).saturating_sub(terminated.elapsed()));
    tx.exec("COMMIT");
    victim.close();
    assert!(stall.wait().expect("psql").success());
    let pre_pid = pre.pid;
    pre.close();

    let events = tracer
        .wait_for(WAIT, |evs| {
            episodes(evs, "_end")
                && Want::kind("close").pid(pre_pid).found_in(evs)
                && evs
                    .iter()
                    .any(|e| e.kind == "close" && e.transport == "unix")
        })
        .expect("the ends of every episode");
    std::thread::sleep(Duration::from_millis(500));
    let events = {
        let later = tracer.events();
        if later.len() >= events.len() {
            later
        } else {
            events
        }
    };
    let dump = lines(&events);

    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    let mut invalid = Vec::new();
    for e in &events {
        *by_type.entry(e.kind.clone()).or_default() += 1;
        if let Err(msg) = validate_event(&e.json()) {
            invalid.push(msg);
        }
    }
    eprintln!(
        "{} events, by type {by_type:?}; {} invalid",
        events.len(),
        invalid.len()
    );
    assert!(
        invalid.is_empty(),
        "{} of {} events do not match the schema:\n{}",
        invalid.len(),
        events.len(),
        invalid.join("\n")
    );
    // Every type but `lost`: nothing is lost in this scenario.
    for kind in EVENT_TYPES.into_iter().filter(|&k| k != "lost") {
        assert!(by_type.contains_key(kind), "no {kind} event:\n{dump}");
    }
    let any = |f: &dyn Fn(&Event) -> bool| events.iter().any(f);
    assert!(
        any(&|e| Want::kind("open").pid(pre_pid).matches(e) && e.preexisting == Some(true)),
        "the connection opened before the daemon is an open with preexisting=true:\n{dump}"
    );
    assert!(
        any(&|e| e.kind == "open" && e.preexisting == Some(false)),
        "{dump}"
    );
    assert!(
        any(&|e| e.kind == "open" && e.transport == "unix" && e.role == "client"),
        "psql over the Unix socket:\n{dump}"
    );
    assert!(
        any(&|e| e.kind == "open" && e.remote == format!("[::1]:{port}")),
        "psql over ::1:\n{dump}"
    );
}

/// Waits for a PromQL query to return exactly one sample of value `want`; returns it.
fn one_sample(prom: &Prometheus, promql: &str, want: f64) -> Value {
    let result = prom
        .wait_for(promql, WAIT, |r| {
            r.len() == 1 && sample_value(&r[0]) == Some(want)
        })
        .unwrap_or_else(|e| panic!("{e:#}\nprometheus log:\n{}", prom.log()));
    eprintln!("{promql} => {}", result[0]);
    result[0].clone()
}

/// A daemon watching `pg`'s port with `flags`, serving metrics on a free port; and that
/// address.
fn serving_metrics(pg: &tests::Postgres, flags: &str) -> (Tracer, String) {
    let addr = format!("127.0.0.1:{}", free_port().expect("port"));
    let flags = format!("--port {} --metrics-addr {addr} {flags}", pg.port);
    (Tracer::run(&flags).expect("tracer"), addr)
}

#[test]
fn a_real_prometheus_scrapes_the_daemon_and_promql_finds_the_sessions() {
    let Some(pg) = root_postgres() else { return };
    let (tracer, metrics_addr) = serving_metrics(&pg, "--idle-in-transaction-after 2s");
    let health = http_get(&metrics_addr, "/healthz", Duration::from_secs(2)).expect("healthz");
    assert_eq!(health.status, 200, "/healthz after ready: {health:?}");

    let job = "pgconn-tracer";
    let prom = Prometheus::start(job, &metrics_addr).expect("prometheus");
    // A psql with a request in flight, and a python3 idle inside a transaction.
    let _psql = spawn_quiet(&mut pg.psql("127.0.0.1", "select pg_sleep(40)"));
    let mut leaky = PySession::connect("127.0.0.1", pg.port);
    leaky.exec("BEGIN");
    leaky.exec("select 1");

    let up = one_sample(&prom, &format!("up{{job=\"{job}\"}}"), 1.0);
    assert_eq!(up["metric"]["instance"], metrics_addr.as_str());
    let build = one_sample(&prom, "pgconn_tracer_build_info", 1.0);
    assert_eq!(build["metric"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(build["metric"]["job"], job);

    let remote = format!("127.0.0.1:{}", pg.port);
    let psql = one_sample(
        &prom,
        "pgconn_open_connections{comm=\"psql\",role=\"client\",state=\"active\"}",
        1.0,
    );
    assert_eq!(psql["metric"]["remote"], remote.as_str(), "{psql}");
    assert_eq!(psql["metric"]["container"], Value::Null, "{psql}");
    // Every state is exported, and the psql connection is in exactly one of them.
    let states = prom
        .query("pgconn_open_connections{comm=\"psql\",role=\"client\"}")
        .expect("query");
    assert_eq!(states.len(), 6, "{}", Value::Array(states.clone()));
    let total: f64 = states.iter().filter_map(sample_value).sum();
    assert_eq!(total, 1.0, "{}", Value::Array(states));

    let iit = one_sample(
        &prom,
        "pgconn_open_connections{comm=\"python3\",role=\"client\",state=\"idle_in_transaction\"}",
        1.0,
    );
    assert_eq!(iit["metric"]["remote"], remote.as_str(), "{iit}");
    let leak = one_sample(
        &prom,
        "pgconn_leak_suspected_connections{comm=\"python3\",role=\"client\",reason=\"idle_in_transaction\"}",
        1.0,
    );
    assert_eq!(leak["metric"]["remote"], remote.as_str(), "{leak}");
    // The same transaction seen from the backend's side.
    one_sample(
        &prom,
        "sum(pgconn_open_connections{comm=\"postgres\",role=\"server\",state=\"idle_in_transaction\"})",
        1.0,
    );
    // The alert's expression (by reason) finds exactly the leaky client.
    let suspects = prom
        .query(
            "sum by (role, comm, reason) (pgconn_leak_suspected_connections{role=\"client\"}) > 0",
        )
        .expect("query");
    assert_eq!(suspects.len(), 1, "{}", Value::Array(suspects.clone()));
    assert_eq!(suspects[0]["metric"]["comm"], "python3");

    // The transaction ends: the gauge follows.
    leaky.exec("COMMIT");
    one_sample(
        &prom,
        "pgconn_leak_suspected_connections{comm=\"python3\",role=\"client\",reason=\"idle_in_transaction\"}",
        0.0,
    );
    leaky.close();
    drop(tracer);
}

#[test]
fn promtool_finds_no_problem_in_a_real_scrape() {
    let Some(pg) = root_postgres() else { return };
    let (tracer, metrics_addr) =
        serving_metrics(&pg, "--stall-after 1s --idle-in-transaction-after 1s");
    let _held = spawn_quiet(&mut pg.psql("127.0.0.1", "select pg_sleep(30)"));
    let _held_v6 = spawn_quiet(&mut pg.psql("::1", "select pg_sleep(30)"));
    let mut leaky = PySession::connect(pg.unix_host(), pg.port);
    leaky.exec("BEGIN");
    leaky.exec("select 1");
    for host in ["127.0.0.1", "::1", pg.unix_host()] {
        run_ok(&mut pg.psql(host, "select 1")).expect("psql");
    }
    // Wait until the scrape holds open, closed, stalled and leaking connections.
    let deadline = Instant::now() + WAIT;
    let body = loop {
        let r = http_get(&metrics_addr, "/metrics", Duration::from_secs(2)).expect("/metrics");
        assert_eq!(r.status, 200, "{r:?}");
        let has = |prefix: &str| {
            r.body
                .lines()
                .any(|l| l.starts_with(prefix) && !l.ends_with(" 0"))
        };
        if has("pgconn_connections_closed_total{")
            && has("pgconn_stalled_connections{")
            && has("pgconn_leak_suspected_connections{")
            && has("pgconn_connection_duration_seconds_count{")
        {
            assert!(
                r.headers
                    .to_ascii_lowercase()
                    .contains("content-type: text/plain; version=0.0.4"),
                "{}",
                r.headers
            );
            break r.body;
        }
        assert!(
            Instant::now() < deadline,
            "scrape never showed the scenario:\n{}\nevents:\n{}",
            r.body,
            lines(&tracer.events())
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let samples = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    let (status, output) = promtool_check_metrics(&body).expect("promtool");
    eprintln!(
        "scrape: {} bytes, {samples} samples; promtool: {status}, {:?}",
        body.len(),
        output
    );
    assert!(
        status.success() && output.trim().is_empty(),
        "promtool check metrics: {status}\n{output}\nscrape:\n{body}"
    );
    leaky.close();
}

/// Connections per second of each of the two raw churn workers.
const CHURN_PER_SECOND: f64 = 1500.0;

const USER_QUEUE_LOST: &str = "pgconn_tracer_events_lost_total{where=\"user_queue\"}";

/// `comm state cpu-ticks` of each thread of `pid`.
fn threads(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .filter_map(|stat| {
            let (head, rest) = stat.rsplit_once(") ")?;
            let comm = head.split_once(" (")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(format!("[{comm} {} {ticks}]", f.first()?))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn a_blocked_event_reader_costs_counted_events_not_the_metrics_endpoint() {
    let Some(pg) = root_postgres() else { return };
    // A second "Postgres" port served by this test: connections to it cost no backend fork,
    // so the churn can outrun the daemon's event queue.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let fake_port = listener.local_addr().expect("addr").port();
    let metrics_addr = format!("127.0.0.1:{}", free_port().expect("port"));
    let dir = TempDir::new("blocked").expect("dir");
    let stderr = std::fs::File::create(dir.0.join("stderr")).expect("stderr file");
    let mut daemon = Background(
        Command::new(tracer_bin())
            .arg("run")
            .args(["--port", &format!("{},{fake_port}", pg.port)])
            .args(["--events", "-", "--metrics-addr", &metrics_addr])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn tracer"),
    );
    let daemon_stderr = || std::fs::read_to_string(dir.0.join("stderr")).unwrap_or_default();
    let get = |path: &str| http_get(&metrics_addr, path, Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get("/healthz").is_ok_and(|r| r.status == 200) {
        assert!(
            Instant::now() < deadline,
            "not ready in 30 s:\n{}",
            daemon_stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stdout = daemon.0.stdout.take().expect("stdout");

    // Churn: a tight connect/close loop on the fake port, and real psql / psycopg2 sessions.
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicU64::new(0));
    let acceptor = {
        let stop = stop.clone();
        listener.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        })
    };
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (stop, churned) = (stop.clone(), churned.clone());
        workers.push(std::thread::spawn(move || {
            // Paced, so the churn is heavy (4 events per connection) without starving the
            // machine: CHURN_PER_SECOND per worker.
            let started = Instant::now();
            let mut made = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if made as f64 > started.elapsed().as_secs_f64() * CHURN_PER_SECOND {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                if let Ok(s) = TcpStream::connect(("127.0.0.1", fake_port)) {
                    reset_on_close(&s);
                    made += 1;
                    churned.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    {
        let (stop, churned) = (stop.clone(), churned.clone());
        let mut psql = pg.psql("127.0.0.1", "select 1");
        let pg_port = pg.port;
        workers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if psql.output().is_ok_and(|o| o.status.success()) {
                    churned.fetch_add(1, Ordering::Relaxed);
                }
                let py = Command::new("/usr/bin/python3")
                    .args([
                        "-c",
                        "import sys, psycopg2; psycopg2.connect(host='127.0.0.1', port=int(sys.argv[1]), user='postgres', dbname='postgres', sslmode='disable').close()",
                        &pg_port.to_string(),
                    ])
                    .output();
                if py.is_ok_and(|o| o.status.success()) {
                    churned.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    // Ten seconds (longer if the churn has not overflowed the event queue yet, at most 40 s)
    // with nobody reading: /metrics answers within 1 s every second.
    let blocked_since = Instant::now();
    let mut scrapes = Vec::new();
    let mut queued_lost = 0.0;
    while blocked_since.elapsed() < Duration::from_secs(10)
        || (queued_lost == 0.0 && blocked_since.elapsed() < Duration::from_secs(40))
    {
        let t = Instant::now();
        let answer = get("/metrics");
        let took = t.elapsed();
        let at = blocked_since.elapsed();
        scrapes.push(match answer {
            Ok(r) if r.status == 200 && r.body.contains("pgconn_tracer_build_info") => {
                queued_lost = metric_value(&r.body, USER_QUEUE_LOST).unwrap_or(0.0);
                if took < Duration::from_secs(1) {
                    Ok(took)
                } else {
                    Err(format!("at {at:.1?}: answered after {took:?}"))
                }
            }
            Ok(r) => Err(format!("at {at:.1?}: HTTP {}", r.status)),
            Err(e) => Err(format!(
                "at {at:.1?}: {e:#} after {took:?}; daemon threads (comm state cpu-ticks): {}",
                threads(daemon.0.id())
            )),
        });
        std::thread::sleep(Duration::from_secs(1).saturating_sub(took));
    }
    let blocked_for = blocked_since.elapsed();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("churn worker");
    }
    acceptor.join().expect("acceptor");
    let connections = churned.load(Ordering::Relaxed);
    let slowest = scrapes.iter().flatten().max().copied();
    let failed: Vec<&String> = scrapes.iter().filter_map(|s| s.as_ref().err()).collect();
    eprintln!(
        "blocked {blocked_for:.1?}: {connections} connections churned, {} scrapes, {} failed, \
         slowest answer {slowest:?}, user_queue losses so far {queued_lost}",
        scrapes.len(),
        failed.len()
    );
    assert!(
        queued_lost > 0.0,
        "{connections} connections in {blocked_for:?} did not overflow the event queue \
         (the queue fills only if the daemon keeps handling records and reporting losses); \
         daemon threads (comm state cpu-ticks): {}; daemon log:\n{}",
        threads(daemon.0.id()),
        daemon_stderr()
    );
    // Checked at the end, so that one run reports every problem.
    let mut problems = Vec::new();
    if !failed.is_empty() {
        problems.push(format!(
            "GET /metrics did not answer within 1 s while the event reader was blocked: {failed:#?}"
        ));
    }

    // The reader returns.
    let reader_back = Instant::now();
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let bad_lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let reader = {
        let (events, bad_lines) = (events.clone(), bad_lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match Event::parse(&line) {
                    Ok(event) => events.lock().unwrap().push(event),
                    Err(e) => bad_lines.lock().unwrap().push(e),
                }
            }
        })
    };
    let lost_sum = |evs: &[Event]| -> u64 {
        evs.iter()
            .filter(|e| e.kind == "lost" && e.lost_where.as_deref() == Some("user_queue"))
            .filter_map(|e| e.count)
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while lost_sum(&events.lock().unwrap()) == 0 {
        assert!(
            Instant::now() < deadline,
            "no lost event with where=user_queue within 15 s of the reader's return; {} events \
             read, metric {queued_lost}; also: {problems:?}",
            events.lock().unwrap().len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "first user_queue lost event {:?} after the reader returned",
        reader_back.elapsed()
    );

    // Recovered: new connections are reported again.
    let mut pids = Vec::new();
    for _ in 0..3 {
        let child = pg.psql_spawn("127.0.0.1", "select 1");
        pids.push(child.id());
        assert!(child.wait_with_output().expect("psql").status.success());
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let evs = events.lock().unwrap().clone();
        let seen = |kind: &str, pid: u32| Want::kind(kind).pid(pid).found_in(&evs);
        if pids.iter().all(|&p| seen("open", p) && seen("close", p)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections after the reader returned are not reported (pids {pids:?}); last \
             events:\n{}\nalso: {problems:?}",
            lines(&evs[evs.len().saturating_sub(20)..])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Settle: one more tick reports whatever was still pending.
    std::thread::sleep(Duration::from_secs(3));
    let metric = metric_value(&get("/metrics").expect("/metrics").body, USER_QUEUE_LOST)
        .expect("pgconn_tracer_events_lost_total{where=\"user_queue\"} exported");
    let evs = events.lock().unwrap().clone();
    let lost_events: Vec<&Event> = Want::kind("lost").find(&evs);
    let summed = lost_sum(&evs);
    let invalid: Vec<String> = evs
        .iter()
        .filter_map(|e| validate_event(&e.json()).err())
        .collect();
    eprintln!(
        "after the reader returned: {} events read ({} invalid), {} lost events {:?}, \
         user_queue count sum {summed}, metric {metric}",
        evs.len(),
        invalid.len(),
        lost_events.len(),
        lost_events
            .iter()
            .map(|e| format!("{:?}={:?}", e.lost_where, e.count))
            .collect::<Vec<_>>()
    );
    assert!(
        bad_lines.lock().unwrap().is_empty(),
        "non-JSON lines on stdout: {:?}",
        &bad_lines.lock().unwrap()[..]
    );
    assert!(
        invalid.is_empty(),
        "events do not match the schema:\n{}",
        invalid[..invalid.len().min(5)].join("\n")
    );
    if metric != summed as f64 {
        problems.push(format!(
            "{USER_QUEUE_LOST} is {metric} but the user_queue lost events read add up to \
             {summed}: {} events were dropped without a trace in the event stream",
            metric - summed as f64
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let status = daemon.0.wait().expect("tracer exit");
    reader.join().expect("reader");
    assert!(
        status.success(),
        "tracer exit {status}:\n{}",
        daemon_stderr()
    );
}

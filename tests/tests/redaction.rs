//! Credentials on real command lines: clients that connect to the test Postgres with passwords
//! in their argv, as deployments start them (a URI, a libpq conninfo string, a Java system
//! property, secret flags, `PGPASSWORD=` given through `env`). None of the secrets may come
//! out of the daemon (events, logs) or `tracer list` (table and JSON), while the rest of each
//! command line does; `--cmdline off` emits none, `--cmdline full` all of it.
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tests::{
    Event, Postgres, Tracer, Value, events::Want, lines, root_postgres, schema::validate_event,
    tracer_bin,
};

const WAIT: Duration = Duration::from_secs(20);

/// Connects the way `argv[1]` says and stays connected until stdin closes. `dsn` connects
/// with `argv[2]` (a URI or a conninfo string, as applications pass them to libpq);
/// `hostport` with `argv[2]` / `argv[3]`, ignoring the rest of argv (the secrets an
/// application would read for other uses).
const CLIENT: &str = r#"
import sys, psycopg2
if sys.argv[1] == 'dsn':
    conn = psycopg2.connect(sys.argv[2], connect_timeout=10)
else:
    conn = psycopg2.connect(host=sys.argv[2], port=int(sys.argv[3]), user='postgres',
                            dbname='postgres', sslmode='disable', connect_timeout=10)
print('pid', conn.get_backend_pid(), flush=True)
sys.stdin.read()
"#;

/// A connected client process; killed on drop.
struct Client {
    child: Child,
    pid: u32,
}

impl Client {
    fn python(args: &[String]) -> Self {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", CLIENT])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn /usr/bin/python3 (psycopg2)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("python output");
        assert!(
            line.starts_with("pid "),
            "{args:?} did not connect: {line:?}"
        );
        Self {
            pid: child.id(),
            child,
        }
    }

    /// A psql holding its connection in `pg_sleep`.
    fn psql(program: &str, args: &[String]) -> Self {
        let child = Command::new(program)
            .args(args)
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGSSLMODE", "disable")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn psql");
        Self {
            pid: child.id(),
            child,
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The secrets, each distinct so that a leak names its form.
const SECRETS: &[&str] = &[
    "UriS3cret",
    "Conninfo S3cret",
    "JavaS3cret",
    "FlagS3cret",
    "TokenS3cret",
    "EnvS3cret",
    "PsqlUriS3cret",
    "PgPasswordS3cret",
];

/// The clients, and for each the part of its `cmdline` that must come out as written here.
fn start_clients(pg: &Postgres) -> Vec<(Client, String)> {
    let port = pg.port.to_string();
    let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    let uri = format!("postgresql://postgres:UriS3cret@127.0.0.1:{port}/postgres");
    let conninfo = format!(
        "host=127.0.0.1 port={port} user=postgres password='Conninfo S3cret' dbname=postgres"
    );
    let psql_uri = format!("postgresql://postgres:PsqlUriS3cret@127.0.0.1:{port}/postgres");
    vec![
        (
            Client::python(&s(&["dsn", &uri])),
            format!("dsn postgresql://postgres:<redacted>@127.0.0.1:{port}/postgres"),
        ),
        (
            Client::python(&s(&["dsn", &conninfo])),
            format!(
                "dsn host=127.0.0.1 port={port} user=postgres password=<redacted> dbname=postgres"
            ),
        ),
        (
            Client::python(&s(&[
                "hostport",
                "127.0.0.1",
                &port,
                "-Dspring.datasource.password=JavaS3cret",
                "--db-password",
                "FlagS3cret",
                "--api-token=TokenS3cret",
                "PGPASSWORD=EnvS3cret",
                "--db-user",
                "app",
            ])),
            format!(
                "hostport 127.0.0.1 {port} -Dspring.datasource.password=<redacted> \
                 --db-password <redacted> --api-token=<redacted> PGPASSWORD=<redacted> \
                 --db-user app"
            ),
        ),
        (
            Client::psql("psql", &s(&[&psql_uri, "-X", "-c", "select pg_sleep(60)"])),
            format!("psql postgresql://postgres:<redacted>@127.0.0.1:{port}/postgres -X -c <sql>"),
        ),
        // `env` execs psql: the variable is in psql's environment, which is never read, and
        // not in its argv.
        (
            Client::psql(
                "env",
                &s(&[
                    "PGPASSWORD=PgPasswordS3cret",
                    "psql",
                    "-X",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-c",
                    "select pg_sleep(60)",
                ]),
            ),
            format!("psql -X -h 127.0.0.1 -p {port} -U postgres -c <sql>"),
        ),
    ]
}

/// The argv of `pid` as `/proc` shows it, NULs as spaces.
fn proc_cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

/// The client `open` event of each of `pids`, once all have one.
fn client_opens(tracer: &Tracer, pids: &[u32]) -> Vec<Event> {
    let open_of = |pid| Want::of("open", "client", pid);
    let events = tracer
        .wait_for(WAIT, |evs| {
            pids.iter().all(|&pid| open_of(pid).found_in(evs))
        })
        .expect("an open event for every client");
    pids.iter()
        .map(|&pid| open_of(pid).find(&events)[0].clone())
        .collect()
}

/// `tracer list ARGS`: its stdout; it must succeed.
fn list(args: &[&str]) -> String {
    let out = Command::new(tracer_bin())
        .arg("list")
        .args(args)
        .output()
        .expect("tracer list");
    assert!(
        out.status.success(),
        "tracer list {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `--json` line of `pid`'s client connection.
fn listed(json: &str, pid: u32) -> Event {
    json.lines()
        .map(|l| Event::parse(l).expect("JSON line"))
        .find(|c| c.pid == pid && c.role == "client")
        .unwrap_or_else(|| panic!("pid {pid} not in tracer list --json:\n{json}"))
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} leaks {secret:?}:\n{text}");
    }
}

#[test]
fn no_credential_of_a_real_command_line_leaves_the_tracer() {
    let Some(pg) = root_postgres() else { return };
    let port = pg.port.to_string();
    let tracer =
        Tracer::start(&["--port", &port, "--log-level", "debug"]).expect("tracer (redacted)");
    let clients = start_clients(&pg);
    let pids: Vec<u32> = clients.iter().map(|(c, _)| c.pid).collect();
    let opens = client_opens(&tracer, &pids);

    // The secrets really are on those command lines (except psql's env, which is not argv).
    let argv: String = pids.iter().map(|&p| proc_cmdline(p)).collect();
    for secret in &SECRETS[..SECRETS.len() - 1] {
        assert!(
            argv.contains(secret),
            "{secret:?} is not in any argv:\n{argv}"
        );
    }

    for (open, (_, expected)) in opens.iter().zip(&clients) {
        validate_event(&open.json()).unwrap_or_else(|e| panic!("{e}\n{open}"));
        let cmdline = open.cmdline.as_deref().expect("cmdline");
        assert!(
            cmdline.ends_with(expected.as_str()),
            "cmdline {cmdline:?} does not end with {expected:?}"
        );
    }
    assert_no_secret("the event stream", &lines(&tracer.events()));

    let json = list(&["--json", "--port", &port]);
    assert_no_secret("tracer list --json", &json);
    for (pid, (_, expected)) in pids.iter().zip(&clients) {
        let conn = listed(&json, *pid);
        let cmdline = conn.cmdline.as_deref().expect("cmdline");
        assert!(
            cmdline.ends_with(expected.as_str()),
            "{cmdline:?} vs {expected:?}"
        );
    }
    let table = list(&["--port", &port]);
    assert_no_secret("tracer list", &table);
    for pid in &pids {
        assert!(
            table.lines().any(|l| l.starts_with(&format!("{pid} "))),
            "pid {pid} not in the table:\n{table}"
        );
    }

    drop(clients);
    tracer
        .wait_for(WAIT, |evs| {
            pids.iter()
                .all(|&pid| Want::kind("close").pid(pid).found_in(evs))
        })
        .expect("a close event for every client");
    assert_no_secret("the event stream", &lines(&tracer.events()));
    let stderr = tracer.stderr();
    assert!(!stderr.is_empty(), "debug logs expected");
    assert_no_secret("the daemon's logs", &stderr);
}

#[test]
fn cmdline_off_emits_none_and_full_emits_all() {
    let Some(pg) = root_postgres() else { return };
    let port = pg.port.to_string();
    let off = Tracer::start(&["--port", &port, "--cmdline", "off"]).expect("tracer (off)");
    let full = Tracer::start(&["--port", &port, "--cmdline", "full"]).expect("tracer (full)");
    let uri = format!("postgresql://postgres:UriS3cret@127.0.0.1:{port}/postgres");
    let client = Client::python(&["dsn".to_owned(), uri.clone()]);

    let open = &client_opens(&off, &[client.pid])[0];
    validate_event(&open.json()).unwrap_or_else(|e| panic!("{e}\n{open}"));
    assert_eq!(
        open.json()["cmdline"],
        Value::Null,
        "present, and null: {open}"
    );
    assert_eq!(open.comm, "python3", "the rest is still there: {open}");
    assert_no_secret("--cmdline off", &lines(&off.events()));

    let open = &client_opens(&full, &[client.pid])[0];
    let cmdline = open.cmdline.as_deref().expect("cmdline");
    assert!(cmdline.ends_with(&format!("dsn {uri}")), "{cmdline}");

    let json = list(&["--json", "--port", &port, "--cmdline", "off"]);
    assert_eq!(
        listed(&json, client.pid).json()["cmdline"],
        Value::Null,
        "{json}"
    );
    let json = list(&["--json", "--port", &port, "--cmdline", "full"]);
    assert!(
        json.contains("UriS3cret"),
        "--cmdline full shows it:\n{json}"
    );
}

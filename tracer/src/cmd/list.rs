//! `tracer list`: the Postgres connections open on this host right now. From a running
//! daemon's live table when one answers (real transaction states), else from the socket
//! tables and `/proc`. Without the daemon's protocol reader, `state` is
//! what the socket tables and Postgres's process titles tell: `close_wait`, `active`
//! (request bytes moved after the last answer bytes), the backend's state for a local
//! Postgres's connections (both ends when both are here), else `unknown`.

use std::{io::Write, path::Path};

use serde::Serialize;

use crate::{
    config::Glob,
    config::cli::ListArgs,
    export::events::ConnFields,
    export::live::{self, Row, typed},
    host::discovery::{FoundConn, find_connections},
    host::proc_title,
    host::redact::CmdlineMode,
    model::detectors::Seeded,
};

/// One line of `tracer list --json`: the event field names.
#[derive(Debug, Serialize)]
pub struct ListedConn {
    #[serde(flatten)]
    pub conn: ConnFields,
    pub age_s: f64,
    pub idle_s: Option<f64>,
}

pub fn describe(
    found: &FoundConn,
    seeded: Option<Seeded>,
    now: u64,
    proc_root: &Path,
    cmdline: CmdlineMode,
) -> ListedConn {
    let mut conn = found.to_conn(now, proc_root, cmdline);
    conn.seeded = seeded;
    ListedConn {
        conn: ConnFields::new(&conn),
        age_s: found.age_s,
        idle_s: found.idle_s(),
    }
}

/// A JSON object of the output: an API row, or a [`ListedConn`].
type Object = serde_json::Map<String, serde_json::Value>;

/// Asks the daemon at `args.metrics_addr` first, else reads the socket tables; says which on
/// `note` (one line), then prints to `out`.
pub fn run(args: &ListArgs, out: &mut dyn Write, note: &mut dyn Write) -> anyhow::Result<()> {
    let glob = Glob::compile(&args.unix_socket_glob).map_err(anyhow::Error::msg)?;
    let from_daemon = match args.metrics_addr {
        Some(addr) => match ask_daemon(addr) {
            Ok(rows) => {
                writeln!(
                    note,
                    "tracer list: live table of the daemon at {addr} (the ports and sockets \
                     it watches)"
                )?;
                Some(rows)
            }
            Err(err) => {
                writeln!(
                    note,
                    "tracer list: {err}; listing from the kernel's socket tables instead \
                     (transaction states only where process titles tell)"
                )?;
                None
            }
        },
        None => {
            writeln!(
                note,
                "tracer list: listing from the kernel's socket tables (--metrics-addr off)"
            )?;
            None
        }
    };
    let mut rows = match from_daemon {
        Some(rows) => rows
            .into_iter()
            .filter(|row| watched(&Row::read(row), &args.ports, &glob))
            .collect(),
        None => from_socket_tables(args, &glob)?,
    };
    rows.sort_by_cached_key(|row| {
        let text = |key: &str| {
            row.get(key)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        };
        (text("transport"), text("remote"), text("local"))
    });
    if args.json {
        for row in &rows {
            writeln!(out, "{}", serde_json::to_string(row)?)?;
        }
        return Ok(());
    }
    print_table(&typed(&rows), out)
}

fn ask_daemon(addr: std::net::SocketAddr) -> Result<Vec<Object>, live::FetchError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|cause| live::FetchError::Unreachable { addr, cause })?;
    runtime.block_on(live::fetch(addr))
}

/// The daemon serves every connection it watches: keep those `--port` / `--unix-socket-glob`
/// name, as the socket-table scan does (the Postgres end's port: remote for a client, local
/// for a server).
fn watched(row: &Row, ports: &[u16], glob: &Glob) -> bool {
    let port = |addr: &str| addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
    match row.transport.as_str() {
        "unix" => glob.matches(&row.remote) || glob.matches(&row.local),
        _ => {
            let end = if row.role == "server" {
                &row.local
            } else {
                &row.remote
            };
            port(end).is_some_and(|p| ports.contains(&p))
        }
    }
}

fn from_socket_tables(args: &ListArgs, glob: &Glob) -> anyhow::Result<Vec<Object>> {
    let proc_root = Path::new("/proc");
    let found = find_connections(&args.ports, &|p| glob.matches(p), proc_root)?;
    let now = crate::daemon::monotonic_ns();
    let seeds = proc_title::seeds(&found, &|pid| proc_title::read_title(proc_root, pid), now);
    found
        .iter()
        .map(|f| {
            let seeded = seeds.get(&f.cookie).copied();
            match serde_json::to_value(describe(f, seeded, now, proc_root, args.cmdline))? {
                serde_json::Value::Object(object) => Ok(object),
                other => anyhow::bail!("a listed connection is not an object: {other}"),
            }
        })
        .collect()
}

fn print_table(rows: &[Row], out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "{:<8} {:<6} {:<16} {:<5} {:<12} {:<40} {:<40} {:<28} {:>9} {:>9}",
        "PID", "ROLE", "COMM", "TRANS", "CONTAINER", "LOCAL", "REMOTE", "STATE", "AGE_S", "IDLE_S"
    )?;
    for c in rows {
        writeln!(
            out,
            "{:<8} {:<6} {:<16} {:<5} {:<12} {:<40} {:<40} {:<28} {:>9.1} {:>9}",
            c.pid,
            c.role,
            c.comm,
            c.transport,
            c.short_container().unwrap_or("-"),
            if c.local.is_empty() { "-" } else { &c.local },
            c.remote,
            c.state().as_str(),
            c.age_s,
            c.idle_s.map_or("-".to_owned(), |s| format!("{s:.1}")),
        )?;
    }
    Ok(())
}

//! `tracer list`: the Postgres connections open on this host right now, from the socket
//! tables and `/proc`, without a daemon. Without the daemon's protocol reader, `state` is
//! what the socket tables and Postgres's process titles tell: `close_wait`, `active`
//! (request bytes moved after the last answer bytes), the backend's state for a local
//! Postgres's connections (both ends when both are here), else `unknown`.

use std::{io::Write, path::Path};

use serde::Serialize;

use crate::{
    cli::ListArgs,
    config::Glob,
    conn_table::{Role, Transport},
    detectors::Seeded,
    discovery::{FoundConn, find_connections},
    events::ConnFields,
    proc_title,
    redact::CmdlineMode,
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

pub fn run(args: &ListArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let glob = Glob::compile(&args.unix_socket_glob).map_err(anyhow::Error::msg)?;
    let proc_root = Path::new("/proc");
    let mut found = find_connections(&args.ports, &|p| glob.matches(p), proc_root)?;
    found.sort_by(|a, b| {
        (a.transport as u8, &a.remote, &a.local).cmp(&(b.transport as u8, &b.remote, &b.local))
    });
    let now = crate::daemon::monotonic_ns();
    let seeds = proc_title::seeds(&found, &|pid| proc_title::read_title(proc_root, pid), now);
    let listed: Vec<ListedConn> = found
        .iter()
        .map(|f| {
            describe(
                f,
                seeds.get(&f.cookie).copied(),
                now,
                proc_root,
                args.cmdline,
            )
        })
        .collect();
    if args.json {
        for conn in &listed {
            writeln!(out, "{}", serde_json::to_string(conn)?)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<8} {:<6} {:<16} {:<5} {:<12} {:<40} {:<40} {:<28} {:>9} {:>9}",
        "PID", "ROLE", "COMM", "TRANS", "CONTAINER", "LOCAL", "REMOTE", "STATE", "AGE_S", "IDLE_S"
    )?;
    for listed in &listed {
        let c = &listed.conn;
        let container = c
            .container_id
            .as_deref()
            .map(|id| &id[..12.min(id.len())])
            .unwrap_or("-");
        writeln!(
            out,
            "{:<8} {:<6} {:<16} {:<5} {:<12} {:<40} {:<40} {:<28} {:>9.1} {:>9}",
            c.pid,
            match c.role {
                Role::Client => "client",
                Role::Server => "server",
            },
            c.comm,
            match c.transport {
                Transport::Tcp => "tcp",
                Transport::Unix => "unix",
            },
            container,
            if c.local.is_empty() { "-" } else { &c.local },
            c.remote,
            c.state.as_str(),
            listed.age_s,
            listed.idle_s.map_or("-".to_owned(), |s| format!("{s:.1}")),
        )?;
    }
    Ok(())
}

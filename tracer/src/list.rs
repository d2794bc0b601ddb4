//! `tracer list`: the Postgres connections open on this host right now, from the socket
//! tables and `/proc`, without a daemon. The transaction state needs the daemon's protocol
//! reader, so here `state` is `close_wait`, `active` (request bytes moved after the last
//! answer bytes) or `unknown`.

use std::{io::Write, path::Path};

use serde::Serialize;

use crate::{
    cli::ListArgs,
    config::Glob,
    conn_table::{Role, Transport},
    discovery::{FoundConn, find_connections},
    process::{Container, read_details},
};

/// One line of `tracer list --json`: the event field names.
#[derive(Debug, Serialize)]
pub struct ListedConn {
    pub conn_id: String,
    pub role: Role,
    pub transport: Transport,
    pub local: String,
    pub remote: String,
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub uid: u32,
    pub cgroup: Option<String>,
    #[serde(flatten)]
    pub container: Container,
    pub state: &'static str,
    pub age_s: f64,
    pub idle_s: Option<f64>,
}

pub fn state_of(found: &FoundConn) -> &'static str {
    if found.peer_closed {
        return "close_wait";
    }
    match (found.to_server_ago_s, found.from_server_ago_s) {
        (Some(to), Some(from)) if to < from => "active",
        _ => "unknown",
    }
}

pub fn describe(found: &FoundConn, proc_root: &Path) -> ListedConn {
    let pid = found.pid().unwrap_or(0);
    let details = if pid == 0 {
        Default::default()
    } else {
        read_details(proc_root, pid)
    };
    let comm = std::fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default();
    ListedConn {
        conn_id: found.cookie.to_string(),
        role: found.role,
        transport: found.transport,
        local: found.local.clone(),
        remote: found.remote.clone(),
        pid,
        comm,
        exe: details.exe,
        cmdline: details.cmdline,
        uid: found.uid,
        cgroup: details.cgroup,
        container: details.container,
        state: state_of(found),
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
    let listed: Vec<ListedConn> = found.iter().map(|f| describe(f, proc_root)).collect();
    if args.json {
        for conn in &listed {
            writeln!(out, "{}", serde_json::to_string(conn)?)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<8} {:<6} {:<18} {:<8} {:<16} {:<12} {:<32} {:<32} {:<11} {:>9} {:>9}",
        "PID",
        "ROLE",
        "COMM",
        "TRANS",
        "CONTAINER",
        "",
        "LOCAL",
        "REMOTE",
        "STATE",
        "AGE_S",
        "IDLE_S"
    )?;
    for c in &listed {
        let container = c
            .container
            .container_id
            .as_deref()
            .map(|id| &id[..12.min(id.len())])
            .unwrap_or("-");
        writeln!(
            out,
            "{:<8} {:<6} {:<18} {:<8} {:<16} {:<12} {:<32} {:<32} {:<11} {:>9.1} {:>9}",
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
            c.container
                .pod_uid
                .as_deref()
                .map(|p| &p[..8.min(p.len())])
                .unwrap_or(""),
            if c.local.is_empty() { "-" } else { &c.local },
            c.remote,
            c.state,
            c.age_s,
            c.idle_s.map_or("-".to_owned(), |s| format!("{s:.1}")),
        )?;
    }
    Ok(())
}

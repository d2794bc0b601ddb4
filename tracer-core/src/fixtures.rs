//! Connections for tests of the stages after the table: this crate's own tests, and the
//! daemon crate's through the `fixtures` feature (its dev-dependency turns it on).

use crate::conn_table::{Conn, Owner, Role, Transport};

/// A process of the host's root cgroup (id 1), uid 0, started at boot.
pub fn owner(pid: u32, comm: &str) -> Owner {
    Owner {
        pid,
        uid: 0,
        cgroup_id: 1,
        comm: comm.into(),
        start_boottime_ns: 0,
    }
}

/// A TCP connection between two ends (`ip:port` text), begun at 0 ns.
pub fn tcp_conn(cookie: u64, role: Role, local: &str, remote: &str, owner: Owner) -> Conn {
    Conn::new(
        cookie,
        role,
        Transport::Tcp,
        local.into(),
        remote.into(),
        owner,
        0,
    )
}

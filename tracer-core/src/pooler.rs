//! Who is connected to whom: the two ends of a connection when both are on this host
//! (`peer_conn_id`), the pid a server announced (`backend_pid`), and the links a pooler
//! makes between its clients' connections and its server connections (`linked`).
//!
//! A pure model fed by the daemon: connections opening and closing, the kernel's link
//! records (`CONN_LINK`: a pooler's thread received on one tracked connection and sent on
//! one of the other role), and the Unix socket peers sock_diag reports.
//!
//! Names, from the pooler's side: a *server connection* is the pooler's client-role
//! connection to Postgres; a *client connection* is the pooler's accepted (server-role)
//! connection from an application. A link pairs one of each, one to one.
//!
//! Unlinking: the kernel reports a server connection whose answer ended with ReadyForQuery
//! `I`. In transaction (and statement) pooling the pooler returns it to the pool right then;
//! in session pooling it stays with its client until the client leaves. The model cannot read
//! the pooler's configuration (per database and user, behind files it may not see), so it
//! learns the mode per pooler process: once that process is seen moving a server connection
//! to another client while the previous client is still connected (or a client to another
//! server while the previous one is still open), it pools by transaction and idle server
//! connections unlink; until then links last until either end closes.

use std::collections::{HashMap, HashSet};

use rustc_hash::FxHashSet;

use crate::{
    conn_table::{Conn, ConnTable, Role, Transport},
    endpoint::Endpoint,
    events::{ConnFields, Linked},
};

/// The kernel's largest pid (`PID_MAX_LIMIT` on 64-bit): BackendKeyData claiming a bigger
/// one is a pooler's made-up key (PgBouncer's are random), not a process.
pub const PID_MAX_LIMIT: u32 = 4 * 1024 * 1024;

#[derive(Default)]
pub struct Relations {
    /// TCP connections by `(local, remote)` address.
    by_addr: HashMap<(Endpoint, Endpoint), u64>,
    /// Unix connections' peers (both directions), from sock_diag.
    unix_peer: HashMap<u64, u64>,
    /// Open connections whose peer has closed already: the peer's `conn_id`, so that their
    /// later events (their own close above all) still name it.
    closed_peer: HashMap<u64, u64>,
    /// Server connection -> client connection it serves, and back.
    client_of: HashMap<u64, u64>,
    server_of: HashMap<u64, u64>,
    /// The last client each server connection served, the last server each client used.
    last_client: HashMap<u64, u64>,
    last_server: HashMap<u64, u64>,
    /// Processes that relay between connections (they made links), and those of them seen
    /// pooling by transaction.
    poolers: HashSet<u32>,
    transaction_pooling: HashSet<u32>,
    /// Processes holding both client- and server-role connections (refreshed each tick),
    /// and the table membership they were worked out from.
    proxies: HashSet<u32>,
    proxies_of: Option<u64>,
}

/// Still usable: open and the peer has not closed its side.
fn is_live(table: &ConnTable, cookie: u64) -> bool {
    table
        .get(cookie)
        .is_some_and(|c| c.peer_closed_ns.is_none())
}

impl Relations {
    pub fn opened(&mut self, conn: &Conn) {
        if conn.transport == Transport::Tcp {
            self.by_addr
                .insert((conn.local.clone(), conn.remote.clone()), conn.cookie);
        }
    }

    pub fn closed(&mut self, conn: &Conn) {
        // A peer that closed first is gone: only an open one keeps this connection's name.
        if self.closed_peer.remove(&conn.cookie).is_none()
            && let Some(peer) = self.peer(conn)
        {
            self.closed_peer.insert(peer, conn.cookie);
        }
        let key = (conn.local.clone(), conn.remote.clone());
        if self.by_addr.get(&key) == Some(&conn.cookie) {
            self.by_addr.remove(&key);
        }
        if let Some(peer) = self.unix_peer.remove(&conn.cookie) {
            self.unix_peer.remove(&peer);
        }
        self.unlink(conn.cookie);
        if let Some(client) = self.last_client.remove(&conn.cookie) {
            self.last_server.remove(&client);
        }
        if let Some(server) = self.last_server.remove(&conn.cookie) {
            self.last_client.remove(&server);
        }
    }

    /// Removes the link `cookie` is in, whichever side it is.
    fn unlink(&mut self, cookie: u64) {
        if let Some(client) = self.client_of.remove(&cookie) {
            self.server_of.remove(&client);
        }
        if let Some(server) = self.server_of.remove(&cookie) {
            self.client_of.remove(&server);
        }
    }

    /// Replaces the Unix peer pairs, from `(cookie, peer cookie)` of tracked connections.
    pub fn set_unix_peers(&mut self, pairs: impl IntoIterator<Item = (u64, u64)>) {
        self.unix_peer.clear();
        for (a, b) in pairs {
            self.unix_peer.insert(a, b);
            self.unix_peer.insert(b, a);
        }
    }

    /// Processes that hold both roles: proxies, poolers among them.
    pub fn refresh_proxies(&mut self, table: &ConnTable) {
        if self.proxies_of == Some(table.membership()) {
            return;
        }
        self.proxies_of = Some(table.membership());
        // Over every connection when they changed: FxHash, not SipHash, for a pid.
        let (mut clients, mut servers) = (FxHashSet::default(), FxHashSet::default());
        for conn in table.iter() {
            match conn.role {
                Role::Client => clients.insert(conn.owner.pid),
                Role::Server => servers.insert(conn.owner.pid),
            };
        }
        self.proxies = clients.intersection(&servers).copied().collect();
        self.proxies.remove(&0);
    }

    /// A kernel link record: connection `cookie` was paired with `linked` by its owner's
    /// thread (0: a server connection went idle). True when the links changed.
    pub fn link_record(&mut self, table: &ConnTable, cookie: u64, linked: u64) -> bool {
        let Some(conn) = table.get(cookie) else {
            return false;
        };
        let pooler = conn.owner.pid;
        if linked == 0 {
            // Only server connections report idle; session pooling keeps the client.
            if conn.role == Role::Client
                && self.transaction_pooling.contains(&pooler)
                && self.client_of.contains_key(&cookie)
            {
                self.unlink(cookie);
                return true;
            }
            return false;
        }
        let Some(other) = table.get(linked) else {
            return false;
        };
        if other.role == conn.role {
            return false;
        }
        let (server, client) = match conn.role {
            Role::Client => (cookie, linked),
            Role::Server => (linked, cookie),
        };
        self.poolers.insert(pooler);
        if self.client_of.get(&server) == Some(&client) {
            return false;
        }
        // A move while the previous partner is still connected: transaction pooling.
        let moved_server = self
            .last_client
            .get(&server)
            .is_some_and(|&prev| prev != client && is_live(table, prev));
        let moved_client = self
            .last_server
            .get(&client)
            .is_some_and(|&prev| prev != server && is_live(table, prev));
        if moved_server || moved_client {
            self.transaction_pooling.insert(pooler);
        }
        self.unlink(server);
        self.unlink(client);
        self.client_of.insert(server, client);
        self.server_of.insert(client, server);
        self.last_client.insert(server, client);
        self.last_server.insert(client, server);
        true
    }

    /// The other end of `conn` when it is tracked on this host.
    pub fn peer(&self, conn: &Conn) -> Option<u64> {
        match conn.transport {
            Transport::Tcp => self
                .by_addr
                .get(&(conn.remote.clone(), conn.local.clone()))
                .copied()
                .filter(|&p| p != conn.cookie),
            Transport::Unix => self.unix_peer.get(&conn.cookie).copied(),
        }
        .or_else(|| self.closed_peer.get(&conn.cookie).copied())
    }

    /// A process that relays between connections: a pooler (or another proxy).
    pub fn is_pooler(&self, pid: u32) -> bool {
        self.poolers.contains(&pid) || self.proxies.contains(&pid)
    }

    /// Whether the pooler `pid` was seen pooling by transaction.
    #[cfg(test)]
    pub(crate) fn pools_by_transaction(&self, pid: u32) -> bool {
        self.transaction_pooling.contains(&pid)
    }

    /// The client connection server connection `server` serves now.
    pub fn client_of(&self, server: u64) -> Option<u64> {
        self.client_of.get(&server).copied()
    }

    /// The server connection client connection `client` is linked to now.
    pub fn server_of(&self, client: u64) -> Option<u64> {
        self.server_of.get(&client).copied()
    }

    /// `backend_pid` of a client-role connection: what the server announced at start-up,
    /// unless the server end is a pooler (on this host, known by its connections; elsewhere,
    /// only when its made-up pid is beyond any real one).
    pub fn backend_pid(&self, table: &ConnTable, conn: &Conn) -> Option<u32> {
        if conn.role != Role::Client {
            return None;
        }
        if let Some(peer) = self.peer(conn).and_then(|p| table.get(p))
            && self.is_pooler(peer.owner.pid)
        {
            return None;
        }
        Some(conn.live.backend_pid).filter(|&pid| pid != 0 && pid <= PID_MAX_LIMIT)
    }

    /// The backend a server connection pins: its announced pid, else the owner of its other
    /// end on this host (a TLS connection's BackendKeyData cannot be read).
    fn pinned_backend(&self, table: &ConnTable, server: &Conn) -> Option<u32> {
        self.backend_pid(table, server).or_else(|| {
            let peer = table.get(self.peer(server)?)?;
            (!self.is_pooler(peer.owner.pid) && peer.owner.pid != 0).then_some(peer.owner.pid)
        })
    }

    /// `linked` of `conn`: for a pooler's server connection, the client it serves; for a
    /// pooler's client connection, or an application's connection to a pooler on this host,
    /// the server connection it is linked to.
    pub fn linked(&self, table: &ConnTable, conn: &Conn) -> Option<Linked> {
        if let Some(client) = self.client_of(conn.cookie).and_then(|c| table.get(c)) {
            let app = self.peer(client).and_then(|p| table.get(p));
            return Some(Linked::Client {
                conn_id: client.cookie.to_string(),
                pid: app.map(|a| a.owner.pid),
                comm: app.map(|a| a.owner.comm.clone()),
                container_id: app.and_then(|a| a.details.container.container_id.clone()),
                remote: client.remote.to_string(),
            });
        }
        let server = self.server_of(conn.cookie).or_else(|| {
            if conn.role != Role::Client {
                return None;
            }
            self.server_of(self.peer(conn)?)
        })?;
        let server = table.get(server)?;
        Some(Linked::Server {
            conn_id: server.cookie.to_string(),
            backend_pid: self.pinned_backend(table, server),
            remote: server.remote.to_string(),
        })
    }

    /// The event fields of `conn`, with its relations as they are now.
    pub fn fields(&self, table: &ConnTable, conn: &Conn) -> ConnFields {
        let mut fields = ConnFields::new(conn);
        fields.peer_conn_id = self.peer(conn).map(|p| p.to_string());
        fields.backend_pid = self.backend_pid(table, conn);
        fields.linked = self.linked(table, conn);
        fields
    }

    /// Every pooler's server connections and who holds them, for the metric: `(pooler's
    /// comm, state, client comm, client container, client ip)`.
    pub fn server_connections<'t>(
        &self,
        table: &'t ConnTable,
    ) -> impl Iterator<Item = (&'t Conn, Option<&'t Conn>, Option<&'t Conn>)> + use<'t, '_> {
        table
            .iter()
            .filter(|c| c.role == Role::Client && self.is_pooler(c.owner.pid))
            .map(move |server| {
                let client = self.client_of(server.cookie).and_then(|c| table.get(c));
                let app = client.and_then(|c| self.peer(c)).and_then(|p| table.get(p));
                (server, client, app)
            })
    }
}

#[cfg(test)]
mod tests;

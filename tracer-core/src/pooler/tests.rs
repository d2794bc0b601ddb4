use super::*;
use crate::fixtures::{owner, tcp_conn};

fn conn(cookie: u64, role: Role, pid: u32, local: &str, remote: &str) -> Conn {
    tcp_conn(cookie, role, local, remote, owner(pid, &format!("p{pid}")))
}

const BOUNCER: u32 = 50;

/// An app (pid 10 + i) connected to PgBouncer (6432), whose server connections go to
/// Postgres (5432, backends pid 100 + i).
struct Host {
    table: ConnTable,
    rel: Relations,
}

impl Host {
    fn new() -> Self {
        Self {
            table: ConnTable::default(),
            rel: Relations::default(),
        }
    }
    fn add(&mut self, c: Conn) {
        self.rel.opened(&c);
        assert!(self.table.insert_found(c));
    }
    /// App `i`: its connection (cookie 10+i) and PgBouncer's accepted end (20+i).
    fn app(&mut self, i: u64) {
        let port = 40000 + i;
        self.add(conn(
            10 + i,
            Role::Client,
            10 + i as u32,
            &format!("127.0.0.1:{port}"),
            "127.0.0.1:6432",
        ));
        self.add(conn(
            20 + i,
            Role::Server,
            BOUNCER,
            "127.0.0.1:6432",
            &format!("127.0.0.1:{port}"),
        ));
    }
    /// Server connection `i`: PgBouncer's (30+i) and the backend's end (40+i).
    fn server(&mut self, i: u64) {
        let port = 50000 + i;
        let mut s = conn(
            30 + i,
            Role::Client,
            BOUNCER,
            &format!("127.0.0.1:{port}"),
            "127.0.0.1:5432",
        );
        s.live.backend_pid = 100 + i as u32;
        self.add(s);
        self.add(conn(
            40 + i,
            Role::Server,
            100 + i as u32,
            "127.0.0.1:5432",
            &format!("127.0.0.1:{port}"),
        ));
    }
    fn linked(&self, cookie: u64) -> Option<Linked> {
        self.rel
            .linked(&self.table, self.table.get(cookie).expect("conn"))
    }
    fn record(&mut self, cookie: u64, linked: u64) -> bool {
        self.rel.link_record(&self.table, cookie, linked)
    }
    fn close(&mut self, cookie: u64) {
        let c = self.table.remove(cookie).expect("conn");
        self.rel.closed(&c);
    }
}

fn client_pid(l: Option<Linked>) -> Option<u32> {
    match l {
        Some(Linked::Client { pid, .. }) => pid,
        other => panic!("not a client link: {other:?}"),
    }
}

fn server_id(l: Option<Linked>) -> Option<(String, Option<u32>)> {
    match l {
        Some(Linked::Server {
            conn_id,
            backend_pid,
            ..
        }) => Some((conn_id, backend_pid)),
        None => None,
        other => panic!("not a server link: {other:?}"),
    }
}

#[test]
fn peers_are_the_reversed_address_pair() {
    let mut h = Host::new();
    h.app(1);
    h.server(1);
    let peer = |h: &Host, c: u64| h.rel.peer(h.table.get(c).expect("conn"));
    assert_eq!(peer(&h, 11), Some(21));
    assert_eq!(peer(&h, 21), Some(11));
    assert_eq!(peer(&h, 31), Some(41));
    assert_eq!(peer(&h, 41), Some(31));
    // A close names the peer even when the peer closed first (a backend that exits
    // before its client's socket is gone), and leaves nothing behind.
    h.close(41);
    assert_eq!(peer(&h, 31), Some(41));
    h.close(31);
    assert!(h.rel.closed_peer.is_empty());
}

#[test]
fn links_name_the_app_and_the_backend_from_every_side() {
    let mut h = Host::new();
    h.app(1);
    h.server(1);
    assert!(h.record(31, 21));
    let linked = h.linked(31);
    assert_eq!(client_pid(linked.clone()), Some(11));
    assert!(
        matches!(linked, Some(Linked::Client { ref remote, .. }) if remote == "127.0.0.1:40001")
    );
    assert_eq!(server_id(h.linked(21)), Some(("31".into(), Some(101))));
    assert_eq!(server_id(h.linked(11)), Some(("31".into(), Some(101))));
    // The answer's way back says the same: no change.
    assert!(!h.record(21, 31));
    // Nothing links the backend's own connection.
    assert_eq!(h.linked(41), None);
}

#[test]
fn backend_pid_is_not_taken_from_a_pooler() {
    let mut h = Host::new();
    h.app(1);
    h.server(1);
    h.table.get_mut(11).expect("app").live.backend_pid = 777;
    h.rel.refresh_proxies(&h.table);
    let pid = |h: &Host, c: u64| h.rel.backend_pid(&h.table, h.table.get(c).expect("conn"));
    assert_eq!(pid(&h, 11), None, "PgBouncer's made-up key");
    assert_eq!(pid(&h, 31), Some(101));
    assert_eq!(pid(&h, 41), None, "server role");
    // A remote pooler's random key beyond any pid.
    let mut remote = conn(60, Role::Client, 12, "10.0.0.1:1", "10.0.0.2:6432");
    remote.live.backend_pid = 0x9000_0000;
    h.add(remote);
    assert_eq!(pid(&h, 60), None);
    h.table.get_mut(60).expect("remote").live.backend_pid = 4242;
    assert_eq!(pid(&h, 60), Some(4242));
}

#[test]
fn transaction_pooling_is_learned_and_then_idle_servers_unlink() {
    let mut h = Host::new();
    h.app(1);
    h.app(2);
    h.server(1);
    h.server(2);
    h.record(31, 21);
    // Idle before the mode is known: kept (session pooling would keep it).
    assert!(!h.record(31, 0));
    assert_eq!(client_pid(h.linked(31)), Some(11));
    // Client 2 gets server 1 while client 1 is still connected: transaction pooling.
    assert!(h.record(31, 22));
    assert!(h.rel.pools_by_transaction(BOUNCER));
    assert_eq!(client_pid(h.linked(31)), Some(12));
    assert_eq!(server_id(h.linked(21)), None, "client 1 has no server now");
    assert!(h.record(31, 0));
    assert_eq!(h.linked(31), None);
    assert_eq!(server_id(h.linked(12)), None);
    // One to one: client 1 on server 2, then server 2 to client 2.
    h.record(32, 21);
    h.record(22, 32);
    assert_eq!(client_pid(h.linked(32)), Some(12));
    assert_eq!(server_id(h.linked(21)), None);
}

#[test]
fn session_pooling_keeps_links_until_a_side_closes() {
    let mut h = Host::new();
    h.app(1);
    h.app(2);
    h.server(1);
    h.record(31, 21);
    assert!(!h.record(31, 0));
    // Client 1 leaves; its server goes to client 2: no sign of transaction pooling.
    h.close(21);
    assert_eq!(h.linked(31), None);
    h.record(31, 22);
    assert!(!h.rel.pools_by_transaction(BOUNCER));
    assert!(!h.record(31, 0));
    assert_eq!(client_pid(h.linked(31)), Some(12));
    h.close(31);
    assert_eq!(server_id(h.linked(22)), None);
}

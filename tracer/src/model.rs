//! The connection model, pure logic without IO, kept in `tracer-core` and named here where
//! the daemon uses it: the table of connections (`conn_table`), the stall and leak detectors
//! (`detectors`), and how connections pair up: both ends on this host, pooler links
//! (`pooler`).

pub use tracer_core::{conn_table, detectors, endpoint, pooler};

//! The connection model, pure logic without IO: the table of connections (`conn_table`),
//! the stall and leak detectors (`detectors`), and how connections pair up: both ends on this
//! host, pooler links (`pooler`).

pub mod conn_table;
pub use tracer_core::detectors;
pub mod pooler;

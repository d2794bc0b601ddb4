//! tracer: an eBPF connection tracer and leak detector for PostgreSQL clients.
//!
//! Data flows through the modules in this order: `probes` (load and attach the kernel
//! programs) -> `daemon` (ring buffer reading and wiring) -> `decode` (bytes to kernel
//! events) -> `conn_table` (connection state) -> `process` (owner details, containers;
//! `redact` decides what of a command line may be shown) -> `pooler` (who is connected to
//! whom: both ends on this host, pooler links) -> `events` (the JSON stream) and `live` (the
//! live table the metrics endpoint serves, which `list` and `top` read).

pub mod btf;
pub mod check;
pub mod cli;
pub mod config;
pub mod conn_table;
pub mod daemon;
pub mod decode;
pub mod detectors;
pub mod discovery;
pub mod events;
pub mod list;
pub mod live;
mod map_batch;
pub mod metrics;
pub mod owners;
pub mod pooler;
pub mod privileges;
pub mod probes;
pub mod proc_title;
pub mod process;
pub mod redact;
pub mod sockdiag;
pub mod state_file;
pub mod text;
pub mod top;
pub mod web_config;

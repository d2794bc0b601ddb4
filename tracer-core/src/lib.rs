//! The tracer's pure parts, in pipeline order: decoding the kernel's records into typed
//! events (`decode`), the table of connections they feed (`conn_table`, their ends typed in
//! `endpoint`) with who owns each (`owner`), the stall and leak detectors (`detectors`), how connections pair up through a
//! pooler (`pooler`), the events the daemon emits (`events`), what of a command line they
//! may show (`redact`), and the run settings' defaults and limits (`settings`).
//!
//! Nothing here loads eBPF, spawns tasks or touches files: it depends on no aya, no tokio and
//! has no build script, so `cargo test -p tracer-core` (and fuzzing) needs no bpf-linker.

pub mod conn_table;
pub mod decode;
pub mod detectors;
pub mod endpoint;
pub mod events;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod owner;
pub mod pooler;
pub mod redact;
pub mod settings;
